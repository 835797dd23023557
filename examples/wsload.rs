//! wsload: a WebSocket load tool for any `ws://` URL, reporting JSON on stdout.
//!
//! ```text
//! wsload hold  URL -n 4900 --hold 3s --pids 1234,1235   # open, hold, close; RSS of the pids
//! wsload burst URL -n 300                                # N upgrades at once: 101s vs refusals
//! wsload echo  URL -c 50 --size 64 --duration 5s        # msgs/s and latency percentiles
//! wsload rate  URL --duration 5s -c 32                  # upgrades per second, open then close
//! ```
//!
//! Clients are spread over loopback source addresses (`127.1.0.1` upwards, one
//! per `--per-source` streams), so per-client limits of the proxy under test
//! see many clients. Every run is bounded in count and time, and the tool
//! refuses targets that are not on loopback.

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async, WebSocketStream};

/// Most sockets this process opens; stays under the per-process fd budget.
const MAX_STREAMS: usize = 9_900;

#[derive(Parser)]
#[command(about = "WebSocket load tool: hold, burst, echo, rate; JSON on stdout")]
struct Cli {
    #[command(subcommand)]
    run: Run,
}

#[derive(Subcommand)]
enum Run {
    /// Open N streams, hold them, close them; with --pids, sample RSS.
    Hold {
        #[command(flatten)]
        common: Common,
        #[arg(short, default_value_t = 1000)]
        n: usize,
        /// How long to hold the streams once all are open.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Upgrades in flight at once while opening.
        #[arg(short, long, default_value_t = 64)]
        concurrency: usize,
        /// Processes whose summed VmRSS is sampled before, during and after.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        /// Wait after closing before the last RSS sample.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// Start N upgrades at once (all TCP connections first, then every
    /// request together) and count 101s and refusals.
    Burst {
        #[command(flatten)]
        common: Common,
        #[arg(short, default_value_t = 300)]
        n: usize,
    },
    /// C connections each sending a message and awaiting its echo, in a loop.
    Echo {
        #[command(flatten)]
        common: Common,
        #[arg(short, long, default_value_t = 50)]
        connections: usize,
        /// Message size in bytes (binary messages).
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Upgrade, close, repeat, from C tasks at once, for a duration.
    Rate {
        #[command(flatten)]
        common: Common,
        #[arg(short, long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Stop after this many upgrades even if time remains.
        #[arg(long, default_value_t = 200_000)]
        max: u64,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// `ws://127.x.y.z:port/path`; loopback only.
    url: String,
    /// Streams per loopback source address.
    #[arg(long, default_value_t = 10)]
    per_source: usize,
    /// Bound on each connect plus upgrade.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_fd_limit()?;
    let report = match cli.run {
        Run::Hold {
            common,
            n,
            hold,
            concurrency,
            pids,
            settle,
        } => {
            let n = n.min(MAX_STREAMS);
            run_hold(Target::new(&common)?, n, hold, concurrency, &pids, settle).await
        }
        Run::Burst { common, n } => run_burst(Target::new(&common)?, n.min(MAX_STREAMS)).await,
        Run::Echo {
            common,
            connections,
            size,
            duration,
        } => {
            let c = connections.min(MAX_STREAMS);
            run_echo(Target::new(&common)?, c, size, duration).await
        }
        Run::Rate {
            common,
            concurrency,
            duration,
            max,
        } => run_rate(Target::new(&common)?, concurrency.min(1000), duration, max).await,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to what the runs need, within the hard one.
fn raise_fd_limit() -> anyhow::Result<()> {
    let want = (MAX_STREAMS as u64) + 256;
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < want {
        rlimit::Resource::NOFILE.set(want.min(hard), hard)?;
    }
    Ok(())
}

/// Where to connect and how to spread the clients.
#[derive(Clone)]
struct Target {
    url: String,
    addr: SocketAddr,
    per_source: usize,
    timeout: Duration,
}

impl Target {
    fn new(common: &Common) -> anyhow::Result<Self> {
        let rest = common
            .url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow::anyhow!("only ws:// URLs"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = authority
            .parse()
            .map_err(|_| anyhow::anyhow!("the URL must name an ip:port, got {authority}"))?;
        anyhow::ensure!(addr.ip().is_loopback(), "loopback targets only");
        Ok(Self {
            url: common.url.clone(),
            addr,
            per_source: common.per_source.max(1),
            timeout: common.timeout,
        })
    }

    /// The source address of the `i`-th client: 127.1.0.1, 127.1.0.2, ...
    fn source(&self, i: usize) -> IpAddr {
        let n = (i / self.per_source) as u32 + 1;
        IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + (n & 0x00fe_ffff)))
    }

    async fn tcp(&self, i: usize) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.source(i), 0))?;
        socket.set_nodelay(true)?;
        socket.connect(self.addr).await
    }

    /// Connects and upgrades, bounded by the timeout.
    async fn open(&self, i: usize) -> Result<Ws, Failure> {
        let work = async {
            let tcp = self.tcp(i).await.map_err(|_| Failure::Connect)?;
            self.upgrade(tcp).await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn upgrade(&self, tcp: TcpStream) -> Result<Ws, Failure> {
        let request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|_| Failure::Other)?;
        match client_async(request, tcp).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(Failure::Status(resp.status().as_u16())),
            Err(_) => Err(Failure::Other),
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connect,
    Timeout,
    /// The server answered this status instead of 101.
    Status(u16),
    Other,
}

/// Counts of how attempts ended.
#[derive(Default)]
struct Tally {
    upgraded: u64,
    refused_503: u64,
    other_status: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, r: &Result<Ws, Failure>) {
        match r {
            Ok(_) => self.upgraded += 1,
            Err(Failure::Status(503)) => self.refused_503 += 1,
            Err(Failure::Status(_)) => self.other_status += 1,
            Err(_) => self.failed += 1,
        }
    }

    fn json(&self) -> Value {
        json!({
            "upgraded": self.upgraded,
            "refused_503": self.refused_503,
            "other_status": self.other_status,
            "failed": self.failed,
        })
    }
}

/// Summed VmRSS of `pids`, in KiB; 0 when none is given.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

async fn run_hold(
    target: Target,
    n: usize,
    hold: Duration,
    concurrency: usize,
    pids: &[u32],
    settle: Duration,
) -> Value {
    let baseline = rss_kib(pids);
    let began = Instant::now();
    let results: Vec<Result<Ws, Failure>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let t = target.clone();
            async move { t.open(i).await }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let open_secs = began.elapsed().as_secs_f64();

    let mut tally = Tally::default();
    results.iter().for_each(|r| tally.add(r));
    let mut streams: Vec<Ws> = results.into_iter().filter_map(Result::ok).collect();

    // Sample at the end of the hold, once the proxy has settled.
    tokio::time::sleep(hold).await;
    let held = rss_kib(pids);
    let still_open = ping_all(&mut streams).await;

    let closing = Instant::now();
    drop(streams);
    let close_secs = closing.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let after = rss_kib(pids);

    let per_stream = (held.saturating_sub(baseline) * 1024)
        .checked_div(tally.upgraded)
        .unwrap_or(0);
    json!({
        "run": "hold",
        "url": target.url,
        "n": n,
        "sources": n.div_ceil(target.per_source),
        "tally": tally.json(),
        "open_seconds": open_secs,
        "upgrades_per_second": tally.upgraded as f64 / open_secs.max(1e-9),
        "hold_seconds": hold.as_secs_f64(),
        "alive_after_hold": still_open,
        "close_seconds": close_secs,
        "rss_kib": { "baseline": baseline, "held": held, "after_close": after },
        "rss_bytes_per_stream": per_stream,
        "after_close_vs_baseline": if baseline > 0 { after as f64 / baseline as f64 } else { 0.0 },
    })
}

/// Pings every stream and counts those whose pong comes back within 5 s.
async fn ping_all(streams: &mut [Ws]) -> usize {
    let work = futures_util::stream::iter(streams.iter_mut())
        .map(|ws| async move {
            if ws.send(Message::Ping(b"hold".to_vec())).await.is_err() {
                return false;
            }
            while let Some(Ok(msg)) = ws.next().await {
                if matches!(msg, Message::Pong(_)) {
                    return true;
                }
            }
            false
        })
        .buffer_unordered(256)
        .filter(|ok| std::future::ready(*ok))
        .count();
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or(0)
}

async fn run_burst(target: Target, n: usize) -> Value {
    let barrier = Arc::new(Barrier::new(n));
    let began = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (t, barrier) = (target.clone(), barrier.clone());
            tokio::spawn(async move {
                let tcp = t.tcp(i).await;
                // Every task reaches the barrier, connected or not, so
                // none waits forever.
                barrier.wait().await;
                let tcp = tcp.map_err(|_| Failure::Connect)?;
                tokio::time::timeout(t.timeout, t.upgrade(tcp))
                    .await
                    .unwrap_or(Err(Failure::Timeout))
            })
        })
        .collect();

