//! Live reload: on SIGHUP and when the config file changes, the file is
//! parsed and validated whole, then put in force for new streams. A file with
//! any problem, or one that changes what only a restart can change, is
//! refused whole and the running config stays.
//!
//! Live streams are never touched: they keep the snapshot they started with,
//! and their permits keep their slots counted under their route's name.

use crate::config::{self, Config, ConfigError};
use crate::gateway::{unix_now, ApplyError, Gateway};
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the file must be quiet before a change is read: editors and
/// ConfigMap updates write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Set by a SIGHUP that arrives before the reload service listens.
static EARLY_SIGHUP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Catches SIGHUP from now on. Call first thing at startup: until the reload
/// service listens (after the config is loaded and the listeners are up), a
/// SIGHUP would otherwise end the process, and a `systemctl reload` right
/// after a start would stop wsgate for good. One that arrives early is acted
/// on when the service starts.
pub fn catch_early_sighup() -> std::io::Result<()> {
    let flag = EARLY_SIGHUP.get_or_init(Arc::default).clone();
    signal_hook::flag::register(signal_hook::consts::SIGHUP, flag).map(|_| ())
}

/// What asked for a reload, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file_change",
        }
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{file}: {field}: changed; restart wsgate to apply it (the running config stays)")]
    NeedsRestart { file: String, field: &'static str },
    #[error("{0}")]
    Apply(#[from] ApplyError),
}

pub struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
    /// What the last read found. Also serialises reloads.
    last_read: Mutex<LastRead>,
}

/// What the last read of the config file found, so that directory events
/// that change nothing for the config do nothing: any file written beside
/// it raises them too.
#[derive(Default)]
struct LastRead {
    /// A hash of the last text read, so an unchanged file is not reloaded.
    digest: Option<u64>,
    /// Why the file could not be read, when it could not: the same failure
    /// again is not reported again until a read succeeds.
    unreadable: Option<String>,
}

impl Reloader {
    pub fn new(path: PathBuf, gateway: Arc<Gateway>) -> Self {
        let seen = LastRead {
            digest: config::read(&path).ok().map(|t| digest(&t)),
            unreadable: None,
        };
        Self {
            path,
            gateway,
            last_read: Mutex::new(seen),
        }
    }

    /// Reads, validates and applies the file. With `FileChange`, a file
    /// whose text did not change since the last read is left alone, and a
    /// file that cannot be read for the reason already reported is not
    /// reported again (a signal always reports).
    pub fn reload(&self, trigger: Trigger) -> Result<(), ReloadError> {
        let mut last = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
        let text = config::read(&self.path);
        let unreadable = text.as_ref().err().map(|e| e.to_string());
        let repeated = unreadable.is_some() && unreadable == last.unreadable;
        if unreadable.is_some() {
            // The refusal is what was last reported: the file coming back
            // as it was must be applied and reported too.
            last.digest = None;
        }
        last.unreadable = unreadable;
        if trigger == Trigger::FileChange {
            match &text {
                Ok(text) if last.digest == Some(digest(text)) => return Ok(()),
                Err(_) if repeated => return Ok(()),
                _ => {}
            }
        }

        let result = text.map_err(ReloadError::from).and_then(|text| {
            last.digest = Some(digest(&text));
            let new = config::parse(&self.path, &text)?;
            let running = self.gateway.snapshot();
            if let Some(field) = needs_restart(&running.config, &new) {
                return Err(ReloadError::NeedsRestart {
                    file: self.path.display().to_string(),
                    field,
                });
            }
            let routes = new.routes.len();
            self.gateway.apply(new)?;
            Ok(routes)
        });

        // The log line comes before the counters: whoever sees a reload
        // counted can find its line.
        let metrics = &self.gateway.metrics;
        match result {
            Ok(routes) => {
                tracing::info!(config = %self.path.display(), trigger = trigger.as_str(), routes, "config reloaded");
                metrics.reloads.with_label_values(&["success"]).inc();
                metrics.last_reload_success.set(1);
                metrics.last_reload_success_time.set(unix_now());
                Ok(())
            }
            Err(e) => {
                let problems = e.to_string().replace('\n', "; ");
                tracing::error!(config = %self.path.display(), trigger = trigger.as_str(), %problems, "config reload refused");
                metrics.reloads.with_label_values(&["failure"]).inc();
                metrics.last_reload_success.set(0);
                Err(e)
            }
        }
    }
}

fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The first field that differs between `old` and `new` and cannot change
/// without a restart: the sockets and process settings Pingora set up at start.
fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    if old.listeners != new.listeners {
        return Some("listen");
    }
    if old.admin != new.admin {
        return Some("admin.address");
    }
    // The store, the instance's name in it and the lease are fixed while
    // the instance holds slots there; the whole section restarts together.
    if old.cluster != new.cluster {
        return Some("cluster");
    }
    let (o, n) = (&old.server, &new.server);
    let fields = [
        (o.threads != n.threads, "server.threads"),
        (o.work_stealing != n.work_stealing, "server.work_stealing"),
        (o.pid_file != n.pid_file, "server.pid_file"),
        (o.upgrade_sock != n.upgrade_sock, "server.upgrade_sock"),
        (o.grace_period != n.grace_period, "server.grace_period"),
        (o.tcp_keepalive != n.tcp_keepalive, "server.tcp_keepalive"),
        (o.after_upgrade != n.after_upgrade, "server.after_upgrade"),
    ];
    fields
        .into_iter()
        .find_map(|(changed, field)| changed.then_some(field))
}

/// The background service that waits for SIGHUP and file changes.
pub struct ReloadService {
    reloader: Arc<Reloader>,
}

impl ReloadService {
    pub fn new(reloader: Arc<Reloader>) -> Self {
        Self { reloader }
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload by file change only");
                None
            }
        };
        let (tx, mut changes) = mpsc::channel::<()>(16);
        let _watcher = match watch(self.reloader.path.as_path(), tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(config = %self.reloader.path.display(), error = %e, "cannot watch the config file; reload by SIGHUP only");
                None
            }
        };
        // A change written after startup read the file but before the watch
        // began raised no event; the digest check makes this a no-op
        // otherwise.
        let early = EARLY_SIGHUP
            .get()
            .is_some_and(|f| f.swap(false, Ordering::AcqRel));
        let trigger = if early {
            Trigger::Signal
        } else {
            Trigger::FileChange
        };
        let reloader = self.reloader.clone();
        let _ = tokio::task::spawn_blocking(move || reloader.reload(trigger)).await;

        loop {
            let trigger = tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { hup.as_mut()?.recv().await } => Trigger::Signal,
                Some(()) = changes.recv() => {
                    // Let a burst of events settle before reading the file.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changes.recv()).await {}
                    Trigger::FileChange
                }
            };
            let reloader = self.reloader.clone();
            // Reading and validating touch the disk: keep them off the runtime.
            let _ = tokio::task::spawn_blocking(move || reloader.reload(trigger)).await;
        }
    }
}

/// Watches the directory holding the config file (and, for a symlink, the
/// directory of its target): editors replace files by rename, and Kubernetes
/// swaps a ConfigMap by re-pointing a symlink, neither of which a watch on
/// the file itself would follow.
fn watch(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already holds a pending reload.
            let _ = tx.try_send(());
        }
    })?;
    let mut dirs = vec![parent(path)];
    if let Ok(target) = std::fs::canonicalize(path) {
        dirs.push(parent(&target));
    }
    dirs.dedup();
    for dir in dirs {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(server: &str) -> Config {
        let src = format!(
            "listen:\n  - address: 127.0.0.1:8080\n{server}routes:\n  - name: r\n    prefix: /\n\
             \x20   upstream:\n      url: http://127.0.0.1:8787\n"
        );
        crate::config::parse(Path::new("t.yaml"), &src).unwrap()
    }

    #[test]
    fn a_change_of_a_startup_setting_names_it() {
        let running = config("");
        for (server, field) in [
            ("server:\n  threads: 4\n", Some("server.threads")),
            (
                "server:\n  work_stealing: true\n",
                Some("server.work_stealing"),
            ),
            ("server:\n  grace_period: 5s\n", Some("server.grace_period")),
            (
                "server:\n  after_upgrade: admit\n",
                Some("server.after_upgrade"),
            ),
            // Read per connection: applied by a reload.
            ("server:\n  head_timeout: 3s\n", None),
            ("server:\n  max_head_bytes: 4096\n", None),
        ] {
            assert_eq!(needs_restart(&running, &config(server)), field, "{server}");
        }
        assert!(
            !config("server:\n  own_handshake: false\n")
                .server
                .own_handshake
        );
    }
}
