//! [`RedisStore`]: the claim protocol on one Redis server, through the Lua scripts in `lua/`.
//!
//! Each script handles a batch of keys in one `EVALSHA` (`redis::Script` loads it again after
//! `NOSCRIPT`, which means the script did not run, so that retry is safe). Claims of a batch are
//! grouped by algorithm; the (at most three) script calls of one sync are sent together on the
//! multiplexed connection, so a sync costs one round trip. The connection is a
//! `ConnectionManager`: it reconnects in the background, and every call is bounded by the
//! response timeout.

use std::borrow::Cow;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};

use super::{
    clamped, Claim, ClaimOutcome, ErrorClass, Grant, Heartbeat, KeyError, Limits, NodeId, Store, StoreAlgorithm,
    StoreError, StoreFuture, StoreKey, MAX_KEYS_PER_CALL,
};

const TOKEN_BUCKET_LUA: &str = concat!(
    include_str!("../../lua/claims_prelude.lua"),
    include_str!("../../lua/token_bucket.lua")
);
const FIXED_WINDOW_LUA: &str = concat!(
    include_str!("../../lua/claims_prelude.lua"),
    include_str!("../../lua/fixed_window.lua")
);
const SLIDING_WINDOW_LUA: &str = concat!(
    include_str!("../../lua/claims_prelude.lua"),
    include_str!("../../lua/sliding_window.lua")
);
const REGISTRY_LUA: &str = include_str!("../../lua/registry.lua");

/// Bytes per key in a script reply: status byte and six doubles.
const REPLY_WIDTH: usize = 49;

/// Bytes per key in the claim argument: policy index (u16), kept, returned and wanted (u32,
/// since they are clamped to the capacity), then the claim's sequence number (token bucket) or
/// window id (window algorithms), as an f64 (exact below 2^53). Little-endian.
const CLAIM_WIDTH: usize = 22;

// The policy index of a claim is at most the number of claims in a call, and the counts are
// clamped to the capacity. (The scripts also unpack up to twice as many values as there are
// keys, and Lua's stack takes at most 8000.)
const _: () = assert!(MAX_KEYS_PER_CALL <= 3999 && crate::consts::MAX_CAPACITY <= u32::MAX as u64);

const NO_OVERRIDE: u64 = u64::MAX;

/// How to reach Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    url: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    reconnect_retries: usize,
    tls: TlsOptions,
}

/// Where the CA to trust comes from.
#[derive(Clone, PartialEq, Eq)]
enum CaSource {
    Pem(Vec<u8>),
    File(PathBuf),
}

/// The TLS options of a `rediss://` connection.
#[derive(Clone, Default, PartialEq, Eq)]
struct TlsOptions {
    ca: Option<CaSource>,
    /// Client certificate chain and private key, PEM.
    client_cert: Option<(Vec<u8>, Vec<u8>)>,
    insecure: bool,
}

impl TlsOptions {
    fn is_set(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some() || self.insecure
    }

    /// The names of the options that are set, for error messages.
    fn names(&self) -> String {
        let mut names = Vec::new();
        match self.ca {
            Some(CaSource::Pem(_)) => names.push("tls_ca_pem"),
            Some(CaSource::File(_)) => names.push("tls_ca_file"),
            None => {}
        }
        if self.client_cert.is_some() {
            names.push("tls_client_cert");
        }
        if self.insecure {
            names.push("tls_insecure_skip_verify");
        }
        names.join(", ")
    }
}

