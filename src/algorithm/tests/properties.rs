//! Property tests: invariant 1 for any time sequence, exact `retry_after`, and each algorithm
//! against its reference model.

use super::*;

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
