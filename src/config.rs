//! The configuration: the YAML file format, its validation, and the runtime
//! types the proxy reads.
//!
//! File structs mirror the YAML (`deny_unknown_fields`, so a typo is an error)
//! and are converted into runtime types only after every check passed. Every
//! problem is reported on one line: `file:line:column: field.path: what`.
//! Type errors come from serde with their exact position and stop parsing;
//! semantic checks run after it and all of their problems are reported at once.

use crate::admission::{Overrides, RouteLimits, Tracking, WhenFull};
use crate::client::{ClientPolicy, ForwardHeader};
use crate::rate::Rate;
use crate::route::{Matcher, PathMatch, Pattern, Router};
use http::StatusCode;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line and column, where they are known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted field path, e.g. `routes[1].limits.total`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(
            f,
            ": {}: {}",
            one_line(&self.field),
            one_line(&self.message)
        )
    }
}

/// `text` with control characters escaped: a problem is one line, even when
/// it quotes a key or value of the file that spans several.
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// One or more problems, one per line when displayed.
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
}

fn lines(problems: &[Problem]) -> String {
    let all: Vec<String> = problems.iter().map(Problem::to_string).collect();
    all.join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid(p) => p.iter().map(Problem::to_string).collect(),
        }
    }
}

// ---------------------------------------------------------------------------
// Value types shared by the file format.

/// Deserializes a string through `parse`. The error is raised inside the
/// visitor, so serde_yaml reports the scalar's own line, column and path.
fn from_text<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V { expecting, parse })
}

/// A duration written as `"30s"`, `"5m"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a duration such as \"30s\"", |s| {
            humantime::parse_duration(s.trim())
                .map(Dur)
                .map_err(|e| format!("invalid duration `{s}`: {e} (write e.g. \"30s\")"))
        })
    }
}

/// A timeout that may be switched off with `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeout(pub Option<Duration>);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a duration such as \"30s\", or `off`", |s| {
            if s.trim() == "off" {
                return Ok(Timeout(None));
            }
            match humantime::parse_duration(s.trim()) {
                Ok(d) if d.is_zero() => Ok(Timeout(None)),
                Ok(d) => Ok(Timeout(Some(d))),
                Err(e) => Err(format!(
                    "invalid duration `{s}`: {e} (write e.g. \"30s\", or `off`)"
                )),
            }
        })
    }
}

/// A network in CIDR notation; a bare address is a single-host network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a CIDR such as 10.0.0.0/8", |s| {
            let t = s.trim();
            if let Ok(net) = t.parse::<IpNet>() {
                return Ok(Cidr(net.trunc()));
            }
            t.parse::<IpAddr>()
                .map(|ip| Cidr(IpNet::from(ip)))
                .map_err(|_| format!("invalid CIDR `{s}` (write e.g. 10.0.0.0/8)"))
        })
    }
}

// ---------------------------------------------------------------------------
// The file format.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Vec<ListenFile>,
    #[serde(default)]
    admin: AdminFile,
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    client_ip: ClientIpFile,
    #[serde(default)]
    limits: GlobalLimitsFile,
    #[serde(default)]
    log: LogFile,
    cluster: Option<ClusterFile>,
    routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    address: String,
    tls: Option<TlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default = "default_admin")]
    address: String,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            address: default_admin(),
        }
    }
}

fn default_admin() -> String {
    "127.0.0.1:9090".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    threads: Option<usize>,
    work_stealing: Option<bool>,
    own_handshake: Option<bool>,
    pid_file: Option<PathBuf>,
    upgrade_sock: Option<PathBuf>,
    grace_period: Option<Dur>,
    tcp_keepalive: Option<KeepaliveFile>,
    head_timeout: Option<Dur>,
    max_head_bytes: Option<usize>,
    after_upgrade: Option<AfterUpgrade>,
}

