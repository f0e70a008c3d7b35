//! Unit and property tests of the pure algorithms: invariant 1 against reference models, and
//! refunds, blocks, sweeps (`is_fresh`) and `reset_after` inside the generated sequences.

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

#[test]
fn token_bucket_basics() {
    let r = rule(Algorithm::TokenBucket, 10, S); // 10/s, period 100 ms
    assert_eq!(r.period, 100_000_000);
    let mut s = 0;
    for i in 0..10 {
        let st = r.acquire(s, 0, 1);
        assert!(st.allowed, "token {i}");
        s = st.state;
    }
    let denied = r.acquire(s, 0, 1);
    assert!(!denied.allowed);
    assert_eq!(denied.state, s, "a plain denial writes nothing");
    assert_eq!(r.retry_after(s, 0, 1), 100_000_000);
    assert_eq!(r.retry_after(s, 0, 3), 300_000_000);
    assert_eq!(r.remaining(s, 0), 0);
    assert_eq!(r.reset_after(s, 0), S);
    assert!(r.acquire(s, 100_000_000, 1).allowed);
    assert!(!r.acquire(s, 99_999_999, 1).allowed);
    // refund gives back, but never above full
    let back = r.refund(s, 0, 4, 0);
    assert_eq!(r.remaining(back, 0), 4);
    assert_eq!(r.refund(back, 0, 100, 0), 0);
    assert!(r.is_fresh(r.refund(back, 0, 100, 0), 0));
}

#[test]
fn token_bucket_burst_and_block() {
    let r = Policy::per_second(10)
        .burst(3)
        .block_duration(Duration::from_secs(5))
        .compile()
        .unwrap();
    let mut s = 0;
    for _ in 0..3 {
        s = r.acquire(s, 0, 1).state;
    }
    let d = r.acquire(s, 0, 1);
    assert!(!d.allowed);
    // blocked: nothing for 5 s, then refill from empty at 10/s
    assert_eq!(r.retry_after(d.state, 0, 1), 5 * S + 100_000_000);
    assert!(!r.acquire(d.state, 5 * S, 1).allowed);
    // another denial during the block does not extend it
    let again = r.acquire(d.state, 4 * S, 1);
    assert_eq!(again.state, d.state);
    assert!(r.acquire(d.state, 5 * S + 100_000_000, 1).allowed);
}

#[test]
fn fixed_window_basics() {
    let r = rule(Algorithm::FixedWindow, 3, S);
    let ok = run(&r, &[(0, 1), (10, 2), (20, 1), (S - 1, 1), (S, 3), (S + 5, 1)]);
    assert_eq!(ok, [true, true, false, false, true, false]);
    let mut s = 0;
    s = r.acquire(s, 10, 3).state;
    assert_eq!(r.retry_after(s, 10, 1), S - 10);
    assert_eq!(r.reset_after(s, 10), S - 10);
    assert_eq!(r.remaining(s, 10), 0);
    assert_eq!(r.remaining(s, S), 3);
    // refund only into the window it was taken from
    assert_eq!(r.remaining(r.refund(s, 20, 2, 10), 20), 2);
    assert_eq!(r.refund(s, S + 1, 2, 10), s);
    // time going back answers with the stored window
    let later = r.acquire(0, 5 * S, 3).state;
    assert!(!r.acquire(later, S, 1).allowed);
}

#[test]
fn fixed_window_block_rounds_up_to_window_end() {
    let r = Policy::per_second(1)
        .algorithm(Algorithm::FixedWindow)
        .block_duration(Duration::from_millis(1500))
        .compile()
        .unwrap();
    let s = r.acquire(0, 100, 1).state;
    let d = r.acquire(s, 200, 1);
    assert!(!d.allowed);
    // blocked into the window containing 200 ns + 1.5 s, i.e. until 2 s
    assert!(!r.acquire(d.state, S + 10, 1).allowed);
    assert!(!r.acquire(d.state, 2 * S - 1, 1).allowed);
    assert!(r.acquire(d.state, 2 * S, 1).allowed);
    assert_eq!(r.retry_after(d.state, 200, 1), 2 * S - 200);
}

