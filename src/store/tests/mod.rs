//! Unit tests of the store semantics on [`MemoryStore`] (the Redis scripts are checked against
//! the same semantics in `tests/store_redis.rs`).

use std::time::Duration;

use proptest::prelude::*;

use super::*;

const T0: u64 = 1_700_000_000_000_000;

fn setup() -> (MemoryStore, ManualTime) {
    let t = ManualTime::new(T0);
    (MemoryStore::with_time_source(t.source()), t)
}

fn tb(cap: u64, per_sec: u64) -> Limits {
    Limits::token_bucket(cap, per_sec, Duration::from_secs(1), Duration::from_millis(300)).unwrap()
}

/// The next sequence number: every claim a test builds is newer than the ones built before it,
/// as a node numbers its syncs.
fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn claim(key: &StoreKey, limits: Limits, kept: u64, returned: u64, wanted: u64, window: u64) -> Claim {
    Claim {
        key: key.clone(),
        limits,
        kept,
        returned,
        wanted,
        window,
        seq: next_seq(),
    }
}

/// A token-bucket claim with the given sequence number.
fn claim_seq(key: &StoreKey, limits: Limits, kept: u64, returned: u64, wanted: u64, seq: u64) -> Claim {
    Claim {
        seq,
        ..claim(key, limits, kept, returned, wanted, 0)
    }
}

fn one(s: &MemoryStore, node: NodeId, c: Claim) -> Grant {
    s.claim_now(node, &[c]).pop().unwrap().unwrap()
}

#[test]
fn limits_validation() {
    assert_eq!(tb(10, 5).period_us(), 200_000);
    assert_eq!(
        Limits::token_bucket(0, 1, Duration::from_secs(1), Duration::from_secs(1)),
        Err(LimitsError::Capacity(0))
    );
    assert_eq!(
        Limits::token_bucket(1, 0, Duration::from_secs(1), Duration::from_secs(1)),
        Err(LimitsError::Points)
    );
    assert_eq!(
        Limits::token_bucket(1, 1, Duration::from_secs(1), Duration::ZERO),
        Err(LimitsError::Lease)
    );
    assert_eq!(
        Limits::token_bucket(
            u32::MAX.into(),
            1,
            Duration::from_secs(366 * 24 * 3600),
            Duration::from_secs(1)
        ),
        Err(LimitsError::Span)
    );
    // Faster than one token per microsecond is rounded to one per microsecond.
    assert_eq!(
        Limits::token_bucket(10, 10_000_000, Duration::from_secs(1), Duration::from_secs(1))
            .unwrap()
            .period_us(),
        1
    );
    assert_eq!(
        Limits::fixed_window(1, Duration::from_micros(999)),
        Err(LimitsError::Window)
    );
    let big = Limits::sliding_window(u32::MAX.into(), Duration::from_secs(366 * 24 * 3600)).unwrap();
    assert!(big.tick_us() > 1 && big.tick_us() < big.period_us());
    assert!(u128::from(big.capacity()) * u128::from(big.period_us() / big.tick_us() + 1) <= 1 << 52);
    assert_eq!(
        Limits::sliding_window(100, Duration::from_secs(60)).unwrap().tick_us(),
        1
    );
    let p = crate::Policy::per_minute(100).burst(20);
    let l = Limits::from_policy(&p, Duration::from_secs(1)).unwrap();
    assert_eq!((l.capacity(), l.period_us(), l.lease_ms()), (20, 600_000, 1000));
}

