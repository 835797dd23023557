//! The Pingora `ProxyHttp` implementation: the hooks a request passes
//! through, each calling the pure modules (`request`, `route`, `client`,
//! `admission`) and recording what happened.
//!
//! A stream's slots are held by the [`Permit`] inside [`Stream`], which lives
//! in the request context. Every way a stream can end drops the context (or
//! the `Stream` earlier, when the upstream refuses the upgrade), so release
//! is always `Drop`, never a hand-written decrement.

use crate::admission::{Admission, Ask, Permit, Scope};
use crate::gateway::{Gateway, LiveRoute, Snapshot};
use crate::metrics::UpstreamFailure;
use crate::request::{self, Kind};
use crate::route::normalize_path;
use crate::{config, refusal};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::Digest;
use pingora::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use prometheus::Histogram;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Proxy {
    gateway: Arc<Gateway>,
}

impl Proxy {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

/// Per-request state.
#[derive(Default)]
pub struct Ctx {
    /// The config this request was routed under, kept to its end.
    snapshot: Option<Arc<Snapshot>>,
    route: Option<usize>,
    /// The admitted stream; `None` for plain requests and once released.
    stream: Option<Stream>,
    /// Set once the upstream answered 101.
    upgraded: bool,
    /// Ends the upstream connection if it does not answer the upgrade in time.
    watchdog: Option<Watchdog>,
    /// The first upstream failure seen, counted once.
    failure: Option<UpstreamFailure>,
}

impl Ctx {
    fn live_route(&self) -> Option<&LiveRoute> {
        Some(&self.snapshot.as_ref()?.routes[self.route?])
    }
}

/// An admitted stream: its slots and its timing.
pub struct Stream {
    _permit: Permit,
    duration: Histogram,
    upgraded_at: Option<Instant>,
    idle_timeout: Option<Duration>,
    deadline: Option<Instant>,
}

impl Stream {
    /// The next downstream read timeout: the idle timeout, cut short by the
    /// lifetime deadline. `Err` once the deadline has passed.
    fn next_timeout(&self) -> Result<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Ok(self.idle_timeout);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Error::e_explain(ErrorType::ReadTimedout, "stream reached its max_lifetime");
        }
        Ok(Some(self.idle_timeout.map_or(left, |idle| idle.min(left))))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(at) = self.upgraded_at {
            self.duration.observe(at.elapsed().as_secs_f64());
        }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    /// Routes the request and, for an upgrade, admits or refuses it. A refusal
    /// is answered here, so the upstream never sees it.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snapshot = self.gateway.snapshot();
        let kind = request::classify(session.req_header());
        if kind == Kind::OtherUpgrade {
            session.req_header_mut().remove_header(&http::header::UPGRADE);
        }

        let req = session.req_header();
        let path = normalize_path(req.uri.path());
        let host = host_of(req);
        let Some(found) = snapshot.config.router.find(host, &path) else {
            drop(path);
            respond_plain(session, 404, "wsgate: no route for this host and path\n").await?;
            return Ok(true);
        };
        ctx.route = Some(found.route);
        if kind != Kind::Stream {
            ctx.snapshot = Some(snapshot);
            return Ok(false);
        }

