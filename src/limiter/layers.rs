//! All-or-nothing checks over several limiters (layers): [`check_all`] and
//! [`check_all_async`].

use std::borrow::Borrow;
use std::hash::Hash;

use super::wait::{wait_for_claims, ClaimWait, Round};
use super::{Limiter, Mode, Taken};
use crate::algorithm::Rule;
use crate::decision::{Decision, Figures, InsufficientCapacity};

/// A limiter bound to a key: one layer of a [`check_all`].
pub struct Bound<'a, K, Q: ?Sized> {
    limiter: &'a Limiter<K>,
    key: &'a Q,
}

impl<K: Hash + Eq + Send + Sync + 'static> Limiter<K> {
    /// Binds this limiter to a key, for [`check_all`].
    pub fn bind<'a, Q>(&'a self, key: &'a Q) -> Bound<'a, K, Q>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        Bound { limiter: self, key }
    }
}

/// One layer of an all-or-nothing check. Implemented by [`Bound`] (`limiter.bind(&key)`);
/// sealed.
pub trait Layer: sealed::Sealed {
    #[doc(hidden)]
    fn capacity_check(&self, cost: u64) -> Result<(), InsufficientCapacity>;
    #[doc(hidden)]
    fn take(&self, cost: u64) -> Decision;
    #[doc(hidden)]
    fn give_back(&self, taken: &Decision);
    /// Counts the layer's final decision for the metrics.
    #[doc(hidden)]
    fn count(&self, decision: &Decision);
    /// Distributed mode, a key whose held tokens do not cover `cost`: asks for a claim on
    /// demand and returns the wait for its call (`None`: nothing to ask for).
    #[doc(hidden)]
    fn claim_on_demand(&self, cost: u64) -> Option<ClaimWait<'_>>;
}

mod sealed {
    pub trait Sealed {}
    impl<K, Q: ?Sized> Sealed for super::Bound<'_, K, Q> {}
}

impl<K, Q> Layer for Bound<'_, K, Q>
where
    K: Hash + Eq + Send + Sync + 'static + Borrow<Q>,
    Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
{
    fn capacity_check(&self, cost: u64) -> Result<(), InsufficientCapacity> {
        self.limiter.fits(cost)
    }

    fn take(&self, cost: u64) -> Decision {
        self.limiter
            .take::<false, _>(self.key, cost, self.limiter.inner.clock.now_ns())
    }

    fn give_back(&self, taken: &Decision) {
        let now = self.limiter.inner.clock.now_ns();
        self.limiter.give_back(self.key, taken.cost, Taken::of(taken), now);
    }

    fn count(&self, decision: &Decision) {
        self.limiter.count(decision);
    }

    fn claim_on_demand(&self, cost: u64) -> Option<ClaimWait<'_>> {
        let Mode::Distributed(dist) = &self.limiter.inner.mode else {
            return None;
        };
        let now = self.limiter.inner.clock.now_ns();
        if !dist.wants_claim(self.key, cost, now) || !dist.ask(self.key, cost, now) {
            return None;
        }
        let node = dist.node();
        let deadline = tokio::time::Instant::now() + node.claim_wait_bound();
        Some(ClaimWait::new(node.wait_asked(deadline)))
    }
}

/// Checks several layers (say ip, user and endpoint) all-or-nothing: `cost` is taken from
/// every layer or from none. A request denied by one layer consumes nothing from the others
/// (what earlier layers granted is refunded to them).
///
/// Returns the denying layer's decision, or when every layer allows, the decision of the layer
/// with the least remaining (the one a client is closest to hitting).
///
/// ```
/// use tollgate::{check_all, Limiter, Policy};
///
/// let ip: Limiter = Limiter::builder(Policy::per_minute(100)).name("ip").build().unwrap();
/// let endpoint: Limiter = Limiter::builder(Policy::per_hour(1)).name("endpoint").build().unwrap();
/// let ok = check_all(1, &[&ip.bind("10.0.0.1"), &endpoint.bind("alice:POST /api/ai/generate")]).unwrap();
/// assert!(ok.is_allowed());
/// let no = check_all(1, &[&ip.bind("10.0.0.1"), &endpoint.bind("alice:POST /api/ai/generate")]).unwrap();
/// assert_eq!(no.policy(), "endpoint");
/// // The denied request took nothing from the ip layer: only the first request counted, so a
/// // check now would leave 98.
/// assert_eq!(ip.peek("10.0.0.1", 1).unwrap().remaining(), 98);
/// ```
pub fn check_all(cost: u64, layers: &[&dyn Layer]) -> Result<Decision, InsufficientCapacity> {
    check_layers(cost, layers)
}

