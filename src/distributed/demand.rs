//! How much a key claims at a sync: pure arithmetic over its measured demand, with no atomics,
//! clocks or I/O (the claims module measures, this module sizes).
//!
//! Per key the node keeps an estimate of its demand per sync interval, in `1/DEMAND_ONE`
//! units. A sync raises it to what the checks used since the key's previous sync (scaled to a
//! whole interval when the sync comes early), or lets it decay by half per interval of time.
//! A key that holds tokens ahead of its checks aims at the estimate times the headroom; what
//! waiting checks asked for comes on top; what is held well above that need (more than twice
//! it) goes back to the store; the rest of the need, plus the cold-start debt, is wanted.

use crate::consts::DEMAND_ONE;

/// The node's settings the sizing uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sizing {
    /// The sync interval, in nanoseconds (at least 1).
    pub(crate) interval_ns: u64,
    /// How much a key holds ahead of its checks relative to its demand per interval, in
    /// percent (100 or more).
    pub(crate) headroom_percent: u64,
}

impl Sizing {
    /// The time a sync at `now` covers since the key's previous sync at `last` (0: none, taken
    /// as one interval), between a tenth of an interval and one interval.
    fn covered(&self, last: u64, now: u64) -> u64 {
        let interval = self.interval_ns;
        if last == 0 {
            interval
        } else {
            now.saturating_sub(last).clamp(interval / 10, interval)
        }
    }

    /// The demand estimate after a sync at `now` that measured `used` units (spent, denied or
    /// taken from the cold-start allowance) since the key's previous sync at `last` (0: none),
    /// from the estimate `before`: the use per interval, or the estimate decayed by half per
    /// interval of time, whichever is higher.
    ///
    /// The decay goes by time, not per sync: a node that syncs ten times an interval for its
    /// busy keys must not forget a slow key's demand ten times as fast (it would return that
    /// key's tokens between two of its requests and deny the next one). It still reaches 0, so
    /// that an unused key is eventually forgotten.
    pub(crate) fn estimate(&self, before: u64, last: u64, now: u64, used: u64) -> u64 {
        let interval = self.interval_ns;
        let covered = self.covered(last, now);
        let per_interval = (u128::from(used) * u128::from(interval) / u128::from(covered.max(1))) as u64;
        let decay = (u128::from(before) * u128::from(covered))
            .div_ceil(2 * u128::from(interval.max(1)))
            .min(u128::from(before)) as u64;
        per_interval.saturating_mul(DEMAND_ONE).max(before - decay)
    }

    /// The tokens a key holds ahead of its checks for `estimate`: its demand per interval
    /// times the headroom, at least 1 when the key was `used` since its previous sync, at most
    /// `capacity`.
    pub(crate) fn target(&self, estimate: u64, used: u64, capacity: u64) -> u64 {
        let t = (u128::from(estimate.div_ceil(DEMAND_ONE)) * u128::from(self.headroom_percent) / 100) as u64;
        t.max(u64::from(used > 0)).min(capacity)
    }
}

/// What a key needs after a sync: the tokens it holds ahead of its checks (`target`) and what
/// waiting checks `asked` for on top, at most `capacity`.
pub(crate) fn need(target: u64, asked: u64, capacity: u64) -> u64 {
    target.saturating_add(asked).min(capacity)
}

/// What a key holding `held` tokens returns for a `need` (everything above it with `drain`):
/// with hysteresis, nothing while it holds at most twice the need, else all above the need.
pub(crate) fn excess(held: u64, need: u64, drain: bool) -> u64 {
    if held > need.saturating_mul(2) || drain {
        held - need.min(held)
    } else {
        0
    }
}

/// What a key that keeps `kept` tokens asks the store for: the rest of its `need`, plus its
/// cold-start `debt` (at most one capacity). A key the store `failed` alone asks for at least
/// one token at every sync: a claim that succeeds is the only way its checks leave the failure
/// policy. Never more than `capacity`.
pub(crate) fn wanted(need: u64, kept: u64, debt: u64, capacity: u64, failed: bool) -> u64 {
    let w = need.saturating_sub(kept) + debt.min(capacity);
    let w = if failed { w.max(1) } else { w };
    w.min(capacity)
}

