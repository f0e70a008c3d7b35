//! The service the layer makes: one request's way through the layer.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::{Request, Response};
use tower_service::Service;

use super::decide::Action;
use super::future::{Answer, BodyKind, Finish, ResponseFuture, Wrapped};
use super::headers::Attach;
use super::key::Keys;
use super::plan::{Detached, Prepared};
use super::shared::{Shared, Snapshot};
#[cfg(doc)]
use super::{PeerAddr, RateLimitLayer, ShadowVerdict, Stats, UserId};
use arc_swap::Guard;

/// The service [`RateLimitLayer`] makes: decides on each request before the inner service
/// sees it.
///
/// Per request, in order:
///
/// 1. The client address: the [`PeerAddr`] extension, else axum's `ConnectInfo<SocketAddr>`.
///    Neither present: answered with `response.key_error_status` (default 500: the server was
///    not set up to record peer addresses). Behind trusted proxies, see
///    [`client_ip`](super::client_ip).
/// 2. The user: the user resolver, else the [`UserId`] extension; else the API-key header,
///    when the API-key validator accepts it; else anonymous.
/// 3. The deny list (address ranges, user ids): 403. The allow list: no limit, no headers.
/// 4. The layers (ip, user by tier, endpoint), all-or-nothing: a denial takes nothing from the
///    other layers. Denied: 429 with `Retry-After`, the rate-limit headers and a JSON body.
///    Allowed: the inner service runs and its response gets the rate-limit headers of the
///    layer closest to its limit.
///
/// In shadow mode, steps 3 and 4 never block: a request that would have been refused goes
/// through with a [`ShadowVerdict`] in its request and response extensions, and is counted in
/// [`Stats::shadow_denied`].
///
/// In distributed mode the decision waits for a key's first claim (at most one sync
/// interval); in local mode it is made inside `call`, before the inner service is called.
///
/// `K` types the response bodies: [`Wrapped`] (the default) or
/// [`SameBody`](super::SameBody) (see [`RateLimitLayer::same_body`]).
pub struct RateLimit<S, K = Wrapped> {
    inner: S,
    shared: Arc<Shared>,
    kind: PhantomData<fn() -> K>,
}

impl<S, K> RateLimit<S, K> {
    pub(super) fn new(inner: S, shared: Arc<Shared>) -> Self {
        RateLimit {
            inner,
            shared,
            kind: PhantomData,
        }
    }
}

impl<S: Clone, K> Clone for RateLimit<S, K> {
    fn clone(&self) -> Self {
        RateLimit::new(self.inner.clone(), self.shared.clone())
    }
}

impl<S: fmt::Debug, K> fmt::Debug for RateLimit<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, K>
where
    K: BodyKind<ResBody>,
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<K::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let snap = self.shared.snapshot();
        let rules = &snap.rules;
        let mut keys = Keys::empty();
        // The request is split into its parts only for a resolver (they take `Parts`).
        let prepared = if self.shared.resolves() {
            let (parts, body) = req.into_parts();
            let prepared = self.shared.prepare(rules, &parts, &mut keys);
            req = Request::from_parts(parts, body);
            prepared
        } else {
            self.shared.prepare(rules, &req, &mut keys)
        };
        // The inner service is called from one place, so that the request and its future are
        // moved as little as possible.
        let finish = match prepared {
            Prepared::Skip => Finish::default(),
            Prepared::Respond(r) => return ResponseFuture::ready(r.answer(&req)),
            Prepared::Shadow(v) => Finish::new(Attach::default(), Some(v)),
            Prepared::Check(plan) if rules.is_distributed() => {
                let plan = plan.detach();
                return self.distributed(req, plan, Guard::into_inner(snap));
            }
            Prepared::Check(plan) => match self.shared.decide(&snap, &plan) {
                Action::Refuse(r) => return ResponseFuture::ready(r.answer(&req)),
                Action::Pass(finish) => finish,
            },
        };
        finish.mark(&mut req);
        ResponseFuture::inner(self.inner.call(req), finish)
    }
}

impl<S, K> RateLimit<S, K> {
    /// Distributed mode: the decision may wait for a first claim, so the call happens later,
    /// on the service that was polled ready (a fresh clone stays here). Out of line: the
    /// local path's code stays compact.
    #[inline(never)]
    fn distributed<ReqBody, ResBody>(
        &mut self,
        mut req: Request<ReqBody>,
        plan: Detached,
        snap: Arc<Snapshot>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error, K>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Send + 'static,
    {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(Box::pin(async move {
            // The plan is resolved against the snapshot it was made with, so it finds its
            // limits; a plan without any would have nothing to check.
            let action = match plan.attach(&snap.rules) {
                Some(plan) => shared.decide_async(&snap, &plan).await,
                None => Action::Pass(Finish::default()),
            };
            match action {
                Action::Refuse(r) => Ok(Answer::Own(r.answer(&req))),
                Action::Pass(finish) => {
                    finish.mark(&mut req);
                    let response = inner.call(req).await?;
                    Ok(Answer::Inner(finish.apply(response)))
                }
            }
        }))
    }
}
