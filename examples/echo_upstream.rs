//! A light WebSocket echo upstream for the benchmarks (`bench/run.sh`): every
//! upgrade on any path is accepted and every text or binary message echoed.
//! Plain HTTP gets nothing but the WebSocket handshake's own error answer.
//!
//! ```text
//! echo_upstream 127.0.0.1:9001
//! ```
//!
//! Loopback addresses only. It prints `listening ADDR` on stdout once bound.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()?;
    anyhow::ensure!(addr.ip().is_loopback(), "loopback addresses only");
    raise_fd_limit()?;

    let listener = TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of fds or similar: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(echo(stream));
    }
}

/// Room for about 9,900 streams plus the listener, under the per-process fd
/// budget of the benchmark machine.
fn raise_fd_limit() -> anyhow::Result<()> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < 10_000 {
        rlimit::Resource::NOFILE.set(10_000.min(hard), hard)?;
    }
    Ok(())
}

async fn echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            // Pings are answered by the library; pongs and raw frames need nothing.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}
