-- heartbeat.lua: record that a replica is alive; drop replicas that stopped beating.
--
-- KEYS[1]   replica index (zset id -> last beat, ms)   Keys.replicas
-- KEYS[2]   this replica's record (hash, expires)     Keys.replica
-- ARGV[1]   replica id
-- ARGV[2]   record TTL (ms): a replica silent this long is gone
-- ARGV[3..] field, value pairs of the record (host, port, version, started)
-- Returns the number of live replicas, this one included.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('HSET', KEYS[2], 'last_seen', now, unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ttl)
return redis.call('ZCARD', KEYS[1])
