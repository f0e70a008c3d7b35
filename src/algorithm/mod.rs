//! The three algorithms as pure arithmetic on plain integers.
//!
//! Nothing here touches an atomic, a map or a clock: every function takes the key's state (one
//! `u64`), the time `now` (nanoseconds, clamped to [`MAX_TIME_NS`]) and a cost, and returns the
//! answer and the state to write. The cells in `local` own the compare-and-swap loops around
//! these functions; the distributed mode reuses them on claimed quota.
//!
//! State 0 always means "fresh": a full bucket or an empty window.

mod fixed_window;
mod sliding_window;
mod token_bucket;

use crate::consts::{MAX_DURATION, MAX_TIME_NS};

/// What a policy compiles to: the constants its algorithm needs, all integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) kind: Kind,
    /// The most that can be spent at once (burst, or points per window).
    pub(crate) capacity: u64,
    /// Token bucket: nanoseconds per token (rounded up, so the rate is never above the policy's).
    /// Windows: the window length in nanoseconds.
    pub(crate) period: u64,
    /// Token bucket: `capacity * period`, the time a full bucket takes to refill.
    /// Windows: the number of low bits that hold one count.
    pub(crate) aux: u64,
    /// Block duration in nanoseconds, 0 for none.
    pub(crate) block: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    TokenBucket,
    FixedWindow,
    SlidingWindow,
}

/// The result of an acquire: whether it is allowed and the state after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) allowed: bool,
    /// The state after the operation (equal to the input when nothing changes).
    pub(crate) state: u64,
}

#[inline]
pub(crate) fn clamp(now: u64) -> u64 {
    now.min(MAX_TIME_NS)
}

/// Bits needed for a window index at any time up to `MAX_TIME_NS` plus the longest block.
fn index_bits(window_ns: u64) -> u64 {
    let max_index = (MAX_TIME_NS + MAX_DURATION.as_nanos() as u64) / window_ns.max(1);
    u64::from(64 - max_index.leading_zeros())
}

impl Rule {
    pub(crate) fn token_bucket(capacity: u64, duration_ns: u64, points: u64, block: u64) -> Rule {
        let period = duration_ns.div_ceil(points).max(1);
        Rule {
            kind: Kind::TokenBucket,
            capacity,
            period,
            aux: capacity.saturating_mul(period),
            block,
        }
    }

    pub(crate) fn fixed_window(capacity: u64, window_ns: u64, block: u64) -> Rule {
        Rule {
            kind: Kind::FixedWindow,
            capacity,
            period: window_ns,
            aux: 64 - index_bits(window_ns),
            block,
        }
    }

    pub(crate) fn sliding_window(capacity: u64, window_ns: u64, block: u64) -> Rule {
        Rule {
            kind: Kind::SlidingWindow,
            capacity,
            period: window_ns,
            aux: (64 - index_bits(window_ns)) / 2,
            block,
        }
    }

    /// One of `n` equal shares of this rule: the capacity divided by `n` (rounded down), and for
    /// a token bucket the rate too, so that `n` shares together never exceed the whole. `None`
    /// when a share would hold nothing.
    pub(crate) fn share(&self, n: u64) -> Option<Rule> {
        let n = n.max(1);
        let capacity = self.capacity / n;
        if capacity == 0 {
            return None;
        }
        Some(match self.kind {
            // n <= capacity, so period * n <= aux, which fits.
            Kind::TokenBucket => {
                let period = self.period.saturating_mul(n);
                Rule {
                    capacity,
                    period,
                    aux: capacity.saturating_mul(period),
                    ..*self
                }
            }
            _ => Rule { capacity, ..*self },
        })
    }

    /// The largest capacity a window rule can hold: window algorithms pack counts into the bits
    /// the window index leaves free; the all-ones count is never valid so that the retired
    /// marker (`u64::MAX`) is never a real state. (Only asked of window rules.)
    pub(crate) fn max_window_capacity(&self) -> u64 {
        (1u64 << self.aux.min(63)) - 2
    }

    /// Tries to take `cost` (which must be `<= capacity`). When denied, the returned state may
    /// still differ from the input: that is the block being started.
    #[inline]
    pub(crate) fn acquire(&self, state: u64, now: u64, cost: u64) -> Step {
        debug_assert!(cost <= self.capacity);
        match self.kind {
            Kind::TokenBucket => token_bucket::acquire(self, state, clamp(now), cost),
            Kind::FixedWindow => fixed_window::acquire(self, state, clamp(now), cost),
            Kind::SlidingWindow => sliding_window::acquire(self, state, clamp(now), cost),
        }
    }

    /// What [`acquire`](Self::acquire) would answer, without starting a block (a denial
    /// returns the state unchanged).
    #[inline]
    pub(crate) fn peek(&self, state: u64, now: u64, cost: u64) -> Step {
        let step = self.acquire(state, now, cost);
        if step.allowed {
            step
        } else {
            Step { allowed: false, state }
        }
    }

