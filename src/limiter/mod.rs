//! The limiter: one policy counted per key, answered from in-process atomic state.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::algorithm::Rule;
use crate::clock::Clock;
use crate::consts::{CLAIM_ON_DEMAND_ATTEMPTS, DEFAULT_MAX_KEYS};
use crate::decision::{Decision, InsufficientCapacity, Source};
use crate::distributed::{Ask, DistKeys, Identifier, Node, Outcome};
use crate::local::cell::{Cell, Retired};
use crate::local::table::Table;
use crate::policy::{Policy, PolicyError};
use papaya::LocalGuard;

/// What a limiter does with a new key when its table already holds `max_keys` keys that all
/// carry information (none is indistinguishable from fresh).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Count all such keys together in one shared bucket of the same policy (default): they
    /// are limited, as a group, and a flood of new keys cannot get more than one key's quota.
    #[default]
    Overflow,
    /// Deny such keys until the sweeper frees room.
    Deny,
}

/// Why a limiter could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The policy has a field out of range.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// `max_keys` was 0.
    #[error("max_keys: must be > 0")]
    MaxKeys,
    /// The policy cannot be shared through the store: the field, and why.
    #[error("invalid policy for distributed mode: {0}")]
    Distributed(PolicyError),
    /// A live limiter of the node already shares a limit under this name and policy (the store
    /// records one holding per node and key, which two limiters would overwrite).
    #[error("{0}")]
    NameInUse(String),
}

/// The policy field a store limit's error is about.
fn limits_field(e: &crate::store::LimitsError, policy: &Policy) -> &'static str {
    use crate::store::LimitsError;
    match e {
        LimitsError::Capacity(_) | LimitsError::Span if policy.get_algorithm() == crate::Algorithm::TokenBucket => {
            "burst"
        }
        LimitsError::Capacity(_) | LimitsError::Span | LimitsError::Points => "points",
        LimitsError::Window | LimitsError::Lease => "duration",
    }
}

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

/// Interns a name so decisions can carry it as a `&'static str` (a copy, no reference count
/// on the hot path). Each distinct name is stored once per process.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

type DistFactory<K> = Box<dyn FnOnce(&'static str, &Policy, usize) -> Result<Arc<DistKeys<K>>, BuildError>>;

/// Builds a [`Limiter`].
pub struct LimiterBuilder<K> {
    dist: Option<DistFactory<K>>,
    policy: Policy,
    name: String,
    max_keys: usize,
    when_full: WhenFull,
    clock: Option<Clock>,
    node_clock: Option<Clock>,
    #[cfg(feature = "metrics")]
    metrics: Option<(String, String)>,
    _keys: std::marker::PhantomData<fn(K)>,
}

impl<K: Hash + Eq + Send + Sync + 'static> LimiterBuilder<K> {
    /// The name decisions report (`Decision::policy`), e.g. the layer (`ip`, `user`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The most keys tracked at once (default 1,000,000). See [`WhenFull`].
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// What happens to new keys when the table is full of keys that carry information.
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// The time source (default [`Clock::cached`]). In distributed mode the node's clock is
    /// used instead.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The `layer` and `tier` labels of this limiter's metrics (default empty; the limiter's
    /// name is the `policy` label). Feature `metrics`.
    #[cfg(feature = "metrics")]
    pub fn metric_labels(mut self, layer: impl Into<String>, tier: impl Into<String>) -> Self {
        if let Some(m) = &mut self.metrics {
            *m = (layer.into(), tier.into());
        }
        self
    }

    /// Whether checks count their decisions for [`crate::metrics`] (default on with feature
    /// `metrics`: a load and a store in a per-thread cell per check).
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = match (on, self.metrics.take()) {
            (true, Some(m)) => Some(m),
            (true, None) => Some(Default::default()),
            (false, _) => None,
        };
        self
    }

    /// Validates the policy and builds the limiter.
    pub fn build(self) -> Result<Limiter<K>, BuildError> {
        let rule = self.policy.compile()?;
        if self.max_keys == 0 {
            return Err(BuildError::MaxKeys);
        }
        let name = intern(&self.name);
        let dist = match self.dist {
            Some(make) => Some(make(name, &self.policy, self.max_keys)?),
            None => None,
        };
        let inner = Arc::new(Inner {
            dist,
            rule,
            name,
            table: Table::new(self.max_keys),
            overflow: Cell::default(),
            when_full: self.when_full,
            // In distributed mode checks compare claim validity with the node's clock.
            clock: self.node_clock.or(self.clock).unwrap_or_default(),
            policy: self.policy,
            #[cfg(feature = "metrics")]
            metrics: match self.metrics {
                Some((layer, tier)) => Counted {
                    tally: crate::tally::Tally::new(),
                    near_slack: rule.near_limit_slack().unwrap_or(NO_SLACK),
                    labels: crate::metrics::labels(name, &layer, &tier),
                },
                None => Counted {
                    tally: crate::tally::Tally::off(),
                    near_slack: NO_SLACK,
                    labels: Vec::new(),
                },
            },
        });
        #[cfg(feature = "metrics")]
        if inner.metrics.tally.is_on() {
            let weak: std::sync::Weak<dyn crate::metrics::Source> = Arc::downgrade(&inner) as _;
            crate::metrics::register(weak);
        }
        Ok(Limiter { inner })
    }
}

