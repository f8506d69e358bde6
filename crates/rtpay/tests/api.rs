//! The native HTTP API end to end: a real `rtpay serve` (embedded engine), real sockets, and only
//! what a client can observe: status codes, problem `code` and `field`, bodies and balances.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{account, balance, runtime, temp_dir, tenant, uuid, Server, OPERATOR};
use hyper::Method;
use rtpay::client::{Client, Response};
use serde_json::{json, Value};

/// How `r` differs from an RFC 9457 problem with this status, code and field and a non-empty
/// detail, if it does.
fn problem_mismatch(r: &Response, status: u16, code: &str, field: Option<&str>) -> Option<String> {
    let body = String::from_utf8_lossy(&r.body);
    let content_type = r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let v = r.json();
    let detail = v["detail"].as_str().unwrap_or("");
    let type_ = format!("urn:rtpay:problem:{code}");
    let mut wrong = Vec::new();
    if r.status.as_u16() >= 500 {
        wrong.push("a 5xx".to_owned());
    }
    if r.status.as_u16() != status {
        wrong.push(format!("status {} (expected {status})", r.status.as_u16()));
    }
    if content_type != "application/problem+json" {
        wrong.push(format!("Content-Type {content_type:?}"));
    }
    if v["code"].as_str() != Some(code) {
        wrong.push(format!("code {} (expected {code:?})", v["code"]));
    }
    if v["field"].as_str() != field {
        wrong.push(format!("field {} (expected {field:?})", v["field"]));
    }
    if v["status"].as_u64() != Some(u64::from(r.status.as_u16())) {
        wrong.push(format!("status member {}", v["status"]));
    }
    if v["type"].as_str() != Some(type_.as_str()) {
        wrong.push(format!("type {}", v["type"]));
    }
    if detail.trim().is_empty() {
        wrong.push("an empty detail".to_owned());
    }
    (!wrong.is_empty()).then(|| format!("{}; body {body}", wrong.join(", ")))
}

#[track_caller]
fn assert_problem(r: &Response, status: u16, code: &str, field: Option<&str>, what: &str) {
    if let Some(wrong) = problem_mismatch(r, status, code, field) {
        panic!("{what}: {wrong}");
    }
}

#[track_caller]
fn assert_status(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status.as_u16(), status, "{what}: body {}", String::from_utf8_lossy(&r.body));
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

async fn post(client: &mut Client, path: &str, key: &str, body: &Value) -> Response {
    client.post(path, key, body).await.unwrap()
}

async fn get(client: &mut Client, path: &str, key: &str) -> Response {
    client.get(path, key).await.unwrap()
}

