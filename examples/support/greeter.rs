//! A one-method gRPC service, `demo.Greeter/SayHello`, written by hand on top of tonic (no
//! `.proto` file, no `protoc`, no build script): the messages, the server and the client are
//! what `tonic-build` would generate from
//!
//! ```text
//! package demo;
//! service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! ```
//!
//! reduced to what one unary method needs, and [`with_peer_addr`], which hands tonic's record
//! of the client address to the rate-limit layer. Shared by the `tonic_server` example and the
//! gRPC tests.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use tollgate::http::PeerAddr;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;
use tonic::transport::Channel;
use tonic::{IntoRequest, Request, Response, Status};
use tonic_prost::ProstCodec;

/// The request message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// Who to greet.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// The reply message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// The greeting.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The method's path: `/<package>.<service>/<method>`.
pub const SAY_HELLO: &str = "/demo.Greeter/SayHello";

/// The handler: what an application writes.
pub async fn say_hello(request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
    let name = request.into_inner().name;
    Ok(Response::new(HelloReply {
        message: format!("Hello, {name}!"),
    }))
}

/// The server side: an HTTP service that decodes the request, calls [`say_hello`] and encodes
/// its reply (generated code would call a user trait's method instead).
#[derive(Clone, Copy, Debug, Default)]
pub struct GreeterServer;

/// tonic's router sends every `/demo.Greeter/...` request to this service.
impl NamedService for GreeterServer {
    const NAME: &'static str = "demo.Greeter";
}

impl tower::Service<http::Request<Body>> for GreeterServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != SAY_HELLO {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        Box::pin(async move {
            // Framing, decoding, the call, encoding and the trailers: tonic's unary helper.
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            Ok(grpc.unary(tower::service_fn(say_hello), req).await)
        })
    }
}

/// The client side: one method on a tonic channel.
#[derive(Clone, Debug)]
pub struct GreeterClient {
    inner: tonic::client::Grpc<Channel>,
}

impl GreeterClient {
    /// A client over `channel`.
    pub fn new(channel: Channel) -> Self {
        GreeterClient {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    /// Calls `SayHello`: the reply, or the `Status` the server (or its middleware) answered.
    pub async fn say_hello(&mut self, request: impl IntoRequest<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("service was not ready: {e}")))?;
        let path = PathAndQuery::from_static(SAY_HELLO);
        self.inner
            .unary(request.into_request(), path, ProstCodec::default())
            .await
    }
}

/// Copies the client address tonic records for each request ([`TcpConnectInfo`]) into the
/// [`PeerAddr`] extension the rate-limit layer reads. Use it with
/// `tower::util::MapRequestLayer` outside the rate-limit layer.
pub fn with_peer_addr<B>(mut req: http::Request<B>) -> http::Request<B> {
    let peer = req
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr);
    if let Some(addr) = peer {
        req.extensions_mut().insert(PeerAddr(addr));
    }
    req
}
