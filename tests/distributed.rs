//! Distributed mode against the in-process store on virtual time: the invariants of the claim
//! protocol (DESIGN section 4: 2, 3, 4) and the node's life cycle.

use std::sync::Arc;
use std::time::Duration;

use tollgate::node::NodeError;
use tollgate::sim::{run_virtual, Scenario, Skew};
use tollgate::store::{ManualTime, MemoryStore, Store};
use tollgate::{Algorithm, ColdStart, Limiter, ManualClock, Node, Policy};

/// 1000 per second, capacity 2000: the sizing rule (capacity >= 2 x rate x interval) holds up
/// to a 1 s interval.
fn policy() -> Policy {
    Policy::per_second(1000).burst(2000)
}

/// The offered loads and spreads every accuracy test covers.
const SHAPES: [(f64, Skew); 4] = [
    (1.5, Skew::Uniform),
    (1.5, Skew::Skewed),
    (10.0, Skew::Uniform),
    (10.0, Skew::Skewed),
];

fn scenario(load: f64, skew: Skew) -> Scenario {
    Scenario {
        load,
        skew,
        duration: Duration::from_secs(20),
        ..Scenario::new(policy())
    }
}

#[test]
fn invariant_2_no_over_admission_with_cold_start_deny() {
    for (load, skew) in SHAPES {
        let r = run_virtual(&scenario(load, skew));
        assert_eq!(r.over_admitted, 0, "{load}x {skew:?}: {r:?}");
        // Nodes joining one by one while the others spend the quota.
        let staggered = run_virtual(&Scenario {
            stagger: Duration::from_millis(700),
            ..scenario(load, skew)
        });
        assert_eq!(staggered.over_admitted, 0, "{load}x {skew:?} staggered: {staggered:?}");
    }
}

#[test]
fn invariant_2_over_admission_bounded_by_nodes_times_cold_start_allowance() {
    let n = 25;
    for seed in 1..4 {
        let s = Scenario {
            load: 10.0,
            cold_start: ColdStart::Optimistic(n),
            stagger: Duration::from_millis(900),
            seed,
            ..scenario(10.0, Skew::Uniform)
        };
        let r = run_virtual(&s);
        assert!(
            r.over_admitted <= s.nodes as u64 * n,
            "seed {seed}: {} > N x n = {}",
            r.over_admitted,
            s.nodes as u64 * n
        );
    }
}

#[test]
fn invariant_3_utilization_at_least_97_percent_at_100ms() {
    for (load, skew) in SHAPES {
        let r = run_virtual(&scenario(load, skew));
        assert!(
            r.utilization >= 0.97,
            "{load}x {skew:?}: utilization {:.4}",
            r.utilization
        );
    }
}

/// Many slow keys: each node sees a key less than once per interval, while its busy keys make
/// it sync ten times an interval. The demand estimate must decay with time, not with syncs,
/// or every node returns a slow key's tokens between two of its requests and denies the next.
#[test]
fn invariant_3_utilization_holds_for_many_slow_keys() {
    for (points, keys, least) in [(50, 24, 0.95), (200, 24, 0.95), (10, 24, 0.7)] {
        for (load, skew) in SHAPES {
            let s = Scenario {
                keys,
                load,
                skew,
                duration: Duration::from_secs(20),
                ..Scenario::new(Policy::per_second(points))
            };
            let r = run_virtual(&s);
            assert_eq!(r.over_admitted, 0, "{points}/s x {keys} keys, {load}x {skew:?}");
            assert!(
                r.utilization >= least,
                "{points}/s x {keys} keys, {load}x {skew:?}: utilization {:.4}",
                r.utilization
            );
        }
    }
}

#[test]
fn window_algorithms_stay_within_points_per_window() {
    for alg in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let s = Scenario {
            load: 10.0,
            ..Scenario::new(Policy::per_second(1000).algorithm(alg))
        };
        let r = run_virtual(&Scenario {
            duration: Duration::from_secs(10),
            ..s
        });
        assert_eq!(r.over_admitted, 0, "{alg:?}: {r:?}");
        assert!(r.utilization >= 0.9, "{alg:?}: utilization {:.4}", r.utilization);
    }
}

#[test]
fn invariant_4_store_round_trips_per_admitted_request_stay_below_one_percent() {
    // 1M checks per second offered over 1k keys (10x each key's limit of 100/s).
    let s = Scenario {
        keys: 1000,
        load: 10.0,
        duration: Duration::from_secs(2),
        ..Scenario::new(Policy::per_second(100).burst(200))
    };
    let r = run_virtual(&s);
    let round_trips = r.round_trips_per_s * 2.0;
    let per_admitted = round_trips / r.admitted as f64;
    println!(
        "{} checks, {} admitted, {round_trips} round trips: {per_admitted:.5} per admitted",
        r.checks, r.admitted
    );
    assert!(r.checks > 1_500_000, "{} checks", r.checks);
    assert!(
        per_admitted <= 0.01,
        "{round_trips} round trips for {} admitted: {per_admitted:.5}",
        r.admitted
    );
    assert_eq!(r.over_admitted, 0);
}

