//! The store against real `redis-server` processes, one per test, on ephemeral loopback ports.
//!
//! Needs `redis-server` on the PATH (`apt-get install redis-server`). Every loop is bounded in
//! count and time, and all traffic goes to 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claims::claim;
use redis::aio::ConnectionManager;
use tollgate::store::{
    Claim, ClaimOutcome, ErrorClass, Grant, KeyEncoder, KeyError, Limits, ManualTime, MemoryStore, NodeId, RedisConfig,
    RedisStore, Store, StoreKey,
};

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/claims.rs"]
mod claims;

/// The test's redis-server, with the clients the tests use.
struct Server(redis_server::RedisServer);

impl Server {
    fn start() -> Server {
        Server(redis_server::RedisServer::start())
    }

    fn start_with(extra: &[&str]) -> Server {
        Server(redis_server::RedisServer::start_with(extra))
    }

    fn url(&self) -> String {
        self.0.url()
    }

    async fn store(&self) -> RedisStore {
        RedisStore::connect(RedisConfig::new(self.url()))
            .await
            .expect("connect to the test redis-server")
    }

    async fn raw(&self) -> ConnectionManager {
        let client = redis::Client::open(self.url()).unwrap();
        ConnectionManager::new(client).await.unwrap()
    }
}

const T0: u64 = 1_700_000_000_200_000;

fn tb(cap: u64, per_sec: u64, lease_ms: u64) -> Limits {
    Limits::token_bucket(cap, per_sec, Duration::from_secs(1), Duration::from_millis(lease_ms)).unwrap()
}

