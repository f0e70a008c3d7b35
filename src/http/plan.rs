//! Per request, before any limit: the client, its identity and tier, the lists, and the plan
//! of limits to check.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use ::http::request::Parts;
use ::http::{Extensions, HeaderMap, Method, Request, Response, StatusCode};
use bytes::Bytes;

use super::grpc::{self, Refused};
use super::headers;
use super::key::{self, Keys};
use super::shared::{bump, Shared};
use super::{PeerAddr, ShadowVerdict, Tier, UserId, Verified};
use crate::config::{Config, Limit, Rules};
use crate::consts::MAX_LOGGED_UNKNOWN_TIERS;
use crate::layers::Bound;

/// What the layer reads from a request: the request itself, or its parts when a resolver
/// (which takes [`Parts`]) is set.
pub(super) trait Head {
    fn extensions(&self) -> &Extensions;
    fn headers(&self) -> &HeaderMap;
    fn method(&self) -> &Method;
    fn path(&self) -> &str;
    /// The parts, for the resolvers.
    fn parts(&self) -> Option<&Parts>;
}

impl<B> Head for Request<B> {
    fn extensions(&self) -> &Extensions {
        self.extensions()
    }
    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
    fn method(&self) -> &Method {
        self.method()
    }
    fn path(&self) -> &str {
        self.uri().path()
    }
    fn parts(&self) -> Option<&Parts> {
        None
    }
}

impl Head for Parts {
    fn extensions(&self) -> &Extensions {
        &self.extensions
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
    fn method(&self) -> &Method {
        &self.method
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn parts(&self) -> Option<&Parts> {
        Some(self)
    }
}

/// What to check a request against: its keys and the limits of `rules` that apply. Kept
/// small (it is returned by value on every request): the limits in order and which layers
/// they are.
pub(super) struct Plan<'r> {
    keys: &'r Keys,
    /// The limits to check, in order (ip, user, endpoint): the first `n` slots (the others
    /// repeat the first and are not checked).
    limits: [&'r Limit; 3],
    n: u8,
    /// Whether the first limit is the ip layer's (keyed by the ip key; the others are keyed by
    /// the identity).
    ip: bool,
    /// Whether a user-layer (tier) limit is checked.
    tier: bool,
    /// The endpoint limit's index, when one is checked.
    endpoint: Option<u32>,
}

impl<'r> Plan<'r> {
    /// The plan of these limits (at least one) for `keys`.
    pub(super) fn new(
        keys: &'r Keys,
        ip: Option<&'r Limit>,
        tier: Option<&'r Limit>,
        endpoint: Option<(usize, &'r Limit)>,
    ) -> Option<Plan<'r>> {
        let first = ip.or(tier).or(endpoint.map(|(_, l)| l))?;
        let mut limits = [first; 3];
        let mut n = 0;
        for l in [ip, tier, endpoint.map(|(_, l)| l)].into_iter().flatten() {
            limits[n] = l;
            n += 1;
        }
        Some(Plan {
            keys,
            limits,
            n: n as u8,
            ip: ip.is_some(),
            tier: tier.is_some(),
            endpoint: endpoint.map(|(i, _)| i as u32),
        })
    }

    /// The limits checked, in order.
    pub(super) fn limits(&self) -> &[&'r Limit] {
        &self.limits[..usize::from(self.n)]
    }

    /// How many limits are checked.
    pub(super) fn len(&self) -> usize {
        usize::from(self.n)
    }

    /// Whether the ip layer is checked.
    pub(super) fn has_ip(&self) -> bool {
        self.ip
    }

    /// The user layer's limit, when checked.
    pub(super) fn tier(&self) -> Option<&'r Limit> {
        self.tier.then(|| self.limits[usize::from(self.ip)])
    }

    /// The endpoint limit's index, when checked.
    pub(super) fn endpoint(&self) -> Option<usize> {
        self.endpoint.map(|i| i as usize)
    }

    /// The key of slot `i`.
    fn key(&self, i: usize) -> &'r str {
        let (ip_key, identity) = self.keys.get();
        if i == 0 && self.ip {
            ip_key
        } else {
            identity
        }
    }

    /// Each slot's limiter bound to its key (the slots beyond [`len`](Self::len) too).
    pub(super) fn bound(&self) -> [Bound<'r, String, str>; 3] {
        std::array::from_fn(|i| self.limits[i].limiter.bind(self.key(i)))
    }