struct World {
    clock: ManualClock,
    store_time: ManualTime,
    store: Arc<MemoryStore>,
}

impl World {
    fn new() -> Self {
        let store_time = ManualTime::new(1_700_000_000_000_000);
        World {
            clock: ManualClock::new(),
            store: Arc::new(MemoryStore::with_time_source(store_time.source())),
            store_time,
        }
    }

    fn node(&self, id: u64) -> Node {
        Node::builder(self.store.clone() as Arc<dyn Store>)
            .clock(self.clock.clock())
            .id(id)
            .build_manual()
            .unwrap()
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
        self.store_time.advance(d);
    }
}

#[tokio::test]
async fn an_exhausted_key_hammered_by_a_client_costs_the_store_nothing() {
    let w = World::new();
    let node = w.node(1);
    let l: Limiter = Limiter::builder(Policy::per_minute(10))
        .name("hammer")
        .node(&node)
        .build()
        .unwrap();
    assert!(l.check("k").is_denied(), "cold start deny");
    node.sync_once().await;
    let mut allowed = 0;
    // Spend the claims until the store has nothing left.
    for _ in 0..20 {
        for _ in 0..100 {
            allowed += l.check("k").is_allowed() as u32;
        }
        w.advance(Duration::from_millis(100));
        node.sync_once().await;
    }
    assert_eq!(allowed, 10, "one minute's quota");
    let claims_before = node.stats().claims;
    // 2 more seconds of hammering: the next token is ~4 s away; the node asks nothing.
    for _ in 0..20 {
        for _ in 0..1000 {
            assert!(l.check("k").is_denied());
        }
        w.advance(Duration::from_millis(100));
        node.sync_once().await;
    }
    assert_eq!(
        node.stats().claims - claims_before,
        0,
        "claims sent for an exhausted key"
    );
}

#[tokio::test]
async fn shutdown_returns_unused_claims_to_the_store() {
    let w = World::new();
    let (a, b) = (w.node(1), w.node(2));
    let la: Limiter = Limiter::builder(Policy::per_hour(100))
        .name("api")
        .node(&a)
        .build()
        .unwrap();
    let lb: Limiter = Limiter::builder(Policy::per_hour(100))
        .name("api")
        .node(&b)
        .build()
        .unwrap();
    // Node a builds up demand and claims most of the quota.
    for _ in 0..3 {
        for _ in 0..30 {
            la.check("k");
        }
        w.advance(Duration::from_millis(100));
        a.sync_once().await;
    }
    let used_by_a = 100 - la.peek("k", 0).unwrap().remaining();
    a.shutdown().await;
    // Node b can now claim everything a did not spend.
    let mut allowed_b = 0u64;
    for _ in 0..5 {
        for _ in 0..100 {
            allowed_b += lb.check("k").is_allowed() as u64;
        }
        w.advance(Duration::from_millis(100));
        b.sync_once().await;
    }
    let allowed_a = 90u64.min(used_by_a.max(1));
    assert!(
        allowed_b + allowed_a >= 95,
        "a admitted about {allowed_a}, b {allowed_b}: claims were not returned"
    );
    assert!(allowed_b <= 100);
}

#[tokio::test]
async fn the_registry_counts_live_nodes() {
    let w = World::new();
    let nodes: Vec<Node> = (1..=3).map(|i| w.node(i)).collect();
    for n in &nodes {
        n.sync_once().await;
    }
    w.advance(Duration::from_secs(2));
    for n in &nodes {
        n.sync_once().await;
    }
    assert_eq!(nodes[2].stats().live_nodes, 3);
    nodes[0].shutdown().await;
    w.advance(Duration::from_secs(2));
    nodes[2].sync_once().await;
    nodes[1].sync_once().await;
    assert_eq!(nodes[1].stats().live_nodes, 2, "a node that left is not counted");
}

#[tokio::test]
async fn async_check_waits_for_the_first_claim_and_sync_check_denies_cold_keys() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let node = Node::builder(store)
        .sync_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    let l: Limiter = Limiter::builder(Policy::per_second(100))
        .name("async")
        .node(&node)
        .build()
        .unwrap();
    assert!(l.check("cold").is_denied(), "cold start deny");
    let start = std::time::Instant::now();
    assert!(l.check_async("warm").await.is_allowed());
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(
        node.stats().claims_on_demand,
        1,
        "the waiting check's claim went out on demand, not with a sync"
    );
    node.shutdown().await;
}

