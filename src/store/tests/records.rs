//! Each node's holding record: replayed and late claims, records dropped when they no longer
//! count and kept while they do, and the totals they leave.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

/// A token bucket whose refill is too slow to matter within a test (1 token per minute).
fn slow(cap: u64) -> Limits {
    Limits::token_bucket(cap, 1, Duration::from_secs(60), Duration::from_millis(300)).unwrap()
}

#[test]
fn a_replayed_or_older_claim_changes_nothing() {
    // Two stores see the same claims at the same times; one also sees stale claims (a resend
    // of the last one, older ones). Every later reply, state size and TTL must be the same.
    let (s, t) = setup();
    let (reference, rt) = setup();
    let k = StoreKey::from_raw("k");
    let l = tb(10, 10);
    let both = |node: NodeId, c: Claim| {
        let a = one(&s, node, c.clone());
        assert_eq!(a, one(&reference, node, c));
        a
    };
    assert_eq!(both(1, claim_seq(&k, l, 0, 0, 6, 5)).granted, 6);
    assert_eq!(both(2, claim_seq(&k, l, 0, 0, 2, 1)).granted, 2);
    for d in [0, 50, 400] {
        t.advance(Duration::from_millis(d));
        rt.advance(Duration::from_millis(d));
        for seq in [5, 4, 1, 0] {
            for (kept, returned, wanted) in [(0, 0, 10), (0, 6, 0), (6, 0, 10), (9, 0, 0)] {
                let g = one(&s, 1, claim_seq(&k, l, kept, returned, wanted, seq));
                assert_eq!(
                    g,
                    Grant {
                        stale: true,
                        ..Grant::default()
                    }
                );
            }
        }
        assert_eq!(s.state_len(&k), reference.state_len(&k));
        assert_eq!(s.pttl(&k), reference.pttl(&k));
    }
    // After the lease of node 1's claim ran out, its record still tells old claims apart.
    let g = both(2, claim_seq(&k, l, 0, 0, 10, 2));
    assert!(!g.stale && g.granted > 0, "{g:?}");
    assert!(!both(1, claim_seq(&k, l, 6, 0, 1, 6)).stale);
    assert_eq!(s.state_len(&k), reference.state_len(&k));
}

#[test]
fn a_late_return_is_not_granted_twice() {
    // Node 1 holds 5 (seq 1). Its sync 2 returns them but times out: the node takes them as
    // gone. Its sync 3 is granted the 5 left in the store. Sync 2 then reaches the store: had
    // it been applied, the 5 node 1 holds would be in the store a second time.
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = slow(10);
    assert_eq!(one(&s, 1, claim_seq(&k, l, 0, 0, 5, 1)).granted, 5);
    let late = claim_seq(&k, l, 0, 5, 0, 2);
    t.advance(Duration::from_millis(10));
    let g = one(&s, 1, claim_seq(&k, l, 0, 0, 5, 3));
    assert_eq!((g.granted, g.remaining), (5, 0));
    assert_eq!(one(&s, 2, claim_seq(&k, l, 0, 0, 10, 1)).granted, 0);
    t.advance(Duration::from_millis(10));
    assert!(one(&s, 1, late).stale);
    let g = one(&s, 2, claim_seq(&k, l, 0, 0, 10, 2));
    assert_eq!((g.granted, g.remaining, g.revoked), (0, 0, 0));
    // Node 1 still holds its 5: they count until it says otherwise.
    let g = one(&s, 1, claim_seq(&k, l, 5, 0, 0, 4));
    assert_eq!((g.revoked, g.state_lost), (0, false));
}

