//! The rules in force, swapped at run time: replacing them, reloading their file, and the
//! thread that watches it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::rules::BuildSettings;
use super::{Config, ConfigError, Rules};
use crate::{Clock, Node};

struct LiveInner {
    current: ArcSwap<Rules>,
    path: Option<PathBuf>,
    settings: BuildSettings,
    reload: Mutex<()>,
    generation: AtomicU64,
    last_error: Mutex<Option<ConfigError>>,
}

/// The rules in force, swappable at run time. Cheap to clone (an `Arc`); every clone sees the
/// same rules.
///
/// ```
/// use tollgate::config::{Config, LiveConfig};
///
/// let live = LiveConfig::new(Config::seed()).unwrap();
/// let before = live.rules().tier_limiter("free").unwrap().clone();
/// assert!(before.check("u:alice").is_allowed());
///
/// // A new premium limit: `free` did not change, so its limiter (and alice's state) is kept.
/// live.replace_json(r#"{"tiers": {"free": {"points": 100, "duration": 60},
///                                 "premium": {"points": 5000, "duration": 60}}}"#).unwrap();
/// let after = live.rules().tier_limiter("free").unwrap().clone();
/// assert_eq!(after.peek("u:alice", 1).unwrap().remaining(), 98);
///
/// // A bad document is rejected; the rules in force stay.
/// let err = live.replace_json(r#"{"tiers": {"free": {"points": 0, "duration": 60}}}"#).unwrap_err();
/// assert_eq!(err.to_string(), "tiers.free.points: must be > 0 (got 0)");
/// assert_eq!(live.rules().config().tiers["premium"].points(), 5000);
/// ```
#[derive(Clone)]
pub struct LiveConfig {
    inner: Arc<LiveInner>,
}

impl fmt::Debug for LiveConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveConfig")
            .field("path", &self.inner.path)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// Builds a [`LiveConfig`].
#[derive(Default)]
pub struct LiveConfigBuilder {
    config: Option<Config>,
    path: Option<PathBuf>,
    settings: BuildSettings,
}

impl LiveConfigBuilder {
    /// The configuration to start from (otherwise the file is read).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The file that [`LiveConfig::reload`] and [`LiveConfig::watch`] read.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The clock of every limiter (default [`Clock::cached`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.settings.clock = Some(clock);
        self
    }

    /// Distributed mode: every limiter shares its limit through this node.
    pub fn node(mut self, node: &Node) -> Self {
        self.settings.node = Some(node.clone());
        self
    }

    /// Reads the file when no configuration was given, and builds the limiters.
    pub fn build(self) -> Result<LiveConfig, ConfigError> {
        let config = match (self.config, &self.path) {
            (Some(c), _) => c,
            (None, Some(p)) => Config::from_file(p)?,
            (None, None) => return Err(ConfigError::one("", "no configuration and no file given")),
        };
        let rules = Rules::build(config, &self.settings, None)?;
        Ok(LiveConfig {
            inner: Arc::new(LiveInner {
                current: ArcSwap::from_pointee(rules),
                path: self.path,
                settings: self.settings,
                reload: Mutex::new(()),
                generation: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        })
    }
}

impl LiveConfig {
    /// Starts building.
    pub fn builder() -> LiveConfigBuilder {
        LiveConfigBuilder::default()
    }

    /// Local mode rules from a configuration, no file.
    pub fn new(config: Config) -> Result<LiveConfig, ConfigError> {
        Self::builder().config(config).build()
    }

    /// Local mode rules from a file, which [`reload`](Self::reload) re-reads.
    pub fn open(path: impl Into<PathBuf>) -> Result<LiveConfig, ConfigError> {
        Self::builder().file(path).build()
    }

    /// The rules in force (a snapshot: a reload does not change it).
    pub fn rules(&self) -> Arc<Rules> {
        self.inner.current.load_full()
    }

    /// How many times new rules were installed.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The last rejected reload, if any reload failed since the last success.
    pub fn last_error(&self) -> Option<ConfigError> {
        self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a new configuration. Limiters whose name and policy did not change are kept
    /// (with their keys' state); the others start fresh. On error nothing changes.
    pub fn replace(&self, config: Config) -> Result<(), ConfigError> {
        let _guard = self.inner.reload.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.inner.current.load_full();
        let result = Rules::build(config, &self.inner.settings, Some(&old)).map(|rules| {
            self.inner.current.store(Arc::new(rules));
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
        });
        *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = result.as_ref().err().cloned();
        result
    }

    /// [`replace`](Self::replace) with a JSON document.
    pub fn replace_json(&self, json: &str) -> Result<(), ConfigError> {
        match Config::from_json(json) {
            Ok(c) => self.replace(c),
            Err(e) => {
                *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Re-reads the file given at build time. A file that cannot be read, parsed or validated
    /// is rejected and the rules in force keep serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.inner.path else {
            return Err(ConfigError::one(
                "",
                "no file to reload: build with LiveConfigBuilder::file",
            ));
        };
        let result = match std::fs::read_to_string(path) {
            Ok(text) => self.replace_json(&text),
            Err(e) => {
                let e = ConfigError::one("", format!("cannot read {}: {e}", path.display()));
                *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Err(e)
            }
        };
        // One line per reload: the file is re-read only when it changed.
        match &result {
            Ok(()) => tracing::info!(file = %path.display(), "tollgate: rate limit configuration reloaded"),
            Err(e) => tracing::warn!(
                file = %path.display(),
                error = %e,
                "tollgate: rate limit configuration rejected; the rules in force keep serving"
            ),
        }
        result
    }

    /// Polls the file every `interval` on a background thread and reloads it when its
    /// modification time or length changes. Failed reloads keep the rules in force (see
    /// [`last_error`](Self::last_error)). The thread stops when the returned [`Watcher`] is
    /// dropped, or when every clone of this `LiveConfig` is.
    pub fn watch(&self, interval: Duration) -> Result<Watcher, ConfigError> {
        let Some(path) = self.inner.path.clone() else {
            return Err(ConfigError::one(
                "",
                "no file to watch: build with LiveConfigBuilder::file",
            ));
        };
        let weak: Weak<LiveInner> = Arc::downgrade(&self.inner);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        let mut last = stamp(&path);
        let thread = std::thread::Builder::new()
            .name("tollgate-config".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    let Some(inner) = weak.upgrade() else { return };
                    let now = stamp(&path);
                    if now.is_some() && now != last {
                        last = now;
                        let _ = LiveConfig { inner }.reload();
                    }
                }
            })
            .map_err(|e| ConfigError::one("", format!("cannot start the watcher thread: {e}")))?;
        Ok(Watcher {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Stops the file watcher of [`LiveConfig::watch`] when dropped.
#[derive(Debug)]
pub struct Watcher {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
