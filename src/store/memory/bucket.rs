//! The token bucket's claim, step for step as `lua/token_bucket.lua`.

use super::state::{ceil_div, Applied, Bucket, Entry, Holding, State};
use crate::store::{Grant, Limits, NodeId};

/// A token-bucket policy's numbers as the script reads them per policy: capacity,
/// microseconds per token, lease in ms, and capacity * per.
#[derive(Clone, Copy, Debug)]
struct BucketPolicy {
    cap: i64,
    per: i64,
    lease: i64,
    tau: i64,
}

impl BucketPolicy {
    fn of(l: &Limits) -> Self {
        let (cap, per, lease) = (l.capacity() as i64, l.period_us() as i64, l.lease_ms() as i64);
        BucketPolicy {
            cap,
            per,
            lease,
            tau: cap * per,
        }
    }
}

/// What a claim takes from the bucket, once refilled: the tokens left in it and the
/// microseconds towards the next one, and the claim's split.
#[derive(Clone, Copy, Debug)]
struct Taken {
    tokens: i64,
    frac: i64,
    granted: i64,
    /// Kept tokens the store could not cover.
    revoked: i64,
    /// What this node holds after the claim.
    held: i64,
}

impl Bucket {
    /// The state of a key that does not exist: a full bucket in epoch `ep`, holding nothing.
    fn fresh(now: i64, p: &BucketPolicy, ep: i64) -> Self {
        Bucket {
            e: now - p.tau,
            ep,
            cur: 0,
            prev: 0,
            x: 0,
            nodes: Vec::new(),
        }
    }

    /// Rolls the lease epochs to `ep` (the current one); returns the epoch the claim is applied
    /// in (a clock that went backwards keeps the stored epoch). Leaves `self.ep` as it was.
    fn roll_epochs(&mut self, p: &BucketPolicy, ep: i64) -> i64 {
        let BucketPolicy { cap, per, lease, .. } = *p;
        if ep < self.ep {
            return self.ep;
        }
        if ep > self.ep {
            // Holdings stop counting at epoch ends: those of epoch `self.ep - 1` (prev) at the end
            // of `self.ep`, those of `self.ep` (cur) at the end of the next. The store never learns
            // when a node that stopped syncing spent them, so it takes them as spent when their count
            // ends: refill accrued before that end is capped by the holdings that still counted.
            // (Without this, a node that spends its tokens late and then vanishes hands the store
            // refill for the whole time it held them.)
            let end1 = (self.ep + 1) * lease * 1000;
            self.e = self.e.max(end1 - (cap - self.cur - self.prev).max(0) * per);
            if ep >= self.ep + 2 {
                let end2 = (self.ep + 2) * lease * 1000;
                self.e = self.e.max(end2 - (cap - self.cur).max(0) * per);
            }
            self.prev = if ep == self.ep + 1 { self.cur } else { 0 };
            self.cur = 0;
        }
        ep
    }

    /// Takes this node's previous holding (`own`, its record) out of the totals if it still
    /// counts in epoch `ep`; returns it (0 when it no longer counts, or there is none).
    fn release(&mut self, own: Option<Holding>, ep: i64) -> i64 {
        let Some(Holding { epoch, amount, .. }) = own else {
            return 0;
        };
        if epoch == ep {
            self.cur = (self.cur - amount).max(0);
            amount
        } else if epoch == ep - 1 {
            self.prev = (self.prev - amount).max(0);
            amount
        } else {
            0
        }
    }

    /// Refills the bucket at `now`: returns the tokens in it and the microseconds towards the
    /// next one, capped by the holdings as they stood while the refill accrued (`had`, this
    /// node's previous holding, included).
    ///
    /// The script first raises the empty time to `now - tau` (a full bucket), which keeps its
    /// floating-point figures small. Here the cap below gives the same tokens without it: a
    /// refill longer than `tau` is more than `cap` tokens, and `old_room <= cap`; and `take`
    /// writes the empty time anew.
    fn refill(&self, p: &BucketPolicy, now: i64, had: i64) -> (i64, i64) {
        let BucketPolicy { cap, per, .. } = *p;
        let elapsed = (now - self.e).max(0);
        let mut tokens = elapsed / per;
        let mut frac = elapsed - tokens * per;
        // Refill is capped by the holdings as they stood while it accrued (this node's included):
        // a token spent late in the interval must not buy refill for the time it was still held.
        let old_room = (cap - self.cur - self.prev - had).max(0);
        if tokens >= old_room {
            tokens = old_room;
            frac = 0;
        }
        (tokens, frac)
    }

