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

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An exponential gap in nanoseconds with the given mean (at least 1).
    fn exp_ns(&mut self, mean_ns: f64) -> u64 {
        let u = ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        (-u.ln() * mean_ns) as u64 + 1
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
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
        let mut t = rng.exp_ns(mean_ns);
        while t <= end {
            v.push(Arrival {
                at_ns: t,
                user,
                node: rng.below(case.nodes),
            });
            t += rng.exp_ns(mean_ns);
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
    /// When it was issued, from the start of the run.
    pub arrived_ns: u64,
    /// When its decision came back, from the start of the run.
    pub decided_ns: u64,
    /// Whether it was admitted.
    pub allowed: bool,
    /// Whether it failed (timed out or a store error): counted as denied.
    pub failed: bool,
}

/// Issues every arrival at its time, each as `check(node, user)` in a task of its own, and
/// collects the outcomes. Must run inside a multi-thread runtime.
pub async fn drive<F, Fut>(schedule: &[Arrival], check: F) -> Vec<Outcome>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Option<bool>> + Send + 'static,
{
    let origin = Instant::now();
    let since = move |t: Instant| t.saturating_duration_since(origin).as_nanos() as u64;
    let mut tasks = Vec::with_capacity(schedule.len());
    for a in schedule {
        let due = origin + Duration::from_nanos(a.at_ns);
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
        }
        let arrived = Instant::now();
        let decision = check(a.node, a.user);
        let user = a.user;
        tasks.push(tokio::spawn(async move {
            let verdict = tokio::time::timeout(REQUEST_TIMEOUT, decision).await.ok().flatten();
            let decided = Instant::now();
            Outcome {
                user,
                arrived_ns: since(arrived),
                decided_ns: since(decided),
                allowed: verdict == Some(true),
                failed: verdict.is_none(),
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("a request task does not panic"));
    }
    out
}

/// How one limiter did against the exact one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Judgement {
    /// Requests admitted.
    pub admitted: u64,
    /// What the exact per-user bucket admits of the same arrivals.
    pub ideal: u64,
    /// Admitted requests beyond the exact bucket's allowance, summed over users.
    pub over_admitted: u64,
    /// Requests that failed (timeouts, store errors).
    pub failed: u64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
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

/// The requests of a `points`-per-minute token bucket (capacity `points`, full at time 0) admits
/// of `arrivals` (times in ns, ascending), in exact integer arithmetic: a level of one token is
/// `MINUTE_NS` units and a nanosecond refills `points` units.
pub fn exact_admits(points: u64, arrivals: &[u64]) -> u64 {
    let cap = points as u128 * MINUTE_NS as u128;
    let one = MINUTE_NS as u128;
    let (mut level, mut last, mut admitted) = (cap, 0u64, 0u64);
    for &t in arrivals {
        level = (level + points as u128 * t.saturating_sub(last) as u128).min(cap);
        last = last.max(t);
        if level >= one {
            level -= one;
            admitted += 1;
        }
    }
    admitted
}

/// How many of the admissions at `admitted` (times in ns, ascending) exceed what a
/// `points`-per-minute bucket full at time 0 allows by then: the largest
/// `k - floor(points + points x t_k / 60 s)` over the `k`-th admission at `t_k` (0 if none).
pub fn excess(points: u64, admitted: &[u64]) -> u64 {
    admitted
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let allowed = points as u128 + points as u128 * t as u128 / MINUTE_NS as u128;
            (i as u128 + 1).saturating_sub(allowed) as u64
        })
        .max()
        .unwrap_or(0)
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

/// Judges the outcomes of one run against the exact limiter.
pub fn judge(points: u64, outcomes: &[Outcome]) -> Judgement {
    let mut arrived = vec![Vec::new(); USERS];
    let mut admitted = vec![Vec::new(); USERS];
    let mut lat: Vec<u64> = Vec::with_capacity(outcomes.len());
    let mut failed = 0;
    for o in outcomes {
        arrived[o.user].push(o.arrived_ns);
        if o.allowed {
            admitted[o.user].push(o.decided_ns);
        }
        failed += u64::from(o.failed);
        lat.push(o.decided_ns.saturating_sub(o.arrived_ns));
    }
    let mut j = Judgement {
        failed,
        ..Judgement::default()
    };
    for (arr, adm) in arrived.iter_mut().zip(admitted.iter_mut()) {
        arr.sort_unstable();
        adm.sort_unstable();
        j.ideal += exact_admits(points, arr);
        j.admitted += adm.len() as u64;
        j.over_admitted += excess(points, adm);
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
        format!(
            "distributed cold_keys nodes={} points_per_min={} load={} utilization={:.1} over_admitted={} \
             p50_us={:.0} p99_us={:.0} naive_p50_us={:.0} naive_p99_us={:.0} naive_utilization={:.1} \
             naive_over_admitted={} round_trips_per_s={:.1}",
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
        )
    }
}

/// Runs one case against the Redis at `url`: tollgate, then the naive limiter, on the same
/// arrivals. Must run inside a multi-thread runtime.
pub async fn run_case(url: &str, case: &Case, seed: u64, length: Duration, naive_script: &str) -> CaseResult {
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
    let start = Instant::now();
    let outcomes = drive(&schedule, |node, user| {
        let limiter = limiters[node].clone();
        let users = users.clone();
        async move { Some(limiter.check_async(users[user].as_str()).await.is_allowed()) }
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
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
    let outcomes = drive(&schedule, |node, user| {
        let mut con = cons[node].clone();
        let script = script.clone();
        let key = format!("{name}:naive:{}", users[user]);
        async move {
            let r: redis::RedisResult<i64> = script.key(key).arg(cap).arg(per_us).invoke_async(&mut con).await;
            r.ok().map(|allowed| allowed == 1)
        }
    })
    .await;
    let naive = judge(case.points, &outcomes);

    CaseResult {
        tollgate,
        naive,
        round_trips_per_s: round_trips as f64 / elapsed,
        failed_round_trips,
    }
}
