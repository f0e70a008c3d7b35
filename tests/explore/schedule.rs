//! Schedules: a scenario (policies, node settings, clocks) and a list of adversary actions,
//! both drawn from a seed. Actions pick nodes and calls by index modulo what exists when they
//! run, so any sub-list of a schedule is a schedule too (what shrinking needs).

use std::fmt;
use std::time::Duration;

use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use tollgate::{Algorithm, ColdStart, FailurePolicy, Policy};

/// Adversary behaviours that can be switched off (`EXPLORE_FAULTS`), to find which one a
/// violation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// `ColdStart::Optimistic(n)` nodes.
    pub cold: bool,
    /// Timed-out calls applied later, after the caller's next calls.
    pub late: bool,
    /// Restarts with the id of a live node.
    pub dup_id: bool,
    /// Node clocks off the store's rate (within the tolerance), long leases and windows.
    pub clock: bool,
    /// Store restarts (empty) and single keys lost.
    pub store_restart: bool,
    /// Store outages (circuit opening, the failure policy answering).
    pub outage: bool,
    /// Node crashes, restarts and graceful shutdowns.
    pub crash: bool,
}

impl Faults {
    /// Every behaviour on.
    pub const ALL: Faults = Faults {
        cold: true,
        late: true,
        dup_id: true,
        clock: true,
        store_restart: true,
        outage: true,
        crash: true,
    };
    const NAMES: [&'static str; 7] = ["cold", "late", "dup_id", "clock", "store_restart", "outage", "crash"];

    fn flags(&mut self) -> [&mut bool; 7] {
        [
            &mut self.cold,
            &mut self.late,
            &mut self.dup_id,
            &mut self.clock,
            &mut self.store_restart,
            &mut self.outage,
            &mut self.crash,
        ]
    }

    /// Parses a comma-separated list of behaviour names (`all` for every one).
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut f = Faults {
            cold: false,
            late: false,
            dup_id: false,
            clock: false,
            store_restart: false,
            outage: false,
            crash: false,
        };
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word == "all" {
                f = Faults::ALL;
                continue;
            }
            let i = Self::NAMES
                .iter()
                .position(|n| *n == word)
                .ok_or_else(|| format!("unknown fault {word:?}; known: all, {}", Self::NAMES.join(", ")))?;
            *f.flags()[i] = true;
        }
        Ok(f)
    }
}

impl Faults {
    /// The behaviours on in both.
    pub fn and(self, o: Faults) -> Faults {
        Faults {
            cold: self.cold && o.cold,
            late: self.late && o.late,
            dup_id: self.dup_id && o.dup_id,
            clock: self.clock && o.clock,
            store_restart: self.store_restart && o.store_restart,
            outage: self.outage && o.outage,
            crash: self.crash && o.crash,
        }
    }

    /// No behaviour on.
    pub fn none(self) -> bool {
        self.to_string().is_empty()
    }
}

/// Seeds take turns over these adversaries (each one's behaviours, as far as `EXPLORE_FAULTS`
/// allows), so that each defect a behaviour exposes is met often, and all of them together too.
const PROFILES: [&str; 8] = [
    "all",
    "cold",
    "late",
    "dup_id",
    "clock",
    "clock",
    "outage,store_restart",
    "crash,late,clock",
];

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut c = *self;
        let on: Vec<&str> = c
            .flags()
            .iter()
            .zip(Self::NAMES)
            .filter(|(b, _)| ***b)
            .map(|(_, n)| n)
            .collect();
        write!(f, "{}", on.join(","))
    }
}

/// Node ids are drawn from this pool, so that restarts reuse ids.
pub const ID_POOL: u64 = 6;
/// Keys per limiter.
pub const KEYS: [&str; 2] = ["k0", "k1"];

