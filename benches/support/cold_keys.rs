//! Slow keys in distributed mode: per-user limits of 20 or 100 requests per minute shared by
//! several nodes, each node seeing a given user only every few seconds, so that most checks
//! find a key the node holds nothing for.
//!
//! One case: `nodes` nodes in this process, each with its own [`RedisStore`] connection and
//! its own sync task (100 ms), one limiter per node under the same name
//! (`Policy::per_minute(points)`), [`USERS`] users. Each user sends requests as a Poisson
//! process at `load x points / 60` per second, each request to a node chosen at random, each
//! request a `check_async(user)` in a task of its own (requests overlap, as in a server). A
//! request's latency runs from its arrival (the instant it is issued) to its decision.
//!
//! The same arrivals then go through the naive limiter (one EVALSHA token bucket per
//! request on the same Redis, one connection per node), measured the same way.
//!
//! Both are judged after the run against one exact token bucket per user (capacity `points`,
//! `points` per minute, full at the start: the semantics of `Policy::per_minute(points)`):
//! utilization is admitted / what that bucket admits of the same arrival times, and
//! over-admission is, per user, the most by which the admitted count by a time `t` exceeds
//! `points + points x t / 60 s` (a request counts as admitted at its decision, which is never
//! earlier than the store's grant: no false positives), summed over the users.
//!
//! The users' buckets start full (a user never seen), or drained ([`Start`]): full buckets
//! take `60 s / (load - 1)` to empty (120 s at 1.5x), and until then the exact limiter admits
//! nearly everything, so short runs at low load measure mostly the burst allowance; a drained
//! start measures the throttled steady state from the first request.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::sim::Rng;
use tollgate::store::{RedisConfig, RedisStore};
use tollgate::{Limiter, Node, Policy};

/// The name of the measurement: the first component of every case's id.
pub const GROUP: &str = "cold_keys";
/// Node counts measured.
pub const NODE_COUNTS: [usize; 2] = [4, 8];
/// Limits measured, in requests per minute per user.
pub const POINTS_PER_MIN: [u64; 2] = [20, 100];
/// Offered loads measured, as multiples of the limit.
pub const LOADS: [f64; 2] = [1.5, 4.0];
/// Users per case.
pub const USERS: usize = 100;
/// Every node's sync interval.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// The environment variable that sets each run's length in seconds.
pub const SECONDS_VAR: &str = "COLD_SECONDS";
/// The environment variable that sets how the users' buckets start ([`Start`]).
pub const START_VAR: &str = "COLD_START";
/// Each run's length when [`SECONDS_VAR`] is not set.
pub const DEFAULT_SECONDS: f64 = 20.0;
/// Each run's length under `--test` (criterion's "run once to see that it works").
pub const TEST_SECONDS: f64 = 1.0;
/// Longest a single check may take before it counts as denied (and is reported).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Seed of the arrival process (the case's index is added).
pub const SEED: u64 = 0x636f_6c64;

const MINUTE_NS: u64 = 60_000_000_000;
const MINUTE_US: u64 = 60_000_000;

/// One case of the measurement.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Nodes sharing the limit.
    pub nodes: usize,
    /// Requests per minute per user.
    pub points: u64,
    /// Offered load as a multiple of the limit.
    pub load: f64,
}

impl Case {
    /// The case's id, which the bench's filter is matched against.
    pub fn id(&self) -> String {
        format!(
            "{GROUP}/nodes={}/points_per_min={}/load={}",
            self.nodes, self.points, self.load
        )
    }

    /// A limiter and key name of this case alone, so that cases never share store state.
    fn name(&self) -> String {
        format!(
            "cold_n{}_p{}_l{}",
            self.nodes,
            self.points,
            (self.load * 10.0).round() as u64
        )
    }
}

/// Every case, in the order they run.
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for nodes in NODE_COUNTS {
        for points in POINTS_PER_MIN {
            for load in LOADS {
                v.push(Case { nodes, points, load });
            }
        }
    }
    v
}

/// Each run's length: [`SECONDS_VAR`] or [`DEFAULT_SECONDS`].
pub fn run_length() -> Duration {
    let secs = std::env::var(SECONDS_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs_f64(secs)
}

/// How the users' buckets start: [`START_VAR`] is `full` (the default) or `drained`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Full, as for a user never seen: with runs shorter than `60 s / (load - 1)` (120 s at
    /// 1.5x, 20 s at 4x) the exact limiter admits most requests from the burst allowance.
    Full,
    /// Emptied just before the run: each user spends its whole bucket at once (tollgate: one
    /// `check_n_async(user, points)` on the first node; naive: `points` calls), so the run
    /// measures the throttled steady state from its start. The drain is not measured, but the
    /// exact limiter and the over-admission check see it.
    Drained,
}

