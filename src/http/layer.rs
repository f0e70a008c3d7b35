//! The tower `Layer`, its `Service` and response future.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use ::http::request::Parts;
use ::http::{Extensions, HeaderMap, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::grpc::{self, Refused};
use super::headers::{self, Attach};
use super::key::{self, Keys};
use super::policy_header::PolicyHeaderCache;
use super::{PeerAddr, ShadowVerdict, Tier, UserId, Verified};
use crate::config::{Config, HeaderStyle, Limit, LiveConfig, PolicyHeader, Rules};
use crate::consts::MAX_LOGGED_UNKNOWN_TIERS;
use crate::{check_all_async, Decision};

/// Reads a tier name from a request.
pub type TierResolver = Arc<dyn Fn(&Parts) -> Option<Cow<'static, str>> + Send + Sync>;

/// Reads a user id from a request.
pub type UserResolver = Arc<dyn Fn(&Parts) -> Option<Cow<'static, str>> + Send + Sync>;

/// Decides whether an API key is valid, and whose it is: `None` for a key the application does
/// not know.
pub type ApiKeyValidator = Arc<dyn Fn(&str) -> Option<Verified> + Send + Sync>;

/// Counts of what the layer did, other than plain admissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Requests answered 429.
    pub denied: u64,
    /// Requests that would have been answered 429 or 403, let through in shadow mode.
    pub shadow_denied: u64,
    /// Requests answered 403 (deny list).
    pub forbidden: u64,
    /// Requests that skipped every limit (allow list).
    pub allow_listed: u64,
    /// Requests whose client address could not be determined.
    pub key_errors: u64,
    /// Requests with an API key that no validator accepted, counted as anonymous.
    pub unverified_keys: u64,
    /// Requests whose tier name is not in the configuration, counted under the fallback tier.
    pub unknown_tiers: u64,
}

#[derive(Default)]
struct Counters {
    denied: AtomicU64,
    shadow_denied: AtomicU64,
    forbidden: AtomicU64,
    allow_listed: AtomicU64,
    key_errors: AtomicU64,
    unverified_keys: AtomicU64,
    unknown_tiers: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    live: LiveConfig,
    tier: Option<TierResolver>,
    user: Option<UserResolver>,
    api_key: Option<ApiKeyValidator>,
    counters: Counters,
    /// The unknown tier names already logged (at most [`MAX_LOGGED_UNKNOWN_TIERS`]).
    logged_tiers: RwLock<HashSet<String>>,
    /// The header text of the rules in force.
    policy_headers: PolicyHeaderCache,
}