impl RedisConfig {
    /// A `redis://[user:password@]host[:port][/db]` URL, or `rediss://` (TLS: feature
    /// `redis-tls`; the server's certificate chain and host name are verified, against the
    /// system's root certificates unless [`tls_ca_pem`](Self::tls_ca_pem) or
    /// [`tls_ca_file`](Self::tls_ca_file) names a CA). Timeouts default to 1 s.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            reconnect_retries: 0,
            tls: TlsOptions::default(),
        }
    }

    /// Bound on each connection attempt.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each call: a sync that takes longer fails as [`ErrorClass::Transient`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many times a reconnection is retried (with exponential backoff) before a call fails;
    /// the next call starts over. Default 0: a node's circuit breaker paces reconnection, and
    /// a call that waits for retries would only run into the sync timeout.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// `rediss://` only (feature `redis-tls`): trust the CA certificate(s) in `pem` (one or
    /// more PEM `CERTIFICATE` blocks) instead of the system's root certificates. The server's
    /// certificate must chain to one of them and name the URL's host (a DNS name, or an IP
    /// address in its subjectAltName). Replaces an earlier [`tls_ca_file`](Self::tls_ca_file).
    ///
    /// Invalid PEM is an [`ErrorClass::Config`] error when the store connects.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca = Some(CaSource::Pem(pem.into()));
        self
    }

    /// Like [`tls_ca_pem`](Self::tls_ca_pem), with the PEM read from `path` when the store
    /// connects (and again when it builds a new client): a missing, unreadable or invalid file
    /// is an [`ErrorClass::Config`] error that names the path.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca = Some(CaSource::File(path.into()));
        self
    }

    /// `rediss://` only (feature `redis-tls`): present this client certificate (PEM, the
    /// chain with the leaf first) and its private key (PEM: PKCS#8, PKCS#1 or SEC1) to
    /// servers that require one (Redis `tls-auth-clients yes`). Invalid PEM is an
    /// [`ErrorClass::Config`] error when the store connects.
    pub fn tls_client_cert(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.client_cert = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// `rediss://` only (feature `redis-tls`). **Development only; dangerous.** With `true`,
    /// the server's certificate is not verified at all: any certificate, from any issuer, for
    /// any host name, expired or not, is accepted. The connection is still encrypted, but
    /// anyone who can intercept the traffic can impersonate the server, read the password and
    /// every key, and answer claims as they like (granting unlimited quota). Use a CA
    /// ([`tls_ca_file`](Self::tls_ca_file)) for self-signed or private certificates instead.
    ///
    /// Default `false`: the certificate chain and the host name are verified. (The URL form
    /// `rediss://host:port/#insecure` does the same as `true`.)
    pub fn tls_insecure_skip_verify(mut self, insecure: bool) -> Self {
        self.tls.insecure = insecure;
        self
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn response_timeout_value(&self) -> Duration {
        self.response_timeout
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ca = match &self.tls.ca {
            None => None,
            Some(CaSource::Pem(_)) => Some("<pem>".to_string()),
            Some(CaSource::File(p)) => Some(p.display().to_string()),
        };
        f.debug_struct("RedisConfig")
            .field("url", &redact_password(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .field("tls_ca", &ca)
            .field("tls_client_cert", &self.tls.client_cert.as_ref().map(|_| "<redacted>"))
            .field("tls_insecure_skip_verify", &self.tls.insecure)
            .finish()
    }
}

/// The URL with the password (if any) replaced, for `Debug`.
fn redact_password(url: &str) -> Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let Some(at) = url[start..end].rfind('@').map(|i| start + i) else {
        return Cow::Borrowed(url);
    };
    match url[start..at].find(':') {
        Some(colon) => Cow::Owned(format!("{}:<redacted>{}", &url[..start + colon], &url[at..])),
        // `redis://password@host` is not a password in redis URLs, but is kept out all the same.
        None => Cow::Owned(format!("{}<redacted>{}", &url[..start], &url[at..])),
    }
}

/// True for the URL schemes redis-rs connects to with TLS.
fn is_tls_url(url: &str) -> bool {
    let scheme = url.split("://").next().unwrap_or_default();
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

impl From<&str> for RedisConfig {
    fn from(url: &str) -> Self {
        RedisConfig::new(url)
    }
}

impl From<String> for RedisConfig {
    fn from(url: String) -> Self {
        RedisConfig::new(url)
    }
}

impl From<&String> for RedisConfig {
    fn from(url: &String) -> Self {
        RedisConfig::new(url.as_str())
    }
}

/// The claim protocol on a single Redis server (7.0 or later recommended; 6.2 works).
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tollgate::store::{RedisConfig, RedisStore};
/// use tollgate::{Limiter, Node, Policy};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// let node = Node::builder(Arc::new(store)).sync_interval(Duration::from_millis(100)).start()?;
/// let per_user: Limiter = Limiter::builder(Policy::per_minute(1000)).name("user").node(&node).build()?;
/// let d = per_user.check_async("alice").await;
/// println!("allowed: {}", d.is_allowed());
/// node.shutdown().await; // returns unused claims
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: Arc<parking_lot::Mutex<ConnectionManager>>,
    /// What `reconnect` needs to build a fresh connection.
    source: Arc<(redis::Client, RedisConfig)>,
    scripts: Arc<Scripts>,
    time_override: Arc<AtomicU64>,
}

/// The four scripts, with their hashes.
pub(super) struct Scripts {
    pub(super) token_bucket: Script,
    pub(super) fixed_window: Script,
    pub(super) sliding_window: Script,
    pub(super) registry: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let [token_bucket, fixed_window, sliding_window, registry] = Self::sources().map(Script::new);
        Scripts {
            token_bucket,
            fixed_window,
            sliding_window,
            registry,
        }
    }

    pub(super) fn claim(&self, algorithm: StoreAlgorithm) -> &Script {
        match algorithm {
            StoreAlgorithm::TokenBucket => &self.token_bucket,
            StoreAlgorithm::FixedWindow => &self.fixed_window,
            StoreAlgorithm::SlidingWindow => &self.sliding_window,
        }
    }

    /// Every script with its source, for `SCRIPT LOAD`.
    pub(super) fn sources() -> [&'static str; 4] {
        [TOKEN_BUCKET_LUA, FIXED_WINDOW_LUA, SLIDING_WINDOW_LUA, REGISTRY_LUA]
    }
}

/// The keys and arguments of one claim script call: claims (indices into a batch) that share
/// an algorithm and, on a cluster, a hash slot.
pub(super) struct ClaimCall<'a> {
    pub(super) keys: Vec<&'a [u8]>,
    pub(super) args: Vec<Vec<u8>>,
}

