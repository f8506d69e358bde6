//! The deploy files (`deploy/`), checked without a container engine: the Kubernetes manifests
//! against Kubernetes' own schemas (PyPI kubernetes-validate), the compose file against the
//! Compose Specification's schema (PyPI check-jsonschema), the alert rules by promtool's rule
//! tests and its config check (Debian's prometheus package), every metric, route and setting
//! they name against what a real `rtpay serve` serves and reads, and the compose file's shell
//! commands (the keys' one-shot service, the nodes' healthcheck) run against real nodes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn python() -> String {
    std::env::var("RTPAY_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/rtpay/venv/bin/python", std::env::var("HOME").unwrap_or_default()))
}

/// Runs a Python module of the test environment (scripts/setup installs it).
fn python_module(module: &str, args: &[&str]) -> Output {
    let python = python();
    Command::new(&python)
        .arg("-m")
        .arg(module)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{python} is required (scripts/setup makes it, with {module}): {e}"))
}

fn promtool(args: &[&str]) -> Output {
    let promtool = std::env::var("RTPAY_TEST_PROMTOOL").unwrap_or_else(|_| {
        format!("{}/.cache/rtpay/prometheus/usr/bin/promtool", std::env::var("HOME").unwrap_or_default())
    });
    Command::new(&promtool)
        .current_dir(deploy("prometheus"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{promtool} is required (scripts/setup unpacks Debian's prometheus package): {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The words of `text` (runs of `[A-Za-z0-9_]`) that start with `prefix`.
fn words(text: &str, prefix: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

const MANIFESTS: [&str; 5] = ["namespace.yaml", "deployment.yaml", "service.yaml", "pdb.yaml", "networkpolicy.yaml"];

#[test]
fn the_kubernetes_manifests_validate_against_kubernetes_schemas() {
    let files: Vec<String> = MANIFESTS.iter().map(|f| deploy("kubernetes").join(f).display().to_string()).collect();
    let mut args = vec!["--strict", "-k", "1.30.0"];
    args.extend(files.iter().map(String::as_str));
    let out = python_module("kubernetes_validate", &args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches(" passed for resource ").count(), MANIFESTS.len(), "{}", text(&out));

    // The validator is strict: a field the schema does not know fails, as does a wrong type.
    let broken = temp_dir("k8s-broken").join("deployment.yaml");
    let deployment = read(&deploy("kubernetes/deployment.yaml"));
    for (from, to) in [("replicas: 3", "replicas: three"), ("terminationGracePeriodSeconds", "terminationGracePeriod")]
    {
        assert!(deployment.contains(from));
        std::fs::write(&broken, deployment.replacen(from, to, 1)).unwrap();
        let out = python_module("kubernetes_validate", &["--strict", "-k", "1.30.0", broken.to_str().unwrap()]);
        assert!(!out.status.success(), "{to} passed: {}", text(&out));
    }

    // kustomization.yaml applies exactly the manifests there are.
    let kustomization = read(&deploy("kubernetes/kustomization.yaml"));
    let listed: BTreeSet<&str> =
        kustomization.lines().filter_map(|l| l.trim().strip_prefix("- ")).filter(|f| f.ends_with(".yaml")).collect();
    let present: BTreeSet<String> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present.iter().map(String::as_str).collect::<BTreeSet<_>>());
    assert_eq!(present.len(), MANIFESTS.len());
}

#[test]
fn the_compose_file_validates_against_the_compose_specification() {
    let compose = deploy("compose.yaml");
    let out =
        python_module("check_jsonschema", &["--builtin-schema", "vendor.compose-spec", compose.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let broken = temp_dir("compose-broken").join("compose.yaml");
    std::fs::write(&broken, read(&compose).replacen("restart: unless-stopped", "restart: [unless-stopped]", 1))
        .unwrap();
    let out = python_module("check_jsonschema", &["--builtin-schema", "vendor.compose-spec", broken.to_str().unwrap()]);
    assert!(!out.status.success(), "a list where a string belongs passed: {}", text(&out));

    // Every file it mounts from the repository, and the Dockerfile it builds with, exist.
    let compose_text = read(&compose);
    let mounts: Vec<&str> = compose_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
        .map(|m| m.split(':').next().unwrap())
        .collect();
    assert!(mounts.len() >= 3, "{mounts:?}");
    for m in mounts {
        assert!(deploy(m).exists(), "compose mounts ./{m}, which is missing");
    }
    assert!(compose_text.contains("dockerfile: deploy/Dockerfile") && deploy("Dockerfile").exists());
}

#[test]
fn the_dockerfile_copies_what_exists_and_the_build_context_keeps_it() {
    let dockerfile = read(&deploy("Dockerfile"));
    let ignored = read(&root().join(".dockerignore"));
    let ignored: Vec<&str> = ignored.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let mut copied = 0;
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let parts: Vec<&str> = line.split_whitespace().skip(1).collect();
        for source in &parts[..parts.len() - 1] {
            assert!(root().join(source).exists(), "the Dockerfile copies {source}, which is missing");
            assert!(!ignored.contains(source), ".dockerignore drops {source}, which the Dockerfile copies");
            copied += 1;
        }
    }
    // The workspace, its lock file and its build settings (SQLite's flags).
    assert!(copied >= 5, "{copied}");
    assert!(dockerfile.contains("--locked -p rtpay"));
}

#[test]
fn the_alert_rules_pass_promtools_checks_and_rule_tests() {
    let out = promtool(&["check", "config", "prometheus.yml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS: 10 rules found"), "{}", text(&out));
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

/// Every `rtpay_*` metric the alerts and the dashboard query, and every route they select, is in
/// what a real node serves at `/metrics` (an embedded one, or one on PostgreSQL, which measures
/// its clock against the database's); every `RTPAY_*` setting the deploy files give is one rtpay
/// reads, and is documented.
#[test]
fn what_the_deploy_files_name_is_what_rtpay_serves_and_reads() {
    let queries = read(&deploy("prometheus/alerts.yml")) + &read(&deploy("grafana/dashboards/rtpay.json"));
    let named = words(&queries, "rtpay_");
    assert!(named.len() >= 10, "{named:?}");
    let postgres = store::testing::fresh_postgres_database();
    let embedded = Server::start(&temp_dir("deploy-metrics"), None);
    let on_postgres = Server::start(&temp_dir("deploy-metrics-pg"), Some(&postgres));
    let metrics = runtime().block_on(async {
        let mut metrics = String::new();
        for (server, wait_for) in [(&embedded, "rtpay_http_requests_total"), (&on_postgres, "rtpay_clock_skew_seconds")]
        {
            let mut c = server.client();
            let (_, key) = tenant(&mut c, "deploy").await;
            let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
            let shop = account(&mut c, &key, json!({"currency": "BRL"})).await;
            let body = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": shop, "amount": 1});
            assert_eq!(c.post("/v1/transfers", &key, &body).await.unwrap().status, 201);
            metrics.push_str(&metrics_with(&mut c, wait_for).await);
        }
        metrics
    });
    let served: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| !n.is_empty())
        .collect();
    for name in &named {
        assert!(served.contains(name.as_str()), "{name} is queried but not served; served: {served:?}");
    }
    for selector in ["route=\"/v1/transfers\"", "method=\"POST\""] {
        assert!(queries.contains(selector) && metrics.contains(selector), "{selector}");
    }

    let mut sources = String::new();
    for dir in std::fs::read_dir(root().join("crates")).unwrap() {
        let src = dir.unwrap().path().join("src");
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    sources.push_str(&read(&path));
                }
            }
        }
    }
    let operations = read(&root().join("docs/OPERATIONS.md"));
    let mut given = String::new();
    for file in ["Dockerfile", "compose.yaml"] {
        given.push_str(&read(&deploy(file)));
    }
    for file in MANIFESTS {
        given.push_str(&read(&deploy("kubernetes").join(file)));
    }
    let settings = words(&given, "RTPAY_");
    assert!(settings.len() >= 4, "{settings:?}");
    for setting in settings {
        assert!(sources.contains(&format!("\"{setting}\"")), "{setting} is set by deploy/ but rtpay never reads it");
        assert!(
            operations.contains(&format!("`{setting}`")),
            "{setting} is set by deploy/ but OPERATIONS.md does not document it"
        );
    }
}

/// The one compose line that starts with `key` and holds `needle`: a command, as a flow sequence
/// of double-quoted strings (`test: ["CMD", ...]`), which JSON reads alike.
fn compose_command(key: &str, needle: &str) -> Vec<String> {
    let compose = read(&deploy("compose.yaml"));
    let lines: Vec<&str> =
        compose.lines().filter_map(|l| l.trim().strip_prefix(key)).filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one {key} line with {needle} in compose.yaml");
    serde_json::from_str(lines[0].trim()).unwrap_or_else(|e| panic!("{key} {}: {e}", lines[0]))
}

/// The compose file's shell commands, run here as the containers would run them: the `keys`
/// service's entrypoint makes the keys once and leaves them alone after; the nodes' healthcheck
/// passes against a ready node, and fails when its storage is away or nothing listens.
#[test]
fn the_compose_files_shell_commands_work_against_a_real_node() {
    let entrypoint = compose_command("entrypoint: ", "keys init");
    assert_eq!(entrypoint[..2], ["bash", "-c"]);
    let volume = temp_dir("compose-keys");
    let script = entrypoint[2].replace("/var/lib/rtpay", volume.to_str().unwrap());
    let bin = Path::new(env!("CARGO_BIN_EXE_rtpay")).parent().unwrap().display().to_string();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let run = |script: &str| Command::new("bash").args(["-c", script]).env("PATH", &path).output().unwrap();
    let out = run(&script);
    assert!(out.status.success(), "{}", text(&out));
    let keys: Vec<(String, Vec<u8>)> = rtpay::keys::CLUSTER_FILES
        .iter()
        .map(|f| (f.to_string(), std::fs::read(volume.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))))
        .collect();
    let out = run(&script);
    assert!(out.status.success(), "a second start succeeds: {}", text(&out));
    for (file, bytes) in &keys {
        assert_eq!(&std::fs::read(volume.join(file)).unwrap(), bytes, "{file} was left alone");
    }

    let healthcheck = compose_command("test: ", "/readyz");
    assert_eq!(healthcheck[..3], ["CMD", "bash", "-c"]);
    let probe =
        |port: u16| run(&healthcheck[3].replace("/dev/tcp/127.0.0.1/8080", &format!("/dev/tcp/127.0.0.1/{port}")));
    let url = store::testing::fresh_postgres_database();
    let rt = runtime();
    let (switch, proxied) = rt.block_on(proxied_postgres(&url));
    let mut server = Server::start(&temp_dir("compose-health"), Some(&proxied));
    let port = server.addr.port();
    assert!(probe(port).status.success(), "a ready node passes");
    switch.cut();
    assert!(!probe(port).status.success(), "a node whose PostgreSQL is away fails");
    switch.restore();
    let recovered = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        probe(port).status.success()
    });
    assert!(recovered, "the node passes again once PostgreSQL is back");
    server.stop();
    assert!(!probe(port).status.success(), "nothing listening fails");
}
