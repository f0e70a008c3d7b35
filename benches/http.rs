//! HTTP cost of an axum hello-world route with and without `RateLimitLayer` (local mode, ip
//! and user layers, limits never reached), with `tower_governor` on the same route as the
//! peer, as criterion groups.
//!
//! The variants, each a criterion function of both groups: `default` (`RateLimit-Policy` and
//! `RateLimit` on every response), `body=wrapped` (the same without
//! [`same_body`](tollgate::http::RateLimitLayer::same_body): the response body wrapped, which
//! axum boxes again; every other tollgate variant keeps the route's body type),
//! `policy_header=denials` (`RateLimit-Policy` with refusals
//! only: `"response": {"policy_header": "denials"}`), `headers=none` (no rate-limit header on
//! admissions), `one_limit headers=none` (the anonymous tier only, keyed by client address,
//! no header on admissions: the work tower_governor does), `peer=tower_governor` (0.8, its
//! defaults: no header on admissions, one governor key per peer IP),
//! `peer=tower_governor+headers` (`use_headers()`: two `x-ratelimit-*` headers on admissions)
//! and `reference=headers_only` (checks nothing and adds to every response the two headers the
//! default configuration sends, byte for byte: what those headers cost on their own).
//!
//! Group `http_in_process`: the routers called in this thread without a connection (the
//! request built, routed, answered and dropped). Each sample times the plain route, the
//! variant and the plain route again over the same number of requests; criterion's figure is
//! the variant's time per request, and the line gives what the variant adds to a request
//! (its time minus the mean of the plain ones around it) and the plain route's time, medians
//! over the samples, free of the network's noise:
//!
//! ```text
//! http in_process added_ns_per_request=<ns> bare_ns_per_request=<ns>
//! http in_process body=wrapped added_ns_per_request=<ns> bare_ns_per_request=<ns>
//! http in_process policy_header=denials added_ns_per_request=<ns> bare_ns_per_request=<ns>
//! ...
//! ```
//!
//! Then each pair of tollgate and its peer doing comparable work is timed in rounds of its own,
//! in process: the plain route, tollgate, the peer and the plain route again over the same
//! number of requests (which of the two goes first alternates), so that both are measured
//! against the same plain runs. The line gives the medians over the rounds of what each adds
//! to a request and their quotient (pair `one_limit`: one limit, no header on admissions,
//! against tower_governor's defaults; pair `default`: tollgate's defaults against
//! tower_governor with `use_headers()`):
//!
//! ```text
//! http in_process_vs_peer one_limit tollgate_ns=<ns> peer_ns=<ns> ratio=<tollgate/peer>
//! http in_process_vs_peer default tollgate_ns=<ns> peer_ns=<ns> ratio=<tollgate/peer>
//! ```
//!
//! Group `http_throughput`: every server runs in one runtime and has its own keep-alive client
//! connections (32), loaded from this process over loopback, which send requests only while
//! their server is the active one. Each sample loads the plain route, the variant and the
//! plain route again, each for the same number of responses (batches of 1000); criterion's
//! figure is the variant's time per batch, and a sample's ratio is the variant's throughput over the mean
//! of the two plain ones around it, so that slow drift in the machine's speed cancels. Each
//! line gives the medians over the samples:
//!
//! ```text
//! http throughput with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput body=wrapped with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput policy_header=denials with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput headers=none with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput one_limit headers=none with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput peer=tower_governor with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput peer=tower_governor+headers with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput reference=headers_only with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput_vs_peer one_limit tollgate_ratio=<ratio> peer_ratio=<ratio>
//! http throughput_vs_peer default tollgate_ratio=<ratio> peer_ratio=<ratio>
//! ```
//!
//! (`throughput_vs_peer` repeats the two pairs' ratios to the bare route from the lines above.)

