//! Checks at arbitrary times (backwards steps, huge jumps) and costs: never a panic, never a
//! cost above the capacity admitted, and no refill from time going backwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::{Algorithm, Limiter, ManualClock, Policy};

fuzz_target!(|data: (u8, u16, u32, Vec<(i64, u64)>)| {
    let (alg, points, millis, steps) = data;
    let algorithm = match alg % 3 {
        0 => Algorithm::TokenBucket,
        1 => Algorithm::FixedWindow,
        _ => Algorithm::SlidingWindow,
    };
    let policy = Policy::new(
        u64::from(points).max(1),
        std::time::Duration::from_millis(u64::from(millis).max(1)),
    )
    .algorithm(algorithm);
    let clock = ManualClock::new();
    // One key is checked: a small table keeps the build cheap (the default preallocates
    // 65,536 slots), so that the fuzzer runs thousands of inputs a second.
    let Ok(limiter) = Limiter::<u64>::builder(policy.clone())
        .clock(clock.clock())
        .max_keys(16)
        .build()
    else {
        return;
    };
    let mut now: u64 = 0;
    for (dt, cost) in steps.into_iter().take(256) {
        now = if dt < 0 {
            now.saturating_sub(dt.unsigned_abs())
        } else {
            now.saturating_add(dt as u64)
        };
        clock.set_ns(now);
        match limiter.check_n(&7, cost) {
            Ok(d) => assert!(d.is_denied() || cost <= policy.capacity()),
            Err(e) => assert!(e.cost > e.capacity),
        }
        let _ = limiter.peek(&7, cost);
    }
});
