//! One key's state: a single `AtomicU64` updated by a CAS loop around the pure algorithm.
//!
//! A cell can be *retired* by the table's sweeper: the sweeper swaps a state that is
//! indistinguishable from fresh for the `RETIRED` marker with a compare-and-swap, so a grant
//! that lands first makes the retirement fail, and a retirement that lands first makes the
//! grant see the marker and start again on a new cell. Either way no grant is lost or doubled
//! (modelled in `loom_models`).

use crate::algorithm::{Rule, Step};
use crate::consts::RETIRED;
use crate::sync::{AtomicU64, Ordering};

/// The cell was retired by the sweeper; look the key up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retired;

#[derive(Debug)]
pub(crate) struct Cell(AtomicU64);

impl Default for Cell {
    fn default() -> Self {
        Cell(AtomicU64::new(0))
    }
}

impl Cell {
    /// Applies `f` to the state until the CAS succeeds; `f` returns the new state and a value.
    #[inline]
    fn update<R>(&self, mut f: impl FnMut(u64) -> (u64, R)) -> Result<R, Retired> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            if cur == RETIRED {
                return Err(Retired);
            }
            let (next, out) = f(cur);
            if next == cur {
                return Ok(out);
            }
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(out),
                Err(actual) => cur = actual,
            }
        }
    }

    #[inline]
    pub(crate) fn acquire(&self, rule: &Rule, now: u64, cost: u64) -> Result<Step, Retired> {
        self.update(|s| {
            let step = rule.acquire(s, now, cost);
            (step.state, step)
        })
    }

    /// [`acquire`](Self::acquire) from a state no fuller than a key emptied at `empty_at`
    /// ([`Rule::empty_since`]).
    pub(crate) fn acquire_after_empty(&self, rule: &Rule, now: u64, cost: u64, empty_at: u64) -> Result<Step, Retired> {
        self.update(|s| {
            let step = rule.acquire(rule.empty_since(s, empty_at), now, cost);
            (step.state, step)
        })
    }

    /// [`peek`](Self::peek) from a state no fuller than a key emptied at `empty_at`.
    pub(crate) fn peek_after_empty(&self, rule: &Rule, now: u64, cost: u64, empty_at: u64) -> Result<Step, Retired> {
        match self.0.load(Ordering::Acquire) {
            RETIRED => Err(Retired),
            s => Ok(rule.peek(rule.empty_since(s, empty_at), now, cost)),
        }
    }

    pub(crate) fn peek(&self, rule: &Rule, now: u64, cost: u64) -> Result<Step, Retired> {
        match self.0.load(Ordering::Acquire) {
            RETIRED => Err(Retired),
            s => Ok(rule.peek(s, now, cost)),
        }
    }

    /// Gives back `cost` taken at `taken_at`. A retired cell was fresh, so there is nothing to
    /// give back to it.
    pub(crate) fn refund(&self, rule: &Rule, now: u64, cost: u64, taken_at: u64) {
        let _ = self.update(|s| (rule.refund(s, now, cost, taken_at), ()));
    }

    /// Marks the cell retired if its state is indistinguishable from fresh at `now`.
    pub(crate) fn retire_if_fresh(&self, rule: &Rule, now: u64) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        cur != RETIRED
            && rule.is_fresh(cur, now)
            && self
                .0
                .compare_exchange(cur, RETIRED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.0.load(Ordering::Acquire) == RETIRED
    }

    #[cfg(all(test, tollgate_loom))]
    pub(crate) fn state(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The broken twin used by the loom models: retires with a load and a store, so a grant
    /// made between the two is lost.
    #[cfg(all(test, tollgate_loom))]
    pub(crate) fn retire_if_fresh_racy(&self, rule: &Rule, now: u64) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        if cur != RETIRED && rule.is_fresh(cur, now) {
            loom::thread::yield_now();
            self.0.store(RETIRED, Ordering::Release);
            return true;
        }
        false
    }

    /// The broken twin of `acquire`: load, compute, store.
    #[cfg(all(test, tollgate_loom))]
    pub(crate) fn acquire_racy(&self, rule: &Rule, now: u64, cost: u64) -> Result<Step, Retired> {
        let cur = self.0.load(Ordering::Acquire);
        if cur == RETIRED {
            return Err(Retired);
        }
        let step = rule.acquire(cur, now, cost);
        self.0.store(step.state, Ordering::Release);
        Ok(step)
    }

    /// The broken twin of `refund` for all-or-nothing rollbacks: restores the state seen before
    /// the grant, erasing whatever other threads took in between.
    #[cfg(all(test, tollgate_loom))]
    pub(crate) fn restore_racy(&self, before: u64) {
        self.0.store(before, Ordering::Release);
    }
}
