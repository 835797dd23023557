//! The Pingora `ProxyHttp` implementation: the hooks a request passes
//! through, each calling the pure modules (`request`, `route`, `client`,
//! `admission`) and recording what happened.
//!
//! Plain HTTP goes through Pingora's proxy pipeline. An admitted stream's
//! handshake is carried by [`relay`](crate::relay) from inside
//! `request_filter`, which then answers "handled", so the pipeline never
//! touches it; after a 101 the stream is handed to its connection
//! ([`conn`](crate::conn)) and relayed there.
//!
//! A stream's slots are held by the [`Permit`] inside [`Stream`], which lives
//! in the request context. Every way a stream ends drops it (and a non-101
//! answer drops it early), so release is always `Drop`.

use crate::admission::{Admission, Ask, Permit, Scope};
use crate::client::Client;
use crate::config::{self, Upstream};
use crate::conn::{hand_off, Handoff};
use crate::gateway::{Gateway, LiveRoute, Snapshot};
use crate::metrics::UpstreamFailure;
use crate::refusal;
use crate::relay::{self, Bounds, End, Outcome, Phase};
use crate::request::{self, Kind};
use crate::route::normalize_path;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType, Result};
use pingora_proxy::{ProxyHttp, Session};
use prometheus::Histogram;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

pub struct Proxy {
    gateway: Arc<Gateway>,
    /// Upstream connections for streams (TLS contexts are built once).
    connector: Connector,
}

impl Proxy {
    pub fn new(gateway: Arc<Gateway>, connector: Connector) -> Self {
        Self { gateway, connector }
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
}

impl Ctx {
    fn live_route(&self) -> Option<&LiveRoute> {
        Some(&self.snapshot.as_ref()?.routes[self.route?])
    }
}

/// An admitted stream: its slots and its timing. Dropping it gives the
/// slots back and records the stream's duration if it was upgraded.
pub struct Stream {
    _permit: Permit,
    duration: Histogram,
    upgraded_at: Option<Instant>,
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

    /// Routes the request. An upgrade is admitted or refused here, and an
    /// admitted one is carried to its end here; both answer `true`
    /// ("handled"), so only plain HTTP continues down Pingora's pipeline.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snapshot = self.gateway.snapshot();
        let kind = request::classify(session.req_header());
        match kind {
            Kind::OtherUpgrade => {
                session
                    .req_header_mut()
                    .remove_header(&http::header::UPGRADE);
            }
            Kind::BadUpgrade(why) => {
                session.set_keepalive(None);
                respond_plain(session, 400, why).await?;
                return Ok(true);
            }
            Kind::Plain | Kind::Stream => {}
        }

        let req = session.req_header();
        let path = normalize_path(req.uri.path());
        let Some(found) = snapshot.config.router.find(host_of(req), &path) else {
            respond_plain(session, 404, "no route for this host and path").await?;
            return Ok(true);
        };
        ctx.route = Some(found.route);
        ctx.snapshot = Some(snapshot.clone());
        if kind != Kind::Stream {
            return Ok(false);
        }

        let live = &snapshot.routes[found.route];
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), SocketAddr::ip);
        let client = snapshot.config.client.identify(peer, &req.headers);
        let ask = ask_for(&snapshot.config, &live.route, found.key.as_deref(), &client);

        match self.gateway.admit(live, &ask).await {
            Admission::Admitted {
                permit,
                would_refuse,
            } => {
                if let Some(scope) = would_refuse {
                    live.rejected(scope, true).inc();
                    self.log_refusal(&live.route, &client, scope, true);
                }
                live.admitted.inc();
                ctx.stream = Some(Stream {
                    _permit: permit,
                    duration: live.duration.clone(),
                    upgraded_at: None,
                });
            }
            Admission::Refused(scope) => {
                live.rejected(scope, false).inc();
                self.log_refusal(&live.route, &client, scope, false);
                refuse(session, &live.route, scope).await?;
                return Ok(true);
            }
        }

        self.carry(session, ctx, &snapshot, live).await;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(snapshot), Some(live)) = (ctx.snapshot.as_ref(), ctx.live_route()) else {
            return Error::e_explain(ErrorType::InternalError, "request has no route");
        };
        let mut peer = peer_for(live, &snapshot.config).await?;
        peer.options.read_timeout = Some(live.route.upstream.handshake_timeout);
        Ok(Box::new(peer))
    }

    /// Plain requests: the path as it was matched, and the route's Host.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(live) = ctx.live_route() {
            rewrite(upstream, &live.route.upstream)?;
        }
        Ok(())
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // Not reached when Pingora shuts down with streams live; the context
        // is dropped then, and with it the permit.
        ctx.stream = None;
    }
}

