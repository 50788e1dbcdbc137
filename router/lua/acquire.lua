-- acquire.lua: choose a target for one request and lease it, in one atomic round trip.
-- The readable specification of the choice is router/strategies.py; a property test
-- feeds both the same state and asserts the same answer.
--
-- KEYS[1]       route rotation counter (string)             Keys.rotation
-- KEYS[2]       route smooth weighted round robin (hash)    Keys.swrr
-- KEYS[1+2i]    target i's provider hash (windows, ...)     Keys.provider   (i = 1..n)
-- KEYS[2+2i]    target i's provider lease zset              Keys.leases
-- ARGV[1]       strategy
-- ARGV[2]       lease id
-- ARGV[3]       lease TTL (ms)
-- ARGV[4]       random integer >= 0: where tie-breaking starts
-- ARGV[5]       expected output tokens (least_latency)
-- ARGV[6]       n, the number of targets
-- ARGV[7]       window buckets (seconds held, the current one included)
-- ARGV[8+6(i-1) ..] target i: rpm, tpm, max_in_flight (0 = unlimited), weight,
--               tokens to reserve, excluded (1 = skip)
-- Returns {chosen (1-based, 0 = none), now ms, bucket s, wait ms (-1 unknown, -2 never),
--          then per target: code, in flight, rpm used, tpm used, score (string)}
-- Codes: 0 ok, 1 excluded, 2 unhealthy, 3 cooling down, 4 in flight full, 5 rpm, 6 tpm,
--        7 drained by an operator, 8 circuit open (or its one half-open trial in flight).
-- A target whose open circuit has cooled down is eligible once: choosing it makes this
-- request the half-open trial (circ = half until the trial's lease would expire).

local strategy, lease, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rand, expected, n, W = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local now = sec * 1000 + math.floor(tonumber(clock[2]) / 1000)
local oldest = sec - W + 1

-- Drop the buckets that left the window; return the window totals.
local function slide(key, head, rpm, tpm)
  if head == nil or head >= oldest then return rpm, tpm end
  local stop = math.min(oldest - 1, head + W - 1)
  for b = head, stop do
    local v = redis.call('HMGET', key, 'r:' .. b, 't:' .. b)
    rpm = rpm - (tonumber(v[1]) or 0)
    tpm = tpm - (tonumber(v[2]) or 0)
    redis.call('HDEL', key, 'r:' .. b, 't:' .. b)
  end
  if oldest - head >= W then rpm, tpm = 0, 0 end
  redis.call('HSET', key, 'wh', oldest, 'rpm', rpm, 'tpm', tpm)
  return rpm, tpm
end

local T = {}
for i = 1, n do
  local a, pk, lk = 8 + 6 * (i - 1), KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local t = {rpmL = tonumber(ARGV[a]), tpmL = tonumber(ARGV[a + 1]), maxf = tonumber(ARGV[a + 2]),
    w = tonumber(ARGV[a + 3]), tokens = tonumber(ARGV[a + 4]), excluded = ARGV[a + 5] == '1'}
  local f = redis.call('HMGET', pk, 'wh', 'rpm', 'tpm', 'cool', 'health', 'ttft', 'tpot',
    'drain', 'circ', 'circ_until', 'r:' .. sec, 't:' .. sec)
  t.head, t.rnow, t.tnow = tonumber(f[1]), tonumber(f[11]) or 0, tonumber(f[12]) or 0
  t.rpm, t.tpm = slide(pk, t.head, tonumber(f[2]) or 0, tonumber(f[3]) or 0)
  t.cool, t.ttft, t.tpot = tonumber(f[4]) or 0, tonumber(f[6]) or 0, tonumber(f[7]) or 0
  t.inflight = redis.call('ZCOUNT', lk, '(' .. now, '+inf')
  t.circ, t.circ_until = f[9], tonumber(f[10]) or 0
  if t.excluded then t.code = 1
  elseif f[8] == '1' then t.code = 7
  elseif f[5] == 'down' then t.code = 2
  elseif t.circ and t.circ_until > now then t.code = 8
  elseif t.cool > now then t.code = 3
  elseif t.maxf > 0 and t.inflight >= t.maxf then t.code = 4
  elseif t.rpmL > 0 and t.rpm + 1 > t.rpmL then t.code = 5
  elseif t.tpmL > 0 and t.tpm + t.tokens > t.tpmL then t.code = 6
  else t.code = 0 end
  T[i] = t
end

-- Per-strategy score: lower is better, except headroom (negated so lower is better too).
local function score(t)
  if strategy == 'least_latency' then return (t.ttft + t.tpot * expected) * (t.inflight + 1) end
  if strategy == 'headroom' then
    local h = 1
    if t.rpmL > 0 then h = math.min(h, (t.rpmL - t.rpm - 1) / t.rpmL) end
    if t.tpmL > 0 then h = math.min(h, (t.tpmL - t.tpm - t.tokens) / t.tpmL) end
    if t.maxf > 0 then h = math.min(h, (t.maxf - t.inflight - 1) / t.maxf) end
    return -h
  end
  return t.inflight / t.w
end

local function better(i, j)
  if strategy == 'least_connections' then
    return T[i].inflight * T[j].w < T[j].inflight * T[i].w
  end
  return T[i].s < T[j].s
end

local best, any = nil, false
for i = 1, n do
  T[i].s = score(T[i])
  any = any or T[i].code == 0
end
if any and strategy == 'weighted' then
  local fields = {}
  for i = 1, n do fields[i] = i end
  local cw = redis.call('HMGET', KEYS[2], unpack(fields))
  local total = 0
  for i = 1, n do
    if T[i].code == 0 then
      T[i].s = (tonumber(cw[i]) or 0) + T[i].w
      total = total + T[i].w
      if best == nil or T[i].s > T[best].s then best = i end
    end
  end
  T[best].s = T[best].s - total
  for i = 1, n do
    if T[i].code == 0 then redis.call('HSET', KEYS[2], i, T[i].s) end
  end
elseif any then
  local start = rand
  if strategy == 'round_robin' then start = redis.call('INCR', KEYS[1]) end
  for k = 0, n - 1 do
    local i = (start + k) % n + 1
    if T[i].code == 0 and (best == nil or (strategy ~= 'round_robin' and better(i, best))) then
      best = i
    end
  end
end

local wait = -2
if best then
  local pk, lk, t = KEYS[1 + 2 * best], KEYS[2 + 2 * best], T[best]
  -- expired leases are purged by release.lua; counting skips them (ZCOUNT from now)
  redis.call('ZADD', lk, now + ttl, lease)
  -- one write: this second's bucket and the totals, whose current values were read above
  local wh = t.head and math.max(t.head, oldest) or sec
  redis.call('HSET', pk, 'wh', wh, 'r:' .. sec, t.rnow + 1, 't:' .. sec, t.tnow + t.tokens,
    'rpm', t.rpm + 1, 'tpm', t.tpm + t.tokens)
  if t.circ then redis.call('HSET', pk, 'circ', 'half', 'circ_until', now + ttl, 'circ_trial', lease) end
  T[best].inflight, T[best].rpm, T[best].tpm = t.inflight + 1, t.rpm + 1, t.tpm + t.tokens
  wait = 0
else
  -- When will one target have room? The window part frees as its oldest buckets leave.
  for i = 1, n do
    local t, w = T[i], nil
    if t.code >= 3 and t.code ~= 7 and not (t.tpmL > 0 and t.tokens > t.tpmL) then
      w = math.max(0, t.cool - now, t.circ_until - now)
      local needR = (t.rpmL > 0) and (t.rpm + 1 - t.rpmL) or 0
      local needT = (t.tpmL > 0) and (t.tpm + t.tokens - t.tpmL) or 0
      if needR > 0 or needT > 0 then
        local pk = KEYS[1 + 2 * i]
        for b = oldest, sec do
          local v = redis.call('HMGET', pk, 'r:' .. b, 't:' .. b)
          needR, needT = needR - (tonumber(v[1]) or 0), needT - (tonumber(v[2]) or 0)
          if needR <= 0 and needT <= 0 then w = math.max(w, (b + W) * 1000 - now) break end
        end
      end
      if t.maxf > 0 and t.inflight >= t.maxf and w == 0 then w = -1 end
    end
    if w ~= nil and (wait == -2 or (w >= 0 and (wait < 0 or w < wait))) then wait = w end
  end
end

local out = {best or 0, now, sec, wait}
for i = 1, n do
  local t = T[i]
  local s = t.s
  if strategy == 'headroom' then s = -s end
  out[#out + 1] = t.code
  out[#out + 1] = t.inflight
  out[#out + 1] = t.rpm
  out[#out + 1] = t.tpm
  out[#out + 1] = tostring(s)
end
return out
