//! loom models of a distributed key's claim ([`ClaimCell`]): the sync task applying grants,
//! voiding tokens, counting cold-start units and forgetting the key while checks take and
//! refund; and of its claim on demand ([`AskCell`]) taken while a check asks. Each has a
//! deliberately broken twin that loom must catch.
//!
//! The map, the node and the store are outside the cell: a model's sync thread makes the
//! cell's calls in the order `DistKeys` makes them, and a check is [`check`].
//!
//! Run with:
//! `RUSTFLAGS="--cfg tollgate_loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_models`

use loom::sync::Arc;
use loom::thread;

use super::ask::AskCell;
use super::cell::{ClaimCell, Grant, Twin, Usage, IDLE_SYNCS};
use crate::sync::Ordering;

/// The checks' clock: the held tokens are valid.
const NOW: u64 = 5;
/// When the held tokens stop being spendable.
const UNTIL: u64 = 10;
/// A sync's clock after the lease or window ended.
const LATE: u64 = 20;

/// A check as `DistKeys::take` makes it with the store reachable: the held tokens, else a
/// cold-start unit before the first claim, else a denial.
fn check(cell: &ClaimCell, cost: u64, now: u64) -> bool {
    match cell.take(cost, now) {
        Ok(_) => true,
        Err(0) if cell.take_cold(cost) => true,
        Err(_) => {
            cell.deny(cost);
            false
        }
    }
}

/// One sync's measure of the key, as `claim_for` makes it (returning nothing): what checks
/// spent since the previous sync.
fn sync(cell: &ClaimCell, now: u64) -> Usage {
    let mut ledger = cell.lock();
    let usage = cell.measure(&mut ledger, now);
    cell.give_back(&mut ledger, 0);
    usage
}

/// A key holding `n` tokens valid until [`UNTIL`], in window `window` (window algorithms).
fn holding(n: u64, window: Option<u64>, twin: Twin) -> ClaimCell {
    let cell = ClaimCell::default().twin(twin);
    let grant = Grant {
        granted: n,
        revoked: 0,
        window,
        valid_until: UNTIL,
    };
    cell.apply(&mut cell.lock(), grant);
    cell
}

/// Two checks take 1 each while the sync task applies a grant of 1 to a key holding 1: the
/// checks spend at most what was held and granted, and the next sync counts as spent exactly
/// what they took.
fn grant_model(twin: Twin) {
    loom::model(move || {
        let cell = Arc::new(holding(1, None, twin));
        let checks: Vec<_> = (0..2)
            .map(|_| {
                let cell = cell.clone();
                thread::spawn(move || u64::from(check(&cell, 1, NOW)))
            })
            .collect();
        let grant = Grant {
            granted: 1,
            revoked: 0,
            window: None,
            valid_until: UNTIL,
        };
        cell.apply(&mut cell.lock(), grant);
        let taken: u64 = checks.into_iter().map(|h| h.join().unwrap()).sum();
        let left = cell.held(Ordering::Acquire);
        assert_eq!(
            taken + left,
            2,
            "the checks spent and the node holds {}, not the 2 it held and was granted",
            taken + left
        );
        let counted = sync(&cell, NOW).spent;
        assert_eq!(
            counted, taken,
            "checks took {taken}, the next sync counts {counted} spent"
        );
    });
}

#[test]
fn loom_claim_grant_applied_while_checks_spend_never_spends_more_than_held_plus_granted() {
    grant_model(Twin::None);
}

#[test]
#[should_panic(expected = "not the 2 it held and was granted")]
fn loom_claim_grant_broken_twin_load_store_add_erases_a_spend() {
    grant_model(Twin::GrantByLoadStore);
}

/// Where the sync task voids the held tokens.
#[derive(Debug, Clone, Copy)]
enum Void {
    /// The sync's measure after the lease ended (by the sync's clock; the check's is behind).
    LeaseEnd,
    /// A grant for a new window (with 1 new token).
    WindowChange,
}