/// Posts a transfer that must be created.
async fn transfer(client: &mut Client, key: &str, debit: &str, credit: &str, amount: u64) -> String {
    let id = uuid();
    let r = post(
        client,
        "/v1/transfers",
        key,
        &json!({"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount}),
    )
    .await;
    assert_status(&r, 201, "transfer");
    id
}

/// Every account's balance, to compare before and after.
async fn balances(client: &mut Client, key: &str, accounts: &[&str]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for a in accounts {
        out.insert((*a).to_owned(), balance(client, key, a).await);
    }
    out
}

/// No request so far got a 5xx, as the server itself counts them.
async fn assert_no_5xx_in_metrics(client: &mut Client) {
    let r = client.send(Method::GET, "/metrics", None, None).await.unwrap();
    assert_status(&r, 200, "metrics");
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let bad: Vec<&str> =
        text.lines().filter(|l| l.starts_with("rtpay_http_requests_total") && l.contains("status=\"5")).collect();
    assert!(bad.is_empty(), "the server answered 5xx: {bad:?}");
}

/// One row of the bad-input table.
struct Case {
    what: &'static str,
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    content_type: Option<&'static str>,
    token: Option<String>,
    status: u16,
    code: &'static str,
    field: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn case(
    what: &'static str,
    method: Method,
    path: impl Into<String>,
    body: Option<Vec<u8>>,
    content_type: Option<&'static str>,
    status: u16,
    code: &'static str,
    field: Option<&str>,
    token: Option<&str>,
) -> Case {
    Case {
        what,
        method,
        path: path.into(),
        body,
        content_type,
        token: token.map(str::to_owned),
        status,
        code,
        field: field.map(str::to_owned),
    }
}

#[test]
fn bad_input_is_refused_with_the_field_and_rule_and_changes_nothing() {
    let dir = temp_dir("api-bad-input");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_id, key) = tenant(&mut c, "bad input").await;
        let k = Some(key.as_str());
        let src = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let payer =
            account(&mut c, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;
        let payee = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let usd = account(&mut c, &key, json!({"currency": "USD"})).await;
        transfer(&mut c, &key, &src, &payer, 1_000).await;
        let accounts = [src.as_str(), payer.as_str(), payee.as_str(), usd.as_str()];
        let before = balances(&mut c, &key, &accounts).await;
        let listed_before = get(&mut c, &format!("/v1/accounts/{payer}/transfers?limit=1000"), &key).await.json();

        // A second key of the tenant, revoked by the operator.
        let r = c.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &json!({})).await.unwrap();
        assert_status(&r, 201, "create a second API key");
        let revoked_id = r.json()["id"].as_str().unwrap().to_owned();
        let revoked = r.json()["secret"].as_str().unwrap().to_owned();
        assert_status(&get(&mut c, &format!("/v1/accounts/{payer}"), &revoked).await, 200, "the new key works");
        let r = c
            .send(Method::DELETE, &format!("/v1/tenants/{tenant_id}/api-keys/{revoked_id}"), Some(OPERATOR), None)
            .await
            .unwrap();
        assert_status(&r, 204, "revoke the key");
        // Refused at once, on the connection that proved it a moment ago too.
        let r = get(&mut c, &format!("/v1/accounts/{payer}"), &revoked).await;
        assert_status(&r, 401, "the revoked key, on the connection that used it");

        // Ids that bad requests name; none may exist afterwards. Each bent copy of a transfer gets
        // a fresh id, since a refusal by the ledger (not by validation) is remembered under its id.
        let transfer_ids = RefCell::new(Vec::new());
        let account_ids = RefCell::new(Vec::new());
        let fresh = |ids: &RefCell<Vec<String>>| {
            let id = uuid();
            ids.borrow_mut().push(id.clone());
            id
        };
        let t = |amount: Value| {
            json!({"id": fresh(&transfer_ids), "debit_account_id": payer, "credit_account_id": payee, "amount": amount})
        };
        let valid = t(json!(10));
        let with = |base: &Value, key: &str, value: Value| {
            let mut v = base.clone();
            v["id"] = json!(fresh(&transfer_ids));
            v[key] = value;
            v
        };
        let without = |base: &Value, key: &str| {
            let mut v = base.clone();
            v["id"] = json!(fresh(&transfer_ids));
            v.as_object_mut().unwrap().remove(key);
            v
        };
        let a = |body: Value| {
            let mut body = body;
            body["id"] = json!(fresh(&account_ids));
            body
        };

        let mut trailing = bytes(&valid);
        trailing.extend_from_slice(b" x");
        let mut bad_utf8 = br#"{"id": ""#.to_vec();
        bad_utf8.extend_from_slice(b"\xff\xfe");
        bad_utf8.extend_from_slice(format!(r#"", "debit_account_id": "{payer}", "credit_account_id": "{payee}", "amount": 10}}"#).as_bytes());
        let amount_as_string =
            format!(r#"{{"id": "{}", "debit_account_id": "{payer}", "credit_account_id": "{payee}", "amount": "10"}}"#, uuid());
        let amount_1_5 =
            format!(r#"{{"id": "{}", "debit_account_id": "{payer}", "credit_account_id": "{payee}", "amount": 1.5}}"#, uuid());
        let amount_2_63 = format!(
            r#"{{"id": "{}", "debit_account_id": "{payer}", "credit_account_id": "{payee}", "amount": 9223372036854775808}}"#,
            uuid()
        );
        let amount_2_63_minus_1 = format!(
            r#"{{"id": "{}", "debit_account_id": "{payer}", "credit_account_id": "{payee}", "amount": 9223372036854775807}}"#,
            uuid()
        );
        let mut oversize = br#"{"id": ""#.to_vec();
        oversize.resize(oversize.len() + 4 * 1024 * 1024 + 1, b'a');
        oversize.extend_from_slice(br#""}"#);
        let item = |amount: u64| json!({"id": uuid(), "debit_account_id": src, "credit_account_id": payee, "amount": amount});
        let batch_8191: Vec<Value> = (0..8191).map(|_| item(1)).collect();
        let batch_item_3: Vec<Value> = vec![item(1), item(2), item(3), item(0), item(5)];
        let batch_item_3_ids: Vec<String> =
            batch_item_3.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
        let hold = t(json!(1));

        use Method as M;
        let tr = "/v1/transfers";
        let ac = "/v1/accounts";
        let json_ct = Some("application/json");
        #[rustfmt::skip]
        let cases = vec![
            // Syntax: 400.
            case("malformed JSON", M::POST, tr, Some(b"{\"id\": ".to_vec()), json_ct, 400, "malformed_json", None, k),
            case("invalid UTF-8 inside a JSON string", M::POST, tr, Some(bad_utf8), json_ct, 400, "malformed_json", None, k),
            case("empty body", M::POST, tr, Some(Vec::new()), json_ct, 400, "malformed_json", None, k),
            case("trailing garbage after a valid body", M::POST, tr, Some(trailing), json_ct, 400, "malformed_json", None, k),
            case("a JSON array instead of an object", M::POST, tr, Some(b"[]".to_vec()), json_ct, 422, "invalid_body", None, k),
            case("the transfer's fields as a list, in order", M::POST, tr, Some(bytes(&json!([fresh(&transfer_ids), payer, payee, 1]))), json_ct, 422, "invalid_body", None, k),
            case("an account's fields as a list", M::POST, ac, Some(bytes(&json!([null, "BRL"]))), json_ct, 422, "invalid_body", None, k),
            case("a JSON syntax error after an unknown field", M::POST, tr, Some(b"{\"bogus\":1".to_vec()), json_ct, 400, "malformed_json", None, k),
            case("a key given twice", M::POST, ac, Some(b"{\"currency\":\"BRL\",\"currency\":\"USD\"}".to_vec()), json_ct, 422, "duplicate_field", Some("currency"), k),
            case("an id as 32 bare hex digits", M::POST, tr, Some(bytes(&with(&valid, "id", json!(fresh(&transfer_ids).replace('-', ""))))), json_ct, 422, "invalid_uuid", Some("id"), k),
            case("an id as a urn", M::POST, tr, Some(bytes(&with(&valid, "id", json!(format!("urn:uuid:{}", fresh(&transfer_ids)))))), json_ct, 422, "invalid_uuid", Some("id"), k),
            // Types and ranges.
            case("amount as a string", M::POST, tr, Some(amount_as_string.into_bytes()), json_ct, 422, "invalid_amount", Some("amount"), k),
            case("amount 1.5", M::POST, tr, Some(amount_1_5.into_bytes()), json_ct, 422, "invalid_amount", Some("amount"), k),
            // What the client sent is not quoted back (`ECHOED` must not appear in any answer).
            case("an amount whose text holds the expectation's words", M::POST, tr, Some(bytes(&t(json!("x, expected ECHOED")))), json_ct, 422, "invalid_amount", Some("amount"), k),
            case("a secret sent as the body, a JSON string", M::POST, tr, Some(bytes(&json!("rtpay_sk_ECHOED"))), json_ct, 422, "invalid_body", None, k),
            case("negative amount", M::POST, tr, Some(bytes(&t(json!(-5)))), json_ct, 422, "invalid_amount", Some("amount"), k),
            case("amount 0", M::POST, tr, Some(bytes(&t(json!(0)))), json_ct, 422, "invalid_amount", Some("amount"), k),
            case("amount 2^63", M::POST, tr, Some(amount_2_63.into_bytes()), json_ct, 422, "invalid_amount", Some("amount"), k),
            case("amount 2^63-1 is valid input; the ledger refuses it", M::POST, tr, Some(amount_2_63_minus_1.into_bytes()), json_ct, 422, "insufficient_funds", Some("amount"), k),
            case("code beyond u16", M::POST, tr, Some(bytes(&with(&valid, "code", json!(70_000)))), json_ct, 422, "invalid_field", Some("code"), k),
            case("metadata not an object", M::POST, tr, Some(bytes(&with(&valid, "metadata", json!([1])))), json_ct, 422, "invalid_field", Some("metadata"), k),
            case("a metadata key given twice", M::POST, ac, Some(br#"{"currency":"BRL","metadata":{"ref":1,"ref":2}}"#.to_vec()), json_ct, 422, "duplicate_field", Some("metadata"), k),
            case("a key given twice deep in metadata", M::POST, tr, Some(valid_text_with_metadata(&valid, r#"{"o":[{"a":1,"b":{"c":1,"c":1}}]}"#)), json_ct, 422, "duplicate_field", Some("metadata.o[0].b"), k),
            case("metadata too long", M::POST, tr, Some(bytes(&with(&valid, "metadata", json!({"x": "y".repeat(5000)})))), json_ct, 422, "metadata_too_long", Some("metadata"), k),
            // Shape.
            case("unknown top-level field", M::POST, tr, Some(bytes(&with(&valid, "amont", json!(1)))), json_ct, 422, "unknown_field", Some("amont"), k),
            case("unknown field nested in flags", M::POST, ac, Some(bytes(&a(json!({"currency": "BRL", "flags": {"closed": false, "overdraft": true}})))), json_ct, 422, "unknown_field", Some("flags.overdraft"), k),
            case("missing amount", M::POST, tr, Some(bytes(&without(&valid, "amount"))), json_ct, 422, "missing_field", Some("amount"), k),
            case("missing id", M::POST, tr, Some(bytes(&without(&valid, "id"))), json_ct, 422, "missing_field", Some("id"), k),
            case("missing currency", M::POST, ac, Some(bytes(&a(json!({"code": 1})))), json_ct, 422, "missing_field", Some("currency"), k),
            // Ids.
            case("non-UUID transfer id", M::POST, tr, Some(bytes(&with(&valid, "id", json!("tx-1")))), json_ct, 422, "invalid_uuid", Some("id"), k),
            case("nil UUID transfer id", M::POST, tr, Some(bytes(&with(&valid, "id", json!("00000000-0000-0000-0000-000000000000")))), json_ct, 422, "invalid_uuid", Some("id"), k),
            case("non-UUID debit account", M::POST, tr, Some(bytes(&with(&valid, "debit_account_id", json!("alice")))), json_ct, 422, "invalid_uuid", Some("debit_account_id"), k),
            case("nil UUID credit account", M::POST, tr, Some(bytes(&with(&valid, "credit_account_id", json!("00000000-0000-0000-0000-000000000000")))), json_ct, 422, "invalid_uuid", Some("credit_account_id"), k),
            case("nil UUID account id", M::POST, ac, Some(bytes(&json!({"id": "00000000-0000-0000-0000-000000000000", "currency": "BRL"}))), json_ct, 422, "invalid_uuid", Some("id"), k),
            case("non-UUID id in the path", M::GET, format!("{ac}/not-a-uuid"), None, None, 422, "invalid_uuid", Some("id"), k),
            case("nil UUID in the path", M::GET, format!("{tr}/00000000-0000-0000-0000-000000000000"), None, None, 422, "invalid_uuid", Some("id"), k),
            case("invalid UTF-8 percent-encoded in the path", M::GET, format!("{ac}/%FF%FE"), None, None, 400, "malformed_path", Some("id"), k),
            case("invalid UTF-8 percent-encoded in the query", M::GET, format!("{ac}/{payer}/transfers?limit=%FF"), None, None, 422, "invalid_limit", Some("limit"), k),
            case("invalid UTF-8 percent-encoded in a two-parameter path", M::DELETE, format!("/v1/tenants/{tenant_id}/api-keys/%C3%28"), None, None, 400, "malformed_path", Some("key_id"), Some(OPERATOR)),
            // Ledger rules.
            case("same debit and credit account", M::POST, tr, Some(bytes(&with(&valid, "credit_account_id", json!(payer)))), json_ct, 422, "accounts_must_be_different", Some("credit_account_id"), k),
            case("currency mismatch BRL to USD", M::POST, tr, Some(bytes(&with(&valid, "credit_account_id", json!(usd)))), json_ct, 422, "currency_mismatch", Some("credit_account_id"), k),
            case("unknown debit account", M::POST, tr, Some(bytes(&with(&valid, "debit_account_id", json!(uuid())))), json_ct, 422, "debit_account_not_found", Some("debit_account_id"), k),
            case("unknown credit account", M::POST, tr, Some(bytes(&with(&valid, "credit_account_id", json!(uuid())))), json_ct, 422, "credit_account_not_found", Some("credit_account_id"), k),
            case("more than the payer holds", M::POST, tr, Some(bytes(&with(&valid, "amount", json!(1_001)))), json_ct, 422, "insufficient_funds", Some("amount"), k),
            case("timeout_seconds without pending", M::POST, tr, Some(bytes(&with(&valid, "timeout_seconds", json!(30)))), json_ct, 422, "timeout_requires_pending", Some("timeout_seconds"), k),
            case("timeout_seconds beyond 2^31-1", M::POST, tr, Some(bytes(&with(&with(&hold, "pending", json!(true)), "timeout_seconds", json!(2_147_483_648u64)))), json_ct, 422, "timeout_exceeds_max", Some("timeout_seconds"), k),
            case("void with an amount", M::POST, format!("{tr}/{}/void", uuid()), Some(bytes(&json!({"id": uuid(), "amount": 1}))), json_ct, 422, "field_not_allowed", Some("amount"), k),
            // Accounts.
            case("unknown currency XYZ", M::POST, ac, Some(bytes(&a(json!({"currency": "XYZ"})))), json_ct, 422, "invalid_currency", Some("currency"), k),
            case("lowercase currency", M::POST, ac, Some(bytes(&a(json!({"currency": "brl"})))), json_ct, 422, "invalid_currency", Some("currency"), k),
            case("both balance flags", M::POST, ac, Some(bytes(&a(json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true, "credits_must_not_exceed_debits": true}})))), json_ct, 422, "flags_are_mutually_exclusive", Some("flags"), k),
            case("credit_limit without a balance flag", M::POST, ac, Some(bytes(&a(json!({"currency": "BRL", "credit_limit": 100})))), json_ct, 422, "credit_limit_requires_balance_flag", Some("credit_limit"), k),
            case("credit_limit beyond 2^63-1", M::POST, ac, Some(bytes(&a(json!({"currency": "BRL", "credit_limit": 9_223_372_036_854_775_808u64, "flags": {"debits_must_not_exceed_credits": true}})))), json_ct, 422, "credit_limit_exceeds_max", Some("credit_limit"), k),
            // Transport.
            case("body over 4 MiB", M::POST, tr, Some(oversize), json_ct, 413, "body_too_large", None, k),
            case("Content-Type text/plain", M::POST, tr, Some(bytes(&valid)), Some("text/plain"), 415, "unsupported_media_type", None, k),
            case("Content-Type application/xml", M::POST, ac, Some(bytes(&a(json!({"currency": "BRL"})))), Some("application/xml"), 415, "unsupported_media_type", None, k),
            // Batches.
            case("batch of 0", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": []}))), json_ct, 422, "invalid_batch_len", Some("transfers"), k),
            case("batch of 8191", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": batch_8191}))), json_ct, 422, "invalid_batch_len", Some("transfers"), k),
            case("batch whose item 3 is invalid", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": batch_item_3, "linked": false}))), json_ct, 422, "invalid_amount", Some("transfers[3].amount"), k),
            case("batch item as a list", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": [item(1), [fresh(&transfer_ids), src, payee, 1]]}))), json_ct, 422, "invalid_field", Some("transfers[1]"), k),
            case("batch item with an unknown field", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": [item(1), {"id": uuid(), "debit_account_id": src, "credit_account_id": payee, "amount": 1, "memo": "x"}]}))), json_ct, 422, "unknown_field", Some("transfers[1].memo"), k),
            case("batch item both posting and voiding", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": [{"id": uuid(), "post_pending_id": uuid(), "void_pending_id": uuid()}]}))), json_ct, 422, "field_not_allowed", Some("transfers[0].void_pending_id"), k),
            case("batch item without accounts", M::POST, format!("{tr}/batch"), Some(bytes(&json!({"transfers": [{"id": uuid(), "amount": 1}]}))), json_ct, 422, "missing_field", Some("transfers[0].debit_account_id"), k),
            // Who is calling.
            case("no Authorization header", M::POST, tr, Some(bytes(&valid)), json_ct, 401, "unauthorized", None, None),
            case("wrong key", M::POST, tr, Some(bytes(&valid)), json_ct, 401, "unauthorized", None, Some(&format!("rtpay_sk_{}", "0".repeat(64)))),
            case("not a tenant key at all", M::GET, format!("{ac}/{payer}"), None, None, 401, "unauthorized", None, Some("hunter2")),
            case("the operator token as a tenant key", M::GET, format!("{ac}/{payer}"), None, None, 401, "unauthorized", None, Some(OPERATOR)),
            case("revoked key", M::POST, tr, Some(bytes(&valid)), json_ct, 401, "unauthorized", None, Some(&revoked)),
            case("revoked key on a read", M::GET, format!("{ac}/{payer}"), None, None, 401, "unauthorized", None, Some(&revoked)),
            case("tenant key on an operator route", M::POST, "/v1/tenants", Some(bytes(&json!({"name": "mallory"}))), json_ct, 401, "unauthorized", None, k),
            case("tenant key revoking a key", M::DELETE, format!("/v1/tenants/{tenant_id}/api-keys/{revoked_id}"), None, None, 401, "unauthorized", None, k),
            // Routes.
            case("unknown route", M::GET, "/v1/nope", None, None, 404, "no_route", None, k),
            case("unknown route without a key", M::POST, "/v2/transfers", Some(bytes(&valid)), json_ct, 404, "no_route", None, None),
            case("wrong method", M::DELETE, tr, None, None, 405, "method_not_allowed", None, k),
        ];

        let mut wrong = Vec::new();
        let count = cases.len();
        for case in cases {
            let body = case.body.map(Bytes::from);
            let headers: Vec<(&str, &str)> = case.content_type.map(|ct| vec![("content-type", ct)]).unwrap_or_default();
            // Each case on its own connection: a refused body may end the connection.
            let mut fresh = server.client();
            match fresh.send_with_headers(case.method.clone(), &case.path, case.token.as_deref(), body, &headers).await {
                Ok(r) => {
                    if let Some(why) = problem_mismatch(&r, case.status, case.code, case.field.as_deref()) {
                        wrong.push(format!("{}: {why}", case.what));
                    }
                    if String::from_utf8_lossy(&r.body).contains("ECHOED") {
                        wrong.push(format!("{}: the answer quotes the request: {:?}", case.what, r.json()));
                    }
                }
                Err(e) => wrong.push(format!("{}: no answer: {e}", case.what)),
            }
        }
        assert!(wrong.is_empty(), "{} of {count} cases answered wrongly:\n{}", wrong.len(), wrong.join("\n"));

        // Nothing changed.
        assert_eq!(balances(&mut c, &key, &accounts).await, before, "bad input changed a balance");
        let listed_after = get(&mut c, &format!("/v1/accounts/{payer}/transfers?limit=1000"), &key).await.json();
        assert_eq!(listed_after, listed_before, "bad input added a transfer");
        let (transfer_ids, account_ids) = (transfer_ids.into_inner(), account_ids.into_inner());
        for id in transfer_ids.iter().chain(&batch_item_3_ids) {
            let r = get(&mut c, &format!("/v1/transfers/{id}"), &key).await;
            assert_problem(&r, 404, "not_found", None, "a transfer of a bad request");
        }
        for id in &account_ids {
            let r = get(&mut c, &format!("/v1/accounts/{id}"), &key).await;
            assert_problem(&r, 404, "not_found", None, "an account of a bad request");
        }
        // The valid request the table kept bending is still accepted, once.
        let r = post(&mut c, "/v1/transfers", &key, &valid).await;
        assert_status(&r, 201, "the valid transfer");
        assert_eq!(balance(&mut c, &key, &payer).await["debits_posted"], 10);
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

/// Slow or lying clients cannot hold a connection: a body declared larger than the limit is
/// refused before any of it is read, a body that stops arriving gets 408 after 30 s (on every
/// route that reads one: JSON, OAuth's form, the API Pix), and a head that is never finished (or
/// a kept-alive connection never used) is closed after 30 s.
#[test]
fn connections_that_stall_are_answered_or_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("api-stalls");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "stalls").await;
        let head = |len: &str| {
            format!(
                "POST /v1/accounts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
            )
        };
        // Reads what the server sends until it closes the connection, or 45 s pass.
        async fn answer(stream: &mut tokio::net::TcpStream) -> String {
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(45), stream.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        }
        let connect = || tokio::net::TcpStream::connect(server.addr);
        let (mut oversize, mut stalled, mut half, mut idle) =
            (connect().await.unwrap(), connect().await.unwrap(), connect().await.unwrap(), connect().await.unwrap());
        let (mut token, mut api_pix, mut api_pix_oversize) =
            (connect().await.unwrap(), connect().await.unwrap(), connect().await.unwrap());
        oversize.write_all(format!("{}{{\"currency\":\"BRL\"}}", head("99999999999")).as_bytes()).await.unwrap();
        stalled.write_all(format!("{}{{\"currency\"", head("100")).as_bytes()).await.unwrap();
        half.write_all(b"POST /v1/accounts HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        // The routes that read a body of another kind: OAuth's form, the API Pix's JSON.
        let form = "POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n\r\ngrant_type=";
        token.write_all(form.as_bytes()).await.unwrap();
        let cob = |len: &str| {
            format!("PUT /api/v2/cob/abcdefghijklmnopqrstuvwxyz0 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: {len}\r\n\r\n{{\"calendario\"")
        };
        api_pix.write_all(cob("100").as_bytes()).await.unwrap();
        api_pix_oversize.write_all(cob("99999999999").as_bytes()).await.unwrap();
        let started = Instant::now();
        let (oversize, stalled, half, idle, token, api_pix, api_pix_oversize) = tokio::join!(
            answer(&mut oversize),
            answer(&mut stalled),
            answer(&mut half),
            answer(&mut idle),
            answer(&mut token),
            answer(&mut api_pix),
            answer(&mut api_pix_oversize)
        );
        assert!(token.starts_with("HTTP/1.1 408") && token.contains("invalid_request"), "{token}");
        assert!(api_pix.starts_with("HTTP/1.1 408") && api_pix.contains("/error/RequisicaoInvalida"), "{api_pix}");
        assert!(api_pix_oversize.starts_with("HTTP/1.1 413"), "refused before the body is read: {api_pix_oversize}");
        assert!(oversize.starts_with("HTTP/1.1 413"), "{oversize}");
        assert!(oversize.contains("body_too_large"), "{oversize}");
        assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
        assert!(stalled.contains("request_timeout"), "{stalled}");
        assert!(!half.starts_with("HTTP/1.1 2"), "{half}");
        assert!(idle.is_empty() || !idle.starts_with("HTTP/1.1 2"), "{idle}");
        assert!(started.elapsed() < Duration::from_secs(45), "every connection was closed by the server");
    });
}

/// A chunked body is read as any other; one whose chunked encoding breaks is refused as malformed
/// (400 `malformed_body`, not 413) and changes nothing, and one that runs over the limit is 413.
#[test]
fn a_chunked_body_that_breaks_is_malformed_and_one_too_long_is_too_large() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("api-chunked");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "chunked").await;
        let (from, to) = (account(&mut c, &key, json!({"currency": "BRL"})).await, account(&mut c, &key, json!({"currency": "BRL"})).await);
        let body = |id: &str| json!({"id": id, "debit_account_id": from, "credit_account_id": to, "amount": 5}).to_string();
        let head = format!(
            "POST /v1/transfers HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let exchange = |request: Vec<u8>| async move {
            let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            // The server may answer and stop reading before all of it is sent.
            let _ = stream.write_all(&request).await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        };
        let (good, broken) = (uuid(), uuid());
        let good_body = body(&good);
        let got = exchange(format!("{head}{:x}\r\n{good_body}\r\n0\r\n\r\n", good_body.len()).into_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 201"), "{got}");
        let got = exchange(format!("{head}zz\r\n{}\r\n0\r\n\r\n", body(&broken)).into_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 400") && got.contains("\"malformed_body\""), "{got}");
        let long = 4 * 1024 * 1024 + 1;
        let mut request = format!("{head}{long:x}\r\n").into_bytes();
        request.resize(request.len() + long, b' ');
        request.extend_from_slice(b"\r\n0\r\n\r\n");
        let got = exchange(request).await;
        assert!(got.starts_with("HTTP/1.1 413") && got.contains("\"body_too_large\""), "{got}");
        let r = get(&mut c, &format!("/v1/transfers/{broken}"), &key).await;
        assert_problem(&r, 404, "not_found", None, "no transfer was made");
        assert_eq!(balance(&mut c, &key, &to).await["credits_posted"], 5);
    });
}

/// A header that decides how a request is read, named twice, is refused (400 `duplicate_header`)
/// and changes nothing: which of the two a proxy in front of rtpay honoured is unknown.
#[test]
fn headers_named_twice_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("api-twice");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "twice").await;
        let (_, other) = tenant(&mut c, "other").await;
        let (from, to) = (account(&mut c, &key, json!({"currency": "BRL"})).await, account(&mut c, &key, json!({"currency": "BRL"})).await);
        let id = uuid();
        let body = json!({"id": id, "debit_account_id": from, "credit_account_id": to, "amount": 5}).to_string();
        for (extra, field) in [
            (format!("authorization: Bearer {other}\r\ncontent-type: application/json\r\n"), "Authorization"),
            ("content-type: application/json\r\ncontent-type: text/plain\r\n".to_owned(), "Content-Type"),
        ] {
            let request = format!(
                "POST /v1/transfers HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            let got = String::from_utf8_lossy(&got);
            assert!(got.starts_with("HTTP/1.1 400"), "{field}: {got}");
            assert!(got.contains("\"duplicate_header\"") && got.contains(&format!("\"field\":\"{field}\"")), "{got}");
        }
        let r = get(&mut c, &format!("/v1/transfers/{id}"), &key).await;
        assert_problem(&r, 404, "not_found", None, "no transfer was made");
    });
}

/// `--account-cache 2`: the writer keeps at most two accounts when a batch starts (the gauge
/// shows it), reads the others back as transfers name them, and every balance comes out as it
/// does with all of them kept; without the flag it keeps all eight.
#[test]
fn a_small_account_cache_changes_memory_not_balances() {
    let dir = temp_dir("account-cache");
    let cached = |text: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with("rtpay_ledger_cached_accounts ")).expect("the gauge");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let mut outcomes = Vec::new();
    for (name, args) in [("small", &["--account-cache", "2"][..]), ("default", &[][..])] {
        let server = Server::start_with_args(&dir.join(name), None, "127.0.0.1:0", true, args);
        let mut client = server.client();
        outcomes.push(runtime().block_on(async {
            let (_, key) = tenant(&mut client, name).await;
            let bank = account(&mut client, &key, json!({"currency": "BRL"})).await;
            let mut wallets = Vec::new();
            for _ in 0..7 {
                wallets.push(
                    account(
                        &mut client,
                        &key,
                        json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}}),
                    )
                    .await,
                );
            }
            // One request at a time: each batch names the bank and one wallet, or two wallets.
            for round in 0..3u64 {
                for (i, wallet) in wallets.iter().enumerate() {
                    transfer(&mut client, &key, &bank, wallet, 10 + i as u64 + round).await;
                }
                for (i, pair) in wallets.windows(2).enumerate() {
                    transfer(&mut client, &key, &pair[0], &pair[1], 1 + i as u64).await;
                }
            }
            let r = client.send(Method::GET, "/metrics", None, None).await.unwrap();
            let kept = cached(std::str::from_utf8(&r.body).unwrap());
            let mut seen = Vec::new();
            for a in std::iter::once(&bank).chain(&wallets) {
                seen.push(balance(&mut client, &key, a).await);
            }
            assert_no_5xx_in_metrics(&mut client).await;
            (kept, seen)
        }));
    }
    let (small, default) = (&outcomes[0], &outcomes[1]);
    // The last batch started with at most two and read the two accounts its transfer names.
    assert!(small.0 <= 4, "kept {}", small.0);
    assert_eq!(default.0, 8, "without the flag every account used stays");
    assert_eq!(small.1, default.1, "the same balances");
    assert_eq!(small.1[0]["debits_posted"], json!((10..17).sum::<u64>() * 3 + 7 * 3), "the bank's");
}

#[test]
fn another_tenants_ids_do_not_exist() {
    let dir = temp_dir("api-isolation");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, a) = tenant(&mut c, "tenant a").await;
        let (_, b) = tenant(&mut c, "tenant b").await;
        let a_src = account(&mut c, &a, json!({"currency": "BRL"})).await;
        let a_dst = account(&mut c, &a, json!({"currency": "BRL"})).await;
        let b_acct = account(&mut c, &b, json!({"currency": "BRL"})).await;
        let a_moved = transfer(&mut c, &a, &a_src, &a_dst, 500).await;
        let a_hold = uuid();
        let r = post(
            &mut c,
            "/v1/transfers",
            &a,
            &json!({"id": a_hold, "debit_account_id": a_src, "credit_account_id": a_dst, "amount": 50, "pending": true}),
        )
        .await;
        assert_status(&r, 201, "A's hold");
        let before = balances(&mut c, &a, &[&a_src, &a_dst]).await;

        for id in [&a_src, &a_dst] {
            let r = get(&mut c, &format!("/v1/accounts/{id}"), &b).await;
            assert_problem(&r, 404, "not_found", None, "B reads A's account");
            let r = get(&mut c, &format!("/v1/accounts/{id}/transfers"), &b).await;
            assert_problem(&r, 404, "not_found", None, "B lists A's account");
            let r = post(&mut c, &format!("/v1/accounts/{id}/close"), &b, &json!({})).await;
            assert_problem(&r, 404, "not_found", None, "B closes A's account");
        }
        for id in [&a_moved, &a_hold] {
            let r = get(&mut c, &format!("/v1/transfers/{id}"), &b).await;
            assert_problem(&r, 404, "not_found", None, "B reads A's transfer");
            let r = post(&mut c, &format!("/v1/transfers/{id}/post"), &b, &json!({"id": uuid()})).await;
            assert_problem(&r, 404, "pending_transfer_not_found", Some("pending_id"), "B posts A's hold");
            let r = post(&mut c, &format!("/v1/transfers/{id}/void"), &b, &json!({"id": uuid()})).await;
            assert_problem(&r, 404, "pending_transfer_not_found", Some("pending_id"), "B voids A's hold");
        }
        // B cannot move A's money, nor send money into A's accounts.
        let r = post(
            &mut c,
            "/v1/transfers",
            &b,
            &json!({"id": uuid(), "debit_account_id": a_src, "credit_account_id": b_acct, "amount": 100}),
        )
        .await;
        assert_problem(&r, 422, "debit_account_not_found", Some("debit_account_id"), "B debits A's account");
        let r = post(
            &mut c,
            "/v1/transfers",
            &b,
            &json!({"id": uuid(), "debit_account_id": a_src, "credit_account_id": a_dst, "amount": 100}),
        )
        .await;
        assert_problem(&r, 422, "debit_account_not_found", Some("debit_account_id"), "B moves between A's accounts");
        let r = post(
            &mut c,
            "/v1/transfers",
            &b,
            &json!({"id": uuid(), "debit_account_id": b_acct, "credit_account_id": a_dst, "amount": 100}),
        )
        .await;
        assert_problem(&r, 422, "credit_account_not_found", Some("credit_account_id"), "B credits A's account");
        let r = post(
            &mut c,
            "/v1/transfers/batch",
            &b,
            &json!({"transfers": [{"id": uuid(), "debit_account_id": a_src, "credit_account_id": b_acct, "amount": 1},
                                  {"id": uuid(), "post_pending_id": a_hold}]}),
        )
        .await;
        assert_status(&r, 200, "B's batch naming A's ids");
        let v = r.json();
        let results: Vec<&str> = v["results"].as_array().unwrap().iter().map(|x| x["result"].as_str().unwrap()).collect();
        assert_eq!(results, ["debit_account_not_found", "pending_transfer_not_found"]);

        // A sees everything as it was: balances, the hold still pending, the accounts open.
        assert_eq!(balances(&mut c, &a, &[&a_src, &a_dst]).await, before);
        assert_eq!(get(&mut c, &format!("/v1/transfers/{a_hold}"), &a).await.json()["status"], "pending");
        for id in [&a_src, &a_dst] {
            let v = get(&mut c, &format!("/v1/accounts/{id}"), &a).await.json();
            assert_eq!(v["flags"]["closed"], false, "B closed A's account");
        }
        assert_eq!(balance(&mut c, &b, &b_acct).await, json!({"debits_posted": 0, "credits_posted": 0, "debits_pending": 0, "credits_pending": 0, "available": 0}));
        // The same transfer id in two tenants names two transfers.
        let b_other = account(&mut c, &b, json!({"currency": "BRL"})).await;
        let r = post(
            &mut c,
            "/v1/transfers",
            &b,
            &json!({"id": a_moved, "debit_account_id": b_acct, "credit_account_id": b_other, "amount": 7}),
        )
        .await;
        assert_status(&r, 201, "B reuses A's transfer id in its own ledger");
        assert_eq!(get(&mut c, &format!("/v1/transfers/{a_moved}"), &a).await.json()["amount"], 500);
        assert_eq!(get(&mut c, &format!("/v1/transfers/{a_moved}"), &b).await.json()["amount"], 7);
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

#[test]
fn repeats_are_idempotent_and_ids_are_never_reused() {
    let dir = temp_dir("api-idempotency");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "idempotency").await;
        let src = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let dst = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let poor =
            account(&mut c, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;

        // Exact repeat: 200 and the very same bytes.
        let id = uuid();
        let body = json!({"id": id, "debit_account_id": src, "credit_account_id": dst, "amount": 250, "code": 7, "metadata": {"ref": "x1"}});
        let first = post(&mut c, "/v1/transfers", &key, &body).await;
        assert_status(&first, 201, "first");
        let again = post(&mut c, "/v1/transfers", &key, &body).await;
        assert_status(&again, 200, "exact repeat");
        assert_eq!(again.body, first.body, "the repeat answers byte for byte what the creation did");
        // The same fields written in another order are the same request.
        let reordered = format!(
            r#"{{"metadata": {{"ref": "x1"}}, "code": 7, "amount": 250, "credit_account_id": "{dst}", "debit_account_id": "{src}", "id": "{id}"}}"#
        );
        let r = c.send(Method::POST, "/v1/transfers", Some(&key), Some(Bytes::from(reordered))).await.unwrap();
        assert_status(&r, 200, "reordered repeat");
        assert_eq!(r.body, first.body);
        // Same id, different body.
        for (what, changed) in [
            ("amount", json!({"id": id, "debit_account_id": src, "credit_account_id": dst, "amount": 251, "code": 7, "metadata": {"ref": "x1"}})),
            ("code", json!({"id": id, "debit_account_id": src, "credit_account_id": dst, "amount": 250, "code": 8, "metadata": {"ref": "x1"}})),
            ("metadata", json!({"id": id, "debit_account_id": src, "credit_account_id": dst, "amount": 250, "code": 7})),
            ("direction", json!({"id": id, "debit_account_id": dst, "credit_account_id": src, "amount": 250, "code": 7, "metadata": {"ref": "x1"}})),
        ] {
            let r = post(&mut c, "/v1/transfers", &key, &changed).await;
            assert_problem(&r, 409, "exists_with_different_fields", Some("id"), what);
        }
        assert_eq!(balance(&mut c, &key, &dst).await["credits_posted"], 250, "applied exactly once");
        assert_eq!(balance(&mut c, &key, &src).await["debits_posted"], 250, "applied exactly once");

        // A failure is remembered under its id, even once it would succeed.
        let failed = uuid();
        let body = json!({"id": failed, "debit_account_id": poor, "credit_account_id": dst, "amount": 50});
        let r = post(&mut c, "/v1/transfers", &key, &body).await;
        assert_problem(&r, 422, "insufficient_funds", Some("amount"), "unfunded");
        transfer(&mut c, &key, &src, &poor, 100).await;
        let r = post(&mut c, "/v1/transfers", &key, &body).await;
        assert_problem(&r, 422, "insufficient_funds", Some("amount"), "the same request after funding");
        let r = post(
            &mut c,
            "/v1/transfers",
            &key,
            &json!({"id": failed, "debit_account_id": poor, "credit_account_id": dst, "amount": 40}),
        )
        .await;
        assert_problem(&r, 409, "id_already_failed", Some("id"), "a different request under a failed id");
        let r = get(&mut c, &format!("/v1/transfers/{failed}"), &key).await;
        assert_problem(&r, 404, "not_found", None, "a failed id is no transfer");
        let b = balance(&mut c, &key, &poor).await;
        assert_eq!((b["credits_posted"].as_u64(), b["debits_posted"].as_u64()), (Some(100), Some(0)));
        assert_eq!(balance(&mut c, &key, &dst).await["credits_posted"], 250);

        // Account creation without an id: the Idempotency-Key names it.
        let idem = format!("open-{}", uuid());
        let body = Bytes::from(bytes(&json!({"currency": "BRL", "code": 3})));
        let headers = [("idempotency-key", idem.as_str())];
        let r1 = c.send_with_headers(Method::POST, "/v1/accounts", Some(&key), Some(body.clone()), &headers).await.unwrap();
        assert_status(&r1, 201, "first creation with an Idempotency-Key");
        let r2 = c.send_with_headers(Method::POST, "/v1/accounts", Some(&key), Some(body.clone()), &headers).await.unwrap();
        assert_status(&r2, 200, "repeat with the same Idempotency-Key");
        let account_id = r1.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(r2.json()["id"].as_str(), Some(account_id.as_str()), "the same account");
        assert_eq!(r2.body, r1.body);
        let other = Bytes::from(bytes(&json!({"currency": "USD", "code": 3})));
        let r = c.send_with_headers(Method::POST, "/v1/accounts", Some(&key), Some(other), &headers).await.unwrap();
        assert_problem(&r, 409, "exists_with_different_fields", Some("Idempotency-Key"), "same key, other currency");
        let r = c
            .send_with_headers(Method::POST, "/v1/accounts", Some(&key), Some(body.clone()), &[("idempotency-key", "another")])
            .await
            .unwrap();
        assert_status(&r, 201, "another Idempotency-Key opens another account");
        assert_ne!(r.json()["id"].as_str(), Some(account_id.as_str()));
        let long = "k".repeat(256);
        let r = c
            .send_with_headers(Method::POST, "/v1/accounts", Some(&key), Some(body.clone()), &[("idempotency-key", &long)])
            .await
            .unwrap();
        assert_problem(&r, 422, "invalid_idempotency_key", Some("Idempotency-Key"), "a 256-character key");
        // Without either, each creation is a new account.
        let x = post(&mut c, "/v1/accounts", &key, &json!({"currency": "BRL"})).await;
        let y = post(&mut c, "/v1/accounts", &key, &json!({"currency": "BRL"})).await;
        assert_status(&x, 201, "x");
        assert_status(&y, 201, "y");
        assert_ne!(x.json()["id"], y.json()["id"]);
        // The Idempotency-Key is per tenant: another tenant gets its own account.
        let (_, key2) = tenant(&mut c, "idempotency 2").await;
        let r = c.send_with_headers(Method::POST, "/v1/accounts", Some(&key2), Some(body), &headers).await.unwrap();
        assert_status(&r, 201, "the other tenant's first use of the same key");
        assert_ne!(r.json()["id"].as_str(), Some(account_id.as_str()));
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

#[test]
fn two_phase_transfers_over_http() {
    let dir = temp_dir("api-two-phase");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "two-phase").await;
        let src = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let payer =
            account(&mut c, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;
        let payee = account(&mut c, &key, json!({"currency": "BRL"})).await;
        transfer(&mut c, &key, &src, &payer, 1_000).await;
        let hold = |id: &str, amount: u64, timeout: u32| {
            json!({"id": id, "debit_account_id": payer, "credit_account_id": payee, "amount": amount, "pending": true, "timeout_seconds": timeout})
        };

        // A hold, partly posted; the rest is released; a void afterwards is refused.
        let h1 = uuid();
        let r = post(&mut c, "/v1/transfers", &key, &hold(&h1, 300, 3600)).await;
        assert_status(&r, 201, "hold");
        let hold_answer = r.body.clone();
        let v = r.json();
        assert_eq!((v["kind"].as_str(), v["status"].as_str()), (Some("pending"), Some("pending")));
        assert_eq!(v["timeout_seconds"], 3600);
        assert!(v["expires_at"].is_string(), "a hold with a timeout has expires_at: {v}");
        let b = balance(&mut c, &key, &payer).await;
        assert_eq!((b["debits_pending"].as_u64(), b["available"].as_i64()), (Some(300), Some(700)));
        let p1 = uuid();
        let r = post(&mut c, &format!("/v1/transfers/{h1}/post"), &key, &json!({"id": p1, "amount": 120})).await;
        assert_status(&r, 201, "partial post");
        let v = r.json();
        assert_eq!(v["kind"], "post_pending");
        assert_eq!(v["status"], "posted");
        assert_eq!(v["amount"], 120);
        assert_eq!(v["pending_id"].as_str(), Some(h1.as_str()));
        let repeat = post(&mut c, &format!("/v1/transfers/{h1}/post"), &key, &json!({"id": p1, "amount": 120})).await;
        assert_status(&repeat, 200, "repeat of the post");
        assert_eq!(repeat.body, r.body);
        assert_eq!(get(&mut c, &format!("/v1/transfers/{h1}"), &key).await.json()["status"], "posted");
        // The hold's creation repeated gets the answer its creation got, byte for byte (`pending`),
        // though it was posted since: the same body; `GET` shows it as it is now.
        let again = post(&mut c, "/v1/transfers", &key, &hold(&h1, 300, 3600)).await;
        assert_status(&again, 200, "repeat of the hold");
        assert_eq!(again.body, hold_answer);
        let r = post(&mut c, &format!("/v1/transfers/{h1}/void"), &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 409, "pending_transfer_already_posted", Some("pending_id"), "void after post");
        let r = post(&mut c, &format!("/v1/transfers/{h1}/post"), &key, &json!({"id": uuid(), "amount": 1})).await;
        assert_problem(&r, 409, "pending_transfer_already_posted", Some("pending_id"), "second post");
        let b = balance(&mut c, &key, &payer).await;
        assert_eq!(
            (b["debits_posted"].as_u64(), b["debits_pending"].as_u64(), b["available"].as_i64()),
            (Some(120), Some(0), Some(880))
        );
        assert_eq!(balance(&mut c, &key, &payee).await["credits_posted"], 120);

        // More than the hold; then a void; then nothing more.
        let h2 = uuid();
        assert_status(&post(&mut c, "/v1/transfers", &key, &hold(&h2, 100, 0)).await, 201, "hold 2");
        let r = post(&mut c, &format!("/v1/transfers/{h2}/post"), &key, &json!({"id": uuid(), "amount": 150})).await;
        assert_problem(&r, 422, "exceeds_pending_transfer_amount", Some("amount"), "post beyond the hold");
        let r = post(&mut c, &format!("/v1/transfers/{h2}/void"), &key, &json!({"id": uuid()})).await;
        assert_status(&r, 201, "void");
        assert_eq!((r.json()["kind"].as_str(), r.json()["status"].as_str()), (Some("void_pending"), Some("voided")));
        assert_eq!(get(&mut c, &format!("/v1/transfers/{h2}"), &key).await.json()["status"], "voided");
        let r = post(&mut c, &format!("/v1/transfers/{h2}/post"), &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 409, "pending_transfer_already_voided", Some("pending_id"), "post after void");
        assert_eq!(balance(&mut c, &key, &payer).await["available"], 880);

        // A hold of 1 s expires by itself and releases the money.
        let h3 = uuid();
        assert_status(&post(&mut c, "/v1/transfers", &key, &hold(&h3, 800, 1)).await, 201, "short hold");
        let b = balance(&mut c, &key, &payer).await;
        assert_eq!((b["debits_pending"].as_u64(), b["available"].as_i64()), (Some(800), Some(80)));
        let r = post(
            &mut c,
            "/v1/transfers",
            &key,
            &json!({"id": uuid(), "debit_account_id": payer, "credit_account_id": payee, "amount": 100}),
        )
        .await;
        assert_problem(&r, 422, "insufficient_funds", Some("amount"), "spending held money");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = get(&mut c, &format!("/v1/transfers/{h3}"), &key).await.json();
            if v["status"] == "expired" {
                break;
            }
            assert_eq!(v["status"], "pending", "{v}");
            assert!(Instant::now() < deadline, "the hold did not expire within 10 s: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let b = balance(&mut c, &key, &payer).await;
        assert_eq!(
            (b["debits_posted"].as_u64(), b["debits_pending"].as_u64(), b["available"].as_i64()),
            (Some(120), Some(0), Some(880)),
            "the expired hold released its money"
        );
        assert_eq!(balance(&mut c, &key, &payee).await["credits_pending"], 0);
        let r = post(&mut c, &format!("/v1/transfers/{h3}/post"), &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 409, "pending_transfer_expired", Some("pending_id"), "post after expiry");

        // Unknown and non-hold targets.
        let r = post(&mut c, &format!("/v1/transfers/{}/post", uuid()), &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 404, "pending_transfer_not_found", Some("pending_id"), "post of an unknown hold");
        let r = post(&mut c, &format!("/v1/transfers/{}/void", uuid()), &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 404, "pending_transfer_not_found", Some("pending_id"), "void of an unknown hold");
        let plain = transfer(&mut c, &key, &src, &payee, 5).await;
        let r = post(&mut c, &format!("/v1/transfers/{plain}/post"), &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 409, "pending_transfer_not_pending", Some("pending_id"), "post of a plain transfer");
        let r = post(&mut c, "/v1/transfers/not-a-uuid/post", &key, &json!({"id": uuid()})).await;
        assert_problem(&r, 422, "invalid_uuid", Some("pending_id"), "post of a non-UUID");
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

fn results(v: &Value) -> Vec<(u64, String, String)> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["id"].as_str().unwrap().to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `body` as JSON text with `metadata` written as given (`json!` cannot repeat a key).
fn valid_text_with_metadata(body: &Value, metadata: &str) -> Vec<u8> {
    let text = serde_json::to_string(body).unwrap();
    let open = text.strip_suffix('}').unwrap();
    format!(r#"{open},"metadata":{metadata}}}"#).into_bytes()
}

#[test]
fn batches_linked_all_or_nothing_and_unlinked_per_item() {
    let dir = temp_dir("api-batch");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "batches").await;
        let src = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let payer =
            account(&mut c, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;
        let x = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let y = account(&mut c, &key, json!({"currency": "BRL"})).await;
        transfer(&mut c, &key, &src, &payer, 100).await;
        let accounts = [src.as_str(), payer.as_str(), x.as_str(), y.as_str()];
        let item = |debit: &str, credit: &str, amount: u64| {
            json!({"id": uuid(), "debit_account_id": debit, "credit_account_id": credit, "amount": amount})
        };
        let id_of = |v: &Value| v["id"].as_str().unwrap().to_owned();

        // Linked: the last fails, so none applies.
        let before = balances(&mut c, &key, &accounts).await;
        let items = vec![item(&src, &x, 10), item(&payer, &y, 20), item(&src, &y, 30), item(&payer, &x, 1_000)];
        let r = post(&mut c, "/v1/transfers/batch", &key, &json!({"transfers": items, "linked": true})).await;
        assert_status(&r, 200, "linked batch");
        let expected: Vec<(u64, String, String)> = items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let result = if i == 3 { "insufficient_funds" } else { "linked_event_failed" };
                (i as u64, id_of(v), result.to_owned())
            })
            .collect();
        assert_eq!(results(&r.json()), expected);
        for result in r.json()["results"].as_array().unwrap() {
            assert!(result.get("transfer").is_none(), "a failed item has no transfer: {result}");
        }
        assert_eq!(balances(&mut c, &key, &accounts).await, before, "a failed linked batch changed a balance");
        for v in &items {
            let r = get(&mut c, &format!("/v1/transfers/{}", id_of(v)), &key).await;
            assert_problem(&r, 404, "not_found", None, "an item of a failed linked batch");
        }

        // Linked and all valid: all apply.
        let items = vec![item(&src, &x, 10), item(&payer, &y, 20)];
        let r = post(&mut c, "/v1/transfers/batch", &key, &json!({"transfers": items, "linked": true})).await;
        assert_status(&r, 200, "linked batch that succeeds");
        let got: Vec<String> = results(&r.json()).into_iter().map(|(_, _, r)| r).collect();
        assert_eq!(got, ["created", "created"]);
        assert_eq!(balance(&mut c, &key, &payer).await["available"], 80);

        // Unlinked: each item stands alone; results in order.
        let before = balances(&mut c, &key, &accounts).await;
        let first = item(&src, &x, 1);
        let items = vec![
            first.clone(),
            item(&payer, &x, 1_000),
            item(&src, &y, 2),
            item(&x, &x, 3),
            first.clone(),
            item(&payer, &y, 4),
        ];
        // Item 3 breaks a rule checked before anything is applied: the whole request is refused.
        let r = post(&mut c, "/v1/transfers/batch", &key, &json!({"transfers": items})).await;
        assert_problem(&r, 422, "accounts_must_be_different", Some("transfers[3].credit_account_id"), "batch item 3");
        assert_eq!(balances(&mut c, &key, &accounts).await, before);
        let mut items = items;
        items[3] = item(&x, &y, 3);
        // An id given twice with two bodies is a conflict the request shows alone: refused whole,
        // linked or not (the same id with the same body is a repeat, below).
        let mut twice = items.clone();
        twice[4]["amount"] = json!(7);
        for linked in [false, true] {
            let r = post(&mut c, "/v1/transfers/batch", &key, &json!({"transfers": twice, "linked": linked})).await;
            assert_problem(&r, 422, "duplicate_id", Some("transfers[4].id"), "one id, two bodies");
            assert_eq!(balances(&mut c, &key, &accounts).await, before);
        }
        let r = post(&mut c, "/v1/transfers/batch", &key, &json!({"transfers": items, "linked": false})).await;
        assert_status(&r, 200, "unlinked batch");
        let expected: Vec<(u64, String, String)> = items
            .iter()
            .enumerate()
            .zip(["created", "insufficient_funds", "created", "created", "exists", "created"])
            .map(|((i, v), result)| (i as u64, id_of(v), result.to_owned()))
            .collect();
        assert_eq!(results(&r.json()), expected);
        let v = r.json();
        for (i, result) in v["results"].as_array().unwrap().iter().enumerate() {
            assert_eq!(result.get("transfer").is_some(), i != 1, "item {i}: {result}");
        }
        let after = balances(&mut c, &key, &accounts).await;
        let posted = |m: &BTreeMap<String, Value>, a: &str, side: &str| m[a][side].as_u64().unwrap();
        assert_eq!(posted(&after, &x, "credits_posted"), posted(&before, &x, "credits_posted") + 1);
        assert_eq!(posted(&after, &x, "debits_posted"), posted(&before, &x, "debits_posted") + 3);
        assert_eq!(posted(&after, &y, "credits_posted"), posted(&before, &y, "credits_posted") + 2 + 3 + 4);
        assert_eq!(posted(&after, &payer, "debits_posted"), posted(&before, &payer, "debits_posted") + 4);
        assert_eq!(posted(&after, &src, "debits_posted"), posted(&before, &src, "debits_posted") + 1 + 2);

        // A hold and its post in one batch.
        let h = uuid();
        let r = post(
            &mut c,
            "/v1/transfers/batch",
            &key,
            &json!({"transfers": [
                {"id": h, "debit_account_id": src, "credit_account_id": x, "amount": 9, "pending": true},
                {"id": uuid(), "post_pending_id": h, "amount": 4},
            ]}),
        )
        .await;
        assert_status(&r, 200, "hold and post");
        let got: Vec<String> = results(&r.json()).into_iter().map(|(_, _, r)| r).collect();
        assert_eq!(got, ["created", "created"]);
        assert_eq!(get(&mut c, &format!("/v1/transfers/{h}"), &key).await.json()["status"], "posted");
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

#[test]
fn listing_pages_newest_first_without_gaps_or_duplicates() {
    let dir = temp_dir("api-listing");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "listing").await;
        let src = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let acct =
            account(&mut c, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;
        let other = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let mut created = vec![transfer(&mut c, &key, &src, &acct, 10_000).await];
        for i in 0..30u64 {
            let id = if i % 2 == 0 {
                transfer(&mut c, &key, &acct, &other, i + 1).await
            } else {
                transfer(&mut c, &key, &other, &acct, i + 1).await
            };
            created.push(id);
        }
        // Transfers of other accounts do not show.
        let others = transfer(&mut c, &key, &src, &other, 1).await;

        let mut seen = Vec::new();
        let mut timestamps = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                Some(cur) => format!("/v1/accounts/{acct}/transfers?limit=7&cursor={cur}"),
                None => format!("/v1/accounts/{acct}/transfers?limit=7"),
            };
            let r = get(&mut c, &path, &key).await;
            assert_status(&r, 200, "page");
            let v = r.json();
            let data = v["data"].as_array().unwrap();
            assert!(data.len() <= 7, "a page longer than the limit");
            for t in data {
                seen.push(t["id"].as_str().unwrap().to_owned());
                timestamps.push(t["timestamp"].as_u64().unwrap());
                assert!(t["debit_account_id"] == json!(acct) || t["credit_account_id"] == json!(acct), "{t}");
            }
            pages += 1;
            assert!(pages <= 10, "the cursor does not advance");
            match v["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(pages, 5, "31 transfers in pages of 7");
        assert!(timestamps.windows(2).all(|w| w[0] > w[1]), "not newest first: {timestamps:?}");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a transfer listed twice");
        let mut newest_first = created.clone();
        newest_first.reverse();
        assert_eq!(seen, newest_first, "all 30 and the funding, newest first");

        // One page of everything agrees.
        let v = get(&mut c, &format!("/v1/accounts/{acct}/transfers?limit=1000"), &key).await.json();
        let all: Vec<&str> = v["data"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
        assert_eq!(all, newest_first.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(v["next_cursor"].is_null(), "a short page has no next_cursor");
        // The default page is 50.
        let v = get(&mut c, &format!("/v1/accounts/{acct}/transfers"), &key).await.json();
        assert_eq!(v["data"].as_array().unwrap().len(), 31);

        let bad = [
            ("cursor=zz", "invalid_cursor", "cursor"),
            ("cursor=abc", "invalid_cursor", "cursor"),
            ("cursor=00112233", "invalid_cursor", "cursor"),
            ("cursor=", "invalid_cursor", "cursor"),
            ("limit=0", "invalid_limit", "limit"),
            ("limit=1001", "invalid_limit", "limit"),
            ("limit=-1", "invalid_limit", "limit"),
            ("limit=ten", "invalid_limit", "limit"),
            // `+7`, percent-encoded (a bare `+` in a query is a space).
            ("limit=%2B7", "invalid_limit", "limit"),
            ("limit=7&page=2", "unknown_parameter", "page"),
            // The first by name, each time (not the hash map's order): asked five times.
            ("z=3&b=2&a=1", "unknown_parameter", "a"),
            ("z=3&b=2&a=1", "unknown_parameter", "a"),
            ("z=3&b=2&a=1", "unknown_parameter", "a"),
            ("z=3&b=2&a=1", "unknown_parameter", "a"),
            ("z=3&b=2&a=1", "unknown_parameter", "a"),
            // Which of two to honour would be a guess.
            ("limit=5&limit=9", "duplicate_parameter", "limit"),
            ("cursor=&limit=5&cursor=", "duplicate_parameter", "cursor"),
        ];
        for (query, code, field) in bad {
            let r = get(&mut c, &format!("/v1/accounts/{acct}/transfers?{query}"), &key).await;
            assert_problem(&r, 422, code, Some(field), query);
        }
        // A well-formed cursor that is not a transfer of this listing: another account's, or
        // no transfer's at all.
        let others_at =
            get(&mut c, &format!("/v1/transfers/{others}"), &key).await.json()["timestamp"].as_u64().unwrap();
        for cursor in [others_at, 1, u64::MAX] {
            let r = get(&mut c, &format!("/v1/accounts/{acct}/transfers?cursor={cursor:016x}"), &key).await;
            assert_problem(&r, 422, "invalid_cursor", Some("cursor"), &format!("cursor {cursor:016x}"));
        }
        let r = get(&mut c, &format!("/v1/accounts/{}/transfers", uuid()), &key).await;
        assert_problem(&r, 404, "not_found", None, "listing an unknown account");
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

#[test]
fn metrics_ask_for_their_token_when_one_is_set() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let token = "metrics-0123456789abcdef0123456789abcdef";
    let dir = temp_dir("api-metrics-token");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--metrics-token", token]);
    runtime().block_on(async {
        let mut c = server.client();
        for presented in [None, Some("metrics-0123456789abcdef0123456789abcdeX"), Some(OPERATOR)] {
            let r = c.send(Method::GET, "/metrics", presented, None).await.unwrap();
            assert_eq!(r.status, 401, "{presented:?}");
            assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer realm=\"metrics\"");
            assert!(!String::from_utf8_lossy(&r.body).contains("rtpay_"), "no metric leaks in the refusal");
        }
        let r = c.send(Method::GET, "/metrics", Some(token), None).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).contains("rtpay_http_requests_total"));
        // Health and readiness stay open for probes.
        assert_eq!(c.send(Method::GET, "/readyz", None, None).await.unwrap().status, 200);
        // Two credentials are refused; and a wrong token is a failed authentication like any
        // other: the address waits once it has failed twenty times (three above, this one).
        let twice = format!(
            "GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nauthorization: Bearer {OPERATOR}\r\nconnection: close\r\n\r\n"
        );
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(twice.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 400") && got.contains("\"duplicate_header\""), "{got}");
        let mut statuses = Vec::new();
        for _ in 0..18 {
            statuses.push(c.send(Method::GET, "/metrics", Some(OPERATOR), None).await.unwrap().status.as_u16());
        }
        assert!(statuses[..16].iter().all(|s| *s == 401) && statuses[16..].iter().all(|s| *s == 429), "{statuses:?}");
        let r = c.send(Method::GET, "/metrics", Some(token), None).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (429, json!("auth_throttled")));
    });
    // A guessable token is refused before anything starts.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-token", "short"])
        .arg("--data")
        .arg(dir.join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32"), "{stderr}");
    assert!(!stderr.contains("short"), "the refused token is not echoed: {stderr}");
    assert!(!dir.join("other").exists(), "nothing was created");
}

#[test]
fn health_readiness_metrics_and_openapi() {
    let dir = temp_dir("api-ops");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        // Some traffic first, so the ledger counters have something to count.
        let (_, key) = tenant(&mut c, "ops").await;
        let a = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let b = account(&mut c, &key, json!({"currency": "BRL"})).await;
        transfer(&mut c, &key, &a, &b, 1).await;

        for (path, status) in [("/healthz", "ok"), ("/readyz", "ready")] {
            let r = c.send(Method::GET, path, None, None).await.unwrap();
            assert_status(&r, 200, path);
            assert_eq!(r.json()["status"], status, "{path}");
        }
        let r = c.send(Method::GET, "/metrics", None, None).await.unwrap();
        assert_status(&r, 200, "metrics");
        let content_type = r.headers.get("content-type").unwrap().to_str().unwrap();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        assert!(text.contains("rtpay_http_requests_total"), "{text}");
        assert!(text.contains("rtpay_ledger_batches_total"), "{text}");
        // One clock on an embedded engine: nothing to measure it against.
        assert!(!text.contains("rtpay_clock_skew_seconds"), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("rtpay_http_requests_total")
                && l.contains("route=\"/v1/transfers\"")
                && l.contains("status=\"201\"")),
            "the transfer is counted by route and status: {text}"
        );
        let batches = text
            .lines()
            .find(|l| l.starts_with("rtpay_ledger_batches_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no rtpay_ledger_batches_total sample: {text}"));
        assert!(batches >= 1.0, "{batches}");
        // The embedded engine syncs beside the writer, and each sync is in the latency histogram.
        let sample = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
                .unwrap_or_else(|| panic!("no {name} sample: {text}"))
        };
        let syncs = sample("rtpay_ledger_syncs_total");
        assert!(syncs >= 1.0, "{syncs}");
        assert_eq!(sample("rtpay_ledger_sync_duration_seconds_count"), syncs);
        assert_eq!(sample("rtpay_ledger_sync_duration_seconds_bucket{le=\"+Inf\"}"), syncs);

        let r = c.send(Method::GET, "/openapi.json", None, None).await.unwrap();
        assert_status(&r, 200, "openapi");
        assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
        let doc: Value = serde_json::from_slice(&r.body).expect("the OpenAPI document is JSON");
        let version = doc["openapi"].as_str().unwrap_or("");
        assert!(version.starts_with("3."), "openapi {version:?}");
        for path in ["/v1/transfers", "/v1/accounts/{id}", "/v1/transfers/batch", "/v1/accounts/{id}/transfers"] {
            assert!(doc["paths"].get(path).is_some(), "the document lacks {path}");
        }
        // Every request carries a request id back.
        let r = c.send(Method::GET, "/healthz", None, None).await.unwrap();
        assert!(r.headers.get("x-request-id").is_some_and(|v| !v.is_empty()));
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

#[test]
fn operator_token_file_is_created_private_and_works() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("api-operator-token");
    let mut server = Server::start_without_operator_env(&dir, None);
    let path = dir.join("operator-token");
    let meta = std::fs::metadata(&path).expect("<data>/operator-token exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "operator-token mode");
    let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    assert!(token.starts_with("rtpay_op_") && token.len() >= 32, "{token:?}");
    runtime().block_on(async {
        let mut c = server.client();
        let r = post(&mut c, "/v1/tenants", &token, &json!({"name": "from the file"})).await;
        assert_status(&r, 201, "the file's token is the operator token");
        let r = post(&mut c, "/v1/tenants", OPERATOR, &json!({"name": "not this one"})).await;
        assert_problem(&r, 401, "unauthorized", None, "the test's fixed token is not this server's");
    });
    // A restart reuses the file instead of making a new token.
    server.stop();
    server.restart();
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), token, "the token changed on restart");
    runtime().block_on(async {
        let mut c = server.client();
        let r = post(&mut c, "/v1/tenants", &token, &json!({"name": "after restart"})).await;
        assert_status(&r, 201, "the file's token after a restart");
        assert_no_5xx_in_metrics(&mut c).await;
    });
}

