//! The life of an admitted stream: connect to the upstream, send the
//! upgrade, pass on the upstream's answer ([`run`]) and, after a 101, relay
//! the bytes both ways on the raw connections until either side ends or a
//! timeout fires ([`pump`]).
//!
//! wsgate relays upgraded streams itself rather than through Pingora's proxy
//! loop: that loop can end a tunnel right after its 101 when the upstream
//! answers before the request's empty body is drained (Pingora issue #946),
//! has one read timeout for the handshake and the stream alike, and keeps
//! two 64 KiB body buffers per stream for as long as it lives. Owning the
//! relay gives each phase its own bound (`connect_timeout`,
//! `handshake_timeout`, then `idle_timeout` and `max_lifetime`) and holds
//! no buffer while a stream is idle.

use crate::accept;
use crate::metrics::UpstreamFailure;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use pingora_proxy::Session;
use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{sleep_until, Instant as TokioInstant};

/// How a stream's handshake and relay are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// The moment the stream must end, counted from admission.
    pub deadline: Option<Instant>,
}

/// How a stream ended, for metrics and logs.
#[derive(Debug)]
pub enum Outcome {
    /// The upstream did not complete the upgrade. `answered` is the status
    /// sent to the client (the upstream's own, or 502/504 from wsgate).
    Failed {
        reason: UpstreamFailure,
        answered: u16,
        error: Option<Box<Error>>,
    },
    /// The upstream switched and the 101 was passed on: the stream is
    /// ready for [`pump`].
    Upgraded(Upgraded),
    /// The upstream switched but the client could not be told.
    Ended(End),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    UpstreamClosed,
    ClientError,
    UpstreamError,
    IdleTimeout,
    MaxLifetime,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::UpstreamClosed => "upstream_closed",
            End::ClientError => "client_error",
            End::UpstreamError => "upstream_error",
            End::IdleTimeout => "idle_timeout",
            End::MaxLifetime => "max_lifetime",
        }
    }
}

/// A turning point the caller acts on while the stream is still running.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// The 101 was passed on to the client at this moment.
    Upgraded(Instant),
    /// The upgrade will not happen (failure or a non-101 answer); called
    /// before any answer is relayed, so slots can be given back at once.
    NotUpgraded,
}

/// Collects what a session's body reader returns without waiting: bytes it
/// buffered past the head, or that the socket has ready now.
macro_rules! take_buffered {
    ($read:expr) => {{
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            match pin!($read).poll(&mut cx) {
                Poll::Ready(Ok(Some(bytes))) => out.extend_from_slice(&bytes),
                _ => break out,
            }
        }
    }};
}
#[derive(Debug)]
/// An upgraded stream ready to be relayed: the upstream's raw connection,
/// and what each side sent past its head before the hand-over.
pub struct Upgraded {
    pub upstream: Stream,
    pub to_upstream: Vec<u8>,
    pub to_client: Vec<u8>,
}

