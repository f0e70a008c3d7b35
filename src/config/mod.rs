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
mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::consts::{DEFAULT_MAX_KEYS, MAX_CAPACITY, MAX_DURATION, MIN_DURATION};
use crate::{Algorithm, Clock, Limiter, Node, Policy};

pub use self::report::{check, Report};

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

/// One invalid value: where it is (a JSON path such as `tiers.free.points` or
/// `endpoints[0].path`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The JSON path of the value (empty for the document itself).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A configuration that was rejected: every problem found, each with its JSON path. A document
/// that is not valid JSON, or has a value of the wrong type, stops at the first such problem;
/// range checks after that report every bad value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<Problem>,
}

impl ConfigError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    /// Every problem found.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

/// One `path: reason` line per problem.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems with their paths.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// A required field that is absent.
    fn required<T>(&mut self, path: &str, field: &str, value: Option<T>, what: &str) -> Option<T> {
        if value.is_none() {
            self.add(join(path, field), format!("missing ({what})"));
        }
        value
    }

    /// A whole number in `1..=MAX_CAPACITY`, echoed as written when it is not.
    fn whole(&mut self, path: String, n: &Number) -> Option<u64> {
        let v = n.as_f64().unwrap_or(f64::NAN);
        let reason = match n.as_u64() {
            Some(0) => "must be > 0 (got 0)".to_owned(),
            Some(u) if u <= MAX_CAPACITY => return Some(u),
            _ if v <= 0.0 => format!("must be > 0 (got {n})"),
            _ if v.fract() != 0.0 => format!("must be a whole number (got {n})"),
            _ => format!("must be <= {MAX_CAPACITY} (got {n})"),
        };
        self.add(path, reason);
        None
    }

    /// A number of seconds in `[MIN_DURATION, MAX_DURATION]`, echoed as written when it is
    /// not.
    fn seconds(&mut self, path: String, n: &Number) -> Option<Duration> {
        let v = n.as_f64().unwrap_or(f64::NAN);
        let reason = if v.is_nan() || v <= 0.0 {
            format!("must be > 0 (got {n})")
        } else if v > MAX_DURATION.as_secs_f64() {
            format!("must be <= {} s (one year; got {n})", MAX_DURATION.as_secs())
        } else if Duration::from_secs_f64(v) < MIN_DURATION {
            format!("must be >= {} s (got {n})", MIN_DURATION.as_secs_f64())
        } else {
            return Some(Duration::from_secs_f64(v));
        };
        self.add(path, reason);
        None
    }

    fn policy(&mut self, path: &str, spec: PolicyInput, default_block: Option<Duration>) -> Option<Policy> {
        if spec.applies_to.is_some() {
            self.add(join(path, "applies_to"), "only the ip layer (layers.ip) has applies_to");
        }
        let points = self.required(path, "points", spec.points, "how many requests per duration");
        let duration = self.required(path, "duration", spec.duration, "the period, in seconds");
        let points = points.and_then(|n| self.whole(join(path, "points"), &n));
        let duration = duration.and_then(|n| self.seconds(join(path, "duration"), &n));
        let burst = spec.burst.map(|n| self.whole(join(path, "burst"), &n));
        let block = spec
            .block_duration
            .map(|n| self.seconds(join(path, "block_duration"), &n));
        let mut p = Policy::new(points?, duration?).algorithm(spec.algorithm);
        if let Some(b) = burst {
            p = p.burst(b?);
        }
        match (block, default_block) {
            (Some(b), _) => p = p.block_duration(b?),
            (None, Some(b)) => p = p.block_duration(b),
            (None, None) => {}
        }
        match p.validate() {
            Ok(()) => Some(p),
            Err(e) => {
                self.add(join(path, e.field), e.reason);
                None
            }
        }
    }
}

/// `path.field`, or `field` at the top.
fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

// ------------------------------------------------------------------------------------------
// The validated configuration
// ------------------------------------------------------------------------------------------

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address). IPv4-mapped IPv6
/// addresses and ranges are treated as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range of `addr` under its first `prefix` bits (the other bits are cleared).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            v4 => (v4, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix must be <= {max} (got {prefix})"));
        }
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// True when `ip` is in the range (IPv4-mapped addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("not an IP address or CIDR range (got {s:?})"))?;
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| format!("not a CIDR prefix length (got {s:?})"))?,
        };
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; other addresses unchanged.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Clears every bit after the first `prefix`.
pub(crate) fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix.min(32) as u32)
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix.min(128) as u32)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// Which header carries the client address when the peer is a trusted proxy. Only the one
/// your proxy sets: a header it passes through untouched would be the client's to forge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (default): the rightmost address that is not a
    /// trusted proxy is the client.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`: the same walk over the
    /// `for=` parameters.
    Forwarded,
    /// `X-Real-IP: client`, one address set by the proxy.
    XRealIp,
}

