//! Wiring: turns a validated [`Config`] into a running Pingora server with
//! the proxy listeners and the admin listener.

use crate::accept::{Accepting, SettleBeforeTls};
use crate::admin::Admin;
use crate::config::{AfterUpgrade, Config, Keepalive};
use crate::conn::Front;
use crate::gateway::Gateway;
use crate::listen::Listening;
use crate::proxy::Proxy;
use crate::reload::{ReloadService, Reloader};
use crate::upgrade::PreviousWatch;
use anyhow::Context;
use async_trait::async_trait;
use pingora::connectors::http::v1::Connector;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{ListenerConfig, Listeners};
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::protocols::TcpKeepalive;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::ShutdownWatch;
use pingora::server::{ExecutionPhase, Server};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Client connections go without Pingora's L4 buffers (64 KiB for reads,
/// 1460 bytes for writes): they would stay with every held stream. Request
/// heads are read into the HTTP session's own buffer, relayed bytes into a
/// scratch buffer on the stack (see `relay::pump`), and each write is a
/// whole head, body chunk or relayed read already. `accept::settle` makes
/// its streams unbuffered too, so these must stay at zero.
pub(crate) const L4_BUFFER: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: Some(0),
};

/// Options from the command line that Pingora acts on.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take the listeners over from a running wsgate (Pingora's upgrade).
    pub upgrade: bool,
    /// With `upgrade`, the wsgate processes that may still be draining (see
    /// `upgrade::previous_pids`).
    pub previous: Vec<u32>,
}

/// Pingora's keepalive settings for ours. The user timeout bounds how long
/// unacknowledged data may sit, so a vanished peer with a full send buffer
/// is reaped too, not only an idle one.
pub fn keepalive(k: &Keepalive) -> TcpKeepalive {
    TcpKeepalive {
        idle: k.idle,
        interval: k.interval,
        count: k.count,
        #[cfg(target_os = "linux")]
        user_timeout: crate::listen::user_timeout(k),
    }
}

/// How long Pingora's runtimes get to stop, once it stops them, before the
/// process exits anyway.
const EXIT_BOUND: Duration = Duration::from_secs(3);

/// Bounds the last step of every shutdown. Pingora stops its runtimes and
/// waits for each. On SIGINT it does so without stopping its accept loops
/// first, and with a runtime per thread (`work_stealing: false`) an accept
/// loop whose listener was registered on a thread already stopped fails at
/// once, forever, without yielding: its own thread never stops, and neither
/// does the process. By then nothing is served any more, so the process
/// exits `EXIT_BOUND` after the runtimes are told to stop, whatever they do.
pub fn bound_exit(server: &Server) {
    let mut phases = server.watch_execution_phase();
    let watch = move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownRuntimes) => {
                std::thread::sleep(EXIT_BOUND);
                tracing::warn!(bound = ?EXIT_BOUND, "runtimes did not stop in time; exiting");
                std::process::exit(0);
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("wsgate exit".into())
        .spawn(watch)
    {
        tracing::warn!(error = %e, "cannot bound the shutdown's last step");
    }
}