#[path = "support/paired.rs"]
mod paired;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use paired::median;

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
/// How often the count of responses is read.
const POLL: Duration = Duration::from_micros(500);
/// Samples of fewer requests are not kept for the in-process lines (the warm-up's first calls).
const MIN_KEPT_REQUESTS: u64 = 200;
/// Responses per iteration of the throughput group: switching servers costs a settling time,
/// so an iteration is a batch large enough to dwarf it.
const BATCH: u64 = 1000;
/// Rounds of each pair's in-process comparison, and requests per run in a round.
const PAIR_ROUNDS: usize = 31;
const PAIR_REQUESTS: u64 = 20_000;
/// The pairs of tollgate and its peer: the pair's name, and the labels of the two variants.
const PAIRS: [(&str, &str, &str); 2] = [
    ("one_limit", "one_limit headers=none ", "peer=tower_governor "),
    ("default", "", "peer=tower_governor+headers "),
];

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

/// Time for server `index` to answer `n` requests (scaled from the responses counted, which
/// may be a few more), after a short settling time in which the previous server's requests in
/// flight complete.
async fn answer(clients: &[Clients], index: usize, active: &watch::Sender<usize>, n: u64) -> Duration {
    active.send_replace(index);
    tokio::time::sleep(SETTLE).await;
    let count = &clients[index].count;
    let start_count = count.load(Ordering::Relaxed);
    let start = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let done = count.load(Ordering::Relaxed) - start_count;
        if done >= n {
            return start.elapsed().mul_f64(n as f64 / done as f64);
        }
    }
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

/// Time of `n` requests through `router` called in process (see [`call_in_process`]): the
/// request is built, routed, answered and dropped.
fn in_process_time(router: &mut Router, n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        assert_eq!(call_in_process(router).status(), 200, "a limit was reached");
    }
    start.elapsed()
}

/// The variant's name on the output lines, and as a criterion function.
fn function_name(label: &str) -> &str {
    match label.trim() {
        "" => "default",
        l => l,
    }
}

/// Group `http_in_process` (see the module doc). The last router is the plain route.
fn in_process(group: &mut BenchmarkGroup<'_, WallTime>, routers: &mut [(&'static str, Router)]) {
    let (variants, plain) = routers.split_at_mut(routers.len() - 1);
    let plain = &mut plain[0].1;
    let mut bare = Vec::new();
    let mut lines = Vec::new();
    for (label, router) in variants.iter_mut() {
        let mut extra = Vec::new();
        group.bench_function(function_name(label), |b| {
            b.iter_custom(|n| {
                let before = in_process_time(plain, n);
                let t = in_process_time(router, n);
                let after = in_process_time(plain, n);
                if n >= MIN_KEPT_REQUESTS {
                    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
                    let around = (per(before) + per(after)) / 2.0;
                    extra.push(per(t) - around);
                    bare.push(around);
                }
                t
            })
        });
        if !extra.is_empty() {
            lines.push((*label, median(extra)));
        }
    }
    let bare = median(bare);
    for (label, extra) in lines {
        println!("http in_process {label}added_ns_per_request={extra:.0} bare_ns_per_request={bare:.0}");
    }
}

