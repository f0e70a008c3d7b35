//! The limiter's builder: its settings, and the choice of mode.

use std::hash::Hash;
use std::sync::Arc;

use super::{BuildError, Inner, Limiter, Mode, WhenFull};
use crate::clock::Clock;
use crate::consts::DEFAULT_MAX_KEYS;
use crate::distributed::{dist_keys, DistKeys, Identifier, Node, SetupError};
use crate::intern::intern;
use crate::local::cell::Cell;
use crate::local::table::Table;
use crate::policy::Policy;

/// The distributed setup of the limiter's keys: `dist_keys` for its key type, which only
/// [`LimiterBuilder::node`] can name (it needs the key bounds distributed mode does).
type Setup<K> = fn(&Node, &'static str, &Policy, usize) -> Result<Arc<DistKeys<K>>, SetupError>;

/// Builds a [`Limiter`].
pub struct LimiterBuilder<K> {
    /// Distributed mode: the node, and the setup of the keys' claims on it.
    node: Option<(Node, Setup<K>)>,
    policy: Policy,
    name: String,
    max_keys: usize,
    when_full: WhenFull,
    clock: Option<Clock>,
    #[cfg(feature = "metrics")]
    metrics: Option<(String, String)>,
}

impl<K: Hash + Eq + Send + Sync + 'static> LimiterBuilder<K> {
    pub(super) fn new(policy: Policy) -> Self {
        LimiterBuilder {
            node: None,
            policy,
            name: String::from("default"),
            max_keys: DEFAULT_MAX_KEYS,
            when_full: WhenFull::default(),
            clock: None,
            #[cfg(feature = "metrics")]
            metrics: Some(Default::default()),
        }
    }

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
        let (mode, clock) = match self.node {
            // In distributed mode checks compare claim validity with the node's clock.
            Some((node, setup)) => (
                Mode::Distributed(setup(&node, name, &self.policy, self.max_keys)?),
                node.inner.clock().clone(),
            ),
            None => (
                Mode::Local {
                    table: Table::new(self.max_keys),
                    overflow: Cell::default(),
                    when_full: self.when_full,
                },
                self.clock.unwrap_or_default(),
            ),
        };
        let inner = Arc::new(Inner {
            mode,
            rule,
            name,
            clock,
            policy: self.policy,
            #[cfg(feature = "metrics")]
            metrics: super::counted::Counted::new(self.metrics, &rule, name),
        });
        #[cfg(feature = "metrics")]
        if inner.metrics.is_on() {
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
        self.node = Some((node.clone(), |node, name, policy, max_keys| {
            dist_keys(&node.inner, name, policy, max_keys)
        }));
        self
    }
}
