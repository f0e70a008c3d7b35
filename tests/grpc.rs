//! The layer in front of a tonic gRPC service, called by a real tonic client over HTTP/2 on
//! 127.0.0.1: what a tonic application sees of an admission, a rate-limit refusal and a
//! deny-list refusal. Every limiter runs on a manual clock, so the retry delays are exact.
//!
//! Clients are told apart by address: Linux routes all of 127.0.0.0/8 to the loopback
//! interface, so a client bound to 127.0.0.2 reaches the server on 127.0.0.1 as a different
//! client.

#[path = "../examples/support/greeter.rs"]
mod greeter;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tollgate::config::{Config, LiveConfig};
use tollgate::http::RateLimitLayer;
use tollgate::ManualClock;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tower::util::MapRequestLayer;

use greeter::{GreeterClient, GreeterServer, HelloRequest};

/// Five calls a minute for each anonymous client: one more every 12 s.
const TIERS: &str = r#"{
    "tiers": {"anonymous": {"points": 5, "duration": 60}},
    "deny": {"ips": ["127.0.0.3"]}
}"#;

/// The greeter behind the rate-limit layer, as the example serves it, on 127.0.0.1 and a free
/// port; the limiters read `clock`.
async fn start(clock: &ManualClock) -> SocketAddr {
    let live = LiveConfig::builder()
        .config(Config::from_json(TIERS).unwrap())
        .clock(clock.clock())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(MapRequestLayer::new(greeter::with_peer_addr::<tonic::body::Body>))
        .layer(RateLimitLayer::new(live))
        .add_service(GreeterServer)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move { server.await.unwrap() });
    addr
}

/// A tonic client of the server at `addr` whose connection comes from address `from`.
async fn client(addr: SocketAddr, from: Ipv4Addr) -> GreeterClient {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(IpAddr::V4(from)))
        .connect()
        .await
        .unwrap();
    GreeterClient::new(channel)
}

/// One `SayHello` call: the greeting, or the refusal.
async fn hello(client: &mut GreeterClient, name: &str) -> Result<String, Status> {
    let request = HelloRequest { name: name.into() };
    client.say_hello(request).await.map(|r| r.into_inner().message)
}

/// A metadata value of a refusal, as text.
fn meta<'a>(status: &'a Status, key: &str) -> &'a str {
    status
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", status.metadata()))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn calls_past_the_limit_fail_with_resource_exhausted_naming_the_retry_delay() {
    let clock = ManualClock::new();
    let addr = start(&clock).await;
    let mut c = client(addr, Ipv4Addr::LOCALHOST).await;

    for i in 0..5 {
        let reply = c
            .say_hello(HelloRequest { name: "ada".into() })
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
        assert_eq!(reply.get_ref().message, "Hello, ada!", "the handler's reply");
        // Admitted calls carry the rate-limit headers among their response metadata.
        let remaining = format!(r#""user:anonymous";r={};t={}"#, 4 - i, 12 * (i + 1));
        assert_eq!(reply.metadata().get("ratelimit").unwrap().to_str().unwrap(), remaining);
    }

    let refused = hello(&mut c, "ada").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.message(),
        "rate limit exceeded (user:anonymous); retry after 12 s"
    );
    let pushback: u64 = meta(&refused, "grpc-retry-pushback-ms").parse().unwrap();
    assert_eq!(pushback, 12_000, "the wait until the next call is admitted");
    assert_eq!(meta(&refused, "retry-after"), "12");

    // The delay is the real one: a call just before it is refused, one after it admitted.
    clock.advance(Duration::from_millis(pushback - 1));
    assert_eq!(hello(&mut c, "ada").await.unwrap_err().code(), Code::ResourceExhausted);
    clock.advance(Duration::from_millis(1));
    assert_eq!(hello(&mut c, "ada").await.unwrap(), "Hello, ada!");
}

#[tokio::test]
async fn another_client_address_keeps_its_own_allowance() {
    let clock = ManualClock::new();
    let addr = start(&clock).await;
    let mut first = client(addr, Ipv4Addr::LOCALHOST).await;
    for _ in 0..5 {
        hello(&mut first, "ada").await.unwrap();
    }
    assert_eq!(
        hello(&mut first, "ada").await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    let mut second = client(addr, Ipv4Addr::new(127, 0, 0, 2)).await;
    for i in 0..5 {
        let reply = hello(&mut second, "grace").await;
        assert_eq!(reply.as_deref().ok(), Some("Hello, grace!"), "call {i}: {reply:?}");
    }
    assert_eq!(
        hello(&mut second, "grace").await.unwrap_err().code(),
        Code::ResourceExhausted
    );
}

#[tokio::test]
async fn a_deny_listed_address_gets_permission_denied() {
    let clock = ManualClock::new();
    let addr = start(&clock).await;
    let mut denied = client(addr, Ipv4Addr::new(127, 0, 0, 3)).await;
    let status = hello(&mut denied, "mallory").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "this client is not allowed to use this service");

    let mut allowed = client(addr, Ipv4Addr::LOCALHOST).await;
    assert_eq!(hello(&mut allowed, "ada").await.unwrap(), "Hello, ada!");
}
