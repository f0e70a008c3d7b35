//! Building a node: its settings, their validation, and the timings derived from them.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::super::breaker::Breaker;
use super::stats::Counters;
use super::sync::spawn;
use super::{Node, NodeInner};
use crate::clock::Clock;
use crate::consts::{
    DEFAULT_CLAIMS_ON_DEMAND_PER_SECOND, DEFAULT_SYNC_INTERVAL, HEARTBEAT_TTL_PERIODS, LEASE_INTERVALS,
    MAX_NODE_TIMING, MIN_CLAIM_SPAN, MIN_CONNECT_TIMEOUT, MIN_DEFAULT_LEASE, MIN_DEFAULT_SYNC_TIMEOUT,
    MIN_HEARTBEAT_PERIOD, MIN_NODE_TIMING, MIN_PROBE_TIMEOUT, MIN_SYNC_GAP,
};
use crate::store::{ErrorClass, KeyEncoder, NodeId, Store, StoreError, MAX_KEYS_PER_CALL};

/// What the synchronous check does for a key this node holds no claim for yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColdStart {
    /// Deny until the first claim arrives (with the next sync; a second denial before it asks
    /// for an early one). Over-admission stays 0. The async check
    /// ([`Limiter::check_async`](crate::Limiter::check_async)) claims on demand and waits for
    /// that claim instead of denying.
    #[default]
    Deny,
    /// Admit up to `n` units before the first claim arrives; they are paid back from the first
    /// grants. Each node can over-admit a newly seen key by at most `n`.
    Optimistic(u64),
}

/// What checks do while the store is unreachable (the circuit is open), once the tokens this
/// node already holds are spent. Held tokens stay usable in every policy, and no check ever
/// waits for the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Each node enforces its share of the limit on its own: the policy with its capacity
    /// divided by the live nodes last seen in the registry (at least
    /// [`NodeBuilder::expected_nodes`]), its rate too for a token bucket. All nodes together
    /// admit at most `limit x actual nodes / nodes last seen` per window. A key whose share
    /// rounds down to 0 is denied. The default.
    #[default]
    LocalShare,
    /// Admit everything (opt-in). Each admission is counted in [`NodeStats::fail_open_admitted`](crate::node::NodeStats::fail_open_admitted)
    /// and the opening of the circuit is logged as a warning.
    FailOpen,
    /// Deny everything held tokens do not cover.
    FailClosed,
}

impl FailurePolicy {
    /// The policy's name in configuration files (`local_share`, `fail_open`, `fail_closed`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::LocalShare => "local_share",
            FailurePolicy::FailOpen => "fail_open",
            FailurePolicy::FailClosed => "fail_closed",
        }
    }
}

/// Why a node could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// `start` was called outside a tokio runtime.
    #[error("a node's sync task needs a tokio runtime: call start() inside one, or use build_manual()")]
    NoRuntime,
    /// A setting is out of range: which one, and the range it must be in.
    #[error("{setting}: {requirement}")]
    Config {
        /// The builder method's name (`sync_interval`, `lease`, `batch_size`, ...).
        setting: &'static str,
        /// What the setting must be.
        requirement: String,
    },
    /// [`NodeBuilder::connect`]: the store refused this node's credentials or permissions.
    #[error("the store refused this node: {0}")]
    Store(StoreError),
}

/// The error of a setting out of its range.
fn out_of_range(setting: &'static str, requirement: impl Into<String>) -> NodeError {
    NodeError::Config {
        setting,
        requirement: requirement.into(),
    }
}

/// Configures a [`Node`].
pub struct NodeBuilder {
    store: Arc<dyn Store>,
    sync_interval: Duration,
    batch_size: usize,
    lease: Option<Duration>,
    cold_start: ColdStart,
    encoder: KeyEncoder,
    headroom_percent: u64,
    clock: Clock,
    id: Option<NodeId>,
    failure_policy: FailurePolicy,
    failure_threshold: u32,
    open_backoff: Option<(Duration, Duration)>,
    sync_timeout: Option<Duration>,
    expected_nodes: u64,
    on_demand_per_second: u64,
}

