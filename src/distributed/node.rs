//! The node: one process's link to the store, and its sync task.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::breaker::{Breaker, CircuitState, Permit, Transition};
use crate::clock::Clock;
use crate::consts::MIN_CLAIM_SPAN;
use crate::store::{Claim, ClaimOutcome, ErrorClass, KeyEncoder, KeyError, NodeId, Store, StoreError, StoreKey};

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
    /// Admit everything (opt-in). Each admission is counted in [`NodeStats::fail_open_admitted`]
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
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// [`NodeBuilder::connect`]: the store refused this node's credentials or permissions.
    #[error("the store refused this node: {0}")]
    Store(StoreError),
}

/// Counters of a node's sync activity and health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStats {
    /// Syncs run (including those the open circuit kept from the store).
    pub syncs: u64,
    /// Store calls made for claims (one per batch).
    pub round_trips: u64,
    /// Store calls that failed or timed out (their grants count as lost).
    pub failed_round_trips: u64,
    /// Claims sent (one per key per sync).
    pub claims: u64,
    /// Live nodes in the registry at the last heartbeat (this one included).
    pub live_nodes: u64,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Times the circuit opened (a failed probe reopening it included).
    pub circuit_opened: u64,
    /// Half-open probes sent.
    pub probes: u64,
    /// Failed syncs by class: transient (I/O, timeouts, `LOADING`, `BUSY`, ...).
    pub transient_errors: u64,
    /// Failed syncs by class: topology (`READONLY`, `MOVED`, ...; the connection is replaced).
    pub topology_errors: u64,
    /// Failed syncs by class: configuration (`NOAUTH`, `WRONGPASS`, `NOPERM`).
    pub config_errors: u64,
    /// Failed syncs by class: resource (`OOM`).
    pub resource_errors: u64,
    /// Failed syncs by class: protocol (unexpected replies, script errors).
    pub protocol_errors: u64,
    /// Keys whose claim failed alone (`WRONGTYPE`, corrupt state); the rest of their batch
    /// went on. Such a key is answered by the failure policy until a claim succeeds.
    pub key_errors: u64,
    /// Times the store was found to have lost state: its server identity changed, or a key
    /// held less than this node's valid claim. Nothing is refunded.
    pub state_losses: u64,
    /// Times the sync task panicked and was restarted.
    pub task_restarts: u64,
    /// Cost admitted by [`FailurePolicy::FailOpen`] while the circuit was open.
    pub fail_open_admitted: u64,
    /// Tokens returned in claims whose batch failed: the store may or may not have taken them
    /// back; this node no longer holds them (admits less, never more).
    pub unconfirmed_returns: u64,
    /// Tokens wanted in claims whose batch failed: the store may have granted some of them
    /// without this node ever receiving them (lost until their lease or window ends).
    pub unconfirmed_wants: u64,
    /// Claims the store answered as stale: it had already applied a newer claim of this node
    /// for the key, so this one changed nothing (this node granted itself nothing from it).
    pub stale_claims: u64,
    /// Store calls made on demand, for checks waiting for a claim
    /// ([`Limiter::check_async`](crate::Limiter::check_async)); each carries every key asked
    /// for since the previous one. Counted in `round_trips` too.
    pub claims_on_demand: u64,
    /// Times checks asked for a claim on demand beyond the node's budget
    /// ([`NodeBuilder::claims_on_demand_per_second`]): their claims went with the next sync.
    pub claims_on_demand_deferred: u64,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats {
            syncs: 0,
            round_trips: 0,
            failed_round_trips: 0,
            claims: 0,
            live_nodes: 0,
            circuit: CircuitState::Closed,
            circuit_opened: 0,
            probes: 0,
            transient_errors: 0,
            topology_errors: 0,
            config_errors: 0,
            resource_errors: 0,
            protocol_errors: 0,
            key_errors: 0,
            state_losses: 0,
            task_restarts: 0,
            fail_open_admitted: 0,
            unconfirmed_returns: 0,
            unconfirmed_wants: 0,
            stale_claims: 0,
            claims_on_demand: 0,
            claims_on_demand_deferred: 0,
        }
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

