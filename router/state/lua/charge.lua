-- charge.lua: record what a request decided without Redis (degraded mode) cost its tenant,
-- once Redis is back: its spend this period and its usage, as release.lua would have.
-- Not idempotent: a charge retried after a timeout that in fact ran counts twice (spend is
-- over-counted, never under-counted).
--
-- KEYS[1]   tenant live figures (packed: acquire.lua)   Keys.tenant_live
-- KEYS[2]   usage of the admission's day    Keys.usage('day', ...)
-- KEYS[3]   usage of its month              Keys.usage('month', ...)
-- ARGV[1]   the spend period the request was admitted in (router/budgets.py period_id)
-- ARGV[2]   cost (nano-USD)
-- ARGV[3]   usage field prefix '<tenant>|<route>|<provider>|'
-- ARGV[4]   prompt tokens, ARGV[5] completion tokens
-- ARGV[6]   day usage TTL (s), ARGV[7] month usage TTL (s)
-- ARGV[8]   requests (a replica sums its charges of one tenant, route, provider and day)
-- Returns 1.

local LIVE = '<dddddddddd'  -- rpm, tpm, in flight, next maintenance, period, spend, ...
local tv, pid, cost = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('GET', tv)
local f = {0, 0, 0, 0, -1, 0, 0, 0, 0, 0}
if v then f = {struct.unpack(LIVE, v)} end
if f[5] == pid then
  f[6] = f[6] + cost
elseif f[5] < pid then  -- its period has had no shared admission yet
  f[5], f[6] = pid, cost
end  -- (a later period has begun: that spend belongs to a period that is over)
redis.call('SET', tv, struct.pack(LIVE, unpack(f, 1, 10)))
local p = ARGV[3]
for k = 2, 3 do
  local uk = KEYS[k]
  if redis.call('HINCRBY', uk, p .. 'req', ARGV[8]) == tonumber(ARGV[8]) then
    redis.call('EXPIRE', uk, ARGV[4 + k], 'NX')
  end
  redis.call('HINCRBY', uk, p .. 'in', ARGV[4])
  redis.call('HINCRBY', uk, p .. 'out', ARGV[5])
  redis.call('HINCRBY', uk, p .. 'cost', cost)
end
return 1
