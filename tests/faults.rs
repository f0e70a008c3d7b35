//! The fault matrix on real processes: redis-server children on loopback ports, killed, paused,
//! restarted and misconfigured, and one TCP fault proxy per instance for network faults.
//!
//! Every test asserts the bound the README states for its fault, that no check took longer
//! than 1 ms while it lasted (checks never wait for the store), and that syncing resumes within
//! two sync intervals of the fault ending. Tests run one at a time (they measure latency).
//!
//! On this small machine the scheduler sometimes takes the CPU away from a thread for more
//! than a millisecond. A check is timed together with its thread's context switches
//! (`getrusage(RUSAGE_THREAD)`): one that blocked (a voluntary switch: a lock, a sleep, I/O) or
//! ran without being preempted must take under 1 ms; one the scheduler preempted, and only
//! preempted, is counted apart, and such checks must stay rare.

#[path = "common/fault_proxy.rs"]
mod fault_proxy;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_proxy::{Fault, FaultProxy};
use redis_server::RedisServer;
use tollgate::store::{
    Claim, ClaimOutcome, ErrorClass, Heartbeat, KeyEncoder, MemoryStore, NodeId, RedisConfig, RedisStore, Store,
    StoreFuture, StoreKey,
};
use tollgate::{
    node::{CircuitState, NodeError, NodeStats},
    Algorithm, ColdStart, FailurePolicy, Limiter, Node, NodeBuilder, Policy,
};

/// The sync interval of every node here.
const T: Duration = Duration::from_millis(100);
/// The longest a check may take, in any state.
const CHECK_BUDGET: Duration = Duration::from_millis(1);
/// Syncing must resume within this long after a fault ends: two intervals, plus the time
/// this test loop takes to notice (it polls every few milliseconds).
const RECOVERY: Duration = Duration::from_millis(2 * 100 + 20);
/// A sync times out after this long (the default: an interval, at least 250 ms); a probe
/// after half an interval, at least 50 ms.
const TIMEOUT: Duration = Duration::from_millis(250);
/// The Redis client's own bounds, beyond the sync timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(200);
/// Token-bucket policy of most tests: capacity C, refill R per second.
const C: u64 = 300;
const R: u64 = 300;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bucket() -> Policy {
    Policy::per_second(R)
}

/// A fixed window so long that no test crosses it: the store's count is then everything
/// granted, which conservation checks compare with what was admitted.
fn ledger() -> Policy {
    Policy::new(1_000_000, Duration::from_secs(7 * 86_400)).algorithm(Algorithm::FixedWindow)
}

/// C + R x d: what one exact limiter admits at most over `d`.
fn ideal(d: Duration) -> u64 {
    C + (R as f64 * d.as_secs_f64()).ceil() as u64
}

struct Instance {
    proxy: FaultProxy,
    node: Node,
    limiter: Limiter,
}

struct Fleet {
    instances: Vec<Instance>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    checks: u64,
    admitted: u64,
    /// Admitted by the failure policy while the store was unreachable.
    degraded_admitted: u64,
    degraded_denied: u64,
    /// The slowest check that blocked or was not preempted.
    slowest: Duration,
    /// Checks over the budget only because the scheduler preempted their thread.
    preempted_slow: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.checks += o.checks;
        self.admitted += o.admitted;
        self.degraded_admitted += o.degraded_admitted;
        self.degraded_denied += o.degraded_denied;
        self.slowest = self.slowest.max(o.slowest);
        self.preempted_slow += o.preempted_slow;
    }

    /// Runs and times one check.
    fn check(&mut self, limiter: &Limiter, key: &str) -> tollgate::Decision {
        let (v0, i0) = context_switches();
        let t0 = Instant::now();
        let d = limiter.check(key);
        let took = t0.elapsed();
        let (v1, i1) = context_switches();
        if v1 > v0 || i1 == i0 {
            self.slowest = self.slowest.max(took);
        } else if took >= CHECK_BUDGET {
            self.preempted_slow += 1;
        }
        self.checks += 1;
        if d.is_allowed() {
            self.admitted += 1;
            if d.is_degraded() {
                self.degraded_admitted += 1;
            }
        } else if d.is_degraded() {
            self.degraded_denied += 1;
        }
        d
    }
}

/// This thread's (voluntary, involuntary) context switches so far.
fn context_switches() -> (i64, i64) {
    // SAFETY: getrusage writes into the struct we pass, nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    (ru.ru_nvcsw as i64, ru.ru_nivcsw as i64)
}

fn sum(t: &[Tally]) -> Tally {
    let mut all = Tally::default();
    for x in t {
        all.add(x);
    }
    all
}

fn redis_config(url: String) -> RedisConfig {
    RedisConfig::new(url)
        .connect_timeout(CLIENT_TIMEOUT)
        .response_timeout(CLIENT_TIMEOUT)
}

fn tuned(b: NodeBuilder, n: usize) -> NodeBuilder {
    b.sync_interval(T).expected_nodes(n as u64)
}

impl Fleet {
    async fn start(server: &RedisServer, n: usize, policy: Policy, tune: impl Fn(NodeBuilder) -> NodeBuilder) -> Fleet {
        let mut instances = Vec::new();
        for _ in 0..n {
            let proxy = FaultProxy::start(server.addr()).await;
            let store = RedisStore::connect(redis_config(proxy.url())).await.unwrap();
            let node = tune(tuned(Node::builder(Arc::new(store)), n)).start().unwrap();
            let limiter = Limiter::builder(policy.clone())
                .name("api")
                .node(&node)
                .build()
                .unwrap();
            instances.push(Instance { proxy, node, limiter });
        }
        Fleet { instances }
    }

    fn set_all(&self, fault: Fault) {
        for i in &self.instances {
            i.proxy.set(fault);
        }
    }