/// A limiter's side of a sync: claims for its keys, and what to do with the answers.
pub(crate) trait Member: Send + Sync {
    /// Adds one claim per key worth syncing, and returns what `apply` needs to find them again.
    /// With `drain`, every held token is returned and nothing is wanted.
    /// Every claim carries `seq`, this sync's number (see [`Claim::seq`]).
    fn prepare(&self, node: &NodeInner, now: u64, drain: bool, seq: u64, out: &mut Vec<Claim>) -> Ticket;
    /// Like `prepare`, for the keys waiting checks asked for since the last call (a claim on
    /// demand): one claim per such key, carrying what they asked for.
    fn prepare_asked(&self, node: &NodeInner, now: u64, seq: u64, out: &mut Vec<Claim>) -> Ticket;
    /// Applies the outcomes of the claims `prepare` added (`None`: the batch failed).
    fn apply(
        &self,
        node: &NodeInner,
        ticket: Ticket,
        sent_at: u64,
        outcomes: &[Option<ClaimOutcome>],
        report: &mut ApplyReport,
    );
    /// Claimed tokens held now, over all keys.
    #[cfg(feature = "metrics")]
    fn held(&self) -> u64;
}

/// What a member needs to find its claims again when their outcomes come back.
pub(crate) type Ticket = Box<dyn Any + Send>;

/// One exchange's claims: each live member's, with the ticket that finds them again (the
/// member's claims are `claims[start..end]`).
struct Round {
    members: Vec<Arc<dyn Member>>,
    sent_at: u64,
    claims: Vec<Claim>,
    tickets: Vec<(usize, usize, Ticket)>,
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

#[derive(Default)]
struct Counters {
    syncs: AtomicU64,
    round_trips: AtomicU64,
    failed: AtomicU64,
    claims: AtomicU64,
    circuit_opened: AtomicU64,
    probes: AtomicU64,
    /// By [`ErrorClass`], in declaration order.
    errors: [AtomicU64; 5],
    key_errors: AtomicU64,
    state_losses: AtomicU64,
    task_restarts: AtomicU64,
    fail_open_admitted: AtomicU64,
    unconfirmed_returns: AtomicU64,
    unconfirmed_wants: AtomicU64,
    stale_claims: AtomicU64,
    on_demand: AtomicU64,
    on_demand_deferred: AtomicU64,
}

fn class_index(class: ErrorClass) -> usize {
    match class {
        ErrorClass::Transient => 0,
        ErrorClass::Topology => 1,
        ErrorClass::Config => 2,
        ErrorClass::Resource => 3,
        ErrorClass::Protocol => 4,
    }
}

pub(crate) struct NodeInner {
    /// The store identity: unique per process (see [`NodeBuilder::id`]).
    pub(crate) id: NodeId,
    /// The number of the last sync (0 before the first): every claim carries its sync's number.
    seq: AtomicU64,
    store: Arc<dyn Store>,
    pub(crate) sync_interval: Duration,
    batch_size: usize,
    pub(crate) lease: Duration,
    pub(crate) cold_start: ColdStart,
    pub(crate) encoder: KeyEncoder,
    pub(crate) headroom_percent: u64,
    pub(crate) clock: Clock,
    pub(crate) failure_policy: FailurePolicy,
    pub(crate) breaker: Breaker,
    sync_timeout: Duration,
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
    pub(crate) degraded_ever: AtomicBool,
    members: Mutex<Vec<(&'static str, Weak<dyn Member>)>>,
    priority: AtomicBool,
    wake: tokio::sync::Notify,
    pub(crate) synced: tokio::sync::Notify,
    stop: tokio::sync::Notify,
    stopped: AtomicBool,
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

fn random_id() -> NodeId {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    // ahash's RandomState draws its keys from the OS at process start.
    ahash::RandomState::new().hash_one((t, std::process::id())) >> 11
}

impl Node {
    /// Starts configuring a node on `store`.
    pub fn builder(store: Arc<dyn Store>) -> NodeBuilder {
        NodeBuilder {
            store,
            sync_interval: Duration::from_millis(100),
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
            on_demand_per_second: crate::consts::DEFAULT_CLAIMS_ON_DEMAND_PER_SECOND,
        }
    }

    /// This node's identity in the store and its registry: random per process, or derived from
    /// [`NodeBuilder::id`] and a random per-process part.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The sync interval.
    pub fn sync_interval(&self) -> Duration {
        self.inner.sync_interval
    }

    /// Counters of sync activity and health.
    pub fn stats(&self) -> NodeStats {
        let i = &self.inner;
        let c = &i.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            syncs: get(&c.syncs),
            round_trips: get(&c.round_trips),
            failed_round_trips: get(&c.failed),
            claims: get(&c.claims),
            live_nodes: get(&i.live_nodes),
            circuit: i.breaker.state(),
            circuit_opened: get(&c.circuit_opened),
            probes: get(&c.probes),
            transient_errors: get(&c.errors[0]),
            topology_errors: get(&c.errors[1]),
            config_errors: get(&c.errors[2]),
            resource_errors: get(&c.errors[3]),
            protocol_errors: get(&c.errors[4]),
            key_errors: get(&c.key_errors),
            state_losses: get(&c.state_losses),
            task_restarts: get(&c.task_restarts),
            fail_open_admitted: get(&c.fail_open_admitted),
            unconfirmed_returns: get(&c.unconfirmed_returns),
            unconfirmed_wants: get(&c.unconfirmed_wants),
            stale_claims: get(&c.stale_claims),
            claims_on_demand: get(&c.on_demand),
            claims_on_demand_deferred: get(&c.on_demand_deferred),
        }
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
        let _ = tokio::time::timeout(self.inner.sync_timeout, leave).await;
    }
}

impl NodeBuilder {
    /// How often the node syncs (default 100 ms). Keys that run low sync sooner, at most once
    /// per tenth of this.
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
    /// [`NodeStats::claims_on_demand_deferred`]); 0 sends them all with the syncs.
    pub fn claims_on_demand_per_second(mut self, calls: u64) -> Self {
        self.on_demand_per_second = calls;
        self
    }

