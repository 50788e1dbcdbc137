-- dequeue.lua: take a waiting request's ticket out of its route's queue (it was admitted
-- elsewhere, gave up, timed out or its client left). Idempotent.
--
-- KEYS[1]   the route's queue        Keys.queue
-- KEYS[2]   its expiries             Keys.queue_expiry
-- KEYS[3]   its fair-queueing clock  Keys.queue_clock
-- KEYS[4]   the pool's waiting count Keys.waiting
-- ARGV[1]   the ticket ('<id>|<tenant>|<priority>')
-- ARGV[2]   the freed channel, ARGV[3] the route's model (the next head may be elsewhere)
-- Returns 1 when the ticket was there, else 0.

if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('DECR', KEYS[4]) < 0 then redis.call('SET', KEYS[4], 0) end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[3])
else
  redis.call('PUBLISH', ARGV[2], 'r:' .. ARGV[3])
end
return 1
