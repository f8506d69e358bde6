//! Pix end to end over HTTP against a real `rtpay serve --ispb`: keys (DICT) with their rules,
//! look-ups and their rate limit, BR Codes and their images, on-us payments by key, by BR Code and
//! by account, idempotency, rejections that move nothing, and the ledger's invariants after it all.

mod common;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

const ISPB: &str = "12345678";
const CPF_MARIA: &str = "52998224725";
const CPF_OTHER: &str = "11144477735";
const CNPJ_ACME: &str = "11222333000181";

/// Registers an `evp` key for `account` under an Idempotency-Key.
async fn evp_under(c: &mut rtpay::client::Client, key: &str, account: &str, idem: &str) -> rtpay::client::Response {
    let body = serde_json::to_vec(&json!({"account_id": account, "type": "evp"})).unwrap();
    c.send_with_headers(Method::POST, "/v1/pix/keys", Some(key), Some(body.into()), &[("idempotency-key", idem)])
        .await
        .unwrap()
}

struct Party {
    key: String,
    holder: String,
    account: String,
}

/// A holder with a BRL wallet (never negative) funded with `funds` centavos from a tenant's
/// funding account.
async fn party(c: &mut rtpay::client::Client, key: &str, kind: &str, name: &str, doc: &str, funds: u64) -> Party {
    party_of(c, key, json!({"kind": kind, "name": name, "document": doc}), funds).await
}

