//! The store side of distributed mode: where the global state of every (policy, key) lives, and
//! the claim protocol that moves quota between it and the nodes.
//!
//! A node never asks the store "may I admit this request?". It holds *claimed* tokens per key,
//! spends them locally, and once per sync sends a batch of [`Claim`]s: per key, what it still
//! holds (`kept`), what it gives back (`returned`) and what it would like (`wanted`). The store
//! advances the key's algorithm state with its own clock, adds back what was returned, grants
//! `min(available, wanted)`, records what the node now holds, and answers with a [`Grant`].
//!
//! Two implementations behave identically (a test drives the same operations through both):
//! [`MemoryStore`] (in-process: the embedded default, tests and simulations) and `RedisStore`
//! (feature `redis`: Lua scripts in `lua/`, one per algorithm, one `EVALSHA` per batch).
//!
//! # Semantics, per algorithm
//!
//! Time is the store's clock in microseconds (Redis `TIME`); no node clock is ever used.
//!
//! * **Token bucket** (lease-tracked holdings). The bucket refills one token per
//!   [`Limits::period_us`] up to the capacity. The store records, per key and per node, what the
//!   node holds after each sync (`kept + granted`), as a *lease*: it counts until the end of the
//!   lease epoch (`floor(now_ms / lease_ms)`) after the one of the node's last sync, so between
//!   one and two lease lengths. Refill and returns are capped at `capacity - held` (all live
//!   holdings): **tokens in the store + tokens held by all nodes <= capacity** at every instant.
//!   A node that stops syncing loses its holdings when its lease ends, and the store stops
//!   counting them. A node may not keep more than the store believes it holds: the excess (for
//!   example after its lease ran out, or after the store lost its state) is claimed again from
//!   what is available, and what cannot be is [`Grant::revoked`]. Returns beyond what the node
//!   holds are ignored.
//! * **Fixed window**: `capacity` per aligned window of [`Limits::period_us`] (aligned to the
//!   Unix epoch). A grant counts as used at once; a return gives tokens back to the window.
//! * **Sliding window**: the two-counter estimate `cur + ceil(prev * (W - elapsed) / W)` (see
//!   [`Limits::tick_us`] for the rounding of very large windows); grants count in `cur` at once.
//!
//! For both window algorithms, a claim carries the window id it was granted in
//! ([`Claim::window`], from [`Grant::window`]); **a claim from a finished window is void**: its
//! returned tokens are ignored and its kept tokens are revoked (a node must drop them when its
//! window ends). Holdings need no lease there, since they die with their window.
//!
//! # Failures
//!
//! A batch fails as a whole with a [`StoreError`] (classified by [`ErrorClass`]), or succeeds
//! with one [`ClaimOutcome`] per claim, in order: a key holding data of another type
//! (`WRONGTYPE`) or a value this version cannot read ([`KeyError::Corrupt`]: nothing is
//! written to it) fails alone. After a failed or ambiguous batch a node must assume it was
//! granted nothing and that everything it returned is gone. Such a batch may still be applied
//! later (a call that timed out still runs on an old connection): token-bucket claims carry the
//! node's sync number ([`Claim::seq`]), and the store ignores a claim that is not newer than
//! the last one it applied from that node ([`Grant::stale`]); window claims need no such guard.
//!
//! # Implementing a store
//!
//! [`Store`] is the extension point for another backend: the claim protocol above (its types
//! are this module's) is what a node relies on for its bound, so an implementation must give
//! exactly [`MemoryStore`]'s replies to every sequence of claims. The repository checks the
//! Lua scripts that way (`tests/store_differential.rs` drives both with the same random
//! sequences and compares every reply and the state sizes); a new store should pass the same
//! test before it is trusted with a bound.
//!
//! # State size
//!
//! A token bucket's state holds one record per node that holds tokens of the key under a
//! lease that has not run out: a record goes when its holding drops to 0, and the records whose
//! lease ran out go when the lease epoch moves. So it is bounded by the nodes that hold the
//! key, not by every node that ever synced it (node ids are random per process).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::policy::{Algorithm, Policy};

