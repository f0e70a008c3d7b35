//! The bounded keyed table.
//!
//! papaya's lock-free map holds one [`Cell`] per key. A lookup takes a papaya guard (which marks
//! only this thread's own slot) and reads the map: nothing shared is written, so reads scale
//! with cores (a `RwLock`/`DashMap` shard lock would write its lock word on every read).
//!
//! The number of keys never exceeds `max_keys`: an insert first reserves a place in an atomic
//! counter. When the table is full the inserting thread sweeps it (at most once per
//! `MIN_SWEEP_INTERVAL_NS`, one sweeper at a time) and retires only keys whose state is
//! indistinguishable from fresh: a full bucket or an empty window holds no information, so
//! forgetting it changes no answer. A throttled key is never fresh, so a flood of new keys
//! cannot push it out and reset it. When nothing can be retired the new key is not tracked:
//! the caller answers it from the shared overflow cell, or denies it.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use papaya::{Guard, HashMap, LocalGuard};
use parking_lot::Mutex;

use super::cell::Cell;
use crate::algorithm::Rule;
use crate::consts::MIN_SWEEP_INTERVAL_NS;

/// The map every keyed table uses: papaya with ahash, sized for up to 64k keys up front.
///
/// Blocking resizes: an incremental resize that never finishes (no more inserts) leaves every
/// lookup searching two tables (measured: 61 ns instead of 37 ns per check over 10k keys in
/// benches/compare.rs).
pub(crate) fn keyed_map<K, V>(max_keys: usize) -> HashMap<K, V, ahash::RandomState> {
    HashMap::builder()
        .hasher(ahash::RandomState::new())
        .capacity(max_keys.min(1 << 16))
        .resize_mode(papaya::ResizeMode::Blocking)
        .build()
}

pub(crate) struct Table<K> {
    map: HashMap<K, Cell, ahash::RandomState>,
    len: AtomicUsize,
    max_keys: usize,
    sweeping: Mutex<()>,
    last_sweep: AtomicU64,
    evicted: AtomicU64,
}

impl<K: Hash + Eq + Send + Sync + 'static> Table<K> {
    pub(crate) fn new(max_keys: usize) -> Self {
        Table {
            map: keyed_map(max_keys),
            len: AtomicUsize::new(0),
            max_keys,
            sweeping: Mutex::new(()),
            last_sweep: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn guard(&self) -> LocalGuard<'_> {
        self.map.guard()
    }

    #[inline]
    pub(crate) fn get<'g, Q>(&self, key: &Q, guard: &'g LocalGuard<'_>) -> Option<&'g Cell>
    where
        K: Borrow<Q> + 'g,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key, guard)
    }

    /// Inserts a fresh cell for `key` (or returns the one another thread inserted first).
    /// `None` when the table is full and a sweep freed nothing.
    pub(crate) fn insert<'g, Q>(&self, key: &Q, guard: &'g LocalGuard<'_>, rule: &Rule, now: u64) -> Option<&'g Cell>
    where
        K: Borrow<Q> + 'g,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.reserve() {
            self.sweep(rule, now, false);
            if !self.reserve() {
                return None;
            }
        }
        match self.map.try_insert(key.to_owned(), Cell::default(), guard) {
            Ok(cell) => Some(cell),
            Err(occupied) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                Some(occupied.current)
            }
        }
    }

    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok()
    }

    /// Removes `key` if its cell is retired (by whoever sees it first).
    pub(crate) fn unlink_retired<Q>(&self, key: &Q, guard: &LocalGuard<'_>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Ok(Some(_)) = self.map.remove_if(key, |_, c| c.is_retired(), guard) {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Retires and removes every key that is indistinguishable from fresh at `now`. Unless
    /// `force`, does nothing when another sweep is running or one ran less than
    /// `MIN_SWEEP_INTERVAL_NS` ago. Returns how many keys were removed.
    pub(crate) fn sweep(&self, rule: &Rule, now: u64, force: bool) -> usize {
        let _lock = if force {
            self.sweeping.lock()
        } else {
            let last = self.last_sweep.load(Ordering::Relaxed);
            if last != 0 && now.saturating_sub(last) < MIN_SWEEP_INTERVAL_NS {
                return 0;
            }
            match self.sweeping.try_lock() {
                Some(l) => l,
                None => return 0,
            }
        };
        self.last_sweep.store(now.max(1), Ordering::Relaxed);
        let guard = self.map.guard();
        let mut removed = 0;
        for (key, cell) in self.map.iter(&guard) {
            if cell.retire_if_fresh(rule, now) {
                if let Ok(Some(_)) = self.map.remove_if(key, |_, c| c.is_retired(), &guard) {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    removed += 1;
                }
            }
        }
        // Tell the collector it may reclaim what was removed once readers move on.
        guard.flush();
        self.evicted.fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}