impl<'a> ClaimCall<'a> {
    pub(super) fn new(
        node: NodeId,
        time_arg: &str,
        algorithm: StoreAlgorithm,
        claims: &'a [Claim],
        idx: &[usize],
    ) -> Self {
        let mut policies: Vec<Limits> = Vec::new();
        let mut pidx = Vec::with_capacity(idx.len());
        for &i in idx {
            let l = claims[i].limits;
            let p = match policies.iter().position(|q| *q == l) {
                Some(p) => p,
                None => {
                    policies.push(l);
                    policies.len() - 1
                }
            };
            pidx.push(p + 1);
        }
        // The scripts read every key with one MGET up front, which is only right if no key
        // repeats (a later claim on a key must see what an earlier one wrote).
        let repeats = {
            let mut seen = std::collections::HashSet::with_capacity_and_hasher(idx.len(), ahash::RandomState::new());
            !idx.iter().all(|&i| seen.insert(claims[i].key.as_bytes()))
        };
        let num = |n: u64| n.to_string().into_bytes();
        let mut args = vec![
            node.to_le_bytes().to_vec(),
            time_arg.as_bytes().to_vec(),
            if repeats { b"1".to_vec() } else { b"0".to_vec() },
            num(policies.len() as u64),
        ];
        for l in &policies {
            args.push(num(l.capacity()));
            args.push(num(l.period_us()));
            match algorithm {
                StoreAlgorithm::TokenBucket => args.push(num(l.lease_ms())),
                StoreAlgorithm::FixedWindow => {}
                StoreAlgorithm::SlidingWindow => args.push(num(l.tick_us())),
            }
        }
        // Per-key numbers travel as one binary argument: parsing string arguments per key
        // costs the server more than the rest of the script.
        let mut blob = Vec::with_capacity(idx.len() * CLAIM_WIDTH);
        let mut keys = Vec::with_capacity(idx.len());
        for (&i, &p) in idx.iter().zip(&pidx) {
            let c = &claims[i];
            let (kept, ret, want, window, seq) = clamped(c);
            keys.push(c.key.as_bytes());
            // p <= MAX_KEYS_PER_CALL; kept, ret and want <= capacity <= u32::MAX.
            blob.extend_from_slice(&(p as u16).to_le_bytes());
            for v in [kept, ret, want] {
                blob.extend_from_slice(&(v as u32).to_le_bytes());
            }
            // Windows keep no per-node state: their claims need no sequence number.
            let last = match algorithm {
                StoreAlgorithm::TokenBucket => seq,
                StoreAlgorithm::FixedWindow | StoreAlgorithm::SlidingWindow => window,
            };
            blob.extend_from_slice(&(last as f64).to_le_bytes());
        }
        args.push(blob);
        ClaimCall { keys, args }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

fn config_error(message: impl Into<String>) -> StoreError {
    StoreError::new(ErrorClass::Config, message)
}

/// Classifies an error reply by its code and detail: the same rules for a command's error and
/// for an error inside a pipeline or a script reply (a cluster's pipelines).
pub(crate) fn server_error(code: &str, detail: Option<&str>, message: String) -> StoreError {
    // Redis refuses large requests before authentication with this instead of NOAUTH.
    if code == "ERR" && detail.is_some_and(|d| d.contains("unauthenticated")) {
        return StoreError::new(ErrorClass::Config, message);
    }
    // Redis 7.0 refuses a command a script sends that the ACL user may not run with this
    // instead of NOPERM.
    if code == "ERR" && detail.is_some_and(|d| d.contains("user executing the script can't")) {
        return StoreError::new(
            ErrorClass::Config,
            format!("NOPERM: the ACL user may not run a command of tollgate's scripts: {message}"),
        );
    }
    StoreError::from_code(code, message)
}

/// [`server_error`] for an error reply inside a pipeline or a script reply.
pub(crate) fn reply_error(e: &redis::ServerError) -> StoreError {
    server_error(
        e.code(),
        e.details(),
        format!("{} {}", e.code(), e.details().unwrap_or_default()),
    )
}

/// Classifies a client error.
pub(crate) fn classify(e: &RedisError) -> StoreError {
    let message = e.to_string();
    if let Some(code) = e.code() {
        return server_error(code, e.detail(), message);
    }
    // A refused certificate is an I/O error to the client, but no retry will fix it.
    #[cfg(feature = "redis-tls")]
    if let Some(refused) = tls::handshake_refusal(e) {
        return refused;
    }
    if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return StoreError::new(ErrorClass::Transient, message);
    }
    let class = match e.kind() {
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig => ErrorClass::Config,
        redis::ErrorKind::Io | redis::ErrorKind::ClusterConnectionNotFound => ErrorClass::Transient,
        _ => ErrorClass::Protocol,
    };
    StoreError::new(class, message)
}

/// `rediss://`: building TLS clients, and telling refused certificates from network failures.
#[cfg(feature = "redis-tls")]
mod tls {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    use super::{config_error, CaSource, ErrorClass, RedisError, StoreError, TlsOptions};