mod keys;
mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
#[doc(hidden)]
pub use self::redis::decode_reply_resp;
/// The Redis Cluster hash slot of a key (CRC16 of its hash tag): for tests that place keys.
#[cfg(feature = "redis")]
#[doc(hidden)]
pub use self::redis::key_slot;
#[cfg(feature = "redis")]
pub use self::redis::{ClusterStats, RedisClusterStore, RedisConfig, RedisStore};
pub use keys::{KeyConfigError, KeyEncoder, StoreKey};
pub use memory::{ManualTime, MemoryStore, TimeSource};

/// Identifies a node (one process that links tollgate) to the store. Pick it at random when the
/// process starts, so that a restarted process is a new node.
pub type NodeId = u64;

/// The largest number the store arithmetic handles: every value stays below 2^53, so that the
/// Lua scripts (whose numbers are doubles) compute exactly.
pub const MAX_STORE_NUMBER: u64 = (1 << 53) - 1;

/// The largest `capacity x period` (microseconds) a token bucket may have in the store.
const MAX_SPAN_US: u64 = 1 << 52;

/// The most claims one script call carries; larger batches are split.
pub const MAX_KEYS_PER_CALL: usize = 1000;

/// The longest lease a token-bucket policy may have.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The algorithm the store runs for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreAlgorithm {
    /// Token bucket with lease-tracked holdings.
    TokenBucket,
    /// Fixed window aligned to the Unix epoch.
    FixedWindow,
    /// Two-counter sliding window.
    SlidingWindow,
}

/// A policy as the store sees it: integer constants only, validated so that every number the
/// scripts compute stays exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limits {
    algorithm: StoreAlgorithm,
    capacity: u64,
    period_us: u64,
    lease_ms: u64,
    tick_us: u64,
}

/// Why a policy cannot be used with the store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// The capacity is 0 or above 2^32 - 1.
    #[error("capacity must be in 1..=4294967295, got {0}")]
    Capacity(u64),
    /// `points` is 0.
    #[error("points must be > 0")]
    Points,
    /// The window is shorter than 1 ms or longer than a year.
    #[error("window must be between 1 ms and 366 days")]
    Window,
    /// A full token bucket would take longer than 2^52 us (about 142 years) to refill.
    #[error("capacity x time per token exceeds 2^52 us (about 142 years)")]
    Span,
    /// The lease is shorter than 1 ms or longer than [`MAX_LEASE`].
    #[error("lease must be between 1 ms and 24 h")]
    Lease,
}

fn ceil_us(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1000).min(u128::from(u64::MAX)) as u64
}

impl Limits {
    /// A token bucket holding at most `capacity` tokens and refilling `points` per `duration`
    /// (one token per `ceil(duration / points)`, rounded up to a whole microsecond, so never
    /// faster than the policy). `lease` is how long the store keeps counting a node's holdings
    /// after its last sync (between one and two times this); use a few sync intervals.
    pub fn token_bucket(capacity: u64, points: u64, duration: Duration, lease: Duration) -> Result<Self, LimitsError> {
        check_capacity(capacity)?;
        if points == 0 {
            return Err(LimitsError::Points);
        }
        if duration < crate::consts::MIN_DURATION || duration > crate::consts::MAX_DURATION {
            return Err(LimitsError::Window);
        }
        let period_us = (duration.as_nanos().div_ceil(u128::from(points) * 1000)).max(1);
        if u128::from(capacity) * period_us > u128::from(MAX_SPAN_US) {
            return Err(LimitsError::Span);
        }
        let lease_ms = lease.as_millis();
        if lease_ms == 0 || lease > MAX_LEASE {
            return Err(LimitsError::Lease);
        }
        Ok(Limits {
            algorithm: StoreAlgorithm::TokenBucket,
            capacity,
            period_us: period_us as u64,
            lease_ms: lease_ms as u64,
            tick_us: 1,
        })
    }

