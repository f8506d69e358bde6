//! Proof that nothing leaks: card numbers, CPFs, API and OAuth secrets go through the routes,
//! good requests and bad, and afterwards the server's debug log, the data directory and a backup
//! are scanned for them in clear — a Luhn scan for 13–19 digit runs, and the literal values.

mod common;

use bytes::Bytes;
use common::*;
use hyper::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PANS: [&str; 4] = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"];
const CPFS: [&str; 2] = ["52998224725", "11144477735"];

/// Every 13–19 digit run passing Luhn in `bytes` (written here, independent of the server's).
fn luhn_runs(bytes: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            i += 1;
            continue;
        }
        let run = &bytes[start..i];
        for len in 13..=run.len().min(19) {
            for w in run.windows(len) {
                let sum: u32 = w
                    .iter()
                    .rev()
                    .enumerate()
                    .map(|(k, d)| {
                        let d = u32::from(d - b'0');
                        if k % 2 == 1 {
                            (d * 2) % 10 + (d * 2) / 10
                        } else {
                            d
                        }
                    })
                    .sum();
                if sum.is_multiple_of(10) {
                    found.push(String::from_utf8_lossy(w).into_owned());
                }
            }
        }
    }
    found
}

fn scan(what: &str, bytes: &[u8], literals: &[String]) -> Vec<String> {
    let mut problems: Vec<String> =
        luhn_runs(bytes).into_iter().map(|r| format!("{what}: card-like number {r}")).collect();
    for lit in literals {
        if bytes.windows(lit.len()).any(|w| w == lit.as_bytes()) {
            problems.push(format!("{what}: {lit}"));
        }
    }
    problems
}

