//! Request latency of a per-minute tier user through `RateLimitLayer` in distributed mode,
//! over real HTTP, against the same route without the layer (the floor). Criterion-free: one
//! measurement of `HTTP_DIST_SECONDS` (default 20) per phase, run as
//! `cargo bench --features http,redis --bench http_distributed` (as a test, without
//! `--bench`, 1 s per phase).
//!
//! Setup, all in this process on one tokio runtime (2 worker threads): a redis-server of its
//! own on a loopback port; [`INSTANCES`] axum hello-world servers behind `RateLimitLayer`, each
//! with its own `Node` (sync interval [`SYNC_INTERVAL`]) over its own `RedisStore` connection;
//! [`INSTANCES`] servers of the same route without the layer. The configuration is the shipped
//! `rate-limit-tiers.json` with an `api_key.secret` (which distributed mode requires, so that
//! every node hashes API keys alike) and the loopback address as a trusted proxy: every user
//! sends its own address in `x-forwarded-for`, as behind a load balancer, so each request
//! passes the ip layer (1000 per minute per address, not reached here) and the user layer of
//! its tier ([`TIER`]: 100 per minute per user, burst 100), both shared through Redis. A user is
//! identified by its API key (`x-api-key`), which the layer's `api_key_validator` maps to the
//! user and its tier from an in-memory table.
//!
//! Traffic: [`USERS`] users, each sending requests as a Poisson process at [`LOAD`] times its
//! tier's rate to a random instance with the layer, and at the same time, as a second Poisson
//! process of the same rate, the same requests (same headers) to a random instance without
//! it. Requests are sent open-loop (a slow answer does not delay the next request) through
//! one hyper client with keep-alive connections over loopback (opened before measuring).
//! Each request's latency is the time from sending it to the last byte of its response. At
//! this rate a user reaches each instance every `INSTANCES / (LOAD x rate)` = 1.6 s: its keys
//! are cold on the instance, and a request costs a claim on demand (one Redis round trip,
//! shared with the other keys asked for meanwhile).
//!
//! Two phases, each with the bare route measured in the same period, each printing one line:
//!
//! ```text
//! http distributed per_minute_tier users=100 points_per_min=100 load=1.5 instances=4 p50_us=<..> p99_us=<..> bare_p50_us=<..> bare_p99_us=<..> allowed_pct=<..>
//! http distributed per_minute_tier_at_limit users=100 points_per_min=100 load=1.5 instances=4 p50_us=<..> p99_us=<..> bare_p50_us=<..> bare_p99_us=<..> allowed_pct=<..>
//! ```
//!
//! * `per_minute_tier`: the users start with full buckets. At 1.5 x the rate a user's burst
//!   lasts `burst / (0.5 x rate)` = 2 min, so over a run of 20 s nearly every request is
//!   admitted (`allowed_pct` near 100).
//! * `per_minute_tier_at_limit`: right after every user spent the rest of its burst (requests
//!   sent one after another, round-robin over the instances, until every instance refused it
//!   in a row; not measured): the limits act, and about two requests in three are admitted.
//!
//! `allowed_pct` is the share of the layer's responses that were 2xx (the others are 429).
//! After each phase's line a `detail` line gives:
//!
//! ```text
//! http distributed <phase> detail requests=<n> bare_requests=<n> denied=<n> failed=<n> exact_allowed_pct_min=<..> exact_allowed_pct_max=<..> p90_us=<..> p999_us=<..> bare_p90_us=<..> bare_p999_us=<..> redis_ping_p50_us=<..> redis_ping_p99_us=<..> redis_script_us_per_call=<..> claims_on_demand=<n> deferred=<n> syncs=<n> round_trips=<n> failed_round_trips=<n>
//! ```
//!
//! `failed`: requests without an answer within [`REQUEST_TIMEOUT`] (both routes);
//! `exact_allowed_pct_min` and `_max`: the share one exact limiter would have admitted of the
//! same requests at the same times, from full buckets (both the same), or at the limit from a
//! bucket that held nothing (min) or just under a token (max) at each user's last refusal while
//! spending (a refusal says less than a token was left); `redis_ping_*`: a Poisson process of
//! `PING`s to the same Redis over a connection of their own, at the rate of all layered
//! requests together, in the same period (one round trip from this process);
//! `redis_script_us_per_call`: Redis's own time per `EVALSHA` (the nodes' claims, syncs
//! included, from `INFO commandstats`); then what the nodes did in the phase, summed over the
//! instances (`claims_on_demand`: store calls made for waiting checks; `deferred`: waiting
//! checks past the nodes' budget, whose claims went with the next sync; `syncs`,
//! `round_trips`, `failed_round_trips`: calls that failed or timed out, which grant nothing).
//! Everything shares this machine's cores with redis-server: on a busy machine the tails (p99)
//! of every figure, the floor's included, grow.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_server::RedisServer;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tollgate::config::{Config, LiveConfig};
use tollgate::http::{RateLimitLayer, Verified};
use tollgate::store::{RedisConfig, RedisStore};
use tollgate::{node::NodeStats, Limiter, ManualClock, Node, Policy};

