//! The life of an admitted stream: connect to the upstream, send the
//! upgrade, relay the upstream's answer and, after a 101, the bytes both ways
//! until either side ends or a timeout fires.
//!
//! wsgate relays upgraded streams itself rather than through Pingora's proxy
//! loop: that loop can end a tunnel right after its 101 when the upstream
//! answers before the request's empty body is drained (Pingora issue #946),
//! and has one read timeout for the handshake and the stream alike. Owning
//! the loop gives each phase its own bound: `connect_timeout`,
//! `handshake_timeout`, then `idle_timeout` and `max_lifetime`.

use crate::metrics::UpstreamFailure;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::{Error, ErrorType};
use pingora_proxy::Session;
use std::pin::pin;
use std::time::{Duration, Instant};
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
    /// The stream was upgraded and has now ended.
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

/// Sends `request` to `peer` and, when the upstream answers 101, relays the
/// stream to its end, telling `on_phase` when the outcome is known.
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
            let answered = if reason == UpstreamFailure::Timeout {
                504
            } else {
                502
            };
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
    if head.status != http::StatusCode::SWITCHING_PROTOCOLS || !upstream.was_upgraded() {
        on_phase(Phase::NotUpgraded);
        let answered = head.status.as_u16();
        // The peer has no read timeout (the handshake is bounded as a whole),
        // so bound each read of the answer's body as a plain response's is:
        // an upstream that stalls mid-body must not hold the client forever.
        upstream.read_timeout = Some(bounds.handshake_timeout);
        pass_on_refusal(session, &mut upstream, head).await;
        return Outcome::Failed {
            reason: UpstreamFailure::Status,
            answered,
            error: None,
        };
    }

    // The upstream switched: from here on the relay loop owns every timeout,
    // reads and writes alike, so the sessions' own read timeouts go.
    upstream.read_timeout = None;
    upstream.maybe_upgrade_body_writer();
    session.set_read_timeout(None);
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
    {
        return Outcome::Ended(End::ClientError);
    }
    on_phase(Phase::Upgraded(Instant::now()));
    Outcome::Ended(relay(session, &mut upstream, bounds).await)
}

async fn handshake(
    connector: &Connector,
    peer: &HttpPeer,
    request: RequestHeader,
    bounds: Bounds,
) -> Result<UpstreamSession, (UpstreamFailure, Box<Error>)> {
    let (mut up, _reused) = connector.get_http_session(peer).await.map_err(|e| {
        let reason = match e.etype() {
            ErrorType::ConnectTimedout => UpstreamFailure::Timeout,
            ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert => UpstreamFailure::Tls,
            _ => UpstreamFailure::Refused,
        };
        (reason, e)
    })?;

    let exchange = async {
        up.write_request_header(Box::new(request)).await?;
        up.read_response().await
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
    while let Ok(Some(chunk)) = upstream.read_body_bytes().await {
        if session
            .write_response_body(Some(chunk), false)
            .await
            .is_err()
        {
            return;
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

/// Copies bytes both ways until either side ends or a timer fires. Any
/// activity, in either direction, restarts the idle timer; a write that
/// cannot complete (a peer that stopped reading) is raced against the same
/// timers, so neither bound can be escaped by not reading.
async fn relay(session: &mut Session, upstream: &mut UpstreamSession, bounds: Bounds) -> End {
    let far = TokioInstant::now() + Duration::from_secs(100 * 365 * 86400);
    let lifetime = bounds.deadline.map_or(far, TokioInstant::from_std);
    let next_idle = || bounds.idle_timeout.map_or(far, |d| TokioInstant::now() + d);
    let mut idle = pin!(sleep_until(next_idle()));
    let mut expiry = pin!(sleep_until(lifetime));

    loop {
        let event = tokio::select! {
            r = session.as_downstream_mut().read_request_body() => Event::FromClient(r),
            r = upstream.read_body_bytes() => Event::FromUpstream(r),
            _ = &mut idle => return End::IdleTimeout,
            _ = &mut expiry => return End::MaxLifetime,
        };

        let written = match event {
            Event::FromClient(Ok(Some(bytes))) => {
                let write = async { upstream.write_body(&bytes).await.map(|_| ()) };
                bounded(write, &mut idle, &mut expiry, End::UpstreamError).await
            }
            Event::FromClient(Ok(None)) => Err(End::ClientClosed),
            Event::FromClient(Err(_)) => Err(End::ClientError),
            Event::FromUpstream(Ok(Some(bytes))) => {
                let write = session
                    .as_downstream_mut()
                    .write_response_body(bytes, false);
                bounded(write, &mut idle, &mut expiry, End::ClientError).await
            }
            Event::FromUpstream(Ok(None)) => Err(End::UpstreamClosed),
            Event::FromUpstream(Err(_)) => Err(End::UpstreamError),
        };
        if let Err(end) = written {
            return end;
        }
        idle.as_mut().reset(next_idle());
    }
}

/// Awaits a write unless the idle or lifetime timer fires first.
async fn bounded(
    write: impl std::future::Future<Output = pingora::Result<()>>,
    idle: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    expiry: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    on_error: End,
) -> Result<(), End> {
    tokio::select! {
        r = write => r.map_err(|_| on_error),
        _ = idle.as_mut() => Err(End::IdleTimeout),
        _ = expiry.as_mut() => Err(End::MaxLifetime),
    }
}

enum Event {
    FromClient(pingora::Result<Option<Bytes>>),
    FromUpstream(pingora::Result<Option<Bytes>>),
}
