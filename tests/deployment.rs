//! The deployment files agree with wsgate and with each other: the compose
//! config passes `wsgate check` (CI checks only `conf/*.yaml`), compose
//! mounts files that exist where the images read them, the ports line up
//! from config to image to compose to Prometheus, and the systemd unit
//! reloads with SIGHUP and outlasts the drain. No container engine runs
//! here: the images themselves are not built by the tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn port(address: &str) -> u16 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn the_compose_config_passes_wsgate_check() {
    let path = repo("docker/wsgate.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_mounts_and_ports_agree_with_the_images_and_configs() {
    let compose = yaml("docker/compose.yaml");
    let services = compose["services"].as_mapping().unwrap();
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                let path = repo("docker").join(source);
                assert!(path.exists(), "{name:?} mounts {source}, which is missing");
            }
        }
        if let Some(dockerfile) = service["build"]["dockerfile"].as_str() {
            assert_eq!(service["build"]["context"], "..", "{name:?}");
            assert!(repo(dockerfile).is_file(), "{name:?}: {dockerfile} missing");
        }
    }

    // The config is mounted where the image's command reads it.
    let dockerfile = read("docker/Dockerfile");
    let wsgate = &compose["services"]["wsgate"];
    let config_path = "/etc/wsgate/wsgate.yaml";
    assert!(dockerfile.contains(&format!(r#"CMD ["--config", "{config_path}"]"#)));
    let mounted = wsgate["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v.as_str().unwrap().split(':').nth(1) == Some(config_path));
    assert!(mounted, "compose does not mount {config_path}");

    // Listener and admin ports: config, image, compose and Prometheus.
    let config = yaml("docker/wsgate.yaml");
    let proxy = port(config["listen"][0]["address"].as_str().unwrap());
    let admin = port(config["admin"]["address"].as_str().unwrap());
    let expose = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    assert_eq!(expose, format!("{proxy} {admin}"));
    let published: Vec<u16> = wsgate["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(published, [proxy, admin]);
    let prometheus = yaml("docker/prometheus.yml");
    let target = &prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0];
    assert_eq!(target.as_str().unwrap(), format!("wsgate:{admin}"));

    // Docker waits for the drain before it kills.
    let grace = duration(config["server"]["grace_period"].as_str().unwrap());
    let stop = duration(wsgate["stop_grace_period"].as_str().unwrap());
    assert!(
        stop > grace,
        "stop_grace_period {stop:?} <= grace {grace:?}"
    );
}

#[test]
fn the_systemd_unit_reloads_with_sighup_and_outlasts_the_drain() {
    let unit = read("conf/systemd/wsgate.service");
    let values = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    assert_eq!(
        values("ExecStart"),
        ["/usr/local/bin/wsgate --config /etc/wsgate/wsgate.yaml"]
    );
    assert_eq!(
        values("ExecReload").last(),
        Some(&"/bin/kill -HUP $MAINPID")
    );
    assert_eq!(values("KillSignal"), ["SIGTERM"]);
    // The default grace period is 30s (docs/configuration.md).
    let stop = duration(values("TimeoutStopSec")[0]);
    assert!(stop > Duration::from_secs(30), "TimeoutStopSec {stop:?}");
    // The pid file and upgrade socket of conf/cloudflare.yaml are writable.
    assert_eq!(values("RuntimeDirectory"), ["wsgate"]);
    let cloudflare = yaml("conf/cloudflare.yaml");
    assert!(cloudflare["server"]["pid_file"]
        .as_str()
        .unwrap()
        .starts_with("/run/wsgate/"));
}
