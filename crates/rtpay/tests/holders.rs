//! Account holders through the vault, end to end: documents validated, stored only sealed,
//! shown masked, and readable across a KEK rotation done while the server runs.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

const CPF: &str = "52998224725";
const NAME: &str = "Maria Quitéria de Jesus";

/// Every file of the data directory, scanned for `needle` in clear.
fn found_in_clear(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle) {
            hits.push(path.display().to_string());
        }
    }
    hits
}

#[test]
fn holders_are_sealed_masked_and_survive_a_kek_rotation() {
    let dir = temp_dir("holders");
    let mut server = Server::start(&dir, None);
    let rt = runtime();
    let (key_a, holder_a, key_b, holder_b) = rt.block_on(async {
        let mut c = server.client();
        let (_, key_a) = tenant(&mut c, "a").await;
        let (_, key_b) = tenant(&mut c, "b").await;
        let r = c
            .post("/v1/holders", &key_a, &json!({"kind": "person", "name": NAME, "document": "529.982.247-25"}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let v = r.json();
        assert_eq!((v["document"].clone(), v["name"].clone()), (json!("***.982.247-**"), json!(NAME)));
        let holder_a = v["id"].as_str().unwrap().to_owned();
        let r = c.get(&format!("/v1/holders/{holder_a}"), &key_a).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["document"].clone()), (200, json!("***.982.247-**")));
        assert!(!String::from_utf8_lossy(&r.body).contains(CPF));
        // The alphanumeric CNPJ of 2026.
        let r = c
            .post("/v1/holders", &key_a, &json!({"kind": "company", "name": "ACME", "document": "12.ABC.345/01DE-35"}))
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.json()["document"].clone()), (201, json!("**.ABC.345/01DE-**")));
        // Bad input names the field and the rule, and creates nothing.
        for (body, field, code) in [
            (json!({"kind": "person", "name": "x", "document": "529.982.247-24"}), "document", "invalid_document"),
            (json!({"kind": "person", "name": "x", "document": "11222333000181"}), "document", "invalid_document"),
            (json!({"kind": "company", "name": "x", "document": "12.ABC.345/01DE-36"}), "document", "invalid_document"),
            (json!({"kind": "robot", "name": "x", "document": CPF}), "kind", "invalid_kind"),
            (json!({"kind": "person", "name": " ", "document": "11144477735"}), "name", "invalid_name"),
            (json!({"kind": "person", "name": "x", "document": CPF, "extra": 1}), "extra", "unknown_field"),
            // serde's message would quote the number: the detail names the type only.
            (json!({"kind": "person", "name": "x", "document": 52998224725u64}), "document", "invalid_field"),
        ] {
            let r = c.post("/v1/holders", &key_a, &body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{body}");
            assert_eq!(r.json()["code"], json!(code), "{body}");
            assert!(!String::from_utf8_lossy(&r.body).contains(CPF), "no document echoed in errors");
        }
        // The same document twice in a tenant: 409. In another tenant: another holder.
        let same = json!({"kind": "person", "name": "Other", "document": CPF});
        assert_eq!(c.post("/v1/holders", &key_a, &same).await.unwrap().status, 409);
        // A creation retried with its Idempotency-Key answers the holder it made; with another name
        // under the key, 409.
        let body = |name: &str| {
            Some(
                serde_json::to_vec(&json!({"kind": "person", "name": name, "document": "11144477735"})).unwrap().into(),
            )
        };
        let headers = [("idempotency-key", "holder-retry-1")];
        let first =
            c.send_with_headers(hyper::Method::POST, "/v1/holders", Some(&key_a), body("Ana"), &headers).await.unwrap();
        assert_eq!(first.status, 201, "{:?}", first.json());
        let again =
            c.send_with_headers(hyper::Method::POST, "/v1/holders", Some(&key_a), body("Ana"), &headers).await.unwrap();
        assert_eq!((again.status.as_u16(), again.json()), (200, first.json()));
        let other =
            c.send_with_headers(hyper::Method::POST, "/v1/holders", Some(&key_a), body("Bia"), &headers).await.unwrap();
        assert_eq!((other.status.as_u16(), other.json()["code"].clone()), (409, json!("exists")));
        // By its id as well.
        let by_id = json!({"id": holder_a, "kind": "person", "name": NAME, "document": "529.982.247-25"});
        let r = c.post("/v1/holders", &key_a, &by_id).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["id"].clone()), (200, json!(holder_a)));
        let r = c.post("/v1/holders", &key_b, &same).await.unwrap();
        assert_eq!(r.status, 201);
        let holder_b = r.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(c.get(&format!("/v1/holders/{holder_a}"), &key_b).await.unwrap().status, 404);

        // Accounts name their holder, of the same tenant only.
        let r = c.post("/v1/accounts", &key_a, &json!({"currency": "BRL", "holder_id": holder_a})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["holder_id"].clone()), (201, json!(holder_a)));
        let account = r.json()["id"].as_str().unwrap().to_owned();
        let r = c.get(&format!("/v1/accounts/{account}"), &key_a).await.unwrap();
        assert_eq!(r.json()["holder_id"], json!(holder_a));
        for holder in [holder_b.as_str(), "0190a9c0-0000-7000-8000-000000000000", "not-a-uuid"] {
            let r = c.post("/v1/accounts", &key_a, &json!({"currency": "BRL", "holder_id": holder})).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("holder_id")), "{holder}");
        }
        // The holder is part of the account: the same id with another holder is a conflict.
        let body = json!({"id": account, "currency": "BRL"});
        assert_eq!(c.post("/v1/accounts", &key_a, &body).await.unwrap().status, 409);
        (key_a, holder_a, key_b, holder_b)
    });

    // Rotation while the server runs.
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay")).args(["keys", "rotate", "--data"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("version 2 created; 2 data key(s) re-wrapped"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = rusqlite::Connection::open(dir.join("rtpay.db")).unwrap();
    let kek_versions = |conn: &rusqlite::Connection| -> Vec<u32> {
        let mut statement = conn.prepare("SELECT kek_version FROM data_keys").unwrap();
        statement.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    let versions = kek_versions(&conn);
    assert_eq!(versions, vec![2, 2]);
    // A tenant's first data key made after the rotation, by the node that did not rotate (its
    // keys loaded before it), is wrapped under the new version: deleting the old one after a
    // rotation must not lose it. (It was wrapped under version 1.)
    let key_c = rt.block_on(async {
        let mut c = server.client();
        let (_, key_c) = tenant(&mut c, "c").await;
        let body = json!({"kind": "person", "name": NAME, "document": "111.444.777-35"});
        assert_eq!(c.post("/v1/holders", &key_c, &body).await.unwrap().status, 201);
        key_c
    });
    let versions = kek_versions(&conn);
    assert_eq!(versions, vec![2, 2, 2]);
    drop((conn, key_c));
    let check = |server: &Server| {
        rt.block_on(async {
            let mut c = server.client();
            for (key, holder) in [(&key_a, &holder_a), (&key_b, &holder_b)] {
                let r = c.get(&format!("/v1/holders/{holder}"), key).await.unwrap();
                assert_eq!((r.status.as_u16(), r.json()["document"].clone()), (200, json!("***.982.247-**")));
            }
        })
    };
    check(&server);
    server.stop();
    server.restart();
    check(&server);
    // The operator rotates through the API too: audited, and only by the operator.
    rt.block_on(async {
        let mut c = server.client();
        assert_eq!(c.post("/v1/keys/rotate", &key_a, &json!({})).await.unwrap().status, 401);
        let r = c.post("/v1/keys/rotate", OPERATOR, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()), (200, json!({"kek_version": 3, "rewrapped": 3})));
        // Rotations at once take turns: each adds a version of its own. (Two used to add the
        // same version with keys of their own, and data keys under the losing one no longer
        // opened.)
        let addr = server.addr;
        let rotations: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(async move {
                    let r =
                        rtpay::client::Client::new(addr).post("/v1/keys/rotate", OPERATOR, &json!({})).await.unwrap();
                    assert_eq!(r.status, 200, "{:?}", r.json());
                    r.json()["kek_version"].as_u64().unwrap()
                })
            })
            .collect();
        let mut versions = Vec::new();
        for r in rotations {
            versions.push(r.await.unwrap());
        }
        versions.sort_unstable();
        assert_eq!(versions, [4, 5, 6, 7]);
        let audit = c.get("/v1/audit?limit=1000", OPERATOR).await.unwrap().json();
        let rotations: Vec<_> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == json!("POST /v1/keys/rotate"))
            .map(|e| (e["actor"].as_str().unwrap().to_owned(), e["outcome"].as_str().unwrap().to_owned()))
            .collect();
        let mut expected = vec![("anonymous".to_owned(), "401".to_owned())];
        expected.extend(std::iter::repeat_n(("operator".to_owned(), "200".to_owned()), 5));
        assert_eq!(rotations, expected);
        // The rotation on the command line, while the server ran, is recorded too.
        let cli: Vec<_> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == json!("keys.rotate"))
            .map(|e| (e["actor"].clone(), e["source"].clone(), e["outcome"].clone()))
            .collect();
        assert_eq!(
            cli,
            vec![
                (json!("operator"), json!("cli"), json!("started")),
                (
                    json!("operator"),
                    json!("cli"),
                    json!("key-encryption key version 2 created; 2 data key(s) re-wrapped")
                )
            ],
            "recorded before it starts (so no rotation goes unrecorded) and when it ends"
        );
    });
    check(&server);
    server.stop();
    server.restart();
    check(&server);
    // The log stayed one consistent tree across the server's and the command line's appends.
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay")).args(["audit", "verify", "--data"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    server.stop();

    // Nothing in clear at rest: not the document, not the name.
    assert_eq!(found_in_clear(&dir, CPF.as_bytes()), Vec::<String>::new());
    assert_eq!(found_in_clear(&dir, NAME.as_bytes()), Vec::<String>::new());
}

