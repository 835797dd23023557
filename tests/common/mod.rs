//! Test fixtures: a real wsgate process, a scriptable upstream, WebSocket
//! clients and an admin scraper, all on loopback ports picked at run time.
//! Everything a fixture starts is stopped when it is dropped.
#![allow(dead_code)]

pub mod upstream;

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async, MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A wsgate child process with its own config, pid file and upgrade socket.
pub struct Wsgate {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    /// The generated listen/admin/server part of the config file.
    pub header: String,
}

impl Wsgate {
    /// Starts wsgate with `routes_yaml` (the `routes:` list and any other
    /// top-level keys) under a generated `listen`/`admin`/`server` header.
    pub async fn start(body: &str) -> Wsgate {
        Self::start_with_listener("", body).await
    }

    /// Like [`start`](Self::start), with `listener_yaml` (further keys of the
    /// proxy listener, such as its `tls:` block, indented under `address`).
    pub async fn start_with_listener(listener_yaml: &str, body: &str) -> Wsgate {
        Self::start_full(listener_yaml, "", body).await
    }

    /// Like [`start`](Self::start), with `server_yaml` (further keys of the
    /// `server:` section, each line indented by two spaces).
    pub async fn start_with_server(server_yaml: &str, body: &str) -> Wsgate {
        Self::start_full("", server_yaml, body).await
    }

    async fn start_full(listener_yaml: &str, server_yaml: &str, body: &str) -> Wsgate {
        for attempt in 0..5 {
            match Self::try_start(listener_yaml, server_yaml, body).await {
                Ok(w) => return w,
                Err(e) if attempt < 4 => {
                    eprintln!("wsgate did not start ({e}); retrying with new ports")
                }
                Err(e) => panic!("wsgate did not start: {e}"),
            }
        }
        unreachable!()
    }

