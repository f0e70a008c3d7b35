//! The tiers file parser: never panics; what it accepts builds a live configuration, and what
//! it rejects names the field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{Config, LiveConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_json(text) {
        Ok(config) => {
            // Validation happens once, when the rules are built: either they build, or the
            // error says where.
            if let Err(e) = LiveConfig::builder().config(config).build() {
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
