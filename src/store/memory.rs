//! [`MemoryStore`]: the store semantics in-process, step for step the arithmetic of the Lua
//! scripts (every value is an integer below 2^53 there, so `i64` here gives the same answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::{
    clamped, Claim, ClaimOutcome, Grant, Heartbeat, KeyError, Limits, NodeId, Store, StoreAlgorithm, StoreFuture,
    StoreKey,
};

/// A source of the store's time in microseconds since the Unix epoch.
pub type TimeSource = Arc<dyn Fn() -> u64 + Send + Sync>;

const TWO20: i64 = 1 << 20;
const TWO32: i64 = 1 << 32;

#[derive(Clone, Debug)]
enum State {
    Bucket(Bucket),
    /// `(window id mod 2^20) * 2^32 + used`, as the script stores it.
    Fixed(i64),
    Sliding {
        w: i64,
        prev: i64,
        cur: i64,
    },
    /// Data that is not tollgate state (tests use it to emulate `WRONGTYPE`).
    Foreign,
}

#[derive(Clone, Debug)]
struct Bucket {
    e: i64,
    ep: i64,
    cur: i64,
    prev: i64,
    x: i64,
    /// The holding records: only nodes that hold tokens (see `token_bucket`).
    nodes: Vec<Holding>,
}

/// One node's holding record in a token bucket.
#[derive(Clone, Copy, Debug)]
struct Holding {
    node: NodeId,
    /// The lease epoch of the node's last applied claim.
    epoch: i64,
    /// Tokens the node holds since then (> 0).
    amount: i64,
    /// The sequence number of that claim.
    seq: i64,
}

/// Bytes of a token bucket's value in Redis: the header, then one record per holding node
/// (`lua/token_bucket.lua`).
const BUCKET_HEADER_LEN: usize = 41;
const BUCKET_RECORD_LEN: usize = 32;
/// Bytes of a sliding window's value in Redis.
const SLIDING_LEN: usize = 16;

#[derive(Clone, Debug)]
struct Entry {
    state: State,
    /// Absolute expiry in milliseconds of the store's clock.
    expires_ms: i64,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<StoreKey, Entry, ahash::RandomState>,
    registries: HashMap<StoreKey, HashMap<NodeId, i64>, ahash::RandomState>,
    ops_since_purge: usize,
    /// The server identity reported by heartbeats; `clear` changes it, like a restart.
    server: u64,
}

/// The store semantics in-process: the embedded default for one process, and the store of
/// tests and simulations. Same replies as the Redis scripts for the same operations at the same
/// times; keys expire like Redis keys (checked lazily, purged in amortized sweeps).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    time: TimeSource,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.inner.lock().keys.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn system_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn ceil_div(a: i64, b: i64) -> i64 {
    // b > 0; a may be negative only in degenerate cases, where this rounds towards +inf too.
    a.div_euclid(b) + i64::from(a.rem_euclid(b) != 0)
}

impl MemoryStore {
    /// A store on the system clock.
    pub fn new() -> Self {
        Self::with_time_source(Arc::new(system_us))
    }

    /// A store on the given clock (microseconds since the Unix epoch; values are clamped below
    /// 2^53 - 1). Use [`ManualTime`] for tests and simulations.
    pub fn with_time_source(time: TimeSource) -> Self {
        let inner = Inner {
            server: ahash::RandomState::new().hash_one(system_us()) | 1,
            ..Inner::default()
        };
        MemoryStore {
            inner: Arc::new(Mutex::new(inner)),
            time,
        }
    }

