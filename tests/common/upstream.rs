//! A scriptable upstream on a loopback port. It counts every TCP accept and
//! every live upgraded socket, and behaves by request path:
//!
//! - `/status/{code}`: answers `code` with a short body (no upgrade);
//! - `/refuse-chunked`, `/refuse-length`: answers 403 with a chunked body,
//!   or 429 with a sized one, and keeps the connection open for another
//!   request (so only the framing says where the answer ends);
//!   `/refuse-broken`: a chunked 403 whose second chunk-size line is not
//!   hex; `/old-switch`: `HTTP/1.0 101`, which cannot switch;
//!   `/switch-always`: a 101 whatever was asked;
//! - `/close`: closes the connection without answering;
//! - `/stall`: reads the request and never answers;
//! - `/trickle`: answers 200 with a 1 MB body, sent a byte every 500 ms;
//! - anything else with `Upgrade: websocket`: 101, then echoes every message;
//!   the text `close-me` makes it close the socket, `reset-me` reset it;
//!   under `/flood`, it sends 32 MiB in binary messages at once, then
//!   waits for the client to end the stream; under `/greet`, the text
//!   `hello` goes out in the same write as the 101; under `/early`, a
//!   `103 Early Hints` comes first;
//! - anything else: 200 `plain`.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Default)]
pub struct Counters {
    pub accepts: AtomicUsize,
    pub upgrades: AtomicUsize,
    pub open: AtomicI64,
    /// Every request head received, in order.
    pub heads: Mutex<Vec<String>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();

        let (c, t) = (counters.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.accepts.fetch_add(1, Ordering::SeqCst);
                let conn = tokio::spawn(serve(stream, c.clone()));
                t.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Upstream {
            addr,
            counters,
            tasks,
        }
    }

    pub fn accepts(&self) -> usize {
        self.counters.accepts.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> i64 {
        self.counters.open.load(Ordering::SeqCst)
    }

    pub fn upgrades(&self) -> usize {
        self.counters.upgrades.load(Ordering::SeqCst)
    }

    pub fn heads(&self) -> Vec<String> {
        self.counters.heads.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Decrements the open count when the upgraded socket's task ends, however.
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(mut stream: TcpStream, counters: Arc<Counters>) {
    loop {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        counters.heads.lock().unwrap().push(head.clone());
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let lower = head.to_ascii_lowercase();
        let key = lower
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-key:"))
            .map(|k| {
                // Recover the original case of the key from the raw head.
                let start = lower.find(k).unwrap();
                head[start..start + k.len()].trim().to_string()
            });

        if let Some(code) = path.strip_prefix("/status/") {
            let code: u16 = code.parse().unwrap_or(500);
            let resp = format!(
                "HTTP/1.1 {code} Test\r\ncontent-length: 6\r\nconnection: close\r\n\r\nstatus"
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            return;
        }
        let refusal = if path.starts_with("/refuse-chunked") {
            Some("HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\nx-why: full\r\n\r\n4\r\nnope\r\n0\r\n\r\n")
        } else if path.starts_with("/refuse-length") {
            Some("HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\nx-why: slow\r\n\r\nnope")
        } else if path.starts_with("/refuse-broken") {
            Some("HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\nzz\r\n")
        } else if path.starts_with("/switch-always") {
            Some("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        } else if path.starts_with("/old-switch") {
            Some("HTTP/1.0 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        } else {
            None
        };
        if let Some(resp) = refusal {
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        if path.starts_with("/close") {
            return;
        }
        if path.starts_with("/trickle") {
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                if stream.write_all(b".").await.is_err() {
                    return;
                }
            }
        }
        if path.starts_with("/stall") {
            std::future::pending::<()>().await;
        }
        let upgrade = lower
            .lines()
            .any(|l| l.starts_with("upgrade:") && l.contains("websocket"));
        if upgrade {
            let accept = derive_accept_key(key.unwrap_or_default().as_bytes());
            let mut resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            )
            .into_bytes();
            if path.starts_with("/early") {
                let hints = b"HTTP/1.1 103 Early Hints\r\nlink: </a.js>; rel=preload\r\n\r\n";
                if stream.write_all(hints).await.is_err() {
                    return;
                }
            }
            if path.starts_with("/greet") {
                // An unmasked text frame, as a server sends it.
                resp.extend_from_slice(b"\x81\x05hello");
            }
            // Counted before the answer goes out, so a client holding its
            // 101 always finds the upgrade counted.
            counters.upgrades.fetch_add(1, Ordering::SeqCst);
            if stream.write_all(&resp).await.is_err() {
                return;
            }
            counters.open.fetch_add(1, Ordering::SeqCst);
            let _guard = OpenGuard(counters.clone());
            if path.starts_with("/flood") {
                flood(stream).await;
            } else {
                echo(stream).await;
            }
            return;
        }
        let resp = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain";
        if stream.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn flood(stream: TcpStream) {
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..512 {
        if ws.send(Message::binary(chunk.clone())).await.is_err() {
            return;
        }
    }
    while let Some(Ok(_)) = ws.next().await {}
}

async fn echo(stream: TcpStream) {
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(t) if t.as_str() == "close-me" => {
                let _ = ws.close(None).await;
                return;
            }
            Message::Text(t) if t.as_str() == "reset-me" => {
                let stream = ws.get_ref();
                let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
                return;
            }
            Message::Text(_) | Message::Binary(_) => {
                if let Err(e) = ws.send(msg).await {
                    eprintln!("test upstream: echo failed: {e}");
                    return;
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

/// Reads one request head (through the blank line); `None` at EOF.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
        if buf.len() > 64 * 1024 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&buf).to_string())
}
