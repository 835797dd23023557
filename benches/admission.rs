//! Microbenchmarks of the per-upgrade hot path: the admission core (take and
//! give back every slot of one upgrade), route matching on the normalised
//! path, and client identity.
//!
//! Run with `cargo bench --bench admission`; `cargo bench --bench admission --
//! admit` runs one group. Figures are per upgrade.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use wsgate::admission::{
    Admission, AdmissionTable, Ask, Permit, RouteLimits, RouteSlots, Tracking,
};
use wsgate::client::{ClientPolicy, ForwardHeader};
use wsgate::route::{normalize_path, Matcher, PathMatch, Pattern, Router};

/// Every scope applies: route total, per key, per client on the route and
/// per client across routes. Limits are high enough never to refuse.
fn ask(key: &str, client: IpAddr) -> Ask<'_> {
    Ask {
        limits: RouteLimits {
            total: Some(10_000_000),
            per_key: Some(1_000_000),
            per_client: Some(1_000_000),
        },
        global_per_client: Some(1_000_000),
        key: Some(key),
        client,
        client_exempt: false,
        rate: None,
        global_rate: None,
        dry_run: false,
        tracking: Tracking {
            max_keys: 1_000_000,
            ..Tracking::default()
        },
    }
}

/// The `n`-th distinct client, 10.0.0.0 upwards.
fn client(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn admit(table: &AdmissionTable, route: &Arc<RouteSlots>, ask: &Ask<'_>) -> Permit {
    match table.admit(route, ask) {
        Admission::Admitted { permit, .. } => permit,
        Admission::Refused(scope) => panic!("refused in {scope:?}"),
    }
}

/// A table already tracking `keys` route keys, `keys` clients on the route
/// and `keys` global clients, each holding one slot.
fn populated(keys: u32) -> (AdmissionTable, Arc<RouteSlots>, Vec<Permit>) {
    let table = AdmissionTable::new();
    let route = table.route("rooms");
    let names: Vec<String> = (0..keys).map(|i| format!("room-{i}")).collect();
    let held = names
        .iter()
        .enumerate()
        .map(|(i, name)| admit(&table, &route, &ask(name, client(i as u32))))
        .collect();
    (table, route, held)
}

/// Admit and drop one permit with every scope, in a table that already
/// tracks 1 to 100,000 keys per scope. `new_key`: the client and room are
/// not tracked yet, so each scope inserts and removes its key (the common
/// case of a fresh client); `known_key`: they already hold a slot, so each
/// scope only counts.
fn admit_and_drop(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit_drop");
    group.throughput(Throughput::Elements(1));
    for keys in [1u32, 1_000, 100_000] {
        let (table, route, held) = populated(keys);
        let fresh = client(50_000_000);
        group.bench_with_input(BenchmarkId::new("new_key", keys), &keys, |b, _| {
            let a = ask("a-new-room", fresh);
            b.iter(|| drop(black_box(admit(&table, &route, black_box(&a)))));
        });
        group.bench_with_input(BenchmarkId::new("known_key", keys), &keys, |b, _| {
            let a = ask("room-0", client(0));
            b.iter(|| drop(black_box(admit(&table, &route, black_box(&a)))));
        });
        assert_eq!(route.keys().tracked(), keys as usize);
        drop(held);
        assert_eq!(route.live(), 0);
    }
    group.finish();
}

/// Admit and drop from `threads` threads at once on one route, each thread
/// its own client and room, 1,000 keys already tracked. Reported per
/// operation of one thread: flat means no contention cost; linear growth in
/// the thread count would mean the threads are serialised.
fn contention(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut counts = vec![1, 2];
    if cores > 2 {
        counts.push(cores);
    }

    let mut group = c.benchmark_group("admit_drop_contended");
    group.throughput(Throughput::Elements(1));
    let shared = populated(1_000);
    let apart: Vec<_> = (0..*counts.iter().max().unwrap_or(&2))
        .map(|_| populated(1_000))
        .collect();
    for threads in counts {
        group.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &n| {
            b.iter_custom(|iters| run_threads(n, iters, |_| (&shared.0, &shared.1)));
        });
        // The control: as many threads, each on a table of its own, so
        // nothing is shared. What the machine itself loses with every core
        // busy; the gap to `threads` is the cost of sharing.
        group.bench_with_input(BenchmarkId::new("apart", threads), &threads, |b, &n| {
            b.iter_custom(|iters| run_threads(n, iters, |t| (&apart[t].0, &apart[t].1)));
        });
    }
    group.finish();
}

