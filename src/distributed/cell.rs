//! One distributed key's claim: the tokens this node holds for the key, spent by checks,
//! refunded, and topped up, voided and measured by the sync task.
//!
//! Checks never lock: a check loads the validity and takes with one compare-and-swap on
//! `tokens` (a cold-start unit is one compare-and-swap on `cold`). The sync task, and a refund,
//! hold the ledger while they change the counts, so that what the sync counts as spent and what
//! a refund gives back are never both applied to the same token. Every exchange between the
//! sync task and the checks on these atomics (a grant applied, tokens voided at a lease end or
//! a window change, cold-start units counted into the debt, a refund, the forget test) is
//! modelled in `loom_models`, each with a broken twin the model catches.

use crate::sync::{AtomicU64, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// A key idle (nothing held, no demand) for this many syncs is forgotten.
pub(super) const IDLE_SYNCS: u32 = 3;

/// The claimed tokens of one key and the sync task's ledger of them. In C layout: what a
/// check on a held key reads (`tokens`, `valid_until`, `low`) takes the first 24 bytes.
#[derive(Default)]
#[repr(C)]
pub(crate) struct ClaimCell {
    /// Claimed tokens not yet spent.
    tokens: AtomicU64,
    /// Clock time (ns) after which `tokens` must not be spent (lease or window end); 0 before
    /// the first claim.
    valid_until: AtomicU64,
    /// Below this many tokens a check asks for an early sync.
    low: AtomicU64,
    /// `ColdStart::Optimistic` units left before the first claim.
    cold: AtomicU64,
    /// Cost denied since the last sync: demand the claims did not cover.
    denied: AtomicU64,
    /// Taken by the sync task and by refunds, never by a check that takes.
    ledger: Mutex<Ledger>,
    /// Which step runs as its broken twin (loom models only).
    #[cfg(all(test, tollgate_loom))]
    twin: Twin,
}

/// The sync task's record of a key, kept under the cell's lock.
#[derive(Default)]
pub(super) struct Ledger {
    /// Tokens right after the last sync's changes: what checks have spent since is the
    /// difference with the current count.
    after: u64,
    /// `ColdStart::Optimistic` units not yet counted into the debt (before the first claim).
    cold_given: u64,
    /// Optimistic cold-start units admitted and not yet paid for from grants.
    pub(super) debt: u64,
    /// Window id of the held tokens (window algorithms).
    pub(super) window: u64,
    /// A claim of the key was granted (its cold-start allowance is closed).
    pub(super) claimed: bool,
    /// What the store believes this node holds for the key (as of the last applied grant).
    pub(super) told: u64,
    /// Syncs in a row without demand.
    pub(super) idle: u32,
    /// Smoothed demand per sync interval, in 1/DEMAND_ONE units.
    pub(super) demand: u64,
    /// Clock time of the key's last sync.
    pub(super) last: u64,
    /// Whether the key is hot or cold on this node.
    pub(super) heat: super::heat::Heat,
    /// The key's checks wait for claims on demand (`check_async`): while it is cold, nothing
    /// is claimed ahead of them. False while its denials come from checks that cannot wait.
    pub(super) waiting: bool,
}

#[cfg(all(test, tollgate_loom))]
impl Ledger {
    /// The tokens the last sync left (loom models only).
    pub(super) fn after(&self) -> u64 {
        self.after
    }
}

/// What the sync found since the previous one ([`ClaimCell::measure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    /// The held tokens were still valid at the sync's time (otherwise they were voided).
    pub(super) valid: bool,
    /// Tokens held after the void.
    pub(super) held: u64,
    /// Tokens spent by checks since the previous sync.
    pub(super) spent: u64,
    /// Cold-start units spent since the previous sync (now counted in the debt).
    pub(super) cold_used: u64,
    /// Cost denied since the previous sync.
    pub(super) denied: u64,
}

/// A successful claim's answer, as the cell applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Grant {
    /// Tokens granted (cold-start debt is paid from them first).
    pub(super) granted: u64,
    /// Held tokens the store took back.
    pub(super) revoked: u64,
    /// The tokens' window (window algorithms): held tokens of another window are void.
    pub(super) window: Option<u64>,
    /// Until when the held tokens may be spent (clock nanoseconds).
    pub(super) valid_until: u64,
}

/// The step a loom model runs as its broken twin.
#[cfg(all(test, tollgate_loom))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Twin {
    /// Every step as in production.
    #[default]
    None,
    /// A grant adds its tokens with a load and a store, erasing a spend made in between.
    GrantByLoadStore,
    /// A void reads the tokens and then stores 0, so a token spent in between is also voided.
    VoidByLoadStore,
    /// A refund measures what was spent under the lock but gives it back after releasing it.
    RefundAfterUnlock,
    /// The grant closes the cold-start allowance with a load and a store, so a unit spent in
    /// between is never counted.
    ColdByLoadStore,
    /// The forget test looks only at what is left, not at what was used since the sync.
    ForgetUnmeasured,
}

