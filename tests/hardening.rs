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
    // Known clients still get their own limit. Which forty got in is up to
    // the race, so ask again from one that did.
    let known = held.iter().position(|a| a.status() == 101).unwrap();
    let again = connect_from(client(known), &gw.url("/ws"), &[]).await;
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

/// Sends a raw request and returns the status code (0 if the connection
/// closed without an answer), keeping the connection open alongside.
async fn raw(addr: std::net::SocketAddr, req: &str) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, s)
}

const WS_HEADERS: &str =
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_upgrades_are_refused_or_counted_never_tunnelled_uncounted() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{}    limits:\n      per_key: 1\n",
        upstream_yaml(up.addr)
    ))
    .await;

    // Other methods and bodies: 400 from wsgate, nothing reaches the upstream.
    let accepts = up.accepts();
    for req in [
        format!("POST /room/a/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}Content-Length: 0\r\n\r\n"),
        format!("GET /room/a/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}Content-Length: 5\r\n\r\nhello"),
        format!("GET /room/a/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ] {
        let (status, _) = raw(gw.addr, &req).await;
        assert_eq!(status, 400, "{req}");
    }
    assert_eq!(up.accepts(), accepts);

    // HTTP/1.0 cannot upgrade: it is plain HTTP, and a 101 from the upstream
    // is not tunnelled.
    let (status, _s) = raw(
        gw.addr,
        &format!("GET /room/a/ws HTTP/1.0\r\nHost: t\r\n{WS_HEADERS}\r\n"),
    )
    .await;
    assert_ne!(status, 101);
    gw.wait_active("rooms", 0).await;
    // Nor was the upstream asked for one.
    let head = up.heads().last().unwrap().to_ascii_lowercase();
    assert!(!head.contains("upgrade: websocket"), "{head}");

    // Odd spellings of the same room are one key: the second is refused.
    let (first, held) = raw(
        gw.addr,
        &format!("GET //room/./b/../a/ws?x=1 HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
    )
    .await;
    assert_eq!(first, 101);
    for spelling in ["/room/%61/ws", "/room/a/./ws", "http://t/room/a/ws"] {
        let (status, _) = raw(
            gw.addr,
            &format!("GET {spelling} HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
        )
        .await;
        assert_eq!(status, 503, "{spelling}");
    }
    // The upstream was sent the path as it was counted.
    let head = up
        .heads()
        .into_iter()
        .rev()
        .find(|h| h.contains("room"))
        .unwrap();
    assert!(head.starts_with("GET /room/a/ws?x=1 HTTP/1.1"), "{head}");

    // A missing Sec-WebSocket-Key is the upstream's to judge; it is counted
    // like any other upgrade while it lasts.
    let (status, held_b) = raw(
        gw.addr,
        "GET /room/b/ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert_eq!(status, 101, "the test upstream accepts any key");
    gw.wait_active("rooms", 2).await;

    drop((held, held_b));
    gw.wait_active("rooms", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backslashes_and_escaped_room_names_are_one_key() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: registry\n    prefix: /registry\n{u}    limits:\n      total: 1\n\
         \n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{u}    limits:\n      per_key: 1\n\
         \n  - name: http\n    prefix: /\n{u}",
        u = upstream_yaml(up.addr)
    ))
    .await;

    // Workers read `\` as `/`: so must wsgate, or these would be counted
    // under another room or route than the one they reach.
    let (first, _a) = raw(
        gw.addr,
        &format!("GET /room/lobby/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
    )
    .await;
    assert_eq!(first, 101);
    let (status, _) = raw(
        gw.addr,
        &format!("GET /room/x\\..\\lobby/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
    )
    .await;
    assert_eq!(status, 503, "a backslash detour to a full room");

    let (first, _b) = raw(
        gw.addr,
        &format!("GET /registry/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
    )
    .await;
    assert_eq!(first, 101);
    for spelling in ["/registry\\ws", "/room/y\\..\\..\\registry\\ws"] {
        let (status, _) = raw(
            gw.addr,
            &format!("GET {spelling} HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
        )
        .await;
        assert_eq!(status, 503, "{spelling} reached the registry uncounted");
    }

    // A room name is counted as the upstream decodes it.
    let (first, _c) = raw(
        gw.addr,
        &format!("GET /room/a!/ws HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
    )
    .await;
    assert_eq!(first, 101);
    for spelling in ["/room/a%21/ws", "/room/%61%21/ws"] {
        let (status, _) = raw(
            gw.addr,
            &format!("GET {spelling} HTTP/1.1\r\nHost: t\r\n{WS_HEADERS}\r\n"),
        )
        .await;
        assert_eq!(status, 503, "{spelling}");
    }
}

/// Damaged request heads, sent raw: wsgate answers or closes each, never
/// panics or leaks a slot, and keeps serving. Deeper runs:
/// `FUZZ_CASES=20000 cargo test --release --test hardening fuzz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_request_heads_never_break_the_gateway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{u}    limits:\n      per_key: 2\n\
         \n  - name: http\n    prefix: /\n{u}",
        u = upstream_yaml(up.addr)
    ))
    .await;

    let good = format!(
        "GET /room/a/ws?x=1 HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 1.2.3.4\r\n{WS_HEADERS}\r\n"
    );
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..cases {
        let mut head = good.clone().into_bytes();
        for _ in 0..1 + next() % 6 {
            let at = (next() as usize) % head.len();
            match next() % 3 {
                0 => head[at] = next() as u8,
                1 => head.insert(at, b"\r\n:/%\\. \x00\x7fa"[(next() % 11) as usize]),
                _ => {
                    head.remove(at);
                }
            }
        }
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let _ = s.write_all(&head).await;
        let mut buf = [0u8; 512];
        // An answer, a close, or (for a head left incomplete) silence.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut buf)).await;
    }

    gw.wait_active("rooms", 0).await;
    let (status, _) = http_get(gw.admin, "/healthz", &[])
        .await
        .expect("admin answers");
    assert_eq!(status, 200);
    let mut ws = connect(&gw.url("/room/after/ws")).await.into_open();
    echo(&mut ws, "still serving").await;
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}
