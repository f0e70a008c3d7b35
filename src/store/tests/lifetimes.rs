//! How long the store keeps what it holds: keys kept while they still count, expired keys
//! purged, fresh windows and refills as time passes.

use std::time::Duration;

use super::*;

#[test]
fn a_sliding_key_holding_only_its_previous_window_is_kept() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("prev-only");
    let l = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    let w0 = T0 / 1_000_000;
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, 0)).granted, 10);
    t.advance(Duration::from_millis(1100));
    // Node 1 spent its 10 and wants nothing: the key now holds only the previous window.
    one(&s, 1, claim(&k, l, 0, 0, 0, w0));
    assert!(s.pttl(&k).is_some(), "the previous window's count still weighs");
    // It weighs ceil(10 x 0.9) = 9: one token is left, not a fresh key's ten.
    let g = one(&s, 2, claim(&k, l, 0, 0, 10, 0));
    assert_eq!((g.granted, g.window), (1, w0 + 1));
}

#[test]
fn a_window_claim_windows_later_gets_a_fresh_window() {
    for (name, l) in [
        ("fixed", Limits::fixed_window(10, Duration::from_secs(1)).unwrap()),
        ("sliding", Limits::sliding_window(10, Duration::from_secs(1)).unwrap()),
    ] {
        let (s, t) = setup();
        let k = StoreKey::from_raw(name);
        let w0 = T0 / 1_000_000;
        assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, 0)).granted, 10);
        t.advance(Duration::from_secs(3));
        let g = one(&s, 1, claim(&k, l, 4, 0, 10, w0));
        assert_eq!((g.granted, g.window, g.revoked), (10, w0 + 3, 4), "{name}");
    }
}

#[test]
fn a_drained_bucket_outlives_its_refill_and_a_window_count_its_weight() {
    let (s, _t) = setup();
    // 10 tokens at 5 per second: empty, it is full again after 2 s; until then it must not
    // expire (a key that expires early comes back full).
    let k = StoreKey::from_raw("bucket");
    assert_eq!(one(&s, 1, claim(&k, tb(10, 5), 0, 0, 10, 0)).granted, 10);
    assert!(s.pttl(&k).is_some_and(|ms| ms >= 2000), "{:?}", s.pttl(&k));
    // The node spent them all: no holding is left, the bucket is still empty.
    one(&s, 1, claim(&k, tb(10, 5), 0, 0, 0, 0));
    assert!(s.pttl(&k).is_some_and(|ms| ms >= 2000), "{:?}", s.pttl(&k));
    // A sliding window's count weighs in the next window too: at least two windows, and
    // again from the window a later claim moves it to.
    let (s, t) = setup();
    let k = StoreKey::from_raw("sliding");
    let l = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    let w0 = T0 / 1_000_000;
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 5, 0)).granted, 5);
    assert!(s.pttl(&k).is_some_and(|ms| ms >= 2000), "{:?}", s.pttl(&k));
    t.advance(Duration::from_millis(1500));
    assert!(one(&s, 1, claim(&k, l, 0, 0, 5, w0)).granted > 0);
    assert!(s.pttl(&k).is_some_and(|ms| ms >= 1500), "{:?}", s.pttl(&k));
}

#[test]
fn a_sliding_claim_two_windows_later_on_a_stored_key_starts_a_fresh_window() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("sliding");
    let l = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    let w0 = T0 / 1_000_000;
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, 0)).granted, 10);
    t.advance(Duration::from_secs(2));
    assert!(s.pttl(&k).is_some(), "the key is still stored");
    let g = one(&s, 1, claim(&k, l, 0, 0, 10, w0));
    assert_eq!((g.granted, g.window), (10, w0 + 2));
}

#[test]
fn a_capacity_lowered_under_live_holdings_grants_nothing_returned_again() {
    let (s, _t) = setup();
    let k = StoreKey::from_raw("lowered");
    let wide = tb(20, 1);
    assert_eq!(one(&s, 1, claim(&k, wide, 0, 0, 10, 0)).granted, 10);
    assert_eq!(one(&s, 2, claim(&k, wide, 0, 0, 10, 0)).granted, 10);
    // The policy shrinks to 10 while both nodes hold 10: holdings already exceed it, so what
    // node 2 returns is not granted to it again.
    let g = one(&s, 2, claim(&k, tb(10, 1), 5, 5, 5, 0));
    assert_eq!(g.granted, 0, "{g:?}");
}

