//! The circuit breaker around the store: closed, open, half-open.
//!
//! * **Closed**: every sync goes to the store. `threshold` failed or timed-out syncs in a row
//!   open the circuit (a configuration error opens it at once).
//! * **Open**: no sync touches the store until the open time has passed. The open time grows
//!   exponentially with each failed probe, from `min_open` up to `max_open`, less up to a
//!   quarter of jitter (never below `min_open`). A configuration error opens it for `max_open`.
//! * **Half-open**: the first sync after the open time is the probe; every other sync that
//!   comes while it runs is turned away, so a recovering store sees one call per node, not a
//!   queue of them. A successful probe closes the circuit, a failed one opens it again.
//!
//! The state is one atomic word (state, backoff level and consecutive failures) plus the end of
//! the open time, so checks can ask "is the circuit open?" with one load. The transitions are
//! compare-and-swap loops: `loom_models` below checks that two syncs racing for the probe let
//! exactly one through.

use crate::sync::{AtomicU64, Ordering};

/// The state of a node's circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// The store answers: syncs run.
    Closed,
    /// The store failed: no sync runs until the open time has passed; the failure policy
    /// answers checks that held tokens cannot.
    Open,
    /// One probe is testing the store; checks are answered as when open.
    HalfOpen,
}

impl CircuitState {
    /// 0 closed, 1 open, 2 half-open (the value of the `tollgate_circuit_state` gauge).
    pub fn as_number(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const STATE_MASK: u64 = 0b11;
const LEVEL_SHIFT: u32 = 2;
const LEVEL_MASK: u64 = 0xff;
const FAILURES_SHIFT: u32 = 10;
const MAX_LEVEL: u64 = 62;

/// What a sync may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// The circuit is closed: sync as usual.
    Go,
    /// This sync is the half-open probe: its outcome closes or reopens the circuit.
    Probe,
    /// The circuit is open (or a probe is running): do not touch the store.
    Wait,
}

/// A transition the caller should report (one log line per incident).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The circuit opened for this many nanoseconds.
    Opened { for_ns: u64, reopened: bool },
    /// The circuit closed.
    Closed,
}

pub(crate) struct Breaker {
    word: AtomicU64,
    open_until: AtomicU64,
    /// When the circuit last opened from closed: the start of the current outage (a failed
    /// probe reopening it does not move it).
    outage_since: AtomicU64,
    threshold: u64,
    min_open_ns: u64,
    max_open_ns: u64,
}

fn pack(state: u64, level: u64, failures: u64) -> u64 {
    state | (level.min(LEVEL_MASK) << LEVEL_SHIFT) | (failures.min(1 << 20) << FAILURES_SHIFT)
}

fn state_of(word: u64) -> u64 {
    word & STATE_MASK
}

fn level_of(word: u64) -> u64 {
    (word >> LEVEL_SHIFT) & LEVEL_MASK
}

fn failures_of(word: u64) -> u64 {
    word >> FAILURES_SHIFT
}

impl Breaker {
    pub(crate) fn new(threshold: u32, min_open_ns: u64, max_open_ns: u64) -> Breaker {
        Breaker {
            word: AtomicU64::new(pack(CLOSED, 0, 0)),
            open_until: AtomicU64::new(0),
            outage_since: AtomicU64::new(0),
            threshold: u64::from(threshold.max(1)),
            min_open_ns: min_open_ns.max(1),
            max_open_ns: max_open_ns.max(min_open_ns.max(1)),
        }
    }

    pub(crate) fn state(&self) -> CircuitState {
        match state_of(self.word.load(Ordering::Acquire)) {
            CLOSED => CircuitState::Closed,
            OPEN => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// True while the circuit is open or half-open: checks use the failure policy.
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        state_of(self.word.load(Ordering::Relaxed)) != CLOSED
    }

    /// When the open time ends (clock nanoseconds); meaningful while open.
    pub(crate) fn open_until(&self) -> u64 {
        self.open_until.load(Ordering::Acquire)
    }

    /// When the current outage began (clock nanoseconds): the time the circuit opened from
    /// closed. Meaningful while open; a later outage's start is seen by any caller that sees its
    /// open state.
    pub(crate) fn outage_since(&self) -> u64 {
        // Acquire on the word: the start was written before the state that opened it.
        let _ = self.word.load(Ordering::Acquire);
        self.outage_since.load(Ordering::Acquire)
    }

    /// May a sync touch the store at `now`? Of the syncs that ask once the open time has
    /// passed, exactly one becomes the probe.
    pub(crate) fn permit(&self, now: u64) -> Permit {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            match state_of(word) {
                CLOSED => return Permit::Go,
                OPEN if now >= self.open_until.load(Ordering::Acquire) => {
                    let probing = pack(HALF_OPEN, level_of(word), failures_of(word));
                    match self
                        .word
                        .compare_exchange(word, probing, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => return Permit::Probe,
                        Err(now_word) => word = now_word,
                    }
                }
                _ => return Permit::Wait,
            }
        }
    }