impl Proxy {
    /// Connects an admitted stream to its upstream and relays it to its end.
    async fn carry(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        snapshot: &Snapshot,
        live: &LiveRoute,
    ) {
        let route = &live.route;
        let mut request = session.req_header().clone();
        let prepared = match peer_for(live, &snapshot.config).await {
            Ok(peer) => rewrite(&mut request, &route.upstream).map(|()| peer),
            Err(e) => Err(e),
        };
        let outcome =
            match prepared {
                Ok(peer) => {
                    let bounds = Bounds {
                        handshake_timeout: route.upstream.handshake_timeout,
                        idle_timeout: route.idle_timeout,
                        deadline: route.max_lifetime.map(|d| Instant::now() + d),
                    };
                    let stream = &mut ctx.stream;
                    let outcome =
                        relay::run(session, &self.connector, &peer, request, bounds, |phase| {
                            match phase {
                                Phase::Upgraded(at) => {
                                    if let Some(s) = stream.as_mut() {
                                        s.upgraded_at = Some(at);
                                    }
                                }
                                Phase::NotUpgraded => *stream = None,
                            }
                        })
                        .await;
                    match (outcome, ctx.stream.take()) {
                        (Outcome::Upgraded(upgraded), Some(admitted)) => {
                            let handoff = Handoff {
                                upgraded,
                                bounds,
                                admitted,
                                route: route.name.clone(),
                            };
                            // The connection relays the stream once this
                            // session has ended; see `conn`.
                            if hand_off(session, handoff).is_ok() {
                                return;
                            }
                            Outcome::Ended(End::ClientError)
                        }
                        (outcome, _) => outcome,
                    }
                }
                // The upstream's name did not resolve (or the request could not
                // be rewritten): nothing was sent, so it is a refused connection.
                Err(e) => {
                    ctx.stream = None;
                    session.set_keepalive(None);
                    let _ = session.respond_error(502).await;
                    Outcome::Failed {
                        reason: UpstreamFailure::Refused,
                        answered: 502,
                        error: Some(e),
                    }
                }
            };
        ctx.stream = None;
        self.record(live, outcome);
    }

    /// Counts and logs how a stream ended; upstream faults are logged
    /// through the same budget as refusals, so a failing upstream under a
    /// flood cannot fill a disk either.
    fn record(&self, live: &LiveRoute, outcome: Outcome) {
        let route = &live.route.name;
        match outcome {
            Outcome::Failed {
                reason,
                answered,
                error,
            } => {
                self.count_failure(live, reason);
                let mut error = error.map_or_else(String::new, |e| e.to_string());
                // The error may quote what the upstream sent: keep the line short.
                if let Some((at, _)) = error.char_indices().nth(LOGGED_ERROR_CHARS) {
                    error.truncate(at);
                    error.push('…');
                }
                if reason == UpstreamFailure::Status {
                    // The upstream's own answer: its decision, not a fault.
                    tracing::debug!(%route, answered, "upstream declined the upgrade");
                } else if let Some(suppressed) = self.gateway.failure_log.admit_line() {
                    tracing::warn!(
                        %route,
                        reason = reason.as_str(),
                        answered,
                        %error,
                        suppressed,
                        "upstream failed the upgrade"
                    );
                }
            }
            Outcome::Ended(end) => {
                tracing::debug!(%route, end = end.as_str(), "stream ended");
            }
            Outcome::Upgraded(_) => {
                tracing::debug!(%route, "stream ended: it could not be handed over");
            }
        }
    }

