//! Building store claims in tests.

use tollgate::store::{Claim, Limits, StoreKey};

/// A claim for `key`: what the node keeps and returns, what it wants, and its window.
pub fn claim(key: &StoreKey, limits: Limits, kept: u64, returned: u64, wanted: u64, window: u64) -> Claim {
    Claim {
        key: key.clone(),
        limits,
        kept,
        returned,
        wanted,
        window,
    }
}