impl<K: Hash + Eq + Send + Sync + Clone + Identifier + 'static> LimiterBuilder<K> {
    /// Distributed mode: share this limit with every process whose limiter of the same name
    /// is built on a node of the same store. Checks spend quota this node claimed; the node's
    /// sync task exchanges it with the store. The limiter uses the node's clock.
    /// `block_duration` is not available in distributed mode.
    pub fn node(mut self, node: &Node) -> Self {
        let inner = node.inner.clone();
        self.node_clock = Some(inner.clock.clone());
        self.dist = Some(Box::new(move |name, policy, max_keys| {
            let invalid = |field: &'static str, reason: String| BuildError::Distributed(PolicyError { field, reason });
            if policy.get_block_duration().is_some() {
                return Err(invalid("block_duration", "not available in distributed mode".into()));
            }
            let limits = crate::store::Limits::from_policy(policy, inner.lease)
                .map_err(|e| invalid(limits_field(&e, policy), e.to_string()))?;
            if let Some(advice) = sizing_advice(policy, inner.sync_interval) {
                tracing::warn!(limiter = name, "{advice}");
            }
            if policy.get_algorithm() != crate::Algorithm::TokenBucket
                && policy.duration() < crate::consts::MIN_CLAIM_SPAN
            {
                return Err(invalid(
                    "duration",
                    format!(
                        "a window must be at least {} ms in distributed mode",
                        crate::consts::MIN_CLAIM_SPAN.as_millis()
                    ),
                ));
            }
            // The store key names the policy too: a changed policy starts from fresh state
            // instead of reading another algorithm's state.
            let namespace = intern(&format!(
                "{name}/{}/{}/{}/{}",
                policy.get_algorithm().as_str(),
                policy.points(),
                policy.duration().as_millis(),
                policy.capacity()
            ));
            let rule = policy.compile().map_err(BuildError::Distributed)?;
            DistKeys::new(inner, namespace, limits, rule, max_keys).map_err(BuildError::NameInUse)
        }));
        self
    }
}

/// The sizing rule of distributed mode: a key can use its whole rate only when its capacity
/// covers what refills during two sync intervals; otherwise the bucket overflows between
/// syncs. Returns the advice when `policy` breaks the rule.
pub fn sizing_advice(policy: &Policy, sync_interval: Duration) -> Option<String> {
    if policy.get_algorithm() != crate::Algorithm::TokenBucket {
        return None;
    }
    let needed = (policy.points() as f64 * 2.0 * sync_interval.as_secs_f64() / policy.duration().as_secs_f64()).ceil();
    ((policy.capacity() as f64) < needed).then(|| {
        format!(
            "capacity {} is below 2 x rate x sync_interval = {needed:.0}: the bucket overflows between syncs and \
             utilization drops; raise burst to at least {needed:.0} or shorten the sync interval",
            policy.capacity()
        )
    })
}

struct Inner<K> {
    /// Distributed mode: the keys' claims. `None` in local mode.
    dist: Option<Arc<DistKeys<K>>>,
    rule: Rule,
    name: &'static str,
    table: Table<K>,
    overflow: Cell,
    when_full: WhenFull,
    clock: Clock,
    policy: Policy,
    #[cfg(feature = "metrics")]
    metrics: Counted,
}