    /// Number of keys stored (expired keys not yet purged included).
    pub fn len(&self) -> usize {
        self.inner.lock().keys.len()
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Milliseconds until `key` expires (like Redis `PTTL`: `None` when it does not exist).
    pub fn pttl(&self, key: &StoreKey) -> Option<u64> {
        let now_ms = self.now_us() / 1000;
        let g = self.inner.lock();
        g.keys
            .get(key)
            .filter(|e| e.expires_ms >= now_ms)
            .map(|e| (e.expires_ms - now_ms) as u64)
    }

    /// Test aid: the byte length the Redis value of `key` has after the same operations
    /// (Redis `STRLEN`), so that the state sizes of both stores can be compared; `None` when
    /// the key does not exist (or holds another type). A token bucket takes a 41-byte header and
    /// 32 bytes per node that holds tokens; a fixed window, the decimal digits of its count; a
    /// sliding window, 16 bytes.
    pub fn state_len(&self, key: &StoreKey) -> Option<usize> {
        let now_ms = self.now_us() / 1000;
        let g = self.inner.lock();
        let e = g.keys.get(key).filter(|e| e.expires_ms >= now_ms)?;
        match &e.state {
            State::Bucket(b) => Some(BUCKET_HEADER_LEN + BUCKET_RECORD_LEN * b.nodes.len()),
            State::Fixed(n) => Some(n.to_string().len()),
            State::Sliding { .. } => Some(SLIDING_LEN),
            State::Foreign => None,
        }
    }

    /// Stores a value of another type under `key` (emulates a key written by someone else).
    pub fn put_foreign(&self, key: &StoreKey) {
        let mut g = self.inner.lock();
        g.keys.insert(
            key.clone(),
            Entry {
                state: State::Foreign,
                expires_ms: i64::MAX,
            },
        );
    }

    /// Forgets everything, like a server restarted without persistence: the keys, the
    /// registry and the server identity that heartbeats report.
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        g.keys.clear();
        g.registries.clear();
        g.server = g.server.wrapping_add(2);
    }

    fn now_us(&self) -> i64 {
        (self.time)().min(super::MAX_STORE_NUMBER) as i64
    }

    /// Applies a batch synchronously (what [`Store::claim`] does, without a future).
    pub fn claim_now(&self, node: NodeId, claims: &[Claim]) -> Vec<ClaimOutcome> {
        let now = self.now_us();
        let mut g = self.inner.lock();
        let out = claims.iter().map(|c| apply(&mut g.keys, node, now, c)).collect();
        g.ops_since_purge += claims.len();
        if g.ops_since_purge > g.keys.len().max(1024) {
            g.ops_since_purge = 0;
            let now_ms = now.div_euclid(1000);
            g.keys.retain(|_, e| e.expires_ms >= now_ms);
        }
        out
    }

    /// Heartbeat, synchronously (see [`Store::heartbeat`]).
    pub fn heartbeat_now(&self, registry: &StoreKey, node: NodeId, ttl: Duration) -> Heartbeat {
        let now_ms = self.now_us().div_euclid(1000);
        let ttl = ttl.as_millis().clamp(1, 1 << 40) as i64;
        let mut g = self.inner.lock();
        let server = g.server;
        let reg = g.registries.entry(registry.clone()).or_default();
        reg.insert(node, now_ms + ttl);
        reg.retain(|_, &mut until| until > now_ms);
        Heartbeat {
            live_nodes: reg.len() as u64,
            server,
        }
    }

    /// Leave, synchronously (see [`Store::leave`]).
    pub fn leave_now(&self, registry: &StoreKey, node: NodeId) {
        if let Some(reg) = self.inner.lock().registries.get_mut(registry) {
            reg.remove(&node);
        }
    }

    /// Forgets one key, as Redis does when it evicts it or fails over to a replica that missed
    /// its writes: the next claim for it starts afresh. True when the key existed.
    pub fn remove(&self, key: &StoreKey) -> bool {
        self.inner.lock().keys.remove(key).is_some()
    }
}

impl Store for MemoryStore {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        let out = self.claim_now(node, claims);
        Box::pin(async move { Ok(out) })
    }

    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        let n = self.heartbeat_now(registry, node, ttl);
        Box::pin(async move { Ok(n) })
    }

    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        self.leave_now(registry, node);
        Box::pin(async move { Ok(()) })
    }
}

type Keys = HashMap<StoreKey, Entry, ahash::RandomState>;

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