/// As [`party`], the holder made from `holder` (`POST /v1/holders`'s body).
async fn party_of(c: &mut rtpay::client::Client, key: &str, holder: Value, funds: u64) -> Party {
    let r = c.post("/v1/holders", key, &holder).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let holder = r.json()["id"].as_str().unwrap().to_owned();
    let wallet = account(
        c,
        key,
        json!({"currency": "BRL", "holder_id": holder, "flags": {"debits_must_not_exceed_credits": true}}),
    )
    .await;
    if funds > 0 {
        let funding = account(c, key, json!({"currency": "BRL"})).await;
        let r = c
            .post(
                "/v1/transfers",
                key,
                &json!({"id": uuid(), "debit_account_id": funding, "credit_account_id": wallet, "amount": funds}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
    }
    Party { key: key.to_owned(), holder, account: wallet }
}

async fn register(c: &mut rtpay::client::Client, p: &Party, kind: &str, key: Option<&str>) -> rtpay::client::Response {
    let mut body = json!({"account_id": p.account, "type": kind});
    if let Some(k) = key {
        body["key"] = json!(k);
    }
    c.post("/v1/pix/keys", &p.key, &body).await.unwrap()
}

/// Sets a holder's Pix limits (`PUT /v1/holders/{id}/pix-limits`).
async fn set_limits(c: &mut rtpay::client::Client, key: &str, p: &Party, limits: Value) {
    let path = format!("/v1/holders/{}/pix-limits", p.holder);
    let r = c.send(Method::PUT, &path, Some(key), Some(serde_json::to_vec(&limits).unwrap().into())).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
}

/// The payment `id` once it is no longer `processing` (or as it is after 20 s).
async fn concluded(c: &mut rtpay::client::Client, key: &str, id: &str) -> Value {
    let mut payment = Value::Null;
    for _ in 0..400 {
        payment = c.get(&format!("/v1/pix/payments/{id}"), key).await.unwrap().json();
        if payment["status"] != json!("processing") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    payment
}

async fn available(c: &mut rtpay::client::Client, p: &Party) -> i64 {
    balance(c, &p.key, &p.account).await["available"].as_i64().unwrap()
}

/// Sends `body` as a payment over four connections at once.
async fn futures_join(addr: std::net::SocketAddr, key: String, body: Value) -> Vec<(u16, Value)> {
    send_at_once(addr, key, vec![body; 4]).await
}

/// Sends each of `bodies` as a payment, each over its own connection, all at once; the answers
/// in the order of `bodies`.
async fn send_at_once(addr: std::net::SocketAddr, key: String, bodies: Vec<Value>) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let key = key.clone();
            tokio::spawn(async move {
                let r = rtpay::client::Client::new(addr).post("/v1/pix/payments", &key, &body).await.unwrap();
                (r.status.as_u16(), r.json())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn problem(r: &rtpay::client::Response) -> (u16, Value, Value) {
    let v = r.json();
    (r.status.as_u16(), v["code"].clone(), v["field"].clone())
}

#[test]
fn keys_brcodes_and_on_us_payments() {
    let dir = temp_dir("pix");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, key_a) = tenant(&mut c, "wallet a").await;
        let (_, key_b) = tenant(&mut c, "shop b").await;
        let maria = party(&mut c, &key_a, "person", "Maria Quitéria de Jesus", CPF_MARIA, 500_000).await;
        let acme = party(&mut c, &key_b, "company", "ACME Comércio Ltda", CNPJ_ACME, 0).await;
        let other = party(&mut c, &key_a, "person", "João da Silva", CPF_OTHER, 0).await;

        // Keys: each type's rules, ownership of document keys, uniqueness across tenants.
        let r = register(&mut c, &maria, "cpf", Some("529.982.247-25")).await;
        assert_eq!((r.status.as_u16(), r.json()["key"].clone()), (201, json!(CPF_MARIA)), "{:?}", r.json());
        let r = register(&mut c, &maria, "email", Some("Maria@Example.com")).await;
        assert_eq!((r.status.as_u16(), r.json()["key"].clone()), (201, json!("maria@example.com")));
        let r = register(&mut c, &maria, "evp", None).await;
        assert_eq!(r.status, 201);
        let evp = r.json()["key"].as_str().unwrap().to_owned();
        assert_eq!((evp.len(), &evp[14..15]), (36, "4"), "a version 4 UUID");
        let r = register(&mut c, &acme, "cnpj", Some(CNPJ_ACME)).await;
        assert_eq!(r.status, 201, "{:?}", r.json());
        let r = register(&mut c, &acme, "phone", Some("+55 11 98765-4321")).await;
        assert_eq!((r.status.as_u16(), r.json()["key"].clone()), (201, json!("+5511987654321")));
        for (p, kind, key, status, code, field) in [
            (&maria, "cpf", Some(CPF_OTHER), 422, "key_not_owned", "key"),
            (&maria, "cnpj", Some(CNPJ_ACME), 422, "key_not_owned", "key"),
            (&maria, "cpf", Some("52998224724"), 422, "invalid_key", "key"),
            (&maria, "email", Some("maria@@example.com"), 422, "invalid_key", "key"),
            (&maria, "phone", Some("+14155550100"), 422, "invalid_key", "key"),
            (&maria, "evp", Some("123e4567-e89b-42d3-a456-426614174000"), 422, "invalid_key", "key"),
            (&maria, "email", None, 422, "missing_field", "key"),
            (&maria, "iban", Some("x"), 422, "invalid_key_type", "type"),
            // Keys are unique across the whole directory, tenants included.
            (&acme, "email", Some("maria@example.com"), 409, "key_exists", "key"),
            (&maria, "phone", Some("+5511987654321"), 409, "key_exists", "key"),
        ] {
            let r = register(&mut c, p, kind, key).await;
            assert_eq!(problem(&r), (status, json!(code), json!(field)), "{kind} {key:?}: {:?}", r.json());
        }
        // Five keys at most for a person's account.
        for n in 0..2 {
            assert_eq!(register(&mut c, &maria, "email", Some(&format!("m{n}@example.com"))).await.status, 201);
        }
        let r = register(&mut c, &maria, "evp", None).await;
        assert_eq!(problem(&r), (422, json!("key_limit"), json!("account_id")));
        // A registration repeated (the key is this account's already, as this type): 200, the same
        // key, at the account's limit too. An `evp` under an Idempotency-Key is the same random key.
        let r = register(&mut c, &maria, "email", Some("MARIA@example.com")).await;
        assert_eq!((r.status.as_u16(), r.json()["key"].clone()), (200, json!("maria@example.com")), "{:?}", r.json());
        let first = evp_under(&mut c, &key_a, &other.account, "evp-once").await;
        assert_eq!(first.status, 201, "{:?}", first.json());
        let again = evp_under(&mut c, &key_a, &other.account, "evp-once").await;
        assert_eq!((again.status.as_u16(), again.json()), (200, first.json()));
        // Another key under the same Idempotency-Key: a conflict naming the header.
        let body =
            serde_json::to_vec(&json!({"account_id": other.account, "type": "email", "key": "joao@example.com"}))
                .unwrap();
        let r = c
            .send_with_headers(
                Method::POST,
                "/v1/pix/keys",
                Some(&key_a),
                Some(body.into()),
                &[("idempotency-key", "evp-once")],
            )
            .await
            .unwrap();
        assert_eq!(problem(&r), (409, json!("exists_with_different_fields"), json!("Idempotency-Key")));
        let another = evp_under(&mut c, &key_a, &other.account, "evp-twice").await;
        assert_eq!(another.status, 201);
        assert_ne!(another.json()["key"], first.json()["key"]);
        // Another tenant's account is not found.
        let r = c.post("/v1/pix/keys", &key_b, &json!({"account_id": maria.account, "type": "evp"})).await.unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_account"), json!("account_id")));

        // Look-up: the owner as others see them (names of persons masked, documents masked).
        let r =
            c.get(&format!("/v1/pix/keys/maria@example.com?payer_account_id={}", acme.account), &key_b).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let v = r.json();
        assert_eq!(v["owner"]["name"], json!("Maria Q. d. J."));
        assert_eq!(v["owner"]["document"], json!("***.982.247-**"));
        assert_eq!((v["account"]["ispb"].clone(), v["type"].clone()), (json!(ISPB), json!("email")));
        assert!(!String::from_utf8_lossy(&r.body).contains(CPF_MARIA));
        let r = c.get(&format!("/v1/pix/keys/{CNPJ_ACME}?payer_account_id={}", maria.account), &key_a).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["owner"]["name"].clone()), (200, json!("ACME Comércio Ltda")));
        let r = c.get("/v1/pix/keys/maria@example.com", &key_b).await.unwrap();
        assert_eq!(problem(&r), (422, json!("missing_field"), json!("payer_account_id")));

        // Payments on us, by key: the money moves in the ledger, exactly once.
        let pay = json!({"id": uuid(), "debit_account_id": maria.account, "amount": 12_345, "key": "+5511987654321",
                         "description": "pão de queijo"});
        let r = c.post("/v1/pix/payments", &key_a, &pay).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let paid = r.json();
        assert_eq!(paid["status"], json!("completed"));
        let e2e = paid["end_to_end_id"].as_str().unwrap().to_owned();
        assert_eq!((e2e.len(), &e2e[..9]), (32, format!("E{ISPB}").as_str()));
        assert!(e2e[21..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(paid["creditor"]["name"], json!("ACME Comércio Ltda"));
        assert_eq!(available(&mut c, &maria).await, 500_000 - 12_345);
        assert_eq!(available(&mut c, &acme).await, 12_345);
        let again = c.post("/v1/pix/payments", &key_a, &pay).await.unwrap();
        assert_eq!((again.status.as_u16(), again.json()), (200, paid.clone()), "a repeat answers the first outcome");
        let mut changed = pay.clone();
        changed["amount"] = json!(1);
        let r = c.post("/v1/pix/payments", &key_a, &changed).await.unwrap();
        assert_eq!(problem(&r), (409, json!("exists_with_different_fields"), json!("id")));
        assert_eq!(available(&mut c, &maria).await, 500_000 - 12_345, "nothing moved twice");
        let r = c.get(&format!("/v1/pix/payments/{}", pay["id"].as_str().unwrap()), &key_a).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()), (200, paid.clone()));
        let r = c.get(&format!("/v1/pix/payments/{}", pay["id"].as_str().unwrap()), &key_b).await.unwrap();
        assert_eq!(r.status, 404, "another tenant's payment");

        // The same payment sent four times at once: it moves money once, and every answer says so.
        let twin = json!({"id": uuid(), "debit_account_id": maria.account, "amount": 1_000, "key": CNPJ_ACME});
        let before = available(&mut c, &maria).await;
        let answers = futures_join(server.addr, key_a.clone(), twin).await;
        for (status, body) in &answers {
            assert!(matches!(status, 200 | 201), "{status} {body}");
            assert_eq!(body["status"], json!("completed"), "{body}");
        }
        assert!(answers.iter().filter(|(s, _)| *s == 201).count() >= 1);
        assert_eq!(available(&mut c, &maria).await, before - 1_000, "moved once");
        assert_eq!(available(&mut c, &acme).await, 12_345 + 1_000);

        // BR Codes: encode a static code for a key, decode it, render it, pay it.
        let r = c
            .post(
                "/v1/pix/brcode",
                &key_a,
                &json!({"key": evp, "amount": 2_500, "merchant_name": "Maria Q", "merchant_city": "SAO PAULO",
                        "txid": "PEDIDO42"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let encoded = r.json();
        let payload = encoded["payload"].as_str().unwrap().to_owned();
        assert!(payload.starts_with("000201") && payload.contains("br.gov.bcb.pix") && payload.contains(&evp));
        let r = c.post("/v1/pix/brcode/decode", &key_b, &json!({"payload": payload})).await.unwrap();
        let v = r.json();
        assert_eq!(
            (r.status.as_u16(), v["key"].clone(), v["amount"].clone(), v["txid"].clone(), v["type"].clone()),
            (200, json!(evp), json!(2_500), json!("PEDIDO42"), json!("static"))
        );
        let png = c.get(encoded["png"].as_str().unwrap(), &key_a).await.unwrap();
        assert_eq!(png.status, 200);
        assert_eq!(png.headers["content-type"], "image/png");
        assert_eq!(&png.body[..8], b"\x89PNG\r\n\x1a\n");
        let svg = c.get(encoded["svg"].as_str().unwrap(), &key_a).await.unwrap();
        assert_eq!((svg.status.as_u16(), svg.headers["content-type"].to_str().unwrap()), (200, "image/svg+xml"));
        assert!(String::from_utf8_lossy(&svg.body).contains("<svg"));
        let mut broken = payload.clone();
        broken.replace_range(broken.len() - 4.., "0000");
        let r = c.post("/v1/pix/brcode/decode", &key_b, &json!({"payload": broken})).await.unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_brcode"), json!("payload")));
        assert!(r.json()["detail"].as_str().unwrap().contains("field 63"), "{:?}", r.json());
        let r = c
            .post(
                "/v1/pix/brcode",
                &key_a,
                &json!({"key": evp, "merchant_name": "A name that is much too long", "merchant_city": "X"}),
            )
            .await
            .unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_brcode"), json!("merchant_name")));

        let by_code = json!({"id": uuid(), "debit_account_id": acme.account, "amount": 2_500, "brcode": payload});
        let r = c.post("/v1/pix/payments", &key_b, &by_code).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        assert_eq!(
            (r.json()["status"].clone(), r.json()["initiation"].clone(), r.json()["txid"].clone()),
            (json!("completed"), json!("brcode"), json!("PEDIDO42"))
        );
        assert_eq!(available(&mut c, &acme).await, 12_345 + 1_000 - 2_500);
        let wrong_amount = json!({"id": uuid(), "debit_account_id": acme.account, "amount": 2_400, "brcode": payload});
        let r = c.post("/v1/pix/payments", &key_b, &wrong_amount).await.unwrap();
        assert_eq!(problem(&r), (422, json!("amount_mismatch"), json!("amount")));

        // By account (manual), within this institution: the document given must be the
        // account holder's (a mistyped account pays no one), and must be one.
        let mut manual = json!({"id": uuid(), "debit_account_id": maria.account, "amount": 100, "creditor": {
            "ispb": ISPB, "branch": "0001", "account": other.account, "account_type": "CACC",
            "document": CPF_MARIA, "name": "João da Silva"}});
        let r = c.post("/v1/pix/payments", &key_a, &manual).await.unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_creditor"), json!("creditor")));
        manual["creditor"]["document"] = json!("x");
        let r = c.post("/v1/pix/payments", &key_a, &manual).await.unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_creditor"), json!("creditor")));
        assert_eq!(available(&mut c, &other).await, 0, "nothing moved");
        manual["creditor"]["document"] = json!(CPF_OTHER);
        manual["id"] = json!(uuid());
        let r = c.post("/v1/pix/payments", &key_a, &manual).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("completed")), "{:?}", r.json());
        assert_eq!(available(&mut c, &other).await, 100);

        // Rejections move no money: no funds (a ledger outcome kept for the id), bad input.
        let broke = json!({"id": uuid(), "debit_account_id": other.account, "amount": 101, "key": CPF_MARIA});
        let r = c.post("/v1/pix/payments", &key_a, &broke).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        assert_eq!(
            (r.json()["status"].clone(), r.json()["reason"].clone()),
            (json!("rejected"), json!("insufficient_funds"))
        );
        assert_eq!(available(&mut c, &other).await, 100);
        for (body, code, field) in [
            (
                json!({"id": uuid(), "debit_account_id": maria.account, "amount": 0, "key": CNPJ_ACME}),
                "invalid_amount",
                "amount",
            ),
            (
                json!({"id": "nope", "debit_account_id": maria.account, "amount": 1, "key": CNPJ_ACME}),
                "invalid_uuid",
                "id",
            ),
            (json!({"id": uuid(), "debit_account_id": maria.account, "amount": 1}), "invalid_creditor", "key"),
            (
                json!({"id": uuid(), "debit_account_id": maria.account, "amount": 1, "key": "nobody@example.com"}),
                "key_not_found",
                "key",
            ),
            (
                json!({"id": uuid(), "debit_account_id": maria.account, "amount": 1, "key": "maria@example.com"}),
                "same_account",
                "debit_account_id",
            ),
            (
                json!({"id": uuid(), "debit_account_id": acme.account, "amount": 1, "key": CPF_MARIA}),
                "invalid_account",
                "debit_account_id",
            ),
        ] {
            let r = c.post("/v1/pix/payments", &key_a, &body).await.unwrap();
            assert_eq!(problem(&r), (422, json!(code), json!(field)), "{body}: {:?}", r.json());
        }
        assert_eq!(available(&mut c, &maria).await, 500_000 - 12_345 - 1_000 - 100 + 2_500);

        // Deleting a key frees it; another tenant cannot delete it.
        let r = c.send(Method::DELETE, "/v1/pix/keys/+5511987654321", Some(&key_a), None).await.unwrap();
        assert_eq!(r.status, 404);
        let r = c.send(Method::DELETE, "/v1/pix/keys/+5511987654321", Some(&key_b), None).await.unwrap();
        assert_eq!(r.status, 204);
        let r =
            c.get(&format!("/v1/pix/keys/+5511987654321?payer_account_id={}", maria.account), &key_a).await.unwrap();
        assert_eq!(problem(&r).0, 404);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

#[test]
fn dict_lookups_are_rate_limited_per_payer() {
    let dir = temp_dir("pix-dict");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let payer = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 1_000).await;
        let other = party(&mut c, &key, "person", "João da Silva", CPF_OTHER, 0).await;
        assert_eq!(register(&mut c, &other, "email", Some("joao@example.com")).await.status, 201);
        let look = |who: &Party, k: &str| format!("/v1/pix/keys/{k}?payer_account_id={}", who.account);
        // A person's bucket holds 100 tokens; a found key costs 1, a miss 20; a payment by key is a
        // look-up too, and a settled one gives its token back.
        for _ in 0..10 {
            assert_eq!(c.get(&look(&payer, "joao@example.com"), &key).await.unwrap().status, 200);
        }
        for n in 0..4 {
            let r = c.get(&look(&payer, &format!("miss{n}@example.com")), &key).await.unwrap();
            assert_eq!(r.status, 404, "tokens left before miss {n}");
        }
        for _ in 0..7 {
            assert_eq!(c.get(&look(&payer, "joao@example.com"), &key).await.unwrap().status, 200);
        }
        // Three tokens left. A settled payment by key takes one and gives it back.
        let pay = || json!({"id": uuid(), "debit_account_id": payer.account, "amount": 10, "key": "joao@example.com"});
        let r = c.post("/v1/pix/payments", &key, &pay()).await.unwrap();
        assert_eq!(r.json()["status"], json!("completed"), "{:?}", r.json());
        // Payments that do not settle pay for their look-ups: three tokens, three of them.
        for _ in 0..3 {
            let big =
                json!({"id": uuid(), "debit_account_id": payer.account, "amount": 5_000, "key": "joao@example.com"});
            let r = c.post("/v1/pix/payments", &key, &big).await.unwrap();
            assert_eq!(r.json()["status"], json!("rejected"), "{:?}", r.json());
        }
        let r = c.get(&look(&payer, "joao@example.com"), &key).await.unwrap();
        assert_eq!(problem(&r), (429, json!("dict_rate_limited"), Value::Null), "{:?}", r.json());
        assert_eq!(r.headers["retry-after"], "30");
        let r = c.post("/v1/pix/payments", &key, &pay()).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.json()["code"].clone()),
            (429, json!("dict_rate_limited")),
            "payments by key too"
        );
        assert_eq!(available(&mut c, &payer).await, 1_000 - 10, "the refused payment moved nothing");
        // The bucket is the payer's: another payer still looks up.
        assert_eq!(c.get(&look(&other, "joao@example.com"), &key).await.unwrap().status, 200);
    });
}

