//! Checks that wait: until a denial would pass (`until_ready`), or for a claim on demand in
//! distributed mode (`check_async`, and [`check_all_async`](super::check_all_async)).

use std::borrow::Borrow;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use super::{Limiter, Mode};
use crate::consts::CLAIM_ON_DEMAND_ATTEMPTS;
use crate::decision::{Decision, InsufficientCapacity};
use crate::distributed::Ask;

/// Random delay added to waits, so that many waiters do not wake at the same instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Jitter {
    max: Duration,
}

impl Jitter {
    /// A uniformly random extra wait in `[0, max)`.
    pub fn up_to(max: Duration) -> Self {
        Jitter { max }
    }

    fn sample(&self) -> Duration {
        let nanos = self.max.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        static SEED: OnceLock<ahash::RandomState> = OnceLock::new();
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Duration::from_nanos(SEED.get_or_init(ahash::RandomState::new).hash_one(n) % nanos)
    }
}

/// A layer's wait for its claim on demand (see [`check_all_async`](super::check_all_async));
/// true when the call was made, false at the wait's bound.
#[doc(hidden)]
pub struct ClaimWait<'a>(Pin<Box<dyn Future<Output = bool> + Send + 'a>>);

impl<'a> ClaimWait<'a> {
    pub(super) fn new(wait: impl Future<Output = bool> + Send + 'a) -> Self {
        ClaimWait(Box::pin(wait))
    }
}

/// One round of a check that may wait for claims on demand: its answer, or the waits for the
/// claims it asked for.
pub(super) enum Round<'a, T> {
    Done(T),
    Wait(Vec<ClaimWait<'a>>),
}

/// Runs `round` until it answers (`Some`), at most [`CLAIM_ON_DEMAND_ATTEMPTS`] times, each
/// time after the waits of the previous round; `None` when a wait reached its bound or no
/// round answered: the caller then checks without waiting.
pub(super) async fn wait_for_claims<'a, T>(mut round: impl FnMut() -> Round<'a, T>) -> Option<T> {
    for _ in 0..CLAIM_ON_DEMAND_ATTEMPTS {
        let waits = match round() {
            Round::Done(answer) => return Some(answer),
            Round::Wait(waits) => waits,
        };
        let mut sent = true;
        for wait in waits {
            sent &= wait.0.await;
        }
        if !sent {
            return None;
        }
    }
    None
}

impl<K: Hash + Eq + Send + Sync + 'static> Limiter<K> {
    /// Waits until one unit for `key` is allowed, and takes it.
    pub async fn until_ready<Q>(&self, key: &Q) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.until_n_ready(key, 1, Jitter::default())
            .await
            .expect("a cost of 1 always fits a valid policy")
    }

    /// Waits until `cost` units for `key` are allowed (sleeping for the decision's
    /// `retry_after` plus `jitter` between tries), and takes them. `Err` at once when the cost
    /// can never be allowed.
    pub async fn until_n_ready<Q>(&self, key: &Q, cost: u64, jitter: Jitter) -> Result<Decision, InsufficientCapacity>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        loop {
            let d = self.check_n(key, cost)?;
            match d.retry_after() {
                None => return Ok(d),
                Some(wait) => tokio::time::sleep(wait + jitter.sample()).await,
            }
        }
    }

    /// Like [`check`](Self::check), but in distributed mode a key whose held tokens do not
    /// cover the check, and that the store has not reported exhausted, waits for a claim on
    /// demand instead of applying the cold-start rule or denying: one store call, shared with
    /// every check that asks meanwhile (concurrent checks of one key share one claim, and the
    /// keys asked for while a call is on its way go in the next one). This is the check for
    /// slow keys (a user of a per-minute tier seen every few seconds): the node holds nothing
    /// for such a key between its requests, so no token sits on one node while the client's
    /// next request lands on another. The wait is bounded by the sync interval plus the sync
    /// timeout; past the node's budget of calls on demand
    /// ([`NodeBuilder::claims_on_demand_per_second`](crate::distributed::NodeBuilder::claims_on_demand_per_second))
    /// the claim goes with the next sync. While the store is unreachable nothing is waited for:
    /// the failure policy answers. In local mode it answers at once.
    pub async fn check_async<Q>(&self, key: &Q) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_n_async(key, 1)
            .await
            .expect("a cost of 1 always fits a valid policy")
    }

    /// [`check_async`](Self::check_async) for `cost` units.
    pub async fn check_n_async<Q>(&self, key: &Q, cost: u64) -> Result<Decision, InsufficientCapacity>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.fits(cost)?;
        let Mode::Distributed(dist) = &self.inner.mode else {
            return self.check_n(key, cost);
        };
        let node = dist.node();
        let deadline = tokio::time::Instant::now() + node.claim_wait_bound();
        let claimed = wait_for_claims(|| match dist.take_or_ask(key, cost, self.inner.clock.now_ns(), true) {
            Ask::Done(o) => {
                let d = self.claimed(o, cost);
                self.count(&d);
                Round::Done(d)
            }
            Ask::Asked => Round::Wait(vec![ClaimWait::new(node.wait_asked(deadline))]),
        })
        .await;
        match claimed {
            Some(d) => Ok(d),
            None => self.check_n(key, cost),
        }
    }
}
