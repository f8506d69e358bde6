//! Abuse limits over real sockets: a tenant's request rate, failed authentications throttled per
//! source, and a credential locked after ten failures in a row — with the lock in the audit log.

mod common;

use common::*;
use rtpay::client::Client;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn a_tenant_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let dir = temp_dir("limits-rate");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--rate-limit", "1", "--rate-burst", "5"]);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, busy) = tenant(&mut c, "busy").await;
        let (_, calm) = tenant(&mut c, "calm").await;
        // Reads and writes draw on one bucket. Four of the burst are reads, which wait for no sync:
        // all six requests must come within the second that refills a token.
        let started = Instant::now();
        for i in 0..4 {
            assert_eq!(c.get("/v1/audit", &busy).await.unwrap().status, 200, "request {i} is within the burst");
        }
        let r = c.post("/v1/accounts", &busy, &json!({"currency": "BRL"})).await.unwrap();
        assert_eq!(r.status, 201, "the fifth request is within the burst");
        let r = c.post("/v1/accounts", &busy, &json!({"currency": "BRL"})).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "the burst took a second: the test proves nothing");
        assert_eq!(r.status, 429, "{:?}", r.json());
        assert_eq!(r.json()["code"], json!("rate_limited"));
        assert_eq!(r.headers.get("retry-after").unwrap(), "1");
        // Reads are refused too; another tenant has its own bucket.
        assert_eq!(c.get("/v1/audit", &busy).await.unwrap().status, 429);
        assert_eq!(c.post("/v1/accounts", &calm, &json!({"currency": "BRL"})).await.unwrap().status, 201);
        // A second later the busy tenant may go on.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(c.post("/v1/accounts", &busy, &json!({"currency": "BRL"})).await.unwrap().status, 201);
    });
}

#[test]
fn ten_failures_lock_the_operator_credential_and_the_lock_is_audited() {
    let dir = temp_dir("limits-lock");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "watcher").await;
        let wrong = format!("rtpay_op_{}", "1".repeat(64));
        for i in 1..=10 {
            let r = c.post("/v1/tenants", &wrong, &json!({"name": "x"})).await.unwrap();
            assert_eq!(r.status, 401, "failure {i}");
        }
        // Now even the right token waits out the lock.
        let r = c.post("/v1/tenants", OPERATOR, &json!({"name": "x"})).await.unwrap();
        assert_eq!(r.status, 429, "{:?}", r.json());
        assert_eq!(r.json()["code"], json!("credential_locked"));
        let retry: u64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        assert!((1790..=1800).contains(&retry), "{retry}");
        // Tenants' keys are another credential: they still work, and nothing was created.
        let r = c.get("/v1/audit/tree-head", &key).await.unwrap();
        assert_eq!(r.status, 200);
        // The lock is in the audit log (read here from storage; the audit routes have a lock of
        // their own for the operator's token, which these failures did not touch).
        let queries = store::Store::open_queries(&store::Location::Embedded(dir.clone())).unwrap();
        let entries = queries.audit_entries(0, 100, None).unwrap();
        let lock = entries.iter().find(|e| e.draft.action == "auth.lock").expect("the lock is audited");
        assert_eq!(lock.draft.resource, "operator");
        assert!(lock.draft.outcome.contains("1800"));
        let failures = entries.iter().filter(|e| e.draft.outcome == "401").count();
        assert_eq!(failures, 10, "each failed authentication is recorded");
        assert!(!entries.iter().any(|e| e.draft.outcome == "429"), "throttled requests are counted, not recorded");
        assert_eq!(
            entries.iter().filter(|e| e.draft.action == "POST /v1/tenants" && e.draft.outcome == "201").count(),
            1
        );
    });
}

/// The audit routes take a tenant's key or the operator's token: a stranger's wrong tokens there
/// lock the operator's token on those routes only, not on the operator's own (before, ten of them
/// locked the operator out of every operator route, revoking a leaked key included).
#[test]
fn wrong_tokens_on_a_tenants_route_do_not_lock_the_operator_out_of_its_routes() {
    let dir = temp_dir("limits-no-operator-lock");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let wrong = format!("rtpay_op_{}", "2".repeat(64));
        for i in 1..=10 {
            assert_eq!(c.get("/v1/audit", &wrong).await.unwrap().status, 401, "failure {i}");
        }
        // Guessing there is bounded all the same: the token is locked on those routes.
        let r = c.get("/v1/audit", OPERATOR).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (429, json!("credential_locked")));
        let r = c.post("/v1/tenants", OPERATOR, &json!({"name": "after"})).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
    });
}