    /// Offers `per_tick` checks of each key per instance every 2 ms, until `until` holds or
    /// `max` has passed. Returns per-instance tallies and the time taken.
    async fn drive(
        &self,
        keys: &[&str],
        per_tick: usize,
        max: Duration,
        mut until: impl FnMut(&Fleet) -> bool,
    ) -> (Vec<Tally>, Duration) {
        let start = Instant::now();
        let mut tallies = vec![Tally::default(); self.instances.len()];
        while start.elapsed() < max {
            for (inst, tally) in self.instances.iter().zip(tallies.iter_mut()) {
                for key in keys {
                    for _ in 0..per_tick {
                        tally.check(&inst.limiter, key);
                    }
                }
            }
            if until(self) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (tallies, start.elapsed())
    }

    async fn run(&self, keys: &[&str], d: Duration) -> Vec<Tally> {
        self.drive(keys, 1, d, |_| false).await.0
    }

    fn all_open(&self) -> bool {
        self.instances.iter().all(|i| i.node.circuit() != CircuitState::Closed)
    }

    /// Drives load until every node's circuit is open; returns how long that took.
    async fn until_open(&self, keys: &[&str], max: Duration) -> (Vec<Tally>, Duration) {
        let r = self.drive(keys, 1, max, Fleet::all_open).await;
        assert!(
            self.all_open(),
            "circuits did not open within {max:?}: {:?}",
            self.circuits()
        );
        r
    }

    /// Drives load until every node synced successfully after `since` with its circuit
    /// closed; asserts it took at most [`RECOVERY`].
    async fn until_recovered(&self, keys: &[&str], since: Instant) -> (Vec<Tally>, Duration) {
        let recovered = |f: &Fleet| {
            f.instances.iter().all(|i| {
                i.node.circuit() == CircuitState::Closed
                    && i.node.last_successful_sync_age().is_some_and(|a| a < since.elapsed())
            })
        };
        let (t, _) = self.drive(keys, 1, Duration::from_secs(5), recovered).await;
        let took = since.elapsed();
        assert!(recovered(self), "no recovery within 5 s: {:?}", self.circuits());
        assert!(took <= RECOVERY, "recovery took {took:?} (bound {RECOVERY:?})");
        (t, took)
    }

    fn circuits(&self) -> Vec<CircuitState> {
        self.instances.iter().map(|i| i.node.circuit()).collect()
    }

    async fn shutdown(self) {
        for i in &self.instances {
            i.node.shutdown().await;
        }
    }
}

fn assert_fast(tallies: &[Tally]) {
    let all = sum(tallies);
    assert!(
        all.slowest < CHECK_BUDGET,
        "a check took {:?} (budget {CHECK_BUDGET:?})",
        all.slowest
    );
    assert!(
        all.preempted_slow <= 2 + all.checks / 1000,
        "{} of {} checks were preempted beyond the budget",
        all.preempted_slow,
        all.checks
    );
}

/// The number of tokens a fixed-window key has granted in its window (the `ledger` policy).
async fn ledger_used(server: &RedisServer) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    let mut used = 0;
    for k in keys {
        let t: String = redis::cmd("TYPE").arg(&k).query_async(&mut c).await.unwrap();
        if t == "string" {
            let v: u64 = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
            used += v % (1 << 32);
        }
    }
    used
}

/// Bound of the local share: each of `n` nodes admits at most C/n + R/n x d over `d`.
fn share_bound(n: u64, d: Duration) -> u64 {
    C / n + (R as f64 / n as f64 * d.as_secs_f64()).ceil() as u64 + 1
}

// ---------------------------------------------------------------------------------------------
// A: availability and latency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1_redis_killed_and_restarted_empty_degrades_then_recovers_with_one_capacity_extra() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let fleet = Fleet::start(&server, 3, bucket(), |b| b).await;
    let key = ["client"];
    let healthy = fleet.run(&key, Duration::from_secs(1)).await;
    server.kill();
    let killed = Instant::now();
    let (opening, took) = fleet.until_open(&key, Duration::from_secs(3)).await;
    assert!(took <= 3 * T + TIMEOUT + 2 * T, "circuits opened after {took:?}");
    let outage = fleet.run(&key, Duration::from_secs(1)).await;
    let down_for = killed.elapsed();
    server.restart();
    let back = Instant::now();
    let (recovering, _) = fleet.until_recovered(&key, back).await;
    let after = fleet.run(&key, Duration::from_secs(1)).await;
    let all: Vec<Tally> = [healthy, opening, outage, recovering, after].concat();
    assert_fast(&all);
    let total = sum(&all);
    let elapsed = killed.elapsed() + Duration::from_secs(1);
    // Held tokens and the store: one exact limiter, plus one capacity from the empty restart.
    let stored = total.admitted - total.degraded_admitted;
    assert!(stored <= ideal(elapsed) + C, "{stored} > {}", ideal(elapsed) + C);
    // The failure policy: each node its share, over the outage.
    assert!(
        total.degraded_admitted > 0,
        "local_share admitted nothing while Redis was down"
    );
    assert!(
        total.degraded_admitted <= 3 * share_bound(3, down_for + RECOVERY),
        "{total:?}"
    );
    for i in &fleet.instances {
        let s = i.node.stats();
        assert!(s.circuit_opened >= 1, "{s:?}");
        assert!(s.state_losses >= 1, "the restart went unnoticed: {s:?}");
        assert_eq!(s.task_restarts, 0);
    }
    fleet.shutdown().await;
}

