//! The two ways an upgrade enters wsgate. A connection's first request,
//! whole in its first read, is carried by the front door itself; anything
//! else (a head split over writes, an upgrade after a plain request on a
//! kept-alive connection) goes through Pingora. Both must send the upstream
//! the same head, count the stream alike, and pass an upstream's refusal on
//! whole, closing the client's connection right after it.

mod common;

use common::upstream::Upstream;
use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// The ways a head can arrive.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// In one write, as the connection's first request: the front door's.
    Whole,
    /// Its request line first, the rest a moment later: Pingora's.
    Split,
    /// After a plain request on the same connection: Pingora's.
    AfterPlain,
}

const WAYS: [Way; 3] = [Way::Whole, Way::Split, Way::AfterPlain];

fn head(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Kept-Case: Yes\r\n{WS}\r\n")
}

/// Sends the head for `path` the given way; returns the connection.
async fn send(gw: &Wsgate, path: &str, way: Way) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let head = head(path);
    match way {
        Way::Whole => s.write_all(head.as_bytes()).await.unwrap(),
        Way::Split => {
            let (line, rest) = head.split_at(head.find('\n').unwrap() + 1);
            s.write_all(line.as_bytes()).await.unwrap();
            // The stimulus, not a wait for a condition: the rest must come
            // in a later read.
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(rest.as_bytes()).await.unwrap();
        }
        Way::AfterPlain => {
            s.write_all(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let (status, body) = read_answer(&mut s).await;
            assert_eq!((status, body.as_str()), (200, "plain"));
            s.write_all(head.as_bytes()).await.unwrap();
        }
    }
    s
}

/// Reads one answer with a Content-Length body; returns its status and body.
async fn read_answer(s: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                let status = text[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + len].to_string());
            }
        }
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed mid-answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Reads until the connection closes (bounded); returns all it sent.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the connection closed in time")
        .unwrap();
    String::from_utf8_lossy(&got).to_string()
}

/// Reads a 101 head, then echoes one masked text frame through the stream.
async fn upgraded_and_echoes(s: &mut TcpStream) {
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a 101 in time")
            .unwrap();
        assert!(n > 0, "closed before a 101");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");

    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x82];
    frame.extend_from_slice(&mask);
    frame.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    s.write_all(&frame).await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echo))
        .await
        .expect("an echo in time")
        .unwrap();
    assert_eq!(&echo, b"\x81\x02hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_in_sends_the_same_head_and_is_counted_alike() {
    every_way_alike("").await;
}

/// With `own_handshake: false` every way in is Pingora's, and nothing
/// else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_own_handshake_every_way_is_still_alike() {
    every_way_alike("  own_handshake: false\n").await;
}

async fn every_way_alike(server_yaml: &str) {
    let up = Upstream::start().await;
    let gw = Wsgate::start_with_server(server_yaml, &format!(
        "routes:\n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{}    limits:\n      per_key: 1\n  - name: rest\n    prefix: /\n{}",
        upstream_yaml(up.addr),
        upstream_yaml(up.addr)
    ))
    .await;

    let mut held = Vec::new();
    for way in WAYS {
        let mut s = send(&gw, "/room/a/ws?x=1", way).await;
        upgraded_and_echoes(&mut s).await;
        // The room holds one: a second stream to it is refused, whichever
        // way either came in, and a fragment does not make it another room.
        for again in WAYS {
            for path in ["/room/a/ws", "/room/a/ws#x"] {
                let mut t = send(&gw, path, again).await;
                let (status, body) = read_answer(&mut t).await;
                assert_eq!(status, 503, "{way:?} then {again:?} {path}");
                assert_eq!(body, "wsgate: key limit reached on route rooms\n");
            }
        }
        drop(s);
        gw.wait_active("rooms", held.len() as i64).await;

        let mut s = send(&gw, &format!("/room/{way:?}/ws"), way).await;
        upgraded_and_echoes(&mut s).await;
        held.push(s);
    }
    gw.wait_active("rooms", 3).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", "rooms"), ("scope", "key"), ("dry_run", "false")]
        ),
        18.0
    );

    // The upstream saw each upgrade's head byte for byte alike, fields in
    // their order and case.
    let heads: Vec<String> = up
        .heads()
        .into_iter()
        .filter(|h| h.contains("Upgrade"))
        .collect();
    assert_eq!(heads.len(), 6, "{heads:#?}");
    for h in &heads {
        let expected = head("/room/a/ws?x=1");
        let h = h
            .replace("/room/Whole/ws", "/room/a/ws?x=1")
            .replace("/room/Split/ws", "/room/a/ws?x=1")
            .replace("/room/AfterPlain/ws", "/room/a/ws?x=1");
        assert_eq!(h.trim_end(), expected.trim_end());
    }

    drop(held);
    gw.wait_active("rooms", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_is_passed_on_whole_and_the_client_is_let_go() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: ws\n    prefix: /\n{}",
        upstream_yaml(up.addr)
    ))
    .await;

    for way in WAYS {
        // The upstream keeps its connection open after each answer, so only
        // the answer's framing tells wsgate it is over.
        let mut s = send(&gw, "/refuse-chunked", way).await;
        let text = read_to_close(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{way:?}: {text}"
        );
        assert!(
            text.to_ascii_lowercase().contains("x-why: full"),
            "{way:?}: {text}"
        );
        assert!(
            text.ends_with("4\r\nnope\r\n0\r\n\r\n"),
            "{way:?}: {text:?}"
        );

        let mut s = send(&gw, "/refuse-length", way).await;
        let text = read_to_close(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{way:?}: {text}"
        );
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{way:?}: {text}"
        );
        assert!(text.ends_with("\r\n\r\nnope"), "{way:?}: {text:?}");

        // A body that breaks off is cut, never ended as if whole.
        let mut s = send(&gw, "/refuse-broken", way).await;
        let text = read_to_close(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{way:?}: {text}"
        );
        assert!(text.ends_with("4\r\nwiki\r\n"), "{way:?}: {text:?}");

        // A 101 over HTTP/1.0 switches nothing: 502, not a stream that never
        // comes.
        let mut s = send(&gw, "/old-switch", way).await;
        let text = read_to_close(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 502 "), "{way:?}: {text}");
    }

    // A plain request never becomes a tunnel, whatever the upstream
    // answers: one without Upgrade asked for none, and HTTP/1.0 cannot
    // switch (its Upgrade header does not go upstream).
    for req in [
        "GET /switch-always HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        format!("GET /switch-always HTTP/1.0\r\nHost: t\r\n{WS}\r\n"),
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let text = read_to_close(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 502 "), "{req}: {text}");
    }
    let asked = up.heads().last().unwrap().to_ascii_lowercase();
    assert!(!asked.contains("upgrade:"), "{asked}");

    gw.wait_active("ws", 0).await;
    let m = gw.metrics().await;
    let failed = |reason| {
        m.get(
            "wsgate_upstream_upgrade_failures_total",
            &[("route", "ws"), ("reason", reason)],
        )
    };
    assert_eq!(failed("status"), 9.0);
    assert_eq!(failed("closed"), 3.0);
}