#[test]
fn a_source_with_too_many_failures_is_throttled_before_credentials_are_checked() {
    let dir = temp_dir("limits-source");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "victim").await;
        let wrong = format!("rtpay_sk_{}", "2".repeat(64));
        let mut statuses = Vec::new();
        let started = Instant::now();
        for _ in 0..25 {
            statuses.push(c.get("/v1/audit", &wrong).await.unwrap().status.as_u16());
        }
        assert_throttled_after_twenty(&statuses);
        let r = c.get("/v1/audit", &key).await.unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["code"], json!("auth_throttled"));
        // The bucket (20, then 10 a minute: a token every 6 s) refills from the first failure: the
        // next token is due 6 s after it, less however long the requests took.
        let retry: f64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        let taken = started.elapsed().as_secs_f64();
        assert!(retry <= 6.0 && retry >= (6.0 - taken).ceil(), "Retry-After {retry} after {taken:.2} s");
    });
}

/// Requests no credential vouched for cannot grow the audit log, or fill the writer's queue,
/// without bound: a request no route takes (404 `no_route`, 405) is not audited at all; one
/// without an `Authorization` header is a failed authentication like a wrong one; and any other
/// request recorded without an accepted credential (here `/oauth/token` refused before the client
/// is known) counts as one too: once the address has spent its budget, it waits (429, unrecorded).
#[test]
fn requests_without_an_accepted_credential_cannot_flood_the_audit_log() {
    let dir = temp_dir("limits-anonymous");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "noisy").await;
        for _ in 0..30 {
            assert_eq!(c.post("/v1/nowhere", &key, &json!({})).await.unwrap().status, 404);
            assert_eq!(c.send(hyper::Method::DELETE, "/healthz", Some(&key), None).await.unwrap().status, 405);
        }
        assert_eq!(c.get("/v1/audit", &key).await.unwrap().status, 200, "none of that spent the address's budget");
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(c.send(hyper::Method::GET, "/v1/audit", None, None).await.unwrap().status.as_u16());
        }
        assert_eq!(statuses, [401; 5], "no Authorization header");
        // Client credentials both ways at once: refused before the client is known.
        let both =
            [("authorization", "Basic Y2xpZW50OnNlY3JldA=="), ("content-type", "application/x-www-form-urlencoded")];
        let form = b"grant_type=client_credentials&client_id=client&client_secret=secret".to_vec();
        let mut statuses = Vec::new();
        for _ in 0..20 {
            let r =
                c.send_with_headers(hyper::Method::POST, "/oauth/token", None, Some(form.clone().into()), &both).await;
            statuses.push(r.unwrap().status.as_u16());
        }
        assert!(statuses[..15].iter().all(|s| *s == 400) && statuses[15..].iter().all(|s| *s == 429), "{statuses:?}");
        let r = c.get("/v1/audit", &key).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.json()["code"].clone()),
            (429, json!("auth_throttled")),
            "the budget is spent"
        );
    });
    drop(server);
    let queries = store::Store::open_queries(&store::Location::Embedded(dir.clone())).unwrap();
    let entries = queries.audit_entries(0, 1000, None).unwrap();
    let count = |action: &str, outcome: &str| {
        entries.iter().filter(|e| e.draft.action == action && e.draft.outcome == outcome).count()
    };
    assert_eq!(entries.iter().filter(|e| e.draft.action.contains("unmatched") || e.draft.outcome == "405").count(), 0);
    assert_eq!(count("GET /v1/audit", "401"), 5, "each failed authentication is recorded");
    assert_eq!(count("POST /oauth/token", "400"), 15, "recorded, each counted as a failure");
    assert!(!entries.iter().any(|e| e.draft.outcome == "429"));
}

