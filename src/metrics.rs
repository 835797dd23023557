//! Prometheus metrics. Every name starts with `wsgate_`; label values come
//! from route names and closed enums only, never a client address or a key.
//!
//! Gauges that mirror the admission table (live streams, tracked keys) are
//! read from the table at scrape time rather than kept in step by hand, so
//! they cannot drift from the counts that admission actually enforces.

use crate::admission::{AdmissionTable, Scope};
use crate::config::Config;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Why an upstream did not complete an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The TCP connection was refused or could not be made.
    Refused,
    /// The upstream answered, but not with 101.
    Status,
    Tls,
    Timeout,
    /// Reset or closed before answering.
    Closed,
}

impl UpstreamFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Refused => "refused",
            UpstreamFailure::Status => "status",
            UpstreamFailure::Tls => "tls",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Closed => "closed",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    streams_active: IntGaugeVec,
    pub admitted: IntCounterVec,
    pub rejected: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_failures: IntCounterVec,
    limits: IntGaugeVec,
    tracked_keys: IntGaugeVec,
    busiest: IntGaugeVec,
    tracked_global: IntGauge,
    pub reloads: IntCounterVec,
    pub last_reload_success: IntGauge,
    pub last_reload_success_time: IntGauge,
    pub connections_open: IntGauge,
    pub connections_closed: IntCounterVec,
    /// One scrape at a time: a scrape clears the table's gauges and sets
    /// them again, and one running alongside must not read them cleared.
    render: std::sync::Mutex<()>,
}

/// Why wsgate closed a client connection before any request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionClosed {
    /// The client already had its maximum of open connections.
    ClientConnections,
    /// The request head did not arrive whole within `server.head_timeout`.
    HeadTimeout,
    /// The request head was longer than `server.max_head_bytes`.
    HeadTooLarge,
}

impl ConnectionClosed {
    pub const ALL: [ConnectionClosed; 3] = [
        ConnectionClosed::ClientConnections,
        ConnectionClosed::HeadTimeout,
        ConnectionClosed::HeadTooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionClosed::ClientConnections => "client_connections",
            ConnectionClosed::HeadTimeout => "head_timeout",
            ConnectionClosed::HeadTooLarge => "head_too_large",
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let streams_active = IntGaugeVec::new(
            Opts::new(
                "wsgate_streams_active",
                "Live upgraded streams (slots held) per route.",
            ),
            &["route"],
        )
        .expect("valid metric");
        let admitted = IntCounterVec::new(
            Opts::new(
                "wsgate_streams_admitted_total",
                "Upgrade requests admitted per route.",
            ),
            &["route"],
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "wsgate_streams_rejected_total",
                "Upgrade requests refused per route and full scope; dry_run=\"true\" counts would-be refusals.",
            ),
            &["route", "scope", "dry_run"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "wsgate_stream_duration_seconds",
                "Lifetime of upgraded streams.",
            )
            .buckets(vec![
                1.0,
                5.0,
                15.0,
                60.0,
                300.0,
                900.0,
                3600.0,
                4.0 * 3600.0,
                12.0 * 3600.0,
                86400.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "wsgate_upstream_upgrade_failures_total",
                "Admitted upgrades the upstream did not complete, by reason.",
            ),
            &["route", "reason"],
        )
        .expect("valid metric");
        let limits = IntGaugeVec::new(
            Opts::new(
                "wsgate_limit_streams",
                "Configured stream limits per route and scope.",
            ),
            &["route", "scope"],
        )
        .expect("valid metric");
        let tracked_keys = IntGaugeVec::new(
            Opts::new(
                "wsgate_tracked_keys",
                "Keys (route keys, clients) holding at least one slot.",
            ),
            &["route", "scope"],
        )
        .expect("valid metric");
        let busiest = IntGaugeVec::new(
            Opts::new(
                "wsgate_streams_busiest",
                "Live streams of the busiest key (room, client) per route and scope, to compare with its limit.",
            ),
            &["route", "scope"],
        )
        .expect("valid metric");
        let tracked_global = IntGauge::new(
            "wsgate_tracked_global_clients",
            "Clients holding a slot under the global per-client limit.",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new("wsgate_config_reloads_total", "Config reloads by result."),
            &["result"],
        )
        .expect("valid metric");
        let last_reload_success = IntGauge::new(
            "wsgate_config_last_reload_success",
            "1 if the last reload attempt succeeded.",
        )
        .expect("valid metric");
        let last_reload_success_time = IntGauge::new(
            "wsgate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("valid metric");
        let connections_open = IntGauge::new(
            "wsgate_client_connections",
            "Open client connections on the proxy listeners, upgraded or not.",
        )
        .expect("valid metric");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "wsgate_client_connections_closed_total",
                "Client connections wsgate closed before answering, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");

        for c in [
            Box::new(streams_active.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(admitted.clone()),
            Box::new(rejected.clone()),
            Box::new(duration.clone()),
            Box::new(upstream_failures.clone()),
            Box::new(limits.clone()),
            Box::new(tracked_keys.clone()),
            Box::new(busiest.clone()),
            Box::new(tracked_global.clone()),
            Box::new(reloads.clone()),
            Box::new(last_reload_success.clone()),
            Box::new(last_reload_success_time.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_closed.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        last_reload_success.set(1);
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        for reason in ConnectionClosed::ALL {
            connections_closed.with_label_values(&[reason.as_str()]);
        }

        Self {
            registry,
            streams_active,
            admitted,
            rejected,
            duration,
            upstream_failures,
            limits,
            tracked_keys,
            busiest,
            tracked_global,
            reloads,
            last_reload_success,
            last_reload_success_time,
            connections_open,
            connections_closed,
            render: std::sync::Mutex::new(()),
        }
    }

    /// The registry, for metrics owned by other modules (the fleet's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets the per-route series to the config just applied: limits, and
    /// zeroed counters so a route shows up before its first stream.
    pub fn apply_config(&self, config: &Config) {
        self.limits.reset();
        for route in &config.routes {
            let name = route.name.as_ref();
            let l = route.limits;
            for (scope, limit) in [
                (Scope::Route, l.total),
                (Scope::Key, l.per_key),
                (Scope::Client, l.per_client),
                (Scope::GlobalClient, config.global_per_client),
            ] {
                if let Some(limit) = limit {
                    self.limits
                        .with_label_values(&[name, scope.as_str()])
                        .set(i64::from(limit));
                }
            }
            self.admitted.with_label_values(&[name]);
        }
    }

    /// The Prometheus text exposition of wsgate's metrics and Pingora's own.
    pub fn render(&self, table: &AdmissionTable) -> String {
        let _one_at_a_time = self.render.lock().unwrap_or_else(|e| e.into_inner());
        self.streams_active.reset();
        self.tracked_keys.reset();
        self.busiest.reset();
        for (name, slots) in table.routes() {
            self.streams_active
                .with_label_values(&[&name])
                .set(i64::from(slots.live()));
            let keyed = [
                (Scope::Key, slots.keys().tracked()),
                (Scope::Client, slots.clients().tracked()),
                (Scope::ClientRate, slots.rate().tracked()),
            ];
            for (scope, n) in keyed {
                self.tracked_keys
                    .with_label_values(&[&name, scope.as_str()])
                    .set(n as i64);
            }
            let busiest = [
                (Scope::Key, slots.keys().max()),
                (Scope::Client, slots.clients().max()),
            ];
            for (scope, n) in busiest {
                self.busiest
                    .with_label_values(&[&name, scope.as_str()])
                    .set(i64::from(n));
            }
        }

        self.tracked_global
            .set(table.global_clients().tracked() as i64);

        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&families, &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