/// A node's clock: its rate against the store's (ppm) and its origin.
#[derive(Clone, Copy, Debug)]
pub struct ClockSpec {
    /// Parts per million faster (positive) or slower than true time.
    pub ppm: i64,
    /// The clock's reading at true time 0 (ns).
    pub origin: u64,
}

/// What stays fixed during a schedule.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The two limiters' policies (limiter `a` and `b`, on every node).
    pub policies: [Policy; 2],
    /// Node settings.
    pub interval: Duration,
    /// `None`: the default lease.
    pub lease: Option<Duration>,
    /// Cold start of every node.
    pub cold: ColdStart,
    /// Failure policy of every node.
    pub failure: FailurePolicy,
    /// Failed syncs in a row that open the circuit.
    pub threshold: u32,
    /// `NodeBuilder::expected_nodes`.
    pub expected_nodes: u64,
    /// Keys used (1 or 2).
    pub keys: usize,
    /// `NodeBuilder::claims_on_demand_per_second` of every node (0: every claim waits for a
    /// sync; 1: past one call, they do).
    pub on_demand: u64,
    /// The store's clock at true time 0 (us since the Unix epoch).
    pub store_origin_us: u64,
    /// The nodes at the start: id and clock.
    pub nodes: Vec<(u64, ClockSpec)>,
    /// The adversary behaviours of this schedule.
    pub faults: Faults,
}

impl Scenario {
    /// The lease the nodes use.
    pub fn lease(&self) -> Duration {
        self.lease
            .unwrap_or_else(|| (self.interval * 4).max(Duration::from_secs(1)))
    }
}

/// How much a check costs.
#[derive(Clone, Copy, Debug)]
pub enum Cost {
    /// One unit.
    One,
    /// This many units (at most the capacity).
    Some(u64),
    /// The whole capacity.
    Capacity,
}

/// Which id a restarted node gets.
#[derive(Clone, Copy, Debug)]
pub enum IdChoice {
    /// An id from the pool (maybe of a dead node, maybe unused).
    Pool(u64),
    /// The id of a live node (picked by index).
    Live(usize),
}

