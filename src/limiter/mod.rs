//! The limiter: one policy counted per key, answered from in-process atomic state (local
//! mode) or from quota claimed through a node (distributed mode).
//!
//! The builder and the choice of mode are in `builder`, the metrics counts in `counted`, the
//! checks that wait in `wait` and the all-or-nothing checks over several limiters in `layers`.

mod builder;
#[cfg(feature = "metrics")]
mod counted;
mod layers;
mod wait;

use std::borrow::Borrow;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use crate::algorithm::Rule;
use crate::clock::Clock;
use crate::decision::{Decision, Figures, InsufficientCapacity};
use crate::distributed::{DistKeys, Outcome, SetupError};
use crate::local::cell::{Cell, Retired};
use crate::local::table::Table;
use crate::policy::{Policy, PolicyError};
use papaya::LocalGuard;

pub use builder::LimiterBuilder;
#[cfg(feature = "http")]
pub(crate) use layers::check_layers;
pub use layers::{check_all, check_all_async, Bound, Layer};
pub use wait::Jitter;

/// What a limiter does with a new key when its table already holds `max_keys` keys that all
/// carry information (none is indistinguishable from fresh).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Count all such keys together in one shared bucket of the same policy (default): they
    /// are limited, as a group, and a flood of new keys cannot get more than one key's quota.
    #[default]
    Overflow,
    /// Deny such keys until the sweeper frees room.
    Deny,
}

/// Why a limiter could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The policy has a field out of range.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// `max_keys` was 0.
    #[error("max_keys: must be > 0")]
    MaxKeys,
    /// The policy cannot be shared through the store: the field, and why.
    #[error("invalid policy for distributed mode: {0}")]
    Distributed(PolicyError),
    /// A live limiter of the node already shares a limit under this name and policy (the store
    /// records one holding per node and key, which two limiters would overwrite).
    #[error("{0}")]
    NameInUse(String),
}

impl From<SetupError> for BuildError {
    fn from(e: SetupError) -> Self {
        match e {
            SetupError::Policy(e) => BuildError::Distributed(e),
            SetupError::NameInUse(why) => BuildError::NameInUse(why),
        }
    }
}

struct Inner<K> {
    mode: Mode<K>,
    rule: Rule,
    name: &'static str,
    clock: Clock,
    policy: Policy,
    #[cfg(feature = "metrics")]
    metrics: counted::Counted,
}

/// Where a limiter's keys are counted.
enum Mode<K> {
    /// In this process: a cell per key, and the overflow cell for keys a full table cannot
    /// track (unless untracked keys are denied).
    Local {
        table: Table<K>,
        overflow: Cell,
        when_full: WhenFull,
    },
    /// In the store, through the node: the keys' claims.
    Distributed(Arc<DistKeys<K>>),
}

impl<K: Hash + Eq + Send + Sync + 'static> Mode<K> {
    /// Keys tracked now.
    fn len(&self) -> usize {
        match self {
            Mode::Local { table, .. } => table.len(),
            Mode::Distributed(dist) => dist.len(),
        }
    }

    /// Keys removed by sweeps so far (distributed mode forgets keys at syncs, uncounted).
    fn evicted(&self) -> u64 {
        match self {
            Mode::Local { table, .. } => table.evicted(),
            Mode::Distributed(_) => 0,
        }
    }
}

/// Where the cost of an admission was taken from, to give it back there.
#[derive(Clone, Copy)]
enum Taken {
    /// The key's cell, at this time.
    Key { at: u64 },
    /// The overflow cell, at this time.
    Overflow { at: u64 },
    /// The key's claimed tokens.
    Claimed,
    /// The failure policy's share of the key.
    Degraded,
    /// Nothing (a table-full denial).
    Nothing,
}

impl Taken {
    /// Where `decision` took its cost from.
    fn of(decision: &Decision) -> Taken {
        match decision.figures {
            Figures::Cell {
                overflow: false, now, ..
            } => Taken::Key { at: now },
            Figures::Cell {
                overflow: true, now, ..
            } => Taken::Overflow { at: now },
            Figures::Claimed { degraded: false, .. } => Taken::Claimed,
            Figures::Claimed { degraded: true, .. } => Taken::Degraded,
            Figures::TableFull { .. } => Taken::Nothing,
        }
    }
}

/// A rate limiter: one [`Policy`] counted separately for each key.
///
/// Cloning is cheap and every clone shares the same state. Checks are lock-free: a map read
/// that writes nothing shared, one clock read and one compare-and-swap on the key's own word.
/// No allocation happens on a check of a key already tracked.
///
/// ```
/// use tollgate::{Limiter, Policy};
///
/// let limiter: Limiter = Limiter::builder(Policy::per_minute(2)).name("user").build().unwrap();
/// assert!(limiter.check("alice").is_allowed());
/// assert!(limiter.check("alice").is_allowed());
/// let d = limiter.check("alice");
/// assert!(d.is_denied());
/// assert_eq!(d.policy(), "user");
/// assert!(d.retry_after().unwrap().as_secs() >= 29);
/// assert!(limiter.check("bob").is_allowed());
/// ```
pub struct Limiter<K = String> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Limiter<K> {
    fn clone(&self) -> Self {
        if let Mode::Distributed(dist) = &self.inner.mode {
            dist.add_handle();
        }
        Limiter {
            inner: self.inner.clone(),
        }
    }
}

