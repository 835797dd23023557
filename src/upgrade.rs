//! Taking over from a previous process (`--upgrade`, after `SIGQUIT` to
//! it): which process that was, and when it has gone.
//!
//! The previous process drains its streams for up to its grace period, and
//! without a fleet this process cannot see them. With `server.after_upgrade:
//! wait` (the default without `cluster`) it therefore admits no upgrade
//! until the previous process has exited, so a deploy never holds twice a
//! limit; plain HTTP is served throughout.

use crate::gateway::Gateway;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How often the previous process is looked for.
const POLL: Duration = Duration::from_millis(200);

/// The pid in a pid file, if it names a live process other than this one.
pub fn previous_pid(pid_file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid != std::process::id() && is_running(pid)).then_some(pid)
}

/// Whether `pid` is a process that has not exited. A zombie (exited, not yet
/// reaped by its parent) has exited.
pub fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain them.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// Watches the previous process and lets admission resume when it exits.
pub struct PreviousWatch(pub Arc<Gateway>);

#[async_trait]
impl BackgroundService for PreviousWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(POLL);
        while let Some(pid) = self.0.previous_process() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            if !is_running(pid) {
                self.0.previous_exited();
                tracing::info!(
                    previous_pid = pid,
                    "previous process exited; admitting upgrades"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_reaped_child_does_not() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!is_running(pid));
    }

    #[test]
    fn a_pid_file_naming_this_process_or_nothing_names_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wsgate.pid");
        assert_eq!(previous_pid(&file), None);
        std::fs::write(&file, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(previous_pid(&file), None);
        std::fs::write(&file, "not a pid\n").unwrap();
        assert_eq!(previous_pid(&file), None);
    }
}
