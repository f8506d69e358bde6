//! The audit log end to end: what real requests record, the proofs a client can check with only
//! the public key, and `rtpay audit verify` catching every kind of edit made directly in storage.

mod common;

use common::*;
use serde_json::{json, Value};

fn h32(v: &Value) -> audit::Hash {
    audit::unhex(v.as_str().unwrap()).unwrap().try_into().unwrap()
}

#[test]
fn requests_are_recorded_and_proved() {
    let dir = temp_dir("audit-api");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_a, key_a) = tenant(&mut c, "audit a").await;
        let (_, key_b) = tenant(&mut c, "audit b").await;
        let bank = account(&mut c, &key_a, json!({"currency": "BRL"})).await;
        let wallet =
            account(&mut c, &key_a, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}}))
                .await;
        account(&mut c, &key_b, json!({"currency": "BRL"})).await;
        let ok_id = uuid();
        let r = c
            .post(
                "/v1/transfers",
                &key_a,
                &json!({"id": ok_id, "debit_account_id": bank, "credit_account_id": wallet, "amount": 10}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let refused_id = uuid();
        let r = c
            .post(
                "/v1/transfers",
                &key_a,
                &json!({"id": refused_id, "debit_account_id": wallet, "credit_account_id": bank, "amount": 99}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 422);
        let r = c.post("/v1/transfers", &key_a, &json!({"id": "not-a-uuid"})).await.unwrap();
        assert_eq!(r.status, 422);
        // Reads are not recorded; a failed authentication is, whatever the method.
        assert_eq!(c.get(&format!("/v1/accounts/{bank}"), &key_a).await.unwrap().status, 200);
        let forged = format!("rtpay_sk_{}", "0".repeat(64));
        assert_eq!(c.get(&format!("/v1/accounts/{bank}"), &forged).await.unwrap().status, 401);

        let r = c.get("/v1/audit?limit=1000", OPERATOR).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let page = r.json();
        let entries = page["entries"].as_array().unwrap().clone();
        let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=entries.len() as u64).collect::<Vec<_>>());
        let summary: Vec<(String, String, String)> = entries
            .iter()
            .map(|e| {
                (
                    e["action"].as_str().unwrap().to_owned(),
                    e["outcome"].as_str().unwrap().to_owned(),
                    e["actor"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected_actions = [
            ("POST /v1/tenants", "201"),
            ("POST /v1/tenants", "201"),
            ("POST /v1/accounts", "created"),
            ("POST /v1/accounts", "created"),
            ("POST /v1/accounts", "created"),
            ("POST /v1/transfers", "created"),
            ("POST /v1/transfers", "insufficient_funds"),
            ("POST /v1/transfers", "422"),
            ("GET /v1/accounts/{id}", "401"),
        ];
        assert_eq!(
            summary.iter().map(|(a, o, _)| (a.as_str(), o.as_str())).collect::<Vec<_>>(),
            expected_actions,
            "{entries:#?}"
        );
        assert_eq!(summary[0].2, "operator");
        assert!(summary[2].2.starts_with("key:"), "{:?}", summary[2]);
        assert_eq!(summary[8].2, "anonymous");
        assert_eq!(entries[5]["resource"], json!(ok_id));
        assert_eq!(entries[5]["tenant_id"], json!(tenant_a));
        assert!(entries.iter().all(|e| !e["request_id"].as_str().unwrap().is_empty()));
        assert!(entries.iter().all(|e| e["source"].as_str().unwrap().starts_with("127.0.0.1:")));
        // No secret in the log.
        let text = serde_json::to_string(&entries).unwrap();
        assert!(
            !text.contains(&key_a) && !text.contains(&key_b) && !text.contains(&forged) && !text.contains(OPERATOR)
        );

        // A tenant sees its own entries only.
        let mine = c.get("/v1/audit", &key_a).await.unwrap().json();
        let mine = mine["entries"].as_array().unwrap();
        assert_eq!(mine.len(), 5);
        assert!(mine.iter().all(|e| e["tenant_id"] == json!(tenant_a)));
        let paged = c.get("/v1/audit?after=3&limit=2", OPERATOR).await.unwrap().json();
        assert_eq!(
            paged["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(paged["next_after"], json!(5));

        // The head is signed, and its root is the tree of the listed entries' leaf hashes.
        let head = c.get("/v1/audit/tree-head", &key_b).await.unwrap().json();
        let size = head["tree_size"].as_u64().unwrap();
        assert_eq!(size, entries.len() as u64);
        let public_key = audit::unhex(head["public_key"].as_str().unwrap()).unwrap();
        let tree_head =
            audit::TreeHead { size, root: h32(&head["root_hash"]), time: head["timestamp"].as_u64().unwrap() };
        assert!(audit::verify_head(
            &public_key,
            &tree_head,
            &audit::unhex(head["signature"].as_str().unwrap()).unwrap()
        ));
        let mut frontier = audit::Frontier::default();
        let mut roots = vec![audit::merkle::empty_root()];
        for e in &entries {
            frontier.append(h32(&e["leaf_hash"]), &mut Vec::new());
            roots.push(frontier.root());
        }
        assert_eq!(frontier.root(), tree_head.root);

        for e in &entries {
            let seq = e["seq"].as_u64().unwrap();
            let proof = c.get(&format!("/v1/audit/proof/inclusion?seq={seq}"), OPERATOR).await.unwrap().json();
            let path: Vec<audit::Hash> = proof["audit_path"].as_array().unwrap().iter().map(h32).collect();
            assert!(
                audit::merkle::verify_inclusion(seq - 1, size, &h32(&e["leaf_hash"]), &path, &tree_head.root),
                "entry {seq}"
            );
        }
        for first in 1..=size {
            let proof = c.get(&format!("/v1/audit/proof/consistency?first={first}"), OPERATOR).await.unwrap().json();
            let path: Vec<audit::Hash> = proof["proof"].as_array().unwrap().iter().map(h32).collect();
            assert!(audit::merkle::verify_consistency(first, size, &roots[first as usize], &tree_head.root, &path));
        }
        // Another tenant's entry does not exist for B; bad parameters name the field.
        let r = c.get("/v1/audit/proof/inclusion?seq=3", &key_b).await.unwrap();
        assert_eq!(r.status, 404);
        for (query, field) in
            [("seq=0", "seq"), ("seq=x", "seq"), ("seq=1&tree_size=999999", "tree_size"), ("seq=1&bogus=1", "bogus")]
        {
            let r = c.get(&format!("/v1/audit/proof/inclusion?{query}"), OPERATOR).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{query}");
        }
        // A position past the largest stored one is refused, not read as negative (which listed
        // the log from its start).
        // An unknown parameter before a bad value, and the first by name: the same answer each
        // time, whatever a hash map's order (asked five times).
        let same_each_time = std::iter::repeat_n(("zz=1&after=x&limit=x&foo=1", "foo"), 5)
            .chain(std::iter::repeat_n(("limit=x&after=x", "after"), 5));
        for (query, field) in
            [("limit=0", "limit"), ("after=9223372036854775808", "after")].into_iter().chain(same_each_time)
        {
            let r = c.get(&format!("/v1/audit?{query}"), OPERATOR).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{query}");
        }
        let r = c.get("/v1/audit?after=9223372036854775807", OPERATOR).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["entries"].clone()), (200, json!([])));
        assert_eq!(c.get("/v1/audit", &forged).await.unwrap().status, 401);
    });
}

/// A client that hangs up while its request is handled does not take the audit entry with it: a
/// change made through a blocking task (here the webhook secret's rotation), which runs on once
/// begun, is recorded all the same. (Before, the connection's end dropped the middleware with the
/// handler, and the rotation stood with no entry.) The metrics count such requests as 499.
#[test]
fn a_change_whose_client_hung_up_is_recorded_all_the_same() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("audit-hangup");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "hangup").await;
        let first = c.get("/v1/pix/webhook-secret", &key).await.unwrap().json()["generation"].as_u64().unwrap();
        // Hung up at moments spread over the handling: before it begins, while the rotation is
        // written, while its entry is, after the answer.
        let attempts = 200u64;
        // A rotation whose client hangs up `after` it sent it; what the client read before the
        // connection ended.
        let hang_up = |after: std::time::Duration| {
            let (addr, key) = (server.addr, key.clone());
            async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let body = r#"{"overlap_seconds":0}"#;
                let request = format!(
                    "POST /v1/pix/webhook-secret/rotate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(request.as_bytes()).await.unwrap();
                tokio::time::sleep(after).await;
                stream.shutdown().await.unwrap();
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer).await;
                answer
            }
        };
        for n in 0..attempts {
            hang_up(std::time::Duration::from_micros(n * 25)).await;
        }
        // Every rotation that took place (the generation counts them) is recorded as done.
        let counts = |shown: Value, page: Value| {
            let rotated = shown["generation"].as_u64().unwrap() - first;
            let recorded = page["entries"]
                .as_array()
                .unwrap()
                .iter()
                // Of two requests at once, one may find the other's rotation stored first (409).
                .filter(|e| e["action"] == json!("POST /v1/pix/webhook-secret/rotate") && e["outcome"] == json!("200"))
                .count() as u64;
            (rotated, recorded)
        };
        let mut last = (0, 0);
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let shown = c.get("/v1/pix/webhook-secret", &key).await.unwrap().json();
            let page = c.get("/v1/audit?limit=1000", &key).await.unwrap().json();
            last = counts(shown, page);
            if last.0 == last.1 && last.0 > 0 {
                break;
            }
        }
        let (rotated, recorded) = last;
        assert!(rotated > 0, "some rotations took place");
        assert_eq!(recorded, rotated, "{rotated} rotations of {attempts}, {recorded} recorded");
        // The metrics count the requests whose client went away under 499. One is made sure of:
        // a rotation held back by a write lock taken on the database from outside, whose client
        // hangs up while it waits (the loop above may have seen every rotation finish in time).
        let mut lock = rusqlite::Connection::open(server.data.join("rtpay.db")).unwrap();
        let held = lock.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        let answer = hang_up(std::time::Duration::from_millis(300)).await;
        assert!(answer.is_empty(), "no answer reached the client that hung up: {}", String::from_utf8_lossy(&answer));
        held.rollback().unwrap();
        let closed =
            "rtpay_http_requests_total{method=\"POST\",route=\"/v1/pix/webhook-secret/rotate\",status=\"499\"}";
        let text = metrics_with(&mut c, closed).await;
        assert!(sample(&text, closed).unwrap() >= 1.0, "{text}");
    });
}

