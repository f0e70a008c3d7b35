//! A limiter with one state for the whole process: no key, no map.

use std::fmt;

use crate::algorithm::Rule;
use crate::clock::Clock;
use crate::decision::{Decision, Figures, InsufficientCapacity};
use crate::local::cell::Cell;
use crate::policy::{Policy, PolicyError};

/// One [`Policy`] for everything that calls it (a global limit, or one per object that owns
/// it). The same answers as a keyed [`Limiter`](crate::Limiter) with a single key, without the
/// map lookup.
///
/// ```
/// use tollgate::{DirectLimiter, Policy};
///
/// let outbound = DirectLimiter::new(Policy::per_second(50)).unwrap();
/// assert!(outbound.check().is_allowed());
/// ```
pub struct DirectLimiter {
    rule: Rule,
    cell: Cell,
    clock: Clock,
    name: &'static str,
    policy: Policy,
}

impl fmt::Debug for DirectLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectLimiter")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl DirectLimiter {
    /// A limiter on the default clock.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        Self::with_clock(policy, Clock::default())
    }

    /// A limiter on the given clock.
    pub fn with_clock(policy: Policy, clock: Clock) -> Result<Self, PolicyError> {
        Ok(DirectLimiter {
            rule: policy.compile()?,
            cell: Cell::default(),
            clock,
            name: "direct",
            policy,
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Checks one unit, taking it when allowed.
    #[inline]
    pub fn check(&self) -> Decision {
        self.take(1)
    }

    /// Checks `cost` units; `Err` when the cost exceeds the capacity and can never be allowed.
    #[inline]
    pub fn check_n(&self, cost: u64) -> Result<Decision, InsufficientCapacity> {
        if cost > self.rule.capacity {
            return Err(InsufficientCapacity {
                cost,
                capacity: self.rule.capacity,
                policy: self.name,
            });
        }
        Ok(self.take(cost))
    }

    /// What `check_n(cost)` would answer, taking nothing.
    pub fn peek(&self, cost: u64) -> Result<Decision, InsufficientCapacity> {
        if cost > self.rule.capacity {
            return Err(InsufficientCapacity {
                cost,
                capacity: self.rule.capacity,
                policy: self.name,
            });
        }
        let now = self.clock.now_ns();
        let step = self
            .cell
            .peek(&self.rule, now, cost)
            .expect("a direct cell is never retired");
        Ok(self.decision(step.allowed, step.state, now, cost))
    }

    /// Gives back up to `cost` units.
    pub fn refund(&self, cost: u64) {
        let now = self.clock.now_ns();
        self.cell.refund(&self.rule, now, cost, now);
    }

    #[inline]
    fn take(&self, cost: u64) -> Decision {
        let now = self.clock.now_ns();
        let step = self
            .cell
            .acquire(&self.rule, now, cost)
            .expect("a direct cell is never retired");
        self.decision(step.allowed, step.state, now, cost)
    }

    #[inline]
    fn decision(&self, allowed: bool, state: u64, now: u64, cost: u64) -> Decision {
        Decision {
            allowed,
            cost,
            name: self.name,
            figures: Figures::Cell {
                overflow: false,
                rule: self.rule,
                state,
                now,
            },
        }
    }
}