#[test]
fn start_outside_a_runtime_is_a_clear_error() {
    let err = Node::builder(Arc::new(MemoryStore::new())).start().unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
    let bad = Node::builder(Arc::new(MemoryStore::new()))
        .sync_interval(Duration::ZERO)
        .build_manual()
        .unwrap_err();
    assert!(
        matches!(
            &bad,
            NodeError::Config {
                setting: "sync_interval",
                ..
            }
        ),
        "{bad:?}"
    );
    assert_eq!(bad.to_string(), "sync_interval: must be between 1 ms and 1 h");
}

#[test]
fn the_sizing_rule_is_checked() {
    use tollgate::node::sizing_advice;
    let interval = Duration::from_millis(100);
    assert!(sizing_advice(&Policy::per_second(1000).burst(200), interval).is_none());
    let advice = sizing_advice(&Policy::per_second(1000).burst(199), interval).unwrap();
    assert!(
        advice.contains("below 2 x rate") && advice.contains("at least 200"),
        "{advice}"
    );
    assert!(sizing_advice(&Policy::per_second(1000).burst(200), Duration::from_millis(50)).is_none());
    assert!(sizing_advice(&Policy::per_minute(100), interval).is_none());
}

#[tokio::test]
async fn keys_without_demand_are_forgotten_and_cost_the_store_nothing() {
    let w = World::new();
    let node = w.node(1);
    let l: Limiter = Limiter::builder(Policy::per_second(10))
        .name("idle")
        .node(&node)
        .build()
        .unwrap();
    for k in 0..50 {
        l.check(&format!("k{k}"));
    }
    for _ in 0..5 {
        w.advance(Duration::from_millis(100));
        node.sync_once().await;
        for k in 0..50 {
            l.check(&format!("k{k}"));
        }
    }
    assert_eq!(l.len(), 50);
    // One idle minute.
    for _ in 0..600 {
        w.advance(Duration::from_millis(100));
        node.sync_once().await;
    }
    assert_eq!(l.len(), 0, "idle keys are forgotten");
    let claims = node.stats().claims;
    for _ in 0..100 {
        w.advance(Duration::from_millis(100));
        node.sync_once().await;
    }
    assert_eq!(node.stats().claims, claims, "forgotten keys cost the store nothing");
}

#[test]
fn two_limiters_with_the_same_name_and_policy_on_one_node_are_refused() {
    let w = World::new();
    let node = w.node(1);
    let a: Limiter = Limiter::builder(Policy::per_second(10))
        .name("api")
        .node(&node)
        .build()
        .unwrap();
    let err = Limiter::<String>::builder(Policy::per_second(10))
        .name("api")
        .node(&node)
        .build()
        .unwrap_err();
    assert!(matches!(err, tollgate::BuildError::NameInUse(_)), "{err:?}");
    assert!(err.to_string().contains("already runs on this node"), "{err}");
    // A policy distributed mode cannot share names its field.
    let err = Limiter::<String>::builder(Policy::per_second(10).block_duration(Duration::from_secs(5)))
        .name("blocking")
        .node(&node)
        .build()
        .unwrap_err();
    match err {
        tollgate::BuildError::Distributed(e) => assert_eq!(e.field, "block_duration", "{e}"),
        other => panic!("{other:?}"),
    }
    // Another policy under the same name is another store key (a reload that changes it).
    let _b: Limiter = Limiter::builder(Policy::per_second(20))
        .name("api")
        .node(&node)
        .build()
        .unwrap();
    drop(a);
    let _again: Limiter = Limiter::builder(Policy::per_second(10))
        .name("api")
        .node(&node)
        .build()
        .unwrap();
    // Windows shorter than the claim margin allows are refused.
    let short = Policy::new(10, Duration::from_millis(20)).algorithm(Algorithm::FixedWindow);
    assert!(Limiter::<String>::builder(short).name("w").node(&node).build().is_err());
}

/// A client that comes back every few sync intervals, well within its quota: by then the node
/// gave its tokens back (its demand decayed) or forgot the key. `check_async` waits for a claim
/// in both cases, and also when the store answers before it starts waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_async_serves_a_client_that_comes_back_every_few_intervals() {
    for gap_ms in [60u64, 200, 230, 400] {
        let node = Node::builder(Arc::new(MemoryStore::new()))
            .sync_interval(Duration::from_millis(20))
            .start()
            .unwrap();
        let limiter: Limiter = Limiter::builder(Policy::per_minute(20))
            .name("slow")
            .node(&node)
            .build()
            .unwrap();
        let mut admitted = 0;
        for _ in 0..6 {
            admitted += u32::from(limiter.check_async("client").await.is_allowed());
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        }
        assert_eq!(admitted, 6, "one request every {gap_ms} ms, 20 per minute allowed");
        node.shutdown().await;
    }
}
