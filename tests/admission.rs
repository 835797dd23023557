//! Admission end to end: exact limits under bursts, refusals answered by
//! wsgate alone, client identity, and metrics that agree with what clients
//! and the upstream saw.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::future::join_all;
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A distinct loopback source address per client number.
fn client(n: usize) -> IpAddr {
    IpAddr::from([127, 1, (n / 250) as u8, (n % 250 + 1) as u8])
}

async fn burst(n: usize, f: impl Fn(usize) -> (IpAddr, String)) -> Vec<Attempt> {
    join_all((0..n).map(|i| {
        let (from, url) = f(i);
        async move { connect_from(from, &url, &[]).await }
    }))
    .await
}

fn opened(attempts: &[Attempt]) -> usize {
    attempts.iter().filter(|a| a.status() == 101).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_admit_exactly_the_limit_round_after_round() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: total\n    prefix: /total\n{u}    limits:\n      total: 40\n\
         \n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{u}    limits:\n      per_key: 15\n\
         \n  - name: perclient\n    prefix: /client\n{u}    limits:\n      per_client: 7\n",
        u = upstream_yaml(up.addr)
    ))
    .await;

    for round in 0..3 {
        let accepts_before = up.accepts();

        let total = burst(300, |i| (client(i), gw.url("/total"))).await;
        assert_eq!(
            opened(&total),
            40,
            "route limit, round {round}\n{}",
            gw.log()
        );

        let room = burst(200, |i| (client(i), gw.url("/room/lobby/ws"))).await;
        assert_eq!(opened(&room), 15, "key limit, round {round}");
        // Another room has its own count.
        let other = connect_from(client(0), &gw.url("/room/other/ws"), &[]).await;
        assert_eq!(other.status(), 101);

        let one = burst(100, |_| (ip("127.0.0.9"), gw.url("/client"))).await;
        assert_eq!(opened(&one), 7, "client limit, round {round}");

        // The upstream saw exactly the admitted streams: no refused upgrade
        // opened a connection to it.
        let admitted = 40 + 15 + 1 + 7;
        assert_eq!(up.upgrades() as i64, (admitted * (round + 1)) as i64);
        assert!(
            up.accepts() - accepts_before <= admitted,
            "refusals reached the upstream"
        );
        eventually(
            Duration::from_secs(10),
            "upstream holds every admitted stream",
            || async { (up.open() == admitted as i64).then_some(()) },
        )
        .await;
        let m = gw.metrics().await;
        assert_eq!(m.get("wsgate_streams_active", &[]), admitted as f64);
        let busiest = |route, scope| {
            m.get(
                "wsgate_streams_busiest",
                &[("route", route), ("scope", scope)],
            )
        };
        assert_eq!(
            busiest("rooms", "key"),
            15.0,
            "the lobby is the busiest room"
        );
        assert_eq!(busiest("perclient", "client"), 7.0);

        drop((total, room, other, one));
        for route in ["total", "rooms", "perclient"] {
            gw.wait_active(route, 0).await;
        }
        eventually(
            Duration::from_secs(10),
            "upstream sockets closed",
            || async { (up.open() == 0).then_some(()) },
        )
        .await;
    }

    let m = gw.metrics().await;
    let rejected = |route, scope| {
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", route), ("scope", scope), ("dry_run", "false")],
        )
    };
    assert_eq!(rejected("total", "route"), 3.0 * 260.0);
    assert_eq!(rejected("rooms", "key"), 3.0 * 185.0);
    assert_eq!(rejected("perclient", "client"), 3.0 * 93.0);
    assert_eq!(
        m.get("wsgate_streams_admitted_total", &[("route", "total")]),
        120.0
    );
    assert_eq!(
        m.get("wsgate_tracked_keys", &[]),
        0.0,
        "keys at zero are forgotten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_answered_by_wsgate_and_never_reaches_the_upstream() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: relay\n    prefix: /relay\n{u}    limits:\n      total: 1\n\
         \n  - name: custom\n    prefix: /custom\n{u}    limits:\n      total: 1\n    reject:\n      status: 429\n      retry_after: 1500ms\n",
        u = upstream_yaml(up.addr)
    ))
    .await;

    let _held = connect(&gw.url("/relay")).await.into_open();
    let accepts = up.accepts();
    let Attempt::Refused {
        status,
        headers,
        body,
    } = connect(&gw.url("/relay")).await
    else {
        panic!("second stream admitted over a limit of 1");
    };
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(headers["connection"].to_ascii_lowercase(), "close");
    assert_eq!(body, "wsgate: route limit reached on route relay\n");
    assert_eq!(
        up.accepts(),
        accepts,
        "the upstream saw a TCP connection for a refused upgrade"
    );

    let _held2 = connect(&gw.url("/custom")).await.into_open();
    let Attempt::Refused {
        status, headers, ..
    } = connect(&gw.url("/custom")).await
    else {
        panic!("admitted over the limit");
    };
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2", "rounded up from 1.5 s");

    // The connection is closed after the refusal, even if the client would
    // keep it alive.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(handshake("/relay", "Upgrade", "websocket").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 503"));

    let pid = std::fs::read_to_string(gw.dir.path().join("wsgate.pid")).unwrap();
    assert_eq!(
        pid.trim(),
        gw.pid().to_string(),
        "the pid file names the process"
    );

    let log = gw.log();
    assert!(
        log.contains("upgrade refused")
            && log.contains("route=relay")
            && log.contains("scope=\"route\""),
        "{log}"
    );
}