/// The rate-limiting middleware: a tower [`Layer`] that wraps a service in [`RateLimit`].
///
/// All services it makes (one per connection with hyper and axum) share one state: the
/// [`LiveConfig`] with its limiters, the resolvers and the counters.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::convert::Infallible;
/// use tollgate::config::{Config, LiveConfig};
/// use tollgate::http::{PeerAddr, RateLimitLayer};
/// use tower::{service_fn, Layer, Service, ServiceExt};
///
/// let live = LiveConfig::new(Config::from_json(r#"{"tiers": {"anonymous": {"points": 1, "duration": 60}}}"#).unwrap()).unwrap();
/// let layer = RateLimitLayer::new(live);
/// let mut svc = layer.layer(service_fn(|_req: http::Request<String>| async {
///     Ok::<_, Infallible>(http::Response::new(String::from("hello")))
/// }));
/// let request = || {
///     let mut r = http::Request::new(String::new());
///     r.extensions_mut().insert(PeerAddr("192.0.2.1:5000".parse().unwrap()));
///     r
/// };
/// let ok = svc.ready().await.unwrap().call(request()).await.unwrap();
/// assert_eq!(ok.headers()["ratelimit"], r#""user:anonymous";r=0;t=60"#);
/// let no = svc.ready().await.unwrap().call(request()).await.unwrap();
/// assert_eq!(no.status(), 429);
/// assert_eq!(no.headers()["retry-after"], "60");
/// assert_eq!(layer.stats().denied, 1);
/// # }
/// ```
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("live", &self.shared.live)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RateLimitLayer`].
pub struct RateLimitLayerBuilder {
    live: LiveConfig,
    tier: Option<TierResolver>,
    user: Option<UserResolver>,
    api_key: Option<ApiKeyValidator>,
}

impl RateLimitLayerBuilder {
    /// How a request's tier is found (default: the [`Tier`] extension). A tier that is not in
    /// the configuration, or none, falls back to `default_tier` for identified requests and
    /// `anonymous_tier` for the others. An unknown name is counted in
    /// [`Stats::unknown_tiers`] and logged (a `tracing` warning) once per name.
    ///
    /// ```
    /// # use tollgate::{config::{Config, LiveConfig}, http::RateLimitLayer};
    /// #[derive(Clone)]
    /// struct Auth { plan: &'static str }
    ///
    /// let layer = RateLimitLayer::builder(LiveConfig::new(Config::seed()).unwrap())
    ///     .tier_resolver(|parts| parts.extensions.get::<Auth>().map(|a| a.plan.into()))
    ///     .build();
    /// ```
    pub fn tier_resolver<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<Cow<'static, str>> + Send + Sync + 'static,
    {
        self.tier = Some(Arc::new(f));
        self
    }

    /// How a request's user id is found (default: the [`UserId`] extension).
    pub fn user_resolver<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<Cow<'static, str>> + Send + Sync + 'static,
    {
        self.user = Some(Arc::new(f));
        self
    }

    /// How an API key (the value of the configuration's `api_key.header`) becomes an identity:
    /// the application looks the key up and answers who it belongs to, or `None` for a key it
    /// does not know. It runs on every request that carries a key and no user id, before the
    /// limits: make it an in-memory lookup.
    ///
    /// Without a validator, or when it answers `None`, the key is ignored: the request counts
    /// as anonymous, under its client address (and [`Stats::unverified_keys`] counts it). A
    /// client that makes up keys gets no buckets of its own.
    ///
    /// ```
    /// # use tollgate::{config::{Config, LiveConfig}, http::{RateLimitLayer, Verified}};
    /// use std::collections::HashMap;
    ///
    /// let keys: HashMap<&str, (&str, &str)> = HashMap::from([("sk_live_1", ("alice", "premium"))]);
    /// let layer = RateLimitLayer::builder(LiveConfig::new(Config::seed()).unwrap())
    ///     .api_key_validator(move |key| keys.get(key).map(|&(user, tier)| Verified::user(user).tier(tier)))
    ///     .build();
    /// ```
    pub fn api_key_validator<F>(mut self, f: F) -> Self
    where
        F: Fn(&str) -> Option<Verified> + Send + Sync + 'static,
    {
        self.api_key = Some(Arc::new(f));
        self
    }

    /// The layer.
    pub fn build(self) -> RateLimitLayer {
        RateLimitLayer {
            shared: Arc::new(Shared {
                live: self.live,
                tier: self.tier,
                user: self.user,
                api_key: self.api_key,
                counters: Counters::default(),
                logged_tiers: RwLock::new(HashSet::new()),
                policy_headers: PolicyHeaderCache::default(),
            }),
        }
    }
}

impl RateLimitLayer {
    /// A layer with the default resolvers ([`Tier`] and [`UserId`] extensions).
    pub fn new(live: LiveConfig) -> Self {
        Self::builder(live).build()
    }

    /// Starts building a layer.
    pub fn builder(live: LiveConfig) -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
            live,
            tier: None,
            user: None,
            api_key: None,
        }
    }

    /// The configuration in force (reload it through this handle).
    pub fn live(&self) -> &LiveConfig {
        &self.shared.live
    }

    /// What the layer did so far, other than plain admissions.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            denied: c.denied.load(Ordering::Relaxed),
            shadow_denied: c.shadow_denied.load(Ordering::Relaxed),
            forbidden: c.forbidden.load(Ordering::Relaxed),
            allow_listed: c.allow_listed.load(Ordering::Relaxed),
            key_errors: c.key_errors.load(Ordering::Relaxed),
            unverified_keys: c.unverified_keys.load(Ordering::Relaxed),
            unknown_tiers: c.unknown_tiers.load(Ordering::Relaxed),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] makes: decides on each request before the inner service