impl Node {
    /// Starts configuring a node on `store`.
    pub fn builder(store: Arc<dyn Store>) -> NodeBuilder {
        NodeBuilder {
            store,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            batch_size: 1000,
            lease: None,
            cold_start: ColdStart::default(),
            encoder: KeyEncoder::default(),
            headroom_percent: 200,
            clock: Clock::precise(),
            id: None,
            failure_policy: FailurePolicy::default(),
            failure_threshold: 3,
            open_backoff: None,
            sync_timeout: None,
            expected_nodes: 1,
            on_demand_per_second: DEFAULT_CLAIMS_ON_DEMAND_PER_SECOND,
        }
    }
}

impl NodeBuilder {
    /// How often the node syncs (default 100 ms; from 1 ms to 1 h). Keys that run low sync
    /// sooner, at most once per tenth of this.
    pub fn sync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    /// The most keys in one store call (default 1000).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// How long claimed token-bucket tokens stay usable after the sync that granted them
    /// (default `max(4 x sync_interval, 1 s)`). The store counts them for one to two leases.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// What the synchronous check does before a key's first claim (default `Deny`).
    pub fn cold_start(mut self, cold_start: ColdStart) -> Self {
        self.cold_start = cold_start;
        self
    }

    /// How store keys are named (prefix, hashing secret).
    pub fn key_encoder(mut self, encoder: KeyEncoder) -> Self {
        self.encoder = encoder;
        self
    }

    /// How much a key claims relative to its demand per interval, in percent (default 200).
    pub fn headroom_percent(mut self, percent: u64) -> Self {
        self.headroom_percent = percent;
        self
    }

    /// The clock checks and leases are timed with (default [`Clock::precise`]: a claimed
    /// token's validity ends a few milliseconds before the store stops counting it, a margin a
    /// stalled cached clock could overrun). Limiters on this node use it too.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Derives the node's identity from `id` (default: random). The store identity
    /// ([`Node::id`]) always has a random per-process part as well: two live processes started
    /// with the same id are two nodes to the store (each with its own holdings, each counted
    /// in the registry), never one node whose holdings they overwrite; a restarted process is
    /// a new node.
    pub fn id(mut self, id: NodeId) -> Self {
        self.id = Some(id);
        self
    }

