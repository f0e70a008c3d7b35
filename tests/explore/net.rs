//! The store as the nodes see it: every claim call is parked, and the schedule decides when
//! the `MemoryStore` applies it and when (and with what) the caller's future completes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tollgate::store::{
    Claim, ClaimOutcome, ErrorClass, Heartbeat, MemoryStore, NodeId, Store, StoreError, StoreFuture, StoreKey,
};

type Reply = Arc<Mutex<Option<Result<Vec<ClaimOutcome>, StoreError>>>>;

/// One claim call the store has not finished with.
pub struct Call {
    /// Sequence number, in the order the calls were sent.
    pub seq: u64,
    /// The calling node's id.
    pub node: NodeId,
    /// The batch.
    pub claims: Vec<Claim>,
    /// What the store answered when it applied the call.
    pub applied: Option<Vec<ClaimOutcome>>,
    /// The call will never be applied.
    pub lost: bool,
    /// The caller's future has completed (with the outcomes, or with a timeout).
    pub answered: bool,
    reply: Reply,
}

impl Call {
    /// The caller has its answer and the store is done with the call.
    fn finished(&self) -> bool {
        self.answered && (self.applied.is_some() || self.lost)
    }
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// Every store key claimed so far, in the order first seen.
    keys: Vec<StoreKey>,
    next_seq: u64,
    down: bool,
}

/// A [`Store`] that parks claim calls for the scheduler (heartbeats and leaves are answered at
/// once, or refused while the store is down).
pub struct Net {
    store: Arc<MemoryStore>,
    state: Mutex<State>,
}

/// What happened to a call the scheduler acted on.
pub enum Done {
    /// The call was applied now; the outcomes.
    Applied(Vec<ClaimOutcome>),
    /// The caller got a timeout; the call may still be applied.
    TimedOut,
    /// The call will never be applied.
    Lost,
    /// The action did not apply to that call.
    Nothing,
}

fn timeout_error() -> StoreError {
    StoreError::new(ErrorClass::Transient, "no reply within the sync timeout (schedule)")
}

impl Net {
    /// A network in front of `store`.
    pub fn new(store: Arc<MemoryStore>) -> Self {
        Net {
            store,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store refuses every call (claims fail at once, heartbeats too) while `down`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Whether the store refuses calls.
    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    fn act(&self, pick: usize, f: impl FnOnce(&MemoryStore, &mut Call) -> Done) -> (Option<(u64, NodeId)>, Done) {
        let mut g = self.lock();
        if g.calls.is_empty() {
            return (None, Done::Nothing);
        }
        let i = pick % g.calls.len();
        let call = &mut g.calls[i];
        let who = (call.seq, call.node);
        let done = f(&self.store, call);
        if call.finished() {
            g.calls.remove(i);
        }
        (Some(who), done)
    }

    /// Applies the call (if it still may be) and answers it with the outcomes; a call already
    /// answered with a timeout is applied late.
    pub fn deliver(&self, pick: usize) -> (Option<(u64, NodeId)>, Done) {
        self.act(pick, |store, c| {
            if c.applied.is_some() && c.answered {
                return Done::Nothing;
            }
            let mut fresh = false;
            if c.applied.is_none() && !c.lost {
                c.applied = Some(store.claim_now(c.node, &c.claims));
                fresh = true;
            }
            if !c.answered {
                c.answered = true;
                let reply = match &c.applied {
                    Some(out) => Ok(out.clone()),
                    None => Err(timeout_error()),
                };
                *c.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply);
            }
            match (&c.applied, fresh) {
                (Some(out), true) => Done::Applied(out.clone()),
                _ => Done::Nothing,
            }
        })
    }

    /// Applies the call without answering it yet (the reply is still on its way).
    pub fn apply_only(&self, pick: usize) -> (Option<(u64, NodeId)>, Done) {
        self.act(pick, |store, c| {
            if c.applied.is_some() || c.lost {
                return Done::Nothing;
            }
            let out = store.claim_now(c.node, &c.claims);
            c.applied = Some(out.clone());
            Done::Applied(out)
        })
    }

    /// Answers the caller with a timeout; with `late`, the call stays in flight and may be
    /// applied later (after the caller's next calls), otherwise it is lost.
    pub fn time_out(&self, pick: usize, late: bool) -> (Option<(u64, NodeId)>, Done) {
        self.act(pick, |_, c| {
            if c.answered {
                return Done::Nothing;
            }
            c.answered = true;
            *c.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(timeout_error()));
            if !late && c.applied.is_none() {
                c.lost = true;
                return Done::Lost;
            }
            Done::TimedOut
        })
    }