#[test]
fn sliding_window_weights_previous_window() {
    let r = rule(Algorithm::SlidingWindow, 10, S);
    let s = r.acquire(0, 0, 10).state;
    assert!(!r.acquire(s, S - 1, 1).allowed);
    // 25% into the next window, 75% of the previous 10 still count: 8 (rounded up), 2 free.
    let t = S + S / 4;
    assert_eq!(r.remaining(s, t), 2);
    let s2 = r.acquire(s, t, 2).state;
    assert!(!r.acquire(s2, t, 1).allowed);
    // one more frees when prev weight * 10 <= 7: e >= 0.3 s
    assert_eq!(r.retry_after(s2, t, 1), S * 3 / 10 - S / 4);
    assert!(r.acquire(s2, S + S * 3 / 10, 1).allowed);
    assert!(!r.acquire(s2, S + S * 3 / 10 - 1, 1).allowed);
    assert_eq!(r.reset_after(s2, t), 3 * S - t);
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
fn fixed_window_refund_goes_back_into_a_later_window() {
    // Window 5, not window 0: the refunded state must keep its window index, or the key reads
    // as fresh and gets its whole capacity back.
    let r = rule(Algorithm::FixedWindow, 3, S);
    let s = r.acquire(0, 5 * S + 10, 3).state;
    let back = r.refund(s, 5 * S + 20, 1, 5 * S + 10);
    assert_eq!(r.remaining(back, 5 * S + 20), 1);
    assert!(!r.acquire(back, 5 * S + 20, 2).allowed);
    assert_eq!(
        r.refund(s, 6 * S, 1, 5 * S + 10),
        s,
        "nothing goes back into another window"
    );
}

#[test]
fn sliding_window_refund_goes_back_into_the_current_window() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    let s = r.acquire(0, 10, 3).state;
    let back = r.refund(s, 20, 1, 10);
    assert_eq!(r.remaining(back, 20), 1);
    assert!(!r.acquire(back, 20, 2).allowed);
    // the same in a later window
    let s = r.acquire(0, 5 * S + 10, 3).state;
    let back = r.refund(s, 5 * S + 20, 2, 5 * S + 10);
    assert_eq!(r.remaining(back, 5 * S + 20), 2);
    assert!(!r.acquire(back, 5 * S + 20, 3).allowed);
}

#[test]
fn sliding_window_refund_in_the_next_window_lightens_the_previous_one() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    // Taken in window 0, refunded halfway through window 1: prev 3 -> 2, weighing ceil(2 * 0.5).
    let s = r.acquire(0, 10, 3).state;
    assert_eq!(r.remaining(s, S + S / 2), 1);
    let back = r.refund(s, S + S / 2, 1, 10);
    assert_eq!(r.remaining(back, S + S / 2), 2);
    // The same from window 5 into window 6.
    let s = r.acquire(0, 5 * S + 10, 3).state;
    let back = r.refund(s, 6 * S + S / 2, 1, 5 * S + 10);
    assert_eq!(r.remaining(back, 6 * S + S / 2), 2);
    assert!(!r.acquire(back, 6 * S + S / 2, 3).allowed);
}

#[test]
fn sliding_window_refund_two_windows_later_changes_nothing() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    let s = r.acquire(0, 5 * S + 10, 2).state;
    let s = r.acquire(s, 6 * S + 10, 1).state;
    assert_eq!(r.refund(s, 7 * S + 10, 2, 5 * S + 10), s);
    assert_eq!(r.refund(s, 9 * S, 1, 6 * S + 10), s);
}

