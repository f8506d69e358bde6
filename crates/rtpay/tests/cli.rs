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

#[test]
fn serve_refuses_bad_limits_before_touching_anything() {
    let dir = temp_dir("bad-limits");
    for (i, arg) in ["--rate-limit=0", "--rate-limit=-5", "--rate-burst=0.5", "--rate-limit=NaN"].iter().enumerate() {
        let data = dir.join(i.to_string());
        let (ok, out) = rtpay(&["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0", arg]);
        assert!(!ok && out.contains("--rate-limit must be above 0"), "{arg}: {out}");
        assert!(!data.exists(), "{arg}: nothing is created");
    }
}

#[test]
fn serve_refuses_a_thread_count_of_zero_before_touching_anything() {
    let dir = temp_dir("bad-threads");
    for (i, arg) in ["--http-threads=0", "--http-threads=-1", "--http-threads=many"].iter().enumerate() {
        let data = dir.join(i.to_string());
        let (ok, out) = rtpay(&["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0", arg]);
        assert!(!ok && out.contains("--http-threads"), "{arg}: {out}");
        assert!(!data.exists(), "{arg}: nothing is created");
    }
}

#[test]
fn serve_refuses_a_location_host_that_cannot_make_a_location() {
    let dir = temp_dir("bad-location-host");
    for (i, host) in ["Pix.Example.com", "a-very-long-host-name.example.com", "-x.com", "x.com/", ""].iter().enumerate()
    {
        let data = dir.join(i.to_string());
        let arg = format!("--pix-location-host={host}");
        let (ok, out) = rtpay(&["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0", &arg]);
        assert!(!ok && out.contains("--pix-location-host must be a host name"), "{host}: {out}");
        assert!(!data.exists(), "{host}: nothing is created");
    }
}

#[test]
fn demo_walks_through_the_api_and_exits() {
    let (ok, out) = rtpay(&["demo", "--exit"]);
    assert!(ok, "{out}");
    for expected in [
        "-> 201",                   // creations
        "-> 200",                   // the repeated deposit
        "\"insufficient_funds\"",   // the refused payment
        "\"status\": \"posted\"",   // the capture
        "\"outcome\": \"created\"", // the audit trail
        "\"signature\": ",          // the signed tree head
        "curl -s -X POST http://127.0.0.1:",
        "export RTPAY=http://127.0.0.1:",
    ] {
        assert!(out.contains(expected), "demo output lacks {expected:?}:\n{out}");
    }
    // Alice: 10000 in, 2550 to bob, 2000 captured of a 3000 hold → 5450 available.
    assert!(out.contains("\"available\": 5450"), "{out}");
}

#[test]
fn migrate_applies_once() {
    let dir = temp_dir("migrate");
    let dir = dir.to_str().unwrap();
    let (ok, out) = rtpay(&["migrate", "--data", dir]);
    assert!(ok && out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]"), "{out}");
    let (ok, out) = rtpay(&["migrate", "--data", dir]);
    assert!(ok && out.contains("schema up to date"), "{out}");
    let url = store::testing::fresh_postgres_database();
    let (ok, out) = rtpay(&["migrate", "--postgres", &url]);
    assert!(ok && out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8]"), "{out}");
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
        "8",
        "--scratch",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    for name in ["rtpay POST /v1/transfers (embedded), closed loop", "baseline: trivial axum JSON handler, closed loop"]
    {
        let line = out.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} in {out}"));
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