/// How the client address is found and grouped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientIp {
    /// Peers whose forwarding header is believed. Empty (default): the TCP peer is the client.
    pub trusted_proxies: Vec<Cidr>,
    /// The forwarding header.
    pub header: ForwardedHeader,
    /// IPv6 clients are counted per prefix of this length (default 64: one site).
    pub ipv6_prefix: u8,
    /// IPv4 clients are counted per prefix of this length (default 32: one address).
    pub ipv4_prefix: u8,
}

impl Default for ClientIp {
    fn default() -> Self {
        ClientIp {
            trusted_proxies: Vec::new(),
            header: ForwardedHeader::default(),
            ipv6_prefix: 64,
            ipv4_prefix: 32,
        }
    }
}

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

/// One segment of an endpoint path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`, `{name}` or `:name`: any one segment.
    Any,
    /// `**` (last only): the rest of the path, possibly empty.
    Rest,
}

/// An endpoint policy: a method and a path pattern, limited per client identity.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Endpoint {
    /// `*` or a method name (`POST`).
    pub method: String,
    /// The pattern: `/` separated; a segment `*`, `{name}` or `:name` matches any one segment,
    /// a final `**` the rest of the path. Matched against the raw request path, exactly.
    pub path: String,
    /// The policy.
    pub policy: Policy,
    segments: Vec<Segment>,
}

impl Endpoint {
    /// True when a request with this method and path belongs to the endpoint. A `GET`
    /// endpoint includes `HEAD`: servers (axum's `get`, hyper) answer `HEAD` by running the
    /// `GET` handler.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let same = self.method == method || (self.method == "GET" && method == "HEAD");
        if self.method != "*" && !same {
            return false;
        }
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// `METHOD path`, the endpoint's name in headers and bodies.
    pub fn route(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

fn parse_pattern(path: &str) -> Result<Vec<Segment>, String> {
    if !path.starts_with('/') {
        return Err(format!("must start with '/' (got {path:?})"));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || *c == '"' || *c == '\\') {
        return Err(format!(
            "must be visible ASCII without quotes or backslashes (found {c:?})"
        ));
    }
    let body = &path[1..];
    let raw: Vec<&str> = body.split('/').collect();
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let seg = if *s == "**" {
            if i + 1 != raw.len() {
                return Err("'**' may only be the last segment".into());
            }
            Segment::Rest
        } else if *s == "*"
            || (s.starts_with('{') && s.ends_with('}') && s.len() > 2)
            || (s.starts_with(':') && s.len() > 1)
        {
            Segment::Any
        } else if s.contains('*') || s.contains('{') || s.contains('}') {
            return Err(format!("segment {s:?}: a wildcard must be a whole segment"));
        } else {
            Segment::Literal((*s).to_owned())
        };
        out.push(seg);
    }
    Ok(out)
}

/// Which requests the ip layer counts (`layers.ip.applies_to`).
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

// ------------------------------------------------------------------------------------------
// The file format
// ------------------------------------------------------------------------------------------

/// The top-level fields of the file. A document with none of them is the flat form: tier
/// names mapped to policies, as the seed's `rate-limit-tiers.json` has them.
const FIELDS: &[&str] = &[
    "tiers",
    "default_tier",
    "anonymous_tier",
    "layers",
    "endpoints",
    "client_ip",
    "api_key",
    "allow",
    "deny",
    "block_duration",
    "shadow",
    "response",
    "failure_policy",
    "redis",
    "max_keys",
];

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a JSON object such as {\"tiers\": {\"free\": {\"points\": 100, \"duration\": 60}}}"
)]
struct ConfigSpec {
    /// Read from the flat form: the tiers are the document, and their paths have no prefix.
    #[serde(skip)]
    flat: bool,
    #[serde(default)]
    tiers: Option<BTreeMap<String, PolicyInput>>,
    #[serde(default)]
    default_tier: Option<String>,
    #[serde(default)]
    anonymous_tier: Option<String>,
    #[serde(default)]
    layers: LayersSpec,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    client_ip: ClientIpSpec,
    #[serde(default)]
    api_key: Option<ApiKeySpec>,
    #[serde(default)]
    allow: ListsSpec,
    #[serde(default)]
    deny: ListsSpec,
    #[serde(default)]
    block_duration: Option<Number>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    response: ResponseSpec,
    #[serde(default)]
    failure_policy: FailurePolicy,
    #[serde(default)]
    redis: Option<RedisSpec>,
    #[serde(default)]
    max_keys: Option<u64>,
}

/// A policy as written: numbers kept as written (so that a rejected one is echoed as it is),
/// required fields optional (so that a missing one is reported at its own path).
#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a policy object such as {\"points\": 100, \"duration\": 60}"
)]
struct PolicyInput {
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    points: Option<Number>,
    #[serde(default)]
    duration: Option<Number>,
    #[serde(default)]
    burst: Option<Number>,
    #[serde(default)]
    block_duration: Option<Number>,
    /// The ip layer only.
    #[serde(default)]
    applies_to: Option<Value>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object such as {\"ip\": {\"points\": 1000, \"duration\": 60}, \"user\": true, \"endpoint\": true}"
)]
struct LayersSpec {
    #[serde(default)]
    ip: Option<PolicyInput>,
    #[serde(default = "yes")]
    user: bool,
    #[serde(default = "yes")]
    endpoint: bool,
}

