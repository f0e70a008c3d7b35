//! The sync task, and one sync: claims gathered from every member, exchanged with the store in
//! batches, their outcomes applied; the heartbeat; and the breaker fed with the result.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::super::breaker::{Permit, Transition};
use super::{ApplyReport, Member, Node, NodeInner};
use crate::store::{Claim, ClaimOutcome, ErrorClass, KeyError, StoreError};

/// One exchange's claims: each live member's, with the range of `claims` it added.
struct Round {
    members: Vec<(Arc<dyn Member>, Range<usize>)>,
    sent_at: u64,
    claims: Vec<Claim>,
}

/// Starts the node's supervised sync task on `handle`.
pub(super) fn spawn(handle: &tokio::runtime::Handle, inner: Arc<NodeInner>) -> Node {
    let task = handle.spawn(supervise(Arc::downgrade(&inner)));
    *inner.task.lock() = Some(task);
    Node { inner }
}

/// Runs the sync loop; a panic inside it is caught, counted and logged, and the loop starts
/// again one interval later (what a sync in flight had claimed counts as lost).
async fn supervise(weak: Weak<NodeInner>) {
    loop {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let outcome = handle.spawn(run(weak.clone())).await;
        let Some(node) = weak.upgrade() else { return };
        match outcome {
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                node.counters.task_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(node = node.id, panic = %msg, "tollgate: the sync task panicked; restarting it");
                if node.stopped.load(Ordering::Acquire) {
                    return;
                }
                let pause = node.timing.interval();
                drop(node);
                tokio::time::sleep(pause).await;
            }
            _ => return,
        }
    }
}

async fn run(weak: Weak<NodeInner>) {
    let (interval, min_gap) = match weak.upgrade() {
        Some(n) => (n.timing.interval(), n.timing.gap()),
        None => return,
    };
    let mut next = tokio::time::Instant::now() + interval;
    let mut last = tokio::time::Instant::now();
    loop {
        let Some(node) = weak.upgrade() else { return };
        if node.stopped.load(Ordering::Acquire) {
            return;
        }
        // While the circuit is open, wake when the open time ends, so the probe goes out then
        // rather than at the next tick.
        let mut wake_at = next;
        if node.breaker.is_open() {
            let open_for = node.breaker.open_until().saturating_sub(node.clock.now_ns());
            wake_at = wake_at.min(tokio::time::Instant::now() + Duration::from_nanos(open_for));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = node.wake.notified() => {
                let earliest = last + min_gap;
                tokio::select! {
                    _ = tokio::time::sleep_until(earliest) => {}
                    _ = node.stop.notified() => return,
                }
            }
            _ = node.stop.notified() => return,
        }
        if node.stopped.load(Ordering::Acquire) {
            return;
        }
        last = tokio::time::Instant::now();
        if last >= next {
            next += interval;
            if next <= last {
                next = last + interval;
            }
        }
        node.sync(false).await;
    }
}

impl NodeInner {
    /// One sync: every member's claims, in batches (with `drain`, every held token is
    /// returned and nothing is wanted).
    pub(super) async fn sync(&self, drain: bool) {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        self.sync_steps(drain).await;
        #[cfg(feature = "metrics")]
        self.publish_after_sync(started);
    }

    /// The steps of a sync: gate, probe, gather and settle, heartbeat, breaker feedback.
    async fn sync_steps(&self, drain: bool) {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        let Some(permit) = self.gate(drain) else {
            return;
        };
        let _one_at_a_time = self.sync_lock.lock().await;
        self.priority.store(false, Ordering::Release);
        let probed = permit == Permit::Probe;
        if probed && !self.probe().await {
            self.synced.notify_waiters();
            return;
        }
        // This sync visits every key, those asked for on demand included (before the queues
        // are read: a key asked for meanwhile raises the flag again).
        self.asked.store(false, Ordering::Release);
        let round = self.gather(|m, sent_at, seq, out| m.prepare(sent_at, drain, seq, out));
        let claims = round.claims.len();
        let error = self.settle(round).await;
        let now = self.clock.now_ns();
        let mut touched = probed || claims > 0;
        let error = match error {
            None if !drain && !probed && self.heartbeat_due(now) => {
                touched = true;
                self.heartbeat_after_claims(claims).await
            }
            error => error,
        };
        self.feedback(error, touched, now);
        self.last_sync.store(now, Ordering::Relaxed);
        self.synced.notify_waiters();
    }