/// Row A1 as the README states it, for the whole run: Redis shut down without saving under
/// load and restarted empty on the same port, two nodes at 4 x a 50 per second limit with
/// `local_share`. The nodes admit at most one exact limiter's quota plus one capacity in total:
/// the failure policy's share starts empty when the outage begins (held tokens are spent
/// first), and the empty store hands out one capacity again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1_store_restarted_empty_under_load_costs_at_most_one_capacity_in_total() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let (c, r) = (50u64, 50u64);
    let fleet = Fleet::start(&server, 2, Policy::per_second(r), |b| b).await;
    let key = ["client"];
    let start = Instant::now();
    // 2 instances x one check per 2 ms = 1000 per second offered, 20 x the rate.
    let mut all = fleet.run(&key, Duration::from_secs(2)).await;
    server.kill();
    let (opening, _) = fleet.until_open(&key, Duration::from_secs(3)).await;
    all.extend(opening);
    all.extend(fleet.run(&key, Duration::from_secs(2)).await);
    server.restart();
    let (recovering, _) = fleet.until_recovered(&key, Instant::now()).await;
    all.extend(recovering);
    all.extend(fleet.run(&key, Duration::from_secs(2)).await);
    let elapsed = start.elapsed();
    let total = sum(&all);
    let ideal = c + (r as f64 * elapsed.as_secs_f64()).ceil() as u64;
    assert!(
        total.degraded_admitted > 0,
        "the failure policy never answered: {total:?}"
    );
    // One capacity for the empty restart, and one token per node for the share's rounding.
    assert!(
        total.admitted <= ideal + c + 2,
        "{} admitted ({} by the failure policy) over {elapsed:?}: one exact limiter {ideal}, plus one capacity {c}",
        total.admitted,
        total.degraded_admitted
    );
    fleet.shutdown().await;
}

/// "A failed or ambiguous sync admits less, never more", on real Redis. Node A's sync S1 is
/// held 600 ms by the proxy and times out (the circuit opens); the half-open probe reconnects
/// and A's next sync S2 is granted 100 on the fresh connection; then Redis runs S1 from the
/// old connection. S1 is older than S2, so it changes nothing: B cannot be granted the tokens
/// A holds. (Before claims carried sequence numbers, A and B spent 200 within 13 us.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a10_a_timed_out_sync_run_after_a_newer_one_admits_no_more() {
    let _serial = SERIAL.lock().await;
    // The schedule needs S2 done before S1 reaches Redis; on a loaded machine a probe can be
    // late, so a run where it was is set up again (bounded).
    for attempt in 0..3 {
        if late_sync_schedule().await {
            return;
        }
        eprintln!("attempt {attempt}: S2 came after S1 reached Redis; setting up again");
    }
    panic!("could not run S2 before the late S1 in 3 attempts");
}

