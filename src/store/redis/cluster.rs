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
//! Each call is sent at most [`CLUSTER_MAX_SENDS`] times, and never after the sync's time is up.
//! Anything else fails the call alone, and its keys report [`KeyError::Unavailable`]: the node
//! treats them like a failed batch (the failure policy answers for them) while the keys of
//! the other masters sync on. A batch fails as a whole only when all its calls fail.
//!
//! Why not redis-rs's cluster client: it sends a whole pipeline again when one of its commands
//! is redirected, and sends a command again after the connection dropped under it; both would
//! apply claims twice. This store uses redis-rs connections, one multiplexed connection per
//! master, and routes by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, Value};

use super::config::RedisConfig;
use super::error::{classify, reply_error};
use super::join::join_all;
use super::slots::{key_slot, node_addr, parse_redirect, NodeAddr, SlotMap};
use super::wire::{decode_heartbeat, decode_reply, ClaimCall, Scripts};
use crate::consts::{CLUSTER_MAX_SENDS, CLUSTER_MIN_REFRESH, CLUSTER_TRYAGAIN_PAUSE};
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

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    round_trips: AtomicU64,
    calls: AtomicU64,
    moved: AtomicU64,
    asked: AtomicU64,
    tryagain: AtomicU64,
    failed_calls: AtomicU64,
    slot_map_reads: AtomicU64,
    script_loads: AtomicU64,
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
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    /// The first seed's connection settings (user, password, TLS); other masters are reached
    /// with the same settings at their announced address.
    base: ConnectionInfo,
    seeds: Vec<NodeAddr>,
    map: parking_lot::RwLock<Option<Arc<SlotMap>>>,
    conns: parking_lot::Mutex<HashMap<NodeAddr, MultiplexedConnection>>,
    scripts: Scripts,
    /// The slot map should be read again (a connection failed, a slot moved).
    stale: AtomicBool,
    last_read: parking_lot::Mutex<Option<Instant>>,
    /// One slot-map read at a time.
    reading: tokio::sync::Mutex<()>,
    /// Masters whose last exchange failed: asked for the slot map last.
    failing: parking_lot::Mutex<std::collections::HashSet<NodeAddr>>,
    counters: Counters,
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("seeds", &self.inner.seeds)
            .finish_non_exhaustive()
    }
}

/// One script call and where it stands.
struct Call {
    cmd: Cmd,
    slot: u16,
    /// Send to this master, preceded by `ASKING` (after an `ASK` reply).
    ask: Option<NodeAddr>,
    sends: usize,
}

type CallResult = Result<Value, StoreError>;

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
            inner: Arc::new(Inner {
                config,
                base,
                seeds,
                map: parking_lot::RwLock::new(None),
                conns: parking_lot::Mutex::new(HashMap::new()),
                scripts: Scripts::new(),
                stale: AtomicBool::new(true),
                last_read: parking_lot::Mutex::new(None),
                reading: tokio::sync::Mutex::new(()),
                failing: parking_lot::Mutex::new(Default::default()),
                counters: Counters::default(),
            }),
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
        self.inner.stats()
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
        // One call per (slot, algorithm), in chunks of at most MAX_KEYS_PER_CALL claims.
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
                cmd.arg(inner.scripts.claim(*algorithm).get_hash()).arg(args.keys.len());
                for k in &args.keys {
                    cmd.arg(*k);
                }
                for a in &args.args {
                    cmd.arg(a.as_slice());
                }
                calls.push(Call {
                    cmd,
                    slot: *slot,
                    ask: None,
                    sends: 0,
                });
                members.push((*slot, chunk));
            }
        }
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let results = inner.run(calls, deadline, true).await;
        let map = inner.map.read().clone();
        let mut out: Vec<ClaimOutcome> = Vec::with_capacity(claims.len());
        out.resize_with(claims.len(), || Err(KeyError::Other(String::new())));
        let mut first_error: Option<StoreError> = None;
        let mut failed_masters = std::collections::HashSet::new();
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
                    inner.counters.failed_calls.fetch_add(1, Ordering::Relaxed);
                    // Its master, as the slot map has it now.
                    if let Some(addr) = map.as_ref().and_then(|m| m.node(slot)) {
                        failed_masters.insert(addr.clone());
                    }
                    for &i in chunk {
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
        let call = Call {
            cmd,
            slot: key_slot(key.as_bytes()),
            ask: None,
            sends: 0,
        };
        let mut results = self.inner.run(vec![call], Instant::now() + timeout, false).await;
        results
            .pop()
            .unwrap_or_else(|| Err(StoreError::new(ErrorClass::Protocol, "no result")))
    }
}

