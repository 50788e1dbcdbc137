-- drop_pin.lua: remove a pin and its count on its provider (after DELETE /v1/responses/{id}).
--
-- KEYS[1]   the pin: '<provider>|<expires ms>|<tenant>'   Keys.response_pin (or Keys.pin)
-- ARGV[1]   the pool's key base '<prefix>:{<pool>}' (the provider's pins zset is
--           '<base>:pins:<provider>', Keys.pins: a key of the same slot)
-- Returns the provider it named, or false when there was no pin.

local v = redis.call('GET', KEYS[1])
if not v then return false end
local provider = string.match(v, '^([^|]*)|')
redis.call('DEL', KEYS[1])
if provider then
  redis.call('ZREM', ARGV[1] .. ':pins:' .. provider, string.sub(KEYS[1], #ARGV[1] + 2))
end
return provider or false