async fn one(s: &dyn Store, node: NodeId, c: Claim) -> Grant {
    s.claim(node, std::slice::from_ref(&c))
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

/// A small deterministic generator (no extra dependency; same sequence every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Moves `clock` by `us`, and by at least the real time since the last step (plus 2 ms): Redis
/// expires keys on its own clock, so the explicit time must run ahead of it for a key to expire
/// in the MemoryStore no later than in Redis (a key Redis still has, but that expired on the
/// explicit clock, reads as a fresh one to the scripts).
fn advance_past_real(clock: &ManualTime, last_real: &mut Instant, us: u64) {
    let real_us = last_real.elapsed().as_micros() as u64;
    *last_real = Instant::now();
    clock.set_us(clock.now_us() + us.max(real_us + 2_000));
}

/// The same operations through MemoryStore and RedisStore, at the same (explicit) times, must
/// give identical replies: grants, remaining, timings, window ids, revocations and errors.
#[tokio::test]
async fn memory_and_redis_give_identical_replies() {
    let server = Server::start();
    let redis = server.store().await;
    let clock = ManualTime::new(T0);
    let memory = MemoryStore::with_time_source(clock.source());
    let enc = KeyEncoder::new("cmp:").unwrap();
    let policies = [
        tb(10, 10, 300),
        tb(50, 1000, 100),
        tb(3, 1, 1000),
        Limits::fixed_window(20, Duration::from_millis(500)).unwrap(),
        Limits::fixed_window(5, Duration::from_millis(7)).unwrap(),
        Limits::sliding_window(20, Duration::from_millis(500)).unwrap(),
        Limits::sliding_window(7, Duration::from_millis(30)).unwrap(),
    ];
    let keys: Vec<(StoreKey, Limits)> = (0..14)
        .map(|i| {
            (
                enc.encode(&format!("p{}", i % policies.len()), format!("id{i}").as_bytes()),
                policies[i % policies.len()],
            )
        })
        .collect();
    // What each (node, key) believes it holds and in which window.
    let mut held = vec![vec![(0u64, 0u64); keys.len()]; 4];
    let mut rng = Lcg(7);
    let mut compared = 0;
    let mut last_real = Instant::now();
    for step in 0..1500 {
        let advance = match rng.next(10) {
            0..=5 => rng.next(20),
            6..=8 => rng.next(300),
            _ => rng.next(2500),
        };
        let jitter = rng.next(1000);
        advance_past_real(&clock, &mut last_real, advance * 1000 + jitter);
        redis.set_time_override_us(Some(clock.now_us()));
        let node = rng.next(4) as usize;
        let mut batch = Vec::new();
        let mut which = Vec::new();
        for (i, (key, limits)) in keys.iter().enumerate() {
            if rng.next(3) != 0 {
                continue;
            }
            let (h, w) = held[node][i];
            let spent = rng.next(h + 1);
            let left = h - spent;
            let returned = if rng.next(3) == 0 { rng.next(left + 1) } else { 0 };
            // Now and then a node lies: keeps or returns more than it has.
            let extra = if rng.next(20) == 0 { rng.next(10) } else { 0 };
            let window = if rng.next(30) == 0 { w + 1 } else { w };
            batch.push(claim(
                key,
                *limits,
                left - returned + extra,
                returned,
                rng.next(25),
                window,
            ));
            which.push(i);
        }
        let a = memory.claim(node as u64, &batch).await.unwrap();
        let b = redis.claim(node as u64, &batch).await.unwrap();
        assert_eq!(a, b, "step {step}: memory and redis disagree for batch {batch:?}");
        for ((i, c), out) in which.iter().zip(&batch).zip(&a) {
            let g = out.as_ref().unwrap();
            held[node][*i] = (c.kept - g.revoked.min(c.kept) + g.granted, g.window);
        }
        compared += a.len();
    }
    assert!(compared > 5000, "{compared}");
}

/// Many nodes sharing few keys, through both stores at the same times: node records come and
/// go (leases run out, records are dropped when the TTL is refreshed, keys expire or empty),
/// node ids whose bytes also occur inside the stored numbers, keys repeated within a batch,
/// keys of another type (a list, and a hash as an older version kept a token bucket) and keys
/// holding another algorithm's state. Replies must be identical.
#[tokio::test]
async fn memory_and_redis_agree_on_shared_keys() {
    let server = Server::start();
    let redis = server.store().await;
    let mut raw = server.raw().await;
    let clock = ManualTime::new(T0);
    let memory = MemoryStore::with_time_source(clock.source());
    // Node ids: extremes, and the bytes of small doubles (token counts in the records).
    let mut nodes: Vec<NodeId> = vec![0, 1, u64::MAX, 1 << 63, 0x0100_0000_0000_0000];
    nodes.extend((1..=6).map(|n| f64::to_bits(n as f64)));
    let shared = [
        (StoreKey::from_raw("sh:{a}1"), tb(10, 10, 300)),
        (StoreKey::from_raw("sh:{a}2"), tb(40, 1000, 100)),
        (StoreKey::from_raw("sh:{a}3"), tb(4, 2, 1000)),
        (
            StoreKey::from_raw("sh:{a}4"),
            Limits::fixed_window(30, Duration::from_millis(500)).unwrap(),
        ),
        (
            StoreKey::from_raw("sh:{a}5"),
            Limits::sliding_window(30, Duration::from_millis(500)).unwrap(),
        ),
    ];
    // Keys of another type, in both stores (with a TTL, for the check at the end).
    let (list, hash) = (StoreKey::from_raw("sh:{a}list"), StoreKey::from_raw("sh:{a}hash"));
    let _: () = redis::cmd("LPUSH")
        .arg(list.as_bytes())
        .arg("x")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(hash.as_bytes())
        .arg("s")
        .arg("0123456789012345678901234567890123456789")
        .query_async(&mut raw)
        .await
        .unwrap();
    for k in [&list, &hash] {
        let _: () = redis::cmd("PEXPIRE")
            .arg(k.as_bytes())
            .arg(3_600_000)
            .query_async(&mut raw)
            .await
            .unwrap();
        memory.put_foreign(k);
    }
    let foreign = [(list, tb(5, 5, 300)), (hash, tb(5, 5, 300))];
    // Keys written by one algorithm and claimed with another (both stay corrupt for the other).
    let crossed: Vec<(StoreKey, Limits, Limits)> = (0..3)
        .flat_map(|a| (0..3).filter(move |&b| b != a).map(move |b| (a, b)))
        .map(|(a, b)| {
            let k = StoreKey::from_raw(format!("sh:{{a}}x{a}{b}"));
            let algo = |j: usize| [3, 4, 0].map(|s| shared[s].1)[j];
            (k, algo(a), algo(b))
        })
        .collect();
    let mut held = vec![vec![(0u64, 0u64); shared.len()]; nodes.len()];
    let mut rng = Lcg(11);
    let (mut compared, mut most_records) = (0, 0);
    let mut last_real = Instant::now();
    for step in 0..3000 {
        let advance = match rng.next(20) {
            0..=11 => rng.next(40),
            12..=17 => rng.next(400),
            18 => rng.next(3000),
            _ => rng.next(20_000),
        };
        let jitter = rng.next(1000);
        advance_past_real(&clock, &mut last_real, advance * 1000 + jitter);
        redis.set_time_override_us(Some(clock.now_us()));
        // Mostly a few nodes take turns; now and then any node, after a long silence.
        let n = if rng.next(5) == 0 {
            rng.next(nodes.len() as u64)
        } else {
            rng.next(4)
        } as usize;
        let mut batch = Vec::new();
        let mut which = Vec::new();
        for (i, (key, limits)) in shared.iter().enumerate() {
            if rng.next(4) == 0 {
                continue;
            }
            let (h, w) = held[n][i];
            let left = h - rng.next(h + 1);
            let returned = if rng.next(4) == 0 { rng.next(left + 1) } else { 0 };
            let extra = if rng.next(25) == 0 { rng.next(5) } else { 0 };
            batch.push(claim(key, *limits, left - returned + extra, returned, rng.next(12), w));
            which.push(Some(i));
            // The same key again in the batch: applied in order.
            if rng.next(15) == 0 {
                batch.push(claim(key, *limits, 0, 0, rng.next(3), w));
                which.push(Some(i));
            }
        }
        if rng.next(10) == 0 {
            let (k, l) = &foreign[rng.next(2) as usize];
            batch.push(claim(k, *l, 0, 0, 1, 0));
            which.push(None);
        }
        if rng.next(10) == 0 {
            // Write the key with its own algorithm (if it is gone), then claim it with the other
            // (in another batch: the Redis store runs a batch's algorithms in separate calls).
            let (k, first, other) = &crossed[rng.next(crossed.len() as u64) as usize];
            for c in [claim(k, *first, 0, 0, 1, 0), claim(k, *other, 0, 0, 1, 0)] {
                let c = std::slice::from_ref(&c);
                let (a, b) = (
                    memory.claim(nodes[n], c).await.unwrap(),
                    redis.claim(nodes[n], c).await.unwrap(),
                );
                assert_eq!(a, b, "step {step}: memory and redis disagree for {c:?}");
                compared += 1;
            }
        }
        let a = memory.claim(nodes[n], &batch).await.unwrap();
        let b = redis.claim(nodes[n], &batch).await.unwrap();
        assert_eq!(a, b, "step {step}: memory and redis disagree for batch {batch:?}");
        for ((i, c), out) in which.iter().zip(&batch).zip(&a) {
            match (i, out) {
                (Some(i), Ok(g)) => held[n][*i] = (c.kept - g.revoked.min(c.kept) + g.granted, g.window),
                (Some(_), Err(e)) => panic!("step {step}: {e}"),
                (None, _) => {}
            }
        }
        compared += a.len();
        // The token buckets: a 41-byte header, 32 bytes per node record.
        for (key, _) in &shared[..3] {
            let len: usize = redis::cmd("STRLEN")
                .arg(key.as_bytes())
                .query_async(&mut raw)
                .await
                .unwrap();
            if len >= 41 {
                most_records = most_records.max((len - 41) / 32);
            }
        }
    }
    assert!(compared > 8000, "{compared}");
    assert!(most_records >= 5, "at most {most_records} node records on a key");
    assert!(assert_all_keys_have_ttl(&server).await >= 2);
    // Every way of writing was taken: in place, appended, anew, deleted; keys read at once,
    // checked for another type, and read alone.
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw)
        .await
        .unwrap();
    for command in ["setrange", "append", "set", "del", "mget", "exists", "get"] {
        let prefix = format!("cmdstat_{command}:calls=");
        assert!(info.lines().any(|l| l.starts_with(&prefix)), "no {command} in {info}");
    }
}

