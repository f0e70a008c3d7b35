//! A tonic gRPC service behind the rate-limit layer: anonymous clients get 5 calls a minute per
//! address.
//!
//! ```text
//! cargo run --example tonic_server --features http              # serves 127.0.0.1:50051
//! cargo run --example tonic_server --features http -- call 7    # another terminal: 7 calls
//! ```
//!
//! The second command is a tonic client that calls `demo.Greeter/SayHello` and prints one line
//! per call. The first five are answered by the service; from the sixth on, the layer answers
//! for it and the client sees a `Status` of code `RESOURCE_EXHAUSTED` (gRPC has no 429: the
//! refusal is an HTTP 200 whose headers carry `grpc-status: 8`), with the retry delay in its
//! message and in its metadata:
//!
//! ```text
//! 1: Hello, tollgate! (ratelimit: "user:anonymous";r=4;t=12)
//! ...
//! 5: Hello, tollgate! (ratelimit: "user:anonymous";r=0;t=60)
//! 6: ResourceExhausted: rate limit exceeded (user:anonymous); retry after 12 s (grpc-retry-pushback-ms: 11998, retry-after: 12)
//! ```
//!
//! A tonic client with a retry policy could wait `grpc-retry-pushback-ms` before trying again.
//!
//! Settings (environment): `PORT`, the port on 127.0.0.1 to serve on or to call (default
//! 50051).
//!
//! tonic records each connection's client address as `TcpConnectInfo` in the request's
//! extensions; the layer reads [`PeerAddr`](tollgate::http::PeerAddr), so a small map layer in
//! front of it copies one into the other (`with_peer_addr`).

#[path = "support/greeter.rs"]
mod greeter;

use std::net::{Ipv4Addr, SocketAddr};

use tollgate::config::{Config, LiveConfig};
use tollgate::http::RateLimitLayer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tower::util::MapRequestLayer;

use greeter::{GreeterClient, GreeterServer, HelloRequest};

/// The tiers: every client is anonymous here (no authentication), so counted per address.
const TIERS: &str = r#"{"tiers": {"anonymous": {"points": 5, "duration": 60}}}"#;

/// The most calls `call` makes.
const MAX_CALLS: u32 = 100;

#[tokio::main]
async fn main() {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .unwrap_or_else(|_| fail(format!("PORT={p} is not a port number"))),
        Err(_) => 50051,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        None => serve(addr).await,
        Some("call") => {
            let n = args.next().map_or(Ok(7), |n| n.parse::<u32>());
            match n {
                Ok(n) => call(addr, n.min(MAX_CALLS)).await,
                Err(_) => fail("usage: tonic_server call [COUNT]".into()),
            }
        }
        Some(other) => fail(format!(
            "unknown argument {other:?}; usage: tonic_server [call [COUNT]]"
        )),
    };
    if let Err(e) = result {
        fail(e.to_string());
    }
}

/// Prints `message` and exits with status 1.
fn fail(message: String) -> ! {
    eprintln!("tonic_server: {message}");
    std::process::exit(1);
}

/// Serves the greeter until Ctrl-C.
async fn serve(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let live = LiveConfig::new(Config::from_json(TIERS)?)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("serving demo.Greeter on {}", listener.local_addr()?);
    Server::builder()
        // Outermost first: the client address, then the limits, then the service.
        .layer(MapRequestLayer::new(greeter::with_peer_addr::<tonic::body::Body>))
        .layer(RateLimitLayer::new(live))
        .add_service(GreeterServer)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Calls the greeter `n` times on one connection and prints each outcome.
async fn call(addr: SocketAddr, n: u32) -> Result<(), Box<dyn std::error::Error>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = GreeterClient::new(channel);
    for i in 1..=n {
        let request = HelloRequest {
            name: "tollgate".into(),
        };
        match client.say_hello(request).await {
            Ok(reply) => {
                let ratelimit = reply.metadata().get("ratelimit").and_then(|v| v.to_str().ok());
                println!(
                    "{i}: {} (ratelimit: {})",
                    reply.get_ref().message,
                    ratelimit.unwrap_or("-")
                );
            }
            Err(status) => {
                let header = |name| status.metadata().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-");
                println!(
                    "{i}: {:?}: {} (grpc-retry-pushback-ms: {}, retry-after: {})",
                    status.code(),
                    status.message(),
                    header("grpc-retry-pushback-ms"),
                    header("retry-after"),
                );
            }
        }
    }
    Ok(())
}
