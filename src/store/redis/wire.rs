//! The wire format of the claim scripts: the scripts themselves ([`Scripts`]), the keys and
//! arguments of one call ([`ClaimCall`]), and the decoding of their replies. Shared by the
//! single-server and the cluster stores, which differ only in how they send a call.

use std::borrow::Cow;

use redis::{Script, Value};

use super::error::reply_error;

use crate::store::{
    clamped, Claim, ClaimOutcome, ErrorClass, Grant, Heartbeat, KeyError, Limits, NodeId, StoreAlgorithm, StoreError,
    MAX_KEYS_PER_CALL, MAX_STORE_NUMBER,
};

const TOKEN_BUCKET_LUA: &str = concat!(
    include_str!("../../../lua/claims_prelude.lua"),
    include_str!("../../../lua/token_bucket.lua")
);
const FIXED_WINDOW_LUA: &str = concat!(
    include_str!("../../../lua/claims_prelude.lua"),
    include_str!("../../../lua/fixed_window.lua")
);
const SLIDING_WINDOW_LUA: &str = concat!(
    include_str!("../../../lua/claims_prelude.lua"),
    include_str!("../../../lua/sliding_window.lua")
);
const REGISTRY_LUA: &str = include_str!("../../../lua/registry.lua");

/// Bytes per key in a script reply: status byte and six doubles.
const REPLY_WIDTH: usize = 49;

/// Bytes per key in the claim argument: policy index (u16), kept, returned and wanted (u32,
/// since they are clamped to the capacity), then the claim's sequence number (token bucket) or
/// window id (window algorithms), as an f64 (exact below 2^53). Little-endian.
const CLAIM_WIDTH: usize = 22;

// The policy index of a claim is at most the number of claims in a call, and the counts are
// clamped to the capacity. (The scripts also unpack up to twice as many values as there are
// keys, and Lua's stack takes at most 8000.)
const _: () = assert!(MAX_KEYS_PER_CALL <= 3999 && crate::consts::MAX_CAPACITY <= u32::MAX as u64);

/// The four scripts, with their hashes.
pub(super) struct Scripts {
    pub(super) token_bucket: Script,
    pub(super) fixed_window: Script,
    pub(super) sliding_window: Script,
    pub(super) registry: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let [token_bucket, fixed_window, sliding_window, registry] = Self::sources().map(Script::new);
        Scripts {
            token_bucket,
            fixed_window,
            sliding_window,
            registry,
        }
    }

    pub(super) fn claim(&self, algorithm: StoreAlgorithm) -> &Script {
        match algorithm {
            StoreAlgorithm::TokenBucket => &self.token_bucket,
            StoreAlgorithm::FixedWindow => &self.fixed_window,
            StoreAlgorithm::SlidingWindow => &self.sliding_window,
        }
    }

    /// Every script with its source, for `SCRIPT LOAD`.
    pub(super) fn sources() -> [&'static str; 4] {
        [TOKEN_BUCKET_LUA, FIXED_WINDOW_LUA, SLIDING_WINDOW_LUA, REGISTRY_LUA]
    }
}

/// The keys and arguments of one claim script call: claims (indices into a batch) that share
/// an algorithm and, on a cluster, a hash slot.
pub(super) struct ClaimCall<'a> {
    pub(super) keys: Vec<&'a [u8]>,
    pub(super) args: Vec<Vec<u8>>,
}