async fn assert_all_keys_have_ttl(server: &Server) -> usize {
    let mut raw = server.raw().await;
    let mut cursor: u64 = 0;
    let mut seen = 0;
    for _ in 0..10_000 {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut raw)
            .await
            .unwrap();
        for k in keys {
            let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut raw).await.unwrap();
            assert!(ttl != -1, "key {:?} has PTTL {ttl}", String::from_utf8_lossy(&k));
            seen += 1;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    seen
}

/// Real Redis time: grants, returns, refill, and a TTL on every key.
#[tokio::test]
async fn token_bucket_on_redis_time() {
    let server = Server::start();
    let s = server.store().await;
    let enc = KeyEncoder::default();
    let k = enc.encode("api", b"user-1");
    let l = tb(100, 1000, 200); // 1 token per ms
    let g = one(&s, 1, claim(&k, l, 0, 0, 60, 0)).await;
    assert_eq!(g.granted, 60);
    assert!(g.remaining <= 40);
    let g = one(&s, 2, claim(&k, l, 0, 0, 100, 0)).await;
    assert!(g.granted <= 40 + 5, "{g:?}");
    assert_eq!(g.remaining, 0);
    assert!(g.ms_to_next_token >= 1 && g.ms_to_next_token <= 2, "{g:?}");
    // Node 1 spent 10 and returns 50 (its lease is fresh): they are available again.
    let g = one(&s, 1, claim(&k, l, 0, 50, 0, 0)).await;
    assert!(g.remaining >= 50, "{g:?}");
    tokio::time::sleep(Duration::from_millis(30)).await;
    let g = one(&s, 3, claim(&k, l, 0, 0, 100, 0)).await;
    assert!(g.granted >= 50 && g.granted <= 100, "{g:?}");
    assert!(assert_all_keys_have_ttl(&server).await >= 1);
}

async fn with_time(redis: &RedisStore, t: &ManualTime, d: Duration) {
    t.advance(d);
    redis.set_time_override_us(Some(t.now_us()));
}

