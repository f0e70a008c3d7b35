//! loom models of every lock-free protocol in the local state, each with a deliberately
//! broken twin that loom must catch.
//!
//! Run with:
//! `RUSTFLAGS="--cfg tollgate_loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_models`

use std::time::Duration;

use loom::sync::{Arc, Mutex};
use loom::thread;

use super::cell::{Cell, Retired};
use crate::algorithm::{Rule, Step};
use crate::policy::{Algorithm, Policy};

fn bucket(capacity: u64) -> Rule {
    // Capacity tokens per hour: at a fixed `now` nothing refills during a model.
    Policy::per_hour(capacity).compile().unwrap()
}

type Acquire = fn(&Cell, &Rule, u64, u64) -> Result<Step, Retired>;

fn cas(cell: &Cell, rule: &Rule, now: u64, cost: u64) -> Result<Step, Retired> {
    cell.acquire(rule, now, cost)
}

fn racy(cell: &Cell, rule: &Rule, now: u64, cost: u64) -> Result<Step, Retired> {
    cell.acquire_racy(rule, now, cost)
}

/// Three threads take one token each from a bucket of two: exactly two succeed.
fn cell_model(acquire: Acquire) {
    loom::model(move || {
        let rule = bucket(2);
        let cell = Arc::new(Cell::default());
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let cell = cell.clone();
                thread::spawn(move || acquire(&cell, &rule, 0, 1).unwrap().allowed as u64)
            })
            .collect();
        let allowed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 2, "a bucket of 2 granted {allowed}");
        assert_eq!(rule.remaining(cell.state(), 0), 0);
    });
}

#[test]
fn loom_cell_cas_never_over_grants() {
    cell_model(cas);
}

#[test]
#[should_panic(expected = "a bucket of 2 granted 3")]
fn loom_cell_broken_twin_load_store_over_grants() {
    cell_model(racy);
}

/// The window rolls over while two threads check in the new window: the new window's count is
/// taken by exactly one of them (capacity 1), for both window algorithms.
fn rollover_model(acquire: Acquire, alg: Algorithm) {
    loom::model(move || {
        let rule = Policy::new(1, Duration::from_millis(10))
            .algorithm(alg)
            .compile()
            .unwrap();
        let w = rule.period;
        let cell = Arc::new(Cell::default());
        assert!(cell.acquire(&rule, 0, 1).unwrap().allowed, "window 0 takes its one");
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let cell = cell.clone();
                // Sliding window: late enough in window 2 that window 0 no longer weighs.
                let now = if alg == Algorithm::FixedWindow {
                    w + i
                } else {
                    2 * w + i
                };
                thread::spawn(move || acquire(&cell, &rule, now, 1).unwrap().allowed as u64)
            })
            .collect();
        let allowed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 1, "the new window granted {allowed} of a capacity of 1");
    });
}

#[test]
fn loom_window_rollover_under_concurrent_checks() {
    rollover_model(cas, Algorithm::FixedWindow);
    rollover_model(cas, Algorithm::SlidingWindow);
}

#[test]
#[should_panic(expected = "the new window granted 2")]
fn loom_window_rollover_broken_twin_double_grants() {
    rollover_model(racy, Algorithm::FixedWindow);
}

/// Two threads each check two layers all-or-nothing (take from the first, then the second,
/// and refund the first when the second denies). Layer 1 holds 2, layer 2 holds 1: exactly one
/// request passes, and layer 1 ends with exactly what that one request took.
fn layers_model(broken_rollback: bool) {
    loom::model(move || {
        let (r1, r2) = (bucket(2), bucket(1));
        let l1 = Arc::new(Cell::default());
        let l2 = Arc::new(Cell::default());
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (l1, l2) = (l1.clone(), l2.clone());
                thread::spawn(move || {
                    let before = l1.state();
                    let first = l1.acquire(&r1, 0, 1).unwrap();
                    if !first.allowed {
                        return 0u64;
                    }
                    if l2.acquire(&r2, 0, 1).unwrap().allowed {
                        return 1;
                    }
                    if broken_rollback {
                        l1.restore_racy(before);
                    } else {
                        l1.refund(&r1, 0, 1, 0);
                    }
                    0
                })
            })
            .collect();
        let passed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(passed, 1);
        assert_eq!(r1.remaining(l1.state(), 0), 2 - passed, "layer 1 lost or kept a token");
        assert_eq!(r2.remaining(l2.state(), 0), 1 - passed);
    });
}

#[test]
fn loom_all_or_nothing_with_refunds_conserves_tokens() {
    layers_model(false);
}

#[test]
#[should_panic(expected = "layer 1 lost or kept a token")]
fn loom_all_or_nothing_broken_twin_restore_loses_tokens() {
    layers_model(true);
}

/// A one-key table (a slot holding the key's current cell) where the sweeper retires and
/// unlinks the cell while a checker takes from it. Capacity 1 and no time passing: over the
/// checker, the sweeper and one more check afterwards, exactly one grant, and the surviving
/// cell records it.
fn eviction_model(broken_retire: bool) {
    loom::model(move || {
        let rule = bucket(1);
        let slot = Arc::new(Mutex::new(Arc::new(Cell::default())));

        let check = move |slot: &Mutex<Arc<Cell>>| -> u64 {
            loop {
                let cell = slot.lock().unwrap().clone();
                match cell.acquire(&rule, 0, 1) {
                    Ok(step) => return step.allowed as u64,
                    Err(Retired) => {
                        // unlink the retired cell; the next lookup inserts a fresh one
                        let mut s = slot.lock().unwrap();
                        if s.is_retired() {
                            *s = Arc::new(Cell::default());
                        }
                    }
                }
            }
        };

        let checker = {
            let slot = slot.clone();
            thread::spawn(move || check(&slot))
        };
        let sweeper = {
            let slot = slot.clone();
            thread::spawn(move || {
                let cell = slot.lock().unwrap().clone();
                let retired = if broken_retire {
                    cell.retire_if_fresh_racy(&rule, 0)
                } else {
                    cell.retire_if_fresh(&rule, 0)
                };
                if retired {
                    let mut s = slot.lock().unwrap();
                    if Arc::ptr_eq(&s, &cell) {
                        *s = Arc::new(Cell::default());
                    }
                }
            })
        };
        let first = checker.join().unwrap();
        sweeper.join().unwrap();
        let second = check(&slot);
        assert_eq!(first + second, 1, "capacity 1 granted {} times", first + second);
        let cell = slot.lock().unwrap().clone();
        assert_eq!(rule.remaining(cell.state(), 0), 0, "the grant was lost from the table");
    });
}

#[test]
fn loom_eviction_racing_a_check_neither_loses_nor_duplicates_a_grant() {
    eviction_model(false);
}

#[test]
#[should_panic(expected = "capacity 1 granted 2 times")]
fn loom_eviction_broken_twin_load_store_retire_loses_a_grant() {
    eviction_model(true);
}
