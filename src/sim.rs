//! The simulation behind `tollgate tune`: N nodes share one limit through a store, under a
//! load shape, and an oracle measures what they admitted against the ideal.
//!
//! [`run_virtual`] runs on virtual time ([`MemoryStore`] and a
//! [`ManualClock`]): deterministic for a seed, and minutes of traffic take a fraction of a
//! second. [`run_real`] runs on the wall clock against any store (a real Redis), each node
//! with its own sync task; it alone can drive [`Limiter::check_async`] ([`CheckMode::Async`])
//! and measure how long a check waits for its claim.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, ManualClock};
use crate::distributed::{ColdStart, Node};
use crate::policy::{Algorithm, Policy};
use crate::store::{ManualTime, MemoryStore, Store};
use crate::Limiter;

/// How offered load is spread over the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skew {
    /// Every node gets the same share.
    Uniform,
    /// 80% of the load on 20% of the nodes (at least one).
    Skewed,
}

/// Which check the simulated requests make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckMode {
    /// [`Limiter::check`]: answered at once from what the node holds (the cold-start rule for
    /// a key it holds nothing for).
    #[default]
    Sync,
    /// [`Limiter::check_async`], each request in a task of its own: a key the node holds
    /// nothing for waits for its claim. Only [`run_real`] drives it (virtual time carries no
    /// latency); [`run_virtual`] makes synchronous checks whatever this says.
    Async,
}

/// One simulated case.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Number of nodes sharing the limit.
    pub nodes: usize,
    /// The shared policy.
    pub policy: Policy,
    /// Each node's sync interval.
    pub sync_interval: Duration,
    /// Offered load as a multiple of the policy's rate.
    pub load: f64,
    /// Spread of the load over nodes.
    pub skew: Skew,
    /// Length of the run.
    pub duration: Duration,
    /// Cold-start rule of the nodes.
    pub cold_start: ColdStart,
    /// Seed of the arrival process.
    pub seed: u64,
    /// Keys the load is spread over, uniformly (the oracle judges each key).
    pub keys: usize,
    /// The identifiers of the keys, when not the default `key-0`, `key-1`, ... (then `keys` is
    /// ignored). Any bytes go: braces, colons, non-ASCII.
    pub identifiers: Vec<String>,
    /// Node `i` sends its first request after `i * stagger`, so late nodes start cold while
    /// the others are already spending the quota.
    pub stagger: Duration,
    /// Which check the requests make.
    pub check: CheckMode,
}

