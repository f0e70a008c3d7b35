//! An axum server limited by the tiers file.
//!
//! ```text
//! cargo run --example axum_server --features http
//! curl -i localhost:3000/                                    # anonymous: 20 per minute
//! curl -i -H 'x-demo-user: alice' localhost:3000/            # free: 100 per minute
//! curl -i -H 'x-demo-user: bob' -H 'x-demo-tier: premium' localhost:3000/
//! curl -i -X POST -H 'x-demo-user: alice' localhost:3000/api/ai/generate   # 10 per hour
//! ```
//!
//! Settings (environment):
//!
//! * `TIERS_FILE`: the configuration (default: `rate-limit-tiers.json` of this crate); edited
//!   files are reloaded within 2 s, and a broken edit is rejected while the old rules serve.
//! * `BIND`: the address to listen on (default `127.0.0.1:3000`).
//! * `REDIS_URL`: distributed mode through Redis (build with `--features http,redis`), or
//!   through a Redis Cluster of which it is a seed when the file says
//!   `"redis": {"cluster": true, ...}`; local mode without it. A tiers file without
//!   `api_key.secret` (the shipped one) gets the deployment's shared secret from Redis.
//!
//!
//! The log (standard output, `info` and above) shows reloads and rejected files, and in
//! distributed mode the store's circuit opening and closing and lost state.
//!
//! The demo authentication trusts the `x-demo-user` and `x-demo-tier` headers: a real service
//! sets [`UserId`] and [`Tier`] from a verified token instead. API keys (`x-api-key`) are
//! checked against a demo table (`sk_demo_premium`, premium); other keys count as anonymous.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tollgate::config::{Config, LiveConfig};
use tollgate::http::{RateLimitLayer, Tier, UserId, Verified};

/// Demo authentication: the user and tier come from headers.
async fn demo_auth(mut req: Request, next: Next) -> Response {
    let (user, tier) = {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (header("x-demo-user"), header("x-demo-tier"))
    };
    if let Some(user) = user {
        req.extensions_mut().insert(UserId(user.into()));
        // An authenticated user without a plan is on the default tier (`free`).
        if let Some(tier) = tier {
            req.extensions_mut().insert(Tier(tier.into()));
        }
    }
    next.run(req).await
}

/// Where the instances of a deployment keep their shared API-key secret when the tiers file
/// has none (inside the default key prefix, so a least-privilege ACL user can reach it).
#[cfg(feature = "redis")]
const SHARED_SECRET_KEY: &str = "tg:api-key-secret";

/// The deployment's API-key secret, for a tiers file without `api_key.secret` in distributed
/// mode (every instance must hash API keys alike): the first instance to start stores a random
/// one in Redis (`SET NX`), every instance uses the stored one. A real deployment would rather
/// put its own in the file (`"api_key": {"secret": "<32 hex digits>"}`).
#[cfg(feature = "redis")]
async fn shared_api_key_secret(url: &str) -> Result<[u8; 16], Box<dyn std::error::Error>> {
    let mut con = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    // Random bytes from the OS, through ahash's keys (drawn from the OS at process start).
    let random = ahash::RandomState::new();
    let fresh: String = [random.hash_one(1u8), random.hash_one(2u8)]
        .iter()
        .map(|h| format!("{h:016x}"))
        .collect();
    let _: Option<String> = redis::cmd("SET")
        .arg(SHARED_SECRET_KEY)
        .arg(&fresh)
        .arg("NX")
        .query_async(&mut con)
        .await?;
    let hex: String = redis::cmd("GET").arg(SHARED_SECRET_KEY).query_async(&mut con).await?;
    let mut secret = [0u8; 16];
    for (i, b) in secret.iter_mut().enumerate() {
        *b = hex
            .get(2 * i..2 * i + 2)
            .and_then(|d| u8::from_str_radix(d, 16).ok())
            .ok_or_else(|| format!("{SHARED_SECRET_KEY} in Redis is not 32 hex digits"))?;
    }
    Ok(secret)
}

async fn live_config(
    path: &str,
    #[allow(unused_mut)] mut config: Config,
) -> Result<(LiveConfig, Option<tollgate::Node>), Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        tracing::info!("local mode");
        return Ok((LiveConfig::builder().config(config).file(path).build()?, None));
    };
    #[cfg(feature = "redis")]
    {
        let cluster = config.redis.as_ref().is_some_and(|r| r.cluster);
        if let Some(api_key) = config.api_key.as_mut().filter(|a| a.secret.is_none() && !cluster) {
            api_key.secret = Some(shared_api_key_secret(&url).await?);
            tracing::info!("api_key.secret: not in the tiers file; using the deployment's shared one from Redis");
        }
    }
    let builder = LiveConfig::builder().config(config.clone()).file(path);
    #[cfg(feature = "redis")]
    {
        // The tiers file's `redis` settings, at REDIS_URL (with `"cluster": true`, a Redis
        // Cluster seed).
        let node = match &config.redis {
            Some(redis) => {
                let mut redis = redis.clone();
                redis.url = url.clone();
                redis.apply(tollgate::Node::builder(redis.connect().await?))
            }
            None => tollgate::Node::builder(std::sync::Arc::new(
                tollgate::store::RedisStore::connect(url.as_str()).await?,
            )),
        };
        let node = node.start()?;
        tracing::info!("distributed mode through {url}");
        Ok((builder.node(&node).build()?, Some(node)))
    }
    #[cfg(not(feature = "redis"))]
    {
        tracing::warn!("REDIS_URL={url} is set, but this build has no `redis` feature: local mode");
        Ok((builder.build()?, None))
    }
}

/// Demo API keys: a real service looks keys up in its own store.
fn demo_keys(key: &str) -> Option<Verified> {
    (key == "sk_demo_premium").then(|| Verified::user("demo-premium").tier("premium"))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let path = std::env::var("TIERS_FILE")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/rate-limit-tiers.json").to_string());
    // One `path: reason` line per problem.
    let config = match Config::from_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{path} is not a valid tiers file:\n{e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = serve(&path, config).await {
        eprintln!("axum_server: {e}");
        std::process::exit(1);
    }
}

async fn serve(path: &str, config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let (live, node) = live_config(path, config).await?;
    let _watcher = live.watch(Duration::from_secs(2))?;

    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/api/ai/generate", post(|| async { "an expensive answer\n" }))
        .layer(
            RateLimitLayer::builder(live)
                .api_key_validator(demo_keys)
                .build()
                .same_body(),
        )
        // Outermost: authentication runs before the rate limit.
        .layer(middleware::from_fn(demo_auth));

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    if let Some(node) = node {
        node.shutdown().await;
    }
    Ok(())
}