/// Direct SQL on the server's storage, either engine.
enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl Db {
    fn open(server: &Server) -> Db {
        match &server.postgres {
            None => Db::Sqlite(rusqlite::Connection::open(server.data.join("rtpay.db")).unwrap()),
            Some(url) => Db::Postgres(postgres::Client::connect(url, postgres::NoTls).unwrap()),
        }
    }

    fn run(&mut self, sql: &str) {
        match self {
            Db::Sqlite(c) => c.execute_batch(sql).unwrap(),
            Db::Postgres(c) => c.batch_execute(sql).unwrap(),
        }
    }

    /// The stored signed head of `size`, as `GET /v1/audit/tree-head` shows one.
    fn head(&mut self, size: i64) -> serde_json::Value {
        let sql = format!("SELECT time, root, signature FROM audit_heads WHERE size = {size}");
        let (time, root, signature): (i64, Vec<u8>, Vec<u8>) = match self {
            Db::Sqlite(c) => c.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap(),
            Db::Postgres(c) => {
                let r = c.query_one(&sql, &[]).unwrap();
                (r.get(0), r.get(1), r.get(2))
            }
        };
        json!({"tree_size": size, "root_hash": audit::hex(&root), "timestamp": time, "signature": audit::hex(&signature)})
    }

    /// The stored entry `seq`, as the verifier reads it.
    fn entry(&mut self, seq: i64) -> audit::Entry {
        let sql =
            "SELECT seq, time, actor, action, resource, request_id, source, outcome FROM audit_entries WHERE seq = ";
        let (time, texts, tenant): (i64, Vec<String>, Option<u128>) = match self {
            Db::Sqlite(c) => {
                let tenant: Option<Vec<u8>> = c
                    .query_row(&format!("SELECT tenant_id FROM audit_entries WHERE seq = {seq}"), [], |r| r.get(0))
                    .unwrap();
                c.query_row(&format!("{sql}{seq}"), [], |r| {
                    Ok((
                        r.get(1)?,
                        (2..8).map(|i| r.get(i).unwrap()).collect(),
                        tenant.map(|t| u128::from_be_bytes(t.try_into().unwrap())),
                    ))
                })
                .unwrap()
            }
            Db::Postgres(c) => {
                let r = c.query_one(&format!("{sql}{seq}"), &[]).unwrap();
                let t = c.query_one(&format!("SELECT tenant_id FROM audit_entries WHERE seq = {seq}"), &[]).unwrap();
                let tenant: Option<uuid::Uuid> = t.get(0);
                (r.get(1), (2..8).map(|i| r.get(i)).collect(), tenant.map(|u| u.as_u128()))
            }
        };
        audit::Entry {
            seq: seq as u64,
            time: time as u64,
            draft: audit::Draft {
                tenant,
                actor: texts[0].clone(),
                action: texts[1].clone(),
                resource: texts[2].clone(),
                request_id: texts[3].clone(),
                source: texts[4].clone(),
                outcome: texts[5].clone(),
            },
        }
    }
}