impl Start {
    /// From [`START_VAR`]; `full` when unset or not understood.
    pub fn from_env() -> Start {
        match std::env::var(START_VAR).as_deref().map(str::trim) {
            Ok("drained") => Start::Drained,
            _ => Start::Full,
        }
    }

    /// The name printed in the line.
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Full => "full",
            Start::Drained => "drained",
        }
    }
}

/// What the command line asks of this measurement. Criterion's own arguments are read the way
/// criterion reads them: the first positional argument is the filter, `--exact` makes it
/// match whole ids, `--list` lists, `--ignored` runs nothing, and without `--bench` (as under
/// `cargo test --benches`) or with `--test` each case runs for [`TEST_SECONDS`] only.
#[derive(Clone, Debug, Default)]
pub struct Args {
    /// The filter, if any.
    pub filter: Option<String>,
    /// `--exact`.
    pub exact: bool,
    /// `--list`.
    pub list: bool,
    /// `--ignored`.
    pub ignored: bool,
    /// Test mode (see the type's doc).
    pub test: bool,
}

/// Criterion's options that take a value (as the next argument unless given as `--opt=value`).
const VALUE_OPTIONS: [&str; 16] = [
    "-c",
    "--color",
    "--colour",
    "-s",
    "--save-baseline",
    "-b",
    "--baseline",
    "--baseline-lenient",
    "--format",
    "--profile-time",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
];
/// The rest of them.
const MORE_VALUE_OPTIONS: [&str; 4] = [
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

impl Args {
    /// Reads the process's arguments.
    pub fn from_env() -> Args {
        Self::parse(std::env::args().skip(1))
    }

    /// Reads `args` (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Args {
        let mut out = Args::default();
        let (mut bench, mut test) = (false, false);
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--exact" => out.exact = true,
                "--list" => out.list = true,
                "--ignored" => out.ignored = true,
                "--bench" => bench = true,
                "--test" => test = true,
                o if VALUE_OPTIONS.contains(&o) || MORE_VALUE_OPTIONS.contains(&o) => {
                    args.next();
                }
                o if o.starts_with('-') => {}
                _ if out.filter.is_none() => out.filter = Some(a),
                _ => {}
            }
        }
        out.test = test || !bench;
        out
    }

    /// Whether the filter names this measurement (`cold_keys` or `cold_keys/...`), so that
    /// the criterion groups have nothing to run.
    pub fn names_this_group_only(&self) -> bool {
        self.filter
            .as_deref()
            .is_some_and(|f| f.split('/').next() == Some(GROUP))
    }

    /// Whether the case with this id runs: no filter, or the id contains the filter (equals
    /// it under `--exact`).
    pub fn selects(&self, id: &str) -> bool {
        if self.ignored {
            return false;
        }
        match &self.filter {
            None => true,
            Some(f) if self.exact => id == f,
            Some(f) => id.contains(f.as_str()),
        }
    }
}

/// One request of the schedule.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// When it arrives, from the start of the run.
    pub at_ns: u64,
    /// Its user, in `0..USERS`.
    pub user: usize,
    /// The node it is sent to.
    pub node: usize,
}

/// Every request of a case over `length`, in time order: one Poisson process per user at
/// `load x points / 60` per second, each request to a node drawn at random.
pub fn arrivals(case: &Case, length: Duration, seed: u64) -> Vec<Arrival> {
    let mut rng = Rng(seed);
    let mean_ns = MINUTE_NS as f64 / (case.load * case.points as f64);
    let end = length.as_nanos() as u64;
    let mut v = Vec::new();
    for user in 0..USERS {
        let mut t = rng.exp(mean_ns);
        while t <= end {
            v.push(Arrival {
                at_ns: t,
                user,
                node: rng.below(case.nodes),
            });
            t += rng.exp(mean_ns);
        }
    }
    v.sort_by_key(|a| a.at_ns);
    v
}

