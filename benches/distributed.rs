//! Distributed mode against a redis-server this bench starts on a loopback port, as criterion
//! groups; after each group the bench prints its line:
//!
//! `distributed hot_path tollgate_checks_per_s=<x> naive_checks_per_s=<y> ratio=<x/y>` (group
//! `hot_path`): one thread checking one key, tollgate (claimed quota, synced by its node every
//! 100 ms) against a limiter that runs one EVALSHA token-bucket script per check on the same
//! Redis (medians over the samples);
//! `distributed redis_us_per_key_sync=<z>` (group `redis_cpu_per_sync`, function
//! `token_bucket`): Redis server CPU per key per sync, from `INFO commandstats`, for batches of
//! 1000 token-bucket keys synced by one node (median of the samples), then
//! `distributed redis_us_per_key_sync_rounds=<r1,...>` (every sample), and
//! `distributed redis_us_per_key_sync_<case>=<z> rounds=<r1,...>` for the same batches
//! synced by eight nodes in turn (`token_bucket_8_nodes`: every key holds eight nodes'
//! records) and for the window algorithms (`fixed_window`, `sliding_window`). Criterion's
//! figures for this group are Redis server time per sync of 1000 keys, not wall time;
//! `distributed cluster_round_trips_per_sync=<n> masters=3 calls_per_sync=<c>` (group
//! `cluster_3_masters`): on a 3-master Redis Cluster this bench makes, the pipelines a node
//! sends per regular sync (one per master its keys live on) while 1000 keys spread over every
//! hash-tag group are checked, and the script calls those pipelines carry (one per slot and
//! algorithm). Criterion's figure for that group is the time of one pass of 1000 checks.
//!
//! After the criterion groups, slow keys (see `support/cold_keys.rs`), one fixed-length run per
//! case on a redis-server of their own, not a criterion group:
//! `distributed cold_keys nodes=<N> points_per_min=<P> load=<L> utilization=<pct>
//! over_admitted=<n> p50_us=<..> p99_us=<..> naive_p50_us=<..> naive_p99_us=<..>
//! naive_utilization=<pct> naive_over_admitted=<n> round_trips_per_s=<x> start=full` for N = 4 and 8
//! nodes, P = 20 and 100 requests per minute per user, L = 1.5 and 4 times the limit: 100
//! users send `check_async` requests to random nodes; utilization is admitted / what one exact
//! token bucket per user admits of the same arrivals, over_admitted the admissions beyond it
//! (summed over users), p50/p99 the latency from a request's arrival to its decision; the
//! `naive_` figures are the same arrivals through one EVALSHA token bucket per request.
//! `COLD_SECONDS` sets each run's length (default 20 s; each case runs twice that: tollgate,
//! then the naive limiter). `COLD_START=drained` empties every user's bucket just before each
//! run (a drain the exact limiter and the over-admission check see, but not the figures), so
//! that short runs measure the throttled steady state rather than the burst allowance of full
//! buckets (which lasts `60 s / (L - 1)`, 120 s at 1.5x); the line then ends in
//! `start=drained drained_users=<n> naive_drained_users=<n>` (users whose drain was admitted)
//! instead of `start=full`.
//!
//! Filters: `cargo bench --bench distributed -- <filter>`. A filter whose first `/`-separated
//! part is `cold_keys` runs only the slow-key cases whose id
//! (`cold_keys/nodes=<N>/points_per_min=<P>/load=<L>`) contains it (`-- cold_keys`,
//! `-- cold_keys/nodes=4/points_per_min=20`); any other filter goes to criterion, which matches
//! it against each function's `group/function` id, and selects the slow-key cases whose id
//! contains it as text. `--exact`, `--list` and `--ignored` apply to both; under `--test` (or
//! `cargo test --benches`) each slow-key case runs for 1 s.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

#[path = "../tests/common/redis_cluster.rs"]
mod redis_cluster;

#[path = "support/paired.rs"]
mod paired;

#[path = "support/cold_keys.rs"]
mod cold_keys;

use std::cell::RefCell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use paired::median;
use redis_server::RedisServer;
use tollgate::store::{Claim, KeyEncoder, Limits, RedisClusterStore, RedisConfig, RedisStore, Store};
use tollgate::{Algorithm, Limiter, Node, Policy};

/// One token bucket per key, advanced on every call with the server's clock: the usual
/// "one round trip per request" design.
const NAIVE: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local cap, per = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new = tat + per
if new - now > cap * per then return 0 end
redis.call('SET', KEYS[1], new, 'PX', math.ceil(cap * per / 1000) + 1000)
return 1
"#;