fn yes() -> bool {
    true
}

impl Default for LayersSpec {
    fn default() -> Self {
        LayersSpec {
            ip: None,
            user: true,
            endpoint: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an endpoint object such as {\"method\": \"POST\", \"path\": \"/api/x\", \"policy\": {...}}"
)]
struct EndpointSpec {
    #[serde(default = "any_method")]
    method: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    policy: Option<PolicyInput>,
}

fn any_method() -> String {
    "*".into()
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with trusted_proxies, header, ipv6_prefix and ipv4_prefix"
)]
struct ClientIpSpec {
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    header: ForwardedHeader,
    #[serde(default)]
    ipv6_prefix: Option<u64>,
    #[serde(default)]
    ipv4_prefix: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object such as {\"header\": \"x-api-key\"}")]
struct ApiKeySpec {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "an object with ips and users")]
struct ListsSpec {
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with headers, policy_header, body and key_error_status"
)]
struct ResponseSpec {
    #[serde(default)]
    headers: HeaderStyle,
    #[serde(default)]
    policy_header: PolicyHeader,
    #[serde(default)]
    body: BodyStyle,
    #[serde(default)]
    key_error_status: Option<u64>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object such as {\"url\": \"redis://127.0.0.1:6379\"}"
)]
struct RedisSpec {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    sync_interval: Option<Number>,
    #[serde(default)]
    batch_size: Option<u64>,
    #[serde(default)]
    cluster: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

fn seconds(p: &mut Problems, path: &str, n: &Number, min: f64, max: f64) -> Option<Duration> {
    match n.as_f64() {
        Some(v) if (min..=max).contains(&v) => Some(Duration::from_secs_f64(v)),
        _ => {
            p.add(path, format!("must be a number of seconds in [{min}, {max}] (got {n})"));
            None
        }
    }
}

/// True when `a` admits at most as many requests per second as `b`.
fn rate_at_most(a: &Policy, b: &Policy) -> bool {
    u128::from(a.points()) * b.duration().as_nanos() <= u128::from(b.points()) * a.duration().as_nanos()
}

/// `layers.ip.applies_to`: `"all"` or a list of tier names; absent, the tiers whose rate is at
/// most the ip layer's.
fn ip_scope(
    p: &mut Problems,
    spec: Option<Value>,
    ip: Option<&Policy>,
    tiers: &BTreeMap<String, Policy>,
    named: &BTreeSet<String>,
) -> IpScope {
    const PATH: &str = "layers.ip.applies_to";
    match spec {
        None => match ip {
            Some(ip) => IpScope::Tiers(
                tiers
                    .iter()
                    .filter(|(_, t)| rate_at_most(t, ip))
                    .map(|(n, _)| n.clone())
                    .collect(),
            ),
            None => IpScope::All,
        },
        Some(Value::String(s)) if s == "all" => IpScope::All,
        Some(Value::Array(names)) => {
            let mut out = BTreeSet::new();
            for (i, name) in names.into_iter().enumerate() {
                match name {
                    Value::String(n) if named.contains(&n) || named.is_empty() => {
                        out.insert(n);
                    }
                    Value::String(n) => p.add(format!("{PATH}[{i}]"), format!("no tier named {n:?}")),
                    other => p.add(format!("{PATH}[{i}]"), format!("must be a tier name (got {other})")),
                }
            }
            IpScope::Tiers(out)
        }
        Some(other) => {
            p.add(PATH, format!("must be \"all\" or a list of tier names (got {other})"));
            IpScope::All
        }
    }
}

impl ConfigSpec {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut p = Problems::default();

        let block_duration = self.block_duration.and_then(|b| {
            seconds(
                &mut p,
                "block_duration",
                &b,
                MIN_DURATION.as_secs_f64(),
                MAX_DURATION.as_secs_f64(),
            )
        });

        let tiers_path = if self.flat { "" } else { "tiers" };
        let tiers_missing = self.tiers.is_none();
        let tier_specs = p
            .required("", "tiers", self.tiers, "a map of tier names to policies")
            .unwrap_or_default();
        if tier_specs.is_empty() && !tiers_missing {
            p.add("tiers", "must name at least one tier");
        }
        // Every tier the file names, valid or not: a reference to an invalid one is not a
        // second problem.
        let named: BTreeSet<String> = tier_specs.keys().cloned().collect();
        let mut tiers = BTreeMap::new();
        for (name, spec) in tier_specs {
            let path = join(tiers_path, &name);
            if !valid_name(&name) {
                p.add(&path, "a tier name is 1 to 64 of A-Z a-z 0-9 _ - .");
            }
            if let Some(policy) = p.policy(&path, spec, block_duration) {
                tiers.insert(name, policy);
            }
        }
        let tier_names = |p: &mut Problems, field: &str, name: &str, known: &BTreeSet<String>| {
            if !known.is_empty() && !known.contains(name) {
                p.add(field, format!("no tier named {name:?}"));
            }
        };
        let default_tier = match self.default_tier {
            Some(t) => {
                tier_names(&mut p, "default_tier", &t, &named);
                t
            }
            None if tiers.contains_key("free") => "free".into(),
            None => tiers.keys().next().cloned().unwrap_or_default(),
        };
        let anonymous_tier = match self.anonymous_tier {
            Some(t) => {
                tier_names(&mut p, "anonymous_tier", &t, &named);
                t
            }
            None if tiers.contains_key("anonymous") => "anonymous".into(),
            None => default_tier.clone(),
        };

