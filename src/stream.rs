//! What every upgrade goes through, whichever way it entered (Pingora's
//! proxy, or the front door's own handshake in [`handshake`](crate::handshake)):
//! admission with its counters and log line, the upstream peer it is sent
//! to, and the record of how it ended.
//!
//! A stream's slots are held by the [`Permit`] inside [`Stream`]. Every way
//! a stream ends drops it (a non-101 answer drops it early), so release is
//! always `Drop`.

use crate::admission::{Admission, Ask, Permit, Scope};
use crate::client::Client;
use crate::config;
use crate::gateway::{Gateway, LiveRoute, Snapshot};
use crate::metrics::UpstreamFailure;
use crate::relay::Outcome;
use http::HeaderMap;
use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType, Result};
use prometheus::Histogram;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// An admitted stream: its slots and its timing. Dropping it gives the
/// slots back and records the stream's duration if it was upgraded.
pub struct Stream {
    _permit: Permit,
    duration: Histogram,
    upgraded_at: Option<Instant>,
}

impl Stream {
    /// Marks the moment the 101 reached the client: the stream's duration
    /// counts from here.
    pub fn upgraded(&mut self, at: Instant) {
        self.upgraded_at = Some(at);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(at) = self.upgraded_at {
            self.duration.observe(at.elapsed().as_secs_f64());
        }
    }
}

/// Asks admission for one upgrade on `live` from the connection's `peer`,
/// and counts and logs the answer. `Err` carries the scope that refused.
pub async fn admit(
    gateway: &Gateway,
    snapshot: &Snapshot,
    live: &LiveRoute,
    key: Option<&str>,
    peer: IpAddr,
    headers: &HeaderMap,
) -> Result<Stream, Scope> {
    let client = snapshot.config.client.identify(peer, headers);
    let ask = ask_for(&snapshot.config, &live.route, key, &client);

    match gateway.admit(live, &ask).await {
        Admission::Admitted {
            permit,
            would_refuse,
        } => {
            if let Some(scope) = would_refuse {
                live.rejected(scope, true).inc();
                log_refusal(gateway, &live.route, &client, scope, true);
            }
            live.admitted.inc();
            Ok(Stream {
                _permit: permit,
                duration: live.duration.clone(),
                upgraded_at: None,
            })
        }
        Admission::Refused(scope) => {
            live.rejected(scope, false).inc();
            log_refusal(gateway, &live.route, &client, scope, false);
            Err(scope)
        }
    }
}

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

fn log_refusal(
    gateway: &Gateway,
    route: &config::Route,
    client: &Client,
    scope: Scope,
    dry_run: bool,
) {
    let Some(suppressed) = gateway.rejections.admit_line() else {
        return;
    };
    let (route, client, scope) = (&route.name, client.addr, scope.as_str());
    if dry_run {
        tracing::info!(%route, %client, scope, dry_run, suppressed, "upgrade would be refused (dry run: admitted)");
    } else {
        tracing::info!(%route, %client, scope, dry_run, suppressed, "upgrade refused");
    }
}

/// Counts and logs how a stream ended; upstream faults are logged through
/// the same budget as refusals, so a failing upstream under a flood cannot
/// fill a disk either.
pub fn record(gateway: &Gateway, live: &LiveRoute, outcome: Outcome) {
    let route = &live.route.name;
    match outcome {
        Outcome::Failed {
            reason,
            answered,
            error,
        } => {
            gateway
                .metrics
                .upstream_failures
                .with_label_values(&[route, reason.as_str()])
                .inc();
            let mut error = error.map_or_else(String::new, |e| e.to_string());
            // The error may quote what the upstream sent: keep the line short.
            if let Some((at, _)) = error.char_indices().nth(LOGGED_ERROR_CHARS) {
                error.truncate(at);
                error.push('…');
            }
            if reason == UpstreamFailure::Status {
                // The upstream's own answer: its decision, not a fault.
                tracing::debug!(%route, answered, "upstream declined the upgrade");
            } else if let Some(suppressed) = gateway.failure_log.admit_line() {
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

/// The most of an upstream error a log line quotes.
const LOGGED_ERROR_CHARS: usize = 512;

/// The peer for a route's upstream, with its timeouts and TLS settings.
pub async fn peer_for(live: &LiveRoute, config: &config::Config) -> Result<HttpPeer> {
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
