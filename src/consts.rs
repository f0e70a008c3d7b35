//! Limits and tuning constants, in one place. Values that depend on each other are derived here.

use std::time::Duration;

/// Time values are nanoseconds since the clock's origin; later values are clamped to this
/// (2^62 ns, about 146 years of uptime), which keeps every sum of a time and a bucket's
/// tolerance inside a `u64` and gives the window algorithms a fixed number of index bits.
pub const MAX_TIME_NS: u64 = 1 << 62;

/// The largest capacity (`points`, or `burst` for the token bucket) a policy may have.
pub const MAX_CAPACITY: u64 = u32::MAX as u64;

/// The shortest `duration` a policy may have.
pub const MIN_DURATION: Duration = Duration::from_millis(1);

/// The longest `duration` (and `block_duration`) a policy may have: one year.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The highest rate a token bucket may have: one token per nanosecond.
pub const MAX_RATE_PER_SEC: u64 = 1_000_000_000;

/// State value of a cell that the table has retired (evicted); never a valid algorithm state.
pub(crate) const RETIRED: u64 = u64::MAX;

/// Default bound on the number of keys a limiter tracks.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// A full table is swept for fresh-equivalent keys at most this often, so a flood of new keys
/// cannot make every insert scan the table.
pub(crate) const MIN_SWEEP_INTERVAL_NS: u64 = 20_000_000;

/// Tick of the cached clock's updater thread. Checks read a time that lags by at most about
/// this much (more when the machine is overloaded), which only ever admits less, never more.
pub(crate) const CACHED_CLOCK_TICK: Duration = Duration::from_millis(1);

/// Claimed tokens stop being spendable this long before the store stops counting them: it
/// covers the cached clock's lag and the store rounding a window's end up to a millisecond.
pub(crate) const CLAIM_MARGIN_NS: u64 = 5_000_000;

/// The clock-rate difference between a node and the store that claims tolerate, in parts per
/// million: claimed tokens stop being spendable earlier by this fraction of their span (lease
/// or window) on top of `CLAIM_MARGIN_NS`. Ordinary clocks differ by well under 100 ppm.
pub(crate) const CLOCK_RATE_TOLERANCE_PPM: u64 = 500;

/// The shortest lease, and the shortest window of a distributed window policy: claimed tokens
/// must stay spendable well beyond `CLAIM_MARGIN_NS`.
pub(crate) const MIN_CLAIM_SPAN: Duration = Duration::from_millis(50);

/// The range of a node's timing settings: its sync interval, its sync timeout and the
/// circuit breaker's open times (one range for all of them).
pub(crate) const MIN_NODE_TIMING: Duration = Duration::from_millis(1);

/// See [`MIN_NODE_TIMING`].
pub(crate) const MAX_NODE_TIMING: Duration = Duration::from_secs(3600);

/// A node's default sync interval.
pub(crate) const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// The default lease is this many sync intervals, and at least [`MIN_DEFAULT_LEASE`].
pub(crate) const LEASE_INTERVALS: u32 = 4;

/// The shortest default lease.
pub(crate) const MIN_DEFAULT_LEASE: Duration = Duration::from_secs(1);

/// The default sync timeout is one sync interval, and at least this: a batch of many keys on
/// a busy server is not a failure.
pub(crate) const MIN_DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_millis(250);

/// A half-open probe is allowed half a sync interval, and at least this (never more than the
/// sync timeout).
pub(crate) const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(50);

/// A node's first heartbeat ([`crate::NodeBuilder::connect`]) is allowed the sync timeout, and
/// at least this: a first connection may take longer than a sync is allowed to.
pub(crate) const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A node tells the registry it is alive every sync, at most this often.
pub(crate) const MIN_HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// The registry counts a node for this many heartbeat periods (and at least one lease) after
/// its last heartbeat: a node drops out of the count only after missing this many (with one,
/// the count flickered between heartbeats that came a little late).
pub(crate) const HEARTBEAT_TTL_PERIODS: u32 = 3;

/// Two syncs are at least a tenth of the sync interval apart (early ones included), and at
/// least this.
pub(crate) const MIN_SYNC_GAP: Duration = Duration::from_millis(1);

/// Redis Cluster: the most times one script call is sent (the first time, then after `MOVED`,
/// `ASK`, `TRYAGAIN` or `NOSCRIPT`, none of which ran it) within one sync.
#[cfg(feature = "redis")]
pub(crate) const CLUSTER_MAX_SENDS: usize = 6;

/// Redis Cluster: the pause before sending again the calls answered `TRYAGAIN` (a slot is
/// being migrated and the call's keys are split between the two masters for now).
#[cfg(feature = "redis")]
pub(crate) const CLUSTER_TRYAGAIN_PAUSE: Duration = Duration::from_millis(10);

/// Redis Cluster: the shortest time between two reads of the slot map (`CLUSTER SLOTS`) after
/// errors that suggest it changed; a `MOVED` reply updates its slot at once all the same.
#[cfg(feature = "redis")]
pub(crate) const CLUSTER_MIN_REFRESH: Duration = Duration::from_millis(500);

/// Distributed mode: a node's demand estimate per key counts in 1/256 units, so that a slow
/// key's estimate decays smoothly over many syncs.
pub(crate) const DEMAND_ONE: u64 = 256;

/// HTTP layer: the most distinct unknown tier names logged (each once); more are only counted.
#[cfg(feature = "http")]
pub(crate) const MAX_LOGGED_UNKNOWN_TIERS: usize = 64;

/// Distributed mode: a key becomes *hot* when this node's demand for it reaches this many
/// units per lease. A hot key keeps claimed tokens ahead of its checks (nanosecond checks); a
/// cold key claims what a waiting check asks for and holds nothing afterwards, so that its
/// tokens never sit on one node while the client's next request lands on another.
pub(crate) const HOT_ENTER_PER_LEASE: u64 = 8;

/// Distributed mode: a hot key turns cold again when its demand falls below this many units
/// per lease (hysteresis: a key near one threshold does not flip at every sync).
pub(crate) const HOT_EXIT_PER_LEASE: u64 = 3;

/// Distributed mode: the default budget of store calls per second a node makes for checks
/// that wait for a claim (`NodeBuilder::claims_on_demand_per_second`, whose documentation
/// states this value); past it, those claims go with the next sync. Each call carries every
/// key asked for since the previous one.
pub(crate) const DEFAULT_CLAIMS_ON_DEMAND_PER_SECOND: u64 = 500;

/// Distributed mode: how many store calls on demand one waiting check takes part in before it
/// takes the answer it has (another check may spend the tokens its call brought first).
pub(crate) const CLAIM_ON_DEMAND_ATTEMPTS: u32 = 3;
