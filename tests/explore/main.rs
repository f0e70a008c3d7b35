//! A deterministic, seeded, adversarial schedule explorer for distributed mode.
//!
//! Each seed gives a scenario (policies, node settings, node clock rates) and a list of
//! adversary actions: time steps, checks, syncs, parked store calls answered, timed out,
//! applied late or lost, node crashes and restarts (sometimes with a live node's id), store
//! restarts and outages. The real `Node`, `Limiter` and `MemoryStore` run the schedule on
//! virtual time, on one thread, and the bound (see `oracle.rs`) is checked after every step.
//!
//! * `cargo test --profile ci --all-features --test explore`: seeds from `EXPLORE_FIRST_SEED`
//!   (default 1) for `EXPLORE_SECONDS` (default 45).
//! * `SEED=<n>`: replays seed `n`, printing it step by step.
//! * `EXPLORE_FAULTS=cold,late,...`: only those adversary behaviours (default `all`).
//! * `EXPLORE_SHAPES=1`: runs hand-written schedules of known shapes and prints their outcome.
//!
//! On a violation: the seed, the schedule shrunk by delta debugging, the replay command; the
//! process exits with status 1.

mod net;
mod oracle;
mod schedule;
mod world;

use std::time::{Duration, Instant};

use oracle::Violation;
use schedule::{Action, Faults, Scenario};
use tollgate::ColdStart;
use world::{Tally, World};

/// Node clocks run within this many parts per million of the store's clock: the rate
/// tolerance the bound is stated for.
pub const CLOCK_TOLERANCE_PPM: i64 = 500;
/// Default exploration budget (seconds).
const DEFAULT_SECONDS: u64 = 45;
/// How many violations of a class that needs no single behaviour are shrunk (others: one).
const UNNAMED_SHRINKS: usize = 8;
/// The most replays spent shrinking one violation.
const SHRINK_REPLAYS: usize = 2000;

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The message and place of the last panic on this thread (a panic in the code under test is
/// a violation: no input may make it panic).
pub fn last_panic() -> String {
    LAST_PANIC.with(|p| p.borrow().clone())
}

/// Panics are caught and reported as violations; the hook only records where they happened.
fn record_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg}{at}"));
    }));
}

/// A true-time instant or span, readable.
pub fn fmt_t(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.6}s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.3}ms", ns as f64 / 1e6)
    } else {
        format!("{ns}ns")
    }
}

/// Runs a schedule; the step at which the bound broke, if it did.
fn run(
    rt: &tokio::runtime::Runtime,
    sc: &Scenario,
    actions: &[Action],
    faults: Faults,
    trace: bool,
) -> (Option<(usize, Violation)>, Tally) {
    rt.block_on(async {
        let mut w = World::new(sc, faults.and(sc.faults), trace);
        for (i, a) in actions.iter().enumerate() {
            if let Err(v) = w.step(a) {
                return (Some((i, v)), w.tally);
            }
        }
        w.finish();
        (None, w.tally)
    })
}

/// What a violation broke, for shrinking to keep: a panic (and where), the degraded share's
/// bound, or the bound.
fn kind_of(v: &Violation) -> String {
    match v.text.strip_prefix("panic: ") {
        Some(p) => format!("panic at {}", p.rsplit(" at ").next().unwrap_or(p)),
        None => {
            let stream = if v.text.contains("degraded admissions") {
                "degraded"
            } else {
                "bound"
            };
            let alg = ["TokenBucket", "FixedWindow", "SlidingWindow"]
                .into_iter()
                .find(|a| v.text.contains(&format!("algorithm: {a}")))
                .unwrap_or("?");
            format!("{stream} ({alg})")
        }
    }
}

