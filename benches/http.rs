//! HTTP throughput of an axum hello-world route with and without `RateLimitLayer` (local mode,
//! ip and user layers, limits never reached), loaded from this process over loopback, with
//! `tower_governor` on the same route as the peer.
//!
//! Every server runs in one runtime and has its own keep-alive client connections, which send
//! requests only while their server is the active one: the servers are loaded in turn, in
//! short slices. Each round loads the plain route, then each variant followed by the plain
//! route again (the order of the variants rotates from round to round); a variant's ratio in
//! a round is its throughput over the mean of the two plain slices around it, so that slow
//! drift in the machine's speed cancels. Each line gives the medians over the rounds:
//!
//! ```text
//! http throughput with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput policy_header=denials with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput headers=none with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput one_limit headers=none with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput peer=tower_governor with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput peer=tower_governor+headers with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput reference=headers_only with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! ```
//!
//! The first line is the default configuration (`RateLimit-Policy` and `RateLimit` on every
//! response); the second sends `RateLimit-Policy` with refusals only (`"response":
//! {"policy_header": "denials"}`); the third sends no rate-limit header on admissions
//! (`"response": {"headers": "none"}`); the fourth checks one limit (the anonymous tier, keyed
//! by client address) and sends no header on admissions, the work tower_governor does. The
//! peer is `tower_governor` 0.8 with its defaults (no header on admissions, one governor key
//! per peer IP), then with `use_headers()` (two `x-ratelimit-*` headers on admissions). The
//! reference checks nothing and adds to every response the two headers the default
//! configuration sends, byte for byte: what those headers cost on their own.
//!
//! Before the HTTP rounds, the same routers are called in this thread without a connection
//! (the request built, routed, answered and dropped, 20,000 times a measurement), in rounds
//! of the same shape, which gives what each variant adds to a request's cost, free of the
//! network's noise (medians over the rounds):
//!
//! ```text
//! http in_process added_ns_per_request=<ns> bare_ns_per_request=<ns>
//! http in_process policy_header=denials added_ns_per_request=<ns> bare_ns_per_request=<ns>
//! ...
//! ```
//!
//! `HTTP_BENCH_MS` (default 500) sets the length of one slice, `HTTP_BENCH_ROUNDS` (default 9)
//! the number of rounds of both parts.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tollgate::config::{Config, LiveConfig};
use tollgate::http::RateLimitLayer;
use tower::util::MapResponseLayer;
use tower::Service;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::GovernorLayer;

const CONNECTIONS: usize = 32;
/// The value of the active-server channel that ends the clients.
const STOP: usize = usize::MAX;
/// Time for the requests in flight to the previous server to complete.
const SETTLE: Duration = Duration::from_millis(20);

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .unwrap();
    });
    addr
}

/// A server's clients: `CONNECTIONS` keep-alive connections that send requests while their
/// server is the active one, and the count of responses.
struct Clients {
    count: Arc<AtomicU64>,
}