/// Sends `request` to `peer` and, when the upstream answers 101, passes the
/// 101 on and returns the upstream's connection for [`pump`]. Any other
/// answer, or a failure, is passed on to the client here. `on_phase` hears
/// the outcome before anything is written to the client.
pub async fn run(
    session: &mut Session,
    connector: &Connector,
    peer: &HttpPeer,
    request: RequestHeader,
    bounds: Bounds,
    mut on_phase: impl FnMut(Phase),
) -> Outcome {
    let mut upstream = match handshake(connector, peer, request, bounds).await {
        Ok(up) => up,
        Err((reason, error)) => {
            on_phase(Phase::NotUpgraded);
            let answered = failure_status(reason);
            respond_error(session, answered).await;
            return Outcome::Failed {
                reason,
                answered,
                error: Some(error),
            };
        }
    };

    let Some(head) = upstream.resp_header().cloned() else {
        on_phase(Phase::NotUpgraded);
        respond_error(session, 502).await;
        return Outcome::Failed {
            reason: UpstreamFailure::Closed,
            answered: 502,
            error: None,
        };
    };
    if head.status == http::StatusCode::SWITCHING_PROTOCOLS && !upstream.was_upgraded() {
        // A switch the connection cannot make (an HTTP/1.0 101): passed on,
        // it would leave the client waiting on a stream that never comes.
        on_phase(Phase::NotUpgraded);
        respond_error(session, 502).await;
        return Outcome::Failed {
            reason: UpstreamFailure::Closed,
            answered: 502,
            error: Some(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "upstream answered 101 without upgrading",
            )),
        };
    }
    if head.status != http::StatusCode::SWITCHING_PROTOCOLS {
        on_phase(Phase::NotUpgraded);
        let answered = head.status.as_u16();
        // The peer has no read timeout (the handshake is bounded as a whole),
        // so bound each read of the answer's body as a plain response's is:
        // an upstream that stalls mid-body must not hold the client forever.
        upstream.read_timeout = Some(bounds.handshake_timeout);
        // And the whole answer: one trickled a byte at a time, each within
        // the read timeout, would otherwise hold the client for as long as
        // the upstream likes, even once the client has gone.
        let pass_on = pass_on_refusal(session, &mut upstream, head);
        if tokio::time::timeout(REFUSAL_LIMIT, pass_on).await.is_err() {
            // Cut short: what was passed on so far goes out, then the
            // connection closes (the answer is incomplete, so it cannot be
            // reused).
            session.set_keepalive(None);
            let close = session.as_downstream_mut().shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
        }
        return Outcome::Failed {
            reason: UpstreamFailure::Status,
            answered,
            error: None,
        };
    }

    // The upstream switched. Both sessions may hold bytes read past their
    // heads (an upstream's greeting, a client's eager first frame); they are
    // taken now, without waiting, and relayed first.
    upstream.read_timeout = None;
    upstream.maybe_upgrade_body_writer();
    session.set_read_timeout(None);
    session.set_keepalive(None);
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
    {
        return Outcome::Ended(End::ClientError);
    }
    on_phase(Phase::Upgraded(Instant::now()));
    let to_client = take_buffered!(upstream.read_body_bytes());
    let to_upstream = take_buffered!(session.as_downstream_mut().read_request_body());
    Outcome::Upgraded(Upgraded {
        upstream: upstream.into_inner(),
        to_upstream,
        to_client,
    })
}