/// Builds the server; returns it ready for `run_forever`.
pub fn build(config: Config, options: RunOptions) -> anyhow::Result<(Server, Arc<Gateway>)> {
    for path in [&config.server.pid_file, &config.server.upgrade_sock] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }

    if !options.upgrade {
        check_bindable(&config)?;
    }

    let conf = ServerConf {
        threads: config.server.threads,
        work_stealing: config.server.work_stealing,
        pid_file: config.server.pid_file.display().to_string(),
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);

    let gateway = Gateway::new(config.clone()).context("applying the config")?;
    let connect = ConnectorOptions::from_server_conf(&server.configuration);
    let connector = Connector::new(Some(connect.clone()));
    // With a runtime per thread, sockets are moved to the thread serving
    // them (see `accept`); with one shared runtime there is nowhere to move.
    let settle = !config.server.work_stealing;
    let front = Front::new(
        pingora_proxy::http_proxy(
            &server.configuration,
            Proxy::new(gateway.clone(), connector),
        ),
        gateway.clone(),
        TransportConnector::new(Some(connect)),
        settle,
    );
    let mut listeners = Listeners::new();
    if settle {
        listeners.set_pre_tls_callback(Arc::new(SettleBeforeTls));
    }
    // No socket options for Pingora to set on each accepted socket: the
    // keepalive is set once on each listening socket, by `Listening`, for
    // accepted sockets to inherit.
    for listener in &config.listeners {
        let mut endpoint = ListenerConfig::tcp(listener.address.clone()).l4_buffer(L4_BUFFER);
        if let Some((cert, key)) = &listener.tls {
            let cert = cert.display().to_string();
            let key = key.display().to_string();
            let mut tls = TlsSettings::intermediate(&cert, &key).with_context(|| {
                format!(
                    "{}: loading TLS certificate {cert} and key {key}",
                    config.file.display()
                )
            })?;
            // WebSocket upgrades exist on HTTP/1.1 only.
            tls.set_alpn(pingora::protocols::ALPN::H1);
            endpoint = endpoint.tls(tls);
        }
        listeners.add_listener(endpoint);
    }
    let mut proxy = Service::with_listeners("wsgate proxy".to_string(), listeners, front);
    if settle {
        proxy.set_connection_filter(Arc::new(Accepting));
    }
    let addresses = config.listeners.iter().map(|l| l.address.clone()).collect();
    let proxy = Listening::new(proxy, addresses, config.server.tcp_keepalive);

    let mut admin = Service::new("wsgate admin".to_string(), Admin::new(gateway.clone()));
    admin.add_tcp(&config.admin.to_string());

    let reloader = Arc::new(Reloader::new(config.file.clone(), gateway.clone()));
    let reload = background_service("wsgate reload", ReloadService::new(reloader));
    let sweep = background_service("wsgate sweep", Sweeper(gateway.clone()));

    server.add_service(proxy);
    if options.upgrade {
        wait_for_previous(&config, options.previous, &gateway, &mut server)?;
    }

    server.add_service(admin);
    server.add_service(reload);
    server.add_service(sweep);
    if let Some(fleet) = &gateway.fleet {
        server.add_service(background_service(
            "wsgate fleet",
            crate::cluster::FleetService(fleet.clone()),
        ));
    }
    Ok((server, gateway))
}

/// After `--upgrade`, holds upgrades back until the previous processes
/// have exited, unless the config says to admit at once (or a fleet shares
/// the counts, so all processes are counted together).
fn wait_for_previous(
    config: &Config,
    previous: Vec<u32>,
    gateway: &Arc<Gateway>,
    server: &mut Server,
) -> anyhow::Result<()> {
    let wait = match config.server.after_upgrade {
        Some(AfterUpgrade::Wait) => true,
        Some(AfterUpgrade::Admit) => false,
        None => config.cluster.is_none(),
    };
    if !wait {
        tracing::info!(
            ?previous,
            "took over from a previous process; admitting at once"
        );
        return Ok(());
    }

    let pid_file = &config.server.pid_file;
    let deadline = if previous.is_empty() {
        // Nothing to watch: wait as long as any predecessor can drain.
        let wait = config.server.grace_period + crate::upgrade::HANDOVER_ACCEPT;
        tracing::warn!(
            pid_file = %pid_file.display(),
            wait = %humantime::format_duration(wait),
            "no previous wsgate found from the pid file; upgrades wait out a whole drain"
        );
        Some(std::time::Instant::now() + wait)
    } else {
        tracing::info!(
            ?previous,
            "took over from a previous process; upgrades wait until it exits"
        );
        None
    };
    // A later upgrade, reading this process's pid, waits for these too.
    crate::upgrade::record_draining(pid_file, &previous).with_context(|| {
        format!(
            "writing {}",
            crate::upgrade::draining_file(pid_file).display()
        )
    })?;
    gateway.set_awaiting_previous(true);
    server.add_service(background_service(
        "wsgate previous processes",
        PreviousWatch {
            gateway: gateway.clone(),
            pids: previous,
            deadline,
        },
    ));
    Ok(())
}

/// Fails fast when an address cannot be bound. Pingora retries a busy
/// address for half a minute and then panics in its listener thread, leaving
/// a process that runs with no listener and looks healthy to a supervisor.
/// (With `--upgrade` the sockets come from the old process instead.)
fn check_bindable(config: &Config) -> anyhow::Result<()> {
    let addresses = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listen[{i}].address"), l.address.clone()))
        .chain([("admin.address".to_string(), config.admin.to_string())]);
    for (field, address) in addresses {
        if let Err(e) = std::net::TcpListener::bind(address.as_str()) {
            anyhow::bail!(
                "{}: {field}: cannot listen on {address}: {e}",
                config.file.display()
            );
        }
    }
    Ok(())
}

/// Forgets refilled rate buckets every few seconds, so their memory follows
/// the clients that are actually reconnecting.
struct Sweeper(Arc<Gateway>);

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.0.sweep(),
            }
        }
    }
}
