//! The fixed window: counts per aligned window, blocks, refunds and freshness.

use super::*;

#[test]
fn fixed_window_basics() {
    let r = rule(Algorithm::FixedWindow, 3, S);
    let ok = run(&r, &[(0, 1), (10, 2), (20, 1), (S - 1, 1), (S, 3), (S + 5, 1)]);
    assert_eq!(ok, [true, true, false, false, true, false]);
    let mut s = 0;
    s = r.acquire(s, 10, 3).state;
    assert_eq!(r.retry_after(s, 10, 1), S - 10);
    assert_eq!(r.reset_after(s, 10), S - 10);
    assert_eq!(r.remaining(s, 10), 0);
    assert_eq!(r.remaining(s, S), 3);
    // refund only into the window it was taken from
    assert_eq!(r.remaining(r.refund(s, 20, 2, 10), 20), 2);
    assert_eq!(r.refund(s, S + 1, 2, 10), s);
    // time going back answers with the stored window
    let later = r.acquire(0, 5 * S, 3).state;
    assert!(!r.acquire(later, S, 1).allowed);
}

#[test]
fn fixed_window_block_rounds_up_to_window_end() {
    let r = Policy::per_second(1)
        .algorithm(Algorithm::FixedWindow)
        .block_duration(Duration::from_millis(1500))
        .compile()
        .unwrap();
    let s = r.acquire(0, 100, 1).state;
    let d = r.acquire(s, 200, 1);
    assert!(!d.allowed);
    // blocked into the window containing 200 ns + 1.5 s, i.e. until 2 s
    assert!(!r.acquire(d.state, S + 10, 1).allowed);
    assert!(!r.acquire(d.state, 2 * S - 1, 1).allowed);
    assert!(r.acquire(d.state, 2 * S, 1).allowed);
    assert_eq!(r.retry_after(d.state, 200, 1), 2 * S - 200);
}

#[test]
fn fixed_window_refund_goes_back_into_a_later_window() {
    // Window 5, not window 0: the refunded state must keep its window index, or the key reads
    // as fresh and gets its whole capacity back.
    let r = rule(Algorithm::FixedWindow, 3, S);
    let s = r.acquire(0, 5 * S + 10, 3).state;
    let back = r.refund(s, 5 * S + 20, 1, 5 * S + 10);
    assert_eq!(r.remaining(back, 5 * S + 20), 1);
    assert!(!r.acquire(back, 5 * S + 20, 2).allowed);
    assert_eq!(
        r.refund(s, 6 * S, 1, 5 * S + 10),
        s,
        "nothing goes back into another window"
    );
}

#[test]
fn fixed_window_is_fresh_and_reset_after_follow_the_count() {
    let r = rule(Algorithm::FixedWindow, 3, S);
    let s = r.acquire(0, 5 * S + 10, 1).state;
    assert!(!r.is_fresh(s, 5 * S + 10));
    assert_eq!(r.reset_after(s, 5 * S + 10), S - 10);
    assert!(r.is_fresh(s, 6 * S));
    assert_eq!(r.reset_after(s, 6 * S), 0);
    assert!(r.is_fresh(r.refund(s, 5 * S + 20, 1, 5 * S + 10), 5 * S + 20));
}

#[test]
fn fixed_window_empty_since_uses_up_the_window_of_t0_and_no_other() {
    let r = rule(Algorithm::FixedWindow, 3, S);
    let t0 = 5 * S + 10;
    let e = r.empty_since(0, t0);
    assert_eq!(r.remaining(e, t0), 0);
    assert!(!r.acquire(e, t0, 1).allowed);
    assert!(!r.acquire(e, 6 * S - 1, 1).allowed);
    assert!(r.acquire(e, 6 * S, 3).allowed, "the next window is whole");
    // A key partly used in the window of t0 is emptied too.
    let used = r.acquire(0, t0, 1).state;
    assert_eq!(r.remaining(r.empty_since(used, t0 + 5), t0 + 5), 0);
    // A key already in a later window is left as it is.
    let later = r.acquire(0, 7 * S, 1).state;
    assert_eq!(r.empty_since(later, t0), later);
}