fn apply(keys: &mut Keys, node: NodeId, now: i64, c: &Claim) -> ClaimOutcome {
    let now_ms = now.div_euclid(1000);
    // A key past its expiry is gone, as in Redis.
    let old = keys.remove(&c.key).filter(|e| e.expires_ms >= now_ms);
    let (kept, ret, want, window, seq) = clamped(c);
    let (kept, ret, want, window, seq) = (kept as i64, ret as i64, want as i64, window as i64, seq as i64);
    let l = &c.limits;
    let (out, new) = match (l.algorithm(), old) {
        (
            _,
            Some(
                e @ Entry {
                    state: State::Foreign, ..
                },
            ),
        ) => (Err(KeyError::WrongType(WRONGTYPE.into())), Some(e)),
        (StoreAlgorithm::TokenBucket, None) => token_bucket(node, now, l, None, [kept, ret, want, seq]),
        (
            StoreAlgorithm::TokenBucket,
            Some(Entry {
                state: State::Bucket(b),
                expires_ms,
            }),
        ) => token_bucket(node, now, l, Some((b, expires_ms)), [kept, ret, want, seq]),
        (StoreAlgorithm::FixedWindow, None) => fixed_window(now, l, None, kept, ret, want, window),
        (
            StoreAlgorithm::FixedWindow,
            Some(Entry {
                state: State::Fixed(n),
                expires_ms,
            }),
        ) => fixed_window(now, l, Some((n, expires_ms)), kept, ret, want, window),
        (StoreAlgorithm::SlidingWindow, None) => sliding_window(now, l, None, kept, ret, want, window),
        (
            StoreAlgorithm::SlidingWindow,
            Some(Entry {
                state: State::Sliding { w, prev, cur },
                expires_ms,
            }),
        ) => sliding_window(now, l, Some(((w, prev, cur), expires_ms)), kept, ret, want, window),
        // Every algorithm keeps a string: another algorithm's state does not parse.
        (_, Some(e)) => (Err(KeyError::Corrupt), Some(e)),
    };
    if let Some(e) = new {
        keys.insert(c.key.clone(), e);
    }
    out
}

type Applied = (ClaimOutcome, Option<Entry>);

/// A token-bucket policy's numbers as the script reads them per policy: capacity,
/// microseconds per token, lease in ms, and capacity * per.
#[derive(Clone, Copy, Debug)]
struct BucketPolicy {
    cap: i64,
    per: i64,
    lease: i64,
    tau: i64,
}

impl BucketPolicy {
    fn of(l: &Limits) -> Self {
        let (cap, per, lease) = (l.capacity() as i64, l.period_us() as i64, l.lease_ms() as i64);
        BucketPolicy {
            cap,
            per,
            lease,
            tau: cap * per,
        }
    }
}

/// What a claim takes from the bucket, once refilled: the tokens left in it and the
/// microseconds towards the next one, and the claim's split.
#[derive(Clone, Copy, Debug)]
struct Taken {
    tokens: i64,
    frac: i64,
    granted: i64,
    /// Kept tokens the store could not cover.
    revoked: i64,
    /// What this node holds after the claim.
    held: i64,
}

impl Bucket {
    /// The state of a key that does not exist: a full bucket in epoch `ep`, holding nothing.
    fn fresh(now: i64, p: &BucketPolicy, ep: i64) -> Self {
        Bucket {
            e: now - p.tau,
            ep,
            cur: 0,
            prev: 0,
            x: 0,
            nodes: Vec::new(),
        }
    }

    /// Rolls the lease epochs to `ep` (the current one); returns the epoch the claim is applied
    /// in (a clock that went backwards keeps the stored epoch). Leaves `self.ep` as it was.
    fn roll_epochs(&mut self, p: &BucketPolicy, ep: i64) -> i64 {
        let BucketPolicy { cap, per, lease, .. } = *p;
        if ep < self.ep {
            return self.ep;
        }
        if ep > self.ep {
            // Holdings stop counting at epoch ends: those of epoch `self.ep - 1` (prev) at the end
            // of `self.ep`, those of `self.ep` (cur) at the end of the next. The store never learns
            // when a node that stopped syncing spent them, so it takes them as spent when their count
            // ends: refill accrued before that end is capped by the holdings that still counted.
            // (Without this, a node that spends its tokens late and then vanishes hands the store
            // refill for the whole time it held them.)
            let end1 = (self.ep + 1) * lease * 1000;
            self.e = self.e.max(end1 - (cap - self.cur - self.prev).max(0) * per);
            if ep >= self.ep + 2 {
                let end2 = (self.ep + 2) * lease * 1000;
                self.e = self.e.max(end2 - (cap - self.cur).max(0) * per);
            }
            self.prev = if ep == self.ep + 1 { self.cur } else { 0 };
            self.cur = 0;
        }
        ep
    }

    /// Takes this node's previous holding (`own`, its record) out of the totals if it still
    /// counts in epoch `ep`; returns it (0 when it no longer counts, or there is none).
    fn release(&mut self, own: Option<Holding>, ep: i64) -> i64 {
        let Some(Holding { epoch, amount, .. }) = own else {
            return 0;
        };
        if epoch == ep {
            self.cur = (self.cur - amount).max(0);
            amount
        } else if epoch == ep - 1 {
            self.prev = (self.prev - amount).max(0);
            amount
        } else {
            0
        }
    }