    /// Whether this sync may go to the store, and how: `None` while the circuit is open (a
    /// drain at shutdown goes all the same); held tokens and the failure policy answer then.
    fn gate(&self, drain: bool) -> Option<Permit> {
        let permit = self.breaker.permit(self.clock.now_ns());
        if permit == Permit::Wait && !drain {
            self.priority.store(false, Ordering::Release);
            self.synced.notify_waiters();
            return None;
        }
        Some(permit)
    }

    /// Feeds the breaker with a sync's result: its `error`, or its success if it `touched`
    /// the store at `now` (a sync with nothing to send proves nothing about the store).
    fn feedback(&self, error: Option<StoreError>, touched: bool, now: u64) {
        match error {
            Some(e) => self.failed(&e, self.clock.now_ns()),
            None if touched => self.succeeded(now),
            None => {}
        }
    }

    /// A half-open probe: one heartbeat on a fresh connection. True when the store answered
    /// (the heartbeat is then done for this sync); a failure is fed to the breaker.
    async fn probe(&self) -> bool {
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_ns();
        // The old connection may be a casualty of the outage (reset, or queued behind
        // replies that never came): each probe goes out on a fresh one.
        self.store.reconnect();
        match self.heartbeat(self.timing.probe_timeout()).await {
            Ok(()) => {
                self.last_heartbeat.store(now.max(1), Ordering::Relaxed);
                self.succeeded(now);
                true
            }
            Err(e) => {
                self.failed(&e, self.clock.now_ns());
                false
            }
        }
    }

    /// Whether a heartbeat is due at `now`; if so, it counts as sent from now on.
    fn heartbeat_due(&self, now: u64) -> bool {
        let every = self.timing.heartbeat_every().as_nanos() as u64;
        let last = self.last_heartbeat.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= every;
        if due {
            self.last_heartbeat.store(now.max(1), Ordering::Relaxed);
        }
        due
    }

    /// The heartbeat of a sync whose `claims` went through: its error is the sync's when
    /// there were no claims; otherwise only counted.
    async fn heartbeat_after_claims(&self, claims: usize) -> Option<StoreError> {
        let e = self.heartbeat(self.timing.sync_timeout()).await.err()?;
        if claims == 0 {
            return Some(e);
        }
        // The claims went through: the store works, only the registry did not answer (on a
        // cluster, its master may be down). Not a reason to open the circuit for every key;
        // the live node count keeps its last value.
        self.counters.error(e.class());
        tracing::debug!(node = self.id, error = %e, "tollgate: heartbeat failed after a good sync");
        None
    }

    /// One round of claims, from every live member, under one number: the sync lock is held,
    /// so it is greater than every earlier round's (see [`Claim::seq`]).
    fn gather(&self, prepare: impl Fn(&dyn Member, u64, u64, &mut Vec<Claim>)) -> Round {
        let live: Vec<Arc<dyn Member>> = self.members.lock().iter().filter_map(|(_, m)| m.upgrade()).collect();
        let sent_at = self.clock.now_ns();
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let mut claims = Vec::new();
        let mut members = Vec::with_capacity(live.len());
        for m in live {
            let start = claims.len();
            prepare(&*m, sent_at, seq, &mut claims);
            members.push((m, start..claims.len()));
        }
        Round {
            members,
            sent_at,
            claims,
        }
    }

    /// Sends a round's claims, hands each member the outcomes of its own, and reports what
    /// they showed; returns the first error of the exchange.
    async fn settle(&self, round: Round) -> Option<StoreError> {
        let (outcomes, error) = self.exchange(&round.claims).await;
        let mut report = ApplyReport::default();
        for (m, range) in round.members {
            m.apply(round.sent_at, &outcomes[range], &mut report);
        }
        self.report(&report);
        error
    }

