//! Unit tests of the cells and the bounded table: what a cell writes, when it can be retired,
//! and how the table keeps its bound, sweeps and counts.

use super::cell::{Cell, Retired};
use super::table::Table;
use crate::algorithm::Rule;
use crate::consts::MIN_SWEEP_INTERVAL_NS;
use crate::policy::{Algorithm, Policy};

const S: u64 = 1_000_000_000;

/// 1 per second: a key that took its one token is not fresh again for a second.
fn one_per_second(alg: Algorithm) -> Rule {
    Policy::per_second(1).algorithm(alg).compile().unwrap()
}

const ALGORITHMS: [Algorithm; 3] = [Algorithm::TokenBucket, Algorithm::FixedWindow, Algorithm::SlidingWindow];

#[test]
fn a_cell_keeps_what_it_granted() {
    for alg in ALGORITHMS {
        let r = one_per_second(alg);
        let cell = Cell::default();
        assert!(cell.acquire(&r, 10, 1).unwrap().allowed, "{alg:?}");
        assert!(
            !cell.acquire(&r, 20, 1).unwrap().allowed,
            "{alg:?}: the grant was written"
        );
        assert!(!cell.peek(&r, 20, 1).unwrap().allowed, "{alg:?}");
    }
}

#[test]
fn a_cell_refund_gives_back_to_its_state() {
    for alg in ALGORITHMS {
        let r = one_per_second(alg);
        let cell = Cell::default();
        cell.acquire(&r, 10, 1).unwrap();
        cell.refund(&r, 20, 1, 10);
        assert!(cell.peek(&r, 20, 1).unwrap().allowed, "{alg:?}");
        assert!(cell.acquire(&r, 20, 1).unwrap().allowed, "{alg:?}");
    }
}

#[test]
fn a_cell_retires_only_when_indistinguishable_from_fresh() {
    for alg in ALGORITHMS {
        let r = one_per_second(alg);
        let cell = Cell::default();
        assert!(!cell.is_retired());
        cell.acquire(&r, 10, 1).unwrap();
        assert!(!cell.retire_if_fresh(&r, 20), "{alg:?}: still counting");
        assert!(!cell.is_retired(), "{alg:?}");
        assert!(
            cell.acquire(&r, 30, 0).is_ok(),
            "{alg:?}: a failed retirement leaves the cell usable"
        );
        assert!(cell.retire_if_fresh(&r, 3 * S), "{alg:?}: fresh again");
        assert!(cell.is_retired(), "{alg:?}");
        assert!(!cell.retire_if_fresh(&r, 3 * S), "{alg:?}: retired once");
    }
}

#[test]
fn a_retired_cell_answers_retired_and_takes_nothing() {
    let r = one_per_second(Algorithm::TokenBucket);
    let cell = Cell::default();
    assert!(cell.retire_if_fresh(&r, 0));
    assert_eq!(cell.acquire(&r, 0, 1), Err(Retired));
    assert_eq!(cell.acquire(&r, 0, 0), Err(Retired));
    assert_eq!(cell.peek(&r, 0, 1), Err(Retired));
    cell.refund(&r, 0, 1, 0);
    assert!(cell.is_retired(), "a refund does not revive a retired cell");
}

#[test]
fn a_table_holds_at_most_max_keys() {
    let r = one_per_second(Algorithm::TokenBucket);
    let table = Table::<u64>::new(2);
    let guard = table.guard();
    assert_eq!(table.len(), 0);
    for k in [1, 2] {
        let cell = table.insert(&k, &guard, &r, 10).expect("room");
        assert!(cell.acquire(&r, 10, 1).unwrap().allowed);
    }
    assert_eq!(table.len(), 2);
    assert!(table.insert(&3, &guard, &r, 20).is_none(), "full, and no key is fresh");
    assert_eq!(table.len(), 2);
    assert!(table.get(&3, &guard).is_none());
    assert!(!table.get(&2, &guard).unwrap().acquire(&r, 20, 1).unwrap().allowed);
}

