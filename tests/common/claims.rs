//! Building store claims in tests.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::store::{Claim, Limits, StoreKey};

/// The next sequence number: every claim built with [`claim`] is newer than the ones built
/// before it in this process, as a node numbers its syncs.
pub fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A claim for `key`: what the node keeps and returns, what it wants, and its window; its
/// sequence number is the next one.
pub fn claim(key: &StoreKey, limits: Limits, kept: u64, returned: u64, wanted: u64, window: u64) -> Claim {
    claim_seq(key, limits, kept, returned, wanted, window, next_seq())
}

/// [`claim`] with the given sequence number.
pub fn claim_seq(
    key: &StoreKey,
    limits: Limits,
    kept: u64,
    returned: u64,
    wanted: u64,
    window: u64,
    seq: u64,
) -> Claim {
    Claim {
        key: key.clone(),
        limits,
        kept,
        returned,
        wanted,
        window,
        seq,
    }
}
