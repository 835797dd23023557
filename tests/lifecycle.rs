//! Every way a stream can end gives its slot back: either side closing or
//! resetting, a client process dying, the upstream refusing or failing the
//! upgrade, and wsgate's own idle and lifetime timers.
//!
//! Each route here has a limit of 1, so after a case a fresh stream on the
//! same route is admitted only if the ended one released its slot.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// How long any awaited outcome may take on a busy machine.
const BOUND: Duration = Duration::from_secs(10);

/// A route with a total limit of 1. `upstream` is its `upstream:` block and
/// `extra` any further route keys, both indented as route fields.
fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    prefix: {prefix}\n{upstream}    limits:\n      total: 1\n{extra}"
    )
}

async fn gateway(routes: &[String]) -> Wsgate {
    Wsgate::start(&format!("routes:\n{}", routes.concat())).await
}

/// Proves `route` holds no slot: its gauge falls to 0 and, the limit being
/// 1, a fresh stream at `path` is admitted, echoes and ends cleanly.
async fn assert_slot_back(gw: &Wsgate, route: &str, path: &str) {
    gw.wait_active(route, 0).await;
    let mut ws = match connect(&gw.url(path)).await {
        Attempt::Open(ws) => *ws,
        Attempt::Refused { status, body, .. } => {
            panic!("route {route} still holds a slot: fresh stream got {status}: {body}")
        }
    };
    echo(&mut ws, "fresh").await;
    close_cleanly(ws).await;
    gw.wait_active(route, 0).await;
}

/// Sends a close frame and reads until the peer's close and EOF.
async fn close_cleanly(mut ws: Ws) {
    ws.close(None).await.expect("close frame sent");
    tokio::time::timeout(BOUND, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .expect("close handshake completes");
}

fn series(m: &Metrics, name: &str, route: &str) -> f64 {
    m.get(name, &[("route", route)])
}

async fn durations_counted(gw: &Wsgate, route: &str) -> f64 {
    series(
        &gw.metrics().await,
        "wsgate_stream_duration_seconds_count",
        route,
    )
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

async fn send_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect to wsgate");
    s.write_all(upgrade_request(path).as_bytes()).await.unwrap();
    s
}

/// Reads an answer's head and no further, and returns its status code.
async fn read_status(s: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(BOUND, async {
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut byte).await.expect("read answer");
            assert!(n > 0, "closed before a full head: {head:?}");
            head.push(byte[0]);
        }
    })
    .await
    .expect("an answer within the bound");
    let head = String::from_utf8_lossy(&head);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Sends an upgrade over a plain socket and reads the answer's head, so the
/// caller keeps the connection exactly as the client left it.
async fn raw_upgrade(addr: SocketAddr, path: &str) -> (u16, TcpStream) {
    let mut s = send_upgrade(addr, path).await;
    (read_status(&mut s).await, s)
}

/// Waits until wsgate closes `s`, discarding whatever it still sends.
async fn wait_eof(s: &mut TcpStream, what: &str, limit: Duration) {
    let mut rest = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {limit:?}"))
        .ok();
}

async fn wait_upstream_open(up: &Upstream, n: i64) {
    let what = format!("test upstream holds {n} upgraded socket(s)");
    eventually(BOUND, &what, || async { (up.open() == n).then_some(()) }).await;
}

/// Reads until the stream ends however it ends; panics past `BOUND`.
async fn wait_closed(ws: &mut Ws) {
    closed_by_peer(ws, BOUND).await;
}

// ---------------------------------------------------------------------------
// The client ends the stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_frame_returns_the_slot() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "hello").await;
    gw.wait_active("ws", 1).await;
    close_cleanly(ws).await;

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_returns_the_slot() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    let (status, s) = raw_upgrade(gw.addr, "/ws").await;
    assert_eq!(status, 101);
    gw.wait_active("ws", 1).await;
    wait_upstream_open(&up, 1).await;

    // Linger 0: closing sends RST instead of FIN.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

