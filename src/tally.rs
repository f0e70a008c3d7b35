//! Counters for the hot path: per-thread blocks of plain cells, summed when read.
//!
//! A check that counts its decision must not share a cache line with the other threads'
//! checks, take a lock or look anything up by name. Each thread gets a block of counters (a
//! thread-local reference to a leaked block, reused by the next thread when this one exits),
//! and each counted limiter a slot in every block. Only the owning thread writes a block, so a
//! count is a relaxed load and store, no read-modify-write; readers sum the slot over all
//! blocks. Limiters beyond the slots, and threads whose thread-local storage is being torn
//! down, count in shared atomics instead.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Limiters counted in the per-thread blocks; more are counted in shared atomics.
const SLOTS: usize = 64;

/// What is counted per limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Allowed = 0,
    Denied = 1,
    /// Allowed, leaving under a fifth of the quota.
    NearLimit = 2,
}

const KINDS: usize = 3;

/// A tally without a slot: counted in its shared atomics.
const NO_SLOT: usize = usize::MAX;
/// A tally that counts nothing (a limiter built with metrics off).
const OFF: usize = usize::MAX - 1;

/// One tally's counters in one thread's block.
#[repr(transparent)]
pub(crate) struct Cells([AtomicU64; KINDS]);

impl Cells {
    /// Counts one `kind`. Only the block's thread writes it: a load and a store.
    #[inline(always)]
    pub(crate) fn bump(&self, kind: Kind) {
        let a = &self.0[kind as usize];
        a.store(a.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

#[repr(transparent)]
struct Block([Cells; SLOTS]);

/// Every block ever made (never freed: a block outlives its thread, so that its counts stay).
static BLOCKS: Mutex<Vec<&'static Block>> = Mutex::new(Vec::new());
/// Blocks whose thread has exited, ready for the next thread.
static FREE_BLOCKS: Mutex<Vec<&'static Block>> = Mutex::new(Vec::new());
/// Slots whose limiter was dropped.
static FREE_SLOTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// Gives the thread's block back when the thread exits.
struct Owned(&'static Block);

impl Drop for Owned {
    fn drop(&mut self) {
        MINE.with(|m| m.set(std::ptr::null()));
        FREE_BLOCKS.lock().push(self.0);
    }
}

fn acquire() -> &'static Block {
    if let Some(b) = FREE_BLOCKS.lock().pop() {
        return b;
    }
    let b: &'static Block = Box::leak(Box::new(Block(std::array::from_fn(|_| {
        Cells(std::array::from_fn(|_| AtomicU64::new(0)))
    }))));
    BLOCKS.lock().push(b);
    b
}

thread_local! {
    /// The thread's block: a plain pointer (no destructor, so reading it is one load); null
    /// before the first count and after the thread's teardown began.
    static MINE: std::cell::Cell<*const Block> = const { std::cell::Cell::new(std::ptr::null()) };
    static OWNED: std::cell::RefCell<Option<Owned>> = const { std::cell::RefCell::new(None) };
}

/// The thread's block, taking one on first use; `None` while the thread is being torn down.
fn claim_block() -> Option<&'static Block> {
    OWNED
        .try_with(|o| {
            let mut o = o.borrow_mut();
            let b = match &*o {
                Some(owned) => owned.0,
                None => {
                    let b = acquire();
                    *o = Some(Owned(b));
                    b
                }
            };
            MINE.with(|m| m.set(b));
            b
        })
        .ok()
}

fn sum_slot(slot: usize, kind: Kind) -> u64 {
    BLOCKS
        .lock()
        .iter()
        .map(|b| b.0[slot].0[kind as usize].load(Ordering::Relaxed))
        .sum()
}

/// One limiter's counters.
pub(crate) struct Tally {
    /// The tally's slot in every block, or `NO_SLOT`, or `OFF`.
    slot: usize,
    /// `slot * size_of::<Cells>()`: where the slot's cells start in a block; beyond the block
    /// for `NO_SLOT` and `OFF` (one compare on the hot path).
    offset: usize,
    /// Counts already in the slot when this tally took it (from a dropped limiter).
    baseline: [u64; KINDS],
    shared: [AtomicU64; KINDS],
}