/// One adversary action.
#[derive(Clone, Debug)]
pub enum Action {
    /// True time moves on by this many ns.
    Advance(u64),
    /// True time moves to this many ns past the first lease epoch end of the store at least
    /// half a lease away (negative: before it).
    ToLeaseEdge(i64),
    /// True time moves to this many ns past the next window end of limiter `lim`'s policy.
    ToWindowEdge { lim: usize, past: i64 },
    /// One check.
    Check {
        node: usize,
        lim: usize,
        key: usize,
        cost: Cost,
    },
    /// `count` checks of cost 1.
    Burst {
        node: usize,
        lim: usize,
        key: usize,
        count: u32,
    },
    /// A check, refunded at once when admitted: by its decision (`refund_decision`), or by
    /// its cost alone (`refund`).
    CheckRefund {
        node: usize,
        lim: usize,
        key: usize,
        cost: Cost,
        by_decision: bool,
    },
    /// `count` checks that wait for a claim on demand (`check_n_async`), started at once; each
    /// ends (and is judged) when its claim is answered.
    CheckAsync {
        node: usize,
        lim: usize,
        key: usize,
        cost: Cost,
        count: u32,
    },
    /// `check_all` across both limiters, one key.
    CheckAll { node: usize, key: usize, cost: u64 },
    /// A node starts a sync (it may already have one in flight).
    Sync { node: usize },
    /// A parked call is applied (unless lost) and answered.
    Deliver { call: usize },
    /// A parked call is applied, its reply still on the way.
    ApplyOnly { call: usize },
    /// A parked call is answered with a timeout; `late`: it stays in flight.
    TimeOut { call: usize, late: bool },
    /// A parked call is lost.
    Lose { call: usize },
    /// A node's sync times out but its call stays in flight; its next sync is applied and
    /// answered; then the first call is applied, late, after the newer one.
    LateOverNewer { node: usize },
    /// `rounds` healthy intervals: time moves one interval, every node syncs, every call is
    /// answered.
    Quiet { rounds: u32 },
    /// A node process dies (no shutdown).
    Crash { node: usize },
    /// A new node process starts.
    Start { id: IdChoice, clock: ClockSpec },
    /// A node shuts down gracefully.
    Shutdown { node: usize },
    /// The store restarts empty.
    StoreRestart,
    /// The store loses one key (picked among those claimed so far).
    KeyLoss { key: usize },
    /// The store stops (true) or starts (false) answering.
    Outage(bool),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lim = |l: &usize| ["a", "b"][*l];
        match self {
            Action::Advance(ns) => write!(f, "advance {}", crate::fmt_t(*ns)),
            Action::ToLeaseEdge(p) => write!(f, "advance to the next lease epoch end {:+} ns", p),
            Action::ToWindowEdge { lim: l, past } => {
                write!(f, "advance to the next window end of {} {:+} ns", lim(l), past)
            }
            Action::Check {
                node,
                lim: l,
                key,
                cost,
            } => {
                write!(f, "node[{node}] check {}/{} cost {cost:?}", lim(l), KEYS[*key])
            }
            Action::Burst {
                node,
                lim: l,
                key,
                count,
            } => write!(f, "node[{node}] {count} checks {}/{}", lim(l), KEYS[*key]),
            Action::CheckRefund {
                node,
                lim: l,
                key,
                cost,
                by_decision,
            } => {
                write!(
                    f,
                    "node[{node}] check then refund {}{}/{} cost {cost:?}",
                    if *by_decision { "by decision " } else { "" },
                    lim(l),
                    KEYS[*key]
                )
            }
            Action::CheckAll { node, key, cost } => write!(f, "node[{node}] check_all a+b/{} cost {cost}", KEYS[*key]),
            Action::CheckAsync {
                node,
                lim: l,
                key,
                cost,
                count,
            } => write!(
                f,
                "node[{node}] {count} waiting checks {}/{} cost {cost:?}",
                lim(l),
                KEYS[*key]
            ),
            Action::Sync { node } => write!(f, "node[{node}] starts a sync"),
            Action::Deliver { call } => write!(f, "call[{call}] applied and answered"),
            Action::ApplyOnly { call } => write!(f, "call[{call}] applied, reply delayed"),
            Action::TimeOut { call, late: true } => write!(f, "call[{call}] times out, stays in flight"),
            Action::TimeOut { call, late: false } => write!(f, "call[{call}] times out, lost"),
            Action::Lose { call } => write!(f, "call[{call}] lost"),
            Action::LateOverNewer { node } => {
                write!(
                    f,
                    "node[{node}] sync times out, the next is applied, then the first, late"
                )
            }
            Action::Quiet { rounds } => write!(f, "{rounds} healthy sync rounds"),
            Action::Crash { node } => write!(f, "node[{node}] crashes"),
            Action::Start { id, clock } => write!(
                f,
                "a node starts with id {} (clock {:+} ppm)",
                match id {
                    IdChoice::Pool(i) => format!("{i}"),
                    IdChoice::Live(i) => format!("of node[{i}]"),
                },
                clock.ppm
            ),
            Action::Shutdown { node } => write!(f, "node[{node}] shuts down"),
            Action::StoreRestart => write!(f, "the store restarts empty"),
            Action::KeyLoss { key } => write!(f, "the store loses key[{key}]"),
            Action::Outage(true) => write!(f, "the store goes down"),
            Action::Outage(false) => write!(f, "the store comes back"),
        }
    }
}

/// The largest clock rate difference between a node and the store the bound is stated for.
pub fn clock_spec(rng: &mut TestRng, faults: Faults) -> ClockSpec {
    let tol = crate::CLOCK_TOLERANCE_PPM;
    let ppm = if !faults.clock {
        0
    } else {
        // Slow node clocks (the side where a claim outlives the store's count) come first.
        match rng.random_range(0..5) {
            0 | 1 => -tol,
            2 => tol,
            3 => 0,
            _ => rng.random_range(-tol..=tol),
        }
    };
    ClockSpec {
        ppm,
        origin: rng.random_range(1_000_000_000..1_000_000_000_000),
    }
}

