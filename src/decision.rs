//! The answer to a check.

use std::fmt;
use std::time::Duration;

use crate::algorithm::Rule;
use crate::consts::MIN_SWEEP_INTERVAL_NS;

/// Where a decision's state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The key's own cell.
    Key,
    /// The table was full: the shared overflow cell of the policy answered.
    Overflow,
    /// The table was full and the limiter is set to deny untracked keys.
    TableFull,
    /// Distributed mode: the key's claimed tokens answered. `state` holds the remaining
    /// quota, `now` the reset time and `extra` the retry time (nanoseconds).
    Claimed,
    /// Distributed mode with the store unreachable: the failure policy answered. Same fields
    /// as `Claimed`.
    Degraded,
}

/// The answer to a check: allowed or not, and where the key stands.
///
/// A decision is a small `Copy` value. The figures (`remaining`, `reset_after`, `retry_after`)
/// are computed when asked for, from the state the check saw, so a check that only looks at
/// [`is_allowed`](Self::is_allowed) pays for no division.
#[derive(Clone, Copy)]
pub struct Decision {
    pub(crate) allowed: bool,
    pub(crate) source: Source,
    pub(crate) rule: Rule,
    /// The key's state after the check (before it, for a denial that changed nothing).
    pub(crate) state: u64,
    pub(crate) now: u64,
    pub(crate) cost: u64,
    pub(crate) name: &'static str,
    /// `Claimed` only: the retry time in nanoseconds.
    pub(crate) extra: u64,
}

impl Decision {
    /// True when the request may go ahead (its cost was taken).
    #[inline]
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// True when the request must not go ahead (nothing was taken).
    #[inline]
    pub fn is_denied(&self) -> bool {
        !self.allowed
    }

    /// The most the policy lets a key spend at once (the burst for a token bucket, the points
    /// per window otherwise).
    pub fn limit(&self) -> u64 {
        self.rule.capacity
    }

    /// What a request of cost 1 could still take now, after this decision.
    pub fn remaining(&self) -> u64 {
        match self.source {
            Source::TableFull => 0,
            Source::Claimed | Source::Degraded => self.state,
            _ => self.rule.remaining(self.state, self.now),
        }
    }

    /// How long until the key is back to a full quota if it takes nothing more.
    pub fn reset_after(&self) -> Duration {
        match self.source {
            Source::TableFull => Duration::from_nanos(MIN_SWEEP_INTERVAL_NS),
            Source::Claimed | Source::Degraded => Duration::from_nanos(self.now),
            _ => Duration::from_nanos(self.rule.reset_after(self.state, self.now)),
        }
    }

    /// For a denial, how long until the same request would be allowed if nothing else takes
    /// from the key meanwhile; `None` for an allowed request.
    pub fn retry_after(&self) -> Option<Duration> {
        if self.allowed {
            return None;
        }
        Some(match self.source {
            Source::TableFull => Duration::from_nanos(MIN_SWEEP_INTERVAL_NS),
            Source::Claimed | Source::Degraded => Duration::from_nanos(self.extra.max(1)),
            _ => Duration::from_nanos(self.rule.retry_after(self.state, self.now, self.cost).max(1)),
        })
    }

    /// The name of the policy (layer) that decided: the limiter's name.
    pub fn policy(&self) -> &'static str {
        self.name
    }

    /// True when the key was not tracked because the table was full, and the shared overflow
    /// bucket (or the table-full denial) answered instead.
    pub fn is_untracked(&self) -> bool {
        matches!(self.source, Source::Overflow | Source::TableFull)
    }

    /// An allowed decision that left under a fifth of the quota (for the metrics).
    #[cfg(feature = "metrics")]
    #[inline]
    pub(crate) fn near_limit(&self) -> bool {
        match self.source {
            Source::Key | Source::Overflow => self.rule.near_limit(self.state, self.now),
            Source::Claimed | Source::Degraded => self.state.saturating_mul(5) < self.rule.capacity,
            Source::TableFull => false,
        }
    }

    /// True when the store was unreachable and the node's failure policy answered (distributed
    /// mode only; see [`FailurePolicy`](crate::FailurePolicy)).
    pub fn is_degraded(&self) -> bool {
        self.source == Source::Degraded
    }

    /// The cost the decision was for.
    pub fn cost(&self) -> u64 {
        self.cost
    }
}

impl fmt::Debug for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decision")
            .field("allowed", &self.allowed)
            .field("policy", &self.name)
            .field("limit", &self.limit())
            .field("remaining", &self.remaining())
            .field("reset_after", &self.reset_after())
            .field("retry_after", &self.retry_after())
            .field("untracked", &self.is_untracked())
            .field("degraded", &self.is_degraded())
            .finish()
    }
}

/// A cost that exceeds the policy's capacity: it can never be allowed, however long the
/// caller waits (as opposed to a denial, which means "not now").
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cost {cost} exceeds the capacity {capacity} of policy '{policy}': it can never be allowed")]
pub struct InsufficientCapacity {
    /// The cost asked for.
    pub cost: u64,
    /// The policy's capacity.
    pub capacity: u64,
    /// The policy's name.
    pub policy: &'static str,
}
