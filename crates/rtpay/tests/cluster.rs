//! Several `rtpay serve` nodes on one PostgreSQL: correct under concurrent transfers on the same
//! accounts, and honest when PostgreSQL goes away (503 + Retry-After, then recovery).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// POSTs to `path` four times on each node at once, each with its own `body()`; the answers as
/// (status, body), in no particular order.
async fn post_four_on_each(
    nodes: [std::net::SocketAddr; 2],
    path: &str,
    key: &str,
    body: impl Fn() -> Value,
) -> Vec<(u16, Value)> {
    let mut tasks = Vec::new();
    for addr in nodes {
        for _ in 0..4 {
            let (path, key, body) = (path.to_owned(), key.to_owned(), body());
            tasks.push(tokio::spawn(async move {
                let r = rtpay::client::Client::new(addr).post(&path, &key, &body).await.unwrap();
                (r.status.as_u16(), r.json())
            }));
        }
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// An API key revoked on one node stops working on the other within the key cache's time
/// (`server::auth::KEY_CACHE_TTL`), also on a connection that keeps presenting it and was let in
/// a moment before.
#[test]
fn a_key_revoked_on_one_node_stops_working_on_the_other_within_the_cache_time() {
    let (a, b) = two_nodes("revoke", &[]);
    runtime().block_on(async {
        let mut ca = a.client();
        let (tenant_id, key) = tenant(&mut ca, "revoke").await;
        let wallet = account(&mut ca, &key, json!({"currency": "BRL"})).await;
        let r = ca.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &json!({})).await.unwrap();
        assert_eq!(r.status, 201);
        let (key_id, second) =
            (r.json()["id"].as_str().unwrap().to_owned(), r.json()["secret"].as_str().unwrap().to_owned());
        // Node B's connection proves the second key, and keeps using it.
        let mut cb = b.client();
        let path = format!("/v1/accounts/{wallet}");
        assert_eq!(cb.get(&path, &second).await.unwrap().status, 200);
        let r = ca
            .send(hyper::Method::DELETE, &format!("/v1/tenants/{tenant_id}/api-keys/{key_id}"), Some(OPERATOR), None)
            .await
            .unwrap();
        assert_eq!(r.status, 204);
        let revoked = std::time::Instant::now();
        let bound = server::auth::KEY_CACHE_TTL + Duration::from_millis(500);
        loop {
            let status = cb.get(&path, &second).await.unwrap().status.as_u16();
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(revoked.elapsed() < bound, "node B still lets the revoked key in after {:?}", revoked.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The tenant's other key still works there, on the same connection.
        assert_eq!(cb.get(&path, &key).await.unwrap().status, 200);
    });
}

#[test]
fn two_nodes_share_one_ledger_without_overdraft_or_deadlock() {
    let (a, b) = two_nodes("node", &[]);
    let rt = runtime();
    rt.block_on(async {
        let mut ca = a.client();
        let (_, key) = tenant(&mut ca, "cluster").await;
        let bank = account(&mut ca, &key, json!({"currency": "BRL"})).await;
        let mut wallets = Vec::new();
        for _ in 0..4 {
            let w = account(&mut ca, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;
            let r = ca.post("/v1/transfers", &key, &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 1_000})).await.unwrap();
            assert_eq!(r.status, 201);
            wallets.push(w);
        }
        // Eight clients per node hammer the same four wallets; each wallet can cover only a few.
        let mut tasks = Vec::new();
        for (n, addr) in [a.addr, b.addr].into_iter().enumerate() {
            for t in 0..8usize {
                let (key, wallets) = (key.clone(), wallets.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = rtpay::client::Client::new(addr);
                    let (mut created, mut refused) = (0u32, 0u32);
                    for i in 0..60usize {
                        let d = (t + i + n) % 4;
                        let cr = (d + 1 + i % 3) % 4;
                        let body = json!({"id": uuid(), "debit_account_id": wallets[d], "credit_account_id": wallets[cr], "amount": 37});
                        let r = c.post("/v1/transfers", &key, &body).await.unwrap();
                        match r.status.as_u16() {
                            201 => created += 1,
                            422 => {
                                assert_eq!(r.json()["code"], "insufficient_funds");
                                refused += 1
                            }
                            s => panic!("node {n}: status {s}: {:?}", r.json()),
                        }
                    }
                    (created, refused)
                }));
            }
        }
        let mut created = 0;
        for t in tasks {
            created += t.await.unwrap().0;
        }
        assert!(created > 0);
        let mut total = 0i64;
        for w in &wallets {
            // Both nodes see the same committed balance.
            let ba = balance(&mut ca, &key, w).await;
            let bb = balance(&mut b.client(), &key, w).await;
            assert_eq!(ba, bb);
            let available = ba["available"].as_i64().unwrap();
            assert!(available >= 0, "overdraft: {ba}");
            total += available;
        }
        assert_eq!(total, 4_000, "money created or destroyed across nodes");
        // Each node measured its clock against PostgreSQL's (one machine's clock here).
        for node in [&a, &b] {
            let text = metrics_with(&mut node.client(), "rtpay_clock_skew_seconds").await;
            let skew = sample(&text, "rtpay_clock_skew_seconds").unwrap();
            assert!(skew.abs() < 0.5, "{skew} s apart on one machine");
        }
    });
    let (ok, report) = a.verify();
    assert!(ok, "{report}");
}