async fn handshake(
    connector: &Connector,
    peer: &HttpPeer,
    request: RequestHeader,
    bounds: Bounds,
) -> Result<UpstreamSession, (UpstreamFailure, Box<Error>)> {
    let (mut up, _reused) = connector
        .get_http_session(peer)
        .await
        .map_err(connect_failed)?;

    let exchange = async {
        up.write_request_header(Box::new(request)).await?;
        // Interim answers (100 Continue, 103 Early Hints) come before the
        // real one and mean nothing to a WebSocket client: skip them.
        loop {
            up.read_response().await?;
            let status = up.resp_header().map(|h| h.status.as_u16());
            if !matches!(status, Some(100 | 102..=199)) {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(bounds.handshake_timeout, exchange).await {
        Ok(Ok(_)) => Ok(up),
        Ok(Err(e)) => Err((UpstreamFailure::Closed, e)),
        Err(_) => Err((
            UpstreamFailure::Timeout,
            Error::explain(
                ErrorType::ReadTimedout,
                "upstream did not answer the upgrade in time",
            ),
        )),
    }
}

/// What the client is answered when the upstream failed an upgrade.
pub(crate) fn failure_status(reason: UpstreamFailure) -> u16 {
    if reason == UpstreamFailure::Timeout {
        504
    } else {
        502
    }
}

/// Why connecting to the upstream failed, as counted, with the error.
pub(crate) fn connect_failed(e: Box<Error>) -> (UpstreamFailure, Box<Error>) {
    let reason = match e.etype() {
        ErrorType::ConnectTimedout => UpstreamFailure::Timeout,
        ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert => UpstreamFailure::Tls,
        _ => UpstreamFailure::Refused,
    };
    (reason, e)
}

/// Relays an upstream's non-101 answer (headers and body) to the client.
async fn pass_on_refusal(
    session: &mut Session,
    upstream: &mut UpstreamSession,
    mut head: ResponseHeader,
) {
    session.set_keepalive(None);
    head.remove_header(&http::header::CONNECTION);
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
    {
        return;
    }
    loop {
        match upstream.read_body_bytes().await {
            Ok(Some(chunk)) => {
                if session
                    .write_response_body(Some(chunk), false)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break,
            Err(_) => {
                // The answer broke off. What came whole goes out, and the
                // connection closes before Pingora could end the body, so a
                // cut answer cannot pass for a whole one.
                let close = session.as_downstream_mut().shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
                return;
            }
        }
    }
    let _ = session.write_response_body(None, true).await;
}

async fn respond_error(session: &mut Session, status: u16) {
    session.set_keepalive(None);
    if let Err(e) = session.respond_error(status).await {
        tracing::debug!(error = %e, "could not answer the client");
    }
}

/// Relays bytes both ways between the raw connections until either side
/// ends or a timer fires.
///
/// Each direction reads into a scratch buffer on the stack and writes it on
/// at once; only a write that cannot complete keeps its rest on the heap
/// until it can. An idle stream therefore holds no buffer at all. A side is
/// not read while its last bytes are still on their way, so a peer that
/// stops reading stops the other side too, and the idle timer, which any
/// byte moved in either direction restarts, ends the stream.
///
/// With `settle`, a plain client socket still on the event loop of the
/// thread that accepted it is moved to this thread's once the stream has
/// proved busy ([`accept::settle`]); a stream that ends or idles first never
/// pays for the move.
pub async fn pump(client: &mut Stream, up: Upgraded, bounds: Bounds, settle: bool) -> End {
    let Upgraded {
        mut upstream,
        to_upstream,
        to_client,
    } = up;
    let far = TokioInstant::now() + Duration::from_secs(100 * 365 * 86400);
    let lifetime = bounds.deadline.map_or(far, TokioInstant::from_std);
    let mut expiry = pin!(sleep_until(lifetime));
    let mut idle = pin!(sleep_until(
        bounds.idle_timeout.map_or(far, |d| TokioInstant::now() + d)
    ));
    let mut last_moved = TokioInstant::now();
    let mut up_dir = Direction::new(
        to_upstream,
        End::ClientClosed,
        End::ClientError,
        End::UpstreamError,
    );
    let mut down_dir = Direction::new(
        to_client,
        End::UpstreamClosed,
        End::UpstreamError,
        End::ClientError,
    );

    // Wake-ups that moved bytes still to come before the client socket is
    // moved, while a move is to be made.
    let mut to_settle = settle.then_some(SETTLE_AFTER);

    let end = std::future::poll_fn(|cx| {
        // Moved before the sides are polled, so the new registration is the
        // one their wakers go to.
        if to_settle == Some(0) {
            accept::settle(client);
            to_settle = None;
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
        if let Poll::Ready(end) = up_dir.poll(cx, client, &mut upstream, &mut scratch) {
            return Poll::Ready(end);
        }
        if let Poll::Ready(end) = down_dir.poll(cx, &mut upstream, client, &mut scratch) {
            return Poll::Ready(end);
        }
        if std::mem::take(&mut up_dir.moved) | std::mem::take(&mut down_dir.moved) {
            last_moved = TokioInstant::now();
            if let Some(left) = &mut to_settle {
                *left = left.saturating_sub(1);
            }
        }
        if expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::MaxLifetime);
        }
        if let Some(d) = bounds.idle_timeout {
            // The timer is moved on only when it fires, not on every byte.
            while idle.as_mut().poll(cx).is_ready() {
                if last_moved + d <= TokioInstant::now() {
                    return Poll::Ready(End::IdleTimeout);
                }
                idle.as_mut().reset(last_moved + d);
            }
        }
        Poll::Pending
    })
    .await;

    // Close both sides in an orderly way, briefly. A TLS side needs its
    // close_notify sent first; a TCP socket sends its FIN when it is closed,
    // so shutting it down first would only cost a system call.
    let close = async {
        for side in [client, &mut upstream] {
            if side.get_ssl().is_some() {
                let _ = side.shutdown().await;
            } else {
                let _ = side.flush().await;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
    end
}

/// Wake-ups that moved bytes before a stream counts as busy and its client
/// socket is moved to the relay's thread: the move costs about five system
/// calls, and each wake-up it saves costs a cross-thread wake.
const SETTLE_AFTER: u8 = 8;

/// How long an upstream's non-101 answer may take to pass on, head and body.
pub(crate) const REFUSAL_LIMIT: Duration = Duration::from_secs(30);

/// The most one read takes from a socket: a 16 KiB message and its frame
/// header in one read, not two. It lives on the stack only while a
/// direction is polled (uninitialised, so it costs nothing to set up).
const SCRATCH: usize = 64 * 1024;
/// How long closing both sides of an ended stream may take.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Reads per direction in one wake-up before yielding to other tasks.
const READS_PER_WAKE: usize = 16;

/// One direction of a relay, and how it ends.
struct Direction {
    /// Bytes read but not yet written on, and how many of them were.
    pending: Vec<u8>,
    written: usize,
    flush: bool,
    moved: bool,
    on_eof: End,
    on_read_error: End,
    on_write_error: End,
}

impl Direction {
    fn new(pending: Vec<u8>, on_eof: End, on_read_error: End, on_write_error: End) -> Self {
        Self {
            flush: !pending.is_empty(),
            pending,
            written: 0,
            moved: false,
            on_eof,
            on_read_error,
            on_write_error,
        }
    }

    /// Moves what it can from `from` to `to`; ready only when the stream ends.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut Stream,
        to: &mut Stream,
        scratch: &mut [MaybeUninit<u8>],
    ) -> Poll<End> {
        for _ in 0..READS_PER_WAKE {
            // What was read before goes first, and whole.
            while self.written < self.pending.len() {
                match Pin::new(&mut *to).poll_write(cx, &self.pending[self.written..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(self.on_write_error)
                    }
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.moved = true;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.written > 0 {
                // Give the memory back: most streams rarely have a write wait.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.flush {
                match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(self.on_write_error),
                    Poll::Pending => return Poll::Pending,
                }
            }

            let mut buf = ReadBuf::uninit(scratch);
            match Pin::new(&mut *from).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(self.on_eof),
                Poll::Ready(Ok(())) => {
                    self.moved = true;
                    self.flush = true;
                    let data = buf.filled();
                    let sent = match Pin::new(&mut *to).poll_write(cx, data) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            return Poll::Ready(self.on_write_error)
                        }
                        Poll::Ready(Ok(n)) => n,
                        Poll::Pending => 0,
                    };
                    if sent < data.len() {
                        self.pending.extend_from_slice(&data[sent..]);
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(self.on_read_error),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Still busy: let other tasks run, and come back at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::tests::{fd, pair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Relays `messages` round trips through `pump` and ends the stream from
    /// the client; returns whether the client socket was moved.
    async fn relay(messages: usize, settle: bool) -> bool {
        let (mut ours, mut client) = pair().await;
        let (upstream, mut up) = pair().await;
        let before = fd(&ours);

        let relay = tokio::spawn(async move {
            let upgraded = Upgraded {
                upstream,
                to_upstream: Vec::new(),
                to_client: Vec::new(),
            };
            let bounds = Bounds {
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: None,
                deadline: None,
            };
            let end = pump(&mut ours, upgraded, bounds, settle).await;
            (end, fd(&ours))
        });

        for i in 0..messages {
            let ask = format!("ask {i:04}");
            client.write_all(ask.as_bytes()).await.unwrap();
            let mut got = [0; 8];
            up.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, ask.as_bytes());
            let answer = format!("ans {i:04}");
            up.write_all(answer.as_bytes()).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, answer.as_bytes());
        }
        drop(client);

        let ended = tokio::time::timeout(Duration::from_secs(10), relay);
        let (end, after) = ended.await.expect("the relay ends").unwrap();
        assert!(matches!(end, End::ClientClosed), "{end:?}");
        // The upstream is let go too.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), up.read_to_end(&mut rest));
        assert_eq!(closed.await.expect("the upstream is closed").unwrap(), 0);
        after != before
    }

    #[tokio::test]
    async fn a_busy_stream_moves_its_client_socket_and_loses_nothing() {
        assert!(relay(20, true).await);
    }

    #[tokio::test]
    async fn a_short_stream_never_pays_for_the_move() {
        assert!(!relay(2, true).await);
    }

    #[tokio::test]
    async fn nothing_moves_with_a_shared_event_loop() {
        assert!(!relay(20, false).await);
    }
}
