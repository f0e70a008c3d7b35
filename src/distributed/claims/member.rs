//! The keys as a member of the node's syncs: what each round claims for them, and what its
//! outcomes do to them.

use std::hash::Hash;

use super::DistKeys;
use crate::distributed::identifier::Identifier;
use crate::distributed::node::{ApplyReport, Member};
use crate::store::{Claim, ClaimOutcome};
use crate::sync::Ordering;

impl<K> Member for DistKeys<K>
where
    K: Hash + Eq + Send + Sync + Clone + Identifier + 'static,
{
    fn retired(&self) -> bool {
        self.handles.load(Ordering::Acquire) == 0
    }

    fn prepare(&self, now: u64, drain: bool, seq: u64, out: &mut Vec<Claim>) {
        // Every key is visited, those asked for included: their queue entries are dropped
        // first, so that a key asked for again while this runs queues itself anew.
        drop(std::mem::take(&mut *self.queue.lock()));
        // While the failure policy answers (the circuit is not closed: a drain at shutdown
        // runs then too), a key's cell holds its share's state: forgotten, the key would come
        // back with a fresh share.
        let may_forget = !self.node.breaker().is_open();
        let guard = self.map.guard();
        let (mut keys, mut forget) = (Vec::new(), Vec::new());
        for (key, cell) in self.map.iter(&guard) {
            let asked = cell.ask.take();
            match self.claim_for(key, cell, now, drain, seq, asked) {
                Some(claim) => {
                    keys.push((key.clone(), claim.wanted));
                    out.push(claim);
                }
                None => {
                    if may_forget
                        && cell.failed_since.load(Ordering::Relaxed) == 0
                        && cell.claim.forgettable()
                        && cell.ask.pending() == 0
                    {
                        forget.push(key.clone());
                    }
                }
            }
        }
        for key in forget {
            let removed = self
                .map
                .remove_if(&key, |_, c| c.claim.forgettable() && !c.ask.is_queued(), &guard);
            if let Ok(Some(_)) = removed {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
        }
        *self.in_flight.lock() = keys;
    }

    fn prepare_asked(&self, now: u64, seq: u64, out: &mut Vec<Claim>) {
        let queued = std::mem::take(&mut *self.queue.lock());
        let guard = self.map.guard();
        let mut keys = Vec::with_capacity(queued.len());
        for key in queued {
            let Some(cell) = self.map.get(&key, &guard) else {
                continue;
            };
            let asked = cell.ask.take();
            if asked == 0 {
                // A sync took this key's ask after it was queued.
                continue;
            }
            if let Some(claim) = self.claim_for(&key, cell, now, false, seq, asked) {
                keys.push((key, claim.wanted));
                out.push(claim);
            }
        }
        *self.in_flight.lock() = keys;
    }

    #[cfg(feature = "metrics")]
    fn held(&self) -> u64 {
        let guard = self.map.guard();
        self.map
            .iter(&guard)
            .map(|(_, c)| c.claim.held(Ordering::Relaxed))
            .sum()
    }

    fn apply(&self, sent_at: u64, outcomes: &[Option<ClaimOutcome>], report: &mut ApplyReport) {
        let keys = std::mem::take(&mut *self.in_flight.lock());
        debug_assert_eq!(keys.len(), outcomes.len(), "one outcome per claim of the round");
        let guard = self.map.guard();
        for ((key, wanted), outcome) in keys.iter().zip(outcomes) {
            if let Some(cell) = self.map.get(key, &guard) {
                self.apply_one(cell, outcome.as_ref(), *wanted, sent_at, report);
            }
        }
    }
}
