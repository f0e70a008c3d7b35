-- tollgate: token bucket claims for a batch of keys, with the held cap, node leases and claim
-- sequence numbers.
--
-- KEYS[i]    the key of claim i (all keys of one batch share a slot in a cluster)
-- ARGV[1]    node id (8 bytes: the id in this node's holding record)
-- ARGV[2]    time override in microseconds, '' in production (then Redis TIME is used)
-- ARGV[3]    '1' when a key appears more than once in KEYS, else '0'
-- ARGV[4]    P, the number of distinct policies in the batch (claims_prelude.lua, prepended
--            to this script, reads the arguments and the time)
-- then P x   capacity, microseconds per token, lease in ms
-- then       one binary string: per key, struct '<HI4I4I4d' of policy index (1-based), kept,
--            returned, wanted, and the claim's sequence number (the node's sync number)
--
-- State: one string per key, a 41-byte header then 32 bytes per node record.
--   header   struct '<Bddddd' of the layout version (2), x, ep, prev, e, cur
--     x      the absolute expiry (ms) last set on the key
--     ep     the lease epoch (floor(now_ms / lease)) that cur belongs to
--     prev   tokens held by nodes that synced in epoch ep - 1
--     e      the "empty time" in microseconds: the bucket holds floor((now - e) / per) tokens,
--            at most capacity (e is clamped to now - capacity * per)
--     cur    tokens held by nodes that synced in epoch ep
--   record   struct '<ddd' nep, amt, seq, then the node id (8 bytes): the epoch of that node's
--            last applied claim, the tokens it holds since then (> 0), and that claim's
--            sequence number
-- (The fields a sync changes most, e and cur, and those of the first record follow each other,
-- so that the node of the first record rewrites them with one short SETRANGE.)
-- Every length is 41 + 32 k, which is odd. The layout before this one (a 64-byte header and
-- 24-byte records, no sequence numbers) has only even lengths, and the other scripts' values
-- have at most 16 bytes: no value of another layout or algorithm is read as this one, it
-- answers CORRUPT. So does a value of the right length whose version byte is not 2, or whose
-- numbers are not integers below 2^53 (non-negative but for e), or whose lease end
-- (ep + 2) * lease is not below 2^52 ms (so that the expiry computed from it stays below 2^53).
-- The header and this node's record are checked on every claim; the other records whenever the
-- claim reads them (when the epoch moves or the value is written anew). A corrupt key fails
-- alone, and nothing is written to it.
--
-- A holding counts until the end of the epoch after the one it was recorded in (a lease of
-- between one and two lease lengths). Tokens in the bucket are capped at capacity - (holdings
-- of all nodes), so bucket + holdings <= capacity at every instant, and refill is capped by
-- the holdings the store knew of during the time it accrued.
--
-- Sequence numbers: a claim whose seq is not greater than the one in this node's record is
-- stale (it was sent before the claim the store applied last, and arrived late): it changes
-- nothing, not even the TTL, and answers status 3. A node without a record is applied as usual.
--
-- The state holds only records that count: a record whose holding drops to 0 is removed, and
-- when the epoch moves the records older than epoch ep - 1 are dropped. So its size is bounded
-- by the nodes that hold tokens, not by the nodes that ever synced.
--
-- Writes: a sync rewrites in place (SETRANGE, which keeps the TTL) the header fields that
-- changed and this node's record, or appends its record. When a record goes (a holding dropped
-- to 0, or an old record when the epoch moves), the key is written anew keeping its TTL; when
-- the TTL must be refreshed, it is written anew with a new one. Written anew, this node's record
-- comes first.
--
-- Reply: see claims_prelude.lua (window 0; status 2 when this node keeps more than the store
-- knew it held; status 3 for a stale claim).
-- All numbers are integers below 2^53 (the client validates capacity * per <= 2^52), so
-- a % b is exact, and (a - a % b) / b = floor(a / b) for a >= 0, b > 0.