    /// The first limit's limiter bound to its key.
    pub(super) fn first_bound(&self) -> Bound<'r, String, str> {
        self.limits[0].limiter.bind(self.key(0))
    }

    /// The plan without its references into the rules, for a decision made later.
    pub(super) fn detach(&self) -> Detached {
        Detached {
            keys: self.keys.clone(),
            ip: self.ip,
            tier: self.tier().map(|l| l.index),
            endpoint: self.endpoint(),
        }
    }
}

/// A [`Plan`] that places its limits in the rules instead of borrowing them: resolved again
/// against the same snapshot of the rules when the decision is made later.
pub(super) struct Detached {
    keys: Keys,
    ip: bool,
    /// The user layer's limit, by its place in the rules ([`Limit::index`]).
    tier: Option<usize>,
    endpoint: Option<usize>,
}

impl Detached {
    /// The plan against the rules it was made from.
    pub(super) fn attach<'r>(&'r self, rules: &'r Rules) -> Option<Plan<'r>> {
        Plan::new(
            &self.keys,
            rules.ip.as_ref().filter(|_| self.ip),
            self.tier.and_then(|i| rules.tiers.values().find(|l| l.index == i)),
            self.endpoint.and_then(|i| rules.endpoints.get(i).map(|l| (i, l))),
        )
    }
}

/// A refusal: the HTTP response, and why (a gRPC request is answered in gRPC's terms).
pub(super) struct Refusal {
    pub(super) http: Response<Bytes>,
    pub(super) why: Refused,
}

impl Refusal {
    /// The answer to `req`: the HTTP refusal, or for a gRPC request its gRPC form.
    pub(super) fn answer<B>(self, req: &Request<B>) -> Response<Bytes> {
        if grpc::is_grpc(req.headers()) {
            grpc::response(self.why, self.http)
        } else {
            self.http
        }
    }
}

pub(super) enum Prepared<'r> {
    /// Allow-listed, or nothing to check.
    Skip,
    /// Refused before any limit (key error, deny list).
    Respond(Box<Refusal>),
    /// Refusal waived by shadow mode.
    Shadow(ShadowVerdict),
    Check(Plan<'r>),
}