#[test]
fn inserting_a_present_key_returns_its_cell_and_takes_no_place() {
    let r = one_per_second(Algorithm::TokenBucket);
    let table = Table::<u64>::new(3);
    let guard = table.guard();
    table.insert(&1, &guard, &r, 10).unwrap().acquire(&r, 10, 1).unwrap();
    let again = table.insert(&1, &guard, &r, 20).expect("present");
    assert!(!again.acquire(&r, 20, 1).unwrap().allowed, "the same cell");
    assert_eq!(table.len(), 1);
}

#[test]
fn a_full_table_sweeps_fresh_keys_to_make_room() {
    let r = one_per_second(Algorithm::FixedWindow);
    let table = Table::<u64>::new(2);
    let guard = table.guard();
    table.insert(&1, &guard, &r, 10).unwrap().acquire(&r, 10, 1).unwrap();
    table.insert(&2, &guard, &r, 10).unwrap();
    // key 2 never took anything: it is fresh and gives its place
    let cell = table.insert(&3, &guard, &r, 20).expect("swept a place");
    assert!(cell.acquire(&r, 20, 1).unwrap().allowed);
    assert_eq!(table.len(), 2);
    assert_eq!(table.evicted(), 1);
    assert!(table.get(&2, &guard).is_none());
    assert!(
        !table.get(&1, &guard).unwrap().acquire(&r, 20, 1).unwrap().allowed,
        "key 1 kept"
    );
}

#[test]
fn sweep_removes_exactly_the_fresh_keys_and_counts_them() {
    let r = one_per_second(Algorithm::SlidingWindow);
    let table = Table::<u64>::new(10);
    let guard = table.guard();
    for k in 0..6 {
        let cell = table.insert(&k, &guard, &r, 10).unwrap();
        if k % 2 == 0 {
            cell.acquire(&r, 10, 1).unwrap();
        }
    }
    assert_eq!(table.sweep(&r, 20, true), 3);
    assert_eq!((table.len(), table.evicted()), (3, 3));
    for k in 0..6 {
        assert_eq!(table.get(&k, &guard).is_some(), k % 2 == 0, "key {k}");
    }
    // the previous window still counts one second later, not two
    assert_eq!(table.sweep(&r, S + 20, true), 0);
    assert_eq!(table.sweep(&r, 2 * S, true), 3);
    assert_eq!((table.len(), table.evicted()), (0, 6));
}

#[test]
fn unforced_sweeps_run_at_most_once_per_interval() {
    let r = one_per_second(Algorithm::TokenBucket);
    let table = Table::<u64>::new(10);
    let guard = table.guard();
    let t0 = 5_000_000; // below the interval: the first sweep runs whatever the time
    table.insert(&1, &guard, &r, t0).unwrap();
    assert_eq!(table.sweep(&r, t0, false), 1);
    table.insert(&2, &guard, &r, t0).unwrap();
    assert_eq!(table.sweep(&r, t0 + MIN_SWEEP_INTERVAL_NS - 1, false), 0, "too soon");
    assert_eq!(table.sweep(&r, t0 + 1, true), 1, "a forced sweep runs");
    table.insert(&3, &guard, &r, t0).unwrap();
    assert_eq!(
        table.sweep(&r, t0 + MIN_SWEEP_INTERVAL_NS, false),
        0,
        "measured from the last sweep"
    );
    assert_eq!(table.sweep(&r, t0 + 1 + MIN_SWEEP_INTERVAL_NS, false), 1);
    assert_eq!(table.evicted(), 3);
}

#[test]
fn unlink_removes_only_a_retired_cell() {
    let r = one_per_second(Algorithm::TokenBucket);
    let table = Table::<String>::new(10);
    let guard = table.guard();
    table
        .insert("busy", &guard, &r, 10)
        .unwrap()
        .acquire(&r, 10, 1)
        .unwrap();
    table.insert("idle", &guard, &r, 10).unwrap();
    table.unlink_retired("busy", &guard);
    table.unlink_retired("idle", &guard);
    assert_eq!(table.len(), 2, "nothing retired yet");
    assert!(table.get("idle", &guard).unwrap().retire_if_fresh(&r, 20));
    table.unlink_retired("idle", &guard);
    assert_eq!(table.len(), 1);
    assert!(table.get("idle", &guard).is_none());
    assert!(table.get("busy", &guard).is_some());
    assert_eq!(table.evicted(), 0, "unlinking is not a sweep");
}
