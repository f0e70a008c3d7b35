//! The hand-off between a limiter's keys and the node's rounds of claims: each outcome reaches
//! the key whose claim carried it.

use super::*;
use crate::store::{Grant, MemoryStore};
use crate::{Node, Policy};

const NAMESPACE: &str = "hand-off";

fn node() -> Node {
    Node::builder(Arc::new(MemoryStore::new())).build_manual().unwrap()
}

fn keys(node: &Node) -> Arc<DistKeys<String>> {
    let policy = Policy::per_second(100);
    let limits = Limits::from_policy(&policy, node.inner.timing().lease()).unwrap();
    DistKeys::new(node.inner.clone(), NAMESPACE, limits, policy.compile().unwrap(), 100).unwrap()
}

/// The key a claim names, among `names`.
fn named<'a>(node: &Node, claim: &Claim, names: &[&'a str]) -> &'a str {
    let encoded = |name: &str| {
        let mut id = Vec::new();
        name.to_string().write_identifier(&mut id);
        node.inner.encoder().encode(NAMESPACE, &id)
    };
    names
        .iter()
        .find(|n| encoded(n) == claim.key)
        .expect("a claim names one of the keys")
}

/// A grant of `granted` tokens, with tokens left in the store.
fn grant(granted: u64) -> Option<ClaimOutcome> {
    Some(Ok(Grant {
        granted,
        remaining: 50,
        ms_to_reset: 1_000,
        ..Grant::default()
    }))
}

/// Asserts that each key of `names` holds exactly what the claim naming it was granted
/// (`grants[i]` for `claims[i]`), and keys without a claim hold nothing.
fn assert_held(node: &Node, keys: &DistKeys<String>, claims: &[Claim], grants: &[u64], names: &[&str], now: u64) {
    for name in names {
        let expected = claims
            .iter()
            .zip(grants)
            .filter(|(c, _)| named(node, c, names) == *name)
            .map(|(_, g)| *g)
            .sum::<u64>();
        let key = name.to_string();
        if expected > 0 {
            assert!(
                keys.peek(&key, expected, now).allowed,
                "{name} holds its grant of {expected}"
            );
        }
        assert!(
            !keys.peek(&key, expected + 1, now).allowed,
            "{name} holds no more than {expected}"
        );
    }
}

#[test]
fn each_outcome_reaches_the_key_whose_claim_carried_it() {
    let node = node();
    let keys = keys(&node);
    let now = node.inner.clock().now_ns();
    let names = ["a", "b", "c"];
    for name in names {
        assert!(!keys.take(&name.to_string(), 1, now).allowed, "no claim yet");
    }
    let mut claims = Vec::new();
    keys.prepare(now, false, 1, &mut claims);
    assert_eq!(claims.len(), 3, "one claim per denied key");
    let grants = [3, 5, 7];
    let outcomes: Vec<_> = grants.iter().map(|g| grant(*g)).collect();
    keys.apply(now, &outcomes, &mut ApplyReport::default());
    assert_held(&node, &keys, &claims, &grants, &names, now);
}

#[test]
fn a_round_that_never_settled_leaves_nothing_to_the_next_one() {
    let node = node();
    let keys = keys(&node);
    let now = node.inner.clock().now_ns();
    assert!(!keys.take(&"a".to_string(), 1, now).allowed);
    let mut lost = Vec::new();
    keys.prepare(now, false, 1, &mut lost);
    assert_eq!(lost.len(), 1, "a claim for a, whose outcome never comes");
    assert!(!keys.take(&"b".to_string(), 1, now).allowed);
    let mut claims = Vec::new();
    keys.prepare(now, false, 2, &mut claims);
    assert!(!claims.is_empty());
    let grants: Vec<u64> = (0..claims.len() as u64).map(|i| 4 + 3 * i).collect();
    let outcomes: Vec<_> = grants.iter().map(|g| grant(*g)).collect();
    keys.apply(now, &outcomes, &mut ApplyReport::default());
    assert_held(&node, &keys, &claims, &grants, &["a", "b"], now);
}

#[test]
fn a_round_on_demand_hands_its_outcomes_to_the_keys_asked_for() {
    let node = node();
    let keys = keys(&node);
    let now = node.inner.clock().now_ns();
    let names = ["x", "y"];
    for name in names {
        assert!(keys.ask(&name.to_string(), 2, now), "{name} asks for a claim on demand");
    }
    let mut claims = Vec::new();
    keys.prepare_asked(now, 1, &mut claims);
    assert_eq!(claims.len(), 2);
    let grants = [2, 6];
    let outcomes: Vec<_> = grants.iter().map(|g| grant(*g)).collect();
    keys.apply(now, &outcomes, &mut ApplyReport::default());
    assert_held(&node, &keys, &claims, &grants, &names, now);
}