    fn log_refusal(&self, route: &config::Route, client: &Client, scope: Scope, dry_run: bool) {
        let Some(suppressed) = self.gateway.rejections.admit_line() else {
            return;
        };
        let (route, client, scope) = (&route.name, client.addr, scope.as_str());
        if dry_run {
            tracing::info!(%route, %client, scope, dry_run, suppressed, "upgrade would be refused (dry run: admitted)");
        } else {
            tracing::info!(%route, %client, scope, dry_run, suppressed, "upgrade refused");
        }
    }

    fn count_failure(&self, live: &LiveRoute, reason: UpstreamFailure) {
        self.gateway
            .metrics
            .upstream_failures
            .with_label_values(&[&live.route.name, reason.as_str()])
            .inc();
    }
}

/// The most of an upstream error a log line quotes.
const LOGGED_ERROR_CHARS: usize = 512;

/// What admission is asked for one upgrade: the route's limits with any
/// override for this client (matched on its own address) or this key, and
/// the client's counting identity.
fn ask_for<'a>(
    config: &config::Config,
    route: &config::Route,
    key: Option<&'a str>,
    client: &Client,
) -> Ask<'a> {
    let mut limits = route.limits;
    limits.per_client = route
        .overrides
        .per_client(client.addr)
        .or(limits.per_client);
    limits.per_key = key
        .and_then(|k| route.overrides.per_key(k))
        .or(limits.per_key);
    let global_per_client = config
        .global_overrides
        .per_client(client.addr)
        .or(config.global_per_client);
    Ask {
        limits,
        global_per_client,
        key,
        client: client.key,
        client_exempt: client.exempt,
        rate: route.rate,
        global_rate: config.global_rate,
        dry_run: route.dry_run,
        tracking: config.tracking,
    }
}

/// Answers an upgrade over a limit and closes the connection.
async fn refuse(session: &mut Session, route: &config::Route, scope: Scope) -> Result<()> {
    let wait = refusal::retry_after(route.retry_after, route.retry_after_jitter);
    let (head, body) = refusal::response(route.reject_status, wait, &route.name, scope);
    session.set_keepalive(None);
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(body), true).await
}

/// The peer for a route's upstream, with its timeouts and TLS settings.
async fn peer_for(live: &LiveRoute, config: &config::Config) -> Result<HttpPeer> {
    let up = &live.route.upstream;
    let addr = resolve(&up.host, up.port).await?;
    let mut peer = HttpPeer::new(addr, up.tls, up.sni.clone());
    peer.group_key = live.ca_group;
    let o = &mut peer.options;
    o.connection_timeout = Some(up.connect_timeout);
    o.total_connection_timeout = Some(up.connect_timeout);
    o.verify_cert = up.verify_cert;
    o.verify_hostname = up.verify_cert;
    o.ca = live.ca.clone();
    o.tcp_keepalive = config
        .server
        .tcp_keepalive
        .map(|k| crate::server::keepalive(&k));
    Ok(peer)
}

/// Sends the path as it was matched and counted, and the route's Host.
fn rewrite(req: &mut RequestHeader, up: &Upstream) -> Result<()> {
    let normal = normalize_path(req.uri.path());
    if normal != req.uri.path() {
        let target = match req.uri.query() {
            Some(q) => format!("{normal}?{q}"),
            None => normal.into_owned(),
        };
        let uri = target
            .parse::<http::Uri>()
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "normalised path", e))?;
        req.set_uri(uri);
    }
    if let Some(host) = &up.host_header {
        req.insert_header(http::header::HOST, host.as_str())?;
    }
    Ok(())
}

/// The request's host: the authority of an absolute-form URI, which RFC 9112
/// puts before the Host header, or else the Host header.
fn host_of(req: &RequestHeader) -> Option<&str> {
    req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// A short plain-text answer from wsgate itself: `wsgate: {what}`.
async fn respond_plain(session: &mut Session, status: u16, what: &str) -> Result<()> {
    let body = format!("wsgate: {what}\n");
    let mut head = ResponseHeader::build(status, Some(3))?;
    head.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(head), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
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
