-- read_tenant_load.lua: every tenant's windows, spend and requests in flight, at one instant.
-- Read-only: it slides no window and purges no lease (acquire does).
--
-- KEYS[2i-1]   tenant i's hash        Keys.tenant
-- KEYS[2i]     tenant i's lease zset  Keys.tenant_leases
-- Returns {seconds, microseconds (Redis TIME), then per tenant: {HGETALL}, unexpired leases}.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local out = {clock[1], clock[2]}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 1], '(' .. now, '+inf')
end
return out
