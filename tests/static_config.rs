//! Static checks of what users deploy without this machine running it:
//! docker-compose.yml (validated by the Docker Compose CLI, and every service,
//! port, volume and mounted file it references exists), the Dockerfile, the
//! Prometheus configs and alert rules (promtool), and the Grafana dashboards.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut v: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    v.apply_merge().unwrap_or_else(|e| panic!("{path}: {e}")); // `<<: *anchor`
    v
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(cmd).args(args).current_dir(root()).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "`{cmd} {}` failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("`{cmd}` could not run: {e}")),
    }
}

#[test]
fn docker_compose_config_passes() {
    // Compose v2 (`docker compose`) when present, else Debian's docker-compose.
    let v2 = run("docker", &["compose", "version"]).is_ok();
    let result = if v2 {
        run(
            "docker",
            &["compose", "--profile", "simulator", "config", "--quiet"],
        )
    } else {
        run(
            "docker-compose",
            &["--profile", "simulator", "config", "--quiet"],
        )
    };
    if let Err(e) = result {
        panic!(
            "{e}\nThe Docker Compose CLI is needed (no engine): `apt-get install docker-compose` \
             (scripts/test installs it when run as root)."
        );
    }
    // The secured override on top of it.
    let files = [
        "-f",
        "docker-compose.yml",
        "-f",
        "docker-compose.secure.yml",
        "--profile",
        "simulator",
        "config",
        "--quiet",
    ];
    let result = if v2 {
        let mut args = vec!["compose"];
        args.extend(files);
        run("docker", &args)
    } else {
        run("docker-compose", &files)
    };
    if let Err(e) = result {
        panic!("docker-compose.secure.yml: {e}");
    }
    let text = std::fs::read_to_string(root().join("docker-compose.secure.yml")).expect("read");
    for f in ["configs/mosquitto-secure.conf", "configs/mosquitto.acl"] {
        assert!(text.contains(f) && root().join(f).exists(), "{f}");
    }
}

#[test]
fn everything_compose_references_exists() {
    let c = yaml("docker-compose.yml");
    let services = c["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    let volumes: BTreeSet<&str> = c["volumes"]
        .as_mapping()
        .map(|m| m.keys().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for want in [
        "kafka",
        "mosquitto",
        "gateway",
        "aggregator",
        "simulator",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(want), "service {want} missing");
    }
    let mut used_volumes = BTreeSet::new();
    for (name, svc) in services {
        let name = name.as_str().expect("service name");
        // Images are pinned, or built from this repository.
        match (svc.get("image").and_then(Value::as_str), svc.get("build")) {
            (_, Some(b)) => {
                let ctx = b.as_str().unwrap_or(".");
                assert!(
                    root().join(ctx).join("Dockerfile").exists(),
                    "{name}: no Dockerfile in {ctx}"
                );
            }
            (Some(image), None) => assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{name}: pin the image version ({image})"
            ),
            (None, None) => panic!("{name}: no image and no build"),
        }
        for v in svc
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let spec = v.as_str().expect("short volume syntax");
            let source = spec.split(':').next().unwrap_or_default();
            if source.starts_with("./") {
                assert!(
                    root().join(source).exists(),
                    "{name}: mounted {source} does not exist"
                );
            } else {
                assert!(
                    volumes.contains(source),
                    "{name}: volume {source} is not declared"
                );
                used_volumes.insert(source.to_string());
            }
        }
        for p in svc
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let spec = p.as_str().expect("port string");
            assert!(
                spec.starts_with("127.0.0.1:"),
                "{name}: host port {spec} must be bound to 127.0.0.1"
            );
        }
        if let Some(deps) = svc.get("depends_on").and_then(Value::as_mapping) {
            for (dep, cond) in deps {
                let dep = dep.as_str().expect("dependency");
                assert!(
                    names.contains(dep),
                    "{name} depends on unknown service {dep}"
                );
                assert!(
                    cond.get("condition").is_some(),
                    "{name} -> {dep}: give a condition"
                );
            }
        }
        let long_running = svc.get("restart").and_then(Value::as_str) != Some("no");
        if long_running && name != "simulator" && name != "grafana" {
            assert!(svc.get("healthcheck").is_some(), "{name}: no healthcheck");
        }
    }
    for v in &volumes {
        assert!(used_volumes.contains(*v), "volume {v} declared but unused");
    }
    // The simulator is optional at the edge.
    assert!(services["simulator"]["profiles"]
        .as_sequence()
        .is_some_and(|p| !p.is_empty()));
    // Gateway and aggregator listen where Prometheus (compose config) scrapes them.
    let prom = yaml("configs/prometheus.docker.yml");
    let targets: BTreeSet<String> = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|j| {
            j["static_configs"][0]["targets"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    for (svc, var, port) in [
        ("gateway", "GATEWAY__HTTP__LISTEN", "9310"),
        ("aggregator", "AGGREGATOR__HTTP__LISTEN", "9311"),
    ] {
        assert!(
            targets.contains(&format!("{svc}:{port}")),
            "Prometheus does not scrape {svc}:{port}"
        );
        let listen = services[svc]["environment"][var]
            .as_str()
            .expect("listen env");
        assert_eq!(listen, format!("0.0.0.0:{port}"));
    }
}

#[test]
fn dockerfile_copies_what_exists_and_runs_as_non_root() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    assert!(text
        .lines()
        .any(|l| l.starts_with("USER ") && !l.contains("root")));
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                *src == "." || root().join(src).exists(),
                "Dockerfile copies missing {src}"
            );
        }
    }
}

fn promtool(args: &[&str]) {
    if let Err(e) = run("promtool", args) {
        panic!(
            "{e}\n(promtool comes with Debian's prometheus package: scripts/stack up installs it)"
        );
    }
}

#[test]
fn prometheus_configs_and_alert_rules_pass_promtool() {
    promtool(&["check", "config", "configs/prometheus.yml"]);
    promtool(&["check", "config", "configs/prometheus.docker.yml"]);
    promtool(&["check", "rules", "configs/alerts.yml"]);
    promtool(&["test", "rules", "configs/alerts.test.yml"]);
}

/// Every PromQL expression of every panel of a dashboard.
pub fn dashboard_exprs(path: &Path) -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect()
}

#[test]
fn dashboards_are_provisioned_with_fixed_uids() {
    let dir = root().join("grafana/dashboards");
    let mut uids = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("grafana/dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        files += 1;
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        let uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no uid", path.display()));
        assert!(uids.insert(uid.to_string()), "duplicate uid {uid}");
        assert!(
            !dashboard_exprs(&path).is_empty(),
            "{}: no queries",
            path.display()
        );
        for p in d["panels"].as_array().expect("panels") {
            assert_eq!(
                p["datasource"]["uid"],
                "prometheus",
                "{}: panel {}",
                path.display(),
                p["title"]
            );
        }
    }
    assert_eq!(files, 3);
    for uid in [
        "iot-fleet-overview",
        "iot-device-detail",
        "iot-pipeline-health",
    ] {
        assert!(uids.contains(uid), "dashboard {uid} missing");
    }
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["uid"].as_str(), Some("prometheus"));
    let prov = yaml("grafana/provisioning/dashboards/iot.yml");
    assert_eq!(
        prov["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards"),
        "provider path = where docker-compose mounts grafana/dashboards"
    );
}
