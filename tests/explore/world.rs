//! Runs one schedule on the real code: nodes, limiters and the `MemoryStore` on virtual time,
//! every in-flight sync polled by hand on one thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};

use tollgate::store::{ClaimOutcome, ManualTime, MemoryStore, Store, StoreKey};
use tollgate::{check_all, node::CircuitState, ColdStart, Decision, Limiter, ManualClock, Node};

use crate::net::{Done, Net};
use crate::oracle::{Oracle, Violation};
use crate::schedule::{Action, ClockSpec, Cost, Faults, IdChoice, Scenario, KEYS};

/// Most node processes alive at once (starts beyond it are skipped).
const MAX_NODES: usize = 6;
/// Keys a limiter tracks (a schedule uses at most two; a small table builds fast).
const LIMITER_KEYS: usize = 16;
/// Polling passes after an action (each pass polls every in-flight operation once).
const POLL_PASSES: usize = 8;

/// An admission a finished operation reports: limiter, key, decision, cost.
type Admission = (usize, usize, Decision, u64);

/// An operation in flight on a node: a sync (or a shutdown), or a check waiting for a claim on
/// demand (which reports its decision when it ends).
struct Op {
    sync: bool,
    fut: Pin<Box<dyn Future<Output = Option<Admission>>>>,
}

impl Op {
    fn sync(fut: impl Future<Output = ()> + 'static) -> Op {
        Op {
            sync: true,
            fut: Box::pin(async move {
                fut.await;
                None
            }),
        }
    }
}

/// Most checks waiting for a claim on demand at once on one node.
const MAX_WAITING_CHECKS: usize = 6;

/// One node process.
struct Proc {
    inc: u64,
    id: u64,
    node: Node,
    limiters: [Limiter; 2],
    clock: ManualClock,
    spec: ClockSpec,
    ops: Vec<Op>,
    /// Divides the policy while degraded: at least this (`expected_nodes`).
    expected: u64,
}

/// Counts of what a schedule exercised.
#[derive(Default, Clone, Copy, Debug)]
pub struct Tally {
    pub steps: u64,
    pub admitted: u64,
    pub degraded_admitted: u64,
    pub late_applies: u64,
    /// Late calls applied after a newer call of the same node.
    pub late_over_newer: u64,
    pub timeouts: u64,
    pub dup_live_ids: u64,
    pub crashes: u64,
    pub store_restarts: u64,
    pub circuit_opened: u64,
    /// Store calls made on demand for waiting checks.
    pub claims_on_demand: u64,
    /// Calls on demand past the budget, left to the next sync.
    pub claims_on_demand_deferred: u64,
    /// Cost admitted by checks that waited for a claim on demand.
    pub waited_admitted: u64,
}

impl Tally {
    /// Adds another schedule's counts.
    pub fn add(&mut self, o: &Tally) {
        self.steps += o.steps;
        self.admitted += o.admitted;
        self.degraded_admitted += o.degraded_admitted;
        self.late_applies += o.late_applies;
        self.late_over_newer += o.late_over_newer;
        self.timeouts += o.timeouts;
        self.dup_live_ids += o.dup_live_ids;
        self.crashes += o.crashes;
        self.store_restarts += o.store_restarts;
        self.circuit_opened += o.circuit_opened;
        self.claims_on_demand += o.claims_on_demand;
        self.claims_on_demand_deferred += o.claims_on_demand_deferred;
        self.waited_admitted += o.waited_admitted;
    }
}

/// A schedule being run.
pub struct World<'a> {
    sc: &'a Scenario,
    faults: Faults,
    net: Arc<Net>,
    store: Arc<MemoryStore>,
    store_time: ManualTime,
    /// True time (ns since the start).
    t: u64,
    procs: Vec<Proc>,
    next_inc: u64,
    oracle: Oracle,
    trace: bool,
    /// Timed-out calls still in flight, by sequence number (to count late applies).
    stale: Vec<u64>,
    pub tally: Tally,
}

