-- set_drain.lua: an operator drains or re-enables a provider; every replica honours it.
--
-- KEYS[1]   provider hash    Keys.provider
-- KEYS[2]   health version   Keys.health_version
-- ARGV[1]   1 = drain, 0 = enable
-- ARGV[2]   health channel, ARGV[3] provider name, ARGV[4] pool
-- Returns the new health version.

if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'drain', '1', 'gate', 1)  -- gate: acquire.lua looks closer
else
  redis.call('HDEL', KEYS[1], 'drain')
end
local clock = redis.call('TIME')
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], cjson.encode({pool = ARGV[4], provider = ARGV[3],
  drained = ARGV[1] == '1', version = v, at = tonumber(clock[1]) * 1000}))
return v