    async fn try_start(
        listener_yaml: &str,
        server_yaml: &str,
        body: &str,
    ) -> Result<Wsgate, String> {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin_port) = (free_port(), free_port());
        // A short drain unless the test sets its own.
        let grace = if server_yaml.contains("grace_period:") {
            ""
        } else {
            "  grace_period: 1s\n"
        };
        let header = format!(
            "listen:\n  - address: 127.0.0.1:{port}\n{listener_yaml}admin:\n  address: 127.0.0.1:{admin_port}\n\
             server:\n  threads: 2\n  pid_file: {d}/wsgate.pid\n  upgrade_sock: {d}/upgrade.sock\n{grace}{server_yaml}",
            d = dir.path().display()
        );
        let config = format!("{header}{body}");
        let config_path = dir.path().join("wsgate.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("wsgate.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--config")
            .arg(&config_path)
            .env(
                "WSGATE_LOG",
                std::env::var("TEST_WSGATE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut w = Wsgate {
            child,
            dir,
            config_path,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            log_path,
            header,
        };

        let start = Instant::now();
        loop {
            if let Some(status) = w.child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", w.log()));
            }
            let proxy_up = TcpStream::connect(w.addr).await.is_ok();
            if proxy_up && w.get_admin("/healthz").await.is_some_and(|(s, _)| s == 200) {
                return Ok(w);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("not ready after 20 s: {}", w.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The config text for `body` under this instance's header, as a
    /// reload would need it (the header cannot change without a restart).
    pub fn config_text(&self, body: &str) -> String {
        format!("{}{body}", self.header)
    }

    /// `wsgate_config_reloads_total{result}`.
    pub async fn reloads(&self, result: &str) -> f64 {
        self.metrics()
            .await
            .get("wsgate_config_reloads_total", &[("result", result)])
    }

    /// Rewrites the config in place and waits until wsgate has reloaded it
    /// (or refused it: `result` says which is expected).
    pub async fn rewrite(&self, body: &str, result: &str) {
        let before = self.reloads(result).await;
        std::fs::write(&self.config_path, self.config_text(body)).unwrap();
        self.wait_reloads(result, before + 1.0).await;
    }

    pub async fn wait_reloads(&self, result: &str, n: f64) {
        let what = format!("wsgate_config_reloads_total{{result={result}}} >= {n}");
        eventually(Duration::from_secs(10), &what, || async {
            (self.reloads(result).await >= n).then_some(())
        })
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, for at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "wsgate still running after {limit:?}; its threads: {}\nits log ends:\n{}",
                threads_of(self.pid()),
                tail(&self.log(), 3000)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub async fn get_admin(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, path, &[]).await
    }

    /// The metrics text.
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.get_admin("/metrics").await.expect("metrics answer");
        assert_eq!(status, 200);
        Metrics::parse(&body)
    }

    pub async fn status(&self) -> serde_json::Value {
        let (_, body) = self.get_admin("/status").await.expect("status answers");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until `wsgate_streams_active{route}` equals `n`.
    pub async fn wait_active(&self, route: &str, n: i64) {
        let what = format!("wsgate_streams_active{{route={route}}} == {n}");
        eventually(Duration::from_secs(10), &what, || async {
            (self
                .metrics()
                .await
                .get("wsgate_streams_active", &[("route", route)])
                == n as f64)
                .then_some(())
        })
        .await
    }
}

/// A process started with `--upgrade` on another's config, holding the
/// listeners it was handed; killed when dropped.
pub struct Successor {
    child: Child,
    pub log_path: PathBuf,
}

impl Successor {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Wsgate {
    /// A binary upgrade: starts a new process with `--upgrade` on this
    /// one's config, sends this one SIGQUIT once the new one waits for the
    /// listeners, and returns once they have been handed over. This process
    /// then drains for its grace period.
    pub async fn upgrade(&self) -> Successor {
        hand_over(
            &self.config_path,
            self.dir.path(),
            self.pid(),
            &self.log_path,
        )
        .await
    }
}

impl Successor {
    /// The next binary upgrade, from this process, on the same files.
    pub async fn upgrade(&self, gw: &Wsgate) -> Successor {
        hand_over(&gw.config_path, gw.dir.path(), self.pid(), &self.log_path).await
    }
}

async fn hand_over(config: &Path, dir: &Path, from: u32, from_log: &Path) -> Successor {
    let log_path = dir.join(format!("successor-of-{from}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    // Left by an earlier hand-over: the new process binds it afresh.
    let sock = dir.join("upgrade.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("--config")
        .arg(config)
        .arg("--upgrade")
        .env("WSGATE_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let successor = Successor { child, log_path };
    eventually(Duration::from_secs(20), "the new process waits", || async {
        sock.exists().then_some(())
    })
    .await;
    let quit = Command::new("kill")
        .args(["-QUIT", &from.to_string()])
        .status()
        .unwrap();
    assert!(quit.success());
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(from_log).unwrap_or_default();
        if log.contains("listener sockets sent") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "listeners not handed over in 20 s; the old process said:\n{log}\nthe new one:\n{}",
            successor.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Serving, with its signal handlers in place (a SIGQUIT before then
    // would end it).
    eventually(
        Duration::from_secs(20),
        "the new process serves",
        || async {
            successor
                .log()
                .contains("Starting service: wsgate proxy")
                .then_some(())
        },
    )
    .await;
    successor
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parsed Prometheus text: `name{labels}` to value.
pub struct Metrics(pub Vec<(String, HashMap<String, String>, f64)>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            out.push((name.to_string(), labels, value.parse().unwrap()));
        }
        Metrics(out)
    }

    /// The sum over every series of `name` whose labels include `want`.
    pub fn get(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).is_some_and(|l| l == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

/// A minimal HTTP/1.1 GET; `None` if the server cannot be reached.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A WebSocket client's attempt: either an open socket or the refusal.
pub enum Attempt {
    Open(Box<Ws>),
    Refused {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    },
}

impl Attempt {
    pub fn status(&self) -> u16 {
        match self {
            Attempt::Open(_) => 101,
            Attempt::Refused { status, .. } => *status,
        }
    }

    pub fn into_open(self) -> Ws {
        match self {
            Attempt::Open(ws) => *ws,
            Attempt::Refused { status, body, .. } => panic!("expected 101, got {status}: {body}"),
        }
    }
}

/// Opens a WebSocket to `url` from source address `from` (any 127.x.y.z),
/// with extra request headers.
pub async fn connect_from(from: IpAddr, url: &str, headers: &[(&str, &str)]) -> Attempt {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let host = request.uri().host().unwrap().to_string();
    let port = request.uri().port_u16().unwrap();
    let target: SocketAddr = format!("{host}:{port}").parse().unwrap();

    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    // Bounded, so a wedged gateway fails the test instead of hanging it.
    let handshake = async {
        let stream = socket.connect(target).await.expect("connect to wsgate");
        client_async(request, MaybeTlsStream::Plain(stream)).await
    };
    match tokio::time::timeout(Duration::from_secs(30), handshake).await {
        Err(_) => panic!("no answer to an upgrade from {from} within 30 s"),
        Ok(Ok((ws, _))) => Attempt::Open(Box::new(ws)),
        Ok(Err(WsError::Http(resp))) => refused(resp),
        Ok(Err(e)) => panic!("handshake failed: {e}"),
    }
}

fn refused(resp: Response<Option<Vec<u8>>>) -> Attempt {
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    Attempt::Refused {
        status: resp.status().as_u16(),
        headers,
        body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string(),
    }
}

pub async fn connect(url: &str) -> Attempt {
    connect_from("127.0.0.1".parse().unwrap(), url, &[]).await
}

/// Sends a text message on any WebSocket (plain or TLS) and waits for its
/// echo.
pub async fn echo<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("no echo: {other:?}"),
            }
        }
    })
    .await
    .expect("echo within 10 s");
    assert_eq!(reply, text);
}

/// Waits for the server side to end the socket (close frame, EOF or error).
pub async fn closed_by_peer(ws: &mut Ws, limit: Duration) {
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .expect("stream closed by the gateway in time");
}

/// A YAML `upstream:` block for a plain upstream at `addr`.
pub fn upstream_yaml(addr: SocketAddr) -> String {
    format!("    upstream:\n      url: http://{addr}\n")
}

/// Each thread of a process as `name state wchan`, for a test that finds
/// the process stuck.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let path = task.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state follows the name, which is in parentheses.
        let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
        out.push(format!(
            "{} {state} {}",
            read("comm").trim(),
            read("wchan").trim()
        ));
    }
    out.join("; ")
}

fn tail(text: &str, n: usize) -> &str {
    let mut at = text.len().saturating_sub(n);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}
