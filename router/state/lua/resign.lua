-- resign.lua: give the healthd leader lease up, if this daemon still holds it, so a standby
-- takes over at once instead of after the lease runs out.
--
-- KEYS[1]   leader lease   Keys.leader
-- ARGV[1]   this daemon's id
-- Returns 1 when the lease was given up, 0 when another daemon holds it.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