#[test]
fn payments_in_flight_at_once_cannot_look_up_more_keys_than_the_payer_has_tokens() {
    let dir = temp_dir("pix-dict-concurrent");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        // A company: no limits by default, so its payments run side by side (no holder lock).
        let payer = party(&mut c, &key, "company", "ACME", CNPJ_ACME, 1_000).await;
        let other = party(&mut c, &key, "person", "João da Silva", CPF_OTHER, 0).await;
        assert_eq!(register(&mut c, &other, "email", Some("joao@example.com")).await.status, 201);
        let look = |k: &str| format!("/v1/pix/keys/{k}?payer_account_id={}", payer.account);
        // 1,000 tokens: 49 misses (20 each) and 17 found leave 3.
        for n in 0..49 {
            assert_eq!(c.get(&look(&format!("miss{n}@example.com")), &key).await.unwrap().status, 404);
        }
        for _ in 0..17 {
            assert_eq!(c.get(&look("joao@example.com"), &key).await.unwrap().status, 200);
        }
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let (addr, key, account) = (server.addr, key.clone(), payer.account.clone());
            tasks.push(tokio::spawn(async move {
                let big =
                    json!({"id": uuid(), "debit_account_id": account, "amount": 5_000, "key": "joao@example.com"});
                let r = rtpay::client::Client::new(addr).post("/v1/pix/payments", &key, &big).await.unwrap();
                (r.status.as_u16(), r.json())
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            match t.await.unwrap() {
                (201, v) if v["status"] == json!("rejected") => admitted += 1,
                (429, v) if v["code"] == json!("dict_rate_limited") => {}
                other => panic!("{other:?}"),
            }
        }
        // Never more than the tokens (a look-up charged a moment before its payment lets go of its
        // token can make one request wait for nothing: fewer is possible, more is not).
        assert!((1..=3).contains(&admitted), "{admitted} look-ups on three tokens");
        // Each one admitted was charged: the tokens left are the ones no payment took.
        for _ in admitted..3 {
            assert_eq!(c.get(&look("joao@example.com"), &key).await.unwrap().status, 200);
        }
        assert_eq!(c.get(&look("joao@example.com"), &key).await.unwrap().status, 429, "all charged");
    });
}

/// The São Paulo hour now (UTC−3, no daylight saving time since 2019).
fn sao_paulo_hour() -> u64 {
    (store::now_nanos() / 1_000_000_000 - 3 * 3600) % 86_400 / 3600
}

