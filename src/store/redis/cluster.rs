//! [`RedisClusterStore`]: the claim protocol on Redis Cluster.
//!
//! Every key carries a hash tag that only the library writes (see [`KeyEncoder`](crate::store::KeyEncoder)), so
//! the keys of one group share a slot. A sync groups its claims by slot and algorithm (one
//! script call each), then sends **one pipeline per master** holding all of that master's
//! calls, to every master at once: a sync costs one round trip per master it touches, and
//! the masters answer in parallel.
//!
//! # Redirections and failures
//!
//! The scripts are not idempotent: a claim applied twice takes its tokens twice. A call is
//! therefore sent again only after a reply that proves it did not run:
//!
//! * `MOVED slot host:port`: the slot lives elsewhere. The slot map is corrected at once and
//!   the call goes to the new master (the whole map is read again soon after).
//! * `ASK slot host:port`: the slot is being migrated and the call's keys are on the target:
//!   the call goes there once, preceded by `ASKING`.
//! * `TRYAGAIN`: during a migration, some of the call's keys are on each side. The call is
//!   sent again after a short pause, until the slot has moved.
//! * `NOSCRIPT`: the master does not have the script (a new master, a restarted one): it is
//!   loaded there and the call sent again.
//!
//! Each call is sent at most [`CLUSTER_MAX_SENDS`](crate::consts::CLUSTER_MAX_SENDS) times, and never after the sync's time is up.
//! Anything else fails the call alone, and its keys report [`KeyError::Unavailable`]: the node
//! treats them like a failed batch (the failure policy answers for them) while the keys of
//! the other masters sync on. A batch fails as a whole only when all its calls fail.
//!
//! Why not redis-rs's cluster client: it sends a whole pipeline again when one of its commands
//! is redirected, and sends a command again after the connection dropped under it; both would
//! apply claims twice. This store uses redis-rs connections, one multiplexed connection per
//! master, and routes by itself.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, Value};

use super::config::RedisConfig;
use super::router::{Call, CallResult, Router};
use super::slots::{key_slot, node_addr};
use super::wire::{decode_heartbeat, decode_reply, ClaimCall, Scripts};
use crate::store::{
    Claim, ClaimOutcome, ErrorClass, Heartbeat, KeyError, NodeId, Store, StoreAlgorithm, StoreError, StoreFuture,
    StoreKey, MAX_KEYS_PER_CALL,
};

/// What a [`RedisClusterStore`] did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Claim batches handled (one per sync of a node, per batch).
    pub batches: u64,
    /// Pipelines sent for claim batches: one per master per send round. A batch that meets
    /// no redirection costs one per master it touches.
    pub round_trips: u64,
    /// Script calls sent (a call is one slot's claims of one algorithm).
    pub calls: u64,
    /// `MOVED` replies (a call sent to a master that no longer serves its slot).
    pub moved: u64,
    /// `ASK` replies (a call whose keys had been migrated already).
    pub asked: u64,
    /// `TRYAGAIN` replies (a call whose keys were split by a migration in progress).
    pub tryagain: u64,
    /// Script calls that failed (their keys reported [`KeyError::Unavailable`]).
    pub failed_calls: u64,
    /// Reads of the slot map (`CLUSTER SLOTS`).
    pub slot_map_reads: u64,
    /// Times the scripts were loaded on a master after `NOSCRIPT`.
    pub script_loads: u64,
    /// Masters in the current slot map.
    pub masters: usize,
}

/// The claim protocol on Redis Cluster (7.0 or later recommended): one pipeline per master
/// per sync, redirections followed without ever running a claim twice.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tollgate::store::RedisClusterStore;
/// use tollgate::{Limiter, Node, Policy};
///
/// let store = RedisClusterStore::connect(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]).await?;
/// let node = Node::builder(Arc::new(store)).start()?;
/// let per_ip: Limiter = Limiter::builder(Policy::per_minute(100)).name("ip").node(&node).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisClusterStore {
    inner: Arc<Router>,
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("seeds", &self.inner.seeds)
            .finish_non_exhaustive()
    }
}