/// A limiter's decision counts and metric labels. The tally is off when the limiter was built
/// with metrics off.
#[cfg(feature = "metrics")]
struct Counted {
    tally: crate::tally::Tally,
    /// [`Rule::near_limit_slack`] of the limiter's rule, or `NO_SLACK`.
    near_slack: u64,
    labels: Vec<::metrics::Label>,
}

/// No one-compare near-limit test for this rule (a slack never reaches `u64::MAX`).
#[cfg(feature = "metrics")]
const NO_SLACK: u64 = u64::MAX;

#[cfg(feature = "metrics")]
impl Counted {
    /// Counts a decision made on a state of the limiter's own `rule` (the key's cell or the
    /// overflow cell): whether it was allowed, and the state after it at `now`.
    #[inline(always)]
    fn count_own(&self, rule: &Rule, allowed: bool, state: u64, now: u64) {
        self.record(allowed, || {
            if self.near_slack != NO_SLACK {
                state > crate::algorithm::clamp(now) + self.near_slack
            } else {
                near_limit_general(rule, state, now)
            }
        });
    }

    /// Counts any decision of this limiter.
    #[inline(always)]
    fn count(&self, rule: &Rule, d: &Decision) {
        match d.source {
            Source::Key | Source::Overflow => self.count_own(rule, d.allowed, d.state, d.now),
            _ => self.record(d.allowed, || d.near_limit()),
        }
    }

    /// Counts allowed (and near-limit, asking `near` only then) or denied.
    #[inline(always)]
    fn record(&self, allowed: bool, near: impl FnOnce() -> bool) {
        use crate::tally::Kind;
        match self.tally.mine() {
            Some(cells) => {
                if !allowed {
                    cells.bump(Kind::Denied);
                } else {
                    cells.bump(Kind::Allowed);
                    if near() {
                        cells.bump(Kind::NearLimit);
                    }
                }
            }
            None => {
                if self.tally.is_on() {
                    self.record_slow(allowed, allowed && near());
                }
            }
        }
    }

    /// No cells for this thread at hand: the first count of the thread, a tally without a
    /// slot, or a thread being torn down.
    #[cold]
    fn record_slow(&self, allowed: bool, near: bool) {
        use crate::tally::Kind;
        self.tally.bump(if allowed { Kind::Allowed } else { Kind::Denied });
        if near {
            self.tally.bump(Kind::NearLimit);
        }
    }
}

#[cfg(feature = "metrics")]
#[cold]
fn near_limit_general(rule: &Rule, state: u64, now: u64) -> bool {
    rule.near_limit(state, now)
}

#[cfg(feature = "metrics")]
impl<K: Hash + Eq + Send + Sync + 'static> crate::metrics::Source for Inner<K> {
    fn publish(&self) {
        use crate::metrics::{with, DECISIONS_TOTAL, KEYS_EVICTED_TOTAL, KEYS_TRACKED, NEAR_LIMIT_TOTAL};
        use crate::tally::Kind;
        let m = &self.metrics;
        if !m.tally.is_on() {
            return;
        }
        let l = &m.labels;
        ::metrics::counter!(DECISIONS_TOTAL, with(l.clone(), "decision", "allowed"))
            .absolute(m.tally.get(Kind::Allowed));
        ::metrics::counter!(DECISIONS_TOTAL, with(l.clone(), "decision", "denied")).absolute(m.tally.get(Kind::Denied));
        ::metrics::counter!(NEAR_LIMIT_TOTAL, l.clone()).absolute(m.tally.get(Kind::NearLimit));
        let tracked = match &self.dist {
            Some(d) => d.len(),
            None => self.table.len(),
        };
        ::metrics::gauge!(KEYS_TRACKED, l.clone()).set(tracked as f64);
        ::metrics::counter!(KEYS_EVICTED_TOTAL, l.clone()).absolute(self.table.evicted());
    }
}

