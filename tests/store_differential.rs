//! `MemoryStore` and `RedisStore` (a real `redis-server` on a loopback port) given the same
//! seeded random claims at the same times must give the same replies and keep states of the
//! same size: the Lua scripts and the in-process store are the same arithmetic, step for step.
//!
//! Needs `redis-server` on the PATH. Bounded in steps and in time.

use std::time::{Duration, Instant};

use claims::claim_seq;
use redis::aio::ConnectionManager;
use tollgate::store::{
    Claim, ClaimOutcome, KeyEncoder, Limits, ManualTime, MemoryStore, NodeId, RedisConfig, RedisStore, Store,
    StoreAlgorithm, StoreKey,
};

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/claims.rs"]
mod claims;

/// A small deterministic generator (same sequence every run for a seed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next(n) == 0
    }
}

/// A node of the simulation: what it believes it holds per key (and in which window), its
/// sync numbers, its recent batches (to send again) and its batches that timed out (to
/// deliver late).
struct SimNode {
    id: NodeId,
    seq: u64,
    held: Vec<(u64, u64)>,
    sent: Vec<Vec<Claim>>,
    late: Vec<Vec<Claim>>,
}

impl SimNode {
    fn new(id: NodeId, keys: usize) -> Self {
        SimNode {
            id,
            seq: 0,
            held: vec![(0, 0); keys],
            sent: Vec::new(),
            late: Vec::new(),
        }
    }
}

fn tb(cap: u64, per_sec: u64, lease_ms: u64) -> Limits {
    Limits::token_bucket(cap, per_sec, Duration::from_secs(1), Duration::from_millis(lease_ms)).unwrap()
}

/// What one run covered, to check that every path was taken.
#[derive(Default, Debug)]
struct Seen {
    replies: usize,
    stale: usize,
    state_lost: usize,
    revoked: usize,
    bucket_shrunk: usize,
    most_records: usize,
    joined: usize,
    left: usize,
}

const STEPS: usize = 1_500;
/// Keys this close to their expiry (ms, on the explicit clock) may be gone from Redis already.
const NEAR_EXPIRY_MS: u64 = 40;
const BUDGET: Duration = Duration::from_secs(120);