    /// At most `capacity` per aligned window of `window` (rounded up to a whole microsecond).
    pub fn fixed_window(capacity: u64, window: Duration) -> Result<Self, LimitsError> {
        Self::window(StoreAlgorithm::FixedWindow, capacity, window)
    }

    /// At most `capacity` per sliding `window` (two-counter approximation).
    pub fn sliding_window(capacity: u64, window: Duration) -> Result<Self, LimitsError> {
        Self::window(StoreAlgorithm::SlidingWindow, capacity, window)
    }

    fn window(algorithm: StoreAlgorithm, capacity: u64, window: Duration) -> Result<Self, LimitsError> {
        check_capacity(capacity)?;
        if window < crate::consts::MIN_DURATION || window > crate::consts::MAX_DURATION {
            return Err(LimitsError::Window);
        }
        let period_us = ceil_us(window);
        // The sliding estimate multiplies a count by a part of the window: keep it below 2^52.
        let tick_us = match algorithm {
            StoreAlgorithm::SlidingWindow => {
                (u128::from(capacity) * u128::from(period_us)).div_ceil(1 << 51).max(1) as u64
            }
            _ => 1,
        };
        Ok(Limits {
            algorithm,
            capacity,
            period_us,
            lease_ms: 0,
            tick_us,
        })
    }

    /// The store form of a [`Policy`]: its algorithm, capacity (`burst` for a token bucket) and
    /// rate. `lease` is used by the token bucket only. `block_duration` is not a store concern.
    pub fn from_policy(policy: &Policy, lease: Duration) -> Result<Self, LimitsError> {
        match policy.get_algorithm() {
            Algorithm::TokenBucket => Self::token_bucket(policy.capacity(), policy.points(), policy.duration(), lease),
            Algorithm::FixedWindow => Self::fixed_window(policy.points(), policy.duration()),
            Algorithm::SlidingWindow => Self::sliding_window(policy.points(), policy.duration()),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> StoreAlgorithm {
        self.algorithm
    }

    /// The most tokens the key can have at once (bucket size, or points per window).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Token bucket: microseconds per token. Windows: the window length in microseconds.
    pub fn period_us(&self) -> u64 {
        self.period_us
    }

    /// Token bucket: the lease length in milliseconds (0 for windows).
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Sliding window: the granularity (microseconds) of the previous window's weight; 1 unless
    /// `capacity x window` exceeds 2^51 us, in which case the weight is rounded up to this tick.
    pub fn tick_us(&self) -> u64 {
        self.tick_us
    }

    /// Clamps a node-supplied count to what the arithmetic accepts.
    fn clamp(&self, n: u64) -> u64 {
        n.min(self.capacity)
    }
}

fn check_capacity(capacity: u64) -> Result<(), LimitsError> {
    if capacity == 0 || capacity > crate::consts::MAX_CAPACITY {
        return Err(LimitsError::Capacity(capacity));
    }
    Ok(())
}

/// One key's part of a sync: what the node holds, gives back and would like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The encoded store key (see [`KeyEncoder`]).
    pub key: StoreKey,
    /// The key's policy.
    pub limits: Limits,
    /// Claimed tokens the node still holds and keeps (clamped to the capacity).
    pub kept: u64,
    /// Claimed tokens the node gives back, unused (clamped to the capacity).
    pub returned: u64,
    /// Tokens the node would like to hold in addition to `kept` (clamped to the capacity).
    pub wanted: u64,
    /// Window algorithms: the window id the kept and returned tokens were granted in (the
    /// [`Grant::window`] of the grant); any other value voids them. Ignored by the token bucket.
    pub window: u64,
    /// The sender's sequence number for this key, in `1..2^53` (larger values are clamped):
    /// strictly greater than that of every earlier claim the same node sent for the key (a
    /// node numbers its syncs and every claim of one sync carries that number).
    ///
    /// **Token bucket.** The store records, with each node's holding, the number of the last
    /// claim it applied from that node; a claim whose number is not greater changes nothing
    /// (neither the state nor the key's TTL) and is answered [`Grant::stale`]. Such a claim is
    /// one that timed out and reached the store after a newer one (for example on an old
    /// connection), or a resend: applied, its `kept` would overwrite what the newer claim
    /// recorded while the node still holds the newer grant, and its `returned` would go back
    /// to the bucket a second time.
    ///
    /// A record is dropped only when it counts for nothing: when the node's holding drops to 0,
    /// or when its lease has run out (it is older than the previous lease epoch) and the epoch
    /// moves. A late claim from a node without a record is applied like a first claim, and that
    /// can only make the store count more than the node holds: it returns nothing (there is no
    /// holding to return from), and what it keeps or is granted is recorded as held by the
    /// node, which never receives it (its call failed or timed out, so the node took it as
    /// granting nothing, and it holds nothing the store counts: a holding of 0, or tokens whose
    /// lease ran out, which it no longer spends). The store then admits less, until the node's
    /// next claim says what it really holds (the rest counts as spent) or the lease runs out.
    ///
    /// **Windows** keep no per-node state and ignore `seq`: a late claim can only return
    /// tokens the node already gave up (and never returns again), or be granted tokens the
    /// node never receives. Neither lets a window admit more than its capacity.
    pub seq: u64,
}

/// The store's answer for one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Grant {
    /// Tokens granted to the node now, in addition to what it kept.
    pub granted: u64,
    /// Tokens left in the store after this grant (available to any node).
    pub remaining: u64,
    /// When `remaining` is 0: milliseconds until the store expects to have a token again
    /// (0 otherwise). A node can deny the key locally until then at no store cost.
    pub ms_to_next_token: u64,
    /// Milliseconds until the key would be back to a fresh key's quota if nothing more were
    /// taken (token bucket: full; windows: the end of the window(s) whose counts still matter).
    pub ms_to_reset: u64,
    /// Window algorithms: the id of the window this grant belongs to (0 for the token bucket).
    /// The window ends `ms_to_reset` after the store's time (fixed window).
    pub window: u64,
    /// Tokens of `kept` the store does not accept: the node must remove them from what it holds.
    /// Non-zero after a lease ran out (token bucket) or a window ended (windows).
    pub revoked: u64,
    /// The store knew of fewer tokens held by this node than the claim says it holds (token
    /// bucket: its holding record is gone; windows: the window's count is below what this node
    /// alone holds and returns): the store lost state (restart, eviction, failover) while the
    /// node's claim was valid. Nothing is refunded: the node keeps what the store accepts.
    pub state_lost: bool,
    /// The claim was older than one the store had already applied from this node for this key
    /// (see [`Claim::seq`]): it changed nothing, and every number of this grant is 0.
    pub stale: bool,
}

