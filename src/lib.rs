//! # tollgate
//!
//! Rate limiting inside the service process: checks are answered in nanoseconds from lock-free
//! per-key state, with no network round trip.
//!
//! ```
//! use tollgate::{Limiter, Policy};
//!
//! // 100 requests per minute per client, refilled continuously (token bucket).
//! let limiter: Limiter = Limiter::new(Policy::per_minute(100)).unwrap();
//! let decision = limiter.check("203.0.113.7");
//! if decision.is_denied() {
//!     let wait = decision.retry_after().unwrap();
//!     println!("429, retry after {} s", wait.as_secs_f64().ceil());
//! }
//! ```
//!
//! ## Modes
//!
//! | mode | state | accuracy |
//! |---|---|---|
//! | local (default: no store) | atomic cells in this process | exact: invariant 1 below |
//! | distributed ([`LimiterBuilder::node`]) | claimed quota per key in this process; the global state in a [`store::Store`] (Redis, or the in-process [`store::MemoryStore`]) | over any interval `d`, all nodes together admit at most `capacity + rate * d + N * n` per key (`n`: the [`ColdStart::Optimistic`] allowance, 0 by default) |
//! | degraded (distributed, the node's circuit breaker open) | tokens already claimed, then the [`FailurePolicy`]: `local_share` (default), `fail_open` or `fail_closed` | `local_share`: all nodes together at most `(capacity + rate * d) x actual nodes / nodes last seen`, plus what they held when the store went away |
//!
//! In distributed mode a check never waits for the store: it spends tokens the node claimed
//! (one compare-and-swap). A [`Node`] runs one sync task that exchanges quota for every
//! limiter built on it, in batches: one store call per `batch_size` keys per sync interval,
//! however many requests arrive. See the [`store`] module for what the store does and
//! [`sim`] (`tollgate tune`) for the measured accuracy. When the store fails, a circuit
//! breaker classifies the errors, stops syncing, probes with backoff and resumes within two
//! sync intervals of the store answering again; checks never wait in any state
//! ([`Decision::is_degraded`] tells when the failure policy answered).
//!
//! ## Algorithms and their exact semantics
//!
//! * **Token bucket** ([`Algorithm::TokenBucket`], default), in GCRA form: a key holds at most
//!   `burst` tokens (default `points`) and regains one every `duration / points` (rounded up to
//!   a whole nanosecond, so never faster than the policy). A request of cost `n` is allowed when
//!   the key holds `n` tokens. Over any interval of length `d`, a key is allowed at most
//!   `burst + points * d / duration`.
//! * **Fixed window** ([`Algorithm::FixedWindow`]): at most `points` per aligned window of
//!   `duration` (windows start at multiples of `duration` since the clock's origin). The count
//!   resets at the boundary, so up to `2 * points` can pass in a short interval around it.
//! * **Sliding window** ([`Algorithm::SlidingWindow`]): the current window's count plus the
//!   previous window's count weighted by the part of it that the interval of length `duration`
//!   ending now still covers (rounded up). At most `points` in every aligned window, and the
//!   boundary burst of a fixed window is smoothed out.
//!
//! All three take a cost per request, answer [`Limiter::peek`] without taking, and take back
//! with [`Limiter::refund`]. A cost above the capacity is an error
//! ([`InsufficientCapacity`], "never"), distinct from a denial ("not now"). With
//! `block_duration`, a denied key stays denied that long (to the end of the window it ends in,
//! for the window algorithms) and then refills from empty.
//!
//! ## Invariant 1: the local bound
//!
//! Over any interval of length `d`, a key's admitted cost is at most
//! `capacity + rate * d` (token bucket) or `points` per aligned window (windows), for any
//! sequence of times, including time going backwards (which never refunds) and huge jumps
//! (times beyond 2^62 ns are clamped). No `u64` input panics. Property tests check this
//! against reference models.
//!
//! ## Memory and eviction
//!
//! A tracked key costs its 8-byte state word, the key, papaya's entry allocation and its share
//! of the table (9 bytes a slot, at least half the slots used): at most **64 bytes for a `u64`
//! key** and 80 bytes plus the string's own allocation for a `String` key, malloc's chunk
//! overhead included (asserted by `tests/memory.rs`). The table holds at most `max_keys` keys (default
//! 1,000,000). When it is full, a sweep removes keys whose state is indistinguishable from a
//! fresh key (a full bucket, an empty window): forgetting them changes no answer. A throttled
//! key is never removed, so a flood of new keys cannot reset it. New keys that find no room
//! share one overflow bucket of the same policy ([`WhenFull::Overflow`], default) or are denied
//! ([`WhenFull::Deny`]): never admitted untracked. Sweeps run by themselves; [`Limiter::sweep`]
//! runs one now.
//!
//! ## Thread safety and cost
//!
//! [`Limiter`] is `Send + Sync` and cheap to clone (an `Arc`). A check reads the map without
//! writing anything shared, reads the clock (a relaxed load with the default [`Clock::cached`])
//! and does one compare-and-swap on the key's own word. It allocates nothing for a key already
//! tracked.
//!
//! ## Cargo features
//!
//! | feature | default | what it adds | run-time cost |
//! |---|---|---|---|
//! | (none) | yes | local mode, distributed mode over [`store::MemoryStore`] | one 1 ms clock thread per process with the default clock |
//! | `cli` | yes | the `tollgate` command line (`tollgate tune`): clap, indicatif, serde_json | none: only the binary uses them |
//! | `redis` | no | `store::RedisStore` (redis-rs, `redis://`), `store::RedisClusterStore` (Redis Cluster) | one multiplexed connection per store (per master on a cluster); a sync task per node |
//! | `redis-tls` | no | `rediss://` through rustls | TLS on the store connection |
//! | `metrics` | no | [`metrics`] (names, descriptions, a publisher) through the `metrics` facade | per check: one thread-local load and store; totals published by nodes after syncs and by a `metrics::Publisher` thread |
//! | `http` | no | `config` (tiers file, validation, hot reload) and `http` (tower `RateLimitLayer`) | per request: one `ArcSwap` load, key formatting without allocation, one check per layer, two small header allocations |

