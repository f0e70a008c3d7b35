//! Distributed mode on a real 3-master Redis Cluster (redis-server processes on loopback ports,
//! made with `redis-cli --cluster create`): the accuracy bound with awkward identifiers, slot
//! migrations under load without a claim lost or applied twice, and a dead master whose keys
//! alone degrade.

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/redis_cluster.rs"]
mod redis_cluster;

#[path = "common/pki.rs"]
mod pki;

#[path = "common/acl.rs"]
mod acl;

#[path = "common/recorder.rs"]
mod recorder;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_cluster::RedisCluster;
use tollgate::sim::{run_real, Scenario};
use tollgate::store::{key_slot, KeyEncoder, RedisClusterStore, RedisConfig};
use tollgate::{
    node::{CircuitState, NodeStats},
    Algorithm, ColdStart, Limiter, Node, Policy,
};

/// The cluster tests start servers and drive load: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const T: Duration = Duration::from_millis(100);

async fn store(cluster: &RedisCluster) -> RedisClusterStore {
    let seeds: Vec<RedisConfig> = cluster
        .urls()
        .into_iter()
        .map(|u| {
            RedisConfig::new(u)
                .connect_timeout(Duration::from_millis(300))
                .response_timeout(Duration::from_millis(500))
        })
        .collect();
    RedisClusterStore::connect(seeds).await.unwrap()
}

/// A fixed window so long that no test crosses it: the store's count is then everything
/// granted and not returned, which conservation compares with what was admitted.
fn ledger() -> Policy {
    Policy::new(1_000_000, Duration::from_secs(7 * 86_400)).algorithm(Algorithm::FixedWindow)
}

/// Identifiers with braces, colons and non-ASCII bytes: none may move a key's slot.
fn awkward_identifiers(n: usize) -> Vec<String> {
    let shapes = [
        "{", "}", "{}", "}{", ":", "{a}:{b}", "é", "日本", "{ü}", "x{y", "::{", "🦀}",
    ];
    (0..n)
        .map(|i| format!("{}{i}{}", shapes[i % shapes.len()], shapes[(i * 7 + 3) % shapes.len()]))
        .collect()
}

/// The store namespace of a limiter: its name and policy (as the limiter builds it).
fn namespace(name: &str, p: &Policy) -> String {
    format!(
        "{name}/{}/{}/{}/{}",
        p.get_algorithm().as_str(),
        p.points(),
        p.duration().as_millis(),
        p.capacity()
    )
}

