//! Live limits: reloads that never touch a live stream, the doubled-limit
//! trap, every way of triggering a reload, dry-run, overrides and the
//! upgrade rate.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::future::join_all;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client(n: usize) -> IpAddr {
    IpAddr::from([127, 3, (n / 250) as u8, (n % 250 + 1) as u8])
}

fn routes(up: &Upstream, echo_total: Option<u32>, extra: &str) -> String {
    let mut s = String::from("routes:\n");
    if let Some(total) = echo_total {
        s.push_str(&format!(
            "  - name: echo\n    prefix: /echo\n{}    limits:\n      total: {total}\n",
            upstream_yaml(up.addr)
        ));
    }
    s.push_str(&format!(
        "  - name: other\n    prefix: /other\n{}    limits:\n      total: 4\n{extra}",
        upstream_yaml(up.addr)
    ));
    s
}

async fn open_n(gw: &Wsgate, path: &str, n: usize) -> Vec<Attempt> {
    let url = gw.url(path);
    join_all((0..n).map(|i| connect_from(client(i), &url, &[]))).await
}

fn count_open(a: &[Attempt]) -> usize {
    a.iter().filter(|a| a.status() == 101).count()
}

/// Streams that echo every 50 ms until stopped, recording the slowest echo.
struct Chatter {
    stop: Arc<AtomicBool>,
    slowest_ms: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Ws>>,
}

impl Chatter {
    fn start(streams: Vec<Ws>) -> Chatter {
        let stop = Arc::new(AtomicBool::new(false));
        let slowest_ms = Arc::new(AtomicU64::new(0));
        let tasks = streams
            .into_iter()
            .enumerate()
            .map(|(i, mut ws)| {
                let (stop, slowest) = (stop.clone(), slowest_ms.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        echo(&mut ws, &format!("stream {i} message {n}")).await;
                        slowest.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    ws
                })
            })
            .collect();
        Chatter {
            stop,
            slowest_ms,
            tasks,
        }
    }

    /// Stops the chatter; panics if any stream failed to echo.
    async fn finish(self) -> Vec<Ws> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.expect("a stream stopped echoing"));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_echo_through_every_kind_of_reload() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up, Some(10), "")).await;
    let live: Vec<Ws> = open_n(&gw, "/echo", 5)
        .await
        .into_iter()
        .map(Attempt::into_open)
        .collect();
    let chatter = Chatter::start(live);

    let steady = |what: &'static str| {
        let gw = &gw;
        async move {
            let m = gw.metrics().await;
            assert_eq!(
                m.get("wsgate_streams_active", &[("route", "echo")]),
                5.0,
                "gauge moved after: {what}"
            );
        }
    };

    // Unchanged file: only a signal reloads it.
    let before = gw.reloads("success").await;
    gw.signal("HUP");
    gw.wait_reloads("success", before + 1.0).await;
    steady("unchanged").await;

    gw.rewrite(
        &format!("# a comment\n{}", routes(&up, Some(10), "")),
        "success",
    )
    .await;
    steady("comment").await;

    let other_changed = routes(&up, Some(10), "").replace("total: 4", "total: 6");
    gw.rewrite(&other_changed, "success").await;
    steady("other route changed").await;

    let added = routes(
        &up,
        Some(10),
        &format!(
            "  - name: added\n    prefix: /added\n{}",
            upstream_yaml(up.addr)
        ),
    );
    gw.rewrite(&added, "success").await;
    steady("route added").await;
    assert_eq!(count_open(&open_n(&gw, "/added", 3).await), 3);

    // Raised: admits at once, up to the new limit (5 live + 15).
    gw.rewrite(&routes(&up, Some(20), ""), "success").await;
    steady("raised").await;
    let extra = open_n(&gw, "/echo", 30).await;
    assert_eq!(count_open(&extra), 15);
    drop(extra);
    gw.wait_active("echo", 5).await;

    // Lowered below the live count: nothing new, nothing closed.
    gw.rewrite(&routes(&up, Some(3), ""), "success").await;
    steady("lowered").await;
    assert_eq!(count_open(&open_n(&gw, "/echo", 10).await), 0);

    // Invalid: refused whole, the running config stays.
    let before_failures = gw.reloads("failure").await;
    std::fs::write(
        &gw.config_path,
        gw.config_text("routes:\n  - name: echo\n    prefix: /echo\n    limits: {total: lots}\n"),
    )
    .unwrap();
    gw.wait_reloads("failure", before_failures + 1.0).await;
    let m = gw.metrics().await;
    assert_eq!(m.get("wsgate_config_last_reload_success", &[]), 0.0);
    assert_eq!(
        m.get(
            "wsgate_limit_streams",
            &[("route", "echo"), ("scope", "route")]
        ),
        3.0
    );
    assert!(gw.log().contains("config reload refused"), "{}", gw.log());
    assert!(
        gw.log().contains("routes[0].limits.total: invalid type"),
        "{}",
        gw.log()
    );
    steady("invalid file").await;

    // Removed: its streams run on and keep their slots; new upgrades find no route.
    gw.rewrite(&routes(&up, None, ""), "success").await;
    assert_eq!(
        gw.metrics()
            .await
            .get("wsgate_config_last_reload_success", &[]),
        1.0
    );
    steady("removed").await;
    assert_eq!(connect(&gw.url("/echo")).await.status(), 404);
    let status = gw.status().await;
    assert_eq!(status["draining_routes"][0]["live"], 5, "{status}");

    let slowest = chatter.slowest_ms.clone();
    let streams = chatter.finish().await;
    assert_eq!(streams.len(), 5);
    // Bounded generously: the point is that no reload stalls a stream.
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(slowest < 5000, "an echo took {slowest} ms");
    drop(streams);
    gw.wait_active("echo", 0).await;
    let status = gw.status().await;
    assert_eq!(
        status["draining_routes"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_at_the_limit_never_doubles_it() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up, Some(10), "")).await;
    let held = open_n(&gw, "/echo", 10).await;
    assert_eq!(count_open(&held), 10);

    for round in 0..3 {
        let body = format!("# reload {round}\n{}", routes(&up, Some(10), ""));
        gw.rewrite(&body, "success").await;
        assert_eq!(
            count_open(&open_n(&gw, "/echo", 50).await),
            0,
            "round {round}"
        );
    }
    drop(held);
    gw.wait_active("echo", 0).await;
    assert_eq!(count_open(&open_n(&gw, "/echo", 50).await), 10);
}