/// The held cap and the lease on Redis (explicit time, so the test is exact).
#[tokio::test]
async fn held_cap_and_lease_on_redis() {
    let server = Server::start();
    let s = server.store().await;
    let t = ManualTime::new(T0);
    with_time(&s, &t, Duration::ZERO).await;
    let k = StoreKey::from_raw("tg:{000}1:kr1");
    let l = tb(10, 10, 300);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 6, 0)).await.granted, 6);
    assert_eq!(one(&s, 2, claim(&k, l, 0, 0, 6, 0)).await.granted, 4);
    // Both keep syncing what they hold: an idle second must not refill past their holdings.
    for _ in 0..10 {
        with_time(&s, &t, Duration::from_millis(100)).await;
        assert_eq!(one(&s, 1, claim(&k, l, 6, 0, 0, 0)).await.remaining, 0);
        assert_eq!(one(&s, 2, claim(&k, l, 4, 0, 0, 0)).await.remaining, 0);
    }
    // Node 1 stops syncing; node 2 goes on. After node 1's lease, its 6 refill for node 2.
    for _ in 0..10 {
        with_time(&s, &t, Duration::from_millis(100)).await;
        assert_eq!(one(&s, 2, claim(&k, l, 4, 0, 0, 0)).await.revoked, 0);
    }
    let g = one(&s, 2, claim(&k, l, 4, 0, 10, 0)).await;
    assert_eq!((g.granted, g.remaining), (6, 0));
    // Node 1 comes back and claims to keep 6: nothing is free, so they are revoked.
    let g = one(&s, 1, claim(&k, l, 6, 0, 1, 0)).await;
    assert_eq!((g.granted, g.revoked), (0, 6));
    // Returning more than it holds gives back only what the store believes it holds.
    let g = one(&s, 2, claim(&k, l, 0, 1000, 0, 0)).await;
    assert_eq!(g.remaining, 10);
    // Full and nobody holds anything: the key is gone.
    let mut raw = server.raw().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(k.as_bytes())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

/// Window rollover and the void rule, for both window algorithms, on Redis.
#[tokio::test]
async fn windows_roll_over_and_void_old_claims() {
    let server = Server::start();
    let s = server.store().await;
    let t = ManualTime::new(1_700_000_000_000_000);
    with_time(&s, &t, Duration::ZERO).await;
    let w0 = 1_700_000_000;
    let fixed = Limits::fixed_window(10, Duration::from_secs(1)).unwrap();
    let k = StoreKey::from_raw("fw");
    let g = one(&s, 1, claim(&k, fixed, 0, 0, 8, 0)).await;
    assert_eq!((g.granted, g.remaining, g.window, g.ms_to_reset), (8, 2, w0, 1000));
    with_time(&s, &t, Duration::from_millis(400)).await;
    let g = one(&s, 1, claim(&k, fixed, 3, 5, 20, w0)).await;
    assert_eq!((g.granted, g.remaining, g.revoked, g.ms_to_reset), (7, 0, 0, 600));
    assert_eq!(g.ms_to_next_token, 600);
    with_time(&s, &t, Duration::from_millis(600)).await;
    let g = one(&s, 1, claim(&k, fixed, 10, 10, 4, w0)).await;
    assert_eq!((g.granted, g.remaining, g.window, g.revoked), (4, 6, w0 + 1, 10));

    let sliding = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    let k = StoreKey::from_raw("sw");
    assert_eq!(one(&s, 1, claim(&k, sliding, 0, 0, 10, 0)).await.granted, 10);
    with_time(&s, &t, Duration::from_millis(1250)).await;
    let g = one(&s, 1, claim(&k, sliding, 3, 3, 10, w0 + 1)).await;
    assert_eq!(
        (g.granted, g.remaining, g.window, g.revoked, g.ms_to_next_token),
        (2, 0, w0 + 2, 3, 50)
    );
    assert!(assert_all_keys_have_ttl(&server).await >= 2);
}

/// SCRIPT FLUSH (or a restart, or an LRU eviction of scripts) is invisible to the caller.
#[tokio::test]
async fn noscript_is_transparent() {
    let server = Server::start();
    let s = server.store().await;
    let mut raw = server.raw().await;
    let k = StoreKey::from_raw("ns");
    let fixed = Limits::fixed_window(100, Duration::from_secs(60)).unwrap();
    for round in 0..3 {
        let g = one(&s, 1, claim(&k, tb(100, 100, 500), 0, 0, 1, 0)).await;
        assert_eq!(g.granted, 1, "round {round}");
        let g = one(&s, 1, claim(&StoreKey::from_raw("nsf"), fixed, 0, 0, 1, 0)).await;
        assert_eq!(g.granted, 1, "round {round}");
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.unwrap();
    }
}