impl Scenario {
    /// 8 nodes, one key, 30 s, sync 100 ms, load 1.5x uniform, cold start `Deny`.
    pub fn new(policy: Policy) -> Self {
        Scenario {
            nodes: 8,
            policy,
            sync_interval: Duration::from_millis(100),
            load: 1.5,
            skew: Skew::Uniform,
            duration: Duration::from_secs(30),
            cold_start: ColdStart::Deny,
            seed: 1,
            keys: 1,
            identifiers: Vec::new(),
            stagger: Duration::ZERO,
            check: CheckMode::Sync,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Cost offered.
    pub offered: u64,
    /// Cost admitted by all nodes.
    pub admitted: u64,
    /// What one exact limiter would have admitted of the offered load.
    pub ideal: u64,
    /// The largest excess over the bound on any interval (token bucket) or window (windows).
    pub over_admitted: u64,
    /// `admitted / ideal`.
    pub utilization: f64,
    /// Store calls per second of run time, all nodes together.
    pub round_trips_per_s: f64,
    /// 99th percentile of one check's latency, in nanoseconds: from the request's arrival to
    /// its decision under [`CheckMode::Async`].
    pub check_p99_ns: u64,
    /// Median of one check's latency, in nanoseconds (as `check_p99_ns`).
    pub check_p50_ns: u64,
    /// Checks made.
    pub checks: u64,
    /// Store calls that failed or timed out, all nodes together.
    pub failed_round_trips: u64,
    /// Times a node's circuit opened, all nodes together (0 while the store is healthy).
    pub circuit_opened: u64,
    /// Cost admitted by the failure policy while a circuit was open.
    pub degraded_admitted: u64,
}

/// A small deterministic generator (splitmix64), seeded by its value.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An exponential gap in nanoseconds with the given mean (at least 1).
    pub fn exp(&mut self, mean_ns: f64) -> u64 {
        let u = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        (-u.ln() * mean_ns) as u64 + 1
    }

    /// A number below `n` (> 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Each node's share of the load.
fn shares(n: usize, skew: Skew) -> Vec<f64> {
    match skew {
        Skew::Uniform => vec![1.0 / n as f64; n],
        Skew::Skewed => {
            let hot = (n / 5).max(1);
            let cold = n - hot;
            (0..n)
                .map(|i| {
                    if i < hot {
                        0.8 / hot as f64
                    } else if cold > 0 {
                        0.2 / cold as f64
                    } else {
                        0.0
                    }
                })
                .collect()
        }
    }
}

fn rate_per_ns(p: &Policy) -> f64 {
    p.points() as f64 / p.duration().as_nanos() as f64
}

/// The oracle: ideal admission and the largest excess over the bound.
///
/// `admitted` and `offered` are `(time ns, cost)` in time order. Token bucket: the bound over
/// `[t_i, t_j]` is `capacity + rate * (t_j - t_i)`; windows: `points` per aligned window of the
/// store's clock (`epoch_ns` is the store time of local time 0).
pub fn oracle(
    policy: &Policy,
    offered: &[(u64, u64)],
    admitted: &[(u64, u64)],
    epoch_ns: u64,
    span_ns: u64,
) -> (u64, u64) {
    let cap = policy.capacity() as f64;
    match policy.get_algorithm() {
        Algorithm::TokenBucket => {
            let r = rate_per_ns(policy);
            // Over-admission: max over i <= j of S(i..=j) - cap - r (t_j - t_i).
            let (mut best, mut prefix, mut max_start) = (0f64, 0f64, f64::MIN);
            for &(t, c) in admitted {
                max_start = max_start.max(r * t as f64 - prefix);
                prefix += c as f64;
                best = best.max(prefix - r * t as f64 - cap + max_start);
            }
            // Ideal: an exact bucket fed the offered sequence.
            let (mut level, mut last, mut ideal) = (cap, 0u64, 0u64);
            for &(t, c) in offered {
                level = (level + r * t.saturating_sub(last) as f64).min(cap);
                last = t;
                if level >= c as f64 {
                    level -= c as f64;
                    ideal += c;
                }
            }
            let _ = span_ns;
            (ideal, best.max(0.0).round() as u64)
        }
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            let w = policy.duration().as_nanos() as u64;
            let mut per: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
            for &(t, c) in offered {
                per.entry((t + epoch_ns) / w).or_default().0 += c;
            }
            for &(t, c) in admitted {
                per.entry((t + epoch_ns) / w).or_default().1 += c;
            }
            let cap = policy.points();
            let ideal = per.values().map(|&(o, _)| o.min(cap)).sum();
            let over = per.values().map(|&(_, a)| a.saturating_sub(cap)).max().unwrap_or(0);
            (ideal, over)
        }
    }
}

/// The `percent`-th percentile of `v`, sorted (0 when empty).
fn percentile(v: &[u64], percent: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[(v.len() * percent / 100).min(v.len() - 1)]
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Sync(usize),
    Request(usize),
}

fn key_names(s: &Scenario) -> Vec<String> {
    if !s.identifiers.is_empty() {
        return s.identifiers.clone();
    }
    (0..s.keys.max(1)).map(|k| format!("key-{k}")).collect()
}

/// Runs a scenario on virtual time with an in-process store. Deterministic for a seed (apart
/// from the latency figure).
pub fn run_virtual(s: &Scenario) -> Report {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(virtual_run(s))
}

async fn virtual_run(s: &Scenario) -> Report {
    const EPOCH_US: u64 = 1_700_000_000_000_000;
    let clock = ManualClock::new();
    let store_time = ManualTime::new(EPOCH_US);
    let store = Arc::new(MemoryStore::with_time_source(store_time.source()));
    let nodes = virtual_nodes(s, &store, &clock);
    let limiters = limiters(s, &nodes, "tune");
    let interval = s.sync_interval.as_nanos() as u64;
    let end = s.duration.as_nanos() as u64;
    let keys = key_names(s);
    let rate = rate_per_ns(&s.policy) * s.load * keys.len() as f64;
    let shares = shares(s.nodes, s.skew);
    let mut rng = Rng(s.seed);
    let mut heap = BinaryHeap::new();
    let mut next_sync = vec![0u64; s.nodes];
    let mut last_sync = vec![0u64; s.nodes];
    for i in 0..s.nodes {
        next_sync[i] = interval * i as u64 / s.nodes as u64 + 1;
        heap.push(Reverse((next_sync[i], Event::Sync(i))));
        if shares[i] > 0.0 {
            let start = s.stagger.as_nanos() as u64 * i as u64;
            heap.push(Reverse((start + rng.exp(1.0 / (rate * shares[i])), Event::Request(i))));
        }
    }
    let timer = Clock::precise();
    let mut tally = Tally::new(keys.len());
    while let Some(Reverse((t, ev))) = heap.pop() {
        if t > end {
            break;
        }
        clock.set_ns(t);
        store_time.set_us(EPOCH_US + t / 1000);
        match ev {
            Event::Sync(i) => {
                if t < next_sync[i] {
                    continue; // superseded by an earlier priority sync
                }
                nodes[i].sync_once().await;
                last_sync[i] = t;
                next_sync[i] = t + interval;
                heap.push(Reverse((next_sync[i], Event::Sync(i))));
            }
            Event::Request(i) => {
                let k = rng.below(keys.len());
                let start = timer.now_ns();
                let d = limiters[i].check(keys[k].as_str());
                tally.latency(timer.now_ns().saturating_sub(start));
                tally.offered[k].push((t, 1));
                if d.is_allowed() {
                    tally.admitted[k].push((t, 1));
                }
                if nodes[i].wants_priority_sync() {
                    let at = (last_sync[i] + interval / 10).max(t + 1);
                    if at < next_sync[i] {
                        next_sync[i] = at;
                        heap.push(Reverse((at, Event::Sync(i))));
                    }
                }
                heap.push(Reverse((t + rng.exp(1.0 / (rate * shares[i])), Event::Request(i))));
            }
        }
    }
    let (round_trips, failed, opened) = node_totals(&nodes);
    let health = (failed, opened, 0);
    let Tally {
        offered, admitted, lat, ..
    } = tally;
    report(s, &offered, &admitted, EPOCH_US * 1000, end, round_trips, lat, health)
}

/// The nodes of a virtual run: synced by the run itself, on the run's clock, sharing `store`.
fn virtual_nodes(s: &Scenario, store: &Arc<MemoryStore>, clock: &ManualClock) -> Vec<Node> {
    (0..s.nodes)
        .map(|i| {
            Node::builder(store.clone() as Arc<dyn Store>)
                .sync_interval(s.sync_interval)
                .cold_start(s.cold_start)
                .clock(clock.clock())
                .id(i as u64 + 1)
                .build_manual()
                .expect("valid node settings")
        })
        .collect()
}

/// One limiter per node, each with the scenario's policy under `name`.
fn limiters(s: &Scenario, nodes: &[Node], name: &str) -> Vec<Limiter> {
    nodes
        .iter()
        .map(|n| {
            Limiter::builder(s.policy.clone())
                .name(name)
                .node(n)
                .build()
                .expect("valid policy")
        })
        .collect()
}

/// The nodes' store round trips, failed round trips and circuit openings, summed.
fn node_totals(nodes: &[Node]) -> (u64, u64, u64) {
    let round_trips: u64 = nodes.iter().map(|n| n.stats().round_trips).sum();
    let failed: u64 = nodes.iter().map(|n| n.stats().failed_round_trips).sum();
    let opened: u64 = nodes.iter().map(|n| n.stats().circuit_opened).sum();
    (round_trips, failed, opened)
}

/// What a run observed: per key, the offered and the admitted requests as `(ns, 1)`; the
/// check latencies (the first [`MAX_LATENCY_SAMPLES`]); and the admissions made degraded.
struct Tally {
    offered: Vec<Vec<(u64, u64)>>,
    admitted: Vec<Vec<(u64, u64)>>,
    lat: Vec<u64>,
    degraded: u64,
}

impl Tally {
    fn new(keys: usize) -> Self {
        Tally {
            offered: vec![Vec::new(); keys],
            admitted: vec![Vec::new(); keys],
            lat: Vec::new(),
            degraded: 0,
        }
    }

