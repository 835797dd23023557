//! Shutdown: SIGTERM stops accepting, lets live streams run for the grace
//! period, then ends them and exits; SIGINT exits at once.

mod common;

use common::upstream::Upstream;
use common::*;
use std::time::{Duration, Instant};

/// A gateway with the harness's `server.grace_period` of 1 s.
async fn gateway(up: &Upstream) -> Wsgate {
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: relay\n    prefix: /\n{}    limits:\n      total: 10\n",
        upstream_yaml(up.addr)
    ))
    .await;
    assert!(gw.header.contains("grace_period: 1s"));
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_streams_then_exits() {
    let up = Upstream::start().await;
    // A drain long enough that the checks below finish inside it however
    // slowly this machine schedules them.
    let mut gw = Wsgate::start_with_server(
        "  grace_period: 5s\n",
        &format!(
            "routes:\n  - name: relay\n    prefix: /\n{}    limits:\n      total: 10\n",
            upstream_yaml(up.addr)
        ),
    )
    .await;
    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "before").await;

    let sent = Instant::now();
    gw.signal("TERM");

    // New connections stop being accepted...
    eventually(Duration::from_secs(10), "the listener to close", || async {
        tokio::net::TcpStream::connect(gw.addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // ...while the live stream keeps working during the grace period.
    echo(&mut ws, "during the drain").await;

    let status = gw.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}: {}", gw.log());
    assert!(
        sent.elapsed() >= Duration::from_millis(4900),
        "exited before the grace period"
    );
    closed_by_peer(&mut ws, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "the upstream side closed",
        || async { (up.open() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_at_once() {
    let up = Upstream::start().await;
    let mut gw = gateway(&up).await;
    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "before").await;

    gw.signal("INT");
    gw.wait_exit(Duration::from_secs(10)).await;
    closed_by_peer(&mut ws, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "the upstream side closed",
        || async { (up.open() == 0).then_some(()) },
    )
    .await;
}

/// Kills the child when dropped, whatever the test did.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_at_startup_is_a_reload_not_an_exit() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("wsgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen:\n  - address: 127.0.0.1:{port}\nadmin:\n  address: 127.0.0.1:{admin}\n\
             server:\n  pid_file: {d}/wsgate.pid\n  upgrade_sock: {d}/upgrade.sock\n\
             routes:\n  - name: relay\n    prefix: /\n{}",
            upstream_yaml(up.addr),
            d = dir.path().display()
        ),
    )
    .unwrap();

    // The signal goes out as soon as the process catches SIGHUP at all,
    // long before it has read its config or bound a socket (as a
    // `systemctl reload` right after a start would).
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let hup = || {
        std::process::Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap()
    };
    let status = format!("/proc/{}/status", child.0.id());
    eventually(Duration::from_secs(10), "SIGHUP is caught", || async {
        let text = std::fs::read_to_string(&status).ok()?;
        let caught = text.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
        let mask = u64::from_str_radix(caught.trim(), 16).ok()?;
        (mask & 1 == 1).then_some(())
    })
    .await;
    assert!(hup().success());

    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let reloads = || async {
        let (_, body) = http_get(admin_addr, "/metrics", &[]).await?;
        let m = Metrics::parse(&body);
        Some(m.get("wsgate_config_reloads_total", &[("result", "success")]))
    };
    eventually(
        Duration::from_secs(20),
        "the early SIGHUP reloaded",
        || async { reloads().await.filter(|n| *n >= 1.0) },
    )
    .await;

    // Later ones are reloads too, and it serves throughout.
    assert!(hup().success());
    eventually(Duration::from_secs(10), "a second reload", || async {
        reloads().await.filter(|n| *n >= 2.0)
    })
    .await;
    let mut ws = connect(&format!("ws://127.0.0.1:{port}/ws"))
        .await
        .into_open();
    echo(&mut ws, "still here").await;
}

/// One route with room for three streams, under a drain long enough for a
/// binary upgrade to happen inside it.
async fn draining_gateway(up: &Upstream, after_upgrade: &str) -> Wsgate {
    Wsgate::start_with_server(
        &format!("  grace_period: 60s\n{after_upgrade}"),
        &format!(
            "routes:\n  - name: relay\n    prefix: /\n{}    limits:\n      total: 3\n",
            upstream_yaml(up.addr)
        ),
    )
    .await
}

/// Rewrites the drain of a [`draining_gateway`]'s config file, for the
/// process that next reads it (one started with `--upgrade`).
fn set_grace(gw: &Wsgate, grace: &str) {
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let text = text.replace("grace_period: 60s", &format!("grace_period: {grace}"));
    std::fs::write(&gw.config_path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_binary_upgrade_upgrades_wait_for_the_previous_process() {
    let up = Upstream::start().await;
    let mut old = draining_gateway(&up, "").await;
    let mut held = connect(&old.url("/ws")).await.into_open();

    let new = old.upgrade().await;
    assert!(
        new.log().contains("upgrades wait until it exits"),
        "{}",
        new.log()
    );

    // The new process cannot see the old one's stream, so it admits none
    // while the old one drains; plain HTTP is served all along.
    let refused = eventually(
        Duration::from_secs(20),
        "the new process answers",
        || async {
            match connect(&old.url("/ws")).await {
                refused @ Attempt::Refused { .. } => Some(refused),
                // Accepted by the old process before it stopped listening.
                Attempt::Open(_) => None,
            }
        },
    )
    .await;
    let Attempt::Refused { status, body, .. } = refused else {
        unreachable!()
    };
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "wsgate: previous_process limit reached on route relay\n"
    );
    let (status, _) = http_get(old.addr, "/plain", &[]).await.expect("an answer");
    assert_eq!(status, 200);
    echo(&mut held, "still draining").await;

    // Once the old process has gone, its streams with it, upgrades resume.
    old.signal("KILL");
    old.wait_exit(Duration::from_secs(10)).await;
    let ws = eventually(Duration::from_secs(20), "upgrades resume", || async {
        let a = connect(&old.url("/ws")).await;
        (a.status() == 101).then_some(a)
    })
    .await;
    drop(ws);
    assert!(new
        .log()
        .contains("previous processes exited; admitting upgrades"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitting_at_once_after_an_upgrade_can_hold_twice_a_limit() {
    let up = Upstream::start().await;
    let old = draining_gateway(&up, "  after_upgrade: admit\n").await;
    let url = old.url("/ws");
    let held: Vec<Ws> = futures_util::future::join_all((0..3).map(|_| connect(&url)))
        .await
        .into_iter()
        .map(Attempt::into_open)
        .collect();
    assert_eq!(connect(&url).await.status(), 503);

    // What `after_upgrade: admit` trades for availability, measured: the new
    // process counts from zero while the old one still holds its three.
    // (Until the old one stops accepting, it answers some attempts: 503.)
    let _new = old.upgrade().await;
    let mut admitted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while admitted.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the new process admitted {}",
            admitted.len()
        );
        let a = connect(&url).await;
        if a.status() == 101 {
            admitted.push(a);
        }
    }
    eventually(
        Duration::from_secs(10),
        "six streams live upstream",
        || async { (up.open() == 6).then_some(()) },
    )
    .await;
    assert_eq!(connect(&url).await.status(), 503, "both are full now");
    drop((held, admitted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgrades_in_a_row_wait_for_the_first_process_too() {
    let up = Upstream::start().await;
    let mut first = draining_gateway(&up, "").await;
    let url = first.url("/ws");
    let held: Vec<Ws> = futures_util::future::join_all((0..3).map(|_| connect(&url)))
        .await
        .into_iter()
        .map(Attempt::into_open)
        .collect();

    // The second process drains for 1 s only, so it exits while the first
    // still holds its three streams; the third must still wait.
    set_grace(&first, "1s");
    let second = first.upgrade().await;
    assert!(second.log().contains("upgrades wait until it exits"));
    let third = second.upgrade(&first).await;
    let second_pid = second.pid();
    eventually(
        Duration::from_secs(20),
        "the second process exits",
        || async {
            let stat =
                std::fs::read_to_string(format!("/proc/{second_pid}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z")).then_some(())
        },
    )
    .await;

    // Only the third listens now, and the first still drains: refused.
    for _ in 0..5 {
        let a = connect(&url).await;
        assert_eq!(a.status(), 503, "admitted while the first process drains");
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    let ws = eventually(Duration::from_secs(20), "upgrades resume", || async {
        let a = connect(&url).await;
        (a.status() == 101).then_some(a)
    })
    .await;
    drop((ws, held, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pid_file_upgrades_wait_out_a_whole_drain() {
    let up = Upstream::start().await;
    let old = draining_gateway(&up, "").await;
    // A drain for the test: the wait is it plus 5 s, long enough that the
    // refusal is seen inside it however slowly the new process starts.
    set_grace(&old, "8s");
    let url = old.url("/ws");
    let held = connect(&url).await.into_open();
    std::fs::remove_file(old.dir.path().join("wsgate.pid")).unwrap();

    let new = old.upgrade().await;
    assert!(
        new.log().contains("upgrades wait out a whole drain"),
        "{}",
        new.log()
    );
    let exited = "previous processes exited; admitting upgrades";
    let refused = eventually(
        Duration::from_secs(20),
        "a refusal from the new process",
        || async {
            match connect(&url).await {
                Attempt::Refused { body, .. } => Some(body),
                Attempt::Open(_) => None,
            }
        },
    )
    .await;
    assert_eq!(
        refused,
        "wsgate: previous_process limit reached on route relay\n"
    );
    assert!(
        !new.log().contains(exited),
        "admitted before the drain could end"
    );

    eventually(Duration::from_secs(30), "the wait ends", || async {
        new.log().contains(exited).then_some(())
    })
    .await;
    assert_eq!(connect(&url).await.status(), 101);
    drop(held);
}
