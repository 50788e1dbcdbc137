-- revoke_key.lua: forget an issued key, found by its tenant and id; every replica hears of it.
--
-- KEYS[1]   tenants version (string)                     Keys.tenants_version
-- KEYS[2]   issued keys (hash sha256 hex -> JSON record)  Keys.tenant_keys
-- ARGV[1]   tenant name
-- ARGV[2]   key id
-- ARGV[3]   tenants channel
-- Returns the new version, or -1 when the tenant has no key of that id.

local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local ok, rec = pcall(cjson.decode, all[i + 1])
  if ok and type(rec) == 'table' and rec.tenant == ARGV[1] and rec.id == ARGV[2] then
    redis.call('HDEL', KEYS[2], all[i])
    local v = redis.call('INCR', KEYS[1])
    redis.call('PUBLISH', ARGV[3], cjson.encode({version = v}))
    return v
  end
end
return -1
