//! The bound, checked on true time after every admission.
//!
//! Token bucket: over every interval `[t1, t2]`, the cost admitted for a key by all nodes is at
//! most `capacity + rate * (t2 - t1) + allowances`. The worst interval ending now is tracked
//! exactly by a virtual bucket of that size leaking at `rate` (the Lindley recursion: it
//! empties at the start of the worst interval). Windows: at most `points + allowances` per
//! aligned window of the store's clock.
//!
//! Allowances are summed over the whole schedule (never per interval: a looser bound, so a
//! violation is a real one). They are, each stated here and printed with a violation:
//! * [`COLD`]: `n` per node incarnation and key that admitted while `ColdStart::Optimistic(n)`
//!   is configured (a superset of those that admitted cold units);
//! * [`STORE_RESTART`]: one capacity (windows: `points`) per store restart, for every key;
//! * [`KEY_LOSS`]: one capacity (windows: `points`) per loss of that key;
//! * degraded admissions (`FailurePolicy::LocalShare` while the circuit is open) are checked
//!   apart, per node incarnation and key, against that node's share of the policy: capacity
//!   and rate divided by the fewest nodes it divided by so far (the README table's
//!   `(capacity + rate * d) * actual nodes / nodes last seen`, summed over the nodes), on the
//!   node's own clock (a share is a local limiter: its time is the node's).
//!
//! Nothing is allowed for timeouts, late or reordered calls, lost replies, crashes, restarts,
//! duplicate node ids or node clocks within [`crate::CLOCK_TOLERANCE_PPM`] of the store's.

use std::collections::{BTreeMap, HashMap, HashSet};

use tollgate::{Algorithm, Policy};

/// Allowance label: optimistic cold-start units of one node incarnation for one key.
pub const COLD: &str = "cold start";
/// Allowance label: the store restarted empty.
pub const STORE_RESTART: &str = "store restart";
/// Allowance label: the store lost one key.
pub const KEY_LOSS: &str = "key loss";

/// Divisors of every share a schedule can use (at most 16 nodes) divide this exactly.
const SHARE_SCALE: u128 = 720_720;

/// A broken bound.
#[derive(Clone, Debug)]
pub struct Violation {
    /// What was admitted against which bound.
    pub text: String,
}

/// One admission stream measured against one bound.
struct Meter {
    algorithm: Algorithm,
    points: u64,
    duration_ns: u128,
    /// Token bucket: the virtual bucket's level, scaled by `duration_ns * scale`.
    level: u128,
    last: u64,
    /// Start of the current busy period (the worst interval ending now) and its cost.
    since: u64,
    since_cost: u64,
    /// Windows: cost per aligned window of the store's clock.
    windows: BTreeMap<u64, u64>,
}

impl Meter {
    fn new(policy: &Policy) -> Self {
        Meter {
            algorithm: policy.get_algorithm(),
            points: policy.points(),
            duration_ns: policy.duration().as_nanos(),
            level: 0,
            last: 0,
            since: 0,
            since_cost: 0,
            windows: BTreeMap::new(),
        }
    }

    /// Adds `cost` at true time `t` (store time `store_us`); `Err` with the broken bound's
    /// description when the admitted cost exceeds `limit` (capacity or points, plus
    /// allowances) under a rate of `points / duration / div`.
    fn admit(&mut self, t: u64, store_us: u64, cost: u64, limit: u64, div: u64) -> Result<(), String> {
        match self.algorithm {
            Algorithm::TokenBucket => {
                let scale = SHARE_SCALE / u128::from(div);
                let drain = u128::from(self.points) * u128::from(t.saturating_sub(self.last)) * scale;
                let unit = self.duration_ns * SHARE_SCALE;
                if self.level <= drain {
                    self.level = 0;
                    self.since = t;
                    self.since_cost = 0;
                } else {
                    self.level -= drain;
                }
                self.last = t;
                self.level += u128::from(cost) * unit;
                self.since_cost += cost;
                if self.level > u128::from(limit) * unit {
                    let d = t - self.since;
                    let refill = u128::from(self.points) * u128::from(d) * scale;
                    return Err(format!(
                        "admitted {} over [{}, {}] (d = {}); bound {} + rate * d = {:.3} (rate {}/{:?}{})",
                        self.since_cost,
                        crate::fmt_t(self.since),
                        crate::fmt_t(t),
                        crate::fmt_t(d),
                        limit,
                        limit as f64 + refill as f64 / unit as f64,
                        self.points,
                        std::time::Duration::from_nanos(self.duration_ns as u64),
                        if div > 1 { format!(" / {div}") } else { String::new() },
                    ));
                }
                Ok(())
            }
            Algorithm::FixedWindow | Algorithm::SlidingWindow => {
                let window_us = self.duration_ns.div_ceil(1000) as u64;
                let w = store_us / window_us;
                let n = self.windows.entry(w).or_default();
                *n += cost;
                if *n > limit {
                    return Err(format!(
                        "admitted {} in the aligned window #{} ({} us .. {} us); bound {}",
                        n,
                        w,
                        w * window_us,
                        (w + 1) * window_us,
                        limit
                    ));
                }
                Ok(())
            }
        }
    }
}

