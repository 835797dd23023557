//! Which thread's event loop a new connection's socket belongs to.
//!
//! With a runtime per thread (`server.work_stealing: false`), Pingora runs a
//! service's accept loops on one thread and spawns each accepted
//! connection's task on a thread picked at random. The socket stays
//! registered with the event loop of the thread that accepted it, so for
//! every connection placed elsewhere each readiness event of the client
//! socket is taken by the accepting thread and passed on as a cross-thread
//! wake-up, for as long as the stream lives.
//!
//! [`Accepting`] marks the thread that accepts, and [`settle`] moves a plain
//! TCP socket onto the event loop of the thread serving it when that is
//! another thread. This module holds the crate's one `unsafe` block.

use async_trait::async_trait;
use pingora::listeners::ConnectionFilter;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use std::cell::Cell;
use std::io;
use std::net::SocketAddr as InetAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

thread_local! {
    /// Whether this thread runs an accept loop of the proxy's listeners.
    static ACCEPTS: Cell<bool> = const { Cell::new(false) };
}

/// Pingora's hook at accept, on the accepting thread: marks the thread and
/// accepts every connection (the per-client cap is taken later, by
/// `conn::Front`, which holds the slot for the connection's life).
#[derive(Debug)]
pub struct Accepting;

#[async_trait]
impl ConnectionFilter for Accepting {
    async fn should_accept(&self, _addr: Option<&InetAddr>) -> bool {
        ACCEPTS.with(|a| a.set(true));
        true
    }
}

/// Moves a new plain TCP connection's readiness onto the event loop of the
/// current thread, unless this thread accepted it (Pingora's accept loops
/// all run on one thread). A TLS connection is served as it came: its
/// handshake has already run over the socket where it lies.
///
/// Call before anything is read from or written to the connection: a
/// duplicate of the descriptor is registered here and the original closed,
/// so nothing can be in flight. If the duplicate cannot be had, the
/// connection is served as it came.
pub fn settle(stream: Stream) -> Stream {
    if ACCEPTS.with(Cell::get) {
        return stream;
    }
    let Some(tcp) = stream.as_any().downcast_ref::<TcpStream>() else {
        return stream;
    };
    // Pingora's plain stream also carries Unix sockets; only TCP is moved.
    // The peer address was read at accept, and is carried over rather than
    // asked of the kernel again.
    let Some(peer) = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr.get().cloned().flatten())
        .filter(|p| p.as_inet().is_some())
    else {
        return stream;
    };

    let moved = match dup(tcp.as_raw_fd())
        .and_then(|fd| tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd)))
    {
        Ok(moved) => moved,
        Err(e) => {
            tracing::debug!(error = %e, "cannot move a connection to its thread");
            return stream;
        }
    };
    let mut moved = TcpStream::from(moved);
    let digest = SocketDigest::from_raw_fd(moved.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer));
    moved.set_socket_digest(digest);

    drop(stream);
    Box::new(moved)
}

/// A new descriptor for the socket behind `fd` (close-on-exec, and sharing
/// its non-blocking mode).
#[allow(unsafe_code)]
fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is the descriptor of a stream the caller holds for the
    // whole call, so it stays open while borrowed; the borrow only makes a
    // descriptor of its own.
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair: Pingora's stream of the accepted side, as its
    /// listener makes it, and the client's end.
    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (accepted, peer) = accepted.unwrap();
        let mut stream = TcpStream::from(accepted);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        digest.peer_addr.set(Some(peer.into())).unwrap();
        stream.set_socket_digest(digest);
        (Box::new(stream), client.unwrap())
    }

    #[tokio::test]
    async fn a_settled_connection_keeps_its_peer_and_its_bytes() {
        let (stream, mut client) = pair().await;
        let fd = stream
            .as_any()
            .downcast_ref::<TcpStream>()
            .unwrap()
            .as_raw_fd();
        let peer = client.local_addr().unwrap();

        let mut stream = settle(stream);

        let tcp = stream.as_any().downcast_ref::<TcpStream>().unwrap();
        assert_ne!(
            tcp.as_raw_fd(),
            fd,
            "a new descriptor serves the connection"
        );
        let seen = stream.get_socket_digest().unwrap().peer_addr().cloned();
        assert_eq!(seen.as_ref().and_then(|a| a.as_inet()), Some(&peer));

        // Both ways still work, and closing the settled side reaches the
        // client: the original descriptor was closed, not leaked.
        client.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        stream.write_all(b"pong").await.unwrap();
        stream.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(stream);
        let end = tokio::time::timeout(Duration::from_secs(10), client.read(&mut got));
        assert_eq!(end.await.expect("the client sees the close").unwrap(), 0);
    }

    #[tokio::test]
    async fn the_accepting_thread_keeps_its_connections() {
        let (stream, _client) = pair().await;
        let fd = stream
            .as_any()
            .downcast_ref::<TcpStream>()
            .unwrap()
            .as_raw_fd();

        // On the thread that accepted, as Pingora calls the filter there.
        assert!(Accepting.should_accept(None).await);
        let stream = settle(stream);

        let tcp = stream.as_any().downcast_ref::<TcpStream>().unwrap();
        assert_eq!(tcp.as_raw_fd(), fd);
    }

    #[tokio::test]
    async fn a_unix_socket_is_served_as_it_came() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut stream = TcpStream::from(ours);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        digest.peer_addr.set(None).unwrap();
        stream.set_socket_digest(digest);
        let fd = stream.as_raw_fd();

        let stream = settle(Box::new(stream));

        let tcp = stream.as_any().downcast_ref::<TcpStream>().unwrap();
        assert_eq!(tcp.as_raw_fd(), fd);
    }
}