/// A rate limiter: one [`Policy`] counted separately for each key.
///
/// Cloning is cheap and every clone shares the same state. Checks are lock-free: a map read
/// that writes nothing shared, one clock read and one compare-and-swap on the key's own word.
/// No allocation happens on a check of a key already tracked.
///
/// ```
/// use tollgate::{Limiter, Policy};
///
/// let limiter: Limiter = Limiter::builder(Policy::per_minute(2)).name("user").build().unwrap();
/// assert!(limiter.check("alice").is_allowed());
/// assert!(limiter.check("alice").is_allowed());
/// let d = limiter.check("alice");
/// assert!(d.is_denied());
/// assert_eq!(d.policy(), "user");
/// assert!(d.retry_after().unwrap().as_secs() >= 29);
/// assert!(limiter.check("bob").is_allowed());
/// ```
pub struct Limiter<K = String> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Limiter<K> {
    fn clone(&self) -> Self {
        Limiter {
            inner: self.inner.clone(),
        }
    }
}

impl<K> fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.inner.name)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> Limiter<K> {
    /// Starts building a limiter for `policy`.
    pub fn builder(policy: Policy) -> LimiterBuilder<K> {
        LimiterBuilder {
            dist: None,
            policy,
            name: String::from("default"),
            max_keys: DEFAULT_MAX_KEYS,
            when_full: WhenFull::default(),
            clock: None,
            node_clock: None,
            #[cfg(feature = "metrics")]
            metrics: Some(Default::default()),
            _keys: std::marker::PhantomData,
        }
    }

    /// A limiter with default settings; fails only on an invalid policy.
    pub fn new(policy: Policy) -> Result<Self, BuildError> {
        Self::builder(policy).build()
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The name decisions report.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        match &self.inner.dist {
            Some(d) => d.len(),
            None => self.inner.table.len(),
        }
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys removed by sweeps so far (each was indistinguishable from a fresh key).
    pub fn evicted(&self) -> u64 {
        self.inner.table.evicted()
    }

    /// Removes every key indistinguishable from fresh now. This happens by itself when the
    /// table fills up; call it to free memory at a time of your choosing.
    pub fn sweep(&self) -> usize {
        let now = self.inner.clock.now_ns();
        self.inner.table.sweep(&self.inner.rule, now, true)
    }

    /// Checks one unit for `key`, taking it when allowed.
    #[inline]
    pub fn check<Q>(&self, key: &Q) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.take::<true, _>(key, 1, self.inner.clock.now_ns())
    }

