//! Taking over from previous processes (`--upgrade`, after `SIGQUIT` to
//! the running one): which wsgate processes may still be draining streams,
//! and when they have all gone.
//!
//! A process that took over cannot see the streams the ones before it
//! drain. With `server.after_upgrade: wait` (the default without `cluster`)
//! it admits no upgrade until they have exited, so a deploy never holds
//! twice a limit; plain HTTP is served throughout.
//!
//! The processes to wait for are the one in the pid file and those it was
//! itself still waiting for, which it listed in a file beside the pid file
//! (`<pid_file>` with the extension `draining`); so two upgrades in a row
//! wait for the first process too. Only live processes running a binary of
//! the same name count, so a stale pid file naming another program is not
//! waited on. When no previous wsgate can be found (the pid file was
//! removed), the wait is the drain any predecessor can take: this config's
//! grace period, plus the five seconds Pingora keeps accepting after
//! `SIGQUIT`.

use crate::gateway::Gateway;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the previous processes are looked for.
const POLL: Duration = Duration::from_millis(200);

/// How long Pingora's old process keeps accepting after `SIGQUIT`.
pub const HANDOVER_ACCEPT: Duration = Duration::from_secs(5);

/// The file beside the pid file that lists the processes still waited for.
pub fn draining_file(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("draining")
}

/// The live wsgate processes named by the pid file and its draining file,
/// other than this one.
pub fn previous_pids(pid_file: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = [pid_file.to_path_buf(), draining_file(pid_file)]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|pid| *pid != std::process::id() && is_wsgate(*pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Lists `pids` in the draining file, for a later upgrade to wait for too.
pub fn record_draining(pid_file: &Path, pids: &[u32]) -> std::io::Result<()> {
    let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(draining_file(pid_file), text)
}

/// Whether `pid` is a live process running a binary named as this one is
/// (a new version may live at a new path, or replace the old file).
fn is_wsgate(pid: u32) -> bool {
    let name = |exe: PathBuf| {
        let name = exe.file_name()?.to_string_lossy().into_owned();
        Some(name.trim_end_matches(" (deleted)").to_string())
    };
    let theirs = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(name);
    let ours = std::env::current_exe().ok().and_then(name);
    is_running(pid) && theirs.is_some() && theirs == ours
}

/// Whether `pid` is a process that has not exited. A zombie (exited, not yet
/// reaped by its parent) has exited.
fn is_running(pid: u32) -> bool {
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

/// Holds upgrades back until every previous process has exited, or, when
/// none could be named, until `deadline`.
pub struct PreviousWatch {
    pub gateway: Arc<Gateway>,
    pub pids: Vec<u32>,
    pub deadline: Option<Instant>,
}

#[async_trait]
impl BackgroundService for PreviousWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut pids = self.pids.clone();
        let mut tick = tokio::time::interval(POLL);
        loop {
            // Checked as at startup, so a pid reused by another program
            // after the wsgate process exited does not hold upgrades back.
            pids.retain(|pid| is_wsgate(*pid));
            let past = self.deadline.is_none_or(|d| Instant::now() >= d);
            if pids.is_empty() && past {
                tracing::info!(previous = ?self.pids, "previous processes exited; admitting upgrades");
                self.gateway.set_awaiting_previous(false);
                return;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
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
    fn only_live_processes_of_this_binary_other_than_this_one_are_previous() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wsgate.pid");
        assert!(previous_pids(&file).is_empty());

        // Another program, this process, garbage: none is waited for.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&file, format!("{}\n", other.id())).unwrap();
        record_draining(&file, &[std::process::id()]).unwrap();
        assert!(previous_pids(&file).is_empty());
        std::fs::write(&file, "not a pid\n").unwrap();
        assert!(previous_pids(&file).is_empty());
        other.kill().unwrap();
        other.wait().unwrap();

        // A process of a binary named as this one is, from either file.
        let exe = std::env::current_exe().unwrap();
        let twin_exe = dir.path().join(exe.file_name().unwrap());
        std::fs::copy(which_sleep(), &twin_exe).unwrap();
        let mut twin = std::process::Command::new(&twin_exe)
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&file, "").unwrap();
        record_draining(&file, &[twin.id()]).unwrap();
        let from_draining = previous_pids(&file);
        std::fs::write(&file, format!("{}\n", twin.id())).unwrap();
        let from_pid_file = previous_pids(&file);
        twin.kill().unwrap();
        twin.wait().unwrap();
        assert_eq!(from_draining, [twin.id()]);
        assert_eq!(from_pid_file, [twin.id()]);
        assert!(previous_pids(&file).is_empty(), "an exited one is not");
    }

    fn which_sleep() -> PathBuf {
        ["/usr/bin/sleep", "/bin/sleep"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("sleep(1)")
    }
}