/// The store's answer to a heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    /// Live nodes in the registry, this one included; 0 when the registry could not be read
    /// though the store works (a cluster whose registry master is down): keep the last count.
    pub live_nodes: u64,
    /// Identifies the server process (a hash of Redis `run_id`): a change means the store
    /// restarted, and may have lost its state. 0 when the store cannot tell (a cluster, whose
    /// masters each have their own).
    pub server: u64,
}

/// A failure that concerns one key of a batch; the other keys proceed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key holds data of another type (Redis `WRONGTYPE`): something else wrote it.
    #[error("key holds another type: {0}")]
    WrongType(String),
    /// The key holds a value this version cannot read: another algorithm's state, an older
    /// layout, or numbers the arithmetic cannot take (NaN, infinite, fractional, negative,
    /// 2^53 or more). Nothing is written to it; the other keys of the batch proceed.
    #[error("key holds a value that is not tollgate state")]
    Corrupt,
    /// Another error for this key alone.
    #[error("store error for this key: {0}")]
    Other(String),
    /// The call that carried this key failed as a whole while other calls of the batch
    /// succeeded (Redis Cluster: its master is down or unreachable, its slot is not served, or
    /// the user may not touch the key). The claim may or may not have been applied: the node
    /// treats it like a failed batch for this key alone.
    #[error("the store call for this key failed: {0}")]
    Unavailable(StoreError),
}

/// The outcome for one claim of a batch.
pub type ClaimOutcome = Result<Grant, KeyError>;

