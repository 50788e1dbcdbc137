-- read_tenants.lua: each tenant's windows, requests in flight and spend, in one consistent
-- read for the gauges, /admin and routerctl. Read-only: it slides no window and purges no
-- lease, so reading never changes what acquire decides.
--
-- KEYS[2i-1]  tenant i's hash        Keys.tenant          (i = 1..n)
-- KEYS[2i]    tenant i's lease zset  Keys.tenant_leases
-- ARGV[1]     buckets in a window (WINDOW_BUCKETS): the current second and those before it
-- Returns {seconds, microseconds (Redis TIME),
--          then per tenant: requests in the window, tokens in the window, unexpired leases,
--          its 'per' field ('' when absent), its 'sp' field ('0' when absent)}
-- The spend is of the period 'per' names; the caller compares it with the current one.
-- Cost: one HMGET of 2 x ARGV[1] + 2 fields and one ZCOUNT per tenant.

local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local now = sec * 1000 + math.floor(tonumber(clock[2]) / 1000)
local fields = {}
for s = sec - tonumber(ARGV[1]) + 1, sec do
  fields[#fields + 1] = 'r:' .. s
  fields[#fields + 1] = 't:' .. s
end
fields[#fields + 1] = 'per'
fields[#fields + 1] = 'sp'
local last = #fields
local out = {clock[1], clock[2]}
for i = 1, #KEYS, 2 do
  local v = redis.call('HMGET', KEYS[i], unpack(fields))
  local requests, tokens = 0, 0
  for j = 1, last - 2, 2 do
    requests = requests + (tonumber(v[j]) or 0)
    tokens = tokens + (tonumber(v[j + 1]) or 0)
  end
  out[#out + 1] = requests
  out[#out + 1] = tokens
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 1], '(' .. now, '+inf')
  out[#out + 1] = v[last - 1] or ''
  out[#out + 1] = v[last] or '0'
end
return out