/// A key holding another type fails alone; the rest of the batch proceeds.
#[tokio::test]
async fn wrongtype_fails_one_key_only() {
    let server = Server::start();
    let s = server.store().await;
    let mut raw = server.raw().await;
    let _: () = redis::cmd("LPUSH")
        .arg("bad")
        .arg("x")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("badhash")
        .arg("f")
        .arg("v")
        .query_async(&mut raw)
        .await
        .unwrap();
    let (a, b) = (StoreKey::from_raw("a"), StoreKey::from_raw("b"));
    let bad = StoreKey::from_raw("bad");
    let fixed = Limits::fixed_window(5, Duration::from_secs(10)).unwrap();
    let sliding = Limits::sliding_window(5, Duration::from_secs(10)).unwrap();
    let batch = vec![
        claim(&a, tb(5, 5, 500), 0, 0, 2, 0),
        claim(&bad, tb(5, 5, 500), 0, 0, 2, 0),
        claim(&StoreKey::from_raw("badhash"), fixed, 0, 0, 2, 0),
        claim(&bad, sliding, 0, 0, 2, 0),
        claim(&b, fixed, 0, 0, 2, 0),
    ];
    let out: Vec<ClaimOutcome> = s.claim(9, &batch).await.unwrap();
    assert_eq!(out[0].as_ref().unwrap().granted, 2);
    assert!(matches!(out[1], Err(KeyError::WrongType(_))), "{:?}", out[1]);
    assert!(matches!(out[2], Err(KeyError::WrongType(_))), "{:?}", out[2]);
    assert!(matches!(out[3], Err(KeyError::WrongType(_))), "{:?}", out[3]);
    assert_eq!(out[4].as_ref().unwrap().granted, 2);
}

/// Every key the scripts write has a TTL, under random traffic with real Redis time.
#[tokio::test]
async fn every_key_has_a_ttl() {
    let server = Server::start();
    let s = server.store().await;
    let enc = KeyEncoder::new("ttl:").unwrap();
    let policies = [
        tb(20, 200, 50),
        Limits::fixed_window(20, Duration::from_millis(50)).unwrap(),
        Limits::sliding_window(20, Duration::from_millis(50)).unwrap(),
    ];
    let mut rng = Lcg(3);
    for round in 0..40 {
        let batch: Vec<Claim> = (0..30)
            .map(|i| {
                let l = policies[i % 3];
                claim(
                    &enc.encode(&format!("n{}", i % 3), format!("k{}", rng.next(60)).as_bytes()),
                    l,
                    rng.next(3),
                    rng.next(3),
                    rng.next(8),
                    0,
                )
            })
            .collect();
        // A key may appear twice in a batch: allowed, applied in order.
        let out = s.claim(rng.next(3), &batch).await.unwrap();
        assert!(out.iter().all(Result::is_ok), "round {round}");
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let reg = enc.registry_key();
    s.heartbeat(&reg, 1, Duration::from_millis(500)).await.unwrap();
    assert!(assert_all_keys_have_ttl(&server).await > 10);
}

#[tokio::test]
async fn heartbeat_counts_live_nodes() {
    let server = Server::start();
    let s = server.store().await;
    let reg = KeyEncoder::default().registry_key();
    assert_eq!(
        s.heartbeat(&reg, 1, Duration::from_millis(300))
            .await
            .unwrap()
            .live_nodes,
        1
    );
    assert_eq!(
        s.heartbeat(&reg, 2, Duration::from_millis(300))
            .await
            .unwrap()
            .live_nodes,
        2
    );
    assert_eq!(
        s.heartbeat(&reg, 3, Duration::from_millis(50))
            .await
            .unwrap()
            .live_nodes,
        3
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        s.heartbeat(&reg, 1, Duration::from_millis(300))
            .await
            .unwrap()
            .live_nodes,
        2
    );
    s.leave(&reg, 2).await.unwrap();
    let beat = s.heartbeat(&reg, 1, Duration::from_millis(300)).await.unwrap();
    assert_eq!(beat.live_nodes, 1);
    // The server identity is stable while the server runs (a hash of its run_id).
    let again = s.heartbeat(&reg, 1, Duration::from_millis(300)).await.unwrap();
    assert_ne!(beat.server, 0);
    assert_eq!(again.server, beat.server);
    let mut raw = server.raw().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(reg.as_bytes())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 301, "{ttl}");
}

