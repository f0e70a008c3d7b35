//! The one place that chooses between std and loom atomics.
//!
//! Everything that takes part in a lock-free protocol (the cells, the key counter of the table)
//! imports its atomics from here. Under `--cfg tollgate_loom` the loom versions are used so the
//! models in `local::loom_models` explore every interleaving. The crate's own cfg is used rather
//! than plain `loom`, which changes how tokio compiles and breaks `tokio::net`.

#[cfg(not(tollgate_loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(tollgate_loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
