//! The `wsgate` binary: parses the command line, loads the config and either
//! checks it or runs the gateway.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc hands the memory of ended streams back to the system, where
/// glibc's malloc keeps it and grows again with the next burst (measured by
/// the soak test and the benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// wsgate: an admission gateway for WebSocket upstreams.
///
/// Counts live upgraded streams per route, per route key and per client, and
/// answers upgrades over a limit with 503 and Retry-After before the upstream
/// sees them. Plain HTTP passes through.
#[derive(Parser)]
#[command(version, about, long_about, subcommand_negates_reqs = true)]
struct Cli {
    /// The YAML config file to run with.
    #[arg(long, short, value_name = "FILE", required = true)]
    config: Option<PathBuf>,

    /// Take over the listening sockets of a running wsgate that was sent
    /// SIGQUIT (a zero-downtime binary upgrade).
    #[arg(long)]
    upgrade: bool,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file without starting anything. Prints one line per
    /// problem (file:line:column: field: what) and exits 1 if there is any.
    Check {
        /// The YAML config file to check.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        None => {
            if let Err(e) = wsgate::reload::catch_early_sighup() {
                eprintln!("wsgate: cannot catch SIGHUP: {e}");
                return ExitCode::FAILURE;
            }
            init_logging(cli.log_format);
            let path = cli.config.expect("clap requires --config");
            match run(&path, cli.upgrade) {
                Ok(never) => match never {},
                Err(e) => {
                    eprintln!("wsgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match wsgate::config::load(path) {
        Ok(config) => {
            println!("{}: ok, {} route(s)", path.display(), config.routes.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.problems() {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, upgrade: bool) -> anyhow::Result<std::convert::Infallible> {
    let config = wsgate::config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let routes = config.routes.len();
    let listeners: Vec<&str> = config
        .listeners
        .iter()
        .map(|l| l.address.as_str())
        .collect();
    let listeners = listeners.join(",");
    let admin = config.admin;
    // Read before this process writes its own pid there.
    let previous = if upgrade {
        wsgate::upgrade::previous_pids(&config.server.pid_file)
    } else {
        Vec::new()
    };

    let options = wsgate::server::RunOptions { upgrade, previous };
    let (mut server, _gateway) = wsgate::server::build(config, options)
        .with_context(|| format!("starting with {}", path.display()))?;
    server.bootstrap();
    wsgate::server::bound_exit(&server);
    // Pingora writes the pid file only when it daemonises; wsgate runs in the
    // foreground, so it writes the file itself for supervisors and scripts.
    let pid_file = &server.configuration.pid_file;
    std::fs::write(pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing the pid file {pid_file}"))?;
    tracing::info!(config = %path.display(), routes, %listeners, %admin, "wsgate starting");
    server.run_forever()
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WSGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