impl<'a> ClaimCall<'a> {
    pub(super) fn new(
        node: NodeId,
        time_arg: &str,
        algorithm: StoreAlgorithm,
        claims: &'a [Claim],
        idx: &[usize],
    ) -> Self {
        let mut policies: Vec<Limits> = Vec::new();
        let mut pidx = Vec::with_capacity(idx.len());
        for &i in idx {
            let l = claims[i].limits;
            let p = match policies.iter().position(|q| *q == l) {
                Some(p) => p,
                None => {
                    policies.push(l);
                    policies.len() - 1
                }
            };
            pidx.push(p + 1);
        }
        // The scripts read every key with one MGET up front, which is only right if no key
        // repeats (a later claim on a key must see what an earlier one wrote).
        let repeats = {
            let mut seen = std::collections::HashSet::with_capacity_and_hasher(idx.len(), ahash::RandomState::new());
            !idx.iter().all(|&i| seen.insert(claims[i].key.as_bytes()))
        };
        let num = |n: u64| n.to_string().into_bytes();
        let mut args = vec![
            node.to_le_bytes().to_vec(),
            time_arg.as_bytes().to_vec(),
            if repeats { b"1".to_vec() } else { b"0".to_vec() },
            num(policies.len() as u64),
        ];
        for l in &policies {
            args.push(num(l.capacity()));
            args.push(num(l.period_us()));
            match algorithm {
                StoreAlgorithm::TokenBucket => args.push(num(l.lease_ms())),
                StoreAlgorithm::FixedWindow => {}
                StoreAlgorithm::SlidingWindow => args.push(num(l.tick_us())),
            }
        }
        // Per-key numbers travel as one binary argument: parsing string arguments per key
        // costs the server more than the rest of the script.
        let mut blob = Vec::with_capacity(idx.len() * CLAIM_WIDTH);
        let mut keys = Vec::with_capacity(idx.len());
        for (&i, &p) in idx.iter().zip(&pidx) {
            let c = &claims[i];
            let (kept, ret, want, window, seq) = clamped(c);
            keys.push(c.key.as_bytes());
            // p <= MAX_KEYS_PER_CALL; kept, ret and want <= capacity <= u32::MAX.
            blob.extend_from_slice(&(p as u16).to_le_bytes());
            for v in [kept, ret, want] {
                blob.extend_from_slice(&(v as u32).to_le_bytes());
            }
            // Windows keep no per-node state: their claims need no sequence number.
            let last = match algorithm {
                StoreAlgorithm::TokenBucket => seq,
                StoreAlgorithm::FixedWindow | StoreAlgorithm::SlidingWindow => window,
            };
            blob.extend_from_slice(&(last as f64).to_le_bytes());
        }
        args.push(blob);
        ClaimCall { keys, args }
    }
}
/// A reply value as a non-negative integer, if it is one.
pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A reply value as text, for messages and addresses.
pub(super) fn as_text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::ServerError(e) => format!("{} {}", e.code(), e.details().unwrap_or_default()),
        other => format!("{other:?}"),
    }
}

/// Decodes a script reply for `n` keys; never panics, whatever the shape.
pub(super) fn decode_reply(reply: Value, n: usize) -> Result<Vec<ClaimOutcome>, StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(reply_error(&e)),
        other => {
            return Err(StoreError::new(
                ErrorClass::Protocol,
                format!("unexpected script reply: {other:?}"),
            ))
        }
    };
    let bad = |what: String| StoreError::new(ErrorClass::Protocol, what);
    // The per-key results: one string, or a list of strings to be joined.
    let blob: Cow<'_, [u8]> = match items.first() {
        Some(Value::BulkString(b)) => Cow::Borrowed(b),
        Some(Value::Array(parts)) => {
            let mut blob = Vec::with_capacity(n * REPLY_WIDTH);
            for part in parts {
                match part {
                    Value::BulkString(b) => blob.extend_from_slice(b),
                    other => return Err(bad(format!("script reply has a result part {other:?}"))),
                }
            }
            Cow::Owned(blob)
        }
        other => return Err(bad(format!("script reply for {n} keys starts with {other:?}"))),
    };
    if blob.len() != n * REPLY_WIDTH {
        return Err(bad(format!(
            "script reply for {n} keys has {} bytes of results",
            blob.len()
        )));
    }
    let mut out: Vec<ClaimOutcome> = blob.chunks_exact(REPLY_WIDTH).map(decode_one).collect();
    let rest = &items[1..];
    if rest.len() % 2 != 0 {
        return Err(bad(format!(
            "script reply has an odd error list of {} values",
            rest.len()
        )));
    }
    for pair in rest.chunks_exact(2) {
        let i = as_u64(&pair[0])
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| (1..=n).contains(&i));
        let Some(i) = i else {
            return Err(bad(format!("script reply names key {:?}", pair[0])));
        };
        let msg = as_text(&pair[1]);
        out[i - 1] = Err(if msg.starts_with("WRONGTYPE") {
            KeyError::WrongType(msg)
        } else if msg.starts_with("CORRUPT") {
            KeyError::Corrupt
        } else {
            KeyError::Other(msg)
        });
    }
    Ok(out)
}