    fn inner(self) -> Result<Arc<NodeInner>, NodeError> {
        if self.sync_interval < Duration::from_millis(1) || self.sync_interval > Duration::from_secs(3600) {
            return Err(NodeError::Config("sync_interval: must be between 1 ms and 1 h".into()));
        }
        if self.batch_size == 0 || self.batch_size > crate::store::MAX_KEYS_PER_CALL {
            return Err(NodeError::Config(format!(
                "batch_size: must be in 1..={}",
                crate::store::MAX_KEYS_PER_CALL
            )));
        }
        if !(100..=10_000).contains(&self.headroom_percent) {
            return Err(NodeError::Config("headroom_percent: must be in 100..=10000".into()));
        }
        let lease = self
            .lease
            .unwrap_or_else(|| (self.sync_interval * 4).max(Duration::from_secs(1)));
        if lease <= self.sync_interval || lease < MIN_CLAIM_SPAN {
            return Err(NodeError::Config(format!(
                "lease: must be longer than sync_interval and at least {} ms",
                MIN_CLAIM_SPAN.as_millis()
            )));
        }
        if self.failure_threshold == 0 {
            return Err(NodeError::Config("failure_threshold: must be > 0".into()));
        }
        let (min_open, max_open) = self
            .open_backoff
            .unwrap_or((self.sync_interval / 2, self.sync_interval * 3 / 2));
        if min_open < Duration::from_millis(1) || max_open < min_open || max_open > Duration::from_secs(3600) {
            return Err(NodeError::Config("open_backoff: need 1 ms <= min <= max <= 1 h".into()));
        }
        let sync_timeout = self
            .sync_timeout
            .unwrap_or_else(|| self.sync_interval.max(Duration::from_millis(250)));
        if sync_timeout < Duration::from_millis(1) || sync_timeout > Duration::from_secs(3600) {
            return Err(NodeError::Config("sync_timeout: must be between 1 ms and 1 h".into()));
        }
        if self.expected_nodes == 0 {
            return Err(NodeError::Config("expected_nodes: must be > 0".into()));
        }
        let on_demand_budget = match self.on_demand_per_second {
            0 => None,
            n => Some(
                crate::Policy::per_second(n)
                    .burst((n / 10).max(1))
                    .compile()
                    .map_err(|e| NodeError::Config(format!("claims_on_demand_per_second: {}", e.reason)))?,
            ),
        };
        let id = match self.id {
            // The per-process part: see `NodeBuilder::id`.
            Some(base) => ahash::RandomState::with_seeds(base, 0x746f_6c6c, 0x6761_7465, 0).hash_one(random_id()) >> 11,
            None => random_id(),
        };
        Ok(Arc::new(NodeInner {
            id,
            seq: AtomicU64::new(0),
            store: self.store,
            sync_interval: self.sync_interval,
            batch_size: self.batch_size,
            lease,
            cold_start: self.cold_start,
            registry: self.encoder.registry_key(),
            encoder: self.encoder,
            headroom_percent: self.headroom_percent,
            clock: self.clock,
            failure_policy: self.failure_policy,
            breaker: Breaker::new(
                self.failure_threshold,
                min_open.as_nanos() as u64,
                max_open.as_nanos() as u64,
            ),
            sync_timeout,
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
            let weak: Weak<dyn crate::metrics::Source> = Arc::downgrade(&inner) as _;
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
        if let Err(e) = inner.heartbeat(inner.sync_timeout.max(Duration::from_secs(1))).await {
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

/// Starts the node's supervised sync task on `handle`.
fn spawn(handle: &tokio::runtime::Handle, inner: Arc<NodeInner>) -> Node {
    let task = handle.spawn(supervise(Arc::downgrade(&inner)));
    *inner.task.lock() = Some(task);
    Node { inner }
}

/// Runs the sync loop; a panic inside it is caught, counted and logged, and the loop starts
/// again one interval later (what a sync in flight had claimed counts as lost).
async fn supervise(weak: Weak<NodeInner>) {
    loop {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let outcome = handle.spawn(run(weak.clone())).await;
        let Some(node) = weak.upgrade() else { return };
        match outcome {
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                node.counters.task_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(node = node.id, panic = %msg, "tollgate: the sync task panicked; restarting it");
                if node.stopped.load(Ordering::Acquire) {
                    return;
                }
                let pause = node.sync_interval;
                drop(node);
                tokio::time::sleep(pause).await;
            }
            _ => return,
        }
    }
}

async fn run(weak: Weak<NodeInner>) {
    let interval = match weak.upgrade() {
        Some(n) => n.sync_interval,
        None => return,
    };
    let min_gap = (interval / 10).max(Duration::from_millis(1));
    let mut next = tokio::time::Instant::now() + interval;
    let mut last = tokio::time::Instant::now();
    loop {
        let Some(node) = weak.upgrade() else { return };
        if node.stopped.load(Ordering::Acquire) {
            return;
        }
        // While the circuit is open, wake when the open time ends, so the probe goes out then
        // rather than at the next tick.
        let mut wake_at = next;
        if node.breaker.is_open() {
            let open_for = node.breaker.open_until().saturating_sub(node.clock.now_ns());
            wake_at = wake_at.min(tokio::time::Instant::now() + Duration::from_nanos(open_for));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = node.wake.notified() => {
                let earliest = last + min_gap;
                tokio::select! {
                    _ = tokio::time::sleep_until(earliest) => {}
                    _ = node.stop.notified() => return,
                }
            }
            _ = node.stop.notified() => return,
        }
        if node.stopped.load(Ordering::Acquire) {
            return;
        }
        last = tokio::time::Instant::now();
        if last >= next {
            next += interval;
            if next <= last {
                next = last + interval;
            }
        }
        node.sync(false).await;
    }
}

impl NodeInner {
    pub(crate) fn register(&self, namespace: &'static str, member: Weak<dyn Member>) -> Result<(), String> {
        let mut members = self.members.lock();
        members.retain(|(_, m)| m.strong_count() > 0);
        if members.iter().any(|(n, _)| *n == namespace) {
            return Err(format!(
                "a limiter with the same name and policy ({namespace}) already runs on this node"
            ));
        }
        members.push((namespace, member));
        Ok(())
    }

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

    /// How long a check waits for a claim on demand at most: one sync interval (a claim past
    /// the budget goes with the next sync) plus the sync timeout (a call's own bound).
    pub(crate) fn claim_wait_bound(&self) -> Duration {
        self.sync_interval + self.sync_timeout
    }

    /// Sends the claims asked for on demand, then returns true; or returns false at
    /// `deadline`. Calls are made one at a time, under the sync lock: a check whose key was
    /// queued while another call was on its way waits for that call to end, then either finds
    /// its key sent by a call in between or sends it, with every key queued meanwhile, in one
    /// call. Past the budget (or while the circuit is not closed) the claims go with the next
    /// sync, which is waited for instead.
    pub(crate) async fn wait_asked(&self, deadline: tokio::time::Instant) -> bool {
        let synced = self.synced.notified();
        tokio::pin!(synced);
        synced.as_mut().enable();
        match tokio::time::timeout_at(deadline, self.send_asked()).await {
            Err(_) => false,
            Ok(true) => true,
            Ok(false) => tokio::time::timeout_at(deadline, synced).await.is_ok(),
        }
    }

    /// One call on demand (see [`wait_asked`](Self::wait_asked)); false when the claims were
    /// left to the next sync.
    async fn send_asked(&self) -> bool {
        let _one_at_a_time = self.sync_lock.lock().await;
        if !self.asked.swap(false, Ordering::AcqRel) {
            // Nothing queued: a call or a sync since this check asked carried its key.
            return true;
        }
        let now = self.clock.now_ns();
        let within_budget = || match &self.on_demand_budget {
            None => false,
            Some(rule) => self
                .on_demand_spent
                .acquire(rule, now, 1)
                .map(|step| step.allowed)
                .unwrap_or(false),
        };
        let later = if self.breaker.is_open() || self.is_stopped() {
            true
        } else if !within_budget() {
            self.counters.on_demand_deferred.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        };
        if later {
            self.asked.store(true, Ordering::Release);
            self.request_priority();
            return false;
        }
        let round = self.gather(|m, sent_at, seq, out| m.prepare_asked(self, sent_at, seq, out));
        if round.claims.is_empty() {
            return true;
        }
        self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
        let error = self.settle(round).await;
        match error {
            Some(e) => self.failed(&e, self.clock.now_ns()),
            None => self.succeeded(self.clock.now_ns()),
        }
        self.synced.notify_waiters();
        true
    }

    /// One heartbeat, bounded by the sync timeout; updates the live node count and checks
    /// the server identity.
    async fn heartbeat(&self, bound: Duration) -> Result<(), StoreError> {
        // Three heartbeat periods: a node drops out of the count only after missing three
        // (with one, the count flickered between heartbeats that came a little late).
        let ttl = self.lease.max(self.heartbeat_every() * 3);
        let beat = match tokio::time::timeout(bound, self.store.heartbeat(&self.registry, self.id, ttl)).await {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::timed_out(bound)),
        };
        if beat.live_nodes > 0 {
            self.live_nodes.store(beat.live_nodes, Ordering::Relaxed);
        }
        let before = self.server.swap(beat.server, Ordering::AcqRel);
        if before != 0 && before != beat.server {
            self.counters.state_losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node = self.id,
                "tollgate: the store restarted (its server identity changed): global counts start over"
            );
        }
        Ok(())
    }

    /// How often the node tells the registry it is alive: every sync, at most once a second.
    fn heartbeat_every(&self) -> Duration {
        self.sync_interval.max(Duration::from_secs(1))
    }

    /// Counts a failed sync, acts on its class and feeds the breaker.
    fn failed(&self, e: &StoreError, now: u64) {
        self.counters.errors[class_index(e.class())].fetch_add(1, Ordering::Relaxed);
        if e.class() == ErrorClass::Topology {
            // A replica, or a moved key: connect afresh so the next sync finds the primary.
            self.store.reconnect();
        }
        let jitter = self.next_random();
        match self.breaker.on_failure(now, e.class() == ErrorClass::Config, jitter) {
            Some(Transition::Opened { for_ns, reopened }) => {
                self.degraded_ever.store(true, Ordering::Release);
                self.counters.circuit_opened.fetch_add(1, Ordering::Relaxed);
                if reopened {
                    tracing::debug!(node = self.id, error = %e, "tollgate: probe failed; circuit open again");
                } else {
                    tracing::warn!(
                        node = self.id,
                        class = ?e.class(),
                        error = %e,
                        open_ms = for_ns / 1_000_000,
                        failure_policy = self.failure_policy.as_str(),
                        "tollgate: store unavailable; circuit open, checks use the failure policy"
                    );
                }
            }
            Some(Transition::Closed) | None => {}
        }
    }

    fn succeeded(&self, now: u64) {
        self.last_success.store(now.max(1), Ordering::Release);
        if self.breaker.on_success() == Some(Transition::Closed) {
            tracing::info!(node = self.id, "tollgate: store reachable again; circuit closed");
        }
    }

    fn next_random(&self) -> u64 {
        // xorshift64: jitter only, no quality needed.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }

    /// How many nodes [`FailurePolicy::LocalShare`] divides a limit by.
    pub(crate) fn share_divisor(&self) -> u64 {
        self.live_nodes.load(Ordering::Relaxed).max(self.expected_nodes).max(1)
    }

    pub(crate) fn count_fail_open(&self, cost: u64) {
        self.counters.fail_open_admitted.fetch_add(cost, Ordering::Relaxed);
    }

    async fn sync(&self, drain: bool) {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        self.sync_inner(drain).await;
        #[cfg(feature = "metrics")]
        {
            ::metrics::histogram!(crate::metrics::SYNC_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
            // Publish every limiter's and node's totals, at most once a second.
            let now = self.clock.now_ns();
            let last = self.last_publish.load(Ordering::Relaxed);
            if last == 0 || now.saturating_sub(last) >= 1_000_000_000 {
                self.last_publish.store(now.max(1), Ordering::Relaxed);
                crate::metrics::publish();
            }
        }
    }

    async fn sync_inner(&self, drain: bool) {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        let permit = self.breaker.permit(self.clock.now_ns());
        if permit == Permit::Wait && !drain {
            // Open: the store is not touched; held tokens and the failure policy answer.
            self.priority.store(false, Ordering::Release);
            self.synced.notify_waiters();
            return;
        }
        let _one_at_a_time = self.sync_lock.lock().await;
        self.priority.store(false, Ordering::Release);
        let mut beat_done = false;
        if permit == Permit::Probe {
            self.counters.probes.fetch_add(1, Ordering::Relaxed);
            let now = self.clock.now_ns();
            // The old connection may be a casualty of the outage (reset, or queued behind
            // replies that never came): each probe goes out on a fresh one.
            self.store.reconnect();
            let probe_timeout = self
                .sync_timeout
                .min((self.sync_interval / 2).max(Duration::from_millis(50)));
            match self.heartbeat(probe_timeout).await {
                Ok(()) => {
                    self.last_heartbeat.store(now.max(1), Ordering::Relaxed);
                    self.succeeded(now);
                    beat_done = true;
                }
                Err(e) => {
                    self.failed(&e, self.clock.now_ns());
                    self.synced.notify_waiters();
                    return;
                }
            }
        }
        // This sync visits every key, those asked for on demand included (before the queues
        // are read: a key asked for meanwhile raises the flag again).
        self.asked.store(false, Ordering::Release);
        let round = self.gather(|m, sent_at, seq, out| m.prepare(self, sent_at, drain, seq, out));
        let claims = round.claims.len();
        let mut error = self.settle(round).await;
        let now = self.clock.now_ns();
        let heartbeat_every = self.heartbeat_every().as_nanos() as u64;
        let last = self.last_heartbeat.load(Ordering::Relaxed);
        let mut touched = beat_done || claims > 0;
        if error.is_none() && !drain && !beat_done && (last == 0 || now.saturating_sub(last) >= heartbeat_every) {
            self.last_heartbeat.store(now.max(1), Ordering::Relaxed);
            touched = true;
            if let Err(e) = self.heartbeat(self.sync_timeout).await {
                if claims == 0 {
                    error = Some(e);
                } else {
                    // The claims went through: the store works, only the registry did not
                    // answer (on a cluster, its master may be down). Not a reason to open the
                    // circuit for every key; the live node count keeps its last value.
                    self.counters.errors[class_index(e.class())].fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node = self.id, error = %e, "tollgate: heartbeat failed after a good sync");
                }
            }
        }
        match error {
            Some(e) => self.failed(&e, self.clock.now_ns()),
            // A sync with nothing to send proves nothing about the store.
            None if touched => self.succeeded(now),
            None => {}
        }
        self.last_sync.store(now, Ordering::Relaxed);
        self.synced.notify_waiters();
    }

    /// One round of claims, from every live member, under one number: the sync lock is held,
    /// so it is greater than every earlier round's (see [`Claim::seq`]).
    fn gather(&self, prepare: impl Fn(&dyn Member, u64, u64, &mut Vec<Claim>) -> Ticket) -> Round {
        let members: Vec<Arc<dyn Member>> = self.members.lock().iter().filter_map(|(_, m)| m.upgrade()).collect();
        let sent_at = self.clock.now_ns();
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let mut claims = Vec::new();
        let mut tickets = Vec::with_capacity(members.len());
        for m in &members {
            let start = claims.len();
            let ticket = prepare(&**m, sent_at, seq, &mut claims);
            tickets.push((start, claims.len(), ticket));
        }
        Round {
            members,
            sent_at,
            claims,
            tickets,
        }
    }

    /// Sends a round's claims, hands each member the outcomes of its own, and reports what
    /// they showed; returns the first error of the exchange.
    async fn settle(&self, round: Round) -> Option<StoreError> {
        let (outcomes, error) = self.exchange(&round.claims).await;
        let mut report = ApplyReport::default();
        for (m, (start, end, ticket)) in round.members.iter().zip(round.tickets) {
            m.apply(self, ticket, round.sent_at, &outcomes[start..end], &mut report);
        }
        self.report(&report);
        error
    }

    /// Sends `claims` in batches of `batch_size` and collects one outcome per claim (`None`:
    /// its batch failed, or was not sent after an earlier batch failed), and the first error.
    async fn exchange(&self, claims: &[Claim]) -> (Vec<Option<ClaimOutcome>>, Option<StoreError>) {
        let mut outcomes: Vec<Option<ClaimOutcome>> = Vec::with_capacity(claims.len());
        let mut error: Option<StoreError> = None;
        for batch in claims.chunks(self.batch_size) {
            let unconfirmed = |c: &Counters| {
                let (r, w) = batch.iter().fold((0, 0), |(r, w), c| (r + c.returned, w + c.wanted));
                c.unconfirmed_returns.fetch_add(r, Ordering::Relaxed);
                c.unconfirmed_wants.fetch_add(w, Ordering::Relaxed);
            };
            if error.is_some() {
                unconfirmed(&self.counters);
                // After a failure the rest of the sync is not sent: it would most likely fail
                // too, each batch after a timeout. Those claims count as failed (admits less).
                outcomes.extend(batch.iter().map(|_| None));
                continue;
            }
            self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
            // The store bounds the call by the sync timeout (a cluster store then answers
            // what it has; the default fails the batch).
            let reply = self.store.claim_within(self.id, batch, self.sync_timeout).await;
            match reply {
                Ok(replies) if replies.len() == batch.len() => {
                    // Keys whose call failed alone: their fate is as unknown as a failed batch's.
                    let (r, w) = batch
                        .iter()
                        .zip(&replies)
                        .filter(|(_, o)| matches!(o, Err(KeyError::Unavailable(_))))
                        .fold((0, 0), |(r, w), (c, _)| (r + c.returned, w + c.wanted));
                    self.counters.unconfirmed_returns.fetch_add(r, Ordering::Relaxed);
                    self.counters.unconfirmed_wants.fetch_add(w, Ordering::Relaxed);
                    outcomes.extend(replies.into_iter().map(Some))
                }
                other => {
                    // Failed or ambiguous: nothing granted, returns lost, never resent.
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    unconfirmed(&self.counters);
                    outcomes.extend(batch.iter().map(|_| None));
                    error = Some(match other {
                        Err(e) => e,
                        Ok(r) => StoreError::new(
                            ErrorClass::Protocol,
                            format!("{} outcomes for {} claims", r.len(), batch.len()),
                        ),
                    });
                }
            }
        }
        self.counters.claims.fetch_add(claims.len() as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if !claims.is_empty() {
            ::metrics::histogram!(crate::metrics::SYNC_BATCH_KEYS).record(claims.len() as f64);
        }
        (outcomes, error)
    }

    fn report(&self, r: &ApplyReport) {
        self.counters.stale_claims.fetch_add(r.stale, Ordering::Relaxed);
        if r.state_lost > 0 {
            self.counters.state_losses.fetch_add(r.state_lost, Ordering::Relaxed);
            tracing::warn!(
                node = self.id,
                keys = r.state_lost,
                "tollgate: the store held less than this node's valid claims (state lost: restart, eviction or failover)"
            );
        }
        self.counters.key_errors.fetch_add(r.key_errors, Ordering::Relaxed);
        let seen = r.key_errors > 0;
        if seen && !self.key_errors_seen.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                node = self.id,
                keys = r.key_errors,
                error = r.first_key_error.as_deref().unwrap_or(""),
                "tollgate: claims failed for some keys; they use the failure policy, the others sync on"
            );
        } else if !seen {
            self.key_errors_seen.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(feature = "metrics")]
impl crate::metrics::Source for NodeInner {
    fn publish(&self) {
        use crate::metrics::*;
        use ::metrics::{counter, gauge};
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (class, i) in [
            ("transient", 0),
            ("topology", 1),
            ("config", 2),
            ("resource", 3),
            ("protocol", 4),
        ] {
            counter!(REDIS_ERRORS_TOTAL, "class" => class).absolute(get(&c.errors[i]));
        }
        counter!(REDIS_ERRORS_TOTAL, "class" => "key").absolute(get(&c.key_errors));
        gauge!(CIRCUIT_STATE).set(f64::from(self.breaker.state().as_number()));
        let held: u64 = self
            .members
            .lock()
            .iter()
            .filter_map(|(_, m)| m.upgrade())
            .map(|m| m.held())
            .sum();
        gauge!(CLAIMS_OUTSTANDING).set(held as f64);
        counter!(STATE_LOSS_TOTAL).absolute(get(&c.state_losses));
        counter!(SYNC_TASK_RESTARTS_TOTAL).absolute(get(&c.task_restarts));
        counter!(FAIL_OPEN_ADMITTED_TOTAL).absolute(get(&c.fail_open_admitted));
        counter!(CLAIMS_ON_DEMAND_TOTAL, "deferred" => "false").absolute(get(&c.on_demand));
        counter!(CLAIMS_ON_DEMAND_TOTAL, "deferred" => "true").absolute(get(&c.on_demand_deferred));
        let at = self.last_success.load(Ordering::Acquire);
        if at != 0 {
            let age = self.clock.now_ns().saturating_sub(at);
            gauge!(LAST_SYNC_AGE_SECONDS).set(age as f64 / 1e9);
        }
    }
}