    /// Checks `cost` units for `key`, taking them when allowed. `Err` means the cost exceeds
    /// the policy's capacity and can never be allowed. A cost of 0 takes nothing and is denied
    /// only while the key is blocked.
    #[inline]
    pub fn check_n<Q>(&self, key: &Q, cost: u64) -> Result<Decision, InsufficientCapacity>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.fits(cost)?;
        Ok(self.take::<true, _>(key, cost, self.inner.clock.now_ns()))
    }

    /// What `check_n(key, cost)` would answer now, taking nothing and tracking nothing.
    pub fn peek<Q>(&self, key: &Q, cost: u64) -> Result<Decision, InsufficientCapacity>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.fits(cost)?;
        let inner = &*self.inner;
        let now = inner.clock.now_ns();
        if let Some(dist) = &inner.dist {
            return Ok(self.claimed(dist.peek(key, cost, now), cost));
        }
        let guard = inner.table.guard();
        let step = inner
            .table
            .get(key, &guard)
            .and_then(|c| c.peek(&inner.rule, now, cost).ok())
            .unwrap_or_else(|| inner.rule.peek(0, now, cost));
        Ok(self.decision(step.allowed, Source::Key, step.state, now, cost))
    }

    /// Gives back up to `cost` units to `key` (for example when the work they paid for did
    /// not happen). Never raises a key above a full quota; for window algorithms, only the
    /// current window gets units back.
    ///
    /// In distributed mode, units go back to the tokens this node claimed for the key, at
    /// most what its checks took from them since the last sync. Once the failure policy has
    /// answered on this node, a refund cannot tell the claimed tokens from the failure
    /// policy's share they may have come from (crediting the wrong one would let the key
    /// admit more than its limit), so it gives back nothing: use
    /// [`refund_decision`](Self::refund_decision), which knows.
    pub fn refund<Q>(&self, key: &Q, cost: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.inner.clock.now_ns();
        let source = match &self.inner.dist {
            None => Source::Key,
            Some(dist) if dist.node().degraded_ever.load(std::sync::atomic::Ordering::Acquire) => return,
            Some(_) => Source::Claimed,
        };
        self.give_back(key, cost, now, source, now);
    }

    /// Gives back what `decision` (an admission of `key` by this limiter) took, to where it
    /// was taken from: the key's state, the claimed tokens, the failure policy's share or the
    /// overflow bucket. Never raises a key above a full quota; in distributed mode, claimed
    /// tokens come back only if no sync has counted them as spent since. A denial gives back
    /// nothing.
    ///
    /// ```
    /// use tollgate::{Limiter, Policy};
    ///
    /// let l: Limiter = Limiter::new(Policy::per_minute(1)).unwrap();
    /// let d = l.check("alice");
    /// assert!(d.is_allowed());
    /// l.refund_decision("alice", &d); // the work did not happen
    /// assert!(l.check("alice").is_allowed());
    /// ```
    pub fn refund_decision<Q>(&self, key: &Q, decision: &Decision)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !decision.is_allowed() {
            return;
        }
        let now = self.inner.clock.now_ns();
        self.give_back(key, decision.cost, decision.now, decision.source, now);
    }

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
    /// ([`NodeBuilder::claims_on_demand_per_second`](crate::NodeBuilder::claims_on_demand_per_second))
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
        let Some(dist) = &self.inner.dist else {
            return self.check_n(key, cost);
        };
        let node = dist.node();
        let deadline = tokio::time::Instant::now() + node.claim_wait_bound();
        for _ in 0..CLAIM_ON_DEMAND_ATTEMPTS {
            match dist.take_or_ask(key, cost, self.inner.clock.now_ns(), true) {
                Ask::Done(o) => {
                    let d = self.claimed(o, cost);
                    self.count(&d);
                    return Ok(d);
                }
                Ask::Asked => {
                    if !node.wait_asked(deadline).await {
                        break;
                    }
                }
            }
        }
        self.check_n(key, cost)
    }

    /// Binds this limiter to a key, for [`check_all`].
    pub fn bind<'a, Q>(&'a self, key: &'a Q) -> Bound<'a, K, Q>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        Bound { limiter: self, key }
    }

    /// Counts a decision for the metrics (nothing without feature `metrics`).
    #[inline(always)]
    fn count(&self, _d: &Decision) {
        #[cfg(feature = "metrics")]
        self.inner.metrics.count(&self.inner.rule, _d);
    }

    #[inline]
    fn fits(&self, cost: u64) -> Result<(), InsufficientCapacity> {
        if cost > self.inner.rule.capacity {
            return Err(InsufficientCapacity {
                cost,
                capacity: self.inner.rule.capacity,
                policy: self.inner.name,
            });
        }
        Ok(())
    }

    #[inline]
    fn decision(&self, allowed: bool, source: Source, state: u64, now: u64, cost: u64) -> Decision {
        Decision {
            allowed,
            source,
            rule: self.inner.rule,
            state,
            now,
            cost,
            name: self.inner.name,
            extra: 0,
        }
    }

    /// Takes `cost` for `key` at `now`; counts the decision for the metrics when `COUNT`
    /// (a check, as opposed to a layer of [`check_all`], which counts only deciding layers).
    #[inline]
    fn take<const COUNT: bool, Q>(&self, key: &Q, cost: u64, now: u64) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let inner = &*self.inner;
        if let Some(dist) = &inner.dist {
            return self.take_distributed::<COUNT, Q>(dist, key, cost, now);
        }
        let guard = inner.table.guard();
        loop {
            let cell = match inner.table.get(key, &guard) {
                Some(cell) => cell,
                None => match self.insert(key, &guard, now) {
                    Some(cell) => cell,
                    None => {
                        let d = self.untracked(cost, now);
                        if COUNT {
                            self.count(&d);
                        }
                        return d;
                    }
                },
            };
            match cell.acquire(&inner.rule, now, cost) {
                Ok(step) => {
                    // Counted from the values at hand: the source is the key's cell.
                    #[cfg(feature = "metrics")]
                    if COUNT {
                        inner.metrics.count_own(&inner.rule, step.allowed, step.state, now);
                    }
                    return self.decision(step.allowed, Source::Key, step.state, now, cost);
                }
                Err(Retired) => inner.table.unlink_retired(key, &guard),
            }
        }
    }

    /// [`take`](Self::take) in distributed mode, kept out of the local path's code.
    #[inline(never)]
    fn take_distributed<const COUNT: bool, Q>(&self, dist: &DistKeys<K>, key: &Q, cost: u64, now: u64) -> Decision
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let d = self.claimed(dist.take(key, cost, now), cost);
        if COUNT {
            self.count(&d);
        }
        d
    }

    /// A key's first check: its cell is made (once per key, so out of the hot path's code).
    #[cold]
    #[inline(never)]
    fn insert<'g, Q>(&self, key: &Q, guard: &'g LocalGuard<'_>, now: u64) -> Option<&'g Cell>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.inner.table.insert(key, guard, &self.inner.rule, now)
    }

    fn claimed(&self, o: Outcome, cost: u64) -> Decision {
        let source = if o.untracked {
            Source::TableFull
        } else if o.degraded {
            Source::Degraded
        } else {
            Source::Claimed
        };
        Decision {
            allowed: o.allowed,
            source,
            rule: self.inner.rule,
            state: o.remaining,
            now: o.reset_after_ns,
            cost,
            name: self.inner.name,
            extra: o.retry_after_ns,
        }
    }

    #[cold]
    fn untracked(&self, cost: u64, now: u64) -> Decision {
        let inner = &*self.inner;
        match inner.when_full {
            WhenFull::Deny => self.decision(false, Source::TableFull, 0, now, cost),
            WhenFull::Overflow => {
                let step = inner
                    .overflow
                    .acquire(&inner.rule, now, cost)
                    .expect("the overflow cell is never retired");
                self.decision(step.allowed, Source::Overflow, step.state, now, cost)
            }
        }
    }

    fn give_back<Q>(&self, key: &Q, cost: u64, taken_at: u64, source: Source, now: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = &*self.inner;
        match source {
            Source::Claimed => {
                if let Some(dist) = &inner.dist {
                    dist.refund(key, cost, now);
                }
            }
            Source::Key => {
                let guard = inner.table.guard();
                if let Some(cell) = inner.table.get(key, &guard) {
                    cell.refund(&inner.rule, now, cost, taken_at);
                }
            }
            Source::Degraded => {
                if let Some(dist) = &inner.dist {
                    dist.refund_degraded(key, cost, now);
                }
            }
            Source::Overflow => inner.overflow.refund(&inner.rule, now, cost, taken_at),
            Source::TableFull => {}
        }
    }
}

