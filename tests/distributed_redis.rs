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
        "{}x {:?} {:?}: admitted {} ideal {} over {} utilization {:.4} round trips/s {:.1} p99 {} ns",
        s.load, s.skew, s.cold_start, r.admitted, r.ideal, r.over_admitted, r.utilization, r.round_trips_per_s, r.check_p99_ns
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_2_and_3_on_redis_with_cold_start_deny() {
    let server = RedisServer::start();
    let mut seed = 10;
    for (load, skew) in [(1.5, Skew::Uniform), (1.5, Skew::Skewed), (10.0, Skew::Uniform), (10.0, Skew::Skewed)] {
        seed += 1;
        let r = run(&server, &scenario(load, skew, seed)).await;
        assert_eq!(r.over_admitted, 0, "{load}x {skew:?}: over-admitted with cold start deny");
        assert!(r.utilization >= 0.97, "{load}x {skew:?}: utilization {:.4}", r.utilization);
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
    assert!(r.over_admitted <= s.nodes as u64 * n, "over-admitted {} > N x n = {}", r.over_admitted, s.nodes as u64 * n);
}