/// A child process that holds one upgraded stream open; killed when dropped.
struct HeldByProcess(Child);

impl Drop for HeldByProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Upgrades over a raw socket, prints the status code, then sleeps holding
/// the stream (the test kills it long before the sleep ends).
const HOLDER: &str = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.argv[2].encode())
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(1)
    if not chunk:
        sys.exit(1)
    head += chunk
print(head.split(b" ")[1].decode(), flush=True)
time.sleep(120)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_process_returns_the_slot() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    let mut child = Command::new("python3")
        .arg("-c")
        .arg(HOLDER)
        .arg(gw.addr.port().to_string())
        .arg(upgrade_request("/ws"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().unwrap();
    let mut holder = HeldByProcess(child);
    let status = tokio::time::timeout(
        BOUND,
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            line
        }),
    )
    .await
    .expect("the holder upgraded within the bound")
    .unwrap();
    assert_eq!(status.trim(), "101");
    gw.wait_active("ws", 1).await;
    wait_upstream_open(&up, 1).await;

    // SIGKILL: the process gets no chance to close anything itself.
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

// ---------------------------------------------------------------------------
// The upstream ends the stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_close_returns_the_slot() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "hello").await;
    ws.send(Message::text("close-me")).await.unwrap();
    wait_closed(&mut ws).await;

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_returns_the_slot() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "hello").await;
    ws.send(Message::text("reset-me")).await.unwrap();
    wait_closed(&mut ws).await;

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

// ---------------------------------------------------------------------------
// The upstream does not complete the upgrade.

