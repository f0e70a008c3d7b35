//! A distributed limiter's keys: claimed tokens per key, spent by checks, topped up by syncs.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use papaya::HashMap;

use super::ask::AskCell;
use super::cell::{ClaimCell, Grant, Ledger, Usage};
use super::demand::{self, Sizing};
use super::identifier::Identifier;
use super::node::{ApplyReport, ColdStart, FailurePolicy, Member, NodeInner};
use crate::algorithm::Rule;
use crate::consts::{CLAIM_MARGIN_NS, CLOCK_RATE_TOLERANCE_PPM};
use crate::local::cell::Cell;
use crate::store::{Claim, ClaimOutcome, KeyError, Limits, StoreAlgorithm};
use crate::sync::{AtomicU64, Ordering};

/// How much sooner than the store's count claimed tokens stop being spendable, for tokens the
/// store counts for `span_ns` after the claim: the fixed margin (cached clock lag, the store's
/// rounding) plus the span times the clock-rate tolerance, so that a node clock running up to
/// [`CLOCK_RATE_TOLERANCE_PPM`] slower than the store's never spends a token past the store's
/// count, however long the lease or window.
pub(crate) fn claim_margin_ns(span_ns: u64) -> u64 {
    let drift = u128::from(span_ns) * u128::from(CLOCK_RATE_TOLERANCE_PPM) / 1_000_000;
    CLAIM_MARGIN_NS.saturating_add(drift as u64)
}

/// One key's state: its claim, and what the last sync learned about it. Checks touch the
/// atomics; only the sync task and refunds take the claim's ledger. The claim comes first, so
/// that a check's fields (validity, tokens, low mark) sit together at the start of the cell.
#[derive(Default)]
#[repr(C)]
pub(crate) struct DistCell {
    /// The claimed tokens and the sync task's ledger of them.
    claim: ClaimCell,
    /// Until this time (ns) the store has no token for the key: deny without asking.
    exhausted_until: AtomicU64,
    /// Tokens the store had left at the last sync (for `remaining`).
    store_remaining: AtomicU64,
    /// When the key would be back to a full quota (ns), as of the last sync.
    reset_at: AtomicU64,
    /// [`FailurePolicy::LocalShare`]: the key's state under this node's share of the policy.
    share: Cell,
    /// Since when (clock nanoseconds, at least 1) the store has failed this key alone
    /// (`WRONGTYPE`, corrupt state): the failure policy answers for it until a claim succeeds,
    /// and its share of the key starts empty then. 0 while the key's claims succeed.
    failed_since: AtomicU64,
    /// The claim on demand waiting checks asked for.
    ask: AskCell,
}

/// What a check that may wait found.
pub(crate) enum Ask {
    /// The answer: held tokens covered it, or no claim can change it now (the store reported
    /// the key exhausted, the failure policy answers, the node stopped).
    Done(Outcome),
    /// Held tokens do not cover it, and the store may: its cost was added to the key's claim
    /// on demand ([`NodeInner::send_asked`] sends it).
    Asked,
}

/// What a check found.
pub(crate) struct Outcome {
    pub(crate) allowed: bool,
    pub(crate) remaining: u64,
    pub(crate) retry_after_ns: u64,
    pub(crate) reset_after_ns: u64,
    pub(crate) untracked: bool,
    /// The failure policy answered (the store is unreachable, or failed this key).
    pub(crate) degraded: bool,
}

pub(crate) struct DistKeys<K> {
    map: HashMap<K, DistCell, ahash::RandomState>,
    /// Keys asked for by waiting checks since the last claim on demand (at most one entry per
    /// key while its flag is up; an entry whose cost a sync already took is skipped).
    queue: parking_lot::Mutex<Vec<K>>,
    len: AtomicUsize,
    max_keys: usize,
    namespace: &'static str,
    limits: Limits,
    /// The policy as local arithmetic (for the failure policy's share).
    rule: Rule,
    node: Arc<NodeInner>,
    /// The keys the round in flight claimed for, in order, with what each claim wanted.
    in_flight: parking_lot::Mutex<Vec<(K, u64)>>,
    /// The limiter handles (clones of one `Limiter`) alive. At 0 the limiter is gone: a round
    /// in flight or a metrics publication may still hold these keys, but the namespace is free
    /// for a new limiter of the node.
    handles: AtomicUsize,
}

