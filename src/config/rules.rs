//! A configuration compiled into limiters: what a request is checked against, and how a
//! reload keeps the limiters whose policy did not change.

use std::collections::HashMap;

use super::error::Problems;
use super::{Config, ConfigError, Endpoint, IpScope};
use crate::{Clock, Limiter, Node, Policy};

/// A limiter with its place in the [`Rules`].
#[derive(Clone, Debug)]
pub(crate) struct Limit {
    pub(crate) limiter: Limiter,
    /// The layer (`ip`, `user`, `endpoint`).
    pub(crate) layer: &'static str,
    /// Where the limit is in its rules: 0 for the ip layer, 1 + its position for a tier (in
    /// name order), 1 + the number of tiers + its position for an endpoint. Tables derived
    /// from the rules are indexed by it.
    pub(crate) index: usize,
    /// User layer: the ip layer counts this tier's requests (`layers.ip.applies_to`).
    pub(crate) with_ip: bool,
}

impl Limit {
    pub(crate) fn name(&self) -> &'static str {
        self.limiter.name()
    }
}

/// A [`Config`] with its limiters built: what a request is checked against. Obtained from a
/// [`LiveConfig`](super::LiveConfig).
///
/// Limiter names (and so the names in `RateLimit-Policy`, in 429 bodies, and in the store in
/// distributed mode) are `ip`, `user:<tier>` and `endpoint:<METHOD> <path>`.
#[derive(Debug)]
pub struct Rules {
    pub(super) config: Config,
    pub(crate) ip: Option<Limit>,
    pub(crate) tiers: HashMap<String, Limit, ahash::RandomState>,
    /// The user layer for a request without a known tier: anonymous, then identified.
    fallback: [Option<Limit>; 2],
    pub(crate) endpoints: Vec<Limit>,
    pub(crate) api_key_secret: [u8; 16],
    pub(crate) distributed: bool,
}

/// How limiters are built: the clock and, for distributed mode, the node.
#[derive(Clone, Default)]
pub(super) struct BuildSettings {
    pub(super) clock: Option<Clock>,
    pub(super) node: Option<Node>,
}

/// Builds the limits of new rules, reusing those of the rules they replace whose name and
/// policy did not change; a limiter that cannot be built is a problem at the path of its
/// policy.
struct Maker<'a> {
    settings: &'a BuildSettings,
    old: Option<&'a Rules>,
    max_keys: usize,
    problems: Problems,
}

impl Maker<'_> {
    fn limit(&mut self, path: &str, layer: &'static str, name: String, policy: &Policy) -> Option<Limit> {
        if let Some(old) = self.old.filter(|o| o.config.max_keys == self.max_keys) {
            if let Some(prev) = old.find(&name).filter(|prev| prev.limiter.policy() == policy) {
                return Some(prev.clone());
            }
        }
        let mut b = Limiter::builder(policy.clone())
            .name(name.clone())
            .max_keys(self.max_keys);
        #[cfg(feature = "metrics")]
        {
            let tier = if layer == "user" {
                name.strip_prefix("user:").unwrap_or("")
            } else {
                ""
            };
            b = b.metric_labels(layer, tier);
        }
        if let Some(c) = &self.settings.clock {
            b = b.clock(c.clone());
        }
        if let Some(n) = &self.settings.node {
            b = b.node(n);
        }
        match b.build() {
            Ok(limiter) => Some(Limit {
                limiter,
                layer,
                index: 0,
                with_ip: true,
            }),
            Err(crate::BuildError::Distributed(e)) => {
                self.problems.add(format!("{path}.{}", e.field), e.reason);
                None
            }
            Err(e) => {
                self.problems.add(path, e.to_string());
                None
            }
        }
    }

    /// The user layer: one limit per tier, when the layer is on.
    fn tiers(&mut self, config: &Config) -> HashMap<String, Limit, ahash::RandomState> {
        let mut tiers = HashMap::with_hasher(ahash::RandomState::new());
        if !config.layers.user {
            return tiers;
        }
        for (name, p) in &config.tiers {
            if let Some(mut l) = self.limit(&format!("tiers.{name}"), "user", format!("user:{name}"), p) {
                l.index = tiers.len() + 1;
                l.with_ip = match &config.layers.ip_applies_to {
                    IpScope::All => true,
                    IpScope::Tiers(names) => names.contains(name),
                };
                tiers.insert(name.clone(), l);
            }
        }
        tiers
    }

    /// The endpoint layer: one limit per endpoint, when the layer is on; `tiers` limits
    /// precede them.
    fn endpoints(&mut self, config: &Config, tiers: usize) -> Vec<Limit> {
        let mut endpoints = Vec::new();
        if !config.layers.endpoint {
            return endpoints;
        }
        for (i, e) in config.endpoints.iter().enumerate() {
            let path = format!("endpoints[{i}].policy");
            if let Some(mut l) = self.limit(&path, "endpoint", format!("endpoint:{}", e.route()), &e.policy) {
                l.index = 1 + tiers + endpoints.len();
                endpoints.push(l);
            }
        }
        endpoints
    }
}