    /// The state with no more quota than a key that was emptied at `t0` (and left alone since):
    /// a token bucket with no token at `t0`, refilling after it; a window whose count is the
    /// whole capacity in the window of `t0`. A state already as empty, or ahead of `t0` (a
    /// block, time gone backwards), is returned unchanged. What a degraded node starts its
    /// share of a key from when the store stops answering (see `distributed`).
    pub(crate) fn empty_since(&self, state: u64, t0: u64) -> u64 {
        let t0 = clamp(t0);
        match self.kind {
            Kind::TokenBucket => token_bucket::empty_since(self, state, t0),
            Kind::FixedWindow => fixed_window::empty_since(self, state, t0),
            Kind::SlidingWindow => sliding_window::empty_since(self, state, t0),
        }
    }

    /// Gives back up to `cost` that was taken at time `taken_at`. Never raises the key above a
    /// fresh key, and for windows only gives back to the window the cost was taken from.
    pub(crate) fn refund(&self, state: u64, now: u64, cost: u64, taken_at: u64) -> u64 {
        match self.kind {
            Kind::TokenBucket => token_bucket::refund(self, state, clamp(now), cost),
            Kind::FixedWindow => fixed_window::refund(self, state, clamp(now), cost, clamp(taken_at)),
            Kind::SlidingWindow => sliding_window::refund(self, state, clamp(now), cost, clamp(taken_at)),
        }
    }

    /// True when the state answers every future check exactly as a fresh key would, so the key
    /// can be forgotten without losing information.
    pub(crate) fn is_fresh(&self, state: u64, now: u64) -> bool {
        let now = clamp(now);
        match self.kind {
            Kind::TokenBucket => state <= now,
            Kind::FixedWindow => fixed_window::used(self, state, now) == 0,
            Kind::SlidingWindow => sliding_window::is_fresh(self, state, now),
        }
    }

    /// How much a check of cost 1 could still take after this state, at `now`.
    pub(crate) fn remaining(&self, state: u64, now: u64) -> u64 {
        let now = clamp(now);
        match self.kind {
            Kind::TokenBucket => token_bucket::remaining(self, state, now),
            Kind::FixedWindow => self.capacity.saturating_sub(fixed_window::used(self, state, now)),
            Kind::SlidingWindow => self.capacity.saturating_sub(sliding_window::estimate(self, state, now)),
        }
    }

    /// True when under a fifth of the quota is left (`remaining * 5 < capacity`), without a
    /// division for the token bucket.
    #[cfg(feature = "metrics")]
    #[inline]
    pub(crate) fn near_limit(&self, state: u64, now: u64) -> bool {
        match self.kind {
            Kind::TokenBucket => {
                // remaining = floor(free / period) < ceil(capacity / 5). free <= aux and the
                // threshold <= capacity * period = aux, so both fit a u64 (aux saturates).
                let now = clamp(now);
                let free = now.saturating_add(self.aux).saturating_sub(state.max(now));
                free < self.capacity.div_ceil(5).saturating_mul(self.period)
            }
            _ => self.remaining(state, now).saturating_mul(5) < self.capacity,
        }
    }

    /// The near-limit test of a token bucket as one add and one compare: `Some(slack)` such
    /// that `near_limit(state, now)` is exactly `state > clamp(now) + slack`. `None` for the
    /// window algorithms, and for a bucket whose `aux` is so large that `now + aux` could
    /// overflow (then [`near_limit`](Self::near_limit) answers).
    ///
    /// With `T = ceil(capacity / 5) * period <= aux` and `now + aux` in range,
    /// `free = now + aux - max(state, now) < T` is `max(state, now) > now + (aux - T)`, and
    /// `now > now + (aux - T)` never holds.
    #[cfg(feature = "metrics")]
    pub(crate) fn near_limit_slack(&self) -> Option<u64> {
        match self.kind {
            Kind::TokenBucket if self.aux <= u64::MAX - MAX_TIME_NS => {
                Some(self.aux - self.capacity.div_ceil(5).saturating_mul(self.period))
            }
            _ => None,
        }
    }

    /// Nanoseconds until the key is back to a fresh key's quota if nothing more is taken.
    pub(crate) fn reset_after(&self, state: u64, now: u64) -> u64 {
        let now = clamp(now);
        match self.kind {
            Kind::TokenBucket => state.saturating_sub(now),
            Kind::FixedWindow => fixed_window::reset_after(self, state, now),
            Kind::SlidingWindow => sliding_window::reset_after(self, state, now),
        }
    }

    /// Nanoseconds until a check of `cost` would be allowed if nothing else is taken meanwhile.
    pub(crate) fn retry_after(&self, state: u64, now: u64, cost: u64) -> u64 {
        let now = clamp(now);
        match self.kind {
            Kind::TokenBucket => token_bucket::retry_after(self, state, now, cost),
            Kind::FixedWindow => fixed_window::retry_after(self, state, now, cost),
            Kind::SlidingWindow => sliding_window::retry_after(self, state, now, cost),
        }
    }
}

#[cfg(test)]
mod tests;
