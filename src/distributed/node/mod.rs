//! The node: one process's link to the store, and its sync task.
//!
//! [`Node`] is the handle; [`NodeInner`] the state its sync task and its limiters share. The
//! settings and the timings derived from them are in `builder`, the sync task and one sync in
//! `sync`, the counters in `stats`. A limiter takes part in syncs as a [`Member`].

mod builder;
mod stats;
mod sync;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Weak;
use std::time::Duration;

use parking_lot::Mutex;

use super::breaker::{Breaker, CircuitState};
use crate::clock::Clock;
use crate::store::{Claim, ClaimOutcome, KeyEncoder, NodeId, Store, StoreKey};

pub(crate) use builder::SyncTiming;
pub use builder::{ColdStart, FailurePolicy, NodeBuilder, NodeError};
use stats::Counters;
pub use stats::NodeStats;

/// One process's link to the store: it runs the sync task that exchanges quota for every
/// limiter built on it ([`LimiterBuilder::node`](crate::LimiterBuilder::node)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tollgate::{store::MemoryStore, Limiter, Node, Policy};
///
/// let node = Node::builder(Arc::new(MemoryStore::new()))
///     .sync_interval(Duration::from_millis(50))
///     .start()
///     .unwrap();
/// let limiter: Limiter = Limiter::builder(Policy::per_second(100)).name("api").node(&node).build().unwrap();
/// // The first check of a key waits for its first claim.
/// assert!(limiter.check_async("client-1").await.is_allowed());
/// node.shutdown().await; // returns unused claims to the store
/// # }
/// ```
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// This node's identity in the store and its registry: random per process, or derived from
    /// [`NodeBuilder::id`] and a random per-process part.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The sync interval.
    pub fn sync_interval(&self) -> Duration {
        self.inner.timing.interval()
    }

    /// Counters of sync activity and health.
    pub fn stats(&self) -> NodeStats {
        self.inner.stats()
    }

    /// The circuit breaker's state.
    pub fn circuit(&self) -> CircuitState {
        self.inner.breaker.state()
    }

    /// Time since the last sync that reached the store without error (`None` before the
    /// first one).
    pub fn last_successful_sync_age(&self) -> Option<Duration> {
        let at = self.inner.last_success.load(Ordering::Acquire);
        (at != 0).then(|| Duration::from_nanos(self.inner.clock.now_ns().saturating_sub(at)))
    }

    /// The failure policy checks use while the circuit is open.
    pub fn failure_policy(&self) -> FailurePolicy {
        self.inner.failure_policy
    }

    /// True when a key asked for an early sync since the last one.
    pub fn wants_priority_sync(&self) -> bool {
        self.inner.priority.load(Ordering::Relaxed)
    }

    /// Runs one sync now: every limiter's claims, in batches. The sync task calls this every
    /// interval; a node built with [`NodeBuilder::build_manual`] is driven by calling it.
    pub async fn sync_once(&self) {
        self.inner.sync(false).await;
    }

    /// Stops the sync task, returns every unused claim to the store and leaves the node
    /// registry. Checks after this deny keys that hold nothing.
    pub async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.stop.notify_one();
        let task = self.inner.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.inner.sync(true).await;
        let leave = self.inner.store.leave(&self.inner.registry, self.inner.id);
        let _ = tokio::time::timeout(self.inner.timing.sync_timeout(), leave).await;
    }
}

/// A limiter's side of a sync: claims for its keys, and what to do with the answers.
///
/// One round of claims is in flight at a time (the node's sync lock serializes rounds): a
/// member keeps which keys its claims of the round are for, and `apply` finds them there. A
/// round that never settles (its call was dropped at a waiting check's deadline, or the sync
/// task panicked) leaves them to be replaced by the next `prepare`: its outcomes are unknown,
/// taken as granting nothing.
pub(crate) trait Member: Send + Sync {
    /// Adds one claim per key worth syncing. With `drain`, every held token is returned and
    /// nothing is wanted. Every claim carries `seq`, this round's number (see [`Claim::seq`]).
    fn prepare(&self, now: u64, drain: bool, seq: u64, out: &mut Vec<Claim>);
    /// Like `prepare`, for the keys waiting checks asked for since the last call (a claim on
    /// demand): one claim per such key, carrying what they asked for.
    fn prepare_asked(&self, now: u64, seq: u64, out: &mut Vec<Claim>);
    /// Applies the outcomes of the claims the last `prepare` or `prepare_asked` added, in
    /// their order (`None`: the batch failed).
    fn apply(&self, sent_at: u64, outcomes: &[Option<ClaimOutcome>], report: &mut ApplyReport);
    /// Its limiter is gone (a round in flight may still hold it).
    fn retired(&self) -> bool;
    /// Claimed tokens held now, over all keys.
    #[cfg(feature = "metrics")]
    fn held(&self) -> u64;
}

/// What a sync's outcomes showed beyond the grants.
#[derive(Default)]
pub(crate) struct ApplyReport {
    /// Keys whose claim failed alone.
    pub(crate) key_errors: u64,
    /// The first such failure's message.
    pub(crate) first_key_error: Option<String>,
    /// Keys that held less in the store than this node's valid claim.
    pub(crate) state_lost: u64,
    /// Claims the store answered as stale.
    pub(crate) stale: u64,
}

