//! The state every service of one layer shares: the configuration, the resolvers and the
//! counters.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ::http::request::Parts;

use super::Verified;
use crate::config::LiveConfig;
#[cfg(doc)]
use crate::consts::MAX_LOGGED_UNKNOWN_TIERS;

/// Reads a tier name from a request.
pub type TierResolver = Arc<dyn Fn(&Parts) -> Option<Cow<'static, str>> + Send + Sync>;

/// Reads a user id from a request.
pub type UserResolver = Arc<dyn Fn(&Parts) -> Option<Cow<'static, str>> + Send + Sync>;

/// Decides whether an API key is valid, and whose it is: `None` for a key the application does
/// not know.
pub type ApiKeyValidator = Arc<dyn Fn(&str) -> Option<Verified> + Send + Sync>;

#[derive(Default)]
pub(super) struct Counters {
    pub(super) denied: AtomicU64,
    pub(super) shadow_denied: AtomicU64,
    pub(super) forbidden: AtomicU64,
    pub(super) allow_listed: AtomicU64,
    pub(super) key_errors: AtomicU64,
    pub(super) unverified_keys: AtomicU64,
    pub(super) unknown_tiers: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(super) struct Shared {
    pub(super) live: LiveConfig,
    pub(super) tier: Option<TierResolver>,
    pub(super) user: Option<UserResolver>,
    pub(super) api_key: Option<ApiKeyValidator>,
    pub(super) counters: Counters,
    /// The unknown tier names already logged (at most [`MAX_LOGGED_UNKNOWN_TIERS`]).
    pub(super) logged_tiers: RwLock<HashSet<String>>,
}