/// One run of the schedule of `a10`; false when it could not be set up in time.
async fn late_sync_schedule() -> bool {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await;
    let store_a = RedisStore::connect(RedisConfig::new(proxy.url())).await.unwrap();
    let store_b = RedisStore::connect(RedisConfig::new(redis.url())).await.unwrap();
    let mk = |s: Arc<dyn Store>| {
        Node::builder(s)
            .sync_interval(Duration::from_millis(500))
            .sync_timeout(Duration::from_millis(250))
            .lease(Duration::from_secs(2))
            .failure_threshold(1)
            .open_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .build_manual()
            .unwrap()
    };
    let (a, b) = (mk(Arc::new(store_a)), mk(Arc::new(store_b)));
    let policy = Policy::per_second(1000).burst(100);
    let la: Limiter = Limiter::builder(policy.clone()).name("k").node(&a).build().unwrap();
    let lb: Limiter = Limiter::builder(policy).name("k").node(&b).build().unwrap();
    for _ in 0..100 {
        la.check("key");
    }
    proxy.set(Fault::Delay {
        fixed: Duration::from_millis(600),
        jitter: Duration::ZERO,
    });
    let t0 = Instant::now();
    a.sync_once().await; // S1: times out after 250 ms, still on its way
    assert_eq!(a.stats().failed_round_trips, 1, "{:?}", a.stats());
    proxy.set(Fault::None);
    // The probe (a fresh connection) closes the circuit.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        a.sync_once().await;
        if a.circuit() == CircuitState::Closed {
            break;
        }
    }
    for _ in 0..100 {
        la.check("key");
    }
    a.sync_once().await; // S2 on the fresh connection
    if t0.elapsed() >= Duration::from_millis(550) || la.peek("key", 1).unwrap().remaining() != 100 {
        return false;
    }
    // S1 reaches Redis at about 600 ms; at 750 ms B asks, then both spend at once.
    tokio::time::sleep(Duration::from_millis(750).saturating_sub(t0.elapsed())).await;
    for _ in 0..100 {
        lb.check("key");
    }
    b.sync_once().await;
    let t1 = Instant::now();
    let (mut sa, mut sb) = (0u64, 0u64);
    for _ in 0..200 {
        sa += la.check("key").is_allowed() as u64;
        sb += lb.check("key").is_allowed() as u64;
    }
    let within = t1.elapsed();
    let bound = 100 + (1000.0 * within.as_secs_f64()).ceil() as u64;
    assert!(sa + sb <= bound, "A {sa} + B {sb} within {within:?}: bound {bound}");
    assert_eq!(sa, 100, "A lost its grant");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2_redis_restarted_from_a_snapshot_is_loading_transiently_and_rolls_back_at_most_one_capacity() {
    let _serial = SERIAL.lock().await;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("tollgate-a2-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = RedisServer::start_with(&["--dir", dir.to_str().unwrap(), "--enable-debug-command", "yes"]);
    let fleet = Fleet::start(&server, 3, bucket(), |b| b).await;
    let key = ["client"];
    let healthy = fleet.run(&key, Duration::from_secs(1)).await;
    // A large dataset, so that loading it takes a while, then the snapshot.
    assert_eq!(server.cli(&["DEBUG", "POPULATE", "1500000"]), "OK");
    assert_eq!(server.cli(&["SAVE"]), "OK");
    // Increments after the snapshot: the restart rolls them back.
    let after_snapshot = fleet.run(&key, Duration::from_millis(500)).await;
    server.kill();
    let killed = Instant::now();
    // Restart on a thread and watch for LOADING replies meanwhile, under load.
    let port = server.port;
    // What tollgate's own store makes of them: every LOADING reply it gets, classified (on a
    // registry of its own, so that the fleet's node count is untouched).
    let url = server.url();
    let probe = tokio::spawn(async move {
        let registry = KeyEncoder::new("probe").unwrap().registry_key();
        let mut classes = Vec::new();
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let config = RedisConfig::new(url.clone())
                .connect_timeout(Duration::from_millis(200))
                .response_timeout(Duration::from_millis(500));
            let beat = match RedisStore::connect(config).await {
                Ok(store) => store.heartbeat(&registry, 999, Duration::from_secs(1)).await,
                Err(e) => Err(e),
            };
            match beat {
                Ok(_) if !classes.is_empty() => break,
                // redis-rs shows `LOADING` as "BusyLoading: Redis is loading the dataset".
                Err(e) if e.message().to_ascii_lowercase().contains("loading") => classes.push(e.class()),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        classes
    });
    let restart = std::thread::spawn(move || {
        server.restart();
        server
    });
    let watcher = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(20);
        let mut loading_seen = false;
        while Instant::now() < end {
            let out = std::process::Command::new("timeout")
                .args(["2", "redis-cli", "-p", &port.to_string(), "PING"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            if out.starts_with("LOADING") {
                loading_seen = true;
            }
            if out == "PONG" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        loading_seen
    });
    let (during, _) = fleet
        .drive(&key, 1, Duration::from_secs(20), |_| {
            restart.is_finished() && watcher.is_finished()
        })
        .await;
    let server = restart.join().unwrap();
    let loading_seen = watcher.join().unwrap();
    let back = Instant::now();
    let (recovering, _) = fleet.until_recovered(&key, back).await;
    let after = fleet.run(&key, Duration::from_secs(1)).await;
    let all: Vec<Tally> = [healthy, after_snapshot, during, recovering, after].concat();
    assert_fast(&all);
    let persistence = server.cli(&["INFO", "persistence"]);
    let loaded: u64 = persistence
        .lines()
        .find_map(|l| l.strip_prefix("rdb_last_load_keys_loaded:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(loaded >= 1_500_000, "the snapshot was not loaded: {persistence}");
    assert!(
        loading_seen,
        "the restart never answered LOADING: the dataset loaded too fast to test"
    );
    let classes = probe.await.unwrap();
    assert!(!classes.is_empty(), "the store never met LOADING");
    assert!(
        classes.iter().all(|c| *c == ErrorClass::Transient),
        "LOADING must be transient: {classes:?}"
    );
    let total = sum(&all);
    // The store rolled back to the snapshot: at most one capacity more than one exact limiter.
    let stored = total.admitted - total.degraded_admitted;
    let elapsed = killed.elapsed() + Duration::from_millis(2500);
    assert!(stored <= ideal(elapsed) + C, "{stored} > {}", ideal(elapsed) + C);
    for i in &fleet.instances {
        let s = i.node.stats();
        assert!(s.transient_errors >= 1, "{s:?}");
        assert_eq!(
            s.config_errors + s.protocol_errors + s.resource_errors,
            0,
            "LOADING must be transient: {s:?}"
        );
        assert!(s.state_losses >= 1, "the restart went unnoticed: {s:?}");
        assert_eq!(s.task_restarts, 0);
    }
    fleet.shutdown().await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a3_slow_redis_within_the_timeout_keeps_the_bound_and_beyond_it_opens_the_circuit() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 3, bucket(), |b| b).await;
    let key = ["client"];
    // 5-15 ms each way: a round trip well inside the sync and probe timeouts.
    fleet.set_all(Fault::Delay {
        fixed: Duration::from_millis(5),
        jitter: Duration::from_millis(10),
    });
    let start = Instant::now();
    let slow = fleet.run(&key, Duration::from_millis(1500)).await;
    let s = sum(&slow);
    assert_eq!(fleet.circuits(), vec![CircuitState::Closed; 3]);
    assert_eq!(s.degraded_admitted + s.degraded_denied, 0);
    assert!(s.admitted <= ideal(start.elapsed()), "{s:?}");
    assert!(s.admitted >= R, "slow syncs starved the limit: {s:?}");

    fleet.set_all(Fault::Delay {
        fixed: Duration::from_millis(400),
        jitter: Duration::ZERO,
    });
    let (opening, took) = fleet.until_open(&key, Duration::from_secs(3)).await;
    assert!(took <= 3 * (TIMEOUT + T) + T, "circuits opened after {took:?}");
    let outage = fleet.run(&key, Duration::from_secs(1)).await;
    fleet.set_all(Fault::None);
    let (recovering, _) = fleet.until_recovered(&key, Instant::now()).await;
    let all = [slow, opening, outage, recovering].concat();
    assert_fast(&all);
    for i in &fleet.instances {
        assert!(i.node.stats().transient_errors >= 3, "{:?}", i.node.stats());
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_hung_redis_sigstop_is_detected_within_the_timeout_and_checks_never_wait() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 3, bucket(), |b| b).await;
    let key = ["client"];
    let healthy = fleet.run(&key, Duration::from_millis(500)).await;
    server.signal("STOP");
    let (opening, took) = fleet.until_open(&key, Duration::from_secs(3)).await;
    let outage = fleet.run(&key, Duration::from_millis(700)).await;
    server.signal("CONT");
    let (recovering, _) = fleet.until_recovered(&key, Instant::now()).await;
    assert!(
        took <= 3 * (TIMEOUT + T) + T,
        "a hung server was detected after {took:?}"
    );
    let all = [healthy, opening, outage.clone(), recovering].concat();
    assert_fast(&all);
    assert!(sum(&outage).degraded_admitted > 0);
    fleet.shutdown().await;
}

/// README: a check that waits for a claim on demand waits at most `sync_interval +
/// sync_timeout`. Redis hangs (SIGSTOP): waiting checks of new keys are answered within that
/// bound (denied: nothing is admitted that the store did not grant), the calls on demand that
/// time out open the circuit like syncs, and from then on the failure policy answers at once;
/// when Redis comes back, new keys are claimed on demand again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a11_waiting_checks_of_new_keys_are_answered_within_their_bound_when_redis_hangs() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url())).await.unwrap();
    let node = Node::builder(Arc::new(store))
        .sync_interval(T)
        .sync_timeout(TIMEOUT)
        .start()
        .unwrap();
    let limiter: Limiter = Limiter::builder(Policy::per_minute(20))
        .name("user")
        .node(&node)
        .build()
        .unwrap();
    let bound = T + TIMEOUT;
    for i in 0..10 {
        assert!(limiter.check_async(&format!("healthy-{i}")).await.is_allowed());
    }
    assert!(node.stats().claims_on_demand >= 1);
    server.signal("STOP");
    let mut slowest = Duration::ZERO;
    let mut admitted = 0;
    let mut open_at = None;
    for i in 0..40 {
        let start = Instant::now();
        let d = limiter.check_async(&format!("hung-{i}")).await;
        slowest = slowest.max(start.elapsed());
        admitted += u64::from(d.is_allowed());
        if open_at.is_none() && node.circuit() != CircuitState::Closed {
            open_at = Some(i);
        }
    }
    let stats = node.stats();
    server.signal("CONT");
    // Scheduling slack on a loaded machine: one more timeout.
    assert!(
        slowest <= bound + TIMEOUT,
        "a waiting check took {slowest:?} (bound {bound:?})"
    );
    let opened = open_at.unwrap_or_else(|| panic!("the circuit never opened: {stats:?}"));
    assert!(opened <= 3, "the circuit opened only at check {opened}: {stats:?}");
    // The failure policy's share starts empty at the outage: new keys get (almost) nothing.
    assert!(admitted <= 1, "{admitted} admitted while Redis hung");
    let mut recovered = false;
    for i in 0..50 {
        tokio::time::sleep(T).await;
        if node.circuit() == CircuitState::Closed && limiter.check_async(&format!("back-{i}")).await.is_allowed() {
            recovered = true;
            break;
        }
    }
    assert!(
        recovered,
        "no claim on demand after Redis came back: {:?}",
        node.stats()
    );
    node.shutdown().await;
}

/// Conservation with faults on instance 0's link: returns `(store count, admitted, stats)`.
async fn ledger_run(fault: Fault) -> (u64, u64, u64, u64) {
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 2, ledger(), |b| b).await;
    let key = ["client"];
    let mut all = fleet.run(&key, Duration::from_millis(500)).await;
    fleet.instances[0].proxy.set(fault);
    all.extend(fleet.run(&key, Duration::from_secs(1)).await);
    fleet.instances[0].proxy.set(Fault::None);
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    all.extend(fleet.run(&key, Duration::from_millis(300)).await);
    assert_fast(&all);
    let stats = fleet.instances[0].node.stats();
    assert!(stats.failed_round_trips >= 1, "the fault hit no sync: {stats:?}");
    // What the failure policy admitted while the circuit was open is the local share's, not
    // the store's: the ledger counts claims only.
    let all = sum(&all);
    let admitted = all.admitted - all.degraded_admitted;
    fleet.shutdown().await;
    let used = ledger_used(&server).await;
    (used, admitted, stats.unconfirmed_returns, stats.unconfirmed_wants)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_reset_before_the_script_ran_conserves_tokens_exactly() {
    let _serial = SERIAL.lock().await;
    let (used, admitted, returns, _wants) = ledger_run(Fault::ResetBeforeForward).await;
    // Nothing of a reset batch was applied: the store counts what was admitted from claims,
    // plus what the node gave up returning (it no longer holds it), and nothing twice.
    assert_eq!(
        used,
        admitted + returns,
        "store {used} admitted {admitted} returns lost {returns}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a6_reset_after_the_script_ran_never_double_counts_and_admits_no_more_than_the_store_granted() {
    let _serial = SERIAL.lock().await;
    let (used, admitted, returns, wants) = ledger_run(Fault::ResetAfterForward).await;
    // Applied once, never heard: the store counts the lost grants (at most what was wanted),
    // never a batch twice, and never less than what was admitted.
    assert!(used >= admitted, "over-admission: store {used} < admitted {admitted}");
    assert!(
        used <= admitted + wants + returns,
        "double count: store {used} > admitted {admitted} + unconfirmed {wants} + {returns}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a7_one_partitioned_instance_degrades_alone_and_adds_at_most_its_share() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 3, bucket(), |b| b).await;
    let key = ["client"];
    let start = Instant::now();
    let mut all = fleet.run(&key, Duration::from_millis(500)).await;
    fleet.instances[0].proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    let open0 = |f: &Fleet| f.instances[0].node.circuit() != CircuitState::Closed;
    let (t, _) = fleet.drive(&key, 1, Duration::from_secs(3), open0).await;
    all.extend(t);
    assert!(open0(&fleet), "the partitioned node's circuit did not open");
    all.extend(fleet.run(&key, Duration::from_secs(1)).await);
    fleet.instances[0].proxy.set(Fault::None);
    let partition = cut.elapsed();
    // The proxy held the blackholed connection: let the node notice and reconnect.
    fleet.instances[0].proxy.cut_all();
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    assert_fast(&all);
    for i in &fleet.instances[1..] {
        assert_eq!(i.node.stats().circuit_opened, 0, "a healthy node degraded");
    }
    let total = sum(&all);
    let bound = ideal(start.elapsed()) + share_bound(3, partition + RECOVERY);
    assert!(total.admitted <= bound, "{} > {bound}", total.admitted);
    assert!(total.degraded_admitted <= share_bound(3, partition + RECOVERY));
    fleet.shutdown().await;
}

/// Per-instance sums of phases (each phase a tally per instance).
fn per_instance(phases: &[Tally], n: usize) -> Vec<Tally> {
    let mut out = vec![Tally::default(); n];
    for (i, t) in phases.iter().enumerate() {
        out[i % n].add(t);
    }
    out
}

/// Per instance: the outage's tallies, the whole run's, and the node's stats; and how long
/// the outage lasted.
async fn a8_all_cut_off(policy: FailurePolicy) -> (Vec<Tally>, Vec<Tally>, Vec<NodeStats>, Duration) {
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 3, bucket(), move |b| b.failure_policy(policy)).await;
    let key = ["client"];
    let mut all = fleet.run(&key, Duration::from_millis(500)).await;
    fleet.set_all(Fault::Blackhole);
    let cut = Instant::now();
    let (t, _) = fleet.until_open(&key, Duration::from_secs(3)).await;
    let mut outage = t;
    outage.extend(fleet.run(&key, Duration::from_secs(2)).await);
    let out_for = cut.elapsed();
    fleet.set_all(Fault::None);
    for i in &fleet.instances {
        i.proxy.cut_all();
    }
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    all.extend(outage.iter().copied());
    assert_fast(&all);
    let stats = fleet.instances.iter().map(|i| i.node.stats()).collect();
    fleet.shutdown().await;
    (per_instance(&outage, 3), per_instance(&all, 3), stats, out_for)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_all_cut_off_local_share_admits_at_most_each_nodes_share() {
    let _serial = SERIAL.lock().await;
    let (outage, _, stats, out_for) = a8_all_cut_off(FailurePolicy::LocalShare).await;
    for (t, s) in outage.iter().zip(&stats) {
        let share = share_bound(3, out_for);
        assert!(t.degraded_admitted <= share, "{t:?} > share {share}");
        // Offered ~500/s against a share of 100/s: the share is used, not denied outright.
        assert!(
            t.degraded_admitted * 2 >= share,
            "{t:?} uses under half of share {share}"
        );
        assert_eq!(s.fail_open_admitted, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_all_cut_off_fail_open_admits_everything_and_counts_it() {
    let _serial = SERIAL.lock().await;
    let (outage, all, stats, _) = a8_all_cut_off(FailurePolicy::FailOpen).await;
    for ((t, a), s) in outage.iter().zip(&all).zip(&stats) {
        assert_eq!(a.degraded_denied, 0, "{a:?}");
        assert!(t.degraded_admitted > 0);
        assert_eq!(s.fail_open_admitted, a.degraded_admitted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_all_cut_off_fail_closed_admits_only_held_tokens() {
    let _serial = SERIAL.lock().await;
    let (outage, _, _, _) = a8_all_cut_off(FailurePolicy::FailClosed).await;
    let s = sum(&outage);
    assert_eq!(s.degraded_admitted, 0, "{s:?}");
    assert!(s.degraded_denied > 0);
    // What was admitted came from tokens held when the link went: at most the capacity.
    assert!(s.admitted <= C, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a9_flapping_link_probes_one_at_a_time_within_the_backoff() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 1, bucket(), |b| b).await;
    let key = ["client"];
    let mut all = fleet.run(&key, Duration::from_millis(300)).await;
    let flapping = Instant::now();
    let accepted_before = fleet.instances[0].proxy.stats().accepted;
    for round in 0..8 {
        let fault = if round % 2 == 0 {
            Fault::ResetBeforeForward
        } else {
            Fault::None
        };
        fleet.set_all(fault);
        all.extend(fleet.run(&key, Duration::from_millis(400)).await);
    }
    let flapped_for = flapping.elapsed();
    fleet.set_all(Fault::None);
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    assert_fast(&all);
    let s = fleet.instances[0].node.stats();
    assert!(s.circuit_opened >= 2, "the circuit did not flap: {s:?}");
    // One probe per open period at most, and open periods last at least min_open (T / 2).
    let min_open = T / 2;
    let most = (flapped_for.as_nanos() / min_open.as_nanos()) as u64 + 1;
    assert!(s.probes <= most, "{} probes in {flapped_for:?} (most {most})", s.probes);
    assert!(s.probes <= s.circuit_opened + 1, "{s:?}");
    // No connection storm: about one connection per failed attempt.
    let accepted = fleet.instances[0].proxy.stats().accepted - accepted_before;
    assert!(accepted <= 2 * most, "{accepted} connections in {flapped_for:?}");
    fleet.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// B: errors and semantic faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_script_flush_is_reloaded_transparently() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 2, bucket(), |b| b).await;
    let key = ["client"];
    let start = Instant::now();
    let mut all = Vec::new();
    for _ in 0..10 {
        all.extend(fleet.run(&key, Duration::from_millis(150)).await);
        assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    }
    assert_fast(&all);
    let total = sum(&all);
    assert!(total.admitted <= ideal(start.elapsed()));
    for i in &fleet.instances {
        let s = i.node.stats();
        assert_eq!(s.failed_round_trips, 0, "{s:?}");
        assert_eq!(s.circuit_opened, 0, "{s:?}");
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b2_out_of_memory_opens_the_circuit_and_recovers_when_memory_frees() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let fleet = Fleet::start(&server, 2, bucket(), |b| b).await;
    let key = ["client"];
    let mut all = fleet.run(&key, Duration::from_millis(400)).await;
    assert_eq!(server.cli(&["CONFIG", "SET", "maxmemory", "1"]), "OK");
    all.extend(fleet.until_open(&key, Duration::from_secs(3)).await.0);
    all.extend(fleet.run(&key, Duration::from_millis(500)).await);
    assert_eq!(server.cli(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    assert_fast(&all);
    for i in &fleet.instances {
        let s = i.node.stats();
        assert!(s.resource_errors >= 1, "OOM not classified as a resource error: {s:?}");
        assert_eq!(s.task_restarts, 0);
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_evicted_keys_are_detected_as_state_loss() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    // A rate no key reaches, so every key holds unspent tokens when the store loses it.
    let fleet = Fleet::start(&server, 1, Policy::per_second(5000), |b| b).await;
    let names: Vec<String> = (0..50).map(|i| format!("client-{i}")).collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut all = fleet.run(&keys, Duration::from_millis(600)).await;
    // Evict: a tight memory limit under allkeys-random, then junk written until our keys go.
    let used: u64 = server
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    server.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]);
    server.cli(&["CONFIG", "SET", "maxmemory", &(used + 200_000).to_string()]);
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    // One round trip, so that the keys are still in use (holding tokens) when they go.
    let junk = vec![b'x'; 1000];
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("SET").arg(format!("junk:{i}")).arg(&junk).ignore();
    }
    let _: Result<(), _> = pipe.query_async(&mut c).await;
    let evicted: u64 = server
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let ours: Vec<Vec<u8>> = redis::cmd("KEYS").arg("tollgate*").query_async(&mut c).await.unwrap();
    let gone = 51 - ours.len() as u64; // 50 keys and the registry
    assert!(evicted > 0 && gone >= 10, "eviction did not hit our keys ({gone} gone)");
    let before = fleet.instances[0].node.stats().state_losses;
    all.extend(fleet.run(&keys, Duration::from_millis(400)).await);
    assert_fast(&all);
    let detected = fleet.instances[0].node.stats().state_losses - before;
    // Every evicted key this node held tokens of is reported (the registry's loss is not a
    // key's; a key whose tokens were all spent at that moment has nothing to contradict).
    assert!(
        detected * 100 >= (gone - 1) * 95,
        "{detected} losses reported for {gone} evicted keys"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_readonly_replica_is_a_topology_error_and_promotion_recovers() {
    let _serial = SERIAL.lock().await;
    let primary = RedisServer::start();
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let fleet = Fleet::start(&replica, 1, bucket(), |b| b).await;
    let key = ["client"];
    let (mut all, _) = fleet.until_open(&key, Duration::from_secs(3)).await;
    all.extend(fleet.run(&key, Duration::from_millis(300)).await);
    let s = fleet.instances[0].node.stats();
    assert!(s.topology_errors >= 1, "READONLY not classified as topology: {s:?}");
    assert_eq!(replica.cli(&["REPLICAOF", "NO", "ONE"]), "OK");
    let promoted = Instant::now();
    all.extend(fleet.until_recovered(&key, promoted).await.0);
    all.extend(fleet.run(&key, Duration::from_millis(300)).await);
    assert_fast(&all);
    let after = sum(&all);
    assert!(after.admitted > after.degraded_admitted, "no claim after promotion");
    fleet.shutdown().await;
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b6_busy_script_is_transient_and_recovers_after_script_kill() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start_with(&["--busy-reply-threshold", "100"]);
    let fleet = Fleet::start(&server, 2, bucket(), |b| b).await;
    let key = ["client"];
    let mut all = fleet.run(&key, Duration::from_millis(300)).await;
    // Another client's endless script: everyone else gets BUSY until it is killed.
    let mut side = std::net::TcpStream::connect(server.addr()).unwrap();
    side.write_all(b"EVAL \"while true do end\" 0\r\n").unwrap();
    all.extend(fleet.until_open(&key, Duration::from_secs(3)).await.0);
    all.extend(fleet.run(&key, Duration::from_millis(300)).await);
    let killed = server.cli(&["SCRIPT", "KILL"]);
    assert_eq!(killed, "OK");
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    assert_fast(&all);
    for i in &fleet.instances {
        let s = i.node.stats();
        assert!(s.transient_errors >= 1, "BUSY not transient: {s:?}");
        assert_eq!(s.protocol_errors + s.config_errors, 0, "{s:?}");
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b7_wrongtype_isolates_one_key_and_the_rest_of_the_batch_syncs() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 1, bucket(), |b| b).await;
    fleet.run(&["warm-up"], Duration::from_millis(300)).await;
    let before = ledger_keys(&server).await;
    fleet.run(&["collides"], Duration::from_millis(300)).await;
    let after = ledger_keys(&server).await;
    let ours: Vec<&Vec<u8>> = after.iter().filter(|k| !before.contains(k)).collect();
    assert_eq!(ours.len(), 1, "expected the one key of 'collides'");
    // Another application writes a list under that name.
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    // At once, so that no sync writes the key between the two.
    let _: () = redis::cmd("EVAL")
        .arg("redis.call('DEL', KEYS[1]); redis.call('LPUSH', KEYS[1], 'x')")
        .arg(1)
        .arg(ours[0])
        .query_async(&mut c)
        .await
        .unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("good-{i}")).collect();
    let good: Vec<&str> = names.iter().map(String::as_str).collect();
    // Spend the tokens 'collides' holds, so its next claims go to the store and fail.
    let (bad, _) = fleet
        .drive(&["collides"], 20, Duration::from_millis(600), |_| false)
        .await;
    let good_tally = fleet.run(&good, Duration::from_millis(600)).await;
    assert_fast(&[bad.clone(), good_tally.clone()].concat());
    let s = fleet.instances[0].node.stats();
    assert!(s.key_errors >= 1, "{s:?}");
    assert_eq!(s.failed_round_trips, 0, "one bad key failed a batch: {s:?}");
    assert_eq!(fleet.circuits(), vec![CircuitState::Closed]);
    let b = sum(&bad);
    assert!(b.degraded_admitted > 0, "the collided key did not fall back: {b:?}");
    assert!(sum(&good_tally).admitted >= 10, "good keys were starved");
    fleet.shutdown().await;
}

async fn ledger_keys(server: &RedisServer) -> Vec<Vec<u8>> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b9_wrong_password_fails_at_start_and_a_rotated_one_opens_the_circuit_without_a_retry_storm() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start_with(&["--requirepass", "first"]);
    let wrong = format!("redis://:nope@127.0.0.1:{}/", server.port);
    let e = RedisStore::connect(redis_config(wrong.clone())).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    let lazy = RedisStore::connect_lazy(redis_config(wrong)).unwrap();
    match tuned(Node::builder(Arc::new(lazy)), 1).connect().await {
        Err(NodeError::Store(e)) => assert_eq!(e.class(), ErrorClass::Config, "{e}"),
        Ok(node) => panic!("a wrong password must fail the start: {:?}", node.stats()),
        Err(e) => panic!("{e}"),
    }

    let proxy = FaultProxy::start(server.addr()).await;
    let url = format!("redis://:first@{}/", proxy.addr());
    let store = RedisStore::connect(redis_config(url).reconnect_retries(0))
        .await
        .unwrap();
    let node = tuned(Node::builder(Arc::new(store)), 1).connect().await.unwrap();
    let limiter: Limiter = Limiter::builder(bucket()).name("api").node(&node).build().unwrap();
    let fleet = Fleet {
        instances: vec![Instance { proxy, node, limiter }],
    };
    let key = ["client"];
    let mut all = fleet.run(&key, Duration::from_millis(300)).await;
    // Rotate the password and drop every connection: the node can no longer authenticate.
    server.cli_auth(Some("first"), &["CONFIG", "SET", "requirepass", "second"]);
    server.cli_auth(Some("second"), &["CLIENT", "KILL", "TYPE", "normal"]);
    all.extend(fleet.until_open(&key, Duration::from_secs(3)).await.0);
    let accepted = fleet.instances[0].proxy.stats().accepted;
    let window = Duration::from_millis(1500);
    all.extend(fleet.run(&key, window).await);
    let attempts = fleet.instances[0].proxy.stats().accepted - accepted;
    let s = fleet.instances[0].node.stats();
    assert!(s.config_errors >= 1, "WRONGPASS not classified as configuration: {s:?}");
    // A configuration error keeps the circuit open for max_open (1.5 T) between probes.
    let most = (window.as_nanos() / (T * 3 / 2).as_nanos()) as u64 + 2;
    assert!(
        attempts <= most,
        "{attempts} connection attempts in {window:?} (most {most})"
    );
    server.cli_auth(Some("second"), &["CONFIG", "SET", "requirepass", "first"]);
    all.extend(fleet.until_recovered(&key, Instant::now()).await.0);
    assert_fast(&all);
    fleet.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// E: the node's own lifecycle
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e1_graceful_shutdown_returns_every_unused_claim() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 3, ledger(), |b| b).await;
    let all = fleet.run(&["client", "other"], Duration::from_secs(1)).await;
    assert_fast(&all);
    let admitted = sum(&all).admitted;
    let held_somewhere = ledger_used(&server).await;
    assert!(
        held_somewhere > admitted,
        "nodes should hold unspent claims before shutdown"
    );
    fleet.shutdown().await;
    assert_eq!(
        ledger_used(&server).await,
        admitted,
        "the store must count exactly what was admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2_a_crashed_node_loses_at_most_what_it_held() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let mut fleet = Fleet::start(&server, 3, ledger(), |b| b).await;
    let d = Duration::from_secs(1);
    let all = fleet.run(&["client"], d).await;
    assert_fast(&all);
    // Crash instance 0: its link goes dead and the process state with it (no shutdown).
    let crashed = fleet.instances.remove(0);
    crashed.proxy.set(Fault::Blackhole);
    let demand_per_interval = all[0].admitted as f64 / (d.as_secs_f64() / T.as_secs_f64());
    drop(crashed);
    let more = fleet.run(&["client"], Duration::from_millis(300)).await;
    fleet.shutdown().await;
    let admitted = sum(&all).admitted + sum(&more).admitted;
    let lost = ledger_used(&server).await - admitted;
    // It held at most twice its target, and its target is twice its demand per interval.
    let most = (4.0 * demand_per_interval * 1.25).ceil() as u64;
    assert!(lost <= most, "a crash lost {lost} tokens (bound {most})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e3_a_restarted_node_admits_at_most_its_cold_start_allowance() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = Fleet::start(&server, 1, bucket(), |b| b).await;
    // The key is exhausted globally.
    let (t, _) = fleet
        .drive(&["client"], 10, Duration::from_millis(800), |_| false)
        .await;
    assert!(sum(&t).admitted >= C);
    for (cold, allowance) in [(ColdStart::Optimistic(5), 5), (ColdStart::Deny, 0)] {
        let store = RedisStore::connect(redis_config(server.url())).await.unwrap();
        let node = tuned(Node::builder(Arc::new(store)), 2)
            .cold_start(cold)
            .build_manual()
            .unwrap();
        let limiter: Limiter = Limiter::builder(bucket()).name("api").node(&node).build().unwrap();
        let before_first_sync = (0..50).filter(|_| limiter.check("client").is_allowed()).count();
        assert_eq!(before_first_sync, allowance, "{cold:?}");
        node.sync_once().await;
        node.shutdown().await;
    }
    fleet.shutdown().await;
}

/// A store that panics on one call, to show the sync task survives its own bugs.
struct PanicsOnce {
    inner: MemoryStore,
    calls: AtomicU64,
    panic_on: u64,
}

impl Store for PanicsOnce {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.panic_on {
            panic!("injected panic in the sync task");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e4_a_panic_in_the_sync_task_is_caught_counted_and_the_task_restarts() {
    let _serial = SERIAL.lock().await;
    let store = PanicsOnce {
        inner: MemoryStore::new(),
        calls: AtomicU64::new(0),
        panic_on: 3,
    };
    let node = tuned(Node::builder(Arc::new(store)), 1).start().unwrap();
    let limiter: Limiter = Limiter::builder(bucket()).name("api").node(&node).build().unwrap();
    let start = Instant::now();
    let mut tally = Tally::default();
    while start.elapsed() < Duration::from_millis(1500) {
        tally.check(&limiter, "client");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let admitted = tally.admitted;
    let s = node.stats();
    assert_eq!(s.task_restarts, 1, "{s:?}");
    assert_fast(&[tally]);
    let age = node.last_successful_sync_age().unwrap();
    assert!(
        age < 2 * T,
        "syncing did not resume after the panic: last success {age:?} ago"
    );
    assert!(admitted > 100, "{admitted}");
    node.shutdown().await;
}
