//! The one place that chooses between std and loom synchronization.
//!
//! Everything that takes part in a lock-free protocol (the cells, the key counter of the table,
//! a distributed key's claim) imports its atomics and locks from here. Under
//! `--cfg tollgate_loom` the loom versions are used so the models in `local::loom_models` and
//! `distributed::loom_models` explore every interleaving. The crate's own cfg is used rather
//! than plain `loom`, which changes how tokio compiles and breaks `tokio::net`.

#[cfg(not(tollgate_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(tollgate_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A lock whose `lock` returns the guard (no poisoning): parking_lot's.
#[cfg(not(tollgate_loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard};

#[cfg(tollgate_loom)]
pub(crate) use self::loom_mutex::{Mutex, MutexGuard};

#[cfg(tollgate_loom)]
mod loom_mutex {
    /// loom's mutex with parking_lot's signature: `lock` returns the guard.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    /// The guard of [`Mutex`].
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// Takes the lock. A panic while it was held aborts the model anyway.
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }
    }
}