/// Delta debugging over the action list: drops chunks (halves first, then smaller) while the
/// schedule still breaks the bound.
fn shrink(rt: &tokio::runtime::Runtime, sc: &Scenario, actions: &[Action], faults: Faults, kind: &str) -> Vec<Action> {
    let mut cur: Vec<Action> = actions.to_vec();
    let mut replays = 0;
    let mut chunk = cur.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut removed_any = false;
        while i < cur.len() && replays < SHRINK_REPLAYS {
            let end = (i + chunk).min(cur.len());
            let mut candidate = cur[..i].to_vec();
            candidate.extend_from_slice(&cur[end..]);
            replays += 1;
            let broken = run(rt, sc, &candidate, faults, false).0;
            if let Some((at, _)) = broken.filter(|(_, v)| kind_of(v) == kind) {
                candidate.truncate(at + 1);
                cur = candidate;
                removed_any = true;
            } else {
                i += chunk;
            }
        }
        if replays >= SHRINK_REPLAYS {
            break;
        }
        if chunk == 1 && !removed_any {
            break;
        }
        if !removed_any {
            chunk = chunk.div_ceil(2);
        }
    }
    cur
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => {
            eprintln!("{name}={v:?} is not a number");
            std::process::exit(2);
        }
    }
}

fn print_scenario(sc: &Scenario) {
    println!("  scenario (faults: {}):", sc.faults);
    println!("    policies: a = {:?}, b = {:?}", sc.policies[0], sc.policies[1]);
    println!(
        "    nodes: sync_interval {:?}, lease {:?}, {:?}, {:?}, failure_threshold {}, expected_nodes {}, keys {}, claims on demand per second {}",
        sc.interval,
        sc.lease(),
        sc.cold,
        sc.failure,
        sc.threshold,
        sc.expected_nodes,
        sc.keys,
        sc.on_demand
    );
    for (id, c) in &sc.nodes {
        println!("    node id {id}: clock {:+} ppm", c.ppm);
    }
}

fn print_schedule(actions: &[Action]) {
    for (i, a) in actions.iter().enumerate() {
        println!("    {i:>3}. {a}");
    }
}

/// The adversary behaviours a failing schedule needs: each is taken out in turn (cold start
/// denied, node clocks at the store's rate, timed-out calls lost instead of applied late, no
/// live duplicate ids, no store restarts, no outages, no crashes or shutdowns), and the ones
/// whose removal makes the schedule pass are named. A panic is named by where it happened.
fn classify(rt: &tokio::runtime::Runtime, sc: &Scenario, actions: &[Action], faults: Faults, v: &Violation) -> String {
    let kind = kind_of(v);
    if kind.starts_with("panic") {
        return kind;
    }
    let mut needed = Vec::new();
    // "Passes": no violation of the same kind.
    let passes =
        |sc: &Scenario, a: &[Action], f: Faults| run(rt, sc, a, f, false).0.is_none_or(|(_, w)| kind_of(&w) != kind);
    let mut s = sc.clone();
    s.cold = ColdStart::Deny;
    if sc.cold != ColdStart::Deny && passes(&s, actions, faults) {
        needed.push("cold");
    }
    let mut s = sc.clone();
    for n in &mut s.nodes {
        n.1.ppm = 0;
    }
    let a: Vec<Action> = actions
        .iter()
        .map(|a| match a {
            Action::Start { id, clock } => Action::Start {
                id: *id,
                clock: schedule::ClockSpec { ppm: 0, ..*clock },
            },
            other => other.clone(),
        })
        .collect();
    if passes(&s, &a, faults) {
        needed.push("clock");
    }
    let a: Vec<Action> = actions
        .iter()
        .map(|a| match a {
            Action::TimeOut { call, .. } => Action::TimeOut {
                call: *call,
                late: false,
            },
            other => other.clone(),
        })
        .collect();
    if passes(sc, &a, faults) {
        needed.push("late");
    }
    if faults.dup_id
        && passes(
            sc,
            actions,
            Faults {
                dup_id: false,
                ..faults
            },
        )
    {
        needed.push("dup_id");
    }
    let without = |keep: fn(&Action) -> bool| -> Vec<Action> { actions.iter().filter(|a| keep(a)).cloned().collect() };
    if passes(
        sc,
        &without(|a| !matches!(a, Action::StoreRestart | Action::KeyLoss { .. })),
        faults,
    ) {
        needed.push("store_restart");
    }
    if passes(sc, &without(|a| !matches!(a, Action::Outage(_))), faults) {
        needed.push("outage");
    }
    if passes(
        sc,
        &without(|a| !matches!(a, Action::Crash { .. } | Action::Shutdown { .. })),
        faults,
    ) {
        needed.push("crash");
    }
    let stream = kind;
    if needed.is_empty() {
        format!("{stream} (needs no single behaviour)")
    } else {
        format!("{stream}, needs: {}", needed.join("+"))
    }
}