/// What became of one request.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Its user.
    pub user: usize,
    /// When it was issued, from the case's origin.
    pub arrived_ns: u64,
    /// When its decision came back, from the case's origin.
    pub decided_ns: u64,
    /// Its cost (1, or `points` for a drain under [`Start::Drained`]).
    pub cost: u64,
    /// Whether it was admitted.
    pub allowed: bool,
    /// Whether it failed (timed out or a store error): counted as denied.
    pub failed: bool,
    /// Whether it is one of the measured requests (a drain is not: it counts only for the
    /// exact limiter's state and the over-admission check).
    pub measured: bool,
}

/// Nanoseconds from `origin` to `t`.
fn since(origin: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(origin).as_nanos() as u64
}

/// Runs `decision` in a task of its own, issued now, and returns its outcome: a request's
/// latency runs from this call to its decision.
fn issue<Fut>(
    origin: Instant,
    user: usize,
    cost: u64,
    measured: bool,
    decision: Fut,
) -> tokio::task::JoinHandle<Outcome>
where
    Fut: Future<Output = Option<bool>> + Send + 'static,
{
    let arrived = Instant::now();
    tokio::spawn(async move {
        let verdict = tokio::time::timeout(REQUEST_TIMEOUT, decision).await.ok().flatten();
        let decided = Instant::now();
        Outcome {
            user,
            arrived_ns: since(origin, arrived),
            decided_ns: since(origin, decided),
            cost,
            allowed: verdict == Some(true),
            failed: verdict.is_none(),
            measured,
        }
    })
}

/// Issues every arrival at its time after `start`, each as `check(node, user)` in a task of
/// its own, and collects the outcomes (times from `origin`). Must run inside a multi-thread
/// runtime.
pub async fn drive<F, Fut>(origin: Instant, start: Instant, schedule: &[Arrival], check: F) -> Vec<Outcome>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Option<bool>> + Send + 'static,
{
    let mut tasks = Vec::with_capacity(schedule.len());
    for a in schedule {
        let due = start + Duration::from_nanos(a.at_ns);
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
        }
        tasks.push(issue(origin, a.user, 1, true, check(a.node, a.user)));
    }
    collect(tasks).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("a request task does not panic"));
    }
    out
}

/// How one limiter did against the exact one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Judgement {
    /// Measured requests admitted.
    pub admitted: u64,
    /// What the exact per-user bucket admits of the same measured arrivals.
    pub ideal: u64,
    /// Admitted cost beyond the exact bucket's allowance, summed over users.
    pub over_admitted: u64,
    /// Requests that failed (timeouts, store errors).
    pub failed: u64,
    /// Users whose drain (under [`Start::Drained`]) was admitted in full.
    pub drained_users: u64,
    /// Median latency of the measured requests in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency of the measured requests in microseconds.
    pub p99_us: f64,
}

impl Judgement {
    /// `admitted / ideal` in percent.
    pub fn utilization_pct(&self) -> f64 {
        if self.ideal == 0 {
            return 100.0;
        }
        self.admitted as f64 * 100.0 / self.ideal as f64
    }
}

/// What a `points`-per-minute token bucket (capacity `points`, full at time 0) decides for
/// `requests` (`(time ns, cost)`, times ascending), in exact integer arithmetic: a level of one
/// token is `MINUTE_NS` units and a nanosecond refills `points` units.
pub fn exact_decisions(points: u64, requests: &[(u64, u64)]) -> Vec<bool> {
    let cap = points as u128 * MINUTE_NS as u128;
    let one = MINUTE_NS as u128;
    let (mut level, mut last) = (cap, 0u64);
    requests
        .iter()
        .map(|&(t, cost)| {
            level = (level + points as u128 * t.saturating_sub(last) as u128).min(cap);
            last = last.max(t);
            let need = cost as u128 * one;
            let ok = level >= need;
            if ok {
                level -= need;
            }
            ok
        })
        .collect()
}

/// How many of the requests at `times` (ascending, cost 1 each) the exact bucket of
/// [`exact_decisions`] admits.
pub fn exact_admits(points: u64, times: &[u64]) -> u64 {
    let requests: Vec<(u64, u64)> = times.iter().map(|&t| (t, 1)).collect();
    exact_decisions(points, &requests).into_iter().filter(|&ok| ok).count() as u64
}

/// How much of the cost admitted at `admitted` (`(time ns, cost)`, times ascending) exceeds
/// what a `points`-per-minute bucket full at time 0 allows by then: the largest
/// `c_k - floor(points + points x t_k / 60 s)` over the cost `c_k` admitted by the `k`-th
/// admission at `t_k` (0 if none).
pub fn excess_cost(points: u64, admitted: &[(u64, u64)]) -> u64 {
    let mut total = 0u128;
    admitted
        .iter()
        .map(|&(t, cost)| {
            total += cost as u128;
            let allowed = points as u128 + points as u128 * t as u128 / MINUTE_NS as u128;
            total.saturating_sub(allowed) as u64
        })
        .max()
        .unwrap_or(0)
}

