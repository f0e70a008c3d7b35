//! The HTTP layer against a real axum server on 127.0.0.1 and a real HTTP client (hyper-util).
//! Every limiter runs on a manual clock, so the figures in headers are exact.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate::config::{Config, LiveConfig};
use tollgate::http::{RateLimitLayer, ShadowVerdict, Verified};
use tollgate::store::MemoryStore;
use tollgate::{ManualClock, Node};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Server {
    addr: SocketAddr,
    layer: RateLimitLayer,
    clock: ManualClock,
    live: LiveConfig,
}

/// Tiers small enough to exhaust in a few requests.
const BASE: &str = r#"{
    "tiers": {
        "anonymous": {"points": 3, "duration": 60},
        "free": {"points": 5, "duration": 60},
        "premium": {"points": 100, "duration": 60}
    },
    "layers": {"ip": {"points": 50, "duration": 60}},
    "endpoints": [{"method": "POST", "path": "/api/ai/generate", "policy": {"points": 2, "duration": 3600}}]
}"#;

/// `BASE` with some top-level fields replaced.
fn with(fields: Value) -> String {
    let mut base: Value = serde_json::from_str(BASE).unwrap();
    for (k, v) in fields.as_object().unwrap() {
        base[k] = v.clone();
    }
    base.to_string()
}

fn app(layer: RateLimitLayer) -> Router {
    routes().layer(layer)
}

/// The test routes, without the layer.
fn routes() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/api/ai/generate", post(|| async { "generated" }))
        .route(
            "/whoami",
            get(|req: Request| async move {
                match req.extensions().get::<ShadowVerdict>() {
                    Some(v) => format!("shadow:{}:{}", v.status.as_u16(), v.layer),
                    None => "plain".to_string(),
                }
            }),
        )
}

/// The layer with the demo resolvers: user id from `x-user`, tier from `x-tier`.
fn layer(live: LiveConfig) -> RateLimitLayer {
    builder(live).build()
}

/// [`layer`]'s builder.
fn builder(live: LiveConfig) -> tollgate::http::RateLimitLayerBuilder {
    let header = |name: &'static str| {
        move |p: &axum::http::request::Parts| {
            p.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.to_owned().into())
        }
    };
    RateLimitLayer::builder(live)
        .user_resolver(header("x-user"))
        .tier_resolver(header("x-tier"))
}

async fn serve_router(router: Router, connect_info: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if connect_info {
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                .await
                .unwrap();
        } else {
            axum::serve(listener, router).await.unwrap();
        }
    });
    addr
}

async fn start_live(live: LiveConfig, clock: ManualClock) -> Server {
    let layer = layer(live.clone());
    let addr = serve_router(app(layer.clone()), true).await;
    Server {
        addr,
        layer,
        clock,
        live,
    }
}