    /// What checks do while the store is unreachable (default [`FailurePolicy::LocalShare`]).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Failed or timed-out syncs in a row that open the circuit (default 3). A configuration
    /// error (`NOAUTH`, `WRONGPASS`, `NOPERM`) opens it at once.
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures;
        self
    }

    /// How long the circuit stays open before a probe: `min` after it opens, doubling with
    /// each failed probe up to `max`, less up to a quarter of random jitter (never below
    /// `min`). A configuration error keeps it open for `max`. Default: half and one and a half
    /// sync intervals, so syncing resumes within two intervals of the store coming back.
    pub fn open_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.open_backoff = Some((min, max));
        self
    }

    /// The longest a sync's store call may take before it counts as failed (its outcome is
    /// then unknown, and taken as granting nothing). Default `max(sync_interval, 250 ms)`: a
    /// batch of many keys on a busy server is not a failure. A probe (one small heartbeat) is
    /// allowed `min(sync_timeout, max(sync_interval / 2, 50 ms))`, so that with the default
    /// backoff syncing resumes within two intervals (from 100 ms up) of the store answering
    /// again.
    pub fn sync_timeout(mut self, timeout: Duration) -> Self {
        self.sync_timeout = Some(timeout);
        self
    }

    /// The fewest nodes [`FailurePolicy::LocalShare`] divides a limit by (default 1): set it to
    /// the number of instances you run, so that a node that starts while the store is down
    /// (and has never seen the registry) does not take the whole limit.
    pub fn expected_nodes(mut self, nodes: u64) -> Self {
        self.expected_nodes = nodes;
        self
    }

    /// The most store calls per second this node makes on demand, for checks that wait for a
    /// claim ([`Limiter::check_async`](crate::Limiter::check_async) on a key whose held tokens
    /// do not cover it); default 500, a tenth of it at once. One call carries every key asked
    /// for since the previous call, so a flood of new keys makes larger calls, not more of
    /// them. Past the budget such claims go with the next sync (counted in
    /// [`NodeStats::claims_on_demand_deferred`](crate::node::NodeStats::claims_on_demand_deferred)); 0 sends them all with the syncs.
    pub fn claims_on_demand_per_second(mut self, calls: u64) -> Self {
        self.on_demand_per_second = calls;
        self
    }

    /// Checks the settings other than the timings.
    fn check(&self) -> Result<(), NodeError> {
        if self.batch_size == 0 || self.batch_size > MAX_KEYS_PER_CALL {
            return Err(out_of_range(
                "batch_size",
                format!("must be in 1..={MAX_KEYS_PER_CALL}"),
            ));
        }
        if !(100..=10_000).contains(&self.headroom_percent) {
            return Err(out_of_range("headroom_percent", "must be in 100..=10000"));
        }
        if self.failure_threshold == 0 {
            return Err(out_of_range("failure_threshold", "must be > 0"));
        }
        if self.expected_nodes == 0 {
            return Err(out_of_range("expected_nodes", "must be > 0"));
        }
        Ok(())
    }

    /// The budget of calls on demand per second (`None`: every claim waits for a sync).
    fn on_demand_budget(&self) -> Result<Option<crate::algorithm::Rule>, NodeError> {
        match self.on_demand_per_second {
            0 => Ok(None),
            n => crate::policy::Policy::per_second(n)
                .burst((n / 10).max(1))
                .compile()
                .map(Some)
                .map_err(|e| out_of_range("claims_on_demand_per_second", e.reason)),
        }
    }

    fn inner(self) -> Result<Arc<NodeInner>, NodeError> {
        let timing = SyncTiming::new(self.sync_interval, self.lease, self.open_backoff, self.sync_timeout)?;
        self.check()?;
        let on_demand_budget = self.on_demand_budget()?;
        let id = match self.id {
            // The per-process part: see `NodeBuilder::id`.
            Some(base) => ahash::RandomState::with_seeds(base, 0x746f_6c6c, 0x6761_7465, 0).hash_one(random_id()) >> 11,
            None => random_id(),
        };
        let (open_min, open_max) = timing.open_ns();
        Ok(Arc::new(NodeInner {
            id,
            seq: AtomicU64::new(0),
            store: self.store,
            timing,
            batch_size: self.batch_size,
            cold_start: self.cold_start,
            registry: self.encoder.registry_key(),
            encoder: self.encoder,
            headroom_percent: self.headroom_percent,
            clock: self.clock,
            failure_policy: self.failure_policy,
            breaker: Breaker::new(self.failure_threshold, open_min, open_max),
            expected_nodes: self.expected_nodes,
            on_demand_budget,
            on_demand_spent: crate::local::cell::Cell::default(),
            asked: AtomicBool::new(false),
            degraded_ever: AtomicBool::new(false),
            members: Mutex::new(Vec::new()),
            priority: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            synced: tokio::sync::Notify::new(),
            stop: tokio::sync::Notify::new(),
            stopped: AtomicBool::new(false),
            sync_lock: tokio::sync::Mutex::new(()),
            task: Mutex::new(None),
            last_heartbeat: AtomicU64::new(0),
            last_sync: AtomicU64::new(0),
            last_success: AtomicU64::new(0),
            server: AtomicU64::new(0),
            key_errors_seen: AtomicBool::new(false),
            rng: AtomicU64::new(id | 1),
            counters: Counters::default(),
            live_nodes: AtomicU64::new(1),
            #[cfg(feature = "metrics")]
            last_publish: AtomicU64::new(0),
        }))
    }

    fn built(self) -> Result<Arc<NodeInner>, NodeError> {
        let inner = self.inner()?;
        #[cfg(feature = "metrics")]
        {
            let weak: std::sync::Weak<dyn crate::metrics::Source> = Arc::downgrade(&inner) as _;
            crate::metrics::register(weak);
        }
        Ok(inner)
    }

    /// Builds the node and spawns its sync task on the current tokio runtime. The store is
    /// not contacted before the first sync: see [`connect`](Self::connect) to check the
    /// credentials first.
    pub fn start(self) -> Result<Node, NodeError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| NodeError::NoRuntime)?;
        Ok(spawn(&handle, self.built()?))
    }

    /// Like [`start`](Self::start), after one heartbeat to the store: a configuration error
    /// (wrong password, missing ACL permission) is returned as [`NodeError::Store`]. An
    /// unreachable store is not an error: the node starts with that failure counted, and the
    /// circuit breaker and the failure policy take it from there.
    pub async fn connect(self) -> Result<Node, NodeError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| NodeError::NoRuntime)?;
        let inner = self.built()?;
        // A first connection may take longer than a sync is allowed to.
        if let Err(e) = inner.heartbeat(inner.timing.connect_timeout()).await {
            if e.class() == ErrorClass::Config {
                return Err(NodeError::Store(e));
            }
            inner.failed(&e, inner.clock.now_ns());
        }
        Ok(spawn(&handle, inner))
    }

    /// Builds the node without a sync task: the caller drives it with [`Node::sync_once`]
    /// (simulations, tests, or a runtime of the caller's choosing).
    pub fn build_manual(self) -> Result<Node, NodeError> {
        Ok(Node { inner: self.built()? })
    }
}