fn sum_stats(nodes: &[Node]) -> NodeStats {
    let mut total = NodeStats::default();
    for n in nodes {
        let s = n.stats();
        total.unconfirmed_returns += s.unconfirmed_returns;
        total.unconfirmed_wants += s.unconfirmed_wants;
        total.key_errors += s.key_errors;
        total.failed_round_trips += s.failed_round_trips;
        total.circuit_opened += s.circuit_opened;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_accuracy_bound_holds_with_awkward_identifiers_and_one_round_trip_per_master() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start(3);
    let store = store(&cluster).await;
    let s = Scenario {
        identifiers: awkward_identifiers(8),
        duration: Duration::from_secs(10),
        ..Scenario::new(Policy::per_second(200).burst(400))
    };
    let r = run_real(&s, Arc::new(store.clone())).await;
    let stats = store.stats();
    println!("{r:?}\n{stats:?}");
    assert_eq!(r.over_admitted, 0, "over-admitted on the cluster");
    assert!(r.utilization >= 0.9, "utilization {:.4}", r.utilization);
    // No call failed: no CROSSSLOT, no misrouting.
    assert_eq!(stats.failed_calls, 0);
    assert_eq!(r.failed_round_trips, 0);
    assert_eq!(stats.masters, 3);
    // The 16 default groups fall 4/6/6 on the slot ranges `--cluster create` gives 3 masters.
    // One key of each group, as the default encoder writes it.
    let enc = KeyEncoder::default();
    let mut slot_of_group = [None; 16];
    for i in 0..10_000 {
        let key = enc.encode("ns", format!("id-{i}").as_bytes());
        slot_of_group[usize::from(key.group())].get_or_insert(key_slot(key.as_bytes()));
    }
    let mut per_master = [0; 3];
    for slot in slot_of_group {
        per_master[cluster.owner(slot.expect("every group met in 10,000 identifiers"))] += 1;
    }
    per_master.sort_unstable();
    assert_eq!(per_master, [4, 6, 6]);
    // The slot tollgate computes is the one Redis computes, for every key it wrote.
    for key in cluster.masters[0]
        .cli(&["--scan"])
        .lines()
        .chain(["foo{}{bar}", "{a}:{b}"])
    {
        let theirs: u16 = cluster.masters[0].cli(&["CLUSTER", "KEYSLOT", key]).parse().unwrap();
        assert_eq!(key_slot(key.as_bytes()), theirs, "{key}");
    }
    // Every master holds some of the keys, and a batch costs at most one pipeline per master.
    for m in &cluster.masters {
        let keys: u64 = m.cli(&["DBSIZE"]).parse().unwrap();
        assert!(keys > 0, "master {} holds no key", m.port);
    }
    assert!(stats.batches > 0);
    assert!(
        stats.round_trips <= 3 * stats.batches,
        "{} pipelines for {} batches",
        stats.round_trips,
        stats.batches
    );
    assert!(
        stats.calls > stats.round_trips,
        "calls of one master share its pipeline"
    );
}

/// Admits from `keys` on every limiter for `d`, round robin, yielding now and then.
async fn drive(limiters: &[Limiter], keys: &[String], d: Duration) -> u64 {
    let end = Instant::now() + d;
    let mut admitted = 0;
    let mut i = 0usize;
    while Instant::now() < end {
        for l in limiters {
            admitted += u64::from(l.check(keys[i % keys.len()].as_str()).is_allowed());
            i += 1;
        }
        if i.is_multiple_of(64) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_loses_no_claim_and_applies_none_twice() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start(3);
    let keys: Vec<String> = awkward_identifiers(48);
    // The master serving the most live keys gives all its slots to another, under load.
    let enc = KeyEncoder::default();
    let mut per_master = [0usize; 3];
    for k in &keys {
        per_master[cluster.owner(key_slot(
            enc.encode(&namespace("ledger", &ledger()), k.as_bytes()).as_bytes(),
        ))] += 1;
    }
    let from = (0..3).max_by_key(|&i| per_master[i]).unwrap();
    let to = (from + 1) % 3;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(store(&cluster).await);
    }
    let nodes: Vec<Node> = stores
        .iter()
        .map(|s| Node::builder(Arc::new(s.clone())).sync_interval(T).start().unwrap())
        .collect();
    let limiters: Vec<Limiter> = nodes
        .iter()
        .map(|n| Limiter::builder(ledger()).name("ledger").node(n).build().unwrap())
        .collect();
    let owned: usize = {
        let nodes = cluster.masters[0].cli(&["CLUSTER", "NODES"]);
        let line = nodes.lines().find(|l| l.starts_with(&cluster.ids[from])).unwrap();
        line.split_whitespace()
            .skip(8)
            .map(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1
            })
            .sum()
    };
    let admitted_before = drive(&limiters, &keys, Duration::from_millis(500)).await;
    let reshard = {
        let entry = cluster.masters[to].port;
        let (from_id, to_id) = (cluster.ids[from].clone(), cluster.ids[to].clone());
        std::thread::spawn(move || {
            let out = std::process::Command::new("timeout")
                .args([
                    "120",
                    "redis-cli",
                    "--cluster",
                    "reshard",
                    &format!("127.0.0.1:{entry}"),
                ])
                .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
                .args(["--cluster-slots", &owned.to_string(), "--cluster-yes"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        })
    };
    let mut admitted = admitted_before;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !reshard.is_finished() {
        assert!(Instant::now() < deadline, "resharding took over 120 s");
        admitted += drive(&limiters, &keys, Duration::from_millis(200)).await;
    }
    reshard.join().unwrap();
    admitted += drive(&limiters, &keys, Duration::from_millis(1200)).await;
    // The registry works on the cluster (its key may have moved too).
    for n in &nodes {
        assert_eq!(n.stats().live_nodes, 3, "{:?}", n.stats());
    }
    for n in &nodes {
        n.shutdown().await;
    }
    let stats = sum_stats(&nodes);
    let used = cluster.window_counts(&[0, 1, 2]);
    println!(
        "moved {owned} slots; admitted {admitted}, store count {used}, {stats:?}; from master keys left {}",
        cluster.masters[from].cli(&["DBSIZE"])
    );
    assert_eq!(cluster.masters[from].cli(&["DBSIZE"]), "0", "every key moved");
    let redirected: u64 = stores.iter().map(|s| s.stats().moved + s.stats().asked).sum();
    assert!(redirected > 0, "the nodes never met a moved slot");
    let store_stats: Vec<_> = stores.iter().map(RedisClusterStore::stats).collect();
    println!("{store_stats:?}");
    // Nothing admitted without a grant; nothing granted twice or lost beyond what the node
    // could not confirm.
    assert!(used >= admitted, "store count {used} below admitted {admitted}");
    assert!(
        used <= admitted + stats.unconfirmed_returns,
        "store count {used} above admitted {admitted} + unconfirmed {}",
        stats.unconfirmed_returns
    );
    assert_eq!(stats.circuit_opened, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_step_by_step_follows_ask_tryagain_and_moved_without_double_claims() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start(3);
    let store = store(&cluster).await;
    let node = Node::builder(Arc::new(store.clone()))
        .sync_interval(T)
        .cold_start(ColdStart::Deny)
        .build_manual()
        .unwrap();
    let limiter: Limiter = Limiter::builder(ledger()).name("ledger").node(&node).build().unwrap();
    // Three identifiers whose keys share a slot.
    let enc = KeyEncoder::default();
    let slot_of = |id: &str| key_slot(enc.encode(&namespace("ledger", &ledger()), id.as_bytes()).as_bytes());
    let candidates = awkward_identifiers(200);
    let slot = slot_of(&candidates[0]);
    let ids: Vec<&String> = candidates.iter().filter(|id| slot_of(id) == slot).take(3).collect();
    assert_eq!(ids.len(), 3);
    let from = cluster.owner(slot);
    let to = (from + 1) % 3;
    let mut admitted = 0u64;
    // Spends what the node holds for each key (at most n checks each), so that the next sync
    // claims for all three. Admissions by the failure policy (a key whose call failed) are
    // not the store's: they are counted apart, and end the key's round.
    let degraded = std::cell::Cell::new(0u64);
    let round = |n: usize| {
        let mut a = 0;
        for id in &ids {
            for _ in 0..n {
                let d = limiter.check(id.as_str());
                if d.is_degraded() {
                    degraded.set(degraded.get() + u64::from(d.is_allowed()));
                    break;
                }
                if d.is_denied() {
                    break;
                }
                a += 1;
            }
        }
        a
    };
    admitted += round(1);
    node.sync_once().await;
    admitted += round(100_000);
    node.sync_once().await;
    let key = |id: &str| {
        String::from_utf8(
            enc.encode(&namespace("ledger", &ledger()), id.as_bytes())
                .as_bytes()
                .to_vec(),
        )
        .unwrap()
    };
    assert_eq!(cluster.keys_in_slot(from, slot).len(), 3);

    // Migration begins; one key moves: a call with all three keys is split (TRYAGAIN).
    cluster.begin_migration(slot, from, to);
    cluster.migrate_key(&key(ids[0]), from, to);
    admitted += round(100_000);
    node.sync_once().await;
    let s = store.stats();
    assert!(s.tryagain > 0, "{s:?}");
    assert_eq!(s.failed_calls, 1, "a split call fails after its sends: {s:?}");
    let n = node.stats();
    assert!(n.key_errors + n.failed_round_trips > 0, "{n:?}");

    // The rest moves: every key is on the target (ASK, then ASKING there).
    cluster.migrate_key(&key(ids[1]), from, to);
    cluster.migrate_key(&key(ids[2]), from, to);
    admitted += round(100_000);
    node.sync_once().await;
    let s = store.stats();
    assert!(s.asked > 0, "{s:?}");
    assert_eq!(s.failed_calls, 1, "{s:?}");

    // The slot is the target's: MOVED, and the slot map follows.
    cluster.end_migration(slot, to);
    admitted += round(100_000);
    node.sync_once().await;
    let s = store.stats();
    assert!(s.moved > 0, "{s:?}");
    assert_eq!(s.failed_calls, 1, "{s:?}");
    admitted += round(100_000);
    node.sync_once().await;
    assert!(store.stats().calls > s.calls, "the last sync sent the slot's call");
    assert_eq!(store.stats().moved, s.moved, "the slot map knows the new owner");
    assert_eq!(cluster.keys_in_slot(to, slot).len(), 3);

    // The same counts, published through the metrics facade under the store's first seed.
    let captured = Arc::new(recorder::Captured::default());
    metrics::with_local_recorder(&recorder::TestRecorder(captured.clone()), tollgate::metrics::publish);
    let s = store.stats();
    let seed = format!("cluster=127.0.0.1:{}", cluster.masters[0].port);
    let metric = |name: &str, labels: &str| captured.get(&format!("{name}{{{labels}}}"));
    use tollgate::metrics as tm;
    assert_eq!(metric(tm::CLUSTER_ROUND_TRIPS_TOTAL, &seed), Some(s.round_trips as f64));
    assert_eq!(
        metric(tm::CLUSTER_REDIRECTS_TOTAL, &format!("{seed},reply=moved")),
        Some(s.moved as f64)
    );
    assert_eq!(
        metric(tm::CLUSTER_REDIRECTS_TOTAL, &format!("{seed},reply=ask")),
        Some(s.asked as f64)
    );
    assert_eq!(
        metric(tm::CLUSTER_REDIRECTS_TOTAL, &format!("{seed},reply=tryagain")),
        Some(s.tryagain as f64)
    );
    assert_eq!(metric(tm::CLUSTER_FAILED_CALLS_TOTAL, &seed), Some(1.0));
    assert_eq!(
        metric(tm::CLUSTER_SLOT_MAP_READS_TOTAL, &seed),
        Some(s.slot_map_reads as f64)
    );
    assert_eq!(metric(tm::CLUSTER_MASTERS, &seed), Some(3.0));

    node.shutdown().await;
    let stats = node.stats();
    let used = cluster.window_counts(&[0, 1, 2]);
    println!(
        "admitted {admitted}, store count {used}, {stats:?}, {:?}",
        store.stats()
    );
    assert!(used >= admitted, "store count {used} below admitted {admitted}");
    assert!(
        used <= admitted + stats.unconfirmed_returns,
        "store count {used} above admitted {admitted} + unconfirmed {}",
        stats.unconfirmed_returns
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_degrades_its_keys_while_the_others_sync_on() {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start(3);
    let store = store(&cluster).await;
    let node = Node::builder(Arc::new(store.clone())).sync_interval(T).start().unwrap();
    // A small bucket, so that held tokens run out fast and the failure policy shows.
    let api = Policy::per_second(20);
    let limiter: Limiter = Limiter::builder(api.clone()).name("api").node(&node).build().unwrap();
    let enc = KeyEncoder::default();
    let ids = awkward_identifiers(36);
    let owner: Vec<usize> = ids
        .iter()
        .map(|id| cluster.owner(key_slot(enc.encode(&namespace("api", &api), id.as_bytes()).as_bytes())))
        .collect();
    let dead = owner[0];
    for _ in 0..5 {
        for id in &ids {
            limiter.check(id.as_str());
        }
        tokio::time::sleep(T).await;
    }
    let before = store.stats();
    cluster.masters[dead].kill();
    // Checks go on for 2 s; note which keys the failure policy answered.
    let mut degraded = vec![false; ids.len()];
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        for (i, id) in ids.iter().enumerate() {
            degraded[i] |= limiter.check(id.as_str()).is_degraded();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = store.stats();
    println!("{:?}\n{after:?}", node.stats());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            degraded[i],
            owner[i] == dead,
            "{id:?} on master {} (dead: {dead}): degraded {}",
            owner[i],
            degraded[i]
        );
    }
    assert_eq!(
        node.circuit(),
        CircuitState::Closed,
        "the other masters keep the circuit closed"
    );
    assert!(after.failed_calls > before.failed_calls);
    // The live masters' keys kept syncing: calls beyond the failed ones went out every sync.
    assert!(after.calls - before.calls > after.failed_calls - before.failed_calls + 10);

    // The master comes back with its slots: its keys sync again. Checks go on all the while
    // (a key nobody asks for is not synced, so a quiet node would prove nothing).
    cluster.masters[dead].restart();
    cluster.wait_ok(&[0, 1, 2]);
    let checks = |until: Instant| {
        let (limiter, ids) = (&limiter, &ids);
        async move {
            let mut degraded = vec![false; ids.len()];
            while Instant::now() < until {
                for (i, id) in ids.iter().enumerate() {
                    degraded[i] |= limiter.check(id.as_str()).is_degraded();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            degraded
        }
    };
    checks(Instant::now() + Duration::from_millis(1500)).await;
    let back = store.stats();
    let degraded = checks(Instant::now() + Duration::from_millis(500)).await;
    let end = store.stats();
    assert_eq!(
        end.failed_calls, back.failed_calls,
        "calls still failing after the master returned"
    );
    assert!(
        end.calls > back.calls,
        "no call went out after the master returned: {end:?}"
    );
    let still: Vec<&String> = ids
        .iter()
        .zip(&degraded)
        .filter(|(_, d)| **d)
        .map(|(id, _)| id)
        .collect();
    assert!(
        still.is_empty(),
        "keys still degraded after the master returned: {still:?}"
    );
    node.shutdown().await;
}

/// The least-privilege user of the README, with the three commands a cluster adds.
fn acl_user(cluster: &RedisCluster, without: Option<&str>) -> Vec<String> {
    let commands = acl::COMMANDS.iter().chain(&acl::CLUSTER_COMMANDS);
    let grants: Vec<String> = commands
        .filter(|c| Some(**c) != without)
        .map(|c| format!("+{c}"))
        .collect();
    for m in &cluster.masters {
        let mut args = vec![
            "ACL",
            "SETUSER",
            "tollgate",
            "reset",
            "on",
            ">pw",
            "~tg:*",
            "resetchannels",
            "-@all",
        ];
        args.extend(grants.iter().map(String::as_str));
        assert_eq!(m.cli(&args), "OK");
    }
    cluster
        .masters
        .iter()
        .map(|m| format!("redis://tollgate:pw@127.0.0.1:{}/", m.port))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_acl_user_runs_a_node_on_the_cluster() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start(3);
    // Without the slot map command the store cannot start, and says why.
    let urls = acl_user(&cluster, Some("cluster|slots"));
    let err = RedisClusterStore::connect(urls).await.unwrap_err();
    assert_eq!(err.class(), tollgate::store::ErrorClass::Config, "{err}");
    let urls = acl_user(&cluster, None);
    let store = RedisClusterStore::connect(urls).await.unwrap();
    let node = Node::builder(Arc::new(store.clone())).sync_interval(T).start().unwrap();
    let limiter: Limiter = Limiter::builder(Policy::per_second(100))
        .name("acl")
        .node(&node)
        .build()
        .unwrap();
    let ids = awkward_identifiers(30);
    let mut allowed = 0;
    for _ in 0..15 {
        for id in &ids {
            allowed += u64::from(limiter.check(id.as_str()).is_allowed());
        }
        tokio::time::sleep(T).await;
    }
    let s = node.stats();
    let c = store.stats();
    println!("{s:?}\n{c:?}");
    assert!(allowed >= 10 * ids.len() as u64, "{allowed} allowed");
    assert_eq!(c.failed_calls, 0, "{c:?}");
    assert_eq!(
        s.key_errors + s.config_errors + s.transient_errors + s.protocol_errors,
        0,
        "{s:?}"
    );
    assert_eq!(s.live_nodes, 1);
    node.shutdown().await;
}

#[cfg(feature = "redis-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_verifies_every_master_and_refuses_another_ca() {
    let _serial = SERIAL.lock().await;
    let pki = pki::Pki::new();
    let cluster = RedisCluster::start_tls(
        3,
        redis_cluster::ClusterTls {
            cert: pki.file("server.crt"),
            key: pki.file("server.key"),
            ca: pki.file("ca.crt"),
        },
    );
    let seeds = |ca: &str| -> Vec<RedisConfig> {
        cluster
            .urls()
            .into_iter()
            .map(|u| {
                assert!(u.starts_with("rediss://"), "{u}");
                RedisConfig::new(u).tls_ca_file(pki.path(ca))
            })
            .collect()
    };
    // Another CA: refused at once, as a configuration error.
    let err = RedisClusterStore::connect(seeds("other-ca.crt")).await.unwrap_err();
    assert_eq!(err.class(), tollgate::store::ErrorClass::Config, "{err}");
    // The right CA: every master is reached over TLS, its certificate and name verified.
    let store = RedisClusterStore::connect(seeds("ca.crt")).await.unwrap();
    let node = Node::builder(Arc::new(store.clone())).sync_interval(T).start().unwrap();
    let limiter: Limiter = Limiter::builder(Policy::per_second(100))
        .name("tls")
        .node(&node)
        .build()
        .unwrap();
    let ids = awkward_identifiers(30);
    let mut allowed = 0;
    for _ in 0..10 {
        for id in &ids {
            allowed += u64::from(limiter.check(id.as_str()).is_allowed());
        }
        tokio::time::sleep(T).await;
    }
    let c = store.stats();
    println!("{:?}\n{c:?}", node.stats());
    assert!(allowed >= 5 * ids.len() as u64, "{allowed} allowed");
    assert_eq!((c.masters, c.failed_calls), (3, 0), "{c:?}");
    for m in &cluster.masters {
        let keys: u64 = m.cli(&["DBSIZE"]).parse().unwrap();
        assert!(keys > 0, "master {} holds no key", m.port);
    }
    node.shutdown().await;
}