impl Clients {
    async fn start(addr: SocketAddr, index: usize, active: &watch::Receiver<usize>) -> Clients {
        let count = Arc::new(AtomicU64::new(0));
        for _ in 0..CONNECTIONS {
            let (count, mut active) = (count.clone(), active.clone());
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            tokio::spawn(async move {
                loop {
                    let now = *active.borrow_and_update();
                    if now == STOP {
                        return;
                    }
                    if now != index {
                        if active.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    send.ready().await.unwrap();
                    let req = hyper::Request::get(format!("http://{addr}/"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200, "a limit was reached");
                    resp.into_body().collect().await.unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        Clients { count }
    }
}

/// Requests per second of server `index` over `slice`, after a short settling time in which
/// the previous server's requests in flight complete.
async fn slice(clients: &[Clients], index: usize, active: &watch::Sender<usize>, slice: Duration) -> f64 {
    active.send_replace(index);
    tokio::time::sleep(SETTLE).await;
    let count = &clients[index].count;
    let start_count = count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(slice).await;
    let n = count.load(Ordering::Relaxed) - start_count;
    n as f64 / start.elapsed().as_secs_f64()
}

/// One request through `router`, called in this thread without a connection, from the same
/// client address every time. The hello-world route answers at once, so the future is ready
/// on its first poll.
fn call_in_process(router: &mut Router) -> axum::response::Response {
    let mut req = hyper::Request::get("/").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
    let Poll::Ready(resp) = pin!(router.call(req)).poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("the hello-world route answers at once");
    };
    match resp {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// The rate-limit headers of one response of `router`.
fn headers_sent(router: &mut Router) -> Vec<(HeaderName, HeaderValue)> {
    let sent: Vec<_> = call_in_process(router)
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("ratelimit"))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    assert_eq!(sent.len(), 2, "RateLimit-Policy and RateLimit");
    sent
}

/// Requests in one in-process measurement.
const IN_PROCESS_REQUESTS: u32 = 20_000;

/// Nanoseconds per request through `router` called in process (see [`call_in_process`]): the
/// request is built, routed, answered and dropped.
fn in_process_ns(router: &mut Router) -> f64 {
    let start = Instant::now();
    for _ in 0..IN_PROCESS_REQUESTS {
        assert_eq!(call_in_process(router).status(), 200, "a limit was reached");
    }
    start.elapsed().as_nanos() as f64 / f64::from(IN_PROCESS_REQUESTS)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A server under test: its label on the output line and its address.
struct Variant {
    label: &'static str,
    addr: SocketAddr,
    /// Requests per second in each round.
    runs: Vec<f64>,
    /// Each round's ratio against the plain route.
    ratios: Vec<f64>,
}

impl Variant {
    fn name(&self) -> &'static str {
        if self.label.is_empty() {
            "default "
        } else {
            self.label
        }
    }
}

/// What each variant adds to a request's cost when the router is called in this thread
/// (no connection, no other thread): in each round the bare route, then each variant followed
/// by the bare route again; a variant's cost in a round is its time per request minus the
/// mean of the bare ones around it. Prints the medians over the rounds.
fn in_process(mut routers: Vec<(&'static str, Router)>, rounds: usize) {
    let plain = routers.len() - 1;
    let mut extra = vec![Vec::new(); plain];
    let mut bare = Vec::new();
    // Warm-up.
    for (_, router) in &mut routers {
        in_process_ns(router);
    }
    for round in 0..rounds {
        let mut before = in_process_ns(&mut routers[plain].1);
        for k in 0..plain {
            let i = (round + k) % plain;
            let ns = in_process_ns(&mut routers[i].1);
            let after = in_process_ns(&mut routers[plain].1);
            let around = (before + after) / 2.0;
            extra[i].push(ns - around);
            bare.push(around);
            before = after;
        }
    }
    let bare = median(bare);
    for ((label, _), extra) in routers.iter().zip(extra) {
        println!(
            "http in_process {}added_ns_per_request={:.0} bare_ns_per_request={bare:.0}",
            label,
            median(extra)
        );
    }
}

fn main() {
    let secs = Duration::from_millis(env("HTTP_BENCH_MS", 500).clamp(100, 30_000));
    let rounds = env("HTTP_BENCH_ROUNDS", 9).clamp(1, 100) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Limits far above what loopback can reach: every request is checked and allowed.
        const LIMITS: &str = r#""tiers": {"anonymous": {"points": 1000000000, "duration": 60}},
                "layers": {"ip": {"points": 1000000000, "duration": 60}}"#;
        let live = |extra: &str| LiveConfig::new(Config::from_json(&format!("{{{LIMITS}{extra}}}")).unwrap()).unwrap();
        let hello = || Router::new().route("/", get(|| async { "Hello, World!" }));
        // One token a nanosecond and a burst of a billion: never reached either.
        let governor = || {
            GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(1_000_000_000)
                .finish()
                .unwrap()
        };
        let governor_headers = || {
            GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(1_000_000_000)
                .use_headers()
                .finish()
                .unwrap()
        };
        // One limit per client address, no header on admissions: what tower_governor does.
        let one_limit = LiveConfig::new(
            Config::from_json(
                r#"{"tiers": {"anonymous": {"points": 1000000000, "duration": 60}},
                    "response": {"headers": "none"}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let default = hello().layer(RateLimitLayer::new(live(""))).with_state::<()>(());
        // The two headers the default configuration sends on an admission, as it sends them:
        // the reference variant adds them to every response without checking anything.
        let sent = headers_sent(&mut default.clone());
        let routers = [
            ("", default),
            (
                "policy_header=denials ",
                hello().layer(RateLimitLayer::new(live(
                    r#", "response": {"policy_header": "denials"}"#,
                ))),
            ),
            (
                "headers=none ",
                hello().layer(RateLimitLayer::new(live(r#", "response": {"headers": "none"}"#))),
            ),
            ("one_limit headers=none ", hello().layer(RateLimitLayer::new(one_limit))),
            ("peer=tower_governor ", hello().layer(GovernorLayer::new(governor()))),
            (
                "peer=tower_governor+headers ",
                hello().layer(GovernorLayer::new(governor_headers())),
            ),
            (
                "reference=headers_only ",
                hello().layer(MapResponseLayer::new(move |mut r: axum::response::Response| {
                    for (name, value) in &sent {
                        r.headers_mut().insert(name.clone(), value.clone());
                    }
                    r
                })),
            ),
            ("without", hello()),
        ]
        .map(|(label, router)| (label, router.with_state::<()>(())));
        let plain = routers.len() - 1;

        in_process(routers.to_vec(), rounds);

        let mut variants = Vec::new();
        for (label, router) in routers {
            variants.push(Variant {
                label,
                addr: serve(router).await,
                runs: Vec::new(),
                ratios: Vec::new(),
            });
        }
        let n = variants.len();
        let (active, receiver) = watch::channel(STOP - 1);
        let mut clients = Vec::new();
        for (i, v) in variants.iter().enumerate() {
            clients.push(Clients::start(v.addr, i, &receiver).await);
        }
        // Warm-up.
        for i in 0..n {
            slice(&clients, i, &active, Duration::from_millis(200)).await;
        }
        // Each round: the plain route, then each variant followed by the plain route again; a
        // variant's ratio is against the mean of the plain slices on either side of it.
        let mut without = Vec::new();
        for round in 0..rounds {
            let mut before = slice(&clients, plain, &active, secs).await;
            let mut listed = Vec::new();
            for k in 0..plain {
                // The order of the variants rotates from round to round.
                let i = (round + k) % plain;
                let rps = slice(&clients, i, &active, secs).await;
                let after = slice(&clients, plain, &active, secs).await;
                let around = (before + after) / 2.0;
                variants[i].runs.push(rps);
                variants[i].ratios.push(rps / around);
                without.push(around);
                before = after;
                listed.push(format!("{}{:.3}", variants[i].name(), rps / around));
            }
            eprintln!("round {round}: {}", listed.join(", "));
        }
        active.send_replace(STOP);
        for v in &variants[..plain] {
            println!(
                "http throughput {}with_layer={:.0} without_layer={:.0} ratio={:.3}",
                v.label,
                median(v.runs.clone()),
                median(without.clone()),
                median(v.ratios.clone())
            );
        }
    });
}