fn random_id() -> NodeId {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    // ahash's RandomState draws its keys from the OS at process start.
    ahash::RandomState::new().hash_one((t, std::process::id())) >> 11
}

/// Every timing a node uses, derived once, when it is built, from its sync interval and the
/// settings that default to multiples of it.
///
/// | timing | value | what it bounds |
/// |---|---|---|
/// | `interval` | `sync_interval`: default 100 ms, from 1 ms to 1 h | the sync period; the unit of the demand estimate; the pause before a panicked sync task restarts; the `retry_after` of a key that holds no claim |
/// | `gap` | `max(interval / 10, 1 ms)` | the least time between two syncs, early ones included |
/// | `retry_floor` | `interval / 10` | the shortest `retry_after` of a denied check (at least 1 ns) |
/// | `lease` | `lease`: default `max(4 x interval, 1 s)`; longer than `interval`, at least 50 ms | how long claimed token-bucket tokens stay usable after the sync that granted them |
/// | `sync_timeout` | `sync_timeout`: default `max(interval, 250 ms)`, from 1 ms to 1 h | a sync's store call |
/// | `probe_timeout` | `min(sync_timeout, max(interval / 2, 50 ms))` | a half-open probe |
/// | `connect_timeout` | `max(sync_timeout, 1 s)` | the first heartbeat of [`NodeBuilder::connect`] |
/// | `heartbeat_every` | `max(interval, 1 s)` | how often the node tells the registry it is alive |
/// | `heartbeat_ttl` | `max(lease, 3 x heartbeat_every)` | how long the registry counts the node after a heartbeat |
/// | `claim_wait` | `interval + sync_timeout` | how long a check waits for a claim on demand |
/// | `open` | `open_backoff`: default `interval / 2` and `1.5 x interval`; 1 ms <= min <= max <= 1 h | how long the circuit stays open before a probe |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SyncTiming {
    interval: Duration,
    gap: Duration,
    lease: Duration,
    sync_timeout: Duration,
    probe_timeout: Duration,
    heartbeat_every: Duration,
    open_min: Duration,
    open_max: Duration,
}

