//! The axum example with metrics: decisions, near-limit requests, shadow-mode would-blocks and
//! (in distributed mode) the store link's health, scraped from `/metrics` in the Prometheus
//! text format through `metrics-exporter-prometheus`.
//!
//! ```text
//! cargo run --example prometheus --features http,metrics
//! curl -s localhost:3000/ ; curl -s localhost:3000/metrics | grep tollgate_
//! ```
//!
//! Settings (environment): `TIERS_FILE` (default: `rate-limit-tiers.json` of this crate) and
//! `BIND` (default `127.0.0.1:3000`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusBuilder;
use tollgate::config::{Config, LiveConfig};
use tollgate::http::RateLimitLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The recorder may be installed before or after the limiters are built: totals are
    // published as absolute values.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    tollgate::metrics::describe_metrics();
    // Local mode has no sync task to publish: a publisher thread does, every second.
    let _publisher = tollgate::metrics::Publisher::start(Duration::from_secs(1));

    let path = std::env::var("TIERS_FILE")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/rate-limit-tiers.json").to_string());
    let live = LiveConfig::builder()
        .config(Config::from_file(&path)?)
        .file(&path)
        .build()?;

    let scrape = move || {
        let prometheus = prometheus.clone();
        async move {
            tollgate::metrics::publish(); // the freshest totals for this scrape
            prometheus.render()
        }
    };
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .layer(RateLimitLayer::new(live).same_body())
        // Outside the rate limit: scrapes are never limited.
        .route("/metrics", get(scrape));

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
