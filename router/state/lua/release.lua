-- release.lua: end one lease and record how the request went, in one atomic round trip.
-- Idempotent per lease: a release retried after a timeout finds its lease gone and changes
-- no count; only the cooldown and the provider's own figures, both idempotent, still apply.
--
-- KEYS[1]   provider hash       Keys.provider
-- KEYS[2]   provider lease zset Keys.leases
-- KEYS[3]   health version      Keys.health_version
-- ARGV[1]   lease id
-- ARGV[2]   outcome (ok, http_5xx, http_429, timeout, connect_error, bad_response, ...)
-- ARGV[3]   bucket (unix second) the lease reserved its tokens in
-- ARGV[4]   token correction: actual minus reserved (0 keeps the reservation)
-- ARGV[5]   time to first token, ms (-1 = not measured)
-- ARGV[6]   time per output token, ms (-1 = not measured)
-- ARGV[7]   EWMA time constant, ms
-- ARGV[8]   cooldown, ms (0 = none)
-- ARGV[9]   requests the provider says it counted in its window (-1 = unknown)
-- ARGV[10]  tokens the provider says it counted in its window (-1 = unknown)
-- ARGV[11]  circuit: failures in a row that open it
-- ARGV[12]  circuit: first cooldown (ms), doubled on each reopening
-- ARGV[13]  circuit: longest cooldown (ms)
-- ARGV[14]  health channel, ARGV[15] provider name, ARGV[16] pool (for the published event)
-- ARGV[17]  the optional blocks present, as letters in this order: 't' the tenant, 'r' a
--           response pin ('' none); each one's KEYS follow KEYS[3], its ARGV ARGV[17], in the
--           same order (K and A below: where its own begin)
-- The tenant ('t', 4 KEYS, 11 ARGV):
-- KEYS[K]   tenant hash (its window's past seconds)  Keys.tenant
-- KEYS[K+1] tenant live figures (packed: acquire.lua) Keys.tenant_live
-- KEYS[K+2] usage of the day the lease was taken     Keys.usage('day', ...)
-- KEYS[K+3] usage of its month                       Keys.usage('month', ...)
-- ARGV[A]   tenant token correction: actual minus reserved (in bucket ARGV[3])
-- ARGV[A+1] spend correction (nano-USD): actual cost minus the reserved cost
-- ARGV[A+2] the period number the cost was reserved in (corrected only while it lasts)
-- ARGV[A+3] usage field prefix '<tenant>|<route>|<provider>|'
-- ARGV[A+4] prompt tokens, ARGV[A+5] completion tokens, ARGV[A+6] cost (nano-USD): the usage
-- ARGV[A+7] 1 = record the usage (the provider served the request), 0 = not
-- ARGV[A+8] day usage TTL (s), ARGV[A+9] month usage TTL (s)
-- ARGV[A+10] 1 = the tenant has live figures (a limit or a budget: acquire.lua keeps them)
-- A response pin ('r', 2 KEYS, 2 ARGV): a served Responses API answer's id, pinned to this
-- provider so that a follow-up (previous_response_id) on any replica goes where its state is.
-- KEYS[K]   the pin: '<provider>|<expires ms>|<tenant>' (PX ttl)   Keys.response_pin
-- KEYS[K+1] the provider's pins (the pin key's suffix after the pool tag -> expiry ms;
--           trimmed of the expired here)                         Keys.pins
-- ARGV[A]   ttl (ms), ARGV[A+1] the tenant ('' none)
-- Written first, so a retried release (its lease gone) writes it all the same.
-- The tenant's part is applied once per lease, by the call that removes the provider lease;
-- a lease id ending in '@<tenant>' is counted in that tenant's in flight (see acquire.lua).
-- Returns 1 when the lease was released by this call, 2 when it was and its failure opened
-- the circuit, 0 when it was already gone.
-- Circuit: connect errors, timeouts, 5xx and bad answers in a row open it; the half-open
-- trial's success closes it, its failure reopens it with a doubled cooldown.

local pk, lk = KEYS[1], KEYS[2]
local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local now = sec * 1000 + math.floor(tonumber(clock[2]) / 1000)
local base = string.match(pk, '^(.+):provider:')

