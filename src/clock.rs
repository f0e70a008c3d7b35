//! Where checks get the time from.
//!
//! All time inside tollgate is a `u64` of nanoseconds since a process-wide origin. Three sources:
//!
//! | clock | cost per read here (2-core KVM, AMD EPYC) | how |
//! |---|---|---|
//! | [`Clock::cached`] (default) | about 1 ns | one relaxed load of a value an updater thread refreshes every 1 ms |
//! | [`Clock::precise`] | about 13 ns | quanta's raw TSC read, scaled |
//! | `std::time::Instant::now` (not offered) | about 40 ns | `clock_gettime` through the vDSO |
//!
//! Why the cached clock is the default: the whole check costs about 20 ns, so a 13-40 ns clock
//! read would double it (`benches/compare.rs` measures both). Its only error is lag: it reads up
//! to one tick (plus scheduling delay) behind real time, and a limiter that believes less time
//! has passed refills less, so lag can only make it admit less, never more. A policy whose
//! emission interval is far below 1 ms (over ~100k tokens per second) and a small burst may want
//! [`Clock::precise`].
//!
//! [`ManualClock`] drives deterministic tests: time moves only when the test moves it, and may
//! even be moved backwards to check that the limiter never refunds when it does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::consts::{CACHED_CLOCK_TICK, MAX_TIME_NS};

/// A source of monotonic time for a [`Limiter`](crate::Limiter).
#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    Cached(&'static AtomicU64),
    Precise(&'static Precise),
    Manual(Arc<AtomicU64>),
}

#[derive(Debug)]
struct Precise {
    clock: quanta::Clock,
    origin: u64,
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn nanos_since_origin() -> u64 {
    u64::try_from(origin().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .min(MAX_TIME_NS)
}

fn cached_cell() -> &'static AtomicU64 {
    static CACHED: OnceLock<&'static AtomicU64> = OnceLock::new();
    CACHED.get_or_init(|| {
        let cell: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(nanos_since_origin())));
        std::thread::Builder::new()
            .name("tollgate-clock".into())
            .spawn(move || loop {
                std::thread::sleep(CACHED_CLOCK_TICK);
                // fetch_max: the value never goes backwards even if a store were reordered.
                cell.fetch_max(nanos_since_origin(), Ordering::Relaxed);
            })
            .expect("tollgate: cannot spawn the cached clock thread");
        cell
    })
}

impl Clock {
    /// The default clock: a process-wide time value refreshed every millisecond by one
    /// background thread (started on first use). About 1 ns per read.
    pub fn cached() -> Self {
        Clock(Source::Cached(cached_cell()))
    }

    /// A clock that reads the CPU's time-stamp counter on every call (quanta). About 13 ns.
    pub fn precise() -> Self {
        static PRECISE: OnceLock<Precise> = OnceLock::new();
        let p = PRECISE.get_or_init(|| {
            let clock = quanta::Clock::new();
            let origin = clock.raw();
            Precise { clock, origin }
        });
        Clock(Source::Precise(p))
    }

    /// Nanoseconds since the origin of this clock, never above 2^62 (about 146 years).
    #[inline]
    pub fn now_ns(&self) -> u64 {
        match &self.0 {
            Source::Cached(cell) => cell.load(Ordering::Relaxed),
            Source::Precise(p) => p.clock.delta_as_nanos(p.origin, p.clock.raw()).min(MAX_TIME_NS),
            Source::Manual(ns) => ns.load(Ordering::Acquire),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::cached()
    }
}

/// A clock that moves only when told to, for tests and simulations.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Limiter, ManualClock, Policy};
///
/// let clock = ManualClock::new();
/// let limiter = Limiter::<u64>::builder(Policy::per_second(2)).clock(clock.clock()).build().unwrap();
/// assert!(limiter.check(&7).is_allowed());
/// assert!(limiter.check(&7).is_allowed());
/// assert!(limiter.check(&7).is_denied());
/// clock.advance(Duration::from_millis(500));
/// assert!(limiter.check(&7).is_allowed());
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at time 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// A [`Clock`] that reads this manual clock.
    pub fn clock(&self) -> Clock {
        Clock(Source::Manual(self.0.clone()))
    }

    /// Moves time forward (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_add(by)));
    }

    /// Sets the time, in nanoseconds since the origin; it may go backwards.
    pub fn set_ns(&self, ns: u64) {
        self.0.store(ns, Ordering::Release);
    }

    /// The current time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_clock_moves_forward_and_never_back() {
        let c = Clock::cached();
        let a = c.now_ns();
        // The updater thread ticks every millisecond; on a loaded machine it may be starved
        // for a while, so wait (bounded) for it to move.
        let mut b = a;
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(5));
            b = c.now_ns();
            assert!(b >= a, "cached clock went back: {a} -> {b}");
            if b > a {
                break;
            }
        }
        assert!(b > a, "cached clock did not advance in 1 s: {a} -> {b}");
    }

    #[test]
    fn precise_clock_is_monotonic() {
        let c = Clock::precise();
        let mut last = c.now_ns();
        for _ in 0..1000 {
            let t = c.now_ns();
            assert!(t >= last);
            last = t;
        }
    }

    #[test]
    fn manual_clock_saturates_and_can_go_back() {
        let m = ManualClock::new();
        m.advance(Duration::MAX);
        assert_eq!(m.now_ns(), u64::MAX);
        m.set_ns(5);
        assert_eq!(m.clock().now_ns(), 5);
    }
}