/// What kind of failure a [`StoreError`] is, and so what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// I/O, timeout, connection refused or dropped, `LOADING`, `BUSY`, `TRYAGAIN`,
    /// `CLUSTERDOWN`, `MASTERDOWN`: retry at the next sync.
    Transient,
    /// `READONLY`, `MOVED`, `ASK`, `CROSSSLOT`: the topology changed or the keys are misrouted.
    Topology,
    /// `NOAUTH`, `WRONGPASS`, `NOPERM`, bad URL or TLS setup, a TLS certificate refused
    /// (unknown CA, wrong host name, client certificate refused): fix the configuration.
    Config,
    /// `OOM`: the server is out of memory.
    Resource,
    /// A reply of a shape this version does not understand, or a script error.
    Protocol,
}

/// A failure of a whole store call. The call may or may not have been applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError {
    class: ErrorClass,
    message: String,
}

impl StoreError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        StoreError {
            class,
            message: message.into(),
        }
    }

    /// No reply within the sync timeout `after` (transient).
    pub(crate) fn timed_out(after: Duration) -> Self {
        StoreError::new(
            ErrorClass::Transient,
            format!("no reply within the sync timeout ({} ms)", after.as_millis()),
        )
    }

    /// The class of the failure.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The description (never contains key names).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True for failures worth retrying at the next sync without other action.
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }

    /// Classifies a Redis error code (the first word of an error reply).
    pub fn from_code(code: &str, message: impl Into<String>) -> Self {
        StoreError::new(classify_code(code), message)
    }
}

/// The class of a Redis error code.
pub(crate) fn classify_code(code: &str) -> ErrorClass {
    match code {
        "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "NOSCRIPT" => ErrorClass::Transient,
        "READONLY" | "MOVED" | "ASK" | "CROSSSLOT" => ErrorClass::Topology,
        "NOAUTH" | "WRONGPASS" | "NOPERM" => ErrorClass::Config,
        "OOM" => ErrorClass::Resource,
        _ => ErrorClass::Protocol,
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store error ({:?}): {}", self.class, self.message)
    }
}

impl std::error::Error for StoreError {}

/// A boxed future returned by [`Store`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where the global state lives. Object-safe: the sync task holds an `Arc<dyn Store>`.
pub trait Store: Send + Sync {
    /// Applies one sync's claims of `node` and answers one outcome per claim, in order.
    /// Claims may mix algorithms and policies; a key should appear at most once per batch.
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>>;

    /// [`claim`](Self::claim) within `timeout` (what a node calls, with its sync timeout). A
    /// store that sends several calls (a cluster) answers what it has when the time is up,
    /// failing only the calls still out ([`KeyError::Unavailable`]); the default fails the
    /// whole batch. An override must keep to `timeout`: the node does not bound it again.
    fn claim_within<'a>(
        &'a self,
        node: NodeId,
        claims: &'a [Claim],
        timeout: Duration,
    ) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.claim(node, claims)).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::timed_out(timeout)),
            }
        })
    }

    /// Registers `node` as alive for `ttl` (at least 1 ms) in the registry `registry` (see
    /// [`KeyEncoder::registry_key`]) and answers the number of live nodes, this one included,
    /// and the server's identity.
    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat>;

    /// Removes `node` from the registry (on graceful shutdown).
    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()>;

    /// Drops the connection and connects afresh (after a [`ErrorClass::Topology`] error: the
    /// server became a replica, or the key moved). The default does nothing.
    fn reconnect(&self) {}
}

/// Values shared by both implementations: the numbers a claim is clamped to (kept, returned,
/// wanted, window, seq).
pub(crate) fn clamped(c: &Claim) -> (u64, u64, u64, u64, u64) {
    let l = &c.limits;
    (
        l.clamp(c.kept),
        l.clamp(c.returned),
        l.clamp(c.wanted),
        c.window.min(MAX_STORE_NUMBER),
        c.seq.min(MAX_STORE_NUMBER),
    )
}

#[cfg(test)]
mod tests;
