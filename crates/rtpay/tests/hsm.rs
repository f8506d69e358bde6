//! `rtpay serve --kek pkcs11:...` against a real SoftHSM2 token made here: holders sealed under
//! data keys wrapped inside the token, rotation in the token, a wrong PIN refused at start, and a
//! token that disappears mid-run answered with 503 and nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::json;

const PIN: &str = "87654321";
const LABEL: &str = "rtpay-e2e";

fn module() -> PathBuf {
    ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("SoftHSM2 is required: run scripts/setup (it installs Debian's softhsm2)")
}

/// A fresh token under `dir/tokens`, used by this process and the servers it starts.
fn token(dir: &Path) {
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\n", dir.join("tokens").display()),
    )
    .unwrap();
    // Each test runs in its own process (nextest): the environment is this test's alone.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", LABEL, "--so-pin", "12345678", "--pin", PIN])
        .output()
        .expect("softhsm2-util is required: run scripts/setup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn count(dir: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("rtpay.db")).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn the_server_keeps_its_kek_in_the_token_and_stops_writing_when_the_token_is_gone() {
    let hsm = temp_dir("hsm");
    token(&hsm);
    let data = temp_dir("hsm-data");
    let kek = format!("pkcs11:{}#{LABEL}", module().display());

    // A wrong PIN: the server refuses to start, saying why, without the PIN.
    std::env::set_var("RTPAY_PKCS11_PIN", "00000000");
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--kek", &kek, "--data"])
        .arg(&data)
        .env("RTPAY_OPERATOR_TOKEN", OPERATOR)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("PIN is not correct"), "{stderr}");
    assert!(!stderr.contains("00000000"));

    std::env::set_var("RTPAY_PKCS11_PIN", PIN);
    let server = Server::start_with_args(&data, None, "127.0.0.1:0", true, &["--kek", &kek]);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key_a) = tenant(&mut c, "a").await;
        let body = json!({"kind": "person", "name": "Ana", "document": "52998224725"});
        let r = c.post("/v1/holders", &key_a, &body).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let holder = r.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(count(&data, "SELECT count(*) FROM data_keys"), 1);
        // No key file: the KEK is only in the token.
        assert!(!data.join("kek").exists());

        // Rotations inside the token, beside the running server: three at once take turns
        // (the storage's turn), each adding a version of its own.
        let rotations: Vec<_> = (0..3)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_rtpay"))
                    .args(["keys", "rotate", "--kek", &kek, "--data"])
                    .arg(&data)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut versions: Vec<String> = rotations
            .into_iter()
            .map(|r| {
                let out = r.wait_with_output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let said = String::from_utf8(out.stdout).unwrap();
                said.split_whitespace().nth(3).unwrap_or_default().to_owned()
            })
            .collect();
        versions.sort();
        assert_eq!(versions, ["2", "3", "4"], "\"key-encryption key version N created\", N each once");
        assert_eq!(count(&data, "SELECT max(kek_version) FROM data_keys"), 4);
        let r = c.get(&format!("/v1/holders/{holder}"), &key_a).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["document"].clone()), (200, json!("***.982.247-**")));

        // The token disappears. A tenant that needs a new data key gets 503, and nothing is
        // written: no holder, no data key.
        let (_, key_b) = tenant(&mut c, "b").await;
        std::fs::remove_dir_all(hsm.join("tokens")).unwrap();
        let r = c
            .post("/v1/holders", &key_b, &json!({"kind": "person", "name": "Bia", "document": "11144477735"}))
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (503, json!("unavailable")), "{:?}", r.json());
        assert!(r.headers.get("retry-after").is_some());
        assert_eq!(count(&data, "SELECT count(*) FROM holders"), 1);
        assert_eq!(count(&data, "SELECT count(*) FROM data_keys"), 1);
        // Rotation through the API fails the same way, and says so.
        let r = c.post("/v1/keys/rotate", OPERATOR, &json!({})).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        // The ledger does not depend on the token.
        let r = c.post("/v1/accounts", &key_b, &json!({"currency": "BRL"})).await.unwrap();
        assert_eq!(r.status, 201);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    std::fs::remove_dir_all(hsm).ok();
}

/// Nodes of a cluster starting together on one fresh token make one key-encryption key between
/// them, in the storage's turn: each used to find no version 1 and make its own, and the token
/// held two keys by one name, each node wrapping data keys under its own. (The token's objects
/// are files of SoftHSM's file backend, one a key, beside `token.object`, the token's own.)
#[test]
fn nodes_starting_together_on_a_fresh_token_make_one_key() {
    let hsm = temp_dir("hsm-together");
    token(&hsm);
    std::env::set_var("RTPAY_PKCS11_PIN", PIN);
    let kek = format!("pkcs11:{}#{LABEL}", module().display());
    let url = store::testing::fresh_postgres_database();
    let dirs = [temp_dir("hsm-together-a"), temp_dir("hsm-together-b"), temp_dir("hsm-together-c")];
    // The secrets a cluster's nodes share (the key-encryption key aside: the token's).
    let shared = temp_dir("hsm-together-keys").join("keys");
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay")).args(["keys", "init", "--out"]).arg(&shared).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for dir in &dirs {
        for file in ["index-key", "audit-signing-key"] {
            std::fs::copy(shared.join(file), dir.join(file)).unwrap();
        }
    }
    let starting: Vec<_> = dirs
        .iter()
        .map(|dir| {
            let (dir, url, kek) = (dir.clone(), url.clone(), kek.clone());
            std::thread::spawn(move || {
                let start = || Server::start_with_args(&dir, Some(&url), "127.0.0.1:0", true, &["--kek", &kek]);
                // SoftHSM's file backend may fail a process that reads the token while another
                // writes it ("PKCS#11 token info"): such a node stops at start, and starts again.
                for _ in 0..3 {
                    if let Ok(server) = std::panic::catch_unwind(start) {
                        return server;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                start()
            })
        })
        .collect();
    let servers: Vec<Server> = starting.into_iter().map(|s| s.join().unwrap()).collect();
    let objects = |dir: &Path| -> usize {
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                n += std::fs::read_dir(&path)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|x| x == "object") && !p.ends_with("token.object"))
                    .count();
            }
        }
        n
    };
    assert_eq!(objects(&hsm.join("tokens")), 1, "one key in the token");
    // What one node seals, another opens.
    runtime().block_on(async {
        let mut a = servers[0].client();
        let (_, key) = tenant(&mut a, "together").await;
        let body = json!({"kind": "person", "name": "Ana", "document": "52998224725"});
        let r = a.post("/v1/holders", &key, &body).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let holder = r.json()["id"].as_str().unwrap().to_owned();
        for server in &servers[1..] {
            let r = server.client().get(&format!("/v1/holders/{holder}"), &key).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["document"].clone()), (200, json!("***.982.247-**")));
        }
    });
}