impl ClaimCell {
    /// A key before its first claim with `n` cold-start units (`ColdStart::Optimistic(n)`).
    pub(super) fn with_cold(n: u64) -> Self {
        let cell = ClaimCell::default();
        cell.cold.store(n, Ordering::Relaxed);
        cell.ledger.lock().cold_given = n;
        cell
    }

    /// Takes `cost` from the held tokens if they are valid at `now`: `Ok` with the tokens left,
    /// or `Err` with the validity seen (0: never claimed). One load and one compare-and-swap.
    #[inline]
    pub(super) fn take(&self, cost: u64, now: u64) -> Result<u64, u64> {
        let valid_until = self.valid_until.load(Ordering::Acquire);
        if now < valid_until {
            if let Ok(before) = self
                .tokens
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(cost))
            {
                return Ok(before - cost);
            }
        }
        Err(valid_until)
    }

    /// Whether `left` tokens are below the low mark (a check then asks for an early sync).
    #[inline]
    pub(super) fn is_low(&self, left: u64) -> bool {
        left < self.low.load(Ordering::Relaxed)
    }

    /// Sets the low mark (the sync task, from the key's target).
    pub(super) fn set_low(&self, low: u64) {
        self.low.store(low, Ordering::Relaxed);
    }

    /// Takes `cost` from the cold-start units; false when fewer are left.
    pub(super) fn take_cold(&self, cost: u64) -> bool {
        self.cold
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(cost))
            .is_ok()
    }

    /// Records `cost` denied (demand for the next claim); returns the cost denied before it
    /// since the last sync.
    pub(super) fn deny(&self, cost: u64) -> u64 {
        self.denied.fetch_add(cost, Ordering::Relaxed)
    }

    /// The held tokens, valid or not.
    pub(super) fn held(&self, order: Ordering) -> u64 {
        self.tokens.load(order)
    }

    /// Until when the held tokens may be spent (0: never claimed).
    pub(super) fn valid_until(&self) -> u64 {
        self.valid_until.load(Ordering::Acquire)
    }

    /// The cold-start units left.
    pub(super) fn cold(&self) -> u64 {
        self.cold.load(Ordering::Acquire)
    }

    /// Gives `cost` back to the held tokens if they are valid at `now`: at most what checks
    /// took since the last sync, so a token the sync counted as spent, returned or voided
    /// never comes back.
    pub(super) fn refund(&self, cost: u64, now: u64) {
        if now < self.valid_until.load(Ordering::Acquire) {
            let ledger = self.ledger.lock();
            // Only what was taken since the last sync can come back.
            let spent = ledger.after.saturating_sub(self.tokens.load(Ordering::Acquire));
            #[cfg(all(test, tollgate_loom))]
            if self.twin == Twin::RefundAfterUnlock {
                drop(ledger);
                self.tokens.fetch_add(cost.min(spent), Ordering::AcqRel);
                return;
            }
            self.tokens.fetch_add(cost.min(spent), Ordering::AcqRel);
            drop(ledger);
        }
    }

    /// The sync task's lock on the ledger.
    pub(super) fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock()
    }

    /// Voids the held tokens; returns how many.
    fn void(&self, ledger: &mut Ledger) -> u64 {
        #[cfg(all(test, tollgate_loom))]
        if self.twin == Twin::VoidByLoadStore {
            let void = self.tokens.load(Ordering::Acquire);
            self.tokens.store(0, Ordering::Release);
            ledger.after = ledger.after.saturating_sub(void);
            return void;
        }
        let void = self.tokens.swap(0, Ordering::AcqRel);
        ledger.after = ledger.after.saturating_sub(void);
        void
    }

    /// The sync's first step: voids tokens no longer valid at `now` (lease or window end),
    /// and measures what checks spent, used and were denied since the previous sync. Cold-start
    /// units used are added to the debt here, once.
    pub(super) fn measure(&self, ledger: &mut Ledger, now: u64) -> Usage {
        let valid = now < self.valid_until.load(Ordering::Acquire);
        if !valid {
            // Expired lease or finished window: the tokens are void; take them out.
            self.void(ledger);
        }
        let held = self.tokens.load(Ordering::Acquire);
        let spent = ledger.after.saturating_sub(held);
        let cold_used = if ledger.claimed {
            0
        } else {
            ledger.cold_given.saturating_sub(self.cold.load(Ordering::Acquire))
        };
        let denied = self.denied.swap(0, Ordering::AcqRel);
        ledger.debt += cold_used;
        ledger.cold_given -= cold_used.min(ledger.cold_given);
        Usage {
            valid,
            held,
            spent,
            cold_used,
            denied,
        }
    }

    /// The sync's second step: takes up to `excess` out of the held tokens to return them.
    /// Returns what was taken and what is kept; the kept count starts the next measure.
    pub(super) fn give_back(&self, ledger: &mut Ledger, excess: u64) -> (u64, u64) {
        let returned = match self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t - excess.min(t)))
        {
            Ok(before) => excess.min(before),
            Err(_) => 0,
        };
        let kept = self.tokens.load(Ordering::Acquire);
        ledger.after = kept;
        (returned, kept)
    }

    /// Applies a successful claim's grant: pays the cold-start debt from it, takes out what was
    /// revoked and what belongs to another window, extends the validity, adds the rest, and
    /// closes the cold-start allowance (units spent while the claim was in flight become debt).
    pub(super) fn apply(&self, ledger: &mut Ledger, grant: Grant) {
        let pay = grant.granted.min(ledger.debt);
        ledger.debt -= pay;
        let granted = grant.granted - pay;
        // Revoked tokens leave first.
        if grant.revoked > 0 {
            let revoked = grant.revoked;
            if let Ok(before) = self
                .tokens
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t - revoked.min(t)))
            {
                ledger.after = ledger.after.saturating_sub(revoked.min(before));
            }
        }
        if let Some(window) = grant.window {
            if window != ledger.window {
                // A new window: anything left from the old one is void.
                self.void(ledger);
                ledger.window = window;
            }
        }
        // Extend validity before adding tokens only if the tokens already held share it;
        // new tokens become spendable with the new validity.
        self.valid_until.store(grant.valid_until.max(1), Ordering::Release);
        self.add(granted);
        ledger.after += granted;
        ledger.told = ledger.after;
        ledger.claimed = true;
        // Cold-start units spent while the first claim was in flight are owed too.
        let late = ledger.cold_given.saturating_sub(self.close_cold());
        ledger.debt += late;
        ledger.cold_given = 0;
    }

    fn add(&self, granted: u64) {
        #[cfg(all(test, tollgate_loom))]
        if self.twin == Twin::GrantByLoadStore {
            let held = self.tokens.load(Ordering::Acquire);
            self.tokens.store(held + granted, Ordering::Release);
            return;
        }
        self.tokens.fetch_add(granted, Ordering::AcqRel);
    }

    /// Ends the cold-start allowance; returns the units that were left.
    fn close_cold(&self) -> u64 {
        #[cfg(all(test, tollgate_loom))]
        if self.twin == Twin::ColdByLoadStore {
            let left = self.cold.load(Ordering::Acquire);
            self.cold.store(0, Ordering::Release);
            return left;
        }
        self.cold.swap(0, Ordering::AcqRel)
    }

    /// Whether the key can be forgotten: idle for [`IDLE_SYNCS`] syncs, holding nothing,
    /// nothing spent, denied or used of the cold-start allowance since the last sync, and **no
    /// unpaid cold-start debt**. A key forgotten with debt would take its debt with it, and its
    /// next request would get a fresh `ColdStart::Optimistic` allowance: `n` more per forget
    /// cycle, without bound. A check that found the key before it was forgotten may still take
    /// from it afterwards, so the test is on what the last sync left (`after`, `cold_given`),
    /// not only on what is left now: a cold-start unit or a token taken between the sync and
    /// the test would leave with the key uncounted (the unit never paid for; the token's
    /// refund lost with the key). With nothing left by the sync, a check can take nothing and a
    /// refund can add nothing.
    pub(super) fn forgettable(&self) -> bool {
        let s = self.ledger.lock();
        #[cfg(all(test, tollgate_loom))]
        if self.twin == Twin::ForgetUnmeasured {
            return s.idle >= IDLE_SYNCS
                && s.debt == 0
                && self.tokens.load(Ordering::Acquire) == 0
                && self.denied.load(Ordering::Acquire) == 0
                && self.cold.load(Ordering::Acquire) == 0;
        }
        s.idle >= IDLE_SYNCS
            && s.debt == 0
            && s.after == 0
            && s.cold_given == 0
            && self.tokens.load(Ordering::Acquire) == 0
            && self.denied.load(Ordering::Acquire) == 0
            && self.cold.load(Ordering::Acquire) == 0
    }

    /// The same cell running `twin` in place of the production step (loom models only).
    #[cfg(all(test, tollgate_loom))]
    pub(super) fn twin(mut self, twin: Twin) -> Self {
        self.twin = twin;
        self
    }
}
