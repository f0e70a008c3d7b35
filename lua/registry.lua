-- tollgate: node registry heartbeat.
--
-- KEYS[1]  the registry (a sorted set: member = node id, score = ms until which it is alive)
-- ARGV[1]  node id
-- ARGV[2]  time to live in ms (>= 1)
-- ARGV[3]  time override in microseconds, '' in production (then Redis TIME is used)
-- Reply: {the number of live nodes (this one included), the server's run_id}. A changed run_id
-- tells nodes that the server restarted and may have lost its state.

local now_ms
if ARGV[3] ~= '' then
  now_ms = math.floor(tonumber(ARGV[3]) / 1000)
else
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local fmt = string.format
local key = KEYS[1]
redis.call('ZADD', key, fmt('%d', now_ms + tonumber(ARGV[2])), ARGV[1])
redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt('%d', now_ms))
local n = redis.call('ZCARD', key)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if last[2] then
  local ttl = tonumber(last[2]) - now_ms + 1
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', key, fmt('%d', ttl))
end
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
return {n, run_id}
