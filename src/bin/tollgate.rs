//! `tollgate`: tools around the tollgate rate limiter.
//!
//! `tollgate tune` measures how accurate distributed mode is for each sync interval: N nodes
//! share one limit under uniform and skewed load, and an oracle compares what they admitted
//! with what one exact limiter would have admitted. With `--async` the requests make
//! `check_async` on the wall clock and the check latency is reported beside utilization;
//! `--slow-keys` is the preset for per-user per-minute limits spread over instances.
//!
//! A subcommand is a variant of [`Command`] (its doc comment is its `--help` text) and an arm
//! in [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tollgate::sim::{run_real, run_virtual, CheckMode, Report, Scenario, Skew};
use tollgate::store::{MemoryStore, Store};
use tollgate::{Algorithm, ColdStart, Policy};

#[path = "tollgate/plot.rs"]
mod plot;

/// Tools around the tollgate rate limiter.
#[derive(Parser)]
#[command(name = "tollgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measures the accuracy of distributed mode against the sync interval: N nodes share one
    /// limit through a store, under uniform and 80/20-skewed load at each offered load.
    #[command(allow_negative_numbers = true)]
    Tune(TuneArgs),
    /// Validates a tiers file as a server would load it: prints every problem as a
    /// `path: reason` line (exit status 1), or the limits in force per tier, layer and
    /// endpoint. Needs the `http` feature.
    CheckConfig {
        /// The tiers file (JSON), for example rate-limit-tiers.json.
        file: PathBuf,
    },
}

/// The arguments of `tollgate tune`.
#[derive(clap::Args)]
struct TuneArgs {
    /// Nodes sharing the limit.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    nodes: u16,
    /// Sync intervals in ms, comma-separated.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "10,50,100,250,1000",
        value_parser = clap::value_parser!(u16).range(1..=60_000)
    )]
    intervals: Vec<u16>,
    /// Offered load as multiples of the limit, comma-separated, each in (0, 1000].
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1.5,10", value_parser = load)]
    loads: Vec<f64>,
    /// Points per duration of the shared policy.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = whole)]
    points: u64,
    /// The policy's duration in seconds.
    #[arg(long = "duration-s", value_name = "S", default_value_t = 1.0, value_parser = positive_seconds)]
    duration_s: f64,
    /// Token-bucket capacity [default: 2 x points: the sizing rule capacity >= 2 x rate x
    /// sync_interval holds up to 1 s].
    #[arg(long, value_name = "N", value_parser = whole)]
    burst: Option<u64>,
    /// The algorithm of the shared policy.
    #[arg(long, value_name = "A", value_enum, default_value_t = AlgorithmArg::TokenBucket)]
    algorithm: AlgorithmArg,
    /// What a node admits for a key before its first claim arrives: deny | optimistic:N.
    #[arg(long = "cold-start", value_name = "C", default_value = "deny", value_parser = cold_start)]
    cold_start: ColdStart,
    /// Length of each run in seconds, in (0, 3600] [default: 30 on virtual time, 5 on the wall
    /// clock (--async, --redis), 10 with --slow-keys].
    #[arg(long, value_name = "S", value_parser = run_seconds)]
    seconds: Option<f64>,
    /// Seed of the arrival process.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Keys the load is spread over, each with the policy.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    keys: u32,
    /// Where to write the plot (utilization loss and store round trips against the interval).
    #[arg(long, value_name = "PATH", default_value = "tune.svg")]
    svg: PathBuf,
    /// One JSON object per case per line on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Run on the wall clock against this Redis (needs the `redis` feature); without it the
    /// run uses the in-process store (on virtual time, or on the wall clock with --async).
    #[arg(long, value_name = "URL", conflicts_with = "redis_cluster")]
    redis: Option<String>,
    /// The same against a Redis Cluster: seed URLs, comma-separated (needs the `redis`
    /// feature).
    #[arg(long = "redis-cluster", value_name = "URLS")]
    redis_cluster: Option<String>,
    /// Requests make check_async, each in a task of its own (a key a node holds nothing for
    /// waits for its claim), on the wall clock, and the table gets the check latency (p50,
    /// p99 in µs, from a request's arrival to its decision) beside utilization. Runs against
    /// the in-process store unless --redis or --redis-cluster is given.
    #[arg(long = "async")]
    async_checks: bool,
    /// Slow keys, per-user per-minute limits spread over instances: --async --keys 100
    /// --points 20 --duration-s 60 --burst <points> --nodes 4 --loads 1.5,4 --intervals 100
    /// --seconds 10. Any of these flags given beside it wins. Full buckets take 60 s / (load -
    /// 1) to empty (120 s at 1.5x): shorter runs measure mostly their burst allowance.
    #[arg(long = "slow-keys")]
    slow_keys: bool,
}

