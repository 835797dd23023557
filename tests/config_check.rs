//! `wsgate check` and startup on bad config files: each problem is one line
//! naming file, line (and column where serde knows it), field and what is
//! wrong; the exit status is 1; wsgate refuses to start on the same file.
//! Every shipped example in `conf/` passes.

use std::path::Path;
use std::process::{Command, Output};

const GOOD: &str = "\
listen:
  - address: 127.0.0.1:18080
routes:
  - name: rooms
    path: /room/{room}/ws
    key: room
    upstream:
      url: http://127.0.0.1:8787
    limits:
      per_key: 100
      per_client: 10
    idle_timeout: 5m
";

fn wsgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .output()
        .unwrap()
}

fn check(src: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, src).unwrap();
    let out = wsgate(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap(), "bad.yaml");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}

#[test]
fn the_good_file_passes() {
    let (code, stdout, stderr) = check(GOOD);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok, 1 route(s)"), "{stdout}");
}

#[test]
fn each_bad_file_gives_its_one_line_and_exit_1() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "unknown key",
            "      per_client: 10\n",
            "      per_client: 10\n      per_clients: 3\n",
            "bad.yaml:12:7: routes[0].limits: unknown field `per_clients`",
        ),
        (
            "wrong type",
            "per_key: 100",
            "per_key: many",
            "bad.yaml:10:16: routes[0].limits.per_key: invalid type: string \"many\", expected u32",
        ),
        (
            "bad CIDR",
            "routes:\n",
            "client_ip:\n  header: CF-Connecting-IP\n  trusted_proxies: [173.245.48.0/33]\nroutes:\n",
            "bad.yaml:5:21: client_ip.trusted_proxies[0]: invalid CIDR `173.245.48.0/33`",
        ),
        (
            "bad duration",
            "idle_timeout: 5m",
            "idle_timeout: soon",
            "bad.yaml:12:19: routes[0].idle_timeout: invalid duration `soon`",
        ),
        (
            "duplicate route name",
            "    idle_timeout: 5m\n",
            "    idle_timeout: 5m\n  - name: rooms\n    prefix: /\n    upstream:\n      url: http://127.0.0.1:1\n",
            "bad.yaml:13: routes[1].name: route name `rooms` is used twice",
        ),
        (
            "pattern with an unknown segment",
            "key: room",
            "key: channel",
            "bad.yaml:6: routes[0].key: `channel` is not a `{segment}` of the route's path",
        ),
        (
            "unknown top-level key",
            "routes:\n",
            "rotues: []\nroutes:\n",
            "bad.yaml:3:1: (top level): unknown field `rotues`",
        ),
        (
            "head bound out of range",
            "routes:\n",
            "server:\n  max_head_bytes: 100\nroutes:\n",
            "bad.yaml:4: server.max_head_bytes: 100 is outside 1024..=1048576",
        ),
        (
            "no time for a head",
            "routes:\n",
            "server:\n  head_timeout: 0s\nroutes:\n",
            "bad.yaml:4: server.head_timeout: must be longer than 0s",
        ),
        (
            "keepalive the kernel would refuse",
            "routes:\n",
            "server:\n  tcp_keepalive: {idle: 500ms}\nroutes:\n",
            "bad.yaml:4: server.tcp_keepalive.idle: 500ms must be whole seconds from 1s to 32767s",
        ),
        (
            "a keepalive interval past any clock",
            "routes:\n",
            "server:\n  tcp_keepalive: {interval: 18446744073709551615s}\nroutes:\n",
            "bad.yaml:4: server.tcp_keepalive.interval: 584542046090years 7months 15days 17h 5m 3s must be whole seconds from 1s to 32767s",
        ),
        (
            "no keepalive probes",
            "routes:\n",
            "server:\n  tcp_keepalive:\n    count: 0\nroutes:\n",
            "bad.yaml:4: server.tcp_keepalive.count: 0 is outside 1..=127",
        ),
        (
            "a keepalive longer than the user timeout can be",
            "routes:\n",
            "server:\n  tcp_keepalive: {idle: 32767s, interval: 32767s, count: 127}\nroutes:\n",
            "bad.yaml:4: server.tcp_keepalive: idle + interval × count must be at most 24days 20h 31m 23s (the TCP user timeout)",
        ),
        (
            "no connections",
            "routes:\n",
            "limits:\n  connections_per_client: 0\nroutes:\n",
            "bad.yaml:4: limits.connections_per_client: must be at least 1",
        ),
        (
            "cluster without a Redis URL",
            "routes:\n",
            "cluster:\n  redis: 10.0.0.5:6379\n  instances: 2\nroutes:\n",
            "bad.yaml:4: cluster.redis: `10.0.0.5:6379` is not a Redis URL",
        ),
        (
            "cluster policy misspelt",
            "routes:\n",
            "cluster:\n  redis: redis://127.0.0.1:6379\n  when_unreachable: closd\nroutes:\n",
            "bad.yaml:5:21: cluster.when_unreachable: unknown variant `closd`",
        ),
        (
            "cluster sharing limits without a fleet size",
            "routes:\n",
            "cluster:\n  redis: redis://127.0.0.1:6379\nroutes:\n",
            "bad.yaml:3: cluster.instances: `when_unreachable: local` needs the fleet's size",
        ),
        (
            "cluster call timeout over a third of the lease",
            "routes:\n",
            "cluster:\n  redis: redis://127.0.0.1:6379\n  when_unreachable: open\n  lease: 3s\n  call_timeout: 2s\nroutes:\n",
            "bad.yaml:7: cluster.call_timeout: must be above 0 and at most a third of `lease`",
        ),
        (
            "a refusal status that is not an error",
            "    idle_timeout: 5m\n",
            "    idle_timeout: 5m\n    reject:\n      status: 200\n",
            "bad.yaml:14: routes[0].reject.status: 200 is not a 4xx or 5xx status",
        ),
        (
            "both a path and a prefix",
            "    key: room\n",
            "    key: room\n    prefix: /room\n",
            "bad.yaml:5: routes[0].path: give exactly one of `path` (a pattern) or `prefix`",
        ),
        (
            "not YAML",
            "    key: room\n",
            "    key: room\n   bad indent: [\n",
            "bad.yaml:",
        ),
    ];
    for (what, from, to, want) in cases {
        assert!(GOOD.contains(from), "{what}: fixture text not found");
        let src = GOOD.replacen(from, to, 1);
        let (code, _, stderr) = check(&src);
        assert_eq!(code, 1, "{what}: exit status\n{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: want one line, got {stderr:?}");
        assert!(
            lines[0].starts_with(want),
            "{what}: got {:?}, want prefix {want:?}",
            lines[0]
        );
    }
}