#[tokio::test]
async fn errors_are_classified() {
    // Nothing listens on this port: a transient error, not a panic.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = RedisConfig::new(format!("redis://127.0.0.1:{port}/"))
        .connect_timeout(Duration::from_millis(200))
        .reconnect_retries(0);
    let err = RedisStore::connect(config.clone()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    let lazy = RedisStore::connect_lazy(config).unwrap();
    let err = lazy
        .claim(1, &[claim(&StoreKey::from_raw("k"), tb(1, 1, 100), 0, 0, 1, 0)])
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");

    let bad_url = RedisStore::connect(RedisConfig::new("http://127.0.0.1/"))
        .await
        .unwrap_err();
    assert_eq!(bad_url.class(), ErrorClass::Config, "{bad_url}");

    // A server with a password, no password given: NOAUTH is a configuration error.
    let server = Server::start_with(&["--requirepass", "s3cret"]);
    let store = RedisStore::connect_lazy(RedisConfig::new(server.url()).reconnect_retries(0)).unwrap();
    let err = store
        .claim(1, &[claim(&StoreKey::from_raw("k"), tb(1, 1, 100), 0, 0, 1, 0)])
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Config, "{err}");
    let wrong = format!("redis://:nope@127.0.0.1:{}/", server.0.port);
    let err = RedisStore::connect(RedisConfig::new(wrong).reconnect_retries(0))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Config, "{err}");
}

/// Redis server CPU per key per sync, from `INFO commandstats` (run with `--ignored
/// --nocapture`). Steady state: 100 keys per call, 8 nodes taking turns, every key synced
/// by every node, as a sync task would.
#[tokio::test]
#[ignore]
async fn redis_cpu_per_key_per_sync() {
    let server = Server::start();
    let s = Arc::new(server.store().await);
    let mut raw = server.raw().await;
    let enc = KeyEncoder::default();
    const KEYS: usize = 100;
    const CALLS: usize = 2000;
    for (name, limits) in [
        ("token_bucket", tb(1000, 10_000, 300)),
        (
            "fixed_window",
            Limits::fixed_window(1_000_000, Duration::from_secs(60)).unwrap(),
        ),
        (
            "sliding_window",
            Limits::sliding_window(1_000_000, Duration::from_secs(60)).unwrap(),
        ),
    ] {
        let keys: Vec<StoreKey> = (0..KEYS)
            .map(|i| enc.encode(name, format!("user-{i}").as_bytes()))
            .collect();
        let mut held = vec![vec![(0u64, 0u64); KEYS]; 8];
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut raw)
            .await
            .unwrap();
        let started = Instant::now();
        for call in 0..CALLS {
            let node = call % 8;
            let batch: Vec<Claim> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let (h, w) = held[node][i];
                    claim(k, limits, h / 2, h / 4, 10, w)
                })
                .collect();
            let out = s.claim(node as u64, &batch).await.unwrap();
            for (i, (o, c)) in out.iter().zip(&batch).enumerate() {
                let g = o.as_ref().unwrap();
                held[node][i] = (c.kept - g.revoked + g.granted, g.window);
            }
        }
        let wall = started.elapsed();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut raw)
            .await
            .unwrap();
        let line = info
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .expect("evalsha stats");
        let usec_per_call: f64 = line
            .split(',')
            .find_map(|f| f.strip_prefix("usec_per_call="))
            .and_then(|v| v.parse().ok())
            .expect("usec_per_call");
        println!(
            "store {name}: redis_us_per_key_sync={:.2} ({usec_per_call:.1} us per call of {KEYS} keys; {CALLS} calls in {:.2} s wall)",
            usec_per_call / KEYS as f64,
            wall.as_secs_f64()
        );
    }
}

/// Redis `INFO commandstats`: microseconds per `EVALSHA` call since the last `CONFIG RESETSTAT`.
async fn evalsha_usec_per_call(raw: &mut ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await.unwrap();
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .expect("evalsha in commandstats");
    line.split([':', ','])
        .find_map(|kv| kv.strip_prefix("usec_per_call="))
        .and_then(|v| v.trim().parse().ok())
        .expect("usec_per_call")
}

async fn strlen(raw: &mut ConnectionManager, key: &StoreKey) -> usize {
    redis::cmd("STRLEN").arg(key.as_bytes()).query_async(raw).await.unwrap()
}

