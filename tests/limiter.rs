//! Behaviour of the public limiter API on a manual clock.

use std::time::Duration;

use tollgate::{check_all, Algorithm, DirectLimiter, Limiter, ManualClock, Policy, WhenFull};

fn limiter(policy: Policy, clock: &ManualClock) -> Limiter {
    Limiter::builder(policy)
        .clock(clock.clock())
        .name("test")
        .build()
        .unwrap()
}

const ALGORITHMS: [Algorithm; 3] = [Algorithm::TokenBucket, Algorithm::FixedWindow, Algorithm::SlidingWindow];

#[test]
fn each_algorithm_allows_points_then_denies_with_a_retry_time() {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let l = limiter(Policy::per_second(5).algorithm(alg), &clock);
        for i in 0..5 {
            let d = l.check("k");
            assert!(d.is_allowed(), "{alg:?} request {i}");
            assert_eq!(d.remaining(), 4 - i, "{alg:?}");
            assert_eq!(d.limit(), 5);
            assert_eq!(d.retry_after(), None);
        }
        let d = l.check("k");
        assert!(d.is_denied(), "{alg:?}");
        let wait = d.retry_after().unwrap();
        // sliding window: the full previous window still weighs at the boundary, so up to 2 windows
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(2),
            "{alg:?} {wait:?}"
        );
        assert!(d.reset_after() > Duration::ZERO);
        clock.advance(wait);
        assert!(l.check("k").is_allowed(), "{alg:?} after retry_after");
        assert!(l.check("other").is_allowed(), "{alg:?} keys are independent");
    }
}

#[test]
fn cost_above_capacity_is_never_distinct_from_not_now() {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let l = limiter(Policy::per_minute(10).algorithm(alg), &clock);
        let never = l.check_n("k", 11).unwrap_err();
        assert_eq!((never.cost, never.capacity, never.policy), (11, 10, "test"));
        assert!(never.to_string().contains("can never be allowed"));
        assert!(l.check_n("k", u64::MAX).is_err());
        assert!(l.peek("k", 11).is_err());
        // nothing was taken by the errors
        assert!(l.check_n("k", 10).unwrap().is_allowed(), "{alg:?}");
        let not_now = l.check_n("k", 1).unwrap();
        assert!(not_now.is_denied() && not_now.retry_after().is_some());
        // cost 0 takes nothing and is allowed unless blocked
        assert!(l.check_n("k", 0).unwrap().is_allowed());
    }
}

#[test]
fn peek_takes_nothing_and_refund_gives_back() {
    let clock = ManualClock::new();
    let l = limiter(Policy::per_minute(3), &clock);
    assert!(l.peek("k", 3).unwrap().is_allowed());
    assert!(l.is_empty(), "peek does not track the key");
    assert!(l.check_n("k", 3).unwrap().is_allowed());
    assert!(l.peek("k", 1).unwrap().is_denied());
    l.refund("k", 2);
    assert_eq!(l.peek("k", 1).unwrap().remaining(), 1);
    l.refund("k", 100);
    assert_eq!(
        l.peek("k", 3).unwrap().remaining(),
        0,
        "refund never exceeds a full bucket"
    );
    assert!(l.check_n("k", 3).unwrap().is_allowed());
    assert!(l.check("k").is_denied());
}

#[test]
fn block_duration_denies_until_it_ends() {
    let clock = ManualClock::new();
    let l = limiter(Policy::per_second(2).block_duration(Duration::from_secs(30)), &clock);
    l.check("k");
    l.check("k");
    let d = l.check("k");
    assert!(d.is_denied());
    assert!(d.retry_after().unwrap() >= Duration::from_secs(30));
    clock.advance(Duration::from_secs(29));
    assert!(l.check("k").is_denied());
    clock.advance(Duration::from_secs(2));
    assert!(l.check("k").is_allowed());
}

#[test]
fn time_going_backwards_never_refunds() {
    let clock = ManualClock::new();
    clock.set_ns(10_000_000_000);
    let l = limiter(Policy::per_second(2), &clock);
    l.check("k");
    l.check("k");
    clock.set_ns(1);
    assert!(l.check("k").is_denied());
    clock.set_ns(u64::MAX);
    assert!(l.check("k").is_allowed(), "a huge jump refills without panicking");
}