    /// Adds the TLS options to a client of a `rediss://` URL.
    pub(super) fn client(client: redis::Client, tls: &TlsOptions) -> Result<redis::Client, StoreError> {
        // The process may have chosen a provider already; otherwise use ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut client = client;
        if tls.ca.is_some() || tls.client_cert.is_some() {
            let root_cert = match &tls.ca {
                None => None,
                Some(CaSource::Pem(pem)) => Some(check_ca(pem.clone(), "tls_ca_pem")?),
                Some(CaSource::File(path)) => {
                    let what = format!("TLS CA file {}", path.display());
                    let pem = std::fs::read(path).map_err(|e| config_error(format!("{what}: {e}")))?;
                    Some(check_ca(pem, &what)?)
                }
            };
            let client_tls = tls.client_cert.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            });
            let certificates = redis::TlsCertificates { client_tls, root_cert };
            client = redis::Client::build_with_tls(client.get_connection_info().clone(), certificates)
                .map_err(|e| config_error(format!("TLS client certificate or key: {e}")))?;
        }
        if tls.insecure {
            let info = client.get_connection_info().clone();
            let addr = match info.addr().clone() {
                redis::ConnectionAddr::TcpTls {
                    host, port, tls_params, ..
                } => redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: true,
                    tls_params,
                },
                other => other,
            };
            client = redis::Client::open(info.set_addr(addr)).map_err(|e| config_error(e.to_string()))?;
        }
        Ok(client)
    }

    /// The PEM of a CA, once it is known to hold at least one usable certificate.
    fn check_ca(pem: Vec<u8>, what: &str) -> Result<Vec<u8>, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| config_error(format!("{what}: invalid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| config_error(format!("{what}: not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(config_error(format!("{what}: no PEM CERTIFICATE block")));
        }
        Ok(pem)
    }

    /// The rustls error inside a client I/O error, if the TLS handshake failed.
    fn rustls_error(e: &RedisError) -> Option<&rustls::Error> {
        use std::error::Error;
        // redis-rs keeps the `io::Error` (which tokio-rustls made from the rustls error) in an
        // `Arc`; `io::Error::source` skips its payload, so the chain is walked by hand.
        let inner = e.source()?;
        let io = match inner.downcast_ref::<std::sync::Arc<dyn Error + Send + Sync>>() {
            Some(arc) => (**arc).downcast_ref::<std::io::Error>(),
            None => inner.downcast_ref::<std::io::Error>(),
        }?;
        io.get_ref()?.downcast_ref::<rustls::Error>()
    }

    /// A TLS handshake the certificates decided: a [`ErrorClass::Config`] error.
    pub(super) fn handshake_refusal(e: &RedisError) -> Option<StoreError> {
        use rustls::{AlertDescription as A, CertificateError as C};
        let err = rustls_error(e)?;
        let message = match err {
            rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
                "TLS: the server's certificate was refused: it is not valid for the host name in the URL ({err})"
            ),
            rustls::Error::InvalidCertificate(C::UnknownIssuer) => format!(
                "TLS: the server's certificate was refused: it is not signed by a trusted CA (see tls_ca_file) ({err})"
            ),
            rustls::Error::InvalidCertificate(_) => format!("TLS: the server's certificate was refused ({err})"),
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired,
            ) => format!("TLS: the server refused this client's certificate (see tls_client_cert) ({err})"),
            other => format!("TLS handshake failed (is the port a TLS port?) ({other})"),
        };
        Some(StoreError::new(ErrorClass::Config, message))
    }
}

