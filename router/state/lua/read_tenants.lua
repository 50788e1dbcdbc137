-- read_tenants.lua: each tenant's windows, requests in flight and spend, in one consistent
-- read for the gauges, /admin and routerctl. Read-only: it slides no window and purges no
-- lease, so reading never changes what acquire decides.
--
-- KEYS[2i-1]  tenant i's hash (its window's past seconds)   Keys.tenant   (i = 1..n)
-- KEYS[2i]    tenant i's live figures (packed: acquire.lua) Keys.tenant_live
-- ARGV[1]     buckets in a window (WINDOW_BUCKETS): the current second and those before it
-- Returns {seconds, microseconds (Redis TIME),
--          then per tenant: requests in the window, tokens in the window, in flight (kept
--          with a max_in_flight, else 0), its period ('' when none yet), its spend}
-- The spend is of the period named; the caller compares it with the current one.
--
-- The window is read as acquire.lua would leave it, without writing: the running totals
-- hold every second from the oldest held on (the last one's own figures included); of the
-- seconds that left the window, or of those still in it, the fewer are read from the hash.

local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local W = tonumber(ARGV[1])
local oldest = sec - W + 1
local LIVE = '<dddddddddd'

-- the sums of the r: and t: seconds first .. last (the live second's from its figures)
local function sum(key, first, last, cs, cr, ct)
  local fields, r, t = {}, 0, 0
  for b = first, last do
    if b == cs then
      r, t = r + cr, t + ct
    else
      fields[#fields + 1] = 'r:' .. string.format('%d', b)
      fields[#fields + 1] = 't:' .. string.format('%d', b)
    end
  end
  if #fields == 0 then return r, t end
  local v = redis.call('HMGET', key, unpack(fields))
  for j = 1, #v, 2 do
    r = r + (tonumber(v[j]) or 0)
    t = t + (tonumber(v[j + 1]) or 0)
  end
  return r, t
end

local out = {clock[1], clock[2]}
for i = 1, #KEYS, 2 do
  local v = redis.call('GET', KEYS[i + 1])
  if not v then
    for _, x in ipairs({0, 0, 0, '', '0'}) do out[#out + 1] = x end
  else
    local rpm, tpm, inf, _, per, sp, cs, cr, ct, wh = struct.unpack(LIVE, v)
    local r, t = rpm, tpm
    if wh ~= 0 and wh < oldest then
      local stale = oldest - wh
      if stale >= W then
        r, t = 0, 0
      elseif stale <= W - stale then
        local sr, st = sum(KEYS[i], wh, oldest - 1, cs, cr, ct)
        r, t = r - sr, t - st
      else
        r, t = sum(KEYS[i], oldest, wh + W - 1, cs, cr, ct)
      end
    end
    out[#out + 1] = math.max(0, r)
    out[#out + 1] = math.max(0, t)
    out[#out + 1] = math.max(0, inf)
    out[#out + 1] = per >= 0 and string.format('%d', per) or ''
    out[#out + 1] = string.format('%d', sp)
  end
end
return out