impl<K> DistKeys<K> {
    /// Another handle of the limiter.
    pub(crate) fn add_handle(&self) {
        self.handles.fetch_add(1, Ordering::Relaxed);
    }

    /// A handle of the limiter is gone.
    pub(crate) fn drop_handle(&self) {
        self.handles.fetch_sub(1, Ordering::Release);
    }
}

impl<K> DistKeys<K>
where
    K: Hash + Eq + Send + Sync + Clone + Identifier + 'static,
{
    /// Fails when a live limiter of this node already uses `namespace`: the store records one
    /// holding per node and key, which two limiters would overwrite.
    pub(crate) fn new(
        node: Arc<NodeInner>,
        namespace: &'static str,
        limits: Limits,
        rule: Rule,
        max_keys: usize,
    ) -> Result<Arc<Self>, String> {
        let keys = Arc::new(DistKeys {
            map: crate::local::table::keyed_map(max_keys),
            queue: parking_lot::Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            max_keys,
            namespace,
            limits,
            rule,
            node: node.clone(),
            in_flight: parking_lot::Mutex::new(Vec::new()),
            handles: AtomicUsize::new(1),
        });
        let weak: std::sync::Weak<dyn Member> = Arc::downgrade(&keys) as _;
        node.register(namespace, weak)?;
        Ok(keys)
    }
}