/// Of 25 failed authentications from one address, the first 20 are judged (and fail); then the
/// address waits, whatever it sends.
fn assert_throttled_after_twenty(statuses: &[u16]) {
    assert_eq!(statuses.len(), 25);
    assert!(statuses[..20].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
}

/// `GET /v1/audit` with `token`, as a proxy would pass on a request from `client`.
async fn via_proxy(c: &mut Client, token: &str, client: &str) -> hyper::StatusCode {
    let forwarded = [("x-forwarded-for", client)];
    c.send_with_headers(hyper::Method::GET, "/v1/audit", Some(token), None, &forwarded).await.unwrap().status
}

#[test]
fn behind_a_trusted_proxy_the_throttle_counts_per_forwarded_client_and_the_audit_names_it() {
    let dir = temp_dir("limits-proxy");
    // The tests connect from 127.0.0.1: here it is the proxy.
    let server =
        Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--trusted-proxy", "127.0.0.0/8,10.0.0.0/8"]);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "behind-a-balancer").await;
        let wrong = format!("rtpay_sk_{}", "3".repeat(64));
        // One client fails 25 times; the client's own header is ahead of what the proxy appended.
        let mut statuses = Vec::new();
        for _ in 0..25 {
            statuses.push(via_proxy(&mut c, &wrong, "192.0.2.1, 203.0.113.7, 10.1.2.3").await.as_u16());
        }
        assert_throttled_after_twenty(&statuses);
        assert_eq!(via_proxy(&mut c, &key, "203.0.113.7").await, 429, "that client waits, even with a good key");
        // Other clients behind the same proxy do not.
        assert_eq!(via_proxy(&mut c, &key, "198.51.100.4").await, 200);
        assert_eq!(c.get("/v1/audit", &key).await.unwrap().status, 200, "nor does the proxy's own traffic");
    });
    // The audit log names the client, without a port.
    let queries = store::Store::open_queries(&store::Location::Embedded(dir.clone())).unwrap();
    let entries = queries.audit_entries(0, 100, None).unwrap();
    let failures: Vec<_> = entries.iter().filter(|e| e.draft.outcome == "401").collect();
    assert_eq!(failures.len(), 20);
    assert!(failures.iter().all(|e| e.draft.source == "203.0.113.7"), "{:?}", failures[0].draft.source);
}

#[test]
fn without_trusted_proxies_a_forwarded_header_changes_nothing() {
    let dir = temp_dir("limits-no-proxy");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "direct").await;
        let wrong = format!("rtpay_sk_{}", "4".repeat(64));
        // A client naming a new address each time is still one address.
        let mut statuses = Vec::new();
        for i in 0..25 {
            statuses.push(via_proxy(&mut c, &wrong, &format!("203.0.113.{i}")).await.as_u16());
        }
        assert_throttled_after_twenty(&statuses);
        assert_eq!(via_proxy(&mut c, &key, "198.51.100.4").await, 429);
    });
    let queries = store::Store::open_queries(&store::Location::Embedded(dir.clone())).unwrap();
    let entries = queries.audit_entries(0, 100, None).unwrap();
    assert!(entries.iter().filter(|e| e.draft.outcome == "401").all(|e| e.draft.source.starts_with("127.0.0.1:")));
}

#[test]
fn ten_wrong_secrets_naming_an_api_key_lock_that_key_and_only_that_key() {
    let dir = temp_dir("limits-key-lock");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_id, first) = tenant(&mut c, "keyed").await;
        // No body at all: an unscoped key.
        let path = format!("/v1/tenants/{tenant_id}/api-keys");
        let r = c.send(hyper::Method::POST, &path, Some(OPERATOR), None).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        assert!(r.json().get("scopes").is_none());
        let second = r.json()["secret"].as_str().unwrap().to_owned();
        let key_id = r.json()["id"].as_str().unwrap().to_owned();
        // The secret names its key: `rtpay_sk_<key id in hex>_<256 random bits>`.
        let named = key_id.replace('-', "");
        assert!(second.starts_with(&format!("rtpay_sk_{named}_")), "{second}");
        // Ten wrong secrets that name the key (within the source's budget of 20).
        let wrong = format!("rtpay_sk_{named}_{}", "3".repeat(64));
        for i in 1..=10 {
            assert_eq!(c.get("/v1/audit", &wrong).await.unwrap().status, 401, "failure {i}");
        }
        let r = c.get("/v1/audit", &second).await.unwrap();
        assert_eq!(r.status, 429, "the right secret waits out the lock: {:?}", r.json());
        assert_eq!(r.json()["code"], json!("credential_locked"));
        // The tenant's other key is another credential.
        assert_eq!(c.get("/v1/audit/tree-head", &first).await.unwrap().status, 200);
        let queries = store::Store::open_queries(&store::Location::Embedded(dir.clone())).unwrap();
        let entries = queries.audit_entries(0, 100, None).unwrap();
        let lock = entries.iter().find(|e| e.draft.action == "auth.lock").expect("the lock is audited");
        assert_eq!(lock.draft.resource, format!("key:{key_id}"));
    });
}