/// Runs `iters` admit+drop on each of `n` threads, started together, thread
/// `t` on the table and route `on(t)`; the wall time of the slowest.
fn run_threads<'a>(
    n: usize,
    iters: u64,
    on: impl Fn(usize) -> (&'a AdmissionTable, &'a Arc<RouteSlots>) + Sync,
) -> Duration {
    let start = Barrier::new(n);
    let rooms: Vec<String> = (0..n).map(|t| format!("thread-room-{t}")).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = rooms
            .iter()
            .enumerate()
            .map(|(t, room)| {
                let (start, on) = (&start, &on);
                s.spawn(move || {
                    let (table, route) = on(t);
                    let a = ask(room, client(60_000_000 + t as u32));
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iters {
                        drop(black_box(admit(table, route, black_box(&a))));
                    }
                    began.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

/// The routes of `conf/wsgate.yaml`: a prefix, a keyed pattern, a catch-all.
fn router() -> Router {
    let rooms = Pattern::parse("/room/{room}/ws").expect("pattern");
    let key = rooms.param_index("room");
    Router::new(vec![
        Matcher {
            host: None,
            path: PathMatch::Prefix("/registry".into()),
            key: None,
        },
        Matcher {
            host: None,
            path: PathMatch::Pattern(rooms),
            key,
        },
        Matcher {
            host: None,
            path: PathMatch::Prefix("/".into()),
            key: None,
        },
    ])
}

/// Normalise the path, then find its route and key.
fn routing(c: &mut Criterion) {
    let router = router();
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let paths = [
        ("registry", "/registry/ws"),
        ("room", "/room/lobby-42/ws"),
        ("room_respelt", "//room/./x/../%6Cobby-42/ws"),
        ("catch_all", "/stats/registry"),
    ];
    for (name, path) in paths {
        group.bench_function(name, |b| {
            b.iter(|| {
                let normal = normalize_path(black_box(path));
                let found = router.find(black_box(Some("example.com")), &normal);
                black_box(found.map(|m| m.route));
            })
        });
    }
    group.finish();
}

/// Client identity from the TCP peer alone, and through a trusted proxy
/// chain in `X-Forwarded-For` with Cloudflare's 22 ranges as trusted.
fn identity(c: &mut Criterion) {
    let trusted = [
        "173.245.48.0/20",
        "103.21.244.0/22",
        "103.22.200.0/22",
        "103.31.4.0/22",
        "141.101.64.0/18",
        "108.162.192.0/18",
        "190.93.240.0/20",
        "188.114.96.0/20",
        "197.234.240.0/22",
        "198.41.128.0/17",
        "162.158.0.0/15",
        "104.16.0.0/13",
        "104.24.0.0/14",
        "172.64.0.0/13",
        "131.0.72.0/22",
        "2400:cb00::/32",
        "2606:4700::/32",
        "2803:f800::/32",
        "2405:b500::/32",
        "2405:8100::/32",
        "2a06:98c0::/29",
        "2c0f:f248::/32",
    ];
    let trusted = trusted.iter().map(|n| n.parse().expect("cidr")).collect();
    let xff = ClientPolicy {
        header: Some(ForwardHeader::XForwardedFor),
        trusted,
        ..ClientPolicy::default()
    };
    let plain = ClientPolicy::default();

    let mut headers = HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_static("203.0.113.9, 172.70.1.2"),
    );
    let peer: IpAddr = "162.158.1.1".parse().expect("ip");
    let v6: IpAddr = "2001:db8:1:2::1".parse().expect("ip");

    let mut group = c.benchmark_group("identify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("peer_v4", |b| {
        b.iter(|| black_box(plain.identify(black_box(peer), &HeaderMap::new())))
    });
    group.bench_function("peer_v6", |b| {
        b.iter(|| black_box(plain.identify(black_box(v6), &HeaderMap::new())))
    });
    group.bench_function("x_forwarded_for", |b| {
        b.iter(|| black_box(xff.identify(black_box(peer), black_box(&headers))))
    });
    group.finish();
}

criterion_group!(benches, admit_and_drop, contention, routing, identity);
criterion_main!(benches);