    // Every stream stays open until all have their answer, so no slot is
    // given back during the burst.
    let mut tally = Tally::default();
    let mut streams = Vec::new();
    for task in tasks {
        let r = task.await.unwrap_or(Err(Failure::Other));
        tally.add(&r);
        streams.extend(r.ok());
    }
    let secs = began.elapsed().as_secs_f64();
    drop(streams);
    json!({
        "run": "burst",
        "url": target.url,
        "n": n,
        "sources": n.div_ceil(target.per_source),
        "tally": tally.json(),
        "seconds": secs,
    })
}

async fn run_echo(target: Target, c: usize, size: usize, duration: Duration) -> Value {
    let mut streams = Vec::new();
    let mut tally = Tally::default();
    for i in 0..c {
        let r = target.open(i).await;
        tally.add(&r);
        streams.extend(r.ok());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|ws| {
            let (stop, errors) = (stop.clone(), errors.clone());
            tokio::spawn(echo_loop(ws, size, stop, errors))
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);

    let mut latencies: Vec<u32> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap_or_default());
    }
    let secs = began.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        let i = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(i).copied().unwrap_or(0)
    };
    json!({
        "run": "echo",
        "url": target.url,
        "connections": c,
        "size": size,
        "tally": tally.json(),
        "seconds": secs,
        "messages": latencies.len(),
        "msgs_per_second": latencies.len() as f64 / secs.max(1e-9),
        "latency_us": { "p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0) },
        "errors": errors.load(Ordering::Relaxed),
    })
}