/// [`excess_cost`] of admissions of cost 1 at `times`.
pub fn excess(points: u64, times: &[u64]) -> u64 {
    let admitted: Vec<(u64, u64)> = times.iter().map(|&t| (t, 1)).collect();
    excess_cost(points, &admitted)
}

/// The `q`-quantile of `v` (sorted in place), in the unit of `v`; 0 when empty.
fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Judges the outcomes of one run (drain included) against the exact limiter.
pub fn judge(points: u64, outcomes: &[Outcome]) -> Judgement {
    let mut per_user: Vec<Vec<&Outcome>> = vec![Vec::new(); USERS];
    let mut lat: Vec<u64> = Vec::with_capacity(outcomes.len());
    let mut j = Judgement::default();
    for o in outcomes {
        per_user[o.user].push(o);
        j.failed += u64::from(o.failed);
        if o.measured {
            lat.push(o.decided_ns.saturating_sub(o.arrived_ns));
        }
    }
    for mut list in per_user {
        list.sort_by_key(|o| o.arrived_ns);
        let requests: Vec<(u64, u64)> = list.iter().map(|o| (o.arrived_ns, o.cost)).collect();
        for (o, ideal) in list.iter().zip(exact_decisions(points, &requests)) {
            if o.measured {
                j.ideal += u64::from(ideal);
                j.admitted += u64::from(o.allowed);
            }
        }
        let drains: Vec<&&Outcome> = list.iter().filter(|o| !o.measured).collect();
        if !drains.is_empty() && drains.iter().all(|o| o.allowed) {
            j.drained_users += 1;
        }
        let mut admitted: Vec<(u64, u64)> = list
            .iter()
            .filter(|o| o.allowed)
            .map(|o| (o.decided_ns, o.cost))
            .collect();
        admitted.sort_unstable();
        j.over_admitted += excess_cost(points, &admitted);
    }
    j.p50_us = quantile(&mut lat, 0.50) as f64 / 1000.0;
    j.p99_us = quantile(&mut lat, 0.99) as f64 / 1000.0;
    j
}

/// One token bucket per key, advanced with the server's clock on every call: the usual
/// "one round trip per request" limiter, as `(cap, per_us)` arguments to the bench's `NAIVE`
/// script.
fn naive_args(points: u64) -> (u64, u64) {
    (points, MINUTE_US / points)
}

/// One case's two runs and the line it prints.
pub struct CaseResult {
    /// How the users' buckets started.
    pub start: Start,
    /// tollgate's run.
    pub tollgate: Judgement,
    /// The naive limiter's run.
    pub naive: Judgement,
    /// Store calls per second of the tollgate run, all nodes together.
    pub round_trips_per_s: f64,
    /// Failed store calls of the tollgate run, all nodes together.
    pub failed_round_trips: u64,
}

impl CaseResult {
    /// The line the bench prints for the case.
    pub fn line(&self, case: &Case) -> String {
        let (t, n) = (&self.tollgate, &self.naive);
        let mut line = format!(
            "distributed cold_keys nodes={} points_per_min={} load={} utilization={:.1} over_admitted={} \
             p50_us={:.0} p99_us={:.0} naive_p50_us={:.0} naive_p99_us={:.0} naive_utilization={:.1} \
             naive_over_admitted={} round_trips_per_s={:.1} start={}",
            case.nodes,
            case.points,
            case.load,
            t.utilization_pct(),
            t.over_admitted,
            t.p50_us,
            t.p99_us,
            n.p50_us,
            n.p99_us,
            n.utilization_pct(),
            n.over_admitted,
            self.round_trips_per_s,
            self.start.as_str(),
        );
        if self.start == Start::Drained {
            line += &format!(
                " drained_users={} naive_drained_users={}",
                t.drained_users, n.drained_users
            );
        }
        line
    }
}

