//! A limiter's decision counts for the metrics, and their publication.

use std::hash::Hash;

use super::Inner;
use crate::algorithm::Rule;
use crate::decision::{Decision, Figures};
use crate::metrics::{with, DECISIONS_TOTAL, KEYS_EVICTED_TOTAL, KEYS_TRACKED, NEAR_LIMIT_TOTAL};
use crate::tally::{Kind, Tally};

/// A limiter's decision counts and metric labels. The tally is off when the limiter was built
/// with metrics off.
pub(super) struct Counted {
    tally: Tally,
    /// [`Rule::near_limit_slack`] of the limiter's rule, or `NO_SLACK`.
    near_slack: u64,
    labels: Vec<::metrics::Label>,
}

/// No one-compare near-limit test for this rule (a slack never reaches `u64::MAX`).
const NO_SLACK: u64 = u64::MAX;

impl Counted {
    /// The counts of a limiter named `name` with `rule`: with `labels` (layer, tier), or off.
    pub(super) fn new(labels: Option<(String, String)>, rule: &Rule, name: &'static str) -> Self {
        match labels {
            Some((layer, tier)) => Counted {
                tally: Tally::new(),
                near_slack: rule.near_limit_slack().unwrap_or(NO_SLACK),
                labels: crate::metrics::labels(name, &layer, &tier),
            },
            None => Counted {
                tally: Tally::off(),
                near_slack: NO_SLACK,
                labels: Vec::new(),
            },
        }
    }

    /// Whether decisions are counted.
    pub(super) fn is_on(&self) -> bool {
        self.tally.is_on()
    }

    /// Counts a decision made on a state of the limiter's own `rule` (the key's cell or the
    /// overflow cell): whether it was allowed, and the state after it at `now`.
    #[inline(always)]
    pub(super) fn count_own(&self, rule: &Rule, allowed: bool, state: u64, now: u64) {
        self.record(allowed, || {
            if self.near_slack != NO_SLACK {
                state > crate::algorithm::clamp(now) + self.near_slack
            } else {
                near_limit_general(rule, state, now)
            }
        });
    }

    /// Counts any decision of this limiter.
    #[inline(always)]
    pub(super) fn count(&self, rule: &Rule, d: &Decision) {
        match d.figures {
            Figures::Cell { state, now, .. } => self.count_own(rule, d.allowed, state, now),
            _ => self.record(d.allowed, || d.near_limit()),
        }
    }

    /// Counts allowed (and near-limit, asking `near` only then) or denied.
    #[inline(always)]
    fn record(&self, allowed: bool, near: impl FnOnce() -> bool) {
        match self.tally.mine() {
            Some(cells) => {
                if !allowed {
                    cells.bump(Kind::Denied);
                } else {
                    cells.bump(Kind::Allowed);
                    if near() {
                        cells.bump(Kind::NearLimit);
                    }
                }
            }
            None => {
                if self.tally.is_on() {
                    self.record_slow(allowed, allowed && near());
                }
            }
        }
    }

    /// No cells for this thread at hand: the first count of the thread, a tally without a
    /// slot, or a thread being torn down.
    #[cold]
    fn record_slow(&self, allowed: bool, near: bool) {
        self.tally.bump(if allowed { Kind::Allowed } else { Kind::Denied });
        if near {
            self.tally.bump(Kind::NearLimit);
        }
    }
}

#[cold]
fn near_limit_general(rule: &Rule, state: u64, now: u64) -> bool {
    rule.near_limit(state, now)
}

impl<K: Hash + Eq + Send + Sync + 'static> crate::metrics::Source for Inner<K> {
    fn publish(&self) {
        let m = &self.metrics;
        if !m.tally.is_on() {
            return;
        }
        let l = &m.labels;
        ::metrics::counter!(DECISIONS_TOTAL, with(l.clone(), "decision", "allowed"))
            .absolute(m.tally.get(Kind::Allowed));
        ::metrics::counter!(DECISIONS_TOTAL, with(l.clone(), "decision", "denied")).absolute(m.tally.get(Kind::Denied));
        ::metrics::counter!(NEAR_LIMIT_TOTAL, l.clone()).absolute(m.tally.get(Kind::NearLimit));
        ::metrics::gauge!(KEYS_TRACKED, l.clone()).set(self.mode.len() as f64);
        ::metrics::counter!(KEYS_EVICTED_TOTAL, l.clone()).absolute(self.mode.evicted());
    }
}