impl RedisClusterStore {
    /// Connects to the cluster through any of `seeds` (each a [`RedisConfig`] or a URL; the
    /// first one's settings, user, password and TLS apply to every master) and reads its slot
    /// map. Fails if no seed answers.
    pub async fn connect<C: Into<RedisConfig>>(seeds: impl IntoIterator<Item = C>) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(seeds)?;
        let deadline =
            Instant::now() + store.inner.config.connect_timeout_value() + store.inner.config.response_timeout_value();
        store.inner.read_map(deadline).await?;
        Ok(store)
    }

    /// Returns at once; the slot map is read on first use, so a service can start while the
    /// cluster is down. Fails only on invalid settings.
    pub fn connect_lazy<C: Into<RedisConfig>>(seeds: impl IntoIterator<Item = C>) -> Result<Self, StoreError> {
        let mut configs = seeds.into_iter().map(Into::into);
        let Some(config) = configs.next() else {
            return Err(StoreError::new(
                ErrorClass::Config,
                "a cluster needs at least one seed URL",
            ));
        };
        let client = config.client()?;
        let base = client.get_connection_info().clone();
        let mut seeds = vec![node_addr(&base)?];
        for c in configs {
            seeds.push(node_addr(c.client()?.get_connection_info())?);
        }
        let store = RedisClusterStore {
            inner: Arc::new(Router::new(config, base, seeds)),
        };
        #[cfg(feature = "metrics")]
        {
            let weak: std::sync::Weak<dyn crate::metrics::Source> = Arc::downgrade(&store.inner) as _;
            crate::metrics::register(weak);
        }
        Ok(store)
    }

    /// What the store did since it started. With the `metrics` feature, the same counts are
    /// published as `tollgate_cluster_*` metrics (see [`crate::metrics`]), labelled by the
    /// store's first seed.
    pub fn stats(&self) -> ClusterStats {
        stats(&self.inner)
    }

    async fn claim_batch(
        &self,
        node: NodeId,
        claims: &[Claim],
        timeout: Duration,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let inner = &*self.inner;
        let deadline = Instant::now() + timeout;
        inner.counters.batches.fetch_add(1, Ordering::Relaxed);
        let (calls, members) = claim_calls(&inner.scripts, node, claims);
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let results = inner.run(calls, deadline, true).await;
        self.settle(claims.len(), members, results)
    }

    /// The outcomes of a batch of `n` claims from the results of its calls (the claims of
    /// each call in `members`), or the batch's error.
    fn settle(
        &self,
        n: usize,
        members: Vec<(u16, Vec<usize>)>,
        results: Vec<CallResult>,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let map = self.inner.current_map();
        let mut out: Vec<ClaimOutcome> = Vec::with_capacity(n);
        out.resize_with(n, || Err(KeyError::Other(String::new())));
        let mut first_error: Option<StoreError> = None;
        let mut failed_masters = HashSet::new();
        let mut any_ok = false;
        for ((slot, chunk), result) in members.into_iter().zip(results) {
            match result.and_then(|v| decode_reply(v, chunk.len())) {
                Ok(outcomes) => {
                    any_ok = true;
                    for (&i, o) in chunk.iter().zip(outcomes) {
                        out[i] = o;
                    }
                }
                Err(e) => {
                    self.inner.counters.failed_calls.fetch_add(1, Ordering::Relaxed);
                    // Its master, as the slot map has it now.
                    if let Some(addr) = map.as_ref().and_then(|m| m.node(slot)) {
                        failed_masters.insert(addr.clone());
                    }
                    for &i in &chunk {
                        out[i] = Err(KeyError::Unavailable(e.clone()));
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            // The batch fails as a whole (and the node's breaker hears of it) only when the
            // cluster as a whole failed: every call, to every master. A master down fails its
            // keys alone, which the failure policy answers for, while the others sync on.
            Some(e)
                if !any_ok
                    && (failed_masters.len() >= map.map_or(0, |m| m.nodes.len())
                        || e.class() == ErrorClass::Config) =>
            {
                Err(e)
            }
            _ => Ok(out),
        }
    }

    /// Runs one single-key command (the registry script, `ZREM`) on the master of `key`.
    async fn single(&self, key: &StoreKey, cmd: Cmd, timeout: Duration) -> Result<Value, StoreError> {
        let call = Call::new(cmd, key_slot(key.as_bytes()));
        let mut results = self.inner.run(vec![call], Instant::now() + timeout, false).await;
        results
            .pop()
            .unwrap_or_else(|| Err(StoreError::new(ErrorClass::Protocol, "no result")))
    }
}

/// The script calls of a batch: one per (slot, algorithm), in chunks of at most
/// [`MAX_KEYS_PER_CALL`] claims; and for each call, its slot and its claims (indices into
/// `claims`).
fn claim_calls(scripts: &Scripts, node: NodeId, claims: &[Claim]) -> (Vec<Call>, Vec<(u16, Vec<usize>)>) {
    let mut groups: HashMap<(u16, StoreAlgorithm), Vec<usize>> = HashMap::new();
    for (i, c) in claims.iter().enumerate() {
        groups
            .entry((key_slot(c.key.as_bytes()), c.limits.algorithm()))
            .or_default()
            .push(i);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_unstable_by_key(|((slot, alg), _)| (*slot, *alg as u8));
    let mut calls = Vec::new();
    let mut members = Vec::new();
    for ((slot, algorithm), idx) in &groups {
        for chunk in idx.chunks(MAX_KEYS_PER_CALL) {
            let args = ClaimCall::new(node, "", *algorithm, claims, chunk);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(scripts.claim(*algorithm).get_hash()).arg(args.keys.len());
            for k in &args.keys {
                cmd.arg(*k);
            }
            for a in &args.args {
                cmd.arg(a.as_slice());
            }
            calls.push(Call::new(cmd, *slot));
            members.push((*slot, chunk.to_vec()));
        }
    }
    (calls, members)
}

/// What the store did since it started.
fn stats(router: &Router) -> ClusterStats {
    let c = &router.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    ClusterStats {
        batches: get(&c.batches),
        round_trips: get(&c.round_trips),
        calls: get(&c.calls),
        moved: get(&c.moved),
        asked: get(&c.asked),
        tryagain: get(&c.tryagain),
        failed_calls: get(&c.failed_calls),
        slot_map_reads: get(&c.slot_map_reads),
        script_loads: get(&c.script_loads),
        masters: router.masters(),
    }
}

impl Store for RedisClusterStore {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        let timeout = self.inner.config.response_timeout_value();
        Box::pin(self.claim_batch(node, claims, timeout))
    }

    fn claim_within<'a>(
        &'a self,
        node: NodeId,
        claims: &'a [Claim],
        timeout: Duration,
    ) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        Box::pin(self.claim_batch(node, claims, timeout))
    }

    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        Box::pin(async move {
            let ttl_ms = ttl.as_millis().clamp(1, 1 << 40) as u64;
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.inner.scripts.registry.get_hash())
                .arg(1)
                .arg(registry.as_bytes())
                .arg(node.to_string())
                .arg(ttl_ms)
                .arg("");
            let timeout = self.inner.config.response_timeout_value();
            let deadline = Instant::now() + timeout;
            match self.single(registry, cmd, timeout).await {
                // The registry's master is one of many, and moves with its slot: its identity
                // says nothing about the other masters. The claim scripts detect lost state
                // per key.
                Ok(v) => decode_heartbeat(&v).map(|h| Heartbeat { server: 0, ..h }),
                // The registry's master is down, but the cluster is not: the node keeps its
                // last count of live nodes, and its circuit stays closed for the other keys.
                Err(e) if e.class() != ErrorClass::Config => {
                    let master = self
                        .inner
                        .current_map()
                        .and_then(|m| m.node(key_slot(registry.as_bytes())).cloned());
                    if self.inner.any_other_answers(master.as_ref(), deadline).await {
                        Ok(Heartbeat {
                            live_nodes: 0,
                            server: 0,
                        })
                    } else {
                        Err(e)
                    }
                }
                Err(e) => Err(e),
            }
        })
    }

    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(registry.as_bytes()).arg(node.to_string());
            self.single(registry, cmd, self.inner.config.response_timeout_value())
                .await
                .map(|_| ())
        })
    }

    fn reconnect(&self) {
        self.inner.reconnect();
    }
}

/// The store's counts as `tollgate_cluster_*` metrics, labelled by its first seed. Several
/// stores with the same first seed publish the same series: use one store per cluster.
#[cfg(feature = "metrics")]
impl crate::metrics::Source for Router {
    fn publish(&self) {
        use crate::metrics::*;
        use ::metrics::{counter, gauge};
        let s = stats(self);
        let cluster = self
            .seeds
            .first()
            .map_or_else(String::new, super::slots::NodeAddr::to_string);
        counter!(CLUSTER_ROUND_TRIPS_TOTAL, "cluster" => cluster.clone()).absolute(s.round_trips);
        for (reply, n) in [("moved", s.moved), ("ask", s.asked), ("tryagain", s.tryagain)] {
            counter!(CLUSTER_REDIRECTS_TOTAL, "reply" => reply, "cluster" => cluster.clone()).absolute(n);
        }
        counter!(CLUSTER_FAILED_CALLS_TOTAL, "cluster" => cluster.clone()).absolute(s.failed_calls);
        counter!(CLUSTER_SLOT_MAP_READS_TOTAL, "cluster" => cluster.clone()).absolute(s.slot_map_reads);
        gauge!(CLUSTER_MASTERS, "cluster" => cluster).set(s.masters as f64);
    }
}
