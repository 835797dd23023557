//! TLS end to end: a TLS listener counts and refuses exactly as plain TCP
//! does; TLS upstreams get the route's SNI, CA and Host; a certificate that
//! does not verify is answered 502, counted with reason `tls` and gives its
//! slot back; upstream host names resolve; and bad TLS files are refused by
//! `wsgate check` and at startup with one line, never a panic.
//!
//! Certificates are made at run time under a test CA that no system store
//! trusts, so a route only verifies its upstream through its own `ca_file`.
//!
//! Not covered here: an upstream host that does not resolve. This machine's
//! resolver sends such a name to a DNS server off loopback, and the tests
//! make no traffic beyond loopback.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::{client_async, WebSocketStream};

/// The name the test upstream's certificate is issued for.
const UPSTREAM_NAME: &str = "upstream.test";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

// ---------------------------------------------------------------------------
// Certificates.

/// A test CA, and the PEM files of the certificates it signs, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    ca_file: PathBuf,
}

/// A certificate issued by a [`Pki`], as files and as rustls values.
struct Leaf {
    cert_file: PathBuf,
    key_file: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsgate test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca: cert.der().clone(),
            ca_file,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses), written
    /// to `{stem}.pem` and `{stem}.key`.
    fn leaf(&self, stem: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();

        let cert_file = self.path(&format!("{stem}.pem"));
        let key_file = self.path(&format!("{stem}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Leaf {
            cert_file,
            key_file,
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client that trusts this CA only.
    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Leaf {
    /// The `tls:` block of a listener serving this certificate.
    fn listener_yaml(&self) -> String {
        format!(
            "    tls:\n      cert: {}\n      key: {}\n",
            self.cert_file.display(),
            self.key_file.display()
        )
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .unwrap();
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------
// Clients of a TLS listener.

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A TLS connection to wsgate's listener at `addr`, verifying it as
/// `localhost` against the test CA.
async fn tls_to(addr: SocketAddr, pki: &Pki) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect to wsgate");
    let name = "localhost".try_into().unwrap();
    pki.connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake with wsgate")
}

/// A WebSocket over TLS: the open socket, or the refusal's status and headers.
async fn wss(
    addr: SocketAddr,
    pki: &Pki,
    path: &str,
) -> Result<Wss, (u16, HashMap<String, String>)> {
    let url = format!("wss://localhost:{}{path}", addr.port());
    let request = url.into_client_request().unwrap();
    match client_async(request, tls_to(addr, pki).await).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            Err((resp.status().as_u16(), headers))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// A plain GET over TLS: status and body.
async fn https_get(addr: SocketAddr, pki: &Pki, path: &str) -> (u16, String) {
    let mut s = tls_to(addr, pki).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // A close without close_notify ends the read with an error; the answer
    // is whole by then, so only the bytes matter.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answer within 10 s");
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

// ---------------------------------------------------------------------------
// A TLS upstream.

/// What the TLS upstream saw.
#[derive(Default)]
struct Seen {
    /// The SNI of every ClientHello, whether or not the handshake completed.
    sni: Mutex<Vec<Option<String>>>,
    /// Every request head received, in order.
    heads: Mutex<Vec<String>>,
    upgrades: AtomicUsize,
}

/// An HTTPS and WSS upstream on a loopback port: 101 and echo for an
/// upgrade, 200 `plain` for anything else.
struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: AbortHandle,
}

impl TlsUpstream {
    async fn start(leaf: &Leaf) -> TlsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let config = leaf.server_config();

        let s = seen.clone();
        let task = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every connection.
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(serve_tls(tcp, config.clone(), s.clone()));
            }
        });
        TlsUpstream {
            addr,
            seen,
            task: task.abort_handle(),
        }
    }

    fn sni(&self) -> Vec<Option<String>> {
        self.seen.sni.lock().unwrap().clone()
    }

    fn heads(&self) -> Vec<String> {
        self.seen.heads.lock().unwrap().clone()
    }

    fn upgrades(&self) -> usize {
        self.seen.upgrades.load(Ordering::SeqCst)
    }

    /// The `upstream:` block of a route to this upstream, `extra` being
    /// more of its keys.
    fn route_yaml(&self, extra: &str) -> String {
        format!("    upstream:\n      url: https://{}\n{extra}", self.addr)
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_tls(tcp: TcpStream, config: Arc<rustls::ServerConfig>, seen: Arc<Seen>) {
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Ok(start) = acceptor.await else {
        return;
    };
    let sni = start.client_hello().server_name().map(str::to_string);
    seen.sni.lock().unwrap().push(sni);
    let Ok(mut stream) = start.into_stream(config).await else {
        return;
    };

    while let Some(head) = read_head(&mut stream).await {
        seen.heads.lock().unwrap().push(head.clone());
        let key = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        });
        if let Some(key) = key {
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            seen.upgrades.fetch_add(1, Ordering::SeqCst);
            let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
            return;
        }
        let resp = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain";
        if stream.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one request head (through the blank line); `None` at EOF.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&buf).to_string())
}

