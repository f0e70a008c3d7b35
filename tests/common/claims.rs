//! Building store claims in tests.

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::store::{Claim, Limits, StoreKey};

/// Sequence numbers for [`claim`]: every claim a test builds is newer than the ones before it.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// A claim for `key`: what the node keeps and returns, what it wants, and its window; newer
/// than every claim built before it.
pub fn claim(key: &StoreKey, limits: Limits, kept: u64, returned: u64, wanted: u64, window: u64) -> Claim {
    Claim {
        key: key.clone(),
        limits,
        kept,
        returned,
        wanted,
        window,
        seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
    }
}