#[test]
fn token_bucket_grant_return_refill() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = tb(10, 10); // 10 per second, 100 ms per token, 300 ms lease
    let g = one(&s, 1, claim(&k, l, 0, 0, 4, 0));
    assert_eq!(
        (g.granted, g.remaining, g.ms_to_next_token, g.ms_to_reset),
        (4, 6, 0, 400)
    );
    // Node 1 spent 1, returns 3: back to 9 in the store.
    let g = one(&s, 1, claim(&k, l, 0, 3, 0, 0));
    assert_eq!((g.granted, g.remaining, g.ms_to_reset), (0, 9, 100));
    let g = one(&s, 2, claim(&k, l, 0, 0, 20, 0));
    assert_eq!((g.granted, g.remaining), (9, 0));
    assert_eq!(g.ms_to_next_token, 100);
    t.advance(Duration::from_millis(250));
    // Node 2 still holds 9: the 2.5 tokens of refill cannot go beyond capacity - holdings.
    let g = one(&s, 3, claim(&k, l, 0, 0, 20, 0));
    assert_eq!((g.granted, g.remaining, g.ms_to_next_token), (1, 0, 100));
    // Node 2 did not sync within its lease: its 9 count until the end of the epoch after its
    // claim (T0 + 400 ms here) and are taken as spent then; the refill runs from there.
    t.advance(Duration::from_millis(250));
    let g = one(&s, 2, claim(&k, l, 0, 0, 20, 0));
    assert_eq!((g.granted, g.remaining, g.ms_to_next_token), (1, 0, 100));
    // Partial progress towards the next token is kept across syncs.
    t.advance(Duration::from_millis(50));
    let g = one(&s, 2, claim(&k, l, 1, 0, 1, 0));
    assert_eq!((g.granted, g.ms_to_next_token), (0, 50));
    t.advance(Duration::from_millis(50));
    assert_eq!(one(&s, 2, claim(&k, l, 1, 0, 1, 0)).granted, 1);
}

/// A node that stops syncing (a crash, a stalled call) may have spent its tokens at any time
/// until the store stops counting them: the store takes them as spent then, so the refill it
/// credits starts at the end of their count, not at the claim. (Crediting the time they were
/// held let a node that spent late and vanished hand another node that refill on top.)
#[test]
fn a_holding_whose_count_ended_counts_as_spent_then() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    // 10 per second, 1 s lease; T0 starts a lease epoch, so the claim counts for 2 s.
    let l = Limits::token_bucket(10, 10, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, 0)).granted, 10);
    t.advance(Duration::from_millis(2500));
    // Node 1 never synced again: its 10 count until T0 + 2 s, refill from then on (5 tokens).
    let g = one(&s, 2, claim(&k, l, 0, 0, 20, 0));
    assert_eq!((g.granted, g.remaining), (5, 0), "{g:?}");
}

#[test]
fn held_cap_and_lease() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = tb(10, 10);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 6, 0)).granted, 6);
    assert_eq!(one(&s, 2, claim(&k, l, 0, 0, 6, 0)).granted, 4);
    // Idle for a long time, both nodes keep syncing (every 100 ms) and keep what they hold:
    // the store must not refill past their holdings.
    for _ in 0..20 {
        t.advance(Duration::from_millis(100));
        let a = one(&s, 1, claim(&k, l, 6, 0, 0, 0));
        let b = one(&s, 2, claim(&k, l, 4, 0, 0, 0));
        assert_eq!((a.remaining, b.remaining, a.revoked, b.revoked), (0, 0, 0, 0));
    }
    // Node 2 spends its 4 and says so: now 4 can refill (over 400 ms).
    let g = one(&s, 2, claim(&k, l, 0, 0, 0, 0));
    assert_eq!(g.remaining, 0);
    for _ in 0..10 {
        t.advance(Duration::from_millis(100));
        assert_eq!(one(&s, 1, claim(&k, l, 6, 0, 0, 0)).revoked, 0);
    }
    let g = one(&s, 2, claim(&k, l, 0, 0, 10, 0));
    assert_eq!((g.granted, g.remaining), (4, 0));
    // Node 1 stops syncing. Its lease (300 ms epochs: 300..600 ms) runs out, then its 6 refill.
    // Node 2 keeps syncing (a node that does not sync for two leases loses its holdings too).
    for _ in 0..10 {
        t.advance(Duration::from_millis(100));
        assert_eq!(one(&s, 2, claim(&k, l, 4, 0, 0, 0)).revoked, 0);
    }
    let g = one(&s, 2, claim(&k, l, 4, 0, 10, 0));
    assert_eq!(g.granted, 6);
    // Node 1 comes back claiming to keep 6: the store no longer counts them; nothing is free,
    // so all 6 are revoked.
    let g = one(&s, 1, claim(&k, l, 6, 0, 1, 0));
    assert_eq!((g.granted, g.revoked), (0, 6));
    // A node cannot keep or return more than the store believes it holds.
    let g = one(&s, 2, claim(&k, l, 0, 50, 0, 0));
    assert_eq!(g.remaining, 10);
}