/// The value of header `name` in a request head.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn failures(m: &Metrics, route: &str, reason: &str) -> f64 {
    m.get(
        "wsgate_upstream_upgrade_failures_total",
        &[("route", route), ("reason", reason)],
    )
}

// ---------------------------------------------------------------------------
// The TLS listener.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_admits_counts_and_refuses_like_plain_tcp() {
    let pki = Pki::new();
    let leaf = pki.leaf("wsgate", &["localhost", "127.0.0.1"]);
    let up = Upstream::start().await;
    let gw = Wsgate::start_with_listener(
        &leaf.listener_yaml(),
        &format!(
            "routes:\n  - name: relay\n    prefix: /\n{}    limits:\n      total: 4\n",
            upstream_yaml(up.addr)
        ),
    )
    .await;

    // A burst over TLS admits exactly the limit.
    let burst = join_all((0..12).map(|_| wss(gw.addr, &pki, "/ws"))).await;
    let (mut open, refused): (Vec<_>, Vec<_>) = burst.into_iter().partition(Result::is_ok);
    assert_eq!(open.len(), 4, "{}", gw.log());
    for r in &refused {
        let (status, headers) = r.as_ref().err().unwrap();
        assert_eq!(*status, 503);
        assert_eq!(headers["retry-after"], "5");
    }
    for ws in open.iter_mut() {
        echo(ws.as_mut().unwrap(), "over tls").await;
    }
    assert_eq!(up.upgrades(), 4, "refusals reached the upstream");
    let m = gw.metrics().await;
    assert_eq!(m.get("wsgate_streams_active", &[("route", "relay")]), 4.0);
    let rejected = &[("route", "relay"), ("scope", "route"), ("dry_run", "false")];
    assert_eq!(m.get("wsgate_streams_rejected_total", rejected), 8.0);

    // Plain HTTPS passes at the limit, uncounted.
    for _ in 0..3 {
        assert_eq!(
            https_get(gw.addr, &pki, "/plain").await,
            (200, "plain".into())
        );
    }

    // A closed stream gives its slot back to the next TLS client.
    drop(open.pop());
    gw.wait_active("relay", 3).await;
    let mut again = wss(gw.addr, &pki, "/ws").await.expect("a slot came back");
    echo(&mut again, "again").await;

    drop((open, again));
    gw.wait_active("relay", 0).await;
}

