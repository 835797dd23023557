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
//! Only upgrades that arrive after another request on a kept-alive
//! connection, or that the front door's own handshake
//! ([`handshake`](crate::handshake)) declines, take this way; the
//! admitted [`Stream`] lives in the request context.

use crate::admission::Scope;
use crate::config::{self, Upstream};
use crate::conn::{hand_off, Handoff};
use crate::gateway::{Gateway, LiveRoute, Snapshot};
use crate::metrics::UpstreamFailure;
use crate::refusal;
use crate::relay::{self, Bounds, End, Outcome, Phase};
use crate::request::{self, Kind};
use crate::route::normalize_path;
use crate::stream::{self, Stream};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType, Result};
use pingora_proxy::{ProxyHttp, Session};
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
        let key = found.key.as_deref();
        match stream::admit(&self.gateway, &snapshot, live, key, peer, &req.headers).await {
            Ok(admitted) => ctx.stream = Some(admitted),
            Err(scope) => {
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
        let mut peer = stream::peer_for(live, &snapshot.config).await?;
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

    /// Plain requests only (streams never reach Pingora's pipeline): a 101
    /// here would be a tunnel nobody counted, so it is a bad answer (502).
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        if upstream.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let why = "upstream switched protocols on a request that was not an upgrade";
            return Err(Error::explain(ErrorType::InvalidHTTPHeader, why).into_up());
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
        let prepared = match stream::peer_for(live, &snapshot.config).await {
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
                                        s.upgraded(at);
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
        stream::record(&self.gateway, live, outcome);
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