    /// A sync (or the probe) succeeded.
    pub(crate) fn on_success(&self) -> Option<Transition> {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let closed = pack(CLOSED, 0, 0);
            if word == closed {
                return None;
            }
            match self
                .word
                .compare_exchange(word, closed, Ordering::AcqRel, Ordering::Acquire)
            {
                // A success seen while open comes from a sync that started before the circuit
                // opened: the store answers again, so close it all the same.
                Ok(_) => return (state_of(word) != CLOSED).then_some(Transition::Closed),
                Err(w) => word = w,
            }
        }
    }

    /// A sync failed at `now`. `fatal` failures (configuration errors) open the circuit at
    /// once, for `max_open`. `jitter` is a random number (its low bits are used).
    pub(crate) fn on_failure(&self, now: u64, fatal: bool, jitter: u64) -> Option<Transition> {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (state, level, failures) = (state_of(word), level_of(word), failures_of(word));
            let (next, open_level) = match state {
                // Already open: a sync that started before it opened; nothing changes.
                OPEN => return None,
                HALF_OPEN => (OPEN, Some((level + 1).min(MAX_LEVEL))),
                _ if fatal || failures + 1 >= self.threshold => (OPEN, Some(level)),
                _ => (CLOSED, None),
            };
            let Some(open_level) = open_level else {
                match self.word.compare_exchange(
                    word,
                    pack(next, level, failures + 1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return None,
                    Err(w) => {
                        word = w;
                        continue;
                    }
                }
            };
            let for_ns = if fatal {
                self.max_open_ns
            } else {
                self.open_time(open_level, jitter)
            };
            // The end of the open time (and, from closed, the outage's start) is written before
            // the state that makes it relevant.
            self.open_until.store(now.saturating_add(for_ns), Ordering::Release);
            if state != HALF_OPEN {
                self.outage_since.store(now, Ordering::Release);
            }
            match self
                .word
                .compare_exchange(word, pack(OPEN, open_level, 0), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(Transition::Opened {
                        for_ns,
                        reopened: state == HALF_OPEN,
                    })
                }
                Err(w) => word = w,
            }
        }
    }

    /// `min_open * 2^level`, at most `max_open`, less up to a quarter of jitter, at least
    /// `min_open`.
    fn open_time(&self, level: u64, jitter: u64) -> u64 {
        let base = self
            .min_open_ns
            .checked_shl(level as u32)
            .filter(|b| b >> level == self.min_open_ns)
            .unwrap_or(u64::MAX)
            .min(self.max_open_ns);
        let cut = (base / 4).saturating_mul(jitter % 1024) / 1024;
        (base - cut).max(self.min_open_ns)
    }

    /// The racy twin of [`permit`](Self::permit) for the loom model: it reads, then writes.
    #[cfg(all(test, tollgate_loom))]
    fn permit_racy(&self, now: u64) -> Permit {
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CLOSED => Permit::Go,
            OPEN if now >= self.open_until.load(Ordering::Acquire) => {
                self.word
                    .store(pack(HALF_OPEN, level_of(word), failures_of(word)), Ordering::Release);
                Permit::Probe
            }
            _ => Permit::Wait,
        }
    }
}