local ssub, sfind, concat = string.sub, string.find, table.concat
local node = ARGV[1]
local policies, blob = read_claims(3, 22) -- capacity, microseconds per token, lease in ms
if not policies then return redis.error_reply('ERR tollgate: claim data does not match the keys') end
local VERSION = 2
local TWO53, TWO52 = 9007199254740992, 4503599627370496
local STALE = spack(RFMT, 3, 0, 0, 0, 0, 0, 0)
local CORRUPT = 'CORRUPT tollgate state'
-- SETRANGE offsets of records, as strings (a number argument costs a sprintf).
local offsets = {}
local now_ms = (now - now % 1000) / 1000
local vals = read_all()
local pos, lastp = 1, nil
-- Per policy: capacity, us per token, lease, capacity * per, the empty time of a full bucket,
-- the current epoch, and the state of a key that does not exist.
local cap, per, lease, tau, emin, ep0, fresh

-- True unless v is an integer in [0, 2^53).
local function bad(v)
  return v ~= v or v < 0 or v >= TWO53 or v % 1 ~= 0
end

-- The records of s other than the one at `at` that still count in epoch ep (a holding, from
-- epoch ep - 1 or later), and whether any was left out; nil when one is corrupt.
local function others(s, len, at, ep)
  local recs, n, dropped = {}, 0, false
  for j = 42, len, 32 do
    if j ~= at then
      local rnep, ramt, rseq = sunpack('<ddd', s, j)
      if bad(rnep) or bad(ramt) or bad(rseq) then return nil end
      if ramt > 0 and rnep >= ep - 1 then
        n = n + 1
        recs[n] = ssub(s, j, j + 31)
      else
        dropped = true
      end
    end
  end
  return recs, dropped
end

