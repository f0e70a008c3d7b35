//! Tiers, layers and endpoint policies from a JSON file, validated with the JSON path of every
//! bad value, and hot-reloaded without losing the state of the limits that did not change.
//!
//! The file (`rate-limit-tiers.json` at the repository root is a complete example):
//!
//! ```json
//! {
//!   "tiers": {
//!     "anonymous":  { "points": 20,    "duration": 60 },
//!     "free":       { "points": 100,   "duration": 60 },
//!     "premium":    { "points": 1000,  "duration": 60 },
//!     "enterprise": { "points": 10000, "duration": 60 }
//!   },
//!   "default_tier": "free",
//!   "anonymous_tier": "anonymous",
//!   "layers": { "ip": { "points": 1000, "duration": 60, "applies_to": ["anonymous", "free"] }, "user": true, "endpoint": true },
//!   "endpoints": [
//!     { "method": "POST", "path": "/api/ai/generate", "policy": { "points": 10, "duration": 3600 } }
//!   ],
//!   "client_ip": { "trusted_proxies": ["10.0.0.0/8"], "header": "x-forwarded-for", "ipv6_prefix": 64 },
//!   "api_key": { "header": "x-api-key" },
//!   "allow": { "ips": ["127.0.0.1"], "users": [] },
//!   "deny": { "ips": [], "users": ["banned-user"] },
//!   "block_duration": null,
//!   "shadow": false,
//!   "response": { "headers": "draft", "policy_header": "always", "body": "json", "key_error_status": 500 },
//!   "failure_policy": "local_share",
//!   "redis": { "url": "redis://127.0.0.1:6379", "key_prefix": "tollgate", "sync_interval": 0.1, "cluster": false },
//!   "max_keys": 1000000
//! }
//! ```
//!
//! Only `tiers` is required; the seed's flat file, tier names mapped to policies
//! (`{"anonymous": {"points": 20, "duration": 60}, "free": ...}`), is read as the `tiers` of a
//! file with the defaults for everything else. Every policy uses the [`Policy`] vocabulary
//! (`points`, `duration` in seconds, `algorithm`, `burst`, `block_duration`). Unknown fields,
//! keys listed twice and data after the document are rejected, and every problem is reported
//! with its path, one `path: reason` line each (a value of the wrong type, or broken JSON, stops
//! at the first; range checks report every bad value):
//!
//! ```
//! use tollgate::config::Config;
//!
//! let err = Config::from_json(r#"{"tiers": {"free": {"points": -5, "duration": 60}}}"#).unwrap_err();
//! assert_eq!(err.to_string(), "tiers.free.points: must be > 0 (got -5)");
//! let err = Config::from_json(r#"{"tiers": {"free": {"points": 5, "duration": 60}}, "shadw": true}"#).unwrap_err();
//! assert!(err.to_string().starts_with("shadw: unknown field"), "{err}");
//! ```
//!
//! # Layers
//!
//! A request passes up to three layers, checked all-or-nothing in this order (a denial by one
//! takes nothing from the others):
//!
//! | layer | policy | counted per |
//! |---|---|---|
//! | `ip` (`layers.ip`, off when absent) | one policy, for the tiers in `layers.ip.applies_to` ([`IpScope`]: by default those whose rate is at most the ip layer's) | client address (IPv6 by prefix) |
//! | `user` (`layers.user`, on by default) | the request's tier | user id, else a verified API key (hashed), else client address |
//! | `endpoint` (`layers.endpoint`, on by default) | the first matching entry of `endpoints` | the same identity as `user`, per endpoint |
//!
//! # Hot reload
//!
//! [`LiveConfig`] holds the compiled [`Rules`] behind an `ArcSwap`: requests read it without
//! locking. [`LiveConfig::reload`] re-reads the file; a file that does not parse or validate
//! is rejected and the old rules keep serving. A limit whose policy did not change keeps its
//! limiter, and so the state of every key. [`LiveConfig::watch`] polls the file's modification
//! time on a background thread.

mod document;
mod endpoint;
mod error;
mod live;
mod net;
mod report;
mod rules;
mod spec;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::endpoint::Endpoint;
pub use self::error::{ConfigError, Problem};
pub use self::live::{LiveConfig, LiveConfigBuilder, Watcher};
pub(crate) use self::net::mask;
pub use self::net::{Cidr, ClientIp, ForwardedHeader};
pub use self::report::{check, Report};
pub(crate) use self::rules::Limit;
pub use self::rules::Rules;
use self::spec::ConfigSpec;
use crate::Policy;

