//! The routing engine of [`RedisClusterStore`](super::RedisClusterStore): one multiplexed
//! connection per master, the slot map, and the send rounds that follow redirections without
//! ever sending a call that may have run (the rules are in the `cluster` module's doc).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, Value};

use super::config::RedisConfig;
use super::error::{classify, reply_error};
use super::join::join_all;
use super::slots::{parse_redirect, NodeAddr, SlotMap};
use super::wire::Scripts;
use crate::consts::{CLUSTER_MAX_SENDS, CLUSTER_MIN_REFRESH, CLUSTER_TRYAGAIN_PAUSE};
use crate::store::{ErrorClass, StoreError};

/// What the store counts; read as [`ClusterStats`](super::ClusterStats).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) batches: AtomicU64,
    pub(super) round_trips: AtomicU64,
    pub(super) calls: AtomicU64,
    pub(super) moved: AtomicU64,
    pub(super) asked: AtomicU64,
    pub(super) tryagain: AtomicU64,
    pub(super) failed_calls: AtomicU64,
    pub(super) slot_map_reads: AtomicU64,
    pub(super) script_loads: AtomicU64,
}

/// The connections, the slot map and the scripts of one cluster.
pub(super) struct Router {
    pub(super) config: RedisConfig,
    /// The first seed's connection settings (user, password, TLS); other masters are reached
    /// with the same settings at their announced address.
    base: ConnectionInfo,
    pub(super) seeds: Vec<NodeAddr>,
    map: parking_lot::RwLock<Option<Arc<SlotMap>>>,
    conns: parking_lot::Mutex<HashMap<NodeAddr, MultiplexedConnection>>,
    pub(super) scripts: Scripts,
    /// The slot map should be read again (a connection failed, a slot moved).
    stale: AtomicBool,
    last_read: parking_lot::Mutex<Option<Instant>>,
    /// One slot-map read at a time.
    reading: tokio::sync::Mutex<()>,
    /// Masters whose last exchange failed: asked for the slot map last.
    failing: parking_lot::Mutex<HashSet<NodeAddr>>,
    pub(super) counters: Counters,
}

/// One script call and where it stands.
pub(super) struct Call {
    cmd: Cmd,
    slot: u16,
    /// Send to this master, preceded by `ASKING` (after an `ASK` reply).
    ask: Option<NodeAddr>,
    sends: usize,
}

impl Call {
    /// A call not sent yet of `cmd`, whose keys are in `slot`.
    pub(super) fn new(cmd: Cmd, slot: u16) -> Self {
        Call {
            cmd,
            slot,
            ask: None,
            sends: 0,
        }
    }
}

/// What became of one call: a reply, or an error.
pub(super) type CallResult = Result<Value, StoreError>;

/// What one call's reply in a pipeline says to do with it. Only the replies that prove the
/// call did not run send it again.
#[derive(Debug, PartialEq)]
enum Reply {
    /// It ran: its reply (a per-key error included) is its result.
    Done(Value),
    /// `MOVED`: `slot` is served by `to` now; send the call there.
    Moved { slot: u16, to: NodeAddr },
    /// `ASK`: the call's keys are on `to`, for this call only; send it there after `ASKING`.
    Ask(NodeAddr),
    /// `TRYAGAIN`: a migration split the call's keys; send it again after a pause.
    TryAgain,
    /// `NOSCRIPT`: the master lacks the scripts; load them there and send the call again.
    NoScript,
    /// Any other error, or no reply: the call fails.
    Fail(StoreError),
}

impl Reply {
    /// Reads one call's reply (`None`: missing) from the master at `from`.
    fn of(reply: Option<Value>, from: &NodeAddr) -> Reply {
        let Some(v) = reply else {
            return Reply::Fail(StoreError::new(ErrorClass::Protocol, "a reply is missing"));
        };
        let Value::ServerError(e) = v else {
            return Reply::Done(v);
        };
        match e.code() {
            "MOVED" => match parse_redirect(e.details(), from) {
                Some((slot, to)) => Reply::Moved { slot, to },
                None => Reply::Fail(StoreError::new(ErrorClass::Protocol, "unreadable MOVED reply")),
            },
            "ASK" => match parse_redirect(e.details(), from) {
                Some((_, to)) => Reply::Ask(to),
                None => Reply::Fail(StoreError::new(ErrorClass::Protocol, "unreadable ASK reply")),
            },
            "TRYAGAIN" => Reply::TryAgain,
            "NOSCRIPT" => Reply::NoScript,
            _ => Reply::Fail(reply_error(&e)),
        }
    }
}

