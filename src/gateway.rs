//! The gateway's shared state: the config in force, the admission table and
//! the metrics, and how a new config is put in force.
//!
//! A request reads one [`Snapshot`] at its start and keeps it to its end, so a
//! reload never changes the rules under a request in flight. Counts live in
//! the [`AdmissionTable`], outside the snapshot, so they survive reloads.

use crate::admission::{Admission, AdmissionTable, Ask, RouteSlots, Scope};
use crate::cluster::Fleet;
use crate::config::{Config, Route};
use crate::metrics::Metrics;
use crate::refusal::RejectionLog;
use arc_swap::ArcSwap;
use pingora::utils::tls::WrappedX509;
use prometheus::{Histogram, IntCounter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One route with everything the hot path needs already looked up: its
/// slots and its metric children, so admission allocates nothing for them.
pub struct LiveRoute {
    pub route: Arc<Route>,
    pub slots: Arc<RouteSlots>,
    pub admitted: IntCounter,
    pub duration: Histogram,
    /// Indexed by `[scope][dry_run]`.
    rejected: [[IntCounter; 2]; Scope::ALL.len()],
    /// The upstream's own CA certificates, loaded once per config.
    pub ca: Option<Arc<[WrappedX509]>>,
    /// Pingora's upstream pool keys a connection by address, SNI and verify
    /// flags but not by CA, so one verified against another route's CA (or
    /// a replaced file's) could be reused here; this group keeps them apart.
    /// 0 without a CA of its own.
    pub ca_group: u64,
}

impl LiveRoute {
    pub fn rejected(&self, scope: Scope, dry_run: bool) -> &IntCounter {
        let i = Scope::ALL.iter().position(|s| *s == scope).unwrap_or(0);
        &self.rejected[i][usize::from(dry_run)]
    }
}

/// A config and the live routes built from it.
pub struct Snapshot {
    pub config: Config,
    pub routes: Vec<LiveRoute>,
}

pub struct Gateway {
    live: ArcSwap<Snapshot>,
    pub table: AdmissionTable,
    pub metrics: Metrics,
    /// The fleet's shared counts, when the config has a `cluster` section.
    pub fleet: Option<Arc<Fleet>>,
    pub rejections: RejectionLog,
    /// Budget for the warning logged when an upstream fails an upgrade.
    pub failure_log: RejectionLog,
    /// Set while upgrades wait for the processes this one took over from
    /// (see `upgrade`).
    awaiting_previous: AtomicBool,
}

/// Why a config could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{file}: routes[{index}].upstream.ca_file: {message}")]
    CaFile {
        file: String,
        index: usize,
        message: String,
    },
    #[error("{file}: cluster.redis: {source}")]
    Cluster {
        file: String,
        source: crate::cluster::StoreError,
    },
}

impl Gateway {
    pub fn new(config: Config) -> Result<Arc<Self>, ApplyError> {
        let table = AdmissionTable::new();
        let metrics = Metrics::new();
        let snapshot = build(&config, &table, &metrics)?;
        metrics.apply_config(&config);
        metrics.last_reload_success_time.set(unix_now());
        let rejections = RejectionLog::new(config.rejections_per_second);
        let failure_log = RejectionLog::new(config.rejections_per_second);
        let fleet = match &config.cluster {
            None => None,
            Some(c) => Some(Fleet::new(c.clone(), metrics.registry()).map_err(|source| {
                ApplyError::Cluster {
                    file: config.file.display().to_string(),
                    source,
                }
            })?),
        };
        Ok(Arc::new(Self {
            live: ArcSwap::from_pointee(Snapshot {
                config,
                routes: snapshot,
            }),
            table,
            metrics,
            fleet,
            rejections,
            failure_log,
            awaiting_previous: AtomicBool::new(false),
        }))
    }

