-- report_probe.lua: record one healthd probe of a provider; publish a transition, only that.
-- Fenced: a write carrying an epoch older than the stored one (a paused old leader) is refused.
--
-- KEYS[1]   provider hash       Keys.provider
-- KEYS[2]   healthd epoch       Keys.epoch
-- KEYS[3]   health version      Keys.health_version
-- ARGV[1]   the writer's epoch
-- ARGV[2]   1 = the probe succeeded, 0 = it failed
-- ARGV[3]   probe latency (ms)
-- ARGV[4]   error text ('' when none; never a secret)
-- ARGV[5]   rise: good probes in a row to become up
-- ARGV[6]   fall: bad probes in a row to become down
-- ARGV[7]   health channel, ARGV[8] provider name, ARGV[9] pool
-- ARGV[10]  1 = the probe is a real request (a completion): its success is a real success
-- Returns {1, state, version} when recorded (state '' while still unknown), {0, stored epoch}
-- when fenced off.
-- Circuit: a good probe that is a real request closes an open circuit, as a successful
-- request would. Any other good probe (the model list) says nothing of completions: it never
-- closes the circuit; when it brings the provider up (healthd saw it recover), an open
-- circuit's cooldown ends at once, so the next request is its one half-open trial, whose
-- outcome decides (release.lua).

local stored = tonumber(redis.call('GET', KEYS[2])) or 0
if tonumber(ARGV[1]) < stored then return {0, stored} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local pk, good = KEYS[1], ARGV[2] == '1'
local h = redis.call('HMGET', pk, 'health', 'h_ok', 'h_bad', 'circ')
local state, ok, bad = h[1] or '', tonumber(h[2]) or 0, tonumber(h[3]) or 0
if good then ok, bad = ok + 1, 0 else ok, bad = 0, bad + 1 end
redis.call('HSET', pk, 'h_ok', ok, 'h_bad', bad, 'h_latency', ARGV[3], 'h_at', now, 'h_error', ARGV[4])

local function publish(event)
  event.version = redis.call('INCR', KEYS[3])
  event.pool, event.provider, event.at = ARGV[9], ARGV[8], now
  redis.call('PUBLISH', ARGV[7], cjson.encode(event))
  return event.version
end

local new = state
if good and ok >= tonumber(ARGV[5]) then new = 'up' end
if not good and bad >= tonumber(ARGV[6]) then new = 'down' end
local version = tonumber(redis.call('GET', KEYS[3])) or 0
if new == 'down' then redis.call('HSET', pk, 'gate', 1) end  -- acquire.lua: look closer
if new ~= state then
  redis.call('HSET', pk, 'health', new, 'h_since', now)
  version = publish({health = new, previous = state, error = ARGV[4]})
end
if good and ARGV[10] == '1' then
  redis.call('HSET', pk, 'fails', 0)
  if h[4] then
    redis.call('HDEL', pk, 'circ', 'circ_until', 'circ_trial')
    redis.call('HSET', pk, 'circ_opens', 0)
    version = publish({circuit = 'closed'})
  end
elseif h[4] == 'open' and new == 'up' and state ~= 'up' then
  redis.call('HSET', pk, 'circ_until', now)
  version = publish({circuit = 'open', trial = 'now'})
end
return {1, new, version}
