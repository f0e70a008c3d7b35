//! The distributed bound under the schedules that once broke it, on the in-process store with
//! manual clocks: each test is one schedule, named after the invariant it protects. (The same
//! schedules on real Redis are in `tests/faults.rs`; the schedule explorer in `tests/explore`
//! searches for others.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tollgate::store::{
    Claim, ClaimOutcome, ErrorClass, Heartbeat, ManualTime, MemoryStore, NodeId, Store, StoreError, StoreFuture,
    StoreKey,
};
use tollgate::{node::CircuitState, ColdStart, FailurePolicy, Limiter, ManualClock, Node, NodeBuilder, Policy};

/// Store time at the start of every test (microseconds since the Unix epoch).
const T0_US: u64 = 1_700_000_000_000_000;

/// A node clock and a store clock that move together (unless a test skews them).
struct World {
    clock: ManualClock,
    store_time: ManualTime,
    store: Arc<MemoryStore>,
}

impl World {
    fn new() -> Self {
        let store_time = ManualTime::new(T0_US);
        World {
            clock: ManualClock::new(),
            store: Arc::new(MemoryStore::with_time_source(store_time.source())),
            store_time,
        }
    }

    fn node_on(&self, store: Arc<dyn Store>, id: Option<u64>, cold: ColdStart, interval: Duration) -> Node {
        let b = Node::builder(store)
            .clock(self.clock.clock())
            .cold_start(cold)
            .sync_interval(interval);
        match id {
            Some(id) => b.id(id),
            None => b,
        }
        .build_manual()
        .unwrap()
    }

    fn node(&self, cold: ColdStart) -> Node {
        self.node_on(self.store.clone(), None, cold, Duration::from_millis(100))
    }

    /// A node on `flaky` whose circuit opens at the first failed sync, with the failure
    /// policy's share (`LocalShare`) and the settings `tune` adds.
    fn degrading_node(&self, flaky: &Arc<Flaky>, tune: impl FnOnce(NodeBuilder) -> NodeBuilder) -> Node {
        let b = Node::builder(flaky.clone() as Arc<dyn Store>)
            .clock(self.clock.clock())
            .failure_threshold(1)
            .failure_policy(FailurePolicy::LocalShare);
        tune(b).build_manual().unwrap()
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
        self.store_time.advance(d);
    }
}

fn limiter(policy: Policy, node: &Node) -> Limiter {
    Limiter::builder(policy).name("k").node(node).build().unwrap()
}

/// Checks `key` `n` times on each limiter in turn at one instant; returns what each admitted.
fn spend_at_once(limiters: &[&Limiter], n: usize) -> Vec<u64> {
    let mut spent = vec![0; limiters.len()];
    for _ in 0..n {
        for (l, s) in limiters.iter().zip(spent.iter_mut()) {
            *s += l.check("key").is_allowed() as u64;
        }
    }
    spent
}

/// README: over any interval `d`, at most `capacity + rate * d + N * n`. A node admits `n` cold
/// units of a key it holds nothing for and owes them to the store; a key the store has
/// exhausted cannot pay, and if the node forgot it (three idle syncs) with the debt, every
/// forget cycle would bring `n` more: 600 in a minute against a bound of 15.
#[tokio::test]
async fn optimistic_cold_start_debt_survives_forgetting() {
    let w = World::new();
    let n = 5u64;
    let node = w.node(ColdStart::Optimistic(n));
    let l = limiter(Policy::per_hour(10), &node);
    let mut admitted = 0u64;
    let start = w.clock.now_ns();
    let mut t = 0u64;
    // 60 s of: a burst of 20 requests, then silence for 5 sync intervals.
    while t < 60_000 {
        for _ in 0..20 {
            admitted += l.check("key").is_allowed() as u64;
        }
        for _ in 0..5 {
            w.advance(Duration::from_millis(100));
            t += 100;
            node.sync_once().await;
        }
    }
    let d_s = (w.clock.now_ns() - start) as f64 / 1e9;
    let bound = 10.0 + 10.0 / 3600.0 * d_s + n as f64;
    assert!(admitted as f64 <= bound, "admitted {admitted} > bound {bound:.2}");
    // The cold units were given once and not again while they were owed.
    assert!(admitted >= 10, "the store's quota was not used: {admitted}");
}