/// Decodes the registry script's reply.
pub(super) fn decode_heartbeat(v: &Value) -> Result<Heartbeat, StoreError> {
    let bad = || StoreError::new(ErrorClass::Protocol, format!("unexpected heartbeat reply: {v:?}"));
    match v {
        Value::Array(items) if items.len() == 2 => Ok(Heartbeat {
            live_nodes: as_u64(&items[0]).ok_or_else(bad)?,
            server: ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(as_text(&items[1])),
        }),
        _ => Err(bad()),
    }
}

/// A reply number: a double holding a non-negative integer below 2^53.
fn number(b: &[u8]) -> Option<u64> {
    let v = f64::from_le_bytes(b.try_into().ok()?);
    (v >= 0.0 && v <= MAX_STORE_NUMBER as f64 && v.fract() == 0.0).then_some(v as u64)
}

fn decode_one(b: &[u8]) -> ClaimOutcome {
    match b[0] {
        status @ (0 | 2 | 3) => {
            let mut f = [0u64; 6];
            for (slot, chunk) in f.iter_mut().zip(b[1..].chunks_exact(8)) {
                *slot = number(chunk).ok_or_else(|| KeyError::Other(format!("bad reply value {chunk:?}")))?;
            }
            Ok(Grant {
                granted: f[0],
                remaining: f[1],
                ms_to_next_token: f[2],
                ms_to_reset: f[3],
                window: f[4],
                revoked: f[5],
                state_lost: status == 2,
                stale: status == 3,
            })
        }
        // Failed: the message follows in the error list (a missing one leaves this).
        1 => Err(KeyError::Other("failed without a message".into())),
        s => Err(KeyError::Other(format!("bad reply status {s}"))),
    }
}

