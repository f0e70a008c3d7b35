//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! The names are the constants below, Prometheus style with units. Labels are bounded: a
//! limiter's name (`policy`), its `layer` and `tier` (see
//! [`LimiterBuilder::metric_labels`](crate::LimiterBuilder::metric_labels)), a `decision`, an
//! error `class`. Never a client key or address.
//!
//! **Nothing is looked up on the hot path.** A check counts its decision in per-thread cells
//! (a load and a store, no lock, no shared cache line). Totals are published as absolute
//! values: by every node after its syncs (at most once a second), and in local mode by a
//! [`Publisher`] thread or a call to [`publish`]. Each publication resolves its metrics
//! against the recorder installed at that moment, so it does not matter whether the
//! application installs its recorder before or after building limiters: counts made before
//! it was installed appear in full at the next publication.
//!
//! ```
//! use std::time::Duration;
//! use tollgate::{metrics, Limiter, Policy};
//!
//! metrics::describe_metrics(); // descriptions and units, for exporters that show them
//! let publisher = metrics::Publisher::start(Duration::from_secs(1));
//! let limiter: Limiter = Limiter::builder(Policy::per_second(10)).name("api").build().unwrap();
//! limiter.check("alice");
//! metrics::publish(); // or wait for the publisher
//! drop(publisher);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Label, Unit};
use parking_lot::Mutex;

/// Decisions: `decision` (`allowed`, `denied`), `policy`, `layer`, `tier`.
pub const DECISIONS_TOTAL: &str = "tollgate_decisions_total";
/// Allowed requests that left under a fifth of the quota: `policy`, `layer`, `tier`.
pub const NEAR_LIMIT_TOTAL: &str = "tollgate_near_limit_total";
/// Requests shadow mode let through that would have been refused (HTTP layer).
pub const SHADOW_WOULD_BLOCK_TOTAL: &str = "tollgate_shadow_would_block_total";
/// Duration of each sync with the store (histogram).
pub const SYNC_DURATION_SECONDS: &str = "tollgate_sync_duration_seconds";
/// Keys sent in each sync (histogram).
pub const SYNC_BATCH_KEYS: &str = "tollgate_sync_batch_keys";
/// Failed syncs by `class` (`transient`, `topology`, `config`, `resource`, `protocol`), and
/// keys that failed alone (`key`).
pub const REDIS_ERRORS_TOTAL: &str = "tollgate_redis_errors_total";
/// The circuit breaker: 0 closed, 1 open, 2 half-open.
pub const CIRCUIT_STATE: &str = "tollgate_circuit_state";
/// Claimed tokens the node held at its last sync.
pub const CLAIMS_OUTSTANDING: &str = "tollgate_claims_outstanding";
/// Keys a limiter tracks: `policy`, `layer`, `tier`.
pub const KEYS_TRACKED: &str = "tollgate_keys_tracked";
/// Keys removed because they were indistinguishable from fresh: `policy`, `layer`, `tier`.
pub const KEYS_EVICTED_TOTAL: &str = "tollgate_keys_evicted_total";
/// Times the store was found to have lost state.
pub const STATE_LOSS_TOTAL: &str = "tollgate_state_loss_total";
/// Seconds since the node's last successful sync.
pub const LAST_SYNC_AGE_SECONDS: &str = "tollgate_last_sync_age_seconds";
/// Times the sync task panicked and was restarted.
pub const SYNC_TASK_RESTARTS_TOTAL: &str = "tollgate_sync_task_restarts_total";
/// Cost admitted by the `fail_open` failure policy while the store was unreachable.
pub const FAIL_OPEN_ADMITTED_TOTAL: &str = "tollgate_fail_open_admitted_total";
/// Store calls made on demand for checks waiting for a claim, by `deferred` (`false`: sent;
/// `true`: past the node's budget, left to the next sync).
pub const CLAIMS_ON_DEMAND_TOTAL: &str = "tollgate_claims_on_demand_total";
/// Redis Cluster: pipelines sent for claim batches (one per master per send round), by
/// `cluster` (the store's first seed, `host:port`).
pub const CLUSTER_ROUND_TRIPS_TOTAL: &str = "tollgate_cluster_round_trips_total";
/// Redis Cluster: redirection replies followed, by `reply` (`moved`, `ask`, `tryagain`) and
/// `cluster`.
pub const CLUSTER_REDIRECTS_TOTAL: &str = "tollgate_cluster_redirects_total";
/// Redis Cluster: script calls that failed (their keys were answered by the failure policy),
/// by `cluster`.
pub const CLUSTER_FAILED_CALLS_TOTAL: &str = "tollgate_cluster_failed_calls_total";
/// Redis Cluster: reads of the slot map (`CLUSTER SLOTS`), by `cluster`.
pub const CLUSTER_SLOT_MAP_READS_TOTAL: &str = "tollgate_cluster_slot_map_reads_total";
/// Redis Cluster: masters in the slot map last read, by `cluster`.
pub const CLUSTER_MASTERS: &str = "tollgate_cluster_masters";

