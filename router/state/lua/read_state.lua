-- read_state.lua: the whole cluster state in one consistent read, for routerctl and /admin.
-- Read-only: it purges nothing, so inspecting a cluster never changes what it decides.
--
-- KEYS[1]          healthd leader lease (string)         Keys.leader
-- KEYS[2]          healthd epoch (string)                Keys.epoch
-- KEYS[3]          health version (string)               Keys.health_version
-- KEYS[4]          replica index (zset id -> last beat)  Keys.replicas
-- KEYS[3+2i]       provider i's hash                     Keys.provider   (i = 1..n)
-- KEYS[4+2i]       provider i's lease zset               Keys.leases
-- KEYS[5+2n..]     replica records (hashes)              Keys.replica
-- ARGV[1]          n, the number of providers
-- Returns {seconds, microseconds (Redis TIME), leader (false when none), epoch, version,
--          {replica id, last beat ms, ...},
--          then per provider: {HGETALL of its hash}, unexpired leases,
--          then per replica record: {HGETALL of the record} ({} once it expired)}

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local n = tonumber(ARGV[1])
local out = {clock[1], clock[2], redis.call('GET', KEYS[1]),
  tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(redis.call('GET', KEYS[3])) or 0,
  redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')}
for i = 1, n do
  out[#out + 1] = redis.call('HGETALL', KEYS[3 + 2 * i])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[4 + 2 * i], '(' .. now, '+inf')
end
for k = 5 + 2 * n, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[k])
end
return out
