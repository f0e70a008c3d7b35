//! Redis security on real `redis-server` processes: `rediss://` with a CA of the test's own
//! (made with `openssl` in a temporary directory), refused certificates, the insecure option,
//! mutual TLS, and a least-privilege ACL user.
//!
//! Needs `redis-server` and `redis-cli` built with TLS (Debian's are) and `openssl` on the PATH.
//! Every server listens on 127.0.0.1 only and is stopped by its pid; every loop is bounded.

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/pki.rs"]
mod pki;

#[path = "common/acl.rs"]
mod acl;

#[path = "common/claims.rs"]
mod claims;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acl::COMMANDS;
use claims::claim;
use pki::Pki;
use redis_server::RedisServer;
use tollgate::store::{
    Claim, ClaimOutcome, ErrorClass, Heartbeat, KeyEncoder, Limits, NodeId, RedisConfig, RedisStore, Store, StoreError,
    StoreFuture, StoreKey,
};
use tollgate::{node::NodeStats, Limiter, Node, Policy};

// ---------------------------------------------------------------------------------------------
// Store helpers

fn tb(capacity: u64) -> Limits {
    Limits::token_bucket(capacity, capacity, Duration::from_secs(1), Duration::from_secs(2)).unwrap()
}

/// One claim of `wanted` tokens on a fresh key: the grant.
async fn claim_some(store: &RedisStore, key: &str, wanted: u64) -> u64 {
    let key = KeyEncoder::default().encode("tls", key.as_bytes());
    let out = store.claim(1, &[claim(&key, tb(100), 0, 0, wanted, 0)]).await.unwrap();
    out[0].as_ref().unwrap().granted
}

fn config(server: &RedisServer) -> RedisConfig {
    RedisConfig::new(server.url()).connect_timeout(Duration::from_secs(3))
}