impl Tally {
    pub(crate) fn new() -> Tally {
        let slot = FREE_SLOTS.lock().pop().or_else(|| {
            NEXT_SLOT
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < SLOTS).then_some(n + 1))
                .ok()
        });
        let baseline = match slot {
            Some(s) => [Kind::Allowed, Kind::Denied, Kind::NearLimit].map(|k| sum_slot(s, k)),
            None => [0; KINDS],
        };
        let slot = slot.unwrap_or(NO_SLOT);
        Tally {
            slot,
            offset: slot.saturating_mul(std::mem::size_of::<Cells>()),
            baseline,
            shared: Default::default(),
        }
    }

    /// A tally that counts nothing: [`mine`](Self::mine) is `None` and [`bump`](Self::bump)
    /// does nothing.
    pub(crate) fn off() -> Tally {
        Tally {
            slot: OFF,
            offset: usize::MAX,
            baseline: [0; KINDS],
            shared: Default::default(),
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.slot != OFF
    }

    /// This thread's cells of the tally: `None` when the tally has no slot or is off, and
    /// before the thread's first count (then [`bump`](Self::bump) counts, and takes the
    /// thread's block). A compare, a thread-local load and a null test.
    #[inline(always)]
    pub(crate) fn mine(&self) -> Option<&'static Cells> {
        if self.offset >= SLOTS * std::mem::size_of::<Cells>() {
            return None;
        }
        let mine = MINE.with(|m| m.get());
        if mine.is_null() {
            return None;
        }
        // SAFETY: a non-null pointer is a leaked block, valid for the whole process, and an
        // offset below the block's size is `slot * size_of::<Cells>()` with `slot < SLOTS`:
        // the start of the slot's cells inside the block.
        Some(unsafe { &*mine.cast::<u8>().add(self.offset).cast::<Cells>() })
    }

    /// Counts one `kind` when [`mine`](Self::mine) is `None`: takes the thread's block if it
    /// has none yet, and counts in the shared atomics without a slot or a block.
    #[cold]
    pub(crate) fn bump(&self, kind: Kind) {
        if self.slot == OFF {
            return;
        }
        if self.slot < SLOTS {
            if let Some(b) = claim_block() {
                b.0[self.slot].bump(kind);
                return;
            }
        }
        self.shared[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The count so far (a snapshot: counts made while it sums may or may not be in it).
    pub(crate) fn get(&self, kind: Kind) -> u64 {
        let shared = self.shared[kind as usize].load(Ordering::Relaxed);
        match self.own_slot() {
            Some(s) => shared + sum_slot(s, kind).wrapping_sub(self.baseline[kind as usize]),
            None => shared,
        }
    }

    fn own_slot(&self) -> Option<usize> {
        (self.slot < SLOTS).then_some(self.slot)
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if let Some(s) = self.own_slot() {
            FREE_SLOTS.lock().push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up_exactly() {
        let t = std::sync::Arc::new(Tally::new());
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 * (i + 1) {
                        t.bump(Kind::Allowed);
                    }
                    t.bump(Kind::Denied);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(t.get(Kind::Allowed), 10_000);
        assert_eq!(t.get(Kind::Denied), 4);
        assert_eq!(t.get(Kind::NearLimit), 0);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let a = Tally::new();
        for _ in 0..7 {
            a.bump(Kind::Denied);
        }
        drop(a);
        // Whichever slot the next tally gets, it starts at zero.
        let b = Tally::new();
        assert_eq!(b.get(Kind::Denied), 0);
        b.bump(Kind::Denied);
        assert_eq!(b.get(Kind::Denied), 1);
    }

    #[test]
    fn beyond_the_slots_counts_are_shared_and_still_exact() {
        let many: Vec<Tally> = (0..SLOTS + 3).map(|_| Tally::new()).collect();
        for (i, t) in many.iter().enumerate() {
            for _ in 0..i {
                t.bump(Kind::NearLimit);
            }
        }
        for (i, t) in many.iter().enumerate() {
            assert_eq!(t.get(Kind::NearLimit), i as u64);
        }
    }
}