    /// Keeps a latency sample, while there is room for it.
    fn latency(&mut self, ns: u64) {
        if self.lat.len() < MAX_LATENCY_SAMPLES {
            self.lat.push(ns);
        }
    }
}

/// Latency samples kept per run (the first ones).
const MAX_LATENCY_SAMPLES: usize = 1 << 20;

#[allow(clippy::too_many_arguments)]
fn report(
    s: &Scenario,
    offered: &[Vec<(u64, u64)>],
    admitted: &[Vec<(u64, u64)>],
    epoch_ns: u64,
    end: u64,
    round_trips: u64,
    mut lat: Vec<u64>,
    health: (u64, u64, u64),
) -> Report {
    lat.sort_unstable();
    let (mut ideal, mut over) = (0, 0);
    for (o, a) in offered.iter().zip(admitted) {
        let (i, v) = oracle(&s.policy, o, a, epoch_ns, end);
        ideal += i;
        over = over.max(v);
    }
    let admitted_sum: u64 = admitted.iter().flatten().map(|a| a.1).sum();
    Report {
        offered: offered.iter().flatten().map(|o| o.1).sum(),
        admitted: admitted_sum,
        ideal,
        over_admitted: over,
        utilization: if ideal == 0 {
            1.0
        } else {
            admitted_sum as f64 / ideal as f64
        },
        round_trips_per_s: round_trips as f64 / (end as f64 / 1e9),
        check_p99_ns: percentile(&lat, 99),
        check_p50_ns: percentile(&lat, 50),
        checks: offered.iter().map(Vec::len).sum::<usize>() as u64,
        failed_round_trips: health.0,
        circuit_opened: health.1,
        degraded_admitted: health.2,
    }
}

/// Runs a scenario on the wall clock against `store`: each node has its own sync task. Must
/// be called inside a tokio runtime. The store's clock must be the wall clock (Unix time) for
/// the window algorithms' oracle.
///
/// Under [`CheckMode::Async`] each request is a `check_async` in a task of its own (requests
/// overlap, as in a server): its latency runs from its arrival to its decision, and an
/// admission counts at its decision.
pub async fn run_real(s: &Scenario, store: Arc<dyn Store>) -> Report {
    let nodes = real_nodes(s, &store);
    // A fresh name per run, so runs never share store state.
    let limiters = limiters(s, &nodes, &format!("tune-{}", s.seed));
    let clock = Clock::precise();
    let epoch_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let origin = clock.now_ns();
    let end = s.duration.as_nanos() as u64;
    let keys = key_names(s);
    let rate = rate_per_ns(&s.policy) * s.load * keys.len() as f64;
    let shares = shares(s.nodes, s.skew);
    let mut rng = Rng(s.seed);
    let mut next = first_arrivals(s, rate, &shares, &mut rng);
    let mut tally = Tally::new(keys.len());
    // CheckMode::Async: the requests in flight.
    let mut pending = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = clock.now_ns() - origin;
        if now > end {
            break;
        }
        // Every arrival due by now, in time order across nodes.
        while let Some((i, &t)) = next.iter().enumerate().min_by_key(|(_, t)| **t) {
            if t > now {
                break;
            }
            let k = rng.below(keys.len());
            next[i] = t + rng.exp(1.0 / (rate * shares[i]));
            if s.check == CheckMode::Async {
                pending.push(spawn_check(&limiters[i], k, &keys[k], &clock));
                continue;
            }
            let start = clock.now_ns();
            let d = limiters[i].check(keys[k].as_str());
            let at = clock.now_ns();
            tally.latency(at - start);
            tally.offered[k].push((at - origin, 1));
            if d.is_allowed() {
                tally.admitted[k].push((at - origin, 1));
                tally.degraded += u64::from(d.is_degraded());
            }
        }
    }
    tally.collect(pending, origin).await;
    let (round_trips, failed, opened) = node_totals(&nodes);
    for n in &nodes {
        n.shutdown().await;
    }
    report(
        s,
        &tally.offered,
        &tally.admitted,
        epoch_ns,
        end,
        round_trips,
        tally.lat,
        (failed, opened, tally.degraded),
    )
}

