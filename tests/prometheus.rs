//! The monitoring the repo ships, against the real thing: a Prometheus
//! server scraping a running wsgate with the shipped scrape config and alert
//! rules, `promtool` on the shipped files, and the Grafana dashboard's
//! queries and metric names against a live `/metrics` and Prometheus.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool`); the
//! README's test command installs it. These tests fail, loudly, when it is
//! missing. Prometheus runs as a child process on a loopback port, with its
//! storage in a temporary directory, scraping only the test's wsgate.

mod common;

use common::upstream::Upstream;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any awaited outcome may take on a busy machine: a few scrape
/// and rule evaluation intervals of one second each.
const BOUND: Duration = Duration::from_secs(20);

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A program of Debian's `prometheus` package, found on `PATH`.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: install Debian's `prometheus` package \
                 (`apt-get install prometheus`; ./scripts/test does so as root)"
            )
        })
}

/// Runs promtool in the repository root and returns what it printed.
fn promtool(args: &[&str]) -> String {
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

fn yaml(path: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo("conf/grafana/wsgate.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("conf/grafana/wsgate.json: {e}"))
}

/// Every rule of the shipped alerts file: (alert name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let file = yaml("conf/prometheus/alerts.yml");
    let mut out = Vec::new();
    for group in file["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("alerting rules only");
            out.push((name.to_string(), rule["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

// Prometheus, the server.

/// A Prometheus server with the shipped config aimed at one wsgate; killed
/// and its storage removed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let bin = tool("prometheus");
        for attempt in 0..5 {
            match Self::try_start(&bin, target).await {
                Ok(p) => return p,
                Err(e) if attempt < 4 => eprintln!("prometheus did not start ({e}); retrying"),
                Err(e) => panic!("prometheus did not start: {e}"),
            }
        }
        unreachable!()
    }

    async fn try_start(bin: &Path, target: SocketAddr) -> Result<Prometheus, String> {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config(target)).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let mut p = Prometheus { child, addr, dir };

        let start = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                return Err(format!("exited with {status}:\n{}", p.log()));
            }
            if get(p.addr, "/-/ready").await.is_some_and(|(s, _)| s == 200) {
                return Ok(p);
            }
            if start.elapsed() > BOUND {
                return Err(format!("not ready after {BOUND:?}:\n{}", p.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The result of an instant query, or Prometheus's error.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let data = self.api(&path).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// `data` of an API answer, or its error.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = get(self.addr, path)
            .await
            .ok_or_else(|| format!("no answer to {path}"))?;
        let answer: Value =
            serde_json::from_str(&body).map_err(|e| format!("{status} {body}: {e}"))?;
        if answer["status"] != "success" {
            return Err(format!("{status}: {}", answer["error"]));
        }
        Ok(answer["data"].clone())
    }

    /// The one value of `promql`, or `None` when it has no series yet.
    async fn value(&self, promql: &str) -> Option<f64> {
        let result = self
            .query(promql)
            .await
            .unwrap_or_else(|e| panic!("{promql}: {e}"));
        assert!(result.len() <= 1, "{promql} has several series: {result:?}");
        let sample = result.first()?;
        sample["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `promql` has the value `want`.
    async fn wait_for(&self, promql: &str, want: f64) {
        let start = Instant::now();
        loop {
            let got = self.value(promql).await;
            if got == Some(want) {
                return;
            }
            assert!(
                start.elapsed() < BOUND,
                "Prometheus: `{promql}` is {got:?} after {BOUND:?}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the series of `promql` carry exactly these `route`s.
    async fn wait_routes(&self, promql: &str, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let start = Instant::now();
        loop {
            let result = self.query(promql).await.unwrap();
            let got: BTreeSet<String> = result
                .iter()
                .filter_map(|s| s["metric"]["route"].as_str().map(str::to_string))
                .collect();
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < BOUND,
                "Prometheus: routes of `{promql}` are {got:?} after {BOUND:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped conf/prometheus/prometheus.yml with its wsgate job aimed at
/// `target`, scraping and evaluating every second, and its rule files at
/// their absolute paths. Nothing else is scraped and no alert is sent.
fn scrape_config(target: SocketAddr) -> String {
    let mut config = yaml("conf/prometheus/prometheus.yml");
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        config["global"][key] = "1s".into();
    }
    let rules: Vec<serde_yaml::Value> = config["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .map(|f| {
            let path = repo("conf/prometheus").join(f.as_str().unwrap());
            path.display().to_string().into()
        })
        .collect();
    config["rule_files"] = rules.into();

    let jobs = config["scrape_configs"].as_sequence_mut().unwrap();
    assert_eq!(jobs.len(), 1, "the shipped config scrapes wsgate only");
    let job = &mut jobs[0];
    assert_eq!(
        job["job_name"], "wsgate",
        "the alert rules select job=wsgate"
    );
    let targets: serde_yaml::Value =
        serde_yaml::from_str(&format!("[{{targets: ['{target}']}}]")).unwrap();
    job["static_configs"] = targets;
    if let Some(map) = config.as_mapping_mut() {
        map.remove("alerting");
    }
    serde_yaml::to_string(&config).unwrap()
}

/// An HTTP/1.0 GET (so the answer is never chunked); `None` if the server
/// cannot be reached.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// Traffic.

/// Routes covering every metric: a route limit, a key limit, a dry run and
/// an upstream that refuses connections.
fn routes(up: &Upstream) -> String {
    // A port bound for the whole run but never listened on: connections to
    // it are refused, and no other socket can take it.
    static HELD: std::sync::OnceLock<tokio::net::TcpSocket> = std::sync::OnceLock::new();
    let held = HELD.get_or_init(|| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s
    });
    let dead = held.local_addr().unwrap().port();
    format!(
        "routes:\n  - name: relay\n    prefix: /relay\n{u}    limits:\n      total: 3\n\
         \n  - name: rooms\n    path: /room/{{room}}/ws\n    key: room\n{u}    limits:\n      per_key: 2\n\
         \n  - name: trial\n    prefix: /trial\n{u}    limits:\n      total: 1\n    dry_run: true\n\
         \n  - name: broken\n    prefix: /broken\n    upstream:\n      url: http://127.0.0.1:{dead}\n",
        u = upstream_yaml(up.addr)
    )
}

/// `n` upgrades to `path`, one after another.
async fn attempts(gw: &Wsgate, path: &str, n: usize) -> Vec<Attempt> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(connect(&gw.url(path)).await);
    }
    out
}

fn statuses(attempts: &[Attempt]) -> Vec<u16> {
    attempts.iter().map(Attempt::status).collect()
}

/// How many of `attempts` the client saw answered with `status`.
fn saw(attempts: &[Attempt], status: u16) -> f64 {
    attempts.iter().filter(|a| a.status() == status).count() as f64
}

/// Closes the first open stream of `attempts` from the client side.
async fn close_one(attempts: &mut Vec<Attempt>) {
    let i = attempts.iter().position(|a| a.status() == 101).unwrap();
    let mut ws = attempts.remove(i).into_open();
    ws.close(None).await.expect("send close");
    closed_by_peer(&mut ws, BOUND).await;
}

// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reads_back_what_the_clients_saw() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up)).await;
    let prom = Prometheus::start(gw.admin).await;
    // Traffic starts after the first scrape, so every rise is seen.
    prom.wait_for(r#"up{job="wsgate"}"#, 1.0).await;

    let mut relay = attempts(&gw, "/relay", 5).await;
    let rooms = attempts(&gw, "/room/lobby/ws", 3).await;
    let trial = attempts(&gw, "/trial", 2).await;
    let broken = attempts(&gw, "/broken", 1).await;
    assert_eq!(statuses(&relay), [101, 101, 101, 503, 503]);
    assert_eq!(statuses(&rooms), [101, 101, 503]);
    assert_eq!(statuses(&trial), [101, 101], "a dry run refuses nothing");
    assert_eq!(statuses(&broken), [502]);

    let checks = [
        (r#"wsgate_streams_active{route="relay"}"#, saw(&relay, 101)),
        (r#"wsgate_streams_active{route="rooms"}"#, saw(&rooms, 101)),
        (r#"wsgate_streams_active{route="trial"}"#, saw(&trial, 101)),
        (r#"wsgate_streams_active{route="broken"}"#, 0.0),
        (
            r#"wsgate_streams_admitted_total{route="relay"}"#,
            saw(&relay, 101),
        ),
        (
            r#"wsgate_streams_admitted_total{route="rooms"}"#,
            saw(&rooms, 101),
        ),
        (
            r#"wsgate_streams_admitted_total{route="trial"}"#,
            saw(&trial, 101),
        ),
        (r#"wsgate_streams_admitted_total{route="broken"}"#, 1.0),
        (
            r#"wsgate_streams_rejected_total{route="relay", scope="route", dry_run="false"}"#,
            saw(&relay, 503),
        ),
        (
            r#"wsgate_streams_rejected_total{route="rooms", scope="key", dry_run="false"}"#,
            saw(&rooms, 503),
        ),
        (
            r#"wsgate_streams_rejected_total{route="trial", scope="route", dry_run="true"}"#,
            1.0,
        ),
        // Nothing else was refused, in any scope.
        (
            r#"sum(wsgate_streams_rejected_total)"#,
            saw(&relay, 503) + saw(&rooms, 503) + 1.0,
        ),
        (
            r#"wsgate_upstream_upgrade_failures_total{route="broken", reason="refused"}"#,
            saw(&broken, 502),
        ),
        (r#"wsgate_limit_streams{route="relay", scope="route"}"#, 3.0),
        (r#"wsgate_limit_streams{route="rooms", scope="key"}"#, 2.0),
        (r#"wsgate_config_last_reload_success"#, 1.0),
    ];
    for (promql, want) in checks {
        prom.wait_for(promql, want).await;
    }

    // The shipped rules load and evaluate against wsgate's real series; the
    // full routes are near their limit (the dry run's too), the rest not.
    rules_evaluate_cleanly(&prom).await;
    prom.wait_routes(
        r#"ALERTS{alertname="WsgateRouteNearLimit", alertstate="pending"}"#,
        &["relay", "trial"],
    )
    .await;

    // An ended stream is timed, and its slot is back.
    close_one(&mut relay).await;
    prom.wait_for(r#"wsgate_streams_active{route="relay"}"#, 2.0)
        .await;
    prom.wait_for(
        r#"wsgate_stream_duration_seconds_count{route="relay"}"#,
        1.0,
    )
    .await;
    prom.wait_for(
        r#"wsgate_stream_duration_seconds_bucket{route="relay", le="+Inf"}"#,
        1.0,
    )
    .await;

    // A refused reload, then wsgate gone: both reach their alerts.
    gw.rewrite("routes: [unclosed\n", "failure").await;
    prom.wait_for(r#"wsgate_config_last_reload_success"#, 0.0)
        .await;
    prom.wait_for(r#"wsgate_config_reloads_total{result="failure"}"#, 1.0)
        .await;
    pending(&prom, "WsgateConfigReloadFailing").await;
    drop((relay, rooms, trial, gw));
    prom.wait_for(r#"up{job="wsgate"}"#, 0.0).await;
    pending(&prom, "WsgateDown").await;
}

/// Waits until every shipped rule is loaded and has been evaluated without
/// an error.
async fn rules_evaluate_cleanly(prom: &Prometheus) {
    let want: BTreeSet<String> = alert_rules().into_iter().map(|(n, _)| n).collect();
    let start = Instant::now();
    loop {
        let data = prom.api("/api/v1/rules").await.unwrap();
        let rules: Vec<&Value> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        let names: BTreeSet<String> = rules
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect();
        for r in &rules {
            assert_ne!(r["health"], "err", "rule failed to evaluate: {r}");
        }
        if names == want && rules.iter().all(|r| r["health"] == "ok") {
            return;
        }
        assert!(
            start.elapsed() < BOUND,
            "rules not all loaded and evaluated after {BOUND:?}: {names:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `alert` is pending (its condition holds; its `for` runs).
async fn pending(prom: &Prometheus, alert: &str) {
    let promql = format!(r#"count(ALERTS{{alertname="{alert}", alertstate="pending"}})"#);
    prom.wait_for(&promql, 1.0).await;
}

#[test]
fn promtool_accepts_the_shipped_config_and_rules() {
    let out = promtool(&["check", "config", "conf/prometheus/prometheus.yml"]);
    assert!(
        out.contains("SUCCESS: 1 rule files found"),
        "the rule file did not resolve next to the config:\n{out}"
    );
    promtool(&["check", "rules", "conf/prometheus/alerts.yml"]);
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "conf/prometheus/alerts_test.yml"]);

    // Each alert is tested both firing and staying quiet.
    let tests = yaml("conf/prometheus/alerts_test.yml");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in tests["tests"].as_sequence().unwrap() {
        for t in case["alert_rule_test"].as_sequence().unwrap() {
            let name = t["alertname"].as_str().unwrap().to_string();
            match t["exp_alerts"].as_sequence().map(Vec::len) {
                Some(0) | None => quiet.insert(name),
                Some(_) => fires.insert(name),
            };
        }
    }
    for (name, _) in alert_rules() {
        assert!(fires.contains(&name), "no test of {name} firing");
        assert!(quiet.contains(&name), "no test of {name} staying quiet");
    }
}

#[test]
fn the_compose_prometheus_config_checks_with_the_shipped_rules() {
    // docker/compose.yaml mounts both files side by side in /etc/prometheus.
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("docker/prometheus.yml", "prometheus.yml"),
        ("conf/prometheus/alerts.yml", "alerts.yml"),
    ] {
        std::fs::copy(repo(from), dir.path().join(to)).unwrap();
    }
    let config = dir.path().join("prometheus.yml");
    let out = promtool(&["check", "config", config.to_str().unwrap()]);
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
}

// The Grafana dashboard.

/// Every PromQL expression of the dashboard's panels.
fn panel_queries(dash: &Value) -> Vec<String> {
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_string()
        })
        .collect()
}

/// The dashboard's `label_values(SELECTOR, LABEL)` variables: (name,
/// selector, label).
fn variables(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"].as_str().unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("not label_values(): {query}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        out.push((
            v["name"].as_str().unwrap().to_string(),
            selector.trim().to_string(),
            label.trim().to_string(),
        ));
    }
    out
}

/// A dashboard expression as Grafana sends it with "All" selected.
fn substitute(expr: &str, route: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "wsgate")
        .replace("$instance", ".*")
        .replace("$route", route)
}

/// PromQL modifiers followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// PromQL words that are not metric names: binary operators, modifiers,
/// and aggregations (which may stand before their `by (...)` clause).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric names a PromQL expression selects: what is left once strings,
/// label matchers, ranges, grouping label lists, functions, keywords,
/// numbers and Grafana variables are taken out.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let skip_to = |close: char, from: usize| {
        (from + 1..chars.len())
            .find(|&j| chars[j] == close)
            .unwrap_or(chars.len())
    };
    let is_word = |c: char| c.is_ascii_alphanumeric() || "_:$".contains(c);
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '"' => i = skip_to('"', i) + 1,
            '{' => i = skip_to('}', i) + 1,
            '[' => i = skip_to(']', i) + 1,
            c if is_word(c) && !c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && is_word(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = (i..chars.len()).find(|&j| !chars[j].is_whitespace());
                let call = next.is_some_and(|j| chars[j] == '(');
                let after_digit = start > 0 && chars[start - 1].is_ascii_digit();
                if call && GROUPING.contains(&word.as_str()) {
                    i = skip_to(')', next.unwrap_or(i)) + 1;
                } else if !call && is_metric(&word, after_digit) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Whether a word that is not a function call names a metric: not a
/// keyword, not a Grafana variable, not the exponent or unit of a number.
fn is_metric(word: &str, after_digit: bool) -> bool {
    let keyword = KEYWORDS.contains(&word.to_ascii_lowercase().as_str());
    !(keyword || after_digit || word.starts_with('$'))
}

#[test]
fn metric_names_are_found_in_promql() {
    let expr = r#"histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="b c", le!="1"}[$__rate_interval])))
        / on (job, instance) group_left () max without(z) (b) > 0.8 and up{job="x"} or vector(1e3)
        - sum by (x) (c:rate5m offset 5m) + count(d)"#;
    assert_eq!(metric_names(expr), ["a_bucket", "b", "up", "c:rate5m", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_use_only_metrics_wsgate_exports() {
    let dash = dashboard();
    assert_dashboard_shape(&dash);

    // Some series appear only after traffic: an upstream failure, a refusal,
    // an ended stream.
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up)).await;
    let mut relay = attempts(&gw, "/relay", 4).await;
    attempts(&gw, "/broken", 1).await;
    close_one(&mut relay).await;
    gw.wait_active("relay", 2).await;
    let metrics = gw.metrics().await;
    let mut exported: BTreeSet<&str> = metrics.names().into_iter().collect();
    exported.insert("up");
    // Exported only in a fleet (`cluster:`); tests/cluster.rs waits for
    // each instance's `wsgate_cluster_up` to read 1.
    exported.insert("wsgate_cluster_up");

    let mut used = BTreeSet::new();
    let mut queries = panel_queries(&dash);
    queries.extend(variables(&dash).into_iter().map(|(_, s, _)| s));
    let sources = queries
        .iter()
        .map(|q| ("conf/grafana/wsgate.json", q.clone()))
        .chain(
            alert_rules()
                .into_iter()
                .map(|(_, expr)| ("conf/prometheus/alerts.yml", expr)),
        );
    let mut unknown = Vec::new();
    for (file, expr) in sources {
        for name in metric_names(&expr) {
            if !exported.contains(name.as_str()) {
                unknown.push(format!("{file}: {name} in {expr}"));
            }
            if file.ends_with(".json") {
                used.insert(name);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported by wsgate:\n{}",
        unknown.join("\n")
    );

    // The dashboard shows every part of the picture.
    for name in [
        "wsgate_streams_active",
        "wsgate_limit_streams",
        "wsgate_streams_admitted_total",
        "wsgate_streams_rejected_total",
        "wsgate_stream_duration_seconds_bucket",
        "wsgate_upstream_upgrade_failures_total",
        "wsgate_tracked_keys",
        "wsgate_config_reloads_total",
        "wsgate_config_last_reload_success",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

/// What Grafana needs to import the file: a datasource variable every query
/// uses, unique panel ids with positions, and one row repeated per route.
fn assert_dashboard_shape(dash: &Value) {
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance", "route"]);

    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        assert!(p["gridPos"]["w"].is_u64() && p["gridPos"]["h"].is_u64());
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let repeated: Vec<&Value> = panels.iter().filter(|p| p["repeat"] == "route").collect();
    assert_eq!(repeated.len(), 1, "one row repeated per route");
    assert_eq!(repeated[0]["type"], "row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_runs_in_prometheus() {
    let up = Upstream::start().await;
    let gw = Wsgate::start(&routes(&up)).await;
    let prom = Prometheus::start(gw.admin).await;
    prom.wait_for(r#"up{job="wsgate"}"#, 1.0).await;

    let mut relay = attempts(&gw, "/relay", 4).await;
    let _trial = attempts(&gw, "/trial", 2).await;
    attempts(&gw, "/broken", 1).await;
    close_one(&mut relay).await;
    prom.wait_for(
        r#"wsgate_stream_duration_seconds_count{route="relay"}"#,
        1.0,
    )
    .await;

    let dash = dashboard();
    let instance = gw.admin.to_string();
    for (name, selector, label) in variables(&dash) {
        let want = match name.as_str() {
            "job" => vec!["wsgate"],
            "instance" => vec![instance.as_str()],
            _ => vec!["broken", "relay", "rooms", "trial"],
        };
        let path = format!(
            "/api/v1/label/{label}/values?match[]={}",
            encode(&substitute(&selector, ".*"))
        );
        let values = prom.api(&path).await.unwrap();
        assert_eq!(values, serde_json::json!(want), "variable {name}");
    }

    // Each panel query is valid PromQL and, for some route, shows data.
    for expr in panel_queries(&dash) {
        let start = Instant::now();
        loop {
            let mut shown = false;
            for route in ["relay", "trial", "broken"] {
                let promql = substitute(&expr, route);
                let result = prom
                    .query(&promql)
                    .await
                    .unwrap_or_else(|e| panic!("{promql}: {e}"));
                shown |= !result.is_empty();
            }
            if shown {
                break;
            }
            assert!(start.elapsed() < BOUND, "no data for any route: {expr}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
