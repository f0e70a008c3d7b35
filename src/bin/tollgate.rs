//! `tollgate`: tools around the tollgate rate limiter.
//!
//! `tollgate tune` measures how accurate distributed mode is for each sync interval: N nodes
//! share one limit under uniform and skewed load, and an oracle compares what they admitted
//! with what one exact limiter would have admitted.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tollgate::sim::{run_virtual, Report, Scenario, Skew};
use tollgate::{Algorithm, ColdStart, Policy};

const USAGE: &str = "\
usage: tollgate tune [options]

Measures the accuracy of distributed mode against the sync interval: N nodes share one
limit through a store, under uniform and 80/20-skewed load at each offered load.

options:
  --nodes N            nodes sharing the limit (default 8)
  --intervals LIST     sync intervals in ms, comma-separated (default 10,50,100,250,1000)
  --loads LIST         offered load as multiples of the limit (default 1.5,10)
  --points N           points per duration of the shared policy (default 1000)
  --duration-s S       the policy's duration in seconds (default 1)
  --burst N            token-bucket capacity (default 2 x points: the sizing rule
                       capacity >= 2 x rate x sync_interval holds up to 1 s)
  --algorithm A        token_bucket | sliding_window | fixed_window (default token_bucket)
  --cold-start C       deny | optimistic:N (default deny)
  --seconds S          length of each run (default 30 on virtual time, 5 against Redis)
  --seed N             seed of the arrival process (default 1)
  --keys N             keys the load is spread over, each with the policy (default 1)
  --svg PATH           where to write the plot (default tune.svg)
  --redis URL          run on the wall clock against this Redis (needs the `redis` feature);
                       without it the run uses the in-process store on virtual time
  --redis-cluster URLS the same against a Redis Cluster: seed URLs, comma-separated
";

struct Args {
    nodes: usize,
    intervals: Vec<u64>,
    loads: Vec<f64>,
    policy: Policy,
    cold_start: ColdStart,
    seconds: Option<f64>,
    seed: u64,
    keys: usize,
    svg: String,
    redis: Option<String>,
    cluster: bool,
}

