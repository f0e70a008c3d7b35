//! The state every service of one layer shares: the configuration, the resolvers and the
//! counters.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ::http::request::Parts;

use super::policy_header::PolicyHeaders;
use super::Verified;
use arc_swap::{ArcSwap, Guard};

use crate::config::{LiveConfig, Rules};
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
    /// The rules in force with their header text, and the configuration generation they
    /// are of.
    snapshot: ArcSwap<Snapshot>,
}

/// The rules in force and their header text, read together with one load per request.
pub(super) struct Snapshot {
    /// The configuration's generation when the rules were read (they are of that generation
    /// or newer).
    generation: u64,
    pub(super) rules: Arc<Rules>,
    pub(super) text: PolicyHeaders,
}

impl Snapshot {
    /// The rules in force in `live`, with their header text.
    fn of(live: &LiveConfig) -> Snapshot {
        // The generation first: the rules read after it are of it or newer, so a snapshot is
        // never taken for newer than it is.
        let generation = live.generation();
        let rules = live.rules();
        Snapshot {
            generation,
            text: PolicyHeaders::new(&rules),
            rules,
        }
    }
}

impl Shared {
    /// The state of a layer over `live`.
    pub(super) fn new(
        live: LiveConfig,
        tier: Option<TierResolver>,
        user: Option<UserResolver>,
        api_key: Option<ApiKeyValidator>,
    ) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::of(&live)),
            live,
            tier,
            user,
            api_key,
            counters: Counters::default(),
            logged_tiers: RwLock::new(HashSet::new()),
        }
    }

    /// The rules in force with their header text: the snapshot, made again after a reload.
    #[inline]
    pub(super) fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        let seen = self.snapshot.load();
        if seen.generation == self.live.generation() {
            return seen;
        }
        self.refresh(seen)
    }

    #[cold]
    #[inline(never)]
    fn refresh(&self, seen: Guard<Arc<Snapshot>>) -> Guard<Arc<Snapshot>> {
        let fresh = Arc::new(Snapshot::of(&self.live));
        // A request that read an older generation does not replace a newer snapshot.
        if seen.generation < fresh.generation {
            self.snapshot.compare_and_swap(&seen, Arc::clone(&fresh));
        }
        Guard::from_inner(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_snapshot_follows_reloads_with_the_text_of_its_own_rules() {
        let live = LiveConfig::new(Config::from_json(r#"{"tiers": {"free": {"points": 5, "duration": 60}}}"#).unwrap())
            .unwrap();
        let shared = Shared::new(live.clone(), None, None, None);
        let before = shared.snapshot();
        assert!(Arc::ptr_eq(&before.rules, &live.rules()));
        live.replace_json(r#"{"tiers": {"free": {"points": 7, "duration": 60}}}"#)
            .unwrap();
        let after = shared.snapshot();
        assert!(
            Arc::ptr_eq(&after.rules, &live.rules()),
            "a reload is seen by the next request"
        );
        let free = |s: &Snapshot| {
            let v = s.text.value(false, s.rules.tiers.get("free"), None).unwrap();
            v.to_str().unwrap().to_owned()
        };
        assert_eq!(free(&after), r#""user:free";q=7;w=60"#);
        // The request that began before the reload keeps its rules and their text.
        assert_eq!(free(&before), r#""user:free";q=5;w=60"#);
        assert!(
            Arc::ptr_eq(&shared.snapshot(), &shared.snapshot()),
            "made once per generation"
        );
    }
}
