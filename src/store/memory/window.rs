//! The fixed and sliding windows' claims, step for step as `lua/fixed_window.lua` and
//! `lua/sliding_window.lua`.

use super::state::{ceil_div, Applied, Entry, State, TWO20, TWO32};
use crate::store::{Grant, Limits};

pub(super) fn fixed_window(
    now: i64,
    l: &Limits,
    old: Option<(i64, i64)>,
    kept: i64,
    ret: i64,
    want: i64,
    claim_w: i64,
) -> Applied {
    let (cap, win) = (l.capacity() as i64, l.period_us() as i64);
    let mut w = now.div_euclid(win);
    let mut wm = w % TWO20;
    let (used, same) = match old {
        Some((n, _)) => {
            let swm = n / TWO32;
            let d = (swm - wm).rem_euclid(TWO20);
            if d == 0 {
                (n % TWO32, true)
            } else if d < TWO20 / 2 {
                // The stored window is ahead: the clock stepped back. Answer in the stored
                // window rather than open an earlier one next to it.
                w += d;
                wm = swm;
                (n % TWO32, true)
            } else {
                (0, false)
            }
        }
        None => (0, false),
    };
    let (mut used, revoked, state_lost) = settle_window(claim_w, w, kept, ret, used);
    let room = (cap - used).max(0);
    let granted = want.min(room);
    used += granted;
    let remaining = room - granted;
    let reset = ceil_div((w + 1) * win - now, 1000);
    let grant = Grant {
        granted: granted as u64,
        remaining: remaining as u64,
        ms_to_next_token: if remaining == 0 { reset as u64 } else { 0 },
        ms_to_reset: reset as u64,
        window: w as u64,
        revoked: revoked as u64,
        state_lost,
        stale: false,
    };
    if used == 0 {
        return (Ok(grant), None);
    }
    let expires_ms = match old {
        Some((_, x)) if same => x,
        _ => now.div_euclid(1000) + reset + 1,
    };
    (
        Ok(grant),
        Some(Entry {
            state: State::Fixed(wm * TWO32 + used),
            expires_ms,
        }),
    )
}

/// A sliding window's counts at `now` (window length `win`) from the stored ones, `old`
/// (`(window, prev, cur)`): the window the claim is answered in, the microseconds into it,
/// its previous and current counts, and whether the window moved (the key is then written
/// anew, with a new expiry).
fn roll_window(now: i64, win: i64, old: Option<(i64, i64, i64)>) -> (i64, i64, i64, i64, bool) {
    let w = now.div_euclid(win);
    let el = now - w * win;
    let (sw, prev, cur) = old.unwrap_or((w, 0, 0));
    if sw == w {
        (w, el, prev, cur, old.is_none())
    } else if sw + 1 == w {
        (w, el, cur, 0, true)
    } else if sw < w {
        (w, el, 0, 0, true)
    } else {
        // The clock went backwards: answer at the start of the stored window.
        (sw, 0, prev, cur, false)
    }
}

/// Applies what a window claim tagged with window `claim_w` keeps and returns to the count
/// `used` of window `w`; returns the count, the tokens revoked and whether the window counts
/// less than this node alone holds and returns (the store lost state). A claim tagged with
/// another window is void: its returned tokens are ignored and its kept tokens revoked.
fn settle_window(claim_w: i64, w: i64, kept: i64, ret: i64, used: i64) -> (i64, i64, bool) {
    if claim_w == w {
        ((used - ret).max(0), 0, kept + ret > used)
    } else {
        (used, kept, false)
    }
}

/// Milliseconds until a sliding window's counts no longer matter, at `now` in window `w`.
fn sliding_reset_ms(now: i64, win: i64, w: i64, prev: i64, cur: i64) -> i64 {
    if cur > 0 {
        ceil_div((w + 2) * win - now, 1000)
    } else if prev > 0 {
        ceil_div((w + 1) * win - now, 1000)
    } else {
        0
    }
}

/// Milliseconds until a sliding window with no room left admits a token again, at `now` in
/// window `w` (`wt` ticks of `tick` microseconds long).
fn sliding_next_ms(now: i64, cap: i64, (win, tick, wt): (i64, i64, i64), w: i64, prev: i64, cur: i64) -> i64 {
    let at = if cur < cap && prev > 0 {
        // Later in this window, as the previous window's weight decays.
        w * win + win - ((cap - cur - 1) * wt / prev) * tick
    } else {
        // In the next window, where this window's count is the decaying one.
        (w + 1) * win + win - ((cap - 1) * wt / cur.max(1)) * tick
    };
    ceil_div(at - now, 1000).max(1)
}

#[allow(clippy::type_complexity)]
pub(super) fn sliding_window(
    now: i64,
    l: &Limits,
    old: Option<((i64, i64, i64), i64)>,
    kept: i64,
    ret: i64,
    want: i64,
    claim_w: i64,
) -> Applied {
    let (cap, win, tick) = (l.capacity() as i64, l.period_us() as i64, l.tick_us() as i64);
    let (w, el, prev, cur, moved) = roll_window(now, win, old.map(|o| o.0));
    let wt = win / tick;
    let rem = ceil_div(win - el, tick);
    let (mut cur, revoked, state_lost) = settle_window(claim_w, w, kept, ret, cur);
    let wp = ceil_div(prev * rem, wt).min(prev);
    let room = (cap - cur - wp).max(0);
    let granted = want.min(room);
    cur += granted;
    let remaining = room - granted;
    let next = if remaining == 0 {
        sliding_next_ms(now, cap, (win, tick, wt), w, prev, cur)
    } else {
        0
    };
    let grant = Grant {
        granted: granted as u64,
        remaining: remaining as u64,
        ms_to_next_token: next as u64,
        ms_to_reset: sliding_reset_ms(now, win, w, prev, cur) as u64,
        window: w as u64,
        revoked: revoked as u64,
        state_lost,
        stale: false,
    };
    if prev == 0 && cur == 0 {
        return (Ok(grant), None);
    }
    let expires_ms = match old {
        Some((_, x)) if !moved => x,
        _ => now.div_euclid(1000) + ceil_div((w + 2) * win - now, 1000) + 1,
    };
    (
        Ok(grant),
        Some(Entry {
            state: State::Sliding { w, prev, cur },
            expires_ms,
        }),
    )
}
