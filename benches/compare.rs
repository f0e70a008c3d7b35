//! tollgate against governor 0.10 on the same quotas, in the same process.
//!
//! Prints one line per scenario:
//! `compare <scenario> tollgate_ns=<median> governor_ns=<median> ratio=<tollgate/governor>`.
//! Each scenario alternates the two limiters over several rounds and reports medians, so that
//! noise from the machine hits both alike. Also prints the floor (a bare papaya lookup plus one
//! CAS) and the clocks, measured in the same run.
//! The `metrics_*` lines compare the same check with and without decision counting (feature
//! `metrics`): `metrics_on_ns`, `metrics_off_ns` and their ratio.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::Instant;

use governor::{Quota, RateLimiter};
use tollgate::{Clock, DirectLimiter, Limiter, Policy};

const ROUNDS: usize = 7;
const RATE: u32 = 1_000_000_000;

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(RATE).unwrap())
}

fn policy() -> Policy {
    Policy::per_second(RATE as u64)
}

/// A fixed pseudo-random visiting order over `n` keys (splitmix64).
fn order(n: u64, len: usize, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % n
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per call of `f(i)` over `iters` calls.
fn time(iters: usize, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    for i in 0..iters {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// Median ns per call of `a` and of `b`, alternated over `ROUNDS` rounds after a warm-up.
fn medians(iters: usize, mut a: impl FnMut(usize), mut b: impl FnMut(usize)) -> (f64, f64) {
    time(iters / 4, &mut a);
    time(iters / 4, &mut b);
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ta.push(time(iters, &mut a));
        tb.push(time(iters, &mut b));
    }
    (median(ta), median(tb))
}

fn pair(name: &str, iters: usize, ours: impl FnMut(usize), theirs: impl FnMut(usize)) -> (f64, f64) {
    let (a, b) = medians(iters, ours, theirs);
    println!(
        "compare {name} tollgate_ns={a:.1} governor_ns={b:.1} ratio={:.2}",
        a / b
    );
    (a, b)
}

fn keyed_u64(name: &str, keys: u64, iters: usize) {
    let seq = order(keys, 1 << 20, 7);
    let ours: Limiter<u64> = Limiter::builder(policy())
        .max_keys(keys as usize + 1)
        .metrics(false)
        .build()
        .unwrap();
    let theirs = RateLimiter::keyed(quota());
    for k in 0..keys {
        ours.check(&k);
        let _ = theirs.check_key(&k);
    }
    let mask = seq.len() - 1;
    pair(
        name,
        iters,
        |i| {
            black_box(ours.check(&seq[i & mask]).is_allowed());
        },
        |i| {
            black_box(theirs.check_key(&seq[i & mask]).is_ok());
        },
    );
}

fn keyed_string_10k(iters: usize) {
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i:08}")).collect();
    let seq = order(10_000, 1 << 16, 11);
    let ours: Limiter<String> = Limiter::builder(policy()).metrics(false).build().unwrap();
    let theirs = RateLimiter::keyed(quota());
    for k in &keys {
        ours.check(k.as_str());
        let _ = theirs.check_key(k);
    }
    let mask = seq.len() - 1;
    pair(
        "keyed_string_10k",
        iters,
        |i| {
            black_box(ours.check(keys[seq[i & mask] as usize].as_str()).is_allowed());
        },
        |i| {
            black_box(theirs.check_key(&keys[seq[i & mask] as usize]).is_ok());
        },
    );
}

fn direct(iters: usize) {
    let ours = DirectLimiter::new(policy()).unwrap();
    let theirs = RateLimiter::direct(quota());
    pair(
        "direct",
        iters,
        |_| {
            black_box(ours.check().is_allowed());
        },
        |_| {
            black_box(theirs.check().is_ok());
        },
    );
}

/// Total checks per second of `threads` threads, each running `iters` checks.
fn throughput(threads: usize, iters: usize, f: &(dyn Fn(usize, usize) + Sync)) -> f64 {
    let barrier = Barrier::new(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    f(t, i);
                }
            });
        }
    });
    (threads * iters) as f64 / start.elapsed().as_secs_f64()
}