#[test]
fn no_card_number_document_or_secret_is_found_in_logs_storage_or_backups() {
    let dir = temp_dir("leaks");
    let log = temp_dir("leaks-log").join("server.log");
    let mut server =
        Server::start_logged(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"], Some(&log));
    let iso = server.iso8583.expect("the card listener");
    let mut secrets: Vec<String> = vec![OPERATOR.to_owned()];
    let mut issued: Vec<String> = Vec::new();
    let mut responses: Vec<Bytes> = Vec::new();
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_id, key) = tenant(&mut c, "leaks").await;
        secrets.push(key.clone());
        let r = c.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &json!({})).await.unwrap();
        let revoked = r.json()["secret"].as_str().unwrap().to_owned();
        let revoked_id = r.json()["id"].as_str().unwrap().to_owned();
        secrets.push(revoked.clone());
        c.send(Method::DELETE, &format!("/v1/tenants/{tenant_id}/api-keys/{revoked_id}"), Some(OPERATOR), None).await.unwrap();
        let account_id = account(&mut c, &key, json!({"currency": "BRL"})).await;
        // Scoped keys, and card numbers where a scope or a holder id belongs.
        let r = c.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &json!({"scopes": ["accounts:read"]})).await.unwrap();
        secrets.push(r.json()["secret"].as_str().unwrap().to_owned());
        let r = c.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &json!({"scopes": [PANS[3]]})).await.unwrap();
        assert_eq!(r.status, 422);
        responses.push(r.body);
        let r = c.post("/v1/accounts", &key, &json!({"currency": "BRL", "holder_id": PANS[3]})).await.unwrap();
        assert_eq!(r.status, 422);
        responses.push(r.body);
        responses.push(c.send(Method::DELETE, &format!("/v1/oauth-clients/{}", PANS[3]), Some(&key), None).await.unwrap().body);

        let client = c.post("/v1/oauth-clients", &key, &json!({"scopes": ["accounts:read", "holders:write"]})).await.unwrap().json();
        let (client_id, client_secret) =
            (client["client_id"].as_str().unwrap().to_owned(), client["client_secret"].as_str().unwrap().to_owned());
        secrets.push(client_secret.clone());
        let form = |secret: &str| Bytes::from(format!("grant_type=client_credentials&client_id={client_id}&client_secret={secret}"));
        let form_type = [("content-type", "application/x-www-form-urlencoded")];
        let r = c.send_with_headers(Method::POST, "/oauth/token", None, Some(form(&client_secret)), &form_type).await.unwrap();
        let access = r.json()["access_token"].as_str().unwrap().to_owned();
        secrets.push(access.clone());
        let r = c.send_with_headers(Method::POST, "/oauth/token", None, Some(form(PANS[0])), &form_type).await.unwrap();
        responses.push(r.body);

        // Documents through the vault, good and bad.
        for (i, cpf) in CPFS.iter().enumerate() {
            let r = c
                .post("/v1/holders", &access, &json!({"kind": "person", "name": format!("Holder {i}"), "document": cpf}))
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{:?}", r.json());
            responses.push(r.body);
        }
        for body in [
            json!({"kind": "person", "name": "dup", "document": CPFS[0]}),
            json!({"kind": "person", "name": "x", "document": PANS[0]}),
            json!({"kind": "company", "name": PANS[1], "document": CPFS[1]}),
        ] {
            responses.push(c.post("/v1/holders", &key, &body).await.unwrap().body);
        }

        // Card numbers in every place bad input can carry them.
        let pan = PANS[2];
        let bad_bodies = [
            format!(r#"{{"id":"{pan}","debit_account_id":"{account_id}","credit_account_id":"{account_id}","amount":1}}"#),
            format!(r#"{{"id":"{}","debit_account_id":"{account_id}","credit_account_id":"{account_id}","amount":"{pan}"}}"#, uuid()),
            format!(r#"{{"id":"{}","amount":{pan}0000000000}}"#, uuid()),
            format!(r#"{{"{pan}":1}}"#),
            format!(r#"{{"id": {pan}"#),
            format!("\u{0}{pan}"),
        ];
        for body in bad_bodies {
            let r = c.send(Method::POST, "/v1/transfers", Some(&key), Some(Bytes::from(body))).await.unwrap();
            assert!(r.status.is_client_error(), "{}", r.status);
            responses.push(r.body);
        }
        for path in [
            format!("/v1/accounts/{pan}"),
            format!("/v1/accounts/{pan}/close"),
            format!("/v1/transfers/{pan}/post"),
            format!("/v1/holders/{pan}"),
            format!("/v1/accounts/{account_id}/transfers?cursor={pan}"),
            format!("/v1/audit?after={pan}"),
        ] {
            for method in [Method::GET, Method::POST] {
                let r = c.send(method, &path, Some(&key), Some(Bytes::from_static(b"{}"))).await.unwrap();
                responses.push(r.body);
            }
        }
        let r = c
            .send_with_headers(Method::POST, "/v1/accounts", Some(&key), Some(Bytes::from_static(b"{\"currency\":\"BRL\"}")), &[
                ("x-request-id", PANS[0]),
                ("idempotency-key", PANS[1]),
            ])
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        assert_ne!(r.headers.get("x-request-id").unwrap(), PANS[0], "a card-like request id is replaced");
        // Printed in groups, with dashes or underscores.
        for id in ["4111_1111_1111_1111", "3782_822463_10005", "5555-5555-5555-4444"] {
            let r = c
                .send_with_headers(Method::GET, &format!("/v1/accounts/{account_id}"), Some(&key), None, &[("x-request-id", id)])
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert_ne!(r.headers.get("x-request-id").unwrap(), id, "a card number with separators is replaced");
        }
        for id in ["order_2024-0001", "20240601-093015-000042", "0190a9c0-1234-7000-8000-123456789012"] {
            let r = c
                .send_with_headers(Method::GET, &format!("/v1/accounts/{account_id}"), Some(&key), None, &[("x-request-id", id)])
                .await
                .unwrap();
            assert_eq!(r.headers.get("x-request-id").unwrap(), id, "an ordinary id is kept");
        }
        // Secrets where they do not belong.
        for token in [revoked.as_str(), client_secret.as_str(), PANS[0]] {
            responses.push(c.get(&format!("/v1/accounts/{account_id}"), token).await.unwrap().body);
        }
        responses.push(c.post("/v1/tenants", &key, &json!({"name": "x"})).await.unwrap().body);
        // A secret pasted where a name belongs: a query parameter's name, or a body's key, even
        // one that starts like a name and goes on past a backtick (serde quotes the key whole, up
        // to its own "`, expected"). Refused, and not echoed.
        let keyed = |name: String| {
            let mut body = serde_json::Map::new();
            body.insert("currency".into(), json!("BRL"));
            body.insert(name, json!(1));
            Bytes::from(serde_json::to_vec(&body).unwrap())
        };
        for (path, body) in [
            (format!("/v1/accounts/{account_id}/transfers?{key}=1"), None),
            (format!("/v1/accounts/{account_id}/transfers?limit=2&{revoked}"), None),
            ("/v1/accounts".to_owned(), Some(keyed(format!("holder`{key}")))),
            ("/v1/accounts".to_owned(), Some(keyed(format!("x`, expected `a` or `b`{key}")))),
            ("/v1/accounts".to_owned(), Some(keyed(format!("{key} at line 1 column 2")))),
            (
                "/v1/accounts".to_owned(),
                Some(Bytes::from(format!(r#"{{"currency":"BRL","metadata":{{"{key}":{{"a":1,"a":2}}}}}}"#))),
            ),
        ] {
            let method = if body.is_some() { Method::POST } else { Method::GET };
            let r = c.send(method, &path, Some(&key), body).await.unwrap();
            let text = String::from_utf8_lossy(&r.body).into_owned();
            assert_eq!(r.status, 422, "{path}: {text}");
            assert!(text.contains("unknown_") || text.contains("duplicate_field"), "{path}: {text}");
            assert!(!text.contains(&key) && !text.contains(&revoked), "{path}: {text}");
        }

        // The card flows: a card issued and revealed, then the network's messages — approved,
        // declined, malformed — all carrying its number.
        let body = json!({"name": "Leak", "bin": "45454545", "currency": "BRL", "network": "visa"});
        let product = c.post("/v1/card-products", &key, &body).await.unwrap().json()["id"].as_str().unwrap().to_owned();
        let funded = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let body = json!({"account_id": funded, "product_id": product, "type": "virtual"});
        let card = c.post("/v1/cards", &key, &body).await.unwrap().json()["id"].as_str().unwrap().to_owned();
        let revealed = c.post(&format!("/v1/cards/{card}/reveal"), &key, &json!({})).await.unwrap().json();
        let pan = revealed["number"].as_str().unwrap().to_owned();
        issued.push(pan.clone());
        let expiry = revealed["expiry"].as_str().unwrap();
        let yymm = format!("{}{}", &expiry[3..], &expiry[..2]);
        let mut net = tokio::net::TcpStream::connect(iso).await.unwrap();
        let mut frames = Vec::new();
        for (stan, amount) in [(1, "000000000100"), (2, "999999999999")] {
            let mut m = cards::iso8583::Message::new("0100");
            m.set(2, pan.as_str()).set(3, "000000").set(4, amount).set(11, format!("{stan:06}"));
            // DE37 is alphanumeric: a digits-only RRN beside a binary column can read as a 13-digit run
            // to the Luhn scan, a false alarm that is not card data.
            m.set(14, yymm.as_str()).set(37, format!("LEAK{stan:08}")).set(49, "986").set(45, format!("B{pan}^TRACK"));
            frames.push(m.encode().unwrap());
        }
        frames.push(format!("0100F0000000000000001{pan}").into_bytes()); // truncated after the PAN
        for frame in &frames {
            net.write_all(&cards::iso8583::frame(frame)).await.unwrap();
            let mut len = [0u8; 2];
            net.read_exact(&mut len).await.unwrap();
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            net.read_exact(&mut answer).await.unwrap();
            let mut answer = cards::iso8583::Message::decode(&answer).unwrap();
            // The network's own number comes back in DE2, as networks expect; nowhere else. (The
            // answer's fixed numeric fields run together, so the Luhn scan does not apply to it.)
            answer.remove(2);
            assert!(answer.get(45).is_none(), "track data is never echoed");
            let wire = answer.encode().unwrap();
            assert!(!wire.windows(pan.len()).any(|w| w == pan.as_bytes()), "{answer:?}");
        }
    });
    server.stop();

    // A backup, as an operator would take it.
    let backup = dir.join("backup.db");
    rusqlite::Connection::open(dir.join("rtpay.db"))
        .unwrap()
        .execute_batch(&format!("VACUUM INTO '{}'", backup.display()))
        .unwrap();

    let mut literals = secrets.clone();
    literals.extend(issued.iter().cloned());
    literals.extend(PANS.iter().map(|p| p.to_string()));
    literals.extend(CPFS.iter().map(|c| c.to_string()));
    let mut problems = Vec::new();
    let log_text = std::fs::read(&log).unwrap();
    assert!(log_text.len() > 1000, "the debug log was written");
    problems.extend(scan("server log", &log_text, &literals));
    // Key files are hex (digit runs are chance, not card data) and are secrets kept apart from
    // backups; everything else in the data directory is scanned.
    let key_files = ["audit-signing-key", "kek", "index-key", "secret-key", "operator-token"];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_file() && !key_files.contains(&name.as_str()) {
            problems.extend(scan(&path.display().to_string(), &std::fs::read(&path).unwrap(), &literals));
        }
    }
    // Answers to bad input never echo card numbers or documents (secrets shown once are not here).
    let mut pans_and_documents: Vec<String> = PANS.iter().map(|p| p.to_string()).collect();
    pans_and_documents.extend(CPFS.iter().map(|c| c.to_string()));
    for (i, body) in responses.iter().enumerate() {
        problems.extend(scan(&format!("response {i}"), body, &pans_and_documents));
    }
    assert!(problems.is_empty(), "found in clear:\n{}", problems.join("\n"));
}

/// The Pix flows carry documents and keys everywhere: holders, CPF and e-mail keys, look-ups,
/// payments by key and to other institutions, charges with a debtor's CPF, Pix arriving with the
/// payer's CPF, refunds, MED, webhooks — and bad input naming them. None may be found in clear in
/// the debug log or the data directory afterwards.
#[test]
fn no_document_or_key_of_the_pix_flows_is_found_in_logs_or_storage() {
    const EMAIL_KEY: &str = "maria.leak@example.com";
    const CNPJ: &str = "11222333000181";
    let dir = temp_dir("leaks-pix");
    let log = temp_dir("leaks-pix-log").join("server.log");
    let mut server = Server::start_logged(&dir, None, "127.0.0.1:0", true, &["--ispb", "12345678"], Some(&log));
    let mut bad_answers: Vec<Bytes> = Vec::new();
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "pix leaks").await;
        let mut holder_account = async |kind: &str, doc: &str, funds: u64| {
            let r = c.post("/v1/holders", &key, &json!({"kind": kind, "name": "Maria Quitéria", "document": doc})).await.unwrap();
            let holder = r.json()["id"].as_str().unwrap().to_owned();
            let acct = account(&mut c, &key, json!({"currency": "BRL", "holder_id": holder})).await;
            if funds > 0 {
                let funding = account(&mut c, &key, json!({"currency": "BRL"})).await;
                let t = json!({"id": uuid(), "debit_account_id": funding, "credit_account_id": acct, "amount": funds});
                assert_eq!(c.post("/v1/transfers", &key, &t).await.unwrap().status, 201);
            }
            acct
        };
        let maria = holder_account("person", CPFS[0], 1_000_000).await;
        let acme = holder_account("company", CNPJ, 0).await;
        let mut post = async |path: &str, body: serde_json::Value| c.post(path, &key, &body).await.unwrap();
        assert_eq!(post("/v1/pix/keys", json!({"account_id": maria, "type": "cpf", "key": CPFS[0]})).await.status, 201);
        assert_eq!(post("/v1/pix/keys", json!({"account_id": maria, "type": "email", "key": EMAIL_KEY})).await.status, 201);
        assert_eq!(post("/v1/pix/keys", json!({"account_id": acme, "type": "cnpj", "key": CNPJ})).await.status, 201);
        // Bad input naming documents and keys.
        for (path, body) in [
            ("/v1/pix/keys", json!({"account_id": maria, "type": "cpf", "key": CPFS[1]})),
            ("/v1/pix/keys", json!({"account_id": acme, "type": "email", "key": EMAIL_KEY})),
            ("/v1/pix/payments", json!({"id": uuid(), "debit_account_id": maria, "amount": 1, "key": CPFS[1]})),
            ("/v1/sandbox/spi/incoming", json!({"amount": 1, "key": CPFS[1], "payer": {"ispb": "60701190", "name": "x", "document": CPFS[1]}})),
        ] {
            let r = post(path, body).await;
            assert!(r.status.is_client_error(), "{path}: {:?}", r.json());
            bad_answers.push(r.body);
        }
        // Money moving with documents on both sides.
        let pay = post("/v1/pix/payments", json!({"id": uuid(), "debit_account_id": maria, "amount": 5_000, "key": CNPJ})).await;
        assert_eq!(pay.json()["status"], json!("completed"));
        let off_us = json!({"id": uuid(), "debit_account_id": maria, "amount": 100, "creditor": {"ispb": "60701190",
            "branch": "1", "account": "99", "account_type": "CACC", "document": CPFS[1], "name": "Joana Prado"}});
        assert_eq!(post("/v1/pix/payments", off_us).await.status, 201);
        let incoming = json!({"amount": 7_000, "key": EMAIL_KEY, "payer": {"ispb": "60701190", "name": "Joana", "document": CPFS[1]}});
        let r = post("/v1/sandbox/spi/incoming", incoming).await;
        assert_eq!(r.status, 201);
        let e2e = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
        let r = c.get(&format!("/v1/pix/keys/{EMAIL_KEY}?payer_account_id={acme}"), &key).await.unwrap();
        assert_eq!(r.status, 200);
        // A charge with the debtor's CPF, on the CPF key; its webhook; a refund; a MED claim.
        let cob = json!({"valor": {"original": "12.00"}, "chave": CPFS[0], "devedor": {"cpf": CPFS[1], "nome": "Joana"}});
        let r = c.send(Method::PUT, "/api/v2/cob/leaksTxid000000000000000000001", Some(&key), Some(serde_json::to_vec(&cob).unwrap().into())).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let hook = json!({"webhookUrl": "https://hooks.example.com/pix-events"});
        let r = c.send(Method::PUT, &format!("/api/v2/webhook/{}", CPFS[0]), Some(&key), Some(serde_json::to_vec(&hook).unwrap().into())).await.unwrap();
        assert_eq!(r.status, 200);
        let r = c.send(Method::PUT, &format!("/api/v2/pix/{e2e}/devolucao/D1"), Some(&key), Some(serde_json::to_vec(&json!({"valor": "1.00"})).unwrap().into())).await.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(c.post("/v1/pix/med", &key, &json!({"end_to_end_id": e2e, "reason": "golpe"})).await.unwrap().status, 201);
        let bad_cob = json!({"valor": {"original": "1.00"}, "chave": CPFS[1], "devedor": {"cpf": CPFS[1], "nome": "x"}});
        let r = c.send(Method::PUT, "/api/v2/cob/leaksTxid000000000000000000002", Some(&key), Some(serde_json::to_vec(&bad_cob).unwrap().into())).await.unwrap();
        assert_eq!(r.status, 400);
        bad_answers.push(r.body);
    });
    server.stop();

    let mut literals: Vec<String> = CPFS.iter().map(|c| c.to_string()).collect();
    literals.extend([EMAIL_KEY.to_owned(), CNPJ.to_owned()]);
    // Literal values only: EndToEndIds and amounts are long digit runs a card-number scan would
    // flag (that scan runs over the card flows above).
    let literal_hits = |what: &str, bytes: &[u8]| -> Vec<String> {
        literals
            .iter()
            .filter(|l| bytes.windows(l.len()).any(|w| w == l.as_bytes()))
            .map(|l| format!("{what}: {l}"))
            .collect()
    };
    let mut problems = literal_hits("server log", &std::fs::read(&log).unwrap());
    let key_files = ["audit-signing-key", "kek", "index-key", "secret-key", "operator-token"];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_file() && !key_files.contains(&name.as_str()) {
            problems.extend(literal_hits(&path.display().to_string(), &std::fs::read(&path).unwrap()));
        }
    }
    for (i, body) in bad_answers.iter().enumerate() {
        problems.extend(literal_hits(&format!("answer to bad input {i}"), body));
    }
    assert!(problems.is_empty(), "found in clear:\n{}", problems.join("\n"));
}
