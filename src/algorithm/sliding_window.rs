//! Sliding window, two-counter approximation.
//!
//! The state packs the window index (high bits), the previous window's count and the current
//! window's count (`aux` bits each). At `e` nanoseconds into the current window the estimate is
//! `cur + ceil(prev * (W - e) / W)`: the previous window's count weighted by how much of it the
//! sliding interval of length `W` still covers (rounded up, so the estimate never undercounts the
//! model). A check is allowed when `estimate + cost <= capacity`. Every aligned window therefore
//! holds at most `capacity`; the weighting assumes the previous window's requests were spread
//! evenly, which is the approximation.
//!
//! An earlier `now` than the stored window (time went backwards, or a block reaching into a
//! future window) is answered at the start of the stored window, with the full weight of `prev`:
//! never a refund.

use super::{Rule, Step};

struct View {
    idx: u64,
    prev: u64,
    cur: u64,
    /// Nanoseconds into window `idx` at which the view is evaluated.
    elapsed: u64,
}

#[inline]
fn view(r: &Rule, state: u64, now: u64) -> View {
    let bits = r.aux;
    let mask = (1u64 << bits) - 1;
    let (idx, prev, cur) = (state >> (2 * bits), (state >> bits) & mask, state & mask);
    let now_idx = now / r.period;
    let elapsed = now % r.period;
    match now_idx.checked_sub(idx) {
        Some(0) => View {
            idx,
            prev,
            cur,
            elapsed,
        },
        Some(1) => View {
            idx: now_idx,
            prev: cur,
            cur: 0,
            elapsed,
        },
        Some(_) => View {
            idx: now_idx,
            prev: 0,
            cur: 0,
            elapsed,
        },
        None => View {
            idx,
            prev,
            cur,
            elapsed: 0,
        },
    }
}

#[inline]
fn pack(r: &Rule, v: &View) -> u64 {
    (v.idx << (2 * r.aux)) | (v.prev << r.aux) | v.cur
}

#[inline]
fn weighted(r: &Rule, v: &View) -> u64 {
    let w = r.period as u128;
    let num = v.prev as u128 * (w - v.elapsed as u128);
    v.cur + num.div_ceil(w) as u64
}

/// Empty at `t0`: the whole capacity counted in the window of `t0`, the previous window's count
/// kept; a state already in a later window is left as it is.
pub(super) fn empty_since(r: &Rule, state: u64, t0: u64) -> u64 {
    let mut v = view(r, state, t0);
    if v.idx != t0 / r.period {
        return state;
    }
    v.cur = v.cur.max(r.capacity);
    pack(r, &v)
}

#[inline]
pub(super) fn acquire(r: &Rule, state: u64, now: u64, cost: u64) -> Step {
    let mut v = view(r, state, now);
    if weighted(r, &v) + cost <= r.capacity {
        v.cur += cost;
        return Step {
            allowed: true,
            state: pack(r, &v),
        };
    }
    // A denial still records that the window moved on: a later `now` from before the
    // boundary must not see the old window again.
    let state = if r.block > 0 && v.idx == now / r.period {
        let blocked = View {
            idx: (now + r.block) / r.period,
            prev: r.capacity,
            cur: r.capacity,
            elapsed: 0,
        };
        pack(r, &blocked)
    } else {
        pack(r, &v)
    };
    Step { allowed: false, state }
}

pub(super) fn refund(r: &Rule, state: u64, now: u64, cost: u64, taken_at: u64) -> u64 {
    let mut v = view(r, state, now);
    let taken_idx = taken_at / r.period;
    if v.idx == taken_idx {
        v.cur = v.cur.saturating_sub(cost);
    } else if v.idx == taken_idx + 1 {
        v.prev = v.prev.saturating_sub(cost);
    } else {
        return state;
    }
    pack(r, &v)
}

pub(super) fn estimate(r: &Rule, state: u64, now: u64) -> u64 {
    weighted(r, &view(r, state, now))
}

pub(super) fn is_fresh(r: &Rule, state: u64, now: u64) -> bool {
    let v = view(r, state, now);
    v.prev == 0 && v.cur == 0
}

pub(super) fn reset_after(r: &Rule, state: u64, now: u64) -> u64 {
    let v = view(r, state, now);
    let end = if v.cur > 0 {
        v.idx + 2
    } else if v.prev > 0 {
        v.idx + 1
    } else {
        return 0;
    };
    (end * r.period).saturating_sub(now)
}

pub(super) fn retry_after(r: &Rule, state: u64, now: u64, cost: u64) -> u64 {
    let v = view(r, state, now);
    if weighted(r, &v) + cost <= r.capacity {
        return 0;
    }
    let w = r.period as u128;
    let start = v.idx * r.period;
    // Later in this window, as the previous window's weight decays. (`prev > 0` here: with
    // `prev == 0` the estimate is `cur`, and the check above would have allowed. When the
    // decay alone is not enough, `e == w`: the start of the next window, as below.)
    if v.cur + cost <= r.capacity {
        let room = (r.capacity - v.cur - cost) as u128;
        let e = w - (room * w / v.prev as u128).min(w);
        let at = start + (e as u64).max(v.elapsed);
        return at.saturating_sub(now);
    }
    // In the next window, where this window's count becomes the decaying one.
    let room = (r.capacity - cost) as u128;
    let e = if v.cur == 0 {
        0
    } else {
        w - (room * w / v.cur as u128).min(w)
    };
    (start + r.period + e as u64).saturating_sub(now)
}
