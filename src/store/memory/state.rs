//! The stored state of a key, as the Lua scripts store it, and the arithmetic both algorithms'
//! steps share.

use crate::store::{ClaimOutcome, NodeId};

pub(super) const TWO20: i64 = 1 << 20;
pub(super) const TWO32: i64 = 1 << 32;

#[derive(Clone, Debug)]
pub(super) enum State {
    Bucket(Bucket),
    /// `(window id mod 2^20) * 2^32 + used`, as the script stores it.
    Fixed(i64),
    Sliding {
        w: i64,
        prev: i64,
        cur: i64,
    },
    /// Data that is not tollgate state (tests use it to emulate `WRONGTYPE`).
    Foreign,
}

#[derive(Clone, Debug)]
pub(super) struct Bucket {
    pub(super) e: i64,
    pub(super) ep: i64,
    pub(super) cur: i64,
    pub(super) prev: i64,
    pub(super) x: i64,
    /// The holding records: only nodes that hold tokens (see `token_bucket`).
    pub(super) nodes: Vec<Holding>,
}

/// One node's holding record in a token bucket.
#[derive(Clone, Copy, Debug)]
pub(super) struct Holding {
    pub(super) node: NodeId,
    /// The lease epoch of the node's last applied claim.
    pub(super) epoch: i64,
    /// Tokens the node holds since then (> 0).
    pub(super) amount: i64,
    /// The sequence number of that claim.
    pub(super) seq: i64,
}

/// Bytes of a token bucket's value in Redis: the header, then one record per holding node
/// (`lua/token_bucket.lua`).
pub(super) const BUCKET_HEADER_LEN: usize = 41;
pub(super) const BUCKET_RECORD_LEN: usize = 32;
/// Bytes of a sliding window's value in Redis.
pub(super) const SLIDING_LEN: usize = 16;

#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) state: State,
    /// Absolute expiry in milliseconds of the store's clock.
    pub(super) expires_ms: i64,
}

/// A claim's outcome and the key's state after it (none: the key is deleted).
pub(super) type Applied = (ClaimOutcome, Option<Entry>);

pub(super) fn ceil_div(a: i64, b: i64) -> i64 {
    // b > 0; a may be negative only in degenerate cases, where this rounds towards +inf too.
    a.div_euclid(b) + i64::from(a.rem_euclid(b) != 0)
}
