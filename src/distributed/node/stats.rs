//! A node's counters: [`NodeStats`] for callers, the atomics the sync counts into, and their
//! publication as metrics.

use crate::store::ErrorClass;
use std::sync::atomic::{AtomicU64, Ordering};

use super::super::breaker::CircuitState;
use super::NodeInner;

/// Counters of a node's sync activity and health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStats {
    /// Syncs run (including those the open circuit kept from the store).
    pub syncs: u64,
    /// Store calls made for claims (one per batch).
    pub round_trips: u64,
    /// Store calls that failed or timed out (their grants count as lost).
    pub failed_round_trips: u64,
    /// Claims sent (one per key per sync).
    pub claims: u64,
    /// Live nodes in the registry at the last heartbeat (this one included).
    pub live_nodes: u64,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Times the circuit opened (a failed probe reopening it included).
    pub circuit_opened: u64,
    /// Half-open probes sent.
    pub probes: u64,
    /// Failed syncs by class: transient (I/O, timeouts, `LOADING`, `BUSY`, ...).
    pub transient_errors: u64,
    /// Failed syncs by class: topology (`READONLY`, `MOVED`, ...; the connection is replaced).
    pub topology_errors: u64,
    /// Failed syncs by class: configuration (`NOAUTH`, `WRONGPASS`, `NOPERM`).
    pub config_errors: u64,
    /// Failed syncs by class: resource (`OOM`).
    pub resource_errors: u64,
    /// Failed syncs by class: protocol (unexpected replies, script errors).
    pub protocol_errors: u64,
    /// Keys whose claim failed alone (`WRONGTYPE`, corrupt state); the rest of their batch
    /// went on. Such a key is answered by the failure policy until a claim succeeds.
    pub key_errors: u64,
    /// Times the store was found to have lost state: its server identity changed, or a key
    /// held less than this node's valid claim. Nothing is refunded.
    pub state_losses: u64,
    /// Times the sync task panicked and was restarted.
    pub task_restarts: u64,
    /// Cost admitted by [`FailurePolicy::FailOpen`](crate::FailurePolicy::FailOpen) while the circuit was open.
    pub fail_open_admitted: u64,
    /// Tokens returned in claims whose batch failed: the store may or may not have taken them
    /// back; this node no longer holds them (admits less, never more).
    pub unconfirmed_returns: u64,
    /// Tokens wanted in claims whose batch failed: the store may have granted some of them
    /// without this node ever receiving them (lost until their lease or window ends).
    pub unconfirmed_wants: u64,
    /// Claims the store answered as stale: it had already applied a newer claim of this node
    /// for the key, so this one changed nothing (this node granted itself nothing from it).
    pub stale_claims: u64,
    /// Store calls made on demand, for checks waiting for a claim
    /// ([`Limiter::check_async`](crate::Limiter::check_async)); each carries every key asked
    /// for since the previous one. Counted in `round_trips` too.
    pub claims_on_demand: u64,
    /// Times checks asked for a claim on demand beyond the node's budget
    /// ([`NodeBuilder::claims_on_demand_per_second`](crate::NodeBuilder::claims_on_demand_per_second)): their claims went with the next sync.
    pub claims_on_demand_deferred: u64,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats {
            syncs: 0,
            round_trips: 0,
            failed_round_trips: 0,
            claims: 0,
            live_nodes: 0,
            circuit: CircuitState::Closed,
            circuit_opened: 0,
            probes: 0,
            transient_errors: 0,
            topology_errors: 0,
            config_errors: 0,
            resource_errors: 0,
            protocol_errors: 0,
            key_errors: 0,
            state_losses: 0,
            task_restarts: 0,
            fail_open_admitted: 0,
            unconfirmed_returns: 0,
            unconfirmed_wants: 0,
            stale_claims: 0,
            claims_on_demand: 0,
            claims_on_demand_deferred: 0,
        }
    }
}

/// The atomics behind [`NodeStats`] (the breaker's state and the live node count are read
/// from where they live).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) syncs: AtomicU64,
    pub(super) round_trips: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) claims: AtomicU64,
    pub(super) circuit_opened: AtomicU64,
    pub(super) probes: AtomicU64,
    /// By [`ErrorClass`], in declaration order.
    errors: [AtomicU64; 5],
    pub(super) key_errors: AtomicU64,
    pub(super) state_losses: AtomicU64,
    pub(super) task_restarts: AtomicU64,
    pub(super) fail_open_admitted: AtomicU64,
    unconfirmed_returns: AtomicU64,
    unconfirmed_wants: AtomicU64,
    pub(super) stale_claims: AtomicU64,
    pub(super) on_demand: AtomicU64,
    pub(super) on_demand_deferred: AtomicU64,
}

