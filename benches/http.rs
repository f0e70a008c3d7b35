//! HTTP throughput of an axum hello-world route with and without `RateLimitLayer` (local mode,
//! ip and user layers, limits never reached), loaded from this process over loopback.
//!
//! The two servers run side by side in one runtime and are loaded in turn, several times
//! (run-to-run noise here is about 10%); the result is the median of the pairwise ratios:
//!
//! ```text
//! http throughput with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! http throughput policy_header=denials with_layer=<req/s> without_layer=<req/s> ratio=<with/without>
//! ```
//!
//! The first line is the default configuration (both headers on every response); the second
//! sends `RateLimit-Policy` with refusals only (`"response": {"policy_header": "denials"}`).
//!
//! `HTTP_BENCH_SECS` (default 1) sets the length of one run, `HTTP_BENCH_PAIRS` (default 7)
//! the number of pairs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tollgate::config::{Config, LiveConfig};
use tollgate::http::RateLimitLayer;

const CONNECTIONS: usize = 32;

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

/// Requests per second over `secs`, from `CONNECTIONS` keep-alive connections.
async fn load(addr: SocketAddr, secs: Duration) -> f64 {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (done, count) = (done.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            while !done.load(Ordering::Relaxed) {
                send.ready().await.unwrap();
                let req = hyper::Request::get(format!("http://{addr}/"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200, "a limit was reached");
                resp.into_body().collect().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Let the connections open before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start_count = count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(secs).await;
    let n = count.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / elapsed.as_secs_f64()
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

/// Median requests per second with and without the layer, and the median of the pairwise
/// ratios, over `pairs` alternated pairs of runs.
async fn compare(with: SocketAddr, without: SocketAddr, pairs: usize, secs: Duration, label: &str) -> (f64, f64, f64) {
    let (mut w, mut wo, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        // Alternate which goes first, so that drift does not favour one side.
        let (a, b) = if i % 2 == 0 {
            let a = load(with, secs).await;
            (a, load(without, secs).await)
        } else {
            let b = load(without, secs).await;
            (load(with, secs).await, b)
        };
        eprintln!(
            "{label}pair {i}: with_layer={a:.0} without_layer={b:.0} ratio={:.3}",
            a / b
        );
        w.push(a);
        wo.push(b);
        ratios.push(a / b);
    }
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    eprintln!("{label}ratios: {}", listed.join(" "));
    (median(w), median(wo), median(ratios))
}

fn main() {
    let secs = Duration::from_secs(env("HTTP_BENCH_SECS", 1).clamp(1, 30));
    let pairs = env("HTTP_BENCH_PAIRS", 7).clamp(1, 50) as usize;
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
        let with = serve(hello().layer(RateLimitLayer::new(live("")))).await;
        let without = serve(hello()).await;
        let denials = serve(hello().layer(RateLimitLayer::new(live(
            r#", "response": {"policy_header": "denials"}"#,
        ))))
        .await;

        // Warm-up.
        load(with, Duration::from_millis(300)).await;
        load(without, Duration::from_millis(300)).await;
        load(denials, Duration::from_millis(300)).await;

        let (w, wo, ratio) = compare(with, without, pairs, secs, "").await;
        println!("http throughput with_layer={w:.0} without_layer={wo:.0} ratio={ratio:.3}");
        let (w, wo, ratio) = compare(denials, without, pairs, secs, "policy_header=denials ").await;
        println!("http throughput policy_header=denials with_layer={w:.0} without_layer={wo:.0} ratio={ratio:.3}");
    });
}
