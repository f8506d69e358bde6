//! OAuth2 client credentials end to end (RFC 6749 §4.4): clients with scopes, the token endpoint
//! with HTTP Basic or form authentication, scopes enforced per route, and lockout.

mod common;

use bytes::Bytes;
use common::*;
use hyper::Method;
use rtpay::client::{Client, Response};
use serde_json::json;

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

async fn token_request(c: &mut Client, form: &str, basic: Option<(&str, &str)>) -> Response {
    let auth = basic.map(|(id, secret)| format!("Basic {}", base64(format!("{id}:{secret}").as_bytes())));
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    c.send_with_headers(Method::POST, "/oauth/token", None, Some(Bytes::from(form.to_owned())), &headers).await.unwrap()
}

#[test]
fn client_credentials_tokens_carry_scopes_that_routes_enforce() {
    let dir = temp_dir("oauth");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_id, key) = tenant(&mut c, "oauth").await;
        let account_id = account(&mut c, &key, json!({"currency": "BRL"})).await;

        let r = c.post("/v1/oauth-clients", &key, &json!({"scopes": ["cob.read", "bogus"]})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("scopes[1]")));
        let r = c
            .post(
                "/v1/oauth-clients",
                &key,
                &json!({"scopes": ["cob.read", "accounts:read", "transfers:write", "pix:read"]}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let client = r.json();
        let (id, secret) =
            (client["client_id"].as_str().unwrap().to_owned(), client["client_secret"].as_str().unwrap().to_owned());
        assert!(secret.starts_with("rtpay_cs_") && secret.len() == 9 + 64);

        // HTTP Basic, all scopes.
        let r = token_request(&mut c, "grant_type=client_credentials", Some((&id, &secret))).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(r.headers.get("cache-control").unwrap(), "no-store");
        let t = r.json();
        assert_eq!((t["token_type"].clone(), t["expires_in"].clone()), (json!("Bearer"), json!(300)));
        assert_eq!(t["scope"], json!("cob.read accounts:read transfers:write pix:read"));
        let token = t["access_token"].as_str().unwrap().to_owned();
        // The token reads accounts, but may not open one: 403 naming the scope.
        assert_eq!(c.get(&format!("/v1/accounts/{account_id}"), &token).await.unwrap().status, 200);
        let r = c.post("/v1/accounts", &token, &json!({"currency": "BRL"})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (403, json!("insufficient_scope")));
        assert!(r.json()["detail"].as_str().unwrap().contains("accounts:write"));
        // Nor create clients: that takes an API key.
        let r = c.post("/v1/oauth-clients", &token, &json!({"scopes": ["cob.read"]})).await.unwrap();
        assert_eq!(r.status, 403);
        // Nor read the webhooks' signing key: reading Pix is not configuring webhooks.
        let r = c.get("/v1/pix/webhook-secret", &token).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (403, json!("insufficient_scope")));
        assert_eq!(c.get("/v1/pix/webhook-secret", &key).await.unwrap().status, 200);
        // Nor a delivery's record, which names the receiver's URL (the API Pix shows it under
        // `webhook.read` only): refused before anything is looked up.
        let r = c.get("/v1/pix/webhook-deliveries/E00000000202612071200abcdefghijk", &token).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (403, json!("webhook.read")), "{:?}", r.json());
        let r = c.get("/v1/pix/webhook-deliveries/E00000000202612071200abcdefghijk", &key).await.unwrap();
        assert_eq!(r.status, 404, "an API key holding every scope gets past it");

        // Form fields, a narrower scope.
        let form = format!("grant_type=client_credentials&scope=cob.read&client_id={id}&client_secret={secret}");
        let r = token_request(&mut c, &form, None).await;
        assert_eq!((r.status.as_u16(), r.json()["scope"].clone()), (200, json!("cob.read")));
        let narrow = r.json()["access_token"].as_str().unwrap().to_owned();
        assert_eq!(c.get(&format!("/v1/accounts/{account_id}"), &narrow).await.unwrap().status, 403);

        // An empty `scope` asks for none in particular: the client's own (RFC 6749 §3.3).
        for scope in ["scope=", "scope=%20"] {
            let r =
                token_request(&mut c, &format!("grant_type=client_credentials&{scope}"), Some((&id, &secret))).await;
            let granted = (r.status.as_u16(), r.json()["scope"].clone());
            assert_eq!(granted, (200, json!("cob.read accounts:read transfers:write pix:read")), "{scope}");
        }
        // RFC 6749 §5.2 errors.
        for (form, basic, status, error) in [
            ("grant_type=password", Some((id.as_str(), secret.as_str())), 400, "unsupported_grant_type"),
            ("scope=cob.read", Some((id.as_str(), secret.as_str())), 400, "invalid_request"),
            (
                "grant_type=client_credentials&scope=pix.write",
                Some((id.as_str(), secret.as_str())),
                400,
                "invalid_scope",
            ),
            ("grant_type=client_credentials", None, 401, "invalid_client"),
            (&form, Some((id.as_str(), secret.as_str())), 400, "invalid_request"),
        ] {
            let r = token_request(&mut c, form, basic).await;
            assert_eq!((r.status.as_u16(), r.json()["error"].clone()), (status, json!(error)), "{form}");
        }
        let r = token_request(&mut c, "grant_type=client_credentials", Some((&id, "rtpay_cs_wrong"))).await;
        assert_eq!((r.status.as_u16(), r.json()["error"].clone()), (401, json!("invalid_client")));
        assert!(r.headers.get("www-authenticate").is_some());

        // A tampered token is refused.
        let mut tampered = token.clone().into_bytes();
        let i = tampered.len() - 70;
        tampered[i] = if tampered[i] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(c.get(&format!("/v1/accounts/{account_id}"), &tampered).await.unwrap().status, 401);
        // Nor is one written otherwise: a hex pair `01` as `+1` (a number's sign) reads the same.
        let signed = token.replacen("rtpay_at_0", "rtpay_at_+", 1);
        assert_ne!(signed, token);
        assert_eq!(c.get(&format!("/v1/accounts/{account_id}"), &signed).await.unwrap().status, 401);
        // A creation retried under its Idempotency-Key makes no second client.
        let body: Option<Bytes> = Some(serde_json::to_vec(&json!({"scopes": ["cob.read"]})).unwrap().into());
        let headers = [("idempotency-key", "client-once")];
        let first =
            c.send_with_headers(Method::POST, "/v1/oauth-clients", Some(&key), body.clone(), &headers).await.unwrap();
        assert_eq!(first.status, 201);
        let again = c.send_with_headers(Method::POST, "/v1/oauth-clients", Some(&key), body, &headers).await.unwrap();
        assert_eq!((again.status.as_u16(), again.json()["code"].clone()), (409, json!("exists")));

        // The audit log names the client as the actor of what it did.
        let r = c
            .post(
                "/v1/transfers",
                &token,
                &json!({"id": uuid(), "debit_account_id": account_id, "credit_account_id": account_id, "amount": 1}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 422, "same account twice: refused, but authorized");
        let entries = c.get("/v1/audit?limit=1000", &key).await.unwrap().json();
        assert!(entries["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == json!(format!("client:{id}")) && e["tenant_id"] == json!(tenant_id)));

        // Ten wrong secrets lock the client, even against the right one afterwards.
        for _ in 0..9 {
            token_request(&mut c, "grant_type=client_credentials", Some((&id, "rtpay_cs_wrong"))).await;
        }
        let r = token_request(&mut c, "grant_type=client_credentials", Some((&id, &secret))).await;
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (429, json!("credential_locked")));
    });
}