        let (ip, applies_to) = match self.layers.ip {
            Some(mut s) => {
                let applies_to = s.applies_to.take();
                (p.policy("layers.ip", s, block_duration), applies_to)
            }
            None => (None, None),
        };
        let layers = Layers {
            ip_applies_to: ip_scope(&mut p, applies_to, ip.as_ref(), &tiers, &named),
            ip,
            user: self.layers.user,
            endpoint: self.layers.endpoint,
        };

        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, e) in self.endpoints.into_iter().enumerate() {
            let base = format!("endpoints[{i}]");
            let method_ok = e.method == "*"
                || (!e.method.is_empty() && e.method.len() <= 32 && e.method.bytes().all(|b| b.is_ascii_uppercase()));
            if !method_ok {
                p.add(
                    format!("{base}.method"),
                    format!("must be \"*\" or an upper-case method name (got {:?})", e.method),
                );
            }
            let path = p.required(&base, "path", e.path, "the request path, such as \"/api/x\"");
            let segments = path.as_deref().and_then(|path| match parse_pattern(path) {
                Ok(s) => Some(s),
                Err(m) => {
                    p.add(format!("{base}.path"), m);
                    None
                }
            });
            let policy = p
                .required(&base, "policy", e.policy, "the endpoint's policy")
                .and_then(|spec| p.policy(&format!("{base}.policy"), spec, block_duration));
            if let (true, Some(path), Some(segments), Some(policy)) = (method_ok, path, segments, policy) {
                let ep = Endpoint {
                    method: e.method,
                    path,
                    policy,
                    segments,
                };
                if endpoints
                    .iter()
                    .any(|o: &Endpoint| o.method == ep.method && o.path == ep.path)
                {
                    p.add(format!("{base}.path"), format!("{} is listed twice", ep.route()));
                }
                endpoints.push(ep);
            }
        }

        let mut client_ip = ClientIp {
            header: self.client_ip.header,
            ..ClientIp::default()
        };
        for (i, s) in self.client_ip.trusted_proxies.iter().enumerate() {
            match s.parse::<Cidr>() {
                Ok(c) => client_ip.trusted_proxies.push(c),
                Err(m) => p.add(format!("client_ip.trusted_proxies[{i}]"), m),
            }
        }
        if let Some(v6) = self.client_ip.ipv6_prefix {
            if !(1..=128).contains(&v6) {
                p.add("client_ip.ipv6_prefix", format!("must be in 1..=128 (got {v6})"));
            } else {
                client_ip.ipv6_prefix = v6 as u8;
            }
        }
        if let Some(v4) = self.client_ip.ipv4_prefix {
            if !(1..=32).contains(&v4) {
                p.add("client_ip.ipv4_prefix", format!("must be in 1..=32 (got {v4})"));
            } else {
                client_ip.ipv4_prefix = v4 as u8;
            }
        }

        let api_key = self.api_key.and_then(|a| {
            let header = p
                .required("api_key", "header", a.header, "the request header carrying the key")
                .and_then(|h| match http::HeaderName::from_bytes(h.as_bytes()) {
                    Ok(h) => Some(h),
                    Err(_) => {
                        p.add("api_key.header", format!("not a header name (got {h:?})"));
                        None
                    }
                });
            let secret = match a.secret {
                None => Some(None),
                Some(hex) => match parse_secret(&hex) {
                    Some(s) => Some(Some(s)),
                    None => {
                        p.add("api_key.secret", "must be 32 hex digits");
                        None
                    }
                },
            };
            Some(ApiKey {
                header: header?,
                secret: secret?,
            })
        });

        let mut lists = |spec: ListsSpec, name: &str| {
            let mut out = Lists::default();
            for (i, s) in spec.ips.iter().enumerate() {
                match s.parse::<Cidr>() {
                    Ok(c) => out.ips.push(c),
                    Err(m) => p.add(format!("{name}.ips[{i}]"), m),
                }
            }
            for (i, u) in spec.users.into_iter().enumerate() {
                if u.is_empty() {
                    p.add(format!("{name}.users[{i}]"), "must not be empty");
                }
                out.users.insert(u);
            }
            out
        };
        let allow = lists(self.allow, "allow");
        let deny = lists(self.deny, "deny");