/// The limiter's name is free once its last handle is gone, even while a round in flight or a
/// metrics publication still holds its state (which the state's own drop would wait for).
impl<K> Drop for Limiter<K> {
    fn drop(&mut self) {
        if let Mode::Distributed(dist) = &self.inner.mode {
            dist.drop_handle();
        }
    }
}

impl<K> fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.inner.name)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> Limiter<K> {
    /// Starts building a limiter for `policy`.
    pub fn builder(policy: Policy) -> LimiterBuilder<K> {
        LimiterBuilder::new(policy)
    }

    /// A limiter with default settings; fails only on an invalid policy.
    pub fn new(policy: Policy) -> Result<Self, BuildError> {
        Self::builder(policy).build()
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The name decisions report.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.inner.mode.len()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys removed by sweeps so far (each was indistinguishable from a fresh key).
    pub fn evicted(&self) -> u64 {
        self.inner.mode.evicted()
    }

    /// Removes every key indistinguishable from fresh now. This happens by itself when the
    /// table fills up; call it to free memory at a time of your choosing.
    pub fn sweep(&self) -> usize {
        match &self.inner.mode {
            Mode::Local { table, .. } => table.sweep(&self.inner.rule, self.inner.clock.now_ns(), true),
            // Distributed mode forgets keys at syncs.
            Mode::Distributed(_) => 0,
        }
    }

    /// Checks one unit for `key`, taking it when allowed.
    #[inline]
    pub fn check<Q>(&self, key: &Q) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.take::<true, _>(key, 1, self.inner.clock.now_ns())
    }