impl Inner {
    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout_value()))
            .set_response_timeout(Some(self.config.response_timeout_value()))
    }

    /// The connection to `addr`, made if there is none.
    async fn connection(&self, addr: &NodeAddr) -> Result<MultiplexedConnection, StoreError> {
        if let Some(c) = self.conns.lock().get(addr) {
            return Ok(c.clone());
        }
        let mut target = self.base.addr().clone();
        match &mut target {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                *host = addr.host.to_string();
                *port = addr.port;
            }
            _ => {
                return Err(StoreError::new(
                    ErrorClass::Config,
                    "a Redis Cluster is reached over TCP",
                ))
            }
        }
        let client = redis::Client::open(self.base.clone().set_addr(target))
            .map_err(|e| StoreError::new(ErrorClass::Config, e.to_string()))?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.connection_config())
            .await
            .map_err(|e| classify(&e))?;
        self.conns.lock().insert(addr.clone(), conn.clone());
        Ok(conn)
    }

    fn forget_connection(&self, addr: &NodeAddr) {
        self.conns.lock().remove(addr);
        self.failing.lock().insert(addr.clone());
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Sends `cmds` to `addr` as one pipeline and answers one value per command (server errors
    /// included), or fails as a whole (then any of them may or may not have run).
    async fn send(
        &self,
        addr: &NodeAddr,
        pipe: redis::Pipeline,
        n: usize,
        deadline: Instant,
    ) -> Result<Vec<Value>, StoreError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let exchange = async {
            let mut conn = self.connection(addr).await?;
            conn.req_packed_commands(&pipe, 0, n).await.map_err(|e| classify(&e))
        };
        let result = match tokio::time::timeout(left, exchange).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::new(
                ErrorClass::Transient,
                format!("{addr} did not answer in time"),
            )),
        };
        match result {
            Ok(values) if values.len() == n => {
                self.failing.lock().remove(addr);
                Ok(values)
            }
            Ok(values) => Err(StoreError::new(
                ErrorClass::Protocol,
                format!("{} replies to a pipeline of {n}", values.len()),
            )),
            Err(e) => {
                // The connection may be broken or queued behind lost replies: start afresh.
                self.forget_connection(addr);
                Err(e)
            }
        }
    }

    /// The slot map, read first if there is none, or if it is stale and was read long enough
    /// ago.
    async fn slot_map(&self, deadline: Instant) -> Result<Arc<SlotMap>, StoreError> {
        let due = self.stale.load(Ordering::Relaxed)
            && self.last_read.lock().is_none_or(|t| t.elapsed() >= CLUSTER_MIN_REFRESH);
        let current = self.map.read().clone();
        if let Some(map) = current {
            if !due {
                return Ok(map);
            }
            // A stale map still routes most calls right; a failed read keeps it.
            return Ok(self.read_map(deadline).await.unwrap_or(map));
        }
        self.read_map(deadline).await
    }

    /// Reads the slot map from a known master or a seed (the first that answers).
    async fn read_map(&self, deadline: Instant) -> Result<Arc<SlotMap>, StoreError> {
        let before = *self.last_read.lock();
        let Ok(_one) = tokio::time::timeout_at(deadline.into(), self.reading.lock()).await else {
            return Err(StoreError::new(
                ErrorClass::Transient,
                "no slot map within the sync timeout",
            ));
        };
        // Another sync read it while this one waited.
        if *self.last_read.lock() != before {
            if let Some(map) = self.map.read().clone() {
                return Ok(map);
            }
        }
        *self.last_read.lock() = Some(Instant::now());
        let mut candidates: Vec<NodeAddr> = self.map.read().as_ref().map(|m| m.nodes.clone()).unwrap_or_default();
        for s in &self.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        // A master that just failed would take the time the others could answer in.
        {
            let failing = self.failing.lock();
            candidates.sort_by_key(|a| failing.contains(a));
        }
        let mut last = StoreError::new(ErrorClass::Transient, "no seed to read the slot map from");
        for addr in candidates {
            if Instant::now() >= deadline {
                break;
            }
            self.counters.slot_map_reads.fetch_add(1, Ordering::Relaxed);
            let mut pipe = redis::pipe();
            pipe.cmd("CLUSTER").arg("SLOTS");
            let parsed = match self.send(&addr, pipe, 1, deadline).await {
                Ok(mut v) => match v.pop() {
                    Some(Value::ServerError(e)) => {
                        let e = reply_error(&e);
                        Err(StoreError::new(e.class(), format!("CLUSTER SLOTS: {}", e.message())))
                    }
                    Some(v) => SlotMap::parse(&v, &addr),
                    None => Err(StoreError::new(ErrorClass::Protocol, "no reply to CLUSTER SLOTS")),
                },
                Err(e) => Err(e),
            };
            match parsed {
                Ok(map) => {
                    let map = Arc::new(map);
                    *self.map.write() = Some(map.clone());
                    self.stale.store(false, Ordering::Relaxed);
                    return Ok(map);
                }
                // Not a cluster, or a user who may not read the map: no other seed will do better.
                Err(e) if e.class() == ErrorClass::Config => return Err(e),
                Err(e) if e.message().contains("cluster support disabled") => {
                    return Err(StoreError::new(
                        ErrorClass::Config,
                        format!("{addr} is not a cluster node (use RedisStore for a single Redis)"),
                    ))
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// What the store did since it started.
    fn stats(&self) -> ClusterStats {
        let c = &self.counters;
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
            masters: self.masters(),
        }
    }

    /// Masters in the slot map (0 before it is read).
    fn masters(&self) -> usize {
        self.map.read().as_ref().map_or(0, |m| m.nodes.len())
    }

    /// Whether any master but `except` answers `PING`.
    async fn any_other_answers(&self, except: Option<&NodeAddr>, deadline: Instant) -> bool {
        let nodes: Vec<NodeAddr> = self.map.read().as_ref().map(|m| m.nodes.clone()).unwrap_or_default();
        for addr in nodes.iter().filter(|a| Some(*a) != except) {
            let mut pipe = redis::pipe();
            pipe.cmd("PING");
            if let Ok(v) = self.send(addr, pipe, 1, deadline).await {
                if !matches!(v.first(), Some(Value::ServerError(_))) {
                    return true;
                }
            }
        }
        false
    }

    /// A `MOVED` reply: `slot` is served by `addr` now.
    fn moved(&self, slot: u16, addr: NodeAddr) {
        let mut map = self.map.write();
        if let Some(m) = map.as_ref() {
            if m.node(slot) != Some(&addr) {
                *map = Some(Arc::new(m.with(slot, addr)));
            }
        }
        self.stale.store(true, Ordering::Relaxed);
    }

    async fn load_scripts(&self, addr: &NodeAddr, deadline: Instant) {
        self.counters.script_loads.fetch_add(1, Ordering::Relaxed);
        let mut pipe = redis::pipe();
        for source in Scripts::sources() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(source);
        }
        // A failure shows again as NOSCRIPT, and the call fails when it runs out of sends.
        let _ = self.send(addr, pipe, Scripts::sources().len(), deadline).await;
    }

    /// Sends every call to the master of its slot, one pipeline per master, and follows
    /// redirections; answers one result per call, in order.
    async fn run(&self, mut calls: Vec<Call>, deadline: Instant, count: bool) -> Vec<CallResult> {
        let mut results: Vec<Option<CallResult>> = calls.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..calls.len()).collect();
        let mut pause = false;
        while !pending.is_empty() {
            if pause {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(CLUSTER_TRYAGAIN_PAUSE.min(left)).await;
                pause = false;
            }
            if Instant::now() >= deadline {
                for i in pending.drain(..) {
                    results[i] = Some(Err(StoreError::new(
                        ErrorClass::Transient,
                        "no reply within the sync timeout",
                    )));
                }
                break;
            }
            let map = match self.slot_map(deadline).await {
                Ok(m) => m,
                Err(e) => {
                    for i in pending.drain(..) {
                        results[i] = Some(Err(e.clone()));
                    }
                    break;
                }
            };
            // Route.
            let mut routes: Vec<(NodeAddr, Vec<usize>)> = Vec::new();
            for i in pending.drain(..) {
                let c = &calls[i];
                if c.sends >= CLUSTER_MAX_SENDS {
                    results[i] = Some(Err(StoreError::new(
                        ErrorClass::Transient,
                        format!("slot {} still redirected after {} sends", c.slot, c.sends),
                    )));
                    continue;
                }
                let Some(addr) = c.ask.clone().or_else(|| map.node(c.slot).cloned()) else {
                    results[i] = Some(Err(StoreError::new(
                        ErrorClass::Transient,
                        format!("CLUSTERDOWN slot {} is not served by any master", c.slot),
                    )));
                    continue;
                };
                match routes.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, v)) => v.push(i),
                    None => routes.push((addr, vec![i])),
                }
            }
            if routes.is_empty() {
                break;
            }
            // One pipeline per master, all sent at once.
            let sends: Vec<_> = routes
                .iter()
                .map(|(addr, idx)| {
                    let mut pipe = redis::pipe();
                    let mut n = 0;
                    for &i in idx {
                        if calls[i].ask.is_some() {
                            pipe.cmd("ASKING");
                            n += 1;
                        }
                        pipe.add_command(calls[i].cmd.clone());
                        n += 1;
                    }
                    self.send(addr, pipe, n, deadline)
                })
                .collect();
            if count {
                self.counters
                    .round_trips
                    .fetch_add(routes.len() as u64, Ordering::Relaxed);
                self.counters
                    .calls
                    .fetch_add(routes.iter().map(|(_, v)| v.len() as u64).sum(), Ordering::Relaxed);
            }
            let replies = join_all(sends).await;
            let mut load_on: Vec<NodeAddr> = Vec::new();
            for ((addr, idx), reply) in routes.into_iter().zip(replies) {
                let values = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        for i in idx {
                            results[i] = Some(Err(e.clone()));
                        }
                        continue;
                    }
                };
                let mut values = values.into_iter();
                for i in idx {
                    let call = &mut calls[i];
                    call.sends += 1;
                    let asked = call.ask.take();
                    if asked.is_some() {
                        // ASKING's own reply.
                        values.next();
                    }
                    let Some(v) = values.next() else {
                        results[i] = Some(Err(StoreError::new(ErrorClass::Protocol, "a reply is missing")));
                        continue;
                    };
                    let Value::ServerError(e) = v else {
                        results[i] = Some(Ok(v));
                        continue;
                    };
                    // Only replies that prove the call did not run send it again.
                    match e.code() {
                        "MOVED" => match parse_redirect(e.details(), &addr) {
                            Some((slot, to)) => {
                                self.counters.moved.fetch_add(1, Ordering::Relaxed);
                                self.moved(slot, to);
                                pending.push(i);
                            }
                            None => {
                                results[i] = Some(Err(StoreError::new(ErrorClass::Protocol, "unreadable MOVED reply")))
                            }
                        },
                        "ASK" => match parse_redirect(e.details(), &addr) {
                            Some((_, to)) => {
                                self.counters.asked.fetch_add(1, Ordering::Relaxed);
                                call.ask = Some(to);
                                pending.push(i);
                            }
                            None => {
                                results[i] = Some(Err(StoreError::new(ErrorClass::Protocol, "unreadable ASK reply")))
                            }
                        },
                        "TRYAGAIN" => {
                            self.counters.tryagain.fetch_add(1, Ordering::Relaxed);
                            call.ask = asked;
                            pause = true;
                            pending.push(i);
                        }
                        "NOSCRIPT" => {
                            call.ask = asked;
                            if !load_on.contains(&addr) {
                                load_on.push(addr.clone());
                            }
                            pending.push(i);
                        }
                        _ => results[i] = Some(Err(reply_error(&e))),
                    }
                }
            }
            for addr in &load_on {
                self.load_scripts(addr, deadline).await;
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::new(ErrorClass::Protocol, "a call was never sent"))))
            .collect()
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
                        .map
                        .read()
                        .as_ref()
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
        self.inner.conns.lock().clear();
        self.inner.stale.store(true, Ordering::Relaxed);
    }
}

/// The store's counts as `tollgate_cluster_*` metrics, labelled by its first seed. Several
/// stores with the same first seed publish the same series: use one store per cluster.
#[cfg(feature = "metrics")]
impl crate::metrics::Source for Inner {
    fn publish(&self) {
        use crate::metrics::*;
        use ::metrics::{counter, gauge};
        let s = self.stats();
        let cluster = self.seeds.first().map_or_else(String::new, NodeAddr::to_string);
        counter!(CLUSTER_ROUND_TRIPS_TOTAL, "cluster" => cluster.clone()).absolute(s.round_trips);
        for (reply, n) in [("moved", s.moved), ("ask", s.asked), ("tryagain", s.tryagain)] {
            counter!(CLUSTER_REDIRECTS_TOTAL, "reply" => reply, "cluster" => cluster.clone()).absolute(n);
        }
        counter!(CLUSTER_FAILED_CALLS_TOTAL, "cluster" => cluster.clone()).absolute(s.failed_calls);
        counter!(CLUSTER_SLOT_MAP_READS_TOTAL, "cluster" => cluster.clone()).absolute(s.slot_map_reads);
        gauge!(CLUSTER_MASTERS, "cluster" => cluster).set(s.masters as f64);
    }
}