#[test]
fn kept_tokens_are_claimed_again_after_state_loss() {
    let (s, _t) = setup();
    let k = StoreKey::from_raw("k");
    let l = tb(10, 10);
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 7, 0)).granted, 7);
    s.clear();
    let g = one(&s, 1, claim(&k, l, 7, 0, 5, 0));
    assert_eq!((g.granted, g.revoked, g.remaining), (3, 0, 0));
}

#[test]
fn fixed_window_rollover_and_void_claims() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = Limits::fixed_window(10, Duration::from_secs(1)).unwrap();
    let w0 = T0 / 1_000_000;
    let g = one(&s, 1, claim(&k, l, 0, 0, 8, 0));
    assert_eq!((g.granted, g.remaining, g.window, g.ms_to_reset), (8, 2, w0, 1000));
    let g = one(&s, 2, claim(&k, l, 0, 0, 8, 0));
    assert_eq!((g.granted, g.remaining, g.ms_to_next_token), (2, 0, 1000));
    t.advance(Duration::from_millis(400));
    let g = one(&s, 1, claim(&k, l, 5, 3, 0, w0));
    assert_eq!((g.remaining, g.revoked, g.ms_to_reset), (3, 0, 600));
    t.advance(Duration::from_millis(600));
    // New window: node 1's claim from the old window is void.
    let g = one(&s, 1, claim(&k, l, 5, 5, 4, w0));
    assert_eq!((g.granted, g.remaining, g.window, g.revoked), (4, 6, w0 + 1, 5));
    assert_eq!(s.pttl(&k), Some(1001));
}

#[test]
fn sliding_window_weights_previous_window() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = Limits::sliding_window(10, Duration::from_secs(1)).unwrap();
    let w0 = T0 / 1_000_000;
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, 0)).granted, 10);
    t.advance(Duration::from_millis(1250));
    // 250 ms into the next window: the previous 10 weigh ceil(10 * 0.75) = 8.
    let g = one(&s, 1, claim(&k, l, 3, 3, 10, w0));
    assert_eq!((g.granted, g.remaining, g.window, g.revoked), (2, 0, w0 + 1, 3));
    // The next token comes when the weight drops to 7: 10 * (1 - e) <= 7, e >= 300 ms.
    assert_eq!(g.ms_to_next_token, 50);
    t.advance(Duration::from_millis(50));
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 10, w0 + 1)).granted, 1);
}

#[test]
fn wrong_type_fails_alone() {
    let (s, _t) = setup();
    let bad = StoreKey::from_raw("bad");
    let good = StoreKey::from_raw("good");
    s.put_foreign(&bad);
    let out = s.claim_now(
        1,
        &[claim(&bad, tb(5, 5), 0, 0, 1, 0), claim(&good, tb(5, 5), 0, 0, 1, 0)],
    );
    assert!(matches!(out[0], Err(KeyError::WrongType(_))));
    assert_eq!(out[1].as_ref().unwrap().granted, 1);
}