        let mut response = ResponseConfig {
            headers: self.response.headers,
            policy_header: self.response.policy_header,
            body: self.response.body,
            ..ResponseConfig::default()
        };
        if let Some(s) = self.response.key_error_status {
            if !(400..=599).contains(&s) {
                p.add(
                    "response.key_error_status",
                    format!("must be an error status in 400..=599 (got {s})"),
                );
            } else {
                response.key_error_status = s as u16;
            }
        }

        let redis = self.redis.and_then(|r| {
            let url = p.required("redis", "url", r.url, "a redis:// or rediss:// URL")?;
            let mut ok = true;
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) || url.len() <= "redis://".len() {
                p.add(
                    "redis.url",
                    format!("must be a redis:// or rediss:// URL (got {url:?})"),
                );
                ok = false;
            }
            let key_prefix = r.key_prefix.unwrap_or_else(|| "tollgate".into());
            if let Err(e) = crate::store::KeyEncoder::new(&key_prefix) {
                p.add("redis.key_prefix", e.to_string());
                ok = false;
            }
            let sync_interval = match r.sync_interval {
                None => Duration::from_millis(100),
                Some(s) => match seconds(&mut p, "redis.sync_interval", &s, 0.001, 60.0) {
                    Some(d) => d,
                    None => {
                        ok = false;
                        Duration::ZERO
                    }
                },
            };
            let batch_size = r.batch_size.unwrap_or(1000);
            if !(1..=100_000).contains(&batch_size) {
                p.add("redis.batch_size", format!("must be in 1..=100000 (got {batch_size})"));
                ok = false;
            }
            ok.then_some(RedisSettings {
                url,
                key_prefix,
                sync_interval,
                batch_size: batch_size as usize,
                cluster: r.cluster,
            })
        });

        let max_keys = match self.max_keys {
            None => DEFAULT_MAX_KEYS,
            Some(0) => {
                p.add("max_keys", "must be > 0");
                1
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };

        if !p.0.is_empty() {
            return Err(ConfigError { problems: p.0 });
        }
        Ok(Config {
            tiers,
            default_tier,
            anonymous_tier,
            layers,
            endpoints,
            client_ip,
            api_key,
            allow,
            deny,
            block_duration,
            shadow: self.shadow,
            response,
            failure_policy: self.failure_policy,
            redis,
            max_keys,
        })
    }
}

fn parse_secret(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
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
        let doc = document::parse(json).map_err(|p| ConfigError { problems: vec![p] })?;
        let spec = match doc {
            Value::Object(map) if map.is_empty() || map.keys().any(|k| FIELDS.contains(&k.as_str())) => {
                typed::<ConfigSpec>(Value::Object(map))?
            }
            flat @ Value::Object(_) => ConfigSpec {
                flat: true,
                tiers: Some(typed(flat)?),
                ..ConfigSpec::default()
            },
            other => {
                let got = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                return Err(ConfigError::one(
                    "",
                    format!(
                        "the document must be a JSON object, {{\"tiers\": {{...}}, ...}} or tier names \
                         mapped to policies (got {got})"
                    ),
                ));
            }
        };
        spec.validate()
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

/// A document's fields, with the path of the first value of the wrong type or an unknown
/// field.
fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigError::one(path, e.into_inner().to_string())
    })
}

impl FromStr for Config {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Self::from_json(s)
    }
}

// ------------------------------------------------------------------------------------------
// Compiled rules
// ------------------------------------------------------------------------------------------

/// A limiter with its header description.
#[derive(Clone, Debug)]
pub(crate) struct Limit {
    pub(crate) limiter: Limiter,
    /// The layer (`ip`, `user`, `endpoint`).
    pub(crate) layer: &'static str,
    /// `"name";q=..;w=..`, an item of `RateLimit-Policy`.
    pub(crate) policy_item: String,
    /// `"name"` (a structured-field string), when it is valid in a header value: the start
    /// of the `RateLimit` value.
    pub(crate) quoted_name: Option<Box<[u8]>>,
    /// User layer: 1 + the tier's position in [`Rules`]' `RateLimit-Policy` table; 0 otherwise.
    pub(crate) slot: usize,
    /// User layer: the ip layer counts this tier's requests (`layers.ip.applies_to`).
    pub(crate) with_ip: bool,
}

impl Limit {
    pub(crate) fn name(&self) -> &'static str {
        self.limiter.name()
    }
}

/// A [`Config`] with its limiters built: what a request is checked against. Obtained from a
/// [`LiveConfig`].
///
/// Limiter names (and so the names in `RateLimit-Policy`, in 429 bodies, and in the store in
/// distributed mode) are `ip`, `user:<tier>` and `endpoint:<METHOD> <path>`.
#[derive(Debug)]
pub struct Rules {
    config: Config,
    pub(crate) ip: Option<Limit>,
    pub(crate) tiers: HashMap<String, Limit, ahash::RandomState>,
    /// The user layer for a request without a known tier: anonymous, then identified.
    fallback: [Option<Limit>; 2],
    pub(crate) endpoints: Vec<Limit>,
    pub(crate) api_key_secret: [u8; 16],
    pub(crate) distributed: bool,
    /// `RateLimit-Policy` at [`policy_index`].
    policy_values: Vec<Option<http::HeaderValue>>,
}

