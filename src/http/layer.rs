//! The tower `Layer`: its builder and its counters.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ::http::request::Parts;
use tower_layer::Layer;

use super::future::{SameBody, Wrapped};
use super::service::RateLimit;
use super::shared::{ApiKeyValidator, Shared, TierResolver, UserResolver};
use super::Verified;
#[cfg(doc)]
use super::{Tier, UserId};
use crate::config::LiveConfig;

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
///
/// `K` types the response bodies: [`Wrapped`] (the default, any inner body) or [`SameBody`]
/// (see [`same_body`](Self::same_body)).
pub struct RateLimitLayer<K = Wrapped> {
    shared: Arc<Shared>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for RateLimitLayer<K> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            shared: self.shared.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> fmt::Debug for RateLimitLayer<K> {
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
            shared: Arc::new(Shared::new(self.live, self.tier, self.user, self.api_key)),
            kind: PhantomData,
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

    /// The same layer, whose responses carry the inner service's body type instead of a
    /// [`ResponseBody`](super::ResponseBody) around it: for inner bodies made from
    /// [`Bytes`](bytes::Bytes) (axum's `Body`, `http_body_util::Full<Bytes>`). With axum this
    /// saves boxing every response body a second time (axum boxes any other body type into its
    /// own).
    ///
    /// ```
    /// # use tollgate::{config::{Config, LiveConfig}, http::RateLimitLayer};
    /// let layer = RateLimitLayer::new(LiveConfig::new(Config::seed()).unwrap()).same_body();
    /// let app: axum::Router = axum::Router::new()
    ///     .route("/", axum::routing::get(|| async { "hello" }))
    ///     .layer(layer);
    /// ```
    pub fn same_body(self) -> RateLimitLayer<SameBody> {
        RateLimitLayer {
            shared: self.shared,
            kind: PhantomData,
        }
    }
}

impl<K> RateLimitLayer<K> {
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

impl<S, K> Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> RateLimit<S, K> {
        RateLimit::new(inner, self.shared.clone())
    }
}

#[cfg(test)]
impl<K> RateLimitLayer<K> {
    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }
}