#[test]
fn api_keys_may_be_scoped_like_clients() {
    let dir = temp_dir("scoped-keys");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_id, key) = tenant(&mut c, "scoped").await;
        let account_id = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let path = format!("/v1/tenants/{tenant_id}/api-keys");
        let r = c.post(&path, OPERATOR, &json!({"scopes": ["accounts:read", "nope"]})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("scopes[1]")));
        let r = c.post(&path, OPERATOR, &json!({"scopes": []})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("scopes")));
        let r = c.post(&path, OPERATOR, &json!({"scopes": ["transfers:read", "accounts:read"]})).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        // Listed in the canonical order.
        assert_eq!(r.json()["scopes"], json!(["accounts:read", "transfers:read"]));
        let reader = r.json()["secret"].as_str().unwrap().to_owned();
        assert_eq!(c.get(&format!("/v1/accounts/{account_id}"), &reader).await.unwrap().status, 200);
        let r = c.post("/v1/accounts", &reader, &json!({"currency": "BRL"})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (403, json!("insufficient_scope")));
        assert_eq!(r.json()["field"], json!("accounts:write"));
        assert!(r.json()["detail"].as_str().unwrap().contains("API key"), "{:?}", r.json());
        // A scoped key cannot mint OAuth clients (which could hold more than it does).
        let r = c.post("/v1/oauth-clients", &reader, &json!({"scopes": ["accounts:write"]})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (403, json!("api_key_required")));
        // Nothing was opened by the refused request: the unscoped key sees one account's worth of
        // audit (its own creation) and the refusal.
        let r = c.get(&format!("/v1/accounts/{account_id}"), &key).await.unwrap();
        assert_eq!(r.status, 200);
    });
}

#[test]
fn a_revoked_client_loses_its_secret_and_its_tokens_at_once() {
    let dir = temp_dir("oauth-revoke");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "revoker").await;
        let (_, other) = tenant(&mut c, "other").await;
        let r = c.post("/v1/oauth-clients", &key, &json!({"scopes": ["accounts:write"]})).await.unwrap();
        let (id, secret) = (
            r.json()["client_id"].as_str().unwrap().to_owned(),
            r.json()["client_secret"].as_str().unwrap().to_owned(),
        );
        let r = token_request(&mut c, "grant_type=client_credentials", Some((&id, &secret))).await;
        let token = r.json()["access_token"].as_str().unwrap().to_owned();
        assert_eq!(c.post("/v1/accounts", &token, &json!({"currency": "BRL"})).await.unwrap().status, 201);

        let path = format!("/v1/oauth-clients/{id}");
        // Only its own tenant, with an unscoped API key, revokes it.
        assert_eq!(c.send(Method::DELETE, &path, Some(&other), None).await.unwrap().status, 404);
        let r = c.send(Method::DELETE, &path, Some(&token), None).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (403, json!("api_key_required")));
        assert_eq!(c.send(Method::DELETE, &path, Some(&key), None).await.unwrap().status, 204);
        assert_eq!(c.send(Method::DELETE, &path, Some(&key), None).await.unwrap().status, 404, "already revoked");

        let r = c.post("/v1/accounts", &token, &json!({"currency": "BRL"})).await.unwrap();
        assert_eq!(r.status, 401, "the token died with its client: {:?}", r.json());
        let r = token_request(&mut c, "grant_type=client_credentials", Some((&id, &secret))).await;
        assert_eq!((r.status.as_u16(), r.json()["error"].clone()), (401, json!("invalid_client")));
        let audit = c.get("/v1/audit?limit=100", &key).await.unwrap().json();
        let revoked = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == json!("DELETE /v1/oauth-clients/{id}") && e["outcome"] == json!("204"));
        assert!(revoked, "{audit}");
    });
}