/// Where the `RateLimit-Policy` value of a request is: by tier slot, endpoint (index + 1, or 0)
/// and whether the ip layer counted it.
fn policy_index(stride: usize, with_ip: bool, tier: Option<&Limit>, endpoint: usize) -> usize {
    (tier.map_or(0, |l| l.slot) * stride + endpoint) * 2 + usize::from(with_ip)
}

/// How limiters are built: the clock and, for distributed mode, the node.
#[derive(Clone, Default)]
struct BuildSettings {
    clock: Option<Clock>,
    node: Option<Node>,
}

fn sf_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    crate::http::headers::push_sf_string(&mut out, s);
    // Escaping ASCII bytes in a `&str` keeps it UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

fn policy_item(name: &str, p: &Policy) -> String {
    let secs = p.duration().as_secs_f64().ceil().max(1.0) as u64;
    format!("{};q={};w={}", sf_string(name), p.points(), secs)
}

impl Rules {
    fn build(config: Config, settings: &BuildSettings, old: Option<&Rules>) -> Result<Rules, ConfigError> {
        let max_keys = config.max_keys;
        let mut problems = Problems::default();
        let mut make = |path: &str, layer: &'static str, name: String, policy: &Policy| -> Option<Limit> {
            if let Some(prev) = old.and_then(|o| o.find(&name)) {
                if prev.limiter.policy() == policy && old.is_some_and(|o| o.config.max_keys == max_keys) {
                    return Some(prev.clone());
                }
            }
            let mut b = Limiter::builder(policy.clone()).name(name.clone()).max_keys(max_keys);
            #[cfg(feature = "metrics")]
            {
                let tier = if layer == "user" {
                    name.strip_prefix("user:").unwrap_or("")
                } else {
                    ""
                };
                b = b.metric_labels(layer, tier);
            }
            if let Some(c) = &settings.clock {
                b = b.clock(c.clone());
            }
            if let Some(n) = &settings.node {
                b = b.node(n);
            }
            match b.build() {
                Ok(limiter) => Some(Limit {
                    policy_item: policy_item(&name, policy),
                    quoted_name: crate::http::headers::quoted_name(&name),
                    limiter,
                    layer,
                    slot: 0,
                    with_ip: true,
                }),
                Err(crate::BuildError::Distributed(e)) => {
                    problems.add(format!("{path}.{}", e.field), e.reason);
                    None
                }
                Err(e) => {
                    problems.add(path, e.to_string());
                    None
                }
            }
        };
        let ip = match &config.layers.ip {
            Some(p) => make("layers.ip", "ip", "ip".into(), p),
            None => None,
        };
        let mut tiers = HashMap::with_hasher(ahash::RandomState::new());
        if config.layers.user {
            for (name, p) in &config.tiers {
                if let Some(mut l) = make(&format!("tiers.{name}"), "user", format!("user:{name}"), p) {
                    l.slot = tiers.len() + 1;
                    l.with_ip = match &config.layers.ip_applies_to {
                        IpScope::All => true,
                        IpScope::Tiers(names) => names.contains(name),
                    };
                    tiers.insert(name.clone(), l);
                }
            }
        }
        let mut endpoints = Vec::new();
        if config.layers.endpoint {
            for (i, e) in config.endpoints.iter().enumerate() {
                let path = format!("endpoints[{i}].policy");
                if let Some(l) = make(&path, "endpoint", format!("endpoint:{}", e.route()), &e.policy) {
                    endpoints.push(l);
                }
            }
        }
        let distributed = settings.node.is_some();
        // A reload without a secret keeps the one in use (every node keeps hashing alike).
        if distributed && old.is_none() {
            if let Some(a) = &config.api_key {
                if a.secret.is_none() {
                    problems.add(
                        "api_key.secret",
                        "required in distributed mode: 32 hex digits, the same on every instance (every node must hash API keys alike), e.g. \"api_key\": {\"secret\": \"<output of openssl rand -hex 16>\"}",
                    );
                }
            }
        }
        if !problems.0.is_empty() {
            return Err(ConfigError { problems: problems.0 });
        }
        let api_key_secret = match config.api_key.as_ref().and_then(|a| a.secret) {
            Some(s) => s,
            None => old.map(|o| o.api_key_secret).unwrap_or_else(random_secret),
        };
        let stride = endpoints.len() + 1;
        let mut policy_values = vec![None; (tiers.len() + 1) * stride * 2];
        let tier_options = std::iter::once(None).chain(tiers.values().map(Some));
        for tier in tier_options {
            for e in 0..stride {
                for with_ip in [false, true] {
                    let items: Vec<&str> = ip
                        .iter()
                        .filter(|_| with_ip)
                        .chain(tier)
                        .chain(e.checked_sub(1).map(|i| &endpoints[i]))
                        .map(|l| l.policy_item.as_str())
                        .collect();
                    policy_values[policy_index(stride, with_ip, tier, e)] =
                        http::HeaderValue::from_str(&items.join(", ")).ok();
                }
            }
        }
        let fallback = [&config.anonymous_tier, &config.default_tier].map(|t| tiers.get(t.as_str()).cloned());
        Ok(Rules {
            config,
            ip,
            tiers,
            fallback,
            endpoints,
            api_key_secret,
            distributed,
            policy_values,
        })
    }

    /// The `RateLimit-Policy` value of a request checked against the ip layer (when
    /// `with_ip`), the user layer limit `tier` (of these rules) and the endpoint `endpoint`.
    pub(crate) fn policy_value(
        &self,
        with_ip: bool,
        tier: Option<&Limit>,
        endpoint: Option<usize>,
    ) -> Option<&http::HeaderValue> {
        let stride = self.endpoints.len() + 1;
        let i = policy_index(
            stride,
            with_ip && self.ip.is_some(),
            tier,
            endpoint.map_or(0, |i| i + 1),
        );
        self.policy_values.get(i)?.as_ref()
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

fn random_secret() -> [u8; 16] {
    let s = ahash::RandomState::new();
    let a = s.hash_one(1u8);
    let b = s.hash_one(2u8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

// ------------------------------------------------------------------------------------------
// Live configuration and reload
// ------------------------------------------------------------------------------------------

struct LiveInner {
    current: ArcSwap<Rules>,
    path: Option<PathBuf>,
    settings: BuildSettings,
    reload: Mutex<()>,
    generation: AtomicU64,
    last_error: Mutex<Option<ConfigError>>,
}

/// The rules in force, swappable at run time. Cheap to clone (an `Arc`); every clone sees the
/// same rules.
///
/// ```
/// use tollgate::config::{Config, LiveConfig};
///
/// let live = LiveConfig::new(Config::seed()).unwrap();
/// let before = live.rules().tier_limiter("free").unwrap().clone();
/// assert!(before.check("u:alice").is_allowed());
///
/// // A new premium limit: `free` did not change, so its limiter (and alice's state) is kept.
/// live.replace_json(r#"{"tiers": {"free": {"points": 100, "duration": 60},
///                                 "premium": {"points": 5000, "duration": 60}}}"#).unwrap();
/// let after = live.rules().tier_limiter("free").unwrap().clone();
/// assert_eq!(after.peek("u:alice", 1).unwrap().remaining(), 98);
///
/// // A bad document is rejected; the rules in force stay.
/// let err = live.replace_json(r#"{"tiers": {"free": {"points": 0, "duration": 60}}}"#).unwrap_err();
/// assert_eq!(err.to_string(), "tiers.free.points: must be > 0 (got 0)");
/// assert_eq!(live.rules().config().tiers["premium"].points(), 5000);
/// ```
#[derive(Clone)]
pub struct LiveConfig {
    inner: Arc<LiveInner>,
}

impl fmt::Debug for LiveConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveConfig")
            .field("path", &self.inner.path)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// Builds a [`LiveConfig`].
#[derive(Default)]
pub struct LiveConfigBuilder {
    config: Option<Config>,
    path: Option<PathBuf>,
    settings: BuildSettings,
}

impl LiveConfigBuilder {
    /// The configuration to start from (otherwise the file is read).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The file that [`LiveConfig::reload`] and [`LiveConfig::watch`] read.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The clock of every limiter (default [`Clock::cached`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.settings.clock = Some(clock);
        self
    }

    /// Distributed mode: every limiter shares its limit through this node.
    pub fn node(mut self, node: &Node) -> Self {
        self.settings.node = Some(node.clone());
        self
    }

    /// Reads the file when no configuration was given, and builds the limiters.
    pub fn build(self) -> Result<LiveConfig, ConfigError> {
        let config = match (self.config, &self.path) {
            (Some(c), _) => c,
            (None, Some(p)) => Config::from_file(p)?,
            (None, None) => return Err(ConfigError::one("", "no configuration and no file given")),
        };
        let rules = Rules::build(config, &self.settings, None)?;
        Ok(LiveConfig {
            inner: Arc::new(LiveInner {
                current: ArcSwap::from_pointee(rules),
                path: self.path,
                settings: self.settings,
                reload: Mutex::new(()),
                generation: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        })
    }
}

impl LiveConfig {
    /// Starts building.
    pub fn builder() -> LiveConfigBuilder {
        LiveConfigBuilder::default()
    }

    /// Local mode rules from a configuration, no file.
    pub fn new(config: Config) -> Result<LiveConfig, ConfigError> {
        Self::builder().config(config).build()
    }

    /// Local mode rules from a file, which [`reload`](Self::reload) re-reads.
    pub fn open(path: impl Into<PathBuf>) -> Result<LiveConfig, ConfigError> {
        Self::builder().file(path).build()
    }

    /// The rules in force (a snapshot: a reload does not change it).
    pub fn rules(&self) -> Arc<Rules> {
        self.inner.current.load_full()
    }

    /// The rules in force, without touching a reference count (for the request path).
    #[inline]
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.inner.current.load()
    }

    /// How many times new rules were installed.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The last rejected reload, if any reload failed since the last success.
    pub fn last_error(&self) -> Option<ConfigError> {
        self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a new configuration. Limiters whose name and policy did not change are kept
    /// (with their keys' state); the others start fresh. On error nothing changes.
    pub fn replace(&self, config: Config) -> Result<(), ConfigError> {
        let _guard = self.inner.reload.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.inner.current.load_full();
        let result = Rules::build(config, &self.inner.settings, Some(&old)).map(|rules| {
            self.inner.current.store(Arc::new(rules));
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
        });
        *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = result.as_ref().err().cloned();
        result
    }

    /// [`replace`](Self::replace) with a JSON document.
    pub fn replace_json(&self, json: &str) -> Result<(), ConfigError> {
        match Config::from_json(json) {
            Ok(c) => self.replace(c),
            Err(e) => {
                *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Re-reads the file given at build time. A file that cannot be read, parsed or validated
    /// is rejected and the rules in force keep serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.inner.path else {
            return Err(ConfigError::one(
                "",
                "no file to reload: build with LiveConfigBuilder::file",
            ));
        };
        let result = match std::fs::read_to_string(path) {
            Ok(text) => self.replace_json(&text),
            Err(e) => {
                let e = ConfigError::one("", format!("cannot read {}: {e}", path.display()));
                *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Err(e)
            }
        };
        // One line per reload: the file is re-read only when it changed.
        match &result {
            Ok(()) => tracing::info!(file = %path.display(), "tollgate: rate limit configuration reloaded"),
            Err(e) => tracing::warn!(
                file = %path.display(),
                error = %e,
                "tollgate: rate limit configuration rejected; the rules in force keep serving"
            ),
        }
        result
    }

    /// Polls the file every `interval` on a background thread and reloads it when its
    /// modification time or length changes. Failed reloads keep the rules in force (see
    /// [`last_error`](Self::last_error)). The thread stops when the returned [`Watcher`] is
    /// dropped, or when every clone of this `LiveConfig` is.
    pub fn watch(&self, interval: Duration) -> Result<Watcher, ConfigError> {
        let Some(path) = self.inner.path.clone() else {
            return Err(ConfigError::one(
                "",
                "no file to watch: build with LiveConfigBuilder::file",
            ));
        };
        let weak: Weak<LiveInner> = Arc::downgrade(&self.inner);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        let mut last = stamp(&path);
        let thread = std::thread::Builder::new()
            .name("tollgate-config".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    let Some(inner) = weak.upgrade() else { return };
                    let now = stamp(&path);
                    if now.is_some() && now != last {
                        last = now;
                        let _ = LiveConfig { inner }.reload();
                    }
                }
            })
            .map_err(|e| ConfigError::one("", format!("cannot start the watcher thread: {e}")))?;
        Ok(Watcher {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Stops the file watcher of [`LiveConfig::watch`] when dropped.
#[derive(Debug)]
pub struct Watcher {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let m: Cidr = "::ffff:192.168.0.0/112".parse().unwrap();
        assert_eq!(m.to_string(), "192.168.0.0/16");
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()) && !one.contains("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn patterns_match() {
        let c = Config::from_json(
            r#"{"tiers": {"free": {"points": 1, "duration": 1}}, "endpoints": [
                {"method": "POST", "path": "/api/ai/generate", "policy": {"points": 1, "duration": 1}},
                {"path": "/items/{id}/edit", "policy": {"points": 1, "duration": 1}},
                {"method": "GET", "path": "/files/**", "policy": {"points": 1, "duration": 1}}
            ]}"#,
        )
        .unwrap();
        let e = &c.endpoints;
        assert!(e[0].matches("POST", "/api/ai/generate"));
        assert!(!e[0].matches("GET", "/api/ai/generate"));
        assert!(!e[0].matches("HEAD", "/api/ai/generate"));
        assert!(e[2].matches("HEAD", "/files/a"), "a GET endpoint includes HEAD");
        assert!(!e[0].matches("POST", "/api/ai/generate/"));
        assert!(!e[0].matches("POST", "/api/ai"));
        assert!(e[1].matches("PUT", "/items/42/edit"));
        assert!(!e[1].matches("PUT", "/items/42"));
        assert!(e[2].matches("GET", "/files/a/b/c"));
        assert!(e[2].matches("GET", "/files/"));
        assert!(!e[2].matches("GET", "/filesx"));
    }

    #[test]
    fn the_shipped_file_is_valid() {
        let c = Config::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/rate-limit-tiers.json")).unwrap();
        for (tier, points) in [
            ("anonymous", 20),
            ("free", 100),
            ("premium", 1000),
            ("enterprise", 10000),
        ] {
            assert_eq!(c.tiers[tier], Policy::per_minute(points), "{tier}");
        }
        assert!(c.endpoints[0].matches("POST", "/api/ai/generate"));
        assert_eq!(c.endpoints[0].policy, Policy::per_hour(10));
    }
}