#[test]
fn sliding_window_block_denies_until_it_ends() {
    let r = Policy::per_second(2)
        .algorithm(Algorithm::SlidingWindow)
        .block_duration(Duration::from_secs(5))
        .compile()
        .unwrap();
    let s = r.acquire(0, 10, 2).state;
    let d = r.acquire(s, 20, 1);
    assert!(!d.allowed);
    // Without the block the key would be fresh from 2 s on.
    for t in [S, 3 * S, 5 * S + 20, 6 * S + S / 2 - 1] {
        assert!(!r.acquire(d.state, t, 1).allowed, "blocked at {t}");
    }
    // Blocked into window 5 (20 ns + 5 s), which then weighs as the previous window: one
    // request fits again halfway through window 6.
    assert!(r.acquire(d.state, 6 * S + S / 2, 1).allowed);
    assert_eq!(r.retry_after(d.state, 20, 1), 6 * S + S / 2 - 20);
    // another denial during the block does not extend it
    assert_eq!(r.acquire(d.state, 3 * S, 1).state, d.state);
    assert!(!r.is_fresh(d.state, 3 * S), "a blocked key is never swept");
}

#[test]
fn sliding_window_is_fresh_only_when_no_window_counts() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    assert!(r.is_fresh(0, 10));
    let s = r.acquire(0, 10, 1).state;
    assert!(!r.is_fresh(s, 10), "the current window counts");
    assert!(!r.is_fresh(s, S + 10), "the previous window still counts");
    assert!(
        !r.is_fresh(s, 2 * S - 1),
        "the previous window counts until its weight is 0"
    );
    assert!(r.is_fresh(s, 2 * S), "two windows later nothing counts");
    assert!(r.is_fresh(r.refund(s, 20, 1, 10), 20), "refunded back to nothing");
    let s = r.acquire(0, 5 * S + 10, 1).state;
    assert!(!r.is_fresh(s, 6 * S + 10));
    assert!(r.is_fresh(s, 7 * S + 10));
}

#[test]
fn sliding_window_reset_after_counts_to_the_end_of_the_window_that_weighs_last() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    assert_eq!(r.reset_after(0, 10), 0);
    assert_eq!(r.reset_after(0, 5 * S + 10), 0);
    let s = r.acquire(0, 10, 1).state;
    assert_eq!(r.reset_after(s, 10), 2 * S - 10);
    assert_eq!(r.reset_after(s, S + 10), S - 10);
    let s = r.acquire(0, 5 * S + 10, 1).state;
    assert_eq!(
        r.reset_after(s, 5 * S + 10),
        2 * S - 10,
        "current window: to the end of the next one"
    );
    assert_eq!(
        r.reset_after(s, 6 * S + 10),
        S - 10,
        "previous window only: to the end of this one"
    );
    assert_eq!(r.reset_after(s, 7 * S + 10), 0);
}

#[test]
fn fixed_window_is_fresh_and_reset_after_follow_the_count() {
    let r = rule(Algorithm::FixedWindow, 3, S);
    let s = r.acquire(0, 5 * S + 10, 1).state;
    assert!(!r.is_fresh(s, 5 * S + 10));
    assert_eq!(r.reset_after(s, 5 * S + 10), S - 10);
    assert!(r.is_fresh(s, 6 * S));
    assert_eq!(r.reset_after(s, 6 * S), 0);
    assert!(r.is_fresh(r.refund(s, 5 * S + 20, 1, 5 * S + 10), 5 * S + 20));
}