/// Service instances, each with its own node.
const INSTANCES: usize = 4;
/// Users of the per-minute tier, each a Poisson process.
const USERS: usize = 100;
/// Offered load per user, as a multiple of its tier's rate.
const LOAD: f64 = 1.5;
/// The tier every user is on (a per-minute tier of the shipped file).
const TIER: &str = "free";
/// The nodes' sync interval.
const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Measured time per phase unless `HTTP_DIST_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 20;
/// Time per phase when run as a test (`cargo test --benches`) unless `HTTP_DIST_SECONDS` says
/// otherwise.
const SMOKE_SECONDS: u64 = 1;
/// The longest a request may take before the bench gives up on it (counted as failed).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive connections opened to each server before measuring.
const WARM_CONNECTIONS: usize = 8;
/// The most requests one user sends to spend the rest of its burst, in bursts of the tier's
/// points (a bound on the spending loop).
const MAX_SPEND_ROUNDS: u64 = 4;
/// The trusted proxy: the clients' own address.
const LOOPBACK: &str = "127.0.0.1/32";
/// The API-key hashing secret every node shares (distributed mode requires one).
const API_KEY_SECRET: &str = "0123456789abcdef0123456789abcdef";
/// Where each phase starts on the exact reference's manual clock (room for the time between
/// the spending of the bursts and the phase).
const EXACT_ORIGIN: Duration = Duration::from_secs(60);
/// The route's answer.
const HELLO: &str = "Hello, World!";

/// One user: its API key, its address (sent as `x-forwarded-for`) and the seed of its
/// traffic.
struct User {
    api_key: String,
    address: String,
    seed: u64,
}

/// One request's outcome: latency in nanoseconds, HTTP status (0: failed or timed out), and
/// when it was sent (nanoseconds since the phase began).
#[derive(Clone, Copy)]
struct Sample {
    latency_ns: u64,
    status: u16,
    sent_ns: u64,
}

/// splitmix64: the bench's own random numbers, seeded per user and phase.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponential gap of mean `mean`: the time to a Poisson process's next event.
    fn exponential(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-(1.0 - self.unit()).ln())
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Sends one request as `user` to `addr` and reads the whole response.
async fn request(client: &HttpClient, addr: SocketAddr, user: &User) -> u16 {
    let req = hyper::Request::get(format!("http://{addr}/"))
        .header("x-api-key", &user.api_key)
        .header("x-forwarded-for", &user.address)
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let answer = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
        Ok(Some(status)) => status,
        _ => 0,
    }
}

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

fn hello() -> Router {
    Router::new().route("/", get(|| async { HELLO }))
}

/// The shipped tiers file with an API-key secret and the loopback address as a trusted proxy,
/// and the tier's policy (points, duration in seconds).
fn tiers_config() -> (Config, u64, u64) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rate-limit-tiers.json");
    let text = std::fs::read_to_string(path).expect("the shipped tiers file");
    let mut doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    doc["client_ip"]["trusted_proxies"] = serde_json::json!([LOOPBACK]);
    doc["api_key"]["secret"] = serde_json::json!(API_KEY_SECRET);
    let tier = doc["tiers"][TIER].as_object().expect("the tier in the shipped file");
    assert!(
        tier.keys().all(|k| k == "points" || k == "duration"),
        "a plain token bucket: the exact reference assumes it"
    );
    let points = tier["points"].as_u64().expect("points");
    let duration = tier["duration"].as_u64().expect("duration");
    assert_eq!(duration, 60, "a per-minute tier");
    (
        Config::from_json(&doc.to_string()).expect("a valid configuration"),
        points,
        duration,
    )
}

/// Sorted latencies' `q` quantile (nearest rank), in microseconds.
fn quantile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// What a phase measured.
struct Measured {
    /// When the phase began.
    start: Instant,
    /// The layered servers' samples, per user in order of sending.
    layered: Vec<Vec<Sample>>,
    /// The bare servers' samples, likewise.
    bare: Vec<Vec<Sample>>,
    /// Latencies (ns) of `PING` to the bench's Redis over a connection of its own.
    pings: Vec<u64>,
    /// Redis server time per script call (`EVALSHA`: the nodes' claims), in microseconds.
    script_us_per_call: f64,
}

/// Clears Redis's command statistics.
async fn reset_stats(con: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(con)
        .await
        .expect("CONFIG RESETSTAT");
}

/// Redis server time per `EVALSHA` since the statistics were cleared, in microseconds, from
/// `INFO commandstats` (the server's wall-clock time: a busy machine inflates it).
async fn script_us_per_call(con: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .expect("INFO commandstats");
    let Some(line) = info.lines().find(|l| l.starts_with("cmdstat_evalsha:")) else {
        return f64::NAN;
    };
    line.split([':', ','])
        .find_map(|kv| kv.strip_prefix("usec_per_call="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Both Poisson processes of every user for `span`, and meanwhile a Poisson process of
/// `PING`s to Redis at the rate of all users' layered requests together.
#[allow(clippy::too_many_arguments)]
async fn load(
    client: &HttpClient,
    redis: &redis::aio::MultiplexedConnection,
    users: &Arc<Vec<User>>,
    layered: &[SocketAddr],
    bare: &[SocketAddr],
    mean_gap: Duration,
    span: Duration,
    phase: u64,
) -> Measured {
    reset_stats(&mut redis.clone()).await;
    let start = Instant::now();
    let end = start + span;
    let pings = {
        let mut con = redis.clone();
        let mut rng = Rng(phase.wrapping_mul(0x5851_f42d_4c95_7f2d));
        let mean_gap = mean_gap / users.len() as u32;
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut at = start + rng.exponential(mean_gap);
            while at < end {
                tokio::time::sleep_until(at).await;
                let t0 = Instant::now();
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut con);
                if let Ok(Ok(_)) = tokio::time::timeout(REQUEST_TIMEOUT, ping).await {
                    latencies.push(t0.elapsed().as_nanos() as u64);
                }
                at += rng.exponential(mean_gap);
            }
            latencies
        })
    };
    let mut tasks = JoinSet::new();
    for (target, servers) in [layered, bare].into_iter().enumerate() {
        for u in 0..users.len() {
            let (client, users, servers) = (client.clone(), users.clone(), servers.to_vec());
            tasks.spawn(async move {
                let user = &users[u];
                let mut rng = Rng(user.seed ^ (phase << 32) ^ ((target as u64) << 48));
                let mut at = start + rng.exponential(mean_gap);
                let mut sent = JoinSet::new();
                while at < end {
                    tokio::time::sleep_until(at).await;
                    let addr = servers[rng.below(servers.len())];
                    let (client, users) = (client.clone(), users.clone());
                    sent.spawn(async move {
                        let t0 = Instant::now();
                        let status = request(&client, addr, &users[u]).await;
                        Sample {
                            latency_ns: t0.elapsed().as_nanos() as u64,
                            status,
                            sent_ns: (t0 - start).as_nanos() as u64,
                        }
                    });
                    at += rng.exponential(mean_gap);
                }
                let mut samples = Vec::new();
                while let Some(s) = sent.join_next().await {
                    samples.push(s.expect("a request task"));
                }
                samples.sort_by_key(|s| s.sent_ns);
                (target, u, samples)
            });
        }
    }
    let mut out = [vec![Vec::new(); users.len()], vec![Vec::new(); users.len()]];
    while let Some(r) = tasks.join_next().await {
        let (target, u, samples) = r.expect("a user task");
        out[target][u] = samples;
    }
    let [layered, bare] = out;
    Measured {
        start,
        layered,
        bare,
        pings: pings.await.expect("the ping task"),
        script_us_per_call: script_us_per_call(&mut redis.clone()).await,
    }
}

/// A user's bucket when a phase begins.
#[derive(Clone, Copy)]
enum Bucket {
    Full,
    /// Emptied this long before the phase began.
    EmptiedBefore(Duration),
}

/// The share (percent) of `samples` one exact limiter of `policy` admits, each user's
/// requests checked at the times they were sent, from the buckets `buckets` at the start.
fn exact_allowed_pct(policy: Policy, samples: &[Vec<Sample>], buckets: &[Bucket]) -> f64 {
    let clock = ManualClock::new();
    let capacity = policy.capacity();
    let limiter = Limiter::<usize>::builder(policy)
        .clock(clock.clock())
        .build()
        .expect("a valid policy");
    let (mut allowed, mut total) = (0u64, 0u64);
    // The phase starts at this time on the manual clock: room for what came before it.
    let origin = EXACT_ORIGIN.as_nanos() as u64;
    for (u, user) in samples.iter().enumerate() {
        if let Bucket::EmptiedBefore(before) = buckets[u] {
            // The clock stands still: the bucket empties within its capacity.
            clock.set_ns(origin.saturating_sub(before.as_nanos() as u64));
            for _ in 0..=capacity {
                let _ = limiter.check(&u);
            }
        }
        for s in user {
            clock.set_ns(origin + s.sent_ns);
            total += 1;
            allowed += u64::from(limiter.check(&u).is_allowed());
        }
    }
    100.0 * allowed as f64 / total.max(1) as f64
}

/// Spends what is left of every user's burst: each user sends requests one after another,
/// round-robin over the instances, until every instance refused it in a row (at most
/// [`MAX_SPEND_ROUNDS`] x `points` requests). Returns when each user's last refusal came.
async fn spend_bursts(
    client: &HttpClient,
    users: &Arc<Vec<User>>,
    layered: &[SocketAddr],
    points: u64,
) -> Vec<Instant> {
    let mut tasks = JoinSet::new();
    for u in 0..users.len() {
        let (client, users, servers) = (client.clone(), users.clone(), layered.to_vec());
        tasks.spawn(async move {
            let mut refused_in_a_row = 0;
            for i in 0..MAX_SPEND_ROUNDS * points {
                let addr = servers[i as usize % servers.len()];
                if request(&client, addr, &users[u]).await == 429 {
                    refused_in_a_row += 1;
                    if refused_in_a_row == servers.len() {
                        return (u, Instant::now());
                    }
                } else {
                    refused_in_a_row = 0;
                }
            }
            panic!("user {u} still admitted after {} requests", MAX_SPEND_ROUNDS * points);
        });
    }
    let mut emptied = vec![Instant::now(); users.len()];
    while let Some(r) = tasks.join_next().await {
        let (u, at) = r.expect("a spending task");
        emptied[u] = at;
    }
    emptied
}

/// The nodes' counters summed.
fn node_totals(nodes: &[Node]) -> [u64; 5] {
    nodes.iter().map(Node::stats).fold([0; 5], |t, s: NodeStats| {
        [
            t[0] + s.claims_on_demand,
            t[1] + s.claims_on_demand_deferred,
            t[2] + s.syncs,
            t[3] + s.round_trips,
            t[4] + s.failed_round_trips,
        ]
    })
}

/// Prints a phase's line and its detail line.
fn report(name: &str, points: u64, m: &Measured, exact_pct: [f64; 2], before: [u64; 5], after: [u64; 5]) {
    let flat = |v: &[Vec<Sample>]| -> Vec<Sample> { v.iter().flatten().copied().collect() };
    let (layered, bare) = (flat(&m.layered), flat(&m.bare));
    let mut pings = m.pings.clone();
    pings.sort_unstable();
    let sorted = |v: &[Sample]| {
        let mut l: Vec<u64> = v.iter().map(|s| s.latency_ns).collect();
        l.sort_unstable();
        l
    };
    let (with, without) = (sorted(&layered), sorted(&bare));
    let count = |v: &[Sample], f: fn(u16) -> bool| v.iter().filter(|s| f(s.status)).count();
    let allowed = count(&layered, |s| (200..300).contains(&s));
    let denied = count(&layered, |s| s == 429);
    let failed = count(&layered, |s| s == 0) + count(&bare, |s| s == 0);
    let bare_answered_otherwise = count(&bare, |s| s != 200 && s != 0);
    println!(
        "http distributed {name} users={USERS} points_per_min={points} load={LOAD} instances={INSTANCES} \
         p50_us={:.0} p99_us={:.0} bare_p50_us={:.0} bare_p99_us={:.0} allowed_pct={:.1}",
        quantile_us(&with, 0.5),
        quantile_us(&with, 0.99),
        quantile_us(&without, 0.5),
        quantile_us(&without, 0.99),
        100.0 * allowed as f64 / layered.len().max(1) as f64,
    );
    let d = |i: usize| after[i] - before[i];
    println!(
        "http distributed {name} detail requests={} bare_requests={} denied={denied} failed={failed} \
         exact_allowed_pct_min={:.1} exact_allowed_pct_max={:.1} p90_us={:.0} p999_us={:.0} bare_p90_us={:.0} bare_p999_us={:.0} \
         redis_ping_p50_us={:.0} redis_ping_p99_us={:.0} redis_script_us_per_call={:.1} \
         claims_on_demand={} deferred={} syncs={} round_trips={} failed_round_trips={}",
        layered.len(),
        bare.len(),
        exact_pct[0],
        exact_pct[1],
        quantile_us(&with, 0.9),
        quantile_us(&with, 0.999),
        quantile_us(&without, 0.9),
        quantile_us(&without, 0.999),
        quantile_us(&pings, 0.5),
        quantile_us(&pings, 0.99),
        m.script_us_per_call,
        d(0),
        d(1),
        d(2),
        d(3),
        d(4),
    );
    assert_eq!(bare_answered_otherwise, 0, "the bare route answers 200");
}

fn main() {
    // `cargo bench` passes `--bench` and any filter: this bench has one measurement, run whole.
    // Without `--bench` (`cargo test --benches`) it runs briefly, as a smoke test.
    let measuring = std::env::args().any(|a| a == "--bench");
    let seconds = std::env::var("HTTP_DIST_SECONDS")
        .ok()
        .map(|s| s.parse::<u64>().expect("HTTP_DIST_SECONDS: whole seconds"))
        .unwrap_or(if measuring { DEFAULT_SECONDS } else { SMOKE_SECONDS });
    let span = Duration::from_secs(seconds);
    let (config, points, duration) = tiers_config();
    let policy = Policy::new(points, Duration::from_secs(duration));
    let rate_per_s = points as f64 / duration as f64;
    let mean_gap = Duration::from_secs_f64(1.0 / (LOAD * rate_per_s));

    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let users: Arc<Vec<User>> = Arc::new(
            (0..USERS)
                .map(|i| User {
                    api_key: format!("key-{i}"),
                    address: format!("10.0.{}.{}", i / 256, i % 256),
                    seed: 0x7011_6a7e ^ (i as u64).wrapping_mul(0x9e37_79b9),
                })
                .collect(),
        );
        // The application's table of API keys: an in-memory lookup, as the validator asks.
        let keys: Arc<HashMap<String, Verified>> = Arc::new(
            (0..USERS)
                .map(|i| (format!("key-{i}"), Verified::user(format!("user-{i}")).tier(TIER)))
                .collect(),
        );
        let mut nodes = Vec::new();
        let mut layered = Vec::new();
        let mut bare = Vec::new();
        for _ in 0..INSTANCES {
            let store = RedisStore::connect(RedisConfig::new(server.url()))
                .await
                .expect("the bench's redis-server");
            let node = Node::builder(Arc::new(store))
                .sync_interval(SYNC_INTERVAL)
                .start()
                .expect("a valid node");
            let live = LiveConfig::builder()
                .config(config.clone())
                .node(&node)
                .build()
                .expect("distributed rules");
            let keys = keys.clone();
            let layer = RateLimitLayer::builder(live)
                .api_key_validator(move |k| keys.get(k).cloned())
                .build();
            layered.push(serve(hello().layer(layer)).await);
            bare.push(serve(hello()).await);
            nodes.push(node);
        }
        let client = client();
        // Keep-alive connections to every server before measuring: concurrent requests of
        // no user (anonymous), whose outcome does not matter.
        let mut warm = JoinSet::new();
        for &addr in layered.iter().chain(&bare) {
            for _ in 0..WARM_CONNECTIONS {
                let client = client.clone();
                warm.spawn(async move {
                    let req = hyper::Request::get(format!("http://{addr}/"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    if let Ok(r) = client.request(req).await {
                        let _ = r.into_body().collect().await;
                    }
                });
            }
        }
        while warm.join_next().await.is_some() {}

        let redis = redis::Client::open(server.url())
            .expect("a redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("the bench's redis-server");

        let before = node_totals(&nodes);
        let m = load(&client, &redis, &users, &layered, &bare, mean_gap, span, 1).await;
        let after = node_totals(&nodes);
        let exact = exact_allowed_pct(policy.clone(), &m.layered, &[Bucket::Full; USERS]);
        report("per_minute_tier", points, &m, [exact; 2], before, after);

        let emptied = spend_bursts(&client, &users, &layered, points).await;
        let before = node_totals(&nodes);
        let m = load(&client, &redis, &users, &layered, &bare, mean_gap, span, 2).await;
        let after = node_totals(&nodes);
        // A bucket that held just under a token at the refusal: emptied one token's time before.
        let token = Duration::from_secs(duration) / points as u32;
        let emptied_before = |earlier: Duration| -> Vec<Bucket> {
            emptied
                .iter()
                .map(|&at| Bucket::EmptiedBefore(m.start.saturating_duration_since(at) + earlier))
                .collect()
        };
        let exact = [
            exact_allowed_pct(policy.clone(), &m.layered, &emptied_before(Duration::ZERO)),
            exact_allowed_pct(
                policy,
                &m.layered,
                &emptied_before(token.saturating_sub(Duration::from_nanos(1))),
            ),
        ];
        report("per_minute_tier_at_limit", points, &m, exact, before, after);

        for node in &nodes {
            node.shutdown().await;
        }
    });
    drop(server);
}