impl Counters {
    /// Counts a failure of `class`.
    pub(super) fn error(&self, class: ErrorClass) {
        self.errors[class_index(class)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts claims whose fate is unknown: `returned` tokens this node gave up and `wanted`
    /// tokens the store may have granted without this node ever receiving them.
    pub(super) fn unconfirmed(&self, returned: u64, wanted: u64) {
        self.unconfirmed_returns.fetch_add(returned, Ordering::Relaxed);
        self.unconfirmed_wants.fetch_add(wanted, Ordering::Relaxed);
    }
}

fn class_index(class: ErrorClass) -> usize {
    match class {
        ErrorClass::Transient => 0,
        ErrorClass::Topology => 1,
        ErrorClass::Config => 2,
        ErrorClass::Resource => 3,
        ErrorClass::Protocol => 4,
    }
}

/// The error classes as metric labels, with their counter's index.
#[cfg(feature = "metrics")]
const CLASS_LABELS: [(&str, usize); 5] = [
    ("transient", 0),
    ("topology", 1),
    ("config", 2),
    ("resource", 3),
    ("protocol", 4),
];

impl NodeInner {
    /// Reads every counter.
    pub(super) fn stats(&self) -> NodeStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            syncs: get(&c.syncs),
            round_trips: get(&c.round_trips),
            failed_round_trips: get(&c.failed),
            claims: get(&c.claims),
            live_nodes: get(&self.live_nodes),
            circuit: self.breaker.state(),
            circuit_opened: get(&c.circuit_opened),
            probes: get(&c.probes),
            transient_errors: get(&c.errors[0]),
            topology_errors: get(&c.errors[1]),
            config_errors: get(&c.errors[2]),
            resource_errors: get(&c.errors[3]),
            protocol_errors: get(&c.errors[4]),
            key_errors: get(&c.key_errors),
            state_losses: get(&c.state_losses),
            task_restarts: get(&c.task_restarts),
            fail_open_admitted: get(&c.fail_open_admitted),
            unconfirmed_returns: get(&c.unconfirmed_returns),
            unconfirmed_wants: get(&c.unconfirmed_wants),
            stale_claims: get(&c.stale_claims),
            claims_on_demand: get(&c.on_demand),
            claims_on_demand_deferred: get(&c.on_demand_deferred),
        }
    }

    /// After a sync: records its duration, and publishes every limiter's and node's totals,
    /// at most once a second.
    #[cfg(feature = "metrics")]
    pub(super) fn publish_after_sync(&self, started: std::time::Instant) {
        ::metrics::histogram!(crate::metrics::SYNC_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        let now = self.clock.now_ns();
        let last = self.last_publish.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= 1_000_000_000 {
            self.last_publish.store(now.max(1), Ordering::Relaxed);
            crate::metrics::publish();
        }
    }

    /// Claimed tokens held now, over every live member's keys. The member list stays locked
    /// meanwhile: a limiter registering under a name another has just left must not find
    /// that one alive through this count.
    #[cfg(feature = "metrics")]
    fn held(&self) -> u64 {
        self.members
            .lock()
            .iter()
            .filter_map(|(_, m)| m.upgrade())
            .map(|m| m.held())
            .sum()
    }
}

#[cfg(feature = "metrics")]
impl crate::metrics::Source for NodeInner {
    fn publish(&self) {
        use crate::metrics::*;
        use ::metrics::{counter, gauge};
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (class, i) in CLASS_LABELS {
            counter!(REDIS_ERRORS_TOTAL, "class" => class).absolute(get(&c.errors[i]));
        }
        counter!(REDIS_ERRORS_TOTAL, "class" => "key").absolute(get(&c.key_errors));
        gauge!(CIRCUIT_STATE).set(f64::from(self.breaker.state().as_number()));
        gauge!(CLAIMS_OUTSTANDING).set(self.held() as f64);
        counter!(STATE_LOSS_TOTAL).absolute(get(&c.state_losses));
        counter!(SYNC_TASK_RESTARTS_TOTAL).absolute(get(&c.task_restarts));
        counter!(FAIL_OPEN_ADMITTED_TOTAL).absolute(get(&c.fail_open_admitted));
        counter!(CLAIMS_ON_DEMAND_TOTAL, "deferred" => "false").absolute(get(&c.on_demand));
        counter!(CLAIMS_ON_DEMAND_TOTAL, "deferred" => "true").absolute(get(&c.on_demand_deferred));
        let at = self.last_success.load(Ordering::Acquire);
        if at != 0 {
            let age = self.clock.now_ns().saturating_sub(at);
            gauge!(LAST_SYNC_AGE_SECONDS).set(age as f64 / 1e9);
        }
    }
}