    /// The call is never applied (answered with a timeout if it was not answered yet).
    pub fn lose(&self, pick: usize) -> (Option<(u64, NodeId)>, Done) {
        self.act(pick, |_, c| {
            if c.applied.is_some() {
                return Done::Nothing;
            }
            c.lost = true;
            if !c.answered {
                c.answered = true;
                *c.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(timeout_error()));
            }
            Done::Lost
        })
    }

    /// A store key claimed so far (picked by index), if any.
    pub fn key(&self, pick: usize) -> Option<StoreKey> {
        let g = self.lock();
        (!g.keys.is_empty()).then(|| g.keys[pick % g.keys.len()].clone())
    }

    /// Index (for [`deliver`](Self::deliver)) of the newest unanswered call of `node`.
    pub fn newest_unanswered_of(&self, node: NodeId) -> Option<usize> {
        self.lock().calls.iter().rposition(|c| c.node == node && !c.answered)
    }

    /// Index of the call `seq`, while the store is not done with it.
    pub fn index_of(&self, seq: u64) -> Option<usize> {
        self.lock().calls.iter().position(|c| c.seq == seq)
    }

    /// Index (for [`deliver`](Self::deliver)) of the first unanswered call.
    pub fn first_unanswered(&self) -> Option<usize> {
        self.lock().calls.iter().position(|c| !c.answered)
    }
}

impl Store for Net {
    fn claim<'a>(&'a self, node: NodeId, claims: &'a [Claim]) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        self.claim_within(node, claims, Duration::MAX)
    }

    fn claim_within<'a>(
        &'a self,
        node: NodeId,
        claims: &'a [Claim],
        _timeout: Duration,
    ) -> StoreFuture<'a, Vec<ClaimOutcome>> {
        let mut g = self.lock();
        if g.down {
            return Box::pin(async { Err(StoreError::new(ErrorClass::Transient, "connection refused (schedule)")) });
        }
        for c in claims {
            if !g.keys.contains(&c.key) {
                g.keys.push(c.key.clone());
            }
        }
        let reply: Reply = Arc::default();
        let seq = g.next_seq;
        g.next_seq += 1;
        g.calls.push(Call {
            seq,
            node,
            claims: claims.to_vec(),
            applied: None,
            lost: false,
            answered: false,
            reply: reply.clone(),
        });
        Box::pin(std::future::poll_fn(move |_| {
            match reply.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(r) => Poll::Ready(r),
                None => Poll::Pending,
            }
        }))
    }

    fn heartbeat<'a>(&'a self, registry: &'a StoreKey, node: NodeId, ttl: Duration) -> StoreFuture<'a, Heartbeat> {
        let r = if self.is_down() {
            Err(StoreError::new(ErrorClass::Transient, "connection refused (schedule)"))
        } else {
            Ok(self.store.heartbeat_now(registry, node, ttl))
        };
        Box::pin(async move { r })
    }

    fn leave<'a>(&'a self, registry: &'a StoreKey, node: NodeId) -> StoreFuture<'a, ()> {
        let r = if self.is_down() {
            Err(StoreError::new(ErrorClass::Transient, "connection refused (schedule)"))
        } else {
            self.store.leave_now(registry, node);
            Ok(())
        };
        Box::pin(async move { r })
    }
}
