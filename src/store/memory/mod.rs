//! [`MemoryStore`]: the store semantics in-process, step for step the arithmetic of the Lua
//! scripts (every value is an integer below 2^53 there, so `i64` here gives the same answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use self::bucket::token_bucket;
use self::state::{Entry, State, BUCKET_HEADER_LEN, BUCKET_RECORD_LEN, SLIDING_LEN};
use self::window::{fixed_window, sliding_window};

mod bucket;
mod state;
mod window;

use super::{clamped, Claim, ClaimOutcome, Heartbeat, KeyError, NodeId, Store, StoreAlgorithm, StoreFuture, StoreKey};

/// A source of the store's time in microseconds since the Unix epoch.
pub type TimeSource = Arc<dyn Fn() -> u64 + Send + Sync>;

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