/// Checks that span a read and a commit hold across nodes: a charge paid from two nodes at once is
/// paid once, and refunds requested on two nodes at once stay within the Pix's amount.
#[test]
fn a_charge_is_paid_once_and_refunds_stay_within_the_pix_across_nodes() {
    const ISPB: &str = "12345678";
    const CNPJ: &str = "11222333000181";
    let (a, b) = two_nodes("pix-node", &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = a.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let (_, wallet) = tenant(&mut c, "wallet").await;
        let holder = |key: &str, kind: &str, doc: &str| {
            let (key, body) = (key.to_owned(), json!({"kind": kind, "name": "Holder", "document": doc}));
            let mut c = a.client();
            async move { c.post("/v1/holders", &key, &body).await.unwrap().json()["id"].as_str().unwrap().to_owned() }
        };
        let h = holder(&shop, "company", CNPJ).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": h})).await;
        let h = holder(&wallet, "person", "52998224725").await;
        let maria = account(
            &mut c,
            &wallet,
            json!({"currency": "BRL", "holder_id": h, "flags": {"debits_must_not_exceed_credits": true}}),
        )
        .await;
        let bank = account(&mut c, &wallet, json!({"currency": "BRL"})).await;
        let r = c
            .post(
                "/v1/transfers",
                &wallet,
                &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": maria, "amount": 100_000}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let r = c.post("/v1/pix/keys", &shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ})).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());

        let rounds = 4;
        let mut first_e2e = String::new();
        for round in 0..rounds {
            let cob = json!({"valor": {"original": "10.00"}, "chave": CNPJ});
            let r = c
                .send(
                    hyper::Method::PUT,
                    &format!("/api/v2/cob/clusterTxid{round:020}"),
                    Some(&shop),
                    Some(serde_json::to_vec(&cob).unwrap().into()),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{:?}", r.json());
            let brcode = r.json()["pixCopiaECola"].clone();
            let pay = || json!({"id": uuid(), "debit_account_id": maria, "amount": 1_000, "brcode": brcode});
            let mut completed = 0;
            for (status, v) in post_four_on_each([a.addr, b.addr], "/v1/pix/payments", &wallet, pay).await {
                match (status, v["status"].as_str(), v["code"].as_str()) {
                    (201, Some("completed"), _) => {
                        completed += 1;
                        first_e2e = v["end_to_end_id"].as_str().unwrap().to_owned();
                    }
                    (422, _, Some("charge_not_payable")) | (503, _, Some("unavailable")) => {}
                    _ => panic!("unexpected answer {status}: {v}"),
                }
            }
            assert_eq!(completed, 1, "round {round}: the charge was paid {completed} times");
        }
        assert_eq!(balance(&mut c, &wallet, &maria).await["available"], json!(100_000 - rounds * 1_000));
        assert_eq!(balance(&mut b.client(), &shop, &acme).await["available"], json!(rounds * 1_000));

        // Refunds of 4.00 on a Pix of 10.00, asked on both nodes at once: two fit, never three.
        let mut tasks = Vec::new();
        for (n, addr) in [a.addr, b.addr].into_iter().enumerate() {
            for k in 0..4 {
                let (shop, e2e) = (shop.clone(), first_e2e.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = rtpay::client::Client::new(addr);
                    let body = serde_json::to_vec(&json!({"valor": "4.00"})).unwrap().into();
                    let path = format!("/api/v2/pix/{e2e}/devolucao/N{n}K{k}");
                    let r = c.send(hyper::Method::PUT, &path, Some(&shop), Some(body)).await.unwrap();
                    (r.status.as_u16(), r.json())
                }));
            }
        }
        let mut refunded = 0;
        for t in tasks {
            let (status, v) = t.await.unwrap();
            match status {
                201 if v["status"] == "DEVOLVIDO" => refunded += 1,
                400 | 503 => {}
                _ => panic!("unexpected answer {status}: {v}"),
            }
        }
        assert!((1..=2).contains(&refunded), "{refunded} refunds of 4.00 on a Pix of 10.00");
        assert_eq!(
            balance(&mut c, &wallet, &maria).await["available"],
            json!(100_000 - rounds * 1_000 + refunded * 400)
        );

        // A daily limit of 30.00, and payments of 10.00 asked on both nodes at once: three fit,
        // never four (each node admits a payment only if the day's total, read under the
        // cluster's batch lock, still leaves room).
        let h = holder(&wallet, "person", "11144477735").await;
        let joana = account(
            &mut c,
            &wallet,
            json!({"currency": "BRL", "holder_id": h, "flags": {"debits_must_not_exceed_credits": true}}),
        )
        .await;
        let r = c
            .post(
                "/v1/transfers",
                &wallet,
                &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": joana, "amount": 100_000}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let limits =
            json!({"per_transaction": null, "daily": 3_000, "nightly": 100_000, "night_per_transaction": 100_000});
        let r = c
            .send(
                hyper::Method::PUT,
                &format!("/v1/holders/{h}/pix-limits"),
                Some(&wallet),
                Some(serde_json::to_vec(&limits).unwrap().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(r.json()["limits"]["daily"], json!(3_000), "lowering applies at once");
        let pay = || json!({"id": uuid(), "debit_account_id": joana, "amount": 1_000, "key": CNPJ});
        let mut paid = 0;
        for (status, v) in post_four_on_each([a.addr, b.addr], "/v1/pix/payments", &wallet, pay).await {
            match (status, v["status"].as_str(), v["reason"].as_str().or(v["code"].as_str())) {
                (201, Some("completed"), _) => paid += 1,
                (201, Some("rejected"), Some("limit_exceeded")) | (503, _, Some("unavailable")) => {}
                _ => panic!("unexpected answer {status}: {v}"),
            }
        }
        assert!((1..=3).contains(&paid), "{paid} payments of 10.00 under a daily limit of 30.00");
        assert_eq!(balance(&mut c, &wallet, &joana).await["available"], json!(100_000 - paid * 1_000));

        // A person's account has at most five keys, however many nodes register them at once.
        let key = || json!({"account_id": joana, "type": "evp"});
        let mut registered = 0;
        for answer in post_four_on_each([a.addr, b.addr], "/v1/pix/keys", &wallet, key).await {
            match answer {
                (201, _) => registered += 1,
                (422, v) if v["code"] == "key_limit" => {}
                (status, v) => panic!("unexpected answer {status}: {v}"),
            }
        }
        assert_eq!(registered, 5, "five keys for a person's account");
    });
    let (ok, report) = a.verify();
    assert!(ok, "{report}");
}

#[test]
fn postgres_outage_answers_503_then_recovers_losing_nothing() {
    let url = store::testing::fresh_postgres_database();
    let rt = runtime();
    let (switch, proxied) = rt.block_on(proxied_postgres(&url));
    let dir = temp_dir("outage");
    let server = Server::start(&dir, Some(&proxied));
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "outage").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let w = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let before = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 10});
        assert_eq!(c.post("/v1/transfers", &key, &before).await.unwrap().status, 201);

        // PostgreSQL goes away: existing connections are cut and new ones refused.
        switch.cut();
        let during = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 20});
        let r = c.post("/v1/transfers", &key, &during).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(r.headers.get("retry-after").is_some(), "503 without Retry-After");
        assert_eq!(r.json()["code"], "unavailable");
        let r = c.get("/readyz", &key).await.unwrap();
        assert_eq!(r.status, 503);

        // It comes back: the same request now succeeds, exactly once.
        switch.restore();
        let mut status = 0;
        for _ in 0..100 {
            status = c.post("/v1/transfers", &key, &during).await.unwrap().status.as_u16();
            if status == 201 {
                break;
            }
            assert_eq!(status, 503);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 201, "no recovery after PostgreSQL returned");
        assert_eq!(c.post("/v1/transfers", &key, &during).await.unwrap().status, 200);
        assert_eq!(balance(&mut c, &key, &w).await["credits_posted"], 30);
    });
}

