-- delete_tenant.lua: remove a tenant the admin API owns, and revoke every key it was issued.
--
-- KEYS[1]   tenants version (string)                     Keys.tenants_version
-- KEYS[2]   tenants (hash name -> JSON spec)             Keys.tenants
-- KEYS[3]   issued keys (hash sha256 hex -> JSON record)  Keys.tenant_keys
-- ARGV[1]   tenant name
-- ARGV[2]   tenants channel
-- Returns {new version, keys revoked}, or {-1, 0} when there is no such tenant.

if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return {-1, 0} end
local all = redis.call('HGETALL', KEYS[3])
local revoked = 0
for i = 1, #all, 2 do
  local ok, rec = pcall(cjson.decode, all[i + 1])
  if ok and type(rec) == 'table' and rec.tenant == ARGV[1] then
    redis.call('HDEL', KEYS[3], all[i])
    revoked = revoked + 1
  end
end
local v = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[2], cjson.encode({version = v}))
return {v, revoked}