/// The held tokens at or below which a check asks for an early sync: a quarter of `target`.
pub(crate) fn low_mark(target: u64) -> u64 {
    target / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SIZING: Sizing = Sizing {
        interval_ns: 100 * MS,
        headroom_percent: 200,
    };

    #[test]
    fn a_first_sync_counts_its_use_as_one_interval_of_demand() {
        assert_eq!(SIZING.estimate(0, 0, 5 * MS, 10), 10 * DEMAND_ONE);
    }

    #[test]
    fn an_early_sync_scales_its_use_to_a_whole_interval() {
        // 5 units in a quarter interval: 20 per interval.
        assert_eq!(SIZING.estimate(0, 1_000 * MS, 1_025 * MS, 5), 20 * DEMAND_ONE);
    }

    #[test]
    fn the_scaling_stops_at_a_tenth_of_an_interval() {
        // 1 unit within 1 ms counts as 1 per tenth of an interval, not 100 per interval.
        assert_eq!(SIZING.estimate(0, 1_000 * MS, 1_001 * MS, 1), 10 * DEMAND_ONE);
    }

    #[test]
    fn a_late_sync_counts_its_use_as_one_interval_of_demand() {
        // Use over ten intervals is not spread thin: the wait is clamped to one interval.
        assert_eq!(SIZING.estimate(0, 1_000 * MS, 2_000 * MS, 10), 10 * DEMAND_ONE);
    }

    #[test]
    fn an_unused_estimate_halves_per_interval_of_time_not_per_sync() {
        let before = 64 * DEMAND_ONE;
        assert_eq!(SIZING.estimate(before, 1_000 * MS, 1_100 * MS, 0), 32 * DEMAND_ONE);
        // Ten syncs a tenth of an interval apart decay it about as much as one sync would.
        let mut e = before;
        for i in 1..=10 {
            e = SIZING.estimate(e, 1_000 * MS + (i - 1) * 10 * MS, 1_000 * MS + i * 10 * MS, 0);
        }
        assert!((38 * DEMAND_ONE..=39 * DEMAND_ONE).contains(&e), "{e}");
    }

    #[test]
    fn an_unused_estimate_reaches_zero() {
        let mut e = 1_000 * DEMAND_ONE;
        let mut t = 1_000 * MS;
        for _ in 0..64 {
            e = SIZING.estimate(e, t, t + 100 * MS, 0);
            t += 100 * MS;
        }
        assert_eq!(e, 0);
    }

    #[test]
    fn use_above_the_decayed_estimate_replaces_it() {
        assert_eq!(
            SIZING.estimate(8 * DEMAND_ONE, 1_000 * MS, 1_100 * MS, 30),
            30 * DEMAND_ONE
        );
        // Use below the decayed estimate leaves the decayed estimate.
        assert_eq!(
            SIZING.estimate(8 * DEMAND_ONE, 1_000 * MS, 1_100 * MS, 3),
            4 * DEMAND_ONE
        );
    }

    #[test]
    fn the_target_is_the_demand_per_interval_times_the_headroom() {
        assert_eq!(SIZING.target(10 * DEMAND_ONE, 10, 1_000), 20);
        // A fraction of a unit of demand rounds up to a whole unit.
        assert_eq!(SIZING.target(DEMAND_ONE / 2, 0, 1_000), 2);
    }

    #[test]
    fn a_used_key_targets_at_least_one_token_and_no_key_more_than_the_capacity() {
        assert_eq!(SIZING.target(0, 1, 1_000), 1);
        assert_eq!(SIZING.target(0, 0, 1_000), 0);
        assert_eq!(SIZING.target(1_000 * DEMAND_ONE, 1_000, 50), 50);
    }

    #[test]
    fn what_waiting_checks_asked_for_comes_on_top_of_the_target_within_the_capacity() {
        assert_eq!(need(20, 5, 100), 25);
        assert_eq!(need(90, 20, 100), 100);
        assert_eq!(need(u64::MAX, 1, u64::MAX), u64::MAX);
    }

    #[test]
    fn a_key_keeps_up_to_twice_its_need_and_returns_all_above_the_need_beyond_that() {
        assert_eq!(excess(40, 20, false), 0, "exactly twice the need is kept");
        assert_eq!(excess(41, 20, false), 21);
        assert_eq!(excess(5, 0, false), 5, "no need: everything goes back");
    }

    #[test]
    fn a_drain_returns_everything_above_the_need() {
        assert_eq!(excess(30, 0, true), 30);
        assert_eq!(excess(30, 20, true), 10);
        assert_eq!(excess(10, 20, true), 0);
    }

    #[test]
    fn a_key_wants_the_rest_of_its_need_and_its_debt_within_the_capacity() {
        assert_eq!(wanted(20, 5, 0, 100, false), 15);
        assert_eq!(
            wanted(20, 25, 3, 100, false),
            3,
            "the debt is wanted even when the need is held"
        );
        assert_eq!(
            wanted(20, 0, 500, 100, false),
            100,
            "the debt counts at most one capacity"
        );
        assert_eq!(wanted(0, 0, 0, 100, false), 0);
    }

    #[test]
    fn a_key_the_store_failed_alone_asks_for_at_least_one_token() {
        assert_eq!(wanted(0, 0, 0, 100, true), 1);
        assert_eq!(wanted(20, 5, 0, 100, true), 15);
    }

    #[test]
    fn an_early_sync_is_asked_for_at_a_quarter_of_the_target() {
        assert_eq!(low_mark(20), 5);
        assert_eq!(low_mark(3), 0);
    }
}
