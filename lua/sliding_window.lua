-- tollgate: sliding window (two-counter approximation) claims for a batch of keys.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (unused: window claims need no per-node record)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    '1' when a key appears more than once in KEYS, else '0'
-- ARGV[4]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, window length in microseconds, weighting tick in microseconds
-- then       one binary string: per key, struct '<HI4I4I4d' of policy index (1-based), kept,
--            returned, wanted, window of the claim
--
-- State: struct '<dI4I4': window id, previous window's count, current window's count.
-- At e microseconds into window w the estimate is
--   cur + min(prev, ceil(prev * ceil((W - e) / tick) / floor(W / tick)))
-- (tick is 1 unless capacity * W would exceed 2^52; a coarser tick only rounds up).
-- Granted tokens count in cur at once; a claim tagged with another window is void (its
-- returned tokens are ignored and its kept tokens revoked). The key expires 1 ms after the
-- end of the window after its own, when its counts no longer matter. Within its window, the
-- value is rewritten in place. A value of another length, or whose window id is not such an
-- integer, answers CORRUPT for its key alone, and nothing is written to it.
-- Window claims keep no per-node state, and their sequence numbers are not sent (see
-- fixed_window.lua).
--
-- Reply: see claims_prelude.lua (status 2 when the window counts less than this node alone
-- holds and returns).
-- All numbers are integers below 2^53, so a % b is exact, and (a - a % b) / b = floor(a / b)
-- for a >= 0, b > 0.

local TWO53 = 9007199254740992
local policies, blob = read_claims(3, 22) -- capacity, window in microseconds, weighting tick
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local vals = read_all()
local pos, lastp = 1, nil
-- Per policy: capacity, window length, tick, the current window, the time into it, and the
-- window's length in ticks.
local cap, win, tick, w0, el0, wt

for i = 1, #keys do
  local p, kept, ret, want, claim_w, nextpos = sunpack('<HI4I4I4d', blob, pos)
  pos = nextpos
  if p ~= lastp then
    local v = policies[p]
    cap, win, tick = v[1], v[2], v[3]
    el0 = now % win
    w0 = (now - el0) / win
    wt = (win - win % tick) / tick
    lastp = p
  end
  local s, err = vals[i], nil
  if not s and must_read_alone(vals, i) then s, err = read_alone(keys[i]) end
  local sw, prev, cur = w0, 0, 0
  if s and #s == 16 then sw, prev, cur = sunpack('<dI4I4', s) end
  if err then
    fail(i, err)
  elseif s and (#s ~= 16 or sw ~= sw or sw < 0 or sw % 1 ~= 0 or (sw + 2) * win >= TWO53) then
    -- A window id is an integer (16 digits of a fixed window's count read as a double are not),
    -- small enough that the end of the window after it, in microseconds, is below 2^53.
    fail(i, 'CORRUPT tollgate state')
  else
    local w, el = w0, el0
    local prev0, cur0 = prev, cur
    local moved = true
    if sw == w then
      moved = not s
    elseif sw + 1 == w then
      prev = cur; cur = 0
    elseif sw < w then
      prev = 0; cur = 0
    else
      -- The clock went backwards: answer at the start of the stored window.
      w = sw; el = 0; moved = false
    end
    local rem = win - el + tick - 1
    rem = (rem - rem % tick) / tick
    local revoked, status = 0, 0
    if claim_w == w then
      -- Status 2: the window counts less than this node alone holds, so the store lost state.
      if kept + ret > cur then status = 2 end
      cur = cur - ret
      if cur < 0 then cur = 0 end
    else
      revoked = kept
    end
    local wp = prev
    if prev > 0 then
      wp = prev * rem + wt - 1
      wp = (wp - wp % wt) / wt
      if wp > prev then wp = prev end
    end
    local room = cap - cur - wp
    if room < 0 then room = 0 end
    local granted = want
    if granted > room then granted = room end
    cur = cur + granted
    local remaining = room - granted
    local reset = 0
    if cur > 0 then
      reset = (w + 2) * win - now + 999
      reset = (reset - reset % 1000) / 1000
    elseif prev > 0 then
      reset = (w + 1) * win - now + 999
      reset = (reset - reset % 1000) / 1000
    end
    local nxt = 0
    if remaining == 0 then
      local at, q
      if cur < cap and prev > 0 then
        -- Later in this window, as the previous window's weight decays.
        q = (cap - cur - 1) * wt
        at = w * win + win - (q - q % prev) / prev * tick
      else
        -- In the next window, where this window's count is the decaying one.
        q = (cap - 1) * wt
        at = (w + 1) * win + win - (q - q % cur) / cur * tick
      end
      nxt = at - now + 999
      nxt = (nxt - nxt % 1000) / 1000
      if nxt < 1 then nxt = 1 end
    end
    out[i] = spack(RFMT, status, granted, remaining, nxt, reset, w, revoked)
    if prev == 0 and cur == 0 then
      if s then rcall('DEL', keys[i]) end
    elseif moved then
      local px = (w + 2) * win - now + 999
      rcall('SET', keys[i], spack('<dI4I4', w, prev, cur), 'PX', fmt('%d', (px - px % 1000) / 1000 + 1))
    elseif prev ~= prev0 or cur ~= cur0 then
      rcall('SETRANGE', keys[i], '0', spack('<dI4I4', w, prev, cur))
    end
  end
end
return reply()
