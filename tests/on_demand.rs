//! Claims on demand: a check that may wait (`check_async`, `check_all_async`) on a key whose
//! held tokens do not cover it claims what it needs in one store call, shared with every check
//! that asks meanwhile, and a slow key holds nothing between its requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tollgate::store::{Claim, ClaimOutcome, Heartbeat, MemoryStore, NodeId, Store, StoreFuture, StoreKey};
use tollgate::{check_all_async, Limiter, Node, Policy};

/// The in-process store behind a delay per call (a network round trip), counting the claims
/// it receives per call.
struct Slow {
    inner: Arc<MemoryStore>,
    delay: Duration,
    calls: AtomicU64,
    claims: AtomicU64,
}

impl Slow {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Slow {
            inner: Arc::new(MemoryStore::new()),
            delay,
            calls: AtomicU64::new(0),
            claims: AtomicU64::new(0),
        })
    }
}

impl Store for Slow {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.claims.fetch_add(claims.len() as u64, Ordering::Relaxed);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.claim(node, claims).await
        })
    }
    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        self.inner.heartbeat(registry, node, ttl)
    }
    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        self.inner.leave(registry, node)
    }
}

fn node(store: Arc<dyn Store>) -> Node {
    node_syncing_every(store, Duration::from_millis(100))
}

fn node_syncing_every(store: Arc<dyn Store>, interval: Duration) -> Node {
    Node::builder(store).sync_interval(interval).start().unwrap()
}

/// Long enough that no regular sync runs during a test that counts the store's claims.
const NO_SYNC_SOON: Duration = Duration::from_secs(5);

/// Runs one `check_async` per key, all started before any is answered.
async fn all_at_once(limiter: &Limiter, keys: impl Iterator<Item = String>) -> Vec<tollgate::Decision> {
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys {
        let l = limiter.clone();
        tasks.spawn(async move { l.check_async(&key).await });
    }
    tasks.join_all().await
}

fn limiter(policy: Policy, name: &str, node: &Node) -> Limiter {
    Limiter::builder(policy).name(name).node(node).build().unwrap()
}

/// The README's example as a new user runs it: one node, `per_minute(5)`, eight `check_async`
/// calls in a row. The store can grant five, so five are admitted (before, the node admitted
/// two and then denied while the store still held three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_within_the_limit_on_one_node_is_admitted_whole() {
    let node = node(Arc::new(MemoryStore::new()));
    let per_user = limiter(Policy::per_minute(5), "per_user", &node);
    let mut verdicts = Vec::new();
    for _ in 0..8 {
        verdicts.push(per_user.check_async("alice").await.is_allowed());
    }
    assert_eq!(verdicts, [true, true, true, true, true, false, false, false]);
    let denied = per_user.check_async("alice").await;
    let wait = denied.retry_after().expect("denied: a retry time");
    // One token per 12 s: the store's next token, not a sync interval.
    assert!(wait > Duration::from_secs(10), "retry after {wait:?}");
    node.shutdown().await;
}

/// Concurrent checks of one key the node holds nothing for share claims: those that ask
/// before a call goes out share it, those that ask while it is on its way share the next one.
/// Ten checks make at most two calls, each with one claim for the key.
// One thread: every task asks before the first call's answer can arrive, however loaded the
// machine (with worker threads, a task started late asks after it and makes a call of its own).
#[tokio::test(flavor = "current_thread")]
async fn concurrent_checks_of_one_cold_key_share_one_claim() {
    let store = Slow::new(Duration::from_millis(50));
    let node = node_syncing_every(store.clone(), NO_SYNC_SOON);
    let per_user = limiter(Policy::per_minute(100), "per_user", &node);
    let decisions = all_at_once(&per_user, (0..10).map(|_| "bob".to_string())).await;
    assert!(decisions.iter().all(|d| d.is_allowed()), "all ten within the limit");
    let stats = node.stats();
    assert!(stats.claims_on_demand <= 2, "{stats:?}");
    assert_eq!(
        store.claims.load(Ordering::Relaxed),
        stats.claims_on_demand,
        "one claim for the key per call"
    );
    node.shutdown().await;
}

/// Keys asked for while a call on demand is on its way go together in the next call: a flood
/// of new keys makes larger calls, not more of them.
// One thread: every task asks before the first call's answer can arrive, however loaded the
// machine (with worker threads, a task started late asks after it and makes a call of its own).
#[tokio::test(flavor = "current_thread")]
async fn cold_keys_asked_while_a_call_is_on_its_way_share_the_next_call() {
    let store = Slow::new(Duration::from_millis(50));
    let node = node_syncing_every(store.clone(), NO_SYNC_SOON);
    let per_user = limiter(Policy::per_minute(20), "per_user", &node);
    let decisions = all_at_once(&per_user, (0..50).map(|i| format!("user-{i}"))).await;
    assert!(decisions.iter().all(|d| d.is_allowed()));
    let stats = node.stats();
    assert!(stats.claims_on_demand <= 2, "{stats:?}");
    assert_eq!(store.claims.load(Ordering::Relaxed), 50, "one claim per key");
    node.shutdown().await;
}