/// An off-us payment the SPI rejects gives back to the payer's totals what it counted when it was
/// made, whichever node records the verdict: here a node whose night it is (`--pix-night`) records
/// the rejection of a payment made by day on a node whose night is hours away. (Before, it took the
/// amount off tonight's total as well, which the payment had never counted in, and the night then
/// admitted that much more than its limit.)
#[test]
fn a_rejection_gives_back_what_its_payment_counted_whatever_the_recording_nodes_night() {
    let hour = sao_paulo_hour();
    let night_now = format!("{hour}-{}", (hour + 2) % 24);
    let night_later = format!("{}-{}", (hour + 4) % 24, (hour + 6) % 24);
    // The SPI rejects everything, and answers after the payment's 1 s time-out: the payment is in
    // flight when its node is killed, and the other node's sweep records the rejection.
    let spi = ["--ispb", ISPB, "--spi-latency-ms", "3000", "--spi-timeout-ms", "1000", "--spi-reject-percent", "100"];
    let url = store::testing::fresh_postgres_database();
    let (dir_a, dir_b) = (temp_dir("night-a"), temp_dir("night-b"));
    let args_a = [&spi[..], &["--pix-night", &night_later]].concat();
    let mut a = Server::start_with_args(&dir_a, Some(&url), "127.0.0.1:0", true, &args_a);
    for file in ["kek", "index-key", "audit-signing-key"] {
        std::fs::copy(dir_a.join(file), dir_b.join(file)).unwrap();
    }
    let args_b = [&spi[..], &["--pix-night", &night_now]].concat();
    let b = Server::start_with_args(&dir_b, Some(&url), "127.0.0.1:0", true, &args_b);
    let rt = runtime();
    let (key, maria, id) = rt.block_on(async {
        let mut c = a.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 1_000_000).await;
        let acme = party(&mut c, &key, "company", "ACME", CNPJ_ACME, 0).await;
        assert_eq!(register(&mut c, &acme, "cnpj", Some(CNPJ_ACME)).await.status, 201);
        let pay = json!({"id": uuid(), "debit_account_id": maria.account, "amount": 30_000, "creditor": {
            "ispb": "60701190", "branch": "0001", "account": "123456", "account_type": "CACC",
            "document": "111.444.777-35", "name": "Joana Prado"}});
        let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("processing")), "{:?}", r.json());
        (key, maria, pay["id"].as_str().unwrap().to_owned())
    });
    a.kill9();
    rt.block_on(async {
        let mut c = b.client();
        let done = concluded(&mut c, &key, &id).await;
        assert_eq!(done["status"], json!("rejected"), "{done}");
        assert_eq!(available(&mut c, &maria).await, 1_000_000, "the hold is released");
        // Tonight's total counted nothing of it: R$1,000 (a person's night limit) and no more.
        let pay =
            |amount: u64| json!({"id": uuid(), "debit_account_id": maria.account, "amount": amount, "key": CNPJ_ACME});
        let r = c.post("/v1/pix/payments", &key, &pay(100_000)).await.unwrap();
        assert_eq!(r.json()["status"], json!("completed"), "{:?}", r.json());
        let r = c.post("/v1/pix/payments", &key, &pay(30_000)).await.unwrap();
        assert_eq!(
            (r.json()["status"].clone(), r.json()["reason"].clone()),
            (json!("rejected"), json!("limit_exceeded"))
        );
        assert_eq!(available(&mut c, &maria).await, 900_000);
    });
    let (ok, report) = b.verify();
    assert!(ok, "{report}");
}

#[test]
fn limits_by_day_and_by_night() {
    let hour = sao_paulo_hour();
    // One server whose night is now, one whose night is hours away.
    let night_now = format!("{hour}-{}", (hour + 2) % 24);
    let night_later = format!("{}-{}", (hour + 4) % 24, (hour + 6) % 24);
    let rt = runtime();
    for (window, is_night) in [(night_now, true), (night_later, false)] {
        let dir = temp_dir("pix-limits");
        let server =
            Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--pix-night", &window]);
        rt.block_on(async {
            let mut c = server.client();
            let (_, key) = tenant(&mut c, "t").await;
            let (_, key_other) = tenant(&mut c, "other").await;
            let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 1_000_000).await;
            let acme = party(&mut c, &key, "company", "ACME", CNPJ_ACME, 0).await;
            assert_eq!(register(&mut c, &acme, "cnpj", Some(CNPJ_ACME)).await.status, 201);
            let path = format!("/v1/holders/{}/pix-limits", maria.holder);
            let r = c.get(&path, &key).await.unwrap();
            assert_eq!(r.status, 200, "{:?}", r.json());
            assert_eq!(
                r.json()["limits"],
                json!({"per_transaction": null, "daily": null, "nightly": 100_000, "night_per_transaction": 100_000}),
                "a person's defaults: R$1,000 at night"
            );
            let r = c.get(&format!("/v1/holders/{}/pix-limits", acme.holder), &key).await.unwrap();
            assert_eq!(r.json()["limits"]["nightly"], Value::Null, "companies have no default");
            assert_eq!(c.get(&path, &key_other).await.unwrap().status, 404, "another tenant's holder");

            let pay = |amount: u64| json!({"id": uuid(), "debit_account_id": maria.account, "amount": amount, "key": CNPJ_ACME});
            let r = c.post("/v1/pix/payments", &key, &pay(100_001)).await.unwrap();
            assert_eq!(r.status, 201, "{:?}", r.json());
            if is_night {
                assert_eq!((r.json()["status"].clone(), r.json()["reason"].clone()), (json!("rejected"), json!("limit_exceeded")));
                assert!(r.json()["reason_detail"].as_str().unwrap().contains("R$1000.00"), "{:?}", r.json());
                assert_eq!(available(&mut c, &maria).await, 1_000_000, "nothing moved");
                // Within the per-transaction cap, up to the night's total.
                let r = c.post("/v1/pix/payments", &key, &pay(60_000)).await.unwrap();
                assert_eq!(r.json()["status"], json!("completed"));
                let r = c.post("/v1/pix/payments", &key, &pay(50_000)).await.unwrap();
                assert_eq!((r.json()["status"].clone(), r.json()["reason"].clone()), (json!("rejected"), json!("limit_exceeded")));
                assert_eq!(available(&mut c, &maria).await, 1_000_000 - 60_000);
                // Four at once, 15,000 each, with 40,000 of the night left: two pass, never three.
                let tasks: Vec<_> = (0..4)
                    .map(|_| {
                        let (addr, key, body) = (server.addr, key.clone(), pay(15_000));
                        tokio::spawn(async move {
                            rtpay::client::Client::new(addr).post("/v1/pix/payments", &key, &body).await.unwrap().json()
                        })
                    })
                    .collect();
                let mut completed = 0;
                for t in tasks {
                    if t.await.unwrap()["status"] == json!("completed") {
                        completed += 1;
                    }
                }
                assert_eq!(completed, 2, "the night's total holds under concurrent payments");
                assert_eq!(available(&mut c, &maria).await, 1_000_000 - 60_000 - 30_000);
            } else {
                assert_eq!(r.json()["status"], json!("completed"), "no night limit by day");
                assert_eq!(available(&mut c, &maria).await, 1_000_000 - 100_001);
            }

            // Lowering applies at once; raising waits 24 hours.
            let r = c
                .send(
                    Method::PUT,
                    &path,
                    Some(&key),
                    Some(serde_json::to_vec(&json!({"per_transaction": 20_000, "daily": 300_000, "nightly": 500_000,
                        "night_per_transaction": 10_000})).unwrap().into()),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{:?}", r.json());
            let v = r.json();
            assert_eq!(
                v["limits"],
                json!({"per_transaction": 20_000, "daily": 300_000, "nightly": 100_000, "night_per_transaction": 10_000})
            );
            assert_eq!(v["pending"]["limits"]["nightly"], json!(500_000));
            assert!(v["pending"]["effective_at"].as_str().is_some());
            let r = c.post("/v1/pix/payments", &key, &pay(20_001)).await.unwrap();
            assert_eq!((r.json()["status"].clone(), r.json()["reason"].clone()), (json!("rejected"), json!("limit_exceeded")));
            assert!(r.json()["reason_detail"].as_str().unwrap().contains("R$200.00"), "{:?}", r.json());
            let r = c.get(&path, &key).await.unwrap();
            assert_eq!(r.json()["limits"]["per_transaction"], json!(20_000), "kept");

            for (body, field) in [
                (json!({"per_transaction": 0}), "per_transaction"),
                (json!({"daily": 1_000_000_000_000u64}), "daily"),
                (json!({"weekly": 5}), "weekly"),
                (json!({"nightly": "100.00"}), "nightly"),
            ] {
                let r = c
                    .send(Method::PUT, &path, Some(&key), Some(serde_json::to_vec(&body).unwrap().into()))
                    .await
                    .unwrap();
                assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{body}");
            }
            let r = c.get(&path, &key).await.unwrap();
            assert_eq!(r.json()["limits"]["per_transaction"], json!(20_000), "bad input changed nothing");
        });
        let (ok, report) = server.verify();
        assert!(ok, "{report}");
    }
}