/// Node ids are random per process, so every restart or deploy brings new ones. 20,000 nodes
/// join a key (claim 2 tokens) and leave (return them) while one node holds most of the bucket
/// for a long time (a day to refill): the state keeps only the records that count, and the
/// script's cost per claim does not grow with the nodes that left.
#[tokio::test]
async fn departed_nodes_leave_a_state_bounded_by_live_records() {
    let server = Server::start();
    let s = server.store().await;
    let mut raw = server.raw().await;
    let key = KeyEncoder::default().encode("departed", b"k");
    let limits = Limits::token_bucket(10_000, 10_000, Duration::from_secs(24 * 3600), Duration::from_secs(1)).unwrap();
    let t = ManualTime::new(T0);
    with_time(&s, &t, Duration::ZERO).await;
    assert_eq!(one(&s, 0, claim(&key, limits, 0, 0, 9_990, 0)).await.granted, 9_990);
    let live = strlen(&mut raw, &key).await;
    assert_eq!(live, 41 + 32, "a header and one record");
    let mut per_call = Vec::new();
    let started = Instant::now();
    for node in 1..=20_000u64 {
        if node % 5_000 == 1 {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        if node % 250 == 0 {
            // The long-lived node syncs every 500 ms: its holding keeps counting.
            assert_eq!(one(&s, 0, claim(&key, limits, 9_990, 0, 0, 0)).await.revoked, 0);
        }
        assert_eq!(one(&s, node, claim(&key, limits, 0, 0, 2, 0)).await.granted, 2);
        with_time(&s, &t, Duration::from_millis(1)).await;
        let g = one(&s, node, claim(&key, limits, 0, 2, 0, 0)).await;
        assert_eq!(g.remaining, 10);
        with_time(&s, &t, Duration::from_millis(1)).await;
        if node % 100 == 0 {
            assert_eq!(strlen(&mut raw, &key).await, live, "after {node} nodes left");
        }
        if node % 5_000 == 0 {
            per_call.push(evalsha_usec_per_call(&mut raw).await);
        }
        assert!(started.elapsed() < Duration::from_secs(300), "bounded in time");
    }
    // Server time per claim, per 5,000 nodes: with every departed record kept, the last
    // quarter cost several times the first (the script scans the whole state).
    println!("us per claim (server) per 5,000 departed nodes: {per_call:?}");
    let (first, last) = (per_call[0], per_call[3]);
    assert!(
        last <= 3.0 * first + 20.0,
        "us per claim grew with departed nodes: {per_call:?}"
    );
}

/// A value of the right length whose numbers the arithmetic cannot take (NaN, infinite,
/// fractional, negative, 2^53 or more), or a value of an older layout, answers `Corrupt` for
/// its key alone: nothing is written to it, and the other keys of the batch proceed.
#[tokio::test]
async fn a_corrupt_value_fails_its_key_alone() {
    let server = Server::start();
    let s = server.store().await;
    let mut raw = server.raw().await;
    let t = ManualTime::new(T0);
    with_time(&s, &t, Duration::ZERO).await;
    let node: NodeId = 7;
    let tb = tb(100, 100, 1000);
    let sw = Limits::sliding_window(100, Duration::from_secs(60)).unwrap();
    let fw = Limits::fixed_window(100, Duration::from_secs(60)).unwrap();
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    let ep = (T0 / 1000 / 1000) as f64;
    let doubles = |vs: &[f64]| vs.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    // The token bucket: a version byte, x, ep, prev, e, cur; records of nep, amt, seq, node id.
    // (Given here as e, cur, prev, ep, x.)
    let header = |[e, cur, prev, ep, x]: [f64; 5]| [vec![2u8], doubles(&[x, ep, prev, e, cur])].concat();
    let record = |id: NodeId, vs: [f64; 3]| [doubles(&vs), id.to_le_bytes().to_vec()].concat();
    let good = [0.0, 5.0, 0.0, ep, 1e12];
    let sliding = |w: f64| [w.to_le_bytes().to_vec(), vec![0; 8]].concat();
    let cases: Vec<(&str, Limits, Vec<u8>)> = vec![
        (
            "tb: the review's all-NaN 64 bytes (older layout)",
            tb,
            [doubles(&[nan; 6]), vec![0; 8], doubles(&[nan])].concat(),
        ),
        ("tb: 64 zero bytes (older layout)", tb, vec![0; 64]),
        ("tb: 136 bytes (older layout, 3 records)", tb, vec![0; 136]),
        ("tb: 63 bytes", tb, vec![0; 63]),
        ("tb: header all NaN", tb, header([nan; 5])),
        ("tb: cur and prev -1e15", tb, header([0.0, -1e15, -1e15, ep, 0.0])),
        ("tb: e fractional", tb, header([0.5, 0.0, 0.0, ep, 0.0])),
        ("tb: e -inf", tb, header([-inf, 0.0, 0.0, ep, 0.0])),
        ("tb: x infinite", tb, header([0.0, 0.0, 0.0, ep, inf])),
        ("tb: cur 2^53", tb, header([0.0, 9007199254740992.0, 0.0, ep, 0.0])),
        ("tb: lease end beyond 2^52 ms", tb, header([0.0, 0.0, 0.0, 4.6e12, 0.0])),
        ("tb: version 1", tb, [vec![1u8], header(good)[1..].to_vec()].concat()),
        (
            "tb: own record NaN amount",
            tb,
            [header(good), record(node, [ep, nan, 1.0])].concat(),
        ),
        (
            "tb: own record negative seq",
            tb,
            [header(good), record(node, [ep, 5.0, -1.0])].concat(),
        ),
        (
            "tb: own record fractional epoch",
            tb,
            [header(good), record(node, [ep - 0.5, 5.0, 1.0])].concat(),
        ),
        // Another node's record is read when the epoch moves: the header's epoch is old.
        (
            "tb: other record NaN (epoch moves)",
            tb,
            [
                header([0.0, 5.0, 0.0, ep - 5.0, 1e12]),
                record(99, [ep - 5.0, nan, 1.0]),
            ]
            .concat(),
        ),
        ("sw: window 1e300", sw, sliding(1e300)),
        ("sw: window inf", sw, sliding(inf)),
        ("sw: window NaN", sw, sliding(nan)),
        ("sw: window -1", sw, sliding(-1.0)),
        ("sw: window 0.5", sw, sliding(0.5)),
        ("sw: 15 bytes", sw, vec![0; 15]),
        ("fw: '-5'", fw, b"-5".to_vec()),
        ("fw: '1e15'", fw, b"1e15".to_vec()),
        ("fw: '0x10'", fw, b"0x10".to_vec()),
        ("fw: 'nan'", fw, b"nan".to_vec()),
        ("fw: 'inf'", fw, b"inf".to_vec()),
        ("fw: ' 5'", fw, b" 5".to_vec()),
        ("fw: '5.0'", fw, b"5.0".to_vec()),
        ("fw: 2^52", fw, b"4503599627370496".to_vec()),
        ("fw: 17 digits", fw, b"10000000000000000".to_vec()),
    ];
    let enc = KeyEncoder::default();
    for (i, (name, limits, value)) in cases.into_iter().enumerate() {
        let key = enc.encode("corrupt", format!("k{i}").as_bytes());
        let (before, after) = (
            enc.encode("corrupt", format!("before{i}").as_bytes()),
            enc.encode("corrupt", format!("after{i}").as_bytes()),
        );
        let _: () = redis::cmd("SET")
            .arg(key.as_bytes())
            .arg(&value)
            .query_async(&mut raw)
            .await
            .unwrap();
        let batch = [
            claim(&before, limits, 0, 0, 3, 0),
            claim(&key, limits, 0, 0, 3, 0),
            claim(&after, limits, 0, 0, 4, 0),
        ];
        let out = s
            .claim(node, &batch)
            .await
            .unwrap_or_else(|e| panic!("{name}: the batch failed: {e}"));
        assert_eq!(out[1], Err(KeyError::Corrupt), "{name}");
        assert_eq!(out[0].as_ref().map(|g| g.granted), Ok(3), "{name}");
        assert_eq!(out[2].as_ref().map(|g| g.granted), Ok(4), "{name}");
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(key.as_bytes())
            .query_async(&mut raw)
            .await
            .unwrap();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key.as_bytes())
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!((stored, pttl), (value, -1), "{name}: nothing is written");
    }
}