/// Decodes a claim script's reply given as RESP bytes for `n` keys: the number of outcomes, or
/// the error; `None` when the bytes are not RESP. For the fuzz target; not part of the API.
#[doc(hidden)]
pub fn decode_reply_resp(resp: &[u8], n: usize) -> Option<Result<usize, StoreError>> {
    let value = redis::parse_redis_value(resp).ok()?;
    Some(decode_reply(value, n).map(|outcomes| outcomes.len()))
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::BulkString),
            "[A-Z]{0,10}".prop_map(Value::SimpleString),
            Just(Value::Okay),
            any::<f64>().prop_map(Value::Double),
            any::<bool>().prop_map(Value::Boolean),
            (0i64..3).prop_map(Value::Int),
        ];
        leaf.prop_recursive(3, 64, 16, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..16).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    fn entry(status: u8, vals: [f64; 6]) -> Vec<u8> {
        let mut b = vec![status];
        for v in vals {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    proptest! {
        #[test]
        fn decoding_never_panics(v in arb_value(), n in 0usize..3) {
            let _ = decode_reply(v, n);
        }

        #[test]
        fn decoding_arbitrary_blobs_never_panics(b in proptest::collection::vec(any::<u8>(), 0..120), errs in proptest::collection::vec(arb_value(), 0..4)) {
            let n = b.len() / REPLY_WIDTH;
            let mut items = vec![Value::BulkString(b)];
            items.extend(errs);
            let _ = decode_reply(Value::Array(items), n);
        }

        #[test]
        fn well_formed_replies_decode(vals in proptest::collection::vec(0u64..1 << 53, 6)) {
            let f: Vec<f64> = vals.iter().map(|&v| v as f64).collect();
            let blob = entry(0, [f[0], f[1], f[2], f[3], f[4], f[5]]);
            let out = decode_reply(Value::Array(vec![Value::BulkString(blob)]), 1).unwrap();
            let g = out[0].clone().unwrap();
            prop_assert_eq!(g.granted, vals[0]);
            prop_assert_eq!(g.window, vals[4]);
            prop_assert_eq!(g.revoked, vals[5]);
        }
    }

    #[test]
    fn per_key_errors_and_bad_shapes() {
        let mut blob = entry(1, [0.0; 6]);
        blob.extend(entry(0, [5.0, 4.0, 0.0, 9.0, 0.0, 0.0]));
        blob.extend(entry(0, [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
        blob.extend(entry(0, [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]));
        blob.extend(entry(0, [f64::NAN, 0.0, 0.0, 0.0, 0.0, 0.0]));
        let wt = Value::BulkString(b"WRONGTYPE Operation against a key".to_vec());
        let reply = Value::Array(vec![Value::BulkString(blob.clone()), Value::Int(1), wt.clone()]);
        let out = decode_reply(reply, 5).unwrap();
        assert!(matches!(out[0], Err(KeyError::WrongType(_))));
        assert_eq!(out[1].as_ref().unwrap().granted, 5);
        assert!(out[2].is_err() && out[3].is_err() && out[4].is_err());
        // Wrong length, key index out of range, odd error list, other shapes.
        assert_eq!(
            decode_reply(Value::Array(vec![Value::BulkString(blob.clone())]), 4)
                .unwrap_err()
                .class(),
            ErrorClass::Protocol
        );
        let bad_index = Value::Array(vec![Value::BulkString(blob.clone()), Value::Int(6), wt.clone()]);
        assert_eq!(decode_reply(bad_index, 5).unwrap_err().class(), ErrorClass::Protocol);
        let odd = Value::Array(vec![Value::BulkString(blob), Value::Int(1)]);
        assert_eq!(decode_reply(odd, 5).unwrap_err().class(), ErrorClass::Protocol);
        assert_eq!(decode_reply(Value::Nil, 0).unwrap_err().class(), ErrorClass::Protocol);
        assert_eq!(
            decode_reply(Value::Array(vec![]), 0).unwrap_err().class(),
            ErrorClass::Protocol
        );
    }

    #[test]
    fn results_may_come_in_parts() {
        let (a, b) = (
            entry(0, [1.0, 2.0, 0.0, 3.0, 0.0, 0.0]),
            entry(2, [0.0, 5.0, 0.0, 7.0, 9.0, 1.0]),
        );
        let parts = |p: Vec<Vec<u8>>| Value::Array(vec![Value::Array(p.into_iter().map(Value::BulkString).collect())]);
        let out = decode_reply(parts(vec![a.clone(), b.clone()]), 2).unwrap();
        let whole = decode_reply(
            Value::Array(vec![Value::BulkString([a.clone(), b.clone()].concat())]),
            2,
        )
        .unwrap();
        assert_eq!(out, whole);
        assert_eq!(out[0].as_ref().unwrap().granted, 1);
        assert!(out[1].as_ref().unwrap().state_lost);
        // A part may split a key's result; the lengths must add up; parts are strings.
        let mut joined = [a.clone(), b.clone()].concat();
        let tail = joined.split_off(30);
        assert_eq!(decode_reply(parts(vec![joined, tail]), 2).unwrap(), whole);
        assert_eq!(
            decode_reply(parts(vec![a.clone()]), 2).unwrap_err().class(),
            ErrorClass::Protocol
        );
        let odd = Value::Array(vec![Value::Array(vec![Value::BulkString(a), Value::Int(1)])]);
        assert_eq!(decode_reply(odd, 1).unwrap_err().class(), ErrorClass::Protocol);
        assert_eq!(decode_reply(parts(vec![]), 0).unwrap(), vec![]);
    }
}