/// A limiter bound to a key: one layer of a [`check_all`].
pub struct Bound<'a, K, Q: ?Sized> {
    limiter: &'a Limiter<K>,
    key: &'a Q,
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
        self.limiter
            .give_back(self.key, taken.cost, taken.now, taken.source, now);
    }

    fn count(&self, decision: &Decision) {
        self.limiter.count(decision);
    }

    fn claim_on_demand(&self, cost: u64) -> Option<ClaimWait<'_>> {
        let dist = self.limiter.inner.dist.as_ref()?;
        let now = self.limiter.inner.clock.now_ns();
        if !dist.wants_claim(self.key, cost, now) || !dist.ask(self.key, cost, now) {
            return None;
        }
        let node = dist.node();
        let deadline = tokio::time::Instant::now() + node.claim_wait_bound();
        Some(ClaimWait(Box::pin(node.wait_asked(deadline))))
    }
}

/// A layer's wait for its claim on demand (see [`check_all_async`]); true when the call was
/// made, false at the wait's bound.
#[doc(hidden)]
pub struct ClaimWait<'a>(std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>);

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
            source: Source::Key,
            rule: Rule::token_bucket(1, 1_000_000, 1, 0),
            state: 0,
            now: 0,
            cost,
            name: "",
            extra: 0,
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
    for _ in 0..CLAIM_ON_DEMAND_ATTEMPTS {
        // Every layer whose held tokens do not cover the cost asks for its claim first, so
        // that layers on one node share one call; then each wait ends with its call.
        let waits: Vec<ClaimWait<'_>> = layers.iter().filter_map(|l| l.claim_on_demand(cost)).collect();
        if waits.is_empty() {
            break;
        }
        let mut sent = true;
        for wait in waits {
            sent &= wait.0.await;
        }
        if !sent {
            break;
        }
    }
    let plain: Vec<&dyn Layer> = layers.iter().map(|l| *l as &dyn Layer).collect();
    check_all(cost, &plain)
}
