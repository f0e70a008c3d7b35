//! tollgate against governor 0.10 on the same quotas, in the same process, as criterion
//! suites: one group per scenario (`keyed_u64_hot`, `keyed_u64_10k`, `keyed_u64_1m`,
//! `keyed_string_10k`, `direct`), each with the functions `tollgate` and `governor`.
//!
//! The two functions of a scenario are measured in pairs (see `support/paired.rs`): every
//! sample times both limiters over the same iterations back to back, so that noise from the
//! machine hits both alike, and after the group the bench prints one line per scenario:
//! `compare <scenario> tollgate_ns=<median> governor_ns=<median> ratio=<tollgate/governor>`
//! (medians over the samples; the ratio is the median of the samples' ratios). It also
//! measures two threads against one (`scaling_2t_keyed_u64_10k`: both threads over the same
//! keys, each over its own keys, and the same visits as a CAS on a plain array of atomics, which
//! is what the machine allows), the floor (a bare papaya lookup plus one CAS, as the table does,
//! and a CAS on a plain array indexed by the key, which no table beats) and the clocks
//! in the same run. The `metrics_*` groups compare the
//! same check with and without decision counting (feature `metrics`): `metrics_on_ns`,
//! `metrics_off_ns` and their ratio.
//!
//! `cargo bench --bench compare -- <filter>` runs the groups whose names match;
//! criterion's options (`--save-baseline`, `--baseline`, `--warm-up-time`,
//! `--measurement-time`) apply as usual.

#[path = "support/paired.rs"]
mod paired;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use governor::{Quota, RateLimiter};
use paired::{median, pair, single, MIN_KEPT_ITERS};
use tollgate::{Clock, DirectLimiter, Limiter, Policy};

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

/// The scenario's criterion group, its paired measurement and its `compare` line.
fn compare(c: &mut Criterion, name: &str, ours: impl FnMut(usize), theirs: impl FnMut(usize)) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let m = pair(&mut group, "tollgate", "governor", ours, theirs);
    group.finish();
    if let Some(m) = m {
        println!(
            "compare {name} tollgate_ns={:.1} governor_ns={:.1} ratio={:.2}",
            m.a_ns, m.b_ns, m.ratio
        );
    }
}

fn keyed_u64(c: &mut Criterion, name: &str, keys: u64) {
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
    compare(
        c,
        name,
        |i| {
            black_box(ours.check(&seq[i & mask]).is_allowed());
        },
        |i| {
            black_box(theirs.check_key(&seq[i & mask]).is_ok());
        },
    );
}

fn keyed_u64_hot(c: &mut Criterion) {
    keyed_u64(c, "keyed_u64_hot", 1);
}

fn keyed_u64_10k(c: &mut Criterion) {
    keyed_u64(c, "keyed_u64_10k", 10_000);
}

fn keyed_u64_1m(c: &mut Criterion) {
    keyed_u64(c, "keyed_u64_1m", 1_000_000);
}

fn keyed_string_10k(c: &mut Criterion) {
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i:08}")).collect();
    let seq = order(10_000, 1 << 16, 11);
    let ours: Limiter<String> = Limiter::builder(policy()).metrics(false).build().unwrap();
    let theirs = RateLimiter::keyed(quota());
    for k in &keys {
        ours.check(k.as_str());
        let _ = theirs.check_key(k);
    }
    let mask = seq.len() - 1;
    compare(
        c,
        "keyed_string_10k",
        |i| {
            black_box(ours.check(keys[seq[i & mask] as usize].as_str()).is_allowed());
        },
        |i| {
            black_box(theirs.check_key(&keys[seq[i & mask] as usize]).is_ok());
        },
    );
}

fn direct(c: &mut Criterion) {
    let ours = DirectLimiter::new(policy()).unwrap();
    let theirs = RateLimiter::direct(quota());
    compare(
        c,
        "direct",
        |_| {
            black_box(ours.check().is_allowed());
        },
        |_| {
            black_box(theirs.check().is_ok());
        },
    );
}

/// What a check does to its key's state at the least: one CAS on a word. The floor and the
/// plain-array scaling lines run only this.
#[inline(always)]
fn bump(cell: &AtomicU64) {
    let cur = cell.load(Ordering::Relaxed);
    black_box(
        cell.compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok(),
    );
}

/// One check on thread `t` (its `i`-th).
type Check<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Time for `threads` threads to run `iters` checks each, from a common start.
fn threads_time(threads: usize, iters: u64, f: Check<'_>) -> Duration {
    let barrier = Barrier::new(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for i in 0..iters as usize {
                    f(t, i);
                }
            });
        }
    });
    start.elapsed()
}