impl SyncTiming {
    /// Derives the timings, and checks the settings (`None`: the default).
    pub(crate) fn new(
        interval: Duration,
        lease: Option<Duration>,
        open_backoff: Option<(Duration, Duration)>,
        sync_timeout: Option<Duration>,
    ) -> Result<Self, NodeError> {
        let range = |what: &'static str| {
            out_of_range(
                what,
                format!(
                    "must be between {} ms and {} h",
                    MIN_NODE_TIMING.as_millis(),
                    MAX_NODE_TIMING.as_secs() / 3600
                ),
            )
        };
        let in_range = |d: Duration| (MIN_NODE_TIMING..=MAX_NODE_TIMING).contains(&d);
        if !in_range(interval) {
            return Err(range("sync_interval"));
        }
        let lease = lease.unwrap_or_else(|| (interval * LEASE_INTERVALS).max(MIN_DEFAULT_LEASE));
        if lease <= interval || lease < MIN_CLAIM_SPAN {
            return Err(out_of_range(
                "lease",
                format!(
                    "must be longer than sync_interval and at least {} ms",
                    MIN_CLAIM_SPAN.as_millis()
                ),
            ));
        }
        let (open_min, open_max) = open_backoff.unwrap_or((interval / 2, interval * 3 / 2));
        if open_min < MIN_NODE_TIMING || open_max < open_min || open_max > MAX_NODE_TIMING {
            return Err(out_of_range(
                "open_backoff",
                format!(
                    "need {} ms <= min <= max <= {} h",
                    MIN_NODE_TIMING.as_millis(),
                    MAX_NODE_TIMING.as_secs() / 3600
                ),
            ));
        }
        let sync_timeout = sync_timeout.unwrap_or_else(|| interval.max(MIN_DEFAULT_SYNC_TIMEOUT));
        if !in_range(sync_timeout) {
            return Err(range("sync_timeout"));
        }
        Ok(SyncTiming {
            interval,
            gap: (interval / 10).max(MIN_SYNC_GAP),
            lease,
            sync_timeout,
            probe_timeout: sync_timeout.min((interval / 2).max(MIN_PROBE_TIMEOUT)),
            heartbeat_every: interval.max(MIN_HEARTBEAT_PERIOD),
            open_min,
            open_max,
        })
    }

    /// The sync interval.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// The sync interval in nanoseconds.
    pub(crate) fn interval_ns(&self) -> u64 {
        self.interval.as_nanos() as u64
    }

    /// The least time between two syncs.
    pub(crate) fn gap(&self) -> Duration {
        self.gap
    }

    /// The shortest `retry_after` of a denied check, in nanoseconds (0 for intervals under
    /// 10 ns: callers raise it to at least 1).
    pub(crate) fn retry_floor_ns(&self) -> u64 {
        self.interval_ns() / 10
    }

    /// How long claimed token-bucket tokens stay usable after the sync that granted them.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// The lease in nanoseconds.
    pub(crate) fn lease_ns(&self) -> u64 {
        self.lease.as_nanos() as u64
    }

    /// The bound of a sync's store call.
    pub(crate) fn sync_timeout(&self) -> Duration {
        self.sync_timeout
    }

    /// The bound of a half-open probe.
    pub(crate) fn probe_timeout(&self) -> Duration {
        self.probe_timeout
    }

    /// The bound of the first heartbeat of [`NodeBuilder::connect`].
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.sync_timeout.max(MIN_CONNECT_TIMEOUT)
    }

    /// How often the node tells the registry it is alive.
    pub(crate) fn heartbeat_every(&self) -> Duration {
        self.heartbeat_every
    }

    /// How long the registry counts the node after a heartbeat.
    pub(crate) fn heartbeat_ttl(&self) -> Duration {
        self.lease.max(self.heartbeat_every * HEARTBEAT_TTL_PERIODS)
    }

    /// How long a check waits for a claim on demand at most: one sync interval (a claim past
    /// the budget goes with the next sync) plus the sync timeout (a call's own bound).
    pub(crate) fn claim_wait(&self) -> Duration {
        self.interval + self.sync_timeout
    }

    /// The circuit's shortest and longest open time, in nanoseconds.
    fn open_ns(&self) -> (u64, u64) {
        (self.open_min.as_nanos() as u64, self.open_max.as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_default_timings_of_a_100_ms_interval_are_the_documented_ones() {
        let t = SyncTiming::new(ms(100), None, None, None).unwrap();
        assert_eq!(t.interval(), ms(100));
        assert_eq!(t.gap(), ms(10));
        assert_eq!(t.retry_floor_ns(), 10_000_000);
        assert_eq!(t.lease(), ms(1000), "4 intervals, raised to 1 s");
        assert_eq!(t.sync_timeout(), ms(250), "one interval, raised to 250 ms");
        assert_eq!(t.probe_timeout(), ms(50));
        assert_eq!(t.connect_timeout(), ms(1000));
        assert_eq!(t.heartbeat_every(), ms(1000));
        assert_eq!(t.heartbeat_ttl(), ms(3000));
        assert_eq!(t.claim_wait(), ms(350), "the wait the README states for the defaults");
        assert_eq!(t.open_ns(), (50_000_000, 150_000_000));
    }

    #[test]
    fn long_intervals_scale_every_derived_timing() {
        let t = SyncTiming::new(ms(2000), None, None, None).unwrap();
        assert_eq!(t.gap(), ms(200));
        assert_eq!(t.lease(), ms(8000));
        assert_eq!(t.sync_timeout(), ms(2000));
        assert_eq!(t.probe_timeout(), ms(1000));
        assert_eq!(t.connect_timeout(), ms(2000));
        assert_eq!(t.heartbeat_every(), ms(2000));
        assert_eq!(t.heartbeat_ttl(), ms(8000), "the lease, longer than three heartbeats");
        assert_eq!(t.claim_wait(), ms(4000));
        assert_eq!(t.open_ns(), (1_000_000_000, 3_000_000_000));
    }

    #[test]
    fn short_intervals_keep_the_floors() {
        let t = SyncTiming::new(ms(2), None, None, None).unwrap();
        assert_eq!(t.gap(), ms(1));
        assert_eq!(t.probe_timeout(), ms(50));
        assert_eq!(t.sync_timeout(), ms(250));
        assert_eq!(t.lease(), ms(1000));
        let t = SyncTiming::new(ms(100), None, None, Some(ms(20))).unwrap();
        assert_eq!(
            t.probe_timeout(),
            ms(20),
            "a probe never gets more than the sync timeout"
        );
    }

    #[test]
    fn explicit_settings_win_over_the_derived_defaults() {
        let t = SyncTiming::new(ms(100), Some(ms(600)), Some((ms(5), ms(7))), Some(ms(40))).unwrap();
        assert_eq!(t.lease(), ms(600));
        assert_eq!(t.sync_timeout(), ms(40));
        assert_eq!(t.claim_wait(), ms(140));
        assert_eq!(t.open_ns(), (5_000_000, 7_000_000));
    }

    #[test]
    fn the_sync_interval_is_accepted_from_1_ms_to_1_h_and_nowhere_else() {
        let ok = |d: Duration| SyncTiming::new(d, Some(Duration::from_secs(7200)), Some((ms(1), ms(1))), None);
        assert!(ok(ms(1)).is_ok());
        assert!(ok(Duration::from_secs(3600)).is_ok());
        for bad in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_secs(3600) + Duration::from_nanos(1),
        ] {
            assert_eq!(
                ok(bad),
                Err(out_of_range("sync_interval", "must be between 1 ms and 1 h")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_interval_under_2_ms_needs_an_explicit_open_backoff() {
        // The default shortest open time, half an interval, would be under 1 ms.
        assert!(SyncTiming::new(Duration::from_micros(1_999), None, None, None).is_err());
        assert!(SyncTiming::new(ms(1), None, Some((ms(1), ms(2))), None).is_ok());
    }

    #[test]
    fn a_lease_must_outlast_the_interval_and_the_shortest_claim_span() {
        assert!(SyncTiming::new(ms(100), Some(ms(100)), None, None).is_err());
        assert!(SyncTiming::new(ms(10), Some(ms(49)), None, None).is_err());
        assert!(SyncTiming::new(ms(10), Some(ms(50)), None, None).is_ok());
    }

    #[test]
    fn the_open_backoff_and_the_sync_timeout_share_the_interval_range() {
        let open = |min, max| SyncTiming::new(ms(100), None, Some((min, max)), None);
        assert!(open(Duration::from_micros(999), ms(10)).is_err());
        assert!(open(ms(10), ms(9)).is_err());
        assert!(open(ms(10), Duration::from_secs(3601)).is_err());
        assert!(open(ms(1), Duration::from_secs(3600)).is_ok());
        let timeout = |d| SyncTiming::new(ms(100), None, None, Some(d));
        assert!(timeout(Duration::ZERO).is_err());
        assert!(timeout(Duration::from_secs(3601)).is_err());
        assert!(timeout(Duration::from_secs(3600)).is_ok());
    }
}