/// A store that answers one chosen call with a timeout (ambiguous) and applies it when the test
/// says: what Redis does with a command still in flight on an old connection while the node's
/// next sync goes out on a fresh one.
struct Laggy {
    inner: Arc<MemoryStore>,
    hold_next: AtomicBool,
    held: Mutex<Option<(NodeId, Vec<Claim>)>>,
}

impl Laggy {
    fn new(inner: Arc<MemoryStore>) -> Arc<Self> {
        Arc::new(Laggy {
            inner,
            hold_next: AtomicBool::new(false),
            held: Mutex::new(None),
        })
    }

    fn apply_held(&self) -> Vec<ClaimOutcome> {
        let (node, claims) = self.held.lock().take().expect("a held call");
        self.inner.claim_now(node, &claims)
    }
}

impl Store for Laggy {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        if self.hold_next.swap(false, Ordering::AcqRel) {
            *self.held.lock() = Some((node, claims.to_vec()));
            return Box::pin(async { Err(StoreError::new(ErrorClass::Transient, "timed out (held)")) });
        }
        self.inner.claim(node, claims)
    }
    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        self.inner.heartbeat(registry, node, ttl)
    }
    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        self.inner.leave(registry, node)
    }
}

/// "A failed or ambiguous sync admits less, never more." Node A's sync S1 (nothing kept, 100
/// wanted) times out, A's next sync S2 is granted 100, and only then does the store apply S1.
/// Applied, S1's `kept = 0` would overwrite the record of A's 100 and the store would grant
/// them again to B: 200 at one instant against a capacity of 100. S1 is stale: it changes
/// nothing.
#[tokio::test]
async fn a_sync_applied_after_a_newer_one_changes_nothing() {
    let w = World::new();
    let laggy = Laggy::new(w.store.clone());
    let interval = Duration::from_millis(50);
    let a = w.node_on(laggy.clone(), None, ColdStart::Deny, interval);
    let b = w.node_on(w.store.clone(), None, ColdStart::Deny, interval);
    let policy = Policy::per_second(1000).burst(100);
    let (la, lb) = (limiter(policy.clone(), &a), limiter(policy, &b));
    spend_at_once(&[&la], 100);
    laggy.hold_next.store(true, Ordering::Release);
    a.sync_once().await; // S1: held, answered as a timeout
    spend_at_once(&[&la], 100);
    w.advance(Duration::from_millis(1));
    a.sync_once().await; // S2: granted 100
    assert_eq!(la.peek("key", 1).unwrap().remaining(), 100);
    w.advance(Duration::from_millis(1));
    let late = laggy.apply_held();
    assert_eq!(late.len(), 1);
    let g = late[0].as_ref().expect("a grant");
    assert!(g.stale, "the late claim was applied: {g:?}");
    assert_eq!((g.granted, g.remaining, g.revoked), (0, 0, 0));
    // B asks, then A and B spend at the same instant.
    w.advance(Duration::from_millis(100));
    spend_at_once(&[&lb], 100);
    b.sync_once().await;
    let spent = spend_at_once(&[&la, &lb], 200);
    assert!(spent[0] + spent[1] <= 100, "{spent:?} admitted at one instant");
    assert_eq!(spent[0], 100, "A lost its grant: {spent:?}");
    assert_eq!(a.stats().state_losses, 0, "a stale claim is not a state loss");
}