#[test]
fn another_algorithms_state_is_corrupt() {
    let (s, _t) = setup();
    let algorithms = [
        tb(5, 5),
        Limits::fixed_window(5, Duration::from_secs(1)).unwrap(),
        Limits::sliding_window(5, Duration::from_secs(1)).unwrap(),
    ];
    for (a, first) in algorithms.iter().enumerate() {
        for (b, other) in algorithms.iter().enumerate().filter(|&(b, _)| b != a) {
            let k = StoreKey::from_raw(format!("k{a}{b}"));
            assert_eq!(one(&s, 1, claim(&k, *first, 0, 0, 1, 0)).granted, 1);
            let out = s.claim_now(1, &[claim(&k, *other, 0, 0, 1, 0), claim(&k, *first, 1, 0, 0, 0)]);
            assert_eq!(out[0], Err(KeyError::Corrupt), "{first:?} read as {other:?}");
            assert!(out[1].is_ok(), "the state is left as it was");
        }
    }
}

#[test]
fn registry_counts_live_nodes() {
    let (s, t) = setup();
    let r = KeyEncoder::default().registry_key();
    assert_eq!(s.heartbeat_now(&r, 1, Duration::from_millis(500)).live_nodes, 1);
    assert_eq!(s.heartbeat_now(&r, 2, Duration::from_millis(500)).live_nodes, 2);
    t.advance(Duration::from_millis(400));
    assert_eq!(s.heartbeat_now(&r, 2, Duration::from_millis(500)).live_nodes, 2);
    t.advance(Duration::from_millis(200));
    assert_eq!(s.heartbeat_now(&r, 2, Duration::from_millis(500)).live_nodes, 1);
    s.leave_now(&r, 2);
    assert_eq!(s.heartbeat_now(&r, 3, Duration::from_millis(500)).live_nodes, 1);
}

/// A registration lasts its time to live and not a millisecond more: at the instant it ends the
/// node is gone (the script removes scores up to and including now).
#[test]
fn a_registration_is_gone_at_the_instant_its_ttl_ends() {
    let (s, t) = setup();
    let r = KeyEncoder::default().registry_key();
    assert_eq!(s.heartbeat_now(&r, 1, Duration::from_millis(500)).live_nodes, 1);
    t.advance(Duration::from_millis(499));
    assert_eq!(s.heartbeat_now(&r, 2, Duration::from_millis(500)).live_nodes, 2);
    t.advance(Duration::from_millis(1));
    assert_eq!(
        s.heartbeat_now(&r, 2, Duration::from_millis(500)).live_nodes,
        1,
        "node 1 registered until now, and now is past it"
    );
}

/// A store clock that goes back by more than a lease keeps the key's stored epoch: a node's
/// holding still counts as its own, so keeping it costs nothing and takes nothing more.
#[test]
fn a_store_clock_gone_back_past_a_lease_keeps_the_stored_epoch() {
    let (s, t) = setup();
    let k = KeyEncoder::default().encode("p", b"k");
    assert_eq!(one(&s, 1, claim(&k, tb(10, 1), 0, 0, 4, 0)).granted, 4);
    // One second back: more than three leases of 300 ms.
    t.set_us(T0 - 1_000_000);
    assert_eq!(t.now_us(), T0 - 1_000_000);
    let g = one(&s, 1, claim(&k, tb(10, 1), 4, 0, 0, 0));
    assert_eq!((g.granted, g.revoked), (0, 0), "{g:?}");
    // Six left, less the token's worth of refill the clock took back; the kept four are not
    // taken from the bucket a second time.
    assert_eq!(g.remaining, 5, "{g:?}");
}