/// sees it.
///
/// Per request, in order:
///
/// 1. The client address: the [`PeerAddr`] extension, else axum's `ConnectInfo<SocketAddr>`.
///    Neither present: answered with `response.key_error_status` (default 500: the server was
///    not set up to record peer addresses). Behind trusted proxies, see
///    [`client_ip`](super::client_ip).
/// 2. The user: the user resolver, else the [`UserId`] extension; else the API-key header,
///    when the API-key validator accepts it; else anonymous.
/// 3. The deny list (address ranges, user ids): 403. The allow list: no limit, no headers.
/// 4. The layers (ip, user by tier, endpoint), all-or-nothing: a denial takes nothing from the
///    other layers. Denied: 429 with `Retry-After`, the rate-limit headers and a JSON body.
///    Allowed: the inner service runs and its response gets the rate-limit headers of the
///    layer closest to its limit.
///
/// In shadow mode, steps 3 and 4 never block: a request that would have been refused goes
/// through with a [`ShadowVerdict`] in its request and response extensions, and is counted in
/// [`Stats::shadow_denied`].
///
/// In distributed mode the decision waits for a key's first claim (at most one sync
/// interval); in local mode it is made inside `call`, before the inner service is called.
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// What the layer reads from a request: the request itself, or its parts when a resolver
/// (which takes [`Parts`]) is set.
trait Head {
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

/// What to check a request against: its keys and the limits of `rules` that apply.
struct Plan<'r> {
    keys: &'r Keys,
    ip: Option<&'r Limit>,
    /// The user layer's limit for the request's tier.
    tier: Option<&'r Limit>,
    /// The endpoint limit, with its index.
    endpoint: Option<(usize, &'r Limit)>,
}

impl Plan<'_> {
    /// The plan without its references into the rules, for a decision made later.
    fn detach(&self) -> Detached {
        Detached {
            keys: self.keys.clone(),
            ip: self.ip.is_some(),
            tier: self.tier.map(Limit::name),
            endpoint: self.endpoint.map(|(i, _)| i),
        }
    }

    /// The limits of the plan, in order (ip, user, endpoint), with their keys.
    fn layers(&self) -> ([Option<(&Limit, &str)>; 3], usize) {
        let (ip_key, identity) = self.keys.get();
        let mut out = [None, None, None];
        let mut n = 0;
        for (limit, key) in [
            (self.ip, ip_key),
            (self.tier, identity),
            (self.endpoint.map(|(_, l)| l), identity),
        ] {
            if let Some(l) = limit {
                out[n] = Some((l, key));
                n += 1;
            }
        }
        (out, n)
    }
}

/// A [`Plan`] that names its limits instead of borrowing them.
struct Detached {
    keys: Keys,
    ip: bool,
    /// The user layer's limiter name (`user:<tier>`).
    tier: Option<&'static str>,
    endpoint: Option<usize>,
}

impl Detached {
    /// The plan against the rules it was made from.
    fn attach<'r>(&'r self, rules: &'r Rules) -> Plan<'r> {
        Plan {
            keys: &self.keys,
            ip: rules.ip.as_ref().filter(|_| self.ip),
            tier: self
                .tier
                .and_then(|t| rules.tiers.get(t.strip_prefix("user:").unwrap_or(t))),
            endpoint: self.endpoint.and_then(|i| rules.endpoints.get(i).map(|l| (i, l))),
        }
    }
}

/// A refusal: the HTTP response, and why (a gRPC request is answered in gRPC's terms).
struct Refusal {
    http: Response<Bytes>,
    why: Refused,
}

impl Refusal {
    /// The answer to `req`: the HTTP refusal, or for a gRPC request its gRPC form.
    fn answer<B>(self, req: &Request<B>) -> Response<Bytes> {
        if grpc::is_grpc(req.headers()) {
            grpc::response(self.why, self.http)
        } else {
            self.http
        }
    }
}

enum Prepared<'r> {
    /// Allow-listed, or nothing to check.
    Skip,
    /// Refused before any limit (key error, deny list).
    Respond(Box<Refusal>),
    /// Refusal waived by shadow mode.
    Shadow(ShadowVerdict),
    Check(Plan<'r>),
}