    /// Applies the claim `[kept, returned, wanted]` to the refilled bucket (`tokens`, `frac`)
    /// against what this node held (`had`): what it returns goes back, capped at capacity
    /// minus everything still held; what it keeps beyond `had` must be claimed again; then
    /// the grant. Records the node's new holding in `cur` and the bucket's new empty time.
    fn take(
        &mut self,
        p: &BucketPolicy,
        now: i64,
        had: i64,
        (mut tokens, mut frac): (i64, i64),
        claim: [i64; 3],
    ) -> Taken {
        let [kept, ret, want] = claim;
        let kfree = kept.min(had);
        let rok = ret.min(had - kfree);
        tokens += rok;
        let room = (p.cap - self.cur - self.prev - kfree).max(0);
        if tokens >= room {
            tokens = room;
            frac = 0;
        }
        let extra = (kept - kfree).min(tokens);
        tokens -= extra;
        let revoked = kept - kfree - extra;
        let granted = want.min(tokens);
        tokens -= granted;
        let held = kfree + extra + granted;
        self.cur += held;
        self.e = now - tokens * p.per - frac;
        Taken {
            tokens,
            frac,
            granted,
            revoked,
            held,
        }
    }

    /// The key's expiry need in ms: it lives until it is indistinguishable from a fresh one,
    /// its bucket full again, counting the holdings as spent when their count ends (prev's at
    /// the end of epoch `ep`, cur's at the end of the next), as the next claim will.
    fn full_at_ms(&self, p: &BucketPolicy, ep: i64) -> i64 {
        let ends = [(ep + 1, self.cur + self.prev), (ep + 2, self.cur)];
        let full_us = ends
            .iter()
            .filter(|&&(_, held)| held > 0)
            .map(|&(end, held)| end * p.lease * 1000 + held * p.per)
            .fold(self.e + p.tau, i64::max);
        let mut need = ceil_div(full_us, 1000);
        if self.cur + self.prev > 0 {
            need = need.max((ep + 2) * p.lease);
        }
        need
    }

    /// Writes this node's record (`own`, at index `rec` if it had one) and moves the stored
    /// epoch to `own.epoch`. Only records that count are kept: a node that holds nothing has
    /// none, and the records whose lease ran out go when the epoch moves. Between two moves
    /// every record is of the stored epoch or the one before, so there is nothing else to drop
    /// (the script, which drops them whenever it writes the value anew, drops the same ones).
    fn write_record(&mut self, rec: Option<usize>, own: Holding) {
        let ep = own.epoch;
        let moved = self.ep != ep;
        self.ep = ep;
        match rec {
            Some(i) if own.amount > 0 => self.nodes[i] = own,
            Some(i) => {
                self.nodes.swap_remove(i);
            }
            None if own.amount > 0 => self.nodes.push(own),
            None => {}
        }
        if moved {
            self.nodes.retain(|n| n.epoch >= ep - 1);
        }
    }
}

/// The reply to a token-bucket claim that took `t` from the bucket.
fn bucket_grant(p: &BucketPolicy, t: &Taken, state_lost: bool) -> Grant {
    let next_us = if t.tokens == 0 { p.per - t.frac } else { 0 };
    let reset_us = (p.cap - t.tokens) * p.per - t.frac;
    Grant {
        granted: t.granted as u64,
        remaining: t.tokens as u64,
        ms_to_next_token: ceil_div(next_us, 1000) as u64,
        ms_to_reset: ceil_div(reset_us, 1000) as u64,
        window: 0,
        revoked: t.revoked as u64,
        state_lost,
        stale: false,
    }
}

