//! One client connection, from accept to close: the front door that
//! Pingora's HTTP handling runs behind.
//!
//! It owns what a connection may cost before it has asked for anything:
//! - a cap on open connections per client address, taken at accept;
//! - a deadline and a size bound on every request head. Pingora bounds each
//!   read, not the head, so without this a client sending a byte every few
//!   seconds holds its connection for as long as it likes.
//!
//! And it carries admitted streams. Once a stream's 101 is written, the proxy
//! hands the upstream connection over ([`hand_off`]); Pingora's session then
//! ends and is dropped with all its buffers, and the two raw connections are
//! relayed by [`relay::pump`] on a task of their own.

use crate::admission::ConnectionSlot;
use crate::config::ServerSettings;
use crate::gateway::Gateway;
use crate::handshake::{self, First};
use crate::metrics::ConnectionClosed;
use crate::proxy::Proxy;
use crate::relay::{self, Bounds, Upgraded};
use crate::stream::Stream as Admitted;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use pingora_proxy::{HttpProxy, Session};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant as TokioInstant, Sleep};

/// The proxy listeners' application: Pingora's HTTP proxy behind the
/// connection cap and the head bounds, and the relay of admitted streams.
pub struct Front {
    proxy: Arc<HttpProxy<Proxy>>,
    gateway: Arc<Gateway>,
    /// Upstream connections for upgrades carried by [`handshake`].
    transport: TransportConnector,
    /// Whether each thread runs an event loop of its own, so that a busy
    /// stream's client socket is moved to the thread serving it.
    settle: bool,
}

impl Front {
    pub fn new(
        proxy: HttpProxy<Proxy>,
        gateway: Arc<Gateway>,
        transport: TransportConnector,
        settle: bool,
    ) -> Self {
        Self {
            proxy: Arc::new(proxy),
            gateway,
            transport,
            settle,
        }
    }
}

/// An admitted, upgraded stream on its way from the proxy to the relay.
pub struct Handoff {
    pub upgraded: Upgraded,
    pub bounds: Bounds,
    /// Its slots: released when the relay ends and this is dropped.
    pub admitted: Admitted,
    pub route: Arc<str>,
}