/// Refill accrued while tokens were held is capped by the holdings as they stood (another
/// node's included): a node that spent its holding late in the interval gets nothing for the
/// time it held it, or two bursts could come within moments of each other.
#[test]
fn refill_is_capped_by_the_holdings_that_counted_while_it_accrued() {
    let (s, t) = setup();
    // 100 per second, capacity 10: a token every 10 ms, the whole bucket in 100 ms.
    let fast = tb(10, 100);
    let k = KeyEncoder::default().encode("p", b"k");
    assert_eq!(one(&s, 2, claim(&k, fast, 0, 0, 4, 0)).granted, 4);
    // The next lease epoch: node 2's four count as the previous epoch's holding.
    t.advance(Duration::from_millis(100));
    assert_eq!(one(&s, 1, claim(&k, fast, 0, 0, 10, 0)).granted, 6);
    // 50 ms on, node 1 has spent its six: five tokens' worth of time passed, all of it while
    // the six and node 2's four held the whole capacity.
    t.advance(Duration::from_millis(50));
    let g = one(&s, 1, claim(&k, fast, 0, 0, 10, 0));
    assert_eq!(g.granted, 0, "{g:?}");
}

/// The same cap with other nodes' holdings in both counting epochs: node 2's from the
/// previous one, node 3's from the current one.
#[test]
fn refill_is_capped_by_the_holdings_of_both_counting_epochs() {
    let (s, t) = setup();
    let fast = tb(10, 100);
    let k = KeyEncoder::default().encode("p", b"k");
    assert_eq!(one(&s, 2, claim(&k, fast, 0, 0, 3, 0)).granted, 3);
    t.advance(Duration::from_millis(100));
    assert_eq!(one(&s, 3, claim(&k, fast, 0, 0, 2, 0)).granted, 2);
    assert_eq!(one(&s, 1, claim(&k, fast, 0, 0, 10, 0)).granted, 5);
    t.advance(Duration::from_millis(50));
    let g = one(&s, 1, claim(&k, fast, 0, 0, 10, 0));
    assert_eq!(g.granted, 0, "{g:?}");
}

/// A node gives back at most what it holds beyond what it keeps: a claim that says it returns
/// more adds nothing more to the bucket.
#[test]
fn a_node_returns_at_most_what_it_holds_beyond_what_it_keeps() {
    let (s, _t) = setup();
    let k = KeyEncoder::default().encode("p", b"k");
    assert_eq!(one(&s, 1, claim(&k, tb(10, 1), 0, 0, 4, 0)).granted, 4);
    // Two spent, two kept: six in the bucket.
    assert_eq!(one(&s, 1, claim(&k, tb(10, 1), 2, 0, 0, 0)).remaining, 6);
    // Keeps one and says it returns five: only the one it holds beyond the kept one goes back.
    let g = one(&s, 1, claim(&k, tb(10, 1), 1, 5, 0, 0));
    assert_eq!((g.granted, g.revoked), (0, 0), "{g:?}");
    assert_eq!(g.remaining, 7, "{g:?}");
}

/// `remove` forgets the key (the next claim starts afresh) and says whether there was one.
#[test]
fn removing_a_key_forgets_its_state_and_says_whether_it_existed() {
    let (s, _t) = setup();
    let key = KeyEncoder::default().encode("p", b"k");
    assert!(!s.remove(&key), "nothing stored yet");
    assert_eq!(one(&s, 1, claim(&key, tb(10, 1), 0, 0, 10, 0)).granted, 10);
    assert_eq!(one(&s, 1, claim(&key, tb(10, 1), 10, 0, 1, 0)).granted, 0, "all held");
    assert!(s.remove(&key));
    assert!(!s.remove(&key), "already gone");
    assert_eq!(
        one(&s, 1, claim(&key, tb(10, 1), 0, 0, 10, 0)).granted,
        10,
        "a fresh key's quota"
    );
}

/// A node as the protocol expects it to behave: it spends from what it holds, keeps or returns
/// the rest at each sync, and drops revoked tokens.
#[derive(Clone, Debug, Default)]
struct SimNode {
    held: u64,
}

