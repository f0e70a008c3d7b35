-- tollgate: fixed window claims for a batch of keys.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (unused: window claims need no per-node record)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    '1' when a key appears more than once in KEYS, else '0'
-- ARGV[4]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, window length in microseconds
-- then       one binary string: per key, struct '<HI4I4I4d' of policy index (1-based), kept,
--            returned, wanted, window of the claim
--
-- State: one integer per key, in decimal, (window id mod 2^20) * 2^32 + used, where used
-- counts every token granted in the window (spent or still held by a node) minus those
-- returned. The key expires 1 ms after its window ends, so the stored window id is never more
-- than one window old and 20 bits tell it apart. Tokens held by nodes die with their window: a
-- claim tagged with another window is void (its returned tokens are ignored and its kept tokens
-- revoked). Within its window, a value of the same length is rewritten in place. A value that
-- is not such a decimal integer answers CORRUPT for its key alone, and nothing is written to it.
-- Window claims keep no per-node state, and their sequence numbers are not sent: a claim that
-- arrives late can only return tokens the node already gave up (and never returns again), or be
-- granted tokens the node never receives; neither lets a window admit more than its capacity.
--
-- Reply: see claims_prelude.lua (status 2 when the window counts less than this node alone
-- holds and returns).
-- All numbers are integers below 2^53, so a % b is exact, and (a - a % b) / b = floor(a / b)
-- for a >= 0, b > 0.

local sfind = string.find
local TWO32, TWO20, TWO52 = 4294967296, 1048576, 4503599627370496
local policies, blob = read_claims(2, 22) -- capacity, window in microseconds
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local vals = read_all()
local pos, lastp = 1, nil
-- Per policy: capacity, window length, the current window, its id mod 2^20, and the
-- milliseconds until it ends (rounded up).
local cap, win, w0, wm0, reset0

for i = 1, #keys do
  local p, kept, ret, want, claim_w, nextpos = sunpack('<HI4I4I4d', blob, pos)
  pos = nextpos
  if p ~= lastp then
    local v = policies[p]
    cap, win = v[1], v[2]
    w0 = (now - now % win) / win
    wm0 = w0 % TWO20
    reset0 = (w0 + 1) * win - now + 999
    reset0 = (reset0 - reset0 % 1000) / 1000
    lastp = p
  end
  local s, err = vals[i], nil
  if not s and must_read_alone(vals, i) then s, err = read_alone(keys[i]) end
  -- A count is what this script writes: at most 16 decimal digits, below 2^52. Anything else
  -- (a sign, an exponent, hex, 'nan', 'inf', spaces, a larger number, another algorithm's
  -- state) is not tollgate state.
  local n = s and #s <= 16 and sfind(s, '^%d+$') and tonumber(s)
  if n and n >= TWO52 then n = nil end
  if err then
    fail(i, err)
  elseif s and not n then
    fail(i, 'CORRUPT tollgate state')
  else
    local w, wm, reset, used, same = w0, wm0, reset0, 0, false
    if n then
      local swm = (n - n % TWO32) / TWO32
      local d = (swm - wm) % TWO20
      if d == 0 then
        used = n % TWO32
        same = true
      elseif d < TWO20 / 2 then
        -- The stored window is ahead: the clock stepped back. Answer in the stored window
        -- rather than open an earlier one next to it.
        w = w + d
        wm = swm
        used = n % TWO32
        same = true
        reset = (w + 1) * win - now + 999
        reset = (reset - reset % 1000) / 1000
      end
    end
    local revoked, status = 0, 0
    if claim_w == w then
      -- Status 2: the window counts less than this node alone holds, so the store lost state.
      if kept + ret > used then status = 2 end
      used = used - ret
      if used < 0 then used = 0 end
    else
      revoked = kept
    end
    local room = cap - used
    if room < 0 then room = 0 end
    local granted = want
    if granted > room then granted = room end
    used = used + granted
    if granted == room then
      out[i] = spack(RFMT, status, granted, 0, reset, reset, w, revoked)
    else
      out[i] = spack(RFMT, status, granted, room - granted, 0, reset, w, revoked)
    end
    if used == 0 then
      if s then rcall('DEL', keys[i]) end
    elseif not same then
      rcall('SET', keys[i], fmt('%d', wm * TWO32 + used), 'PX', fmt('%d', reset + 1))
    elseif used ~= n % TWO32 then
      local v = fmt('%d', wm * TWO32 + used)
      if #v == #s then
        rcall('SETRANGE', keys[i], '0', v)
      else
        rcall('SET', keys[i], v, 'KEEPTTL')
      end
    end
  end
end
return reply()