// ---------------------------------------------------------------------------
// TLS upstreams.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_gets_the_routes_sni_ca_and_host() {
    let pki = Pki::new();
    let up = TlsUpstream::start(&pki.leaf("upstream", &[UPSTREAM_NAME])).await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: secure\n    prefix: /\n{}    limits:\n      total: 2\n",
        up.route_yaml(&format!(
            "      sni: {UPSTREAM_NAME}\n      ca_file: {}\n      host_header: {UPSTREAM_NAME}\n",
            pki.ca_file.display()
        ))
    ))
    .await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "through tls").await;
    assert_eq!(up.upgrades(), 1);
    gw.wait_active("secure", 1).await;
    let head = up.heads().pop().unwrap();
    assert!(head.starts_with("GET /ws HTTP/1.1"), "{head}");
    assert_eq!(header(&head, "host"), Some(UPSTREAM_NAME), "{head}");

    // Plain HTTP on the same route goes through Pingora's own pipeline with
    // the same TLS settings.
    assert_eq!(
        http_get(gw.addr, "/plain", &[]).await,
        Some((200, "plain".into()))
    );
    let head = up.heads().pop().unwrap();
    assert!(head.starts_with("GET /plain HTTP/1.1"), "{head}");
    assert_eq!(header(&head, "host"), Some(UPSTREAM_NAME), "{head}");

    let sni = up.sni();
    assert!(sni.len() >= 2, "{sni:?}");
    assert!(
        sni.iter().all(|s| s.as_deref() == Some(UPSTREAM_NAME)),
        "{sni:?}"
    );

    drop(ws);
    gw.wait_active("secure", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_that_does_not_verify_is_a_tls_failure() {
    let pki = Pki::new();
    let up = TlsUpstream::start(&pki.leaf("upstream", &[UPSTREAM_NAME])).await;
    let ca = format!("      ca_file: {}\n", pki.ca_file.display());
    let route = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    prefix: /{name}\n{}    limits:\n      total: 1\n",
            up.route_yaml(extra)
        )
    };
    let gw = Wsgate::start(&format!(
        "routes:\n{}{}{}{}",
        // The test CA is in no system store.
        route("unknown-ca", &format!("      sni: {UPSTREAM_NAME}\n")),
        route("no-verify", "      verify_cert: false\n"),
        route("wrong-sni", &format!("      sni: other.test\n{ca}")),
        route("good", &format!("      sni: {UPSTREAM_NAME}\n{ca}")),
    ))
    .await;

    // The routes that verify go first, so the pool holds connections that
    // were verified under the same SNI: a route that would refuse the
    // certificate must not be served by them.
    for name in ["no-verify", "good"] {
        let mut ws = connect(&gw.url(&format!("/{name}/ws"))).await.into_open();
        echo(&mut ws, name).await;
        let plain = http_get(gw.addr, &format!("/{name}/plain"), &[]).await;
        assert_eq!(plain, Some((200, "plain".into())), "{name}");
        drop(ws);
        gw.wait_active(name, 0).await;
    }

    for name in ["unknown-ca", "wrong-sni"] {
        let heads = up.heads().len();
        let a = connect(&gw.url(&format!("/{name}/ws"))).await;
        assert_eq!(a.status(), 502, "{name}\n{}", gw.log());
        // The slot came back: with a limit of 1, a retry fails the same way
        // rather than being refused.
        let a = connect(&gw.url(&format!("/{name}/ws"))).await;
        assert_eq!(a.status(), 502, "{name}: the slot was not given back");
        // The failure is counted once the answer is out, so poll for it.
        eventually(
            Duration::from_secs(10),
            "two tls failures counted",
            || async { (failures(&gw.metrics().await, name, "tls") == 2.0).then_some(()) },
        )
        .await;
        gw.wait_active(name, 0).await;

        let plain = http_get(gw.addr, &format!("/{name}/plain"), &[]).await;
        assert_eq!(plain.map(|(s, _)| s), Some(502), "{name}");
        assert_eq!(up.heads().len(), heads, "{name}: a request got through");
    }
    assert!(
        up.sni().contains(&Some("other.test".into())),
        "wsgate did not send the route's SNI: {:?}",
        up.sni()
    );

    let m = gw.metrics().await;
    assert_eq!(failures(&m, "no-verify", "tls"), 0.0);
    assert_eq!(failures(&m, "good", "tls"), 0.0);
    assert_eq!(m.get("wsgate_streams_active", &[]), 0.0);
}

// ---------------------------------------------------------------------------
// Upstream host names.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_named_by_host_name_is_resolved() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: named\n    prefix: /\n    upstream:\n      url: http://localhost:{}\n",
        up.addr.port()
    ))
    .await;

    let mut ws = connect(&gw.url("/ws")).await.into_open();
    echo(&mut ws, "by name").await;
    assert_eq!(
        http_get(gw.addr, "/plain", &[]).await,
        Some((200, "plain".into()))
    );
    let head = up.heads().pop().unwrap();
    assert!(head.starts_with("GET /plain"), "{head}");
    drop(ws);
    gw.wait_active("named", 0).await;
}