async fn limit(gw: &Wsgate) -> f64 {
    gw.metrics().await.get(
        "wsgate_limit_streams",
        &[("route", "echo"), ("scope", "route")],
    )
}

async fn wait_limit(gw: &Wsgate, want: f64, how: &str) {
    let what = format!("limit {want} after {how}");
    eventually(Duration::from_secs(10), &what, || async {
        (limit(gw).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_trigger_reloads_in_place_by_rename_by_symlink_and_by_signal() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up, Some(10), "")).await;
    let path = gw.config_path.clone();

    std::fs::write(&path, gw.config_text(&routes(&up, Some(11), ""))).unwrap();
    wait_limit(&gw, 11.0, "write in place").await;

    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, gw.config_text(&routes(&up, Some(12), ""))).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_limit(&gw, 12.0, "rename over the file").await;

    // A ConfigMap-style mount: the config is a symlink into a data directory
    // that is swapped by re-pointing another symlink.
    let dir = gw.dir.path();
    let data1 = dir.join("data-1");
    std::fs::create_dir(&data1).unwrap();
    std::fs::write(
        data1.join("wsgate.yaml"),
        gw.config_text(&routes(&up, Some(13), "")),
    )
    .unwrap();
    std::os::unix::fs::symlink("data-1", dir.join("..data")).unwrap();
    let link_tmp = dir.join("wsgate.yaml.new");
    std::os::unix::fs::symlink("..data/wsgate.yaml", &link_tmp).unwrap();
    std::fs::rename(&link_tmp, &path).unwrap();
    wait_limit(&gw, 13.0, "the file becoming a symlink").await;

    let data2 = dir.join("data-2");
    std::fs::create_dir(&data2).unwrap();
    std::fs::write(
        data2.join("wsgate.yaml"),
        gw.config_text(&routes(&up, Some(14), "")),
    )
    .unwrap();
    let swap = dir.join("..data_tmp");
    std::os::unix::fs::symlink("data-2", &swap).unwrap();
    std::fs::rename(&swap, dir.join("..data")).unwrap();
    wait_limit(&gw, 14.0, "a symlink swap").await;

    // A signal reloads even when no watcher saw anything: change the target
    // behind two symlinks without touching the watched directory's entries.
    std::fs::write(
        data2.join("wsgate.yaml"),
        gw.config_text(&routes(&up, Some(15), "")),
    )
    .unwrap();
    gw.signal("HUP");
    wait_limit(&gw, 15.0, "SIGHUP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_cannot_be_read_is_reported_once_however_many_events_follow() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up, Some(10), "")).await;
    let before = gw.reloads("failure").await;

    std::fs::remove_file(&gw.config_path).unwrap();
    gw.wait_reloads("failure", before + 1.0).await;

    // A file kept beside the config (a log, say) raises events in the
    // watched directory, and each has the config read again. The writes are
    // paced past the watcher's debounce so that each is a read of its own.
    let beside = gw.dir.path().join("beside.log");
    for i in 0..4 {
        std::fs::write(&beside, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // Reloads run one after another: once the restored file is applied,
    // every earlier event has been handled.
    std::fs::write(&gw.config_path, gw.config_text(&routes(&up, Some(11), ""))).unwrap();
    wait_limit(&gw, 11.0, "the file coming back").await;
    assert_eq!(gw.reloads("failure").await, before + 1.0, "{}", gw.log());
    assert_eq!(
        gw.log().matches("config reload refused").count(),
        1,
        "{}",
        gw.log()
    );

    // Gone again, and back exactly as it was: the refusal was the last word,
    // so the same text is applied again and the failure cleared.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::remove_file(&gw.config_path).unwrap();
    gw.wait_reloads("failure", before + 2.0).await;
    let successes = gw.reloads("success").await;
    std::fs::write(&gw.config_path, text).unwrap();
    gw.wait_reloads("success", successes + 1.0).await;
    let last = gw
        .metrics()
        .await
        .get("wsgate_config_last_reload_success", &[]);
    assert_eq!(last, 1.0, "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_needs_a_restart_is_refused_by_name() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up, Some(10), "")).await;
    let moved_admin = gw.config_text(&routes(&up, Some(20), "")).replace(
        &format!("address: {}", gw.admin),
        &format!("address: 127.0.0.1:{}", free_port()),
    );
    let before = gw.reloads("failure").await;
    std::fs::write(&gw.config_path, moved_admin).unwrap();
    gw.wait_reloads("failure", before + 1.0).await;
    assert!(
        gw.log()
            .contains("admin.address: changed; restart wsgate to apply it"),
        "{}",
        gw.log()
    );
    assert_eq!(
        limit(&gw).await,
        10.0,
        "nothing of the refused file was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_admits_everything_and_counts_what_it_would_refuse() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: trial\n    prefix: /\n{}    dry_run: true\n    limits:\n      total: 3\n      per_client: 2\n",
        upstream_yaml(up.addr)
    ))
    .await;

    let url = gw.url("/ws");
    // One after another: in a burst, the attempt that reaches the route
    // count last need not be one already over its client limit.
    let mut from_one = Vec::new();
    for _ in 0..4 {
        from_one.push(connect_from(ip("127.0.0.20"), &url, &[]).await);
    }
    let spread = open_n(&gw, "/ws", 6).await;
    assert_eq!(
        count_open(&from_one) + count_open(&spread),
        10,
        "dry-run refused something"
    );

    let m = gw.metrics().await;
    let would = |scope| {
        m.get(
            "wsgate_streams_rejected_total",
            &[("route", "trial"), ("scope", scope), ("dry_run", "true")],
        )
    };
    // The client scope is checked first: the single client's 3rd and 4th.
    assert_eq!(would("client"), 2.0);
    // The route total: 10 streams against 3, less the one first counted as
    // over its client limit (each would-be refusal is counted once).
    assert_eq!(would("route"), 6.0);
    assert_eq!(
        m.get("wsgate_streams_rejected_total", &[("dry_run", "false")]),
        0.0
    );
    assert_eq!(m.get("wsgate_streams_active", &[("route", "trial")]), 10.0);
    assert!(gw.log().contains("dry_run=true"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_specific_override_wins() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "limits:\n  per_client: 50\n  overrides:\n    - client: 127.0.0.30/32\n      per_client: 1\n\
         routes:\n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{}    limits:\n      per_client: 2\n      per_key: 2\n\
         \x20   overrides:\n      - client: 127.0.0.0/16\n        per_client: 3\n      - client: 127.0.0.7\n        per_client: 5\n\
         \x20     - key: big\n        per_key: 4\n",
        upstream_yaml(up.addr)
    ))
    .await;

    let burst = |from: &'static str, room: &'static str, n: usize| {
        let url = gw.url(&format!("/room/{room}/ws"));
        async move { join_all((0..n).map(|_| connect_from(ip(from), &url, &[]))).await }
    };
    // Each case in its own room, with the room's limit out of the way (big: 4).
    let exact = burst("127.0.0.7", "big", 8).await;
    assert_eq!(
        count_open(&exact),
        4,
        "per_key override of `big` caps the exact-address client"
    );
    drop(exact);
    gw.wait_active("rooms", 0).await;

    let mut held = Vec::new();
    for room in ["a", "b", "c"] {
        let url = gw.url(&format!("/room/{room}/ws"));
        held.push(connect_from(ip("127.0.0.7"), &url, &[]).await);
        held.push(connect_from(ip("127.0.0.7"), &url, &[]).await);
    }
    // 6 attempts in three rooms: the /32 override (5) beats the /16 (3).
    assert_eq!(count_open(&held), 5);
    drop(held);

    let mut held = Vec::new();
    for room in ["d", "e"] {
        let url = gw.url(&format!("/room/{room}/ws"));
        for _ in 0..2 {
            held.push(connect_from(ip("127.0.5.5"), &url, &[]).await);
        }
    }
    assert_eq!(count_open(&held), 3, "the /16 override");

    let outside = burst("127.1.0.1", "f", 2).await;
    let more = burst("127.1.0.1", "g", 2).await;
    assert_eq!(
        count_open(&outside) + count_open(&more),
        2,
        "the route's own per_client"
    );

    let global = burst("127.0.0.30", "h", 2).await;
    assert_eq!(count_open(&global), 1, "the global override");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_rate_damps_a_reconnect_storm() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&format!(
        "routes:\n  - name: relay\n    prefix: /\n{}    rate:\n      per_second: 0.2\n      burst: 3\n\
         \x20   reject:\n      retry_after: 2s\n      retry_after_jitter: 10s\n",
        upstream_yaml(up.addr)
    ))
    .await;

    // A client that reconnects as soon as its stream ends never holds more
    // than one stream, yet only its burst gets through.
    let mut statuses = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..10 {
        match connect_from(ip("127.0.0.40"), &gw.url("/ws"), &[]).await {
            Attempt::Open(ws) => {
                statuses.push(101);
                drop(ws);
            }
            Attempt::Refused {
                status,
                headers,
                body,
            } => {
                statuses.push(status);
                assert_eq!(body, "wsgate: client_rate limit reached on route relay\n");
                waits.push(headers["retry-after"].parse::<u64>().unwrap());
            }
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 101).count(),
        3,
        "{statuses:?}"
    );
    assert!(waits.iter().all(|w| (2..=12).contains(w)), "{waits:?}");
    assert!(waits.iter().any(|w| *w != waits[0]), "no jitter: {waits:?}");

    // Another client is not affected.
    assert_eq!(
        connect_from(ip("127.0.0.41"), &gw.url("/ws"), &[])
            .await
            .status(),
        101
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "wsgate_streams_rejected_total",
            &[("scope", "client_rate"), ("dry_run", "false")]
        ),
        7.0
    );
}