/// A request whose batch could not be committed (storage refused it) answers 503 and is recorded
/// as such: the entry it carried was rolled back with the batch, and it was left unrecorded.
#[test]
fn a_request_whose_batch_failed_is_recorded_as_refused() {
    let url = store::testing::fresh_postgres_database();
    let server = Server::start(&temp_dir("audit-failed-batch"), Some(&url));
    let rt = runtime();
    let (key, bank, wallet) = rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "failed").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let wallet = account(&mut c, &key, json!({"currency": "BRL"})).await;
        (key, bank, wallet)
    });
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    refuse_inserts(&mut admin, "transfers");
    let id = uuid();
    let body = json!({"id": id, "debit_account_id": bank, "credit_account_id": wallet, "amount": 1});
    rt.block_on(async {
        let r = server.client().post("/v1/transfers", &key, &body).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
    });
    allow_inserts(&mut admin, "transfers");
    rt.block_on(async {
        let mut c = server.client();
        let r = c.get(&format!("/v1/transfers/{id}"), &key).await.unwrap();
        assert_eq!(r.status, 404, "nothing was applied");
        let entries = c.get("/v1/audit?limit=1000", &key).await.unwrap().json();
        let outcomes: Vec<_> = entries["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == json!("POST /v1/transfers"))
            .map(|e| e["outcome"].clone())
            .collect();
        assert_eq!(outcomes, [json!("503")]);
    });
    let (ok, report) = server.audit_verify();
    assert!(ok, "{report}");
}