/// `connect` and the first call of `connect_lazy` both fail with this error class.
async fn refused(config: RedisConfig) -> StoreError {
    let now = RedisStore::connect(config.clone())
        .await
        .expect_err("connect must fail");
    let lazy = RedisStore::connect_lazy(config).expect("a lazy store is built without connecting");
    let key = KeyEncoder::default().encode("tls", b"lazy");
    let later = lazy
        .claim(1, &[claim(&key, tb(10), 0, 0, 1, 0)])
        .await
        .expect_err("the first call must fail");
    assert_eq!(now.class(), later.class(), "{now} / {later}");
    now
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn the_right_ca_connects_and_claims() {
    let pki = Pki::new();
    let server = pki.server("server", &[]);
    assert!(server.url().starts_with("rediss://127.0.0.1:"));
    // The CA from a file, and the same CA given as PEM.
    for config in [
        config(&server).tls_ca_file(pki.path("ca.crt")),
        config(&server).tls_ca_pem(pki.read("ca.crt")),
    ] {
        let store = RedisStore::connect(config)
            .await
            .expect("TLS connection with the right CA");
        assert_eq!(claim_some(&store, "right-ca", 7).await, 7);
        let registry = KeyEncoder::default().registry_key();
        let beat = store.heartbeat(&registry, 1, Duration::from_secs(5)).await.unwrap();
        assert_eq!(beat.live_nodes, 1);
        store.leave(&registry, 1).await.unwrap();
    }
    // What the claims wrote is there, seen through redis-cli.
    assert_eq!(server.cli(&["DBSIZE"]), "1");
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_as_configuration() {
    let pki = Pki::new();
    let server = pki.server("server", &[]);
    let e = refused(config(&server).tls_ca_file(pki.path("other-ca.crt"))).await;
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    assert!(
        e.message().contains("certificate was refused") && e.message().contains("not signed by a trusted CA"),
        "{e}"
    );
    // Without a CA of its own the client trusts the system roots, which do not know the test CA.
    let e = refused(config(&server)).await;
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    assert!(e.message().contains("certificate was refused"), "{e}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_unless_verification_is_off() {
    let pki = Pki::new();
    let server = pki.server("wrong-name", &[]);
    let e = refused(config(&server).tls_ca_file(pki.path("ca.crt"))).await;
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    assert!(
        e.message().contains("certificate was refused") && e.message().contains("host name"),
        "{e}"
    );
    // Development only: no verification at all, with the right CA, another one, or none.
    for config in [
        config(&server).tls_ca_file(pki.path("ca.crt")),
        config(&server).tls_ca_file(pki.path("other-ca.crt")),
        config(&server),
    ] {
        let store = RedisStore::connect(config.tls_insecure_skip_verify(true))
            .await
            .expect("insecure TLS connects");
        assert_eq!(claim_some(&store, "insecure", 3).await, 3);
    }
    // Explicitly false is the default: verified.
    let e = refused(
        config(&server)
            .tls_ca_file(pki.path("ca.crt"))
            .tls_insecure_skip_verify(false),
    )
    .await;
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new();
    let server = pki.server("server", &["--tls-auth-clients", "yes"]);
    let store = RedisStore::connect(
        config(&server)
            .tls_ca_file(pki.path("ca.crt"))
            .tls_client_cert(pki.read("client.crt"), pki.read("client.key")),
    )
    .await
    .expect("mutual TLS");
    assert_eq!(claim_some(&store, "mtls", 4).await, 4);
    // Without a client certificate the server ends the handshake.
    let e = RedisStore::connect(config(&server).tls_ca_file(pki.path("ca.crt")))
        .await
        .expect_err("no client certificate");
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    assert!(e.message().contains("refused this client's certificate"), "{e}");
}

#[tokio::test]
async fn tls_misconfiguration_is_a_configuration_error() {
    let pki = Pki::new();
    let check = |r: Result<RedisStore, StoreError>, needle: &str| {
        let e = r.expect_err("must be refused");
        assert_eq!(e.class(), ErrorClass::Config, "{e}");
        assert!(e.message().contains(needle), "{e} should mention {needle}");
    };
    // TLS options on a plain URL: refused, not ignored (no server needed: nothing connects).
    let plain = RedisConfig::new("redis://127.0.0.1:1/");
    for config in [
        plain.clone().tls_ca_pem(pki.read("ca.crt")),
        plain.clone().tls_ca_file(pki.path("ca.crt")),
        plain
            .clone()
            .tls_client_cert(pki.read("client.crt"), pki.read("client.key")),
        plain.clone().tls_insecure_skip_verify(true),
    ] {
        check(RedisStore::connect(config.clone()).await, "rediss://");
        check(RedisStore::connect_lazy(config), "rediss://");
    }
    // A CA file that is missing, or holds no certificate; CA PEM that is not a certificate.
    let tls = RedisConfig::new("rediss://127.0.0.1:1/");
    let missing = pki.path("missing.crt");
    check(
        RedisStore::connect_lazy(tls.clone().tls_ca_file(&missing)),
        missing.to_str().unwrap(),
    );
    check(
        RedisStore::connect(tls.clone().tls_ca_file(pki.path("ca.key"))).await,
        &pki.file("ca.key"),
    );
    std::fs::write(pki.path("garbage.crt"), "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    check(
        RedisStore::connect_lazy(tls.clone().tls_ca_file(pki.path("garbage.crt"))),
        &pki.file("garbage.crt"),
    );
    check(
        RedisStore::connect_lazy(tls.clone().tls_ca_pem("no pem here")),
        "tls_ca_pem",
    );
    // A client key that is not a key.
    check(
        RedisStore::connect_lazy(
            tls.clone()
                .tls_client_cert(pki.read("client.crt"), pki.read("client.crt")),
        ),
        "client certificate or key",
    );
    // The private key never shows in Debug output, nor does the password.
    let debug = format!(
        "{:?}",
        RedisConfig::new("rediss://user:hunter2@127.0.0.1:1/")
            .tls_client_cert(pki.read("client.crt"), pki.read("client.key"))
    );
    assert!(!debug.contains("hunter2") && !debug.contains("PRIVATE"), "{debug}");
}

// ---------------------------------------------------------------------------------------------
// ACL

const USER: &str = "tollgate";

/// A Redis ACL refusal: `NOPERM` (redis-rs spells the code `NoPerm`), or what Redis 7.0
/// answers for a command a script may not run.
fn noperm(message: &str) -> bool {
    message.to_ascii_uppercase().contains("NOPERM") || message.contains("user executing the script can't")
}
const PASSWORD: &str = "pw-for-tests";

/// Creates (or redefines) the ACL user: tollgate's key prefix, the listed commands but `without`.
fn set_user(server: &RedisServer, without: Option<&str>) {
    let password = format!(">{PASSWORD}");
    let mut args = vec![
        "ACL",
        "SETUSER",
        USER,
        "reset",
        "on",
        &password,
        "~tg:*",
        "resetchannels",
        "-@all",
    ];
    let grants: Vec<String> = COMMANDS
        .iter()
        .filter(|c| Some(**c) != without)
        .map(|c| format!("+{c}"))
        .collect();
    args.extend(grants.iter().map(String::as_str));
    assert_eq!(server.cli(&args), "OK");
}

fn user_url(server: &RedisServer) -> String {
    format!("redis://{USER}:{PASSWORD}@127.0.0.1:{}/", server.port)
}

/// Why [`exercise`] stopped: a failed call (with its class) or a failed key (no class).
#[derive(Debug)]
struct Failure {
    class: Option<ErrorClass>,
    message: String,
}

fn check_outcomes(step: &str, outcomes: &[ClaimOutcome]) -> Result<Vec<tollgate::store::Grant>, Failure> {
    outcomes
        .iter()
        .map(|o| {
            o.clone().map_err(|e| Failure {
                class: None,
                message: format!("{step}: key error: {e}"),
            })
        })
        .collect()
}

/// Store calls that together send every listed command: heartbeat and leave, and for each
/// algorithm a new key, an in-place update, a second node's record, a rewrite of another
/// length, keys repeated in a batch, and a key given back until it is deleted. The first error
/// (of the batch, or of a key) ends it.
async fn exercise(store: &RedisStore) -> Result<(), Failure> {
    fn err(step: &'static str) -> impl Fn(StoreError) -> Failure {
        move |e| Failure {
            class: Some(e.class()),
            message: format!("{step}: {e}"),
        }
    }
    let enc = KeyEncoder::default();
    let registry = enc.registry_key();
    store
        .heartbeat(&registry, 1, Duration::from_secs(10))
        .await
        .map_err(err("heartbeat"))?;
    // Token bucket: SET (new key), SETRANGE and APPEND (a second node), DEL (all given back).
    let key = enc.encode("acl", b"bucket");
    let l = tb(10);
    let a = check_outcomes(
        "tb1",
        &store
            .claim(1, &[claim(&key, l, 0, 0, 5, 0)])
            .await
            .map_err(err("tb1"))?,
    )?;
    let b = check_outcomes(
        "tb2",
        &store
            .claim(2, &[claim(&key, l, 0, 0, 3, 0)])
            .await
            .map_err(err("tb2"))?,
    )?;
    let (ga, gb) = (a[0].granted, b[0].granted);
    check_outcomes(
        "tb3",
        &store
            .claim(1, &[claim(&key, l, 0, ga, 0, 0)])
            .await
            .map_err(err("tb3"))?,
    )?;
    check_outcomes(
        "tb4",
        &store
            .claim(2, &[claim(&key, l, 0, gb, 0, 0)])
            .await
            .map_err(err("tb4"))?,
    )?;
    // Fixed window: SET, SETRANGE, then DEL.
    let fw = Limits::fixed_window(100, Duration::from_secs(60)).unwrap();
    let key = enc.encode("acl", b"window");
    let g = check_outcomes(
        "fw1",
        &store
            .claim(1, &[claim(&key, fw, 0, 0, 4, 0)])
            .await
            .map_err(err("fw1"))?,
    )?;
    let w = g[0].window;
    check_outcomes(
        "fw2",
        &store
            .claim(1, &[claim(&key, fw, 4, 0, 1, w)])
            .await
            .map_err(err("fw2"))?,
    )?;
    check_outcomes(
        "fw3",
        &store
            .claim(1, &[claim(&key, fw, 0, 5, 0, w)])
            .await
            .map_err(err("fw3"))?,
    )?;
    // A count whose decimal form grows (window id 0 mod 2^20, at a chosen time): SET KEEPTTL.
    let fw1s = Limits::fixed_window(100, Duration::from_secs(1)).unwrap();
    let key = enc.encode("acl", b"window-grows");
    store.set_time_override_us(Some(1_000_000 * 1_048_576 * 1_700));
    let g = store
        .claim(1, &[claim(&key, fw1s, 0, 0, 9, 0)])
        .await
        .map_err(err("fw4"));
    let g = match g.and_then(|o| check_outcomes("fw4", &o)) {
        Ok(g) => store
            .claim(1, &[claim(&key, fw1s, 9, 0, 1, g[0].window)])
            .await
            .map_err(err("fw5"))
            .and_then(|o| check_outcomes("fw5", &o)),
        Err(e) => Err(e),
    };
    store.set_time_override_us(None);
    g?;
    // Sliding window, the key twice in one batch (each read alone: GET), then given back.
    let sw = Limits::sliding_window(100, Duration::from_secs(60)).unwrap();
    let key = enc.encode("acl", b"sliding");
    let g = check_outcomes(
        "sw1",
        &store
            .claim(1, &[claim(&key, sw, 0, 0, 2, 0), claim(&key, sw, 0, 0, 2, 0)])
            .await
            .map_err(err("sw1"))?,
    )?;
    let w = g[0].window;
    check_outcomes(
        "sw2",
        &store
            .claim(1, &[claim(&key, sw, 4, 0, 1, w)])
            .await
            .map_err(err("sw2"))?,
    )?;
    check_outcomes(
        "sw3",
        &store
            .claim(1, &[claim(&key, sw, 0, 5, 0, w)])
            .await
            .map_err(err("sw3"))?,
    )?;
    store.leave(&registry, 1).await.map_err(err("leave"))?;
    Ok(())
}

/// `INFO commandstats`: calls per command (`script|load`, `zadd`, ...).
fn command_calls(server: &RedisServer) -> std::collections::HashMap<String, u64> {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// What `ACL LOG` recorded as refused, other than the client library's `CLIENT SETINFO` at
/// connection (which it sends and ignores the answer of).
fn acl_refusals(server: &RedisServer) -> Vec<String> {
    let log = server.cli(&["ACL", "LOG"]);
    let lines: Vec<&str> = log.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "object" && w[1] != "client|setinfo")
        .map(|w| w[1].to_string())
        .collect()
}

/// The listed commands are enough for every store call, and each of them is sent (so none is
/// there for nothing): counted by `INFO commandstats` while only the ACL user runs commands.
#[tokio::test]
async fn the_acl_command_list_is_enough_and_each_command_is_used() {
    let server = RedisServer::start();
    set_user(&server, None);
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]), "OK");
    let store = RedisStore::connect(RedisConfig::new(user_url(&server))).await.unwrap();
    exercise(&store).await.expect("the ACL user runs every store call");
    let calls = command_calls(&server);
    for c in COMMANDS {
        assert!(calls.get(c).copied().unwrap_or(0) > 0, "{c} was never sent: {calls:?}");
    }
    assert_eq!(acl_refusals(&server), Vec::<String>::new());
    // Not padded: without any one of them, some store call is refused (and the ACL log names
    // that command): a configuration error, or for the one read a script makes with
    // `redis.pcall`, a failure of that key alone.
    for c in COMMANDS {
        assert_eq!(server.cli(&["FLUSHALL"]), "OK");
        assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
        assert_eq!(server.cli(&["ACL", "LOG", "RESET"]), "OK");
        set_user(&server, Some(c));
        let store = RedisStore::connect(RedisConfig::new(user_url(&server))).await.unwrap();
        let e = exercise(&store)
            .await
            .expect_err(&format!("{c} removed: every call went through"));
        assert!(noperm(&e.message), "{c} removed: {e:?}");
        match e.class {
            Some(class) => assert_eq!(class, ErrorClass::Config, "{c} removed: {e:?}"),
            None => assert_eq!(c, "get", "{c} removed: {e:?}"),
        }
        assert_eq!(acl_refusals(&server), vec![c.to_string()], "{c} removed: {e:?}");
    }
    // The named example: a user without SETRANGE has its second claim on a key refused.
    assert_eq!(server.cli(&["FLUSHALL"]), "OK");
    set_user(&server, Some("setrange"));
    let store = RedisStore::connect(RedisConfig::new(user_url(&server))).await.unwrap();
    let key = KeyEncoder::default().encode("acl", b"no-setrange");
    let l = Limits::fixed_window(100, Duration::from_secs(60)).unwrap();
    let g = store.claim(1, &[claim(&key, l, 0, 0, 4, 0)]).await.unwrap();
    let w = g[0].as_ref().unwrap().window;
    let e = store.claim(1, &[claim(&key, l, 4, 0, 1, w)]).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    assert!(noperm(e.message()), "{e}");
}

