-- renew.lua: push back the expiry of leases still in flight (long streams, slow answers).
-- Only leases still present are renewed: a lease that expired and was purged is not
-- brought back, so a late renewal can never resurrect a dead replica's count.
--
-- KEYS[i]   provider lease zsets     Keys.leases
-- ARGV[1]   lease TTL (ms)
-- ARGV[2..] for each key in order: how many lease ids follow, then those ids
-- Returns how many leases were renewed.

local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[1])
local a, renewed = 2, 0
for i = 1, #KEYS do
  local count = tonumber(ARGV[a])
  for j = 1, count do
    if redis.call('ZSCORE', KEYS[i], ARGV[a + j]) then
      redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[a + j])
      renewed = renewed + 1
    end
  end
  a = a + count + 1
end
return renewed