/// One data key that does not open does not stop a rotation from re-wrapping the others: it is
/// named, stays under its version, and the command fails telling to re-wrap once it is repaired
/// (not to rotate again). (The first failure ended the rotation, the keys after it left under the
/// old version, and every retry added a version.)
#[test]
fn a_rotation_rewraps_every_data_key_it_can_and_names_the_others() {
    let dir = temp_dir("holders-bad-key");
    let mut server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        for (name, document) in [("a", CPF), ("b", "11144477735")] {
            let (_, key) = tenant(&mut c, name).await;
            let body = json!({"kind": "person", "name": NAME, "document": document});
            assert_eq!(c.post("/v1/holders", &key, &body).await.unwrap().status, 201);
        }
    });
    server.stop();
    let conn = rusqlite::Connection::open(dir.join("rtpay.db")).unwrap();
    let broken: Vec<u8> = conn.query_row("SELECT tenant_id FROM data_keys LIMIT 1", [], |r| r.get(0)).unwrap();
    conn.execute("UPDATE data_keys SET wrapped = x'00' WHERE tenant_id = ?1", [&broken]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rtpay")).args(["keys", "rotate", "--data"]).arg(&dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    let broken_id = uuid::Uuid::from_bytes(broken.clone().try_into().unwrap()).to_string();
    assert!(text.contains("1 data key(s) were re-wrapped") && text.contains(&broken_id), "{text}");
    assert!(text.contains("--rewrap-only"), "{text}");
    let mut statement = conn.prepare("SELECT tenant_id, kek_version FROM data_keys").unwrap();
    let versions: Vec<(Vec<u8>, u32)> =
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    assert_eq!(versions.len(), 2);
    for (tenant, version) in versions {
        assert_eq!(version, if tenant == broken { 1 } else { 2 }, "{text}");
    }
    // Over HTTP: 500 rotation_incomplete, not a 503 whose Retry-After would add a version a try.
    server.restart();
    runtime().block_on(async {
        let r = server.client().post("/v1/keys/rotate", OPERATOR, &json!({})).await.unwrap();
        let v = r.json();
        assert_eq!((r.status.as_u16(), v["code"].clone()), (500, json!("rotation_incomplete")), "{v}");
        assert!(v["detail"].as_str().unwrap().contains(&broken_id), "{v}");
        assert!(r.headers.get("retry-after").is_none());
    });
}
