-- put_tenant.lua: create or replace a tenant the admin API owns; every replica hears of it.
--
-- KEYS[1]   tenants version (string)           Keys.tenants_version
-- KEYS[2]   tenants (hash name -> JSON spec)   Keys.tenants
-- ARGV[1]   tenant name
-- ARGV[2]   its spec (JSON)
-- ARGV[3]   'create' (refused if it exists) or 'update' (refused if it does not)
-- ARGV[4]   room: how many tenants the admin API may hold (max_tenants less the config's)
-- ARGV[5]   tenants channel
-- Returns the new version; -1 when it exists (create) or does not (update), -2 when full.

local exists = redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1
if ARGV[3] == 'create' then
  if exists then return -1 end
  if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then return -2 end
elseif not exists then
  return -1
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local v = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({version = v}))
return v
