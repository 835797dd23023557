//! A bare Pingora 0.9 reverse proxy, for the benchmarks (`bench/run.sh`): one
//! upstream, Pingora's defaults, no limits and nothing of wsgate's. It shows
//! what Pingora itself costs per upgrade and per held stream, so that
//! wsgate's figures can be read as Pingora's plus wsgate's own.
//!
//! ```text
//! bare_pingora LISTEN UPSTREAM [THREADS]    # bare_pingora 127.0.0.1:8080 127.0.0.1:9001 2
//! ```
//!
//! Loopback addresses only. WebSocket upgrades are relayed by Pingora's own
//! upgrade handling. Stop it with SIGINT or SIGTERM.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_pingora LISTEN UPSTREAM [THREADS]";
    let listen: SocketAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let upstream: SocketAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let threads = args.next().map_or(Ok(2), |t| t.parse())?;
    anyhow::ensure!(
        listen.ip().is_loopback() && upstream.ip().is_loopback(),
        "loopback addresses only"
    );

    // As many descriptors as allowed: a held stream takes two.
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    rlimit::Resource::NOFILE.set(hard, hard)?;

    let dir = tempfile::tempdir()?;
    let conf = ServerConf {
        threads,
        pid_file: dir.path().join("bare.pid").display().to_string(),
        upgrade_sock: dir.path().join("bare.sock").display().to_string(),
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    println!("listening {listen}");
    server.run_forever()
}
