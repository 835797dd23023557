//! A fleet of wsgate instances sharing their counts through Redis: exact
//! limits across instances, leases that free a killed instance's slots and
//! keep long streams counted, and each fallback policy while Redis is
//! stopped, restarted empty or too slow to answer.
//!
//! Every test starts its own `redis-server` on a loopback port it picks.

mod common;

use common::upstream::Upstream;
use common::*;
use futures_util::future::join_all;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `redis-server` child process, without persistence, on its own port.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        for attempt in 0..5 {
            let port = free_port();
            match Self::spawn(port, dir.path()).await {
                Ok(child) => return Redis { child, port, dir },
                Err(e) if attempt < 4 => eprintln!("redis-server did not start ({e}); retrying"),
                Err(e) => panic!("redis-server did not start: {e}"),
            }
        }
        unreachable!()
    }

    async fn spawn(port: u16, dir: &std::path::Path) -> Result<Child, String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server (is it installed?): {e}"))?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("exited with {status}"));
            }
            if ping(port).await {
                return Ok(child);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no PONG within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Ends the server at once, as a crash would.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A new, empty server on the same port.
    async fn restart(&mut self) {
        self.stop();
        let start = Instant::now();
        loop {
            match Self::spawn(self.port, self.dir.path()).await {
                Ok(child) => return self.child = child,
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "redis-server did not restart: {e}"
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A stopped server must be continued to be killed cleanly.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        self.stop();
    }
}

async fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
    matches!(read, Ok(Ok(n)) if buf[..n].starts_with(b"+PONG"))
}

/// The `cluster:` section of one instance. The call timeout is as long as
/// the lease allows, so a busy test machine is not taken for a slow Redis.
/// Tests that do not wait on a lease running out take a long one, so a
/// stalled renewal or a slow call cannot change what they count.
fn cluster_yaml(redis: &Redis, id: &str, lease: &str, policy: &str) -> String {
    let timeout = match lease {
        "2s" => "600ms",
        "3s" => "1s",
        "6s" => "2s",
        "15s" => "5s",
        other => panic!("no call timeout chosen for a lease of {other}"),
    };
    format!(
        "cluster:\n  redis: {}\n  instance_id: {id}\n  lease: {lease}\n  call_timeout: {timeout}\n\
         \x20 when_unreachable: {policy}\n  instances: 2\n",
        redis.url()
    )
}

/// Starts one instance per `(id, policy)`, all with `routes`.
async fn fleet(redis: &Redis, lease: &str, members: &[(&str, &str)], routes: &str) -> Vec<Wsgate> {
    let mut out = Vec::new();
    for (id, policy) in members {
        let body = format!("{}{routes}", cluster_yaml(redis, id, lease, policy));
        let gw = Wsgate::start(&body).await;
        // Registered in Redis before it takes traffic.
        eventually(
            Duration::from_secs(10),
            "wsgate_cluster_up == 1",
            || async { (cluster_up(&gw).await == 1.0).then_some(()) },
        )
        .await;
        out.push(gw);
    }
    out
}

/// A distinct loopback source address per client number.
fn client(n: usize) -> IpAddr {
    IpAddr::from([127, 2, (n / 250) as u8, (n % 250 + 1) as u8])
}

/// `n` upgrades at once, the i-th to instance `i % len` at `path`.
async fn burst(
    gws: &[&Wsgate],
    n: usize,
    path: &str,
    from: impl Fn(usize) -> IpAddr,
) -> Vec<Attempt> {
    join_all((0..n).map(|i| {
        let url = gws[i % gws.len()].url(path);
        let ip = from(i);
        async move { connect_from(ip, &url, &[]).await }
    }))
    .await
}

fn opened(attempts: &[Attempt]) -> usize {
    attempts.iter().filter(|a| a.status() == 101).count()
}

fn keep_open(attempts: Vec<Attempt>) -> Vec<Ws> {
    attempts
        .into_iter()
        .filter(|a| a.status() == 101)
        .map(Attempt::into_open)
        .collect()
}

/// The fleet-wide live count of `route` that `gw` reports in `/status`.
async fn fleet_live(gw: &Wsgate, route: &str) -> Option<i64> {
    gw.status().await["cluster"]["routes"][route].as_i64()
}

async fn wait_fleet_live(gw: &Wsgate, route: &str, n: i64, limit: Duration) {
    let what = format!("fleet-wide live streams on {route} == {n}");
    eventually(limit, &what, || async {
        (fleet_live(gw, route).await == Some(n)).then_some(())
    })
    .await
}

async fn cluster_up(gw: &Wsgate) -> f64 {
    gw.metrics().await.get("wsgate_cluster_up", &[])
}

fn routes(up: &Upstream, total: u32) -> String {
    format!(
        "routes:\n  - name: total\n    prefix: /total\n{u}    limits:\n      total: {total}\n\
         \n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{u}    limits:\n      per_key: 10\n\
         \n  - name: perclient\n    prefix: /client\n{u}    limits:\n      per_client: 4\n",
        u = upstream_yaml(up.addr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_all_instances_admits_exactly_the_limit_round_after_round() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let members = [("a", "local"), ("b", "local"), ("c", "local")];
    let gws = fleet(&redis, "6s", &members, &routes(&up, 30)).await;
    let all: Vec<&Wsgate> = gws.iter().collect();

    for round in 0..3 {
        let total = burst(&all, 150, "/total", client).await;
        assert_eq!(
            opened(&total),
            30,
            "route total, round {round}\n{}",
            gws[0].log()
        );
        let room = burst(&all, 60, "/room/lobby/ws", client).await;
        assert_eq!(opened(&room), 10, "room, round {round}");
        let one = burst(&all, 30, "/client", |_| "127.0.0.9".parse().unwrap()).await;
        assert_eq!(opened(&one), 4, "one client, round {round}");

        eventually(
            Duration::from_secs(10),
            "upstream holds every admitted stream",
            || async { (up.open() == 44).then_some(()) },
        )
        .await;
        for gw in &gws {
            assert_eq!(fleet_live(gw, "total").await, Some(30));
            assert_eq!(fleet_live(gw, "rooms").await, Some(10));
        }
        let held: f64 = join_all(gws.iter().map(|g| g.metrics()))
            .await
            .iter()
            .map(|m| m.get("wsgate_cluster_slots_held", &[]))
            .sum();
        assert_eq!(held, 44.0, "the instances' holds add up to the fleet's");

        drop((total, room, one));
        for gw in &gws {
            wait_fleet_live(gw, "total", 0, Duration::from_secs(10)).await;
        }
        wait_fleet_live(&gws[0], "rooms", 0, Duration::from_secs(10)).await;
    }
    for gw in &gws {
        let m = gw.metrics().await;
        assert_eq!(m.get("wsgate_cluster_up", &[]), 1.0);
        assert_eq!(m.get("wsgate_cluster_fallbacks_total", &[]), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_client_limit_holds_across_routes_and_instances() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let body = format!("limits:\n  per_client: 5\n{}", routes(&up, 100));
    let members = [("a", "local"), ("b", "local"), ("c", "local")];
    let gws = fleet(&redis, "6s", &members, &body).await;
    let all: Vec<&Wsgate> = gws.iter().collect();
    let one: IpAddr = "127.0.0.7".parse().unwrap();

    for round in 0..2 {
        let (total, rooms) = tokio::join!(
            burst(&all, 12, "/total", |_| one),
            burst(&all, 12, "/room/r/ws", |_| one),
        );
        assert_eq!(opened(&total) + opened(&rooms), 5, "round {round}");
        drop((total, rooms));
        for gw in &gws {
            wait_fleet_live(gw, "total", 0, Duration::from_secs(10)).await;
            wait_fleet_live(gw, "rooms", 0, Duration::from_secs(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_frees_its_slots_within_the_lease() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let members = [("a", "local"), ("b", "local")];
    let mut gws = fleet(&redis, "2s", &members, &routes(&up, 20)).await;

    let held_a = keep_open(burst(&[&gws[0]], 12, "/total", client).await);
    let mut held_b = keep_open(burst(&[&gws[1]], 5, "/total", |i| client(100 + i)).await);
    assert_eq!((held_a.len(), held_b.len()), (12, 5));
    wait_fleet_live(&gws[1], "total", 17, Duration::from_secs(10)).await;

    gws[0].signal("KILL");
    gws[0].wait_exit(Duration::from_secs(10)).await;
    let killed = Instant::now();
    // The lease is 2 s; the bound leaves room for a slow machine.
    wait_fleet_live(&gws[1], "total", 5, Duration::from_secs(10)).await;
    eprintln!("slots freed {:?} after kill -9", killed.elapsed());

    // B's streams were untouched, and the freed slots are B's to take.
    for ws in &mut held_b {
        echo(ws, "still here").await;
    }
    let more = burst(&[&gws[1]], 30, "/total", |i| client(200 + i)).await;
    assert_eq!(opened(&more), 15);
    drop(held_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_instance_loses_its_slots_and_registers_them_on_return() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let members = [("a", "local"), ("b", "local")];
    let gws = fleet(&redis, "2s", &members, &routes(&up, 20)).await;
    let mut held = keep_open(burst(&[&gws[0]], 6, "/total", client).await);
    assert_eq!(held.len(), 6);
    wait_fleet_live(&gws[1], "total", 6, Duration::from_secs(10)).await;

    // A stalls past its lease: the fleet stops counting its streams.
    gws[0].signal("STOP");
    wait_fleet_live(&gws[1], "total", 0, Duration::from_secs(10)).await;
    gws[0].signal("CONT");
    wait_fleet_live(&gws[1], "total", 6, Duration::from_secs(10)).await;
    for ws in &mut held {
        echo(ws, "back").await;
    }
    let more = burst(&[&gws[1]], 20, "/total", |i| client(100 + i)).await;
    assert_eq!(opened(&more), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_living_through_many_leases_stay_counted() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let members = [("a", "local"), ("b", "local")];
    let gws = fleet(&redis, "3s", &members, &routes(&up, 10)).await;
    let all: Vec<&Wsgate> = gws.iter().collect();

    let mut held = keep_open(burst(&all, 10, "/total", client).await);
    assert_eq!(held.len(), 10);

    // Three lease periods: every extra upgrade, on either instance, is
    // refused and the fleet still counts all ten.
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(9) {
        let extra = connect_from(client(500 + i), &gws[i % 2].url("/total"), &[]).await;
        assert_eq!(extra.status(), 503, "after {:?}", start.elapsed());
        assert_eq!(fleet_live(&gws[i % 2], "total").await, Some(10));
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for ws in &mut held {
        echo(ws, "alive").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_acts_while_redis_is_down_and_counts_recover_on_restart() {
    let mut redis = Redis::start().await;
    let up = Upstream::start().await;
    // `local` shares the limit of 10 over `instances: 2`: 5 each.
    let members = [("l", "local"), ("o", "open"), ("c", "closed")];
    let gws = fleet(&redis, "2s", &members, &routes(&up, 10)).await;
    let (l, o, c) = (&gws[0], &gws[1], &gws[2]);
    let first = keep_open(burst(&[l], 2, "/total", client).await);
    assert_eq!(first.len(), 2);

    redis.stop();
    let on_l = burst(&[l], 8, "/total", |i| client(10 + i)).await;
    assert_eq!(
        opened(&on_l),
        3,
        "local: its share of 5, with 2 already held"
    );
    let on_o = burst(&[o], 8, "/total", |i| client(20 + i)).await;
    assert_eq!(opened(&on_o), 8, "open: counted locally only");
    let on_c = burst(&[c], 3, "/total", |i| client(30 + i)).await;
    assert_eq!(opened(&on_c), 0, "closed: refuses");
    match &on_c[0] {
        Attempt::Refused { status, body, .. } => {
            assert_eq!(*status, 503);
            assert!(body.contains("cluster_unavailable"), "{body}");
        }
        Attempt::Open(_) => unreachable!(),
    }
    for (gw, policy) in [(l, "local"), (o, "open"), (c, "closed")] {
        let m = gw.metrics().await;
        assert_eq!(m.get("wsgate_cluster_up", &[]), 0.0);
        let fallbacks = m.get("wsgate_cluster_fallbacks_total", &[("policy", policy)]);
        assert!(fallbacks >= 1.0, "{policy}: {fallbacks}");
    }

    // An empty Redis: every instance registers what it holds again.
    redis.restart().await;
    let (on_l, on_o) = (keep_open(on_l), keep_open(on_o));
    for gw in &gws {
        wait_fleet_live(gw, "total", 13, Duration::from_secs(10)).await;
        assert_eq!(cluster_up(gw).await, 1.0);
    }
    let over = burst(&[l, o, c], 6, "/total", |i| client(40 + i)).await;
    assert_eq!(opened(&over), 0, "13 held against a limit of 10");

    // Streams that ended while Redis was down were given back once.
    drop(on_o);
    wait_fleet_live(c, "total", 5, Duration::from_secs(10)).await;
    let again = burst(&[l, o, c], 12, "/total", |i| client(50 + i)).await;
    assert_eq!(opened(&again), 5);
    drop((first, on_l));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_is_waited_for_no_longer_than_the_call_timeout() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let members = [("o", "open"), ("c", "closed")];
    let gws = fleet(&redis, "2s", &members, &routes(&up, 10)).await;
    let (o, c) = (&gws[0], &gws[1]);
    let mut held = keep_open(burst(&[o], 3, "/total", client).await);
    wait_fleet_live(c, "total", 3, Duration::from_secs(10)).await;

    redis.signal("STOP");
    // A stream that ends while Redis cannot answer.
    drop(held.pop());
    o.wait_active("total", 2).await;
    let asked = Instant::now();
    let refused = connect_from(client(10), &c.url("/total"), &[]).await;
    let waited = asked.elapsed();
    assert_eq!(refused.status(), 503);
    // The call timeout is 600 ms; a hung call would never end.
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    let admitted = connect_from(client(11), &o.url("/total"), &[]).await;
    assert_eq!(admitted.status(), 101);
    assert_eq!(cluster_up(o).await, 0.0);

    redis.signal("CONT");
    let admitted = admitted.into_open();
    // Two held and one admitted meanwhile: the ended stream was given back
    // once, the new one registered.
    for gw in &gws {
        wait_fleet_live(gw, "total", 3, Duration::from_secs(10)).await;
    }
    for ws in &mut held {
        echo(ws, "through the pause").await;
    }
    drop(admitted);
    wait_fleet_live(c, "total", 2, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_routes_count_fleet_wide_and_never_refuse() {
    let mut redis = Redis::start().await;
    let up = Upstream::start().await;
    let routes = format!(
        "routes:\n  - name: trial\n    prefix: /trial\n    dry_run: true\n{}    limits:\n      total: 2\n",
        upstream_yaml(up.addr)
    );
    let gws = fleet(&redis, "6s", &[("a", "closed"), ("b", "closed")], &routes).await;
    let all: Vec<&Wsgate> = gws.iter().collect();
    let would_refuse = |scope: &'static str| {
        let gws = &gws;
        async move {
            let mut n = 0.0;
            for gw in gws {
                let labels = [("scope", scope), ("dry_run", "true")];
                n += gw
                    .metrics()
                    .await
                    .get("wsgate_streams_rejected_total", &labels);
            }
            n
        }
    };

    // One after another: in a burst, a stream whose local slot came first
    // may reach Redis last, and would be refused by either count.
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(connect_from(client(i), &all[i % 2].url("/trial"), &[]).await);
    }
    assert_eq!(opened(&held), 6, "dry run admits everything");
    assert_eq!(would_refuse("route").await, 4.0, "the fleet's limit of 2");
    wait_fleet_live(&gws[0], "trial", 6, Duration::from_secs(10)).await;

    // Closed, and Redis away: still admitted, counted as would-be refused.
    redis.stop();
    let more = burst(&all, 2, "/trial", |i| client(10 + i)).await;
    assert_eq!(opened(&more), 2);
    assert_eq!(would_refuse("cluster_unavailable").await, 2.0);
    drop((held, more));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_limits_fleet_wide_but_not_the_cluster() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let members = [("a", "local"), ("b", "local")];
    let gws = fleet(&redis, "6s", &members, &routes(&up, 4)).await;
    let all: Vec<&Wsgate> = gws.iter().collect();
    let held = keep_open(burst(&all, 10, "/total", client).await);
    assert_eq!(held.len(), 4);

    for (gw, id) in gws.iter().zip(["a", "b"]) {
        let body = format!(
            "{}{}",
            cluster_yaml(&redis, id, "6s", "local"),
            routes(&up, 7)
        );
        gw.rewrite(&body, "success").await;
    }
    let more = burst(&all, 10, "/total", |i| client(20 + i)).await;
    assert_eq!(opened(&more), 3, "the raised limit, counted over both");

    let moved = format!(
        "{}{}",
        cluster_yaml(&redis, "a2", "6s", "local"),
        routes(&up, 7)
    );
    gws[0].rewrite(&moved, "failure").await;
    assert!(
        gws[0].log().contains("cluster: changed; restart wsgate"),
        "{}",
        gws[0].log()
    );
    drop((held, more));
}

/// The extra latency of one upgrade in a fleet (one Redis round trip), next
/// to local counting. Not a check: run it by hand and read the output,
/// `cargo test --release --test cluster -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_in_a_fleet_never_admits_twice_the_limit() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    // Default instance ids (host and pid), so the old and the new process
    // count apart; a drain long enough to upgrade within it.
    let body = format!(
        "cluster:\n  redis: {}\n  lease: 2s\n  call_timeout: 600ms\n  when_unreachable: closed\n\
         routes:\n  - name: total\n    prefix: /total\n{}    limits:\n      total: 3\n",
        redis.url(),
        upstream_yaml(up.addr)
    );
    let old = Wsgate::start_with_server("  grace_period: 60s\n", &body).await;
    let url = old.url("/total");
    let held: Vec<Ws> = join_all((0..3).map(|_| connect(&url)))
        .await
        .into_iter()
        .map(Attempt::into_open)
        .collect();
    wait_fleet_live(&old, "total", 3, Duration::from_secs(10)).await;

    // SIGQUIT hands the listeners to a new process; the old one drains its
    // three streams.
    let new = old.upgrade().await;
    let new_pid = new.pid().to_string();
    eventually(
        Duration::from_secs(20),
        "the new process serves",
        || async {
            let status = old.status().await;
            let id = status["cluster"]["instance_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            id.ends_with(&format!("-{new_pid}")).then_some(())
        },
    )
    .await;

    // The new process counts the old one's streams: the limit holds.
    assert_eq!(fleet_live(&old, "total").await, Some(3));
    let over = connect(&old.url("/total")).await;
    assert_eq!(
        over.status(),
        503,
        "admitted past the limit during a deploy"
    );

    // As the old process's streams end, the new one admits again.
    drop(held);
    wait_fleet_live(&old, "total", 0, Duration::from_secs(20)).await;
    let fresh = connect(&old.url("/total")).await;
    assert_eq!(fresh.status(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn upgrade_latency_local_and_fleet() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let local = Wsgate::start(&routes(&up, 100_000)).await;
    let fleet = fleet(&redis, "15s", &[("bench", "open")], &routes(&up, 100_000)).await;
    for (name, gw) in [("local", &local), ("fleet", &fleet[0])] {
        let mut times = Vec::new();
        for i in 0..3000 {
            let start = Instant::now();
            let ws = connect_from(client(i % 200), &gw.url("/total"), &[]).await;
            times.push(start.elapsed());
            drop(ws.into_open());
        }
        times.sort();
        let p = |q: f64| times[((times.len() as f64) * q) as usize - 1];
        println!(
            "{name}: upgrades={} p50={:?} p99={:?}",
            times.len(),
            p(0.50),
            p(0.99)
        );
    }
    let m = fleet[0].metrics().await;
    let admit = [("op", "admit")];
    let sum = m.get("wsgate_cluster_redis_seconds_sum", &admit);
    let count = m.get("wsgate_cluster_redis_seconds_count", &admit);
    println!(
        "fleet: mean admit script round trip {:?}",
        Duration::from_secs_f64(sum / count)
    );
}