/// `--slow-keys`: users (keys) sharing the load.
const SLOW_KEYS_USERS: u32 = 100;
/// `--slow-keys`: requests per minute per user.
const SLOW_KEYS_POINTS: u64 = 20;
/// `--slow-keys`: the policy's duration in seconds.
const SLOW_KEYS_DURATION_S: f64 = 60.0;
/// `--slow-keys`: nodes (service instances).
const SLOW_KEYS_NODES: u16 = 4;
/// `--slow-keys`: offered loads.
const SLOW_KEYS_LOADS: [f64; 2] = [1.5, 4.0];
/// `--slow-keys`: the sync interval in ms.
const SLOW_KEYS_INTERVAL_MS: u16 = 100;
/// `--slow-keys`: each run's length in seconds.
const SLOW_KEYS_SECONDS: f64 = 10.0;

impl TuneArgs {
    /// Applies `--slow-keys` to every setting the command line (`matches`) left at its
    /// default. The burst follows the points (the semantics of a per-minute policy).
    fn apply_preset(&mut self, matches: &ArgMatches) {
        if !self.slow_keys {
            return;
        }
        let default = |id: &str| matches.value_source(id) != Some(ValueSource::CommandLine);
        self.async_checks = true;
        if default("keys") {
            self.keys = SLOW_KEYS_USERS;
        }
        if default("points") {
            self.points = SLOW_KEYS_POINTS;
        }
        if default("duration_s") {
            self.duration_s = SLOW_KEYS_DURATION_S;
        }
        if default("burst") {
            self.burst = Some(self.points);
        }
        if default("nodes") {
            self.nodes = SLOW_KEYS_NODES;
        }
        if default("loads") {
            self.loads = SLOW_KEYS_LOADS.to_vec();
        }
        if default("intervals") {
            self.intervals = vec![SLOW_KEYS_INTERVAL_MS];
        }
        if default("seconds") {
            self.seconds = Some(SLOW_KEYS_SECONDS);
        }
    }
}

/// The algorithms, by the names of the configuration vocabulary.
#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
enum AlgorithmArg {
    TokenBucket,
    SlidingWindow,
    FixedWindow,
}

impl From<AlgorithmArg> for Algorithm {
    fn from(a: AlgorithmArg) -> Algorithm {
        match a {
            AlgorithmArg::TokenBucket => Algorithm::TokenBucket,
            AlgorithmArg::SlidingWindow => Algorithm::SlidingWindow,
            AlgorithmArg::FixedWindow => Algorithm::FixedWindow,
        }
    }
}

/// Why a value given on the command line was refused.
#[derive(Debug, thiserror::Error)]
enum ValueError {
    #[error("expected a number")]
    NotANumber,
    #[error("{0} is not in {1}")]
    OutOfRange(f64, &'static str),
    #[error("expected a whole number of at least 1")]
    NotWhole,
    #[error("expected deny or optimistic:N (N a whole number of units)")]
    ColdStart,
}

fn number_in(s: &str, ok: impl Fn(f64) -> bool, range: &'static str) -> Result<f64, ValueError> {
    let v: f64 = s.trim().parse().map_err(|_| ValueError::NotANumber)?;
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(ValueError::OutOfRange(v, range))
    }
}

fn whole(s: &str) -> Result<u64, ValueError> {
    match s.trim().parse::<u64>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(ValueError::NotWhole),
    }
}

fn load(s: &str) -> Result<f64, ValueError> {
    number_in(s, |v| v > 0.0 && v <= 1000.0, "(0, 1000]")
}

fn positive_seconds(s: &str) -> Result<f64, ValueError> {
    number_in(s, |v| v > 0.0 && v <= 1e9, "(0, 1e9]")
}

fn run_seconds(s: &str) -> Result<f64, ValueError> {
    number_in(s, |v| v > 0.0 && v <= 3600.0, "(0, 3600]")
}

fn cold_start(s: &str) -> Result<ColdStart, ValueError> {
    match s.split_once(':') {
        None if s == "deny" => Ok(ColdStart::Deny),
        Some(("optimistic", n)) => n.parse().map(ColdStart::Optimistic).map_err(|_| ValueError::ColdStart),
        _ => Err(ValueError::ColdStart),
    }
}

/// The run's settings, checked.
struct Tune {
    args: TuneArgs,
    policy: Policy,
}

impl Tune {
    /// The store the run uses, for the headline.
    fn store(&self) -> &'static str {
        if self.args.redis_cluster.is_some() {
            "Redis Cluster, wall clock"
        } else if self.args.redis.is_some() {
            "Redis, wall clock"
        } else if self.args.async_checks {
            "in-process store, wall clock"
        } else {
            "in-process store, virtual time"
        }
    }

    fn wall_clock(&self) -> bool {
        self.args.redis.is_some() || self.args.redis_cluster.is_some() || self.args.async_checks
    }

    fn check(&self) -> CheckMode {
        if self.args.async_checks {
            CheckMode::Async
        } else {
            CheckMode::Sync
        }
    }
}

