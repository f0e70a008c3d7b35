//! Token bucket in GCRA form (the arithmetic of governor's `gcra.rs`).
//!
//! The state is the theoretical arrival time `tat`: the instant at which the bucket will be full
//! again. With `T` nanoseconds per token and `tau = capacity * T`, a key holds
//! `(now + tau - max(tat, now)) / T` tokens. Taking `n` tokens moves `tat` to
//! `max(tat, now) + n * T` and is allowed when that is at most `now + tau`. A `tat` above
//! `now + tau` means the key is blocked (`block_duration`).
//!
//! Time going backwards makes `now` smaller, so fewer tokens appear: it never refunds.

use super::{Rule, Step};

#[inline]
pub(super) fn acquire(r: &Rule, tat: u64, now: u64, cost: u64) -> Step {
    // `Policy::compile` keeps `tau <= 2^62` and `now` is clamped to 2^62, so `limit <= 2^63` and a
    // granted `tat` (at most `limit`) or a block's end (`limit` plus at most a year) never
    // reaches `RETIRED`. Only a `tat` read from outside can be arbitrarily large: saturate.
    let limit = now + r.aux;
    let new_tat = tat.max(now).saturating_add(cost * r.period);
    if new_tat <= limit {
        return Step {
            allowed: true,
            state: new_tat,
        };
    }
    // Denied. Start a block unless one is already running (tat beyond now + tau).
    let state = if r.block > 0 && tat <= limit {
        limit + r.block
    } else {
        tat
    };
    Step { allowed: false, state }
}

/// Empty at `t0`: the bucket is full again one full refill (`tau`) after it.
pub(super) fn empty_since(r: &Rule, tat: u64, t0: u64) -> u64 {
    // `t0` is clamped to 2^62 and `tau <= 2^62` (as in `acquire`): no overflow, never `RETIRED`.
    tat.max(t0 + r.aux)
}

pub(super) fn refund(r: &Rule, tat: u64, now: u64, cost: u64) -> u64 {
    if tat <= now {
        return tat;
    }
    let back = cost.saturating_mul(r.period);
    tat.saturating_sub(back).max(now)
}

pub(super) fn remaining(r: &Rule, tat: u64, now: u64) -> u64 {
    // `now + tau <= 2^63`: see `acquire`.
    ((now + r.aux).saturating_sub(tat.max(now)) / r.period).min(r.capacity)
}

pub(super) fn retry_after(r: &Rule, tat: u64, now: u64, cost: u64) -> u64 {
    let need = tat.max(now) as u128 + cost as u128 * r.period as u128;
    need.saturating_sub(now as u128 + r.aux as u128).min(u64::MAX as u128) as u64
}
