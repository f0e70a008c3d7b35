//! In-process state: one atomic cell per key, and the bounded table of cells.
//!
//! The cells own the compare-and-swap loops around the pure algorithms; the table owns the
//! keys, the bound on their number, and eviction. Neither knows about Redis.

pub(crate) mod cell;
pub(crate) mod table;

#[cfg(all(test, tollgate_loom))]
mod loom_models;
#[cfg(all(test, not(tollgate_loom)))]
mod tests;