#[test]
fn token_bucket_is_fresh_once_full_again() {
    let r = rule(Algorithm::TokenBucket, 10, S); // period 100 ms
    let s = r.acquire(0, 5 * S, 2).state;
    assert!(!r.is_fresh(s, 5 * S));
    assert!(!r.is_fresh(s, 5 * S + 200_000_000 - 1));
    assert!(r.is_fresh(s, 5 * S + 200_000_000));
    assert_eq!(r.reset_after(s, 5 * S), 200_000_000);
    assert_eq!(r.remaining(r.refund(s, 5 * S + 50, 1, 5 * S), 5 * S + 50), 9);
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

// ---- property tests -------------------------------------------------------------------------

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

/// Checks invariant 1 on a run: `admitted[i] = (max clamped time so far, cost)`.
fn check_bound(p: &Policy, r: &Rule, admitted: &[(u64, u64)]) -> Result<(), TestCaseError> {
    match r.kind {
        Kind::TokenBucket => {
            let duration = p.duration().as_nanos();
            for i in 0..admitted.len() {
                let mut sum: u128 = 0;
                for j in i..admitted.len() {
                    sum += admitted[j].1 as u128;
                    let d = (admitted[j].0 - admitted[i].0) as u128;
                    let bound = r.capacity as u128 + d * p.points() as u128 / duration;
                    prop_assert!(
                        sum <= bound,
                        "admitted {} over [{}, {}] > {}",
                        sum,
                        admitted[i].0,
                        admitted[j].0,
                        bound
                    );
                }
            }
        }
        Kind::FixedWindow | Kind::SlidingWindow => {
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            for &(t, c) in admitted {
                *per_window.entry(t / r.period).or_default() += c;
            }
            for (w, sum) in per_window {
                prop_assert!(sum <= r.capacity, "window {} admitted {} > {}", w, sum, r.capacity);
            }
        }
    }
    Ok(())
}

proptest! {
    /// Invariant 1: over any interval, admitted <= capacity + rate x interval (token bucket) or
    /// <= points per aligned window (windows), for any times, backwards and huge jumps included.
    #[test]
    fn invariant_1_admitted_within_bound_for_any_time_sequence(
        p in policy(),
        steps in proptest::collection::vec((tick(), any::<u64>()), 1..120),
        small_costs in any::<bool>(),
    ) {
        let r = p.compile().unwrap();
        let (mut t, mut max_t, mut state) = (0u64, 0u64, 0u64);
        let mut admitted = Vec::new();
        for (tk, raw_cost) in &steps {
            t = apply(t, tk);
            max_t = max_t.max(clamp(t));
            let cost = if small_costs { (raw_cost % 3).min(r.capacity) } else { raw_cost % (r.capacity + 1) };
            let step = r.acquire(state, t, cost);
            if step.allowed {
                admitted.push((max_t, cost));
            }
            state = step.state;
            prop_assert_ne!(state, crate::consts::RETIRED);
        }
        check_bound(&p, &r, &admitted)?;
    }

    /// Time going backwards never makes more available.
    #[test]
    fn time_going_backwards_never_refunds(
        p in policy(),
        steps in proptest::collection::vec((0u64..2 * S, 0u64..4), 1..40),
        back in any::<u64>(),
    ) {
        let r = p.compile().unwrap();
        let (mut t, mut state) = (0u64, 0u64);
        for (dt, c) in steps {
            t += dt;
            state = r.acquire(state, t, c.min(r.capacity)).state;
        }
        let earlier = t.saturating_sub(back);
        prop_assert!(r.remaining(state, earlier) <= r.remaining(state, t));
        prop_assert!(!r.acquire(state, earlier, 1).allowed || r.acquire(state, t, 1).allowed);
    }

    /// A denial's retry_after is exact: allowed then (with no other traffic), not a nanosecond before.
    #[test]
    fn retry_after_is_exact(
        p in policy(),
        steps in proptest::collection::vec((0u64..2 * S, 1u64..5), 1..40),
        cost in 1u64..60,
    ) {
        let r = Rule { block: 0, ..p.compile().unwrap() };
        let cost = cost.min(r.capacity);
        let (mut t, mut state) = (0u64, 0u64);
        for (dt, c) in steps {
            t += dt;
            state = r.acquire(state, t, c.min(r.capacity)).state;
        }
        if !r.acquire(state, t, cost).allowed {
            let wait = r.retry_after(state, t, cost);
            prop_assert!(wait > 0);
            prop_assert!(r.acquire(state, t + wait, cost).allowed, "not allowed after retry_after {}", wait);
            prop_assert!(!r.acquire(state, t + wait - 1, cost).allowed, "allowed before retry_after {}", wait);
        }
    }

    /// Token bucket decisions equal a reference bucket that counts tokens (in token-nanoseconds)
    /// for non-decreasing time.
    #[test]
    fn token_bucket_matches_reference_model(
        points in 1u64..100, ms in 1u64..10_000, burst in 1u64..100,
        steps in proptest::collection::vec((0u64..S, 0u64..8), 1..200),
    ) {
        let p = Policy::new(points, Duration::from_millis(ms)).burst(burst);
        let r = p.compile().unwrap();
        let tau = r.capacity as u128 * r.period as u128;
        let (mut t, mut state) = (0u64, 0u64);
        let (mut level, mut last) = (tau, 0u64);
        for (dt, c) in steps {
            t += dt;
            let c = c.min(r.capacity);
            level = (level + (t - last) as u128).min(tau);
            last = t;
            let model = level >= c as u128 * r.period as u128;
            if model {
                level -= c as u128 * r.period as u128;
            }
            let step = r.acquire(state, t, c);
            state = step.state;
            prop_assert_eq!(step.allowed, model, "at t={}", t);
        }
    }

    /// Window decisions equal a reference model that keeps a log of admissions.
    #[test]
    fn windows_match_reference_log_model(
        sliding in any::<bool>(), points in 1u64..50, ms in 1u64..5_000,
        steps in proptest::collection::vec((0u64..S, 0u64..5), 1..200),
    ) {
        let alg = if sliding { Algorithm::SlidingWindow } else { Algorithm::FixedWindow };
        let r = Policy::new(points, Duration::from_millis(ms)).algorithm(alg).compile().unwrap();
        let w = r.period;
        let mut log: Vec<(u64, u64)> = Vec::new();
        let (mut t, mut state) = (0u64, 0u64);
        for (dt, c) in steps {
            t += dt;
            let c = c.min(r.capacity);
            let idx = t / w;
            let in_window = |i: u64| log.iter().filter(|(at, _)| at / w == i).map(|(_, c)| c).sum::<u64>();
            let cur = in_window(idx);
            let estimate = if sliding && idx > 0 {
                let prev = in_window(idx - 1) as u128;
                cur + (prev * (w - t % w) as u128).div_ceil(w as u128) as u64
            } else {
                cur
            };
            let model = estimate + c <= r.capacity;
            if model {
                log.push((t, c));
            }
            let step = r.acquire(state, t, c);
            state = step.state;
            prop_assert_eq!(step.allowed, model, "at t={}", t);
        }
    }

    /// Any u64 policy numbers either fail validation or run without panicking.
    #[test]
    fn no_panic_for_any_u64_inputs(
        alg in algorithm(), points in any::<u64>(), nanos in any::<u64>(), burst in any::<u64>(),
        block in any::<u64>(), state in any::<u64>(), now in any::<u64>(), cost in any::<u64>(),
    ) {
        let mut p = Policy::new(points, Duration::from_nanos(nanos)).algorithm(alg).block_duration(Duration::from_nanos(block));
        if alg == Algorithm::TokenBucket { p = p.burst(burst); }
        if let Ok(r) = p.compile() {
            let c = cost % (r.capacity + 1);
            let st = r.acquire(state, now, c);
            let _ = (r.peek(state, now, c), r.refund(state, now, cost, now.wrapping_sub(cost)));
            let _ = (r.remaining(st.state, now), r.reset_after(st.state, now), r.retry_after(st.state, now, c), r.is_fresh(state, now));
            prop_assert!(clamp(now) <= MAX_TIME_NS);
        }
    }

    /// The one-compare near-limit test agrees with `near_limit` wherever it is offered.
    #[cfg(feature = "metrics")]
    #[test]
    fn near_limit_slack_agrees(
        capacity in 1u64..=u64::MAX, points in 1u64..=u64::MAX, nanos in 1u64..=u64::MAX,
        now in any::<u64>(), off in any::<u64>(), raw in any::<u64>(), pick in 0u8..3,
    ) {
        for r in [Rule::token_bucket(capacity, nanos, points, 0), Rule::token_bucket(capacity % 1000 + 1, nanos % (1 << 40) + 1, points % 1000 + 1, 0)] {
            let Some(slack) = r.near_limit_slack() else {
                prop_assert!(r.aux > u64::MAX - MAX_TIME_NS);
                continue;
            };
            // States around the threshold, and anywhere.
            let t = clamp(now);
            let state = match pick {
                0 => t.saturating_add(off % r.aux.saturating_add(2)),
                1 => (t + slack).saturating_add(off % 3).saturating_sub(1),
                _ => raw,
            };
            prop_assert_eq!(r.near_limit(state, now), state > t + slack, "state={} now={} rule={:?}", state, now, r);
        }
    }
}

// ---- refunds, blocks and sweeps inside the sequences -----------------------------------------

/// One step of a key's life besides the passing of time.
#[derive(Clone, Debug)]
enum Op {
    /// A check of this cost (clamped to the capacity).
    Take(u64),
    /// A refund of this cost, for the grant picked by `pick` (modulo the grants so far).
    Refund { pick: usize, cost: u64 },
    /// The table's sweep: the key is forgotten if it is indistinguishable from a fresh one.
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..8).prop_map(Op::Take),
        3 => (any::<usize>(), 0u64..8).prop_map(|(pick, cost)| Op::Refund { pick, cost }),
        2 => Just(Op::Sweep),
    ]
}

