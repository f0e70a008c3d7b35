//! The token bucket (GCRA): bursts, blocks and freshness.

use super::*;

#[test]
fn token_bucket_basics() {
    let r = rule(Algorithm::TokenBucket, 10, S); // 10/s, period 100 ms
    assert_eq!(r.period, 100_000_000);
    let mut s = 0;
    for i in 0..10 {
        let st = r.acquire(s, 0, 1);
        assert!(st.allowed, "token {i}");
        s = st.state;
    }
    let denied = r.acquire(s, 0, 1);
    assert!(!denied.allowed);
    assert_eq!(denied.state, s, "a plain denial writes nothing");
    assert_eq!(r.retry_after(s, 0, 1), 100_000_000);
    assert_eq!(r.retry_after(s, 0, 3), 300_000_000);
    assert_eq!(r.remaining(s, 0), 0);
    assert_eq!(r.reset_after(s, 0), S);
    assert!(r.acquire(s, 100_000_000, 1).allowed);
    assert!(!r.acquire(s, 99_999_999, 1).allowed);
    // refund gives back, but never above full
    let back = r.refund(s, 0, 4, 0);
    assert_eq!(r.remaining(back, 0), 4);
    assert_eq!(r.refund(back, 0, 100, 0), 0);
    assert!(r.is_fresh(r.refund(back, 0, 100, 0), 0));
}

#[test]
fn token_bucket_burst_and_block() {
    let r = Policy::per_second(10)
        .burst(3)
        .block_duration(Duration::from_secs(5))
        .compile()
        .unwrap();
    let mut s = 0;
    for _ in 0..3 {
        s = r.acquire(s, 0, 1).state;
    }
    let d = r.acquire(s, 0, 1);
    assert!(!d.allowed);
    // blocked: nothing for 5 s, then refill from empty at 10/s
    assert_eq!(r.retry_after(d.state, 0, 1), 5 * S + 100_000_000);
    assert!(!r.acquire(d.state, 5 * S, 1).allowed);
    // another denial during the block does not extend it
    let again = r.acquire(d.state, 4 * S, 1);
    assert_eq!(again.state, d.state);
    assert!(r.acquire(d.state, 5 * S + 100_000_000, 1).allowed);
}

#[test]
fn token_bucket_is_fresh_once_full_again() {
    let r = rule(Algorithm::TokenBucket, 10, S); // period 100 ms
    let s = r.acquire(0, 5 * S, 2).state;
    assert!(!r.is_fresh(s, 5 * S));
    assert!(!r.is_fresh(s, 5 * S + 200_000_000 - 1));
    assert!(r.is_fresh(s, 5 * S + 200_000_000));
    assert_eq!(r.reset_after(s, 5 * S), 200_000_000);
    assert_eq!(r.remaining(r.refund(s, 5 * S + 50, 1, 5 * S), 5 * S + 50), 9);
}

#[test]
fn token_bucket_empty_since_has_no_token_at_t0_and_refills_after_it() {
    let r = rule(Algorithm::TokenBucket, 10, S); // 10/s, period 100 ms
    let t0 = 5 * S;
    let e = r.empty_since(0, t0);
    assert_eq!(r.remaining(e, t0), 0);
    assert!(!r.acquire(e, t0, 1).allowed);
    assert!(!r.acquire(e, t0 + 99_999_999, 1).allowed);
    assert!(r.acquire(e, t0 + 100_000_000, 1).allowed, "one token a period after t0");
    assert_eq!(r.remaining(e, t0 + S), 10, "full one refill after t0");
    // A bucket already emptier (a later theoretical arrival time) is left as it is.
    let mut s = 0;
    for _ in 0..10 {
        s = r.acquire(s, t0 + S, 1).state;
    }
    assert_eq!(r.empty_since(s, t0), s);
}