fn policy(rng: &mut TestRng, faults: Faults) -> Policy {
    let long = faults.clock && rng.random_bool(0.3);
    match rng.random_range(0..10) {
        0..=2 => Policy::per_second(1000).burst(100),
        3 => Policy::per_second(50).burst(20),
        4 => Policy::per_hour(10),
        5 => Policy::per_minute(20),
        6 | 7 => {
            let p = if long {
                Policy::per_hour(20)
            } else {
                Policy::per_second(100)
            };
            p.algorithm(Algorithm::FixedWindow)
        }
        _ => {
            let p = if long {
                Policy::per_hour(20)
            } else {
                Policy::per_minute(30)
            };
            p.algorithm(Algorithm::SlidingWindow)
        }
    }
}

/// A seed's scenario and actions.
pub fn generate(seed: u64, allowed: Faults) -> (Scenario, Vec<Action>) {
    let profile = Faults::parse(PROFILES[(seed % PROFILES.len() as u64) as usize]).expect("known faults");
    let faults = match allowed.and(profile) {
        f if f.none() => allowed,
        f => f,
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..].copy_from_slice(&0x7067_6174_6c6c_6f74u64.to_le_bytes());
    let mut rng = TestRng::from_seed(RngAlgorithm::XorShift, &bytes);
    let r = &mut rng;
    let interval = Duration::from_millis([50, 100][r.random_range(0..2)]);
    let lease = if faults.clock && r.random_bool(0.6) {
        Some(
            [
                Duration::from_secs(20),
                Duration::from_secs(600),
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            ][r.random_range(0..4)],
        )
    } else {
        None
    };
    let cold = if faults.cold && r.random_bool(0.5) {
        ColdStart::Optimistic(r.random_range(1..=5))
    } else {
        ColdStart::Deny
    };
    let failure = if faults.outage && r.random_bool(0.5) {
        FailurePolicy::LocalShare
    } else {
        FailurePolicy::FailClosed
    };
    let n = r.random_range(2..=3);
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push((i as u64 + 1, clock_spec(r, faults)));
    }
    let scenario = Scenario {
        policies: [policy(r, faults), policy(r, faults)],
        interval,
        lease,
        cold,
        failure,
        threshold: r.random_range(1..=3),
        expected_nodes: r.random_range(1..=3),
        keys: r.random_range(1..=2),
        on_demand: [500, 1, 0][r.random_range(0..3)],
        store_origin_us: {
            let origin: u64 = 1_700_000_000_000_000 + r.random_range(0..3_600_000_000);
            match lease {
                // Long leases: the first claims reach the store in the last seconds of a lease
                // epoch, where the store counts a holding for the shortest time.
                Some(l) => {
                    let l = l.as_micros() as u64;
                    origin.div_ceil(l) * l - r.random_range(0..500_000)
                }
                None => origin,
            }
        },
        nodes,
        faults,
    };
    let len = r.random_range(20..=120);
    let actions = (0..len).map(|_| action(r, &scenario, faults)).collect();
    (scenario, actions)
}

fn cost(r: &mut TestRng) -> Cost {
    match r.random_range(0..4) {
        0 | 1 => Cost::One,
        2 => Cost::Some(r.random_range(2..=12)),
        _ => Cost::Capacity,
    }
}