#[test]
fn operator_creations_honour_idempotency_keys() {
    let dir = temp_dir("api-idem-op");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let idem = format!("tenant-{}", uuid());
        let headers = [("idempotency-key", idem.as_str())];
        let body = Bytes::from(bytes(&json!({"name": "once"})));
        let r1 = c
            .send_with_headers(Method::POST, "/v1/tenants", Some(OPERATOR), Some(body.clone()), &headers)
            .await
            .unwrap();
        assert_status(&r1, 201, "first tenant creation");
        // It shows a secret: no cache on the way may keep it.
        assert_eq!(r1.headers.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
        let r2 = c.send_with_headers(Method::POST, "/v1/tenants", Some(OPERATOR), Some(body), &headers).await.unwrap();
        assert_problem(
            &r2,
            409,
            "exists",
            Some("Idempotency-Key"),
            "the same Idempotency-Key creates no second tenant",
        );
        let tenant_id = r1.json()["id"].as_str().unwrap().to_owned();
        let path = format!("/v1/tenants/{tenant_id}/api-keys");
        let key_idem = [("idempotency-key", "rotate-2026-11")];
        let k1 = c.send_with_headers(Method::POST, &path, Some(OPERATOR), None, &key_idem).await.unwrap();
        assert_status(&k1, 201, "first key creation");
        assert_eq!(k1.headers.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
        let k2 = c.send_with_headers(Method::POST, &path, Some(OPERATOR), None, &key_idem).await.unwrap();
        assert_problem(&k2, 409, "exists", Some("Idempotency-Key"), "the same Idempotency-Key creates no second key");
        // The one key that was created works.
        let secret = k1.json()["secret"].as_str().unwrap().to_owned();
        let r = post(&mut c, "/v1/accounts", &secret, &json!({"currency": "BRL"})).await;
        assert_status(&r, 201, "the new key works");
    });
}
