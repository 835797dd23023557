//! The soak: minutes of random churn (opens, closes, resets, refusals,
//! reloads, scrapes) against one wsgate, ending with every count at zero,
//! no gauge ever negative, file descriptors back to their baseline and
//! memory back near it. Not part of the default run:
//!
//! ```sh
//! SOAK_SECS=300 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! It prints its figures as one JSON line.

mod common;

use common::upstream::Upstream;
use common::*;
use std::net::IpAddr;
use std::time::{Duration, Instant};

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A small xorshift generator: the soak must be reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn body(up: &Upstream, total: u32) -> String {
    format!(
        "routes:\n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{u}    limits:\n      total: {total}\n      per_key: 8\n      per_client: 6\n\
         \n  - name: relay\n    prefix: /\n{u}    limits:\n      total: 60\n",
        u = upstream_yaml(up.addr)
    )
}

/// What one period of churn did.
#[derive(Default)]
struct Churn {
    opened: u64,
    refused: u64,
    resets: u64,
    reloads: u64,
    scrapes: u64,
    peak_rss: u64,
}

/// Random churn against `gw` for `secs`; every stream is closed at the end.
async fn churn(gw: &Wsgate, up: &Upstream, rng: &mut Rng, secs: u64, reloads_before: u64) -> Churn {
    let pid = gw.pid();
    let mut c = Churn::default();
    let mut held: Vec<Ws> = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        match rng.below(100) {
            0..=54 => {
                let from = IpAddr::from([127, 5, rng.below(40) as u8, 1]);
                let path = if rng.below(3) == 0 {
                    "/relay/ws".to_string()
                } else {
                    format!("/room/r{}/ws", rng.below(30))
                };
                match connect_from(from, &gw.url(&path), &[]).await {
                    Attempt::Open(ws) => {
                        c.opened += 1;
                        held.push(*ws);
                    }
                    Attempt::Refused { status, .. } => {
                        assert_eq!(status, 503);
                        c.refused += 1;
                    }
                }
            }
            55..=79 if !held.is_empty() => {
                let i = rng.below(held.len() as u64) as usize;
                drop(held.swap_remove(i));
            }
            80..=87 if !held.is_empty() => {
                // A reset: drop the socket without a close handshake.
                let i = rng.below(held.len() as u64) as usize;
                let ws = held.swap_remove(i);
                if let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.get_ref() {
                    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                }
                drop(ws);
                c.resets += 1;
            }
            88..=91 if !held.is_empty() => {
                let i = rng.below(held.len() as u64) as usize;
                echo(&mut held[i], "soak").await;
            }
            92..=94 => {
                let total = 40 + rng.below(80) as u32;
                let n = reloads_before + c.reloads;
                gw.rewrite(&format!("# reload {n}\n{}", body(up, total)), "success")
                    .await;
                c.reloads += 1;
            }
            _ => {
                let m = gw.metrics().await;
                for (name, _, value) in &m.0 {
                    assert!(
                        !(name.starts_with("wsgate_") && *value < 0.0),
                        "{name} went negative"
                    );
                }
                c.scrapes += 1;
                c.peak_rss = c.peak_rss.max(proc_status(pid, "VmRSS:"));
            }
        }
    }
    drop(held);
    gw.wait_active("rooms", 0).await;
    gw.wait_active("relay", 0).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run with --ignored"]
async fn soak() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let up = Upstream::start().await;
    let gw = Wsgate::start(&body(&up, 80)).await;
    let pid = gw.pid();
    let mut rng = Rng(seed);
    let (fds_start, rss_start) = (open_fds(pid), proc_status(pid, "VmRSS:"));

    // A warm-up that fills every route to the highest limits the churn can
    // reload to, echoing on each stream: the allocator keeps what that peak
    // needed (a high-water mark, not a leak), so the baseline is taken after
    // it. Growth past it during the soak is what would show a leak.
    gw.rewrite(&format!("# warm-up\n{}", body(&up, 120)), "success")
        .await;
    let mut warm = Vec::new();
    for i in 0..400u64 {
        let from = IpAddr::from([127, 5, (i % 40) as u8, 1]);
        let path = if i % 3 == 0 {
            "/relay/ws".to_string()
        } else {
            format!("/room/r{}/ws", i % 30)
        };
        if let Attempt::Open(ws) = connect_from(from, &gw.url(&path), &[]).await {
            warm.push(*ws);
        }
    }
    for ws in warm.iter_mut() {
        echo(ws, "warm-up").await;
    }
    drop(warm);
    gw.wait_active("rooms", 0).await;
    gw.wait_active("relay", 0).await;
    let (fds0, rss0) = (open_fds(pid), proc_status(pid, "VmRSS:"));
    let c = churn(&gw, &up, &mut rng, secs, 1).await;

    let m = gw.metrics().await;
    assert_eq!(m.get("wsgate_tracked_keys", &[]), 0.0);
    eventually(
        Duration::from_secs(10),
        "file descriptors back to baseline",
        || async { (open_fds(pid) <= fds0).then_some(()) },
    )
    .await;
    // Allocators hand memory back with some delay: give it a bounded while.
    let near = rss0 + rss0 / 4;
    let settled = Instant::now() + Duration::from_secs(15);
    while proc_status(pid, "VmRSS:") > near && Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss1 = proc_status(pid, "VmRSS:");
    println!(
        "{{\"secs\":{secs},\"seed\":{seed},\"opened\":{},\"refused\":{},\"resets\":{},\"reloads\":{},\
         \"scrapes\":{},\"fds_start\":{fds_start},\"fds_baseline\":{fds0},\"fds_after\":{},\
         \"rss_kb_start\":{rss_start},\"rss_kb_baseline\":{rss0},\"rss_kb_peak\":{},\"rss_kb_after\":{rss1}}}",
        c.opened,
        c.refused,
        c.resets,
        c.reloads,
        c.scrapes,
        open_fds(pid),
        c.peak_rss
    );
    assert!(
        rss1 <= near,
        "RSS {rss1} kB after the soak, {rss0} kB after the warm-up"
    );
}