/// Which rate-limit headers responses carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10; default).
    #[default]
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds from now).
    Legacy,
    /// Both sets.
    Both,
    /// No rate-limit headers (`Retry-After` is still sent with a 429).
    None,
}

/// Which responses carry `RateLimit-Policy` (with the draft's headers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyHeader {
    /// Every limited response (default).
    #[default]
    Always,
    /// Only refusals (429, and what shadow mode would have refused): the policies do not
    /// change from one response to the next, and leaving them out of admitted responses saves
    /// the header's cost on every request. `RateLimit` is still sent on every response.
    Denials,
}

/// The body of a 429.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyStyle {
    /// `{"error": "Rate limit exceeded", "message": "...", "retry_after": 30, "layer": "user"}`
    /// (`application/json`; default).
    #[default]
    Json,
    /// RFC 9457 `application/problem+json` with the draft's `quota-exceeded` type and
    /// `violated-policies`.
    Problem,
}

/// Response settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseConfig {
    /// Rate-limit headers.
    pub headers: HeaderStyle,
    /// Which responses carry `RateLimit-Policy`.
    pub policy_header: PolicyHeader,
    /// The 429 body.
    pub body: BodyStyle,
    /// The status answered when the client address cannot be determined (the server was not
    /// set up to record peer addresses); default 500.
    pub key_error_status: u16,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        ResponseConfig {
            headers: HeaderStyle::default(),
            policy_header: PolicyHeader::default(),
            body: BodyStyle::default(),
            key_error_status: 500,
        }
    }
}

pub use crate::FailurePolicy;

/// Store settings for distributed mode.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Prefix of every store key (default `tollgate`).
    pub key_prefix: String,
    /// How often a node syncs (default 100 ms).
    pub sync_interval: Duration,
    /// The most keys in one store call (default 1000).
    pub batch_size: usize,
    /// `url` is a seed of a Redis Cluster (default false: a single Redis).
    pub cluster: bool,
}

impl RedisSettings {
    /// Applies the sync interval, batch size and key prefix to a node builder.
    pub fn apply(&self, builder: crate::NodeBuilder) -> crate::NodeBuilder {
        let mut b = builder.sync_interval(self.sync_interval).batch_size(self.batch_size);
        if let Ok(enc) = crate::store::KeyEncoder::new(&self.key_prefix) {
            b = b.key_encoder(enc);
        }
        b
    }

    /// Connects to the configured Redis ([`RedisStore`](crate::store::RedisStore)) or Redis
    /// Cluster ([`RedisClusterStore`](crate::store::RedisClusterStore)).
    #[cfg(feature = "redis")]
    pub async fn connect(&self) -> Result<std::sync::Arc<dyn crate::store::Store>, crate::store::StoreError> {
        Ok(if self.cluster {
            std::sync::Arc::new(crate::store::RedisClusterStore::connect([self.url.as_str()]).await?)
        } else {
            std::sync::Arc::new(crate::store::RedisStore::connect(self.url.as_str()).await?)
        })
    }
}

/// Address ranges and user ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lists {
    /// Client address ranges (matched against the client address before grouping).
    pub ips: Vec<Cidr>,
    /// User ids.
    pub users: HashSet<String>,
}

impl Lists {
    /// True when the client address or the user id is listed.
    pub fn matches(&self, ip: Option<IpAddr>, user: Option<&str>) -> bool {
        ip.is_some_and(|ip| self.ips.iter().any(|c| c.contains(ip))) || user.is_some_and(|u| self.users.contains(u))
    }

    fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.users.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IpScope {
    /// Every request (`"all"`).
    All,
    /// Requests counted in the user layer under one of these tiers (a list of tier names;
    /// requests without an identity are in `anonymous_tier`). When the user layer is off,
    /// every request.
    ///
    /// The default: the tiers whose rate (points per second) is at most the ip layer's, so
    /// that a tier sold above the per-address limit (enterprise, 10,000 per minute, behind
    /// one address) is not capped by it, while the anonymous and smaller tiers are.
    Tiers(BTreeSet<String>),
}

/// Which layers apply.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Layers {
    /// Per client address, one policy; `None`: no ip layer.
    pub ip: Option<Policy>,
    /// Which requests the ip layer counts.
    pub ip_applies_to: IpScope,
    /// Per user (or API key, or anonymous client address), the tier's policy.
    pub user: bool,
    /// Per identity and endpoint, the endpoint's policy.
    pub endpoint: bool,
}