/// A check takes 1 while the sync task voids the 1 token the key holds: every token is spent
/// or voided, never both, so the syncs count as spent exactly what the check took.
fn void_model(void: Void, twin: Twin) {
    loom::model(move || {
        let cell = Arc::new(holding(1, Some(0), twin));
        let checker = {
            let cell = cell.clone();
            thread::spawn(move || u64::from(check(&cell, 1, NOW)))
        };
        let mut counted = match void {
            Void::LeaseEnd => sync(&cell, LATE).spent,
            Void::WindowChange => {
                let grant = Grant {
                    granted: 1,
                    revoked: 0,
                    window: Some(1),
                    valid_until: UNTIL,
                };
                cell.apply(&mut cell.lock(), grant);
                0
            }
        };
        let taken = checker.join().unwrap();
        counted += sync(&cell, NOW).spent;
        assert_eq!(
            counted, taken,
            "checks took {taken}, the syncs counted {counted} spent: a voided token was spent"
        );
    });
}

#[test]
fn loom_claim_tokens_voided_at_lease_end_or_window_change_are_never_spent() {
    void_model(Void::LeaseEnd, Twin::None);
    void_model(Void::WindowChange, Twin::None);
}

#[test]
#[should_panic(expected = "a voided token was spent")]
fn loom_claim_void_broken_twin_load_store_at_lease_end_voids_a_spent_token() {
    void_model(Void::LeaseEnd, Twin::VoidByLoadStore);
}

#[test]
#[should_panic(expected = "a voided token was spent")]
fn loom_claim_void_broken_twin_load_store_at_window_change_voids_a_spent_token() {
    void_model(Void::WindowChange, Twin::VoidByLoadStore);
}

/// A check takes 1 of the 1 held token and refunds it (an all-or-nothing rollback) while the
/// sync task measures and keeps what is left: the tokens never exceed what the last sync left,
/// so a token the sync counted as spent never comes back.
fn refund_model(twin: Twin) {
    loom::model(move || {
        let cell = Arc::new(holding(1, None, twin));
        let checker = {
            let cell = cell.clone();
            thread::spawn(move || {
                if check(&cell, 1, NOW) {
                    cell.refund(1, NOW);
                }
            })
        };
        sync(&cell, NOW);
        checker.join().unwrap();
        let (held, after) = (cell.held(Ordering::Acquire), cell.lock().after());
        assert!(
            held <= after,
            "a refund raised the tokens to {held}, above the {after} the last sync left"
        );
    });
}

#[test]
fn loom_claim_refund_never_raises_tokens_above_what_the_last_sync_left() {
    refund_model(Twin::None);
}

#[test]
#[should_panic(expected = "a refund raised the tokens to 1, above the 0")]
fn loom_claim_refund_broken_twin_adding_after_unlock_resurrects_a_counted_token() {
    refund_model(Twin::RefundAfterUnlock);
}

/// Two checks take a cold-start unit each (2 allowed before the first claim) while the sync
/// task measures the key and then applies its first grant (of nothing): every unit admitted is
/// counted in the debt exactly once, and a later sync adds nothing.
fn cold_model(twin: Twin) {
    loom::model(move || {
        let cell = Arc::new(ClaimCell::with_cold(2).twin(twin));
        let checks: Vec<_> = (0..2)
            .map(|_| {
                let cell = cell.clone();
                thread::spawn(move || u64::from(check(&cell, 1, NOW)))
            })
            .collect();
        sync(&cell, NOW);
        let grant = Grant {
            granted: 0,
            revoked: 0,
            window: None,
            valid_until: UNTIL,
        };
        cell.apply(&mut cell.lock(), grant);
        let admitted: u64 = checks.into_iter().map(|h| h.join().unwrap()).sum();
        let debt = cell.lock().debt;
        assert_eq!(debt, admitted, "admitted {admitted} cold-start units, owes {debt}");
        sync(&cell, NOW);
        assert_eq!(
            cell.lock().debt,
            admitted,
            "a later sync counted cold-start units again"
        );
    });
}

#[test]
fn loom_claim_cold_start_units_are_counted_in_the_debt_exactly_once() {
    cold_model(Twin::None);
}

#[test]
#[should_panic(expected = "cold-start units, owes 0")]
fn loom_claim_cold_broken_twin_load_store_close_forgets_a_unit() {
    cold_model(Twin::ColdByLoadStore);
}