/// Keys per sync in the Redis CPU measurement.
const BATCH: usize = 1000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn hot_path(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = runtime();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = rt.block_on(client.get_multiplexed_async_connection()).unwrap();
    let script = redis::Script::new(NAIVE);

    // tollgate: the same Redis behind a node; the check loop runs on this thread while the
    // runtime's worker runs the sync task.
    let store = rt
        .block_on(RedisStore::connect(RedisConfig::new(server.url())))
        .unwrap();
    let node = {
        let _guard = rt.enter();
        Node::builder(Arc::new(store))
            .sync_interval(Duration::from_millis(100))
            .start()
            .unwrap()
    };
    let limiter: Limiter = Limiter::builder(Policy::per_second(1_000_000).burst(4_000_000_000))
        .name("bench")
        .node(&node)
        .build()
        .unwrap();
    assert!(rt.block_on(limiter.check_async("hot")).is_allowed());
    // Let demand-based claims grow.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(500) {
        black_box(limiter.check("hot"));
    }

    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(1));
    // Admitted checks per second of each sample.
    let (mut ours, mut naive) = (Vec::new(), Vec::new());
    group.bench_function("tollgate", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut allowed = 0u64;
            for _ in 0..iters {
                allowed += limiter.check("hot").is_allowed() as u64;
            }
            let t = start.elapsed();
            if iters >= 100_000 {
                assert!(
                    allowed * 10 >= iters * 9,
                    "the node did not keep up: {allowed} of {iters} allowed"
                );
                ours.push(allowed as f64 / t.as_secs_f64());
            }
            t
        })
    });
    // The naive limiter: one EVALSHA per check, one at a time.
    group.bench_function("naive_evalsha_per_check", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let allowed: i64 = script
                        .key("naive:{k}")
                        .arg(1_000_000_000u64)
                        .arg(1u64)
                        .invoke_async(&mut con)
                        .await
                        .unwrap();
                    black_box(allowed);
                }
                let t = start.elapsed();
                if iters >= 100 {
                    naive.push(iters as f64 / t.as_secs_f64());
                }
                t
            })
        })
    });
    group.finish();
    rt.block_on(node.shutdown());
    if !ours.is_empty() && !naive.is_empty() {
        let (ours, naive) = (median(ours), median(naive));
        println!(
            "distributed hot_path tollgate_checks_per_s={ours:.0} naive_checks_per_s={naive:.0} ratio={:.0}",
            ours / naive
        );
    }
}

/// One case of the Redis CPU measurement: `BATCH` keys of namespace `name` synced by `nodes`
/// nodes in turn, each keeping part of what it holds.
struct Syncs {
    store: RedisStore,
    con: redis::aio::MultiplexedConnection,
    claims: Vec<Claim>,
    nodes: u64,
    done: u64,
}

impl Syncs {
    async fn new(server: &RedisServer, name: &str, limits: Limits, nodes: u64) -> Syncs {
        let store = RedisStore::connect(RedisConfig::new(server.url())).await.unwrap();
        let enc = KeyEncoder::default();
        let mut claims: Vec<Claim> = (0..BATCH as u32)
            .map(|i| Claim {
                key: enc.encode(name, i.to_string().as_bytes()),
                limits,
                kept: 0,
                returned: 0,
                wanted: 2,
                window: 0,
                seq: 1,
            })
            .collect();
        for node in 1..=nodes {
            let grants = store.claim(node, &claims).await.unwrap();
            for (c, g) in claims.iter_mut().zip(grants) {
                c.window = g.unwrap().window;
            }
        }
        let client = redis::Client::open(server.url()).unwrap();
        let con = client.get_multiplexed_async_connection().await.unwrap();
        Syncs {
            store,
            con,
            claims,
            nodes,
            done: 0,
        }
    }

    /// Redis server time of `iters` syncs, from `INFO commandstats`. The server's timing of a
    /// command is wall-clock time, so a busy machine inflates single samples: the line reports
    /// the median.
    async fn server_time(&mut self, iters: u64) -> Duration {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.con)
            .await
            .unwrap();
        for _ in 0..iters {
            let i = self.done;
            self.done += 1;
            let with_holdings: Vec<Claim> = self
                .claims
                .iter()
                .map(|c| Claim {
                    kept: (i + i / 50) % 2,
                    // Newer than every claim before it (the first ones carry 1).
                    seq: 2 + i,
                    ..c.clone()
                })
                .collect();
            let grants = self.store.claim(1 + i % self.nodes, &with_holdings).await.unwrap();
            for (c, g) in self.claims.iter_mut().zip(grants) {
                c.window = g.unwrap().window;
            }
        }
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.con)
            .await
            .unwrap();
        let line = info
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .expect("evalsha in commandstats");
        let field = |name: &str| -> u64 {
            line.split([':', ','])
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .unwrap()
                .parse()
                .unwrap()
        };
        Duration::from_micros(field("usec"))
    }
}