/// [`check_all`] over layers of one type, called without a virtual call when the type is
/// known (the HTTP layer's limiters).
#[inline]
pub(crate) fn check_layers<L: Layer + ?Sized>(cost: u64, layers: &[&L]) -> Result<Decision, InsufficientCapacity> {
    for layer in layers {
        layer.capacity_check(cost)?;
    }
    if let [layer] = layers {
        // One layer: nothing to hand back, and its decision is the answer.
        let d = layer.take(cost);
        layer.count(&d);
        return Ok(d);
    }
    const INLINE: usize = 8;
    Ok(if layers.len() <= INLINE {
        all_or_nothing(cost, layers, &mut [None; INLINE][..layers.len()])
    } else {
        all_or_nothing(cost, layers, &mut vec![None; layers.len()])
    })
}

/// The takes of [`check_all`], with one slot per layer for what it took.
fn all_or_nothing<L: Layer + ?Sized>(cost: u64, layers: &[&L], taken: &mut [Option<Decision>]) -> Decision {
    // The tightest layer so far (the first one on a tie) and its remaining.
    let mut tightest: Option<(Decision, u64)> = None;
    for (i, layer) in layers.iter().enumerate() {
        let d = layer.take(cost);
        if d.is_denied() {
            return refused(&layers[..=i], &taken[..i], d);
        }
        taken[i] = Some(d);
        let remaining = d.remaining();
        if tightest.is_none_or(|(_, least)| remaining < least) {
            tightest = Some((d, remaining));
        }
    }
    for (layer, t) in layers.iter().zip(taken.iter()) {
        if let Some(d) = t {
            layer.count(d);
        }
    }
    tightest.map_or_else(
        || Decision {
            allowed: true,
            cost,
            name: "",
            figures: Figures::Cell {
                overflow: false,
                rule: Rule::token_bucket(1, 1_000_000, 1, 0),
                state: 0,
                now: 0,
            },
        },
        |(d, _)| d,
    )
}

/// Refusal `d` by the last of `layers`: the earlier ones give back what they took (`taken`).
/// Only the refusing layer decided, and is counted: the others took nothing in the end.
#[cold]
#[inline(never)]
fn refused<L: Layer + ?Sized>(layers: &[&L], taken: &[Option<Decision>], d: Decision) -> Decision {
    let (layer, earlier) = layers.split_last().expect("a refusing layer");
    for (earlier, t) in earlier.iter().zip(taken) {
        if let Some(t) = t {
            earlier.give_back(t);
        }
    }
    layer.count(&d);
    d
}

/// [`check_all`] for the async request path: in distributed mode, every layer whose held
/// tokens do not cover `cost` (and whose key the store has not reported exhausted) asks for a
/// claim on demand first, as [`Limiter::check_async`] does; layers on one node share one store
/// call. Then it checks all layers together, all-or-nothing, as [`check_all`]. In local mode
/// it answers at once, exactly as [`check_all`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tollgate::{check_all_async, store::MemoryStore, Limiter, Node, Policy};
///
/// let node = Node::builder(Arc::new(MemoryStore::new()))
///     .sync_interval(Duration::from_millis(50))
///     .start()
///     .unwrap();
/// let ip: Limiter = Limiter::builder(Policy::per_minute(100)).name("ip").node(&node).build().unwrap();
/// let user: Limiter = Limiter::builder(Policy::per_minute(10)).name("user").node(&node).build().unwrap();
/// let d = check_all_async(1, &[&ip.bind("192.0.2.1"), &user.bind("alice")]).await.unwrap();
/// assert!(d.is_allowed());
/// node.shutdown().await;
/// # }
/// ```
pub async fn check_all_async(cost: u64, layers: &[&(dyn Layer + Sync)]) -> Result<Decision, InsufficientCapacity> {
    for layer in layers {
        layer.capacity_check(cost)?;
    }
    // Every layer whose held tokens do not cover the cost asks for its claim first, so that
    // layers on one node share one call; then each wait ends with its call.
    wait_for_claims(|| {
        let waits: Vec<ClaimWait<'_>> = layers.iter().filter_map(|l| l.claim_on_demand(cost)).collect();
        if waits.is_empty() {
            Round::Done(())
        } else {
            Round::Wait(waits)
        }
    })
    .await;
    let plain: Vec<&dyn Layer> = layers.iter().map(|l| *l as &dyn Layer).collect();
    check_all(cost, &plain)
}