impl RedisStore {
    fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(config.reconnect_retries)
            .set_max_delay(Duration::from_secs(2))
    }

    /// Builds the `redis::Client` for a configuration: the one place that does, so that the
    /// TLS parameters live in the client's connection info (a client for another node of the
    /// same deployment can be made from a copy of it with another address).
    pub(crate) fn client(config: &RedisConfig) -> Result<redis::Client, StoreError> {
        let tls_url = is_tls_url(&config.url);
        if !cfg!(feature = "redis-tls") && (tls_url || config.tls.is_set()) {
            return Err(config_error(
                "`rediss://` URLs and TLS options need tollgate's `redis-tls` feature",
            ));
        }
        if config.tls.is_set() && !tls_url {
            return Err(config_error(format!(
                "TLS options ({}) need a `rediss://` URL",
                config.tls.names()
            )));
        }
        let client = redis::Client::open(config.url.as_str()).map_err(|e| config_error(e.to_string()))?;
        if !matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { .. }
        ) {
            return Ok(client);
        }
        #[cfg(feature = "redis-tls")]
        return tls::client(client, &config.tls);
        #[cfg(not(feature = "redis-tls"))]
        Err(config_error("`rediss://` URLs need tollgate's `redis-tls` feature"))
    }

    fn from_manager(conn: ConnectionManager, client: redis::Client, config: RedisConfig) -> Self {
        RedisStore {
            conn: Arc::new(parking_lot::Mutex::new(conn)),
            source: Arc::new((client, config)),
            scripts: Arc::new(Scripts::new()),
            time_override: Arc::new(AtomicU64::new(NO_OVERRIDE)),
        }
    }

    /// Connects now (bounded by the connect timeout); fails if Redis cannot be reached.
    /// Accepts a [`RedisConfig`] or a URL.
    pub async fn connect(config: impl Into<RedisConfig>) -> Result<Self, StoreError> {
        let config = config.into();
        let client = Self::client(&config)?;
        let conn = ConnectionManager::new_with_config(client.clone(), Self::manager_config(&config))
            .await
            .map_err(|e| classify(&e))?;
        Ok(Self::from_manager(conn, client, config))
    }

    /// Returns at once and connects on first use, so a service can start while Redis is down.
    /// Must be called inside a tokio runtime.
    pub fn connect_lazy(config: impl Into<RedisConfig>) -> Result<Self, StoreError> {
        let config = config.into();
        let client = Self::client(&config)?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), Self::manager_config(&config))
            .map_err(|e| classify(&e))?;
        Ok(Self::from_manager(conn, client, config))
    }

    /// Tests only: makes the scripts use this time (microseconds since the Unix epoch) instead
    /// of Redis `TIME`, so that replies can be compared with a [`super::MemoryStore`] on a manual
    /// clock. Production code never calls this: node clocks are not trusted for global state.
    #[doc(hidden)]
    pub fn set_time_override_us(&self, us: Option<u64>) {
        let v = us.map_or(NO_OVERRIDE, |u| u.min(super::MAX_STORE_NUMBER));
        self.time_override.store(v, Ordering::Relaxed);
    }

    fn time_arg(&self) -> String {
        match self.time_override.load(Ordering::Relaxed) {
            NO_OVERRIDE => String::new(),
            us => us.to_string(),
        }
    }

    fn connection(&self) -> ConnectionManager {
        self.conn.lock().clone()
    }

    fn script(&self, algorithm: StoreAlgorithm) -> &Script {
        self.scripts.claim(algorithm)
    }

    /// One script call for claims (indices into `claims`) that share an algorithm.
    async fn call(
        &self,
        node: NodeId,
        algorithm: StoreAlgorithm,
        claims: &[Claim],
        idx: &[usize],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let args = ClaimCall::new(node, &self.time_arg(), algorithm, claims, idx);
        let mut inv = self.script(algorithm).prepare_invoke();
        for k in &args.keys {
            inv.key(*k);
        }
        for a in &args.args {
            inv.arg(a.as_slice());
        }
        let mut conn = self.connection();
        let reply: Value = inv.invoke_async(&mut conn).await.map_err(|e| classify(&e))?;
        decode_reply(reply, idx.len())
    }

    async fn claim_batch(&self, node: NodeId, claims: &[Claim]) -> Result<Vec<ClaimOutcome>, StoreError> {
        let mut groups: [Vec<usize>; 3] = Default::default();
        for (i, c) in claims.iter().enumerate() {
            let g = match c.limits.algorithm() {
                StoreAlgorithm::TokenBucket => 0,
                StoreAlgorithm::FixedWindow => 1,
                StoreAlgorithm::SlidingWindow => 2,
            };
            groups[g].push(i);
        }
        const ALGS: [StoreAlgorithm; 3] = [
            StoreAlgorithm::TokenBucket,
            StoreAlgorithm::FixedWindow,
            StoreAlgorithm::SlidingWindow,
        ];
        let mut calls = Vec::new();
        for (g, idx) in groups.iter().enumerate() {
            for chunk in idx.chunks(MAX_KEYS_PER_CALL) {
                calls.push((chunk, self.call(node, ALGS[g], claims, chunk)));
            }
        }
        let (chunks, futures): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
        let results = join_all(futures).await;
        let mut out: Vec<ClaimOutcome> = vec![Err(KeyError::Other(String::new())); claims.len()];
        for (chunk, res) in chunks.into_iter().zip(results) {
            for (&i, r) in chunk.iter().zip(res?) {
                out[i] = r;
            }
        }
        Ok(out)
    }
}