impl Rules {
    pub(super) fn build(config: Config, settings: &BuildSettings, old: Option<&Rules>) -> Result<Rules, ConfigError> {
        let mut make = Maker {
            settings,
            old,
            max_keys: config.max_keys,
            problems: Problems::default(),
        };
        let ip = match &config.layers.ip {
            Some(p) => make.limit("layers.ip", "ip", "ip".into(), p),
            None => None,
        };
        let tiers = make.tiers(&config);
        let endpoints = make.endpoints(&config, tiers.len());
        let distributed = settings.node.is_some();
        // A reload without a secret keeps the one in use (every node keeps hashing alike).
        if distributed && old.is_none() && config.api_key.as_ref().is_some_and(|a| a.secret.is_none()) {
            make.problems.add(
                "api_key.secret",
                "required in distributed mode: 32 hex digits, the same on every instance (every node must hash API keys alike), e.g. \"api_key\": {\"secret\": \"<output of openssl rand -hex 16>\"}",
            );
        }
        make.problems.or_error(())?;
        let api_key_secret = match (config.api_key.as_ref().and_then(|a| a.secret), old) {
            (Some(s), _) => s,
            (None, Some(o)) => o.api_key_secret,
            (None, None) => random_secret()?,
        };
        let fallback = [&config.anonymous_tier, &config.default_tier].map(|t| tiers.get(t.as_str()).cloned());
        Ok(Rules {
            config,
            ip,
            tiers,
            fallback,
            endpoints,
            api_key_secret,
            distributed,
        })
    }

    /// The ip layer, when it counts requests of the user layer limit `tier`.
    pub(crate) fn ip_for(&self, tier: Option<&Limit>) -> Option<&Limit> {
        self.ip.as_ref().filter(|_| tier.is_none_or(|t| t.with_ip))
    }

    fn find(&self, name: &str) -> Option<&Limit> {
        if name == "ip" {
            return self.ip.as_ref();
        }
        if let Some(t) = name.strip_prefix("user:") {
            return self.tiers.get(t);
        }
        self.endpoints.iter().find(|l| l.name() == name)
    }

    /// The configuration these rules were built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The ip layer's limiter.
    pub fn ip_limiter(&self) -> Option<&Limiter> {
        self.ip.as_ref().map(|l| &l.limiter)
    }

    /// The user layer's limiter for a tier.
    pub fn tier_limiter(&self, tier: &str) -> Option<&Limiter> {
        self.tiers.get(tier).map(|l| &l.limiter)
    }

    /// The endpoint layer's limiter for a request, with its endpoint.
    pub fn endpoint_limiter(&self, method: &str, path: &str) -> Option<(&Endpoint, &Limiter)> {
        self.endpoint_index(method, path)
            .map(|i| (&self.config.endpoints[i], &self.endpoints[i].limiter))
    }

    pub(crate) fn endpoint_index(&self, method: &str, path: &str) -> Option<usize> {
        if self.endpoints.is_empty() {
            return None;
        }
        self.config.endpoints.iter().position(|e| e.matches(method, path))
    }

    /// The user layer for a tier name: that tier, else the default tier.
    pub(crate) fn tier(&self, tier: Option<&str>, anonymous: bool) -> Option<&Limit> {
        match tier.and_then(|t| self.tiers.get(t)) {
            Some(l) => Some(l),
            None => self.fallback[usize::from(!anonymous)].as_ref(),
        }
    }

    /// True when limiters are shared through a node's store.
    pub fn is_distributed(&self) -> bool {
        self.distributed
    }

    pub(crate) fn has_lists(&self) -> (bool, bool) {
        (!self.config.allow.is_empty(), !self.config.deny.is_empty())
    }
}

/// A secret drawn from the operating system's random generator, for API keys when the file
/// sets none.
fn random_secret() -> Result<[u8; 16], ConfigError> {
    let mut out = [0u8; 16];
    getrandom::fill(&mut out).map_err(|e| {
        ConfigError::one(
            "",
            format!("cannot draw an API key secret from the operating system's random generator: {e}"),
        )
    })?;
    Ok(out)
}