impl<K> DistKeys<K>
where
    K: Hash + Eq + Send + Sync + 'static,
{
    pub(crate) fn node(&self) -> &NodeInner {
        &self.node
    }

    /// Whether a check of `cost` that may wait should ask for a claim on demand: the tokens
    /// held for `key` do not cover it, and a claim could (the store has not reported the key
    /// exhausted, the store answers for it, the node runs).
    pub(crate) fn wants_claim<Q>(&self, key: &Q, cost: u64, now: u64) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.node.breaker().is_open() || self.node.is_stopped() {
            return false;
        }
        let guard = self.map.guard();
        match self.map.get(key, &guard) {
            None => true,
            Some(c) => {
                let held = if now < c.claim.valid_until() {
                    c.claim.held(Ordering::Acquire)
                } else {
                    0
                };
                held < cost && self.claimable(c, now)
            }
        }
    }

    /// Whether a claim of the key could be granted now, as far as the node knows.
    fn claimable(&self, cell: &DistCell, now: u64) -> bool {
        now >= cell.exhausted_until.load(Ordering::Relaxed)
            && cell.failed_since.load(Ordering::Relaxed) == 0
            && !self.node.is_stopped()
    }

    /// The key's cell, made if it has none (`None`: the table is full).
    #[inline]
    fn cell<'g, Q>(&self, key: &Q, guard: &'g papaya::LocalGuard<'_>) -> Option<&'g DistCell>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        match self.map.get(key, guard) {
            Some(c) => Some(c),
            None => self.insert(key, guard),
        }
    }

    /// A key's first check: its cell is made (once per key, so out of the hot path's code).
    #[cold]
    #[inline(never)]
    fn insert<'g, Q>(&self, key: &Q, guard: &'g papaya::LocalGuard<'_>) -> Option<&'g DistCell>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.max_keys {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut fresh = DistCell::default();
        if let ColdStart::Optimistic(n) = self.node.cold_start() {
            fresh.claim = ClaimCell::with_cold(n);
        }
        match self.map.try_insert(key.to_owned(), fresh, guard) {
            Ok(c) => Some(c),
            Err(e) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                Some(e.current)
            }
        }
    }

    /// Adds `cost` to the key's claim on demand when its held tokens do not cover it and a
    /// claim could (see [`wants_claim`](Self::wants_claim)); true when it did. Takes nothing.
    pub(crate) fn ask<Q>(&self, key: &Q, cost: u64, now: u64) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.wants_claim(key, cost, now) {
            return false;
        }
        let guard = self.map.guard();
        let Some(cell) = self.cell(key, &guard) else {
            return false;
        };
        if cell.ask.ask(cost) {
            self.queue.lock().push(key.to_owned());
        }
        self.node.asked();
        true
    }

    /// Takes `cost` from the key's claimed tokens.
    #[inline]
    pub(crate) fn take<Q>(&self, key: &Q, cost: u64, now: u64) -> Outcome
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        match self.take_or_ask(key, cost, now, false) {
            Ask::Done(o) => o,
            Ask::Asked => unreachable!("a check that does not wait never asks"),
        }
    }

    /// Takes `cost` from the key's claimed tokens; with `ask`, when they do not cover it and
    /// the store could, adds `cost` to the key's claim on demand instead of denying.
    #[inline]
    pub(crate) fn take_or_ask<Q>(&self, key: &Q, cost: u64, now: u64, ask: bool) -> Ask
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let guard = self.map.guard();
        let Some(cell) = self.cell(key, &guard) else {
            return Ask::Done(Outcome {
                allowed: false,
                remaining: 0,
                retry_after_ns: self.node.timing().interval_ns(),
                reset_after_ns: 0,
                untracked: true,
                degraded: false,
            });
        };
        let valid_until = match cell.claim.take(cost, now) {
            Ok(left) => {
                if cell.claim.is_low(left) {
                    self.node.request_priority();
                }
                return Ask::Done(self.outcome(cell, true, left, now));
            }
            Err(valid_until) => valid_until,
        };
        // Held tokens do not cover it: the store decides, unless it is unreachable.
        if self.node.breaker().is_open() || cell.failed_since.load(Ordering::Relaxed) != 0 {
            return Ask::Done(self.degraded(cell, cost, now, true));
        }
        if valid_until == 0 && !self.node.is_stopped() && cell.claim.take_cold(cost) {
            self.node.request_priority();
            return Ask::Done(self.outcome(cell, true, 0, now));
        }
        if ask && self.claimable(cell, now) {
            if cell.ask.ask(cost) {
                self.queue.lock().push(key.to_owned());
            }
            self.node.asked();
            return Ask::Asked;
        }
        if !ask {
            // Demand for the next claim, from a check that could not wait for one (a waiting
            // check's demand is what it asks for). The second denial since the last sync asks
            // for an early one, not the first: waking the sync task costs the check a few
            // microseconds (a thread wake-up), and a lone request of a slow key gains nothing
            // from an early claim (its client comes back seconds later, to this node or
            // another); a burst does.
            let before = cell.claim.deny(cost);
            if before > 0 && now >= cell.exhausted_until.load(Ordering::Relaxed) {
                self.node.request_priority();
            }
        }
        Ask::Done(self.outcome(cell, false, cell.claim.held(Ordering::Relaxed), now))
    }

    /// The failure policy's answer (`take`: spend from the share; otherwise only look).
    #[cold]
    fn degraded(&self, cell: &DistCell, cost: u64, now: u64, take: bool) -> Outcome {
        let node = &*self.node;
        let wait = node.retry_hint(now);
        let answer = |allowed: bool, remaining: u64, retry_after_ns: u64, reset_after_ns: u64| Outcome {
            allowed,
            remaining,
            retry_after_ns: if allowed { 0 } else { retry_after_ns },
            reset_after_ns,
            untracked: false,
            degraded: true,
        };
        match node.failure_policy() {
            FailurePolicy::FailClosed => answer(false, 0, wait, 0),
            FailurePolicy::FailOpen => {
                if take {
                    node.count_fail_open(cost);
                }
                answer(true, self.limits.capacity(), 0, 0)
            }
            FailurePolicy::LocalShare => match self.rule.share(node.share_divisor()) {
                None => answer(false, 0, wait, 0),
                // More than the whole share: never, on this node's share (the arithmetic takes
                // at most the capacity it is given).
                Some(rule) if cost > rule.capacity => answer(false, 0, wait, 0),
                Some(rule) => {
                    // The share starts empty when the failure began: until then this node
                    // admitted from claims the store counted, and tokens it still holds are
                    // spent before the share. A share that started full would add its whole
                    // capacity to every outage (and a store restarted empty adds one more).
                    let mut since = 0;
                    if node.breaker().is_open() {
                        since = node.breaker().outage_since();
                    }
                    since = since.max(cell.failed_since.load(Ordering::Relaxed));
                    let step = if take {
                        cell.share.acquire_after_empty(&rule, now, cost, since)
                    } else {
                        cell.share.peek_after_empty(&rule, now, cost, since)
                    };
                    // The share's cell is never retired.
                    let step = step.unwrap_or(crate::algorithm::Step {
                        allowed: false,
                        state: 0,
                    });
                    answer(
                        step.allowed,
                        rule.remaining(step.state, now),
                        rule.retry_after(step.state, now, cost),
                        rule.reset_after(step.state, now),
                    )
                }
            },
        }
    }

    /// Gives `cost` back to the failure policy's share of the key.
    pub(crate) fn refund_degraded<Q>(&self, key: &Q, cost: u64, now: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.node.failure_policy() != FailurePolicy::LocalShare {
            return;
        }
        let guard = self.map.guard();
        if let (Some(cell), Some(rule)) = (self.map.get(key, &guard), self.rule.share(self.node.share_divisor())) {
            cell.share.refund(&rule, now, cost, now);
        }
    }

    fn outcome(&self, cell: &DistCell, allowed: bool, local: u64, now: u64) -> Outcome {
        let retry = if allowed {
            0
        } else {
            cell.exhausted_until
                .load(Ordering::Relaxed)
                .saturating_sub(now)
                .max(self.node.timing().retry_floor_ns())
                .max(1)
        };
        Outcome {
            allowed,
            remaining: local
                .saturating_add(cell.store_remaining.load(Ordering::Relaxed))
                .min(self.limits.capacity()),
            retry_after_ns: retry,
            reset_after_ns: cell.reset_at.load(Ordering::Relaxed).saturating_sub(now),
            untracked: false,
            degraded: false,
        }
    }

    /// Gives `cost` back to the key's claimed tokens (it will be returned to the store when
    /// demand no longer needs it).
    pub(crate) fn refund<Q>(&self, key: &Q, cost: u64, now: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let guard = self.map.guard();
        if let Some(cell) = self.map.get(key, &guard) {
            cell.claim.refund(cost, now);
        }
    }

    /// What `take(cost)` would answer now, taking nothing.
    pub(crate) fn peek<Q>(&self, key: &Q, cost: u64, now: u64) -> Outcome
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let guard = self.map.guard();
        match self.map.get(key, &guard) {
            Some(cell) => {
                let valid = now < cell.claim.valid_until();
                let tokens = if valid { cell.claim.held(Ordering::Acquire) } else { 0 };
                if tokens < cost && (self.node.breaker().is_open() || cell.failed_since.load(Ordering::Relaxed) != 0) {
                    return self.degraded(cell, cost, now, false);
                }
                let cold = if cell.claim.valid_until() == 0 {
                    cell.claim.cold()
                } else {
                    0
                };
                self.outcome(cell, tokens >= cost || cold >= cost, tokens, now)
            }
            None if self.node.breaker().is_open() => self.degraded(&DistCell::default(), cost, now, false),
            None => {
                let allowed = matches!(self.node.cold_start(), ColdStart::Optimistic(n) if n >= cost);
                let retry = if allowed { 0 } else { self.node.timing().interval_ns() };
                Outcome {
                    allowed,
                    remaining: 0,
                    retry_after_ns: retry,
                    reset_after_ns: 0,
                    untracked: false,
                    degraded: false,
                }
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

impl<K> DistKeys<K>
where
    K: Hash + Eq + Send + Sync + Clone + Identifier + 'static,
{
    /// The key's claim for this sync (`None`: nothing to ask, return or tell), with `asked`
    /// units asked for on demand by waiting checks on top of what its demand calls for.
    fn claim_for(&self, key: &K, cell: &DistCell, now: u64, drain: bool, seq: u64, asked: u64) -> Option<Claim> {
        let capacity = self.limits.capacity();
        let mut s = cell.claim.lock();
        let usage = cell.claim.measure(&mut s, now);
        let used = usage.spent + usage.denied + usage.cold_used;
        self.observe(&mut s, &usage, used, asked, now);
        let exhausted = now < cell.exhausted_until.load(Ordering::Relaxed);
        let target = if drain || (used == 0 && !usage.valid) || (s.waiting && !s.heat.hot) {
            // Shutting down; no demand since the held tokens expired; or a cold key whose
            // checks wait for claims on demand: nothing is claimed ahead of its checks.
            0
        } else {
            // A hot key, or checks that cannot wait: tokens ahead of the checks, from demand.
            self.sizing().target(s.demand, used, capacity)
        };
        let need = demand::need(target, asked, capacity);
        let (returned, kept) = cell.claim.give_back(&mut s, demand::excess(usage.held, need, drain));
        let wanted = if exhausted || drain {
            0
        } else {
            // A key the store failed alone asks at every sync (its cell, holding its share, stays).
            let failed = cell.failed_since.load(Ordering::Relaxed) != 0;
            demand::wanted(need, kept, s.debt, capacity, failed)
        };
        cell.claim.set_low(demand::low_mark(target));
        if Self::silent(&mut s, returned, wanted, exhausted, used, drain) {
            return None;
        }
        let mut id = Vec::with_capacity(32);
        key.write_identifier(&mut id);
        Some(Claim {
            key: self.node.encoder().encode(self.namespace, &id),
            limits: self.limits,
            kept,
            returned,
            wanted,
            window: s.window,
            seq,
        })
    }

    /// The node's settings for claim sizes.
    fn sizing(&self) -> Sizing {
        Sizing {
            interval_ns: self.node.timing().interval_ns(),
            headroom_percent: self.node.headroom_percent(),
        }
    }

    /// Records a sync's measure of the key: its demand estimate, its heat, and who checks it.
    fn observe(&self, s: &mut Ledger, usage: &Usage, used: u64, asked: u64, now: u64) {
        s.demand = self.sizing().estimate(s.demand, s.last, now, used);
        s.last = now;
        s.heat.observe(used, now, self.node.timing().lease_ns());
        // Who checks the key: checks that wait for a claim on demand, or checks that cannot
        // wait (their denials are the demand), as the latest sign says.
        if asked > 0 {
            s.waiting = true;
        } else if usage.denied > 0 {
            s.waiting = false;
        }
    }

    /// Whether the key's claim stays unsent: nothing to ask for or give back. When the key has
    /// just gone quiet, the store is told once what this node still holds, so it stops
    /// counting spent tokens against the capacity; otherwise the key stays silent: an
    /// exhausted key hammered by a client, or an idle one, costs the store nothing.
    fn silent(s: &mut Ledger, returned: u64, wanted: u64, exhausted: bool, used: u64, drain: bool) -> bool {
        if returned == 0 && wanted == 0 && (s.debt == 0 || exhausted) {
            let just_idle = used == 0 && s.idle == 0 && s.claimed && !drain && s.told > 0;
            if used == 0 {
                s.idle = s.idle.saturating_add(1);
            }
            !just_idle
        } else {
            s.idle = 0;
            false
        }
    }

    /// A claim the store failed for this key alone: the failure policy answers for it until a
    /// claim succeeds; nothing was granted and what it returned is gone.
    fn key_failed(&self, cell: &DistCell, e: &KeyError, report: &mut ApplyReport) {
        if cell.failed_since.load(Ordering::Relaxed) == 0 {
            self.node.mark_degraded();
            cell.failed_since
                .store(self.node.clock().now_ns().max(1), Ordering::Relaxed);
        }
        report.key_errors += 1;
        if report.first_key_error.is_none() {
            report.first_key_error = Some(e.to_string());
        }
    }

    /// Until when the tokens `grant` brought may be spent: the end of their window, or one
    /// lease after the claim was sent at `sent_at` (the store counts them for one to two
    /// leases after receiving it), less a margin for clock lag and rounding.
    fn valid_until(&self, grant: &crate::store::Grant, sent_at: u64) -> u64 {
        let ms = 1_000_000u64;
        let span_ns = match self.limits.algorithm() {
            StoreAlgorithm::TokenBucket => self.node.timing().lease_ns(),
            StoreAlgorithm::FixedWindow => grant.ms_to_reset.saturating_mul(ms),
            // The store reports the end of the next window, once this one's count decays.
            StoreAlgorithm::SlidingWindow => grant
                .ms_to_reset
                .saturating_mul(ms)
                .saturating_sub(self.limits.period_us().saturating_mul(1000)),
        };
        sent_at.saturating_add(span_ns).saturating_sub(claim_margin_ns(span_ns))
    }

    /// Applies one claim's outcome (`None`: its batch failed) to the key's cell.
    fn apply_one(
        &self,
        cell: &DistCell,
        outcome: Option<&ClaimOutcome>,
        wanted: u64,
        sent_at: u64,
        report: &mut ApplyReport,
    ) {
        let grant = match outcome {
            Some(Ok(grant)) => grant,
            Some(Err(e)) => return self.key_failed(cell, e, report),
            // The batch failed: nothing granted; what was returned is gone.
            None => return,
        };
        if grant.stale {
            // The store had applied a newer claim of this node: this one changed nothing, so
            // it is taken like a failed one (nothing granted; what it returned is gone).
            report.stale += 1;
            return;
        }
        cell.failed_since.store(0, Ordering::Relaxed);
        let mut s = cell.claim.lock();
        // The store lost state only if this node's claim was still valid when it was sent
        // (otherwise the store may rightly have forgotten it).
        if grant.state_lost && s.claimed && sent_at < cell.claim.valid_until() {
            report.state_lost += 1;
        }
        let now = self.node.clock().now_ns();
        let ms = 1_000_000u64;
        let windowed = self.limits.algorithm() != StoreAlgorithm::TokenBucket;
        cell.claim.apply(
            &mut s,
            Grant {
                granted: grant.granted,
                revoked: grant.revoked,
                window: windowed.then_some(grant.window),
                valid_until: self.valid_until(grant, sent_at),
            },
        );
        cell.store_remaining.store(grant.remaining, Ordering::Relaxed);
        cell.reset_at.store(
            now.saturating_add(grant.ms_to_reset.saturating_mul(ms)),
            Ordering::Relaxed,
        );
        // The store ran dry: it granted less than wanted and has nothing left. Until its next
        // token, a check its held tokens do not cover is denied without asking.
        let exhausted = if grant.remaining == 0 && grant.granted < wanted.max(1) && grant.ms_to_next_token > 0 {
            now.saturating_add(grant.ms_to_next_token.saturating_mul(ms))
        } else {
            0
        };
        cell.exhausted_until.store(exhausted, Ordering::Relaxed);
    }
}

mod member;

#[cfg(test)]
mod tests;
