//! The response side of [`RateLimit`](super::RateLimit): what the layer adds to a response, the
//! response future, and how the response body is typed.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ::http::{Request, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::headers::Attach;
use super::ShadowVerdict;

mod sealed {
    pub trait Sealed {}
}

/// How a [`RateLimit`](super::RateLimit) service types the bodies of its responses: the
/// inner service's responses and the layer's own (429, 403, key error).
///
/// Two kinds, chosen on the layer: [`Wrapped`] (the default, for any inner body) and
/// [`SameBody`] (the inner service's body type itself, for bodies made from [`Bytes`]).
pub trait BodyKind<B>: sealed::Sealed + Send + Sync + 'static {
    /// The body of the service's responses.
    type Body;

    /// The inner service's body.
    #[doc(hidden)]
    fn inner(body: B) -> Self::Body;

    /// A body of the layer's own; empty data ends the stream with the headers.
    #[doc(hidden)]
    fn own(data: Bytes) -> Self::Body;

    /// The inner service's response, as it is.
    #[doc(hidden)]
    fn inner_response(response: Response<B>) -> Response<Self::Body> {
        response.map(Self::inner)
    }
}

/// The responses carry a [`ResponseBody`]: the inner service's body or the layer's own. Works
/// with any inner body; axum boxes the wrapped body once more into its own `Body`.
#[derive(Clone, Copy, Debug)]
pub enum Wrapped {}

/// The responses carry the inner service's body type, and the layer makes its own bodies with
/// `From<Bytes>` (axum's `Body`, `http_body_util::Full<Bytes>`): no wrapper, so axum does not
/// box the response body a second time. Chosen with
/// [`RateLimitLayer::same_body`](super::RateLimitLayer::same_body).
#[derive(Clone, Copy, Debug)]
pub enum SameBody {}

impl sealed::Sealed for Wrapped {}
impl sealed::Sealed for SameBody {}

impl<B> BodyKind<B> for Wrapped {
    type Body = ResponseBody<B>;

    fn inner(body: B) -> ResponseBody<B> {
        ResponseBody::Inner { body }
    }

    fn own(data: Bytes) -> ResponseBody<B> {
        ResponseBody::Full {
            data: Some(data).filter(|d| !d.is_empty()),
        }
    }
}

impl<B: From<Bytes>> BodyKind<B> for SameBody {
    type Body = B;

    fn inner(body: B) -> B {
        body
    }

    fn own(data: Bytes) -> B {
        B::from(data)
    }

    fn inner_response(response: Response<B>) -> Response<B> {
        response
    }
}

/// What the layer adds to the inner service's response: the rate-limit headers and, in shadow
/// mode, the verdict (boxed: it is rare, and this travels in the response future, which is
/// moved several times on its way to the executor).
#[derive(Default)]
pub(super) struct Finish {
    attach: Attach,
    shadow: Option<Box<ShadowVerdict>>,
}

impl Finish {
    /// True when there is nothing to add.
    pub(super) fn is_empty(&self) -> bool {
        self.attach.is_empty() && self.shadow.is_none()
    }

    pub(super) fn new(attach: Attach, shadow: Option<ShadowVerdict>) -> Self {
        Finish {
            attach,
            shadow: shadow.map(Box::new),
        }
    }

    /// In shadow mode, the verdict goes into the request's extensions too, for the inner
    /// service.
    pub(super) fn mark<B>(&self, req: &mut Request<B>) {
        if let Some(v) = &self.shadow {
            req.extensions_mut().insert(**v);
        }
    }

    /// The inner service's response with the layer's headers (and verdict).
    pub(super) fn apply<B>(self, mut response: Response<B>) -> Response<B> {
        self.attach.apply(response.headers_mut());
        if let Some(v) = self.shadow {
            response.extensions_mut().insert(*v);
        }
        response
    }
}

/// What a decision made later (distributed mode) ends in: a response of the layer's own, or the
/// inner service's (with the layer's headers already added).
pub(super) enum Answer<B> {
    Own(Response<Bytes>),
    Inner(Response<B>),
}

type BoxedAnswer<B, E> = Pin<Box<dyn Future<Output = Result<Answer<B>, E>> + Send>>;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<F, B, E, K = Wrapped> {
        #[pin]
        state: State<F, B, E>,
        kind: PhantomData<fn() -> K>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        // The inner service's future, its response passed on as it is.
        Plain {
            #[pin]
            future: F,
        },
        Inner {
            #[pin]
            future: F,
            finish: Finish,
        },
        Ready {
            response: Option<Response<Bytes>>,
        },
        Boxed {
            future: BoxedAnswer<B, E>,
        },
    }
}

impl<F, B, E, K> ResponseFuture<F, B, E, K> {
    fn new(state: State<F, B, E>) -> Self {
        ResponseFuture {
            state,
            kind: PhantomData,
        }
    }

    /// The inner service's future; `finish` is applied to its response.
    pub(super) fn inner(future: F, finish: Finish) -> Self {
        if finish.is_empty() {
            return Self::new(State::Plain { future });
        }
        Self::new(State::Inner { future, finish })
    }

    /// A response of the layer's own, ready now.
    pub(super) fn ready(response: Response<Bytes>) -> Self {
        Self::new(State::Ready {
            response: Some(response),
        })
    }

    /// A decision made later.
    pub(super) fn boxed(future: BoxedAnswer<B, E>) -> Self {
        Self::new(State::Boxed { future })
    }
}

impl<F, B, E, K> Future for ResponseFuture<F, B, E, K>
where
    F: Future<Output = Result<Response<B>, E>>,
    K: BodyKind<B>,
{
    type Output = Result<Response<K::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project().state.project() {
            StateProj::Plain { future } => K::inner_response(ready!(future.poll(cx))?),
            StateProj::Inner { future, finish } => {
                let response = ready!(future.poll(cx))?;
                K::inner_response(std::mem::take(finish).apply(response))
            }
            StateProj::Ready { response } => response
                .take()
                .expect("ResponseFuture polled after completion")
                .map(K::own),
            StateProj::Boxed { future } => match ready!(future.as_mut().poll(cx))? {
                Answer::Own(r) => r.map(K::own),
                Answer::Inner(r) => K::inner_response(r),
            },
        };
        Poll::Ready(Ok(response))
    }
}

impl<F, B, E, K> fmt::Debug for ResponseFuture<F, B, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// The body of a [`RateLimit`](super::RateLimit) response with [`Wrapped`] bodies: the
    /// inner service's, or the layer's own (429, 403, key error).
    #[project = BodyProj]
    pub enum ResponseBody<B> {
        /// The inner service's body.
        Inner {
            #[pin]
            body: B,
        },
        /// A body produced by the layer.
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            BodyProj::Inner { body } => body.poll_frame(cx),
            BodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inner { body } => body.is_end_stream(),
            ResponseBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inner { body } => body.size_hint(),
            ResponseBody::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseBody::Inner { .. } => f.write_str("ResponseBody::Inner"),
            ResponseBody::Full { data } => f.debug_struct("ResponseBody::Full").field("data", data).finish(),
        }
    }
}