fn scaling_2t(iters: usize) {
    let seq = order(10_000, 1 << 16, 13);
    let mask = seq.len() - 1;
    let ours: Limiter<u64> = Limiter::builder(policy()).metrics(false).build().unwrap();
    let theirs = RateLimiter::keyed(quota());
    for k in 0..10_000u64 {
        ours.check(&k);
        let _ = theirs.check_key(&k);
    }
    // Both threads visit the same 10k keys, from different points of the same order.
    let ours_f = |t: usize, i: usize| {
        black_box(ours.check(&seq[(i + t * 32_768) & mask]).is_allowed());
    };
    let theirs_f = |t: usize, i: usize| {
        black_box(theirs.check_key(&seq[(i + t * 32_768) & mask]).is_ok());
    };
    let (mut o1, mut o2, mut g1, mut g2) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        o1.push(throughput(1, iters, &ours_f));
        o2.push(throughput(2, iters, &ours_f));
        g1.push(throughput(1, iters, &theirs_f));
        g2.push(throughput(2, iters, &theirs_f));
    }
    let (o1, o2, g1, g2) = (median(o1), median(o2), median(g1), median(g2));
    println!(
        "compare scaling_2t_keyed_u64_10k tollgate_scaling={:.2} governor_scaling={:.2} tollgate_2t_checks_per_s={:.1}M governor_2t_checks_per_s={:.1}M",
        o2 / o1,
        g2 / g1,
        o2 / 1e6,
        g2 / 1e6
    );
}

fn floor(iters: usize) {
    // Built as the limiter builds its table.
    let map: papaya::HashMap<u64, AtomicU64, ahash::RandomState> = papaya::HashMap::builder()
        .hasher(ahash::RandomState::new())
        .capacity(10_001)
        .resize_mode(papaya::ResizeMode::Blocking)
        .build();
    for k in 0..10_000u64 {
        map.pin().insert(k, AtomicU64::new(0));
    }
    let seq = order(10_000, 1 << 20, 7);
    let mask = seq.len() - 1;
    let mut v = Vec::new();
    for _ in 0..ROUNDS {
        v.push(time(iters, |i| {
            let g = map.guard();
            let cell = map.get(&seq[i & mask], &g).unwrap();
            let cur = cell.load(Ordering::Relaxed);
            black_box(
                cell.compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok(),
            );
        }));
    }
    let cached = Clock::cached();
    let precise = Clock::precise();
    let c = median(
        (0..ROUNDS)
            .map(|_| {
                time(iters, |_| {
                    black_box(cached.now_ns());
                })
            })
            .collect(),
    );
    let p = median(
        (0..ROUNDS)
            .map(|_| {
                time(iters, |_| {
                    black_box(precise.now_ns());
                })
            })
            .collect(),
    );
    let s = median(
        (0..ROUNDS)
            .map(|_| {
                time(iters, |_| {
                    black_box(Instant::now());
                })
            })
            .collect(),
    );
    println!(
        "compare floor map_get_plus_cas_10k_ns={:.1} clock_cached_ns={c:.1} clock_precise_ns={p:.1} instant_now_ns={s:.1}",
        median(v)
    );
}

/// The cost of counting decisions for the metrics: the same check with and without it.
fn metrics_on_vs_off(name: &str, keys: u64, iters: usize) {
    let seq = order(keys, 1 << 20, 13);
    let on: Limiter<u64> = Limiter::builder(policy()).max_keys(keys as usize + 1).build().unwrap();
    let off: Limiter<u64> = Limiter::builder(policy())
        .max_keys(keys as usize + 1)
        .metrics(false)
        .build()
        .unwrap();
    for k in 0..keys {
        on.check(&k);
        off.check(&k);
    }
    let mask = seq.len() - 1;
    let (a, b) = medians(
        iters,
        |i| {
            black_box(on.check(&seq[i & mask]).is_allowed());
        },
        |i| {
            black_box(off.check(&seq[i & mask]).is_allowed());
        },
    );
    println!(
        "compare {name} metrics_on_ns={a:.1} metrics_off_ns={b:.1} ratio={:.3}",
        a / b
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter may follow.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let n = 2_000_000;
    if run("keyed_u64_hot") {
        keyed_u64("keyed_u64_hot", 1, n);
    }
    if run("keyed_u64_10k") {
        keyed_u64("keyed_u64_10k", 10_000, n);
    }
    if run("keyed_u64_1m") {
        keyed_u64("keyed_u64_1m", 1_000_000, n / 4);
    }
    if run("keyed_string_10k") {
        keyed_string_10k(n);
    }
    if run("direct") {
        direct(n);
    }
    if run("scaling") {
        scaling_2t(n);
    }
    if run("floor") {
        floor(n);
    }
    if run("metrics_hot") {
        metrics_on_vs_off("metrics_hot", 1, n);
    }
    if run("metrics_10k") {
        metrics_on_vs_off("metrics_10k", 10_000, n);
    }
}