/// A slow key holds nothing between its requests: what one node claimed for a request is
/// what the request spent, so the rest of the limit stays in the store for the client's next
/// request, whichever node it lands on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_claimed_for_a_slow_key_do_not_stay_on_the_node_that_claimed_them() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (a, b) = (node(store.clone()), node(store));
    let (la, lb) = (
        limiter(Policy::per_minute(5), "per_user", &a),
        limiter(Policy::per_minute(5), "per_user", &b),
    );
    assert!(la.check_async("carol").await.is_allowed());
    let mut on_b = 0;
    for _ in 0..6 {
        on_b += u64::from(lb.check_async("carol").await.is_allowed());
    }
    assert_eq!(on_b, 4, "B gets the four A did not spend");
    a.shutdown().await;
    b.shutdown().await;
}

/// Past the node's budget of calls on demand, a waiting check's claim goes with the next sync
/// (and is still admitted); the deferral is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_past_the_budget_go_with_the_next_sync() {
    let node = Node::builder(Arc::new(MemoryStore::new()))
        .sync_interval(Duration::from_millis(50))
        .claims_on_demand_per_second(1)
        .start()
        .unwrap();
    let per_user = limiter(Policy::per_minute(20), "per_user", &node);
    assert!(per_user.check_async("dave").await.is_allowed());
    assert!(per_user.check_async("erin").await.is_allowed());
    let stats = node.stats();
    assert_eq!(stats.claims_on_demand, 1, "{stats:?}");
    assert_eq!(stats.claims_on_demand_deferred, 1, "{stats:?}");
    node.shutdown().await;
}

/// A hot key keeps tokens ahead of its checks: after its first lease of traffic, its checks
/// are answered from held tokens, not by calls on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_keeps_tokens_ahead_of_its_checks() {
    let node = node(Arc::new(MemoryStore::new()));
    let api = limiter(Policy::per_second(10_000), "api", &node);
    for _ in 0..50 {
        assert!(api.check_async("hot").await.is_allowed());
    }
    // Two syncs: the key's demand is measured and its prefetch claimed.
    node.sync_once().await;
    node.sync_once().await;
    let before = node.stats().claims_on_demand;
    let mut allowed = 0;
    for _ in 0..200 {
        allowed += u64::from(api.check_async("hot").await.is_allowed());
        if allowed % 50 == 0 {
            node.sync_once().await;
        }
    }
    assert_eq!(allowed, 200);
    let on_demand = node.stats().claims_on_demand - before;
    assert!(
        on_demand <= 4,
        "{on_demand} calls on demand for 200 checks of a hot key"
    );
    node.shutdown().await;
}

/// Layers of one request on one node ask together: one call for both keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_on_one_node_share_one_call() {
    let store = Slow::new(Duration::from_millis(5));
    let node = node_syncing_every(store.clone(), NO_SYNC_SOON);
    let ip = limiter(Policy::per_minute(100), "ip", &node);
    let user = limiter(Policy::per_minute(10), "user", &node);
    let d = check_all_async(1, &[&ip.bind("192.0.2.7"), &user.bind("frank")])
        .await
        .unwrap();
    assert!(d.is_allowed());
    let stats = node.stats();
    assert_eq!(stats.claims_on_demand, 1, "{stats:?}");
    assert_eq!(store.claims.load(Ordering::Relaxed), 2);
    node.shutdown().await;
}

/// A waiting check whose task is dropped while its call is on its way (a client that hung up)
/// leaves the others served: the checks queued behind it ask again and are admitted, and
/// nothing is admitted beyond the limit (what the dropped call was granted stays with the
/// store's count of this node, never spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_check_dropped_mid_call_leaves_the_others_served() {
    let store = Slow::new(Duration::from_millis(50));
    let node = node_syncing_every(store.clone(), NO_SYNC_SOON);
    let per_user = limiter(Policy::per_minute(5), "per_user", &node);
    let first = {
        let l = per_user.clone();
        tokio::spawn(async move { l.check_async("gina").await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let others = {
        let l = per_user.clone();
        tokio::spawn(async move {
            let mut d = Vec::new();
            for _ in 0..3 {
                d.push(l.check_async("gina").await.is_allowed());
            }
            d
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let served = tokio::time::timeout(Duration::from_secs(2), others)
        .await
        .expect("the others were answered")
        .unwrap();
    assert_eq!(served, [true, true, true], "the store still had tokens for them");
    // At most the limit in all: the dropped call's grant (1) is never spent.
    let mut more = 0;
    for _ in 0..5 {
        more += u64::from(per_user.check_async("gina").await.is_allowed());
    }
    assert!(3 + more <= 5, "{} admitted", 3 + more);
    node.shutdown().await;
}

/// A limiter dropped while a sync is on its way frees its name at once: a new limiter of the
/// same name and policy builds, though the round in flight still holds the old one's keys.
#[tokio::test(flavor = "current_thread")]
async fn a_dropped_limiter_frees_its_name_while_a_sync_holds_its_keys() {
    let store = Slow::new(Duration::from_millis(200));
    let node = node_syncing_every(store.clone(), NO_SYNC_SOON);
    let a = limiter(Policy::per_minute(100), "per_user", &node);
    // A key for the round to claim for.
    a.check("bob");
    let n = node.clone();
    let sync = tokio::spawn(async move { n.sync_once().await });
    // The round gathers the key and waits for the store.
    tokio::task::yield_now().await;
    assert_eq!(store.claims.load(Ordering::Relaxed), 1, "the round is on its way");
    drop(a);
    let again = Limiter::<String>::builder(Policy::per_minute(100))
        .name("per_user")
        .node(&node)
        .build();
    assert!(again.is_ok(), "{:?}", again.err());
    sync.await.unwrap();
    node.shutdown().await;
}