fn redis_cpu_per_sync(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = runtime();
    let bucket = Limits::from_policy(&Policy::per_second(100).burst(200), Duration::from_secs(1)).unwrap();
    let window = |algorithm| {
        let policy = Policy::new(100_000, Duration::from_secs(60)).algorithm(algorithm);
        Limits::from_policy(&policy, Duration::from_secs(1)).unwrap()
    };
    let cases = [
        ("token_bucket", bucket, 1),
        ("token_bucket_8_nodes", bucket, 8),
        ("fixed_window", window(Algorithm::FixedWindow), 1),
        ("sliding_window", window(Algorithm::SlidingWindow), 1),
    ];
    let mut group = c.benchmark_group("redis_cpu_per_sync");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut lines = Vec::new();
    for (case, limits, nodes) in cases {
        let syncs = RefCell::new(None::<Syncs>);
        // Server microseconds per key per sync, of each sample.
        let mut samples = Vec::new();
        group.bench_function(case, |b| {
            b.iter_custom(|iters| {
                let mut syncs = syncs.borrow_mut();
                let syncs = syncs
                    .get_or_insert_with(|| rt.block_on(Syncs::new(&server, &format!("cpu_{case}"), limits, nodes)));
                let t = rt.block_on(syncs.server_time(iters));
                samples.push(t.as_micros() as f64 / (iters * BATCH as u64) as f64);
                t
            })
        });
        // The measurement's samples come after the warm-up's.
        let kept = samples.split_off(samples.len().saturating_sub(10));
        if !kept.is_empty() {
            lines.push((case, kept));
        }
    }
    group.finish();
    for (case, rounds) in lines {
        let list = rounds.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(",");
        let us_per_key = median(rounds);
        if case == "token_bucket" {
            println!("distributed redis_us_per_key_sync={us_per_key:.2}");
            println!("distributed redis_us_per_key_sync_rounds={list}");
        } else {
            println!("distributed redis_us_per_key_sync_{case}={us_per_key:.2} rounds={list}");
        }
    }
}

fn cluster_3_masters(c: &mut Criterion) {
    let rt = runtime();
    let cluster = redis_cluster::RedisCluster::start(3);
    let store = rt.block_on(RedisClusterStore::connect(cluster.urls())).unwrap();
    let node = {
        let _guard = rt.enter();
        Node::builder(Arc::new(store.clone()))
            .sync_interval(Duration::from_millis(100))
            .start()
            .unwrap()
    };
    let limiter: Limiter = Limiter::builder(Policy::per_second(1_000))
        .name("cluster")
        .node(&node)
        .build()
        .unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("client-{i}")).collect();
    // One pass checks every key once; the pause between passes keeps each key under its limit.
    let pass = || {
        let start = Instant::now();
        for k in &keys {
            black_box(limiter.check(k.as_str()));
        }
        let t = start.elapsed();
        std::thread::sleep(Duration::from_millis(5));
        t
    };
    // Warm up: the scripts get loaded on every master (NOSCRIPT costs a round once).
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(500) {
        pass();
    }
    let before = store.stats();
    let mut group = c.benchmark_group("cluster_3_masters");
    group.sample_size(10);
    group.throughput(Throughput::Elements(keys.len() as u64));
    let mut ran = false;
    group.bench_function("pass_of_1000_keys", |b| {
        b.iter_custom(|iters| {
            ran = true;
            (0..iters).map(|_| pass()).sum()
        })
    });
    group.finish();
    let after = store.stats();
    if ran {
        let syncs = (after.batches - before.batches).max(1) as f64;
        println!(
            "distributed cluster_round_trips_per_sync={:.2} masters={} calls_per_sync={:.1}",
            (after.round_trips - before.round_trips) as f64 / syncs,
            after.masters,
            (after.calls - before.calls) as f64 / syncs
        );
    }
    rt.block_on(node.shutdown());
}

/// The slow-key lines (see the file's doc): every case the arguments select, on a
/// redis-server of their own.
fn cold_keys_lines(args: &cold_keys::Args) {
    let selected: Vec<(u64, cold_keys::Case)> = cold_keys::cases()
        .into_iter()
        .enumerate()
        .filter(|(_, c)| args.selects(&c.id()))
        .map(|(i, c)| (i as u64, c))
        .collect();
    if args.list {
        for (_, case) in &selected {
            println!("{}: benchmark", case.id());
        }
        return;
    }
    if selected.is_empty() {
        return;
    }
    let length = if args.test {
        Duration::from_secs_f64(cold_keys::TEST_SECONDS)
    } else {
        cold_keys::run_length()
    };
    let start = cold_keys::Start::from_env();
    let server = RedisServer::start();
    // Requests overlap in tasks of their own, as in a server: one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (i, case) in selected {
        let r = rt.block_on(cold_keys::run_case(
            &server.url(),
            &case,
            cold_keys::SEED + i,
            length,
            start,
            NAIVE,
        ));
        if r.failed_round_trips > 0 || r.tollgate.failed > 0 || r.naive.failed > 0 {
            eprintln!(
                "distributed cold_keys {}: {} failed store calls, {} tollgate and {} naive requests failed \
                 (counted as denied)",
                case.id(),
                r.failed_round_trips,
                r.tollgate.failed,
                r.naive.failed
            );
        }
        println!("{}", r.line(&case));
    }
}

criterion_group!(benches, hot_path, redis_cpu_per_sync, cluster_3_masters);

fn main() {
    let args = cold_keys::Args::from_env();
    if !args.names_this_group_only() {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    cold_keys_lines(&args);
}