#[cfg(all(test, not(tollgate_loom)))]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn opens_after_threshold_failures_in_a_row() {
        let b = Breaker::new(3, 100 * MS, 400 * MS);
        assert_eq!(b.on_failure(0, false, 0), None);
        assert_eq!(b.on_failure(1, false, 0), None);
        assert_eq!(b.permit(2), Permit::Go);
        assert_eq!(
            b.on_failure(2, false, 0),
            Some(Transition::Opened {
                for_ns: 100 * MS,
                reopened: false
            })
        );
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.is_open());
        assert_eq!(b.permit(50 * MS), Permit::Wait);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let b = Breaker::new(2, MS, MS);
        b.on_failure(0, false, 0);
        assert_eq!(b.on_success(), None);
        assert_eq!(b.on_failure(0, false, 0), None);
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let b = Breaker::new(1, 10 * MS, 80 * MS);
        b.on_failure(0, false, 0);
        assert_eq!(b.permit(9 * MS), Permit::Wait);
        assert_eq!(b.permit(10 * MS), Permit::Probe);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert_eq!(b.permit(11 * MS), Permit::Wait);
        assert_eq!(b.permit(1000 * MS), Permit::Wait);
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert_eq!(b.permit(1000 * MS), Permit::Go);
    }

    #[test]
    fn failed_probes_back_off_exponentially_up_to_max_open() {
        let b = Breaker::new(1, 10 * MS, 80 * MS);
        b.on_failure(0, false, 0);
        let mut now = 0;
        let mut opened = Vec::new();
        for _ in 0..6 {
            now = b.open_until();
            assert_eq!(b.permit(now), Permit::Probe);
            match b.on_failure(now, false, 0) {
                Some(Transition::Opened { for_ns, reopened }) => {
                    assert!(reopened);
                    opened.push(for_ns / MS);
                }
                other => panic!("a failed probe must reopen the circuit, got {other:?}"),
            }
        }
        assert_eq!(opened, [20, 40, 80, 80, 80, 80]);
        // Closing resets the backoff.
        assert_eq!(b.permit(b.open_until()), Permit::Probe);
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert!(matches!(
            b.on_failure(now, false, 0),
            Some(Transition::Opened { for_ns, .. }) if for_ns == 10 * MS
        ));
    }

    #[test]
    fn jitter_shortens_by_at_most_a_quarter_and_never_below_min_open() {
        let b = Breaker::new(1, 10 * MS, 80 * MS);
        for jitter in [0u64, 1, 511, 1023, u64::MAX] {
            for level in 0..8 {
                let base = ((10 * MS) << level).min(80 * MS);
                let t = b.open_time(level, jitter);
                assert!(
                    t <= base && t >= base - base / 4 && t >= 10 * MS,
                    "{level} {jitter} {t}"
                );
            }
        }
        assert_eq!(b.open_time(MAX_LEVEL, 0), 80 * MS);
    }

    #[test]
    fn a_fatal_failure_opens_at_once_for_max_open() {
        let b = Breaker::new(5, 10 * MS, 80 * MS);
        assert_eq!(
            b.on_failure(7, true, 123),
            Some(Transition::Opened {
                for_ns: 80 * MS,
                reopened: false
            })
        );
        assert_eq!(b.open_until(), 7 + 80 * MS);
    }

    #[test]
    fn a_late_failure_while_open_changes_nothing() {
        let b = Breaker::new(1, 10 * MS, 80 * MS);
        b.on_failure(0, false, 0);
        let until = b.open_until();
        assert_eq!(b.on_failure(5 * MS, false, 0), None);
        assert_eq!(b.open_until(), until);
    }
}

#[cfg(all(test, tollgate_loom))]
mod loom_models {
    use loom::sync::Arc;
    use loom::thread;

    use super::*;

    /// Two syncs ask for a permit once the open time has passed, while a third reads the state
    /// as a check does: exactly one becomes the probe, and its failure reopens the circuit.
    fn probe_model(permit: fn(&Breaker, u64) -> Permit) {
        loom::model(move || {
            let b = Arc::new(Breaker::new(1, 10, 20));
            b.on_failure(0, false, 0);
            let syncs: Vec<_> = (0..2)
                .map(|_| {
                    let b = b.clone();
                    thread::spawn(move || {
                        let p = permit(&b, 10);
                        if p == Permit::Probe {
                            b.on_failure(10, false, 0);
                        }
                        p
                    })
                })
                .collect();
            let reader = {
                let b = b.clone();
                thread::spawn(move || b.is_open())
            };
            let probes = syncs
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|p| *p == Permit::Probe)
                .count();
            assert!(reader.join().unwrap(), "a check saw the circuit closed");
            assert_eq!(probes, 1, "half-open let {probes} probes through");
            assert_eq!(b.state(), CircuitState::Open);
        });
    }

    #[test]
    fn loom_breaker_half_open_admits_one_probe() {
        probe_model(Breaker::permit);
    }

    #[test]
    #[should_panic(expected = "half-open let 2 probes through")]
    fn loom_breaker_broken_twin_read_then_write_admits_two_probes() {
        probe_model(Breaker::permit_racy);
    }
}