mod algorithm;
mod clock;
#[cfg(feature = "http")]
pub mod config;
mod consts;
mod decision;
mod direct;
mod distributed;
#[cfg(feature = "http")]
pub mod http;
mod intern;
mod limiter;
mod local;
#[cfg(feature = "metrics")]
pub mod metrics;
mod policy;
// The engine of the `tollgate` command line (`tollgate tune`): public for the binary only, not
// part of the library's API.
#[doc(hidden)]
pub mod sim;
pub mod store;
mod sync;
#[cfg(feature = "metrics")]
mod tally;

/// The README's Rust examples, compiled as doc tests (the ones that need a Redis are `no_run`).
#[cfg(all(doctest, feature = "http", feature = "redis-tls"))]
#[doc = include_str!("../README.md")]
mod readme {}

pub use clock::{Clock, ManualClock};
pub use decision::{Decision, InsufficientCapacity};
pub use direct::DirectLimiter;
pub use distributed::{ColdStart, FailurePolicy, Node, NodeBuilder};
pub use limiter::{check_all, check_all_async, BuildError, Jitter, Limiter, LimiterBuilder, WhenFull};
pub use policy::{Algorithm, Policy, PolicyError};

/// The serde shape of a policy in a tiers file (`points`, `duration`, `algorithm`, ...): the
/// configuration's business, not a type to name.
#[doc(hidden)]
pub use policy::PolicySpec;

/// The bounds every policy and key table is checked against.
pub mod limits {
    pub use crate::consts::{DEFAULT_MAX_KEYS, MAX_CAPACITY, MAX_DURATION, MAX_RATE_PER_SEC, MIN_DURATION};
}

/// A [`Node`]'s figures, state and errors, the trait of keys that can be shared through a
/// store, and the advice on sizing a distributed policy.
pub mod node {
    pub use crate::distributed::{sizing_advice, CircuitState, Identifier, NodeError, NodeStats};
}

/// What [`check_all`] and [`check_all_async`] take: a limiter bound to a key ([`layers::Bound`]), as a
/// [`layers::Layer`] (a sealed trait: what the all-or-nothing checks need of a layer).
pub mod layers {
    pub use crate::limiter::{Bound, Layer};
}