/// Sends one message, awaits its echo, records the round trip in µs; until
/// `stop`. Each round trip is bounded at 10 s.
async fn echo_loop(
    mut ws: Ws,
    size: usize,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
) -> Vec<u32> {
    let payload = vec![0x5a_u8; size];
    let mut out = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let round = async {
            ws.send(Message::Binary(payload.clone())).await.ok()?;
            loop {
                match ws.next().await? {
                    Ok(Message::Binary(b)) if b.len() == size => return Some(()),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), round).await {
            Ok(Some(())) => out.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
            _ => {
                errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    out
}

async fn run_rate(target: Target, c: usize, duration: Duration, max: u64) -> Value {
    let deadline = Instant::now() + duration;
    let started = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|task| {
            let (t, started) = (target.clone(), started.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                // Each task keeps to its own sources, cycling through them.
                let mut i = task;
                while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max {
                    let r = t.open(i).await;
                    tally.add(&r);
                    if let Ok(mut ws) = r {
                        let _ = ws.close(None).await;
                    }
                    i = (i + c) % (c * t.per_source * 64);
                }
                tally
            })
        })
        .collect();

    let mut tally = Tally::default();
    for task in tasks {
        let t = task.await.unwrap_or_default();
        tally.upgraded += t.upgraded;
        tally.refused_503 += t.refused_503;
        tally.other_status += t.other_status;
        tally.failed += t.failed;
    }
    let secs = began.elapsed().as_secs_f64();
    json!({
        "run": "rate",
        "url": target.url,
        "concurrency": c,
        "tally": tally.json(),
        "seconds": secs,
        "upgrades_per_second": tally.upgraded as f64 / secs.max(1e-9),
    })
}