// ---------------------------------------------------------------------------
// Bad TLS files.

/// Writes a config with one listener (`listener_yaml` under its address) and
/// one route (`upstream_yaml` under its `upstream:`), on free loopback ports.
fn write_config(dir: &Path, listener_yaml: &str, upstream_yaml: &str) -> PathBuf {
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "listen:\n  - address: 127.0.0.1:{port}\n{listener_yaml}admin:\n  address: 127.0.0.1:{admin}\n\
         server:\n  pid_file: {d}/wsgate.pid\n  upgrade_sock: {d}/upgrade.sock\n\
         routes:\n  - name: r\n    prefix: /\n    upstream:\n{upstream_yaml}",
        d = dir.display()
    );
    let path = dir.join("wsgate.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs the wsgate binary with `args` to its exit (at most 10 s): exit code
/// and stderr.
fn run_wsgate(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let dir = config.parent().unwrap();
    let err_path = dir.join("stderr.log");
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "wsgate {args:?} still running after 10 s: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&err_path).unwrap())
}

#[test]
fn check_and_startup_refuse_bad_tls_files_with_one_line() {
    let pki = Pki::new();
    let good = pki.leaf("good", &["localhost"]);
    let other = pki.leaf("other", &["localhost"]);
    let not_pem = pki.path("not-pem.txt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let missing = pki.path("missing.pem");

    let listener = |cert: &Path, key: &Path| {
        format!(
            "    tls:\n      cert: {}\n      key: {}\n",
            cert.display(),
            key.display()
        )
    };
    let plain_up = "      url: http://127.0.0.1:9\n";
    let ca_up = |ca: &Path| {
        format!(
            "      url: https://127.0.0.1:9\n      ca_file: {}\n",
            ca.display()
        )
    };
    let (cert, key) = (&good.cert_file, &good.key_file);
    // (listener, upstream, field, problem)
    let cases: Vec<(String, String, &str, &str)> = vec![
        (
            String::new(),
            ca_up(&missing),
            "routes[0].upstream.ca_file",
            "no file at",
        ),
        (
            String::new(),
            ca_up(&not_pem),
            "routes[0].upstream.ca_file",
            "no PEM certificate",
        ),
        (
            String::new(),
            ca_up(key),
            "routes[0].upstream.ca_file",
            "no PEM certificate",
        ),
        (
            listener(&missing, key),
            plain_up.into(),
            "listen[0].tls.cert",
            "no file at",
        ),
        (
            listener(cert, &missing),
            plain_up.into(),
            "listen[0].tls.key",
            "no file at",
        ),
        (
            listener(key, key),
            plain_up.into(),
            "listen[0].tls.cert",
            "no PEM certificate",
        ),
        (
            listener(cert, &not_pem),
            plain_up.into(),
            "listen[0].tls.key",
            "no PEM private key",
        ),
        (
            listener(cert, &other.key_file),
            plain_up.into(),
            "listen[0].tls.key",
            "does not match",
        ),
    ];

    for (listener_yaml, upstream, field, problem) in &cases {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), listener_yaml, upstream);
        let file = config.display().to_string();

        for args in [&["check"][..], &[][..]] {
            let (code, stderr) = run_wsgate(args, &config);
            let what = format!("wsgate {args:?} with {field} {problem}:\n{stderr}");
            assert_eq!(code, Some(1), "{what}");
            assert!(!stderr.contains("panicked"), "{what}");
            let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(field)).collect();
            assert_eq!(lines.len(), 1, "{what}");
            let line = lines[0];
            assert!(line.contains(&file) && line.contains(problem), "{what}");
        }
    }

    // The good pair passes.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &listener(cert, key), &ca_up(&pki.ca_file));
    let (code, stderr) = run_wsgate(&["check"], &config);
    assert_eq!(code, Some(0), "{stderr}");
}