proptest! {
    /// Invariant: tokens in the store + tokens held by live nodes <= capacity, whatever the
    /// nodes do and however time moves (including nodes that stop syncing).
    #[test]
    fn store_plus_holdings_never_exceed_capacity(
        ops in proptest::collection::vec((0usize..4, 0u64..15, 0u64..15, 0u64..15, 0u64..400), 1..120),
    ) {
        let (s, t) = setup();
        let k = StoreKey::from_raw("k");
        let l = tb(12, 20);
        let mut nodes = vec![SimNode::default(); 4];
        let mut last_sync = [0u64; 4];
        let mut now_ms = 0;
        for (n, spend, ret, want, dt) in ops {
            t.advance(Duration::from_millis(dt));
            now_ms += dt;
            let node = &mut nodes[n];
            let spend = spend.min(node.held);
            node.held -= spend;
            let ret = ret.min(node.held);
            let kept = node.held - ret;
            let g = one(&s, n as u64, claim(&k, l, kept, ret, want, 0));
            node.held = kept - g.revoked + g.granted;
            last_sync[n] = now_ms;
            // Holdings count for at least one lease after the node's last sync.
            let live: u64 =
                nodes.iter().zip(last_sync).filter(|(_, at)| now_ms - at < l.lease_ms()).map(|(nd, _)| nd.held).sum();
            prop_assert!(g.remaining + live <= 12, "remaining {} + held {} > 12", g.remaining, live);
            prop_assert!(g.revoked <= kept);
        }
    }
}

#[test]
fn fixed_window_clock_stepping_back_answers_in_the_stored_window() {
    let (s, t) = setup();
    let k = StoreKey::from_raw("k");
    let l = Limits::fixed_window(10, Duration::from_secs(1)).unwrap();
    let w0 = T0 / 1_000_000;
    t.advance(Duration::from_secs(1));
    assert_eq!(one(&s, 1, claim(&k, l, 0, 0, 4, 0)).granted, 4);
    // The store's clock steps back into the previous window: no second capacity, the stored
    // window's count.
    t.set_us(T0 + 500_000);
    let g = one(&s, 2, claim(&k, l, 0, 0, 10, 0));
    assert_eq!((g.granted, g.remaining, g.window), (6, 0, w0 + 1));
    // Back in the stored window, its count is intact.
    t.set_us(T0 + 1_500_000);
    assert_eq!(one(&s, 2, claim(&k, l, 0, 0, 10, 0)).granted, 0);
}

#[test]
fn state_loss_is_reported_when_the_store_holds_less_than_a_valid_claim() {
    let (s, t) = setup();
    let key = KeyEncoder::default().encode("p", b"k");
    for limits in [
        tb(10, 5),
        Limits::fixed_window(10, Duration::from_secs(60)).unwrap(),
        Limits::sliding_window(10, Duration::from_secs(60)).unwrap(),
    ] {
        s.clear();
        let g = one(&s, 1, claim(&key, limits, 0, 0, 6, 0));
        assert!(!g.state_lost, "a first claim is no loss");
        assert_eq!(g.granted, 6);
        t.advance(Duration::from_millis(50));
        // Keeping 4 and returning 1 of the 6: the store knows them all.
        let g2 = one(&s, 1, claim(&key, limits, 4, 1, 0, g.window));
        assert!(!g2.state_lost, "{limits:?}");
        // The store forgets (restart, eviction): the same claim now exceeds what it knows.
        s.clear();
        let g3 = one(&s, 1, claim(&key, limits, 4, 0, 0, g.window));
        assert!(g3.state_lost, "{limits:?}");
        // Nothing is refunded: the node keeps at most what it kept.
        assert!(g3.granted == 0 && g3.revoked <= 4);
    }
}

#[test]
fn clearing_the_store_changes_the_server_identity() {
    let (s, _t) = setup();
    let r = KeyEncoder::default().registry_key();
    let a = s.heartbeat_now(&r, 1, Duration::from_millis(500));
    assert_eq!(s.heartbeat_now(&r, 1, Duration::from_millis(500)).server, a.server);
    s.clear();
    assert_ne!(s.heartbeat_now(&r, 1, Duration::from_millis(500)).server, a.server);
}

mod lifetimes;
mod records;