/// Shrinks and prints a failing schedule; returns its class.
fn report(rt: &tokio::runtime::Runtime, seed: u64, faults: Faults, at: usize, v: &Violation) -> String {
    let (sc, actions) = schedule::generate(seed, faults);
    println!("VIOLATION at seed {seed}, step {at}: {}", v.text);
    print_scenario(&sc);
    let shrunk = shrink(rt, &sc, &actions[..=at], faults, &kind_of(v));
    println!("  shrunk schedule ({} of {} actions):", shrunk.len(), at + 1);
    print_schedule(&shrunk);
    println!("  shrunk run, step by step:");
    let mut class = String::from("(the shrunk schedule passed)");
    if let (Some((_, v)), _) = run(rt, &sc, &shrunk, faults, true) {
        println!("  broken: {}", v.text);
        class = classify(rt, &sc, &shrunk, faults, &v);
    }
    println!("  class: {class}");
    let faults_env = if faults == Faults::ALL {
        String::new()
    } else {
        format!("EXPLORE_FAULTS={faults} ")
    };
    println!("  replay: {faults_env}SEED={seed} cargo test --profile ci --all-features --test explore");
    class
}

/// The adversary behaviours `faults` asks for that no schedule of the run performed.
fn unexercised(faults: Faults, t: &Tally) -> Vec<&'static str> {
    let checks = [
        (true, t.admitted > 0, "admissions"),
        (true, t.claims_on_demand > 0, "claims on demand"),
        (
            true,
            t.claims_on_demand_deferred > 0,
            "claims on demand past the budget",
        ),
        (true, t.waited_admitted > 0, "admissions after a claim on demand"),
        (faults.late, t.late_applies > 0, "late applies"),
        (
            faults.late,
            t.late_over_newer > 0,
            "late calls applied after a newer one",
        ),
        (faults.late, t.timeouts > 0, "timeouts"),
        (faults.dup_id, t.dup_live_ids > 0, "duplicate live ids"),
        (faults.crash, t.crashes > 0, "crashes"),
        (faults.store_restart, t.store_restarts > 0, "store restarts"),
        (faults.outage, t.circuit_opened > 0, "circuit openings"),
        (faults.outage, t.degraded_admitted > 0, "degraded admissions"),
    ];
    checks
        .into_iter()
        .filter(|&(asked, done, _)| asked && !done)
        .map(|(_, _, name)| name)
        .collect()
}