/// Sends an upgrade to `path` that the upstream will not complete, and
/// checks the client's answer, that the slot was already free when the
/// answer arrived, and the failure counter for `reason`.
async fn failed_upgrade(gw: &Wsgate, route: &str, path: &str, want: u16, reason: &str) {
    let failures = |m: &Metrics| {
        m.get(
            "wsgate_upstream_upgrade_failures_total",
            &[("route", route), ("reason", reason)],
        )
    };
    let before = failures(&gw.metrics().await);
    let timed = durations_counted(gw, route).await;

    let (status, conn) = raw_upgrade(gw.addr, path).await;
    assert_eq!(status, want, "answer to {path}");
    // The slot is given back before the answer is written, so it is free
    // now, while the client still holds its connection: no polling.
    let active = series(&gw.metrics().await, "wsgate_streams_active", route);
    assert_eq!(active, 0.0, "slot still held after answering {path}");

    let what = format!("{reason} failure counted for {path}");
    eventually(BOUND, &what, || async {
        (failures(&gw.metrics().await) == before + 1.0).then_some(())
    })
    .await;
    assert_eq!(
        durations_counted(gw, route).await,
        timed,
        "a stream that never upgraded has no duration"
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_status_is_passed_on_and_the_slot_returns_at_once() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    failed_upgrade(&gw, "ws", "/status/403", 403, "status").await;
    assert_slot_back(&gw, "ws", "/ws").await;
    failed_upgrade(&gw, "ws", "/status/200", 200, "status").await;
    assert_slot_back(&gw, "ws", "/ws").await;

    let m = gw.metrics().await;
    assert_eq!(
        series(&m, "wsgate_upstream_upgrade_failures_total", "ws"),
        2.0,
        "no other failure reason counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_before_answering_gives_502_and_the_slot_back() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;

    failed_upgrade(&gw, "ws", "/close", 502, "closed").await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upstream_connection_gives_502_and_the_slot_back() {
    // A port bound but never listened on: connections to it are refused,
    // and no other socket can take it while this one holds it.
    let held = TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let nowhere = held.local_addr().unwrap();
    let gw = gateway(&[route("ws", "/", &upstream_yaml(nowhere), "")]).await;

    // Nothing can ever be upgraded here, so a second failed attempt is the
    // fresh stream: a leaked slot would answer it 503 instead of 502.
    failed_upgrade(&gw, "ws", "/ws", 502, "refused").await;
    gw.wait_active("ws", 0).await;
    failed_upgrade(&gw, "ws", "/ws", 502, "refused").await;
    gw.wait_active("ws", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_handshake_gives_504_and_the_slot_back() {
    let up = Upstream::start().await;
    let upstream = format!("{}      handshake_timeout: 1s\n", upstream_yaml(up.addr));
    let gw = gateway(&[route("ws", "/", &upstream, "")]).await;

    failed_upgrade(&gw, "ws", "/stall", 504, "timeout").await;
    assert_slot_back(&gw, "ws", "/ws").await;
}

/// Appends what `s` has already received to `into`, without waiting, and
/// says whether that includes the end of the connection. Plain non-blocking
/// reads on the socket, so nothing depends on the runtime's readiness state.
fn drain_received(s: TcpStream, into: &mut Vec<u8>) -> (TcpStream, bool) {
    let mut s = s.into_std().unwrap();
    let mut buf = [0u8; 1024];
    let ended = loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break true,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    (TcpStream::from_std(s).unwrap(), ended)
}

/// An upstream that answers every request with `answer` and then holds the
/// connection open, silent, until the test's runtime ends. The count says
/// how many answers it has sent.
async fn half_answering_upstream(answer: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_whose_body_stalls_frees_the_slot_and_is_cut_off() {
    // A head and a third of its body, then nothing.
    let answer = "HTTP/1.1 403 Forbidden\r\ncontent-length: 12\r\n\r\nforb";
    let (up, answered) = half_answering_upstream(answer).await;
    // Long enough that the checks below run while wsgate still waits for
    // the body; the test takes about this long.
    let upstream = format!("{}      handshake_timeout: 8s\n", upstream_yaml(up));
    // Each cut-off comes one handshake timeout after the last byte.
    let cut_off = Duration::from_secs(30);
    let gw = gateway(&[route("ws", "/", &upstream, "")]).await;

    let first = send_upgrade(gw.addr, "/ws").await;
    eventually(BOUND, "the upstream answered", || async {
        (answered.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The refusal is known, so the slot is free, while its answer is still
    // being relayed: the connection has not ended, and a second attempt is
    // admitted rather than refused with 503.
    gw.wait_active("ws", 0).await;
    let mut seen = Vec::new();
    let (mut first, ended) = drain_received(first, &mut seen);
    assert!(!ended, "the slot came back only when the answer ended");
    let mut second = send_upgrade(gw.addr, "/ws").await;

    // The rest of the body never comes: wsgate gives up on it, within the
    // handshake bound per read, and closes both connections.
    tokio::time::timeout(cut_off, first.read_to_end(&mut seen))
        .await
        .expect("wsgate cuts off a stalled answer")
        .ok();
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 403 "),
        "first attempt: {}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(read_status(&mut second).await, 403, "second attempt");
    wait_eof(&mut second, "second attempt", cut_off).await;
    eventually(BOUND, "both refusals counted", || async {
        let m = gw.metrics().await;
        let failures = m.get(
            "wsgate_upstream_upgrade_failures_total",
            &[("route", "ws"), ("reason", "status")],
        );
        (failures == 2.0).then_some(())
    })
    .await;
    gw.wait_active("ws", 0).await;
    assert_eq!(durations_counted(&gw, "ws").await, 0.0);
}

// ---------------------------------------------------------------------------
// wsgate's own timers end the stream.

/// An upstream that sends a binary `tick` every 300 ms after the upgrade and
/// echoes text: with a client that only listens, traffic flows from the
/// upstream side alone. Its tasks end with the test's runtime.
async fn ticking_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut tx, mut rx) = ws.split();
                let mut every = tokio::time::interval(Duration::from_millis(300));
                loop {
                    let reply = tokio::select! {
                        _ = every.tick() => Message::binary(&b"tick"[..]),
                        m = rx.next() => match m {
                            Some(Ok(Message::Text(t))) => Message::Text(t),
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                            Some(Ok(_)) => continue,
                        },
                    };
                    if tx.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_closed_and_its_slot_returns() {
    let up = Upstream::start().await;
    let gw = gateway(&[route(
        "idle",
        "/",
        &upstream_yaml(up.addr),
        "    idle_timeout: 1s\n",
    )])
    .await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "hello").await;
    let quiet_since = Instant::now();
    wait_closed(&mut ws).await;
    // Only a lower bound, which a timer cannot undercut; the upper one is
    // BOUND. wsgate's timer starts a little before the echo reaches here.
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(500),
        "closed after {:?}, well before the idle timeout",
        quiet_since.elapsed()
    );

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "idle", "/ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_in_either_direction_keeps_an_idle_timed_stream_open() {
    let up = Upstream::start().await;
    let ticker = ticking_upstream().await;
    // Traffic every 300 ms against an idle timeout of 2 s: a stall of
    // well over a second on a busy machine still does not close a stream.
    let idle = "    idle_timeout: 2s\n";
    let gw = gateway(&[
        route("both", "/both", &upstream_yaml(up.addr), idle),
        route("outward", "/outward", &upstream_yaml(up.addr), idle),
        route("inward", "/inward", &upstream_yaml(ticker), idle),
    ])
    .await;
    let mut both = connect(&gw.url("/both")).await.into_open();
    let mut outward = connect(&gw.url("/outward")).await.into_open();
    let mut inward = connect(&gw.url("/inward")).await.into_open();
    let period = Duration::from_millis(4500);

    // Client and upstream both speak: an echo every 300 ms.
    let echoing = async {
        let start = Instant::now();
        while start.elapsed() < period {
            echo(&mut both, "ping").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    // Only the client speaks: the test upstream ignores unsolicited pongs.
    let sending = async {
        let start = Instant::now();
        while start.elapsed() < period {
            outward
                .send(Message::Pong(b"beat".to_vec()))
                .await
                .expect("stream fed by the client ended");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    // Only the upstream speaks: the client reads ticks and sends nothing.
    let listening = async {
        let start = Instant::now();
        let mut ticks = 0;
        while let Some(left) = period.checked_sub(start.elapsed()) {
            match tokio::time::timeout(left, inward.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Binary(_)))) => ticks += 1,
                Ok(other) => panic!("stream fed by the upstream ended: {other:?}"),
            }
        }
        assert!(ticks > 0, "no tick reached the client");
    };
    tokio::join!(echoing, sending, listening);

    // Past twice the idle timeout, every stream still carries messages.
    echo(&mut both, "still open").await;
    echo(&mut outward, "still open").await;
    echo(&mut inward, "still open").await;
    gw.wait_active("both", 1).await;

    close_cleanly(both).await;
    close_cleanly(outward).await;
    close_cleanly(inward).await;
    assert_slot_back(&gw, "both", "/both").await;
    assert_slot_back(&gw, "outward", "/outward").await;
    assert_slot_back(&gw, "inward", "/inward").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_stream_is_closed_at_its_max_lifetime() {
    let up = Upstream::start().await;
    let gw = gateway(&[route(
        "lifetime",
        "/",
        &upstream_yaml(up.addr),
        "    max_lifetime: 2s\n",
    )])
    .await;

    // Taken before the upgrade is sent, so before wsgate's own clock starts.
    let start = Instant::now();
    let mut ws = connect(&gw.url("/ws")).await.into_open();
    let mut echoed = 0;
    let lived = loop {
        assert!(
            start.elapsed() < BOUND,
            "still open after {BOUND:?} with max_lifetime 2s"
        );
        if ws.send(Message::text("chat")).await.is_err() {
            break start.elapsed();
        }
        match tokio::time::timeout(BOUND, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                assert_eq!(t, "chat");
                echoed += 1;
            }
            Ok(_) => break start.elapsed(),
            Err(_) => panic!("neither an echo nor the end within {BOUND:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(echoed > 0, "the stream never carried a message");
    assert!(
        lived >= Duration::from_millis(1900),
        "ended after {lived:?}, before its 2 s lifetime"
    );

    wait_upstream_open(&up, 0).await;
    assert_slot_back(&gw, "lifetime", "/ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_outlives_pingoras_read_timeout_without_an_idle_timeout() {
    let up = Upstream::start().await;
    let gw = gateway(&[route(
        "quiet",
        "/",
        &upstream_yaml(up.addr),
        "    idle_timeout: off\n",
    )])
    .await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "before").await;
    // The quiet period itself is what is tested: longer than Pingora's
    // 60 s HTTP/1 read timeout, which must not apply to upgraded streams.
    tokio::time::sleep(Duration::from_secs(65)).await;
    echo(&mut ws, "after").await;
    gw.wait_active("quiet", 1).await;

    close_cleanly(ws).await;
    assert_slot_back(&gw, "quiet", "/ws").await;
}

// ---------------------------------------------------------------------------
// Durations.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upgraded_stream_is_timed_once_when_it_ends_and_refusals_never() {
    let up = Upstream::start().await;
    let gw = gateway(&[route("ws", "/", &upstream_yaml(up.addr), "")]).await;
    assert_eq!(durations_counted(&gw, "ws").await, 0.0);

    let mut first = connect(&gw.url("/ws")).await.into_open();
    echo(&mut first, "hello").await;
    for _ in 0..3 {
        assert_eq!(connect(&gw.url("/ws")).await.status(), 503);
    }
    assert_eq!(
        durations_counted(&gw, "ws").await,
        0.0,
        "counted before any stream ended"
    );

    close_cleanly(first).await;
    // The duration is recorded before the slot is released, so once the
    // gauge reads 0 the count is final.
    gw.wait_active("ws", 0).await;
    assert_eq!(durations_counted(&gw, "ws").await, 1.0);

    // An upgrade the upstream refuses never becomes a stream.
    let (status, _conn) = raw_upgrade(gw.addr, "/status/403").await;
    assert_eq!(status, 403);
    gw.wait_active("ws", 0).await;
    assert_eq!(durations_counted(&gw, "ws").await, 1.0);

    // Streams ended by the upstream and by a reset count once each too.
    let mut second = connect(&gw.url("/ws")).await.into_open();
    second.send(Message::text("close-me")).await.unwrap();
    wait_closed(&mut second).await;
    gw.wait_active("ws", 0).await;
    let (status, third) = raw_upgrade(gw.addr, "/ws").await;
    assert_eq!(status, 101);
    gw.wait_active("ws", 1).await;
    socket2::SockRef::from(&third)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(third);
    gw.wait_active("ws", 0).await;
    assert_eq!(durations_counted(&gw, "ws").await, 3.0);

    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", "ws"), ("dry_run", "false")]
        ),
        3.0
    );
    // Nothing ends twice: a later scrape still counts three.
    wait_upstream_open(&up, 0).await;
    assert_eq!(durations_counted(&gw, "ws").await, 3.0);
}

/// Opens a stream with a raw socket that never reads after the 101, so
/// wsgate's writes to it back up.
async fn deaf_client(gw: &Wsgate, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(BOUND, s.read_exact(&mut head))
        .await
        .expect("an answer within the bound")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_cannot_outlive_its_timeouts() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: life\n    prefix: /life\n{u}    max_lifetime: 2s\n\
         \n  - name: idle\n    prefix: /idle\n{u}    idle_timeout: 1s\n",
        u = upstream_yaml(up.addr)
    ))
    .await;

    // The upstream floods; the client reads nothing, so writes block.
    let _life = deaf_client(&gw, "/life/flood").await;
    let _idle = deaf_client(&gw, "/idle/flood").await;
    gw.wait_active("life", 0).await;
    gw.wait_active("idle", 0).await;
    eventually(
        Duration::from_secs(10),
        "upstream sockets closed",
        || async { (up.open() == 0).then_some(()) },
    )
    .await;
}