/// What a process that took over with `--upgrade` does while the previous
/// one drains.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AfterUpgrade {
    /// Admit no upgrade until the previous process has exited: its streams
    /// are not in this process's counts. The default without `cluster`.
    Wait,
    /// Admit at once: the two processes together may hold up to twice a
    /// limit until the previous one exits. The default with `cluster`,
    /// where both count in Redis and the limit holds.
    Admit,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeepaliveFile {
    Switch(bool),
    Settings(KeepaliveSettingsFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepaliveSettingsFile {
    idle: Option<Dur>,
    interval: Option<Dur>,
    count: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClientIpFile {
    header: Option<String>,
    #[serde(default)]
    trusted_proxies: Vec<Cidr>,
    ipv6_prefix: Option<u8>,
    #[serde(default)]
    exempt: Vec<Cidr>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GlobalLimitsFile {
    per_client: Option<u32>,
    #[serde(default)]
    overrides: Vec<OverrideFile>,
    rate: Option<RateFile>,
    max_tracked_keys: Option<usize>,
    when_tracking_full: Option<WhenFullFile>,
    connections_per_client: Option<u32>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum WhenFullFile {
    Refuse,
    AdmitUntracked,
}

/// One override: a client CIDR with its own `per_client`, or a route key
/// value with its own `per_key`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideFile {
    client: Option<Cidr>,
    key: Option<String>,
    per_client: Option<u32>,
    per_key: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFile {
    /// New upgrades per second per client, on average.
    per_second: f64,
    /// How many may come at once.
    burst: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogFile {
    rejections_per_second: Option<u32>,
}

/// Counting shared by a fleet of instances, through Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    redis: String,
    instance_id: Option<String>,
    key_prefix: Option<String>,
    lease: Option<Dur>,
    call_timeout: Option<Dur>,
    when_unreachable: Option<PolicyFile>,
    instances: Option<u32>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum PolicyFile {
    Local,
    Open,
    Closed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: String,
    host: Option<String>,
    path: Option<String>,
    prefix: Option<String>,
    key: Option<String>,
    upstream: UpstreamFile,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    overrides: Vec<OverrideFile>,
    rate: Option<RateFile>,
    #[serde(default)]
    reject: RejectFile,
    #[serde(default)]
    idle_timeout: Timeout,
    #[serde(default)]
    max_lifetime: Timeout,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    total: Option<u32>,
    per_key: Option<u32>,
    per_client: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RejectFile {
    status: Option<u16>,
    retry_after: Option<Dur>,
    retry_after_jitter: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    url: String,
    sni: Option<String>,
    #[serde(default = "yes")]
    verify_cert: bool,
    ca_file: Option<PathBuf>,
    host_header: Option<String>,
    connect_timeout: Option<Dur>,
    handshake_timeout: Option<Dur>,
}

fn yes() -> bool {
    true
}

// ---------------------------------------------------------------------------
// The runtime types.

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub listeners: Vec<Listener>,
    pub admin: SocketAddr,
    pub server: ServerSettings,
    pub client: ClientPolicy,
    /// Limit per client across all routes, its overrides and upgrade rate.
    pub global_per_client: Option<u32>,
    /// Open connections per client address, counted at accept, before any
    /// request; trusted proxies and exempt clients are not capped.
    pub connections_per_client: u32,
    pub global_overrides: Overrides,
    pub global_rate: Option<Rate>,
    /// The bound on keys tracked per scope.
    pub tracking: Tracking,
    pub rejections_per_second: u32,
    /// Fleet-wide counting; `None` counts this instance's streams only.
    pub cluster: Option<Cluster>,
    pub routes: Vec<Arc<Route>>,
    pub router: Router,
}

/// The `cluster` section: where the fleet's counts live and what to do when
/// that store cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `redis://[:password@]host:port[/db]`, a standalone server.
    pub redis: String,
    /// This instance's name in the store; unique within the fleet.
    pub instance_id: String,
    /// Every key starts with `{prefix}:`; the braces make it a Redis Cluster
    /// hash tag, so all of a fleet's keys share one slot.
    pub key_prefix: String,
    /// How long an instance's slots outlive its last renewal.
    pub lease: Duration,
    /// The longest one Redis call may take before the policy applies.
    pub call_timeout: Duration,
    pub when_unreachable: Unreachable,
    /// The fleet's size, for `local`: each instance enforces its share.
    pub instances: u32,
}

/// What admission does while Redis cannot be reached (or answers too late).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Each instance enforces its share of every limit: the limit divided by
    /// `instances`, rounded down, at least 1.
    Local,
    /// Admit, counting this instance's streams only.
    Open,
    /// Refuse every upgrade (scope `cluster_unavailable`).
    Closed,
}

impl Unreachable {
    pub fn as_str(self) -> &'static str {
        match self {
            Unreachable::Local => "local",
            Unreachable::Open => "open",
            Unreachable::Closed => "closed",
        }
    }
}

pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: String,
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub threads: usize,
    /// Whether the proxy's threads share one work-stealing runtime. Off,
    /// each thread runs its own, and a connection stays on the thread that
    /// took it for its whole life. Read at startup.
    pub work_stealing: bool,
    /// Whether the front door carries a connection's first request itself
    /// when it is a plain WebSocket upgrade (see `handshake`). Reloadable,
    /// for new connections.
    pub own_handshake: bool,
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
    /// How long live streams may run on after SIGTERM.
    pub grace_period: Duration,
    pub tcp_keepalive: Option<Keepalive>,
    /// How long a client has to send a whole request head, counted from
    /// accept for a connection's first request and from the first byte for
    /// later ones. Reloadable.
    pub head_timeout: Duration,
    /// The largest request head read; a longer one closes the connection.
    /// Reloadable.
    pub max_head_bytes: usize,
    /// `None`: `Wait`, or `Admit` with a cluster. Read at startup.
    pub after_upgrade: Option<AfterUpgrade>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: usize,
}

/// One route, as the proxy uses it.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub limits: RouteLimits,
    pub overrides: Overrides,
    pub rate: Option<Rate>,
    pub upstream: Upstream,
    pub reject_status: StatusCode,
    pub retry_after: Duration,
    /// A random extra delay up to this, so refused clients spread out.
    pub retry_after_jitter: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub sni: String,
    pub verify_cert: bool,
    pub ca_file: Option<PathBuf>,
    /// Replaces the client's Host header when set.
    pub host_header: Option<String>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
}

pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
const MIN_HEAD_BYTES: usize = 1024;
/// Pingora refuses request heads over 1 MiB whatever wsgate says.
const MAX_HEAD_BYTES: usize = 1024 * 1024;
/// High enough for a large NAT; trusted proxies and exempt clients are not
/// capped at all.
pub const DEFAULT_CONNECTIONS_PER_CLIENT: u32 = 1000;
/// Linux's bounds on a keepalive's idle time and interval, and its probes.
const MAX_KEEPALIVE_SECS: u64 = 32767;
const MAX_KEEPALIVE_PROBES: usize = 127;
/// The largest TCP user timeout Linux takes, in whole seconds (it is an
/// `int` of milliseconds).
const MAX_USER_TIMEOUT: Duration = Duration::from_secs(i32::MAX as u64 / 1000);
pub const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    idle: Duration::from_secs(60),
    interval: Duration::from_secs(10),
    count: 6,
};

// ---------------------------------------------------------------------------
// Loading.

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let src = read(path)?;
    parse(path, &src)
}