/// A token-bucket claim: `[kept, returned, wanted, seq]` (see `lua/token_bucket.lua`, which
/// this follows step for step).
pub(super) fn token_bucket(node: NodeId, now: i64, l: &Limits, old: Option<(Bucket, i64)>, claim: [i64; 4]) -> Applied {
    let [kept, ret, want, seq] = claim;
    let now_ms = now.div_euclid(1000);
    let p = BucketPolicy::of(l);
    let ep0 = now_ms.div_euclid(p.lease);
    let is_new = old.is_none();
    let (mut b, old_expiry) = old.unwrap_or_else(|| (Bucket::fresh(now, &p, ep0), 0));
    let rec = b.nodes.iter().position(|n| n.node == node);
    let own = rec.map(|i| b.nodes[i]);
    // A claim not newer than the last one applied from this node changes nothing.
    if own.is_some_and(|h| seq <= h.seq) {
        let stale = Grant {
            stale: true,
            ..Grant::default()
        };
        let entry = Entry {
            state: State::Bucket(b),
            expires_ms: old_expiry,
        };
        return (Ok(stale), Some(entry));
    }
    let ep = b.roll_epochs(&p, ep0);
    let had = b.release(own, ep);
    let refilled = b.refill(&p, now, had);
    let taken = b.take(&p, now, had, refilled, [kept, ret, want]);
    let grant = bucket_grant(&p, &taken, kept > had);
    // Full, and so holding nothing (the tokens never exceed the capacity the holdings leave):
    // the key is a fresh one, and is not kept.
    if taken.tokens >= p.cap {
        return (Ok(grant), None);
    }
    let need = b.full_at_ms(&p, ep);
    let refresh = is_new || b.x < need;
    if refresh {
        let head = (need - now_ms).max(1000);
        b.x = need + head;
    }
    let own = Holding {
        node,
        epoch: ep,
        amount: taken.held,
        seq,
    };
    b.write_record(rec, own);
    let expires_ms = if refresh { b.x } else { old_expiry };
    (
        Ok(grant),
        Some(Entry {
            state: State::Bucket(b),
            expires_ms,
        }),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 100 tokens at 100 a second (10 ms each, the whole bucket in 1 s), leases of 300 ms.
    fn policy() -> BucketPolicy {
        let l = Limits::token_bucket(100, 100, Duration::from_secs(1), Duration::from_millis(300)).unwrap();
        BucketPolicy::of(&l)
    }
    /// Epoch 1000 runs from 300,000 ms to 300,300 ms.
    const EP: i64 = 1000;

    fn need(e: i64, cur: i64, prev: i64) -> i64 {
        let b = Bucket {
            e,
            ep: EP,
            cur,
            prev,
            x: 0,
            nodes: Vec::new(),
        };
        b.full_at_ms(&policy(), EP)
    }

    #[test]
    fn a_key_is_needed_until_its_bucket_is_full_with_every_holding_counted_as_spent_at_its_end() {
        // Nothing held: until the bucket is full (rounded up to the millisecond), however soon.
        assert_eq!(need(299_000_001, 0, 0), 300_001);
        assert_eq!(need(300_500_000, 0, 0), 301_500);
        // The previous epoch's holding counts until the end of this one (300,300 ms) and then
        // takes its refill (40 x 10 ms); the key is kept at least until the end of the next
        // epoch (300,600 ms) while anything is held.
        assert_eq!(need(299_000_000, 0, 40), 300_700);
        assert_eq!(need(299_000_000, 0, 10), 300_600);
        // This epoch's holding counts until the end of the next one (300,600 ms), the previous
        // one's until the end of this one, both with their refill.
        assert_eq!(need(299_000_000, 10, 5), 300_700);
        assert_eq!(need(299_000_000, 10, 30), 300_700);
        assert_eq!(need(299_000_000, 10, 31), 300_710);
        // A bucket that is full later than every holding's end decides.
        assert_eq!(need(300_000_000, 10, 5), 301_000);
    }
}