    /// Takes the slots of one upgrade on `live`: in this instance's table,
    /// then, with a fleet, in the fleet's shared counts.
    pub async fn admit(&self, live: &LiveRoute, ask: &Ask<'_>) -> Admission {
        // A previous process may still hold streams this one cannot count.
        let waiting = self.awaiting_previous();
        if waiting && !ask.dry_run {
            return Admission::Refused(Scope::PreviousProcess);
        }
        let admission = self.admit_counted(live, ask).await;
        match admission {
            Admission::Admitted {
                permit,
                would_refuse: None,
            } if waiting => Admission::Admitted {
                permit,
                would_refuse: Some(Scope::PreviousProcess),
            },
            other => other,
        }
    }

    async fn admit_counted(&self, live: &LiveRoute, ask: &Ask<'_>) -> Admission {
        let local = self.table.admit(&live.slots, ask);
        match &self.fleet {
            None => local,
            // Boxed: the Redis call makes this future several KB, and
            // inline it would size every upgrade's task, fleet or not.
            Some(fleet) => {
                Box::pin(fleet.admit(&self.table, &live.route.name, &live.slots, ask, local)).await
            }
        }
    }

    /// While set, upgrades are refused with scope `previous_process`.
    pub fn set_awaiting_previous(&self, waiting: bool) {
        self.awaiting_previous.store(waiting, Ordering::Release);
    }

    pub fn awaiting_previous(&self) -> bool {
        self.awaiting_previous.load(Ordering::Acquire)
    }

    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// Puts `config` in force for new requests. Live streams keep their
    /// permits, so their slots stay counted under their route's name.
    pub fn apply(&self, config: Config) -> Result<(), ApplyError> {
        let routes = build(&config, &self.table, &self.metrics)?;
        self.table.retain_routes(&route_names(&config));
        self.metrics.apply_config(&config);
        self.rejections.set_rate(config.rejections_per_second);
        self.failure_log.set_rate(config.rejections_per_second);
        self.live.store(Arc::new(Snapshot { config, routes }));
        Ok(())
    }
}

impl Gateway {
    /// Periodic upkeep: forgets refilled rate buckets, and the counts of
    /// removed routes once their last stream has ended.
    pub fn sweep(&self) {
        self.table.sweep();
        self.table
            .retain_routes(&route_names(&self.snapshot().config));
    }
}

fn route_names(config: &Config) -> Vec<&str> {
    config.routes.iter().map(|r| r.name.as_ref()).collect()
}

fn build(
    config: &Config,
    table: &AdmissionTable,
    metrics: &Metrics,
) -> Result<Vec<LiveRoute>, ApplyError> {
    let mut out = Vec::with_capacity(config.routes.len());
    for (index, route) in config.routes.iter().enumerate() {
        let name = route.name.as_ref();
        let ca = match &route.upstream.ca_file {
            None => None,
            Some(path) => Some(load_ca(path).map_err(|message| ApplyError::CaFile {
                file: config.file.display().to_string(),
                index,
                message,
            })?),
        };
        let rejected = Scope::ALL.map(|scope| {
            ["false", "true"].map(|dry| {
                metrics
                    .rejected
                    .with_label_values(&[name, scope.as_str(), dry])
            })
        });
        out.push(LiveRoute {
            route: route.clone(),
            slots: table.route(name),
            admitted: metrics.admitted.with_label_values(&[name]),
            duration: metrics.duration.with_label_values(&[name]),
            rejected,
            ca_group: ca.as_deref().map_or(0, ca_group),
            ca,
        });
    }
    Ok(out)
}

fn load_ca(path: &std::path::Path) -> Result<Arc<[WrappedX509]>, String> {
    let certs = crate::pem::certificates(path).map_err(|e| e.to_string())?;
    Ok(certs
        .iter()
        .map(|der| WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509))
        .collect())
}

/// A pool group for connections verified against `certs`: a hash of their
/// DER bytes, so a changed file gets a group of its own.
fn ca_group(certs: &[WrappedX509]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for cert in certs {
        cert.borrow_raw_cert().hash(&mut hasher);
    }
    hasher.finish()
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