    /// Checks `cost` units for `key`, taking them when allowed. `Err` means the cost exceeds
    /// the policy's capacity and can never be allowed. A cost of 0 takes nothing and is denied
    /// only while the key is blocked.
    #[inline]
    pub fn check_n<Q>(&self, key: &Q, cost: u64) -> Result<Decision, InsufficientCapacity>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.fits(cost)?;
        Ok(self.take::<true, _>(key, cost, self.inner.clock.now_ns()))
    }

    /// What `check_n(key, cost)` would answer now, taking nothing and tracking nothing.
    pub fn peek<Q>(&self, key: &Q, cost: u64) -> Result<Decision, InsufficientCapacity>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.fits(cost)?;
        let inner = &*self.inner;
        let now = inner.clock.now_ns();
        Ok(match &inner.mode {
            Mode::Local { table, .. } => {
                let guard = table.guard();
                let step = table
                    .get(key, &guard)
                    .and_then(|c| c.peek(&inner.rule, now, cost).ok())
                    .unwrap_or_else(|| inner.rule.peek(0, now, cost));
                self.decision(step.allowed, false, step.state, now, cost)
            }
            Mode::Distributed(dist) => self.claimed(dist.peek(key, cost, now), cost),
        })
    }

    /// Gives back up to `cost` units to `key` (for example when the work they paid for did
    /// not happen). Never raises a key above a full quota; for window algorithms, only the
    /// current window gets units back.
    ///
    /// In distributed mode, units go back to the tokens this node claimed for the key, at
    /// most what its checks took from them since the last sync. Once the failure policy has
    /// answered on this node, a refund cannot tell the claimed tokens from the failure
    /// policy's share they may have come from (crediting the wrong one would let the key
    /// admit more than its limit), so it gives back nothing: use
    /// [`refund_decision`](Self::refund_decision), which knows.
    pub fn refund<Q>(&self, key: &Q, cost: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.inner.clock.now_ns();
        let taken = match &self.inner.mode {
            Mode::Local { .. } => Taken::Key { at: now },
            Mode::Distributed(dist) if dist.node().degraded_ever() => return,
            Mode::Distributed(_) => Taken::Claimed,
        };
        self.give_back(key, cost, taken, now);
    }

    /// Gives back what `decision` (an admission of `key` by this limiter) took, to where it
    /// was taken from: the key's state, the claimed tokens, the failure policy's share or the
    /// overflow bucket. Never raises a key above a full quota; in distributed mode, claimed
    /// tokens come back only if no sync has counted them as spent since. A denial gives back
    /// nothing.
    ///
    /// ```
    /// use tollgate::{Limiter, Policy};
    ///
    /// let l: Limiter = Limiter::new(Policy::per_minute(1)).unwrap();
    /// let d = l.check("alice");
    /// assert!(d.is_allowed());
    /// l.refund_decision("alice", &d); // the work did not happen
    /// assert!(l.check("alice").is_allowed());
    /// ```
    pub fn refund_decision<Q>(&self, key: &Q, decision: &Decision)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !decision.is_allowed() {
            return;
        }
        let now = self.inner.clock.now_ns();
        self.give_back(key, decision.cost, Taken::of(decision), now);
    }

    /// Counts a decision for the metrics (nothing without feature `metrics`).
    #[inline(always)]
    fn count(&self, _d: &Decision) {
        #[cfg(feature = "metrics")]
        self.inner.metrics.count(&self.inner.rule, _d);
    }

    #[inline]
    fn fits(&self, cost: u64) -> Result<(), InsufficientCapacity> {
        if cost > self.inner.rule.capacity {
            return Err(InsufficientCapacity {
                cost,
                capacity: self.inner.rule.capacity,
                policy: self.inner.name,
            });
        }
        Ok(())
    }

    /// A decision of a cell of the limiter's rule: the key's, or with `overflow` the overflow
    /// cell.
    #[inline]
    fn decision(&self, allowed: bool, overflow: bool, state: u64, now: u64, cost: u64) -> Decision {
        Decision {
            allowed,
            cost,
            name: self.inner.name,
            figures: Figures::Cell {
                overflow,
                rule: self.inner.rule,
                state,
                now,
            },
        }
    }

    /// Takes `cost` for `key` at `now`; counts the decision for the metrics when `COUNT`
    /// (a check, as opposed to a layer of [`check_all`], which counts only deciding layers).
    #[inline]
    fn take<const COUNT: bool, Q>(&self, key: &Q, cost: u64, now: u64) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let inner = &*self.inner;
        let (table, overflow, when_full) = match &inner.mode {
            Mode::Local {
                table,
                overflow,
                when_full,
            } => (table, overflow, *when_full),
            Mode::Distributed(dist) => return self.take_distributed::<COUNT, Q>(dist, key, cost, now),
        };
        let guard = table.guard();
        loop {
            let cell = match table.get(key, &guard) {
                Some(cell) => cell,
                None => match Self::insert(table, &inner.rule, key, &guard, now) {
                    Some(cell) => cell,
                    None => {
                        let d = self.untracked(overflow, when_full, cost, now);
                        if COUNT {
                            self.count(&d);
                        }
                        return d;
                    }
                },
            };
            match cell.acquire(&inner.rule, now, cost) {
                Ok(step) => {
                    // Counted from the values at hand: the key's cell decided.
                    #[cfg(feature = "metrics")]
                    if COUNT {
                        inner.metrics.count_own(&inner.rule, step.allowed, step.state, now);
                    }
                    return self.decision(step.allowed, false, step.state, now, cost);
                }
                Err(Retired) => table.unlink_retired(key, &guard),
            }
        }
    }

    /// [`take`](Self::take) in distributed mode, kept out of the local path's code.
    #[inline(never)]
    fn take_distributed<const COUNT: bool, Q>(&self, dist: &DistKeys<K>, key: &Q, cost: u64, now: u64) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let d = self.claimed(dist.take(key, cost, now), cost);
        if COUNT {
            self.count(&d);
        }
        d
    }

    /// A key's first check: its cell is made (once per key, so out of the hot path's code).
    #[cold]
    #[inline(never)]
    fn insert<'g, Q>(table: &Table<K>, rule: &Rule, key: &Q, guard: &'g LocalGuard<'_>, now: u64) -> Option<&'g Cell>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        table.insert(key, guard, rule, now)
    }

    /// The decision of the claims' outcome `o`.
    fn claimed(&self, o: Outcome, cost: u64) -> Decision {
        let capacity = self.inner.rule.capacity;
        let figures = if o.untracked {
            Figures::TableFull { capacity }
        } else {
            Figures::Claimed {
                degraded: o.degraded,
                capacity,
                remaining: o.remaining,
                reset_ns: o.reset_after_ns,
                retry_ns: o.retry_after_ns,
            }
        };
        Decision {
            allowed: o.allowed,
            cost,
            name: self.inner.name,
            figures,
        }
    }

    /// The decision for a key the full table cannot track.
    #[cold]
    fn untracked(&self, overflow: &Cell, when_full: WhenFull, cost: u64, now: u64) -> Decision {
        let rule = &self.inner.rule;
        match when_full {
            WhenFull::Deny => Decision {
                allowed: false,
                cost,
                name: self.inner.name,
                figures: Figures::TableFull {
                    capacity: rule.capacity,
                },
            },
            WhenFull::Overflow => {
                let step = overflow
                    .acquire(rule, now, cost)
                    .expect("the overflow cell is never retired");
                self.decision(step.allowed, true, step.state, now, cost)
            }
        }
    }

    /// Gives `cost` back to `key`, to where it was `taken` from.
    fn give_back<Q>(&self, key: &Q, cost: u64, taken: Taken, now: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let rule = &self.inner.rule;
        match (&self.inner.mode, taken) {
            (Mode::Local { table, .. }, Taken::Key { at }) => {
                let guard = table.guard();
                if let Some(cell) = table.get(key, &guard) {
                    cell.refund(rule, now, cost, at);
                }
            }
            (Mode::Local { overflow, .. }, Taken::Overflow { at }) => overflow.refund(rule, now, cost, at),
            (Mode::Distributed(dist), Taken::Claimed) => dist.refund(key, cost, now),
            (Mode::Distributed(dist), Taken::Degraded) => dist.refund_degraded(key, cost, now),
            // Nothing was taken, or not from this mode's state.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