    /// Sends `claims` in batches of `batch_size` and collects one outcome per claim (`None`:
    /// its batch failed, or was not sent after an earlier batch failed), and the first error.
    async fn exchange(&self, claims: &[Claim]) -> (Vec<Option<ClaimOutcome>>, Option<StoreError>) {
        let mut outcomes: Vec<Option<ClaimOutcome>> = Vec::with_capacity(claims.len());
        let mut error: Option<StoreError> = None;
        for batch in claims.chunks(self.batch_size) {
            if error.is_some() {
                // After a failure the rest of the sync is not sent: it would most likely fail
                // too, each batch after a timeout. Those claims count as failed (admits less).
                self.unconfirmed(batch.iter());
                outcomes.extend(batch.iter().map(|_| None));
                continue;
            }
            match self.send(batch).await {
                Ok(replies) => outcomes.extend(replies.into_iter().map(Some)),
                Err(e) => {
                    outcomes.extend(batch.iter().map(|_| None));
                    error = Some(e);
                }
            }
        }
        self.counters.claims.fetch_add(claims.len() as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if !claims.is_empty() {
            ::metrics::histogram!(crate::metrics::SYNC_BATCH_KEYS).record(claims.len() as f64);
        }
        (outcomes, error)
    }

    /// One store call for `batch`: one outcome per claim, or the call's error (failed or
    /// ambiguous: nothing granted, returns lost, never resent).
    async fn send(&self, batch: &[Claim]) -> Result<Vec<ClaimOutcome>, StoreError> {
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        // The store bounds the call by the sync timeout (a cluster store then answers what it
        // has; the default fails the batch).
        let reply = self
            .store
            .claim_within(self.id, batch, self.timing.sync_timeout())
            .await;
        match reply {
            Ok(replies) if replies.len() == batch.len() => {
                // Keys whose call failed alone: their fate is as unknown as a failed batch's.
                let alone = batch
                    .iter()
                    .zip(&replies)
                    .filter(|(_, o)| matches!(o, Err(KeyError::Unavailable(_))))
                    .map(|(c, _)| c);
                self.unconfirmed(alone);
                Ok(replies)
            }
            other => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.unconfirmed(batch.iter());
                Err(match other {
                    Err(e) => e,
                    Ok(r) => StoreError::new(
                        ErrorClass::Protocol,
                        format!("{} outcomes for {} claims", r.len(), batch.len()),
                    ),
                })
            }
        }
    }