fn peer(extensions: &Extensions) -> Option<IpAddr> {
    if let Some(p) = extensions.get::<PeerAddr>() {
        return Some(p.0.ip());
    }
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

impl Shared {
    /// True when a resolver needs the request's [`Parts`].
    pub(super) fn resolves(&self) -> bool {
        self.user.is_some() || self.tier.is_some()
    }

    /// No client address: the request is answered with `response.key_error_status`.
    #[cold]
    #[inline(never)]
    fn no_peer<'r>(&self, config: &Config) -> Prepared<'r> {
        bump(&self.counters.key_errors);
        if config.shadow {
            return Prepared::Skip;
        }
        let status = config.response.key_error_status;
        Prepared::Respond(Box::new(Refusal {
            http: headers::key_error(status),
            why: Refused::NoClient { status },
        }))
    }

    /// The deny list (403) and the allow list (no limit), when the rules have lists; `None`
    /// when the client is on neither.
    #[inline(never)]
    fn lists<'r>(
        &self,
        config: &Config,
        (allow, deny): (bool, bool),
        client: IpAddr,
        user: Option<&str>,
    ) -> Option<Prepared<'r>> {
        if deny && config.deny.matches(Some(client), user) {
            bump(&self.counters.forbidden);
            if config.shadow {
                bump(&self.counters.shadow_denied);
                #[cfg(feature = "metrics")]
                crate::metrics::shadow_would_block();
                return Some(Prepared::Shadow(ShadowVerdict {
                    status: StatusCode::FORBIDDEN,
                    layer: "deny",
                    policy: "deny",
                    retry_after: None,
                }));
            }
            return Some(Prepared::Respond(Box::new(Refusal {
                http: headers::forbidden(config.response.body),
                why: Refused::Denied,
            })));
        }
        if allow && config.allow.matches(Some(client), user) {
            bump(&self.counters.allow_listed);
            return Some(Prepared::Skip);
        }
        None
    }

    /// The identity of an API key: the validator's answer; without a validator, or for a key
    /// that is not UTF-8, none.
    fn verify(&self, raw: &[u8]) -> Option<Verified> {
        let verified = match (&self.api_key, std::str::from_utf8(raw)) {
            (Some(f), Ok(k)) => f(k),
            _ => None,
        };
        if verified.is_none() {
            bump(&self.counters.unverified_keys);
        }
        verified
    }

    /// A tier name that is not in the configuration: counted, and logged once per name (for
    /// the first [`MAX_LOGGED_UNKNOWN_TIERS`] names).
    #[cold]
    #[inline(never)]
    fn unknown_tier(&self, name: &str) {
        bump(&self.counters.unknown_tiers);
        if self
            .logged_tiers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
        {
            return;
        }
        let mut logged = self.logged_tiers.write().unwrap_or_else(|e| e.into_inner());
        if logged.len() >= MAX_LOGGED_UNKNOWN_TIERS || !logged.insert(name.to_owned()) {
            return;
        }
        let shown: String = name.chars().take(64).collect();
        tracing::warn!(
            tier = ?shown,
            "tollgate: unknown tier name; the request counts under the fallback tier \
             (default_tier, or anonymous_tier without an identity); logged once per name"
        );
        if logged.len() == MAX_LOGGED_UNKNOWN_TIERS {
            tracing::warn!("tollgate: further unknown tier names are counted but not logged");
        }
    }

    /// What to do with a request; its keys are written to `keys` (which the plan borrows).
    pub(super) fn prepare<'r>(&self, rules: &'r Rules, head: &impl Head, keys: &'r mut Keys) -> Prepared<'r> {
        let config = rules.config();
        let Some(peer) = peer(head.extensions()) else {
            return self.no_peer(config);
        };
        let client = key::client_ip(peer, head.headers(), &config.client_ip);
        let mut user: Option<Cow<'_, str>> = match (&self.user, head.parts()) {
            (Some(f), Some(parts)) => f(parts),
            _ => head.extensions().get::<UserId>().map(|u| Cow::Borrowed(u.0.as_ref())),
        };
        // An API key counts only when the application vouches for it.
        let mut api = None;
        let mut key_tier = None;
        if let (None, Some(a)) = (&user, &config.api_key) {
            if let Some(value) = head.headers().get(&a.header) {
                match self.verify(value.as_bytes()) {
                    Some(Verified { user: Some(u), tier }) => {
                        user = Some(u);
                        key_tier = tier;
                    }
                    Some(Verified { user: None, tier }) => {
                        api = Some(key::api_key(value.as_bytes(), &rules.api_key_secret));
                        key_tier = tier;
                    }
                    None => {}
                }
            }
        }
        let (allow, deny) = rules.has_lists();
        if allow || deny {
            if let Some(listed) = self.lists(config, (allow, deny), client, user.as_deref()) {
                return listed;
            }
        }
        keys.set_client(client, &config.client_ip);
        let anonymous = user.is_none() && api.is_none();
        match (&user, api) {
            (Some(u), _) => keys.identify(key::user_key(u)),
            (None, Some(k)) => keys.identify(k),
            (None, None) => {}
        }
        let tier = if rules.tiers.is_empty() {
            None
        } else {
            let name: Option<Cow<'_, str>> = match (key_tier, &self.tier, head.parts()) {
                (Some(t), _, _) => Some(t),
                (None, Some(f), Some(parts)) => f(parts),
                _ => head.extensions().get::<Tier>().map(|t| Cow::Borrowed(t.0.as_ref())),
            };
            match name.as_deref().map(|n| (n, rules.tiers.get(n))) {
                Some((_, Some(known))) => Some(known),
                Some((unknown, None)) => {
                    self.unknown_tier(unknown);
                    rules.tier(None, anonymous)
                }
                None => rules.tier(None, anonymous),
            }
        };
        let endpoint = rules
            .endpoint_index(head.method().as_str(), head.path())
            .and_then(|i| rules.endpoints.get(i).map(|l| (i, l)));
        match Plan::new(keys, rules.ip_for(tier), tier, endpoint) {
            Some(plan) => Prepared::Check(plan),
            None => Prepared::Skip,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::LiveConfig;
    use crate::http::RateLimitLayer;

    /// Collects what the `tracing` subscriber writes.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn unknown_tiers_are_counted_every_time_and_logged_once_per_name() {
        let layer = RateLimitLayer::new(LiveConfig::new(Config::seed()).unwrap());
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                layer.shared().unknown_tier("gold");
            }
            layer.shared().unknown_tier("platinum");
            for i in 0..2 * MAX_LOGGED_UNKNOWN_TIERS {
                layer.shared().unknown_tier(&format!("made-up-{i}"));
            }
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.iter().filter(|l| l.contains("tier=\"gold\"")).count(),
            1,
            "{text}"
        );
        assert_eq!(lines.iter().filter(|l| l.contains("tier=\"platinum\"")).count(), 1);
        let named = lines.iter().filter(|l| l.contains("unknown tier name;")).count();
        assert_eq!(named, MAX_LOGGED_UNKNOWN_TIERS, "at most this many names are logged");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("further unknown tier names"))
                .count(),
            1
        );
        assert_eq!(layer.stats().unknown_tiers, 4 + 2 * MAX_LOGGED_UNKNOWN_TIERS as u64);
    }
}