/// Two live processes configured with the same `NodeBuilder::id` (a pod name reused during a
/// rolling deploy) are two nodes to the store: the second one's first claim does not overwrite
/// the first one's holding, so a third node cannot be granted tokens the first still holds.
#[tokio::test]
async fn two_live_nodes_with_the_same_id_never_share_a_holding() {
    let w = World::new();
    let interval = Duration::from_millis(50);
    let a1 = w.node_on(w.store.clone(), Some(7), ColdStart::Deny, interval);
    let a2 = w.node_on(w.store.clone(), Some(7), ColdStart::Deny, interval);
    let b = w.node_on(w.store.clone(), Some(8), ColdStart::Deny, interval);
    assert_ne!(a1.id(), a2.id(), "one store identity for two processes");
    let policy = Policy::per_second(1000).burst(100);
    let (l1, l2, lb) = (
        limiter(policy.clone(), &a1),
        limiter(policy.clone(), &a2),
        limiter(policy, &b),
    );
    spend_at_once(&[&l1], 100);
    a1.sync_once().await; // a1 holds 100
    w.advance(Duration::from_millis(1));
    l2.check("key");
    a2.sync_once().await;
    w.advance(Duration::from_millis(100));
    spend_at_once(&[&lb], 100);
    b.sync_once().await;
    let spent = spend_at_once(&[&l1, &l2, &lb], 200);
    assert!(spent.iter().sum::<u64>() <= 100, "{spent:?} admitted at one instant");
    assert_eq!(spent[0], 100, "a1 lost its holding: {spent:?}");
}

/// Claimed tokens stop being spendable before the store stops counting them, by a margin that
/// grows with the lease: with a 1 h lease and the store's clock up to the stated tolerance
/// (500 ppm) faster than the node's, a node cut off after its claim never spends a token the
/// store has already given to another node. (A fixed 5 ms margin covers 1.4 ppm at 1 h.)
#[tokio::test]
async fn claim_margin_covers_the_clock_rate_tolerance_over_a_long_lease() {
    for ppm in [0u64, 100, 499] {
        let store_time = ManualTime::new(0);
        let lease_ms = 3_600_000u64;
        // The store receives the claim 1 ms before its lease epoch ends (the shortest count).
        store_time.set_us((T0_US / 1000 / lease_ms + 1) * lease_ms * 1000 - 1000);
        let store = Arc::new(MemoryStore::with_time_source(store_time.source()));
        let clock = ManualClock::new();
        let mk = || {
            Node::builder(store.clone() as Arc<dyn Store>)
                .clock(clock.clock())
                .lease(Duration::from_millis(lease_ms))
                .build_manual()
                .unwrap()
        };
        let (a, b) = (mk(), mk());
        let policy = Policy::per_second(1000).burst(100);
        let (la, lb) = (limiter(policy.clone(), &a), limiter(policy, &b));
        spend_at_once(&[&la], 100);
        a.sync_once().await; // A holds 100, then is cut off (never syncs again).
        assert_eq!(
            la.peek("key", 1).unwrap().remaining(),
            100,
            "A was not granted its claim"
        );
        // Node time moves on while the store's clock runs `ppm` faster, in steps: at each, B
        // asks and spends what it got, and A could still spend what it holds, at one instant.
        let mut node_elapsed = Duration::ZERO;
        let mut b_spent = 0;
        let steps = [
            lease_ms / 2,
            lease_ms - 2_000,
            lease_ms - 500,
            lease_ms - 100,
            lease_ms - 10,
        ];
        for step_ms in steps {
            let to = Duration::from_millis(step_ms);
            let d = to - node_elapsed;
            node_elapsed = to;
            clock.advance(d);
            store_time.advance(d + d * ppm as u32 / 1_000_000);
            b_spent += spend_at_once(&[&lb], 100)[0];
            b.sync_once().await;
            b_spent += spend_at_once(&[&lb], 200)[0];
            let a_holds = la.peek("key", 1).unwrap().remaining();
            if step_ms == lease_ms / 2 {
                assert_eq!(a_holds, 100, "+{ppm} ppm: A's tokens ended half a lease early");
            }
            assert!(
                a_holds == 0 || b_spent == 0,
                "store clock +{ppm} ppm, {step_ms} ms into the lease: A can still spend {a_holds} \
                 while B was granted and spent {b_spent}"
            );
        }
        if ppm >= 100 {
            assert!(b_spent > 0, "+{ppm} ppm: the store never counted A's holding out");
        }
    }
}

/// A store whose calls all fail while `down` is set (its circuit opens), and which can forget
/// everything (a restart without persistence).
struct Flaky {
    inner: Arc<MemoryStore>,
    down: AtomicBool,
}

impl Flaky {
    /// `store` behind a switch, up (`down` false) or down.
    fn over(store: &Arc<MemoryStore>, down: bool) -> Arc<Self> {
        Arc::new(Flaky {
            inner: store.clone(),
            down: AtomicBool::new(down),
        })
    }
}

