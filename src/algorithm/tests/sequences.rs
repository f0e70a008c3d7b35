//! Property tests of refunds, blocks and sweeps inside the generated sequences, against a
//! reference model of one key.

use super::*;

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
