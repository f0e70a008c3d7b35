//! Memory: bytes per tracked key, a key flood, and no allocation per check on a tracked key.
//! One counting allocator serves the whole binary, so the tests take a lock to measure alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tollgate::{Limiter, ManualClock, Policy};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Live bytes as glibc's malloc spends them: each chunk carries an 8-byte header, is rounded up
/// to 16 bytes, and is at least 32 bytes.
static CHUNKS: AtomicIsize = AtomicIsize::new(0);

fn chunk(size: usize) -> isize {
    ((size + 8 + 15) & !15).max(32) as isize
}
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        CHUNKS.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        // Only the thread under measurement counts: the test harness allocates on its own
        // threads while a test runs.
        if COUNT_HERE.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        CHUNKS.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static ALONE: Mutex<()> = Mutex::new(());

thread_local! {
    static COUNT_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn live() -> isize {
    CHUNKS.load(Ordering::Relaxed)
}

/// The figure the README and crate docs state for a `u64` key: the entry, its share of the
/// table, and malloc's chunk overhead, in a table grown by inserts (the worst case).
const STATED_BYTES_PER_U64_KEY: f64 = 64.0;
/// ... and for a `String` key (24 bytes of `String` in the entry), beside the string's own chunk.
const STATED_BYTES_PER_STRING_KEY: f64 = 80.0;

fn bytes_per_key<K>(n: usize, make: impl Fn(usize) -> K, payload: usize) -> f64
where
    K: std::hash::Hash + Eq + Send + Sync + 'static + std::borrow::Borrow<K> + ToOwned<Owned = K>,
{
    let clock = ManualClock::new();
    let keys: Vec<K> = (0..n).map(&make).collect();
    let before = live();
    // Default max_keys: the table starts small and grows as keys arrive.
    let l = Limiter::<K>::builder(Policy::per_minute(10))
        .clock(clock.clock())
        .build()
        .unwrap();
    for k in &keys {
        l.check(k);
    }
    let after = live();
    assert_eq!(l.len(), n);
    let per_key = (after - before) as f64 / n as f64 - payload as f64;
    drop(l);
    per_key
}

#[test]
fn bytes_per_tracked_key_are_as_stated() {
    let _alone = ALONE.lock().unwrap();
    // Just past a doubling of the table: the emptiest (costliest per key) point.
    let n = (1 << 17) + 1000;
    let u = bytes_per_key(n, |i| i as u64, 0);
    // The table stores a clone of each 13-byte string: one 32-byte chunk each, not counted.
    let s = bytes_per_key(n, |i| format!("user-{i:08}"), 32);
    println!("bytes per tracked key: u64 {u:.1}, String {s:.1} + string bytes");
    assert!(
        u <= STATED_BYTES_PER_U64_KEY,
        "u64 key costs {u:.1} bytes, more than stated"
    );
    assert!(
        s <= STATED_BYTES_PER_STRING_KEY,
        "String key costs {s:.1} bytes, more than stated"
    );
}

#[test]
fn no_heap_allocation_per_check_on_a_tracked_key() {
    let _alone = ALONE.lock().unwrap();
    let clock = ManualClock::new();
    let strings: Limiter<String> = Limiter::builder(Policy::per_second(1000))
        .clock(clock.clock())
        .build()
        .unwrap();
    let numbers: Limiter<u64> = Limiter::builder(Policy::per_second(1000))
        .clock(clock.clock())
        .build()
        .unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("client-{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        strings.check(k.as_str());
        numbers.check(&(i as u64));
    }
    COUNT_HERE.with(|c| c.set(true));
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut allowed = 0;
    for round in 0..1_000u64 {
        for (i, k) in keys.iter().enumerate() {
            allowed += strings.check(k.as_str()).is_allowed() as u32;
            allowed += numbers.check(&(i as u64)).is_allowed() as u32;
            allowed += strings.peek(k.as_str(), 1).unwrap().is_allowed() as u32;
        }
        clock.advance(Duration::from_micros(round % 3));
    }
    let allocations = ALLOCS.load(Ordering::Relaxed) - before;
    COUNT_HERE.with(|c| c.set(false));
    assert!(allowed > 0);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 300,000 checks of tracked keys"
    );
}

#[test]
fn key_flood_stays_bounded_and_a_throttled_key_stays_throttled() {
    let _alone = ALONE.lock().unwrap();
    let max_keys = 10_000usize;
    let clock = ManualClock::new();
    let before = live();
    let l: Limiter<u64> = Limiter::builder(Policy::per_second(10).block_duration(Duration::from_secs(60)))
        .max_keys(max_keys)
        .clock(clock.clock())
        .build()
        .unwrap();
    // The attacker's own key: exhausted, then blocked for 60 s.
    let victim = u64::MAX;
    while l.check(&victim).is_allowed() {}
    assert!(l.check(&victim).is_denied());

    // 10 x max_keys distinct keys, 1,000 per 100 ms of clock: each spends one token, so each is
    // fresh again 100 ms later and may be swept; the victim is blocked throughout.
    let mut untracked_allowed = 0;
    let mut peak = 0isize;
    for key in 0..(10 * max_keys) as u64 {
        let d = l.check(&key);
        if d.is_untracked() && d.is_allowed() {
            untracked_allowed += 1;
        }
        assert!(l.len() <= max_keys, "table holds {} > {max_keys}", l.len());
        if key % 1_000 == 999 {
            clock.advance(Duration::from_millis(100));
            peak = peak.max(live() - before);
        }
    }
    assert!(l.check(&victim).is_denied(), "the flood reset the throttled key");
    let d = l.peek(&victim, 1).unwrap();
    assert!(
        d.retry_after().unwrap() > Duration::from_secs(40),
        "block shortened: {:?}",
        d.retry_after()
    );
    assert!(l.evicted() > 0, "the flood keys were swept");
    // Untracked keys share one overflow bucket: at most its burst plus its refill over 10 s.
    assert!(
        untracked_allowed <= 10 + 10 * 10,
        "{untracked_allowed} untracked keys allowed"
    );
    let bound = (max_keys as f64 * STATED_BYTES_PER_U64_KEY * 1.2) as isize + (1 << 20);
    println!(
        "flood: peak live heap {peak} bytes for max_keys {max_keys} (bound {bound}), {} evicted",
        l.evicted()
    );
    assert!(peak <= bound, "memory grew to {peak} bytes, over {bound}");
}
