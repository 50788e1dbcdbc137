-- acquire.lua: choose a target for one request and lease it, in one atomic round trip.
-- The readable specification of the choice is router/strategies.py; a property test
-- feeds both the same state and asserts the same answer.
--
-- KEYS[1]       route rotation counter (string)             Keys.rotation
-- KEYS[2]       route smooth weighted round robin (string: current weights, comma-separated,
--               in target order)                            Keys.swrr
-- KEYS[1+2i]    target i's provider hash (windows, ...)     Keys.provider   (i = 1..n)
-- KEYS[2+2i]    target i's provider lease zset              Keys.leases
--               (the hash's 'inf' is the zset's size: one HMGET per target reads what a
--               decision needs; the zset is purged when the hash's 'nm' has passed)
-- ARGV[1]       strategy
-- ARGV[2]       lease id
-- ARGV[3]       lease TTL (ms)
-- ARGV[4]       random integer >= 0: where tie-breaking starts
-- ARGV[5]       expected output tokens (least_latency)
-- ARGV[6]       n, the number of targets
-- ARGV[7]       window buckets (seconds held, the current one included)
-- ARGV[8]       1 = return every target's figures (for the decision log), 0 = codes only
-- ARGV[9]       not after (Redis ms): run later than this, the call leases nothing and returns
--               {0, now, bucket, -3} (its caller has given up on it; see LostLease, store.py)
-- ARGV[10]      the optional blocks present, as letters in this order: 't' the tenant, 'q' the
--               route's wait queue, 'a' affinity ('' none). Each present block's KEYS follow
--               the targets' (from KEYS[3+2n]) and its ARGV theirs (from ARGV[11+6n]), in the
--               same order, each block's layout as below (K and A: where its own begin).
-- ARGV[11+6(i-1) ..] target i: rpm, tpm, max_in_flight (0 = unlimited), weight,
--               tokens to reserve, excluded (1 = skip)
-- The tenant ('t', 2 KEYS, 1 ARGV):
-- KEYS[K]       the tenant's hash: its window's past seconds (r:<s>, t:<s>)   Keys.tenant
-- KEYS[K+1]     the tenant's live figures, packed (struct '<dddddddddd': rpm, tpm, in flight,
--               next maintenance ms, period, spend, this second, its requests, its tokens,
--               the oldest second held; see router/state/tenantstate.py)   Keys.tenant_live
--               One GET and one SET per admission; the second's figures go to the hash once
--               the second is over (one HSET a second). In flight is kept only with a
--               max_in_flight: such a tenant's lease ids end in '@<tenant>', and whatever
--               removes a lease (release, or the purge of an expired one here or in
--               release.lua) takes it off that tenant's count.
-- ARGV[A]       packed in one (struct '<ddddddddddd': numbers as text would each cost a
--               strtod): its rpm, tpm, max_in_flight (0 = unlimited), tokens to reserve,
--               budget (nano-USD, 0 = none), its period (1 day, 2 week, 3 month: spend is kept
--               per period, with a budget or not), cost to reserve (nano-USD), 1 = count this
--               request in its RPM (0: a failover attempt of a request already counted), then
--               the caller's guess of the period: its number, first second and end (used when
--               Redis's clock is in it)
-- The tenant is checked first: over one of its limits, no target is looked at (codes 9) and
-- nothing is leased, so a tenant at its limit takes nothing another tenant could use.
-- The queue ('q', 4 KEYS, 10 ARGV): see "The route's wait queue" below.
-- Affinity ('a', 1 KEY, 5 ARGV):
-- KEYS[K]       the pin: '<provider>|<expires ms>|<tenant>', with that expiry (PX)
--               Keys.pin (a session or prefix key) or Keys.response_pin (a response id)
-- ARGV[A ..]    mode (1 preferred, 2 required), ttl (ms) of a pin written now, the request's
--               tenant ('' none), load factor, the route's targets in the key's rendezvous
--               order (1-based indices, comma-separated: router/state/affinity.py)
-- Each provider's pins are counted in a zset beside its hash ('<...>:pins:<provider>',
-- Keys.pins: the pin key's suffix after the pool tag -> expiry ms), its name derived from the
-- provider hash's as the tenant keys are below; trimmed of expired entries when written.
-- Preferred: a pinned target that can take the request (code 0) takes it (HIT); one that
-- cannot leaves the choice to the strategy, and the pin moves to its choice (MOVED when the
-- pinned target is out of service or excluded, SPILLED when it is only full). No pin (or one
-- naming no target of the route): the first eligible target of the rendezvous order whose in
-- flight + 1 <= ceil(load factor * (in flight of the eligible + 1) / eligible count) takes it
-- (NEW; SPILLED when the order's first eligible target was passed over for its load); the
-- strategy chooses should none fit. A pin is written only when made, moved, or used with less
-- than 90 % of its ttl left: a hot pin costs one GET, and lives 0.9 to 1 ttl after its last use.
-- A pin never refuses: with no eligible target the answer is as without one (NONE).
-- Required: a pin of another tenant is treated as absent and nothing is leased or looked at
-- (FOREIGN); its target takes the request (HIT, refreshed as above) or nothing is leased
-- (PIN_UNAVAILABLE: its code says why; wait is that target's; -2 when the pin names no target
-- of the route); no pin: the strategy chooses and nothing is written (NONE).
-- Only the strategy's own choices move its state (the rotation, the SWRR weights). With this
-- block round robin looks at every target (a pin may name one the rotation would not reach),
-- except that without ARGV[8] a hit looks at its target only (the others' codes are 9).
-- Returns {chosen (1-based, 0 = none), now ms, bucket s, wait ms (-1 unknown, -2 never,
--          -3 too late), tenant code, tenant spend this period (nano-USD, after this
--          request), then per target: code, and with ARGV[8] = 1 (and the tenant admitted):
--          in flight, rpm used, tpm used, score,
--          then with a queue: its state, rank, length, the ticket's place (text),
--          then with affinity: its outcome (router.strategies.PinOutcome: 0 none, 1 hit, 2 new,
--          3 spilled, 4 moved, 5 pin unavailable, 6 foreign), the pin's provider before this
--          decision ('' none, and always for foreign)}
-- Tenant codes: 0 admitted (or no tenant), 1 in flight full, 2 rpm, 3 tpm, 4 budget spent.
-- Codes: 0 ok, 1 excluded, 2 unhealthy, 3 cooling down, 4 in flight full, 5 rpm, 6 tpm,
--        7 drained by an operator, 8 circuit open (or its one half-open trial in flight),
--        9 not looked at (round robin without detail stops at the first target with room).
-- A target whose open circuit has cooled down is eligible once: choosing it makes this
-- request the half-open trial (circ = half until the trial's lease would expire).

local call, tonumber, min, max, fmt = redis.call, tonumber, math.min, math.max, string.format
local strategy, lease, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rand, expected, n, W = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local detail = ARGV[8] == '1'
local clock = call('TIME')
local sec = tonumber(clock[1])
local now = sec * 1000 + math.floor(tonumber(clock[2]) / 1000)
local oldest = sec - W + 1
-- this second's bucket fields, from TIME's own text (a number turned into text costs printf)
local RS, TS = 'r:' .. clock[1], 't:' .. clock[1]
if now > tonumber(ARGV[9]) then return {0, now, sec, -3, 0, 0} end

-- Drop the buckets that left the window; return the window totals.
local function slide(key, head, rpm, tpm)
  if head == nil or head >= oldest then return rpm, tpm end
  local stop = min(oldest - 1, head + W - 1)
  for b = head, stop do
    local v = call('HMGET', key, 'r:' .. b, 't:' .. b)
    rpm = rpm - (tonumber(v[1]) or 0)
    tpm = tpm - (tonumber(v[2]) or 0)
    call('HDEL', key, 'r:' .. b, 't:' .. b)
  end
  if oldest - head >= W then rpm, tpm = 0, 0 end
  call('HSET', key, 'wh', oldest, 'rpm', rpm, 'tpm', tpm)
  return rpm, tpm
end

-- Take expired leases off their tenants' in-flight counts (those ending in '@<tenant>').
local LIVE = '<dddddddddd'
local function expire(pk, lk)
  local gone = call('ZRANGEBYSCORE', lk, '-inf', now)
  if #gone == 0 then return end
  local base = string.match(pk, '^(.+):provider:')
  for _, id in ipairs(gone) do
    local t = string.match(id, '@([^@]+)$')
    if t then  -- (a key of the same slot: every key carries the pool's hash tag)
      local key = base .. ':tenant:' .. t .. ':live'
      local v = call('GET', key)
      if v then
        local f = {struct.unpack(LIVE, v)}
        f[3] = max(0, f[3] - 1)
        call('SET', key, struct.pack(LIVE, unpack(f, 1, 10)))
      end
    end
  end
  call('ZREMRANGEBYSCORE', lk, '-inf', now)
end

-- Drop the expired leases; store the count left; return it and the earliest expiry left.
local function purge(pk, lk)
  expire(pk, lk)
  local count = call('ZCARD', lk)
  call('HSET', pk, 'inf', count)
  if count == 0 then return 0, nil end
  return count, tonumber(call('ZRANGE', lk, 0, 0, 'WITHSCORES')[2])
end

-- What one HMGET per target reads: the fields every strategy needs, and latencies for one.
-- 'nm' (next maintenance, ms) is at most when the window's oldest bucket leaves it and at most
-- every lease's expiry: only from then on is 'wh' read, the window slid, the expired leases
-- purged, and 'nm' set again. 'gate' is present when something may block the
-- target (down, drained, circuit, cooldown): only then are those fields read, and 'gate' is
-- dropped once none of them blocks.
local F = {'rpm', 'tpm', 'inf', 'nm', 'gate'}
if strategy == 'least_latency' then F[6], F[7] = 'ttft', 'tpot' end
local FAR = now + W * 1000  -- nothing to maintain: look again within a window anyway

-- Text to number, each distinct text converted once per call (strtod is most of the cost of
-- a conversion, and targets share most of their limits, tokens and the window head).
local N = setmetatable({}, {__index = function(c, text)
  local v = tonumber(text)
  if v then c[text] = v end
  return v
end})

-- Look at target i: its shared figures, its limits, and whether it can take this request.
local T = {}
local function view(i)
  local a, pk = 5 + 6 * i, KEYS[1 + 2 * i]
  local f = call('HMGET', pk, unpack(F))
  local rpm, tpm, inflight, nm = N[f[1]] or 0, N[f[2]] or 0, N[f[3]], N[f[4]]
  local maintain = nm == nil or nm <= now or inflight == nil
  local health, drain, circ, circ_until, cool = false, false, false, 0, 0
  -- the blocking fields are read while 'gate' is set, and at every maintenance (about once a
  -- second under load), which also sets a 'gate' that a writer did not (an older version)
  if f[5] or maintain then
    local g = call('HMGET', pk, 'health', 'drain', 'circ', 'circ_until', 'cool')
    health, drain, circ, circ_until, cool = g[1], g[2], g[3], N[g[4]] or 0, N[g[5]] or 0
    local blocks = health == 'down' or drain == '1' or circ or cool > now
    if f[5] and not blocks then call('HDEL', pk, 'gate')
    elseif blocks and not f[5] then call('HSET', pk, 'gate', 1) end
  end
  local fresh = false  -- true: no window yet ('wh' absent)
  if maintain then
    local head, first = N[call('HGET', pk, 'wh')], nil
    if inflight ~= 0 then inflight, first = purge(pk, KEYS[2 + 2 * i]) end
    rpm, tpm = slide(pk, head, rpm, tpm)
    fresh = head == nil
    nm = FAR
    if head then nm = min(nm, (max(head, oldest) + W) * 1000) end
    if first then nm = min(nm, first) end
    call('HSET', pk, 'nm', nm)
  end
  local t = {rpmL = N[ARGV[a]], tpmL = N[ARGV[a + 1]], maxf = N[ARGV[a + 2]],
    w = N[ARGV[a + 3]], tokens = N[ARGV[a + 4]], fresh = fresh, nm = nm, rpm = rpm, tpm = tpm,
    inflight = inflight, circ = circ, circ_until = circ_until, cool = cool,
    ttft = N[f[6]] or 0, tpot = N[f[7]] or 0, code = 0, s = 0}
  if ARGV[a + 5] == '1' then t.code = 1
  elseif drain == '1' then t.code = 7
  elseif health == 'down' then t.code = 2
  elseif t.circ and t.circ_until > now then t.code = 8
  elseif t.cool > now then t.code = 3
  elseif t.maxf > 0 and inflight >= t.maxf then t.code = 4
  elseif t.rpmL > 0 and rpm + 1 > t.rpmL then t.code = 5
  elseif t.tpmL > 0 and tpm + t.tokens > t.tpmL then t.code = 6
  end
  T[i] = t
  return t
end

-- Per-strategy score: lower is better, except headroom (negated so lower is better too).
local function score(t)
  if strategy == 'least_latency' then return (t.ttft + t.tpot * expected) * (t.inflight + 1) end
  if strategy == 'headroom' then
    local h = 1
    if t.rpmL > 0 then h = min(h, (t.rpmL - t.rpm - 1) / t.rpmL) end
    if t.tpmL > 0 then h = min(h, (t.tpmL - t.tpm - t.tokens) / t.tpmL) end
    if t.maxf > 0 then h = min(h, (t.maxf - t.inflight - 1) / t.maxf) end
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

-- period:begin (a test runs this part alone, with its own sec, against router/budgets.py)
-- The tenant's period number for a budget: days since the epoch, weeks since the Monday
-- before it, or year * 12 + month - 1 (router/budgets.py says the same in Python); and the
-- unix second it ends.
local function civil(z)  -- days since 1970-01-01 -> year, month (Howard Hinnant's algorithm)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days(y, m)  -- the first day of month m of year y, in days since 1970-01-01
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end
local function period(code)
  local day = math.floor(sec / 86400)
  if code == 1 then return day, (day + 1) * 86400 end
  if code == 2 then
    local w = math.floor((day + 3) / 7)
    return w, (7 * w + 4) * 86400
  end
  local y, m = civil(day)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return y * 12 + m - 1, days(ny, nm) * 86400
end
-- period:end

-- The optional blocks (ARGV[10]): which are present, where each one's KEYS and ARGV begin.
local tenant, Q, A = false, false, false
local t_k, t_a, q_k, q_a, a_k, a_a
local blocks = ARGV[10]
if blocks ~= '' then  -- always in this order (a plain find: no iterator, no pattern)
  local k, a, find = 3 + 2 * n, 11 + 6 * n, string.find
  if find(blocks, 't', 1, true) then tenant, t_k, t_a, k, a = true, k, a, k + 2, a + 1 end
  if find(blocks, 'q', 1, true) then Q, q_k, q_a, k, a = true, k, a, k + 4, a + 10 end
  if find(blocks, 'a', 1, true) then A, a_k, a_a = true, k, a end
end

-- The queue's keys and ticket (its part of the decision: see below).
local qk, qe, qv, qw, q_member, q_rank, q_state, q_f = nil, nil, nil, nil, nil, -1, 0, 0
local q_admit, q_args = false, 0  -- q_admit: this request's ticket is the head
if Q then
  q_args, q_member = q_a, ARGV[q_a]
  qk, qe, qv, qw = KEYS[q_k], KEYS[q_k + 1], KEYS[q_k + 2], KEYS[q_k + 3]
end

-- The pin: read first, so that another tenant's required pin costs nothing else.
local a_key, a_mode, a_ttl, a_tenant, a_prov, a_exp, a_base
local a_out, a_lock = 0, false  -- a_lock: a required pin decides (the strategy does not)
if A then
  a_key, a_mode, a_ttl, a_tenant = KEYS[a_k], N[ARGV[a_a]], N[ARGV[a_a + 1]], ARGV[a_a + 2]
  a_base = string.match(KEYS[3], '^(.+):provider:')
  local v = call('GET', a_key)
  if v then
    local p, e, t = string.match(v, '^([^|]*)|(%d+)|(.*)$')
    if p then a_prov, a_exp = p, tonumber(e) end
    if p and a_mode == 2 and t ~= a_tenant then a_out, a_prov = 6, nil end
  end
end

-- The answer's tails: the queue's figures, then the pin's. (A function is made, with its
-- upvalues, each time its definition runs: the ones only blocks use are made only with them,
-- which keeps a call without blocks at its old cost, measured: loadtest/script_cost.py.)
local finish, refused
if tenant or Q or A then
  finish = function(out)
    if Q then
      out[#out + 1], out[#out + 2], out[#out + 3] = q_state, q_rank, call('ZCARD', qk)
      out[#out + 1] = tostring(call('ZSCORE', qk, q_member) or -1)
    end
    if A then out[#out + 1], out[#out + 2] = a_out, a_prov or '' end
    return out
  end
  refused = function(wait, code, spent)  -- nothing looked at, nothing leased
    local out = {0, now, sec, wait, code, spent}
    for i = 1, n do out[6 + i] = 9 end
    return finish(out)
  end
end
if a_out == 6 then return refused(-2, 0, 0) end

-- the tenant's live figures (plain locals: a table costs an allocation per call)
local tk, tv, t_rpm, t_tpm, t_inf, t_nm, t_per, t_sp, t_cs, t_cr, t_ct, t_wh
local t_tokens, t_counted, t_pid, t_cost, t_maxf, t_dirty
if tenant then
  tk, tv = KEYS[t_k], KEYS[t_k + 1]
  local rpmL, tpmL, maxf, tokens, budget, pcode, cost, counted, pid, pstart, pend =
    struct.unpack('<ddddddddddd', ARGV[t_a])
  counted = counted == 1
  local v = call('GET', tv)
  local rpm, tpm, inflight, nm, per, sp, cs, cr, ct, wh = 0, 0, 0, 0, -1, 0, 0, 0, 0, 0
  if v then rpm, tpm, inflight, nm, per, sp, cs, cr, ct, wh = struct.unpack(LIVE, v) end
  local dirty = false
  if cs ~= sec then  -- the last second's figures go to the window's history
    if cr ~= 0 or ct ~= 0 then
      call('HSET', tk, 'r:' .. fmt('%d', cs), fmt('%d', cr), 't:' .. fmt('%d', cs), fmt('%d', ct))
    end
    cs, cr, ct, dirty = sec, 0, 0, true
  end
  if nm <= now then  -- slide: the seconds that left the window leave the totals
    if wh ~= 0 and wh < oldest then
      local fields, stop = {}, min(oldest - 1, wh + W - 1)
      for b = wh, stop do
        fields[#fields + 1] = 'r:' .. fmt('%d', b)
        fields[#fields + 1] = 't:' .. fmt('%d', b)
      end
      local old = call('HMGET', tk, unpack(fields))
      for j = 1, #old, 2 do
        rpm, tpm = rpm - (tonumber(old[j]) or 0), tpm - (tonumber(old[j + 1]) or 0)
      end
      call('HDEL', tk, unpack(fields))
      if oldest - wh >= W then rpm, tpm = 0, 0 end
      wh = oldest
    end
    nm = FAR
    if wh ~= 0 then nm = min(nm, (wh + W) * 1000) end
    dirty = true
  end
  -- the period: the caller's guess (its number and its bounds) when Redis's clock is in it,
  -- else computed here (at a period's edge, or a caller whose clock is off)
  if sec < pstart or sec >= pend then pid, pend = period(pcode) end
  if per ~= pid then sp = 0 end
  local code, wait = 0, 0
  if maxf > 0 and inflight >= maxf then code, wait = 1, -1
  elseif counted and rpmL > 0 and rpm + 1 > rpmL then code = 2
  elseif tpmL > 0 and tpm + tokens > tpmL then code = 3
  elseif budget > 0 and sp + cost > budget then
    code, wait = 4, pend * 1000 - now
    if cost > budget then wait = -2 end
  end
  if code == 3 and tokens > tpmL then wait = -2
  elseif code == 2 or code == 3 then  -- the window frees as its oldest seconds leave it
    local needR = code == 2 and rpm + 1 - rpmL or 0
    local needT = code == 3 and tpm + tokens - tpmL or 0
    wait = W * 1000
    for b = oldest, sec do
      local r, t = cr, ct
      if b ~= cs then
        local h = call('HMGET', tk, 'r:' .. fmt('%d', b), 't:' .. fmt('%d', b))
        r, t = tonumber(h[1]) or 0, tonumber(h[2]) or 0
      end
      needR, needT = needR - r, needT - t
      if needR <= 0 and needT <= 0 then wait = max(0, (b + W) * 1000 - now) break end
    end
  end
  if code ~= 0 then
    if dirty then
      call('SET', tv, struct.pack(LIVE, rpm, tpm, inflight, nm, per, sp, cs, cr, ct, wh))
    end
    return refused(wait, code, sp)
  end
  t_rpm, t_tpm, t_inf, t_nm, t_per, t_sp, t_cs, t_cr, t_ct, t_wh =
    rpm, tpm, inflight, nm, per, sp, cs, cr, ct, wh
  t_tokens, t_counted, t_pid, t_cost, t_maxf, t_dirty = tokens, counted, pid, cost, maxf, dirty
end

-- The tenant's figures as they stand, when a call ends without admitting (its second moved
-- on, or its window slid).
local function tenant_flush()
  if tenant and t_dirty then
    call('SET', tv, struct.pack(LIVE, t_rpm, t_tpm, t_inf, t_nm, t_per, t_sp, t_cs, t_cr, t_ct,
      t_wh))
    t_dirty = false
  end
end

-- The route's wait queue ('q': KEYS the queue, its expiries, its clock, the pool's waiting
-- count; ARGV, from A):
-- the ticket ('<id>|<tenant>|<priority>'), 1 = this request holds it already, its priority,
-- its tenant's weight and name, the ticket's TTL (ms), 1 = it may wait, the queue's bound,
-- the channel that wakes waiters ('<prefix>:freed'), the route.
-- Places: priority band first (higher first), then the ticket's virtual finish time (fair
-- queueing: a tenant's next ticket finishes 1/weight after the later of its last one and the
-- route's virtual time V, the finish of the last admitted). Only the queue's head may be
-- admitted while tickets wait: a request that arrives then takes a ticket, and goes on at once
-- when that ticket is the head (a light tenant's is, ahead of a flooding tenant's backlog).
local BAND, PMAX = 1e9, 100  -- a band's width in places (virtual times stay below it)
local function enqueue()  -- take a ticket: its band, then its virtual finish
  local a = q_args
  local prio, weight, who = N[ARGV[a + 2]], N[ARGV[a + 3]], 'f:' .. ARGV[a + 4]
  local c = call('HMGET', qv, 'V', who)
  q_f = max(tonumber(c[1]) or 0, tonumber(c[2]) or 0) + 1 / weight
  call('HSET', qv, who, tostring(q_f))
  call('ZADD', qk, tostring((PMAX - prio) * BAND + q_f), q_member)
  call('ZADD', qe, now + N[ARGV[a + 5]], q_member)
  call('INCR', qw)
end
if Q then
  local a = q_a
  local holds, may_wait, qmax = ARGV[a + 1] == '1', ARGV[a + 6] == '1', N[ARGV[a + 7]]
  local head = call('ZRANGE', qk, 0, 0)[1]
  if head then  -- tickets wait: those of waiters that died leave first
    local dead = call('ZRANGEBYSCORE', qe, '-inf', now, 'LIMIT', 0, 64)
    if #dead > 0 then
      call('ZREM', qk, unpack(dead))
      call('ZREM', qe, unpack(dead))
      if call('DECRBY', qw, #dead) < 0 then call('SET', qw, 0) end
      head = call('ZRANGE', qk, 0, 0)[1]
    end
  end
  local score = holds and call('ZSCORE', qk, q_member)
  if score then q_f = N[score] % BAND end
  if head and not score then
    if not may_wait then  -- others wait their turn: this one cannot, so it is refused
      q_state, q_rank = 3, call('ZCARD', qk)
    elseif call('ZCARD', qk) >= qmax then
      q_state, q_rank = 2, qmax
    else
      enqueue()
      score = true
      head = call('ZRANGE', qk, 0, 0)[1]
    end
  end
  if q_state == 0 and score then
    if head == q_member then
      q_admit = true  -- the head: admitted below if a target has room
    else
      q_state, q_rank = 1, call('ZRANK', qk, q_member)
    end
  end
  if q_state ~= 0 then
    tenant_flush()
    return refused(-1, 0, t_sp or 0)
  end
end

local best, any, a_pinned = nil, false, nil
if a_prov then  -- the pin's target among the route's
  local pk = a_base .. ':provider:' .. a_prov
  for i = 1, n do
    if KEYS[1 + 2 * i] == pk then a_pinned = i break end
  end
end
if strategy == 'round_robin' and not detail and not A then
  -- the next target in the rotation with room: the ones after it need not be looked at
  local start = call('INCR', KEYS[1])
  for k = 0, n - 1 do
    local i = (start + k) % n + 1
    if view(i).code == 0 then best = i break end
  end
  if not best then call('DECR', KEYS[1]) end  -- as if never turned (the full view's rule)
elseif a_pinned and not detail and view(a_pinned).code == 0 then
  best = a_pinned  -- a hit: the other targets need not be looked at (9, as round robin's)
else
  for i = 1, n do
    if not T[i] then view(i) end
  end
end
for i = 1, n do
  if T[i] then
    T[i].s = score(T[i])
    any = any or T[i].code == 0
  end
end
-- The pin's choice (every target viewed): the target it sends the request to, if any, and its
-- outcome (see the header). Inline, not a function: each function made per call, and even one
-- never made, costs the calls without the block (Lua's GC walks every prototype; measured).
if A then
  local c = a_pinned and T[a_pinned].code
  if c == 0 then best, a_out = a_pinned, 1
  elseif a_mode == 2 then a_lock, a_out = a_prov ~= nil, a_prov and 5 or 0
  elseif c then a_out = (c == 1 or c == 2 or c == 7 or c == 8) and 4 or 3  -- moved, or spilled
  elseif any then
    -- consistent hashing with bounded loads: the first of the key's order that stays in bound
    local m, load, first = 0, 0, nil
    for i = 1, n do
      if T[i].code == 0 then m, load = m + 1, load + T[i].inflight end
    end
    local cap = math.ceil(N[ARGV[a_a + 3]] * (load + 1) / m)
    for s in string.gmatch(ARGV[a_a + 4], '%d+') do
      local i = N[s]
      if T[i] and T[i].code == 0 then
        first = first or i
        if T[i].inflight + 1 <= cap then best = i break end
      end
    end
    a_out = (best ~= first and first) and 3 or 2  -- none in bound: the strategy chooses
  end
end
if best or a_lock then  -- chosen above, or by a required pin
elseif any and strategy == 'weighted' then
  local cw, j = {}, 0
  local stored = call('GET', KEYS[2])
  if stored then
    for v in string.gmatch(stored, '[^,]+') do j = j + 1; cw[j] = N[v] end
  end
  local total = 0
  for i = 1, n do
    local c = cw[i] or 0
    if T[i].code == 0 then
      T[i].s = c + T[i].w
      total = total + T[i].w
      if best == nil or T[i].s > T[best].s then best = i end
    end
  end
  T[best].s = T[best].s - total
  for i = 1, n do
    if T[i].code == 0 then cw[i] = T[i].s else cw[i] = cw[i] or 0 end
  end
  call('SET', KEYS[2], table.concat(cw, ',', 1, n))
elseif any then
  local start = rand
  if strategy == 'round_robin' then start = call('INCR', KEYS[1]) end
  for k = 0, n - 1 do
    local i = (start + k) % n + 1
    if T[i].code == 0 and (best == nil or (strategy ~= 'round_robin' and better(i, best))) then
      best = i
    end
  end
end

local wait = -2
if A and not best and a_out ~= 5 then a_out = 0 end  -- no target: the pin took no part
if best then
  if a_out ~= 0 and (a_out ~= 1 or a_exp - now < 0.9 * a_ttl) then
    -- the pin to this target, counted there (and off the provider it leaves)
    local name = string.sub(KEYS[1 + 2 * best], #a_base + 11)  -- after '<base>:provider:'
    local exp, member = now + a_ttl, string.sub(a_key, #a_base + 2)
    call('SET', a_key, name .. '|' .. fmt('%d', exp) .. '|' .. a_tenant, 'PX', a_ttl)
    if a_prov and a_prov ~= name then call('ZREM', a_base .. ':pins:' .. a_prov, member) end
    local z = a_base .. ':pins:' .. name
    call('ZREMRANGEBYSCORE', z, '-inf', now)
    call('ZADD', z, exp, member)
  end
  local pk, lk, t = KEYS[1 + 2 * best], KEYS[2 + 2 * best], T[best]
  local added = call('ZADD', lk, now + ttl, lease)
  -- this second's bucket, then the totals and the lease count read above in one write; a
  -- first window sets its head; 'nm' comes down to this lease's expiry if that is sooner
  call('HINCRBY', pk, RS, 1)
  if t.tokens ~= 0 then call('HINCRBY', pk, TS, t.tokens) end
  local w = {'rpm', t.rpm + 1, 'tpm', t.tpm + t.tokens, 'inf', t.inflight + added}
  local nm = min(t.nm, now + ttl)
  if t.fresh then
    w[#w + 1], w[#w + 2] = 'wh', sec
    nm = min(nm, (sec + W) * 1000)
  end
  if nm ~= t.nm then w[#w + 1], w[#w + 2] = 'nm', nm end
  call('HSET', pk, unpack(w))
  if t.circ then call('HSET', pk, 'circ', 'half', 'circ_until', now + ttl, 'circ_trial', lease) end
  T[best].inflight, T[best].rpm, T[best].tpm = t.inflight + added, t.rpm + 1, t.tpm + t.tokens
  wait = 0
  if tenant then  -- the tenant's share of the same admission: one write
    local r = t_counted and 1 or 0
    if t_maxf > 0 then t_inf = max(0, t_inf) + 1 end
    if t_wh == 0 then  -- its first window
      t_wh, t_nm = sec, min(t_nm, (sec + W) * 1000)
    end
    if t_per ~= t_pid then t_per, t_sp = t_pid, 0 end  -- a new period
    t_sp = t_sp + t_cost
    call('SET', tv, struct.pack(LIVE, t_rpm + r, t_tpm + t_tokens, t_inf, t_nm, t_per, t_sp,
      t_cs, t_cr + r, t_ct + t_tokens, t_wh))
  end
  if q_admit then  -- the head's ticket is spent: the route's virtual time moves to it
    call('ZREM', qk, q_member)
    call('ZREM', qe, q_member)
    call('DECR', qw)
    if call('ZCARD', qk) == 0 then
      call('DEL', qv)  -- nobody waits: the clocks start again from zero
    else
      call('HSET', qv, 'V', tostring(q_f))
      -- the next head may be another replica's: it looks again (there may be room left)
      call('PUBLISH', ARGV[q_args + 8], 'r:' .. ARGV[q_args + 9])
    end
  end
else
  tenant_flush()  -- no target: the tenant's second moved on or its window slid
  if Q and not q_admit and ARGV[q_args + 6] == '1' then
    if call('ZCARD', qk) >= N[ARGV[q_args + 7]] then q_state, q_rank = 2, N[ARGV[q_args + 7]]
    else enqueue() end  -- the first to wait
  end
  if Q and q_state == 0 and (q_admit or ARGV[q_args + 6] == '1') then q_state, q_rank = 1, 0 end
  -- When will one target have room? The window part frees as its oldest buckets leave.
  for i = 1, n do
    local t, w = T[i], nil
    if a_lock and i ~= a_pinned then t = nil end  -- only the required pin's target counts
    if t and t.code >= 3 and t.code ~= 7 and not (t.tpmL > 0 and t.tokens > t.tpmL) then
      w = max(0, t.cool - now, t.circ_until - now)
      local needR = (t.rpmL > 0) and (t.rpm + 1 - t.rpmL) or 0
      local needT = (t.tpmL > 0) and (t.tpm + t.tokens - t.tpmL) or 0
      if needR > 0 or needT > 0 then
        local pk = KEYS[1 + 2 * i]
        for b = oldest, sec do
          local v = call('HMGET', pk, 'r:' .. b, 't:' .. b)
          needR, needT = needR - (tonumber(v[1]) or 0), needT - (tonumber(v[2]) or 0)
          if needR <= 0 and needT <= 0 then w = max(w, (b + W) * 1000 - now) break end
        end
      end
      if t.maxf > 0 and t.inflight >= t.maxf and w == 0 then w = -1 end
    end
    if w ~= nil and (wait == -2 or (w >= 0 and (wait < 0 or w < wait))) then wait = w end
  end
end

local out, k = {best or 0, now, sec, wait, 0, t_sp or 0}, 6
if not detail then
  for i = 1, n do out[6 + i] = T[i] and T[i].code or 9 end  -- 9: not looked at
  if Q or A then return finish(out) end
  return out
end
for i = 1, n do
  local t = T[i]
  local s = t.s
  if strategy == 'headroom' then s = -s end
  -- a whole score goes back as an integer; only a fraction needs the (slow) float to text
  if s ~= math.floor(s) then s = tostring(s) end
  out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = t.code, t.inflight, t.rpm, t.tpm, s
  k = k + 5
end
if Q or A then return finish(out) end
return out
