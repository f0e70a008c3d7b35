//! The Redis key encoder: injective, and user bytes never reach the hash tag.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::store::KeyEncoder;

fuzz_target!(|data: (Vec<u8>, Vec<u8>, bool)| {
    let (a, b, secret) = data;
    let enc = KeyEncoder::default();
    let (ka, kb) = if secret {
        (enc.encode_secret("ns", &a), enc.encode_secret("ns", &b))
    } else {
        (enc.encode("ns", &a), enc.encode("ns", &b))
    };
    if !secret && a.len() <= 256 && b.len() <= 256 {
        assert_eq!(ka.as_bytes() == kb.as_bytes(), a == b, "encoding is not injective");
    }
    for k in [&ka, &kb] {
        let bytes = k.as_bytes();
        // The first `{...}` is the library's tag: nothing from the identifier is inside it.
        let open = bytes.iter().position(|&c| c == b'{').expect("a hash tag");
        let close = open + bytes[open..].iter().position(|&c| c == b'}').expect("a closed tag");
        assert!(bytes[open + 1..close].iter().all(|c| c.is_ascii_alphanumeric()));
        assert!(bytes.len() <= 600, "key of {} bytes", bytes.len());
    }
});