#[test]
fn endpoint_denial_consumes_nothing_from_ip_and_user_layers() {
    let clock = ManualClock::new();
    let build = |name: &str, p: Policy| {
        Limiter::<String>::builder(p)
            .name(name)
            .clock(clock.clock())
            .build()
            .unwrap()
    };
    let ip = build("ip", Policy::per_minute(100));
    let user = build("user", Policy::per_minute(50));
    let endpoint = build("endpoint", Policy::per_hour(2).algorithm(Algorithm::FixedWindow));
    for _ in 0..2 {
        let d = check_all(
            1,
            &[
                &ip.bind("10.0.0.1"),
                &user.bind("alice"),
                &endpoint.bind("alice POST /api/ai/generate"),
            ],
        )
        .unwrap();
        assert!(d.is_allowed());
    }
    for _ in 0..10 {
        let d = check_all(
            1,
            &[
                &ip.bind("10.0.0.1"),
                &user.bind("alice"),
                &endpoint.bind("alice POST /api/ai/generate"),
            ],
        )
        .unwrap();
        assert!(d.is_denied());
        assert_eq!(d.policy(), "endpoint");
    }
    assert_eq!(ip.peek("10.0.0.1", 0).unwrap().remaining(), 98);
    assert_eq!(user.peek("alice", 0).unwrap().remaining(), 48);
    // allowed: the tightest layer is reported
    let d = check_all(1, &[&ip.bind("10.0.0.1"), &user.bind("alice")]).unwrap();
    assert_eq!((d.policy(), d.remaining()), ("user", 47));
    // a cost no layer can ever take is an error before anything is taken
    assert!(check_all(60, &[&ip.bind("10.0.0.1"), &user.bind("alice")]).is_err());
    assert_eq!(ip.peek("10.0.0.1", 0).unwrap().remaining(), 97);
    // on a tie, the first layer is reported; one layer's decision is its own
    let (a, b) = (build("a", Policy::per_minute(10)), build("b", Policy::per_minute(10)));
    let d = check_all(1, &[&a.bind("k"), &b.bind("k")]).unwrap();
    assert_eq!((d.policy(), d.remaining()), ("a", 9));
    let d = check_all(1, &[&b.bind("k")]).unwrap();
    assert_eq!((d.policy(), d.remaining()), ("b", 8));
    assert!(check_all(9, &[&b.bind("k")]).unwrap().is_denied());
    assert_eq!(b.peek("k", 0).unwrap().remaining(), 8, "a denial takes nothing");
}

#[test]
fn when_full_new_keys_share_the_overflow_bucket_or_are_denied() {
    let clock = ManualClock::new();
    let overflow = Limiter::<u64>::builder(Policy::per_minute(3))
        .max_keys(2)
        .clock(clock.clock())
        .build()
        .unwrap();
    assert!(overflow.check(&1).is_allowed() && overflow.check(&2).is_allowed());
    let results: Vec<_> = (100..110u64).map(|k| overflow.check(&k)).collect();
    assert!(results.iter().all(|d| d.is_untracked()));
    assert_eq!(
        results.iter().filter(|d| d.is_allowed()).count(),
        3,
        "untracked keys share one bucket of 3"
    );
    assert_eq!(overflow.len(), 2);

    let deny = Limiter::<u64>::builder(Policy::per_minute(3))
        .max_keys(1)
        .when_full(WhenFull::Deny)
        .clock(clock.clock())
        .build()
        .unwrap();
    assert!(deny.check(&1).is_allowed());
    let d = deny.check(&2);
    assert!(d.is_denied() && d.is_untracked() && d.retry_after().is_some());
    // once key 1 is back to fresh, a sweep frees its place
    clock.advance(Duration::from_secs(60));
    assert!(deny.check(&2).is_allowed());
    assert!(!deny.check(&2).is_untracked());
    assert_eq!(deny.evicted(), 1);
}

#[test]
fn sweep_removes_only_fresh_equivalent_keys() {
    let clock = ManualClock::new();
    let l = limiter(Policy::per_second(10), &clock);
    for i in 0..100 {
        l.check(&format!("light-{i}"));
    }
    for _ in 0..10 {
        l.check("heavy");
    }
    clock.advance(Duration::from_millis(150));
    assert_eq!(
        l.sweep(),
        100,
        "one token refills in 100 ms: the light keys are full again"
    );
    assert_eq!(l.len(), 1);
    assert_eq!(
        l.peek("heavy", 1).unwrap().remaining(),
        0,
        "the heavy key kept its state"
    );
}

#[test]
fn state_is_shared_across_clones_and_threads() {
    let clock = ManualClock::new();
    let l = limiter(Policy::per_hour(1000), &clock);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let l = l.clone();
            s.spawn(move || {
                for _ in 0..500 {
                    l.check("shared");
                }
            });
        }
    });
    let allowed_after = l.peek("shared", 1).unwrap();
    assert!(allowed_after.is_denied(), "2000 checks against 1000: all spent");
    assert_eq!(l.len(), 1);
}

#[test]
fn direct_limiter_matches_a_single_key() {
    let clock = ManualClock::new();
    let d = DirectLimiter::with_clock(Policy::per_second(3), clock.clock()).unwrap();
    let k = limiter(Policy::per_second(3), &clock);
    for _ in 0..5 {
        assert_eq!(d.check().is_allowed(), k.check("x").is_allowed());
    }
    assert!(d.check_n(4).is_err());
    d.refund(1);
    assert!(d.peek(1).unwrap().is_allowed());
}

#[tokio::test]
async fn until_ready_waits_for_the_retry_time() {
    use tollgate::Jitter;
    let l: Limiter = Limiter::new(Policy::per_second(20).burst(1)).unwrap();
    assert!(l.check("k").is_allowed());
    let start = std::time::Instant::now();
    let d = l.until_ready("k").await;
    assert!(d.is_allowed());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(40), "waited only {waited:?}");
    let d = l
        .until_n_ready("k", 1, Jitter::up_to(Duration::from_millis(5)))
        .await
        .unwrap();
    assert!(d.is_allowed());
    assert!(
        l.until_n_ready("k", 2, Jitter::default()).await.is_err(),
        "never: cost above burst"
    );
}