/// A decision carried out: the request goes through, with what to add to its response, or is
/// refused (boxed: rare, and large).
enum Action {
    Pass(Finish),
    Refuse(Box<Refusal>),
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
    fn resolves(&self) -> bool {
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
    fn prepare<'r>(&self, rules: &'r Rules, head: &impl Head, keys: &'r mut Keys) -> Prepared<'r> {
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
        if rules.ip_for(tier).is_none() && tier.is_none() && endpoint.is_none() {
            return Prepared::Skip;
        }
        Prepared::Check(Plan {
            keys,
            ip: rules.ip_for(tier),
            tier,
            endpoint,
        })
    }

    fn decide(&self, rules: &Rules, plan: &Plan<'_>) -> Action {
        let (layers, n) = plan.layers();
        let first = layers[0].expect("a plan has a layer");
        // The slots beyond `n` repeat the first layer and are not checked.
        let bound = layers.map(|l| {
            let (l, k) = l.unwrap_or(first);
            l.limiter.bind(k)
        });
        let d = crate::limiter::check_layers(1, &[&bound[0], &bound[1], &bound[2]][..n]);
        self.act(
            rules,
            plan,
            &layers[..n],
            d.expect("a cost of 1 always fits a valid policy"),
        )
    }

    async fn decide_async(&self, rules: &Rules, plan: &Plan<'_>) -> Action {
        let (layers, n) = plan.layers();
        let bound: Vec<_> = layers.iter().flatten().map(|(l, k)| l.limiter.bind(*k)).collect();
        let dyns: Vec<&(dyn crate::Layer + Sync)> = bound.iter().map(|b| b as _).collect();
        let d = check_all_async(1, &dyns).await;
        self.act(
            rules,
            plan,
            &layers[..n],
            d.expect("a cost of 1 always fits a valid policy"),
        )
    }

    fn act(&self, rules: &Rules, plan: &Plan<'_>, layers: &[Option<(&Limit, &str)>], d: Decision) -> Action {
        let config = rules.config();
        if d.is_allowed() && config.response.headers == HeaderStyle::None {
            return Action::Pass(Finish::default());
        }
        let first = layers[0].expect("a plan has a layer").0;
        let mut applied = [first; 3];
        for (slot, l) in applied.iter_mut().zip(layers) {
            if let Some((l, _)) = l {
                *slot = l;
            }
        }
        let applied = &applied[..layers.len()];
        let text = self.policy_headers.get(rules);
        let policy = match config.response.policy_header {
            PolicyHeader::Denials if d.is_allowed() => None,
            _ => text.value(plan.ip.is_some(), plan.tier, plan.endpoint.map(|(i, _)| i)),
        };
        let attach = Attach::new(config.response.headers, policy, &text, applied, &d);
        if d.is_allowed() {
            return Action::Pass(Finish::new(attach, None));
        }
        self.refuse(config, applied, &d, attach)
    }

    /// A refusal by a limit of `applied`: a 429, or in shadow mode the request goes through
    /// with its verdict.
    #[cold]
    #[inline(never)]
    fn refuse(&self, config: &Config, applied: &[&Limit], d: &Decision, attach: Attach) -> Action {
        let layer = applied.iter().find(|l| l.name() == d.policy()).map_or("", |l| l.layer);
        if config.shadow {
            bump(&self.counters.shadow_denied);
            #[cfg(feature = "metrics")]
            crate::metrics::shadow_would_block();
            return Action::Pass(Finish::new(
                attach,
                Some(ShadowVerdict {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    layer,
                    policy: d.policy(),
                    retry_after: d.retry_after(),
                }),
            ));
        }
        bump(&self.counters.denied);
        Action::Refuse(Box::new(Refusal {
            http: headers::too_many_requests(config.response.body, layer, d, attach),
            why: Refused::Limit {
                policy: d.policy(),
                retry_after: d.retry_after(),
            },
        }))
    }
}

/// A response of the layer's own; an empty body ends the stream with the headers.
fn full<B>(r: Response<Bytes>) -> Response<ResponseBody<B>> {
    r.map(|b| ResponseBody::Full {
        data: Some(b).filter(|b| !b.is_empty()),
    })
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let rules = self.shared.live.load();
        let mut keys = Keys::empty();
        // The request is split into its parts only for a resolver (they take `Parts`).
        let prepared = if self.shared.resolves() {
            let (parts, body) = req.into_parts();
            let prepared = self.shared.prepare(&rules, &parts, &mut keys);
            req = Request::from_parts(parts, body);
            prepared
        } else {
            self.shared.prepare(&rules, &req, &mut keys)
        };
        // The inner service is called from one place, so that the request and its future are
        // moved as little as possible.
        let finish = match prepared {
            Prepared::Skip => Finish::default(),
            Prepared::Respond(r) => return ResponseFuture::ready(full(r.answer(&req))),
            Prepared::Shadow(v) => Finish::new(Attach::default(), Some(v)),
            Prepared::Check(plan) if rules.is_distributed() => {
                let plan = plan.detach();
                return self.distributed(req, plan, Arc::clone(&rules));
            }
            Prepared::Check(plan) => match self.shared.decide(&rules, &plan) {
                Action::Refuse(r) => return ResponseFuture::ready(full(r.answer(&req))),
                Action::Pass(finish) => finish,
            },
        };
        finish.mark(&mut req);
        ResponseFuture::inner(self.inner.call(req), finish)
    }
}

