//! One key's claim on demand: the cost checks waiting for a claim have asked for, and whether
//! the key is in its limiter's queue of keys to claim.
//!
//! A waiting check adds its cost, then raises the flag; the claim that takes the key (under the
//! node's sync lock) lowers the flag, then takes the cost. Both are read-modify-writes, so a
//! cost added while a claim takes the key is either in that claim or finds the flag down and
//! queues the key anew: an ask is never left with neither a claim nor a queue entry (modelled
//! in `loom_models`, with the broken twin that takes the cost before lowering the flag).

use crate::sync::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct AskCell {
    /// Cost asked for, not yet sent.
    cost: AtomicU64,
    /// The key is in its limiter's queue.
    queued: AtomicBool,
    /// Take the cost before lowering the flag (loom models only).
    #[cfg(all(test, tollgate_loom))]
    broken: bool,
}

impl AskCell {
    /// Adds `cost`; true when the key must join the queue (it was not in it).
    pub(crate) fn ask(&self, cost: u64) -> bool {
        self.cost.fetch_add(cost, Ordering::AcqRel);
        !self.queued.swap(true, Ordering::AcqRel)
    }

    /// Takes the cost asked for (the claim, under the sync lock).
    pub(crate) fn take(&self) -> u64 {
        #[cfg(all(test, tollgate_loom))]
        if self.broken {
            let cost = self.cost.swap(0, Ordering::AcqRel);
            self.queued.swap(false, Ordering::AcqRel);
            return cost;
        }
        self.queued.swap(false, Ordering::AcqRel);
        self.cost.swap(0, Ordering::AcqRel)
    }

    /// Cost asked for and not yet taken.
    pub(crate) fn pending(&self) -> u64 {
        self.cost.load(Ordering::Acquire)
    }

    /// Whether the key is in the queue.
    pub(crate) fn is_queued(&self) -> bool {
        self.queued.load(Ordering::Acquire)
    }

    /// The broken twin (loom models only).
    #[cfg(all(test, tollgate_loom))]
    pub(crate) fn broken() -> Self {
        AskCell {
            broken: true,
            ..AskCell::default()
        }
    }
}