/// A payer's running totals are its tenant's: another tenant's holder under the same id (holder
/// ids are the tenants' to choose) neither spends them nor adds to them. (They were named by the
/// holder alone, and one tenant's customer spent another's limit.)
#[test]
fn holders_of_two_tenants_under_one_id_keep_their_own_totals() {
    let rt = runtime();
    let dir = temp_dir("pix-limits-tenants");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, a) = tenant(&mut c, "a").await;
        let (_, b) = tenant(&mut c, "b").await;
        let payee = party(&mut c, &a, "company", "ACME", CNPJ_ACME, 0).await;
        assert_eq!(register(&mut c, &payee, "cnpj", Some(CNPJ_ACME)).await.status, 201);
        let holder = uuid();
        let body = json!({"id": holder, "kind": "person", "name": "Maria Quitéria", "document": CPF_MARIA});
        let (in_a, in_b) = (party_of(&mut c, &a, body.clone(), 100_000).await, party_of(&mut c, &b, body, 100_000).await);
        assert_eq!((in_a.holder.as_str(), in_b.holder.as_str()), (holder.as_str(), holder.as_str()));
        for (key, payer) in [(&a, &in_a), (&b, &in_b)] {
            // Lowered, so at once: R$300 a day.
            set_limits(&mut c, key, payer, json!({"daily": 30_000})).await;
        }
        let pay = |payer: &Party, amount: u64| json!({"id": uuid(), "debit_account_id": payer.account, "amount": amount, "key": CNPJ_ACME});
        let status = |r: rtpay::client::Response| {
            let v = r.json();
            (v["status"].clone(), v["reason"].clone())
        };
        let completed = (json!("completed"), Value::Null);
        let over = (json!("rejected"), json!("limit_exceeded"));
        assert_eq!(status(c.post("/v1/pix/payments", &b, &pay(&in_b, 25_000)).await.unwrap()), completed);
        assert_eq!(
            status(c.post("/v1/pix/payments", &a, &pay(&in_a, 30_000)).await.unwrap()),
            completed,
            "tenant a's customer has its whole day left"
        );
        assert_eq!(status(c.post("/v1/pix/payments", &a, &pay(&in_a, 1)).await.unwrap()), over, "and spent it");
        assert_eq!(
            status(c.post("/v1/pix/payments", &b, &pay(&in_b, 5_000)).await.unwrap()),
            completed,
            "tenant b's customer has its own 5,000 left"
        );
        assert_eq!(status(c.post("/v1/pix/payments", &b, &pay(&in_b, 1)).await.unwrap()), over);
        assert_eq!((available(&mut c, &in_a).await, available(&mut c, &in_b).await), (70_000, 70_000));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// A request that opens its tenant's Pix settlement account on its way is recorded once, with its
/// own outcome: the account is a step of the request. (It was recorded through the request's
/// entry, as `created`, and the request's own commit recorded the request again.)
#[test]
fn a_request_opening_the_settlement_account_is_audited_once() {
    let dir = temp_dir("pix-settlement-audit");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 0).await;
        assert_eq!(register(&mut c, &maria, "email", Some("maria@example.com")).await.status, 201);
        let incoming = json!({"end_to_end_id": "E6070119020261201120000000000002", "amount": 100,
            "key": "maria@example.com", "payer": {"ispb": "60701190", "name": "Joana Prado", "document": CPF_OTHER}});
        let r = c.post("/v1/sandbox/spi/incoming", &key, &incoming).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let audit = c.get("/v1/audit?limit=1000", &key).await.unwrap().json();
        let recorded: Vec<_> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == json!("POST /v1/sandbox/spi/incoming"))
            .map(|e| e["outcome"].clone())
            .collect();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        // The settlement account the money came from stays open: closed, every later incoming
        // Pix would be refused.
        let moves = c.get(&format!("/v1/accounts/{}/transfers", maria.account), &key).await.unwrap().json();
        let settlement = moves["data"][0]["debit_account_id"].as_str().unwrap().to_owned();
        let r = c.post(&format!("/v1/accounts/{settlement}/close"), &key, &json!({})).await.unwrap();
        assert_eq!(problem(&r), (422, json!("rail_account"), json!("id")));
        let incoming = json!({"end_to_end_id": "E6070119020261201120000000000003", "amount": 100,
            "key": "maria@example.com", "payer": {"ispb": "60701190", "name": "Joana Prado", "document": CPF_OTHER}});
        assert_eq!(c.post("/v1/sandbox/spi/incoming", &key, &incoming).await.unwrap().status, 201);
        assert_eq!(available(&mut c, &maria).await, 200);
    });
}

/// Polls a payment until it leaves `processing`.
async fn settled(c: &mut rtpay::client::Client, key: &str, id: &str) -> Value {
    settled_within(c, key, id, std::time::Duration::from_secs(5)).await
}

async fn settled_within(c: &mut rtpay::client::Client, key: &str, id: &str, wait: std::time::Duration) -> Value {
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        let r = c.get(&format!("/v1/pix/payments/{id}"), key).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        if r.json()["status"] != json!("processing") {
            return r.json();
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("payment {id} still processing");
}

fn off_us(debit: &str, amount: u64) -> Value {
    json!({"id": uuid(), "debit_account_id": debit, "amount": amount, "description": "aluguel", "creditor": {
        "ispb": "60701190", "branch": "0001", "account": "123456", "account_type": "CACC",
        "document": "111.444.777-35", "name": "Joana Prado"}})
}

#[test]
fn off_us_payments_through_the_sandbox_spi() {
    let rt = runtime();
    // Accepted: the hold is posted to the tenant's settlement account.
    let dir = temp_dir("pix-spi");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--spi-latency-ms", "100"]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let pay = off_us(&maria.account, 30_000);
        let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let v = r.json();
        assert_eq!((v["status"].clone(), v["creditor"]["ispb"].clone()), (json!("processing"), json!("60701190")));
        assert_eq!(v["creditor"]["name"], json!("Joana P."));
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["available"].clone()), (json!(30_000), json!(70_000)), "held");
        let done = settled(&mut c, &key, pay["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], json!("completed"), "{done}");
        assert_eq!(done["end_to_end_id"], v["end_to_end_id"]);
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["debits_posted"].clone()), (json!(0), json!(30_000)));
        let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (200, json!("completed")), "a repeat");
        // A creditor the SPI would refuse outright.
        let mut bad = off_us(&maria.account, 1);
        bad["creditor"]["document"] = json!("11144477734");
        let r = c.post("/v1/pix/payments", &key, &bad).await.unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_document"), json!("creditor.document")));
        bad = off_us(&maria.account, 1);
        bad["creditor"]["branch"] = json!("12345");
        let r = c.post("/v1/pix/payments", &key, &bad).await.unwrap();
        assert_eq!(problem(&r), (422, json!("invalid_branch"), json!("creditor.branch")));

        // Pix arriving from another institution, to a key and to an account, once per EndToEndId.
        assert_eq!(register(&mut c, &maria, "email", Some("maria@example.com")).await.status, 201);
        let incoming = json!({"end_to_end_id": "E6070119020261201120000000000001", "amount": 5_000,
            "key": "maria@example.com", "payer": {"ispb": "60701190", "name": "Joana Prado", "document": CPF_OTHER}});
        let r = c.post("/v1/sandbox/spi/incoming", &key, &incoming).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        assert_eq!((r.json()["credit_account_id"].clone(), r.json()["payer"]["document"].clone()), (json!(maria.account), json!("***.444.777-**")));
        let r = c.post("/v1/sandbox/spi/incoming", &key, &incoming).await.unwrap();
        assert_eq!(r.status, 200, "the same EndToEndId again");
        let mut other = incoming.clone();
        other["amount"] = json!(5_001);
        let r = c.post("/v1/sandbox/spi/incoming", &key, &other).await.unwrap();
        assert_eq!(problem(&r), (409, json!("exists_with_different_fields"), json!("end_to_end_id")));
        // Nor another payer, or another receiver, under the same EndToEndId.
        let mut other = incoming.clone();
        other["payer"]["name"] = json!("Outra Pessoa");
        let r = c.post("/v1/sandbox/spi/incoming", &key, &other).await.unwrap();
        assert_eq!(problem(&r), (409, json!("exists_with_different_fields"), json!("end_to_end_id")));
        let mut other = incoming.clone();
        other.as_object_mut().unwrap().remove("key");
        other["account_id"] = json!(maria.account);
        let r = c.post("/v1/sandbox/spi/incoming", &key, &other).await.unwrap();
        assert_eq!(problem(&r), (409, json!("exists_with_different_fields"), json!("end_to_end_id")));
        assert_eq!(available(&mut c, &maria).await, 70_000 + 5_000, "credited once");
        let to_account = json!({"amount": 1, "account_id": maria.account,
            "payer": {"ispb": "60701190", "name": "ACME", "document": CNPJ_ACME}});
        assert_eq!(c.post("/v1/sandbox/spi/incoming", &key, &to_account).await.unwrap().status, 201);
        for (body, code, field) in [
            (json!({"amount": 1, "account_id": maria.account, "payer": {"ispb": ISPB, "name": "x", "document": CPF_OTHER}}), "invalid_ispb", "payer.ispb"),
            (json!({"amount": 0, "account_id": maria.account, "payer": {"ispb": "60701190", "name": "x", "document": CPF_OTHER}}), "invalid_amount", "amount"),
            (json!({"end_to_end_id": "E123", "amount": 1, "account_id": maria.account, "payer": {"ispb": "60701190", "name": "x", "document": CPF_OTHER}}), "invalid_end_to_end_id", "end_to_end_id"),
            // Another institution's ISPB than the payer's; a date that does not exist; the future.
            (json!({"end_to_end_id": "E0000000020261201120000000000009", "amount": 1, "account_id": maria.account, "payer": {"ispb": "60701190", "name": "x", "document": CPF_OTHER}}), "invalid_end_to_end_id", "end_to_end_id"),
            (json!({"end_to_end_id": "E6070119020260231120000000000009", "amount": 1, "account_id": maria.account, "payer": {"ispb": "60701190", "name": "x", "document": CPF_OTHER}}), "invalid_end_to_end_id", "end_to_end_id"),
            (json!({"end_to_end_id": "E6070119021991231120000000000009", "amount": 1, "account_id": maria.account, "payer": {"ispb": "60701190", "name": "x", "document": CPF_OTHER}}), "invalid_end_to_end_id", "end_to_end_id"),
            (json!({"amount": 1, "key": "nobody@example.com", "payer": {"ispb": "60701190", "name": "x", "document": CPF_OTHER}}), "key_not_found", "key"),
        ] {
            let r = c.post("/v1/sandbox/spi/incoming", &key, &body).await.unwrap();
            assert_eq!(problem(&r), (422, json!(code), json!(field)), "{body}");
        }
        assert_eq!(available(&mut c, &maria).await, 75_001);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    drop(server);

    // Rejected: the hold is voided and the limit given back.
    let dir = temp_dir("pix-spi-reject");
    let server =
        Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--spi-reject-percent", "100"]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let pay = off_us(&maria.account, 30_000);
        assert_eq!(c.post("/v1/pix/payments", &key, &pay).await.unwrap().status, 201);
        let done = settled(&mut c, &key, pay["id"].as_str().unwrap()).await;
        assert_eq!((done["status"].clone(), done["reason"].clone()), (json!("rejected"), json!("AC03")), "{done}");
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!(
            (b["debits_pending"].clone(), b["debits_posted"].clone(), b["available"].clone()),
            (json!(0), json!(0), json!(100_000))
        );
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    drop(server);

    // Never answered: five time-outs in a row open the breaker (503); the SPI, asked, never
    // received them, which is final once a sweep is due (5 s past the time-out): rejected, AB03.
    let dir = temp_dir("pix-spi-timeout");
    let server = Server::start_with_args(
        &dir,
        None,
        "127.0.0.1:0",
        true,
        &["--ispb", ISPB, "--spi-timeout-percent", "100", "--spi-timeout-ms", "1000"],
    );
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let mut sent = Vec::new();
        for n in 0..5 {
            let pay = off_us(&maria.account, 1_000);
            let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
            assert_eq!(r.status, 201, "payment {n}: {:?}", r.json());
            sent.push(pay["id"].as_str().unwrap().to_owned());
        }
        tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
        let r = c.post("/v1/pix/payments", &key, &off_us(&maria.account, 1_000)).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (503, json!("unavailable")), "{:?}", r.json());
        assert!(r.headers.contains_key("retry-after"));
        let processing = c.get(&format!("/v1/pix/payments/{}", sent[0]), &key).await.unwrap().json();
        assert_eq!(processing["status"], json!("processing"), "not rejected before a sweep is due: {processing}");
        assert_eq!(available(&mut c, &maria).await, 100_000 - 5 * 1_000, "held while the SPI may have them");
        for id in &sent {
            let done = settled_within(&mut c, &key, id, std::time::Duration::from_secs(15)).await;
            assert_eq!((done["status"].clone(), done["reason"].clone()), (json!("rejected"), json!("AB03")), "{done}");
        }
        assert_eq!(available(&mut c, &maria).await, 100_000, "every hold released");
        // On-us payments do not go through the SPI and keep working.
        let other = party(&mut c, &key, "person", "João", CPF_OTHER, 0).await;
        assert_eq!(register(&mut c, &other, "cpf", Some(CPF_OTHER)).await.status, 201);
        let r = c
            .post(
                "/v1/pix/payments",
                &key,
                &json!({"id": uuid(), "debit_account_id": maria.account, "amount": 10, "key": CPF_OTHER}),
            )
            .await
            .unwrap();
        assert_eq!(r.json()["status"], json!("completed"));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// The same off-us payment of a payer without limits sent four times at once, over two HTTP