/// The state a node's handle, its sync task and its limiters share. Its fields are private to
/// the node, and the limiters' keys read what they need through the methods below; four stay
/// visible to the crate because the limiter reads them: `clock`, `sync_interval`, `lease` and
/// `degraded_ever`.
pub(crate) struct NodeInner {
    /// The store identity: unique per process (see [`NodeBuilder::id`]).
    id: NodeId,
    /// The number of the last round of claims (0 before the first): every claim carries its
    /// round's number.
    seq: AtomicU64,
    store: Arc<dyn Store>,
    /// Every timing, derived from the settings once.
    timing: SyncTiming,
    batch_size: usize,
    cold_start: ColdStart,
    encoder: KeyEncoder,
    headroom_percent: u64,
    /// The clock checks and leases are timed with (limiters on this node use it too).
    clock: Clock,
    failure_policy: FailurePolicy,
    breaker: Breaker,
    expected_nodes: u64,
    registry: StoreKey,
    /// The budget of calls on demand per second (`None`: every claim waits for a sync).
    on_demand_budget: Option<crate::algorithm::Rule>,
    /// The budget's state.
    on_demand_spent: crate::local::cell::Cell,
    /// Some limiter has keys asked for on demand, not yet sent.
    asked: AtomicBool,
    /// The failure policy has answered on this node (the circuit opened, or the store failed
    /// a key alone): a refund without its decision can no longer tell claimed tokens from a
    /// share's ([`Limiter::refund`](crate::Limiter::refund)).
    degraded_ever: AtomicBool,
    members: Mutex<Vec<(&'static str, Weak<dyn Member>)>>,
    /// Some key asked for an early sync since the last one.
    priority: AtomicBool,
    wake: tokio::sync::Notify,
    /// Notified at the end of every sync and call on demand.
    synced: tokio::sync::Notify,
    stop: tokio::sync::Notify,
    stopped: AtomicBool,
    /// Held by every round of claims, from gathering to settling.
    sync_lock: tokio::sync::Mutex<()>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    last_heartbeat: AtomicU64,
    last_sync: AtomicU64,
    /// Clock time of the last sync that reached the store without error (0: none yet).
    last_success: AtomicU64,
    /// The server identity of the last heartbeat (0: none yet).
    server: AtomicU64,
    /// Whether the last sync saw per-key errors (one log line per incident).
    key_errors_seen: AtomicBool,
    /// Jitter source for the breaker's backoff.
    rng: AtomicU64,
    counters: Counters,
    live_nodes: AtomicU64,
    /// Clock time of the last metrics publication by this node's syncs.
    #[cfg(feature = "metrics")]
    last_publish: AtomicU64,
}

impl NodeInner {
    /// Adds a limiter's keys to every sync; fails when a live limiter of this node already
    /// uses `namespace`.
    pub(crate) fn register(&self, namespace: &'static str, member: Weak<dyn Member>) -> Result<(), String> {
        let mut members = self.members.lock();
        // A member whose limiter is gone no longer holds its namespace, even while a round in
        // flight still holds the member.
        members.retain(|(_, m)| m.upgrade().is_some_and(|m| !m.retired()));
        if members.iter().any(|(n, _)| *n == namespace) {
            return Err(format!(
                "a limiter with the same name and policy ({namespace}) already runs on this node"
            ));
        }
        members.push((namespace, member));
        Ok(())
    }

    /// The timings derived from the node's settings.
    /// The clock checks and leases are timed with.
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// True once the failure policy has answered on this node.
    pub(crate) fn degraded_ever(&self) -> bool {
        self.degraded_ever.load(Ordering::Acquire)
    }

    pub(crate) fn timing(&self) -> &SyncTiming {
        &self.timing
    }

    /// What the synchronous check does for a key with no claim yet.
    pub(crate) fn cold_start(&self) -> ColdStart {
        self.cold_start
    }

    /// What checks do while the circuit is open.
    pub(crate) fn failure_policy(&self) -> FailurePolicy {
        self.failure_policy
    }

    /// How store keys are named.
    pub(crate) fn encoder(&self) -> &KeyEncoder {
        &self.encoder
    }

    /// How much a key claims relative to its demand per interval, in percent.
    pub(crate) fn headroom_percent(&self) -> u64 {
        self.headroom_percent
    }

    /// The circuit breaker.
    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// How long a check the failure policy denied at `now` is told to wait (ns): until the
    /// circuit's open time ends, at least a tenth of the sync interval, at least 1.
    pub(crate) fn retry_hint(&self, now: u64) -> u64 {
        self.breaker
            .open_until()
            .saturating_sub(now)
            .max(self.timing.retry_floor_ns())
            .max(1)
    }

    /// How long a check waits for a claim on demand at most (see [`SyncTiming::claim_wait`]).
    pub(crate) fn claim_wait_bound(&self) -> Duration {
        self.timing.claim_wait()
    }

    /// How many nodes [`FailurePolicy::LocalShare`] divides a limit by.
    pub(crate) fn share_divisor(&self) -> u64 {
        self.live_nodes.load(Ordering::Relaxed).max(self.expected_nodes).max(1)
    }

    /// Records that the failure policy has answered on this node.
    pub(crate) fn mark_degraded(&self) {
        self.degraded_ever.store(true, Ordering::Release);
    }

    /// Counts cost admitted by [`FailurePolicy::FailOpen`].
    pub(crate) fn count_fail_open(&self, cost: u64) {
        self.counters.fail_open_admitted.fetch_add(cost, Ordering::Relaxed);
    }

    /// The node has shut down (or is shutting down).
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Asks for an early sync (coalesced: one flag, one wake-up until the next sync).
    #[inline]
    pub(crate) fn request_priority(&self) {
        if !self.priority.load(Ordering::Relaxed) && !self.priority.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// A limiter queued a key for a claim on demand.
    #[inline]
    pub(crate) fn asked(&self) {
        self.asked.store(true, Ordering::Release);
    }
}
