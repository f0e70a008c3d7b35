//! The answer to a check.

use std::fmt;
use std::time::Duration;

use crate::algorithm::Rule;
use crate::consts::MIN_SWEEP_INTERVAL_NS;

/// What a decision's figures are, and where they came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Figures {
    /// A cell of `rule` answered: the key's own, or with `overflow` the shared overflow cell
    /// of a full table. `state` is the cell's state after the check (before it, for a denial
    /// that changed nothing), at `now`; the figures are computed from them when asked for.
    Cell {
        overflow: bool,
        rule: Rule,
        state: u64,
        now: u64,
    },
    /// Distributed mode: the key's claimed tokens answered, or with `degraded` the failure
    /// policy (the store unreachable). The figures as the claims saw them, in nanoseconds.
    Claimed {
        degraded: bool,
        capacity: u64,
        remaining: u64,
        reset_ns: u64,
        retry_ns: u64,
    },
    /// The table was full and untracked keys are denied.
    TableFull { capacity: u64 },
}

/// The answer to a check: allowed or not, and where the key stands.
///
/// A decision is a small `Copy` value. The figures (`remaining`, `reset_after`, `retry_after`)
/// are computed when asked for, from the state the check saw, so a check that only looks at
/// [`is_allowed`](Self::is_allowed) pays for no division.
#[derive(Clone, Copy)]
pub struct Decision {
    pub(crate) allowed: bool,
    pub(crate) cost: u64,
    pub(crate) name: &'static str,
    pub(crate) figures: Figures,
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
        match self.figures {
            Figures::Cell { rule, .. } => rule.capacity,
            Figures::Claimed { capacity, .. } | Figures::TableFull { capacity } => capacity,
        }
    }

    /// What a request of cost 1 could still take now, after this decision.
    pub fn remaining(&self) -> u64 {
        match self.figures {
            Figures::Cell { rule, state, now, .. } => rule.remaining(state, now),
            Figures::Claimed { remaining, .. } => remaining,
            Figures::TableFull { .. } => 0,
        }
    }

    /// How long until the key is back to a full quota if it takes nothing more.
    pub fn reset_after(&self) -> Duration {
        Duration::from_nanos(match self.figures {
            Figures::Cell { rule, state, now, .. } => rule.reset_after(state, now),
            Figures::Claimed { reset_ns, .. } => reset_ns,
            Figures::TableFull { .. } => MIN_SWEEP_INTERVAL_NS,
        })
    }

    /// For a denial, how long until the same request would be allowed if nothing else takes
    /// from the key meanwhile; `None` for an allowed request.
    pub fn retry_after(&self) -> Option<Duration> {
        if self.allowed {
            return None;
        }
        Some(Duration::from_nanos(match self.figures {
            Figures::Cell { rule, state, now, .. } => rule.retry_after(state, now, self.cost).max(1),
            Figures::Claimed { retry_ns, .. } => retry_ns.max(1),
            Figures::TableFull { .. } => MIN_SWEEP_INTERVAL_NS,
        }))
    }

    /// The name of the policy (layer) that decided: the limiter's name.
    pub fn policy(&self) -> &'static str {
        self.name
    }

    /// True when the key was not tracked because the table was full, and the shared overflow
    /// bucket (or the table-full denial) answered instead.
    pub fn is_untracked(&self) -> bool {
        matches!(
            self.figures,
            Figures::Cell { overflow: true, .. } | Figures::TableFull { .. }
        )
    }

    /// An allowed decision that left under a fifth of the quota (for the metrics).
    #[cfg(feature = "metrics")]
    #[inline]
    pub(crate) fn near_limit(&self) -> bool {
        match self.figures {
            Figures::Cell { rule, state, now, .. } => rule.near_limit(state, now),
            Figures::Claimed {
                capacity, remaining, ..
            } => remaining.saturating_mul(5) < capacity,
            Figures::TableFull { .. } => false,
        }
    }

    /// True when the store was unreachable and the node's failure policy answered (distributed
    /// mode only; see [`FailurePolicy`](crate::FailurePolicy)).
    pub fn is_degraded(&self) -> bool {
        matches!(self.figures, Figures::Claimed { degraded: true, .. })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The HTTP layer copies a decision per request and per layer: it must not grow past the
    /// size it had when its figures were three shared words.
    #[test]
    fn a_decision_fits_in_96_bytes() {
        assert!(
            std::mem::size_of::<Decision>() <= 96,
            "{} bytes",
            std::mem::size_of::<Decision>()
        );
    }
}