#[test]
fn a_late_claim_after_the_record_is_gone_only_counts_more() {
    // Node 2 holds 2. Node 1 holds 5 (seq 1), then returns all of them (seq 3): its record
    // goes. Its sync 2 (keeps 5, wants 5) arrives after that. The store applies it (no record
    // tells it apart) and counts 8 for node 1, which holds none of them: it admits less.
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = slow(10);
    assert_eq!(one(&s, 2, claim_seq(&k, l, 0, 0, 2, 1)).granted, 2);
    let before = s.state_len(&k);
    assert_eq!(one(&s, 1, claim_seq(&k, l, 0, 0, 5, 1)).granted, 5);
    let g = one(&s, 1, claim_seq(&k, l, 0, 5, 0, 3));
    assert_eq!(g.remaining, 8);
    assert_eq!(s.state_len(&k), before, "a node that holds nothing has no record");
    t.advance(Duration::from_millis(1));
    let g = one(&s, 1, claim_seq(&k, l, 5, 0, 5, 2));
    assert!(!g.stale);
    assert_eq!((g.granted, g.remaining), (3, 0));
    // Nothing was minted: node 3 finds nothing, node 2 keeps its 2.
    assert_eq!(one(&s, 3, claim_seq(&k, l, 0, 0, 10, 1)).granted, 0);
    let g = one(&s, 2, claim_seq(&k, l, 2, 0, 0, 2));
    assert_eq!((g.revoked, g.remaining), (0, 0));
    // Node 1's next claim keeps nothing: to the store, the 8 were spent.
    assert_eq!(one(&s, 1, claim_seq(&k, l, 0, 0, 0, 4)).remaining, 0);
}

/// The records of holdings that no longer count are dropped when the epoch moves on, so the
/// value stays the size of the nodes that hold something now.
#[test]
fn records_that_no_longer_count_are_dropped_when_the_epoch_moves() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = slow(10);
    for node in 1..=3 {
        assert_eq!(one(&s, node, claim(&k, l, 0, 0, 2, 0)).granted, 2);
    }
    let three = s.state_len(&k).unwrap();
    // Two leases of 300 ms later the three holdings count for nothing.
    t.advance(Duration::from_millis(700));
    one(&s, 4, claim(&k, l, 0, 0, 1, 0));
    assert_eq!(s.state_len(&k), Some(three - 64), "node 4's record only");
}

#[test]
fn a_node_that_gets_nothing_gets_no_record() {
    let (s, _t) = setup();
    let k = StoreKey::from_raw("k");
    let l = slow(10);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, 0)).granted, 10);
    let len = s.state_len(&k);
    assert_eq!(one(&s, 2, claim(&k, l, 0, 0, 5, 0)).granted, 0);
    assert_eq!(s.state_len(&k), len, "node 2 holds nothing");
}

/// When the epoch moves on, the records of the epoch before it stay: those holdings still
/// count, and their nodes keep them without claiming them again.
#[test]
fn the_previous_epochs_records_stay_when_the_epoch_moves() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = slow(10);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 4, 0)).granted, 4);
    // The next epoch (T0 is 200 ms into one of 300 ms); node 2's claim moves the stored epoch.
    t.advance(Duration::from_millis(150));
    assert_eq!(one(&s, 2, claim(&k, l, 0, 0, 1, 0)).granted, 1);
    let g = one(&s, 1, claim(&k, l, 4, 0, 0, 0));
    assert_eq!((g.revoked, g.state_lost, g.remaining), (0, false, 5), "{g:?}");
}

#[test]
fn removing_a_record_keeps_the_totals() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = slow(10);
    for node in 1..=3 {
        assert_eq!(one(&s, node, claim(&k, l, 0, 0, 3, 0)).granted, 3);
    }
    let len = s.state_len(&k).unwrap();
    // Node 2 spent its 3 and holds nothing: its record goes, the others stay.
    let g = one(&s, 2, claim(&k, l, 0, 0, 0, 0));
    assert_eq!(g.remaining, 1);
    assert_eq!(s.state_len(&k), Some(len - 32));
    // Nodes 1 and 3 still hold 3 each, in this epoch and in the next.
    assert_eq!(one(&s, 4, claim(&k, l, 0, 0, 10, 0)).granted, 1);
    t.advance(Duration::from_millis(300));
    assert_eq!(one(&s, 4, claim(&k, l, 1, 0, 10, 0)).granted, 0);
    for node in [1, 3] {
        let g = one(&s, node, claim(&k, l, 3, 0, 0, 0));
        assert_eq!((g.revoked, g.state_lost, g.remaining), (0, false, 0));
    }
    // Node 1 returns its 3: exactly those are free again.
    let g = one(&s, 1, claim(&k, l, 0, 3, 0, 0));
    assert_eq!(g.remaining, 3);
    assert_eq!(s.state_len(&k), Some(len - 32), "node 4 joined, node 1 left");
}

