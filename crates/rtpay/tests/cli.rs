//! The command line: help on everything, the demo's tour, migrate, verify catching a ledger
//! edited behind rtpay's back, and a short run of the HTTP benchmark.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

fn rtpay(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay")).args(args).env_remove("RTPAY_POSTGRES").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_command_has_help() {
    let (ok, top) = rtpay(&["--help"]);
    assert!(ok, "{top}");
    for command in ["serve", "demo", "verify", "migrate", "bench", "audit", "keys"] {
        assert!(top.contains(command), "top-level help lists {command}");
        let (ok, help) = rtpay(&[command, "--help"]);
        assert!(ok && help.contains("Usage: rtpay"), "{command} --help: {help}");
    }
    let (ok, help) = rtpay(&["audit", "verify", "--help"]);
    assert!(ok && help.contains("--public-key") && help.contains("--audit-key"), "{help}");
    let (ok, help) = rtpay(&["serve", "--help"]);
    assert!(ok && help.contains("--data") && help.contains("--listen") && help.contains("--postgres"), "{help}");
    assert!(help.contains("--http-threads"), "{help}");
}

/// `rtpay serve` with each of `args` exits with an error saying `says`, and creates nothing.
/// Help shows which environment variables are read, not the values of those that hold secrets
/// (the PostgreSQL URL carries its password).
#[test]
fn help_shows_no_secret_from_the_environment() {
    for command in [&["serve", "--help"][..], &["verify", "--help"], &["migrate", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_rtpay"))
            .args(command)
            .env("RTPAY_POSTGRES", "postgres://rtpay:hunter2-db-password@db/rtpay")
            .env("RTPAY_METRICS_TOKEN", "hunter2-metrics-token")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("RTPAY_POSTGRES"), "{command:?}: {text}");
        assert!(!text.contains("hunter2"), "{command:?}: {text}");
    }
}

fn serve_refuses(tag: &str, args: &[&str], says: &str) {
    let dir = temp_dir(tag);
    for (i, arg) in args.iter().enumerate() {
        let data = dir.join(i.to_string());
        let (ok, out) = rtpay(&["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0", arg]);
        assert!(!ok && out.contains(says), "{arg}: {out}");
        assert!(!data.exists(), "{arg}: nothing is created");
    }
}

#[test]
fn serve_refuses_bad_limits_before_touching_anything() {
    let args = ["--rate-limit=0", "--rate-limit=-5", "--rate-burst=0.5", "--rate-limit=NaN", "--rate-limit=1e-20"];
    serve_refuses("bad-limits", &args, "--rate-limit must be above 0");
}

#[test]
fn serve_refuses_a_thread_count_of_zero_before_touching_anything() {
    serve_refuses("bad-threads", &["--http-threads=0", "--http-threads=-1", "--http-threads=many"], "--http-threads");
}

#[test]
fn serve_refuses_an_account_cache_of_zero_before_touching_anything() {
    let args = ["--account-cache=0", "--account-cache=-3", "--account-cache=lots"];
    serve_refuses("bad-account-cache", &args, "--account-cache");
}

#[test]
fn serve_refuses_a_location_host_that_cannot_make_a_location() {
    let hosts = ["Pix.Example.com", "a-very-long-host-name.example.com", "-x.com", "x.com/", ""];
    let args: Vec<String> = hosts.iter().map(|host| format!("--pix-location-host={host}")).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serve_refuses("bad-location-host", &args, "--pix-location-host must be a host name");
}

#[test]
fn demo_walks_through_the_api_and_exits() {
    // The operator's real token in the environment is not the one the demo prints.
    let production = "rtpay_op_production_token_never_printed_0123456789";
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["demo", "--exit"])
        .env("RTPAY_OPERATOR_TOKEN", production)
        .env("RTPAY_SECRET_KEY", rtpay::process::SECRET_KEY)
        .output()
        .unwrap();
    let (ok, out) = (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    );
    assert!(ok, "{out}");
    assert!(!out.contains(production), "{out}");
    for expected in [
        "-> 201",                   // creations
        "-> 200",                   // the repeated deposit
        "\"insufficient_funds\"",   // the refused payment
        "\"status\": \"posted\"",   // the capture
        "\"outcome\": \"created\"", // the audit trail
        "\"signature\": ",          // the signed tree head
        "curl -s -X POST 'http://127.0.0.1:",
        "export RTPAY=http://127.0.0.1:",
    ] {
        assert!(out.contains(expected), "demo output lacks {expected:?}:\n{out}");
    }
    // Alice: 10000 in, 2550 to bob, 2000 captured of a 3000 hold → 5450 available.
    assert!(out.contains("\"available\": 5450"), "{out}");
}