/// What an idle key has when the sync task considers forgetting it.
#[derive(Debug, Clone, Copy)]
enum Idle {
    /// Never claimed, one cold-start unit left.
    Cold,
    /// One valid token held (the check refunds what it takes).
    Held,
    /// Claimed, nothing held (the check is denied).
    Empty,
}

/// A check takes (and, from held tokens, refunds) 1 while the sync task measures an idle key
/// and forgets it if it finds no use and `forgettable` agrees (as `prepare` does): a forgotten
/// key holds no token, and had nothing taken from it that no sync counted.
///
/// The sync runs on a spawned thread and the check on the model's own: the other way round,
/// loom 0.7 explored a single interleaving of the cold-start case (the spawned check's first
/// access, a load of the validity, depends on nothing the sync writes, so no backtracking
/// point was recorded before the sync's own steps).
fn forget_model(idle: Idle, twin: Twin) {
    loom::model(move || {
        let cell = match idle {
            Idle::Cold => ClaimCell::with_cold(1).twin(twin),
            Idle::Held => holding(1, None, twin),
            Idle::Empty => holding(0, None, twin),
        };
        cell.lock().idle = IDLE_SYNCS;
        let cell = Arc::new(cell);
        let syncer = {
            let cell = cell.clone();
            thread::spawn(move || {
                let usage = sync(&cell, NOW);
                let quiet = usage.spent + usage.cold_used + usage.denied == 0;
                quiet && cell.forgettable()
            })
        };
        if check(&cell, 1, NOW) {
            cell.refund(1, NOW);
        }
        let forgotten = syncer.join().unwrap();
        if forgotten {
            let held = cell.held(Ordering::Acquire);
            assert_eq!(held, 0, "a forgotten key took {held} held tokens with it");
            // What a sync of the forgotten key would have counted: the debt it leaves unpaid.
            let usage = sync(&cell, NOW);
            let unpaid = cell.lock().debt;
            assert_eq!(
                unpaid, 0,
                "a forgotten key took {unpaid} unpaid cold-start units with it"
            );
            assert_eq!(
                usage.spent, 0,
                "a forgotten key took {} uncounted spends with it",
                usage.spent
            );
        }
    });
}

#[test]
fn loom_claim_key_forgotten_while_a_check_spends_loses_no_grant_and_forgets_no_debt() {
    forget_model(Idle::Cold, Twin::None);
    forget_model(Idle::Held, Twin::None);
    forget_model(Idle::Empty, Twin::None);
}

#[test]
#[should_panic(expected = "a forgotten key took 1 unpaid cold-start units with it")]
fn loom_claim_forget_broken_twin_testing_only_what_is_left_forgets_a_cold_unit() {
    forget_model(Idle::Cold, Twin::ForgetUnmeasured);
}

#[test]
#[should_panic(expected = "a forgotten key took 1 held tokens with it")]
fn loom_claim_forget_broken_twin_testing_only_what_is_left_loses_a_refunded_token() {
    forget_model(Idle::Held, Twin::ForgetUnmeasured);
}

/// A key already queued with 1 asked; a claim takes it (the queue drained first, as
/// `prepare_asked` does) while another check asks 1 more. Every unit asked for is either in
/// the claim or still asked with the key queued again by the check that asked it: none is left
/// with neither a claim nor a queue entry.
fn ask_model(cell: fn() -> AskCell) {
    loom::model(move || {
        let ask = Arc::new(cell());
        assert!(ask.ask(1), "the first ask queues the key");
        // The claim drains the queue: the earlier entry is gone.
        let asker = {
            let ask = ask.clone();
            thread::spawn(move || ask.ask(1))
        };
        let claimed = ask.take();
        let queued_again = asker.join().unwrap();
        let left = ask.pending();
        assert_eq!(claimed + left, 2, "units asked for went missing");
        if left > 0 {
            assert!(
                queued_again && ask.is_queued(),
                "{left} units asked for are neither claimed nor queued"
            );
        }
    });
}

#[test]
fn loom_ask_taken_while_a_check_asks_is_claimed_or_queued_again() {
    ask_model(AskCell::default);
}

#[test]
#[should_panic(expected = "units asked for are neither claimed nor queued")]
fn loom_ask_broken_twin_taking_the_cost_before_the_flag_strands_an_ask() {
    ask_model(AskCell::broken);
}