/// PostgreSQL ends every connection of the node (as when it restarts) while they sit idle: the
/// writer finds its connection closed only when it begins the next batch, and begins it again on a
/// new one, so the first transfer after is applied, not refused. (Before, every request of that
/// batch got 503.)
#[test]
fn connections_postgres_ended_while_idle_cost_no_request_a_503() {
    let url = store::testing::fresh_postgres_database();
    let dir = temp_dir("ended");
    let server = Server::start(&dir, Some(&url));
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "ended").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let w = account(&mut c, &key, json!({"currency": "BRL"})).await;
        for round in 0..3 {
            let transfer = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 10});
            assert_eq!(c.post("/v1/transfers", &key, &transfer).await.unwrap().status, 201, "round {round}");
            let ended = tokio::task::block_in_place(|| {
                let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                let rows = admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'rtpay'",
                        &[],
                    )
                    .unwrap();
                rows.len()
            });
            assert!(ended >= 1, "the node's connections are ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let transfer = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 1});
            let r = c.post("/v1/transfers", &key, &transfer).await.unwrap();
            assert_eq!(r.status, 201, "round {round}: {:?}", r.json());
        }
        assert_eq!(balance(&mut c, &key, &w).await["credits_posted"], 33);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// A database whose `bytea_output` is the legacy `escape`: each connection of rtpay's sets its
