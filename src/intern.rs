//! Interned names: strings stored once per process, handed out as `&'static str`.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// Interns a name so decisions can carry it as a `&'static str` (a copy, no reference count
/// on the hot path). Each distinct name is stored once per process.
pub(crate) fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}
