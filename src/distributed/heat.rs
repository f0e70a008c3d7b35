//! Whether a key is hot or cold on this node: pure arithmetic over its measured demand.
//!
//! A hot key keeps claimed tokens ahead of its checks, so its checks take nanoseconds. A cold
//! key (a client seen every few seconds, such as one user of a per-minute tier) holds nothing
//! between requests: a check that may wait claims what it needs when it comes, so no token
//! sits on one node while the client's next request lands on another.
//!
//! Demand is counted over periods of one lease of real time (not clamped to the sync
//! interval, as the claim-size estimate is, which would rate one request every ten seconds as
//! one per interval). A key turns hot as soon as its count in the current period reaches
//! [`HOT_ENTER_PER_LEASE`], and turns cold when a whole period's rate falls below
//! [`HOT_EXIT_PER_LEASE`] per lease.

use crate::consts::{HOT_ENTER_PER_LEASE, HOT_EXIT_PER_LEASE};

/// A key's demand record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heat {
    /// The key is hot.
    pub(crate) hot: bool,
    /// Units used (spent, denied or taken from the cold-start allowance) in the current period.
    count: u64,
    /// When the current period began (clock nanoseconds; 0: not yet).
    since: u64,
}

impl Heat {
    /// Adds `used` units seen at `now`, and decides hot or cold with periods of `lease_ns`.
    pub(crate) fn observe(&mut self, used: u64, now: u64, lease_ns: u64) {
        if self.since == 0 {
            self.since = now.max(1);
        }
        self.count = self.count.saturating_add(used);
        if !self.hot && self.count >= HOT_ENTER_PER_LEASE {
            // Reached within less than a lease: hot now, without waiting for the period's end.
            self.hot = true;
        }
        let elapsed = now.saturating_sub(self.since);
        if elapsed >= lease_ns.max(1) {
            // The period's rate per lease, against the threshold of the key's present state.
            let per_lease = u128::from(self.count) * u128::from(lease_ns) / u128::from(elapsed);
            let threshold = if self.hot {
                HOT_EXIT_PER_LEASE
            } else {
                HOT_ENTER_PER_LEASE
            };
            self.hot = per_lease >= u128::from(threshold);
            self.count = 0;
            self.since = now.max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 1_000_000_000;

    fn fed(heat: &mut Heat, per_lease: u64, leases: u64, syncs_per_lease: u64, start: u64) -> u64 {
        // Spreads `per_lease` units evenly over the syncs of each lease; returns the end time.
        let step = LEASE / syncs_per_lease;
        let mut t = start;
        let mut given = 0;
        for i in 1..=leases * syncs_per_lease {
            t += step;
            let due = per_lease * i / syncs_per_lease;
            heat.observe(due - given, t, LEASE);
            given = due;
        }
        t
    }

    #[test]
    fn a_new_key_is_cold() {
        let mut h = Heat::default();
        h.observe(1, 5, LEASE);
        assert!(!h.hot);
    }

    #[test]
    fn a_key_turns_hot_as_soon_as_its_count_within_one_lease_reaches_the_enter_threshold() {
        let mut h = Heat::default();
        h.observe(HOT_ENTER_PER_LEASE - 1, 10, LEASE);
        assert!(!h.hot, "one unit short");
        h.observe(1, 20, LEASE);
        assert!(h.hot, "reached within 10 ns of the period's start");
    }

    #[test]
    fn a_slow_key_stays_cold_however_long_it_runs() {
        // 20 per minute spread over 4 nodes: one request every 12 s on this node.
        let mut h = Heat::default();
        let mut t = 1;
        for _ in 0..100 {
            t += 12 * LEASE;
            h.observe(1, t, LEASE);
            assert!(!h.hot);
        }
    }

    #[test]
    fn a_hot_key_stays_hot_between_the_thresholds_and_turns_cold_below_the_exit() {
        let mut h = Heat::default();
        let t = fed(&mut h, HOT_ENTER_PER_LEASE * 2, 2, 10, 0);
        assert!(h.hot);
        // Between exit and enter: hysteresis keeps it hot.
        let t = fed(&mut h, HOT_EXIT_PER_LEASE + 1, 3, 10, t);
        assert!(h.hot, "above the exit threshold, a hot key stays hot");
        fed(&mut h, HOT_EXIT_PER_LEASE - 1, 2, 10, t);
        assert!(!h.hot, "below the exit threshold for a whole lease, it turns cold");
    }

    #[test]
    fn a_cold_key_between_the_thresholds_stays_cold() {
        let mut h = Heat::default();
        fed(&mut h, HOT_ENTER_PER_LEASE - 1, 5, 10, 0);
        assert!(!h.hot);
    }

    #[test]
    fn the_rate_is_judged_over_the_real_elapsed_time() {
        // Exactly at the exit threshold over a period twice a lease long: still hot; one less:
        // cold (the count is divided by the elapsed leases, not taken as one lease's).
        for (count, hot) in [(2 * HOT_EXIT_PER_LEASE, true), (2 * HOT_EXIT_PER_LEASE - 1, false)] {
            let mut h = Heat {
                hot: true,
                count: 0,
                since: 1,
            };
            h.observe(count, 1 + 2 * LEASE, LEASE);
            assert_eq!(h.hot, hot, "count {count} over two leases");
        }
    }
}