impl Store for Flaky {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        if self.down.load(Ordering::Acquire) {
            return Box::pin(async { Err(StoreError::new(ErrorClass::Transient, "connection refused")) });
        }
        self.inner.claim(node, claims)
    }
    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        if self.down.load(Ordering::Acquire) {
            return Box::pin(async { Err(StoreError::new(ErrorClass::Transient, "connection refused")) });
        }
        self.inner.heartbeat(registry, node, ttl)
    }
    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        self.inner.leave(registry, node)
    }
}

/// README: a store restarted empty costs at most one extra capacity in total. Two nodes under
/// load (4 x the rate), `local_share`: the store goes down, the nodes degrade, the store comes
/// back empty. The failure policy's share starts empty when the outage begins (tokens the
/// nodes still hold are spent first), so over the whole run the nodes admit at most one exact
/// limiter's quota plus the one capacity the empty store hands out again. (A share that started
/// full added a second capacity.)
#[tokio::test]
async fn a_store_restarted_empty_costs_at_most_one_extra_capacity_in_total() {
    let w = World::new();
    let flaky = Flaky::over(&w.store, false);
    let interval = Duration::from_millis(100);
    let mk = || w.degrading_node(&flaky, |b| b.sync_interval(interval).expected_nodes(2));
    let nodes = [mk(), mk()];
    let (capacity, rate) = (50u64, 50u64);
    let ls: Vec<Limiter> = nodes.iter().map(|n| limiter(Policy::per_second(rate), n)).collect();
    let mut admitted = 0u64;
    let mut degraded = 0u64;
    let mut from_claims_after = 0u64;
    let step = Duration::from_millis(10);
    let steps = 2500u64; // 25 s
    for i in 0..steps {
        // 4 x the rate: 200 per second over two nodes.
        for l in &ls {
            let d = l.check("key");
            admitted += d.is_allowed() as u64;
            degraded += (d.is_allowed() && d.is_degraded()) as u64;
            from_claims_after += (i > 1400 && d.is_allowed() && !d.is_degraded()) as u64;
        }
        w.advance(step);
        match i {
            800 => flaky.down.store(true, Ordering::Release), // at 8 s: the store goes away
            1300 => {
                // at 13 s: back, empty
                w.store.clear();
                flaky.down.store(false, Ordering::Release);
            }
            _ => {}
        }
        if i % 10 == 9 {
            for n in &nodes {
                n.sync_once().await;
            }
        }
    }
    let d_s = (steps * step.as_millis() as u64) as f64 / 1000.0;
    let ideal = capacity as f64 + rate as f64 * d_s;
    assert!(degraded > 0, "the failure policy never answered");
    // The nodes synced with the empty store again, so its fresh capacity was on offer.
    assert!(from_claims_after > 0, "no claim admitted after the store came back");
    assert!(nodes.iter().all(|n| n.circuit() == CircuitState::Closed));
    assert!(
        admitted as f64 <= ideal + capacity as f64,
        "admitted {admitted} ({degraded} by the failure policy) > {ideal} + one capacity {capacity}"
    );
}

/// While degraded, a cost above this node's share of the capacity (but within the capacity) is
/// denied by the share, like any cost the share cannot hold, and the arithmetic is never asked
/// to take more than its capacity.
#[tokio::test]
async fn a_cost_above_the_share_is_denied_while_degraded() {
    let w = World::new();
    let flaky = Flaky::over(&w.store, true);
    let node = w.degrading_node(&flaky, |b| b.expected_nodes(4));
    let l = limiter(Policy::per_second(100), &node);
    node.sync_once().await;
    w.advance(Duration::from_secs(10));
    let d = l.check_n("key", 50).unwrap();
    assert!(d.is_denied() && d.is_degraded(), "{d:?}");
    let d = l.check_n("key", 25).unwrap();
    assert!(d.is_allowed() && d.is_degraded(), "{d:?}");
}