impl Default for Layers {
    fn default() -> Self {
        Layers {
            ip: None,
            ip_applies_to: IpScope::All,
            user: true,
            endpoint: true,
        }
    }
}

/// API keys as identities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiKey {
    /// The request header carrying the key (e.g. `x-api-key`).
    pub header: http::HeaderName,
    /// The SipHash key API keys are hashed with before use. Set it (32 hex digits) when
    /// several nodes share limits, so that they all derive the same key; `None`: a random
    /// secret per process.
    pub secret: Option<[u8; 16]>,
}

/// A validated configuration. Read one with [`Config::from_json`] or [`Config::from_file`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The user layer's policy per tier.
    pub tiers: BTreeMap<String, Policy>,
    /// The tier of an identified user whose tier is unknown (default `free` when that tier
    /// exists, else the first tier by name).
    pub default_tier: String,
    /// The tier of requests without a user id or API key (default `anonymous` when that tier
    /// exists, else `default_tier`).
    pub anonymous_tier: String,
    /// Which layers apply.
    pub layers: Layers,
    /// Endpoint policies; the first match applies.
    pub endpoints: Vec<Endpoint>,
    /// How the client address is found and grouped.
    pub client_ip: ClientIp,
    /// API keys as identities.
    pub api_key: Option<ApiKey>,
    /// Requests that skip every limit.
    pub allow: Lists,
    /// Requests answered 403.
    pub deny: Lists,
    /// The block duration of every policy that sets none.
    pub block_duration: Option<Duration>,
    /// Shadow mode: never block; report what would have been blocked.
    pub shadow: bool,
    /// Response headers and body.
    pub response: ResponseConfig,
    /// What distributed mode does when the store is unreachable.
    pub failure_policy: FailurePolicy,
    /// Distributed mode settings (the application builds the node from them).
    pub redis: Option<RedisSettings>,
    /// The most keys each limiter tracks.
    pub max_keys: usize,
}

impl Config {
    /// Parses and validates a JSON document: the full form (an object with `tiers` and the
    /// other fields above), or the flat form, tier names mapped to policies, with the
    /// defaults for everything else:
    ///
    /// ```
    /// use tollgate::config::Config;
    ///
    /// let c = Config::from_json(r#"{"anonymous": {"points": 20, "duration": 60},
    ///                               "free": {"points": 100, "duration": 60}}"#).unwrap();
    /// assert_eq!((c.default_tier.as_str(), c.anonymous_tier.as_str()), ("free", "anonymous"));
    ///
    /// let err = Config::from_json(r#"{"free": {"points": 100}}"#).unwrap_err();
    /// assert_eq!(err.to_string(), "free.duration: missing (the period, in seconds)");
    /// ```
    ///
    /// A UTF-8 byte-order mark before the document is skipped; anything but whitespace after
    /// it is an error.
    pub fn from_json(json: &str) -> Result<Config, ConfigError> {
        ConfigSpec::read(json)?.validate()
    }

    /// Reads, parses and validates a JSON file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one("", format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    /// The original four tiers (`anonymous` 20, `free` 100, `premium` 1000, `enterprise` 10000
    /// per minute) and nothing else.
    ///
    /// ```
    /// let c = tollgate::config::Config::seed();
    /// assert_eq!(c.tiers["premium"].points(), 1000);
    /// assert_eq!((c.default_tier.as_str(), c.anonymous_tier.as_str()), ("free", "anonymous"));
    /// ```
    pub fn seed() -> Config {
        Self::from_json(
            r#"{"tiers": {
                "anonymous": {"points": 20, "duration": 60},
                "free": {"points": 100, "duration": 60},
                "premium": {"points": 1000, "duration": 60},
                "enterprise": {"points": 10000, "duration": 60}
            }}"#,
        )
        .expect("the seed tiers are valid")
    }
}

impl FromStr for Config {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Self::from_json(s)
    }
}