/// The README's five-minute tour, run as written (`cargo run --release --` standing for this
/// build's binary, on a port the kernel picks, read from the server's log: one picked here and let
/// go could be taken before the server binds it): every command goes through, the only refusals are the two the
/// tour shows (`insufficient_funds`, `insufficient_scope`), no answer is a 5xx, and what the tour
/// says happens does (a hold posted, a Pix received and partly refunded, a due-date charge
/// active, a MED claim returned, the ledger and the audit log verified).
#[test]
fn the_readmes_tour_runs_as_written() {
    let readme = include_str!("../../../README.md");
    let tour = readme.split("## A five-minute tour").nth(1).and_then(|t| t.split("\n## ").next()).expect("the tour");
    let mut script = String::new();
    let mut in_block = false;
    for line in tour.lines() {
        match (in_block, line.starts_with("```")) {
            (false, true) => in_block = line == "```sh",
            (true, true) => in_block = false,
            (true, false) => {
                script.push_str(line);
                script.push('\n');
            }
            (false, false) => {}
        }
    }
    assert!(
        script.contains("cargo run --release -- serve --ispb 12345678 &")
            && script.contains("API=http://127.0.0.1:8080")
    );
    let script = script
        .replace(
            "cargo run --release -- serve --ispb 12345678 &",
            "rtpay serve --ispb 12345678 --listen 127.0.0.1:0 2>server.log &",
        )
        .replace(
            "API=http://127.0.0.1:8080",
            "API=http://$(until grep -m1 -o '127\\.0\\.0\\.1:[0-9]*' server.log 2>/dev/null; do sleep 0.1; done)",
        )
        .replace("cargo run --release --", "rtpay");
    let dir = temp_dir("readme-tour");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_rtpay")).parent().unwrap().to_owned();
    for tool in ["curl", "jq", "uuidgen"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success();
        assert!(found, "{tool} is required: run scripts/setup");
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // Any command that fails (an unset variable, a failing `rtpay` command) stops the tour.
    let full = format!("set -euo pipefail\n{script}\nkill %1\nwait\n");
    // In a process group of its own, killed whole when done (or on a panic): a server the tour
    // left running must not outlive the test, nor hold its output open.
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            // SAFETY: a signal to the process group this test started.
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
    let mut tour = {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .args(["-c", &full])
            .current_dir(&dir)
            .env("PATH", path)
            .env_remove("RTPAY_OPERATOR_TOKEN")
            .env_remove("RTPAY_POSTGRES")
            .stdout(std::fs::File::create(dir.join("tour.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("tour.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let group = Group(tour.id() as i32);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = tour.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(group);
    let _ = tour.wait();
    let stdout = std::fs::read_to_string(dir.join("tour.out")).unwrap();
    let stderr = std::fs::read_to_string(dir.join("tour.err")).unwrap();
    assert!(status.is_some_and(|s| s.success()), "the tour failed ({status:?}):\n{stderr}");
    // On stderr, only the answers the tour shows with `tee /dev/stderr`: JSON values, one after
    // another (anything else, an error of a command, fails). The server's log (its stderr, kept
    // apart so that the two do not interleave) holds nothing above INFO.
    for line in stderr.lines().filter(|l| !l.is_empty()) {
        let values: Result<Vec<serde_json::Value>, _> = serde_json::Deserializer::from_str(line).into_iter().collect();
        values.unwrap_or_else(|e| panic!("the tour wrote to stderr: {line} ({e})\n{stderr}"));
    }
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(log.contains("listening"), "{log}");
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(matches!(entry["level"].as_str(), Some("INFO" | "DEBUG" | "TRACE")), "the server logged {line}");
    }
    assert_eq!(stdout.matches("operator token (shown once").count(), 1, "{stdout}");
    assert!(stdout.contains("key-encryption key version 2 created"), "{stdout}");
    // What the tour shows with `tee /dev/stderr` is on stderr, beside the server's log lines.
    let stdout = format!("{stdout}\n{stderr}");
    let refusals: Vec<&str> =
        stdout.match_indices("\"code\":\"").map(|(i, _)| stdout[i + 8..].split('"').next().unwrap()).collect();
    assert_eq!(refusals, ["insufficient_funds", "insufficient_scope"], "{stdout}");
    assert!(!stdout.contains("\"status\":5"), "{stdout}");
    for expected in [
        "\"status\":\"posted\"",
        "\"available\":",
        "\"document\":\"***.982.247-**\"",
        "\"number\":\"40000012",
        "\"status\":\"completed\"",
        "\"status\":\"DEVOLVIDO\"",
        "\"status\":\"ATIVA\"",
        "\"status\":\"returned\"",
        "every invariant holds",
        "every hash and signature checks",
    ] {
        assert!(stdout.contains(expected), "the tour's output lacks {expected}:\n{stdout}");
    }
}

#[test]
fn migrate_applies_once() {
    let dir = temp_dir("migrate");
    let dir = dir.to_str().unwrap();
    let (ok, out) = rtpay(&["migrate", "--data", dir]);
    assert!(ok && out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]"), "{out}");
    let (ok, out) = rtpay(&["migrate", "--data", dir]);
    assert!(ok && out.contains("schema up to date"), "{out}");
    let url = store::testing::fresh_postgres_database();
    let (ok, out) = rtpay(&["migrate", "--postgres", &url]);
    assert!(ok && out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]"), "{out}");
    let (ok, out) = rtpay(&["migrate", "--postgres", &url]);
    assert!(ok && out.contains("schema up to date"), "{out}");
}

#[test]
fn verify_catches_a_balance_edited_in_storage() {
    for postgres in [None, Some(store::testing::fresh_postgres_database())] {
        let dir = temp_dir("verify");
        let mut server = Server::start(&dir, postgres.as_deref());
        let rt = runtime();
        let wallet = rt.block_on(async {
            let mut c = server.client();
            let (_, key) = tenant(&mut c, "verify").await;
            let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
            let wallet = account(&mut c, &key, json!({"currency": "BRL"})).await;
            let r = c
                .post(
                    "/v1/transfers",
                    &key,
                    &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": wallet, "amount": 500}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201);
            wallet
        });
        let (ok, report) = server.verify();
        assert!(ok && report.contains("every invariant holds"), "{report}");
        server.stop();
        // Someone adds a little money to the wallet directly in the database.
        let id = uuid::Uuid::parse_str(&wallet).unwrap();
        match &postgres {
            None => {
                let conn = rusqlite::Connection::open(dir.join("rtpay.db")).unwrap();
                let n = conn
                    .execute(
                        "UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = ?1",
                        [id.as_bytes().to_vec()],
                    )
                    .unwrap();
                assert_eq!(n, 1);
            }
            Some(url) => {
                let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
                let n = client
                    .execute("UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = $1", &[&id])
                    .unwrap();
                assert_eq!(n, 1);
            }
        }
        let (ok, report) = server.verify();
        assert!(!ok, "verify missed an edited balance:\n{report}");
        assert!(report.contains("violation") && report.contains(&id.simple().to_string()), "{report}");
    }
}

/// Reads the number after `label` in `line` (`"load generator 7.9 µs"` → 7.9).
fn figure_after(line: &str, label: &str) -> f64 {
    let rest = &line[line.find(label).unwrap_or_else(|| panic!("{label:?} in {line}")) + label.len()..];
    let number: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    number.parse().unwrap_or_else(|_| panic!("a number after {label:?} in {line}"))
}

#[test]
fn bench_reports_rtpay_and_the_baseline_with_consistent_cpu_figures() {
    let dir = temp_dir("bench");
    let (ok, out) = rtpay(&[
        "bench",
        "--scenario",
        "http",
        "--seconds",
        "1",
        "--connections",
        "4,8",
        "--scratch",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // The header names what moves the figures between machines: the CPU, the scratch directory's
    // file system.
    assert!(out.starts_with("# rtpay bench — ") && out.contains(" cores ("), "{out}");
    let platform = out.lines().nth(1).unwrap_or_default();
    assert!(
        platform.starts_with("# kernel ")
            && platform.contains(&format!("scratch {}", std::fs::canonicalize(&dir).unwrap().display())),
        "{out}"
    );
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    let loops =
        ["rtpay POST /v1/transfers (embedded), closed loop", "baseline: trivial axum JSON handler, closed loop"]
            .into_iter()
            .flat_map(|name| [4, 8].map(|count| format!("{name} over {count} connections:")));
    for name in loops {
        let line = out.lines().find(|l| l.contains(&name)).unwrap_or_else(|| panic!("{name} in {out}"));
        assert!(line.contains(" 0 errors"), "{line}");
        let rate = figure_after(line, "connections:");
        assert!(rate > 0.0, "{line}");
        // The machine's busy share holds at least the CPU time the server and the load generator
        // spent over the same windows (give or take the kernel's 10 ms ticks over five windows).
        let spent = figure_after(line, "server") + figure_after(line, "load generator");
        let (busy, idle, stolen) =
            (figure_after(line, "busy"), figure_after(line, "idle"), figure_after(line, "stolen"));
        assert!((busy + idle + stolen - 100.0).abs() <= 2.0, "{line}");
        let used = 100.0 * rate * spent / 1e6 / cores;
        assert!(busy >= used - 15.0, "busy {busy} % against {used:.0} % used by the two processes: {line}");
    }
    let summary = out.lines().find(|l| l.starts_with("=> embedded:")).unwrap_or_else(|| panic!("{out}"));
    assert!(figure_after(summary, "=> embedded:") > 0.0 && summary.contains("ratio to axum baseline"), "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_refuses_an_unknown_scenario_or_an_empty_measurement_before_measuring_anything() {
    let (ok, out) = rtpay(&["bench", "--scenario", "http,htpp", "--seconds", "1"]);
    assert!(!ok, "{out}");
    assert!(out.contains("--scenario: no scenario is named \"htpp\"") && out.contains("iso8583"), "{out}");
    assert!(!out.contains("closed loop"), "nothing was measured: {out}");
    for (args, says) in [
        (&["--seconds", "0"][..], "--seconds"),
        (&["--auth-rate", "0"][..], "--auth-rate"),
        (&["--auth-rate", "NaN"][..], "--auth-rate"),
        (&["--restart-transfers", "0"][..], "--restart-transfers"),
    ] {
        let (ok, out) = rtpay(&[&["bench", "--scenario", "iso8583"][..], args].concat());
        assert!(!ok && out.contains(says) && !out.contains("panic"), "{args:?}: {out}");
        assert!(!out.contains("authorizations (embedded)"), "nothing was measured: {out}");
    }
}

/// A `rtpay serve` over PostgreSQL whose every secret comes from `keys`, its data directory: no
/// key in its environment.
struct KeyedNode(rtpay::process::ServerProcess);

impl KeyedNode {
    fn start(keys: &std::path::Path, url: &str) -> KeyedNode {
        let spawn = rtpay::process::Spawn {
            exe: std::path::Path::new(env!("CARGO_BIN_EXE_rtpay")),
            data: keys,
            postgres: Some(url),
            listen: "127.0.0.1:0",
            keys: rtpay::process::KeysEnv::None,
            wait: std::time::Duration::from_secs(60),
            args: &[],
            log: None,
        };
        KeyedNode(spawn.start().unwrap())
    }

    fn client(&self) -> rtpay::client::Client {
        rtpay::client::Client::new(self.0.addr)
    }
}

impl Drop for KeyedNode {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

fn listing(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// `rtpay keys init` writes the secrets a cluster shares, private, and never replaces one; two
/// nodes given the directory as `--data` (and nothing in their environment) serve as one: the
/// operator token from the file works, a tenant's API key made on one node works on the other,
/// a holder sealed on one is opened on the other (the same key-encryption and index keys), the
/// audit log verifies with the key from the directory, and the nodes wrote nothing into it.
#[test]
fn keys_init_writes_a_clusters_shared_keys_that_nodes_serve_with() {
    use std::os::unix::fs::PermissionsExt;
    let keys = temp_dir("keys-init").join("keys");
    let (ok, out) = rtpay(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{out}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&keys), 0o700);
    let files = listing(&keys);
    let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["audit-signing-key", "index-key", "kek", "operator-token", "secret-key"]);
    for (name, _) in &files {
        assert_eq!(mode(&keys.join(name)), 0o600, "{name}");
    }
    let text = |name: &str| String::from_utf8(files.iter().find(|(n, _)| n == name).unwrap().1.clone()).unwrap();
    let token = text("operator-token");
    assert!(token.starts_with("rtpay_op_") && token.len() == 9 + 64, "{token}");
    for hex_key in ["secret-key", "index-key"] {
        let key = text(hex_key);
        assert!(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()), "{hex_key}");
    }
    assert_ne!(text("secret-key"), text("index-key"));
    assert!(!out.contains(&token) && !out.contains(&text("secret-key")), "keys are not printed: {out}");

    // Run again, or over a directory holding one of the files: refused, nothing written.
    let (ok, again) = rtpay(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(!ok && again.contains("secret-key exists"), "{again}");
    assert_eq!(listing(&keys), files);
    let partial = temp_dir("keys-init-partial");
    std::fs::write(partial.join("kek"), "1 00\n").unwrap();
    let (ok, refused) = rtpay(&["keys", "init", "--out", partial.to_str().unwrap()]);
    assert!(!ok && refused.contains("kek exists"), "{refused}");
    assert_eq!(listing(&partial).len(), 1, "nothing written beside the existing file");

    let url = store::testing::fresh_postgres_database();
    let (a, b) = (KeyedNode::start(&keys, &url), KeyedNode::start(&keys, &url));
    runtime().block_on(async {
        let (mut ca, mut cb) = (a.client(), b.client());
        let r = ca.post("/v1/tenants", &token, &json!({"name": "shop"})).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let key = r.json()["api_key"]["secret"].as_str().unwrap().to_owned();
        let body = json!({"kind": "person", "name": "Maria Souza", "document": "529.982.247-25"});
        let r = ca.post("/v1/holders", &key, &body).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let holder = r.json()["id"].as_str().unwrap().to_owned();
        let r = cb.get(&format!("/v1/holders/{holder}"), &key).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(
            (r.json()["name"].clone(), r.json()["document"].clone()),
            (json!("Maria Souza"), json!("***.982.247-**"))
        );
        let r = cb.post("/v1/holders", &key, &body).await.unwrap();
        assert_eq!(r.status, 409, "the same document, found through the shared index key: {:?}", r.json());
    });
    drop((a, b));
    let audit_key = keys.join("audit-signing-key");
    let (ok, verified) = rtpay(&["audit", "verify", "--postgres", &url, "--audit-key", audit_key.to_str().unwrap()]);
    assert!(ok, "{verified}");
    assert_eq!(listing(&keys), files, "the nodes wrote nothing into the keys directory");
}

/// `rtpay` run with its files limited to `limit` bytes: a write past it fails (EFBIG), as on a
/// full disk.
fn rtpay_with_file_limit(args: &[&str], limit: u64) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_rtpay"));
    command.args(args).env_remove("RTPAY_POSTGRES");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A key file appears whole or not at all. `keys init` that cannot write its first key leaves
/// no torn key behind (a 40-byte `secret-key` would make every later start fail), and a
/// rotation that cannot write the key file's new version leaves the file as it was (a torn
/// last line would make it unreadable, and every node with it); the next rotation goes through.
#[test]
fn a_key_write_that_fails_halfway_leaves_no_torn_key() {
    let dir = temp_dir("keys-torn");
    let torn = dir.join("torn");
    let (ok, out) = rtpay_with_file_limit(&["keys", "init", "--out", torn.to_str().unwrap()], 40);
    assert!(!ok && out.contains("cannot write"), "{out}");
    assert_eq!(listing(&torn), Vec::new(), "no key, whole or torn, and nothing staged");

    let keys = dir.join("keys");
    let (ok, out) = rtpay(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{out}");
    let url = store::testing::fresh_postgres_database();
    let (ok, out) = rtpay(&["migrate", "--postgres", &url]);
    assert!(ok, "{out}");
    let kek = format!("file:{}", keys.join("kek").display());
    let audit_key = keys.join("audit-signing-key");
    let rotate =
        ["keys", "rotate", "--add-only", "--postgres", &url, "--kek", &kek, "--audit-key", audit_key.to_str().unwrap()];
    let before = std::fs::read(keys.join("kek")).unwrap();
    assert_eq!(before.len(), 67, "one line: version 1 and 64 hex digits");
    let (ok, out) = rtpay_with_file_limit(&rotate, 100);
    assert!(!ok && out.contains("cannot write") && out.contains("File too large"), "{out}");
    assert_eq!(std::fs::read(keys.join("kek")).unwrap(), before, "the key file is as it was");
    let names: Vec<_> = listing(&keys).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["audit-signing-key", "index-key", "kek", "kek.lock", "operator-token", "secret-key"]);
    let (ok, out) = rtpay(&rotate);
    assert!(ok && out.contains("version 2 added"), "{out}");
    let text = std::fs::read_to_string(keys.join("kek")).unwrap();
    assert!(text.starts_with(std::str::from_utf8(&before).unwrap()) && text.lines().count() == 2, "{}", text.len());
}

/// Key rotations over one database take turns whatever host they run on. While another process
/// holds the storage's turn (here the test, through PostgreSQL's advisory lock), `rtpay keys
/// rotate` waits and adds nothing; once the turn is let go, it goes through.
#[test]
fn a_rotation_waits_for_the_turn_another_process_holds_on_the_database() {
    let keys = temp_dir("rotate-turn").join("keys");
    let (ok, out) = rtpay(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{out}");
    let url = store::testing::fresh_postgres_database();
    let (ok, out) = rtpay(&["migrate", "--postgres", &url]);
    assert!(ok, "{out}");
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    holder.execute("SELECT pg_advisory_lock($1)", &[&store::KEY_ROTATION_LOCK]).unwrap();

    let kek = format!("file:{}", keys.join("kek").display());
    let audit_key = keys.join("audit-signing-key");
    let before = std::fs::read(keys.join("kek")).unwrap();
    let mut rotation = Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["keys", "rotate", "--postgres", &url, "--kek", &kek, "--audit-key", audit_key.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(rotation.try_wait().unwrap().is_none(), "the rotation waits for its turn");
    assert_eq!(std::fs::read(keys.join("kek")).unwrap(), before, "and has added nothing meanwhile");

    drop(holder);
    let out = rotation.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("version 2 created"), "{said}");
    assert_eq!(std::fs::read_to_string(keys.join("kek")).unwrap().lines().count(), 2);
}

/// Migrations wait for the batch a node is running (its lock is `ledger_meta`'s row, held here by
/// the test): a migration that only moves rows took no lock such a batch holds, and could copy a
/// counter before the batch's update committed and delete it after. (Before, `rtpay migrate` went
/// ahead at once.)
#[test]
fn migrations_wait_for_the_batch_a_node_is_running() {
    let url = store::testing::fresh_postgres_database();
    let (ok, out) = rtpay(&["migrate", "--postgres", &url]);
    assert!(ok, "{out}");
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut batch = holder.transaction().unwrap();
    batch.execute("SELECT 1 FROM ledger_meta WHERE id = 1 FOR UPDATE", &[]).unwrap();
    let mut migrate = Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["migrate", "--postgres", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(migrate.try_wait().unwrap().is_none(), "the migration waits for the batch");
    batch.commit().unwrap();
    let out = migrate.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
}

/// A rotation from a node whose copy of the key file is behind the cluster's (the data keys are
/// under a version it lacks) is refused and adds nothing, where it used to add a second "version
/// N+1"; and a key file reached through a symbolic link gains its version in the file the link
/// names, the link staying a link.
#[test]
fn a_rotation_from_a_key_file_behind_is_refused_and_links_are_followed() {
    let dir = temp_dir("rotate-behind");
    let keys = dir.join("keys");
    let (ok, out) = rtpay(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{out}");
    let token = std::fs::read_to_string(keys.join("operator-token")).unwrap();
    let url = store::testing::fresh_postgres_database();
    {
        let node = KeyedNode::start(&keys, &url);
        runtime().block_on(async {
            let mut c = node.client();
            let r = c.post("/v1/tenants", &token, &json!({"name": "shop"})).await.unwrap();
            let key = r.json()["api_key"]["secret"].as_str().unwrap().to_owned();
            let body = json!({"kind": "person", "name": "Maria Souza", "document": "529.982.247-25"});
            assert_eq!(c.post("/v1/holders", &key, &body).await.unwrap().status, 201);
        });
    }
    let behind = dir.join("behind");
    std::fs::create_dir_all(&behind).unwrap();
    std::fs::copy(keys.join("kek"), behind.join("kek")).unwrap();
    let audit_key = keys.join("audit-signing-key");
    let rotate = |kek: &std::path::Path| {
        let kek = format!("file:{}", kek.display());
        rtpay(&["keys", "rotate", "--postgres", &url, "--kek", &kek, "--audit-key", audit_key.to_str().unwrap()])
    };
    let (ok, out) = rotate(&keys.join("kek"));
    assert!(ok && out.contains("version 2 created; 1 data key(s) re-wrapped"), "{out}");
    let (ok, out) = rotate(&behind.join("kek"));
    assert!(!ok && out.contains("its key source is behind"), "{out}");
    assert_eq!(std::fs::read(behind.join("kek")).unwrap(), std::fs::read(keys.join("kek")).unwrap()[..67]);

    let linked = dir.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(keys.join("kek"), linked.join("kek")).unwrap();
    let (ok, out) = rotate(&linked.join("kek"));
    assert!(ok && out.contains("version 3 created"), "{out}");
    assert!(std::fs::symlink_metadata(linked.join("kek")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(keys.join("kek")).unwrap().lines().count(), 3);
}

/// A rotation where each node reads its own copy of the key file (a mounted Secret): the new
/// version is added first (nothing re-wrapped, every node still reads every record), then the
/// data keys are re-wrapped; a node whose copy lags answers 503 with Retry-After, never a 500,
/// and serves the record once its copy catches up.
#[test]
fn a_rotation_in_two_steps_keeps_nodes_with_their_own_key_copies_serving() {
    let operator = temp_dir("rotate-two-steps").join("keys");
    let (ok, out) = rtpay(&["keys", "init", "--out", operator.to_str().unwrap()]);
    assert!(ok, "{out}");
    let mounted = temp_dir("rotate-two-steps-node");
    for file in rtpay::keys::CLUSTER_FILES {
        std::fs::copy(operator.join(file), mounted.join(file)).unwrap();
    }
    let token = std::fs::read_to_string(operator.join("operator-token")).unwrap();
    let url = store::testing::fresh_postgres_database();
    let first = KeyedNode::start(&mounted, &url);
    let (key, holder) = runtime().block_on(async {
        let mut c = first.client();
        let r = c.post("/v1/tenants", &token, &json!({"name": "shop"})).await.unwrap();
        let key = r.json()["api_key"]["secret"].as_str().unwrap().to_owned();
        let body = json!({"kind": "person", "name": "Maria Souza", "document": "529.982.247-25"});
        let r = c.post("/v1/holders", &key, &body).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        (key, r.json()["id"].as_str().unwrap().to_owned())
    });
    let get = |node: &KeyedNode| {
        runtime().block_on(async {
            let r = node.client().get(&format!("/v1/holders/{holder}"), &key).await.unwrap();
            (r.status.as_u16(), r.headers.get("retry-after").map(|v| v.to_str().unwrap().to_owned()), r.json())
        })
    };
    let rotate =
        |step: &str| rtpay(&["keys", "rotate", step, "--postgres", &url, "--data", operator.to_str().unwrap()]);

    let (ok, out) = rotate("--add-only");
    assert!(ok && out.contains("key-encryption key version 2 added; no data key re-wrapped"), "{out}");
    assert_eq!(std::fs::read_to_string(operator.join("kek")).unwrap().lines().count(), 2);
    let second = KeyedNode::start(&mounted, &url);
    assert_eq!(get(&second).0, 200, "nothing is re-wrapped yet: a node with version 1 only reads everything");
    drop(second);

    let (ok, out) = rotate("--rewrap-only");
    assert!(ok && out.contains("1 data key(s) re-wrapped under key-encryption key version 2"), "{out}");
    let lagging = KeyedNode::start(&mounted, &url);
    let (status, retry, problem) = get(&lagging);
    assert_eq!((status, retry.as_deref()), (503, Some("30")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("does not have yet"), "{problem}");
    assert_eq!(get(&first).0, 200, "a node holding the tenant's data key already goes on");

    std::fs::copy(operator.join("kek"), mounted.join("kek")).unwrap();
    let (status, _, body) = get(&lagging);
    assert_eq!((status, body["name"].clone()), (200, json!("Maria Souza")), "the copy caught up: {body}");
    let (ok, out) = rotate("--rewrap-only");
    assert!(ok && out.contains("0 data key(s) re-wrapped under key-encryption key version 2"), "{out}");
    drop((first, lagging));
    let audit_key = operator.join("audit-signing-key");
    let (ok, verified) = rtpay(&["audit", "verify", "--postgres", &url, "--audit-key", audit_key.to_str().unwrap()]);
    assert!(ok, "{verified}");
}

/// A node pointed at a database whose tenants' data keys exist, but without the cluster's vault
/// keys where it looks (a wrong or empty `--data`), refuses to start and makes none: made, its
/// keys would open none of the sealed data and wrap new data keys no other node could open.
#[test]
fn a_node_without_the_clusters_vault_keys_refuses_a_database_with_sealed_data() {
    let url = store::testing::fresh_postgres_database();
    let dir = temp_dir("keys-cluster");
    let server = Server::start(&dir, Some(&url));
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "sealed").await;
        let r =
            c.post("/v1/holders", &key, &json!({"kind": "person", "name": "Maria", "document": "52998224725"})).await;
        assert_eq!(r.unwrap().status, 201, "a holder's data is sealed under the tenant's data key");
    });
    // The cluster's audit and secret keys and operator token (without them it is refused before,
    // as the next test shows), not its vault keys: it writes none before it is refused.
    let empty = temp_dir("keys-cluster-empty");
    std::fs::copy(dir.join("audit-signing-key"), empty.join("audit-signing-key")).unwrap();
    let (ok, stderr) = refused_start(
        Command::new(env!("CARGO_BIN_EXE_rtpay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--postgres", &url, "--data"])
            .arg(&empty)
            .env("RTPAY_OPERATOR_TOKEN", OPERATOR)
            .env("RTPAY_SECRET_KEY", rtpay::process::SECRET_KEY)
            .env_remove("RTPAY_AUDIT_KEY_FILE")
            .env_remove("RTPAY_INDEX_KEY")
            .env_remove("RTPAY_KEK"),
    );
    assert!(!ok && stderr.contains("already holds tenants' data keys"), "{stderr}");
    assert!(!empty.join("kek").exists() && !empty.join("index-key").exists(), "no vault key was made");
    // On a database without data keys, a key file that cannot be made is reported as such (the
    // PostgreSQL store, open by then, is closed without hiding it).
    let fresh = store::testing::fresh_postgres_database();
    let (ok, stderr) = refused_start(
        Command::new(env!("CARGO_BIN_EXE_rtpay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--postgres", &fresh, "--kek", "file:/nonexistent/rtpay/kek"])
            .arg("--data")
            .arg(temp_dir("keys-cluster-unwritable"))
            .env("RTPAY_OPERATOR_TOKEN", OPERATOR)
            .env_remove("RTPAY_KEK"),
    );
    assert!(!ok && stderr.contains("/nonexistent/rtpay/kek") && !stderr.contains("panic"), "{stderr}");
    // With the cluster's keys it starts.
    for file in ["kek", "index-key", "audit-signing-key"] {
        std::fs::copy(dir.join(file), empty.join(file)).unwrap();
    }
    let second = Server::start(&empty, Some(&url));
    runtime().block_on(async { assert_eq!(second.client().get("/readyz", OPERATOR).await.unwrap().status, 200) });
}

/// A node given another data directory than its cluster's (a wrong or empty `--data`, no
/// `--audit-key`) beside the cluster's database is refused before it makes a key, and writes
/// nothing there: an audit key of its own would sign the log's next head (and `rtpay audit verify`
/// fail on it for good), a secret key of its own would open no API key. A key rotation without the
/// log's audit key is refused before it rotates anything.
#[test]
fn a_node_or_a_rotation_without_the_clusters_audit_and_secret_keys_is_refused() {
    let url = store::testing::fresh_postgres_database();
    let dir = temp_dir("audit-key-cluster");
    let server = Server::start(&dir, Some(&url));
    runtime().block_on(async { tenant(&mut server.client(), "logged").await });
    let start_with = |data: &std::path::Path, secret: bool, token: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rtpay"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--postgres", &url, "--data"])
            .arg(data)
            .env_remove("RTPAY_AUDIT_KEY_FILE")
            .env_remove("RTPAY_INDEX_KEY")
            .env_remove("RTPAY_KEK");
        match secret {
            true => command.env("RTPAY_SECRET_KEY", rtpay::process::SECRET_KEY),
            false => command.env_remove("RTPAY_SECRET_KEY"),
        };
        match token {
            true => command.env("RTPAY_OPERATOR_TOKEN", OPERATOR),
            false => command.env_remove("RTPAY_OPERATOR_TOKEN"),
        };
        refused_start(&mut command)
    };
    let start = |data: &std::path::Path, secret: bool| start_with(data, secret, true);
    let empty = temp_dir("audit-key-empty");
    let (ok, stderr) = start(&empty, true);
    assert!(!ok && stderr.contains("was not signed by the audit key"), "{stderr}");
    assert_eq!(listing(&empty), [], "nothing written");
    // Another key than the one that signed the log.
    let stranger = temp_dir("audit-key-stranger").join("keys");
    assert!(rtpay(&["keys", "init", "--out", stranger.to_str().unwrap()]).0);
    std::fs::copy(stranger.join("audit-signing-key"), empty.join("audit-signing-key")).unwrap();
    let (ok, stderr) = start(&empty, true);
    assert!(!ok && stderr.contains("was not signed by the audit key"), "{stderr}");
    assert_eq!(listing(&empty).len(), 1, "nothing written");
    // The log's key, and no secret key.
    std::fs::copy(dir.join("audit-signing-key"), empty.join("audit-signing-key")).unwrap();
    let (ok, stderr) = start(&empty, false);
    assert!(!ok && stderr.contains("no secret key"), "{stderr}");
    assert_eq!(listing(&empty).len(), 1, "no secret key written");
    // The log's key and the secret key, but no operator token: it would refuse the cluster's.
    let (ok, stderr) = start_with(&empty, true, false);
    assert!(!ok && stderr.contains("no operator token"), "{stderr}");
    assert_eq!(listing(&empty).len(), 1, "no operator token written");

    // A rotation without the log's audit key (none in `--data`, or a stranger's).
    let kek = format!("file:{}", dir.join("kek").display());
    let kek_before = std::fs::read(dir.join("kek")).unwrap();
    let nowhere = temp_dir("audit-key-nowhere");
    let stranger_key = stranger.join("audit-signing-key");
    for args in [vec!["--data", nowhere.to_str().unwrap()], vec!["--audit-key", stranger_key.to_str().unwrap()]] {
        let (ok, out) = rtpay(&[&["keys", "rotate", "--postgres", &url, "--kek", &kek][..], &args].concat());
        assert!(!ok && out.contains("nothing was rotated"), "{out}");
        assert_eq!(std::fs::read(dir.join("kek")).unwrap(), kek_before, "no key-encryption key added");
    }
    assert_eq!(listing(&nowhere), [], "no audit key made");
    drop(server);
    let audit_key = dir.join("audit-signing-key");
    let (ok, verified) = rtpay(&["audit", "verify", "--postgres", &url, "--audit-key", audit_key.to_str().unwrap()]);
    assert!(ok, "{verified}");
    // With the cluster's keys it starts, and writes no key of its own.
    let second = Server::start(&empty, Some(&url));
    runtime().block_on(async { assert_eq!(second.client().get("/readyz", OPERATOR).await.unwrap().status, 200) });
    assert!(!empty.join("secret-key").exists() && !empty.join("operator-token").exists());
}

/// Runs `rtpay serve` as `command` says, expecting it to refuse to start: its exit and its
/// standard error. One still running after 30 s has started: it is killed and the test fails.
fn refused_start(command: &mut Command) -> (bool, String) {
    let mut node = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            node.kill().unwrap();
            panic!("rtpay serve started");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}

/// A data directory `rtpay serve` makes is its owner's only: the ledger and the key files are in
/// it (made under the default umask, others could read the ledger). One that exists keeps its mode.
#[test]
fn a_data_directory_made_by_serve_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let data = temp_dir("private-data").join("made");
    let server = Server::start(&data, None);
    runtime().block_on(async { assert_eq!(server.client().get("/readyz", OPERATOR).await.unwrap().status, 200) });
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
}

/// An operator-token file holding less than a token (empty after a crash, or written by hand) is
/// refused as the environment's short token is, without echoing it.
#[test]
fn serve_refuses_an_operator_token_file_too_short() {
    let data = temp_dir("tiny-op");
    std::fs::write(data.join("operator-token"), "abc123\n").unwrap();
    let (ok, stderr) = refused_start(
        Command::new(env!("CARGO_BIN_EXE_rtpay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .env_remove("RTPAY_OPERATOR_TOKEN")
            .env_remove("RTPAY_POSTGRES"),
    );
    assert!(!ok && stderr.contains("operator-token must hold an operator token of at least 32"), "{stderr}");
    assert!(!stderr.contains("abc123"), "{stderr}");
}