#[test]
fn departed_nodes_leave_no_records() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = Limits::token_bucket(10_000, 10_000, Duration::from_secs(24 * 3600), Duration::from_secs(1)).unwrap();
    assert_eq!(one(&s, 0, claim(&k, l, 0, 0, 9_990, 0)).granted, 9_990);
    let one_record = s.state_len(&k).unwrap();
    for node in 1..=2_000 {
        if node % 250 == 0 {
            assert_eq!(one(&s, 0, claim(&k, l, 9_990, 0, 0, 0)).revoked, 0);
        }
        assert_eq!(one(&s, node, claim(&k, l, 0, 0, 2, 0)).granted, 2);
        assert_eq!(s.state_len(&k), Some(one_record + 32));
        t.advance(Duration::from_millis(1));
        one(&s, node, claim(&k, l, 0, 2, 0, 0));
        assert_eq!(s.state_len(&k), Some(one_record));
        t.advance(Duration::from_millis(1));
    }
}

/// A node whose syncs may time out: it then assumes it was granted nothing and that what it
/// returned is gone, and the store may apply the claim later, after newer ones.
#[derive(Clone, Debug, Default)]
struct LateNode {
    held: u64,
    seq: u64,
    /// Claims that timed out and may still reach the store.
    in_flight: Vec<Claim>,
    last_ok_ms: Option<u64>,
}

proptest! {
    /// Invariant: tokens in the store + tokens held by live nodes <= capacity, also when a
    /// node's claims reach the store late and out of order (a timed-out call that still runs).
    #[test]
    fn late_claims_never_exceed_capacity(
        ops in proptest::collection::vec((0usize..3, 0u64..15, 0u64..15, 0u64..15, 0u64..200, 0u8..6), 1..150),
    ) {
        let (s, t) = setup();
        let k = StoreKey::from_raw("k");
        let l = tb(12, 20);
        let mut nodes = vec![LateNode::default(); 3];
        let mut now_ms = 0;
        for (n, spend, ret, want, dt, action) in ops {
            t.advance(Duration::from_millis(dt));
            now_ms += dt;
            let node = &mut nodes[n];
            // Tokens are spendable for one lease after the last answered sync.
            if node.last_ok_ms.is_some_and(|at| now_ms - at >= l.lease_ms()) {
                node.held = 0;
            }
            let remaining = if action == 5 && !node.in_flight.is_empty() {
                // A claim that timed out reaches the store now, in any order; its reply goes
                // nowhere.
                let c = node.in_flight.remove(spend as usize % node.in_flight.len());
                one(&s, n as u64, c).remaining
            } else {
                let spend = spend.min(node.held);
                node.held -= spend;
                let ret = ret.min(node.held);
                let kept = node.held - ret;
                node.seq += 1;
                let c = claim_seq(&k, l, kept, ret, want, node.seq);
                if action >= 3 {
                    // Timed out: nothing granted, the returned tokens are gone.
                    node.held = kept;
                    node.in_flight.push(c);
                    continue;
                }
                let g = one(&s, n as u64, c);
                prop_assert!(!g.stale);
                node.held = kept - g.revoked + g.granted;
                node.last_ok_ms = Some(now_ms);
                g.remaining
            };
            let lease = l.lease_ms();
            let held: u64 = nodes
                .iter()
                .filter(|nd| nd.last_ok_ms.is_some_and(|at| now_ms - at < lease))
                .map(|nd| nd.held)
                .sum();
            prop_assert!(remaining + held <= 12, "remaining {} + held {} > 12", remaining, held);
        }
    }
}
