//! Unit and property tests of the pure algorithms: invariant 1 against reference models, and
//! refunds, blocks, sweeps (`is_fresh`) and `reset_after` inside the generated sequences. The
//! rules of one algorithm are tested in its own file; this file holds the shared helpers and
//! generators and the tests that hold for every algorithm.

mod fixed_window;
mod properties;
mod sequences;
mod sliding_window;
mod token_bucket;

use proptest::prelude::*;

use super::*;
use crate::consts::MAX_TIME_NS;
use crate::policy::{Algorithm, Policy};
use std::time::Duration;

const S: u64 = 1_000_000_000;

fn rule(alg: Algorithm, points: u64, duration_ns: u64) -> Rule {
    Policy::new(points, Duration::from_nanos(duration_ns))
        .algorithm(alg)
        .compile()
        .unwrap()
}

/// Runs `cost`s at `times` from a fresh state; returns (allowed, state) per step.
fn run(r: &Rule, events: &[(u64, u64)]) -> Vec<bool> {
    let mut state = 0;
    events
        .iter()
        .map(|&(t, c)| {
            let step = r.acquire(state, t, c);
            state = step.state;
            step.allowed
        })
        .collect()
}

// ---- generators of the property tests ---------------------------------------------------

#[derive(Clone, Debug)]
enum Tick {
    Forward(u64),
    Back(u64),
    Jump(u64),
}

fn tick() -> impl Strategy<Value = Tick> {
    prop_oneof![
        6 => (0u64..3 * S).prop_map(Tick::Forward),
        2 => (0u64..3 * S).prop_map(Tick::Back),
        1 => any::<u64>().prop_map(Tick::Jump),
        1 => Just(Tick::Jump(u64::MAX)),
    ]
}

fn apply(t: u64, tick: &Tick) -> u64 {
    match *tick {
        Tick::Forward(d) => t.saturating_add(d),
        Tick::Back(d) => t.saturating_sub(d),
        Tick::Jump(to) => to,
    }
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::TokenBucket),
        Just(Algorithm::FixedWindow),
        Just(Algorithm::SlidingWindow)
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        algorithm(),
        1u64..50,
        1u64..5_000,
        proptest::option::of(1u64..60),
        proptest::option::of(1u64..5_000),
    )
        .prop_map(|(alg, points, ms, burst, block_ms)| {
            let mut p = Policy::new(points, Duration::from_millis(ms)).algorithm(alg);
            if alg == Algorithm::TokenBucket {
                if let Some(b) = burst {
                    p = p.burst(b);
                }
            }
            if let Some(b) = block_ms {
                p = p.block_duration(Duration::from_millis(b));
            }
            p
        })
}

#[test]
fn window_capacity_depends_on_window_length() {
    let fixed_1ms = Rule::fixed_window(1, 1_000_000, 0);
    let sliding_1s = Rule::sliding_window(1, S, 0);
    let sliding_1h = Rule::sliding_window(1, 3600 * S, 0);
    assert!(fixed_1ms.max_window_capacity() >= 1 << 19);
    assert_eq!(sliding_1s.max_window_capacity(), (1 << 15) - 2);
    assert!(sliding_1h.max_window_capacity() >= 1 << 20);
    assert!(Policy::per_second(32766)
        .algorithm(Algorithm::SlidingWindow)
        .validate()
        .is_ok());
    assert!(Policy::per_second(32767)
        .algorithm(Algorithm::SlidingWindow)
        .validate()
        .is_err());
}

#[test]
fn shares_split_the_capacity_and_never_exceed_the_whole() {
    let bucket = rule(Algorithm::TokenBucket, 10, S);
    let share = bucket.share(3).unwrap();
    assert_eq!((share.capacity, share.period), (3, 3 * bucket.period));
    assert_eq!(share.aux, share.capacity * share.period);
    assert_eq!(bucket.share(0), Some(bucket), "0 shares is one share");
    assert_eq!(bucket.share(11), None, "a share of nothing");
    let window = rule(Algorithm::SlidingWindow, 10, S);
    let share = window.share(4).unwrap();
    assert_eq!(
        (share.capacity, share.period, share.aux),
        (2, window.period, window.aux)
    );
}

#[test]
fn peek_answers_like_acquire_without_writing() {
    let r = Policy::per_second(2)
        .algorithm(Algorithm::FixedWindow)
        .block_duration(Duration::from_secs(5))
        .compile()
        .unwrap();
    let s = r.acquire(0, 10, 1).state;
    assert_eq!(r.peek(s, 20, 1), r.acquire(s, 20, 1));
    let full = r.acquire(s, 20, 1).state;
    assert_eq!(
        r.peek(full, 30, 1),
        Step {
            allowed: false,
            state: full
        },
        "no block started"
    );
    assert_ne!(r.acquire(full, 30, 1).state, full);
}

#[test]
fn a_block_from_the_latest_time_keeps_its_window_index() {
    // Windows just short enough that the index of the latest window needs one more bit than
    // the index at `MAX_TIME_NS` alone: a state that lost that bit would read as an old window,
    // and the blocked key as fresh.
    let latest = MAX_TIME_NS + crate::consts::MAX_DURATION.as_nanos() as u64;
    for bits in 8..=42 {
        let window_ns = latest >> bits;
        for kind in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let r = Policy::new(1, Duration::from_nanos(window_ns))
                .algorithm(kind)
                .block_duration(crate::consts::MAX_DURATION)
                .compile()
                .unwrap();
            let s = r.acquire(0, MAX_TIME_NS, 1).state;
            let d = r.acquire(s, MAX_TIME_NS, 1);
            assert!(!d.allowed);
            assert!(
                !r.acquire(d.state, MAX_TIME_NS, 1).allowed,
                "{kind:?} window {window_ns} ns"
            );
            assert!(!r.is_fresh(d.state, u64::MAX), "{kind:?} window {window_ns} ns");
        }
    }
}

#[cfg(feature = "metrics")]
#[test]
fn near_limit_means_under_a_fifth_of_the_capacity_left() {
    for alg in [Algorithm::TokenBucket, Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let r = rule(alg, 10, S);
        let eight = r.acquire(0, 10, 8).state;
        assert!(!r.near_limit(eight, 10), "{alg:?}: 2 of 10 left is not under a fifth");
        let nine = r.acquire(eight, 10, 1).state;
        assert!(r.near_limit(nine, 10), "{alg:?}: 1 of 10 left");
        assert!(!r.near_limit(0, 10), "{alg:?}: fresh");
    }
}