/// Polls all futures to completion concurrently, keeping their order.
pub(super) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        let mut pending = false;
        for (f, r) in futures.iter_mut().zip(results.iter_mut()) {
            if r.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *r = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(results.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn as_text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::ServerError(e) => format!("{} {}", e.code(), e.details().unwrap_or_default()),
        other => format!("{other:?}"),
    }
}

/// Decodes a script reply for `n` keys; never panics, whatever the shape.
pub(crate) fn decode_reply(reply: Value, n: usize) -> Result<Vec<ClaimOutcome>, StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(reply_error(&e)),
        other => {
            return Err(StoreError::new(
                ErrorClass::Protocol,
                format!("unexpected script reply: {other:?}"),
            ))
        }
    };
    let bad = |what: String| StoreError::new(ErrorClass::Protocol, what);
    // The per-key results: one string, or a list of strings to be joined.
    let blob: Cow<'_, [u8]> = match items.first() {
        Some(Value::BulkString(b)) => Cow::Borrowed(b),
        Some(Value::Array(parts)) => {
            let mut blob = Vec::with_capacity(n * REPLY_WIDTH);
            for part in parts {
                match part {
                    Value::BulkString(b) => blob.extend_from_slice(b),
                    other => return Err(bad(format!("script reply has a result part {other:?}"))),
                }
            }
            Cow::Owned(blob)
        }
        other => return Err(bad(format!("script reply for {n} keys starts with {other:?}"))),
    };
    if blob.len() != n * REPLY_WIDTH {
        return Err(bad(format!(
            "script reply for {n} keys has {} bytes of results",
            blob.len()
        )));
    }
    let mut out: Vec<ClaimOutcome> = blob.chunks_exact(REPLY_WIDTH).map(decode_one).collect();
    let rest = &items[1..];
    if rest.len() % 2 != 0 {
        return Err(bad(format!(
            "script reply has an odd error list of {} values",
            rest.len()
        )));
    }
    for pair in rest.chunks_exact(2) {
        let i = as_u64(&pair[0])
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| (1..=n).contains(&i));
        let Some(i) = i else {
            return Err(bad(format!("script reply names key {:?}", pair[0])));
        };
        let msg = as_text(&pair[1]);
        out[i - 1] = Err(if msg.starts_with("WRONGTYPE") {
            KeyError::WrongType(msg)
        } else if msg.starts_with("CORRUPT") {
            KeyError::Corrupt
        } else {
            KeyError::Other(msg)
        });
    }
    Ok(out)
}

/// Decodes the registry script's reply.
pub(super) fn decode_heartbeat(v: &Value) -> Result<Heartbeat, StoreError> {
    let bad = || StoreError::new(ErrorClass::Protocol, format!("unexpected heartbeat reply: {v:?}"));
    match v {
        Value::Array(items) if items.len() == 2 => Ok(Heartbeat {
            live_nodes: as_u64(&items[0]).ok_or_else(bad)?,
            server: ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(as_text(&items[1])),
        }),
        _ => Err(bad()),
    }
}

/// A reply number: a double holding a non-negative integer below 2^53.
fn number(b: &[u8]) -> Option<u64> {
    let v = f64::from_le_bytes(b.try_into().ok()?);
    (v >= 0.0 && v <= super::MAX_STORE_NUMBER as f64 && v.fract() == 0.0).then_some(v as u64)
}

fn decode_one(b: &[u8]) -> ClaimOutcome {
    match b[0] {
        status @ (0 | 2 | 3) => {
            let mut f = [0u64; 6];
            for (slot, chunk) in f.iter_mut().zip(b[1..].chunks_exact(8)) {
                *slot = number(chunk).ok_or_else(|| KeyError::Other(format!("bad reply value {chunk:?}")))?;
            }
            Ok(Grant {
                granted: f[0],
                remaining: f[1],
                ms_to_next_token: f[2],
                ms_to_reset: f[3],
                window: f[4],
                revoked: f[5],
                state_lost: status == 2,
                stale: status == 3,
            })
        }
        // Failed: the message follows in the error list (a missing one leaves this).
        1 => Err(KeyError::Other("failed without a message".into())),
        s => Err(KeyError::Other(format!("bad reply status {s}"))),
    }
}

