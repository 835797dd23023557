//! Abuse that must not cost memory or exactness: a flood of distinct client
//! addresses against the tracked-key cap.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::future::join_all;
use std::net::IpAddr;

fn client(n: usize) -> IpAddr {
    IpAddr::from([127, 4, (n / 250) as u8, (n % 250 + 1) as u8])
}

async fn flood(gw: &Wsgate, path: &str, n: usize) -> Vec<Attempt> {
    let url = gw.url(path);
    join_all((0..n).map(|i| connect_from(client(i), &url, &[]))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_clients_stops_at_the_tracking_cap() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "limits:\n  max_tracked_keys: 40\nroutes:\n  - name: relay\n    prefix: /\n{}    limits:\n      per_client: 3\n",
        upstream_yaml(up.addr)
    ))
    .await;

    let held = flood(&gw, "/ws", 150).await;
    assert_eq!(held.iter().filter(|a| a.status() == 101).count(), 40);
    let refusal = held.iter().find_map(|a| match a {
        Attempt::Refused { body, .. } => Some(body.clone()),
        Attempt::Open(_) => None,
    });
    assert_eq!(
        refusal.as_deref(),
        Some("wsgate: tracking_full limit reached on route relay\n")
    );

    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_tracked_keys",
            &[("route", "relay"), ("scope", "client")]
        ),
        40.0
    );
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("scope", "tracking_full"), ("dry_run", "false")]
        ),
        110.0
    );
    // Known clients still get their own limit.
    let again = connect_from(client(0), &gw.url("/ws"), &[]).await;
    assert_eq!(again.status(), 101);

    // Keys are forgotten as their streams end, making room again.
    drop((held, again));
    gw.wait_active("relay", 0).await;
    let m = gw.metrics().await;
    assert_eq!(m.get("wsgate_tracked_keys", &[("route", "relay")]), 0.0);
    let later = flood(&gw, "/ws", 60).await;
    assert_eq!(later.iter().filter(|a| a.status() == 101).count(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_untracked_keeps_serving_past_the_cap() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "limits:\n  max_tracked_keys: 20\n  when_tracking_full: admit_untracked\n\
         routes:\n  - name: relay\n    prefix: /\n{}    limits:\n      per_client: 3\n      total: 100\n",
        upstream_yaml(up.addr)
    ))
    .await;
    let held = flood(&gw, "/ws", 60).await;
    assert_eq!(held.iter().filter(|a| a.status() == 101).count(), 60);
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_tracked_keys",
            &[("route", "relay"), ("scope", "client")]
        ),
        20.0
    );
    assert_eq!(
        m.get("wsgate_streams_active", &[("route", "relay")]),
        60.0,
        "the route total still counts all"
    );
    drop(held);
    gw.wait_active("relay", 0).await;
}