impl<S> RateLimit<S> {
    /// Distributed mode: the decision may wait for a first claim, so the call happens later,
    /// on the service that was polled ready (a fresh clone stays here). Out of line: the
    /// local path's code stays compact.
    #[inline(never)]
    fn distributed<ReqBody, ResBody>(
        &mut self,
        mut req: Request<ReqBody>,
        plan: Detached,
        rules: Arc<Rules>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Send + 'static,
    {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(Box::pin(async move {
            let plan = plan.attach(&rules);
            match shared.decide_async(&rules, &plan).await {
                Action::Refuse(r) => Ok(full(r.answer(&req))),
                Action::Pass(finish) => {
                    finish.mark(&mut req);
                    let response = inner.call(req).await?;
                    Ok(finish.apply(response))
                }
            }
        }))
    }
}

/// What the layer adds to the inner service's response: the rate-limit headers and, in shadow
/// mode, the verdict (boxed: it is rare, and this travels in the response future, which is
/// moved several times on its way to the executor).
#[derive(Default)]
struct Finish {
    attach: Attach,
    shadow: Option<Box<ShadowVerdict>>,
}

impl Finish {
    fn new(attach: Attach, shadow: Option<ShadowVerdict>) -> Self {
        Finish {
            attach,
            shadow: shadow.map(Box::new),
        }
    }

    /// In shadow mode, the verdict goes into the request's extensions too, for the inner
    /// service.
    fn mark<B>(&self, req: &mut Request<B>) {
        if let Some(v) = &self.shadow {
            req.extensions_mut().insert(**v);
        }
    }

    fn apply<B>(self, response: Response<B>) -> Response<ResponseBody<B>> {
        let mut response = response.map(|body| ResponseBody::Inner { body });
        self.attach.apply(response.headers_mut());
        if let Some(v) = self.shadow {
            response.extensions_mut().insert(*v);
        }
        response
    }
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`RateLimit`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        Inner {
            #[pin]
            future: F,
            finish: Finish,
        },
        Ready {
            response: Option<Response<ResponseBody<B>>>,
        },
        Boxed {
            future: BoxedResponse<B, E>,
        },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    fn inner(future: F, finish: Finish) -> Self {
        ResponseFuture {
            state: State::Inner { future, finish },
        }
    }

    fn ready(response: Response<ResponseBody<B>>) -> Self {
        ResponseFuture {
            state: State::Ready {
                response: Some(response),
            },
        }
    }

    fn boxed(future: BoxedResponse<B, E>) -> Self {
        ResponseFuture {
            state: State::Boxed { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future, finish } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(std::mem::take(finish).apply(response)))
            }
            StateProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("ResponseFuture polled after completion")))
            }
            StateProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// The body of a [`RateLimit`] response: the inner service's, or the layer's own (429,
    /// 403, key error).
    #[project = BodyProj]
    pub enum ResponseBody<B> {
        /// The inner service's body.
        Inner {
            #[pin]
            body: B,
        },
        /// A body produced by the layer.
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            BodyProj::Inner { body } => body.poll_frame(cx),
            BodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inner { body } => body.is_end_stream(),
            ResponseBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inner { body } => body.size_hint(),
            ResponseBody::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseBody::Inner { .. } => f.write_str("ResponseBody::Inner"),
            ResponseBody::Full { data } => f.debug_struct("ResponseBody::Full").field("data", data).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

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
                layer.shared.unknown_tier("gold");
            }
            layer.shared.unknown_tier("platinum");
            for i in 0..2 * MAX_LOGGED_UNKNOWN_TIERS {
                layer.shared.unknown_tier(&format!("made-up-{i}"));
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