/// A claim not newer than the last one applied from its node (a resend, or a timed-out call
/// that runs late) answers `stale` and writes nothing: not the value, not the TTL.
#[tokio::test]
async fn a_stale_claim_writes_nothing() {
    let server = Server::start();
    let s = server.store().await;
    let mut raw = server.raw().await;
    let t = ManualTime::new(T0);
    with_time(&s, &t, Duration::ZERO).await;
    let key = KeyEncoder::default().encode("stale", b"k");
    let l = tb(100, 10, 300);
    assert_eq!(
        one(&s, 1, claims::claim_seq(&key, l, 0, 0, 60, 0, 10)).await.granted,
        60
    );
    assert_eq!(one(&s, 2, claims::claim_seq(&key, l, 0, 0, 10, 0, 1)).await.granted, 10);
    let get = |raw: &mut ConnectionManager| {
        let mut raw = raw.clone();
        let key = key.clone();
        async move {
            let v: Vec<u8> = redis::cmd("GET")
                .arg(key.as_bytes())
                .query_async(&mut raw)
                .await
                .unwrap();
            let pttl: i64 = redis::cmd("PTTL")
                .arg(key.as_bytes())
                .query_async(&mut raw)
                .await
                .unwrap();
            (v, pttl)
        }
    };
    let (value, pttl) = get(&mut raw).await;
    // Later, in the next lease epochs (a stale claim must not roll them either).
    for d in [1, 400] {
        with_time(&s, &t, Duration::from_millis(d)).await;
        for seq in [10, 9, 1, 0] {
            for (kept, returned, wanted) in [(0, 60, 0), (60, 0, 100), (0, 0, 100)] {
                let g = one(&s, 1, claims::claim_seq(&key, l, kept, returned, wanted, 0, seq)).await;
                assert_eq!(
                    g,
                    Grant {
                        stale: true,
                        ..Grant::default()
                    }
                );
            }
        }
        let (v, p) = get(&mut raw).await;
        assert_eq!(v, value);
        assert!(p <= pttl && p > pttl - 5_000, "{p} after {pttl}");
    }
    // A newer claim applies: node 1 keeps its 60.
    let g = one(&s, 1, claims::claim_seq(&key, l, 60, 0, 0, 0, 11)).await;
    assert!(!g.stale && !g.state_lost && g.revoked == 0, "{g:?}");
}
