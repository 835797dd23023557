//! End to end in front of real Durable Objects: the repo's Worker
//! (`tests/worker`) on `workerd`, Cloudflare's own runtime, with one global
//! registry object and one object per room, each reporting the sockets it
//! holds. Over-limit upgrades must never reach an object, and each object's
//! own count must stay at or under its limit.
//!
//! Needs `npm ci` in `tests/worker` (the README's test command runs it); the
//! test fails, loudly, when workerd is not installed.

mod common;

use common::*;
use futures_util::future::join_all;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A workerd process serving the test Worker; killed when dropped (SIGKILL:
/// workerd waits forever for open WebSockets on SIGTERM).
struct Workerd {
    child: Child,
    addr: SocketAddr,
}

impl Workerd {
    async fn start() -> Workerd {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/worker");
        let bin = dir.join("node_modules/@cloudflare/workerd-linux-64/bin/workerd");
        assert!(
            bin.exists(),
            "workerd is not installed: run `npm ci` in tests/worker (the README's test command does)"
        );
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut child = Command::new(&bin)
                .current_dir(&dir)
                .args([
                    "serve",
                    "config.capnp",
                    "--socket-addr",
                    &format!("http={addr}"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start workerd");
            let ready = async {
                for _ in 0..500 {
                    if child.try_wait().unwrap().is_some() {
                        return false;
                    }
                    if http_get(addr, "/health", &[])
                        .await
                        .is_some_and(|(s, _)| s == 200)
                    {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            };
            if ready.await {
                return Workerd { child, addr };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("workerd did not start");
    }
}

impl Drop for Workerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, serde::Deserialize)]
struct ObjectStats {
    sockets: u64,
    max_sockets: u64,
    accepted: u64,
}

async fn stats(gw: &Wsgate, path: &str) -> ObjectStats {
    let (status, body) = http_get(gw.addr, path, &[])
        .await
        .expect("stats through wsgate");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn client(n: usize) -> IpAddr {
    IpAddr::from([127, 2, (n / 250) as u8, (n % 250 + 1) as u8])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_objects_never_see_an_upgrade_over_the_limit() {
    let workerd = Workerd::start().await;
    let up = format!("    upstream:\n      url: http://{}\n", workerd.addr);
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: registry\n    prefix: /registry\n{up}    limits:\n      total: 25\n      per_client: 3\n\
         \n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{up}    limits:\n      per_key: 6\n\
         \n  - name: http\n    prefix: /\n{up}"
    ))
    .await;

    // One client is held to 3 registry sockets.
    let url = gw.url("/registry/ws");
    let own = join_all((0..10).map(|_| connect_from(client(500), &url, &[]))).await;
    assert_eq!(own.iter().filter(|a| a.status() == 101).count(), 3);

    // The registry: 80 more clients race for the 22 slots left.
    let registry = join_all((0..80).map(|i| connect_from(client(i), &url, &[]))).await;
    let mut registry: Vec<Ws> = registry
        .into_iter()
        .filter_map(|a| match a {
            Attempt::Open(ws) => Some(*ws),
            Attempt::Refused { status, .. } => {
                assert_eq!(status, 503);
                None
            }
        })
        .collect();
    assert_eq!(registry.len(), 22);

    // Three rooms, 20 clients each, 6 admitted per room.
    let rooms = ["lobby", "kitchen", "attic"];
    let mut held_rooms = Vec::new();
    for room in rooms {
        let url = gw.url(&format!("/room/{room}/ws"));
        let attempts = join_all((0..20).map(|i| connect_from(client(i), &url, &[]))).await;
        assert_eq!(
            attempts.iter().filter(|a| a.status() == 101).count(),
            6,
            "room {room}"
        );
        held_rooms.push(attempts);
    }

    // Every admitted socket is live in its object, and echoes through it.
    for ws in registry.iter_mut().take(5) {
        echo(ws, "hello registry").await;
    }
    let reg = stats(&gw, "/stats/registry").await;
    assert_eq!((reg.sockets, reg.accepted), (25, 25), "{reg:?}");
    assert!(reg.max_sockets <= 25, "{reg:?}");
    for room in rooms {
        let s = stats(&gw, &format!("/stats/room/{room}")).await;
        assert_eq!((s.sockets, s.accepted), (6, 6), "{room}: {s:?}");
        assert!(s.max_sockets <= 6, "{room}: {s:?}");
    }

    // Everything closes: objects and gateway agree on zero.
    drop((registry, own, held_rooms));
    gw.wait_active("registry", 0).await;
    gw.wait_active("rooms", 0).await;
    eventually(
        Duration::from_secs(10),
        "objects released every socket",
        || async { (stats(&gw, "/stats/registry").await.sockets == 0).then_some(()) },
    )
    .await;

    // Freed slots admit again, still within the object's limit.
    let again = join_all((0..30).map(|i| connect_from(client(i), &url, &[]))).await;
    assert_eq!(again.iter().filter(|a| a.status() == 101).count(), 25);
    let reg = stats(&gw, "/stats/registry").await;
    assert!(reg.max_sockets <= 25 && reg.accepted == 50, "{reg:?}");

    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", "registry"), ("dry_run", "false")]
        ),
        (7 + 58 + 5) as f64
    );
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", "rooms"), ("scope", "key")]
        ),
        42.0
    );
}
