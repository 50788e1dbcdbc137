-- read_tenants.lua: each tenant's windows, requests in flight and spend, in one consistent
-- read for the gauges, /admin and routerctl. Read-only: it slides no window and purges no
-- lease, so reading never changes what acquire decides.
--
-- KEYS[i]     tenant i's hash        Keys.tenant          (i = 1..n)
-- ARGV[1]     buckets in a window (WINDOW_BUCKETS): the current second and those before it
-- Returns {seconds, microseconds (Redis TIME),
--          then per tenant: requests in the window, tokens in the window, in flight (its
--          counter: kept with a max_in_flight, else 0),
--          its 'per' field ('' when absent), its 'sp' field ('0' when absent)}
-- The spend is of the period 'per' names; the caller compares it with the current one.
--
-- The windows are read as acquire.lua's slide() would leave them, without writing: the
-- running totals 'rpm' and 'tpm' hold the buckets from 'wh' on, and every bucket held lies in
-- [wh, wh + W - 1] (an acquire slides the window once its oldest bucket leaves it). Of the
-- buckets that left the window, [wh, oldest - 1], or of those still in it, [oldest,
-- wh + W - 1], the fewer are read: at most W / 2 per tenant, none for one slid this second
-- or idle a window long. Summing all W buckets of 256 tenants took 30 ms of Redis time.

local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local W = tonumber(ARGV[1])
local oldest = sec - W + 1

-- the sums of the r: and t: buckets first .. last
local function sum(key, first, last)
  local fields = {}
  for b = first, last do
    fields[#fields + 1] = 'r:' .. b
    fields[#fields + 1] = 't:' .. b
  end
  local v, r, t = redis.call('HMGET', key, unpack(fields)), 0, 0
  for j = 1, #v, 2 do
    r = r + (tonumber(v[j]) or 0)
    t = t + (tonumber(v[j + 1]) or 0)
  end
  return r, t
end

local out = {clock[1], clock[2]}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'wh', 'rpm', 'tpm', 'per', 'sp', 'inf')
  local head, r, t = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if head and head < oldest then
    local stale = oldest - head
    if stale >= W then
      r, t = 0, 0
    elseif stale <= W - stale then
      local sr, st = sum(KEYS[i], head, oldest - 1)
      r, t = r - sr, t - st
    else
      r, t = sum(KEYS[i], oldest, head + W - 1)
    end
  end
  out[#out + 1] = math.max(0, r)
  out[#out + 1] = math.max(0, t)
  out[#out + 1] = math.max(0, tonumber(h[6]) or 0)
  out[#out + 1] = h[4] or ''
  out[#out + 1] = h[5] or '0'
end
return out
