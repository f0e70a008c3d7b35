//! Tower middleware: tiered, layered limits in front of an axum, hyper or tonic service, with
//! the standard rate-limit headers.
//!
//! ```no_run
//! # async fn run() {
//! use std::net::SocketAddr;
//! use axum::{routing::get, Router};
//! use tollgate::config::LiveConfig;
//! use tollgate::http::RateLimitLayer;
//!
//! let live = LiveConfig::open("rate-limit-tiers.json").unwrap();
//! let _watcher = live.watch(std::time::Duration::from_secs(2)).unwrap();
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::new(live));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! // ConnectInfo gives the layer each connection's peer address.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
//! # }
//! ```
//!
//! # What a client sees
//!
//! Every limited response carries (draft-ietf-httpapi-ratelimit-headers-10, structured
//! fields):
//!
//! ```text
//! RateLimit-Policy: "ip";q=1000;w=60, "user:free";q=100;w=60
//! RateLimit: "user:free";r=99;t=1
//! ```
//!
//! `RateLimit-Policy` lists every policy the request was counted against (`q` points per `w`
//! seconds); `RateLimit` gives, for the one closest to its limit, what remains (`r`) and the
//! seconds until it is full again (`t`, rounded up). With `"policy_header": "denials"`,
//! `RateLimit-Policy` is sent only with refusals. With `"headers": "legacy"` (or `"both"`)
//! responses carry `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`
//! (seconds from now) instead (or too).
//!
//! A denial is a 429 with `Retry-After` (whole seconds, rounded up: never 0 while a wait
//! remains) and a JSON body:
//!
//! ```text
//! {"error":"Rate limit exceeded","message":"Too many requests. Please retry after 30 seconds.",
//!  "retry_after":30,"layer":"user","policy":"user:free"}
//! ```
//!
//! or with `"body": "problem"`, `application/problem+json` with type
//! [`QUOTA_EXCEEDED`] and `violated-policies`. A deny-listed client gets
//! a 403; a request whose client address is unknown gets `response.key_error_status` (500 by
//! default, see [`RateLimit`]).
//!
//! # gRPC
//!
//! A gRPC client does not read HTTP statuses. A request with `content-type: application/grpc`
//! (or `application/grpc+proto`, ...) that the layer refuses is answered as a gRPC server
//! does, with a trailers-only response: HTTP 200, no body, and the headers
//!
//! ```text
//! grpc-status: 8
//! grpc-message: rate limit exceeded (user:free); retry after 30 s
//! grpc-retry-pushback-ms: 29400
//! ```
//!
//! (`8` is `RESOURCE_EXHAUSTED`; the deny list answers `7`, `PERMISSION_DENIED`, and an
//! unknown client address `13`, `INTERNAL`, or `14`, `UNAVAILABLE`, when
//! `response.key_error_status` is 503), with `Retry-After` and the rate-limit headers as for
//! HTTP. A tonic client sees `Status::resource_exhausted`. Admitted gRPC requests get the
//! rate-limit headers among their response headers.
//!
//! # Identity
//!
//! | input | trusted when | used as |
//! |---|---|---|
//! | [`PeerAddr`] extension, else axum `ConnectInfo<SocketAddr>` | always (it is the TCP peer) | the client address |
//! | `X-Forwarded-For`, `Forwarded` or `X-Real-IP` (one, configured) | the peer is in `client_ip.trusted_proxies` | the client address: the rightmost hop that is not a trusted proxy ([`client_ip`]) |
//! | [`UserId`] extension (or a user resolver) | always: set it from your authentication | the user key |
//! | the `api_key.header` | only when the application's API-key validator accepts the key ([`RateLimitLayerBuilder::api_key_validator`]) | the user the validator names, else the key after a keyed SipHash-1-3 (128 bits): the raw key is never stored. A key nobody verified counts as anonymous |
//! | [`Tier`] extension (or a tier resolver) | always | the user layer's policy |
//!
//! IPv6 clients are counted per /64 by default (`client_ip.ipv6_prefix`), IPv4 per address;
//! IPv4-mapped IPv6 addresses count as IPv4.

mod decide;
mod future;
mod grpc;
pub(crate) mod headers;
mod key;
mod layer;
mod plan;
mod policy_header;
mod service;
mod shared;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

pub use self::future::{BodyKind, ResponseBody, ResponseFuture, SameBody, Wrapped};
pub use self::grpc::{GRPC_MESSAGE, GRPC_RETRY_PUSHBACK_MS, GRPC_STATUS};
pub use self::headers::{
    ceil_secs, retry_after_secs, QUOTA_EXCEEDED, RATELIMIT, RATELIMIT_POLICY, X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING,
    X_RATELIMIT_RESET,
};
pub use self::key::client_ip;
pub use self::layer::{RateLimitLayer, RateLimitLayerBuilder, Stats};
pub use self::service::RateLimit;
pub use self::shared::{ApiKeyValidator, TierResolver, UserResolver};

/// The TCP peer of a request, for servers that do not use axum's `ConnectInfo`: insert it
/// into each request's extensions (hyper: from the accepted connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The authenticated user of a request; insert it from your authentication middleware (which
/// runs before the rate-limit layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserId(pub Cow<'static, str>);

/// The tier of a request (a key of the configuration's `tiers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier(pub Cow<'static, str>);

/// What the application's API-key validator knows about a key it accepted
/// ([`RateLimitLayerBuilder::api_key_validator`]).
///
/// ```
/// use tollgate::http::Verified;
///
/// // Counted under the key itself (hashed), in the tier the other resolvers give.
/// let _ = Verified::key();
/// // Counted under its owner (every key of alice shares her buckets), on the premium tier.
/// let owner = Verified::user("alice").tier("premium");
/// assert_eq!(owner.tier.as_deref(), Some("premium"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// The user the key belongs to; `None`: the key is its own identity.
    pub user: Option<Cow<'static, str>>,
    /// The key's tier; `None`: the tier resolver (or the [`Tier`] extension) decides, else
    /// `default_tier`.
    pub tier: Option<Cow<'static, str>>,
}

impl Verified {
    /// A valid key, counted under itself (after hashing).
    pub fn key() -> Self {
        Verified::default()
    }

    /// A valid key of `user`, counted under the user's id.
    pub fn user(user: impl Into<Cow<'static, str>>) -> Self {
        Verified {
            user: Some(user.into()),
            tier: None,
        }
    }

    /// The key's tier (a key of the configuration's `tiers`).
    pub fn tier(mut self, tier: impl Into<Cow<'static, str>>) -> Self {
        self.tier = Some(tier.into());
        self
    }
}

/// Shadow mode: what the layer would have done to a request it let through. Found in the
/// request's extensions (for the inner service) and the response's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowVerdict {
    /// 429 (a limit) or 403 (the deny list).
    pub status: ::http::StatusCode,
    /// `ip`, `user`, `endpoint` or `deny`.
    pub layer: &'static str,
    /// The policy (limiter name) that would have denied.
    pub policy: &'static str,
    /// For a 429, how long the client would have been told to wait.
    pub retry_after: Option<Duration>,
}
