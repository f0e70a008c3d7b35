-- tollgate: token bucket claims for a batch of keys, with the held cap and node leases.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (a decimal string; the hash field that records this node's holding)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, microseconds per token, lease in ms
-- then       one binary string: per key, struct '<ddddd' of policy index (1-based), kept,
--            returned, wanted, window (ignored here)
--
-- State: one hash per key.
--   field 's'    struct '<ddddd': e, ep, cur, prev, x
--     e     the "empty time" in microseconds: the bucket holds floor((now - e) / per) tokens,
--           at most capacity (e is clamped to now - capacity * per)
--     ep    the lease epoch (floor(now_ms / lease)) that cur belongs to
--     cur   tokens held by nodes that synced in epoch ep
--     prev  tokens held by nodes that synced in epoch ep - 1
--     x     the absolute expiry (ms) last set on the key
--   field '<node>'  struct '<dd': epoch of that node's last sync, tokens it holds since then
-- A holding counts until the end of the epoch after the one it was recorded in (a lease of
-- between one and two lease lengths). Tokens in the bucket are capped at
-- capacity - (holdings of all nodes), so bucket + holdings <= capacity at every instant, and
-- refill is capped by the holdings the store knew of during the time it accrued.
--
-- Reply: {string, i1, message1, i2, message2, ...}: the string holds per key struct '<Bdddddd'
-- of status (0 ok, 1 failed, 2 ok but the store had lost this node's holding), granted, remaining,
-- ms to next token, ms to reset, window (0), revoked; each failed key i is listed after it with its
-- error message.
-- All numbers stay below 2^53 (the client validates capacity * per <= 2^52).

local node = ARGV[1]
local now_ms = floor(now / 1000)
local policies, blob = read_claims(3) -- capacity, microseconds per token, lease in ms
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local out, errs, pos = {}, {}, 1

for i = 1, #KEYS do
  local key = KEYS[i]
  local p, kept, ret, want, claim_w
  p, kept, ret, want, claim_w, pos = sunpack('<ddddd', blob, pos)
  local cap, per, lease = policies[p][1], policies[p][2], policies[p][3]
  local tau = cap * per
  local ep = floor(now_ms / lease)
  local r = redis.pcall('HMGET', key, 's', node)
  local s = r[1]
  local rec = r[2]
  if r.err then
    out[i] = FAILED
    errs[#errs + 1] = i
    errs[#errs + 1] = r.err
  elseif (s and #s ~= 40) or (rec and #rec ~= 16) then
    out[i] = FAILED
    errs[#errs + 1] = i
    errs[#errs + 1] = 'CORRUPT tollgate state'
  else
    local e, sep, cur, prev, x
    if s then
      e, sep, cur, prev, x = sunpack('<ddddd', s)
    else
      e, sep, cur, prev, x = now - tau, ep, 0, 0, 0
    end
    -- Roll the lease epochs (a clock that went backwards keeps the stored epoch).
    if ep < sep then
      ep = sep
    elseif ep > sep then
      if ep == sep + 1 then prev = cur else prev = 0 end
      cur = 0
    end
    -- Take this node's previous holding out of the totals, if it still counts.
    local had = 0
    if rec then
      local nep, amt = sunpack('<dd', rec)
      if nep == ep then
        had = amt; cur = cur - amt
      elseif nep == ep - 1 then
        had = amt; prev = prev - amt
      end
      if cur < 0 then cur = 0 end
      if prev < 0 then prev = 0 end
    end
    local kfree = kept
    if kfree > had then kfree = had end
    local rok = ret
    if rok > had - kfree then rok = had - kfree end
    -- Refill up to capacity minus the holdings as they stood until now (this node's included:
    -- the store learns only now what it spent, and a token spent late in the interval must not
    -- buy refill for the time it was still held), then add back what was returned, capped at
    -- capacity minus everything still held.
    if e < now - tau then e = now - tau end
    local elapsed = now - e
    if elapsed < 0 then elapsed = 0 end
    local tokens = floor(elapsed / per)
    local frac = elapsed - tokens * per
    local old_room = cap - cur - prev - had
    if old_room < 0 then old_room = 0 end
    if tokens >= old_room then tokens = old_room; frac = 0 end
    tokens = tokens + rok
    local room = cap - cur - prev - kfree
    if room < 0 then room = 0 end
    if tokens >= room then tokens = room; frac = 0 end
    -- Kept tokens the store does not know of (lease expired, state lost) must be claimed again.
    local extra = kept - kfree
    if extra > tokens then extra = tokens end
    tokens = tokens - extra
    local revoked = kept - kfree - extra
    local granted = want
    if granted > tokens then granted = tokens end
    tokens = tokens - granted
    local held = kfree + extra + granted
    cur = cur + held
    e = now - tokens * per - frac
    local next_us = 0
    if tokens == 0 then next_us = per - frac end
    local reset_us = (cap - tokens) * per - frac
    -- Status 2: this node keeps more than the store knew it held, so the store lost state.
    local status = 0
    if kept > had then status = 2 end
    out[i] = spack('<Bdddddd', status, granted, tokens, ceil(next_us / 1000), ceil(reset_us / 1000), 0, revoked)
    -- Persist, or forget a key that is indistinguishable from a fresh one.
    if cur + prev == 0 and tokens >= cap then
      if s then redis.call('DEL', key) end
    else
      local need = ceil((e + tau) / 1000)
      if cur + prev > 0 then
        local lend = (ep + 2) * lease
        if lend > need then need = lend end
      end
      local refresh = x < need
      if refresh then
        -- Refresh the TTL only when it would fall short, with headroom so that this is rare.
        local head = need - now_ms
        if head < 1000 then head = 1000 end
        x = need + head
      end
      if held > 0 or rec then
        redis.call('HSET', key, 's', spack('<ddddd', e, ep, cur, prev, x), node, spack('<dd', ep, held))
      else
        redis.call('HSET', key, 's', spack('<ddddd', e, ep, cur, prev, x))
      end
      if refresh then
        if s then
          -- Once per refresh: drop the records of nodes whose lease has run out.
          local all = redis.call('HGETALL', key)
          for j = 1, #all, 2 do
            local f = all[j]
            if f ~= 's' then
              local v = all[j + 1]
              if #v ~= 16 or sunpack('<d', v) < ep - 1 then redis.call('HDEL', key, f) end
            end
          end
        end
        redis.call('PEXPIRE', key, fmt('%d', x - now_ms))
      end
    end
  end
end
return {table.concat(out), unpack(errs)}