/// The nodes of a wall-clock run, each with its own sync task, sharing `store`.
fn real_nodes(s: &Scenario, store: &Arc<dyn Store>) -> Vec<Node> {
    (0..s.nodes)
        .map(|_| {
            Node::builder(store.clone())
                .sync_interval(s.sync_interval)
                .cold_start(s.cold_start)
                // This loop keeps a worker busy offering load: on a small machine it can delay
                // the sync tasks far more than the store does. A late sync is not a store
                // failure here, where the store is healthy by design.
                .sync_timeout(Duration::from_secs(2))
                .start()
                .expect("inside a tokio runtime")
        })
        .collect()
}

/// Each node's first arrival in ns from the start (`u64::MAX` for a node offered no load).
fn first_arrivals(s: &Scenario, rate: f64, shares: &[f64], rng: &mut Rng) -> Vec<u64> {
    shares
        .iter()
        .enumerate()
        .map(|(i, &sh)| {
            if sh > 0.0 {
                s.stagger.as_nanos() as u64 * i as u64 + rng.exp(1.0 / (rate * sh))
            } else {
                u64::MAX
            }
        })
        .collect()
}

/// A request of [`CheckMode::Async`], arriving now for key number `k`: a `check_async` in a
/// task of its own, answering (key, arrived, decided, allowed, degraded) in ns of the clock.
fn spawn_check(limiter: &Limiter, k: usize, key: &str, clock: &Clock) -> AsyncCheck {
    let (limiter, key, clock) = (limiter.clone(), key.to_owned(), clock.clone());
    let arrived = clock.now_ns();
    tokio::spawn(async move {
        let d = limiter.check_async(key.as_str()).await;
        (k, arrived, clock.now_ns(), d.is_allowed(), d.is_degraded())
    })
}

/// A request of [`CheckMode::Async`] in flight (see [`spawn_check`]).
type AsyncCheck = tokio::task::JoinHandle<(usize, u64, u64, bool, bool)>;

impl Tally {
    /// Waits for the requests of [`CheckMode::Async`] and counts them (`origin`: the clock's
    /// reading at the start of the run).
    async fn collect(&mut self, pending: Vec<AsyncCheck>, origin: u64) {
        // Issued in time order; decided in any order (an admission counts at its decision).
        let async_run = !pending.is_empty();
        for task in pending {
            // A check never panics; a task that did is a request lost, not a run lost.
            let Ok((k, arrived, decided, allowed, was_degraded)) = task.await else {
                continue;
            };
            self.latency(decided.saturating_sub(arrived));
            self.offered[k].push((arrived - origin, 1));
            if allowed {
                self.admitted[k].push((decided - origin, 1));
                self.degraded += u64::from(was_degraded);
            }
        }
        if async_run {
            for a in &mut self.admitted {
                a.sort_unstable();
            }
        }
    }
}