    /// Refills the bucket at `now`: returns the tokens in it and the microseconds towards the
    /// next one, capped by the holdings as they stood while the refill accrued (`had`, this
    /// node's previous holding, included).
    fn refill(&mut self, p: &BucketPolicy, now: i64, had: i64) -> (i64, i64) {
        let BucketPolicy { cap, per, tau, .. } = *p;
        if self.e < now - tau {
            self.e = now - tau;
        }
        let elapsed = (now - self.e).max(0);
        let mut tokens = elapsed / per;
        let mut frac = elapsed - tokens * per;
        // Refill is capped by the holdings as they stood while it accrued (this node's included):
        // a token spent late in the interval must not buy refill for the time it was still held.
        let old_room = (cap - self.cur - self.prev - had).max(0);
        if tokens >= old_room {
            tokens = old_room;
            frac = 0;
        }
        (tokens, frac)
    }

    /// Applies the claim `[kept, returned, wanted]` to the refilled bucket (`tokens`, `frac`)
    /// against what this node held (`had`): what it returns goes back, capped at capacity
    /// minus everything still held; what it keeps beyond `had` must be claimed again; then
    /// the grant. Records the node's new holding in `cur` and the bucket's new empty time.
    fn take(
        &mut self,
        p: &BucketPolicy,
        now: i64,
        had: i64,
        (mut tokens, mut frac): (i64, i64),
        claim: [i64; 3],
    ) -> Taken {
        let [kept, ret, want] = claim;
        let kfree = kept.min(had);
        let rok = ret.min(had - kfree);
        tokens += rok;
        let room = (p.cap - self.cur - self.prev - kfree).max(0);
        if tokens >= room {
            tokens = room;
            frac = 0;
        }
        let extra = (kept - kfree).min(tokens);
        tokens -= extra;
        let revoked = kept - kfree - extra;
        let granted = want.min(tokens);
        tokens -= granted;
        let held = kfree + extra + granted;
        self.cur += held;
        self.e = now - tokens * p.per - frac;
        Taken {
            tokens,
            frac,
            granted,
            revoked,
            held,
        }
    }

    /// The key's expiry need in ms: it lives until it is indistinguishable from a fresh one,
    /// its bucket full again, counting the holdings as spent when their count ends (prev's at
    /// the end of epoch `ep`, cur's at the end of the next), as the next claim will.
    fn full_at_ms(&self, p: &BucketPolicy, ep: i64) -> i64 {
        let ends = [(ep + 1, self.cur + self.prev), (ep + 2, self.cur)];
        let full_us = ends
            .iter()
            .filter(|&&(_, held)| held > 0)
            .map(|&(end, held)| end * p.lease * 1000 + held * p.per)
            .fold(self.e + p.tau, i64::max);
        let mut need = ceil_div(full_us, 1000);
        if self.cur + self.prev > 0 {
            need = need.max((ep + 2) * p.lease);
        }
        need
    }

    /// Writes this node's record (`own`, at index `rec` if it had one) and moves the stored
    /// epoch to `own.epoch`. Only records that count are kept: a node that holds nothing has
    /// none, and the records whose lease ran out go when the epoch moves. The script reads the
    /// other records (and so drops those that count for nothing) when the epoch moves or it
    /// writes the value anew (`refresh`, or this node's record removed).
    fn write_record(&mut self, rec: Option<usize>, own: Holding, refresh: bool) {
        let ep = own.epoch;
        let moved = self.ep != ep;
        self.ep = ep;
        let removed = rec.is_some() && own.amount == 0;
        match rec {
            Some(i) if own.amount > 0 => self.nodes[i] = own,
            Some(i) => {
                self.nodes.swap_remove(i);
            }
            None if own.amount > 0 => self.nodes.push(own),
            None => {}
        }
        if moved || refresh || removed {
            self.nodes
                .retain(|n| n.node == own.node || (n.amount > 0 && n.epoch >= ep - 1));
        }
    }
}

/// The reply to a token-bucket claim that took `t` from the bucket.
fn bucket_grant(p: &BucketPolicy, t: &Taken, state_lost: bool) -> Grant {
    let next_us = if t.tokens == 0 { p.per - t.frac } else { 0 };
    let reset_us = (p.cap - t.tokens) * p.per - t.frac;
    Grant {
        granted: t.granted as u64,
        remaining: t.tokens as u64,
        ms_to_next_token: ceil_div(next_us, 1000) as u64,
        ms_to_reset: ceil_div(reset_us, 1000) as u64,
        window: 0,
        revoked: t.revoked as u64,
        state_lost,
        stale: false,
    }
}