fn main() {
    // libtest arguments (filters, --nocapture, ...) are accepted and ignored.
    let faults = match std::env::var("EXPLORE_FAULTS") {
        Ok(s) => Faults::parse(&s).unwrap_or_else(|e| {
            eprintln!("EXPLORE_FAULTS: {e}");
            std::process::exit(2);
        }),
        Err(_) => Faults::ALL,
    };
    record_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    if env_u64("EXPLORE_SHAPES").is_some() {
        shapes(&rt);
        return;
    }
    if let Some(seed) = env_u64("SEED") {
        let (sc, actions) = schedule::generate(seed, faults);
        println!("seed {seed} (faults: {}), {} actions", sc.faults, actions.len());
        print_scenario(&sc);
        let (broken, tally) = run(&rt, &sc, &actions, faults, true);
        println!("  tally: {tally:?}");
        match broken {
            Some((at, v)) => {
                report(&rt, seed, faults, at, &v);
                std::process::exit(1);
            }
            None => println!("seed {seed}: the bound held at every step"),
        }
        return;
    }
    let budget = Duration::from_secs(env_u64("EXPLORE_SECONDS").unwrap_or(DEFAULT_SECONDS));
    let first = env_u64("EXPLORE_FIRST_SEED").unwrap_or(1);
    println!(
        "explore: seeds from {first} for {:?} (faults: {faults}; clock tolerance {CLOCK_TOLERANCE_PPM} ppm)",
        budget
    );
    let started = Instant::now();
    let mut total = Tally::default();
    let mut seed = first;
    let mut schedules = 0u64;
    // Classes found: (class, seed, schedules run, seconds); and the quick classes (of the
    // unshrunk schedule) already shrunk, so that a frequent violation is shrunk once.
    let mut found: Vec<(String, u64, u64, f64)> = Vec::new();
    let mut seen_quick: Vec<(String, usize)> = Vec::new();
    while started.elapsed() < budget {
        let (sc, actions) = schedule::generate(seed, faults);
        let (broken, tally) = run(&rt, &sc, &actions, faults, false);
        total.add(&tally);
        schedules += 1;
        if let Some((at, v)) = broken {
            let quick = classify(&rt, &sc, &actions[..=at], faults, &v);
            // A class that needs no single behaviour may hide others behind it (the unshrunk
            // schedule has more than one way to fail): it is shrunk a few times.
            let limit = if quick.contains("needs no single") {
                UNNAMED_SHRINKS
            } else {
                1
            };
            let count = match seen_quick.iter_mut().find(|(q, _)| *q == quick) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    seen_quick.push((quick, 1));
                    1
                }
            };
            if count <= limit {
                let secs = started.elapsed().as_secs_f64();
                println!("explore: schedule {schedules} (seed {seed}) broke the bound after {secs:.2} s");
                let class = report(&rt, seed, faults, at, &v);
                if !found.iter().any(|f| f.0 == class) {
                    found.push((class, seed, schedules, secs));
                }
            }
        }
        seed += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "explore: {schedules} schedules (seeds {first}..={}) in {secs:.1} s: {:.0} schedules/s, {:.0} steps/s",
        seed - 1,
        schedules as f64 / secs,
        total.steps as f64 / secs
    );
    println!("  exercised: {total:?}");
    let missing = unexercised(faults, &total);
    if !missing.is_empty() {
        // A budget in which an asked-for behaviour never happened proves nothing about it.
        println!(
            "explore: never exercised in {schedules} schedules: {}",
            missing.join(", ")
        );
        std::process::exit(1);
    }
    if found.is_empty() {
        println!("explore: the bound held in every schedule");
        return;
    }
    println!("explore: {} kinds of violation:", found.len());
    for (class, seed, n, secs) in &found {
        println!("  {class}: seed {seed}, found after {n} schedules and {secs:.2} s");
    }
    std::process::exit(1);
}

/// Hand-written schedules of known shapes (`EXPLORE_SHAPES=1`): each is run and its outcome
/// printed, to see that the explorer's actions can express them.
fn shapes(rt: &tokio::runtime::Runtime) {
    use schedule::{ClockSpec, Cost};
    use tollgate::{FailurePolicy, Policy};
    let lease = Duration::from_secs(3600);
    let l_us = lease.as_micros() as u64;
    let sc = Scenario {
        policies: [Policy::per_second(1000).burst(100), Policy::per_hour(10)],
        interval: Duration::from_millis(100),
        lease: Some(lease),
        cold: ColdStart::Deny,
        failure: FailurePolicy::FailClosed,
        threshold: 3,
        expected_nodes: 1,
        keys: 1,
        on_demand: 500,
        store_origin_us: 1_700_000_000_000_000u64.div_ceil(l_us) * l_us - 1_000_000,
        nodes: vec![
            (
                1,
                ClockSpec {
                    ppm: -500,
                    origin: 1_000_000_000,
                },
            ),
            (
                2,
                ClockSpec {
                    ppm: 0,
                    origin: 2_000_000_000,
                },
            ),
        ],
        faults: Faults::parse("clock").expect("known"),
    };
    let b = |node| Action::Burst {
        node,
        lim: 0,
        key: 0,
        count: 100,
    };
    let actions = vec![
        b(0),
        Action::Sync { node: 0 },
        Action::Deliver { call: 0 },
        Action::ToLeaseEdge(500_000_000),
        b(1),
        Action::Sync { node: 1 },
        Action::Deliver { call: 0 },
        b(0),
        b(1),
        Action::Check {
            node: 0,
            lim: 0,
            key: 0,
            cost: Cost::One,
        },
    ];
    let (broken, _) = run(rt, &sc, &actions, sc.faults, true);
    println!("lease shape: {:?}", broken.map(|(at, v)| (at, v.text)));
}