/// The ACL user's store, adding a key outside the prefix to one claim batch when armed.
struct Intruding {
    inner: RedisStore,
    armed: AtomicBool,
    refusal: parking_lot::Mutex<Option<StoreError>>,
}

impl Store for Intruding {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        Box::pin(async move {
            if claims.is_empty() || !self.armed.swap(false, Ordering::SeqCst) {
                return self.inner.claim(node, claims).await;
            }
            let mut batch = claims.to_vec();
            batch.push(claim(
                &StoreKey::from_raw(b"other:x".to_vec()),
                claims[0].limits,
                0,
                0,
                1,
                0,
            ));
            match self.inner.claim(node, &batch).await {
                Ok(mut out) => {
                    out.pop();
                    Ok(out)
                }
                Err(e) => {
                    *self.refusal.lock() = Some(e.clone());
                    Err(e)
                }
            }
        })
    }

    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        self.inner.heartbeat(registry, node, ttl)
    }

    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        self.inner.leave(registry, node)
    }

    fn reconnect(&self) {
        self.inner.reconnect()
    }
}

fn no_errors(s: &NodeStats) -> bool {
    s.failed_round_trips == 0
        && s.transient_errors == 0
        && s.topology_errors == 0
        && s.config_errors == 0
        && s.resource_errors == 0
        && s.protocol_errors == 0
        && s.key_errors == 0
}

