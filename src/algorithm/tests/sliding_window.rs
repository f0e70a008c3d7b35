//! The sliding window: the previous window's weight, refunds across windows, blocks and
//! freshness.

use super::*;

#[test]
fn sliding_window_weights_previous_window() {
    let r = rule(Algorithm::SlidingWindow, 10, S);
    let s = r.acquire(0, 0, 10).state;
    assert!(!r.acquire(s, S - 1, 1).allowed);
    // 25% into the next window, 75% of the previous 10 still count: 8 (rounded up), 2 free.
    let t = S + S / 4;
    assert_eq!(r.remaining(s, t), 2);
    let s2 = r.acquire(s, t, 2).state;
    assert!(!r.acquire(s2, t, 1).allowed);
    // one more frees when prev weight * 10 <= 7: e >= 0.3 s
    assert_eq!(r.retry_after(s2, t, 1), S * 3 / 10 - S / 4);
    assert!(r.acquire(s2, S + S * 3 / 10, 1).allowed);
    assert!(!r.acquire(s2, S + S * 3 / 10 - 1, 1).allowed);
    assert_eq!(r.reset_after(s2, t), 3 * S - t);
}

#[test]
fn sliding_window_refund_goes_back_into_the_current_window() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    let s = r.acquire(0, 10, 3).state;
    let back = r.refund(s, 20, 1, 10);
    assert_eq!(r.remaining(back, 20), 1);
    assert!(!r.acquire(back, 20, 2).allowed);
    // the same in a later window
    let s = r.acquire(0, 5 * S + 10, 3).state;
    let back = r.refund(s, 5 * S + 20, 2, 5 * S + 10);
    assert_eq!(r.remaining(back, 5 * S + 20), 2);
    assert!(!r.acquire(back, 5 * S + 20, 3).allowed);
}

#[test]
fn sliding_window_refund_in_the_next_window_lightens_the_previous_one() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    // Taken in window 0, refunded halfway through window 1: prev 3 -> 2, weighing ceil(2 * 0.5).
    let s = r.acquire(0, 10, 3).state;
    assert_eq!(r.remaining(s, S + S / 2), 1);
    let back = r.refund(s, S + S / 2, 1, 10);
    assert_eq!(r.remaining(back, S + S / 2), 2);
    // The same from window 5 into window 6.
    let s = r.acquire(0, 5 * S + 10, 3).state;
    let back = r.refund(s, 6 * S + S / 2, 1, 5 * S + 10);
    assert_eq!(r.remaining(back, 6 * S + S / 2), 2);
    assert!(!r.acquire(back, 6 * S + S / 2, 3).allowed);
}

#[test]
fn sliding_window_refund_two_windows_later_changes_nothing() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    let s = r.acquire(0, 5 * S + 10, 2).state;
    let s = r.acquire(s, 6 * S + 10, 1).state;
    assert_eq!(r.refund(s, 7 * S + 10, 2, 5 * S + 10), s);
    assert_eq!(r.refund(s, 9 * S, 1, 6 * S + 10), s);
}

#[test]
fn sliding_window_block_denies_until_it_ends() {
    let r = Policy::per_second(2)
        .algorithm(Algorithm::SlidingWindow)
        .block_duration(Duration::from_secs(5))
        .compile()
        .unwrap();
    let s = r.acquire(0, 10, 2).state;
    let d = r.acquire(s, 20, 1);
    assert!(!d.allowed);
    // Without the block the key would be fresh from 2 s on.
    for t in [S, 3 * S, 5 * S + 20, 6 * S + S / 2 - 1] {
        assert!(!r.acquire(d.state, t, 1).allowed, "blocked at {t}");
    }
    // Blocked into window 5 (20 ns + 5 s), which then weighs as the previous window: one
    // request fits again halfway through window 6.
    assert!(r.acquire(d.state, 6 * S + S / 2, 1).allowed);
    assert_eq!(r.retry_after(d.state, 20, 1), 6 * S + S / 2 - 20);
    // another denial during the block does not extend it
    assert_eq!(r.acquire(d.state, 3 * S, 1).state, d.state);
    assert!(!r.is_fresh(d.state, 3 * S), "a blocked key is never swept");
}

#[test]
fn sliding_window_is_fresh_only_when_no_window_counts() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    assert!(r.is_fresh(0, 10));
    let s = r.acquire(0, 10, 1).state;
    assert!(!r.is_fresh(s, 10), "the current window counts");
    assert!(!r.is_fresh(s, S + 10), "the previous window still counts");
    assert!(
        !r.is_fresh(s, 2 * S - 1),
        "the previous window counts until its weight is 0"
    );
    assert!(r.is_fresh(s, 2 * S), "two windows later nothing counts");
    assert!(r.is_fresh(r.refund(s, 20, 1, 10), 20), "refunded back to nothing");
    let s = r.acquire(0, 5 * S + 10, 1).state;
    assert!(!r.is_fresh(s, 6 * S + 10));
    assert!(r.is_fresh(s, 7 * S + 10));
}

#[test]
fn sliding_window_reset_after_counts_to_the_end_of_the_window_that_weighs_last() {
    let r = rule(Algorithm::SlidingWindow, 3, S);
    assert_eq!(r.reset_after(0, 10), 0);
    assert_eq!(r.reset_after(0, 5 * S + 10), 0);
    let s = r.acquire(0, 10, 1).state;
    assert_eq!(r.reset_after(s, 10), 2 * S - 10);
    assert_eq!(r.reset_after(s, S + 10), S - 10);
    let s = r.acquire(0, 5 * S + 10, 1).state;
    assert_eq!(
        r.reset_after(s, 5 * S + 10),
        2 * S - 10,
        "current window: to the end of the next one"
    );
    assert_eq!(
        r.reset_after(s, 6 * S + 10),
        S - 10,
        "previous window only: to the end of this one"
    );
    assert_eq!(r.reset_after(s, 7 * S + 10), 0);
}

#[test]
fn sliding_window_empty_since_counts_the_whole_capacity_in_the_window_of_t0() {
    let r = rule(Algorithm::SlidingWindow, 4, S);
    let t0 = 5 * S + S / 2;
    let e = r.empty_since(0, t0);
    assert_eq!(r.remaining(e, t0), 0);
    assert!(!r.acquire(e, t0, 1).allowed);
    // In the next window the emptied one weighs by the part of it the sliding window still
    // covers; two windows on, nothing of it is left.
    assert_eq!(r.remaining(e, 6 * S + S / 2), 2);
    assert_eq!(r.remaining(e, 7 * S), 4);
    // A key partly used in the window of t0 is raised to the capacity there.
    let s = r.acquire(0, 4 * S + S / 2, 2).state;
    let s = r.acquire(s, 5 * S + 1, 1).state;
    assert_eq!(r.remaining(r.empty_since(s, t0), 6 * S), 0);
    // A key already in a later window is left as it is.
    let later = r.acquire(0, 7 * S, 1).state;
    assert_eq!(r.empty_since(later, t0), later);
}
