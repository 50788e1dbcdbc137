-- issue_key.lua: record a new key of a tenant by its hash (the key itself never comes here).
--
-- KEYS[1]   tenants version (string)                     Keys.tenants_version
-- KEYS[2]   tenants (hash name -> JSON spec)             Keys.tenants
-- KEYS[3]   issued keys (hash sha256 hex -> JSON record)  Keys.tenant_keys
-- ARGV[1]   tenant name
-- ARGV[2]   1 when the config names the tenant (it has no spec here), else 0
-- ARGV[3]   the key's sha256, hex
-- ARGV[4]   the key's id
-- ARGV[5]   the most keys there may be (max_tenant_keys)
-- ARGV[6]   tenants channel
-- Returns {new version, created (unix ms, Redis time)}, or {-1, 0} no such tenant,
-- {-2, 0} no room, {-3, 0} that hash is already issued.

if ARGV[2] ~= '1' and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {-1, 0} end
if redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[5]) then return {-2, 0} end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then return {-3, 0} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('HSET', KEYS[3], ARGV[3], '{"tenant":' .. cjson.encode(ARGV[1]) .. ',"id":' ..
  cjson.encode(ARGV[4]) .. ',"created_ms":' .. string.format('%d', now) .. '}')
local v = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[6], cjson.encode({version = v}))
return {v, now}