/// The largest config file wsgate reads: far above any real one, and small
/// enough that a file filled by mistake cannot exhaust memory on reload.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a config file's text, refusing one over [`MAX_FILE_BYTES`].
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let io = |source| ConfigError::Read {
        file: file.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigError::Invalid(vec![Problem {
            file: file.clone(),
            line: None,
            column: None,
            field: "(file)".into(),
            message: format!(
                "{size} bytes is over the {MAX_FILE_BYTES}-byte limit for a config file"
            ),
        }]));
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Validates config text; `path` names it in errors and resolves nothing.
pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let raw: FileConfig = serde_yaml::from_str(src).map_err(|e| {
        let (field, message) = split_serde_message(&e);
        let location = e.location();
        ConfigError::Invalid(vec![Problem {
            file: file.clone(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            field,
            message,
        }])
    })?;

    let mut check = Checker {
        file,
        src,
        problems: Vec::new(),
        from: 0,
    };
    let config = check.convert(path, raw);
    // In file order; problems without a line (whole-file ones) last.
    check.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    match config {
        Some(config) if check.problems.is_empty() => Ok(config),
        _ => Err(ConfigError::Invalid(check.problems)),
    }
}

/// serde_yaml renders `path: message at line L column C`; the location is
/// reported separately, so split the rest into field path and message.
fn split_serde_message(e: &serde_yaml::Error) -> (String, String) {
    let text = strip_location(&e.to_string());
    match text.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => (path.to_string(), msg.to_string()),
        _ => ("(top level)".to_string(), text),
    }
}

/// Removes the ` at line L column C` serde_yaml puts in its messages.
fn strip_location(text: &str) -> String {
    let Some(start) = text.find(" at line ") else {
        return text.to_string();
    };
    let rest = &text[start + " at line ".len()..];
    let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let line_len = digits(rest);
    let Some(after) = rest[line_len..].strip_prefix(" column ") else {
        return text.to_string();
    };
    let tail = &after[digits(after)..];
    format!("{}{tail}", &text[..start])
}

struct Checker<'a> {
    file: String,
    src: &'a str,
    problems: Vec<Problem>,
    /// Lines before this index are skipped when looking a key up: set to
    /// a route's first line while that route is checked.
    from: usize,
}

