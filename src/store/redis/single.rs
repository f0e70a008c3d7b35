//! [`RedisStore`]: the claim protocol on one Redis server, through the Lua scripts in `lua/`.
//!
//! Each script handles a batch of keys in one `EVALSHA` (`redis::Script` loads it again after
//! `NOSCRIPT`, which means the script did not run, so that retry is safe). Claims of a batch are
//! grouped by algorithm; the (at most three) script calls of one sync are sent together on the
//! multiplexed connection, so a sync costs one round trip. The connection is a
//! `ConnectionManager`: it reconnects in the background, and every call is bounded by the
//! response timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::config::RedisConfig;
use super::error::classify;
use super::join::join_all;
use super::wire::{decode_heartbeat, decode_reply, ClaimCall, Scripts};
use crate::store::{
    Claim, ClaimOutcome, Heartbeat, KeyError, NodeId, Store, StoreAlgorithm, StoreError, StoreFuture, StoreKey,
    MAX_KEYS_PER_CALL, MAX_STORE_NUMBER,
};

/// No time override: the scripts read Redis `TIME`.
const NO_OVERRIDE: u64 = u64::MAX;

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

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout_value()))
            .set_response_timeout(Some(config.response_timeout_value()))
            .set_number_of_retries(config.reconnect_retries_value())
            .set_max_delay(Duration::from_secs(2))
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
        let client = config.client()?;
        let conn = ConnectionManager::new_with_config(client.clone(), Self::manager_config(&config))
            .await
            .map_err(|e| classify(&e))?;
        Ok(Self::from_manager(conn, client, config))
    }

    /// Returns at once and connects on first use, so a service can start while Redis is down.
    /// Must be called inside a tokio runtime.
    pub fn connect_lazy(config: impl Into<RedisConfig>) -> Result<Self, StoreError> {
        let config = config.into();
        let client = config.client()?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), Self::manager_config(&config))
            .map_err(|e| classify(&e))?;
        Ok(Self::from_manager(conn, client, config))
    }

    /// Tests only: makes the scripts use this time (microseconds since the Unix epoch) instead
    /// of Redis `TIME`, so that replies can be compared with a [`MemoryStore`](crate::store::MemoryStore) on a manual
    /// clock. Production code never calls this: node clocks are not trusted for global state.
    #[doc(hidden)]
    pub fn set_time_override_us(&self, us: Option<u64>) {
        let v = us.map_or(NO_OVERRIDE, |u| u.min(MAX_STORE_NUMBER));
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