/// Runs one case against the Redis at `url`: tollgate, then the naive limiter, on the same
/// arrivals. Must run inside a multi-thread runtime.
pub async fn run_case(
    url: &str,
    case: &Case,
    seed: u64,
    length: Duration,
    start: Start,
    naive_script: &str,
) -> CaseResult {
    let schedule = arrivals(case, length, seed);
    let name = case.name();
    let users: Arc<Vec<String>> = Arc::new((0..USERS).map(|u| format!("user-{u}")).collect());

    // tollgate: one node per store connection, one limiter per node under the case's name.
    let mut nodes = Vec::with_capacity(case.nodes);
    for _ in 0..case.nodes {
        let store = RedisStore::connect(RedisConfig::new(url))
            .await
            .expect("connect to the bench's redis-server");
        let node = Node::builder(Arc::new(store))
            .sync_interval(SYNC_INTERVAL)
            .start()
            .expect("inside a tokio runtime");
        nodes.push(node);
    }
    // Warm up every node's connection (its scripts get loaded) on a key of its own.
    for node in &nodes {
        let warm: Limiter = Limiter::builder(Policy::per_minute(case.points))
            .name(format!("{name}_warm"))
            .node(node)
            .build()
            .expect("a valid policy");
        warm.check_async("warm-up").await;
    }
    let limiters: Vec<Limiter> = nodes
        .iter()
        .map(|node| {
            Limiter::builder(Policy::per_minute(case.points))
                .name(name.clone())
                .node(node)
                .build()
                .expect("a valid policy")
        })
        .collect();
    let before: u64 = nodes.iter().map(|n| n.stats().round_trips).sum();
    let failed_before: u64 = nodes.iter().map(|n| n.stats().failed_round_trips).sum();
    let origin = Instant::now();
    // Drained: each user spends its whole bucket at once on the first node.
    let mut outcomes = Vec::new();
    if start == Start::Drained {
        let drains = (0..USERS)
            .map(|user| {
                let (limiter, users, cost) = (limiters[0].clone(), users.clone(), case.points);
                issue(origin, user, cost, false, async move {
                    let d = limiter.check_n_async(users[user].as_str(), cost).await;
                    Some(d.expect("the cost is the capacity").is_allowed())
                })
            })
            .collect();
        outcomes = collect(drains).await;
    }
    let run_start = Instant::now();
    outcomes.extend(
        drive(origin, run_start, &schedule, |node, user| {
            let limiter = limiters[node].clone();
            let users = users.clone();
            async move { Some(limiter.check_async(users[user].as_str()).await.is_allowed()) }
        })
        .await,
    );
    let elapsed = run_start.elapsed().as_secs_f64().max(1e-9);
    let round_trips: u64 = nodes.iter().map(|n| n.stats().round_trips).sum::<u64>() - before;
    let failed_round_trips: u64 = nodes.iter().map(|n| n.stats().failed_round_trips).sum::<u64>() - failed_before;
    for node in &nodes {
        node.shutdown().await;
    }
    let tollgate = judge(case.points, &outcomes);

    // The naive limiter: one EVALSHA per request, one connection per node.
    let script = Arc::new(redis::Script::new(naive_script));
    let (cap, per_us) = naive_args(case.points);
    let mut cons = Vec::with_capacity(case.nodes);
    for _ in 0..case.nodes {
        let client = redis::Client::open(url).expect("a valid URL");
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the bench's redis-server");
        // Loads the script: the measured calls are EVALSHA hits.
        let _: i64 = script
            .key(format!("{name}:naive:warm-up"))
            .arg(cap)
            .arg(per_us)
            .invoke_async(&mut con)
            .await
            .expect("the naive script runs");
        cons.push(con);
    }
    let naive_check = |node: usize, user: usize| {
        let mut con = cons[node].clone();
        let script = script.clone();
        let key = format!("{name}:naive:{}", users[user]);
        async move {
            let r: redis::RedisResult<i64> = script.key(key).arg(cap).arg(per_us).invoke_async(&mut con).await;
            r.ok().map(|allowed| allowed == 1)
        }
    };
    let origin = Instant::now();
    // Drained: the script takes one token a call, so each user spends its bucket in `points`
    // calls, one after the other.
    let mut outcomes = Vec::new();
    if start == Start::Drained {
        for _ in 0..case.points {
            let calls = (0..USERS)
                .map(|user| issue(origin, user, 1, false, naive_check(0, user)))
                .collect();
            outcomes.extend(collect(calls).await);
        }
    }
    let run_start = Instant::now();
    outcomes.extend(drive(origin, run_start, &schedule, naive_check).await);
    let naive = judge(case.points, &outcomes);

    CaseResult {
        start,
        tollgate,
        naive,
        round_trips_per_s: round_trips as f64 / elapsed,
        failed_round_trips,
    }
}
