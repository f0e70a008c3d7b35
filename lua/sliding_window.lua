-- tollgate: sliding window (two-counter approximation) claims for a batch of keys.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (unused: window claims need no per-node record)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, window length in microseconds, weighting tick in microseconds
-- then       one binary string: per key, struct '<ddddd' of policy index (1-based), kept,
--            returned, wanted, window of the claim
--
-- State: struct '<dI4I4': window id, previous window's count, current window's count.
-- At e microseconds into window w the estimate is
--   cur + min(prev, ceil(prev * ceil((W - e) / tick) / floor(W / tick)))
-- (tick is 1 unless capacity * W would exceed 2^52; a coarser tick only rounds up).
-- Granted tokens count in cur at once; a claim tagged with another window is void (its
-- returned tokens are ignored and its kept tokens revoked). The key expires 1 ms after the
-- end of the window after its own, when its counts no longer matter.
--
-- Reply: {string, i1, message1, i2, message2, ...}: the string holds per key struct '<Bdddddd'
-- of status (0 ok, 1 failed, 2 ok but the window had lost this node's tokens), granted, remaining,
-- ms to next token, ms to reset, window id, revoked; each failed key i is listed after it with its
-- error message.

local policies, blob = read_claims(3) -- capacity, window in microseconds, weighting tick
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local out, errs, pos = {}, {}, 1

for i = 1, #KEYS do
  local key = KEYS[i]
  local p, kept, ret, want, claim_w
  p, kept, ret, want, claim_w, pos = sunpack('<ddddd', blob, pos)
  local cap, win, tick = policies[p][1], policies[p][2], policies[p][3]
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then
    out[i] = FAILED
    errs[#errs + 1] = i
    errs[#errs + 1] = v.err or 'ERR'
  elseif v and #v ~= 16 then
    out[i] = FAILED
    errs[#errs + 1] = i
    errs[#errs + 1] = 'CORRUPT tollgate state'
  else
    local w = floor(now / win)
    local el = now - w * win
    local sw, prev, cur = w, 0, 0
    if v then sw, prev, cur = sunpack('<dI4I4', v) end
    local moved = true
    if sw == w then
      moved = not v
    elseif sw + 1 == w then
      prev = cur; cur = 0
    elseif sw < w then
      prev = 0; cur = 0
    else
      -- The clock went backwards: answer at the start of the stored window.
      w = sw; el = 0; moved = false
    end
    local wt = floor(win / tick)
    local rem = ceil((win - el) / tick)
    local revoked, status = 0, 0
    if claim_w == w then
      -- Status 2: the window counts less than this node alone holds, so the store lost state.
      if kept + ret > cur then status = 2 end
      cur = cur - ret
      if cur < 0 then cur = 0 end
    else
      revoked = kept
    end
    local wp = ceil(prev * rem / wt)
    if wp > prev then wp = prev end
    local room = cap - cur - wp
    if room < 0 then room = 0 end
    local granted = want
    if granted > room then granted = room end
    cur = cur + granted
    local remaining = room - granted
    local reset = 0
    if cur > 0 then
      reset = ceil(((w + 2) * win - now) / 1000)
    elseif prev > 0 then
      reset = ceil(((w + 1) * win - now) / 1000)
    end
    local nxt = 0
    if remaining == 0 then
      local at
      if cur < cap and prev > 0 then
        -- Later in this window, as the previous window's weight decays.
        at = w * win + win - floor((cap - cur - 1) * wt / prev) * tick
      else
        -- In the next window, where this window's count is the decaying one.
        at = (w + 1) * win + win - floor((cap - 1) * wt / cur) * tick
      end
      nxt = ceil((at - now) / 1000)
      if nxt < 1 then nxt = 1 end
    end
    out[i] = spack('<Bdddddd', status, granted, remaining, nxt, reset, w, revoked)
    if prev == 0 and cur == 0 then
      if v then redis.call('DEL', key) end
    elseif moved then
      redis.call('SET', key, spack('<dI4I4', w, prev, cur), 'PX', fmt('%d', ceil(((w + 2) * win - now) / 1000) + 1))
    else
      redis.call('SET', key, spack('<dI4I4', w, prev, cur), 'KEEPTTL')
    end
  end
end
return {table.concat(out), unpack(errs)}