/// Registers the description and unit of every metric with the installed recorder.
pub fn describe_metrics() {
    describe_counter!(
        DECISIONS_TOTAL,
        Unit::Count,
        "Rate limit decisions, by decision and policy"
    );
    describe_counter!(
        NEAR_LIMIT_TOTAL,
        Unit::Count,
        "Allowed requests that left under 20% of the quota"
    );
    describe_counter!(
        SHADOW_WOULD_BLOCK_TOTAL,
        Unit::Count,
        "Requests shadow mode let through that would have been refused"
    );
    describe_histogram!(
        SYNC_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of a sync with the store"
    );
    describe_histogram!(SYNC_BATCH_KEYS, Unit::Count, "Keys sent in one sync");
    describe_counter!(REDIS_ERRORS_TOTAL, Unit::Count, "Failed syncs by error class");
    describe_gauge!(CIRCUIT_STATE, "Circuit breaker state: 0 closed, 1 open, 2 half-open");
    describe_gauge!(CLAIMS_OUTSTANDING, Unit::Count, "Claimed tokens held at the last sync");
    describe_gauge!(KEYS_TRACKED, Unit::Count, "Keys a limiter tracks");
    describe_counter!(
        KEYS_EVICTED_TOTAL,
        Unit::Count,
        "Keys forgotten as indistinguishable from fresh"
    );
    describe_counter!(
        STATE_LOSS_TOTAL,
        Unit::Count,
        "Times the store was found to have lost state"
    );
    describe_gauge!(
        LAST_SYNC_AGE_SECONDS,
        Unit::Seconds,
        "Seconds since the last successful sync"
    );
    describe_counter!(
        SYNC_TASK_RESTARTS_TOTAL,
        Unit::Count,
        "Sync task panics caught and restarted"
    );
    describe_counter!(
        FAIL_OPEN_ADMITTED_TOTAL,
        Unit::Count,
        "Cost admitted by fail_open while the store was unreachable"
    );
    describe_counter!(
        CLAIMS_ON_DEMAND_TOTAL,
        Unit::Count,
        "Store calls on demand for waiting checks, by whether the budget deferred them"
    );
    describe_counter!(
        CLUSTER_ROUND_TRIPS_TOTAL,
        Unit::Count,
        "Redis Cluster pipelines sent for claim batches"
    );
    describe_counter!(
        CLUSTER_REDIRECTS_TOTAL,
        Unit::Count,
        "Redis Cluster redirections followed, by reply"
    );
    describe_counter!(
        CLUSTER_FAILED_CALLS_TOTAL,
        Unit::Count,
        "Redis Cluster script calls that failed"
    );
    describe_counter!(
        CLUSTER_SLOT_MAP_READS_TOTAL,
        Unit::Count,
        "Reads of the Redis Cluster slot map"
    );
    describe_gauge!(CLUSTER_MASTERS, Unit::Count, "Masters in the Redis Cluster slot map");
}

/// Something with totals to publish (a limiter, a node, a cluster store).
pub(crate) trait Source: Send + Sync {
    fn publish(&self);
}

static SOURCES: Mutex<Vec<Weak<dyn Source>>> = Mutex::new(Vec::new());

/// Requests shadow mode let through, all HTTP layers of the process together.
static SHADOW: AtomicU64 = AtomicU64::new(0);

/// Counts a request that shadow mode let through but would have refused.
#[cfg(feature = "http")]
pub(crate) fn shadow_would_block() {
    SHADOW.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn register(source: Weak<dyn Source>) {
    let mut s = SOURCES.lock();
    s.retain(|w| w.strong_count() > 0);
    s.push(source);
}

/// Publishes the totals of every live limiter, node and HTTP layer to the installed recorder
/// now.
pub fn publish() {
    let live: Vec<Arc<dyn Source>> = {
        let mut s = SOURCES.lock();
        s.retain(|w| w.strong_count() > 0);
        s.iter().filter_map(Weak::upgrade).collect()
    };
    for source in live {
        source.publish();
    }
    ::metrics::counter!(SHADOW_WOULD_BLOCK_TOTAL).absolute(SHADOW.load(Ordering::Relaxed));
}

/// A thread that calls [`publish`] every interval; stops when dropped. Nodes publish after
/// their syncs by themselves: this is for local mode.
pub struct Publisher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Starts publishing every `interval` (at least 10 ms).
    pub fn start(interval: Duration) -> Publisher {
        let interval = interval.max(Duration::from_millis(10));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tollgate-metrics".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    publish();
                }
            })
            .ok();
        Publisher {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        publish();
    }
}

/// The labels of one limiter.
pub(crate) fn labels(policy: &str, layer: &str, tier: &str) -> Vec<Label> {
    vec![
        Label::new("policy", policy.to_string()),
        Label::new("layer", layer.to_string()),
        Label::new("tier", tier.to_string()),
    ]
}

pub(crate) fn with(mut labels: Vec<Label>, key: &'static str, value: &'static str) -> Vec<Label> {
    labels.push(Label::new(key, value));
    labels
}