    /// Counts what `claims` returned and wanted as unconfirmed: their fate is unknown.
    fn unconfirmed<'a>(&self, claims: impl Iterator<Item = &'a Claim>) {
        let (r, w) = claims.fold((0, 0), |(r, w), c| (r + c.returned, w + c.wanted));
        self.counters.unconfirmed(r, w);
    }

    fn report(&self, r: &ApplyReport) {
        self.counters.stale_claims.fetch_add(r.stale, Ordering::Relaxed);
        if r.state_lost > 0 {
            self.counters.state_losses.fetch_add(r.state_lost, Ordering::Relaxed);
            tracing::warn!(
                node = self.id,
                keys = r.state_lost,
                "tollgate: the store held less than this node's valid claims (state lost: restart, eviction or failover)"
            );
        }
        self.counters.key_errors.fetch_add(r.key_errors, Ordering::Relaxed);
        let seen = r.key_errors > 0;
        if seen && !self.key_errors_seen.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                node = self.id,
                keys = r.key_errors,
                error = r.first_key_error.as_deref().unwrap_or(""),
                "tollgate: claims failed for some keys; they use the failure policy, the others sync on"
            );
        } else if !seen {
            self.key_errors_seen.store(false, Ordering::Relaxed);
        }
    }

    /// Sends the claims asked for on demand, then returns true; or returns false at
    /// `deadline`. Calls are made one at a time, under the sync lock: a check whose key was
    /// queued while another call was on its way waits for that call to end, then either finds
    /// its key sent by a call in between or sends it, with every key queued meanwhile, in one
    /// call. Past the budget (or while the circuit is not closed) the claims go with the next
    /// sync, which is waited for instead.
    pub(crate) async fn wait_asked(&self, deadline: tokio::time::Instant) -> bool {
        let synced = self.synced.notified();
        tokio::pin!(synced);
        synced.as_mut().enable();
        match tokio::time::timeout_at(deadline, self.send_asked()).await {
            Err(_) => false,
            Ok(true) => true,
            Ok(false) => tokio::time::timeout_at(deadline, synced).await.is_ok(),
        }
    }

    /// One call on demand (see [`wait_asked`](Self::wait_asked)); false when the claims were
    /// left to the next sync.
    async fn send_asked(&self) -> bool {
        let _one_at_a_time = self.sync_lock.lock().await;
        if !self.asked.swap(false, Ordering::AcqRel) {
            // Nothing queued: a call or a sync since this check asked carried its key.
            return true;
        }
        if !self.may_call_on_demand(self.clock.now_ns()) {
            self.asked.store(true, Ordering::Release);
            self.request_priority();
            return false;
        }
        let round = self.gather(|m, sent_at, seq, out| m.prepare_asked(sent_at, seq, out));
        if round.claims.is_empty() {
            return true;
        }
        self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
        let error = self.settle(round).await;
        match error {
            Some(e) => self.failed(&e, self.clock.now_ns()),
            None => self.succeeded(self.clock.now_ns()),
        }
        self.synced.notify_waiters();
        true
    }

    /// Whether a call on demand may go now: the circuit is closed, the node runs, and the
    /// budget has a call left (a call past it is counted as deferred).
    fn may_call_on_demand(&self, now: u64) -> bool {
        if self.breaker.is_open() || self.is_stopped() {
            return false;
        }
        let within_budget = match &self.on_demand_budget {
            None => false,
            Some(rule) => self
                .on_demand_spent
                .acquire(rule, now, 1)
                .map(|step| step.allowed)
                .unwrap_or(false),
        };
        if !within_budget {
            self.counters.on_demand_deferred.fetch_add(1, Ordering::Relaxed);
        }
        within_budget
    }

    /// One heartbeat, bounded by `bound`; updates the live node count and checks the server
    /// identity.
    pub(super) async fn heartbeat(&self, bound: Duration) -> Result<(), StoreError> {
        let ttl = self.timing.heartbeat_ttl();
        let beat = match tokio::time::timeout(bound, self.store.heartbeat(&self.registry, self.id, ttl)).await {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::timed_out(bound)),
        };
        if beat.live_nodes > 0 {
            self.live_nodes.store(beat.live_nodes, Ordering::Relaxed);
        }
        let before = self.server.swap(beat.server, Ordering::AcqRel);
        if before != 0 && before != beat.server {
            self.counters.state_losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node = self.id,
                "tollgate: the store restarted (its server identity changed): global counts start over"
            );
        }
        Ok(())
    }

    /// Counts a failed sync, acts on its class and feeds the breaker.
    pub(super) fn failed(&self, e: &StoreError, now: u64) {
        self.counters.error(e.class());
        if e.class() == ErrorClass::Topology {
            // A replica, or a moved key: connect afresh so the next sync finds the primary.
            self.store.reconnect();
        }
        let jitter = self.next_random();
        match self.breaker.on_failure(now, e.class() == ErrorClass::Config, jitter) {
            Some(Transition::Opened { for_ns, reopened }) => {
                self.mark_degraded();
                self.counters.circuit_opened.fetch_add(1, Ordering::Relaxed);
                if reopened {
                    tracing::debug!(node = self.id, error = %e, "tollgate: probe failed; circuit open again");
                } else {
                    tracing::warn!(
                        node = self.id,
                        class = ?e.class(),
                        error = %e,
                        open_ms = for_ns / 1_000_000,
                        failure_policy = self.failure_policy.as_str(),
                        "tollgate: store unavailable; circuit open, checks use the failure policy"
                    );
                }
            }
            Some(Transition::Closed) | None => {}
        }
    }

    fn succeeded(&self, now: u64) {
        self.last_success.store(now.max(1), Ordering::Release);
        if self.breaker.on_success() == Some(Transition::Closed) {
            tracing::info!(node = self.id, "tollgate: store reachable again; circuit closed");
        }
    }

    fn next_random(&self) -> u64 {
        // xorshift64: jitter only, no quality needed.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }
}
