-- tollgate: fixed window claims for a batch of keys.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (unused: window claims need no per-node record)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, window length in microseconds
-- then       one binary string: per key, struct '<ddddd' of policy index (1-based), kept,
--            returned, wanted, window of the claim
--
-- State: one integer per key, (window id mod 2^20) * 2^32 + used, where used counts every
-- token granted in the window (spent or still held by a node) minus those returned. The key
-- expires 1 ms after its window ends, so the stored window id is never more than one window
-- old and 20 bits tell it apart. Tokens held by nodes die with their window: a claim tagged
-- with another window is void (its returned tokens are ignored and its kept tokens revoked).
--
-- Reply: {string, i1, message1, i2, message2, ...}: the string holds per key struct '<Bdddddd'
-- of status (0 ok, 1 failed, 2 ok but the window had lost this node's tokens), granted, remaining,
-- ms to next token, ms to reset, window id, revoked; each failed key i is listed after it with its
-- error message.

local TWO32, TWO20 = 4294967296, 1048576
local policies, blob = read_claims(2) -- capacity, window in microseconds
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local out, errs, pos = {}, {}, 1

for i = 1, #KEYS do
  local key = KEYS[i]
  local p, kept, ret, want, claim_w
  p, kept, ret, want, claim_w, pos = sunpack('<ddddd', blob, pos)
  local cap, win = policies[p][1], policies[p][2]
  local v = redis.pcall('GET', key)
  local n = v and tonumber(v)
  if type(v) == 'table' then
    out[i] = FAILED
    errs[#errs + 1] = i
    errs[#errs + 1] = v.err or 'ERR'
  elseif v and not n then
    out[i] = FAILED
    errs[#errs + 1] = i
    errs[#errs + 1] = 'CORRUPT tollgate state'
  else
    local w = floor(now / win)
    local wm = w % TWO20
    local used = 0
    local same = false
    if n then
      local swm = floor(n / TWO32)
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
    local remaining = room - granted
    local reset = ceil(((w + 1) * win - now) / 1000)
    local nxt = 0
    if remaining == 0 then nxt = reset end
    out[i] = spack('<Bdddddd', status, granted, remaining, nxt, reset, w, revoked)
    if used == 0 then
      if v then redis.call('DEL', key) end
    elseif same then
      redis.call('SET', key, fmt('%d', wm * TWO32 + used), 'KEEPTTL')
    else
      redis.call('SET', key, fmt('%d', wm * TWO32 + used), 'PX', fmt('%d', reset + 1))
    end
  end
end
return {table.concat(out), unpack(errs)}