/// The calls of one [`Router::run`] and where they stand between rounds.
struct Run {
    calls: Vec<Call>,
    results: Vec<Option<CallResult>>,
    /// The calls to send in the next round, in order.
    pending: Vec<usize>,
    /// Pause before the next round (a `TRYAGAIN`).
    pause: bool,
    /// Masters to load the scripts on before the next round (a `NOSCRIPT`).
    load_on: Vec<NodeAddr>,
}

/// The calls of one round, grouped by the master they go to.
type Routes = Vec<(NodeAddr, Vec<usize>)>;

impl Run {
    fn new(calls: Vec<Call>) -> Self {
        Run {
            results: calls.iter().map(|_| None).collect(),
            pending: (0..calls.len()).collect(),
            calls,
            pause: false,
            load_on: Vec::new(),
        }
    }

    /// Every pending call fails with `e`.
    fn fail_pending(&mut self, e: &StoreError) {
        for i in self.pending.drain(..) {
            self.results[i] = Some(Err(e.clone()));
        }
    }

    /// Groups the pending calls by the master of their slot (or of their `ASK`); a call out of
    /// sends or whose slot has no master fails.
    fn route(&mut self, map: &SlotMap) -> Routes {
        let mut routes: Routes = Vec::new();
        for i in self.pending.drain(..) {
            let c = &self.calls[i];
            if c.sends >= CLUSTER_MAX_SENDS {
                self.results[i] = Some(Err(StoreError::new(
                    ErrorClass::Transient,
                    format!("slot {} still redirected after {} sends", c.slot, c.sends),
                )));
                continue;
            }
            let Some(addr) = c.ask.clone().or_else(|| map.node(c.slot).cloned()) else {
                self.results[i] = Some(Err(StoreError::new(
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
        routes
    }

    /// The results, one per call, in order.
    fn finish(self) -> Vec<CallResult> {
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::new(ErrorClass::Protocol, "a call was never sent"))))
            .collect()
    }
}

impl Router {
    /// A router for the cluster of `seeds`, reached with `config`'s settings and `base`'s
    /// credentials; it connects on first use.
    pub(super) fn new(config: RedisConfig, base: ConnectionInfo, seeds: Vec<NodeAddr>) -> Self {
        Router {
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
        }
    }

    /// The slot map as it is now (`None` before it is read).
    pub(super) fn current_map(&self) -> Option<Arc<SlotMap>> {
        self.map.read().clone()
    }

    /// Drops every connection and reads the slot map again before the next call.
    pub(super) fn reconnect(&self) {
        self.conns.lock().clear();
        self.stale.store(true, Ordering::Relaxed);
    }

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
    pub(super) async fn read_map(&self, deadline: Instant) -> Result<Arc<SlotMap>, StoreError> {
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

    /// Masters in the slot map (0 before it is read).
    pub(super) fn masters(&self) -> usize {
        self.map.read().as_ref().map_or(0, |m| m.nodes.len())
    }

    /// Whether any master but `except` answers `PING`.
    pub(super) async fn any_other_answers(&self, except: Option<&NodeAddr>, deadline: Instant) -> bool {
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

    /// Loads every script on `addr` (after `NOSCRIPT`).
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
    pub(super) async fn run(&self, calls: Vec<Call>, deadline: Instant, count: bool) -> Vec<CallResult> {
        let mut run = Run::new(calls);
        while !run.pending.is_empty() {
            if std::mem::take(&mut run.pause) {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(CLUSTER_TRYAGAIN_PAUSE.min(left)).await;
            }
            if Instant::now() >= deadline {
                run.fail_pending(&StoreError::new(
                    ErrorClass::Transient,
                    "no reply within the sync timeout",
                ));
                break;
            }
            let map = match self.slot_map(deadline).await {
                Ok(m) => m,
                Err(e) => {
                    run.fail_pending(&e);
                    break;
                }
            };
            let routes = run.route(&map);
            if routes.is_empty() {
                break;
            }
            let replies = self.send_round(&run.calls, &routes, deadline, count).await;
            for ((addr, idx), reply) in routes.into_iter().zip(replies) {
                self.settle(&mut run, &addr, idx, reply);
            }
            for addr in std::mem::take(&mut run.load_on) {
                self.load_scripts(&addr, deadline).await;
            }
        }
        run.finish()
    }

    /// Sends one pipeline per master, all at once; answers one reply per route, in order.
    async fn send_round(
        &self,
        calls: &[Call],
        routes: &Routes,
        deadline: Instant,
        count: bool,
    ) -> Vec<Result<Vec<Value>, StoreError>> {
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
        join_all(sends).await
    }

    /// Settles the calls `idx` that were sent to `addr` with the pipeline's `reply`: each is
    /// done, failed, or pending again for the next round.
    fn settle(&self, run: &mut Run, addr: &NodeAddr, idx: Vec<usize>, reply: Result<Vec<Value>, StoreError>) {
        let values = match reply {
            Ok(v) => v,
            Err(e) => {
                for i in idx {
                    run.results[i] = Some(Err(e.clone()));
                }
                return;
            }
        };
        let mut values = values.into_iter();
        for i in idx {
            let call = &mut run.calls[i];
            call.sends += 1;
            let asked = call.ask.take();
            if asked.is_some() {
                // ASKING's own reply.
                values.next();
            }
            match Reply::of(values.next(), addr) {
                Reply::Done(v) => run.results[i] = Some(Ok(v)),
                Reply::Fail(e) => run.results[i] = Some(Err(e)),
                Reply::Moved { slot, to } => {
                    self.counters.moved.fetch_add(1, Ordering::Relaxed);
                    self.moved(slot, to);
                    run.pending.push(i);
                }
                Reply::Ask(to) => {
                    self.counters.asked.fetch_add(1, Ordering::Relaxed);
                    call.ask = Some(to);
                    run.pending.push(i);
                }
                Reply::TryAgain => {
                    self.counters.tryagain.fetch_add(1, Ordering::Relaxed);
                    call.ask = asked;
                    run.pause = true;
                    run.pending.push(i);
                }
                Reply::NoScript => {
                    call.ask = asked;
                    if !run.load_on.contains(addr) {
                        run.load_on.push(addr.clone());
                    }
                    run.pending.push(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> Option<Value> {
        let reply = format!("-{text}\r\n");
        Some(redis::parse_redis_value(reply.as_bytes()).unwrap())
    }

    #[test]
    fn only_replies_that_prove_a_call_did_not_run_send_it_again() {
        let from = NodeAddr::parse("10.0.0.9:7000", "").unwrap();
        let to = NodeAddr::parse("127.0.0.1:6381", "").unwrap();
        assert_eq!(
            Reply::of(error("MOVED 3999 127.0.0.1:6381"), &from),
            Reply::Moved {
                slot: 3999,
                to: to.clone()
            }
        );
        assert_eq!(Reply::of(error("ASK 3999 127.0.0.1:6381"), &from), Reply::Ask(to));
        assert_eq!(Reply::of(error("TRYAGAIN keys split"), &from), Reply::TryAgain);
        assert_eq!(Reply::of(error("NOSCRIPT no script"), &from), Reply::NoScript);
        assert_eq!(Reply::of(Some(Value::Int(1)), &from), Reply::Done(Value::Int(1)));
        // A call that may have run, or whose redirection cannot be read, is not sent again.
        for reply in [
            error("ERR script failed"),
            error("BUSY a script is running"),
            error("MOVED nonsense"),
            error("ASK 3999"),
            None,
        ] {
            assert!(matches!(Reply::of(reply, &from), Reply::Fail(_)));
        }
        let Reply::Fail(e) = Reply::of(error("NOPERM no"), &from) else {
            panic!("NOPERM is sent again")
        };
        assert_eq!(e.class(), ErrorClass::Config);
    }
}