impl Checker<'_> {
    fn problem(
        &mut self,
        line: Option<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            column: None,
            field: field.into(),
            message: message.into(),
        });
    }

    /// The line of the `nth` occurrence of `key: value` (serde gives no
    /// positions after parsing, so semantic errors find theirs in the text).
    fn line_of(&self, key: &str, value: &str, nth: usize) -> Option<usize> {
        self.src
            .lines()
            .enumerate()
            .skip(self.from)
            .filter(|(_, l)| {
                let l = l.trim_start().trim_start_matches("- ");
                l.strip_prefix(key)
                    .and_then(|r| r.trim_start().strip_prefix(':'))
                    .is_some_and(|v| v.trim().trim_matches(['"', '\'']) == value)
            })
            .nth(nth)
            .map(|(i, _)| i + 1)
    }

    /// The line of the first `key:`, whatever its value.
    fn line_of_key(&self, key: &str) -> Option<usize> {
        self.src
            .lines()
            .position(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            })
            .map(|i| i + 1)
    }

    /// Keepalive settings the kernel takes: it refuses the socket option
    /// outside these ranges, and so would every upstream connection.
    fn keepalive(&mut self, k: &Keepalive) {
        let line = self.line_of_key("tcp_keepalive");
        let mut in_range = true;
        for (field, d) in [("idle", k.idle), ("interval", k.interval)] {
            if d.subsec_nanos() != 0 || !(1..=MAX_KEEPALIVE_SECS).contains(&d.as_secs()) {
                in_range = false;
                self.problem(
                    line,
                    format!("server.tcp_keepalive.{field}"),
                    format!(
                        "{} must be whole seconds from 1s to {MAX_KEEPALIVE_SECS}s",
                        humantime::format_duration(d)
                    ),
                );
            }
        }
        if !(1..=MAX_KEEPALIVE_PROBES).contains(&k.count) {
            self.problem(
                line,
                "server.tcp_keepalive.count",
                format!("{} is outside 1..={MAX_KEEPALIVE_PROBES}", k.count),
            );
        } else if in_range && crate::listen::user_timeout(k) > MAX_USER_TIMEOUT {
            self.problem(
                line,
                "server.tcp_keepalive",
                format!(
                    "idle + interval × count must be at most {} (the TCP user timeout)",
                    humantime::format_duration(MAX_USER_TIMEOUT)
                ),
            );
        }
    }

    fn convert(&mut self, path: &Path, raw: FileConfig) -> Option<Config> {
        let listeners = self.listeners(&raw.listen);
        let admin = match raw.admin.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let line = self.line_of("address", &raw.admin.address, 0);
                self.problem(
                    line,
                    "admin.address",
                    format!("`{}` is not an address:port", raw.admin.address),
                );
                None
            }
        };
        let server = self.server(raw.server);
        let client = self.client_ip(raw.client_ip);
        let (routes, router) = self.routes(raw.routes);
        let global_overrides = self.overrides("limits", raw.limits.overrides, false);
        let global_rate = self.rate("limits.rate", raw.limits.rate);
        let cluster = raw.cluster.and_then(|c| self.cluster(c));
        let tracking = Tracking {
            max_keys: raw
                .limits
                .max_tracked_keys
                .unwrap_or(Tracking::default().max_keys),
            when_full: match raw.limits.when_tracking_full {
                None | Some(WhenFullFile::Refuse) => WhenFull::Refuse,
                Some(WhenFullFile::AdmitUntracked) => WhenFull::AdmitUntracked,
            },
        };
        if tracking.max_keys == 0 {
            self.problem(None, "limits.max_tracked_keys", "must be at least 1");
        }

        if raw.limits.per_client == Some(0) || raw.log.rejections_per_second == Some(0) {
            let field = if raw.limits.per_client == Some(0) {
                "limits.per_client"
            } else {
                "log.rejections_per_second"
            };
            self.problem(
                None,
                field,
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if raw.limits.connections_per_client == Some(0) {
            self.problem(
                self.line_of("connections_per_client", "0", 0),
                "limits.connections_per_client",
                format!("must be at least 1 (the default is {DEFAULT_CONNECTIONS_PER_CLIENT})"),
            );
        }

        Some(Config {
            file: path.to_path_buf(),
            listeners,
            admin: admin?,
            server,
            client: client?,
            global_per_client: raw.limits.per_client,
            connections_per_client: raw
                .limits
                .connections_per_client
                .unwrap_or(DEFAULT_CONNECTIONS_PER_CLIENT),
            global_overrides,
            global_rate,
            tracking,
            rejections_per_second: raw.log.rejections_per_second.unwrap_or(20),
            cluster,
            routes,
            router,
        })
    }

    fn listeners(&mut self, raw: &[ListenFile]) -> Vec<Listener> {
        if raw.is_empty() {
            self.problem(
                self.line_of("listen", "", 0),
                "listen",
                "at least one listener is needed",
            );
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, l) in raw.iter().enumerate() {
            let field = format!("listen[{i}].address");
            let line = self.line_of("address", &l.address, 0);
            if l.address.parse::<SocketAddr>().is_err() {
                self.problem(
                    line,
                    field,
                    format!("`{}` is not an address:port", l.address),
                );
                continue;
            }
            if !seen.insert(l.address.clone()) {
                self.problem(line, field, format!("`{}` is listed twice", l.address));
            }
            if let Some(tls) = &l.tls {
                // Pingora panics at startup on files it cannot use, so the
                // contents are checked here, not only that the files exist.
                if let Err((field, e)) = crate::pem::check_listener(&tls.cert, &tls.key) {
                    let path = match field {
                        crate::pem::Field::Cert => &tls.cert,
                        crate::pem::Field::Key => &tls.key,
                    };
                    let name = field.as_str();
                    let line = self.line_of(name, &path.display().to_string(), 0);
                    self.problem(line, format!("listen[{i}].tls.{name}"), e.to_string());
                }
            }
            out.push(Listener {
                address: l.address.clone(),
                tls: l.tls.as_ref().map(|t| (t.cert.clone(), t.key.clone())),
            });
        }
        out
    }

    fn server(&mut self, raw: ServerFile) -> ServerSettings {
        if raw.threads == Some(0) {
            self.problem(None, "server.threads", "must be at least 1");
        }
        let tcp_keepalive = match raw.tcp_keepalive {
            None | Some(KeepaliveFile::Switch(true)) => Some(DEFAULT_KEEPALIVE),
            Some(KeepaliveFile::Switch(false)) => None,
            Some(KeepaliveFile::Settings(s)) => Some(Keepalive {
                idle: s.idle.map_or(DEFAULT_KEEPALIVE.idle, |d| d.0),
                interval: s.interval.map_or(DEFAULT_KEEPALIVE.interval, |d| d.0),
                count: s.count.unwrap_or(DEFAULT_KEEPALIVE.count),
            }),
        };
        if let Some(k) = &tcp_keepalive {
            self.keepalive(k);
        }
        let head_timeout = raw.head_timeout.map_or(DEFAULT_HEAD_TIMEOUT, |d| d.0);
        if head_timeout.is_zero() {
            let line = ["0s", "0", "off"]
                .iter()
                .find_map(|v| self.line_of("head_timeout", v, 0));
            self.problem(line, "server.head_timeout", "must be longer than 0s");
        }
        let max_head_bytes = raw.max_head_bytes.unwrap_or(DEFAULT_MAX_HEAD_BYTES);
        if !(MIN_HEAD_BYTES..=MAX_HEAD_BYTES).contains(&max_head_bytes) {
            self.problem(
                self.line_of("max_head_bytes", &max_head_bytes.to_string(), 0),
                "server.max_head_bytes",
                format!(
                    "{max_head_bytes} is outside {MIN_HEAD_BYTES}..={MAX_HEAD_BYTES} \
                     (Pingora reads at most {MAX_HEAD_BYTES} bytes of head)"
                ),
            );
        }
        ServerSettings {
            head_timeout,
            max_head_bytes,
            after_upgrade: raw.after_upgrade,
            threads: raw.threads.unwrap_or(2).max(1),
            work_stealing: raw.work_stealing.unwrap_or(false),
            own_handshake: raw.own_handshake.unwrap_or(true),
            pid_file: raw
                .pid_file
                .unwrap_or_else(|| PathBuf::from("/tmp/wsgate/wsgate.pid")),
            upgrade_sock: raw
                .upgrade_sock
                .unwrap_or_else(|| PathBuf::from("/tmp/wsgate/upgrade.sock")),
            grace_period: raw.grace_period.map_or(DEFAULT_GRACE_PERIOD, |d| d.0),
            tcp_keepalive,
        }
    }

    fn cluster(&mut self, raw: ClusterFile) -> Option<Cluster> {
        let problems = self.problems.len();
        let redis = raw.redis.trim().to_string();
        // TLS to Redis (`rediss://`) is not built in.
        if !redis.starts_with("redis://") || redis::Client::open(redis.as_str()).is_err() {
            self.problem(
                self.line_of("redis", &raw.redis, 0),
                "cluster.redis",
                format!("`{redis}` is not a Redis URL (write e.g. redis://10.0.0.5:6379)"),
            );
        }
        let instance_id = raw.instance_id.unwrap_or_else(default_instance_id);
        self.name("instance_id", &instance_id);
        let key_prefix = raw.key_prefix.unwrap_or_else(|| "wsgate".into());
        self.name("key_prefix", &key_prefix);
        let lease = raw.lease.map_or(DEFAULT_LEASE, |d| d.0);
        let call_timeout = raw.call_timeout.map_or(DEFAULT_CALL_TIMEOUT, |d| d.0);
        if lease < Duration::from_secs(1) {
            self.problem(
                self.line_of_key("lease"),
                "cluster.lease",
                "must be at least 1s",
            );
        } else if call_timeout.is_zero() || call_timeout * 3 > lease {
            let line = self
                .line_of_key("call_timeout")
                .or(self.line_of_key("lease"));
            self.problem(
                line,
                "cluster.call_timeout",
                "must be above 0 and at most a third of `lease` (leases are renewed every third)",
            );
        }
        let when_unreachable = match raw.when_unreachable {
            None | Some(PolicyFile::Local) => Unreachable::Local,
            Some(PolicyFile::Open) => Unreachable::Open,
            Some(PolicyFile::Closed) => Unreachable::Closed,
        };
        let instances = self.fleet_size(when_unreachable, raw.instances);
        (self.problems.len() == problems).then_some(Cluster {
            redis,
            instance_id,
            key_prefix,
            lease,
            call_timeout,
            when_unreachable,
            instances,
        })
    }

    /// `cluster.instances`: needed to share limits under `local`.
    fn fleet_size(&mut self, policy: Unreachable, instances: Option<u32>) -> u32 {
        match (policy, instances) {
            (_, Some(0)) => {
                let line = self.line_of_key("instances");
                self.problem(line, "cluster.instances", "must be at least 1");
                1
            }
            (Unreachable::Local, None) => {
                self.problem(
                    self.line_of_key("cluster"),
                    "cluster.instances",
                    "`when_unreachable: local` needs the fleet's size to share limits by",
                );
                1
            }
            (_, n) => n.unwrap_or(1),
        }
    }

    /// Checks that `cluster.{key}` is a name safe inside Redis keys.
    fn name(&mut self, key: &str, value: &str) {
        if !is_name(value) {
            self.problem(
                self.line_of(key, value, 0),
                format!("cluster.{key}"),
                "use letters, digits, `-`, `_` or `.`",
            );
        }
    }

    fn client_ip(&mut self, raw: ClientIpFile) -> Option<ClientPolicy> {
        let header = match raw
            .header
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => None,
            Some("cf-connecting-ip") => Some(ForwardHeader::CfConnectingIp),
            Some("x-real-ip") => Some(ForwardHeader::XRealIp),
            Some("x-forwarded-for") => Some(ForwardHeader::XForwardedFor),
            Some(other) => {
                let line = self.line_of("header", raw.header.as_deref().unwrap_or(""), 0);
                self.problem(
                    line,
                    "client_ip.header",
                    format!("`{other}` is not one of CF-Connecting-IP, X-Forwarded-For, X-Real-IP"),
                );
                return None;
            }
        };
        if header.is_some() && raw.trusted_proxies.is_empty() {
            self.problem(
                self.line_of("header", raw.header.as_deref().unwrap_or(""), 0),
                "client_ip.trusted_proxies",
                "a forwarding header needs the proxies it is trusted from",
            );
        }
        let ipv6_prefix = raw.ipv6_prefix.unwrap_or(64);
        if ipv6_prefix > 128 {
            self.problem(
                None,
                "client_ip.ipv6_prefix",
                format!("{ipv6_prefix} is not a prefix length (0 to 128)"),
            );
        }
        Some(ClientPolicy {
            header,
            trusted: raw.trusted_proxies.into_iter().map(|c| c.0).collect(),
            ipv6_prefix,
            exempt: raw.exempt.into_iter().map(|c| c.0).collect(),
        })
    }

    fn routes(&mut self, raw: Vec<RouteFile>) -> (Vec<Arc<Route>>, Router) {
        if raw.is_empty() {
            self.problem(
                self.line_of("routes", "", 0),
                "routes",
                "at least one route is needed",
            );
        }
        let mut names: Vec<String> = Vec::new();
        let mut routes = Vec::new();
        let mut matchers = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let nth = names.iter().filter(|n| **n == r.name).count();
            let line = self.line_of("name", &r.name, nth);
            if nth > 0 {
                self.problem(
                    line,
                    format!("routes[{i}].name"),
                    format!("route name `{}` is used twice", r.name),
                );
            }
            names.push(r.name.clone());
            // A route's own keys come after its name: search from there, so
            // a value repeated in several routes is found in this one.
            self.from = line.map_or(0, |l| l - 1);
            let built = self.route(i, line, r);
            self.from = 0;
            if let Some((route, matcher)) = built {
                routes.push(Arc::new(route));
                matchers.push(matcher);
            }
        }
        (routes, Router::new(matchers))
    }

    fn route(&mut self, i: usize, line: Option<usize>, r: RouteFile) -> Option<(Route, Matcher)> {
        let at = |f: &str| format!("routes[{i}].{f}");
        if !is_name(&r.name) {
            self.problem(line, at("name"), "use letters, digits, `-`, `_` or `.`");
        }

        let path = match (&r.path, &r.prefix) {
            (Some(p), None) => match Pattern::parse(p) {
                Ok(pattern) => Some(PathMatch::Pattern(pattern)),
                Err(e) => {
                    self.problem(
                        self.line_of("path", p, 0),
                        at("path"),
                        format!("`{p}`: {e}"),
                    );
                    None
                }
            },
            (None, Some(p)) if p.starts_with('/') => Some(PathMatch::Prefix(
                crate::route::normalize_path(p).into_owned(),
            )),
            (None, Some(p)) => {
                self.problem(
                    self.line_of("prefix", p, 0),
                    at("prefix"),
                    format!("`{p}` must start with `/`"),
                );
                None
            }
            _ => {
                // Both or neither: at the `path` line if there is one.
                let path_line = r.path.as_deref().and_then(|p| self.line_of("path", p, 0));
                self.problem(
                    path_line.or(line),
                    at("path"),
                    "give exactly one of `path` (a pattern) or `prefix`",
                );
                None
            }
        };

        let key = match (&r.key, &path) {
            (None, _) => None,
            (Some(k), Some(PathMatch::Pattern(p))) => match p.param_index(k) {
                Some(idx) => Some(idx),
                None => {
                    let line = self.line_of("key", k, 0);
                    self.problem(
                        line,
                        at("key"),
                        format!("`{k}` is not a `{{segment}}` of the route's path"),
                    );
                    None
                }
            },
            // A broken `path` was reported already; the key is not its fault.
            (Some(_), None) => None,
            (Some(k), Some(PathMatch::Prefix(_))) => {
                let line = self.line_of("key", k, 0);
                self.problem(
                    line,
                    at("key"),
                    format!("`{k}` needs a `path` pattern with a `{{{k}}}` segment"),
                );
                None
            }
        };
        if r.limits.per_key.is_some() && r.key.is_none() {
            self.problem(
                line,
                at("limits.per_key"),
                "a per-key limit needs the route's `key`",
            );
        }
        for (f, v) in [
            ("total", r.limits.total),
            ("per_key", r.limits.per_key),
            ("per_client", r.limits.per_client),
        ] {
            if v == Some(0) {
                self.problem(
                    self.line_of(f, "0", 0).or(line),
                    at(&format!("limits.{f}")),
                    "must be at least 1 (leave it out for no limit)",
                );
            }
        }

        let status = r.reject.status.unwrap_or(503);
        let reject_status = match StatusCode::from_u16(status) {
            Ok(s) if (400..=599).contains(&status) => Some(s),
            _ => {
                self.problem(
                    self.line_of("status", &status.to_string(), 0).or(line),
                    at("reject.status"),
                    format!("{status} is not a 4xx or 5xx status"),
                );
                None
            }
        };

        let overrides = self.overrides(&format!("routes[{i}]"), r.overrides, r.key.is_some());
        let rate = self.rate(&at("rate"), r.rate);
        let upstream = self.upstream(&at("upstream"), r.upstream);
        let host = r.host.map(|h| h.trim_end_matches('.').to_ascii_lowercase());
        if let Some(h) = &host {
            // One leading wildcard label at most: `*.example.com`.
            let rest = h.strip_prefix("*.").unwrap_or(h);
            let valid = !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
            if !valid {
                let raw = h.as_str();
                self.problem(
                    self.line_of("host", raw, 0),
                    at("host"),
                    format!("`{raw}` is not a host name (one leading `*.` wildcard at most)"),
                );
            }
        }

        let route = Route {
            name: Arc::from(r.name.as_str()),
            limits: RouteLimits {
                total: r.limits.total,
                per_key: r.limits.per_key,
                per_client: r.limits.per_client,
            },
            overrides,
            rate,
            upstream: upstream?,
            reject_status: reject_status?,
            retry_after: r.reject.retry_after.map_or(DEFAULT_RETRY_AFTER, |d| d.0),
            retry_after_jitter: r.reject.retry_after_jitter.map_or(Duration::ZERO, |d| d.0),
            idle_timeout: r.idle_timeout.0,
            max_lifetime: r.max_lifetime.0,
            dry_run: r.dry_run,
        };
        let matcher = Matcher {
            host,
            path: path?,
            key,
        };
        Some((route, matcher))
    }

    /// Checks `overrides` under `at` (e.g. `routes[1]`); key overrides are
    /// allowed only where the route names a key.
    fn overrides(&mut self, at: &str, list: Vec<OverrideFile>, keyed: bool) -> Overrides {
        let mut clients: Vec<(IpNet, u32)> = Vec::new();
        let mut keys: HashMap<Box<str>, u32> = HashMap::new();
        for (i, o) in list.into_iter().enumerate() {
            let field = format!("{at}.overrides[{i}]");
            match (o.client, o.key, o.per_client, o.per_key) {
                (Some(net), None, Some(n), None) if n > 0 => {
                    if clients.iter().any(|(c, _)| *c == net.0) {
                        self.problem(None, field, format!("client {} is overridden twice", net.0));
                    }
                    clients.push((net.0, n));
                }
                (None, Some(key), None, Some(n)) if n > 0 && keyed => {
                    if keys.insert(key.as_str().into(), n).is_some() {
                        let line = self.line_of("key", &key, 0);
                        self.problem(line, field, format!("key `{key}` is overridden twice"));
                    }
                }
                (None, Some(_), None, Some(_)) if !keyed => {
                    let what = if at == "limits" {
                        "global limits have no key"
                    } else {
                        "the route has no `key`"
                    };
                    self.problem(
                        None,
                        field,
                        format!("a key override needs a keyed route: {what}"),
                    );
                }
                _ => self.problem(
                    None,
                    field,
                    "give `client` with `per_client`, or `key` with `per_key` (at least 1)",
                ),
            }
        }
        Overrides::new(clients, keys)
    }

    fn rate(&mut self, at: &str, raw: Option<RateFile>) -> Option<Rate> {
        let raw = raw?;
        if !(raw.per_second.is_finite() && raw.per_second > 0.0) {
            self.problem(None, format!("{at}.per_second"), "must be a number above 0");
            return None;
        }
        if raw.burst == Some(0) {
            self.problem(None, format!("{at}.burst"), "must be at least 1");
            return None;
        }
        Some(Rate {
            per_second: raw.per_second,
            burst: raw
                .burst
                .unwrap_or_else(|| raw.per_second.ceil().max(1.0) as u32),
        })
    }

    fn upstream(&mut self, at: &str, u: UpstreamFile) -> Option<Upstream> {
        let line = self.line_of("url", &u.url, 0);
        let uri = match u.url.parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(e) => {
                self.problem(line, format!("{at}.url"), format!("`{}`: {e}", u.url));
                return None;
            }
        };
        let tls = match uri.scheme_str() {
            Some("http") | Some("ws") => false,
            Some("https") | Some("wss") => true,
            _ => {
                self.problem(
                    line,
                    format!("{at}.url"),
                    format!("`{}`: the scheme must be http:// or https://", u.url),
                );
                return None;
            }
        };
        let Some(host) = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        else {
            self.problem(
                line,
                format!("{at}.url"),
                format!("`{}` has no host", u.url),
            );
            return None;
        };
        if uri.path() != "/" && !uri.path().is_empty() {
            self.problem(
                line,
                format!("{at}.url"),
                "paths are not rewritten: give scheme, host and port only",
            );
        }
        if let Some(ca) = &u.ca_file {
            if let Err(e) = crate::pem::certificates(ca) {
                let line = self.line_of("ca_file", &ca.display().to_string(), 0);
                self.problem(line, format!("{at}.ca_file"), e.to_string());
            }
        }
        Some(Upstream {
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            sni: u.sni.unwrap_or_else(|| host.clone()),
            host,
            verify_cert: u.verify_cert,
            ca_file: u.ca_file,
            host_header: u.host_header,
            connect_timeout: u.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            handshake_timeout: u
                .handshake_timeout
                .map_or(DEFAULT_HANDSHAKE_TIMEOUT, |d| d.0),
        })
    }
}

