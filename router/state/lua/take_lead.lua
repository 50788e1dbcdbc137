-- take_lead.lua: take or keep the healthd leader lease; a new leader bumps the epoch.
-- The epoch is the fencing token every status write carries (report_probe.lua).
--
-- KEYS[1]   leader lease (the holder's id, with an expiry)   Keys.leader
-- KEYS[2]   healthd epoch                                      Keys.epoch
-- ARGV[1]   this daemon's id
-- ARGV[2]   lease length (ms)
-- Returns {1, epoch} when this daemon leads (taken or renewed), {0, epoch, holder} otherwise.

local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2])) or 0}
end
if holder then return {0, tonumber(redis.call('GET', KEYS[2])) or 0, holder} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('INCR', KEYS[2])}