#[tokio::test]
async fn memory_and_redis_agree_on_replies_and_state_sizes() {
    let server = redis_server::RedisServer::start();
    let redis = RedisStore::connect(RedisConfig::new(server.url())).await.unwrap();
    let mut raw = ConnectionManager::new(redis::Client::open(server.url()).unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let mut total = Seen::default();
    for seed in [1u64, 2, 3] {
        let seen = run(seed, &redis, &mut raw, started).await;
        println!("seed {seed}: {seen:?}");
        total.replies += seen.replies;
        total.stale += seen.stale;
        total.state_lost += seen.state_lost;
        total.revoked += seen.revoked;
        total.bucket_shrunk += seen.bucket_shrunk;
        total.most_records = total.most_records.max(seen.most_records);
        total.joined += seen.joined;
        total.left += seen.left;
    }
    assert!(total.replies > 10_000, "{total:?}");
    assert!(total.stale > 300, "{total:?}");
    assert!(total.state_lost > 20 && total.revoked > 20, "{total:?}");
    assert!(total.bucket_shrunk > 100, "{total:?}");
    assert!(total.most_records >= 4, "{total:?}");
    assert!(total.joined > 50 && total.left > 50, "{total:?}");
}

async fn run(seed: u64, redis: &RedisStore, raw: &mut ConnectionManager, started: Instant) -> Seen {
    let t0 = 1_700_000_000_000_000 + seed * 3_600_000_000;
    let clock = ManualTime::new(t0);
    let memory = MemoryStore::with_time_source(clock.source());
    let enc = KeyEncoder::new(&format!("diff{seed}:")).unwrap();
    let policies = [
        tb(8, 20, 100),
        tb(30, 1000, 50),
        tb(5, 1, 1000),
        Limits::fixed_window(20, Duration::from_millis(400)).unwrap(),
        Limits::fixed_window(6, Duration::from_millis(150)).unwrap(),
        Limits::sliding_window(20, Duration::from_millis(200)).unwrap(),
        Limits::sliding_window(7, Duration::from_millis(60)).unwrap(),
    ];
    let keys: Vec<(StoreKey, Limits)> = (0..policies.len() * 2)
        .map(|i| {
            let p = i % policies.len();
            (enc.encode(&format!("p{p}"), format!("id{i}").as_bytes()), policies[p])
        })
        .collect();
    let mut rng = Lcg(seed);
    // Node ids: counters, and some whose bytes also occur inside the stored numbers.
    let mut next_id = seed << 32;
    let mut specials: Vec<NodeId> = (1..=6).map(|n| f64::to_bits(n as f64)).collect();
    let mut nodes: Vec<SimNode> = (0..3).map(|i| SimNode::new(next_id + i, keys.len())).collect();
    next_id += 3;
    let mut seen = Seen::default();
    let mut last_sizes = vec![0usize; keys.len()];
    let mut last_real = Instant::now();
    for step in 0..STEPS {
        assert!(started.elapsed() < BUDGET, "bounded in time (seed {seed}, step {step})");
        // Time moves at least as fast as real time between steps, so that a key Redis expires
        // (on its own clock) has expired in the MemoryStore too.
        let real_us = last_real.elapsed().as_micros() as u64;
        last_real = Instant::now();
        let advance_ms = match rng.next(20) {
            0..=11 => rng.next(25),
            12..=17 => rng.next(400),
            18 => rng.next(2_500),
            _ => rng.next(20_000),
        };
        let advance_us = (advance_ms * 1000 + rng.next(1000)).max(real_us + 2_000);
        clock.set_us(clock.now_us() + advance_us);
        // Redis expires keys on its own clock, which a stalled test process cannot hold back:
        // a key within `NEAR_EXPIRY_MS` of its expiry is expired in both stores before a claim.
        for _ in 0..keys.len() {
            let near = keys
                .iter()
                .filter_map(|(k, _)| memory.pttl(k))
                .filter(|&p| p <= NEAR_EXPIRY_MS)
                .max();
            match near {
                Some(p) => clock.set_us(clock.now_us() + (p + 1) * 1000),
                None => break,
            }
        }
        redis.set_time_override_us(Some(clock.now_us()));
        // A key the MemoryStore has expired is gone from Redis too (by the same clock).
        let mut pipe = redis::pipe();
        let mut any = false;
        for (key, _) in &keys {
            if memory.state_len(key).is_none() {
                pipe.cmd("DEL").arg(key.as_bytes()).ignore();
                any = true;
            }
        }
        if any {
            let _: () = pipe.query_async(raw).await.unwrap();
        }
        // Nodes join and leave.
        if nodes.len() < 6 && rng.one_in(12) {
            let id = if rng.one_in(4) && !specials.is_empty() {
                specials.pop().unwrap()
            } else {
                next_id += 1;
                next_id
            };
            nodes.push(SimNode::new(id, keys.len()));
            seen.joined += 1;
        }
        let n = rng.next(nodes.len() as u64) as usize;
        let leaving = nodes.len() > 2 && rng.one_in(14);
        let action = rng.next(100);
        let node = &mut nodes[n];
        let batch: Vec<Claim> = if !leaving && action < 8 && !node.sent.is_empty() {
            // A batch sent before, again: every claim in it is stale.
            let i = rng.next(node.sent.len() as u64) as usize;
            node.sent[i].clone()
        } else if !leaving && action < 14 && !node.late.is_empty() {
            // A batch that timed out reaches the store now, after newer ones perhaps.
            let i = rng.next(node.late.len() as u64) as usize;
            node.late.remove(i)
        } else {
            // A new sync; now and then its number repeats the last one's, or skips some.
            if !rng.one_in(15) {
                node.seq += 1 + if rng.one_in(10) { rng.next(5) } else { 0 };
            }
            let mut batch = Vec::new();
            for (i, (key, limits)) in keys.iter().enumerate() {
                if !leaving && rng.one_in(3) {
                    continue;
                }
                let (h, w) = node.held[i];
                let left = h - rng.next(h + 1);
                let returned = if leaving {
                    left
                } else if rng.one_in(3) {
                    rng.next(left + 1)
                } else {
                    0
                };
                // Now and then a node keeps or returns more than it has, or names another window.
                let extra = if rng.one_in(20) { rng.next(6) } else { 0 };
                let window = if rng.one_in(30) { w + 1 } else { w };
                let wanted = if leaving { 0 } else { rng.next(12) };
                batch.push(claim_seq(
                    key,
                    *limits,
                    left - returned + extra,
                    returned,
                    wanted,
                    window,
                    node.seq,
                ));
                if rng.one_in(25) {
                    // The same key again in the batch (same sync number: stale for a bucket).
                    batch.push(claim_seq(key, *limits, 0, 0, rng.next(3), window, node.seq));
                }
            }
            if !leaving && action >= 92 {
                // Timed out: the node assumes nothing was granted and its returns are gone.
                for c in &batch {
                    let i = keys.iter().position(|(k, _)| *k == c.key).unwrap();
                    node.held[i].0 = c.kept.min(node.held[i].0);
                }
                node.late.push(batch);
                continue;
            }
            node.sent.push(batch.clone());
            if node.sent.len() > 4 {
                node.sent.remove(0);
            }
            batch
        };
        let a = memory.claim(node.id, &batch).await.unwrap();
        let b = redis.claim(node.id, &batch).await.unwrap();
        assert_eq!(
            a, b,
            "seed {seed} step {step}: the stores disagree for node {} and {batch:?}",
            node.id
        );
        account(&mut seen, node, &keys, &batch, &a);
        if leaving {
            nodes.remove(n);
            seen.left += 1;
        }
        // Every state has the same size in both stores.
        let mut pipe = redis::pipe();
        for (key, _) in &keys {
            pipe.cmd("STRLEN").arg(key.as_bytes());
        }
        let sizes: Vec<usize> = pipe.query_async(raw).await.unwrap();
        for (i, ((key, limits), size)) in keys.iter().zip(&sizes).enumerate() {
            if *size == 0 && memory.pttl(key).is_some_and(|p| p <= NEAR_EXPIRY_MS) {
                // Written to expire within moments: Redis may have expired it already (on its
                // own clock); the next step expires it in the MemoryStore too.
                continue;
            }
            assert_eq!(
                memory.state_len(key).unwrap_or(0),
                *size,
                "seed {seed} step {step}: state sizes differ for {limits:?}"
            );
            if limits.algorithm() == StoreAlgorithm::TokenBucket {
                seen.bucket_shrunk += usize::from(*size > 0 && *size < last_sizes[i]);
                seen.most_records = seen.most_records.max(size.saturating_sub(41) / 32);
            }
            last_sizes[i] = *size;
        }
    }
    seen
}

/// Updates what the node believes it holds from the replies (a stale reply changes nothing).
fn account(seen: &mut Seen, node: &mut SimNode, keys: &[(StoreKey, Limits)], batch: &[Claim], out: &[ClaimOutcome]) {
    for (c, o) in batch.iter().zip(out) {
        let g = o.as_ref().expect("no key fails");
        seen.replies += 1;
        seen.stale += usize::from(g.stale);
        seen.state_lost += usize::from(g.state_lost);
        seen.revoked += usize::from(g.revoked > 0);
        if g.stale || c.seq < node.seq {
            continue;
        }
        let i = keys.iter().position(|(k, _)| *k == c.key).unwrap();
        node.held[i] = (c.kept - g.revoked.min(c.kept) + g.granted, g.window);
    }
}