/// Checks one key every 10 ms until `done` holds for the node's stats (at most `limit`);
/// answers the checks admitted.
async fn drive(node: &Node, limiter: &Limiter, limit: Duration, done: impl Fn(&NodeStats) -> bool) -> u64 {
    let deadline = Instant::now() + limit;
    let mut admitted = 0;
    while Instant::now() < deadline {
        admitted += limiter.check_async("user-1").await.is_allowed() as u64;
        if done(&node.stats()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_user_runs_a_node_and_a_key_outside_the_prefix_is_refused() {
    let server = RedisServer::start();
    set_user(&server, None);
    let url = user_url(&server);
    let store = Arc::new(Intruding {
        inner: RedisStore::connect(RedisConfig::new(url.clone())).await.unwrap(),
        armed: AtomicBool::new(false),
        refusal: parking_lot::Mutex::new(None),
    });
    // `connect` sends a heartbeat first: a missing permission would fail here.
    let node = Node::builder(store.clone())
        .sync_interval(Duration::from_millis(50))
        .connect()
        .await
        .expect("the ACL user's heartbeat");
    let limiter: Limiter = Limiter::builder(Policy::per_second(1000))
        .name("acl")
        .node(&node)
        .build()
        .unwrap();
    let registry = KeyEncoder::default().registry_key();
    let registry_key = String::from_utf8(registry.as_bytes().to_vec()).unwrap();
    let member = node.id().to_string();
    let score = || -> f64 { server.cli(&["ZSCORE", &registry_key, &member]).parse().unwrap() };
    let first_beat = score();
    // Real claims, and the next heartbeat (one a second), through the ACL user.
    let (mut admitted, mut beat) = (0, first_beat);
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline && (beat <= first_beat || node.stats().round_trips < 10) {
        admitted += drive(&node, &limiter, Duration::from_millis(200), |_| false).await;
        beat = score();
    }
    let s = node.stats();
    assert!(admitted >= 10 && s.round_trips >= 10, "{admitted} admitted, {s:?}");
    assert!(no_errors(&s), "{s:?}");
    assert!(beat > first_beat, "no heartbeat since the first: {first_beat} {beat}");
    assert!(server.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 2);

    // A batch with a key outside the prefix is refused as a whole: NOPERM, configuration.
    let inside = KeyEncoder::default().encode("acl", b"direct");
    let e = store
        .inner
        .claim(
            7,
            &[
                claim(&inside, tb(10), 0, 0, 1, 0),
                claim(&StoreKey::from_raw(b"other:x".to_vec()), tb(10), 0, 0, 1, 0),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Config, "{e}");
    assert!(noperm(e.message()), "{e}");

    // The same in one of the node's syncs: counted as a configuration error, then syncing
    // goes on (the circuit opens for 1.5 intervals, a probe closes it).
    store.armed.store(true, Ordering::SeqCst);
    drive(&node, &limiter, Duration::from_secs(5), |s| s.config_errors > 0).await;
    let refusal = store.refusal.lock().clone().expect("the armed batch was sent");
    assert_eq!(refusal.class(), ErrorClass::Config, "{refusal}");
    assert!(noperm(refusal.message()), "{refusal}");
    let after = node.stats();
    assert_eq!((after.config_errors, after.failed_round_trips), (1, 1), "{after:?}");
    let admitted = drive(&node, &limiter, Duration::from_secs(5), |s| {
        s.round_trips >= after.round_trips + 10
    })
    .await;
    let s = node.stats();
    assert!(s.round_trips >= after.round_trips + 10, "syncs stopped: {s:?}");
    assert_eq!((s.config_errors, s.failed_round_trips), (1, 1), "{s:?}");
    assert_eq!(
        s.transient_errors + s.protocol_errors + s.key_errors + s.task_restarts,
        0,
        "{s:?}"
    );
    assert_eq!(s.circuit, tollgate::node::CircuitState::Closed, "{s:?}");
    assert!(admitted > 0, "nothing admitted after the refusal");
    let d = limiter.check_async("user-1").await;
    assert!(d.is_allowed() && !d.is_degraded(), "{d:?}");
    node.shutdown().await;
    // Leaving the registry (ZREM) worked too.
    assert_eq!(server.cli(&["ZSCORE", &registry_key, &member]), "");
}