/// A reference model of one key for non-decreasing time, written from the algorithms' stated
/// semantics rather than from their packed states.
enum Model {
    /// Token bucket: token-nanoseconds available (at most `tau`), as of time `last`.
    Bucket { level: u128, tau: u128, last: u64 },
    /// Windows: what each aligned window admitted, net of refunds.
    Windows {
        sliding: bool,
        counts: std::collections::HashMap<u64, u64>,
    },
}

impl Model {
    fn new(r: &Rule) -> Model {
        match r.kind {
            Kind::TokenBucket => {
                let tau = r.capacity as u128 * r.period as u128;
                Model::Bucket {
                    level: tau,
                    tau,
                    last: 0,
                }
            }
            kind => Model::Windows {
                sliding: kind == Kind::SlidingWindow,
                counts: Default::default(),
            },
        }
    }

    fn advance(&mut self, t: u64) {
        if let Model::Bucket { level, tau, last } = self {
            *level = (*level + (t - *last) as u128).min(*tau);
            *last = t;
        }
    }

    /// (this window's count, the previous window's count if it still weighs).
    fn windows(&self, r: &Rule, t: u64) -> (u64, u64) {
        let Model::Windows { sliding, counts } = self else {
            unreachable!()
        };
        let idx = t / r.period;
        let count = |i: u64| counts.get(&i).copied().unwrap_or(0);
        let prev = if *sliding && idx > 0 { count(idx - 1) } else { 0 };
        (count(idx), prev)
    }