        let live = &snapshot.routes[found.route];
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), SocketAddr::ip);
        let client = snapshot.config.client.identify(peer, &req.headers);
        let route = &live.route;
        let ask = Ask {
            limits: route.limits,
            global_per_client: snapshot.config.global_per_client,
            key: found.key,
            client: client.key,
            client_exempt: client.exempt,
            dry_run: route.dry_run,
        };

        let refused = match self.gateway.table.admit(&live.slots, &ask) {
            Admission::Admitted {
                permit,
                would_refuse,
            } => {
                if let Some(scope) = would_refuse {
                    live.rejected(scope, true).inc();
                    self.log_refusal(route, client.addr, scope, true);
                }
                live.admitted.inc();
                ctx.stream = Some(Stream {
                    _permit: permit,
                    duration: live.duration.clone(),
                    upgraded_at: None,
                    idle_timeout: route.idle_timeout,
                    deadline: route.max_lifetime.map(|d| Instant::now() + d),
                });
                None
            }
            Admission::Refused(scope) => {
                live.rejected(scope, false).inc();
                self.log_refusal(route, client.addr, scope, false);
                Some((scope, route.clone()))
            }
        };
        drop(path);

        if let Some((scope, route)) = refused {
            let (head, body) = refusal::response(route.reject_status, route.retry_after, &route.name, scope);
            session.set_keepalive(None);
            session.write_response_header(Box::new(head), false).await?;
            session.write_response_body(Some(body), true).await?;
            return Ok(true);
        }
        ctx.snapshot = Some(snapshot);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let live = ctx
            .live_route()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        let up = &live.route.upstream;
        let addr = resolve(&up.host, up.port).await?;

        let mut peer = HttpPeer::new(addr, up.tls, up.sni.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(up.connect_timeout);
        o.total_connection_timeout = Some(up.connect_timeout);
        // A stream's handshake is bounded by the watchdog instead: a read
        // timeout here would also cut a quiet upgraded stream.
        o.read_timeout = if ctx.stream.is_some() { None } else { Some(up.handshake_timeout) };
        o.verify_cert = up.verify_cert;
        o.verify_hostname = up.verify_cert;
        o.ca = live.ca.clone();
        o.tcp_keepalive = ctx
            .snapshot
            .as_ref()
            .and_then(|s| s.config.server.tcp_keepalive)
            .map(|k| crate::server::keepalive(&k));
        Ok(Box::new(peer))
    }

    /// Sends the path as it was matched and counted, and rewrites Host when
    /// the route asks for it.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let normal = normalize_path(upstream.uri.path());
        if normal != upstream.uri.path() {
            let target = match upstream.uri.query() {
                Some(q) => format!("{normal}?{q}"),
                None => normal.into_owned(),
            };
            let uri = target
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "normalised path", e))?;
            upstream.set_uri(uri);
        }
        if let Some(host) = ctx.live_route().and_then(|l| l.route.upstream.host_header.clone()) {
            upstream.insert_header(http::header::HOST, host)?;
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.stream.is_some() && !ctx.upgraded {
            if let Some(live) = ctx.live_route() {
                ctx.watchdog = Watchdog::start(fd, live.route.upstream.handshake_timeout);
            }
        }
        Ok(())
    }

    /// A 101 starts the stream; any other answer to an upgrade gives the
    /// slots back at once, while the response still streams to the client.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.watchdog = None;
        let Some(stream) = ctx.stream.as_mut() else {
            return Ok(());
        };
        if response.status != http::StatusCode::SWITCHING_PROTOCOLS {
            ctx.stream = None;
            self.count_failure(ctx, UpstreamFailure::Status);
            return Ok(());
        }

        ctx.upgraded = true;
        stream.upgraded_at = Some(Instant::now());
        // Pingora's 60 s default read timeout would cut a quiet WebSocket.
        session.set_read_timeout(stream.next_timeout()?);
        session.set_write_timeout(stream.idle_timeout);
        Ok(())
    }

    /// Upgraded bytes from the client: activity restarts the idle timer.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        refresh_timeouts(session, ctx)
    }

    /// Upgraded bytes from the upstream: activity restarts the idle timer too,
    /// so the idle timeout measures silence in both directions.
    fn response_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        refresh_timeouts(session, ctx)?;
        Ok(None)
    }

    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
        let reason = match e.etype() {
            ErrorType::ConnectTimedout => UpstreamFailure::Timeout,
            ErrorType::TLSHandshakeFailure | ErrorType::TLSHandshakeTimedout | ErrorType::InvalidCert => {
                UpstreamFailure::Tls
            }
            _ => UpstreamFailure::Refused,
        };
        self.count_failure(ctx, reason);
        // One attempt: a retry would hold the slot longer for little gain.
        e.set_retry(false);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let timed_out = ctx.watchdog.as_ref().is_some_and(Watchdog::fired);
        ctx.watchdog = None;
        if ctx.stream.is_some() && !ctx.upgraded && e.esource() == &ErrorSource::Upstream {
            let reason = if timed_out || e.etype() == &ErrorType::ReadTimedout {
                UpstreamFailure::Timeout
            } else {
                UpstreamFailure::Closed
            };
            self.count_failure(ctx, reason);
        }
        ctx.stream = None;

        let code = match e.etype() {
            _ if ctx.upgraded => 0,
            ErrorType::HTTPStatus(code) => *code,
            _ if timed_out => 504,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                _ => 500,
            },
        };
        if code > 0 {
            session.set_keepalive(None);
            if let Err(err) = session.respond_error(code).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // Not reached when Pingora shuts down with streams live; the context
        // is dropped then, and with it the permit.
        ctx.stream = None;
    }
}

impl Proxy {
    fn log_refusal(&self, route: &config::Route, client: IpAddr, scope: Scope, dry_run: bool) {
        if let Some(suppressed) = self.gateway.rejections.admit_line() {
            tracing::info!(
                route = %route.name,
                client = %client,
                scope = scope.as_str(),
                dry_run,
                suppressed,
                "upgrade refused"
            );
        }
    }

    fn count_failure(&self, ctx: &mut Ctx, reason: UpstreamFailure) {
        if ctx.failure.is_some() {
            return;
        }
        ctx.failure = Some(reason);
        if let Some(live) = ctx.live_route() {
            self.gateway
                .metrics
                .upstream_failures
                .with_label_values(&[&live.route.name, reason.as_str()])
                .inc();
        }
    }
}

fn refresh_timeouts(session: &mut Session, ctx: &Ctx) -> Result<()> {
    if let Some(stream) = ctx.stream.as_ref().filter(|_| ctx.upgraded) {
        session.set_read_timeout(stream.next_timeout()?);
    }
    Ok(())
}

/// The request's host: the Host header, or the authority of an absolute URI.
fn host_of(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

async fn respond_plain(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
    let mut head = ResponseHeader::build(status, Some(3))?;
    head.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(Bytes::from_static(body.as_bytes())), true).await
}

/// Resolves an upstream host without blocking a worker thread and without
/// panicking on failure (`HttpPeer::new` unwraps its own lookup).
async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Error::because(ErrorType::ConnectNoRoute, format!("resolving {host}"), e))?;
    addrs
        .next()
        .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, format!("{host} has no address")))
}

/// Shuts the upstream connection down if the upgrade is not answered in
/// time. Pingora has one read timeout for the handshake and the upgraded
/// stream alike, so the handshake gets its own timer.
///
/// The timer acts on a duplicate of the socket's descriptor, which it owns:
/// the number cannot be closed and reused by another connection while the
/// timer may still use it. Dropping the watchdog cancels the timer and closes
/// the duplicate.
struct Watchdog {
    task: tokio::task::JoinHandle<()>,
    fired: Arc<AtomicBool>,
}

struct OwnedDup(RawFd);

impl Drop for OwnedDup {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

impl Watchdog {
    fn start(fd: RawFd, after: Duration) -> Option<Self> {
        let dup = OwnedDup(nix::unistd::dup(fd).ok()?);
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            flag.store(true, Ordering::Release);
            let _ = nix::sys::socket::shutdown(dup.0, nix::sys::socket::Shutdown::Both);
            drop(dup);
        });
        Some(Self { task, fired })
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}