/// Letters, digits, `-`, `_` and `.`: safe as a metric label and inside a
/// Redis key.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `hostname-pid`: unique on a host, and telling in the store.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    let host = if host.is_empty() {
        "wsgate".into()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen:
  - address: 127.0.0.1:8080
routes:
  - name: rooms
    path: /room/{room}/ws
    key: room
    upstream:
      url: http://127.0.0.1:8787
    limits:
      total: 500
      per_key: 100
      per_client: 10
    idle_timeout: 5m
"#;

    fn errors(src: &str) -> Vec<String> {
        match parse(Path::new("t.yaml"), src) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let c = parse(Path::new("t.yaml"), GOOD).unwrap();
        assert_eq!(c.admin, "127.0.0.1:9090".parse().unwrap());
        let r = &c.routes[0];
        assert_eq!(r.limits.per_key, Some(100));
        assert_eq!(r.reject_status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(r.max_lifetime, None);
        assert_eq!(r.upstream.port, 8787);
        assert!(!r.upstream.tls);
        assert_eq!(c.server.tcp_keepalive, Some(DEFAULT_KEEPALIVE));
        assert!(!c.server.work_stealing, "each thread keeps its connections");
        assert!(c.server.own_handshake);
        assert_eq!(c.client.ipv6_prefix, 64);
        let m = c.router.find(None, "/room/a/ws").unwrap();
        assert_eq!(m.key.as_deref(), Some("a"));
    }

    #[test]
    fn bad_files_each_give_one_line_naming_file_line_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "    limits:\n",
                "    limits:\n      totl: 5\n",
                "t.yaml:11:7: routes[0].limits: unknown field `totl`",
            ),
            (
                "      total: 500",
                "      total: lots",
                "t.yaml:11:14: routes[0].limits.total: invalid type",
            ),
            (
                "    idle_timeout: 5m",
                "    idle_timeout: 5 parsecs",
                "t.yaml:14:19: routes[0].idle_timeout: invalid duration",
            ),
            (
                "    key: room",
                "    key: roomz",
                "t.yaml:7: routes[0].key: `roomz` is not a `{segment}`",
            ),
            (
                "/room/{room}/ws",
                "/room/{ro om}/ws",
                "t.yaml:6: routes[0].path: `/room/{ro om}/ws`: segment",
            ),
            (
                "      per_client: 10",
                "      per_client: -1",
                "t.yaml:13:19: routes[0].limits.per_client: invalid type: integer `-1`",
            ),
            (
                "    upstream:",
                "    upstream:\n      verify: false",
                "t.yaml:9:7: routes[0].upstream: unknown field `verify`",
            ),
        ];
        for (from, to, want) in cases {
            let src = GOOD.replacen(from, to, 1);
            let got = errors(&src);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                got[0].starts_with(want),
                "got {:?}, want prefix {want:?}",
                got[0]
            );
        }
    }

    #[test]
    fn bad_cidr_and_duplicate_route_name() {
        let src = format!("{GOOD}client_ip:\n  trusted_proxies: [10.0.0.0/33]\n");
        let got = errors(&src);
        assert_eq!(
            got,
            vec!["t.yaml:16:21: client_ip.trusted_proxies[0]: invalid CIDR `10.0.0.0/33` (write e.g. 10.0.0.0/8)"]
        );

        let dup = format!("{GOOD}{}", GOOD.split("routes:\n").nth(1).unwrap());
        let got = errors(&dup);
        assert_eq!(
            got,
            vec!["t.yaml:15: routes[1].name: route name `rooms` is used twice"]
        );
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let src = GOOD
            .replace("key: room", "key: nope")
            .replace("http://127.0.0.1:8787", "ftp://x")
            .replace("total: 500", "total: 0");
        let got = errors(&src);
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn overrides_and_rates() {
        let src = GOOD.replace(
            "    idle_timeout: 5m\n",
            "    idle_timeout: 5m\n    overrides:\n      - client: 203.0.113.0/24\n        per_client: 200\n      - key: big\n        per_key: 500\n    rate:\n      per_second: 0.5\n",
        );
        let c = parse(Path::new("t.yaml"), &src).unwrap();
        let r = &c.routes[0];
        assert_eq!(
            r.overrides.per_client("203.0.113.9".parse().unwrap()),
            Some(200)
        );
        assert_eq!(r.overrides.per_key("big"), Some(500));
        assert_eq!(
            r.rate,
            Some(Rate {
                per_second: 0.5,
                burst: 1
            })
        );

        let bad = src.replace("per_key: 500", "per_client: 500");
        let got = errors(&bad);
        assert!(
            got[0].contains("routes[0].overrides[1]: give `client`"),
            "{got:?}"
        );
        let bad = src.replace("per_second: 0.5", "per_second: 0");
        assert!(errors(&bad)[0].contains("routes[0].rate.per_second: must be a number above 0"));
    }

    #[test]
    fn hosts_take_one_leading_wildcard_at_most() {
        let with_host = |h: &str| {
            GOOD.replace(
                "  - name: rooms\n",
                &format!("  - name: rooms\n    host: \"{h}\"\n"),
            )
        };
        assert!(parse(Path::new("t.yaml"), &with_host("*.example.com")).is_ok());
        assert!(parse(Path::new("t.yaml"), &with_host("relay.example.com")).is_ok());
        for bad in ["*.*.example.com", "a.*.example.com", "*", "ex ample.com"] {
            let got = errors(&with_host(bad));
            assert!(got[0].contains("routes[0].host"), "{bad}: {got:?}");
        }
    }

    #[test]
    fn the_cluster_section_has_defaults_and_checks() {
        let with = |body: &str| format!("{GOOD}cluster:\n{body}");
        let c = parse(
            Path::new("t.yaml"),
            &with("  redis: redis://127.0.0.1:6379\n  instances: 3\n"),
        )
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.lease, DEFAULT_LEASE);
        assert_eq!(cluster.call_timeout, DEFAULT_CALL_TIMEOUT);
        assert_eq!(cluster.when_unreachable, Unreachable::Local);
        assert_eq!(cluster.key_prefix, "wsgate");
        assert!(cluster
            .instance_id
            .ends_with(&format!("-{}", std::process::id())));
        assert!(parse(Path::new("t.yaml"), GOOD).unwrap().cluster.is_none());

        let cases = [
            (
                "  redis: 10.0.0.5:6379\n  instances: 2\n",
                "t.yaml:16: cluster.redis: `10.0.0.5:6379` is not a Redis URL",
            ),
            (
                "  redis: redis://h:1\n",
                "t.yaml:15: cluster.instances: `when_unreachable: local` needs",
            ),
            (
                "  redis: redis://h:1\n  when_unreachable: open\n  lease: 500ms\n",
                "t.yaml:18: cluster.lease: must be at least 1s",
            ),
            (
                "  redis: redis://h:1\n  when_unreachable: open\n  call_timeout: 10s\n",
                "t.yaml:18: cluster.call_timeout: must be above 0",
            ),
            (
                "  redis: redis://h:1\n  instance_id: a b\n  instances: 2\n",
                "t.yaml:17: cluster.instance_id: use letters",
            ),
            (
                "  redis: redis://h:1\n  when_unreachable: maybe\n",
                "t.yaml:17:21: cluster.when_unreachable: unknown variant `maybe`",
            ),
        ];
        for (body, want) in cases {
            let got = errors(&with(body));
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                got[0].starts_with(want),
                "got {:?}, want prefix {want:?}",
                got[0]
            );
        }
    }

    #[test]
    fn forwarding_header_requires_trusted_proxies() {
        let src = format!("{GOOD}client_ip:\n  header: X-Forwarded-For\n");
        let got = errors(&src);
        assert!(got[0].contains("client_ip.trusted_proxies"), "{got:?}");
    }

    /// Fuzzing of the loader: arbitrary text and damaged copies of a good
    /// file are refused with problems, never a panic. Deeper runs:
    /// `PROPTEST_CASES=200000 cargo test --release --lib fuzz`.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn fuzz_config_arbitrary_text_never_panics(text in "\\PC{0,400}") {
                let _ = parse(Path::new("f.yaml"), &text);
            }

            #[test]
            fn fuzz_config_damaged_files_never_panic(
                edits in prop::collection::vec((any::<prop::sample::Index>(), "[ -~\\n]{0,6}", 0usize..6), 1..8),
            ) {
                let mut text = GOOD.to_string();
                for (at, insert, remove) in edits {
                    let mut i = at.index(text.len() + 1);
                    while !text.is_char_boundary(i) {
                        i -= 1;
                    }
                    let mut end = (i + remove).min(text.len());
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.replace_range(i..end, &insert);
                }
                if let Err(e) = parse(Path::new("f.yaml"), &text) {
                    for line in e.problems() {
                        prop_assert!(line.starts_with("f.yaml"), "{}", line);
                        prop_assert!(!line.contains('\n'));
                    }
                }
            }
        }
    }
}
