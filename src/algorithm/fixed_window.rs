//! Fixed window: `capacity` per aligned window of `period` nanoseconds.
//!
//! The state packs the window index (high bits) and the count used in it (the low `aux` bits).
//! The index is stored in full, so comparing it with the index of `now` is exact: a later window
//! starts from 0; the same window continues; an earlier `now` (time went backwards, or the key is
//! blocked into a future window) is answered with the stored window's count, which never
//! refunds. A window boundary resets the count at once, so up to `2 * capacity` can pass in a
//! short interval straddling a boundary: that is the algorithm's known trade-off.

use super::{Rule, Step};

#[inline]
fn split(r: &Rule, state: u64) -> (u64, u64) {
    (state >> r.aux, state & ((1u64 << r.aux) - 1))
}

/// The effective window and its count at `now`.
#[inline]
fn view(r: &Rule, state: u64, now: u64) -> (u64, u64) {
    let now_idx = now / r.period;
    let (idx, used) = split(r, state);
    if now_idx > idx {
        (now_idx, 0)
    } else {
        (idx, used)
    }
}

#[inline]
pub(super) fn acquire(r: &Rule, state: u64, now: u64, cost: u64) -> Step {
    let (idx, used) = view(r, state, now);
    if used + cost <= r.capacity {
        return Step {
            allowed: true,
            state: (idx << r.aux) | (used + cost),
        };
    }
    let now_idx = now / r.period;
    let state = if r.block > 0 && idx == now_idx {
        let until = (now + r.block) / r.period;
        (until << r.aux) | r.capacity
    } else {
        state
    };
    Step { allowed: false, state }
}

pub(super) fn refund(r: &Rule, state: u64, now: u64, cost: u64, taken_at: u64) -> u64 {
    let (idx, used) = view(r, state, now);
    if idx != taken_at / r.period {
        return state;
    }
    (idx << r.aux) | used.saturating_sub(cost)
}

/// Empty at `t0`: the whole capacity used in the window of `t0`. The index is in the high bits,
/// so a later window (or a fuller count in the same one) compares greater.
pub(super) fn empty_since(r: &Rule, state: u64, t0: u64) -> u64 {
    state.max(((t0 / r.period) << r.aux) | r.capacity)
}

pub(super) fn used(r: &Rule, state: u64, now: u64) -> u64 {
    view(r, state, now).1
}

pub(super) fn reset_after(r: &Rule, state: u64, now: u64) -> u64 {
    let (idx, used) = view(r, state, now);
    if used == 0 {
        0
    } else {
        ((idx + 1) * r.period).saturating_sub(now)
    }
}

pub(super) fn retry_after(r: &Rule, state: u64, now: u64, cost: u64) -> u64 {
    let (idx, used) = view(r, state, now);
    if used + cost <= r.capacity {
        0
    } else {
        ((idx + 1) * r.period).saturating_sub(now)
    }
}