/// threads, many times: one request creates it (201), the others answer it (200), and it is held
/// once and settled at once, sent by the request whose commit created it.
#[test]
fn twin_off_us_payments_are_sent_by_the_request_that_created_them() {
    let rt = runtime();
    let dir = temp_dir("pix-spi-twins");
    let args = ["--ispb", ISPB, "--spi-latency-ms", "20", "--http-threads", "2"];
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &args);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "company", "ACME", CNPJ_ACME, 100_000).await;
        // No limits: a payer whose totals are not counted pays without the per-payer lock, so
        // twins race each other to the writer.
        let none = json!({"per_transaction": null, "daily": null, "nightly": null, "night_per_transaction": null});
        set_limits(&mut c, &key, &maria, none).await;
        const ROUNDS: i64 = 30;
        for round in 0..ROUNDS {
            let pay = off_us(&maria.account, 100);
            let answers = futures_join(server.addr, key.clone(), pay.clone()).await;
            for (status, body) in &answers {
                assert!(matches!(status, 200 | 201), "round {round}: {status} {body}");
            }
            assert_eq!(answers.iter().filter(|(s, _)| *s == 201).count(), 1, "round {round}: {answers:?}");
            let done = settled(&mut c, &key, pay["id"].as_str().unwrap()).await;
            assert_eq!((done["status"].clone(), done["reason"].clone()), (json!("completed"), Value::Null), "{done}");
        }
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!(
            (b["debits_pending"].clone(), b["debits_posted"].clone()),
            (json!(0), json!(ROUNDS * 100)),
            "each payment held and posted once"
        );
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// One payment id sent at once with two bodies (amounts 100 and 200, twice each), over two HTTP
/// threads, many times, by a payer without daily limits (no per-payer lock: the requests race to
/// the writer), first with no limit at all, then with a limit per payment of 150 (the body of 200
/// is refused, and its refusal is stored as the payment if it commits first): one request creates
/// the payment (201); its twins answer it (200); the others are refused (409) and change nothing,
/// neither the money nor the payment as stored (before, a loser that reached the writer in the
/// same batch overwrote the payment's document as `rejected` and answered 201).
#[test]
fn one_payment_id_with_two_bodies_at_once_is_created_once_and_the_other_body_refused() {
    let rt = runtime();
    let dir = temp_dir("pix-id-bodies");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--http-threads", "2"]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let payer = party(&mut c, &key, "company", "ACME", CNPJ_ACME, 1_000_000).await;
        let payee = party(&mut c, &key, "person", "João", CPF_OTHER, 0).await;
        assert_eq!(register(&mut c, &payee, "cpf", Some(CPF_OTHER)).await.status, 201);
        let mut moved = 0;
        for round in 0..60 {
            if round % 30 == 0 {
                let per_transaction = if round == 0 { Value::Null } else { json!(150) };
                let limits = json!({"per_transaction": per_transaction, "daily": null, "nightly": null,
                    "night_per_transaction": null});
                set_limits(&mut c, &key, &payer, limits).await;
            }
            let id = uuid();
            let amounts = [100, 200, 100, 200];
            let bodies = amounts
                .iter()
                .map(|amount| json!({"id": id, "debit_account_id": payer.account, "amount": amount, "key": CPF_OTHER}))
                .collect();
            let sent = send_at_once(server.addr, key.clone(), bodies).await;
            let answers: Vec<_> =
                amounts.into_iter().zip(sent).map(|(amount, (status, body))| (amount, status, body)).collect();
            let created: Vec<_> = answers.iter().filter(|(_, status, _)| *status == 201).collect();
            assert_eq!(created.len(), 1, "round {round}: {answers:?}");
            let (amount, _, body) = created[0];
            let refused = round >= 30 && *amount == 200;
            let expected =
                if refused { (json!("rejected"), json!("limit_exceeded")) } else { (json!("completed"), Value::Null) };
            assert_eq!((body["status"].clone(), body["reason"].clone()), expected, "round {round}: {body}");
            assert_eq!(body["amount"], json!(amount), "round {round}");
            for (a, status, answer) in &answers {
                match (a == amount, status) {
                    (true, 200 | 201) => assert_eq!(answer, body, "round {round}: a twin answers the payment"),
                    (false, 409) => assert_eq!(answer["code"], json!("exists_with_different_fields"), "round {round}"),
                    _ => panic!("round {round}: {answers:?}"),
                }
            }
            let stored = c.get(&format!("/v1/pix/payments/{id}"), &key).await.unwrap().json();
            assert_eq!(&stored, body, "round {round}: the payment as stored");
            if !refused {
                moved += amount;
            }
        }
        assert_eq!(available(&mut c, &payee).await, moved, "each payment moved once, with its creator's amount");
        assert_eq!(available(&mut c, &payer).await, 1_000_000 - moved);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// A payment's id is the payer's tenant's to choose: two tenants may pay one tenant's account
/// under one id, and that tenant may use the id for a payment of its own. Each moves its own
/// money (before, a later tenant's payment met the first's transfer into the payee's tenant and
/// was rejected, `exists_with_different_fields`, whatever its amount; and the payee's tenant's own
/// off-us payment under the id could not post its hold).
#[test]
fn tenants_paying_one_tenant_under_one_payment_id_each_move_their_money() {
    let rt = runtime();
    let dir = temp_dir("pix-shared-id");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--spi-latency-ms", "50"]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let payee = party(&mut c, &shop, "person", "João", CPF_OTHER, 0).await;
        assert_eq!(register(&mut c, &payee, "cpf", Some(CPF_OTHER)).await.status, 201);
        let shop_payer = party(&mut c, &shop, "company", "Loja", CNPJ_ACME, 10_000).await;
        let id = uuid();
        let mut payers = Vec::new();
        // The same amount as an earlier payment under the id, and another.
        for (name, amount) in [("a", 100), ("b", 100), ("c", 250)] {
            let (_, key) = tenant(&mut c, name).await;
            let payer = party(&mut c, &key, "company", "ACME", CNPJ_ACME, 1_000).await;
            let body = json!({"id": id, "debit_account_id": payer.account, "amount": amount, "key": CPF_OTHER});
            let r = c.post("/v1/pix/payments", &key, &body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("completed")), "{:?}", r.json());
            payers.push((payer, amount));
        }
        for (payer, amount) in &payers {
            assert_eq!(available(&mut c, payer).await, 1_000 - amount);
        }
        assert_eq!(available(&mut c, &payee).await, 450, "every payment reached the payee");
        let listed = c.get(&format!("/v1/accounts/{}/transfers", payee.account), &shop).await.unwrap();
        assert_eq!(listed.status, 200, "{:?}", listed.json());
        let amounts: Vec<_> = listed.json()["data"].as_array().unwrap().iter().map(|t| t["amount"].clone()).collect();
        assert_eq!(amounts, [json!(250), json!(100), json!(100)], "a transfer to the payee each, newest first");

        // The payee's tenant pays out under the same id: its hold is posted on the SPI's answer.
        let mut pay = off_us(&shop_payer.account, 700);
        pay["id"] = json!(id);
        let r = c.post("/v1/pix/payments", &shop, &pay).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let done = settled(&mut c, &shop, &id).await;
        assert_eq!(done["status"], json!("completed"), "{done}");
        let b = balance(&mut c, &shop, &shop_payer.account).await;
        assert_eq!((b["debits_pending"].clone(), b["debits_posted"].clone()), (json!(0), json!(700)));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// An answer that does not come in time is not a rejection: the SPI may have paid. The SPI takes
/// 2 s here and the time-out is 300 ms: asked at the time-out, the SPI says it is still processing
/// the payment, so it stays `processing`, its money held; a sweep asks again once the payment is
/// due (5 s past its time-out) and records what the SPI did, accepted: the hold is posted (before,
/// the payment was rejected with AB03 at the time-out and the payer given back money the SPI paid
/// out). The hold has no time-out of its own: nothing but a verdict releases it.
#[test]
fn an_off_us_payment_answered_too_late_is_settled_from_the_spi_status() {
    let rt = runtime();
    let dir = temp_dir("pix-spi-late");
    let args = ["--ispb", ISPB, "--spi-latency-ms", "2000", "--spi-timeout-ms", "300"];
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &args);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let pay = off_us(&maria.account, 30_000);
        let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("processing")), "{:?}", r.json());
        let path = format!("/v1/accounts/{}/transfers", maria.account);
        let listed = c.get(&path, &key).await.unwrap().json();
        let holds: Vec<&Value> =
            listed["data"].as_array().unwrap().iter().filter(|t| t["kind"] == json!("pending")).collect();
        assert_eq!(holds.len(), 1, "{listed}");
        assert_eq!(
            (holds[0]["amount"].clone(), holds[0]["timeout_seconds"].clone(), holds[0]["expires_at"].clone()),
            (json!(30_000), json!(0), Value::Null),
            "the hold never expires: {listed}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        let id = pay["id"].as_str().unwrap();
        let waiting = c.get(&format!("/v1/pix/payments/{id}"), &key).await.unwrap().json();
        assert_eq!(waiting["status"], json!("processing"), "the SPI is still processing it: {waiting}");
        assert_eq!(balance(&mut c, &key, &maria.account).await["debits_pending"], json!(30_000), "held");
        let done = settled_within(&mut c, &key, id, std::time::Duration::from_secs(15)).await;
        assert_eq!((done["status"].clone(), done["reason"].clone()), (json!("completed"), Value::Null), "{done}");
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["debits_posted"].clone()), (json!(0), json!(30_000)));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// An off-us payment whose node was killed while the SPI had it: after the restart, once its SPI
/// time-out and the sweep's margin have passed, the node asks the SPI what became of it and
/// records that: accepted, the hold posted; rejected, or never received, the hold voided and the
/// payer's limit given back. On both engines.
#[test]
fn off_us_payments_in_flight_at_a_crash_are_settled_from_the_spi_after_the_restart() {
    let rt = runtime();
    for on_postgres in [false, true] {
        for (fate, reason, args) in [
            ("completed", None, &[][..]),
            ("rejected", Some("AC03"), &["--spi-reject-percent", "100"][..]),
            ("rejected", Some("AB03"), &["--spi-timeout-percent", "100"][..]),
        ] {
            // A database of each node's own: a node whose keys are not those of the data keys a
            // database holds refuses it.
            let postgres = on_postgres.then(store::testing::fresh_postgres_database);
            let dir = temp_dir("pix-spi-crash");
            // The SPI answers after 3 s, past the 1 s time-out: the payment is in flight when the
            // node is killed, and settled when a sweep asks, 6 s after it was made.
            let mut args: Vec<&str> = args.to_vec();
            args.extend(["--ispb", ISPB, "--spi-latency-ms", "3000", "--spi-timeout-ms", "1000"]);
            let mut server = Server::start_with_args(&dir, postgres.as_deref(), "127.0.0.1:0", true, &args);
            let (key, maria, pay) = rt.block_on(async {
                let mut c = server.client();
                let (_, key) = tenant(&mut c, "t").await;
                let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
                // A day's limit of one payment's amount: a rejection must give it back.
                let limits = json!({"per_transaction": null, "daily": 30_000, "nightly": 30_000, "night_per_transaction": 30_000});
                set_limits(&mut c, &key, &maria, limits).await;
                let pay = off_us(&maria.account, 30_000);
                let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
                assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("processing")), "{:?}", r.json());
                (key, maria, pay)
            });
            server.kill9();
            server.restart();
            rt.block_on(async {
                let mut c = server.client();
                let done = concluded(&mut c, &key, pay["id"].as_str().unwrap()).await;
                let context =
                    format!("{fate} {reason:?} on {}", if postgres.is_some() { "PostgreSQL" } else { "SQLite" });
                assert_eq!(
                    (done["status"].as_str(), done["reason"].as_str()),
                    (Some(fate), reason),
                    "{context}: {done}"
                );
                let b = balance(&mut c, &key, &maria.account).await;
                let posted = if fate == "completed" { 30_000 } else { 0 };
                assert_eq!(
                    (b["debits_pending"].clone(), b["debits_posted"].clone()),
                    (json!(0), json!(posted)),
                    "{context}: the hold is settled, not left to expire"
                );
                // A rejection gives the day's limit back, once; a completed payment used it up.
                let r = c.post("/v1/pix/payments", &key, &off_us(&maria.account, 30_000)).await.unwrap();
                let expected = if fate == "completed" { "rejected" } else { "processing" };
                assert_eq!(
                    (r.status.as_u16(), r.json()["status"].as_str()),
                    (201, Some(expected)),
                    "{context}: {:?}",
                    r.json()
                );
                let r = c.post("/v1/pix/payments", &key, &off_us(&maria.account, 30_000)).await.unwrap();
                assert_eq!(
                    (r.json()["status"].as_str(), r.json()["reason"].as_str()),
                    (Some("rejected"), Some("limit_exceeded")),
                    "{context}: the day's limit is used up: {:?}",
                    r.json()
                );
                // A repeat of the request answers the payment as settled, and sends nothing.
                let r = c.post("/v1/pix/payments", &key, &pay).await.unwrap();
                assert_eq!((r.status.as_u16(), r.json()["status"].as_str()), (200, Some(fate)), "{context}");
            });
            let (ok, report) = server.verify();
            assert!(ok, "{report}");
        }
    }
}