for i = 1, #keys do
  local p, kept, ret, want, seq, nextpos = sunpack('<HI4I4I4d', blob, pos)
  pos = nextpos
  if p ~= lastp then
    local v = policies[p]
    cap, per, lease = v[1], v[2], v[3]
    tau = cap * per
    emin = now - tau
    ep0 = (now_ms - now_ms % lease) / lease
    fresh = spack('<Bddddd', VERSION, 0, ep0, 0, emin, 0)
    lastp = p
  end
  local s, err = vals[i], nil
  if not s and must_read_alone(vals, i) then s, err = read_alone(keys[i]) end
  local exists = s
  if not s then s = fresh end
  local len = #s
  -- The header and the first record with one unpack: the first record is this node's when it
  -- syncs the key most (a value written anew puts it first).
  local ver, x, sep, prev, e, cur, nep, amt, rseq, nid, at
  if len == 41 then
    ver, x, sep, prev, e, cur = sunpack('<Bddddd', s)
  elseif len > 41 and (len - 41) % 32 == 0 then
    ver, x, sep, prev, e, cur, nep, amt, rseq, nid = sunpack('<Bddddddddc8', s)
    -- This node's record: where it starts (at), its epoch, tokens and sequence number.
    if nid == node then
      at = 42
    else
      -- Node ids of the further records are at 98, 130, ...
      local from = 98
      while true do
        local f = sfind(s, node, from, true)
        if not f then break end
        if (f - 66) % 32 == 0 then
          at = f - 24
          nep, amt, rseq = sunpack('<ddd', s, at)
          break
        end
        from = f + 1
      end
    end
  end
  if err then
    fail(i, err)
  elseif ver ~= VERSION or not (e > -TWO53 and e < TWO53 and e % 1 == 0 and cur >= 0 and prev >= 0
      and x >= 0 and sep >= 0 and cur % 1 + prev % 1 + x % 1 + sep % 1 == 0 and cur < TWO53
      and prev < TWO53 and x < TWO53 and (sep + 2) * lease < TWO52)
      or (at and not (nep >= 0 and amt >= 0 and rseq >= 0 and nep % 1 + amt % 1 + rseq % 1 == 0
      and nep < TWO53 and amt < TWO53 and rseq < TWO53)) then
    -- (Every comparison with NaN is false; v % 1 of a finite v >= 0 is in [0, 1), and NaN for
    -- an infinite one, so the sums are 0 exactly when each is.)
    fail(i, CORRUPT)
  elseif at and seq <= rseq then
    out[i] = STALE
  else
    local e0, cur0, prev0 = e, cur, prev
    -- Roll the lease epochs (a clock that went backwards keeps the stored epoch).
    local ep = ep0
    if ep ~= sep then
      if ep < sep then
        ep = sep
      else
        -- Holdings stop counting at epoch ends (prev's at the end of sep, cur's at the end of
        -- the next): the store takes them as spent then, so refill accrued before such an end
        -- is capped by the holdings that still counted (see MemoryStore).
        local r = cap - cur - prev
        if r < 0 then r = 0 end
        local floor = (sep + 1) * lease * 1000 - r * per
        if e < floor then e = floor end
        if ep >= sep + 2 then
          r = cap - cur
          if r < 0 then r = 0 end
          floor = (sep + 2) * lease * 1000 - r * per
          if e < floor then e = floor end
        end
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
      -- The key lives until its bucket is full again, the holdings counted as spent when their
      -- count ends (prev's at the end of this epoch, cur's at the end of the next).
      local need = e + tau
      if holding > 0 then
        local f = (ep + 1) * lease * 1000 + holding * per
        if f > need then need = f end
        if cur > 0 then
          f = (ep + 2) * lease * 1000 + cur * per
          if f > need then need = f end
        end
      end
      need = need + 999
      need = (need - need % 1000) / 1000
      if holding > 0 then
        local lend = (ep + 2) * lease
        if lend > need then need = lend end
      end
      local refresh = not exists or x < need
      -- Written anew: to refresh the TTL, or to remove this node's record (it holds nothing
      -- now). The other records are read for that, and when the epoch moved (to drop those
      -- that no longer count).
      local anew = refresh or (at and held == 0)
      local recs, dropped, corrupt = nil, false, false
      if anew or ep ~= sep then
        recs, dropped = others(s, len, at, ep)
        corrupt = not recs
      end
      if corrupt then
        fail(i, CORRUPT)
      elseif anew or dropped then
        -- This node's record first (if it holds tokens), then the others.
        if refresh then
          local head = need - now_ms
          if head < 1000 then head = 1000 end
          x = need + head
        end
        local v = spack('<Bddddd', VERSION, x, ep, prev, e, cur)
        if held > 0 then v = v .. spack('<ddd', ep, held, seq) .. node end
        v = v .. concat(recs)
        if refresh then
          rcall('SET', keys[i], v, 'PX', fmt('%d', x - now_ms))
        else
          rcall('SET', keys[i], v, 'KEEPTTL')
        end
      else
        -- In place: the header fields that changed, then this node's record.
        if at == 42 then
          if ep ~= sep or prev ~= prev0 then
            rcall('SETRANGE', keys[i], '9', spack('<ddddddd', ep, prev, e, cur, ep, held, seq))
          else
            rcall('SETRANGE', keys[i], '25', spack('<ddddd', e, cur, ep, held, seq))
          end
        else
          if ep ~= sep or prev ~= prev0 then
            rcall('SETRANGE', keys[i], '9', spack('<dddd', ep, prev, e, cur))
          elseif e ~= e0 or cur ~= cur0 then
            rcall('SETRANGE', keys[i], '25', spack('<dd', e, cur))
          end
          if at then
            local o = offsets[at]
            if not o then
              o = fmt('%d', at - 1)
              offsets[at] = o
            end
            rcall('SETRANGE', keys[i], o, spack('<ddd', ep, held, seq))
          elseif held > 0 then
            rcall('APPEND', keys[i], spack('<ddd', ep, held, seq) .. node)
          end
        end
      end
    end
  end
end
return reply()