#[test]
fn a_store_counts_its_keys_and_has_a_server_identity_of_its_own() {
    let (s, _t) = setup();
    assert!(s.is_empty());
    assert_eq!(s.len(), 0);
    for name in ["a", "b"] {
        one(&s, 1, claim(&StoreKey::from_raw(name), tb(10, 1), 0, 0, 1, 0));
    }
    assert!(!s.is_empty() && s.len() == 2);
    s.clear();
    assert!(s.is_empty());
    assert_eq!(s.len(), 0);
    // Nodes take a server identity of 0 for "none seen yet": every store has its own, never 0.
    let (other, _t) = setup();
    let r = KeyEncoder::default().registry_key();
    let a = s.heartbeat_now(&r, 1, Duration::from_millis(500)).server;
    let b = other.heartbeat_now(&r, 1, Duration::from_millis(500)).server;
    assert!(a > 1 && b > 1 && a != b, "{a} {b}");
}

#[test]
fn a_store_on_the_system_clock_refills_as_time_passes() {
    let s = MemoryStore::new();
    let k = StoreKey::from_raw("wall");
    let l = tb(1000, 1000);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 1000, 0)).granted, 1000);
    // Node 1 spent them all (it keeps none): the bucket is empty, and no one holds anything.
    one(&s, 1, claim(&k, l, 0, 0, 0, 0));
    std::thread::sleep(Duration::from_millis(50));
    // 1000 per second: at least 50 tokens after 50 ms of the system clock.
    assert!(one(&s, 2, claim(&k, l, 0, 0, 1000, 0)).granted >= 50);
}

/// Expired keys stay (unread, like Redis's lazily expired keys) until the operations since the
/// last purge pass both 1024 and the number of keys; then every expired key goes at once.
#[test]
fn expired_keys_are_purged_once_the_operations_since_the_last_purge_pass_the_key_count() {
    let (s, t) = setup();
    for i in 0..10 {
        one(
            &s,
            1,
            claim(&StoreKey::from_raw(format!("old-{i}")), tb(10, 1), 0, 0, 1, 0),
        );
    }
    t.advance(Duration::from_secs(3600));
    // A key that lives through what follows: an hour's fixed window that counts every claim.
    let fresh = StoreKey::from_raw("fresh");
    let hour = Limits::fixed_window(1_000_000, Duration::from_secs(3600)).unwrap();
    // 10 operations so far: 1014 more make 1024, not yet past the threshold.
    for _ in 0..1014 {
        one(&s, 1, claim(&fresh, hour, 0, 0, 1, 0));
    }
    assert_eq!(s.len(), 11, "the expired keys are still stored");
    assert_eq!(s.state_len(&StoreKey::from_raw("old-0")), None, "but read as gone");
    one(&s, 1, claim(&fresh, hour, 0, 0, 1, 0));
    assert_eq!(s.len(), 1, "the 1025th operation purges every expired key");
}

/// A key holding tokens lives until its bucket would be full again with the holdings counted as
/// spent at the end of their count (the current epoch's at the end of the next one), plus a
/// head room of as long again: exactly, or it could expire while the holdings still count.
#[test]
fn a_held_bucket_lives_until_full_after_its_holdings_stop_counting_and_as_long_again() {
    let (s, _t) = setup();
    let k = StoreKey::from_raw("held");
    // Capacity 10 at 1 per second, leases of 10 s: T0 starts an epoch (T0 / 10 s is whole).
    let l = Limits::token_bucket(10, 1, Duration::from_secs(1), Duration::from_secs(10)).unwrap();
    assert_eq!((T0 / 1000) % 10_000, 0);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 4, 0)).granted, 4);
    // The four count until the end of the next epoch (20 s), then refill in 4 s: full at 24 s,
    // kept 24 s more.
    assert_eq!(s.pttl(&k), Some(48_000));
}

#[test]
fn a_capacity_lowered_under_holdings_of_the_previous_epoch_grants_nothing_returned_again() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("lowered-prev");
    let wide = tb(20, 1);
    assert_eq!(one(&s, 1, claim(&k, wide, 0, 0, 10, 0)).granted, 10);
    assert_eq!(one(&s, 2, claim(&k, wide, 0, 0, 10, 0)).granted, 10);
    // The next lease epoch (T0 is 200 ms into one of 300 ms): both holdings are the previous
    // epoch's, and still count.
    t.advance(Duration::from_millis(100));
    let g = one(&s, 2, claim(&k, tb(10, 1), 5, 5, 5, 0));
    assert_eq!(g.granted, 0, "{g:?}");
}

