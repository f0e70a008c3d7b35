use std::hint::black_box;
use std::time::Instant;
fn main() {
    let n = 10_000_000u64;
    let t = Instant::now();
    let mut acc = 0u64;
    for _ in 0..n { acc = acc.wrapping_add(Instant::now().elapsed().as_nanos() as u64); }
    println!("Instant::now+elapsed {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for _ in 0..n { acc = acc.wrapping_add(black_box(Instant::now()).duration_since(t).as_nanos() as u64); }
    println!("Instant::now {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let q = quanta::Clock::new();
    let t = Instant::now();
    for _ in 0..n { acc = acc.wrapping_add(black_box(q.raw())); }
    println!("quanta raw {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for _ in 0..n { acc = acc.wrapping_add(black_box(q.now()).duration_since(quanta::Instant::recent()).as_nanos() as u64); }
    println!("quanta now {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    let base = q.raw();
    for _ in 0..n { acc = acc.wrapping_add(black_box(q.delta_as_nanos(base, q.raw()))); }
    println!("quanta raw+delta {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let m: papaya::HashMap<u64, std::sync::atomic::AtomicU64, ahash::RandomState> = papaya::HashMap::builder().hasher(ahash::RandomState::new()).build();
    for i in 0..10_000u64 { m.pin().insert(i, std::sync::atomic::AtomicU64::new(0)); }
    let t = Instant::now();
    for i in 0..n { let g = m.pin(); acc = acc.wrapping_add(g.get(&(i % 10_000)).unwrap().load(std::sync::atomic::Ordering::Relaxed)); }
    println!("papaya pin+get 10k {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let g = m.pin();
    let t = Instant::now();
    for i in 0..n { acc = acc.wrapping_add(g.get(&(i % 10_000)).unwrap().load(std::sync::atomic::Ordering::Relaxed)); }
    println!("papaya get 10k (pinned) {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let g = m.guard();
    let t = Instant::now();
    for i in 0..n { acc = acc.wrapping_add(m.get(&(i % 10_000), &g).unwrap().load(std::sync::atomic::Ordering::Relaxed)); }
    println!("papaya get 10k (guard) {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for i in 0..n { let g = m.guard(); acc = acc.wrapping_add(m.get(&(i % 10_000), &g).unwrap().load(std::sync::atomic::Ordering::Relaxed)); }
    println!("papaya guard+get 10k {:.2} ns", t.elapsed().as_nanos() as f64 / n as f64);
    println!("{acc}");
}
