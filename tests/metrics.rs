//! Metrics through the `metrics` facade, captured by a test recorder while a scripted scenario
//! runs: exact decision counts, near-limit counts, all-or-nothing layers, shadow mode in the
//! HTTP layer, and a store outage that opens and closes the circuit. The recorder is installed only after the first checks,
//! to show that the order does not matter.

#[path = "common/recorder.rs"]
mod recorder;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use recorder::{Captured, TestRecorder};
use tollgate::metrics as tm;
use tollgate::store::{
    Claim, ClaimOutcome, ErrorClass, Heartbeat, MemoryStore, NodeId, Store, StoreError, StoreFuture, StoreKey,
};
use tollgate::{check_all, node::CircuitState, Limiter, ManualClock, Node, Policy};

/// A memory store that can be switched to failing.
struct Flaky {
    inner: MemoryStore,
    down: AtomicBool,
}

impl Flaky {
    fn fail<T>(&self) -> Option<StoreFuture<'_, T>> {
        self.down.load(Ordering::SeqCst).then(|| {
            Box::pin(async { Err(StoreError::new(ErrorClass::Transient, "connection refused")) }) as StoreFuture<'_, T>
        })
    }
}

impl Store for Flaky {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        self.fail().unwrap_or_else(|| self.inner.claim(node, claims))
    }
    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        self.fail().unwrap_or_else(|| self.inner.heartbeat(registry, node, ttl))
    }
    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        self.inner.leave(registry, node)
    }
}

const ALLOWED: &str = "tollgate_decisions_total{decision=allowed,layer=,policy=api,tier=}";
const DENIED: &str = "tollgate_decisions_total{decision=denied,layer=,policy=api,tier=}";
const NEAR: &str = "tollgate_near_limit_total{layer=,policy=api,tier=}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_capture_exact_counts_whatever_the_order_of_recorder_installation() {
    // Checks before any recorder exists.
    let clock = ManualClock::new();
    let api: Limiter = Limiter::builder(Policy::per_minute(10))
        .name("api")
        .clock(clock.clock())
        .build()
        .unwrap();
    for _ in 0..12 {
        api.check("alice");
    }
    // Not counted at all.
    let quiet: Limiter = Limiter::builder(Policy::per_minute(10))
        .name("quiet")
        .metrics(false)
        .build()
        .unwrap();
    quiet.check("alice");

    let captured = Arc::new(Captured::default());
    metrics::set_global_recorder(TestRecorder(captured.clone())).unwrap();
    tm::describe_metrics();
    assert!(captured.described.lock().contains(&tm::DECISIONS_TOTAL.to_string()));
    tm::publish();
    // 10 allowed, the last two leaving 1 and 0 of 10 (under a fifth); then 2 denied.
    assert_eq!(captured.get(ALLOWED), Some(10.0));
    assert_eq!(captured.get(DENIED), Some(2.0));
    assert_eq!(captured.get(NEAR), Some(2.0));
    assert_eq!(
        captured.get("tollgate_keys_tracked{layer=,policy=api,tier=}"),
        Some(1.0)
    );
    assert!(captured.values.lock().keys().all(|k| !k.contains("quiet")));
    assert!(
        captured.values.lock().keys().all(|k| !k.contains("alice")),
        "a key became a label"
    );

    // Layers: a request the user layer denies counts as nothing for the ip layer.
    let ip: Limiter = Limiter::builder(Policy::per_minute(100))
        .name("ip")
        .metric_labels("ip", "")
        .build()
        .unwrap();
    let user: Limiter = Limiter::builder(Policy::per_minute(1))
        .name("user:free")
        .metric_labels("user", "free")
        .build()
        .unwrap();
    for _ in 0..3 {
        check_all(1, &[&ip.bind("192.0.2.1"), &user.bind("bob")]).unwrap();
    }
    tm::publish();
    assert_eq!(
        captured.get("tollgate_decisions_total{decision=allowed,layer=ip,policy=ip,tier=}"),
        Some(1.0)
    );
    assert_eq!(
        captured.get("tollgate_decisions_total{decision=denied,layer=ip,policy=ip,tier=}"),
        Some(0.0)
    );
    assert_eq!(
        captured.get("tollgate_decisions_total{decision=allowed,layer=user,policy=user:free,tier=free}"),
        Some(1.0)
    );
    assert_eq!(
        captured.get("tollgate_decisions_total{decision=denied,layer=user,policy=user:free,tier=free}"),
        Some(2.0)
    );

    // Shadow mode: an HTTP layer that lets through what it would have refused, and counts it.
    {
        use tower::{Layer, ServiceExt};
        let json = r#"{"tiers": {"anonymous": {"points": 3, "duration": 60}}, "shadow": true}"#;
        let live = tollgate::config::LiveConfig::builder()
            .config(tollgate::config::Config::from_json(json).unwrap())
            .build()
            .unwrap();
        let layer = tollgate::http::RateLimitLayer::new(live);
        let inner = tower::service_fn(|_req: http::Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
        });
        let svc = layer.layer(inner);
        let mut ok = 0;
        for _ in 0..5 {
            let mut req = http::Request::new(String::new());
            req.extensions_mut()
                .insert(tollgate::http::PeerAddr(([198, 51, 100, 7], 4000).into()));
            let res = svc.clone().oneshot(req).await.unwrap();
            ok += u32::from(res.status() == 200);
        }
        assert_eq!(ok, 5, "shadow mode blocked");
        tm::publish();
        assert_eq!(captured.get(tm::SHADOW_WOULD_BLOCK_TOTAL), Some(2.0));
    }

    // A store outage: the circuit opens after three failed syncs and closes after the probe.
    let store = Arc::new(Flaky {
        inner: MemoryStore::new(),
        down: AtomicBool::new(false),
    });
    let node = Node::builder(store.clone())
        .sync_interval(Duration::from_millis(100))
        .build_manual()
        .unwrap();
    let dist: Limiter = Limiter::builder(Policy::per_second(100))
        .name("dist")
        .node(&node)
        .build()
        .unwrap();
    dist.check("k");
    node.sync_once().await;
    assert!(dist.check("k").is_allowed());
    tm::publish();
    assert_eq!(captured.get(tm::CIRCUIT_STATE), Some(0.0));
    assert!(captured.samples(tm::SYNC_DURATION_SECONDS) >= 1);
    assert!(captured.samples(tm::SYNC_BATCH_KEYS) >= 1);
    assert!(captured.get(tm::LAST_SYNC_AGE_SECONDS).is_some_and(|a| a < 1.0));
    // A waiting check of a key the node holds nothing for: one call on demand.
    assert!(dist.check_async("on-demand").await.is_allowed());
    tm::publish();
    assert_eq!(
        captured.get("tollgate_claims_on_demand_total{deferred=false}"),
        Some(1.0)
    );

    store.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        dist.check("k");
        node.sync_once().await;
    }
    assert_eq!(node.circuit(), CircuitState::Open);
    tm::publish();
    assert_eq!(captured.get(tm::CIRCUIT_STATE), Some(1.0));
    assert_eq!(
        captured.get("tollgate_redis_errors_total{class=transient}"),
        Some(node.stats().transient_errors as f64)
    );
    assert!(node.stats().transient_errors >= 3);

    store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await; // past the longest open time
    node.sync_once().await;
    assert_eq!(node.circuit(), CircuitState::Closed);
    tm::publish();
    assert_eq!(captured.get(tm::CIRCUIT_STATE), Some(0.0));
    assert_eq!(captured.get(tm::STATE_LOSS_TOTAL), Some(0.0));
    node.shutdown().await;
}