/// Polls a refund of the Pix `e2e` until it leaves `EM_PROCESSAMENTO`.
async fn refund_settled(
    c: &mut rtpay::client::Client,
    key: &str,
    e2e: &str,
    id: &str,
    wait: std::time::Duration,
) -> Value {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let r = c.get(&format!("/api/v2/pix/{e2e}/devolucao/{id}"), key).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        if r.json()["status"] != json!("EM_PROCESSAMENTO") {
            return r.json();
        }
        assert!(std::time::Instant::now() < deadline, "refund {id} still in process: {:?}", r.json());
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A refund of a Pix another institution paid goes back through the SPI (a pacs.004): in process,
/// its money held, until the SPI's verdict; settled (`DEVOLVIDO`) only when the SPI accepted it,
/// refused (`NAO_REALIZADO`, the money back) when it rejected it or never received it, also when
/// the node that sent it was killed meanwhile. (Before, it read `DEVOLVIDO` at once, its money gone
/// to the settlement account, and nothing was ever sent.)
#[test]
fn refunds_of_pix_from_another_institution_go_back_through_the_spi() {
    let rt = runtime();
    async fn put(
        c: &mut rtpay::client::Client,
        key: &str,
        e2e: &str,
        id: &str,
        valor: &str,
    ) -> rtpay::client::Response {
        let body = serde_json::to_vec(&json!({"valor": valor})).unwrap().into();
        c.send(Method::PUT, &format!("/api/v2/pix/{e2e}/devolucao/{id}"), Some(key), Some(body)).await.unwrap()
    }
    async fn receive(c: &mut rtpay::client::Client, key: &str, account: &str, e2e: &str) {
        let body = json!({"end_to_end_id": e2e, "amount": 10_000, "account_id": account,
            "payer": {"ispb": "60701190", "name": "Joana Prado", "document": CPF_OTHER}});
        assert_eq!(c.post("/v1/sandbox/spi/incoming", key, &body).await.unwrap().status, 201);
    }
    let wait = std::time::Duration::from_secs(15);

    // Accepted: the hold is posted.
    let dir = temp_dir("pix-return");
    // The SPI answers after 2 s: what is held is seen held first.
    let server =
        Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--spi-latency-ms", "2000"]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 0).await;
        let e2e = "E6070119020261201120000000000011";
        receive(&mut c, &key, &maria.account, e2e).await;
        let r = put(&mut c, &key, e2e, "D1", "40.00").await;
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("EM_PROCESSAMENTO")), "{:?}", r.json());
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["available"].clone()), (json!(4_000), json!(6_000)), "held");
        // What is in process counts against what may still be refunded.
        let r = put(&mut c, &key, e2e, "D2", "60.01").await;
        assert_eq!(r.status, 400, "{:?}", r.json());
        let done = refund_settled(&mut c, &key, e2e, "D1", wait).await;
        assert_eq!(done["status"], json!("DEVOLVIDO"), "{done}");
        assert!(done["horario"]["liquidacao"].is_string(), "{done}");
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["debits_posted"].clone()), (json!(0), json!(4_000)));
        let r = put(&mut c, &key, e2e, "D1", "40.00").await;
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("DEVOLVIDO")), "a repeat answers it");
        // A MED return (FR01) goes through the SPI too: the block is posted to the settlement
        // account at once, and the refund `MED` is in process until the verdict.
        let e2e = "E6070119020261201120000000000014";
        receive(&mut c, &key, &maria.account, e2e).await;
        let claim = json!({"end_to_end_id": e2e, "reason": "golpe", "amount": 3_000});
        assert_eq!(c.post("/v1/pix/med", &key, &claim).await.unwrap().status, 201);
        let r = c.post(&format!("/v1/pix/med/{e2e}/return"), &key, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (200, json!("returned")), "{:?}", r.json());
        let r = c.get(&format!("/api/v2/pix/{e2e}/devolucao/MED"), &key).await.unwrap();
        assert_eq!(r.json()["status"], json!("EM_PROCESSAMENTO"), "{:?}", r.json());
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["debits_posted"].clone()), (json!(0), json!(7_000)));
        let done = refund_settled(&mut c, &key, e2e, "MED", wait).await;
        assert_eq!(done["status"], json!("DEVOLVIDO"), "{done}");
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_posted"].clone(), b["available"].clone()), (json!(7_000), json!(13_000)));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    drop(server);

    // Rejected: the hold is voided, and the amount may be refunded again.
    let dir = temp_dir("pix-return-rejected");
    let server =
        Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB, "--spi-reject-percent", "100"]);
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 0).await;
        let e2e = "E6070119020261201120000000000012";
        receive(&mut c, &key, &maria.account, e2e).await;
        assert_eq!(put(&mut c, &key, e2e, "D1", "100.00").await.status, 201);
        let done = refund_settled(&mut c, &key, e2e, "D1", wait).await;
        assert_eq!(done["status"], json!("NAO_REALIZADO"), "{done}");
        assert!(done["motivo"].as_str().unwrap().contains("AC03"), "{done}");
        assert_eq!(available(&mut c, &maria).await, 10_000, "the money stays with the receiver");
        let r = put(&mut c, &key, e2e, "D2", "100.00").await;
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("EM_PROCESSAMENTO")), "{:?}", r.json());
        // A MED return the SPI rejects leaves the money with the receiver.
        let e2e = "E6070119020261201120000000000015";
        receive(&mut c, &key, &maria.account, e2e).await;
        let claim = json!({"end_to_end_id": e2e, "reason": "golpe"});
        assert_eq!(c.post("/v1/pix/med", &key, &claim).await.unwrap().status, 201);
        let r = c.post(&format!("/v1/pix/med/{e2e}/return"), &key, &json!({})).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let done = refund_settled(&mut c, &key, e2e, "MED", wait).await;
        assert_eq!(
            (done["status"].clone(), done["natureza"].clone()),
            (json!("NAO_REALIZADO"), json!("MED_FRAUDE")),
            "{done}"
        );
        let e2e_d2 = "E6070119020261201120000000000012";
        assert_eq!(refund_settled(&mut c, &key, e2e_d2, "D2", wait).await["status"], json!("NAO_REALIZADO"));
        let b = balance(&mut c, &key, &maria.account).await;
        assert_eq!((b["debits_pending"].clone(), b["available"].clone()), (json!(0), json!(20_000)), "{b}");
        // The claim's return failed: the claim says so, and may be made again.
        let r = c.get(&format!("/v1/pix/med/{e2e}"), &key).await.unwrap();
        assert_eq!(r.json()["status"], json!("return_failed"), "{:?}", r.json());
        let r = c.post("/v1/pix/med", &key, &claim).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("blocked")), "{:?}", r.json());
        assert_eq!(available(&mut c, &maria).await, 10_000);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    drop(server);

    // Never answered, and its node killed meanwhile: after the restart the sweep asks the SPI,
    // which never received it, and the refund is refused as timed out (AB03).
    let dir = temp_dir("pix-return-lost");
    let args = ["--ispb", ISPB, "--spi-timeout-percent", "100", "--spi-timeout-ms", "1000"];
    let mut server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &args);
    let (key, maria, e2e) = rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "t").await;
        let maria = party(&mut c, &key, "person", "Maria Quitéria", CPF_MARIA, 0).await;
        let e2e = "E6070119020261201120000000000013";
        receive(&mut c, &key, &maria.account, e2e).await;
        assert_eq!(put(&mut c, &key, e2e, "D1", "25.00").await.status, 201);
        (key, maria, e2e)
    });
    server.kill9();
    server.restart();
    rt.block_on(async {
        let mut c = server.client();
        assert_eq!(available(&mut c, &maria).await, 7_500, "held across the restart");
        let done = refund_settled(&mut c, &key, e2e, "D1", wait).await;
        assert_eq!(done["status"], json!("NAO_REALIZADO"), "{done}");
        assert!(done["motivo"].as_str().unwrap().contains("AB03"), "{done}");
        assert_eq!(available(&mut c, &maria).await, 10_000);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}