fn handshake(path: &str, connection: &str, upgrade: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\nUpgrade: {upgrade}\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends a raw handshake and returns the status line's code, keeping the
/// connection open (the stream) alongside.
async fn raw_upgrade(addr: std::net::SocketAddr, req: &str) -> (u16, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let status = String::from_utf8_lossy(&buf[..n])
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_an_upgrade_is_counted_and_plain_http_never_is() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: relay\n    prefix: /\n{u}    limits:\n      total: 4\n",
        u = upstream_yaml(up.addr)
    ))
    .await;

    let spellings = [
        ("Upgrade", "websocket"),
        ("keep-alive, Upgrade", "WebSocket"),
        ("UPGRADE", "WEBSOCKET"),
        ("upgrade", "h2c, websocket"),
    ];
    let mut held = Vec::new();
    for (connection, upgrade) in spellings {
        let (status, s) = raw_upgrade(gw.addr, &handshake("/ws", connection, upgrade)).await;
        assert_eq!(status, 101, "{connection} / {upgrade}");
        held.push(s);
    }
    gw.wait_active("relay", 4).await;
    let (status, _) = raw_upgrade(gw.addr, &handshake("/ws", "Upgrade", "websocket")).await;
    assert_eq!(status, 503);

    // At the limit, plain requests still pass, and are not counted.
    for _ in 0..20 {
        let (status, body) = http_get(gw.addr, "/plain", &[]).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "plain"));
    }
    // An upgrade to another protocol is proxied as plain HTTP, uncounted.
    let (status, _) = raw_upgrade(
        gw.addr,
        &handshake("/h2c", "Upgrade, HTTP2-Settings", "h2c"),
    )
    .await;
    assert_eq!(status, 200);
    let last = up.heads().last().unwrap().to_ascii_lowercase();
    assert!(
        !last.contains("upgrade: h2c"),
        "the Upgrade header reached the upstream: {last}"
    );
    assert_eq!(
        gw.metrics()
            .await
            .get("wsgate_streams_active", &[("route", "relay")]),
        4.0
    );

    drop(held);
    gw.wait_active("relay", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "client_ip:\n  header: X-Forwarded-For\n  trusted_proxies: [127.0.0.2/32, 10.0.0.0/8]\n  exempt: [192.0.2.0/24]\n\
         routes:\n  - name: relay\n    prefix: /\n{u}    limits:\n      per_client: 2\n      total: 100\n",
        u = upstream_yaml(up.addr)
    ))
    .await;
    let url = gw.url("/ws");

    // An untrusted peer cannot pick its identity: all count as 127.0.0.5.
    let mut held = Vec::new();
    for i in 0..3 {
        let xff = format!("203.0.113.{i}");
        let a = connect_from(ip("127.0.0.5"), &url, &[("x-forwarded-for", &xff)]).await;
        held.push(a);
    }
    assert_eq!(
        held.iter().map(Attempt::status).collect::<Vec<_>>(),
        [101, 101, 503]
    );

    // The trusted proxy's header is read right to left past trusted hops.
    for (xff, want) in [
        ("1.1.1.1, 203.0.113.7, 10.0.0.1", 101),
        ("203.0.113.7", 101),
        ("9.9.9.9, 203.0.113.7", 503),
        ("203.0.113.8, 10.1.1.1", 101),
    ] {
        let a = connect_from(ip("127.0.0.2"), &url, &[("x-forwarded-for", xff)]).await;
        assert_eq!(a.status(), want, "{xff}");
        held.push(a);
    }

    // Exempt clients skip the per-client limit, not the route total.
    for _ in 0..5 {
        let a = connect_from(ip("127.0.0.2"), &url, &[("x-forwarded-for", "192.0.2.10")]).await;
        assert_eq!(a.status(), 101);
        held.push(a);
    }
    let status = gw.status().await;
    let busiest = &status["routes"][0]["busiest_clients"];
    assert!(busiest.to_string().contains("203.0.113.7"), "{busiest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_clients_and_upstream_under_churn() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: churn\n    prefix: /\n{u}    limits:\n      total: 25\n",
        u = upstream_yaml(up.addr)
    ))
    .await;

    let mut held: Vec<Ws> = Vec::new();
    let mut refusals = 0;
    let mut seed = 7u64;
    for step in 0..300 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if seed >> 62 == 0 && !held.is_empty() {
            let i = (seed as usize >> 8) % held.len();
            drop(held.swap_remove(i));
        } else {
            match connect_from(client(step), &gw.url("/ws"), &[]).await {
                Attempt::Open(ws) => held.push(*ws),
                Attempt::Refused { status, .. } => {
                    assert_eq!(status, 503);
                    refusals += 1;
                }
            }
        }
        if step % 50 == 0 {
            let m = gw.metrics().await;
            let active = m.get("wsgate_streams_active", &[("route", "churn")]);
            assert!(
                (0.0..=25.0).contains(&active),
                "gauge out of range: {active}"
            );
        }
    }

    let n = held.len() as i64;
    eventually(
        Duration::from_secs(10),
        "gauge, upstream and clients agree",
        || async {
            let active =
                gw.metrics()
                    .await
                    .get("wsgate_streams_active", &[("route", "churn")]) as i64;
            (active == n && up.open() == n).then_some(())
        },
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", "churn"), ("dry_run", "false")]
        ),
        refusals as f64
    );
    assert!(refusals > 0, "the churn never reached the limit");

    for ws in held.iter_mut() {
        echo(ws, "still here").await;
    }
    drop(held);
    gw.wait_active("churn", 0).await;
}