/// A token-bucket claim: `[kept, returned, wanted, seq]` (see `lua/token_bucket.lua`, which
/// this follows step for step).
fn token_bucket(node: NodeId, now: i64, l: &Limits, old: Option<(Bucket, i64)>, claim: [i64; 4]) -> Applied {
    let [kept, ret, want, seq] = claim;
    let now_ms = now.div_euclid(1000);
    let p = BucketPolicy::of(l);
    let ep0 = now_ms.div_euclid(p.lease);
    let is_new = old.is_none();
    let (mut b, old_expiry) = old.unwrap_or_else(|| (Bucket::fresh(now, &p, ep0), 0));
    let rec = b.nodes.iter().position(|n| n.node == node);
    let own = rec.map(|i| b.nodes[i]);
    // A claim not newer than the last one applied from this node changes nothing.
    if own.is_some_and(|h| seq <= h.seq) {
        let stale = Grant {
            stale: true,
            ..Grant::default()
        };
        let entry = Entry {
            state: State::Bucket(b),
            expires_ms: old_expiry,
        };
        return (Ok(stale), Some(entry));
    }
    let ep = b.roll_epochs(&p, ep0);
    let had = b.release(own, ep);
    let refilled = b.refill(&p, now, had);
    let taken = b.take(&p, now, had, refilled, [kept, ret, want]);
    let grant = bucket_grant(&p, &taken, kept > had);
    if b.cur + b.prev == 0 && taken.tokens >= p.cap {
        return (Ok(grant), None);
    }
    let need = b.full_at_ms(&p, ep);
    let refresh = is_new || b.x < need;
    if refresh {
        let head = (need - now_ms).max(1000);
        b.x = need + head;
    }
    let own = Holding {
        node,
        epoch: ep,
        amount: taken.held,
        seq,
    };
    b.write_record(rec, own, refresh);
    let expires_ms = if refresh { b.x } else { old_expiry };
    (
        Ok(grant),
        Some(Entry {
            state: State::Bucket(b),
            expires_ms,
        }),
    )
}

fn fixed_window(
    now: i64,
    l: &Limits,
    old: Option<(i64, i64)>,
    kept: i64,
    ret: i64,
    want: i64,
    claim_w: i64,
) -> Applied {
    let (cap, win) = (l.capacity() as i64, l.period_us() as i64);
    let mut w = now.div_euclid(win);
    let mut wm = w % TWO20;
    let (used, same) = match old {
        Some((n, _)) => {
            let swm = n / TWO32;
            let d = (swm - wm).rem_euclid(TWO20);
            if d == 0 {
                (n % TWO32, true)
            } else if d < TWO20 / 2 {
                // The stored window is ahead: the clock stepped back. Answer in the stored
                // window rather than open an earlier one next to it.
                w += d;
                wm = swm;
                (n % TWO32, true)
            } else {
                (0, false)
            }
        }
        None => (0, false),
    };
    let (mut used, revoked, state_lost) = settle_window(claim_w, w, kept, ret, used);
    let room = (cap - used).max(0);
    let granted = want.min(room);
    used += granted;
    let remaining = room - granted;
    let reset = ceil_div((w + 1) * win - now, 1000);
    let grant = Grant {
        granted: granted as u64,
        remaining: remaining as u64,
        ms_to_next_token: if remaining == 0 { reset as u64 } else { 0 },
        ms_to_reset: reset as u64,
        window: w as u64,
        revoked: revoked as u64,
        state_lost,
        stale: false,
    };
    if used == 0 {
        return (Ok(grant), None);
    }
    let expires_ms = match old {
        Some((_, x)) if same => x,
        _ => now.div_euclid(1000) + reset + 1,
    };
    (
        Ok(grant),
        Some(Entry {
            state: State::Fixed(wm * TWO32 + used),
            expires_ms,
        }),
    )
}

/// A sliding window's counts at `now` (window length `win`) from the stored ones, `old`
/// (`(window, prev, cur)`): the window the claim is answered in, the microseconds into it,
/// its previous and current counts, and whether the window moved (the key is then written
/// anew, with a new expiry).
fn roll_window(now: i64, win: i64, old: Option<(i64, i64, i64)>) -> (i64, i64, i64, i64, bool) {
    let w = now.div_euclid(win);
    let el = now - w * win;
    let (sw, prev, cur) = old.unwrap_or((w, 0, 0));
    if sw == w {
        (w, el, prev, cur, old.is_none())
    } else if sw + 1 == w {
        (w, el, cur, 0, true)
    } else if sw < w {
        (w, el, 0, 0, true)
    } else {
        // The clock went backwards: answer at the start of the stored window.
        (sw, 0, prev, cur, false)
    }
}

