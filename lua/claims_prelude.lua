-- tollgate: the part every claim script shares, prepended to each (see src/store/redis.rs).
--
-- ARGV[1]  node id (8 bytes: the u64 little-endian)
-- ARGV[2]  time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]  '1' when a key appears more than once in KEYS, else '0'
-- ARGV[4]  P, the number of distinct policies in the batch, then P groups of numbers (how many
--          per policy is the script's own), then one binary string of fixed-width claims, one
--          per key (the layout is the script's own).
--
-- Reply: {chunks, i1, message1, i2, message2, ...}. The strings of the list chunks, joined,
-- hold per key struct '<Bdddddd' of status (0 ok, 1 failed, 2 ok but the store had lost this
-- node's tokens, 3 stale: the claim is older than one applied before and changed nothing, all
-- numbers 0), granted, remaining, ms to next token, ms to reset, window, revoked; each failed
-- key i is listed after it with its error message. (Lua hashes every string it makes,
-- so one string for the whole batch would cost a pass over it per buffer merge.)
--
-- Costs that shape the scripts: every command a script sends costs more than its arithmetic,
-- every string it makes is hashed byte by byte, and a number passed to a command is formatted
-- with sprintf. So the keys are read with one MGET, a value is rewritten in place (SETRANGE
-- keeps the TTL) where its length allows, and constant arguments are strings.

local spack, sunpack, fmt = struct.pack, struct.unpack, string.format
local rcall, keys = redis.call, KEYS
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local RFMT = '<Bdddddd'
local FAILED = spack(RFMT, 1, 0, 0, 0, 0, 0, 0)
local out, errs = {}, {}

-- The policies (each a list of `width` numbers) and the claim data, or nil when the arguments
-- do not match the keys.
local function read_claims(width, claim_bytes)
  local policies, a = {}, 5
  for p = 1, tonumber(ARGV[4]) do
    local v = {}
    for j = 1, width do
      v[j] = tonumber(ARGV[a + j - 1])
    end
    policies[p] = v
    a = a + width
  end
  local blob = ARGV[a]
  if not blob or #blob ~= claim_bytes * #keys or #ARGV[1] ~= 8 then return nil end
  return policies, blob
end

-- Every key's value, read at once: vals[i] is the string held by KEYS[i], or false when the key
-- is absent, or holds another type (MGET answers nil for it too: see `read_alone`). When keys
-- repeat, an earlier claim may change what a later one reads: then nothing is read ahead.
local function read_all()
  if ARGV[3] ~= '0' or #keys == 0 then return {} end
  return rcall('MGET', unpack(keys))
end

-- Whether a key that read as false must be read alone: when keys repeat, or when the batch has
-- a key of another type (then every key that read as nil is read alone, so that such a key
-- fails with its own error). Decided at the first key that needs it.
local alone
local function must_read_alone(vals, i)
  if alone == nil then
    alone = false
    if ARGV[3] ~= '0' then
      alone = true
    else
      local missing, m = {}, 0
      for j = 1, #keys do
        if not vals[j] then
          m = m + 1
          missing[m] = keys[j]
        end
      end
      if rcall('EXISTS', unpack(missing)) > 0 then
        alone = {}
        for j = 1, #keys do
          if not vals[j] then alone[j] = true end
        end
      end
    end
  end
  return alone == true or (alone and alone[i])
end

-- The value of one key: false when absent, or nil and the error.
local function read_alone(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then return nil, v.err or 'ERR' end
  return v
end

local function fail(i, message)
  out[i] = FAILED
  errs[#errs + 1] = i
  errs[#errs + 1] = message
end

-- The reply, in chunks of 160 keys (7840 bytes: one Lua buffer).
local function reply()
  local chunks, n = {}, #out
  for a = 1, n, 160 do
    local b = a + 159
    if b > n then b = n end
    chunks[#chunks + 1] = table.concat(out, '', a, b)
  end
  return {chunks, unpack(errs)}
end