local t_k, t_a, r_k, r_a  -- where the optional blocks begin (ARGV[17])
if ARGV[17] ~= '' then
  local k, a = 4, 18
  for b in string.gmatch(ARGV[17], '.') do
    if b == 't' then t_k, t_a, k, a = k, a, k + 4, a + 11
    elseif b == 'r' then r_k, r_a, k, a = k, a, k + 2, a + 2 end
  end
end
if r_k then
  local rk, z, ttl = KEYS[r_k], KEYS[r_k + 1], tonumber(ARGV[r_a])
  local exp = now + ttl
  redis.call('SET', rk, ARGV[15] .. '|' .. string.format('%d', exp) .. '|' .. ARGV[r_a + 1],
    'PX', ttl)
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  redis.call('ZADD', z, exp, string.sub(rk, #base + 2))
end

local cooldown = tonumber(ARGV[8])
if cooldown > 0 then
  local until_ms = now + cooldown
  if until_ms > (tonumber(redis.call('HGET', pk, 'cool')) or 0) then
    redis.call('HSET', pk, 'cool', until_ms, 'gate', 1)  -- gate: acquire.lua looks closer
  end
end

-- The provider's own count only ever raises ours (our remaining goes down, never up).
local f = redis.call('HMGET', pk, 'rpm', 'tpm', 'wh')
local theirs = {tonumber(ARGV[9]), tonumber(ARGV[10])}
local ours = {tonumber(f[1]) or 0, tonumber(f[2]) or 0}
local names = {'r', 't'}
local totals = {'rpm', 'tpm'}
for k = 1, 2 do
  if theirs[k] > ours[k] then
    redis.call('HINCRBY', pk, names[k] .. ':' .. sec, theirs[k] - ours[k])
    redis.call('HINCRBY', pk, totals[k], theirs[k] - ours[k])
    if redis.call('HSETNX', pk, 'wh', sec) == 1 then
      redis.call('HDEL', pk, 'nm')  -- a new window: acquire.lua must look at it (see 'nm')
    end
  end
end

if redis.call('ZREM', lk, ARGV[1]) == 0 then return 0 end
local LIVE = '<dddddddddd'  -- a tenant's live figures (see acquire.lua)
local function off(key)  -- one request less in flight for the tenant of these figures
  local v = redis.call('GET', key)
  if v then
    local f = {struct.unpack(LIVE, v)}
    f[3] = math.max(0, f[3] - 1)
    redis.call('SET', key, struct.pack(LIVE, unpack(f, 1, 10)))
  end
end
-- expired leases leave their tenants' in-flight counts too (a replica that died)
local gone = redis.call('ZRANGEBYSCORE', lk, '-inf', now)
if #gone > 0 then
  for _, id in ipairs(gone) do
    local t = string.match(id, '@([^@]+)$')
    if t then off(base .. ':tenant:' .. t .. ':live') end
  end
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
end
redis.call('HSET', pk, 'inf', redis.call('ZCARD', lk))  -- acquire.lua reads the count here
-- requests wait for room in some route: say this provider has some again (the pool's count
-- of waiting tickets, and the channel beside the health one: '<prefix>:freed')
if (tonumber(redis.call('GET', base .. ':waiting')) or 0) > 0 then
  redis.call('PUBLISH', string.gsub(ARGV[14], ':health$', ':freed'), 'p:' .. ARGV[15])
end

local mine = string.match(ARGV[1], '@([^@]+)$')  -- counted in its tenant's in flight
if t_k then
  local tk, tv, a = KEYS[t_k], KEYS[t_k + 1], t_a
  local v = ARGV[a + 10] == '1' and redis.call('GET', tv)  -- an unlimited tenant has none
  if v then
    -- rpm, tpm, in flight, next maintenance, period, spend, second, its requests, its
    -- tokens, oldest second
    local f = {struct.unpack(LIVE, v)}
    if mine then f[3] = math.max(0, f[3] - 1) end
    local bucket, correction = tonumber(ARGV[3]), tonumber(ARGV[a])
    if correction ~= 0 and bucket == f[7] then
      correction = math.max(correction, -f[9])
      f[9], f[2] = f[9] + correction, f[2] + correction
    elseif correction ~= 0 and f[10] ~= 0 and bucket >= f[10] then
      local field = 't:' .. string.format('%d', bucket)
      local held = tonumber(redis.call('HGET', tk, field))
      if held then
        correction = math.max(correction, -held)
        redis.call('HINCRBY', tk, field, correction)
        f[2] = f[2] + correction
      end
    end
    local spend = tonumber(ARGV[a + 1])
    if spend ~= 0 and f[5] == tonumber(ARGV[a + 2]) then f[6] = f[6] + spend end
    redis.call('SET', tv, struct.pack(LIVE, unpack(f, 1, 10)))
  end
  if ARGV[a + 7] == '1' then
    local p = ARGV[a + 3]
    for k = 2, 3 do  -- the day's usage, then the month's
      local uk = KEYS[t_k + k]
      -- a hash's first field is some field's first write: the expiry is set then
      if redis.call('HINCRBY', uk, p .. 'req', 1) == 1 then
        redis.call('EXPIRE', uk, ARGV[a + 6 + k], 'NX')
      end
      redis.call('HINCRBY', uk, p .. 'in', ARGV[a + 4])
      redis.call('HINCRBY', uk, p .. 'out', ARGV[a + 5])
      redis.call('HINCRBY', uk, p .. 'cost', ARGV[a + 6])
    end
  end
elseif mine then
  off(base .. ':tenant:' .. mine .. ':live')
end

local bucket, correction = tonumber(ARGV[3]), tonumber(ARGV[4])
if correction ~= 0 and bucket >= (tonumber(f[3]) or bucket) then
  local held = tonumber(redis.call('HGET', pk, 't:' .. bucket))
  if held then
    correction = math.max(correction, -held)
    redis.call('HINCRBY', pk, 't:' .. bucket, correction)
    redis.call('HINCRBY', pk, 'tpm', correction)
  end
end

-- Peak EWMA: a slower sample counts at once, a faster one decays in with time.
local tau = tonumber(ARGV[7])
local e = redis.call('HMGET', pk, 'ttft', 'tpot', 'lt')
local dt = now - (tonumber(e[3]) or now)
local function peak(old, sample)
  if sample < 0 then return old end
  if old == nil or sample > old then return sample end
  local w = math.exp(-dt / tau)
  return old * w + sample * (1 - w)
end
local ttft, tpot = peak(tonumber(e[1]), tonumber(ARGV[5])), peak(tonumber(e[2]), tonumber(ARGV[6]))
if ttft then redis.call('HSET', pk, 'ttft', tostring(ttft)) end
if tpot then redis.call('HSET', pk, 'tpot', tostring(tpot)) end
redis.call('HSET', pk, 'lt', now)

local outcome = ARGV[2]
redis.call('HINCRBY', pk, 'o:' .. outcome, 1)
local c = redis.call('HMGET', pk, 'circ', 'circ_trial', 'circ_opens')
local trial = c[1] == 'half' and c[2] == ARGV[1]
local function publish(state)
  local v = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[14], cjson.encode({pool = ARGV[16], provider = ARGV[15],
    circuit = state, version = v, at = now}))
end
local failure = {connect_error = true, timeout = true, http_5xx = true, bad_response = true}
if outcome == 'ok' then
  redis.call('HSET', pk, 'fails', 0)
  if trial then
    redis.call('HDEL', pk, 'circ', 'circ_until', 'circ_trial')
    redis.call('HSET', pk, 'circ_opens', 0)
    publish('closed')
  end
elseif failure[outcome] then
  local fails = redis.call('HINCRBY', pk, 'fails', 1)
  if trial or (not c[1] and fails >= tonumber(ARGV[11])) then
    local opens = (tonumber(c[3]) or 0) + 1
    local wait = math.min(tonumber(ARGV[12]) * 2 ^ (opens - 1), tonumber(ARGV[13]))
    redis.call('HSET', pk, 'circ', 'open', 'circ_until', now + wait, 'circ_opens', opens, 'gate', 1)
    redis.call('HDEL', pk, 'circ_trial')
    publish('open')
    return 2
  end
elseif trial then
  redis.call('HSET', pk, 'circ', 'open', 'circ_until', now, 'gate', 1)  -- no verdict: retry
end
return 1
