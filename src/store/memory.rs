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

/// A token-bucket claim: `[kept, returned, wanted, seq]` (see `lua/token_bucket.lua`, which
/// this follows step for step).
fn token_bucket(node: NodeId, now: i64, l: &Limits, old: Option<(Bucket, i64)>, claim: [i64; 4]) -> Applied {
    let [kept, ret, want, seq] = claim;
    let now_ms = now.div_euclid(1000);
    let (cap, per, lease) = (l.capacity() as i64, l.period_us() as i64, l.lease_ms() as i64);
    let tau = cap * per;
    let mut ep = now_ms.div_euclid(lease);
    let is_new = old.is_none();
    let (mut b, old_expiry) = old.unwrap_or((
        Bucket {
            e: now - tau,
            ep,
            cur: 0,
            prev: 0,
            x: 0,
            nodes: Vec::new(),
        },
        0,
    ));
    let rec = b.nodes.iter().position(|n| n.node == node);
    // A claim not newer than the last one applied from this node changes nothing.
    if let Some(i) = rec {
        if seq <= b.nodes[i].seq {
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
    }
    if ep < b.ep {
        ep = b.ep;
    } else if ep > b.ep {
        // Holdings stop counting at epoch ends: those of epoch `b.ep - 1` (prev) at the end of
        // `b.ep`, those of `b.ep` (cur) at the end of the next. The store never learns when a
        // node that stopped syncing spent them, so it takes them as spent when their count
        // ends: refill accrued before that end is capped by the holdings that still counted.
        // (Without this, a node that spends its tokens late and then vanishes hands the store
        // refill for the whole time it held them.)
        let end1 = (b.ep + 1) * lease * 1000;
        b.e = b.e.max(end1 - (cap - b.cur - b.prev).max(0) * per);
        if ep >= b.ep + 2 {
            let end2 = (b.ep + 2) * lease * 1000;
            b.e = b.e.max(end2 - (cap - b.cur).max(0) * per);
        }
        b.prev = if ep == b.ep + 1 { b.cur } else { 0 };
        b.cur = 0;
    }
    let mut had = 0;
    if let Some(i) = rec {
        let Holding { epoch, amount, .. } = b.nodes[i];
        if epoch == ep {
            had = amount;
            b.cur = (b.cur - amount).max(0);
        } else if epoch == ep - 1 {
            had = amount;
            b.prev = (b.prev - amount).max(0);
        }
    }
    let kfree = kept.min(had);
    let rok = ret.min(had - kfree);
    if b.e < now - tau {
        b.e = now - tau;
    }
    let elapsed = (now - b.e).max(0);
    let mut tokens = elapsed / per;
    let mut frac = elapsed - tokens * per;
    // Refill is capped by the holdings as they stood while it accrued (this node's included):
    // a token spent late in the interval must not buy refill for the time it was still held.
    let old_room = (cap - b.cur - b.prev - had).max(0);
    if tokens >= old_room {
        tokens = old_room;
        frac = 0;
    }
    tokens += rok;
    let room = (cap - b.cur - b.prev - kfree).max(0);
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
    b.cur += held;
    b.e = now - tokens * per - frac;
    let next_us = if tokens == 0 { per - frac } else { 0 };
    let reset_us = (cap - tokens) * per - frac;
    let grant = Grant {
        granted: granted as u64,
        remaining: tokens as u64,
        ms_to_next_token: ceil_div(next_us, 1000) as u64,
        ms_to_reset: ceil_div(reset_us, 1000) as u64,
        window: 0,
        revoked: revoked as u64,
        state_lost: kept > had,
        stale: false,
    };
    if b.cur + b.prev == 0 && tokens >= cap {
        return (Ok(grant), None);
    }
    // The key lives until it is indistinguishable from a fresh one: its bucket full again,
    // counting the holdings as spent when their count ends (prev's at the end of this epoch,
    // cur's at the end of the next), as the next claim will.
    let ends = [(ep + 1, b.cur + b.prev), (ep + 2, b.cur)];
    let full_us = ends
        .iter()
        .filter(|&&(_, held)| held > 0)
        .map(|&(end, held)| end * lease * 1000 + held * per)
        .fold(b.e + tau, i64::max);
    let mut need = ceil_div(full_us, 1000);
    if b.cur + b.prev > 0 {
        need = need.max((ep + 2) * lease);
    }
    let refresh = is_new || b.x < need;
    if refresh {
        let head = (need - now_ms).max(1000);
        b.x = need + head;
    }
    // Only records that count are kept: a node that holds nothing has none, and the records
    // whose lease ran out go when the epoch moves. The script reads the other records (and so
    // drops those that count for nothing) when the epoch moves or it writes the value anew.
    let moved = b.ep != ep;
    b.ep = ep;
    let removed = rec.is_some() && held == 0;
    let own = Holding {
        node,
        epoch: ep,
        amount: held,
        seq,
    };
    match rec {
        Some(i) if held > 0 => b.nodes[i] = own,
        Some(i) => {
            b.nodes.swap_remove(i);
        }
        None if held > 0 => b.nodes.push(own),
        None => {}
    }
    if moved || refresh || removed {
        b.nodes
            .retain(|n| n.node == node || (n.amount > 0 && n.epoch >= ep - 1));
    }
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
    let (mut used, same) = match old {
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
    let mut revoked = 0;
    let mut state_lost = false;
    if claim_w == w {
        state_lost = kept + ret > used;
        used = (used - ret).max(0);
    } else {
        revoked = kept;
    }
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
    let mut w = now.div_euclid(win);
    let mut el = now - w * win;
    let (sw, mut prev, mut cur) = old.map_or((w, 0, 0), |o| o.0);
    let mut moved = true;
    if sw == w {
        moved = old.is_none();
    } else if sw + 1 == w {
        prev = cur;
        cur = 0;
    } else if sw < w {
        prev = 0;
        cur = 0;
    } else {
        w = sw;
        el = 0;
        moved = false;
    }
    let wt = win / tick;
    let rem = ceil_div(win - el, tick);
    let mut revoked = 0;
    let mut state_lost = false;
    if claim_w == w {
        state_lost = kept + ret > cur;
        cur = (cur - ret).max(0);
    } else {
        revoked = kept;
    }
    let wp = ceil_div(prev * rem, wt).min(prev);
    let room = (cap - cur - wp).max(0);
    let granted = want.min(room);
    cur += granted;
    let remaining = room - granted;
    let reset = if cur > 0 {
        ceil_div((w + 2) * win - now, 1000)
    } else if prev > 0 {
        ceil_div((w + 1) * win - now, 1000)
    } else {
        0
    };
    let mut next = 0;
    if remaining == 0 {
        let at = if cur < cap && prev > 0 {
            w * win + win - ((cap - cur - 1) * wt / prev) * tick
        } else {
            (w + 1) * win + win - ((cap - 1) * wt / cur.max(1)) * tick
        };
        next = ceil_div(at - now, 1000).max(1);
    }
    let grant = Grant {
        granted: granted as u64,
        remaining: remaining as u64,
        ms_to_next_token: next as u64,
        ms_to_reset: reset as u64,
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
