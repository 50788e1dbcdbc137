-- read_health.lua: a consistent, versioned snapshot of every provider's health.
--
-- KEYS[1]       health version   Keys.health_version
-- KEYS[2..n+1]  provider hashes  Keys.provider
-- Returns {version, then per provider: health, h_since, drain, circ, circ_until, h_error}
-- (false where absent).

local out = {tonumber(redis.call('GET', KEYS[1])) or 0}
for i = 2, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'health', 'h_since', 'drain', 'circ', 'circ_until', 'h_error')
  for j = 1, 6 do out[#out + 1] = f[j] end
end
return out
