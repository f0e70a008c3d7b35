//! The checks of every section of the file, each problem reported at its JSON path, and the
//! [`Config`] they produce.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Number, Value};

use super::endpoint::parse_pattern;
use super::error::{join, Problems};
use super::spec::{
    ApiKeySpec, ClientIpSpec, ConfigSpec, EndpointSpec, LayersSpec, ListsSpec, PolicyInput, RedisSpec, ResponseSpec,
};
use super::{
    ApiKey, Cidr, ClientIp, Config, ConfigError, Endpoint, IpScope, Layers, Lists, RedisSettings, ResponseConfig,
};
use crate::consts::{DEFAULT_MAX_KEYS, MAX_CAPACITY, MAX_DURATION, MIN_DURATION};
use crate::Policy;

impl Problems {
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

/// The tiers and the two fallback tier names.
struct Tiers {
    policies: BTreeMap<String, Policy>,
    /// Every tier the file names, valid or not: a reference to an invalid one is not a second
    /// problem.
    named: BTreeSet<String>,
    default_tier: String,
    anonymous_tier: String,
}

/// `tiers` (the whole document in the flat form), `default_tier` and `anonymous_tier`.
fn tiers(p: &mut Problems, spec: &mut ConfigSpec, block_duration: Option<Duration>) -> Tiers {
    let tiers_path = if spec.flat { "" } else { "tiers" };
    let tiers_missing = spec.tiers.is_none();
    let tier_specs = p
        .required("", "tiers", spec.tiers.take(), "a map of tier names to policies")
        .unwrap_or_default();
    if tier_specs.is_empty() && !tiers_missing {
        p.add("tiers", "must name at least one tier");
    }
    let named: BTreeSet<String> = tier_specs.keys().cloned().collect();
    let mut policies = BTreeMap::new();
    for (name, spec) in tier_specs {
        let path = join(tiers_path, &name);
        if !valid_name(&name) {
            p.add(&path, "a tier name is 1 to 64 of A-Z a-z 0-9 _ - .");
        }
        if let Some(policy) = p.policy(&path, spec, block_duration) {
            policies.insert(name, policy);
        }
    }
    let mut known = |field: &str, name: String| {
        if !named.is_empty() && !named.contains(&name) {
            p.add(field, format!("no tier named {name:?}"));
        }
        name
    };
    let default_tier = match spec.default_tier.take() {
        Some(t) => known("default_tier", t),
        None if policies.contains_key("free") => "free".into(),
        None => policies.keys().next().cloned().unwrap_or_default(),
    };
    let anonymous_tier = match spec.anonymous_tier.take() {
        Some(t) => known("anonymous_tier", t),
        None if policies.contains_key("anonymous") => "anonymous".into(),
        None => default_tier.clone(),
    };
    Tiers {
        policies,
        named,
        default_tier,
        anonymous_tier,
    }
}

/// `layers`: the ip layer's policy and scope, and which other layers are on.
fn layers(p: &mut Problems, spec: LayersSpec, block_duration: Option<Duration>, tiers: &Tiers) -> Layers {
    let (ip, applies_to) = match spec.ip {
        Some(mut s) => {
            let applies_to = s.applies_to.take();
            (p.policy("layers.ip", s, block_duration), applies_to)
        }
        None => (None, None),
    };
    Layers {
        ip_applies_to: ip_scope(p, applies_to, ip.as_ref(), &tiers.policies, &tiers.named),
        ip,
        user: spec.user,
        endpoint: spec.endpoint,
    }
}

/// `endpoints`: each valid one, in order.
fn endpoints(p: &mut Problems, specs: Vec<EndpointSpec>, block_duration: Option<Duration>) -> Vec<Endpoint> {
    let mut endpoints = Vec::with_capacity(specs.len());
    for (i, e) in specs.into_iter().enumerate() {
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
    endpoints
}

/// `client_ip`: the trusted proxies, the header and the grouping prefixes.
fn client_ip(p: &mut Problems, spec: ClientIpSpec) -> ClientIp {
    let mut client_ip = ClientIp {
        header: spec.header,
        ..ClientIp::default()
    };
    for (i, s) in spec.trusted_proxies.iter().enumerate() {
        match s.parse::<Cidr>() {
            Ok(c) => client_ip.trusted_proxies.push(c),
            Err(m) => p.add(format!("client_ip.trusted_proxies[{i}]"), m),
        }
    }
    if let Some(v6) = spec.ipv6_prefix {
        if !(1..=128).contains(&v6) {
            p.add("client_ip.ipv6_prefix", format!("must be in 1..=128 (got {v6})"));
        } else {
            client_ip.ipv6_prefix = v6 as u8;
        }
    }
    if let Some(v4) = spec.ipv4_prefix {
        if !(1..=32).contains(&v4) {
            p.add("client_ip.ipv4_prefix", format!("must be in 1..=32 (got {v4})"));
        } else {
            client_ip.ipv4_prefix = v4 as u8;
        }
    }
    client_ip
}

/// `api_key`: the header and the secret.
fn api_key(p: &mut Problems, spec: ApiKeySpec) -> Option<ApiKey> {
    let header = p
        .required("api_key", "header", spec.header, "the request header carrying the key")
        .and_then(|h| match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                p.add("api_key.header", format!("not a header name (got {h:?})"));
                None
            }
        });
    let secret = match spec.secret {
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

/// `allow` or `deny` (`name`): address ranges and user ids.
fn lists(p: &mut Problems, spec: ListsSpec, name: &str) -> Lists {
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
}

/// `response`: the headers, the body and the key error status.
fn response(p: &mut Problems, spec: ResponseSpec) -> ResponseConfig {
    let mut response = ResponseConfig {
        headers: spec.headers,
        policy_header: spec.policy_header,
        body: spec.body,
        ..ResponseConfig::default()
    };
    if let Some(s) = spec.key_error_status {
        if !(400..=599).contains(&s) {
            p.add(
                "response.key_error_status",
                format!("must be an error status in 400..=599 (got {s})"),
            );
        } else {
            response.key_error_status = s as u16;
        }
    }
    response
}

/// `redis`: the URL, key prefix, sync interval and batch size.
fn redis(p: &mut Problems, spec: RedisSpec) -> Option<RedisSettings> {
    let url = p.required("redis", "url", spec.url, "a redis:// or rediss:// URL")?;
    let mut ok = true;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) || url.len() <= "redis://".len() {
        p.add(
            "redis.url",
            format!("must be a redis:// or rediss:// URL (got {url:?})"),
        );
        ok = false;
    }
    let key_prefix = spec.key_prefix.unwrap_or_else(|| "tollgate".into());
    if let Err(e) = crate::store::KeyEncoder::new(&key_prefix) {
        p.add("redis.key_prefix", e.to_string());
        ok = false;
    }
    let sync_interval = match spec.sync_interval {
        None => Duration::from_millis(100),
        Some(s) => match seconds(p, "redis.sync_interval", &s, 0.001, 60.0) {
            Some(d) => d,
            None => {
                ok = false;
                Duration::ZERO
            }
        },
    };
    let batch_size = spec.batch_size.unwrap_or(1000);
    if !(1..=100_000).contains(&batch_size) {
        p.add("redis.batch_size", format!("must be in 1..=100000 (got {batch_size})"));
        ok = false;
    }
    ok.then_some(RedisSettings {
        url,
        key_prefix,
        sync_interval,
        batch_size: batch_size as usize,
        cluster: spec.cluster,
    })
}

/// `max_keys`.
fn max_keys(p: &mut Problems, spec: Option<u64>) -> usize {
    match spec {
        None => DEFAULT_MAX_KEYS,
        Some(0) => {
            p.add("max_keys", "must be > 0");
            1
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    }
}

impl ConfigSpec {
    /// The configuration, or every problem found, section by section in the file's order.
    pub(super) fn validate(mut self) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let block_duration = self.block_duration.take().and_then(|b| {
            seconds(
                &mut p,
                "block_duration",
                &b,
                MIN_DURATION.as_secs_f64(),
                MAX_DURATION.as_secs_f64(),
            )
        });
        let tiers = tiers(&mut p, &mut self, block_duration);
        let layers = layers(&mut p, self.layers, block_duration, &tiers);
        let endpoints = endpoints(&mut p, self.endpoints, block_duration);
        let client_ip = client_ip(&mut p, self.client_ip);
        let api_key = self.api_key.and_then(|a| api_key(&mut p, a));
        let allow = lists(&mut p, self.allow, "allow");
        let deny = lists(&mut p, self.deny, "deny");
        let response = response(&mut p, self.response);
        let redis = self.redis.and_then(|r| redis(&mut p, r));
        let max_keys = max_keys(&mut p, self.max_keys);
        p.or_error(Config {
            tiers: tiers.policies,
            default_tier: tiers.default_tier,
            anonymous_tier: tiers.anonymous_tier,
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
