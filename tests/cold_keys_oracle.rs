//! The judge of the slow-key bench (`benches/support/cold_keys.rs`): the exact per-user
//! limiter it compares with, the over-admission it reports, the arrivals it offers and the
//! arguments it honours.

#[path = "../benches/support/cold_keys.rs"]
mod cold_keys;

use std::time::Duration;

use cold_keys::{arrivals, exact_admits, exact_decisions, excess, judge, Args, Case, Outcome, USERS};

const SECOND_NS: u64 = 1_000_000_000;

#[test]
fn exact_bucket_admits_its_capacity_at_once_then_one_per_period() {
    // 20 per minute: 20 at time 0, then one every 3 s.
    let mut at = vec![0u64; 25];
    assert_eq!(exact_admits(20, &at), 20);
    at.extend([3 * SECOND_NS - 1, 3 * SECOND_NS, 3 * SECOND_NS + 1, 6 * SECOND_NS]);
    assert_eq!(exact_admits(20, &at), 22);
}

#[test]
fn exact_bucket_refills_to_its_capacity_and_no_further() {
    // Idle for an hour: still only 100 at once.
    let mut at = vec![0u64; 100];
    at.extend(vec![3600 * SECOND_NS; 150]);
    assert_eq!(exact_admits(100, &at), 200);
}

#[test]
fn excess_counts_admissions_beyond_capacity_plus_refill_since_the_start() {
    let mut at = vec![0u64; 20];
    assert_eq!(excess(20, &at), 0);
    at.push(3 * SECOND_NS);
    assert_eq!(excess(20, &at), 0, "one token refilled after 3 s");
    at.push(3 * SECOND_NS + 1);
    assert_eq!(excess(20, &at), 1);
    at.extend([4 * SECOND_NS, 5 * SECOND_NS]);
    assert_eq!(excess(20, &at), 3, "the largest excess, not the last");
}

#[test]
fn judge_sums_excess_over_users_and_measures_latency_from_arrival_to_decision() {
    let outcome = |user, arrived_ns, decided_ns, allowed| Outcome {
        user,
        arrived_ns,
        decided_ns,
        cost: 1,
        allowed,
        failed: false,
        measured: true,
    };
    let mut v = Vec::new();
    for user in [0, 1] {
        // 21 admitted at once: one too many for each user.
        for i in 0..21 {
            v.push(outcome(user, i, i + 1_000, true));
        }
    }
    v.push(outcome(2, 0, 3_000_000, false));
    let j = judge(20, &v);
    assert_eq!(j.admitted, 42);
    // 20 of each user's 21, and user 2's one request (which was denied).
    assert_eq!(j.ideal, 41);
    assert_eq!(j.over_admitted, 2);
    assert!((j.utilization_pct() - 4200.0 / 41.0).abs() < 1e-9);
    assert_eq!(j.p50_us, 1.0);
    assert_eq!(j.p99_us, 3000.0);
}

#[test]
fn a_drain_empties_the_exact_bucket_without_counting_as_measured() {
    let at = |user, t: u64, cost, allowed, measured| Outcome {
        user,
        arrived_ns: t,
        decided_ns: t + 1_000,
        cost,
        allowed,
        failed: false,
        measured,
    };
    // User 0 drains its 20 at once, then asks once a second for 9 s: the exact bucket has 3
    // tokens by then (one per 3 s), and the limiter admitted 4 of the 9.
    let mut v = vec![at(0, 0, 20, true, false)];
    for s in 1..=9u64 {
        v.push(at(0, s * SECOND_NS, 1, s % 2 == 0, true));
    }
    // User 1's drain was refused by the limiter, not by the exact bucket, which is empty at
    // 1 s: the admission then is beyond the ideal (but within the bound).
    v.push(at(1, 0, 20, false, false));
    v.push(at(1, SECOND_NS, 1, true, true));
    let j = judge(20, &v);
    assert_eq!((j.admitted, j.ideal), (5, 3));
    assert_eq!(j.drained_users, 1);
    // User 0: 20 + 4 admitted by 8 s, where 20 + 2 are allowed (the 4th, at 8 s, is the
    // largest excess: 2).
    assert_eq!(j.over_admitted, 2);
    assert_eq!(
        exact_decisions(20, &[(0, 20), (0, 1), (3 * SECOND_NS, 1)]),
        [true, false, true]
    );
}

#[test]
fn arrivals_are_in_time_order_at_the_offered_rate_over_every_user_and_node() {
    let case = Case {
        nodes: 4,
        points: 100,
        load: 4.0,
    };
    let a = arrivals(&case, Duration::from_secs(60), 7);
    assert!(a.windows(2).all(|w| w[0].at_ns <= w[1].at_ns));
    assert!(a
        .iter()
        .all(|r| r.at_ns <= 60 * SECOND_NS && r.user < USERS && r.node < 4));
    // 100 users x 400 per minute: 40,000 expected, Poisson (sd 200).
    assert!((38_000..42_000).contains(&a.len()), "{}", a.len());
    for node in 0..4 {
        let n = a.iter().filter(|r| r.node == node).count();
        assert!((9_000..11_000).contains(&n), "node {node}: {n}");
    }
    let b = arrivals(&case, Duration::from_secs(60), 7);
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| x.at_ns == y.at_ns && x.user == y.user && x.node == y.node));
}

#[test]
fn arguments_select_cases_the_way_criterion_filters() {
    let args = |v: &[&str]| Args::parse(v.iter().map(|s| s.to_string()));
    let id = "cold_keys/nodes=4/points_per_min=20/load=1.5";
    let a = args(&["--bench", "cold_keys"]);
    assert!(a.names_this_group_only() && a.selects(id) && !a.test);
    let a = args(&["--bench", "--save-baseline", "cold_keys", "nodes=8"]);
    assert!(
        !a.names_this_group_only() && !a.selects(id),
        "the baseline's name is no filter"
    );
    let a = args(&["--bench", "hot_path"]);
    assert!(!a.names_this_group_only() && !a.selects(id));
    assert!(args(&["--bench"]).selects(id));
    assert!(!args(&["--bench", "--ignored"]).selects(id));
    assert!(!args(&["--bench", "--exact", "cold_keys"]).selects(id));
    assert!(args(&["--bench", "--exact", id]).selects(id));
    assert!(
        args(&["cold_keys"]).test,
        "without --bench, as under cargo test --benches"
    );
    assert!(args(&["--bench", "--list"]).list);
}
