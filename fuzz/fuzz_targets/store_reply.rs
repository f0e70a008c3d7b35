//! The Redis store's decoding of a claim script's reply: whatever the bytes (any RESP value,
//! truncated or malformed records, wrong counts), never a panic; a reply accepted has exactly
//! one outcome per key of the batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::store::decode_reply_resp;

fuzz_target!(|data: (u8, &[u8])| {
    let (keys, resp) = data;
    let n = usize::from(keys);
    match decode_reply_resp(resp, n) {
        None => {}
        Some(Ok(outcomes)) => assert_eq!(outcomes, n, "one outcome per key"),
        Some(Err(_)) => {}
    }
});
