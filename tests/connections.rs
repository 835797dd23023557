//! What a client connection may cost before it asks for anything (a deadline
//! and a size bound on each request head, a cap on open connections per
//! address), and the hand-over of an upgraded stream to the raw relay,
//! including bytes either side sends right after its head.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const WS_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n\
                          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn route(up: SocketAddr) -> String {
    format!(
        "routes:\n  - name: relay\n    prefix: /\n{}    limits:\n      total: 5\n",
        upstream_yaml(up)
    )
}

/// Waits (bounded) until the server closes `s`; everything it sent first.
async fn closed_by_gateway(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .expect("the gateway closes the connection in time");
    got
}

async fn closed_count(gw: &Wsgate, reason: &str) -> f64 {
    gw.metrics().await.get(
        "wsgate_client_connections_closed_total",
        &[("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_cut_off_at_its_deadline() {
    let up = Upstream::start().await;
    let gw = Wsgate::start_with_server("  head_timeout: 1s\n", &route(up.addr)).await;

    // A slowloris: the head never ends, but a byte arrives every 100 ms, so
    // no single read waits long. Dripping it all would take a minute.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let drip = async {
        for _ in 0..600 {
            if s.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the gateway kept reading a head for a minute");
    };
    tokio::time::timeout(Duration::from_secs(30), drip)
        .await
        .expect("the connection is closed while the head drips");

    eventually(Duration::from_secs(10), "the timeout counted", || async {
        (closed_count(&gw, "head_timeout").await == 1.0).then_some(())
    })
    .await;

    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    closed_by_gateway(&mut silent, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "the silent one counted",
        || async { (closed_count(&gw, "head_timeout").await == 2.0).then_some(()) },
    )
    .await;
    assert_eq!(up.accepts(), 0, "the upstream never saw either");

    // A head that completes in time is served, and on a kept-alive
    // connection the next head gets its own deadline.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    s.write_all(b"GET /plain HTTP/1.1\r\nHo").await.unwrap();
    closed_by_gateway(&mut s, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "all three timeouts counted",
        || async { (closed_count(&gw, "head_timeout").await == 3.0).then_some(()) },
    )
    .await;

    // Nothing leaked: the route's one slot is free, and upgrades work.
    let ws = connect(&gw.url("/ws")).await;
    assert_eq!(ws.status(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_its_size_bound_is_refused_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = Wsgate::start_with_server("  max_head_bytes: 2048\n", &route(up.addr)).await;

    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let padding = "a".repeat(4000);
    let head = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}X-Pad: {padding}\r\n\r\n");
    // The gateway may close before all of it is written.
    let _ = s.write_all(head.as_bytes()).await;
    let answer = closed_by_gateway(&mut s, Duration::from_secs(10)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 101"));
    eventually(Duration::from_secs(10), "the refusal counted", || async {
        (closed_count(&gw, "head_too_large").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(up.accepts(), 0);

    // A head just under the bound is an ordinary upgrade.
    let padding = "a".repeat(1500);
    let ws = connect_from(
        "127.0.0.1".parse().unwrap(),
        &gw.url("/ws"),
        &[("x-pad", padding.as_str())],
    )
    .await;
    assert_eq!(ws.status(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_capped_per_client_before_any_request() {
    let up = Upstream::start().await;
    // Idle connections must outlive the test's steps.
    let gw = Wsgate::start_with_server(
        "  head_timeout: 60s\n",
        &format!(
            "limits:\n  connections_per_client: 3\nclient_ip:\n  exempt: [127.0.0.9/32]\n{}",
            route(up.addr)
        ),
    )
    .await;

    // The harness's readiness probes came from this address too; they hold
    // no slot once the gateway has seen them close.
    wait_connections(&gw, 0, "no connection open").await;

    // Three idle connections from one address take its three slots; the
    // fourth is closed at once, before anything is read from it.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    wait_connections(&gw, 3, "three connections open").await;
    let mut fourth = TcpStream::connect(gw.addr).await.unwrap();
    let answer = closed_by_gateway(&mut fourth, Duration::from_secs(10)).await;
    assert!(answer.is_empty());
    assert_eq!(closed_count(&gw, "client_connections").await, 1.0);

    // Other addresses are not affected, and exempt ones are not capped.
    let other = connect_from("127.0.0.2".parse().unwrap(), &gw.url("/ws"), &[]).await;
    assert_eq!(other.status(), 101);
    let exempt = connect_from("127.0.0.9".parse().unwrap(), &gw.url("/ws"), &[]).await;
    assert_eq!(exempt.status(), 101);

    // Closing one gives its slot back: an upgrade from the address works,
    // and holds its slot for as long as the stream lives.
    idle.pop();
    wait_connections(&gw, 4, "a slot is free again").await;
    let ws = connect_from("127.0.0.1".parse().unwrap(), &gw.url("/ws"), &[]).await;
    assert_eq!(ws.status(), 101);
    let mut extra = TcpStream::connect(gw.addr).await.unwrap();
    closed_by_gateway(&mut extra, Duration::from_secs(10)).await;

    drop((ws, idle, other, exempt));
    wait_connections(&gw, 0, "every connection closed").await;
    gw.wait_active("relay", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_after_either_head_are_relayed() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&route(up.addr)).await;

    // The upstream's first message leaves in the same packet as its 101.
    let mut ws = connect(&gw.url("/greet")).await.into_open();
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the greeting in time")
        .expect("a message")
        .unwrap();
    assert_eq!(first, Message::text("hello"));
    echo(&mut ws, "after the greeting").await;

    // The client's first frame leaves in the same packet as its upgrade
    // request, before the 101 (an eager client): it is echoed all the same.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut request = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n").into_bytes();
    let mask = [1u8, 2, 3, 4];
    request.extend_from_slice(&[0x81, 0x80 | 2]);
    request.extend_from_slice(&mask);
    request.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    s.write_all(&request).await.unwrap();

    let mut got = Vec::new();
    let expected_tail = [0x81, 0x02, b'h', b'i'];
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while !got.ends_with(&expected_tail) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the echo: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the echo in time");
    assert!(got.starts_with(b"HTTP/1.1 101"));

    drop((s, ws));
    gw.wait_active("relay", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_answer_before_the_101_is_skipped() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&route(up.addr)).await;

    let mut ws = connect(&gw.url("/early")).await.into_open();
    echo(&mut ws, "after early hints").await;
    drop(ws);
    gw.wait_active("relay", 0).await;
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_each_see_every_series() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&route(up.addr)).await;
    let url = gw.url("/ws");
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| connect(&url)))
        .await
        .into_iter()
        .map(|a| a.into_open())
        .collect();

    // Scrapes racing each other: none may catch another between clearing
    // the per-route gauges and setting them again.
    let scrapes = (0..6).map(|_| async {
        let mut seen = Vec::new();
        for _ in 0..100 {
            let m = gw.metrics().await;
            seen.push(m.get("wsgate_streams_active", &[("route", "relay")]));
        }
        seen
    });
    let seen: Vec<f64> = futures_util::future::join_all(scrapes)
        .await
        .into_iter()
        .flatten()
        .collect();
    let wrong = seen.iter().filter(|v| **v != 3.0).count();
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} scrapes missed the live count",
        seen.len()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_trickled_forever_is_cut_off() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&route(up.addr)).await;

    // Each byte comes well within the read timeout; the whole answer would
    // take days. wsgate ends it (30 s in all) and gives everything back.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!("GET /trickle HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let answer = closed_by_gateway(&mut s, Duration::from_secs(60)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    drop(s);
    gw.wait_active("relay", 0).await;
    wait_connections(&gw, 0, "the connection is gone").await;
}

/// Waits until the gateway counts `n` open client connections.
async fn wait_connections(gw: &Wsgate, n: u32, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        let open = gw.metrics().await.get("wsgate_client_connections", &[]);
        (open == f64::from(n)).then_some(())
    })
    .await;
}

/// The keepalive timer of the TCP socket from `local` to `remote`, as
/// `/proc/net/tcp` shows it: the time left, or `None` if none is running.
fn keepalive_timer(local: SocketAddr, remote: SocketAddr) -> Option<Duration> {
    // Addresses as the kernel prints them: the IPv4 address as a native
    // (here little-endian) word, then the port, both in hex.
    let spell = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => unreachable!("the tests listen on IPv4 loopback"),
    };
    let (local, remote) = (spell(local), spell(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table.lines().skip(1).find(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f[1] == local && f[2] == remote
    });
    let line = line.unwrap_or_else(|| panic!("no socket from {local} to {remote}"));
    // `tr:when`: timer 2 is the keepalive timer, `when` in clock ticks.
    let timer = line.split_whitespace().nth(5).unwrap();
    let (kind, when) = timer.split_once(':').unwrap();
    let ticks = u64::from_str_radix(when, 16).unwrap();
    (kind == "02").then(|| Duration::from_millis(ticks * 10))
}

/// The client end of a plain WebSocket.
fn local_addr(ws: &Ws) -> SocketAddr {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().unwrap(),
        _ => unreachable!("a plain WebSocket"),
    }
}

/// wsgate's upstream socket of the one stream open to `up`.
fn upstream_socket(up: SocketAddr) -> SocketAddr {
    let spell = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes([127, 0, 0, 1]),
        up.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut from = table.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Established (state 01) connections to the upstream.
        (f[2] == spell && f[3] == "01").then(|| f[1].to_string())
    });
    let local = from.next().expect("a connection to the upstream");
    assert!(from.next().is_none(), "one connection to the upstream");
    let (ip, port) = local.split_once(':').unwrap();
    let ip = u32::from_str_radix(ip, 16).unwrap().to_le_bytes();
    SocketAddr::from((ip, u16::from_str_radix(port, 16).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sockets_of_a_stream_keep_alive_as_configured() {
    let up = Upstream::start().await;
    let gw = Wsgate::start_with_server(
        "  tcp_keepalive: {idle: 30s, interval: 5s, count: 3}\n",
        &route(up.addr),
    )
    .await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "idle from here on").await;
    let client = local_addr(&ws);
    let within = |t: Option<Duration>, max: u64| {
        t.is_some_and(|t| t > Duration::from_secs(max - 15) && t <= Duration::from_secs(max))
    };
    eventually(
        Duration::from_secs(10),
        "keepalive on both sockets",
        || async {
            let accepted = keepalive_timer(gw.addr, client);
            let upstream = keepalive_timer(upstream_socket(up.addr), up.addr);
            (within(accepted, 30) && within(upstream, 30)).then_some(())
        },
    )
    .await;

    // A new process takes the listening socket over with its own settings:
    // the accepted sockets inherit those. It sets them as its proxy service
    // starts, just after the log line the hand-over waits for, so a
    // connection made in between may still carry the old ones.
    let config = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, config.replace("idle: 30s", "idle: 120s")).unwrap();
    let successor = gw.upgrade().await;
    let mut last = None;
    let inherited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let fresh = TcpStream::connect(gw.addr).await.unwrap();
            last = keepalive_timer(gw.addr, fresh.local_addr().unwrap());
            if within(last, 120) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(inherited.is_ok(), "{last:?}; {}", successor.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keepalive_neither_socket_of_a_stream_has_a_timer() {
    let up = Upstream::start().await;
    let gw = Wsgate::start_with_server("  tcp_keepalive: false\n", &route(up.addr)).await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "idle from here on").await;

    let upstream = upstream_socket(up.addr);
    assert_eq!(keepalive_timer(gw.addr, local_addr(&ws)), None);
    assert_eq!(keepalive_timer(upstream, up.addr), None);
}
