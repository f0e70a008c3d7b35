//! The node: one process's link to the store, and its sync task.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::Clock;
use crate::consts::MIN_CLAIM_SPAN;
use crate::store::{Claim, ClaimOutcome, KeyEncoder, NodeId, Store, StoreKey};

/// What the synchronous check does for a key this node holds no claim for yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColdStart {
    /// Deny until the first claim arrives (at most one priority sync later). Over-admission
    /// stays 0. The async check ([`Limiter::check_async`](crate::Limiter::check_async)) waits
    /// for that claim instead of denying.
    #[default]
    Deny,
    /// Admit up to `n` units before the first claim arrives; they are paid back from the first
    /// grants. Each node can over-admit a newly seen key by at most `n`.
    Optimistic(u64),
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
}

/// Counters of a node's sync activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Syncs run.
    pub syncs: u64,
    /// Store calls made for claims (one per batch).
    pub round_trips: u64,
    /// Store calls that failed (their grants are counted as lost).
    pub failed_round_trips: u64,
    /// Claims sent (one per key per sync).
    pub claims: u64,
    /// Live nodes in the registry at the last heartbeat (this one included).
    pub live_nodes: u64,
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
    fn prepare(&self, node: &NodeInner, now: u64, drain: bool, out: &mut Vec<Claim>) -> Box<dyn Any + Send>;
    /// Applies the outcomes of the claims `prepare` added (`None`: the batch failed).
    fn apply(&self, node: &NodeInner, ticket: Box<dyn Any + Send>, sent_at: u64, outcomes: &[Option<ClaimOutcome>]);
}

pub(crate) struct NodeInner {
    pub(crate) id: NodeId,
    store: Arc<dyn Store>,
    pub(crate) sync_interval: Duration,
    batch_size: usize,
    pub(crate) lease: Duration,
    pub(crate) cold_start: ColdStart,
    pub(crate) encoder: KeyEncoder,
    pub(crate) headroom_percent: u64,
    pub(crate) clock: Clock,
    registry: StoreKey,
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
    syncs: AtomicU64,
    round_trips: AtomicU64,
    failed: AtomicU64,
    claims: AtomicU64,
    live_nodes: AtomicU64,
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
        }
    }

    /// This node's id in the store (random per process).
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The sync interval.
    pub fn sync_interval(&self) -> Duration {
        self.inner.sync_interval
    }

    /// Counters of sync activity.
    pub fn stats(&self) -> NodeStats {
        let i = &self.inner;
        NodeStats {
            syncs: i.syncs.load(Ordering::Relaxed),
            round_trips: i.round_trips.load(Ordering::Relaxed),
            failed_round_trips: i.failed.load(Ordering::Relaxed),
            claims: i.claims.load(Ordering::Relaxed),
            live_nodes: i.live_nodes.load(Ordering::Relaxed),
        }
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
        let _ = self.inner.store.leave(&self.inner.registry, self.inner.id).await;
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

    /// A fixed node id (default: random per process, so a restarted process is a new node).
    pub fn id(mut self, id: NodeId) -> Self {
        self.id = Some(id);
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
        Ok(Arc::new(NodeInner {
            id: self.id.unwrap_or_else(random_id),
            store: self.store,
            sync_interval: self.sync_interval,
            batch_size: self.batch_size,
            lease,
            cold_start: self.cold_start,
            registry: self.encoder.registry_key(),
            encoder: self.encoder,
            headroom_percent: self.headroom_percent,
            clock: self.clock,
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
            syncs: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            live_nodes: AtomicU64::new(1),
        }))
    }

    /// Builds the node and spawns its sync task on the current tokio runtime.
    pub fn start(self) -> Result<Node, NodeError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| NodeError::NoRuntime)?;
        let inner = self.inner()?;
        let task = handle.spawn(run(Arc::downgrade(&inner)));
        *inner.task.lock() = Some(task);
        Ok(Node { inner })
    }

    /// Builds the node without a sync task: the caller drives it with [`Node::sync_once`]
    /// (simulations, tests, or a runtime of the caller's choosing).
    pub fn build_manual(self) -> Result<Node, NodeError> {
        Ok(Node { inner: self.inner()? })
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
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
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

    async fn sync(&self, drain: bool) {
        let _one_at_a_time = self.sync_lock.lock().await;
        self.priority.store(false, Ordering::Release);
        let members: Vec<Arc<dyn Member>> = self.members.lock().iter().filter_map(|(_, m)| m.upgrade()).collect();
        let sent_at = self.clock.now_ns();
        let mut claims = Vec::new();
        let mut tickets = Vec::with_capacity(members.len());
        for m in &members {
            let start = claims.len();
            let ticket = m.prepare(self, sent_at, drain, &mut claims);
            tickets.push((start, claims.len(), ticket));
        }
        let mut outcomes: Vec<Option<ClaimOutcome>> = Vec::with_capacity(claims.len());
        for batch in claims.chunks(self.batch_size) {
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            match self.store.claim(self.id, batch).await {
                Ok(replies) if replies.len() == batch.len() => outcomes.extend(replies.into_iter().map(Some)),
                _ => {
                    // Failed or ambiguous: nothing granted, returns lost, never resent.
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    outcomes.extend(batch.iter().map(|_| None));
                }
            }
        }
        self.claims.fetch_add(claims.len() as u64, Ordering::Relaxed);
        for (m, (start, end, ticket)) in members.iter().zip(tickets) {
            m.apply(self, ticket, sent_at, &outcomes[start..end]);
        }
        let now = self.clock.now_ns();
        let heartbeat_every = self.sync_interval.max(Duration::from_secs(1)).as_nanos() as u64;
        let last = self.last_heartbeat.load(Ordering::Relaxed);
        if !drain && (last == 0 || now.saturating_sub(last) >= heartbeat_every) {
            self.last_heartbeat.store(now.max(1), Ordering::Relaxed);
            let ttl = self.lease.max(self.sync_interval * 3);
            if let Ok(n) = self.store.heartbeat(&self.registry, self.id, ttl).await {
                self.live_nodes.store(n.max(1), Ordering::Relaxed);
            }
        }
        self.last_sync.store(now, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.synced.notify_waiters();
    }
}