/// README: while the store is unreachable, each node admits at most its share of the limit.
/// The share's state lives in the key's cell on the node; a key forgotten while degraded (a
/// drain at shutdown visits every key, and an idle key with nothing held is forgettable) came
/// back with a fresh share, as much again as the share allows: 20 of a share of 10.
#[tokio::test]
async fn a_key_keeps_its_share_through_a_drain_while_degraded() {
    let w = World::new();
    let flaky = Flaky::over(&w.store, false);
    let interval = Duration::from_millis(100);
    let node = w.degrading_node(&flaky, |b| b.sync_interval(interval).expected_nodes(2));
    // 20 per hour; this node's share while degraded: 10 per hour.
    let l = limiter(Policy::per_hour(20), &node);
    let burst = |n: usize| (0..n).filter(|_| l.check("key").is_allowed()).count() as u64;
    assert_eq!(burst(30), 0, "nothing held yet");
    node.sync_once().await;
    assert_eq!(burst(30), 20, "the whole capacity, claimed");
    // The store is exhausted; the key goes idle holding nothing.
    for _ in 0..2 {
        w.advance(interval);
        node.sync_once().await;
    }
    flaky.down.store(true, Ordering::Release);
    // A second on: the sync's heartbeat finds the store gone.
    w.advance(Duration::from_secs(1));
    node.sync_once().await;
    assert_eq!(node.circuit(), CircuitState::Open);
    // An hour later the share has refilled: 10.
    w.advance(Duration::from_secs(3600));
    let before = burst(30);
    assert_eq!(before, 10, "the share of an hour");
    // A probe fails (the circuit opens again), then the node shuts down: its drain runs while
    // the circuit is open.
    node.sync_once().await;
    assert_eq!(node.circuit(), CircuitState::Open);
    node.shutdown().await;
    let after = burst(30);
    assert_eq!(after, 0, "the share was spent: the drain must not have forgotten it");
}

/// README: claimed tokens admit at most what the store granted. A refund that does not say
/// which admission it undoes cannot tell, once the failure policy has answered, a degraded
/// admission (from the share) from a claimed one: credited to the claimed tokens, a refund of
/// 50 taken from the share let the node spend 50 claimed tokens twice (150 admitted from a
/// grant of 100). Such a refund now gives back nothing; `refund_decision` gives back to where
/// the decision took from.
#[tokio::test]
async fn a_refund_of_a_degraded_admission_never_credits_claimed_tokens() {
    let w = World::new();
    let flaky = Flaky::over(&w.store, false);
    let node = w.degrading_node(&flaky, |b| b.lease(Duration::from_secs(10)));
    let l = limiter(Policy::per_second(1000).burst(100), &node);
    let claimed = std::cell::Cell::new(0u64);
    let count = |d: &tollgate::Decision, cost: u64| {
        if d.is_allowed() && !d.is_degraded() {
            claimed.set(claimed.get() + cost);
        }
    };
    for _ in 0..50 {
        count(&l.check("key"), 1);
    }
    node.sync_once().await;
    count(&l.check("key"), 1);
    // The next sync (two seconds on: its heartbeat goes out) fails: the circuit opens while the
    // node holds the rest of its grant.
    flaky.down.store(true, Ordering::Release);
    w.advance(Duration::from_secs(2));
    node.sync_once().await;
    assert_eq!(node.circuit(), CircuitState::Open);
    for _ in 0..200 {
        count(&l.check("key"), 1);
    }
    let granted = claimed.get();
    assert!(granted > 50, "the node held a grant: {granted}");
    // The share refills; a degraded admission is undone by a refund that names only its cost.
    w.advance(Duration::from_millis(100));
    let d = l.check_n("key", 50).unwrap();
    assert!(d.is_allowed() && d.is_degraded(), "{d:?}");
    l.refund("key", 50);
    // By its decision, a refund goes back to the share it came from.
    let d = l.check_n("key", 10).unwrap();
    assert!(d.is_allowed() && d.is_degraded(), "{d:?}");
    let before = l.peek("key", 1).unwrap().remaining();
    l.refund_decision("key", &d);
    assert_eq!(l.peek("key", 1).unwrap().remaining(), before + 10);
    for _ in 0..200 {
        let d = l.check("key");
        count(&d, 1);
    }
    assert_eq!(
        claimed.get(),
        granted,
        "claimed tokens admitted again after a refund of a share's admission"
    );
}
