-- tollgate: token bucket claims for a batch of keys, with the held cap and node leases.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (8 bytes: the id in this node's holding record)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    '1' when a key appears more than once in KEYS, else '0'
-- ARGV[4]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, microseconds per token, lease in ms
-- then       one binary string: per key, struct '<HI4I4I4' of policy index (1-based), kept,
--            returned, wanted
--
-- State: one string per key, a 64-byte header then 24 bytes per further node record.
--   header   struct '<dddddd' e, cur, amt, prev, ep, x, then a node id (8 bytes) and
--            struct '<d' nep: with amt, the first node record (node id 0, nep -2 and amt 0
--            when it is unused)
--     e      the "empty time" in microseconds: the bucket holds floor((now - e) / per) tokens,
--            at most capacity (e is clamped to now - capacity * per)
--     cur    tokens held by nodes that synced in epoch ep
--     prev   tokens held by nodes that synced in epoch ep - 1
--     ep     the lease epoch (floor(now_ms / lease)) that cur belongs to
--     x      the absolute expiry (ms) last set on the key
--   record   the node id (8 bytes), then struct '<dd' nep, amt: the epoch of that node's last
--            sync and the tokens it holds since then
-- A holding counts until the end of the epoch after the one it was recorded in (a lease of
-- between one and two lease lengths); a record of 0 tokens, or older than epoch ep - 1, counts
-- for nothing. Tokens in the bucket are capped at capacity - (holdings of all nodes), so
-- bucket + holdings <= capacity at every instant, and refill is capped by the holdings the store
-- knew of during the time it accrued.
--
-- Writes: a sync rewrites in place (SETRANGE, which keeps the TTL) the header fields that
-- changed and this node's record; a node without a record takes the first record if it counts
-- for nothing, or appends one. When the TTL must be refreshed, the key is written anew without
-- the records that count for nothing, this node's first. A claim that changes nothing writes
-- nothing.
--
-- Reply: see claims_prelude.lua (window 0; status 2 when this node keeps more than the store
-- knew it held).
-- All numbers are integers below 2^53 (the client validates capacity * per <= 2^52), so
-- a % b is exact, and (a - a % b) / b = floor(a / b) for a >= 0, b > 0.

local ssub, sfind = string.sub, string.find
local node = ARGV[1]
local policies, blob = read_claims(3, 14) -- capacity, microseconds per token, lease in ms
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local UNUSED = '\0\0\0\0\0\0\0\0'
-- SETRANGE offsets of records, as strings (a number argument costs a sprintf).
local offsets = {}
local now_ms = (now - now % 1000) / 1000
local vals = read_all()
local pos, lastp = 1, nil
-- Per policy: capacity, us per token, lease, capacity * per, the empty time of a full bucket,
-- the current epoch, and the state of a key that does not exist.
local cap, per, lease, tau, emin, ep0, fresh

for i = 1, #keys do
  local p, kept, ret, want, nextpos = sunpack('<HI4I4I4', blob, pos)
  pos = nextpos
  if p ~= lastp then
    local v = policies[p]
    cap, per, lease = v[1], v[2], v[3]
    tau = cap * per
    emin = now - tau
    ep0 = (now_ms - now_ms % lease) / lease
    fresh = spack('<ddddddc8d', emin, 0, 0, 0, ep0, 0, UNUSED, -2)
    lastp = p
  end
  local s, err = vals[i], nil
  if not s and must_read_alone(vals, i) then s, err = read_alone(keys[i]) end
  local exists = s
  if not s then s = fresh end
  local len = #s
  if err then
    fail(i, err)
  elseif len ~= 64 and (len < 64 or (len - 64) % 24 ~= 0) then
    fail(i, 'CORRUPT tollgate state')
  else
    local e, cur, amt0, prev, sep, x, nid, nep0 = sunpack('<ddddddc8d', s)
    -- This node's record: where it starts (at; 0 for the first record), its epoch and tokens.
    local at, nep, amt
    if nid == node then
      at, nep, amt = 0, nep0, amt0
    elseif len > 64 then
      local from = 65
      while true do
        local f = sfind(s, node, from, true)
        if not f then break end
        if (f - 65) % 24 == 0 then
          at = f
          nep, amt = sunpack('<dd', s, f + 8)
          break
        end
        from = f + 1
      end
    end
    local e0, cur0, prev0 = e, cur, prev
    -- Roll the lease epochs (a clock that went backwards keeps the stored epoch).
    local ep = ep0
    if ep ~= sep then
      if ep < sep then
        ep = sep
      else
        if ep == sep + 1 then prev = cur else prev = 0 end
        cur = 0
      end
    end
    -- Take this node's previous holding out of the totals, if it still counts.
    local had = 0
    if at then
      if nep == ep then
        had = amt
        cur = cur - amt
        if cur < 0 then cur = 0 end
      elseif nep == ep - 1 then
        had = amt
        prev = prev - amt
        if prev < 0 then prev = 0 end
      end
    end
    local kfree = kept
    if kfree > had then kfree = had end
    local rok = had - kfree
    if ret < rok then rok = ret end
    -- Refill up to capacity minus the holdings as they stood until now (this node's included:
    -- the store learns only now what it spent, and a token spent late in the interval must not
    -- buy refill for the time it was still held), then add back what was returned, capped at
    -- capacity minus everything still held.
    if e < emin then e = emin end
    local elapsed = now - e
    if elapsed < 0 then elapsed = 0 end
    local frac = elapsed % per
    local tokens = (elapsed - frac) / per
    local room = cap - cur - prev
    local old_room = room - had
    if old_room < 0 then old_room = 0 end
    if tokens >= old_room then tokens = old_room; frac = 0 end
    tokens = tokens + rok
    room = room - kfree
    if room < 0 then room = 0 end
    if tokens >= room then tokens = room; frac = 0 end
    -- Kept tokens the store does not know of (lease expired, state lost) must be claimed again.
    local extra, revoked = kept - kfree, 0
    if extra > tokens then revoked = extra - tokens; extra = tokens end
    tokens = tokens - extra
    local granted = want
    if granted > tokens then granted = tokens end
    tokens = tokens - granted
    local held = kfree + extra + granted
    cur = cur + held
    e = now - tokens * per - frac
    -- Status 2: this node keeps more than the store knew it held, so the store lost state.
    local status = 0
    if kept > had then status = 2 end
    -- Milliseconds rounded up: q = us + 999, then (q - q % 1000) / 1000.
    local r = (cap - tokens) * per - frac + 999
    if tokens == 0 then
      local q = per - frac + 999
      out[i] = spack(RFMT, status, granted, 0, (q - q % 1000) / 1000, (r - r % 1000) / 1000, 0, revoked)
    else
      out[i] = spack(RFMT, status, granted, tokens, 0, (r - r % 1000) / 1000, 0, revoked)
    end
    -- Persist, or forget a key that is indistinguishable from a fresh one.
    local holding = cur + prev
    if holding == 0 and tokens >= cap then
      if exists then rcall('DEL', keys[i]) end
    else
      local need = e + tau + 999
      need = (need - need % 1000) / 1000
      if holding > 0 then
        local lend = (ep + 2) * lease
        if lend > need then need = lend end
      end
      if x >= need then
        -- In place. A node that holds tokens and has no record takes the first record if that
        -- one counts for nothing, else appends its own; a node with a record rewrites it.
        local first = at == 0
        if not at and held > 0 and (amt0 == 0 or nep0 < ep - 1) then first = true end
        if first and (nid ~= node or nep0 ~= ep) then
          rcall('SETRANGE', keys[i], '0', spack('<ddddddc8d', e, cur, held, prev, ep, x, node, ep))
        elseif ep ~= sep or prev ~= prev0 then
          if first then amt0 = held end
          rcall('SETRANGE', keys[i], '0', spack('<ddddd', e, cur, amt0, prev, ep))
        elseif e ~= e0 or cur ~= cur0 or (first and held ~= amt0) then
          if first then amt0 = held end
          rcall('SETRANGE', keys[i], '0', spack('<ddd', e, cur, amt0))
        end
        if at and at > 0 then
          if nep ~= ep or amt ~= held then
            local o = offsets[at]
            if not o then
              o = fmt('%d', at + 7)
              offsets[at] = o
            end
            rcall('SETRANGE', keys[i], o, spack('<dd', ep, held))
          end
        elseif not first and held > 0 then
          rcall('APPEND', keys[i], node .. spack('<dd', ep, held))
        end
      else
        -- Refresh the TTL, with headroom so that this is rare, and write the key anew: this
        -- node's record first (if it holds tokens), then the others that still count.
        local head = need - now_ms
        if head < 1000 then head = 1000 end
        x = need + head
        local recs, n = {}, 0
        if amt0 > 0 and nep0 >= ep - 1 and at ~= 0 then
          n = 1
          recs[1] = nid .. spack('<dd', nep0, amt0)
        end
        for j = 65, len, 24 do
          if j ~= at then
            local rnep, ramt = sunpack('<dd', s, j + 8)
            if ramt > 0 and rnep >= ep - 1 then
              n = n + 1
              recs[n] = ssub(s, j, j + 23)
            end
          end
        end
        local v
        if held > 0 then
          v = spack('<ddddddc8d', e, cur, held, prev, ep, x, node, ep)
        elseif n > 0 then
          -- The first of the others moves into the header.
          local rnid, rnep, ramt = sunpack('<c8dd', recs[1])
          v = spack('<ddddddc8d', e, cur, ramt, prev, ep, x, rnid, rnep)
          recs[1] = ''
        else
          v = spack('<ddddddc8d', e, cur, 0, prev, ep, x, UNUSED, -2)
        end
        rcall('SET', keys[i], v .. table.concat(recs), 'PX', fmt('%d', x - now_ms))
      end
    end
  end
end
return reply()
