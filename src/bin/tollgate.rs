//! `tollgate`: tools around the tollgate rate limiter.
//!
//! `tollgate tune` measures how accurate distributed mode is for each sync interval: N nodes
//! share one limit under uniform and skewed load, and an oracle compares what they admitted
//! with what one exact limiter would have admitted.
//!
//! A subcommand is a variant of [`Command`] (its doc comment is its `--help` text) and an arm
//! in [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tollgate::sim::{run_virtual, Report, Scenario, Skew};
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
    /// Length of each run in seconds, in (0, 3600] [default: 30 on virtual time, 5 against
    /// Redis].
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
    /// run uses the in-process store on virtual time.
    #[arg(long, value_name = "URL", conflicts_with = "redis_cluster")]
    redis: Option<String>,
    /// The same against a Redis Cluster: seed URLs, comma-separated (needs the `redis`
    /// feature).
    #[arg(long = "redis-cluster", value_name = "URLS")]
    redis_cluster: Option<String>,
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
        } else {
            "in-process store, virtual time"
        }
    }

    fn wall_clock(&self) -> bool {
        self.args.redis.is_some() || self.args.redis_cluster.is_some()
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
    #[cfg(feature = "redis")]
    let (runtime, store) = if tune.wall_clock() {
        let rt = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start a runtime: {e}"))?;
        let store: std::sync::Arc<dyn tollgate::store::Store> = match (&args.redis, &args.redis_cluster) {
            (_, Some(urls)) => {
                let seeds: Vec<&str> = urls.split(',').map(str::trim).collect();
                std::sync::Arc::new(
                    rt.block_on(tollgate::store::RedisClusterStore::connect(seeds))
                        .map_err(|e| format!("--redis-cluster {urls}: {e}"))?,
                )
            }
            (Some(url), None) => std::sync::Arc::new(
                rt.block_on(tollgate::store::RedisStore::connect(url.as_str()))
                    .map_err(|e| format!("--redis {url}: {e}"))?,
            ),
            (None, None) => unreachable!("a wall-clock run has a Redis"),
        };
        (Some(rt), Some(store))
    } else {
        (None, None)
    };
    #[cfg(not(feature = "redis"))]
    if tune.wall_clock() {
        return Err(
            "--redis needs the `redis` feature: cargo run --release --features redis -- tune --redis URL".into(),
        );
    }
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
            ..Scenario::new(tune.policy.clone())
        };
        #[cfg(feature = "redis")]
        let report = match (&runtime, &store) {
            (Some(rt), Some(store)) => rt.block_on(tollgate::sim::run_real(&scenario, store.clone())),
            _ => run_virtual(&scenario),
        };
        #[cfg(not(feature = "redis"))]
        let report = run_virtual(&scenario);
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

fn print_table(tune: &Tune, rows: &[Row]) {
    let args = &tune.args;
    println!(
        "tollgate tune: {} nodes sharing {} on each of {} key(s) ({}), cold start {:?}",
        args.nodes,
        tune.policy,
        args.keys,
        tune.store(),
        args.cold_start
    );
    for &interval in &args.intervals {
        println!("\nsync interval {interval} ms");
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

/// One JSON object per case, one per line.
fn print_json(tune: &Tune, rows: &[Row]) {
    for r in rows {
        let rep = &r.report;
        let line = serde_json::json!({
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
    match Cli::parse().command {
        Command::Tune(args) => tune(args),
        Command::CheckConfig { file } => check_config(&file),
    }
}
