//! Distributed mode against a redis-server this bench starts on a loopback port.
//!
//! Prints:
//! `distributed hot_path tollgate_checks_per_s=<x> naive_checks_per_s=<y> ratio=<x/y>`: one
//! thread checking one key, tollgate (claimed quota, synced by its node every 100 ms) against
//! a limiter that runs one EVALSHA token-bucket script per check on the same Redis;
//! `distributed redis_us_per_key_sync=<z>`: Redis server CPU per key per sync, from
//! `INFO commandstats`, for batches of 1000 token-bucket keys synced by one node (median of
//! five rounds), then `distributed redis_us_per_key_sync_rounds=<r1,...,r5>` (every round), and
//! `distributed redis_us_per_key_sync_<case>=<z> rounds=<r1,...,r5>` for the same batches
//! synced by eight nodes in turn (`token_bucket_8_nodes`: every key holds eight nodes'
//! records) and for the window algorithms (`fixed_window`, `sliding_window`);
//! `distributed cluster_round_trips_per_sync=<n> masters=3 calls_per_sync=<c>`: on a 3-master
//! Redis Cluster this bench makes, the pipelines a node sends per regular sync (one per master
//! its keys live on) while 1000 keys spread over every hash-tag group are checked, and the
//! script calls those pipelines carry (one per slot and algorithm).

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

#[path = "../tests/common/redis_cluster.rs"]
mod redis_cluster;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    // The naive limiter: one EVALSHA per check, one at a time.
    let naive = rt.block_on(async {
        let client = redis::Client::open(server.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let script = redis::Script::new(NAIVE);
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < Duration::from_millis(700) {
                let allowed: i64 = script
                    .key("naive:{k}")
                    .arg(1_000_000_000u64)
                    .arg(1u64)
                    .invoke_async(&mut con)
                    .await
                    .unwrap();
                black_box(allowed);
                n += 1;
            }
            rounds.push(n as f64 / start.elapsed().as_secs_f64());
        }
        median(rounds)
    });

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
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let (mut n, mut allowed) = (0u64, 0u64);
        while n % 4096 != 0 || start.elapsed() < Duration::from_millis(400) {
            allowed += limiter.check("hot").is_allowed() as u64;
            n += 1;
        }
        assert!(
            allowed * 10 >= n * 9,
            "the node did not keep up: {allowed} of {n} allowed"
        );
        rounds.push(allowed as f64 / start.elapsed().as_secs_f64());
    }
    let ours = median(rounds);
    println!(
        "distributed hot_path tollgate_checks_per_s={ours:.0} naive_checks_per_s={naive:.0} ratio={:.0}",
        ours / naive
    );
    rt.block_on(node.shutdown());

    // Redis CPU per key per sync: batches of 1000 keys through the store.
    let bucket = Limits::from_policy(&Policy::per_second(100).burst(200), Duration::from_secs(1)).unwrap();
    let window = |algorithm| {
        let policy = Policy::new(100_000, Duration::from_secs(60)).algorithm(algorithm);
        Limits::from_policy(&policy, Duration::from_secs(1)).unwrap()
    };
    let cases = [
        ("", bucket, 1),
        ("_token_bucket_8_nodes", bucket, 8),
        ("_fixed_window", window(Algorithm::FixedWindow), 1),
        ("_sliding_window", window(Algorithm::SlidingWindow), 1),
    ];
    for (case, limits, nodes) in cases {
        let rounds = rt.block_on(us_per_key_sync(&server, &format!("cpu{case}"), limits, nodes));
        let list = rounds.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(",");
        let us_per_key = median(rounds);
        if case.is_empty() {
            println!("distributed redis_us_per_key_sync={us_per_key:.2}");
            println!("distributed redis_us_per_key_sync_rounds={list}");
        } else {
            println!("distributed redis_us_per_key_sync{case}={us_per_key:.2} rounds={list}");
        }
    }

    // Round trips per sync on a 3-master cluster.
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
    let drive = |d: Duration| {
        let start = Instant::now();
        while start.elapsed() < d {
            for k in &keys {
                black_box(limiter.check(k.as_str()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Warm up: the scripts get loaded on every master (NOSCRIPT costs a round once).
    drive(Duration::from_millis(500));
    let before = store.stats();
    drive(Duration::from_secs(2));
    let after = store.stats();
    let syncs = (after.batches - before.batches).max(1) as f64;
    println!(
        "distributed cluster_round_trips_per_sync={:.2} masters={} calls_per_sync={:.1}",
        (after.round_trips - before.round_trips) as f64 / syncs,
        after.masters,
        (after.calls - before.calls) as f64 / syncs
    );
    rt.block_on(node.shutdown());
}

/// Five rounds of 50 syncs of the same 1000 keys (namespace `name`), by `nodes`
/// nodes in turn, each keeping part of what it holds; Redis server time per key per sync of
/// each round. The server's timing of a command is wall-clock time, so a busy machine inflates
/// single rounds: report the median.
async fn us_per_key_sync(server: &RedisServer, name: &str, limits: Limits, nodes: u64) -> Vec<f64> {
    let store = RedisStore::connect(RedisConfig::new(server.url())).await.unwrap();
    let enc = KeyEncoder::default();
    let mut claims: Vec<Claim> = (0..1000u32)
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
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    for node in 1..=nodes {
        let grants = store.claim(node, &claims).await.unwrap();
        for (c, g) in claims.iter_mut().zip(grants) {
            c.window = g.unwrap().window;
        }
    }
    let mut rounds = Vec::new();
    for round in 0..5u64 {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut con)
            .await
            .unwrap();
        for i in 0..50u64 {
            let with_holdings: Vec<Claim> = claims
                .iter()
                .map(|c| Claim {
                    kept: (i + round) % 2,
                    seq: 2 + round * 50 + i,
                    ..c.clone()
                })
                .collect();
            let grants = store.claim(1 + i % nodes, &with_holdings).await.unwrap();
            for (c, g) in claims.iter_mut().zip(grants) {
                c.window = g.unwrap().window;
            }
        }
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut con)
            .await
            .unwrap();
        let line = info
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .expect("evalsha in commandstats");
        let field = |name: &str| -> f64 {
            line.split([':', ','])
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .unwrap()
                .parse()
                .unwrap()
        };
        rounds.push(field("usec") / (field("calls") * claims.len() as f64));
    }
    rounds
}