/// Hands an upgraded stream to the connection it arrived on. Fails (giving
/// the hand-off back) only if the session does not run behind [`Front`].
pub fn hand_off(session: &Session, handoff: Handoff) -> Result<(), Box<Handoff>> {
    let guarded = session
        .as_downstream()
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<Guarded>());
    match guarded {
        Some(g) => {
            g.shared.lock().unwrap_or_else(|e| e.into_inner()).handoff = Some(handoff);
            Ok(())
        }
        None => Err(Box::new(handoff)),
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = peer_ip(&*stream);
        // The config is read once here and not kept: a connection may live
        // for hours, and must not pin an old config in memory after reloads.
        let (capped, head, own_handshake) = {
            let snapshot = self.gateway.snapshot();
            let config = &snapshot.config;
            let capped = peer
                .and_then(|ip| config.client.connection_key(ip))
                .map(|key| (key, config.connections_per_client));
            (
                capped,
                head_bounds(&config.server),
                config.server.own_handshake,
            )
        };
        let slot = match capped {
            None => None,
            Some((key, limit)) => {
                let slot = self.gateway.table.connect(key, limit);
                if slot.is_none() {
                    self.closed(ConnectionClosed::ClientConnections, peer);
                    return None;
                }
                slot
            }
        };
        let open = Open::new(self.gateway.clone(), slot);

        // A first request that is a plain WebSocket upgrade is carried here;
        // anything else goes to Pingora with what was read put back.
        let accepted = TokioInstant::now();
        let (stream, read) = if *shutdown.borrow() || !own_handshake {
            (stream, Vec::new())
        } else {
            let deadline = accepted + head.0;
            match handshake::first(
                &self.gateway,
                &self.transport,
                stream,
                peer,
                deadline,
                head.1,
            )
            .await
            {
                First::Declined { client, read } => (client, read),
                First::Done => return None,
                First::Upgraded { client, handoff } => {
                    tokio::spawn(carry(client, *handoff, open, self.settle));
                    return None;
                }
            }
        };

        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut guarded = Box::new(Guarded {
            inner: Some(stream),
            rewound: read,
            head: None,
            shared: shared.clone(),
            gathered: Vec::new(),
            gathered_sent: 0,
        });
        guarded.watch_head(head, Some(accepted));
        let mut session = ServerSession::new_http1(guarded);
        // Pingora's own defaults for a new connection.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });

        loop {
            let reused = self.proxy.process_new_http(session, shutdown).await;

            let (handoff, fault) = {
                let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
                (shared.handoff.take(), shared.fault.take())
            };
            if let Some(fault) = fault {
                self.closed(fault, peer);
            }
            if let Some(mut handoff) = handoff {
                // Dropping Pingora's hold on the connection is what moves it
                // (and any unsent bytes) into `shared`: first that, then take.
                drop(reused);
                let (client, unsent) = {
                    let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
                    (shared.client.take(), std::mem::take(&mut shared.unsent))
                };
                if !unsent.is_empty() {
                    let to_client = &mut handoff.upgraded.to_client;
                    *to_client = [unsent, std::mem::take(to_client)].concat();
                }
                if let Some(client) = client {
                    // The stream gets a task of its own, sized for the relay:
                    // this one was sized by Pingora for a whole HTTP
                    // exchange (over 8 KB), and would be kept for as long
                    // as the stream lives.
                    tokio::spawn(carry(client, handoff, open, self.settle));
                }
                return None;
            }

            let (stream, settings) = reused?.consume();
            let mut guarded = stream.into_any().downcast::<Guarded>().ok()?;
            guarded.watch_head(head_bounds(&self.gateway.snapshot().config.server), None);
            session = ServerSession::new_http1(guarded);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

impl Front {
    /// Counts a connection wsgate closed itself, and logs it within the
    /// rejection log's budget.
    fn closed(&self, reason: ConnectionClosed, peer: Option<IpAddr>) {
        self.gateway
            .metrics
            .connections_closed
            .with_label_values(&[reason.as_str()])
            .inc();
        if let Some(suppressed) = self.gateway.rejections.admit_line() {
            let client = peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
            tracing::info!(
                %client,
                reason = reason.as_str(),
                suppressed,
                "connection closed"
            );
        }
    }
}

/// Relays a handed-off stream to its end. Its slots go when `handoff` does,
/// and the connection's when `open` does, however the task ends (a
/// shutdown drops it).
async fn carry(mut client: Stream, handoff: Handoff, open: Open, settle: bool) {
    let Handoff {
        upgraded,
        bounds,
        admitted,
        route,
    } = handoff;
    let end = relay::pump(&mut client, upgraded, bounds, settle).await;
    drop((admitted, open));
    tracing::debug!(%route, end = end.as_str(), "stream ended");
}

/// An open connection: counted in the gauge, and holding its slot under the
/// per-client cap, until dropped.
struct Open {
    gateway: Arc<Gateway>,
    slot: Option<ConnectionSlot>,
}

impl Open {
    fn new(gateway: Arc<Gateway>, slot: Option<ConnectionSlot>) -> Self {
        gateway.metrics.connections_open.inc();
        Self { gateway, slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        // The slot first, so a gauge showing the connection gone means its
        // slot is free.
        drop(self.slot.take());
        self.gateway.metrics.connections_open.dec();
    }
}

/// The time and size a request head may take.
fn head_bounds(server: &ServerSettings) -> (Duration, usize) {
    (server.head_timeout, server.max_head_bytes)
}

fn peer_ip(stream: &dyn pingora::protocols::IO) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    Some(digest.peer_addr()?.as_inet()?.ip())
}

/// What the proxy and the connection's task pass each other.
#[derive(Default)]
struct Shared {
    /// Set by [`hand_off`] from inside the proxy.
    handoff: Option<Handoff>,
    /// The client connection, moved here when Pingora drops its session
    /// after a hand-off.
    client: Option<Stream>,
    /// Bytes for the client that were gathered but not sent at hand-off.
    unsent: Vec<u8>,
    /// Why the connection was closed while a head was read, if it was.
    fault: Option<ConnectionClosed>,
}

/// The client connection as Pingora sees it: the raw stream, with the head
/// bounds applied while a request head is being read.
#[derive(Debug)]
struct Guarded {
    /// `None` only once moved out for a hand-off.
    inner: Option<Stream>,
    /// Bytes the front door read and gave back, read before `inner`.
    rewound: Vec<u8>,
    head: Option<HeadWatch>,
    shared: Arc<Mutex<Shared>>,
    /// Small writes not yet sent (see [`GATHER`]), and how much of them was.
    gathered: Vec<u8>,
    gathered_sent: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("handoff", &self.handoff.is_some())
            .field("fault", &self.fault)
            .finish()
    }
}

impl Guarded {
    /// Starts bounding the next request head. A connection's first head is
    /// timed from `accepted`; later ones from their first byte, since the
    /// wait between requests is Pingora's keepalive timeout.
    fn watch_head(
        &mut self,
        (timeout, max_bytes): (Duration, usize),
        accepted: Option<TokioInstant>,
    ) {
        let mut watch = HeadWatch::new(timeout, max_bytes);
        if let Some(at) = accepted {
            watch.start_at(at);
        }
        self.head = Some(watch);
    }

    fn handed_off(&self) -> bool {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handoff
            .is_some()
    }

    fn inner(&mut self) -> io::Result<&mut Stream> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    fn fault(&mut self, reason: ConnectionClosed) -> io::Error {
        self.head = None;
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).fault = Some(reason);
        let what = match reason {
            ConnectionClosed::HeadTooLarge => "request head too large",
            _ => "request head not complete in time",
        };
        io::Error::new(io::ErrorKind::InvalidData, what)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // After a hand-off the connection outlives Pingora's session: it
        // moves to the connection's task instead of closing.
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.handoff.is_some() {
            shared.client = self.inner.take();
            // Pingora flushes the 101, so this is empty unless a write
            // failed; if not, it goes to the client before anything else.
            shared.unsent = self.gathered.split_off(self.gathered_sent);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = if this.rewound.is_empty() {
            match this.inner() {
                Ok(inner) => Pin::new(inner).poll_read(cx, buf),
                Err(e) => return Poll::Ready(Err(e)),
            }
        } else {
            // What the front door read first comes first, through the same
            // head bounds as any other byte.
            let n = this.rewound.len().min(buf.remaining());
            buf.put_slice(&this.rewound[..n]);
            this.rewound.drain(..n);
            if this.rewound.is_empty() {
                this.rewound = Vec::new();
            }
            Poll::Ready(Ok(()))
        };
        let Some(head) = this.head.as_mut() else {
            return read;
        };

        match read {
            Poll::Ready(Ok(())) => match head.scan(&buf.filled()[before..]) {
                Scan::Incomplete => Poll::Ready(Ok(())),
                Scan::Complete => {
                    this.head = None;
                    Poll::Ready(Ok(()))
                }
                Scan::TooLarge => Poll::Ready(Err(this.fault(ConnectionClosed::HeadTooLarge))),
            },
            Poll::Pending if head.expired(cx) => {
                Poll::Ready(Err(this.fault(ConnectionClosed::HeadTimeout)))
            }
            other => other,
        }
    }
}

/// Small writes are gathered up to this size until Pingora flushes, so a
/// short answer (head and body) leaves in one segment.
const GATHER: usize = 4096;

impl Guarded {
    /// Writes out what was gathered, then lets its memory go: between
    /// responses, and for as long as a stream lives, nothing is held.
    fn poll_write_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.gathered_sent < self.gathered.len() {
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let pending = &self.gathered[self.gathered_sent..];
            match Pin::new(inner).poll_write(cx, pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.gathered_sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.gathered = Vec::new();
        self.gathered_sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gathered.len() + buf.len() > GATHER {
            if let Err(e) = ready!(this.poll_write_gathered(cx)) {
                return Poll::Ready(Err(e));
            }
        }
        if buf.len() >= GATHER {
            return match this.inner() {
                Ok(inner) => Pin::new(inner).poll_write(cx, buf),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        this.gathered.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = ready!(this.poll_write_gathered(cx)) {
            return Poll::Ready(Err(e));
        }
        match this.inner() {
            Ok(inner) => Pin::new(inner).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = ready!(this.poll_write_gathered(cx)) {
            return Poll::Ready(Err(e));
        }
        if this.handed_off() {
            return Poll::Ready(Ok(()));
        }
        match this.inner() {
            Ok(inner) => Pin::new(inner).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        // Pingora closes a session's connection when the session ends; a
        // handed-off connection lives on in the relay.
        if self.handed_off() {
            return;
        }
        // What was gathered goes out first: a short answer may be in it.
        if std::future::poll_fn(|cx| self.poll_write_gathered(cx))
            .await
            .is_err()
        {
            return;
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.shutdown().await;
        }
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.as_ref().map_or(-1, |s| s.id())
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.as_ref()?.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.as_ref()?.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.as_ref()?.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner
            .as_ref()
            .map_or_else(Vec::new, |s| s.get_timing_digest())
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.as_ref()?.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.as_ref()?.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner()?.try_peek(buf).await
    }
}

/// The bounds on one request head while it is read: where its end is, how
/// long it is so far, and when its time is up.
#[derive(Debug)]
struct HeadWatch {
    timeout: Duration,
    max_bytes: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    seen: usize,
    end: HeadEnd,
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Incomplete,
    Complete,
    TooLarge,
}

impl HeadWatch {
    fn new(timeout: Duration, max_bytes: usize) -> Self {
        Self {
            timeout,
            max_bytes,
            deadline: None,
            seen: 0,
            end: HeadEnd::default(),
        }
    }

    fn start(&mut self) {
        self.start_at(TokioInstant::now());
    }

    fn start_at(&mut self, at: TokioInstant) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep_until(at + self.timeout)));
        }
    }

    /// Follows the bytes just read; a head's first byte starts its clock.
    fn scan(&mut self, bytes: &[u8]) -> Scan {
        if !bytes.is_empty() {
            self.start();
        }
        let (used, complete) = self.end.feed(bytes);
        self.seen += used;
        if self.seen > self.max_bytes {
            Scan::TooLarge
        } else if complete {
            Scan::Complete
        } else {
            Scan::Incomplete
        }
    }

    /// Whether the head's time is up; registers for a wake-up if not.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

/// Finds the blank line that ends a request head, across reads. A line
/// ends in LF with or without CR, as the parser accepts; blank lines before
/// the request line are skipped by the parser, so they end nothing here.
#[derive(Debug, Default)]
struct HeadEnd {
    started: bool,
    /// After a LF: 1; after a LF then CR: 2; else 0.
    state: u8,
}

impl HeadEnd {
    /// Returns how many of `bytes` belong to the head, and whether it ended.
    fn feed(&mut self, bytes: &[u8]) -> (usize, bool) {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if self.started && self.state > 0 => return (i + 1, true),
                b'\n' => self.state = 1,
                b'\r' if self.state == 1 => self.state = 2,
                b'\r' => self.state = 0,
                _ => {
                    self.started = true;
                    self.state = 0;
                }
            }
        }
        (bytes.len(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn end_of(chunks: &[&[u8]]) -> Option<usize> {
        let mut end = HeadEnd::default();
        let mut total = 0;
        for chunk in chunks {
            let (used, done) = end.feed(chunk);
            total += used;
            if done {
                return Some(total);
            }
        }
        None
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(end_of(&[head]), Some(head.len() - 4));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\nHost: a\n\nx"]), Some(24));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
    }

    #[test]
    fn leading_blank_lines_end_nothing() {
        assert_eq!(end_of(&[b"\r\n\r\n\n\n"]), None);
        assert_eq!(end_of(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(22));
    }

    #[tokio::test]
    async fn a_head_that_grows_past_its_bound_is_too_large() {
        let mut watch = HeadWatch::new(Duration::from_secs(1), 16);
        assert_eq!(watch.scan(b"GET / HTTP/1.1\r\n"), Scan::Incomplete);
        assert_eq!(watch.scan(b"X"), Scan::TooLarge);

        // Bytes after the head's end are body: they do not count.
        let mut watch = HeadWatch::new(Duration::from_secs(1), 20);
        let mut request = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        request.extend_from_slice(&[b'x'; 100]);
        assert_eq!(watch.scan(&request), Scan::Complete);
    }

    proptest! {
        /// However a head is split into reads, its end is found at the same
        /// byte.
        #[test]
        fn the_end_does_not_depend_on_how_reads_split(
            cuts in proptest::collection::vec(0usize..60, 0..6),
        ) {
            let request = b"GET /room/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nframes";
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(request.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&request[at..c]);
                at = c;
            }
            chunks.push(&request[at..]);
            prop_assert_eq!(end_of(&chunks), Some(request.len() - 6));
        }
    }
}