/// own to hex, so the writer reads the audit frontier it stored and writes go on after the first
/// audit entry. (Before, every batch after it failed with a 500.)
#[test]
fn a_database_that_escapes_bytea_output_is_written_all_the_same() {
    let url = store::testing::fresh_postgres_database();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let db: String = admin.query_one("SELECT current_database()", &[]).unwrap().get(0);
    admin.batch_execute(&format!("ALTER DATABASE \"{db}\" SET bytea_output = 'escape'")).unwrap();
    drop(admin);
    let dir = temp_dir("escaped");
    let server = Server::start(&dir, Some(&url));
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "escaped").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let w = account(&mut c, &key, json!({"currency": "BRL"})).await;
        for _ in 0..3 {
            let transfer = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 5});
            let r = c.post("/v1/transfers", &key, &transfer).await.unwrap();
            assert_eq!(r.status, 201, "{:?}", r.json());
        }
        assert_eq!(balance(&mut c, &key, &w).await["credits_posted"], 15);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// An off-us Pix whose node is killed while the SPI has it: the other node, once the payment's SPI
/// time-out and the sweep's margin have passed, asks the SPI what became of it and records the
/// verdict, the hold posted.
#[test]
fn an_off_us_pix_left_in_flight_by_a_dead_node_is_settled_by_another() {
    const ISPB: &str = "12345678";
    // The SPI answers after 3 s, past the 1 s time-out: the payment is in flight when its node is
    // killed, and settled when a sweep asks, 6 s after it was made.
    let args = ["--ispb", ISPB, "--spi-latency-ms", "3000", "--spi-timeout-ms", "1000"];
    let (mut a, b) = two_nodes("spi-node", &args);
    let rt = runtime();
    let (key, maria, id) = rt.block_on(async {
        let mut c = a.client();
        let (_, key) = tenant(&mut c, "wallet").await;
        let body = json!({"kind": "person", "name": "Maria", "document": "52998224725"});
        let h = c.post("/v1/holders", &key, &body).await.unwrap().json()["id"].clone();
        let maria = account(&mut c, &key, json!({"currency": "BRL", "holder_id": h})).await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let fund = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": maria, "amount": 100_000});
        assert_eq!(c.post("/v1/transfers", &key, &fund).await.unwrap().status, 201);
        let pay = json!({"id": uuid(), "debit_account_id": maria, "amount": 30_000, "creditor": {
            "ispb": "60701190", "branch": "0001", "account": "123456", "account_type": "CACC",
            "document": "111.444.777-35", "name": "Joana Prado"}});
        let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("processing")), "{:?}", r.json());
        (key, maria, pay["id"].as_str().unwrap().to_owned())
    });
    a.kill9();
    rt.block_on(async {
        let mut c = b.client();
        let mut done = Value::Null;
        for _ in 0..400 {
            done = c.get(&format!("/v1/pix/payments/{id}"), &key).await.unwrap().json();
            if done["status"] != json!("processing") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(done["status"], json!("completed"), "{done}");
        let b = balance(&mut c, &key, &maria).await;
        assert_eq!((b["debits_pending"].clone(), b["debits_posted"].clone()), (json!(0), json!(30_000)), "{b}");
    });
    let (ok, report) = b.verify();
    assert!(ok, "{report}");
}