async fn start(json: &str) -> Server {
    let clock = ManualClock::new();
    let live = LiveConfig::builder()
        .config(Config::from_json(json).unwrap())
        .clock(clock.clock())
        .build()
        .unwrap();
    start_live(live, clock).await
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that opens a new connection for every request.
fn fresh_connections() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

async fn send(c: &HttpClient, addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c.request(b.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, headers, body }
}

async fn get_(c: &HttpClient, s: &Server, headers: &[(&str, &str)]) -> Reply {
    send(c, s.addr, "GET", "/", headers).await
}

#[tokio::test]
async fn headers_have_the_draft_syntax_and_429_has_body_and_retry_after() {
    let s = start(BASE).await;
    let c = client();
    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""ip";q=50;w=60, "user:anonymous";q=3;w=60"#)
    );
    // One token in 20 s comes back per 20 s; the tightest layer is reported.
    assert_eq!(r.header("ratelimit"), Some(r#""user:anonymous";r=2;t=20"#));
    assert_eq!(r.header("x-ratelimit-limit"), None, "legacy headers are opt-in");
    assert_eq!(r.header("retry-after"), None);
    get_(&c, &s, &[]).await;
    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.header("ratelimit"), Some(r#""user:anonymous";r=0;t=60"#));

    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("retry-after"), Some("20"));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""ip";q=50;w=60, "user:anonymous";q=3;w=60"#)
    );
    assert_eq!(r.header("ratelimit"), Some(r#""user:anonymous";r=0;t=60"#));
    assert_eq!(
        r.json(),
        json!({
            "error": "Rate limit exceeded",
            "message": "Too many requests. Please retry after 20 seconds.",
            "retry_after": 20,
            "layer": "user",
            "policy": "user:anonymous",
        })
    );

    // Half a second before the next token: Retry-After rounds up to 1, never 0.
    s.clock.advance(Duration::from_millis(19_500));
    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["retry_after"], 1);
    s.clock.advance(Duration::from_millis(500));
    assert_eq!(get_(&c, &s, &[]).await.status, 200);
    assert_eq!(get_(&c, &s, &[]).await.status, 429);
    assert_eq!(s.layer.stats().denied, 3);
}

#[tokio::test]
async fn legacy_headers_and_problem_json_on_request() {
    let s = start(&with(json!({"response": {"headers": "both", "body": "problem"}}))).await;
    let c = client();
    let r = get_(&c, &s, &[("x-user", "alice")]).await;
    assert_eq!(r.header("ratelimit"), Some(r#""user:free";r=4;t=12"#));
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("4"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("12"));
    for _ in 0..4 {
        assert_eq!(get_(&c, &s, &[("x-user", "alice")]).await.status, 200);
    }
    let r = get_(&c, &s, &[("x-user", "alice")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), Some("12"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let body = r.json();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], json!(["user:free"]));
    assert_eq!(body["layer"], "user");
}

#[tokio::test]
async fn the_policy_header_only_with_refusals_when_asked() {
    let s = start(&with(json!({"response": {"policy_header": "denials"}}))).await;
    let c = client();
    for remaining in [2, 1, 0] {
        let r = get_(&c, &s, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-policy"), None);
        assert_eq!(
            r.header("ratelimit").map(|v| v.contains(&format!(";r={remaining};"))),
            Some(true)
        );
    }
    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""ip";q=50;w=60, "user:anonymous";q=3;w=60"#)
    );
    assert_eq!(r.header("ratelimit"), Some(r#""user:anonymous";r=0;t=60"#));
}

#[tokio::test]
async fn tiers_come_from_the_resolver_and_unknown_tiers_fall_back_and_are_counted() {
    let s = start(BASE).await;
    let c = client();
    let r = get_(&c, &s, &[("x-user", "p"), ("x-tier", "free")]).await;
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""ip";q=50;w=60, "user:free";q=5;w=60"#)
    );
    // Premium (100 per minute) is above the ip layer's 50: by default not counted there.
    let r = get_(&c, &s, &[("x-user", "p"), ("x-tier", "premium")]).await;
    assert_eq!(r.header("ratelimit-policy"), Some(r#""user:premium";q=100;w=60"#));
    assert_eq!(r.header("ratelimit"), Some(r#""user:premium";r=99;t=1"#));
    for _ in 0..3 {
        let r = get_(&c, &s, &[("x-user", "g"), ("x-tier", "gold")]).await;
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""ip";q=50;w=60, "user:free";q=5;w=60"#)
        );
    }
    assert_eq!(
        s.layer.stats().unknown_tiers,
        3,
        "every request with an unknown tier is counted"
    );
}

#[tokio::test]
async fn state_is_shared_across_connections_and_clones() {
    let s = start(BASE).await;
    let (a, b) = (fresh_connections(), fresh_connections());
    let mut allowed = 0;
    for i in 0..8 {
        let c = if i % 2 == 0 { &a } else { &b };
        if get_(c, &s, &[]).await.status == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "one bucket for the client, whatever the connection");
}

#[tokio::test]
async fn spoofed_forwarding_headers_are_ignored_unless_the_peer_is_trusted() {
    // No trusted proxy: X-Forwarded-For is the client's own claim and changes nothing.
    let s = start(BASE).await;
    let c = client();
    let mut allowed = 0;
    for i in 0..6 {
        let xff = format!("203.0.113.{i}");
        let r = get_(&c, &s, &[("x-forwarded-for", &xff), ("x-real-ip", &xff)]).await;
        allowed += usize::from(r.status == 200);
    }
    assert_eq!(allowed, 3);

    // 127.0.0.1 is a trusted proxy: the rightmost untrusted hop is the client.
    let s = start(&with(json!({"client_ip": {"trusted_proxies": ["127.0.0.1/32"]}}))).await;
    for i in 0..6 {
        let xff = format!("203.0.113.{i}");
        let r = get_(&c, &s, &[("x-forwarded-for", &xff)]).await;
        assert_eq!(r.status, 200, "each forwarded client has its own bucket");
    }
    // A forged leftmost entry never becomes the key.
    let mut allowed = 0;
    for i in 0..6 {
        let xff = format!("6.6.6.{i}, 198.51.100.1");
        allowed += usize::from(get_(&c, &s, &[("x-forwarded-for", &xff)]).await.status == 200);
    }
    assert_eq!(allowed, 3);
    // A malformed header falls back to the peer, never to a shared "unknown" bucket.
    let r = get_(&c, &s, &[("x-forwarded-for", "not-an-ip")]).await;
    assert_eq!(r.status, 200);
    let rules = s.live.rules();
    let ip = rules.ip_limiter().unwrap();
    assert_eq!(ip.peek("127.0.0.1", 1).unwrap().remaining(), 48);
    assert_eq!(ip.peek("198.51.100.1", 1).unwrap().remaining(), 46);
}

#[tokio::test]
async fn ten_thousand_addresses_in_one_ipv6_64_share_one_bucket() {
    let s = start(&with(json!({
        "tiers": {"anonymous": {"points": 100, "duration": 60}},
        "layers": {"ip": {"points": 1000, "duration": 60}},
        "client_ip": {"trusted_proxies": ["127.0.0.1/32"]}
    })))
    .await;
    let c = client();
    let mut allowed = 0;
    for i in 0..10_000u32 {
        let xff = format!(
            "2001:db8:7:42:{:x}:{:x}:{:x}:1",
            i >> 8,
            i & 0xff,
            i.wrapping_mul(2_654_435_761) >> 16
        );
        allowed += usize::from(get_(&c, &s, &[("x-forwarded-for", &xff)]).await.status == 200);
    }
    assert_eq!(allowed, 100);
    let rules = s.live.rules();
    assert_eq!(rules.ip_limiter().unwrap().len(), 1);
    assert_eq!(rules.tier_limiter("anonymous").unwrap().len(), 1);
    assert_eq!(
        rules
            .ip_limiter()
            .unwrap()
            .peek("2001:db8:7:42::/64", 1)
            .unwrap()
            .remaining(),
        899
    );
    // IPv4-mapped IPv6 is the IPv4 client.
    get_(&c, &s, &[("x-forwarded-for", "198.51.100.9")]).await;
    get_(&c, &s, &[("x-forwarded-for", "::ffff:198.51.100.9")]).await;
    assert_eq!(
        rules.ip_limiter().unwrap().peek("198.51.100.9", 1).unwrap().remaining(),
        997
    );
}

#[tokio::test]
async fn an_endpoint_denial_takes_nothing_from_the_ip_and_user_layers() {
    let s = start(BASE).await;
    let c = client();
    let alice = [("x-user", "alice")];
    for _ in 0..2 {
        let r = send(&c, s.addr, "POST", "/api/ai/generate", &alice).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""ip";q=50;w=60, "user:free";q=5;w=60, "endpoint:POST /api/ai/generate";q=2;w=3600"#)
        );
    }
    for _ in 0..10 {
        let r = send(&c, s.addr, "POST", "/api/ai/generate", &alice).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["layer"], "endpoint");
        assert_eq!(r.json()["policy"], "endpoint:POST /api/ai/generate");
        assert_eq!(r.header("retry-after"), Some("1800"));
    }
    let rules = s.live.rules();
    // Two requests were admitted; the ten denials took nothing.
    assert_eq!(
        rules.ip_limiter().unwrap().peek("127.0.0.1", 1).unwrap().remaining(),
        47
    );
    assert_eq!(
        rules
            .tier_limiter("free")
            .unwrap()
            .peek("u:alice", 1)
            .unwrap()
            .remaining(),
        2
    );
    // Alice still has three requests elsewhere.
    for _ in 0..3 {
        assert_eq!(get_(&c, &s, &alice).await.status, 200);
    }
    let r = get_(&c, &s, &alice).await;
    assert_eq!((r.status.as_u16(), r.json()["layer"].clone()), (429, json!("user")));
}

#[tokio::test]
async fn shadow_mode_never_blocks_and_reports() {
    let s = start(&with(json!({"shadow": true, "deny": {"users": ["mallory"]}}))).await;
    let c = client();
    let mut shadowed = 0;
    for i in 0..6 {
        let r = send(&c, s.addr, "GET", "/whoami", &[]).await;
        assert_eq!(r.status, 200);
        if i >= 3 {
            assert_eq!(r.text(), "shadow:429:user");
            assert_eq!(r.header("ratelimit"), Some(r#""user:anonymous";r=0;t=60"#));
            assert_eq!(r.header("retry-after"), None);
            shadowed += 1;
        } else {
            assert_eq!(r.text(), "plain");
        }
    }
    let r = send(&c, s.addr, "GET", "/whoami", &[("x-user", "mallory")]).await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "shadow:403:deny"));
    let stats = s.layer.stats();
    assert_eq!(
        (stats.shadow_denied, stats.denied, stats.forbidden),
        (shadowed + 1, 0, 1)
    );
}

#[tokio::test]
async fn allow_list_skips_limits_and_deny_list_answers_403() {
    let s = start(&with(json!({
        "client_ip": {"trusted_proxies": ["127.0.0.1/32"]},
        "allow": {"users": ["vip"], "ips": ["198.51.100.0/24"]},
        "deny": {"users": ["mallory"], "ips": ["203.0.113.66"]}
    })))
    .await;
    let c = client();
    for _ in 0..20 {
        let r = get_(&c, &s, &[("x-user", "vip")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit"), None, "allow-listed requests are not counted");
        let r = get_(&c, &s, &[("x-forwarded-for", "198.51.100.20")]).await;
        assert_eq!(r.status, 200);
    }
    for headers in [[("x-user", "mallory")], [("x-forwarded-for", "203.0.113.66")]] {
        let r = get_(&c, &s, &headers).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.json()["error"], "Forbidden");
    }
    // Everyone else is limited as usual.
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(get_(&c, &s, &[]).await.status.as_u16());
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 429]);
    let stats = s.layer.stats();
    assert_eq!((stats.allow_listed, stats.forbidden), (40, 2));

    // A deny range covering the server's own clients.
    let s = start(&with(json!({"deny": {"ips": ["127.0.0.0/8"]}}))).await;
    assert_eq!(get_(&c, &s, &[]).await.status, 403);
}

/// A router whose handlers count their runs: `GET /api/export/large` and
/// `POST /api/ai/generate`.
fn counting_app(layer: RateLimitLayer, runs: Arc<AtomicU64>) -> Router {
    let (a, b) = (runs.clone(), runs);
    Router::new()
        .route(
            "/api/export/large",
            get(move || async move {
                a.fetch_add(1, Ordering::Relaxed);
                "exported"
            }),
        )
        .route(
            "/api/ai/generate",
            post(move || async move {
                b.fetch_add(1, Ordering::Relaxed);
                "generated"
            }),
        )
        .layer(layer)
}

#[tokio::test]
async fn head_requests_count_against_get_endpoint_limits() {
    let json = with(json!({
        "tiers": {"anonymous": {"points": 1000, "duration": 60}},
        "layers": {},
        "endpoints": [{"method": "GET", "path": "/api/export/large", "policy": {"points": 2, "duration": 3600}}]
    }));
    let live = LiveConfig::new(Config::from_json(&json).unwrap()).unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let addr = serve_router(counting_app(RateLimitLayer::new(live), runs.clone()), true).await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(send(&c, addr, "HEAD", "/api/export/large", &[]).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429], "HEAD is limited like GET");
    assert_eq!(runs.load(Ordering::Relaxed), 2, "the GET handler ran twice");
    let r = send(&c, addr, "GET", "/api/export/large", &[]).await;
    assert_eq!(r.status, 429, "HEAD and GET share the endpoint's bucket");
    assert_eq!(runs.load(Ordering::Relaxed), 2);
}

const GENERATE_WITH_KEYS: &str = r#"{
    "tiers": {"anonymous": {"points": 1000, "duration": 60}, "free": {"points": 1000, "duration": 60}},
    "endpoints": [{"method": "POST", "path": "/api/ai/generate", "policy": {"points": 2, "duration": 3600}}],
    "api_key": {"header": "x-api-key"}
}"#;

#[tokio::test]
async fn made_up_api_keys_get_no_buckets_of_their_own() {
    let live = LiveConfig::new(Config::from_json(GENERATE_WITH_KEYS).unwrap()).unwrap();
    let layer = RateLimitLayer::new(live);
    let runs = Arc::new(AtomicU64::new(0));
    let addr = serve_router(counting_app(layer.clone(), runs.clone()), true).await;
    let c = client();
    let mut admitted = 0;
    for i in 0..10 {
        let key = format!("made-up-{i}");
        let r = send(&c, addr, "POST", "/api/ai/generate", &[("x-api-key", &key)]).await;
        admitted += usize::from(r.status == 200);
    }
    assert_eq!(
        admitted, 2,
        "unverified keys share the client's anonymous endpoint bucket"
    );
    assert_eq!(runs.load(Ordering::Relaxed), 2);
    assert_eq!(layer.stats().unverified_keys, 10);
}

#[tokio::test]
async fn api_keys_are_identities_when_the_validator_accepts_them() {
    let live = LiveConfig::new(Config::from_json(GENERATE_WITH_KEYS).unwrap()).unwrap();
    let layer = RateLimitLayer::builder(live)
        .api_key_validator(|key| match key {
            "sk_live_one" => Some(Verified::key()),
            "sk_live_alice_1" | "sk_live_alice_2" => Some(Verified::user("alice")),
            _ => None,
        })
        .build();
    let runs = Arc::new(AtomicU64::new(0));
    let addr = serve_router(counting_app(layer.clone(), runs.clone()), true).await;
    let c = client();
    let admitted = |key: &'static str, n: usize| {
        let c = c.clone();
        async move {
            let mut ok = 0;
            for _ in 0..n {
                let r = send(&c, addr, "POST", "/api/ai/generate", &[("x-api-key", key)]).await;
                ok += usize::from(r.status == 200);
            }
            ok
        }
    };
    assert_eq!(
        admitted("sk_live_one", 3).await,
        2,
        "a verified key has its own buckets"
    );
    assert_eq!(
        admitted("sk_live_alice_1", 1).await + admitted("sk_live_alice_2", 2).await,
        2,
        "two keys of one user share the user's buckets"
    );
    assert_eq!(admitted("made-up", 3).await, 2, "an unknown key is anonymous");
    assert_eq!(layer.stats().unverified_keys, 3);
    let free = layer
        .live()
        .rules()
        .endpoint_limiter("POST", "/api/ai/generate")
        .unwrap()
        .1
        .clone();
    assert_eq!(free.peek("u:alice", 1).unwrap().remaining(), 0);
    assert_eq!(
        free.peek("sk_live_one", 1).unwrap().remaining(),
        1,
        "the raw key is not a key: fresh"
    );
}

#[tokio::test]
async fn a_verified_key_brings_its_tier() {
    let json = with(json!({"api_key": {"header": "x-api-key"}}));
    let live = LiveConfig::new(Config::from_json(&json).unwrap()).unwrap();
    let layer = RateLimitLayer::builder(live)
        .api_key_validator(|key| (key == "sk_live_pro").then(|| Verified::user("pro").tier("premium")))
        .build();
    let addr = serve_router(app(layer), true).await;
    let r = send(&client(), addr, "GET", "/", &[("x-api-key", "sk_live_pro")]).await;
    assert_eq!(r.header("ratelimit-policy"), Some(r#""user:premium";q=100;w=60"#));
}

#[tokio::test]
async fn an_unknown_client_address_gets_the_documented_status() {
    for (json, status) in [
        (BASE.to_string(), 500),
        (with(json!({"response": {"key_error_status": 503}})), 503),
    ] {
        let live = LiveConfig::new(Config::from_json(&json).unwrap()).unwrap();
        let layer = layer(live);
        // Served without ConnectInfo: the layer cannot know the peer.
        let addr = serve_router(app(layer.clone()), false).await;
        let r = send(&client(), addr, "GET", "/", &[]).await;
        assert_eq!(r.status.as_u16(), status);
        assert!(r.json()["message"].as_str().unwrap().contains("client address"));
        assert_eq!(layer.stats().key_errors, 1);
    }
}

/// Writes through a rename, so that the watcher never reads a half-written file.
fn write_atomic(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tollgate-http-{}-{name}.json", std::process::id()))
}

#[tokio::test]
async fn reload_rejects_a_broken_file_and_keeps_state_of_unchanged_policies() {
    let path = temp_file("reload");
    std::fs::write(&path, BASE).unwrap();
    let clock = ManualClock::new();
    let live = LiveConfig::builder().file(&path).clock(clock.clock()).build().unwrap();
    let s = start_live(live.clone(), clock).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get_(&c, &s, &[]).await.status, 200);
    }
    assert_eq!(get_(&c, &s, &[]).await.status, 429);

    // Broken: a bad value, then bad JSON. Both rejected; the old rules keep serving.
    std::fs::write(&path, BASE.replace(r#""points": 3"#, r#""points": -5"#)).unwrap();
    let err = live.reload().unwrap_err();
    assert_eq!(err.to_string(), "tiers.anonymous.points: must be > 0 (got -5)");
    std::fs::write(&path, "{\"tiers\": {").unwrap();
    assert!(live.reload().is_err());
    assert_eq!(live.generation(), 0);
    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""ip";q=50;w=60, "user:anonymous";q=3;w=60"#)
    );

    // Only premium changes: the anonymous limiter, and the client's empty bucket, stay.
    std::fs::write(&path, BASE.replace(r#""points": 100"#, r#""points": 200"#)).unwrap();
    live.reload().unwrap();
    assert_eq!(live.generation(), 1);
    assert_eq!(get_(&c, &s, &[]).await.status, 429);

    // The anonymous policy changes: a new limiter.
    std::fs::write(&path, BASE.replace(r#""points": 3"#, r#""points": 4"#)).unwrap();
    live.reload().unwrap();
    let r = get_(&c, &s, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit"), Some(r#""user:anonymous";r=3;t=15"#));

    // The watcher picks up changes by itself and rejects broken ones.
    let watcher = live.watch(Duration::from_millis(5)).unwrap();
    write_atomic(&path, &BASE.replace(r#""points": 3"#, r#""points": 10"#));
    let mut waited = 0;
    while live.generation() < 3 && waited < 400 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    assert_eq!(live.generation(), 3, "the watcher reloaded the file");
    assert_eq!(live.rules().config().tiers["anonymous"].points(), 10);
    write_atomic(&path, &BASE.replace(r#""points": 3"#, r#""points": 0.5"#));
    waited = 0;
    while live.last_error().is_none() && waited < 400 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    assert_eq!(
        live.last_error().unwrap().to_string(),
        "tiers.anonymous.points: must be a whole number (got 0.5)"
    );
    assert_eq!(live.generation(), 3);
    drop(watcher);
    let _ = std::fs::remove_file(&path);
}

/// The seed's `rate-limit-tiers.json`, as users bring it.
const SEED_FLAT: &str = r#"{
  "anonymous": { "points": 20, "duration": 60 },
  "free": { "points": 100, "duration": 60 },
  "premium": { "points": 1000, "duration": 60 },
  "enterprise": { "points": 10000, "duration": 60 }
}"#;

#[tokio::test]
async fn the_seeds_flat_tiers_file_is_served_as_it_is() {
    let path = temp_file("flat");
    // With a byte-order mark, as some editors save it.
    std::fs::write(&path, format!("\u{feff}{SEED_FLAT}")).unwrap();
    let clock = ManualClock::new();
    let live = LiveConfig::builder().file(&path).clock(clock.clock()).build().unwrap();
    let s = start_live(live, clock).await;
    let c = client();
    let mut anonymous = 0;
    for _ in 0..25 {
        anonymous += usize::from(get_(&c, &s, &[]).await.status == 200);
    }
    assert_eq!(anonymous, 20, "anonymous: 20 per minute");
    let r = get_(&c, &s, &[("x-user", "alice")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-policy"), Some(r#""user:free";q=100;w=60"#));
    let r = get_(&c, &s, &[("x-user", "ent"), ("x-tier", "enterprise")]).await;
    assert_eq!(r.header("ratelimit-policy"), Some(r#""user:enterprise";q=10000;w=60"#));
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn trailing_data_is_refused_at_start_and_on_reload() {
    let path = temp_file("trailing");
    std::fs::write(&path, format!("{BASE} xyz")).unwrap();
    let err = LiveConfig::open(&path).unwrap_err();
    assert!(err.to_string().starts_with("data after the JSON document"), "{err}");

    std::fs::write(&path, BASE).unwrap();
    let clock = ManualClock::new();
    let live = LiveConfig::builder().file(&path).clock(clock.clock()).build().unwrap();
    let s = start_live(live.clone(), clock).await;
    let c = client();
    for trailing in [format!("{BASE} xyz"), format!("{BASE}{BASE}")] {
        std::fs::write(&path, trailing.replace(r#""points": 3"#, r#""points": 1"#)).unwrap();
        let err = live.reload().unwrap_err();
        assert!(err.to_string().starts_with("data after the JSON document"), "{err}");
    }
    assert_eq!(live.generation(), 0);
    let mut allowed = 0;
    for _ in 0..5 {
        allowed += usize::from(get_(&c, &s, &[]).await.status == 200);
    }
    assert_eq!(allowed, 3, "the rules in force (anonymous: 3) keep serving");
    let _ = std::fs::remove_file(&path);
}

/// Tiers around an ip layer of 5 per minute.
const IP_SCOPE: &str = r#"{
    "tiers": {
        "anonymous": {"points": 3, "duration": 60},
        "free": {"points": 5, "duration": 60},
        "enterprise": {"points": 100, "duration": 60}
    },
    "layers": {"ip": {"points": 5, "duration": 60}}
}"#;

async fn admitted(s: &Server, headers: &[(&str, &str)], n: usize) -> usize {
    let c = client();
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(get_(&c, s, headers).await.status == 200);
    }
    ok
}

#[tokio::test]
async fn the_ip_layer_by_default_does_not_cap_tiers_above_it() {
    let s = start(IP_SCOPE).await;
    let ent = [("x-user", "big"), ("x-tier", "enterprise")];
    assert_eq!(admitted(&s, &ent, 20).await, 20, "enterprise is not capped at 5");
    assert_eq!(
        admitted(&s, &[("x-user", "a")], 7).await,
        5,
        "free is counted by the ip layer"
    );
    assert_eq!(
        admitted(&s, &[("x-user", "b")], 3).await,
        0,
        "the address's 5 are spent by free users"
    );
    let rules = s.live.rules();
    assert_eq!(
        rules.config().layers.ip_applies_to,
        tollgate::config::IpScope::Tiers(["anonymous".to_string(), "free".to_string()].into())
    );

    let all = r#""layers": {"ip": {"points": 5, "duration": 60, "applies_to": "all"}}"#;
    let s = start(&IP_SCOPE.replace(r#""layers": {"ip": {"points": 5, "duration": 60}}"#, all)).await;
    assert_eq!(admitted(&s, &ent, 20).await, 5, "applies_to all: every tier is capped");

    let listed = r#""layers": {"ip": {"points": 5, "duration": 60, "applies_to": ["anonymous"]}}"#;
    let s = start(&IP_SCOPE.replace(r#""layers": {"ip": {"points": 5, "duration": 60}}"#, listed)).await;
    assert_eq!(admitted(&s, &[("x-user", "a")], 7).await, 5, "free: its own 5");
    assert_eq!(
        admitted(&s, &[("x-user", "b")], 7).await,
        5,
        "free users are not counted per address"
    );
}

#[test]
fn every_invalid_value_is_reported_with_its_json_path() {
    let tier = |extra: Value| {
        let mut t = json!({"points": 10, "duration": 60});
        for (k, v) in extra.as_object().unwrap() {
            t[k] = v.clone();
        }
        json!({"tiers": {"free": t}}).to_string()
    };
    let doc = |fields: Value| {
        let mut d = json!({"tiers": {"free": {"points": 10, "duration": 60}}});
        for (k, v) in fields.as_object().unwrap() {
            d[k] = v.clone();
        }
        d.to_string()
    };
    let endpoint = |e: Value| doc(json!({"endpoints": [e]}));
    let policy = json!({"points": 1, "duration": 1});
    let cases: Vec<(String, &str)> = vec![
        (tier(json!({"points": -5})), "tiers.free.points: must be > 0 (got -5)"),
        (tier(json!({"points": 0})), "tiers.free.points: must be > 0"),
        (
            tier(json!({"points": 1.5})),
            "tiers.free.points: must be a whole number",
        ),
        (tier(json!({"points": 1e30})), "tiers.free.points: must be <="),
        (tier(json!({"points": "ten"})), "tiers.free.points: invalid type"),
        (tier(json!({"duration": 0})), "tiers.free.duration: must be > 0"),
        (tier(json!({"duration": -1})), "tiers.free.duration: must be > 0"),
        (
            tier(json!({"duration": 5e-324})),
            "tiers.free.duration: must be >= 0.001 s",
        ),
        (tier(json!({"duration": 1e12})), "tiers.free.duration: must be <="),
        (tier(json!({"burst": 0})), "tiers.free.burst: must be > 0"),
        (
            tier(json!({"block_duration": 0})),
            "tiers.free.block_duration: must be > 0",
        ),
        (
            tier(json!({"algorithm": "leaky"})),
            "tiers.free.algorithm: unknown variant `leaky`",
        ),
        (
            tier(json!({"algorithm": "fixed_window", "burst": 5})),
            "tiers.free.burst: only token_bucket",
        ),
        (tier(json!({"pionts": 3})), "tiers.free.pionts: unknown field `pionts`"),
        (json!({"tiers": {}}).to_string(), "tiers: must name at least one tier"),
        (
            json!({"tiers": {"bad name": policy}}).to_string(),
            "tiers.bad name: a tier name",
        ),
        (
            json!({"shadow": false}).to_string(),
            "tiers: missing (a map of tier names to policies)",
        ),
        (
            json!({"tiers": {"free": {"duration": 60}}}).to_string(),
            "tiers.free.points: missing",
        ),
        (
            r#"{"tiers": {"free": {"points": 1, "points": 2, "duration": 60}}}"#.to_string(),
            "tiers.free.points: is listed twice",
        ),
        (
            r#"{"tiers": {"free": {"points": 1, "duration": 60}}, "tiers": {}}"#.to_string(),
            "tiers: is listed twice",
        ),
        (
            r#"{"tiers": {"free": {"points": 1, "duration": "#.to_string(),
            "tiers.free.duration: EOF while parsing a value",
        ),
        (
            r#"{"tiers": {"free": {"points": 1"#.to_string(),
            "tiers.free: EOF while parsing an object",
        ),
        ("[1, 2]".to_string(), "the document must be a JSON object"),
        (
            tier(json!({"points": u64::MAX})),
            "tiers.free.points: must be <= 4294967295 (got 18446744073709551615)",
        ),
        (
            r#"{"tiers": {"free": {"points": 10, "duration": 5e-324}}}"#.to_string(),
            "tiers.free.duration: must be >= 0.001 s (got 5e-324)",
        ),
        (
            r#"{"tiers": {"free": 5}}"#.to_string(),
            "tiers.free: invalid type: integer `5`, expected a policy object",
        ),
        (
            doc(json!({"endpoints": [{"policy": policy}]})),
            "endpoints[0].path: missing",
        ),
        (doc(json!({"api_key": {}})), "api_key.header: missing"),
        (doc(json!({"redis": {}})), "redis.url: missing"),
        (
            doc(json!({"layers": {"ip": {"points": 1, "duration": 1, "applies_to": "some"}}})),
            "layers.ip.applies_to: must be \"all\" or a list of tier names",
        ),
        (
            doc(json!({"layers": {"ip": {"points": 1, "duration": 1, "applies_to": ["gold"]}}})),
            "layers.ip.applies_to[0]: no tier named \"gold\"",
        ),
        (
            tier(json!({"applies_to": "all"})),
            "tiers.free.applies_to: only the ip layer",
        ),
        (
            doc(json!({"block_duration": 5e-324})),
            "block_duration: must be a number of seconds in [0.001, 31622400] (got 5e-324)",
        ),
        (
            r#"{"free": {"points": 0, "duration": 60}}"#.to_string(),
            "free.points: must be > 0 (got 0)",
        ),
        (
            doc(json!({"default_tier": "gold"})),
            "default_tier: no tier named \"gold\"",
        ),
        (
            doc(json!({"anonymous_tier": "anon"})),
            "anonymous_tier: no tier named \"anon\"",
        ),
        (
            doc(json!({"layers": {"ip": {"points": 0, "duration": 1}}})),
            "layers.ip.points: must be > 0",
        ),
        (doc(json!({"layers": {"user": "yes"}})), "layers.user: invalid type"),
        (doc(json!({"layers": {"global": true}})), "layers.global: unknown field"),
        (
            endpoint(json!({"method": "post", "path": "/x", "policy": policy})),
            "endpoints[0].method: must be",
        ),
        (
            endpoint(json!({"path": "x", "policy": policy})),
            "endpoints[0].path: must start with '/'",
        ),
        (
            endpoint(json!({"path": "/a/**/b", "policy": policy})),
            "endpoints[0].path: '**' may only be the last",
        ),
        (
            endpoint(json!({"path": "/a*", "policy": policy})),
            "endpoints[0].path: segment \"a*\"",
        ),
        (
            endpoint(json!({"path": "/x", "policy": {"points": 1, "duration": -1}})),
            "endpoints[0].policy.duration: must be > 0",
        ),
        (endpoint(json!({"path": "/x"})), "endpoints[0].policy: missing"),
        (
            doc(json!({"endpoints": [{"path": "/x", "policy": policy}, {"path": "/x", "policy": policy}]})),
            "endpoints[1].path: * /x is listed twice",
        ),
        (
            doc(json!({"client_ip": {"trusted_proxies": ["10.0.0.1", "10.0.0.0/40"]}})),
            "client_ip.trusted_proxies[1]: prefix must be <= 32 (got 40)",
        ),
        (
            doc(json!({"client_ip": {"trusted_proxies": ["proxy"]}})),
            "client_ip.trusted_proxies[0]: not an IP address",
        ),
        (
            doc(json!({"client_ip": {"ipv6_prefix": 0}})),
            "client_ip.ipv6_prefix: must be in 1..=128 (got 0)",
        ),
        (
            doc(json!({"client_ip": {"ipv4_prefix": 33}})),
            "client_ip.ipv4_prefix: must be in 1..=32 (got 33)",
        ),
        (
            doc(json!({"client_ip": {"header": "via"}})),
            "client_ip.header: unknown variant `via`",
        ),
        (
            doc(json!({"api_key": {"header": "x api key"}})),
            "api_key.header: not a header name",
        ),
        (
            doc(json!({"api_key": {"header": "x-api-key", "secret": "xyz"}})),
            "api_key.secret: must be 32 hex digits",
        ),
        (
            doc(json!({"allow": {"ips": ["1.2.3.4/99"]}})),
            "allow.ips[0]: prefix must be <= 32",
        ),
        (
            doc(json!({"deny": {"users": ["ok", ""]}})),
            "deny.users[1]: must not be empty",
        ),
        (doc(json!({"deny": {"user": ["x"]}})), "deny.user: unknown field"),
        (
            doc(json!({"block_duration": 0})),
            "block_duration: must be a number of seconds",
        ),
        (
            doc(json!({"block_duration": -3})),
            "block_duration: must be a number of seconds",
        ),
        (doc(json!({"shadow": "true"})), "shadow: invalid type"),
        (
            doc(json!({"response": {"headers": "fancy"}})),
            "response.headers: unknown variant `fancy`",
        ),
        (
            doc(json!({"response": {"body": "xml"}})),
            "response.body: unknown variant `xml`",
        ),
        (
            doc(json!({"response": {"key_error_status": 200}})),
            "response.key_error_status: must be an error status",
        ),
        (
            doc(json!({"failure_policy": "panic"})),
            "failure_policy: unknown variant `panic`",
        ),
        (
            doc(json!({"redis": {"url": "http://x"}})),
            "redis.url: must be a redis:// or rediss:// URL",
        ),
        (
            doc(json!({"redis": {"url": "redis://x", "sync_interval": 0}})),
            "redis.sync_interval: must be a number of seconds",
        ),
        (
            doc(json!({"redis": {"url": "redis://x", "batch_size": 0}})),
            "redis.batch_size: must be in",
        ),
        (
            doc(json!({"redis": {"url": "redis://x", "key_prefix": "a{b"}})),
            "redis.key_prefix: key prefix",
        ),
        (doc(json!({"max_keys": 0})), "max_keys: must be > 0"),
        (doc(json!({"max_keys": -1})), "max_keys: invalid value"),
        (doc(json!({"tiers2": {}})), "tiers2: unknown field"),
        ("{\"tiers\": ".to_string(), "tiers: EOF while parsing"),
        (
            format!("{} xyz", doc(json!({}))),
            "data after the JSON document (trailing characters at line 1 column",
        ),
        (
            format!("{}{}", doc(json!({})), doc(json!({}))),
            "data after the JSON document",
        ),
    ];
    for (json, want) in &cases {
        let err = Config::from_json(json).expect_err(json).to_string();
        assert!(err.starts_with(want), "{json}\n  got:  {err}\n  want: {want}...");
    }

    // Range problems are all reported at once.
    let err = Config::from_json(
        r#"{"tiers": {"free": {"points": -1, "duration": 60}, "pro": {"points": 1, "duration": 0}},
            "client_ip": {"ipv6_prefix": 200}, "max_keys": 0}"#,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tiers.free.points: must be > 0 (got -1)\n\
         tiers.pro.duration: must be > 0 (got 0)\n\
         client_ip.ipv6_prefix: must be in 1..=128 (got 200)\n\
         max_keys: must be > 0",
        "one `path: reason` line per problem"
    );
    // A tier that is invalid is still a tier name: no second problem for referring to it.
    let invalid_tier =
        Config::from_json(r#"{"tiers": {"free": {"points": 0, "duration": 60}}, "default_tier": "free"}"#).unwrap_err();
    assert_eq!(invalid_tier.to_string(), "tiers.free.points: must be > 0 (got 0)");
    let paths: Vec<&str> = err.problems().iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "tiers.free.points",
            "tiers.pro.duration",
            "client_ip.ipv6_prefix",
            "max_keys"
        ]
    );
}

#[tokio::test]
async fn distributed_mode_serves_the_same_limits() {
    let clock = ManualClock::new();
    // The node on the real clock, like the store: 3 per minute refills one token per 20 s,
    // far beyond this test's second.
    let node = Node::builder(Arc::new(MemoryStore::new()))
        .sync_interval(Duration::from_millis(20))
        .start()
        .unwrap();
    // Rejected in distributed mode, with paths.
    let err = LiveConfig::builder()
        .config(Config::from_json(&with(json!({"block_duration": 30, "api_key": {"header": "x-api-key"}}))).unwrap())
        .node(&node)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiers.anonymous.block_duration: not available in distributed mode"),
        "{err}"
    );
    assert!(err.contains("api_key.secret: required in distributed mode"), "{err}");

    let live = LiveConfig::builder()
        .config(Config::from_json(BASE).unwrap())
        .node(&node)
        .build()
        .unwrap();
    assert!(live.rules().is_distributed());
    // A reload without the secret keeps the one in use (every node keeps hashing alike); the
    // first configuration must have one.
    let mut without: serde_json::Value = serde_json::from_str(BASE).unwrap();
    without["api_key"] = json!({"header": "x-api-key"});
    live.replace_json(&without.to_string())
        .expect("a reload without the secret keeps the one in use");
    let s = start_live(live, clock).await;
    let c = client();
    let mut statuses = Vec::new();
    // Until ten requests in a row are refused (at most 80): a loaded machine may delay the
    // sync that brings the tier's last token.
    while statuses.len() < 80 && statuses.iter().rev().take_while(|s| **s == 429).count() < 10 {
        statuses.push(get_(&c, &s, &[]).await.status.as_u16());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The first request waits for its keys' first claims instead of being denied cold; the
    // node admits the tier's 3 and no more (later claims come with later syncs).
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let r = get_(&c, &s, &[]).await;
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().unwrap() >= 1));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""ip";q=50;w=60, "user:anonymous";q=3;w=60"#)
    );
    // The same limits behind the layer typed with the inner body: the refused client still
    // refused with the JSON body, a new user admitted after waiting for its first claim.
    let same = serve_router(app_same_body(s.live.clone()), true).await;
    let refused = send(&c, same, "GET", "/", &[]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["policy"], "user:anonymous");
    let admitted = send(&c, same, "GET", "/", &[("x-user", "bob"), ("x-tier", "free")]).await;
    assert_eq!((admitted.status.as_u16(), admitted.text()), (200, "hello"));
    assert!(admitted.header("ratelimit").is_some(), "{:?}", admitted.headers);
    node.shutdown().await;
}

/// A gRPC handler's body: one empty message, then the trailers with `grpc-status: 0`.
struct GrpcOk {
    step: u8,
}

impl http_body::Body for GrpcOk {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.step += 1;
        std::task::Poll::Ready(match self.step {
            // Not compressed, length 0.
            1 => Some(Ok(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])))),
            2 => {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                Some(Ok(http_body::Frame::trailers(t)))
            }
            _ => None,
        })
    }
}

#[tokio::test]
async fn a_refused_grpc_call_gets_resource_exhausted_over_http2() {
    let json = r#"{"tiers": {"anonymous": {"points": 2, "duration": 60}}}"#;
    let clock = ManualClock::new();
    let live = LiveConfig::builder()
        .config(Config::from_json(json).unwrap())
        .clock(clock.clock())
        .build()
        .unwrap();
    let router = Router::new()
        .route(
            "/demo.Greeter/SayHello",
            post(|| async {
                axum::http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(axum::body::Body::new(GrpcOk { step: 0 }))
                    .unwrap()
            }),
        )
        .layer(RateLimitLayer::new(live));
    let addr = serve_router(router, true).await;
    // HTTP/2 over cleartext, with prior knowledge: what gRPC clients speak.
    let c: HttpClient = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let call = || {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/demo.Greeter/SayHello"))
            .header("content-type", "application/grpc+proto")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let c = c.clone();
        async move {
            let resp = c.request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await.unwrap();
            (
                parts.status,
                parts.headers,
                collected.trailers().cloned(),
                collected.to_bytes(),
            )
        }
    };
    for _ in 0..2 {
        let (status, headers, trailers, body) = call().await;
        assert_eq!(status, 200);
        assert_eq!(
            trailers.unwrap()["grpc-status"],
            "0",
            "admitted: the service's own trailers"
        );
        assert_eq!(body.len(), 5);
        assert!(headers.contains_key("ratelimit"));
    }
    let (status, headers, trailers, body) = call().await;
    assert_eq!(status, 200, "gRPC answers over HTTP 200");
    // Trailers-only: the status is in the one header block that ends the stream.
    assert!(trailers.is_none() && body.is_empty());
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert_eq!(
        headers["grpc-message"],
        "rate limit exceeded (user:anonymous); retry after 30 s"
    );
    assert_eq!(headers["grpc-retry-pushback-ms"], "30000");
    assert_eq!(headers["retry-after"], "30");

    // The same route called as plain HTTP is refused as HTTP.
    let r = send(&client(), addr, "POST", "/demo.Greeter/SayHello", &[]).await;
    assert_eq!(r.status, 429);
    assert!(!r.headers.contains_key("grpc-status"));
}

/// A request to send: method, path and headers.
type Sent<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
/// An answer: status, every header but `date` (sorted), and body.
type Answer = (u16, Vec<(String, String)>, Bytes);

/// The answers of `router` to `requests`, over a real connection.
async fn answers(router: Router, connect_info: bool, requests: &[Sent<'_>]) -> Vec<Answer> {
    let addr = serve_router(router, connect_info).await;
    let c = client();
    let mut out = Vec::new();
    for (method, path, headers) in requests {
        let r = send(&c, addr, method, path, headers).await;
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(n, _)| n.as_str() != "date")
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        h.sort();
        out.push((r.status.as_u16(), h, r.body));
    }
    out
}

#[tokio::test]
async fn the_same_body_layer_answers_byte_for_byte_as_the_wrapping_one() {
    let json = with(json!({"response": {"headers": "both"}}));
    let new_live = || {
        LiveConfig::builder()
            .config(Config::from_json(&json).unwrap())
            .clock(ManualClock::new().clock())
            .build()
            .unwrap()
    };
    let premium: &[(&str, &str)] = &[("x-user", "ann"), ("x-tier", "premium")];
    let requests: Vec<Sent<'_>> = vec![
        ("GET", "/", &[]),
        ("GET", "/", &[]),
        ("HEAD", "/", &[]),
        ("GET", "/", &[]),
        ("GET", "/whoami", &[]),
        ("POST", "/api/ai/generate", premium),
        ("POST", "/api/ai/generate", premium),
        ("POST", "/api/ai/generate", premium),
        ("GET", "/", premium),
    ];
    let wrapped = answers(app(layer(new_live())), true, &requests).await;
    let same = answers(app_same_body(new_live()), true, &requests).await;
    let statuses: Vec<u16> = wrapped.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 200, 200, 429, 200], "{wrapped:?}");
    assert!(wrapped[3].2.starts_with(b"{\"error\""), "a 429 has the JSON body");
    assert_eq!(same, wrapped);
    // No client address: the key-error answer, alike too.
    let wrapped = answers(app(layer(new_live())), false, &requests[..1]).await;
    let same = answers(app_same_body(new_live()), false, &requests[..1]).await;
    assert_eq!(wrapped[0].0, 500);
    assert_eq!(same, wrapped);
}

/// [`app`] behind [`layer`], typed with the inner body.
fn app_same_body(live: LiveConfig) -> Router {
    routes().layer(builder(live).build().same_body())
}