#[test]
fn audit_verify_catches_every_edit_made_in_storage() {
    for postgres in [None, Some(store::testing::fresh_postgres_database())] {
        let dir = temp_dir("audit-tamper");
        let mut server = Server::start(&dir, postgres.as_deref());
        runtime().block_on(async {
            let mut c = server.client();
            let (_, key) = tenant(&mut c, "tamper").await;
            for _ in 0..6 {
                account(&mut c, &key, json!({"currency": "BRL"})).await;
            }
        });
        server.stop();
        let (ok, report) = server.audit_verify();
        assert!(ok && report.contains("ok: 7 audit entries"), "{report}");

        let mut db = Db::open(&server);
        let blob = if postgres.is_some() { "'\\x00'::bytea" } else { "x'00'" };
        db.run(
            "CREATE TABLE saved_entries AS SELECT * FROM audit_entries; \
             CREATE TABLE saved_heads AS SELECT * FROM audit_heads; CREATE TABLE saved_nodes AS SELECT * FROM audit_nodes;",
        );
        let restore = "DELETE FROM audit_entries; INSERT INTO audit_entries SELECT * FROM saved_entries; \
                       DELETE FROM audit_heads; INSERT INTO audit_heads SELECT * FROM saved_heads; \
                       DELETE FROM audit_nodes; INSERT INTO audit_nodes SELECT * FROM saved_nodes;";
        // The altered entry with its leaf hash recomputed, as a careful forger would.
        let mut forged = db.entry(4);
        forged.draft.outcome = "500".into();
        let forged_leaf = audit::hex(&forged.leaf_hash());
        let leaf_literal =
            if postgres.is_some() { format!("'\\x{forged_leaf}'::bytea") } else { format!("x'{forged_leaf}'") };
        // An entry appended after the last one, its hash computed properly: only the missing
        // signed head gives it away.
        let mut appended = db.entry(7);
        appended.seq = 8;
        appended.time += 1;
        appended.draft.tenant = None;
        let appended_leaf = audit::hex(&appended.leaf_hash());
        let appended_literal =
            if postgres.is_some() { format!("'\\x{appended_leaf}'::bytea") } else { format!("x'{appended_leaf}'") };
        let cases: Vec<(&str, String, &str)> = vec![
            ("altered field", "UPDATE audit_entries SET outcome = 'x' WHERE seq = 3".into(), "entry 3 was altered"),
            (
                "altered field with its leaf hash recomputed",
                format!("UPDATE audit_entries SET outcome = '500', leaf_hash = {leaf_literal} WHERE seq = 4"),
                "does not match the entries",
            ),
            ("removed from the middle", "DELETE FROM audit_entries WHERE seq = 3".into(), "entry 3 expected, entry 4 found"),
            ("removed from the end", "DELETE FROM audit_entries WHERE seq = 7".into(), "entries were removed"),
            (
                "reordered",
                "UPDATE audit_entries SET seq = 100 WHERE seq = 2; UPDATE audit_entries SET seq = 2 WHERE seq = 3; \
                 UPDATE audit_entries SET seq = 3 WHERE seq = 100;"
                    .into(),
                "entry 2 was altered",
            ),
            (
                "inserted at the end, with a correct leaf hash",
                format!(
                    "INSERT INTO audit_entries (seq, time, actor, action, resource, request_id, source, outcome, leaf_hash) \
                     SELECT 8, {}, actor, action, resource, request_id, source, outcome, {appended_literal} \
                     FROM audit_entries WHERE seq = 7",
                    appended.time
                ),
                "entries from 8 on are covered by no signed tree head",
            ),
            (
                "inserted in the middle",
                "UPDATE audit_entries SET seq = seq + 1000 WHERE seq >= 3; UPDATE audit_entries SET seq = seq - 999 WHERE seq >= 1000; \
                 INSERT INTO audit_entries (seq, time, actor, action, resource, request_id, source, outcome, leaf_hash) \
                 SELECT 3, time, actor, action, resource, request_id, source, 'forged', leaf_hash FROM audit_entries WHERE seq = 2"
                    .into(),
                "entry 3 was altered",
            ),
            ("forged signature", format!("UPDATE audit_heads SET signature = {blob} WHERE size = 5"), "invalid signature"),
            ("a head removed and the rest intact", "DELETE FROM audit_heads WHERE size = 7".into(), "covered by no signed tree head"),
        ];
        for (name, sql, expected) in cases {
            db.run(&sql);
            let (ok, report) = server.audit_verify();
            assert!(!ok, "{name}: not caught\n{report}");
            assert!(report.contains(expected), "{name}: expected {expected:?} in\n{report}");
            db.run(restore);
            let (ok, report) = server.audit_verify();
            assert!(ok, "{name}: restoring did not restore\n{report}");
        }
        // SQLite keeps what it is given: a leaf hash stored as text is reported, not a panic.
        if postgres.is_none() {
            db.run("UPDATE audit_entries SET leaf_hash = 'text' WHERE seq = 2");
            let (ok, report) = server.audit_verify();
            assert!(!ok && report.contains("audit entry 2 has no leaf hash"), "{report}");
            assert!(!report.contains("panicked"), "{report}");
            db.run(restore);
        }
        // Cut back with its heads, the log is consistent in itself; a tree head saved outside
        // storage is not in it.
        let verify_with = |head: &serde_json::Value| {
            let file = dir.join("saved-head.json");
            std::fs::write(&file, serde_json::to_vec(head).unwrap()).unwrap();
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rtpay"));
            command.args(["audit", "verify", "--data"]).arg(&server.data).arg("--head").arg(&file);
            if let Some(url) = &server.postgres {
                command.arg("--postgres").arg(url);
            }
            let out = command.output().unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.code(), text)
        };
        let saved = db.head(7);
        let (code, report) = verify_with(&saved);
        assert_eq!(code, Some(0), "{report}");
        assert!(report.contains("the saved tree head is contained"), "{report}");
        db.run("DELETE FROM audit_entries WHERE seq > 5; DELETE FROM audit_heads WHERE size > 5");
        let (ok, report) = server.audit_verify();
        assert!(ok, "without a saved head a cut with its heads is not seen: {report}");
        let (code, report) = verify_with(&saved);
        assert_eq!(code, Some(1), "{report}");
        assert!(report.contains("a signed tree head covers 7 entries but only 5 are stored"), "{report}");
        db.run(restore);
        let mut forged = saved.clone();
        forged["timestamp"] = json!(saved["timestamp"].as_i64().unwrap() + 1);
        let (code, report) = verify_with(&forged);
        assert_eq!(code, Some(2), "{report}");
        assert!(report.contains("its signature does not verify under the audit log's key"), "{report}");
        let (code, report) = verify_with(&json!({"tree_size": 7}));
        assert_eq!(code, Some(2), "{report}");
        assert!(report.contains("--head") && report.contains("timestamp"), "{report}");

        // A node serving storage with an entry gone proves nothing for it: not the next entry's
        // leaf under the missing one's number.
        db.run("DELETE FROM audit_entries WHERE seq = 3");
        server.restart();
        runtime().block_on(async {
            let mut c = server.client();
            let r = c.get("/v1/audit/proof/inclusion?seq=3&tree_size=7", OPERATOR).await.unwrap();
            assert_eq!(r.status, 404, "{:?}", r.json());
        });
        server.stop();
    }
}