/// Applies what a window claim tagged with window `claim_w` keeps and returns to the count
/// `used` of window `w`; returns the count, the tokens revoked and whether the window counts
/// less than this node alone holds and returns (the store lost state). A claim tagged with
/// another window is void: its returned tokens are ignored and its kept tokens revoked.
fn settle_window(claim_w: i64, w: i64, kept: i64, ret: i64, used: i64) -> (i64, i64, bool) {
    if claim_w == w {
        ((used - ret).max(0), 0, kept + ret > used)
    } else {
        (used, kept, false)
    }
}

/// Milliseconds until a sliding window's counts no longer matter, at `now` in window `w`.
fn sliding_reset_ms(now: i64, win: i64, w: i64, prev: i64, cur: i64) -> i64 {
    if cur > 0 {
        ceil_div((w + 2) * win - now, 1000)
    } else if prev > 0 {
        ceil_div((w + 1) * win - now, 1000)
    } else {
        0
    }
}

/// Milliseconds until a sliding window with no room left admits a token again, at `now` in
/// window `w` (`wt` ticks of `tick` microseconds long).
fn sliding_next_ms(now: i64, cap: i64, (win, tick, wt): (i64, i64, i64), w: i64, prev: i64, cur: i64) -> i64 {
    let at = if cur < cap && prev > 0 {
        // Later in this window, as the previous window's weight decays.
        w * win + win - ((cap - cur - 1) * wt / prev) * tick
    } else {
        // In the next window, where this window's count is the decaying one.
        (w + 1) * win + win - ((cap - 1) * wt / cur.max(1)) * tick
    };
    ceil_div(at - now, 1000).max(1)
}

#[allow(clippy::type_complexity)]
fn sliding_window(
    now: i64,
    l: &Limits,
    old: Option<((i64, i64, i64), i64)>,
    kept: i64,
    ret: i64,
    want: i64,
    claim_w: i64,
) -> Applied {
    let (cap, win, tick) = (l.capacity() as i64, l.period_us() as i64, l.tick_us() as i64);
    let (w, el, prev, cur, moved) = roll_window(now, win, old.map(|o| o.0));
    let wt = win / tick;
    let rem = ceil_div(win - el, tick);
    let (mut cur, revoked, state_lost) = settle_window(claim_w, w, kept, ret, cur);
    let wp = ceil_div(prev * rem, wt).min(prev);
    let room = (cap - cur - wp).max(0);
    let granted = want.min(room);
    cur += granted;
    let remaining = room - granted;
    let next = if remaining == 0 {
        sliding_next_ms(now, cap, (win, tick, wt), w, prev, cur)
    } else {
        0
    };
    let grant = Grant {
        granted: granted as u64,
        remaining: remaining as u64,
        ms_to_next_token: next as u64,
        ms_to_reset: sliding_reset_ms(now, win, w, prev, cur) as u64,
        window: w as u64,
        revoked: revoked as u64,
        state_lost,
        stale: false,
    };
    if prev == 0 && cur == 0 {
        return (Ok(grant), None);
    }
    let expires_ms = match old {
        Some((_, x)) if !moved => x,
        _ => now.div_euclid(1000) + ceil_div((w + 2) * win - now, 1000) + 1,
    };
    (
        Ok(grant),
        Some(Entry {
            state: State::Sliding { w, prev, cur },
            expires_ms,
        }),
    )
}

/// A manual clock for [`MemoryStore::with_time_source`]: microseconds since the Unix epoch,
/// moved by the test.
#[derive(Clone, Debug, Default)]
pub struct ManualTime(Arc<AtomicU64>);

impl ManualTime {
    /// A clock reading `us` microseconds.
    pub fn new(us: u64) -> Self {
        ManualTime(Arc::new(AtomicU64::new(us)))
    }

    /// The current reading.
    pub fn now_us(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the reading.
    pub fn set_us(&self, us: u64) {
        self.0.store(us, Ordering::Relaxed);
    }

    /// Moves the reading forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// This clock as a [`TimeSource`].
    pub fn source(&self) -> TimeSource {
        let t = self.clone();
        Arc::new(move || t.now_us())
    }
}
