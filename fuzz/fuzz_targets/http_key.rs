//! The HTTP key derivation: forwarded headers (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`)
//! from trusted and untrusted peers, IPv4, IPv6 and IPv4-mapped addresses, and API-key header
//! values. `client_ip` never panics, believes no header from an untrusted peer and never
//! returns an IPv4-mapped address; the layer answers every request (admitted or refused)
//! without panicking, whatever the header bytes.
#![no_main]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use libfuzzer_sys::{arbitrary, fuzz_target};
use tollgate::config::{ClientIp, Config, LiveConfig};
use tollgate::http::{client_ip, PeerAddr, RateLimit, RateLimitLayer};
use tower_layer::Layer;
use tower_service::Service;

/// The route behind the layer: answers at once.
#[derive(Clone)]
struct Hello;

impl Service<Request<()>> for Hello {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

const HEADERS: [&str; 3] = ["x-forwarded-for", "forwarded", "x-real-ip"];

/// One configuration and layer per forwarding header, built once.
fn setups() -> &'static [(ClientIp, RateLimit<Hello>); 3] {
    static SETUPS: OnceLock<[(ClientIp, RateLimit<Hello>); 3]> = OnceLock::new();
    SETUPS.get_or_init(|| {
        HEADERS.map(|header| {
            let json = format!(
                r#"{{"tiers": {{"anonymous": {{"points": 5, "duration": 60}}, "free": {{"points": 50, "duration": 60}}}},
                    "default_tier": "free",
                    "layers": {{"ip": {{"points": 20, "duration": 60}}, "user": true}},
                    "client_ip": {{"trusted_proxies": ["10.0.0.0/8", "fd00::/8", "192.0.2.1"], "header": "{header}", "ipv6_prefix": 56}},
                    "api_key": {{"header": "x-api-key"}},
                    "max_keys": 4096}}"#
            );
            let config = Config::from_json(&json).expect("a valid configuration");
            let client = config.client_ip.clone();
            let layer = RateLimitLayer::new(LiveConfig::new(config).expect("valid rules")).layer(Hello);
            (client, layer)
        })
    })
}

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    header: u8,
    /// The peer: IPv4 when `v6` is false (the first 4 bytes), else IPv6; `trusted` moves it
    /// into a trusted range.
    v6: bool,
    trusted: bool,
    peer: [u8; 16],
    port: u16,
    /// Values of the forwarding header, in order.
    forwarded: Vec<Vec<u8>>,
    /// Values of the API-key header.
    api_keys: Vec<Vec<u8>>,
}

fn peer(input: &Input) -> IpAddr {
    let mut b = input.peer;
    if input.v6 {
        if input.trusted {
            b[0] = 0xfd;
        }
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        if input.trusted {
            b[0] = 10;
        }
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

fn mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

fuzz_target!(|input: Input| {
    let which = usize::from(input.header) % HEADERS.len();
    let (cfg, layer) = &setups()[which];
    let name = HeaderName::from_static(HEADERS[which]);
    let mut headers = HeaderMap::new();
    for v in input.forwarded.iter().take(8) {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(name.clone(), v);
        }
    }
    for v in input.api_keys.iter().take(2) {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append("x-api-key", v);
        }
    }
    let peer = peer(&input);

    let ip = client_ip(peer, &headers, cfg);
    assert!(!mapped(ip), "an IPv4-mapped address came out: {ip}");
    let peer_trusted = cfg.trusted_proxies.iter().any(|c| c.contains(peer));
    if !peer_trusted && !mapped(peer) {
        assert_eq!(ip, peer, "a header was believed from an untrusted peer");
    }

    let mut req = Request::get("/").body(()).unwrap();
    *req.headers_mut() = headers;
    req.extensions_mut().insert(PeerAddr(SocketAddr::new(peer, input.port)));
    let mut service = layer.clone();
    let fut = pin!(service.call(req));
    let Poll::Ready(resp) = fut.poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("a local-mode check answers at once");
    };
    let status = resp.unwrap().status();
    assert!(
        status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
        "unexpected status {status}"
    );
});