/// The pairs' in-process comparison (see the module doc).
fn in_process_vs_peer(routers: &mut [(&'static str, Router)]) {
    let labels: Vec<&str> = routers.iter().map(|(l, _)| *l).collect();
    let index = |label: &str| labels.iter().position(|l| *l == label).expect("a bench variant");
    let plain = routers.len() - 1;
    let per = |d: Duration| d.as_nanos() as f64 / PAIR_REQUESTS as f64;
    for (pair, ours, peer) in PAIRS {
        let (ours, peer) = (index(ours), index(peer));
        let (mut added_ours, mut added_peer) = (Vec::new(), Vec::new());
        for round in 0..PAIR_ROUNDS {
            let before = in_process_time(&mut routers[plain].1, PAIR_REQUESTS);
            let (first, second) = if round % 2 == 0 { (ours, peer) } else { (peer, ours) };
            let first_t = in_process_time(&mut routers[first].1, PAIR_REQUESTS);
            let second_t = in_process_time(&mut routers[second].1, PAIR_REQUESTS);
            let after = in_process_time(&mut routers[plain].1, PAIR_REQUESTS);
            let (ours_t, peer_t) = if round % 2 == 0 {
                (first_t, second_t)
            } else {
                (second_t, first_t)
            };
            let around = (per(before) + per(after)) / 2.0;
            added_ours.push(per(ours_t) - around);
            added_peer.push(per(peer_t) - around);
        }
        let (ours_ns, peer_ns) = (median(added_ours), median(added_peer));
        println!(
            "http in_process_vs_peer {pair} tollgate_ns={ours_ns:.0} peer_ns={peer_ns:.0} ratio={:.3}",
            ours_ns / peer_ns
        );
    }
}

fn http(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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
    // The routers need the runtime for the config's and tower_governor's background work.
    let _guard = rt.enter();
    let default = hello()
        .layer(RateLimitLayer::new(live("")).same_body())
        .with_state::<()>(());
    // The two headers the default configuration sends on an admission, as it sends them:
    // the reference variant adds them to every response without checking anything.
    let sent = headers_sent(&mut default.clone());
    let mut routers = [
        ("", default),
        ("body=wrapped ", hello().layer(RateLimitLayer::new(live("")))),
        (
            "policy_header=denials ",
            hello().layer(RateLimitLayer::new(live(r#", "response": {"policy_header": "denials"}"#)).same_body()),
        ),
        (
            "headers=none ",
            hello().layer(RateLimitLayer::new(live(r#", "response": {"headers": "none"}"#)).same_body()),
        ),
        (
            "one_limit headers=none ",
            hello().layer(RateLimitLayer::new(one_limit).same_body()),
        ),
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

    let mut group = c.benchmark_group("http_in_process");
    group.throughput(Throughput::Elements(1));
    in_process(&mut group, &mut routers);
    group.finish();
    in_process_vs_peer(&mut routers);

    let (active, receiver) = watch::channel(STOP - 1);
    let clients = rt.block_on(async {
        let mut clients = Vec::new();
        for (i, (_, router)) in routers.iter().enumerate() {
            let addr = serve(router.clone()).await;
            clients.push(Clients::start(addr, i, &receiver).await);
        }
        clients
    });
    let mut group = c.benchmark_group("http_throughput");
    group.throughput(Throughput::Elements(BATCH));
    // Every sample loads three servers in turn, each after a settling time: few samples of the
    // same size.
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    let mut without = Vec::new();
    let mut lines = Vec::new();
    for (i, (label, _)) in routers[..plain].iter().enumerate() {
        let (mut rps, mut ratios) = (Vec::new(), Vec::new());
        group.bench_function(function_name(label), |b| {
            b.iter_custom(|iters| {
                let n = iters * BATCH;
                rt.block_on(async {
                    let before = answer(&clients, plain, &active, n).await;
                    let t = answer(&clients, i, &active, n).await;
                    let after = answer(&clients, plain, &active, n).await;
                    {
                        let rate = |d: Duration| n as f64 / d.as_secs_f64();
                        let around = (rate(before) + rate(after)) / 2.0;
                        rps.push(rate(t));
                        ratios.push(rate(t) / around);
                        without.push(around);
                    }
                    t
                })
            })
        });
        if !rps.is_empty() {
            lines.push((*label, median(rps), median(ratios)));
        }
    }
    group.finish();
    active.send_replace(STOP);
    let without = median(without);
    for (label, rps, ratio) in &lines {
        println!("http throughput {label}with_layer={rps:.0} without_layer={without:.0} ratio={ratio:.3}");
    }
    let ratio_of = |label: &str| lines.iter().find(|(l, ..)| *l == label).map_or(f64::NAN, |(.., r)| *r);
    for (pair, ours, peer) in PAIRS {
        println!(
            "http throughput_vs_peer {pair} tollgate_ratio={:.3} peer_ratio={:.3}",
            ratio_of(ours),
            ratio_of(peer)
        );
    }
}

criterion_group!(benches, http);
criterion_main!(benches);