#[test]
fn every_semantic_problem_is_listed_at_once() {
    let src = GOOD
        .replace("key: room", "key: channel")
        .replace("http://127.0.0.1:8787", "ftp://127.0.0.1")
        .replace("per_client: 10", "per_client: 0");
    let (code, _, stderr) = check(&src);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    assert!(
        stderr.lines().all(|l| l.starts_with("bad.yaml:")),
        "{stderr}"
    );
}

#[test]
fn a_mistake_repeated_in_several_routes_is_placed_in_each() {
    let route = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    prefix: /{name}\n    upstream:\n      url: http://127.0.0.1:8787/x\n{extra}"
        )
    };
    let src = format!(
        "listen:\n  - address: 127.0.0.1:18080\nroutes:\n{}{}{}",
        route("a", ""),
        route("b", "    limits:\n      per_client: 0\n"),
        route("c", "")
    );
    let (code, _, stderr) = check(&src);
    assert_eq!(code, 1);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "bad.yaml:7: routes[0].upstream.url: paths are not rewritten: give scheme, host and port only",
            "bad.yaml:11: routes[1].upstream.url: paths are not rewritten: give scheme, host and port only",
            "bad.yaml:13: routes[1].limits.per_client: must be at least 1 (leave it out for no limit)",
            "bad.yaml:17: routes[2].upstream.url: paths are not rewritten: give scheme, host and port only",
        ]
    );
}

#[test]
fn a_missing_file_is_one_clear_line() {
    let out = wsgate(&["check", "--config", "/nonexistent/wsgate.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "/nonexistent/wsgate.yaml: cannot read: No such file or directory (os error 2)"
    );
}

#[test]
fn wsgate_refuses_to_start_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, GOOD.replace("key: room", "key: channel")).unwrap();
    let out = wsgate(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("routes[0].key: `channel` is not a `{segment}`"),
        "{stderr}"
    );
}

#[test]
fn every_shipped_example_config_passes() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = wsgate(&["check", "--config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the demo and the deployment examples"
    );
}

#[test]
fn help_explains_both_commands() {
    let out = wsgate(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--config") && help.contains("check"),
        "{help}"
    );
    let out = wsgate(&["check", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Validate a config file"));
}

#[test]
fn a_busy_address_fails_startup_at_once() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.yaml");
    let src = GOOD.replace("127.0.0.1:18080", &format!("127.0.0.1:{port}"));
    let src = format!(
        "{src}admin:\n  address: 127.0.0.1:0\nserver:\n  pid_file: {d}/p.pid\n  upgrade_sock: {d}/u.sock\n",
        d = dir.path().display()
    );
    std::fs::write(&path, src).unwrap();

    let started = std::time::Instant::now();
    let out = wsgate(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "listen[0].address: cannot listen on 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    // Pingora alone would retry for about 30 s and keep running without it.
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    drop(busy);
}

#[test]
fn an_oversized_file_is_refused_without_reading_it_whole() {
    let padding = "# padding\n".repeat(500_000);
    let (code, _, stderr) = check(&format!("{GOOD}{padding}"));
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("bad.yaml: (file): 5") && stderr.contains("limit for a config file"),
        "{stderr}"
    );
}