fn parse_list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String> {
    let items: Result<Vec<T>, _> = v.split(',').map(|s| s.trim().parse::<T>()).collect();
    match items {
        Ok(items) if !items.is_empty() => Ok(items),
        _ => Err(format!("{flag}: expected a comma-separated list of numbers, got '{v}'")),
    }
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        nodes: 8,
        intervals: vec![10, 50, 100, 250, 1000],
        loads: vec![1.5, 10.0],
        policy: Policy::per_second(1000),
        cold_start: ColdStart::Deny,
        seconds: None,
        seed: 1,
        keys: 1,
        svg: "tune.svg".into(),
        redis: None,
        cluster: false,
    };
    let (mut points, mut duration_s, mut burst, mut algorithm) = (1000u64, 1.0f64, None, Algorithm::TokenBucket);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag}: missing value"));
        let num = |v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: expected a number, got '{v}'"))
        };
        match flag.as_str() {
            "--nodes" => a.nodes = num(value()?)? as usize,
            "--intervals" => a.intervals = parse_list(flag, &value()?)?,
            "--loads" => a.loads = parse_list(flag, &value()?)?,
            "--points" => points = num(value()?)? as u64,
            "--duration-s" => duration_s = num(value()?)?,
            "--burst" => burst = Some(num(value()?)? as u64),
            "--seconds" => a.seconds = Some(num(value()?)?),
            "--seed" => a.seed = num(value()?)? as u64,
            "--keys" => a.keys = (num(value()?)? as usize).max(1),
            "--svg" => a.svg = value()?,
            "--redis" => a.redis = Some(value()?),
            "--redis-cluster" => {
                a.redis = Some(value()?);
                a.cluster = true;
            }
            "--algorithm" => {
                algorithm = match value()?.as_str() {
                    "token_bucket" => Algorithm::TokenBucket,
                    "sliding_window" => Algorithm::SlidingWindow,
                    "fixed_window" => Algorithm::FixedWindow,
                    other => return Err(format!("--algorithm: unknown algorithm '{other}'")),
                }
            }
            "--cold-start" => {
                let v = value()?;
                a.cold_start = match v.split_once(':') {
                    None if v == "deny" => ColdStart::Deny,
                    Some(("optimistic", n)) => {
                        ColdStart::Optimistic(n.parse().map_err(|_| format!("--cold-start: bad allowance in '{v}'"))?)
                    }
                    _ => return Err(format!("--cold-start: expected deny or optimistic:N, got '{v}'")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    if a.nodes == 0 || a.nodes > 1000 {
        return Err("--nodes: must be in 1..=1000".into());
    }
    if a.intervals.iter().any(|&i| i == 0 || i > 60_000) {
        return Err("--intervals: each must be in 1..=60000 ms".into());
    }
    if a.loads.iter().any(|&l| !(l > 0.0 && l <= 1000.0)) {
        return Err("--loads: each must be in (0, 1000]".into());
    }
    if let Some(s) = a.seconds {
        if !(s > 0.0 && s <= 3600.0) {
            return Err("--seconds: must be in (0, 3600]".into());
        }
    }
    if !(duration_s.is_finite() && duration_s > 0.0) {
        return Err("--duration-s: must be a positive number".into());
    }
    let mut p = Policy::new(points, Duration::from_secs_f64(duration_s)).algorithm(algorithm);
    if algorithm == Algorithm::TokenBucket {
        p = p.burst(burst.unwrap_or(points.saturating_mul(2)));
    }
    p.validate().map_err(|e| format!("policy: {e}"))?;
    a.policy = p;
    Ok(a)
}

struct Row {
    interval: u64,
    load: f64,
    skew: Skew,
    report: Report,
}

fn progress(done: usize, total: usize, what: &str) {
    let width = 30;
    let filled = done * width / total.max(1);
    eprint!(
        "\r[{}{}] {done}/{total} {what:<40}",
        "=".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
    if done == total {
        eprintln!();
    }
}

fn run(args: &Args) -> Result<Vec<Row>, String> {
    let mut cases = Vec::new();
    for &interval in &args.intervals {
        for &load in &args.loads {
            for skew in [Skew::Uniform, Skew::Skewed] {
                cases.push((interval, load, skew));
            }
        }
    }
    #[cfg(feature = "redis")]
    let (runtime, store) = match &args.redis {
        Some(url) => {
            let rt = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start a runtime: {e}"))?;
            let store: std::sync::Arc<dyn tollgate::store::Store> = if args.cluster {
                let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
                std::sync::Arc::new(
                    rt.block_on(tollgate::store::RedisClusterStore::connect(seeds))
                        .map_err(|e| format!("--redis-cluster {url}: {e}"))?,
                )
            } else {
                std::sync::Arc::new(
                    rt.block_on(tollgate::store::RedisStore::connect(url))
                        .map_err(|e| format!("--redis {url}: {e}"))?,
                )
            };
            (Some(rt), Some(store))
        }
        None => (None, None),
    };
    #[cfg(not(feature = "redis"))]
    if args.redis.is_some() {
        return Err(
            "--redis needs the `redis` feature: cargo run --release --features redis -- tune --redis URL".into(),
        );
    }
    let mut rows = Vec::new();
    for (n, &(interval, load, skew)) in cases.iter().enumerate() {
        progress(n, cases.len(), &format!("sync {interval} ms, load {load}x, {skew:?}"));
        let scenario = Scenario {
            nodes: args.nodes,
            sync_interval: Duration::from_millis(interval),
            load,
            skew,
            duration: Duration::from_secs_f64(args.seconds.unwrap_or(if args.redis.is_some() { 5.0 } else { 30.0 })),
            cold_start: args.cold_start,
            seed: args.seed.wrapping_add(n as u64),
            keys: args.keys,
            ..Scenario::new(args.policy.clone())
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
    }
    progress(cases.len(), cases.len(), "done");
    Ok(rows)
}

fn print(args: &Args, rows: &[Row]) {
    println!(
        "tollgate tune: {} nodes sharing {} on each of {} key(s) ({}), cold start {:?}",
        args.nodes,
        args.policy,
        args.keys,
        if args.cluster {
            "Redis Cluster, wall clock"
        } else if args.redis.is_some() {
            "Redis, wall clock"
        } else {
            "in-process store, virtual time"
        },
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
                match r.skew {
                    Skew::Uniform => "uniform",
                    Skew::Skewed => "80/20",
                },
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

/// A line plot of the worst utilization and the worst over-admission (as % of capacity) per
/// interval, on a log scale of intervals.
fn svg(args: &Args, rows: &[Row]) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let xs: Vec<f64> = args.intervals.iter().map(|&i| (i as f64).ln()).collect();
    let (x0, x1) = xs.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let span = if x1 > x0 { x1 - x0 } else { 1.0 };
    let x = |v: f64| m + (v - x0) / span * (w - 2.0 * m);
    let y = |pct: f64| h - m - pct.clamp(0.0, 110.0) / 110.0 * (h - 2.0 * m);
    let cap = args.policy.capacity() as f64;
    let worst = |f: &dyn Fn(&Report) -> f64, min: bool| -> Vec<(f64, f64)> {
        args.intervals
            .iter()
            .zip(&xs)
            .map(|(&i, &lx)| {
                let vals = rows.iter().filter(|r| r.interval == i).map(|r| f(&r.report));
                let v = if min {
                    vals.fold(f64::MAX, f64::min)
                } else {
                    vals.fold(0.0, f64::max)
                };
                (x(lx), y(v))
            })
            .collect()
    };
    let util = worst(&|r| r.utilization * 100.0, true);
    let over = worst(&|r| r.over_admitted as f64 / cap * 100.0, false);
    let line = |pts: &[(f64, f64)], color: &str| {
        let p: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let dots: String = pts
            .iter()
            .map(|(a, b)| format!("<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3\" fill=\"{color}\"/>"))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>{dots}",
            p.join(" ")
        )
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{m}\" y=\"24\" font-size=\"14\">tollgate tune: {} nodes, {}</text>",
        args.nodes, args.policy
    );
    for pct in [0.0, 25.0, 50.0, 75.0, 100.0] {
        out += &format!(
            "<line x1=\"{m}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{pct}%</text>",
            w - m,
            m - 6.0,
            y(pct) + 4.0,
            y = y(pct)
        );
    }
    for (&i, &lx) in args.intervals.iter().zip(&xs) {
        out += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{i} ms</text>",
            x(lx),
            h - m + 18.0
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">sync interval (log scale)</text>",
        w / 2.0,
        h - 16.0
    );
    out += &line(&util, "#1f77b4");
    out += &line(&over, "#d62728");
    out += &format!(
        "<text x=\"{}\" y=\"44\" fill=\"#1f77b4\">worst utilization (admitted / ideal)</text>\
         <text x=\"{}\" y=\"60\" fill=\"#d62728\">worst over-admission (% of capacity)</text></svg>\n",
        m, m
    );
    out
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("tune") => {}
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("tollgate: unknown command '{other}'\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("tollgate: missing command\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let args = match parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tollgate tune: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rows = match run(&args) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("tollgate tune: {e}");
            return ExitCode::FAILURE;
        }
    };
    print(&args, &rows);
    match std::fs::write(&args.svg, svg(&args, &rows)) {
        Ok(()) => println!("\nplot written to {}", args.svg),
        Err(e) => {
            eprintln!("tollgate tune: cannot write {}: {e}", args.svg);
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