    /// Windows: this window's count plus the previous one's, weighted by how much of it the
    /// sliding interval still covers (rounded up).
    fn estimate(&self, r: &Rule, t: u64) -> u64 {
        let (cur, prev) = self.windows(r, t);
        let w = r.period as u128;
        cur + (prev as u128 * (w - (t % r.period) as u128)).div_ceil(w) as u64
    }

    fn allows(&self, r: &Rule, t: u64, cost: u64) -> bool {
        match self {
            Model::Bucket { level, .. } => *level >= cost as u128 * r.period as u128,
            Model::Windows { .. } => self.estimate(r, t) + cost <= r.capacity,
        }
    }

    fn take(&mut self, r: &Rule, t: u64, cost: u64) {
        match self {
            Model::Bucket { level, .. } => *level -= cost as u128 * r.period as u128,
            Model::Windows { counts, .. } => *counts.entry(t / r.period).or_default() += cost,
        }
    }

    /// A refund goes back to the window it was taken from while that window still counts
    /// (fixed: until it ends; sliding: until the next one ends), and never above a fresh key.
    fn refund(&mut self, r: &Rule, t: u64, cost: u64, taken_at: u64) {
        match self {
            Model::Bucket { level, tau, .. } => *level = (*level + cost as u128 * r.period as u128).min(*tau),
            Model::Windows { sliding, counts } => {
                let (taken, now) = (taken_at / r.period, t / r.period);
                if now == taken || (*sliding && now == taken + 1) {
                    let c = counts.entry(taken).or_default();
                    *c -= cost.min(*c);
                }
            }
        }
    }