fn fmt_outcomes(out: &[ClaimOutcome]) -> String {
    out.iter()
        .map(|o| match o {
            Ok(g) => {
                let mut s = format!("granted {} remaining {}", g.granted, g.remaining);
                if g.revoked > 0 {
                    s += &format!(" revoked {}", g.revoked);
                }
                if g.state_lost {
                    s += " state_lost";
                }
                s
            }
            Err(e) => format!("error {e}"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl<'a> World<'a> {
    /// The world of `sc` at true time 0, its first nodes started.
    pub fn new(sc: &'a Scenario, faults: Faults, trace: bool) -> Self {
        let store_time = ManualTime::new(sc.store_origin_us);
        let store = Arc::new(MemoryStore::with_time_source(store_time.source()));
        let mut keys = Vec::new();
        for (l, p) in sc.policies.iter().enumerate() {
            for k in KEYS.iter().take(sc.keys) {
                keys.push((format!("{}/{k}", ["a", "b"][l]), p.clone()));
            }
        }
        let cold_n = match sc.cold {
            ColdStart::Optimistic(n) => n,
            ColdStart::Deny => 0,
        };
        let mut w = World {
            sc,
            faults,
            net: Arc::new(Net::new(store.clone())),
            store,
            store_time,
            t: 0,
            procs: Vec::new(),
            next_inc: 0,
            oracle: Oracle::new(keys, cold_n),
            trace,
            stale: Vec::new(),
            tally: Tally::default(),
        };
        for (id, spec) in sc.nodes.clone() {
            w.start(id, spec);
        }
        w
    }

    fn log(&self, s: impl FnOnce() -> String) {
        if self.trace {
            println!("    {:>14}  {}", crate::fmt_t(self.t), s());
        }
    }

    fn node_ns(&self, spec: &ClockSpec) -> u64 {
        let t = i128::from(self.t);
        (i128::from(spec.origin) + t + t * i128::from(spec.ppm) / 1_000_000) as u64
    }

    fn store_us(&self) -> u64 {
        self.sc.store_origin_us + self.t / 1000
    }

    fn set_time(&mut self, t: u64) {
        self.t = t;
        self.store_time.set_us(self.store_us());
        for p in &self.procs {
            p.clock.set_ns(self.node_ns(&p.spec));
        }
    }

    fn start(&mut self, id: u64, spec: ClockSpec) {
        let clock = ManualClock::new();
        clock.set_ns(self.node_ns(&spec));
        let sc = self.sc;
        let mut b = Node::builder(self.net.clone() as Arc<dyn Store>)
            .clock(clock.clock())
            .id(id)
            .sync_interval(sc.interval)
            .cold_start(sc.cold)
            .failure_policy(sc.failure)
            .failure_threshold(sc.threshold)
            .expected_nodes(sc.expected_nodes)
            .claims_on_demand_per_second(sc.on_demand)
            .open_backoff(sc.interval / 2, sc.interval * 3 / 2);
        if let Some(lease) = sc.lease {
            b = b.lease(lease);
        }
        let node = b.build_manual().expect("valid node settings");
        let lim = |i: usize| -> Limiter {
            Limiter::builder(sc.policies[i].clone())
                .name(["a", "b"][i])
                .max_keys(LIMITER_KEYS)
                .node(&node)
                .build()
                .expect("valid limiter")
        };
        let limiters = [lim(0), lim(1)];
        let inc = self.next_inc;
        self.next_inc += 1;
        self.log(|| format!("node incarnation #{inc} starts: id {id}, clock {:+} ppm", spec.ppm));
        self.procs.push(Proc {
            inc,
            id,
            node,
            limiters,
            clock,
            spec,
            ops: Vec::new(),
            expected: sc.expected_nodes,
        });
    }

    /// Polls every in-flight operation until none progresses, and records what the checks
    /// that ended admitted.
    fn poll(&mut self) -> Result<(), Violation> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut ended = Vec::new();
        for _ in 0..POLL_PASSES {
            let mut progressed = false;
            for (i, p) in self.procs.iter_mut().enumerate() {
                let before = p.ops.len();
                p.ops.retain_mut(|op| match op.fut.as_mut().poll(&mut cx) {
                    std::task::Poll::Pending => true,
                    std::task::Poll::Ready(admission) => {
                        ended.extend(admission.map(|a| (i, a)));
                        false
                    }
                });
                progressed |= p.ops.len() != before;
            }
            if !progressed {
                break;
            }
        }
        for (p, (lim, key, d, cost)) in ended {
            self.log(|| {
                format!(
                    "node[{p}] waiting check {}/{}: {}",
                    ["a", "b"][lim],
                    KEYS[key],
                    verdict(&d, cost)
                )
            });
            if d.is_allowed() {
                self.tally.waited_admitted += cost;
            }
            self.record(p, lim, key, &d, cost)?;
        }
        Ok(())
    }

    fn proc_index(&self, pick: usize) -> Option<usize> {
        (!self.procs.is_empty()).then(|| pick % self.procs.len())
    }

    fn record(&mut self, p: usize, lim: usize, key: usize, d: &Decision, cost: u64) -> Result<(), Violation> {
        if !d.is_allowed() || cost == 0 {
            return Ok(());
        }
        let proc = &self.procs[p];
        let degraded = d.is_degraded();
        let div = if degraded {
            proc.node.stats().live_nodes.max(proc.expected).max(1)
        } else {
            1
        };
        self.tally.admitted += cost;
        if degraded {
            self.tally.degraded_admitted += cost;
        }
        let (inc, node_ns) = (proc.inc, proc.clock.now_ns());
        self.oracle.admit(
            inc,
            lim * self.sc.keys + key,
            cost,
            self.t,
            self.store_us(),
            node_ns,
            degraded,
            div,
        )
    }

    fn cost_of(&self, lim: usize, c: Cost) -> u64 {
        let cap = self.sc.policies[lim].capacity();
        match c {
            Cost::One => 1,
            Cost::Some(n) => n.min(cap),
            Cost::Capacity => cap,
        }
    }

    /// The shape of [`Action::LateOverNewer`]: a node's call times out and stays in flight, its
    /// next call is applied and answered, then the first is applied.
    fn late_over_newer(&mut self, node: usize) -> Result<(), Violation> {
        let Some(p) = self.proc_index(node) else { return Ok(()) };
        if !self.faults.late || self.procs[p].ops.iter().any(|o| o.sync) {
            return Ok(());
        }
        // The store identity of the process (its calls carry it), not its pool id.
        let id = self.procs[p].node.id();
        let sync = |w: &mut Self| -> Result<Option<usize>, Violation> {
            let n = w.procs[p].node.clone();
            w.procs[p].ops.push(Op::sync(async move { n.sync_once().await }));
            w.poll()?;
            Ok(w.net.newest_unanswered_of(id))
        };
        let Some(first) = sync(self)? else { return Ok(()) };
        let (who, done) = self.net.time_out(first, true);
        let Some((seq, _)) = who else { return Ok(()) };
        self.applied(who, done, "");
        self.poll()?;
        if let Some(newer) = sync(self)? {
            let (who, done) = self.net.deliver(newer);
            self.applied(who, done, "applied");
            self.poll()?;
        }
        if let Some(late) = self.net.index_of(seq) {
            let (who, done) = self.net.deliver(late);
            if matches!(done, Done::Applied(_)) {
                self.tally.late_over_newer += 1;
            }
            self.applied(who, done, "applied");
        }
        self.poll()
    }

    fn applied(&mut self, who: Option<(u64, u64)>, done: Done, what: &str) {
        let Some((seq, node)) = who else { return };
        match done {
            Done::Applied(out) => {
                let late = self.stale.contains(&seq);
                if late {
                    self.tally.late_applies += 1;
                    self.stale.retain(|s| *s != seq);
                }
                self.log(|| {
                    format!(
                        "call #{seq} of id {node} {what}{}: {}",
                        if late { " (late: its caller timed out)" } else { "" },
                        fmt_outcomes(&out)
                    )
                });
            }
            Done::TimedOut => {
                self.tally.timeouts += 1;
                self.stale.push(seq);
                self.log(|| format!("call #{seq} of id {node}: caller got a timeout, call still in flight"));
            }
            Done::Lost => {
                self.stale.retain(|s| *s != seq);
                self.log(|| format!("call #{seq} of id {node} lost"));
            }
            Done::Nothing => {}
        }
    }

    /// Runs one action, then polls; `Err` when the bound broke.
    pub fn step(&mut self, a: &Action) -> Result<(), Violation> {
        self.tally.steps += 1;
        if self.trace {
            println!("  {:>14}  {a}", crate::fmt_t(self.t));
        }
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = self.act(a);
            let polled = self.poll();
            r.and(polled)
        }));
        caught.unwrap_or_else(|_| {
            Err(Violation {
                text: format!("panic: {}", crate::last_panic()),
            })
        })
    }

    fn act(&mut self, a: &Action) -> Result<(), Violation> {
        match *a {
            Action::Advance(ns) => self.set_time(self.t + ns),
            Action::ToLeaseEdge(past) => {
                let lease_us = self.sc.lease().as_micros() as u64;
                let now = self.store_us() + lease_us / 2;
                let edge = (now / lease_us + 1) * lease_us;
                let target = (edge - self.sc.store_origin_us) as i64 * 1000 + past;
                if target > self.t as i64 {
                    self.set_time(target as u64);
                }
            }
            Action::ToWindowEdge { lim, past } => {
                let w_us = self.sc.policies[lim].duration().as_micros() as u64;
                let now = self.store_us();
                let edge = (now / w_us + 1) * w_us;
                let target = (edge - self.sc.store_origin_us) as i64 * 1000 + past;
                if target > self.t as i64 {
                    self.set_time(target as u64);
                }
            }
            Action::Check { node, lim, key, cost } => {
                let Some(p) = self.proc_index(node) else { return Ok(()) };
                let c = self.cost_of(lim, cost);
                let d = self.procs[p].limiters[lim]
                    .check_n(KEYS[key], c)
                    .expect("cost within capacity");
                self.log(|| format!("-> {}", verdict(&d, c)));
                self.record(p, lim, key, &d, c)?;
            }
            Action::Burst { node, lim, key, count } => {
                let Some(p) = self.proc_index(node) else { return Ok(()) };
                let (mut yes, mut degraded) = (0, 0);
                for _ in 0..count {
                    let d = self.procs[p].limiters[lim].check(KEYS[key]);
                    yes += u64::from(d.is_allowed());
                    degraded += u64::from(d.is_allowed() && d.is_degraded());
                    self.record(p, lim, key, &d, 1)?;
                }
                self.log(|| format!("-> {yes} of {count} allowed ({degraded} degraded)"));
            }
            Action::CheckRefund {
                node,
                lim,
                key,
                cost,
                by_decision,
            } => {
                let Some(p) = self.proc_index(node) else { return Ok(()) };
                let c = self.cost_of(lim, cost);
                let l = &self.procs[p].limiters[lim];
                let d = l.check_n(KEYS[key], c).expect("cost within capacity");
                if d.is_allowed() {
                    // Admitted and refunded: the work did not happen; it counts for nothing.
                    if by_decision {
                        l.refund_decision(KEYS[key], &d);
                    } else {
                        l.refund(KEYS[key], c);
                    }
                }
                self.log(|| format!("-> {} (refunded)", verdict(&d, c)));
            }
            Action::CheckAll { node, key, cost } => {
                let Some(p) = self.proc_index(node) else { return Ok(()) };
                // Only while the circuit is closed: a degraded layer would not be told apart
                // in the combined decision.
                if self.procs[p].node.circuit() != CircuitState::Closed {
                    return Ok(());
                }
                let c = cost
                    .min(self.sc.policies[0].capacity())
                    .min(self.sc.policies[1].capacity());
                let ls = &self.procs[p].limiters;
                let d = check_all(c, &[&ls[0].bind(KEYS[key]), &ls[1].bind(KEYS[key])]).expect("cost within capacity");
                self.log(|| format!("-> {}", verdict(&d, c)));
                if d.is_allowed() {
                    self.record(p, 0, key, &d, c)?;
                    self.record(p, 1, key, &d, c)?;
                }
            }
            Action::CheckAsync {
                node,
                lim,
                key,
                cost,
                count,
            } => {
                let Some(p) = self.proc_index(node) else { return Ok(()) };
                let c = self.cost_of(lim, cost);
                let proc = &mut self.procs[p];
                for _ in 0..count {
                    if proc.ops.iter().filter(|o| !o.sync).count() >= MAX_WAITING_CHECKS {
                        break;
                    }
                    let l = proc.limiters[lim].clone();
                    proc.ops.push(Op {
                        sync: false,
                        fut: Box::pin(async move {
                            let d = l.check_n_async(KEYS[key], c).await.expect("cost within capacity");
                            Some((lim, key, d, c))
                        }),
                    });
                }
            }
            Action::Sync { node } => {
                let Some(p) = self.proc_index(node) else { return Ok(()) };
                let proc = &mut self.procs[p];
                if proc.ops.iter().filter(|o| o.sync).count() < 2 {
                    let n = proc.node.clone();
                    proc.ops.push(Op::sync(async move { n.sync_once().await }));
                }
            }
            Action::Deliver { call } => {
                let (who, done) = self.net.deliver(call);
                self.applied(who, done, "applied");
            }
            Action::ApplyOnly { call } => {
                let (who, done) = self.net.apply_only(call);
                self.applied(who, done, "applied (reply on its way)");
            }
            Action::TimeOut { call, late } => {
                let (who, done) = self.net.time_out(call, late && self.faults.late);
                self.applied(who, done, "");
            }
            Action::Lose { call } => {
                let (who, done) = self.net.lose(call);
                self.applied(who, done, "");
            }
            Action::LateOverNewer { node } => self.late_over_newer(node)?,
            Action::Quiet { rounds } => {
                for _ in 0..rounds {
                    self.set_time(self.t + self.sc.interval.as_nanos() as u64);
                    for p in &mut self.procs {
                        if !p.ops.iter().any(|o| o.sync) {
                            let n = p.node.clone();
                            p.ops.push(Op::sync(async move { n.sync_once().await }));
                        }
                    }
                    for _ in 0..16 {
                        self.poll()?;
                        let Some(i) = self.net.first_unanswered() else { break };
                        let (who, done) = self.net.deliver(i);
                        self.applied(who, done, "applied");
                    }
                }
            }
            Action::Crash { node } => {
                if let Some(p) = self.proc_index(node) {
                    let gone = self.procs.remove(p);
                    self.tally.crashes += 1;
                    self.log(|| format!("node incarnation #{} (id {}) is gone", gone.inc, gone.id));
                }
            }
            Action::Start { id, clock } => {
                if self.procs.len() >= MAX_NODES {
                    return Ok(());
                }
                let live = |w: &Self, id: u64| w.procs.iter().any(|p| p.id == id);
                let id = match id {
                    IdChoice::Live(i) if self.faults.dup_id && !self.procs.is_empty() => {
                        self.tally.dup_live_ids += 1;
                        self.procs[i % self.procs.len()].id
                    }
                    IdChoice::Pool(i) if !live(self, i) => i,
                    IdChoice::Pool(i) if self.faults.dup_id => {
                        self.tally.dup_live_ids += 1;
                        i
                    }
                    _ => {
                        let mut i = 1;
                        while live(self, i) {
                            i += 1;
                        }
                        i
                    }
                };
                self.start(id, clock);
            }
            Action::Shutdown { node } => {
                if let Some(p) = self.proc_index(node) {
                    let proc = &mut self.procs[p];
                    let n = proc.node.clone();
                    proc.ops.push(Op::sync(async move { n.shutdown().await }));
                }
            }
            Action::StoreRestart => {
                self.store.clear();
                self.tally.store_restarts += 1;
                self.oracle.store_restarted(self.t);
            }
            Action::Outage(down) => self.net.set_down(down),
            Action::KeyLoss { key } => {
                let Some(k) = self.net.key(key) else { return Ok(()) };
                let Some(index) = self.oracle_key(&k) else {
                    return Ok(());
                };
                if self.store.remove(&k) {
                    self.log(|| format!("store key #{index} lost"));
                    self.oracle.key_lost(index, self.t);
                }
            }
        }
        Ok(())
    }

    /// The oracle's index of a store key: the limiter is the first byte of the namespace (after
    /// the hash tag and the namespace length), the key the identifier at the end.
    fn oracle_key(&self, k: &StoreKey) -> Option<usize> {
        let b = k.as_bytes();
        let tag_end = b.iter().position(|&c| c == b'}')?;
        let colon = tag_end + b[tag_end..].iter().position(|&c| c == b':')?;
        let lim = ["a", "b"]
            .iter()
            .position(|n| b.get(colon + 1) == Some(&n.as_bytes()[0]))?;
        let key = KEYS.iter().position(|id| b.ends_with(format!("r{id}").as_bytes()))?;
        (key < self.sc.keys).then_some(lim * self.sc.keys + key)
    }

    /// Counts what the nodes saw (at the end of a schedule).
    pub fn finish(&mut self) {
        self.tally.circuit_opened += self.procs.iter().map(|p| p.node.stats().circuit_opened).sum::<u64>();
        self.tally.claims_on_demand += self.procs.iter().map(|p| p.node.stats().claims_on_demand).sum::<u64>();
        self.tally.claims_on_demand_deferred += self
            .procs
            .iter()
            .map(|p| p.node.stats().claims_on_demand_deferred)
            .sum::<u64>();
    }
}

fn verdict(d: &Decision, cost: u64) -> String {
    format!(
        "{} cost {cost}{}",
        if d.is_allowed() { "allowed" } else { "denied" },
        if d.is_degraded() { " (degraded)" } else { "" }
    )
}