/// A sliding window's key lives until the end of the window after its own (its count weighs
/// there), plus a millisecond; a fixed window's until the end of its own.
#[test]
fn a_window_keys_time_to_live_is_exact() {
    let (s, _t) = setup();
    // T0 starts a 1 s window.
    assert_eq!(T0 % 1_000_000, 0);
    let k = StoreKey::from_raw("sliding-ttl");
    let l = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 3, 0)).granted, 3);
    assert_eq!(s.pttl(&k), Some(2001));
    let k = StoreKey::from_raw("fixed-ttl");
    let l = Limits::fixed_window(10, Duration::from_secs(1)).unwrap();
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 3, 0)).granted, 3);
    assert_eq!(s.pttl(&k), Some(1001));
}

/// When a sliding window has no room left, the reply says when the next token comes: later
/// in this window as the previous window's count weighs less, or in the next window as this
/// one's does.
#[test]
fn a_full_sliding_window_says_when_its_next_token_comes() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("next");
    let l = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    // All ten now: the next one 100 ms into the next window, when the ten weigh nine.
    let g = one(&s, 1, claim(&k, l, 0, 0, 10, 0));
    assert_eq!((g.remaining, g.ms_to_next_token), (0, 1100));
    // At the start of the next window the ten still weigh ten: 100 ms on, they weigh nine.
    t.advance(Duration::from_secs(1));
    let g = one(&s, 2, claim(&k, l, 0, 0, 10, 0));
    assert_eq!((g.granted, g.remaining, g.ms_to_next_token), (0, 0, 100));
}

/// A window with a coarser weighting tick (capacity x window over 2^51 us) weighs the previous
/// window's count rounded up to the tick, never down.
#[test]
fn a_coarse_tick_rounds_the_previous_windows_weight_up() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("coarse");
    let l = Limits::sliding_window(1_000_000, Duration::from_secs(3600)).unwrap();
    assert!(l.tick_us() > 1, "{}", l.tick_us());
    let hour = 3_600_000_000u64;
    let w0 = T0 / hour;
    // To the start of the next hour, then 1000 s into it.
    t.set_us((w0 + 1) * hour + 1_000_000_000);
    let g = one(&s, 1, claim(&k, l, 0, 0, 1_000_000, 0));
    assert_eq!(g.granted, 1_000_000, "nothing in the previous window");
    // Full: the next token 3.6 ms into the next hour (2,600 s from now), rounded up to the tick.
    assert!((2_600_004..=2_600_010).contains(&g.ms_to_next_token), "{g:?}");
    t.set_us((w0 + 2) * hour + 1_000_000_000);
    let g = one(&s, 1, claim(&k, l, 0, 0, 1_000_000, 0));
    // Exactly, the previous million weigh 1e6 x 2600/3600 = 722,222.2: 277,777 are left.
    // Rounded up to the tick, a little less, never more.
    assert!(g.granted <= 277_777 && g.granted >= 277_000, "{g:?}");
    assert_eq!(g.remaining, 0);
    // The next token: when the weight has fallen by one more.
    assert!(g.ms_to_next_token >= 1 && g.ms_to_next_token <= 10, "{g:?}");
}

/// A sliding window whose capacity was lowered to exactly its current count, with a previous
/// window that still weighs: full, and its next token comes in the next window, when this
/// window's count has decayed by one.
#[test]
fn a_sliding_window_lowered_to_its_count_says_its_next_token_is_in_the_next_window() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("lowered-sliding");
    let wide = Limits::sliding_window(20, Duration::from_secs(1)).unwrap();
    let narrow = Limits::sliding_window(15, Duration::from_secs(1)).unwrap();
    assert_eq!(one(&s, 1, claim(&k, wide, 0, 0, 5, 0)).granted, 5);
    t.advance(Duration::from_secs(1));
    assert_eq!(one(&s, 1, claim(&k, wide, 0, 0, 20, 0)).granted, 15);
    let g = one(&s, 2, claim(&k, narrow, 0, 0, 1, 0));
    // Next window: the 15 weigh 14 once a fifteenth of it has passed (66.7 ms).
    assert_eq!((g.granted, g.remaining, g.ms_to_next_token), (0, 0, 1067), "{g:?}");
}