fn scaling_2t(c: &mut Criterion) {
    let seq = order(10_000, 1 << 16, 13);
    let mask = seq.len() - 1;
    let ours: Limiter<u64> = Limiter::builder(policy()).metrics(false).build().unwrap();
    let theirs = RateLimiter::keyed(quota());
    for k in 0..10_000u64 {
        ours.check(&k);
        let _ = theirs.check_key(&k);
    }
    // Each thread its own 10k keys: a table of 20k.
    let ours_20k: Limiter<u64> = Limiter::builder(policy()).metrics(false).build().unwrap();
    for k in 0..20_000u64 {
        ours_20k.check(&k);
    }
    // What the machine allows: the same visits as a CAS on a plain array of atomics (20k, so
    // that each thread has 10k of its own).
    let array: Vec<AtomicU64> = (0..20_000).map(|_| AtomicU64::new(0)).collect();
    // Both threads visit the same 10k keys, from different points of the same order.
    let ours_f = |t: usize, i: usize| {
        black_box(ours.check(&seq[(i + t * 32_768) & mask]).is_allowed());
    };
    let theirs_f = |t: usize, i: usize| {
        black_box(theirs.check_key(&seq[(i + t * 32_768) & mask]).is_ok());
    };
    let array_f = |t: usize, i: usize| bump(&array[seq[(i + t * 32_768) & mask] as usize]);
    // Each thread its own 10k keys (thread 1 keys 10,000 and up): nothing shared but the table.
    let ours_own = |t: usize, i: usize| {
        black_box(ours_20k.check(&(seq[i & mask] + t as u64 * 10_000)).is_allowed());
    };
    let array_own = |t: usize, i: usize| bump(&array[(seq[i & mask] + t as u64 * 10_000) as usize]);
    // Own keys again, but the two threads' cells side by side (as a hash table places them):
    // every cache line holds both threads' keys.
    let array_own_interleaved = |t: usize, i: usize| bump(&array[(seq[i & mask] * 2 + t as u64) as usize]);
    let mut group = c.benchmark_group("scaling_2t_keyed_u64_10k");
    // Checks per second of each function, all threads together.
    let mut rates: [Vec<f64>; 12] = Default::default();
    let cases: [(&str, usize, Check<'_>); 12] = [
        ("tollgate_1t", 1, &ours_f),
        ("tollgate_2t", 2, &ours_f),
        ("governor_1t", 1, &theirs_f),
        ("governor_2t", 2, &theirs_f),
        ("array_1t", 1, &array_f),
        ("array_2t", 2, &array_f),
        ("tollgate_own_keys_1t", 1, &ours_own),
        ("tollgate_own_keys_2t", 2, &ours_own),
        ("array_own_keys_1t", 1, &array_own),
        ("array_own_keys_2t", 2, &array_own),
        ("array_own_keys_interleaved_1t", 1, &array_own_interleaved),
        ("array_own_keys_interleaved_2t", 2, &array_own_interleaved),
    ];
    for ((name, threads, f), rates) in cases.into_iter().zip(&mut rates) {
        // One iteration: one check on each thread.
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = threads_time(threads, iters, f);
                if iters >= MIN_KEPT_ITERS {
                    rates.push((threads as u64 * iters) as f64 / t.as_secs_f64());
                }
                t
            })
        });
    }
    group.finish();
    if rates.iter().any(Vec::is_empty) {
        return;
    }
    let [o1, o2, g1, g2, a1, a2, oo1, oo2, ao1, ao2, ai1, ai2] = rates.map(median);
    println!(
        "compare scaling_2t_keyed_u64_10k tollgate_scaling={:.2} governor_scaling={:.2} array_scaling={:.2} tollgate_own_keys_scaling={:.2} array_own_keys_scaling={:.2} array_own_keys_interleaved_scaling={:.2} tollgate_2t_checks_per_s={:.1}M governor_2t_checks_per_s={:.1}M",
        o2 / o1,
        g2 / g1,
        a2 / a1,
        oo2 / oo1,
        ao2 / ao1,
        ai2 / ai1,
        o2 / 1e6,
        g2 / 1e6
    );
}

fn floor(c: &mut Criterion) {
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
    let cached = Clock::cached();
    let precise = Clock::precise();
    let mut group = c.benchmark_group("floor");
    group.throughput(Throughput::Elements(1));
    let array: Vec<AtomicU64> = (0..10_000).map(|_| AtomicU64::new(0)).collect();
    let array_ns = single(&mut group, "array_cas_10k", |i| bump(&array[seq[i & mask] as usize]));
    let floor = single(&mut group, "map_get_plus_cas_10k", |i| {
        let g = map.guard();
        let cell = map.get(&seq[i & mask], &g).unwrap();
        bump(cell);
    });
    let c_ns = single(&mut group, "clock_cached", |_| {
        black_box(cached.now_ns());
    });
    let p_ns = single(&mut group, "clock_precise", |_| {
        black_box(precise.now_ns());
    });
    let s_ns = single(&mut group, "instant_now", |_| {
        black_box(Instant::now());
    });
    group.finish();
    if let (Some(floor), Some(a), Some(c), Some(p), Some(s)) = (floor, array_ns, c_ns, p_ns, s_ns) {
        println!(
            "compare floor map_get_plus_cas_10k_ns={floor:.1} array_cas_10k_ns={a:.1} clock_cached_ns={c:.1} clock_precise_ns={p:.1} instant_now_ns={s:.1}"
        );
    }
}

/// The cost of counting decisions for the metrics: the same check with and without it.
fn metrics_on_vs_off(c: &mut Criterion, name: &str, keys: u64) {
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
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let m = pair(
        &mut group,
        "metrics_on",
        "metrics_off",
        |i| {
            black_box(on.check(&seq[i & mask]).is_allowed());
        },
        |i| {
            black_box(off.check(&seq[i & mask]).is_allowed());
        },
    );
    group.finish();
    if let Some(m) = m {
        println!(
            "compare {name} metrics_on_ns={:.1} metrics_off_ns={:.1} ratio={:.3}",
            m.a_ns, m.b_ns, m.ratio
        );
    }
}

fn metrics_hot(c: &mut Criterion) {
    metrics_on_vs_off(c, "metrics_hot", 1);
}

fn metrics_10k(c: &mut Criterion) {
    metrics_on_vs_off(c, "metrics_10k", 10_000);
}

criterion_group!(
    benches,
    keyed_u64_hot,
    keyed_u64_10k,
    keyed_u64_1m,
    keyed_string_10k,
    direct,
    scaling_2t,
    floor,
    metrics_hot,
    metrics_10k
);
criterion_main!(benches);
