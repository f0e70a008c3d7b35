//! Unit tests of the limiter handle.

use std::sync::Arc;

use super::{BuildError, Limiter};
use crate::store::MemoryStore;
use crate::{Node, Policy};

fn build(node: &Node) -> Result<Limiter, BuildError> {
    Limiter::builder(Policy::per_minute(100)).name("api").node(node).build()
}

/// A distributed limiter's name and policy stay taken while any handle of it lives, and are
/// free once the last is gone, even while something else (a metrics publication, a round in
/// flight) still holds its state.
#[tokio::test(flavor = "current_thread")]
async fn a_limiter_name_is_free_once_its_last_handle_is_gone_though_its_state_is_still_held() {
    let node = Node::builder(Arc::new(MemoryStore::new())).start().unwrap();
    let a = build(&node).unwrap();
    let b = a.clone();
    // What a metrics publication holds while it reads the limiter's totals.
    let held = a.inner.clone();
    drop(a);
    assert!(
        matches!(build(&node), Err(BuildError::NameInUse(_))),
        "a clone still runs the limiter"
    );
    drop(b);
    let again = build(&node);
    assert!(again.is_ok(), "{:?}", again.err());
    drop(held);
    node.shutdown().await;
}
