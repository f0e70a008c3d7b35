//! Distributed mode, node side: claimed quota spent locally, exchanged with the store in
//! batches by one sync task per [`Node`].
//!
//! A synchronous check never waits for the store. Per key the node holds *claimed* tokens; a
//! check is one compare-and-swap that takes from them. Every `sync_interval` (sooner, at most
//! ten times an interval, when a key runs low) the node sends one batch per `batch_size` keys:
//! per key what it keeps, what it returns and what it wants, sized from the key's recent
//! demand. Only *hot* keys (see `heat`) hold tokens ahead of their checks; a check that may
//! wait (`check_async`) on a key whose held tokens do not cover it claims what it needs at once,
//! in one store call shared with every other key asked for meanwhile (a claim on demand). The store
//! (see [`crate::store`]) never lets the tokens it holds plus the tokens all nodes hold exceed
//! the capacity, so the nodes together admit at most what one exact limiter would, plus the
//! cold-start allowance:
//!
//! > over any interval of length `d`, the cost admitted for a key by all nodes together is at
//! > most `capacity + rate * d + N * n`, where `N` is the number of nodes and `n` the
//! > `ColdStart::Optimistic(n)` allowance (0 with `ColdStart::Deny`, the default).
//!
//! Failures admit less, never more: a batch whose reply is lost counts as granting nothing
//! and as having taken back everything it returned; it is never sent again. Held tokens are
//! leases: a node stops spending them one lease after the sync that granted them (the store
//! stops counting them between one and two leases after that sync), and window tokens die
//! with their window.

mod ask;
mod breaker;
mod cell;
mod claims;
mod demand;
mod heat;
mod identifier;
#[cfg(all(test, tollgate_loom))]
mod loom_models;
mod node;
mod setup;

pub use breaker::CircuitState;
pub(crate) use claims::{Ask, DistKeys, Outcome};
pub use identifier::Identifier;
pub use node::{ColdStart, FailurePolicy, Node, NodeBuilder, NodeError, NodeStats};
pub use setup::sizing_advice;
pub(crate) use setup::{dist_keys, SetupError};