impl Store for RedisStore {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        Box::pin(self.claim_batch(node, claims))
    }

    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        Box::pin(async move {
            let ttl_ms = ttl.as_millis().clamp(1, 1 << 40) as u64;
            let mut conn = self.connection();
            let v: Value = self
                .scripts
                .registry
                .key(registry.as_bytes())
                .arg(node.to_string())
                .arg(ttl_ms)
                .arg(self.time_arg())
                .invoke_async(&mut conn)
                .await
                .map_err(|e| classify(&e))?;
            decode_heartbeat(&v)
        })
    }

    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.connection();
            let _: Value = redis::cmd("ZREM")
                .arg(registry.as_bytes())
                .arg(node.to_string())
                .query_async(&mut conn)
                .await
                .map_err(|e| classify(&e))?;
            Ok(())
        })
    }

    fn reconnect(&self) {
        let (client, config) = &*self.source;
        // A fresh lazy connection: it resolves and connects again on its first use.
        match ConnectionManager::new_lazy_with_config(client.clone(), Self::manager_config(config)) {
            Ok(conn) => *self.conn.lock() = conn,
            Err(e) => tracing::warn!(error = %classify(&e), "tollgate: could not replace the Redis connection"),
        }
    }
}

/// Decodes a claim script's reply given as RESP bytes for `n` keys: the number of outcomes, or
/// the error; `None` when the bytes are not RESP. For the fuzz target; not part of the API.
#[doc(hidden)]
pub fn decode_reply_resp(resp: &[u8], n: usize) -> Option<Result<usize, StoreError>> {
    let value = redis::parse_redis_value(resp).ok()?;
    Some(decode_reply(value, n).map(|outcomes| outcomes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::BulkString),
            "[A-Z]{0,10}".prop_map(Value::SimpleString),
            Just(Value::Okay),
            any::<f64>().prop_map(Value::Double),
            any::<bool>().prop_map(Value::Boolean),
            (0i64..3).prop_map(Value::Int),
        ];
        leaf.prop_recursive(3, 64, 16, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..16).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    fn entry(status: u8, vals: [f64; 6]) -> Vec<u8> {
        let mut b = vec![status];
        for v in vals {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    proptest! {
        #[test]
        fn decoding_never_panics(v in arb_value(), n in 0usize..3) {
            let _ = decode_reply(v, n);
        }

        #[test]
        fn decoding_arbitrary_blobs_never_panics(b in proptest::collection::vec(any::<u8>(), 0..120), errs in proptest::collection::vec(arb_value(), 0..4)) {
            let n = b.len() / REPLY_WIDTH;
            let mut items = vec![Value::BulkString(b)];
            items.extend(errs);
            let _ = decode_reply(Value::Array(items), n);
        }

        #[test]
        fn well_formed_replies_decode(vals in proptest::collection::vec(0u64..1 << 53, 6)) {
            let f: Vec<f64> = vals.iter().map(|&v| v as f64).collect();
            let blob = entry(0, [f[0], f[1], f[2], f[3], f[4], f[5]]);
            let out = decode_reply(Value::Array(vec![Value::BulkString(blob)]), 1).unwrap();
            let g = out[0].clone().unwrap();
            prop_assert_eq!(g.granted, vals[0]);
            prop_assert_eq!(g.window, vals[4]);
            prop_assert_eq!(g.revoked, vals[5]);
        }
    }

    #[test]
    fn per_key_errors_and_bad_shapes() {
        let mut blob = entry(1, [0.0; 6]);
        blob.extend(entry(0, [5.0, 4.0, 0.0, 9.0, 0.0, 0.0]));
        blob.extend(entry(0, [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
        blob.extend(entry(0, [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]));
        blob.extend(entry(0, [f64::NAN, 0.0, 0.0, 0.0, 0.0, 0.0]));
        let wt = Value::BulkString(b"WRONGTYPE Operation against a key".to_vec());
        let reply = Value::Array(vec![Value::BulkString(blob.clone()), Value::Int(1), wt.clone()]);
        let out = decode_reply(reply, 5).unwrap();
        assert!(matches!(out[0], Err(KeyError::WrongType(_))));
        assert_eq!(out[1].as_ref().unwrap().granted, 5);
        assert!(out[2].is_err() && out[3].is_err() && out[4].is_err());
        // Wrong length, key index out of range, odd error list, other shapes.
        assert_eq!(
            decode_reply(Value::Array(vec![Value::BulkString(blob.clone())]), 4)
                .unwrap_err()
                .class(),
            ErrorClass::Protocol
        );
        let bad_index = Value::Array(vec![Value::BulkString(blob.clone()), Value::Int(6), wt.clone()]);
        assert_eq!(decode_reply(bad_index, 5).unwrap_err().class(), ErrorClass::Protocol);
        let odd = Value::Array(vec![Value::BulkString(blob), Value::Int(1)]);
        assert_eq!(decode_reply(odd, 5).unwrap_err().class(), ErrorClass::Protocol);
        assert_eq!(decode_reply(Value::Nil, 0).unwrap_err().class(), ErrorClass::Protocol);
        assert_eq!(
            decode_reply(Value::Array(vec![]), 0).unwrap_err().class(),
            ErrorClass::Protocol
        );
    }

    #[test]
    fn results_may_come_in_parts() {
        let (a, b) = (
            entry(0, [1.0, 2.0, 0.0, 3.0, 0.0, 0.0]),
            entry(2, [0.0, 5.0, 0.0, 7.0, 9.0, 1.0]),
        );
        let parts = |p: Vec<Vec<u8>>| Value::Array(vec![Value::Array(p.into_iter().map(Value::BulkString).collect())]);
        let out = decode_reply(parts(vec![a.clone(), b.clone()]), 2).unwrap();
        let whole = decode_reply(
            Value::Array(vec![Value::BulkString([a.clone(), b.clone()].concat())]),
            2,
        )
        .unwrap();
        assert_eq!(out, whole);
        assert_eq!(out[0].as_ref().unwrap().granted, 1);
        assert!(out[1].as_ref().unwrap().state_lost);
        // A part may split a key's result; the lengths must add up; parts are strings.
        let mut joined = [a.clone(), b.clone()].concat();
        let tail = joined.split_off(30);
        assert_eq!(decode_reply(parts(vec![joined, tail]), 2).unwrap(), whole);
        assert_eq!(
            decode_reply(parts(vec![a.clone()]), 2).unwrap_err().class(),
            ErrorClass::Protocol
        );
        let odd = Value::Array(vec![Value::Array(vec![Value::BulkString(a), Value::Int(1)])]);
        assert_eq!(decode_reply(odd, 1).unwrap_err().class(), ErrorClass::Protocol);
        assert_eq!(decode_reply(parts(vec![]), 0).unwrap(), vec![]);
    }

    #[test]
    fn passwords_stay_out_of_debug() {
        for (url, shown) in [
            ("redis://u:p4ss@host:1/0", "redis://u:<redacted>@host:1/0"),
            ("rediss://:p4ss@host", "rediss://:<redacted>@host"),
            ("redis://p4ss@host/", "redis://<redacted>@host/"),
            ("redis://host:1/#a@b", "redis://host:1/#a@b"),
            ("redis://u:p@4ss@host", "redis://u:<redacted>@host"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_password(url), shown);
        }
        let debug = format!("{:?}", RedisConfig::new("redis://u:p4ss@h").tls_client_cert("c", "KEY"));
        assert!(!debug.contains("p4ss") && !debug.contains("KEY"), "{debug}");
    }

    #[test]
    fn tls_needs_a_tls_url_and_the_feature() {
        let config_err = |c: RedisConfig| RedisStore::client(&c).unwrap_err();
        let e = config_err(RedisConfig::new("redis://127.0.0.1:1").tls_insecure_skip_verify(true));
        assert_eq!(e.class(), ErrorClass::Config);
        let needle = if cfg!(feature = "redis-tls") {
            "tls_insecure_skip_verify"
        } else {
            "redis-tls"
        };
        assert!(e.message().contains(needle), "{e}");
        assert!(RedisStore::client(&RedisConfig::new("redis://127.0.0.1:1").tls_insecure_skip_verify(false)).is_ok());
        let tls = RedisConfig::new("REDISS://127.0.0.1:1");
        if cfg!(feature = "redis-tls") {
            assert!(RedisStore::client(&tls).is_ok());
        } else {
            let e = config_err(tls);
            assert_eq!(e.class(), ErrorClass::Config);
            assert!(e.message().contains("redis-tls"), "{e}");
        }
    }

    #[test]
    fn error_codes_are_classified() {
        use super::super::classify_code;
        for (code, class) in [
            ("LOADING", ErrorClass::Transient),
            ("BUSY", ErrorClass::Transient),
            ("TRYAGAIN", ErrorClass::Transient),
            ("CLUSTERDOWN", ErrorClass::Transient),
            ("READONLY", ErrorClass::Topology),
            ("MOVED", ErrorClass::Topology),
            ("NOAUTH", ErrorClass::Config),
            ("WRONGPASS", ErrorClass::Config),
            ("NOPERM", ErrorClass::Config),
            ("OOM", ErrorClass::Resource),
            ("ERR", ErrorClass::Protocol),
        ] {
            assert_eq!(classify_code(code), class, "{code}");
        }
    }
}
