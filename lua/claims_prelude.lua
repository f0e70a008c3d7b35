-- tollgate: the part every claim script shares, prepended to each (see src/store/redis.rs).
--
-- ARGV[1]  node id (a decimal string)
-- ARGV[2]  time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]  P, the number of distinct policies in the batch, then P groups of numbers (how many
--          per policy is the script's own), then one binary string: per key struct '<ddddd'
--          of policy index (1-based), kept, returned, wanted, window.

local spack, sunpack, fmt, floor, ceil = struct.pack, struct.unpack, string.format, math.floor, math.ceil
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local FAILED = spack('<Bdddddd', 1, 0, 0, 0, 0, 0, 0)

-- The policies (each a list of `width` numbers) and the claim data, or nil when the data does
-- not match the keys.
local function read_claims(width)
  local policies, a = {}, 4
  for p = 1, tonumber(ARGV[3]) do
    local v = {}
    for j = 1, width do
      v[j] = tonumber(ARGV[a + j - 1])
    end
    policies[p] = v
    a = a + width
  end
  local blob = ARGV[a]
  if not blob or #blob ~= 40 * #KEYS then return nil end
  return policies, blob
end