fn action(r: &mut TestRng, sc: &Scenario, faults: Faults) -> Action {
    let node = r.random_range(0..8);
    let lim = r.random_range(0..2);
    let key = r.random_range(0..sc.keys);
    let call = r.random_range(0..8);
    let interval = sc.interval.as_nanos() as u64;
    // Weights: (weight, enabled).
    let table: [(u32, bool); 23] = [
        (10, true),                         // 0 small advance
        (2, true),                          // 1 large advance
        (5, faults.clock),                  // 2 lease edge
        (2, faults.clock),                  // 3 window edge
        (8, true),                          // 4 check
        (14, true),                         // 5 burst
        (2, true),                          // 6 check + refund
        (2, true),                          // 7 check_all
        (14, true),                         // 8 sync
        (12, true),                         // 9 deliver
        (3, true),                          // 10 apply only
        (6, true),                          // 11 time out
        (2, faults.late),                   // 12 lose
        (6, true),                          // 13 quiet rounds
        (2, faults.crash),                  // 14 crash
        (3, faults.crash || faults.dup_id), // 15 start
        (1, faults.crash),                  // 16 shutdown
        (1, faults.store_restart),          // 17 store restart
        (2, faults.outage),                 // 18 outage on
        (2, faults.outage),                 // 19 outage off
        (1, faults.store_restart),          // 20 key loss
        (8, true),                          // 21 waiting checks
        (2, faults.late),                   // 22 a late call applied after a newer one
    ];
    let total: u32 = table.iter().filter(|(_, on)| *on).map(|(w, _)| w).sum();
    let mut pick = r.random_range(0..total);
    let mut which = 0;
    for (i, (w, on)) in table.iter().enumerate() {
        if !on {
            continue;
        }
        if pick < *w {
            which = i;
            break;
        }
        pick -= w;
    }
    match which {
        0 => Action::Advance(match r.random_range(0..3) {
            0 => r.random_range(0..2_000_000),
            _ => r.random_range(1..=interval * 3 / 2),
        }),
        1 => Action::Advance(r.random_range(interval * 2..=interval * 20)),
        2 => {
            // Around where a claim's validity ends on a node clock off by the tolerance.
            let lease = sc.lease().as_nanos() as i64;
            let spread = (lease / 1_000_000 * crate::CLOCK_TOLERANCE_PPM).max(20_000_000);
            Action::ToLeaseEdge(r.random_range(-spread / 4..=spread))
        }
        3 => {
            let spread = (sc.policies[lim].duration().as_nanos() as i64 / 1_000_000 * crate::CLOCK_TOLERANCE_PPM)
                .max(20_000_000);
            Action::ToWindowEdge {
                lim,
                past: r.random_range(-spread..=spread),
            }
        }
        4 => Action::Check {
            node,
            lim,
            key,
            cost: cost(r),
        },
        5 => Action::Burst {
            node,
            lim,
            key,
            count: r.random_range(1..=120),
        },
        6 => Action::CheckRefund {
            node,
            lim,
            key,
            cost: cost(r),
            by_decision: r.random_bool(0.5),
        },
        7 => Action::CheckAll {
            node,
            key,
            cost: r.random_range(1..=3),
        },
        8 => Action::Sync { node },
        9 => Action::Deliver { call },
        10 => Action::ApplyOnly { call },
        11 => Action::TimeOut {
            call,
            late: faults.late && r.random_bool(0.6),
        },
        12 => Action::Lose { call },
        13 => Action::Quiet {
            rounds: r.random_range(1..=6),
        },
        14 => Action::Crash { node },
        15 => Action::Start {
            id: if faults.dup_id && r.random_bool(0.5) {
                IdChoice::Live(node)
            } else {
                IdChoice::Pool(r.random_range(1..=ID_POOL))
            },
            clock: clock_spec(r, faults),
        },
        16 => Action::Shutdown { node },
        17 => Action::StoreRestart,
        18 => Action::Outage(true),
        19 => Action::Outage(false),
        20 => Action::KeyLoss { key: call },
        22 => Action::LateOverNewer { node },
        _ => Action::CheckAsync {
            node,
            lim,
            key,
            cost: cost(r),
            count: r.random_range(1..=4),
        },
    }
}
