//! The accuracy harness on a real Redis: 8 limiter instances in this process, each with its
//! own node and sync task, share one limit through one redis-server on a loopback port; an
//! oracle counts what they admitted over every interval (DESIGN section 4, invariants 2 and 3).

#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use redis_server::RedisServer;
use tollgate::sim::{run_real, Report, Scenario, Skew};
use tollgate::store::{RedisConfig, RedisStore, Store};
use tollgate::{ColdStart, Policy};

/// 200 per second, capacity 400: the sizing rule holds at a 100 ms interval.
fn scenario(load: f64, skew: Skew, seed: u64) -> Scenario {
    Scenario {
        load,
        skew,
        seed,
        duration: Duration::from_secs(15),
        ..Scenario::new(Policy::per_second(200).burst(400))
    }
}

async fn run(server: &RedisServer, s: &Scenario) -> Report {
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(RedisConfig::new(server.url())).await.unwrap());
    let r = run_real(s, store).await;
    println!(
        "{}x {:?} {:?}: admitted {} ideal {} over {} utilization {:.4} round trips/s {:.1} p99 {} ns \
         failed syncs {} circuit opened {} degraded {}",
        s.load,
        s.skew,
        s.cold_start,
        r.admitted,
        r.ideal,
        r.over_admitted,
        r.utilization,
        r.round_trips_per_s,
        r.check_p99_ns,
        r.failed_round_trips,
        r.circuit_opened,
        r.degraded_admitted
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_2_and_3_on_redis_with_cold_start_deny() {
    let server = RedisServer::start();
    let mut seed = 10;
    for (load, skew) in [
        (1.5, Skew::Uniform),
        (1.5, Skew::Skewed),
        (10.0, Skew::Uniform),
        (10.0, Skew::Skewed),
    ] {
        seed += 1;
        let r = run(&server, &scenario(load, skew, seed)).await;
        assert_eq!(
            r.over_admitted, 0,
            "{load}x {skew:?}: over-admitted with cold start deny"
        );
        assert!(
            r.utilization >= 0.97,
            "{load}x {skew:?}: utilization {:.4}",
            r.utilization
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_2_on_redis_with_optimistic_cold_start() {
    let server = RedisServer::start();
    let n = 10;
    let s = Scenario {
        cold_start: ColdStart::Optimistic(n),
        stagger: Duration::from_millis(400),
        ..scenario(10.0, Skew::Uniform, 99)
    };
    let r = run(&server, &s).await;
    assert!(
        r.over_admitted <= s.nodes as u64 * n,
        "over-admitted {} > N x n = {}",
        r.over_admitted,
        s.nodes as u64 * n
    );
}

async fn evalsha_calls(server: &RedisServer) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split([':', ',']).find_map(|kv| kv.strip_prefix("calls=")))
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_4_on_redis_round_trips_do_not_follow_request_rate() {
    let server = RedisServer::start();
    // 300k checks per second offered over 1,000 keys (3x each key's 100/s), 3 s.
    let s = Scenario {
        keys: 1000,
        load: 3.0,
        duration: Duration::from_secs(3),
        ..Scenario::new(Policy::per_second(100).burst(200))
    };
    let r = run(&server, &s).await;
    let round_trips = r.round_trips_per_s * 3.0;
    assert!(r.checks > 500_000, "{} checks", r.checks);
    assert!(
        round_trips / r.admitted as f64 <= 0.01,
        "{round_trips} round trips for {} admitted requests",
        r.admitted
    );
    assert_eq!(r.over_admitted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_key_hammered_on_redis_adds_no_redis_traffic() {
    use tollgate::{Limiter, Node};
    let server = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(RedisConfig::new(server.url())).await.unwrap());
    let node = Node::builder(store)
        .sync_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    let l: Limiter = Limiter::builder(Policy::per_hour(5))
        .name("hammered")
        .node(&node)
        .build()
        .unwrap();
    let mut allowed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while allowed < 5 && std::time::Instant::now() < deadline {
        allowed += l.check_async("k").await.is_allowed() as u32;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(allowed, 5, "the hour's quota");
    // Let the node learn that the store is exhausted (demand in every sync interval).
    for _ in 0..30 {
        assert!(l.check("k").is_denied());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let claims = node.stats().claims;
    let calls = evalsha_calls(&server).await;
    // One second of hammering: 1,000 denials per 10 ms.
    for _ in 0..100 {
        for _ in 0..1000 {
            assert!(l.check("k").is_denied());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.stats().claims, claims, "claims sent for an exhausted key");
    // Heartbeats (one per second) are the only scripts the node may still run.
    assert!(
        evalsha_calls(&server).await - calls <= 2,
        "store scripts ran for an exhausted key"
    );
    node.shutdown().await;
}