    fn remaining(&self, r: &Rule, t: u64) -> u64 {
        match self {
            Model::Bucket { level, .. } => ((level / r.period as u128) as u64).min(r.capacity),
            Model::Windows { .. } => r.capacity.saturating_sub(self.estimate(r, t)),
        }
    }

    fn fresh(&self, r: &Rule, t: u64) -> bool {
        match self {
            Model::Bucket { level, tau, .. } => level == tau,
            Model::Windows { .. } => self.windows(r, t) == (0, 0),
        }
    }

    /// Nanoseconds until nothing counts any more.
    fn reset_after(&self, r: &Rule, t: u64) -> u64 {
        let end_of = |windows_ahead: u64| (t / r.period + windows_ahead) * r.period - t;
        match self {
            Model::Bucket { level, tau, .. } => (tau - level) as u64,
            Model::Windows { sliding: true, .. } => match self.windows(r, t) {
                (0, 0) => 0,
                (0, _) => end_of(1),
                _ => end_of(2),
            },
            Model::Windows { sliding: false, .. } => match self.windows(r, t) {
                (0, _) => 0,
                _ => end_of(1),
            },
        }
    }
}

proptest! {
    /// Refunds (including refunds larger than the grant, and into a window that no longer
    /// counts) and sweeps inside the sequence: every decision, `remaining`, `reset_after` and
    /// `is_fresh` equal the reference model's, for each algorithm. A sweep that forgets a key
    /// that still counts, or a refund that gives back to the wrong window, makes the decisions
    /// diverge.
    #[test]
    fn decisions_with_refunds_and_sweeps_match_reference_models(
        alg in algorithm(), points in 1u64..50, ms in 1u64..5_000, burst in proptest::option::of(1u64..60),
        steps in proptest::collection::vec((0u64..S, op()), 1..200),
    ) {
        let mut p = Policy::new(points, Duration::from_millis(ms)).algorithm(alg);
        if let (Algorithm::TokenBucket, Some(b)) = (alg, burst) {
            p = p.burst(b);
        }
        let r = p.compile().unwrap();
        let mut model = Model::new(&r);
        let (mut t, mut state) = (0u64, 0u64);
        let mut grants: Vec<u64> = Vec::new();
        for (dt, op) in steps {
            t += dt;
            model.advance(t);
            match op {
                Op::Take(c) => {
                    let c = c.min(r.capacity);
                    let step = r.acquire(state, t, c);
                    prop_assert_eq!(step.allowed, model.allows(&r, t, c), "take {} at t={}", c, t);
                    if step.allowed {
                        model.take(&r, t, c);
                        grants.push(t);
                    }
                    state = step.state;
                }
                Op::Refund { pick, cost } => {
                    let taken_at = if grants.is_empty() { t } else { grants[pick % grants.len()] };
                    state = r.refund(state, t, cost, taken_at);
                    model.refund(&r, t, cost, taken_at);
                }
                Op::Sweep => {
                    if r.is_fresh(state, t) {
                        state = 0;
                    }
                }
            }
            prop_assert_eq!(r.is_fresh(state, t), model.fresh(&r, t), "is_fresh at t={}", t);
            prop_assert_eq!(r.remaining(state, t), model.remaining(&r, t), "remaining at t={}", t);
            prop_assert_eq!(r.reset_after(state, t), model.reset_after(&r, t), "reset_after at t={}", t);
        }
    }

    /// A denial outside a block starts one; until it ends every check of cost >= 1 is denied
    /// and a sweep keeps the key; outside a block the decisions are those of the same rule
    /// without a block; and `retry_after` is exact for blocked keys too.
    #[test]
    fn a_block_denies_every_check_until_it_ends_and_survives_sweeps(
        alg in algorithm(), points in 1u64..50, ms in 1u64..5_000, block_ms in 1u64..10_000,
        steps in proptest::collection::vec((0u64..S, 0u64..4, any::<bool>()), 1..150),
    ) {
        let r = Policy::new(points, Duration::from_millis(ms))
            .algorithm(alg)
            .block_duration(Duration::from_millis(block_ms))
            .compile()
            .unwrap();
        let unblocked = Rule { block: 0, ..r };
        let (mut t, mut state, mut blocked_until) = (0u64, 0u64, 0u64);
        for (dt, c, sweep) in steps {
            t += dt;
            if sweep {
                if t < blocked_until {
                    prop_assert!(!r.is_fresh(state, t), "a blocked key is swept at t={}", t);
                }
                if r.is_fresh(state, t) {
                    state = 0;
                }
            }
            let c = c.min(r.capacity);
            let step = r.acquire(state, t, c);
            let plain = unblocked.acquire(state, t, c);
            if t < blocked_until && c > 0 {
                prop_assert!(!step.allowed, "allowed at t={} inside a block until {}", t, blocked_until);
            }
            if t >= blocked_until {
                prop_assert_eq!(step.allowed, plain.allowed, "outside a block at t={}", t);
            }
            // A denial outside a block starts one; inside one it may restart it (a window
            // algorithm denied in the block's last window), which changes the state.
            if !step.allowed && (t >= blocked_until || step.state != plain.state) {
                blocked_until = t + r.block;
                prop_assert!(
                    !r.acquire(step.state, blocked_until - 1, 1).allowed,
                    "a denial at t={} blocks less than {} ns", t, r.block
                );
            }
            if !step.allowed {
                let wait = r.retry_after(step.state, t, c);
                prop_assert!(wait > 0);
                prop_assert!(r.acquire(step.state, t + wait, c).allowed, "denied after retry_after {}", wait);
                prop_assert!(!r.acquire(step.state, t + wait - 1, c).allowed, "allowed before retry_after {}", wait);
            }
            state = step.state;
        }
    }

    /// For any times (backwards steps and huge jumps included), blocks and refunds: refunding a
    /// grant at once gives back exactly what it took (no more, or less only when time went
    /// back); `is_fresh` holds exactly when the key shows a fresh key's full quota and nothing
    /// to reset; and `reset_after` is exact: fresh then, not a nanosecond before.
    #[test]
    fn refund_gives_back_exactly_the_grant_and_is_fresh_agrees_with_the_figures(
        p in policy(),
        steps in proptest::collection::vec((tick(), 0u64..8, any::<bool>()), 1..120),
    ) {
        let r = p.compile().unwrap();
        let (mut t, mut max_t, mut state) = (0u64, 0u64, 0u64);
        for (tk, c, refund) in &steps {
            t = apply(t, tk);
            let now = clamp(t);
            let c = (*c).min(r.capacity);
            let before = r.remaining(state, t);
            let step = r.acquire(state, t, c);
            state = step.state;
            if step.allowed {
                let back = r.refund(step.state, t, c, t);
                let after = r.remaining(back, t);
                if now >= max_t {
                    prop_assert_eq!(after, before, "refund of {} at t={}", c, t);
                } else {
                    prop_assert!(after <= before, "refund of {} at t={} after time went back: {} > {}", c, t, after, before);
                }
                if *refund {
                    state = back;
                }
            }
            max_t = max_t.max(now);
            let (remaining, reset) = (r.remaining(state, t), r.reset_after(state, t));
            prop_assert_eq!(r.is_fresh(state, t), remaining == r.capacity && reset == 0, "at t={}", t);
            #[cfg(feature = "metrics")]
            prop_assert_eq!(r.near_limit(state, t), remaining * 5 < r.capacity, "near_limit at t={}", t);
            if let Some(fresh_at) = now.checked_add(reset).filter(|&at| at <= MAX_TIME_NS && reset > 0) {
                prop_assert!(r.is_fresh(state, fresh_at), "not fresh after reset_after {}", reset);
                prop_assert!(!r.is_fresh(state, fresh_at - 1), "fresh before reset_after {}", reset);
            }
        }
    }
}
