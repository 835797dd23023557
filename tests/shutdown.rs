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
    let mut gw = gateway(&up).await;
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
        sent.elapsed() >= Duration::from_millis(900),
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