/// One store key: its policy, its main stream and its allowances.
struct KeyBook {
    name: String,
    policy: Policy,
    main: Meter,
    allowance: u64,
    notes: Vec<String>,
}

/// The bound for every key of a schedule.
pub struct Oracle {
    keys: Vec<KeyBook>,
    cold_n: u64,
    cold_seen: HashSet<(u64, usize)>,
    /// Degraded admissions per (node incarnation, key): the meter and the fewest nodes the
    /// share was divided by.
    degraded: HashMap<(u64, usize), (Meter, u64)>,
}

/// The capacity a bound starts from: the bucket size, or the points of a window.
fn base(policy: &Policy) -> u64 {
    match policy.get_algorithm() {
        Algorithm::TokenBucket => policy.capacity(),
        _ => policy.points(),
    }
}

impl Oracle {
    /// Bounds for `keys` (name and policy each); `cold_n` is the `Optimistic` allowance (0
    /// for `Deny`).
    pub fn new(keys: Vec<(String, Policy)>, cold_n: u64) -> Self {
        Oracle {
            keys: keys
                .into_iter()
                .map(|(name, policy)| KeyBook {
                    name,
                    main: Meter::new(&policy),
                    policy,
                    allowance: 0,
                    notes: Vec::new(),
                })
                .collect(),
            cold_n,
            cold_seen: HashSet::new(),
            degraded: HashMap::new(),
        }
    }

    /// The store restarted empty: one capacity more for every key.
    pub fn store_restarted(&mut self, t: u64) {
        for k in &mut self.keys {
            let c = base(&k.policy);
            k.allowance += c;
            k.notes.push(format!("{STORE_RESTART} at {}: +{c}", crate::fmt_t(t)));
        }
    }

    /// The store lost key `key`: one capacity more for it.
    pub fn key_lost(&mut self, key: usize, t: u64) {
        let k = &mut self.keys[key];
        let c = base(&k.policy);
        k.allowance += c;
        k.notes.push(format!("{KEY_LOSS} at {}: +{c}", crate::fmt_t(t)));
    }

    /// Node incarnation `inc` admitted `cost` for key `key` at true time `t` (store time
    /// `store_us`, node time `node_ns`); `degraded`: the failure policy answered, and the node
    /// divided the limit by `div` (its share runs on the node's clock).
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        inc: u64,
        key: usize,
        cost: u64,
        t: u64,
        store_us: u64,
        node_ns: u64,
        degraded: bool,
        div: u64,
    ) -> Result<(), Violation> {
        let k = &mut self.keys[key];
        if degraded {
            let (meter, least) = self
                .degraded
                .entry((inc, key))
                .or_insert_with(|| (Meter::new(&k.policy), div.max(1)));
            *least = (*least).min(div.max(1));
            let limit = base(&k.policy) / *least;
            return meter
                .admit(node_ns, node_ns / 1000, cost, limit, *least)
                .map_err(|e| Violation {
                    text: format!(
                        "key {} ({:?}), degraded admissions of node incarnation #{inc} (local share, divided by {}, node clock): {e}",
                        k.name, k.policy, least
                    ),
                });
        }
        if self.cold_n > 0 && self.cold_seen.insert((inc, key)) {
            k.allowance += self.cold_n;
            k.notes
                .push(format!("{COLD} of node incarnation #{inc}: +{}", self.cold_n));
        }
        let limit = base(&k.policy) + k.allowance;
        k.main.admit(t, store_us, cost, limit, 1).map_err(|e| Violation {
            text: format!(
                "key {} ({:?}): {e}; allowances: [{}]",
                k.name,
                k.policy,
                k.notes.join("; ")
            ),
        })
    }
}
