//! Which thread's event loop a new connection's socket belongs to.
//!
//! With a runtime per thread (`server.work_stealing: false`), Pingora runs a
//! service's accept loops on one thread and spawns each accepted
//! connection's task on a thread picked at random. The socket stays
//! registered with the event loop of the thread that accepted it, so for
//! every connection placed elsewhere each readiness event of the client
//! socket would be taken by the accepting thread and passed on as a
//! cross-thread wake-up, for as long as the stream lives.
//!
//! [`Accepting`] marks the thread that accepts. Elsewhere, a TLS connection
//! is moved onto the serving thread's event loop by [`SettleBeforeTls`]
//! before its handshake, and a plain one by [`settle`] once the relay finds
//! its stream busy: the move costs a few system calls, which a connection
//! that ends after its handshake would pay for nothing. Plain HTTP
//! exchanges stay where they were accepted.

use async_trait::async_trait;
use pingora::listeners::{ConnectionFilter, PreTlsProcess};
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use std::cell::Cell;
use std::net::SocketAddr as InetAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

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

/// Moves a plain TCP stream's socket onto the event loop of the current
/// thread, unless this thread accepted it. Anything else (a TLS stream,
/// settled before its handshake) stays as it is.
///
/// Only between reads and writes: the stream must hold no bytes of its own
/// (the proxy's streams are unbuffered, see `server::L4_BUFFER`), and the
/// caller polls it again afterwards so that its wakers are registered anew.
pub fn settle(stream: &mut Stream) {
    if ACCEPTS.with(Cell::get) {
        return;
    }
    if let Some(moved) = stream.as_any().downcast_ref::<TcpStream>().and_then(moved) {
        // The original is dropped here, closing its descriptor.
        *stream = Box::new(moved);
    }
}

/// Pingora's hook before a TLS handshake, on the thread that will serve the
/// connection: the same move as [`settle`], made before any byte is read,
/// since a TLS stream cannot be moved once its session wraps the socket.
pub struct SettleBeforeTls;

#[async_trait]
impl PreTlsProcess for SettleBeforeTls {
    async fn process(&self, stream: &mut TcpStream) -> pingora::Result<()> {
        if !ACCEPTS.with(Cell::get) {
            if let Some(moved) = moved(stream) {
                // The original is dropped here, closing its descriptor.
                *stream = moved;
            }
        }
        Ok(())
    }
}

/// A stream on a duplicate of `tcp`'s descriptor, registered with the
/// current thread's event loop and unbuffered (as the proxy's listeners
/// are, see `server::L4_BUFFER`); `tcp` must then be dropped. None for a
/// Unix socket, or if the duplicate cannot be had: the connection is then
/// served as it came.
///
/// Of `tcp`'s digests only the peer address is carried over: its timing
/// digest restarts at the move, microseconds after accept, and it has no
/// tracer or proxy digest at this point.
///
/// Nothing may have been read from or written to `tcp`: whatever Pingora's
/// stream held would stay behind.
fn moved(tcp: &TcpStream) -> Option<TcpStream> {
    // Pingora's plain stream also carries Unix sockets; only TCP is moved.
    // The peer address was read at accept, and is carried over rather than
    // asked of the kernel again.
    let peer = tcp
        .get_socket_digest()
        .and_then(|d| d.peer_addr.get().cloned().flatten())
        .filter(|p| p.as_inet().is_some())?;

    // SAFETY: the descriptor belongs to `tcp`, which is borrowed for the
    // whole of this function, so it stays open while borrowed here.
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let std = match fd.try_clone_to_owned() {
        Ok(fd) => std::net::TcpStream::from(fd),
        Err(e) => {
            tracing::debug!(error = %e, "cannot move a connection to its thread");
            return None;
        }
    };
    let moved = match tokio::net::TcpStream::from_std(std) {
        Ok(moved) => moved,
        Err(e) => {
            tracing::debug!(error = %e, "cannot move a connection to its thread");
            return None;
        }
    };

    let mut moved = TcpStream::from(moved);
    let digest = SocketDigest::from_raw_fd(moved.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer));
    moved.set_socket_digest(digest);
    Some(moved)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The descriptor under a plain stream.
    pub(crate) fn fd(stream: &Stream) -> i32 {
        stream
            .as_any()
            .downcast_ref::<TcpStream>()
            .unwrap()
            .as_raw_fd()
    }

    /// A connected pair: Pingora's stream of the accepted side, as its
    /// listener makes it, and the client's end.
    pub(crate) async fn pair() -> (Stream, tokio::net::TcpStream) {
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
        let (mut stream, mut client) = pair().await;
        let before = fd(&stream);
        let peer = client.local_addr().unwrap();

        settle(&mut stream);

        assert_ne!(
            fd(&stream),
            before,
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
        let (mut stream, _client) = pair().await;
        let before = fd(&stream);

        // On the thread that accepted, as Pingora calls the filter there.
        assert!(Accepting.should_accept(None).await);
        settle(&mut stream);

        assert_eq!(fd(&stream), before);
    }

    #[tokio::test]
    async fn a_unix_socket_is_served_as_it_came() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut stream = TcpStream::from(ours);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        digest.peer_addr.set(None).unwrap();
        stream.set_socket_digest(digest);
        let mut stream: Stream = Box::new(stream);
        let before = fd(&stream);

        settle(&mut stream);

        assert_eq!(fd(&stream), before);
    }

    #[tokio::test]
    async fn a_tls_connection_is_moved_before_its_handshake() {
        let (stream, mut client) = pair().await;
        let mut tcp = *stream.into_any().downcast::<TcpStream>().unwrap();
        let fd = tcp.as_raw_fd();

        SettleBeforeTls.process(&mut tcp).await.unwrap();

        assert_ne!(tcp.as_raw_fd(), fd);
        client.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        tcp.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn moved_streams_are_buffered_as_the_listeners_ask() {
        // `moved` makes its streams with Pingora's `From`, which buffers
        // nothing; the listeners must ask for the same.
        let l4 = crate::server::L4_BUFFER;
        assert_eq!((l4.read_capacity(), l4.write_capacity()), (0, 0));
    }
}
