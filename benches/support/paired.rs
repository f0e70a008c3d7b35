//! Paired measurements inside criterion's custom timing (`iter_custom`).
//!
//! Two routines `a` and `b` are benchmarked as two criterion functions of one group. In every
//! sample of either function both routines run the same number of iterations back to back
//! (which one goes first alternates from sample to sample), so that the machine's drift and
//! its noisy neighbours hit both alike; each function reports its own routine's time to
//! criterion (its statistics, HTML report and baselines are of that routine alone), and every
//! pair of timings is kept for the same-run ratio `a / b`: the median over the samples of
//! both functions.
//!
//! With `TOLLGATE_BENCH_SEQUENTIAL=1` each function times only its own routine, as criterion
//! does by default, and the ratio is the quotient of the two medians: for comparing how
//! steady the sequential measurement is.

#![allow(dead_code)]

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;

/// Samples of fewer iterations (criterion's first warm-up calls) are timed but not kept for the
/// ratio: the timer's own cost would dominate them.
pub const MIN_KEPT_ITERS: u64 = 1000;

/// The median of `v` (the mean of the middle two for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Whether the paired functions time only their own routine (see the module doc).
pub fn sequential() -> bool {
    std::env::var("TOLLGATE_BENCH_SEQUENTIAL").is_ok_and(|v| v == "1")
}

/// Time of `iters` calls of `f(i)`, `i` counting from 0.
pub fn time(iters: u64, f: &mut impl FnMut(usize)) -> Duration {
    let start = Instant::now();
    for i in 0..iters as usize {
        f(i);
    }
    start.elapsed()
}

/// Medians of a paired measurement: ns per iteration of `a` and of `b`, and of the ratio.
pub struct Medians {
    pub a_ns: f64,
    pub b_ns: f64,
    pub ratio: f64,
}

#[derive(Default)]
struct Log {
    a: Vec<f64>,
    b: Vec<f64>,
    ratio: Vec<f64>,
}

/// Benchmarks `a` as `group/name_a` and `b` as `group/name_b` (see the module doc). `None` when
/// neither function ran long enough to keep a sample (filtered out, `--test`, `--list`).
pub fn pair(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name_a: &str,
    name_b: &str,
    a: impl FnMut(usize),
    b: impl FnMut(usize),
) -> Option<Medians> {
    let routines = RefCell::new((a, b));
    let log = RefCell::new(Log::default());
    let seq = sequential();
    let flip = RefCell::new(false);
    for own_is_a in [true, false] {
        let name = if own_is_a { name_a } else { name_b };
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                let (a, b) = &mut *routines.borrow_mut();
                let mut log = log.borrow_mut();
                if seq {
                    let t = if own_is_a { time(iters, a) } else { time(iters, b) };
                    if iters >= MIN_KEPT_ITERS {
                        let ns = t.as_nanos() as f64 / iters as f64;
                        if own_is_a {
                            log.a.push(ns)
                        } else {
                            log.b.push(ns)
                        }
                    }
                    return t;
                }
                let mut flip = flip.borrow_mut();
                *flip = !*flip;
                let (ta, tb) = if *flip {
                    let ta = time(iters, a);
                    (ta, time(iters, b))
                } else {
                    let tb = time(iters, b);
                    (time(iters, a), tb)
                };
                if iters >= MIN_KEPT_ITERS {
                    let (na, nb) = (ta.as_nanos() as f64 / iters as f64, tb.as_nanos() as f64 / iters as f64);
                    log.a.push(na);
                    log.b.push(nb);
                    log.ratio.push(na / nb);
                }
                if own_is_a {
                    ta
                } else {
                    tb
                }
            })
        });
    }
    let log = log.into_inner();
    if log.a.is_empty() || log.b.is_empty() {
        return None;
    }
    let (a_ns, b_ns) = (median(log.a), median(log.b));
    let ratio = if seq { a_ns / b_ns } else { median(log.ratio) };
    Some(Medians { a_ns, b_ns, ratio })
}

/// Benchmarks `f` as `group/name` on its own, and returns the median ns per iteration of the
/// samples kept (`None` as for [`pair`]).
pub fn single(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, mut f: impl FnMut(usize)) -> Option<f64> {
    let mut kept = Vec::new();
    group.bench_function(name, |bench| {
        bench.iter_custom(|iters| {
            let t = time(iters, &mut f);
            if iters >= MIN_KEPT_ITERS {
                kept.push(t.as_nanos() as f64 / iters as f64);
            }
            t
        })
    });
    (!kept.is_empty()).then(|| median(kept))
}