/// The shared policy of the arguments, or clap's usage error (exit code 2) naming what is wrong.
fn policy(args: &TuneArgs) -> Result<Policy, clap::Error> {
    let algorithm = Algorithm::from(args.algorithm);
    let mut p = Policy::new(args.points, Duration::from_secs_f64(args.duration_s)).algorithm(algorithm);
    if algorithm == Algorithm::TokenBucket {
        p = p.burst(args.burst.unwrap_or(args.points.saturating_mul(2)));
    }
    p.validate().map_err(|e| {
        let mut cmd = Cli::command();
        let tune = cmd.find_subcommand_mut("tune").expect("the tune subcommand").clone();
        tune.bin_name("tollgate tune")
            .error(clap::error::ErrorKind::ValueValidation, format!("policy: {e}"))
    })?;
    Ok(p)
}

/// One case's result.
struct Row {
    interval: u16,
    load: f64,
    skew: Skew,
    report: Report,
}

fn shape(skew: Skew) -> &'static str {
    match skew {
        Skew::Uniform => "uniform",
        Skew::Skewed => "80/20",
    }
}

fn progress_bar(len: usize) -> ProgressBar {
    // Drawn on stderr, and only when it is a terminal.
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

fn run(tune: &Tune) -> Result<Vec<Row>, String> {
    let args = &tune.args;
    let mut cases = Vec::new();
    for &interval in &args.intervals {
        for &load in &args.loads {
            for skew in [Skew::Uniform, Skew::Skewed] {
                cases.push((interval, load, skew));
            }
        }
    }
    let (runtime, store) = if tune.wall_clock() {
        let rt = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start a runtime: {e}"))?;
        let store = wall_clock_store(&rt, args)?;
        (Some(rt), Some(store))
    } else {
        (None, None)
    };
    let bar = progress_bar(cases.len());
    let seconds = args.seconds.unwrap_or(if tune.wall_clock() { 5.0 } else { 30.0 });
    let mut rows = Vec::new();
    for (n, &(interval, load, skew)) in cases.iter().enumerate() {
        bar.set_message(format!("sync {interval} ms, load {load}x, {}", shape(skew)));
        let scenario = Scenario {
            nodes: usize::from(args.nodes),
            sync_interval: Duration::from_millis(u64::from(interval)),
            load,
            skew,
            duration: Duration::from_secs_f64(seconds),
            cold_start: args.cold_start,
            seed: args.seed.wrapping_add(n as u64),
            keys: args.keys as usize,
            check: tune.check(),
            ..Scenario::new(tune.policy.clone())
        };
        let report = match (&runtime, &store) {
            (Some(rt), Some(store)) => rt.block_on(run_real(&scenario, store.clone())),
            _ => run_virtual(&scenario),
        };
        rows.push(Row {
            interval,
            load,
            skew,
            report,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// The store of a wall-clock run: the Redis or Redis Cluster given, else the in-process store.
#[cfg(feature = "redis")]
fn wall_clock_store(rt: &tokio::runtime::Runtime, args: &TuneArgs) -> Result<Arc<dyn Store>, String> {
    Ok(match (&args.redis, &args.redis_cluster) {
        (_, Some(urls)) => {
            let seeds: Vec<&str> = urls.split(',').map(str::trim).collect();
            Arc::new(
                rt.block_on(tollgate::store::RedisClusterStore::connect(seeds))
                    .map_err(|e| format!("--redis-cluster {urls}: {e}"))?,
            )
        }
        (Some(url), None) => Arc::new(
            rt.block_on(tollgate::store::RedisStore::connect(url.as_str()))
                .map_err(|e| format!("--redis {url}: {e}"))?,
        ),
        (None, None) => Arc::new(MemoryStore::new()),
    })
}

/// The store of a wall-clock run: the in-process store (this build has no Redis client).
#[cfg(not(feature = "redis"))]
fn wall_clock_store(_rt: &tokio::runtime::Runtime, args: &TuneArgs) -> Result<Arc<dyn Store>, String> {
    if args.redis.is_some() || args.redis_cluster.is_some() {
        return Err(
            "--redis needs the `redis` feature: cargo run --release --features redis -- tune --redis URL".into(),
        );
    }
    Ok(Arc::new(MemoryStore::new()))
}

/// Nanoseconds as microseconds.
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn print_table(tune: &Tune, rows: &[Row]) {
    let args = &tune.args;
    println!(
        "tollgate tune: {} nodes sharing {} on each of {} key(s) ({}), cold start {:?}{}",
        args.nodes,
        tune.policy,
        args.keys,
        tune.store(),
        args.cold_start,
        if args.async_checks { ", check_async" } else { "" }
    );
    for &interval in &args.intervals {
        println!("\nsync interval {interval} ms");
        if args.async_checks {
            print_async_rows(rows, interval);
            continue;
        }
        println!(
            "  {:<6} {:<8} {:>10} {:>10} {:>14} {:>12} {:>16} {:>14}",
            "load", "shape", "admitted", "ideal", "over-admitted", "utilization", "round trips/s", "check p99"
        );
        for r in rows.iter().filter(|r| r.interval == interval) {
            let rep = &r.report;
            println!(
                "  {:<6} {:<8} {:>10} {:>10} {:>14} {:>11.2}% {:>16.1} {:>11} ns",
                format!("{}x", r.load),
                shape(r.skew),
                rep.admitted,
                rep.ideal,
                rep.over_admitted,
                rep.utilization * 100.0,
                rep.round_trips_per_s,
                rep.check_p99_ns
            );
        }
    }
}

/// The rows of one interval with the check latency of `--async` (p50, p99 in µs).
fn print_async_rows(rows: &[Row], interval: u16) {
    println!(
        "  {:<6} {:<8} {:>10} {:>10} {:>14} {:>12} {:>16} {:>13} {:>13}",
        "load", "shape", "admitted", "ideal", "over-admitted", "utilization", "round trips/s", "check p50", "check p99"
    );
    for r in rows.iter().filter(|r| r.interval == interval) {
        let rep = &r.report;
        println!(
            "  {:<6} {:<8} {:>10} {:>10} {:>14} {:>11.2}% {:>16.1} {:>10.1} µs {:>10.1} µs",
            format!("{}x", r.load),
            shape(r.skew),
            rep.admitted,
            rep.ideal,
            rep.over_admitted,
            rep.utilization * 100.0,
            rep.round_trips_per_s,
            us(rep.check_p50_ns),
            us(rep.check_p99_ns)
        );
    }
}

/// One JSON object per case, one per line.
fn print_json(tune: &Tune, rows: &[Row]) {
    for r in rows {
        let rep = &r.report;
        let mut line = serde_json::json!({
            "sync_interval_ms": r.interval,
            "load": r.load,
            "shape": shape(r.skew),
            "nodes": tune.args.nodes,
            "keys": tune.args.keys,
            "policy": tune.policy.to_string(),
            "store": tune.store(),
            "offered": rep.offered,
            "admitted": rep.admitted,
            "ideal": rep.ideal,
            "over_admitted": rep.over_admitted,
            "utilization": rep.utilization,
            "round_trips_per_s": rep.round_trips_per_s,
            "check_p99_ns": rep.check_p99_ns,
            "checks": rep.checks,
        });
        if tune.args.async_checks {
            line["check"] = "async".into();
            line["check_p50_us"] = us(rep.check_p50_ns).into();
            line["check_p99_us"] = us(rep.check_p99_ns).into();
        }
        println!("{line}");
    }
}

fn tune(args: TuneArgs) -> ExitCode {
    let policy = match policy(&args) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    let tune = Tune { args, policy };
    let rows = match run(&tune) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("tollgate tune: {e}");
            return ExitCode::FAILURE;
        }
    };
    if tune.args.json {
        print_json(&tune, &rows);
    } else {
        print_table(&tune, &rows);
    }
    let cases: Vec<plot::Case> = rows
        .iter()
        .map(|r| plot::Case {
            interval_ms: r.interval,
            shape: format!("{}x {}", r.load, shape(r.skew)),
            report: &r.report,
        })
        .collect();
    let title = format!(
        "tollgate tune: {} nodes, {} ({})",
        tune.args.nodes,
        tune.policy,
        tune.store()
    );
    let svg = plot::svg(&title, tune.policy.capacity(), &cases);
    match std::fs::write(&tune.args.svg, svg) {
        Ok(()) if tune.args.json => eprintln!("plot written to {}", tune.args.svg.display()),
        Ok(()) => println!("\nplot written to {}", tune.args.svg.display()),
        Err(e) => {
            eprintln!("tollgate tune: cannot write {}: {e}", tune.args.svg.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `tollgate check-config FILE`.
#[cfg(feature = "http")]
fn check_config(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tollgate check-config: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match tollgate::config::check(&text) {
        Ok(report) => {
            println!("{}: ok\n\n{report}", file.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{problems}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "http"))]
fn check_config(_file: &std::path::Path) -> ExitCode {
    eprintln!(
        "tollgate check-config: this build has no tiers file support; build with the http feature: \
         cargo run --features http -- check-config FILE"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Tune(mut args) => {
            if let Some(("tune", m)) = matches.subcommand() {
                args.apply_preset(m);
            }
            tune(args)
        }
        Command::CheckConfig { file } => check_config(&file),
    }
}
