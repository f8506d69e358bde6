//! TLS and mTLS over real sockets, with certificates made here: a CA, a server certificate, and
//! client certificates bound to a tenant, to the operator, to nobody, and from a foreign CA.

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// One HTTPS request on a fresh connection; `client`: (certificate PEM, key PEM).
async fn https(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).unwrap())).unwrap_or_default();
    let headers = [("authorization", format!("Bearer {token}")), ("content-type", "application/json".to_owned())];
    https_raw(addr, ca_pem, client, method, path, &headers, body).await
}

/// An OAuth token request (HTTP Basic) over HTTPS.
async fn token_over_https(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
    id: &str,
    secret: &str,
) -> (u16, Value) {
    token_over_https_from(None, addr, ca_pem, client, id, secret).await
}

/// [`token_over_https`] from the loopback address `source` (each address has its own budget of
/// failed authentications).
async fn token_over_https_from(
    source: Option<&str>,
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
    id: &str,
    secret: &str,
) -> (u16, Value) {
    let form = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    let headers = [("content-type", "application/x-www-form-urlencoded".to_owned())];
    https_from(source, addr, ca_pem, client, "POST", "/oauth/token", &headers, Bytes::from(form)).await.unwrap()
}

async fn https_raw(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<(u16, Value), String> {
    https_from(None, addr, ca_pem, client, method, path, headers, body).await
}

#[allow(clippy::too_many_arguments)]
async fn https_from(
    source: Option<&str>,
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<(u16, Value), String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = source {
        socket.bind(format!("{ip}:0").parse().unwrap()).map_err(|e| e.to_string())?;
    }
    let tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut request = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request.body(Full::new(body)).unwrap();
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// A server taking client certificates issued by `authority` (its own certificate from there too).
fn mutual_tls_server(tag: &str, authority: &TestCa) -> Server {
    let ca_pem = authority.pem();
    let (server_cert, server_key) = authority.issue(&["localhost"], &[]);
    let certs = temp_dir(&format!("{tag}-certs"));
    let args = [
        "--tls-cert".to_owned(),
        write(&certs, "server.pem", &server_cert),
        "--tls-key".to_owned(),
        write(&certs, "server.key", &server_key),
        "--tls-client-ca".to_owned(),
        write(&certs, "ca.pem", &ca_pem),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_args(&temp_dir(tag), None, "127.0.0.1:0", true, &args)
}

#[test]
fn tls_and_client_certificates_bound_to_tenants() {
    let authority = TestCa::new("rtpay test CA");
    let foreign = TestCa::new("someone else");
    let ca_pem = authority.pem();
    let server = mutual_tls_server("tls", &authority);
    let addr = server.addr;
    runtime().block_on(async {
        // Plain HTTP to a TLS listener gets nothing useful.
        let mut plain = server.client();
        let answered = plain.get("/healthz", OPERATOR).await.map(|r| r.status.as_u16() == 200).unwrap_or(false);
        assert!(!answered, "plain HTTP must not be served on a TLS listener");

        let operator_cert = authority.issue(&[], &["urn:rtpay:operator"]);
        // Health needs no certificate; operator routes need the operator's.
        let (status, _) = https(addr, &ca_pem, None, "GET", "/healthz", "", None).await.unwrap();
        assert_eq!(status, 200);
        let (status, body) =
            https(addr, &ca_pem, None, "POST", "/v1/tenants", OPERATOR, Some(json!({"name": "t"}))).await.unwrap();
        assert_eq!((status, body["code"].clone()), (403, json!("client_certificate_required")));
        let (status, body) =
            https(addr, &ca_pem, Some(&operator_cert), "POST", "/v1/tenants", OPERATOR, Some(json!({"name": "a"})))
                .await
                .unwrap();
        assert_eq!(status, 201, "{body}");
        let (tenant_a, key_a) =
            (body["id"].as_str().unwrap().to_owned(), body["api_key"]["secret"].as_str().unwrap().to_owned());
        let (_, body) =
            https(addr, &ca_pem, Some(&operator_cert), "POST", "/v1/tenants", OPERATOR, Some(json!({"name": "b"})))
                .await
                .unwrap();
        let tenant_b = body["id"].as_str().unwrap().to_owned();

        let cert_a = authority.issue(&[], &[&format!("urn:rtpay:tenant:{tenant_a}")]);
        let cert_b = authority.issue(&[], &[&format!("urn:rtpay:tenant:{tenant_b}")]);
        // Wrong operator tokens from connections that could never present the operator's
        // credential (no certificate, a tenant's) do not lock the operator out.
        for client in [None, Some(&cert_a)] {
            for _ in 0..6 {
                let (status, _) =
                    https(addr, &ca_pem, client, "POST", "/v1/tenants", "wrong", Some(json!({"name": "x"})))
                        .await
                        .unwrap();
                assert!(status == 401 || status == 403, "{status}");
            }
        }
        let (status, body) =
            https(addr, &ca_pem, Some(&operator_cert), "POST", "/v1/tenants", OPERATOR, Some(json!({"name": "c"})))
                .await
                .unwrap();
        assert_eq!(status, 201, "the operator was locked out by others: {body}");
        let unbound = authority.issue(&[], &[]);
        let stranger = foreign.issue(&[], &[&format!("urn:rtpay:tenant:{tenant_a}")]);
        let account = json!({"currency": "BRL"});
        // The key with its own tenant's certificate works.
        let (status, opened) =
            https(addr, &ca_pem, Some(&cert_a), "POST", "/v1/accounts", &key_a, Some(account.clone())).await.unwrap();
        assert_eq!(status, 201);
        // With another tenant's, even to read: refused, and recorded (below).
        let path = format!("/v1/accounts/{}", opened["id"].as_str().unwrap());
        let (status, body) = https(addr, &ca_pem, Some(&cert_b), "GET", &path, &key_a, None).await.unwrap();
        assert_eq!((status, body["code"].clone()), (403, json!("client_certificate_mismatch")));
        // The same key with another tenant's, an unbound, or the operator's certificate: refused.
        for (name, cert) in [("tenant b", &cert_b), ("unbound", &unbound), ("operator", &operator_cert)] {
            let (status, body) =
                https(addr, &ca_pem, Some(cert), "POST", "/v1/accounts", &key_a, Some(account.clone())).await.unwrap();
            assert_eq!((status, body["code"].clone()), (403, json!("client_certificate_mismatch")), "{name}");
        }
        // The operator token with a tenant's certificate: refused.
        let (status, _) =
            https(addr, &ca_pem, Some(&cert_a), "POST", "/v1/tenants", OPERATOR, Some(json!({"name": "c"})))
                .await
                .unwrap();
        assert_eq!(status, 403);

        // OAuth clients: a certificate may name one client; it then carries only that client's
        // secret and tokens. The tenant's certificate carries all of the tenant's.
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (status, body) = https(
                addr,
                &ca_pem,
                Some(&cert_a),
                "POST",
                "/v1/oauth-clients",
                &key_a,
                Some(json!({"scopes": ["accounts:read", "accounts:write"]})),
            )
            .await
            .unwrap();
            assert_eq!(status, 201, "{body}");
            clients.push((
                body["client_id"].as_str().unwrap().to_owned(),
                body["client_secret"].as_str().unwrap().to_owned(),
            ));
        }
        let (one, two) = (&clients[0], &clients[1]);
        let cert_one = authority.issue(&[], &[&format!("urn:rtpay:client:{}", one.0)]);
        // Refusals count against their address: these come from another than those above.
        let token_over_https = |addr, ca_pem, client, id, secret| {
            token_over_https_from(Some("127.0.0.2"), addr, ca_pem, client, id, secret)
        };
        let (status, body) = token_over_https(addr, &ca_pem, None, &one.0, &one.1).await;
        assert_eq!((status, body["error"].clone()), (401, json!("invalid_client")), "{body}");
        assert!(body["error_description"].as_str().unwrap().contains("requires a client certificate"), "{body}");
        let (status, body) = token_over_https(addr, &ca_pem, Some(&cert_one), &two.0, &two.1).await;
        assert_eq!((status, body["error"].clone()), (401, json!("invalid_client")), "another client's");
        assert!(body["error_description"].as_str().unwrap().contains("another identity"), "{body}");
        let (status, body) = token_over_https(addr, &ca_pem, Some(&cert_b), &one.0, &one.1).await;
        assert_eq!(status, 401, "another tenant's: {body}");
        let (status, body) = token_over_https(addr, &ca_pem, Some(&cert_one), &one.0, &one.1).await;
        assert_eq!(status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap().to_owned();
        let (status, body) = token_over_https(addr, &ca_pem, Some(&cert_a), &two.0, &two.1).await;
        assert_eq!(status, 200, "the tenant's certificate carries every client of the tenant: {body}");
        for (name, cert, expected) in
            [("client's", &cert_one, 201), ("tenant's", &cert_a, 201), ("tenant b's", &cert_b, 403)]
        {
            let (status, _) =
                https(addr, &ca_pem, Some(cert), "POST", "/v1/accounts", &token, Some(account.clone())).await.unwrap();
            assert_eq!(status, expected, "the token with the {name} certificate");
        }
        // The client's certificate does not carry the tenant's API key.
        let (status, body) =
            https(addr, &ca_pem, Some(&cert_one), "POST", "/v1/accounts", &key_a, Some(account.clone())).await.unwrap();
        assert_eq!((status, body["code"].clone()), (403, json!("client_certificate_mismatch")));

        // A certificate from another CA does not get through the handshake.
        let refused = https(addr, &ca_pem, Some(&stranger), "GET", "/healthz", "", None).await;
        assert!(refused.is_err(), "{refused:?}");
        // Nothing was created by the refused requests. (Read from another address: this one has
        // spent its budget of failed authentications on them.)
        let headers = [("authorization", format!("Bearer {OPERATOR}"))];
        let (status, body) = https_from(
            Some("127.0.0.3"),
            addr,
            &ca_pem,
            Some(&operator_cert),
            "GET",
            "/v1/audit?limit=1000",
            &headers,
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let created: Vec<&Value> =
            body["entries"].as_array().unwrap().iter().filter(|e| e["action"] == json!("POST /v1/accounts")).collect();
        assert_eq!(created.iter().filter(|e| e["outcome"] == json!("created")).count(), 3);
        assert!(created.iter().all(|e| e["outcome"] == json!("created") || e["outcome"] == json!("403")));
        let read = body["entries"].as_array().unwrap().iter().filter(|e| e["action"] == json!("GET /v1/accounts/{id}"));
        assert_eq!(
            read.map(|e| e["outcome"].clone()).collect::<Vec<_>>(),
            [json!("403")],
            "the refused read is recorded"
        );
    });
}

/// Without a certificate that can name a caller, no credential is looked at. The right API key
/// from a certificate it is not bound to is no success: the key's count of failed authentications
/// goes on, and the tenth locks it.
#[test]
fn the_right_key_from_the_wrong_certificate_does_not_clear_its_failures() {
    let authority = TestCa::new("rtpay test CA");
    let ca_pem = authority.pem();
    let server = mutual_tls_server("tls-lock", &authority);
    let addr = server.addr;
    runtime().block_on(async {
        let operator_cert = authority.issue(&[], &["urn:rtpay:operator"]);
        let mut tenants = Vec::new();
        for name in ["a", "b"] {
            let (status, body) = https(
                addr,
                &ca_pem,
                Some(&operator_cert),
                "POST",
                "/v1/tenants",
                OPERATOR,
                Some(json!({"name": name})),
            )
            .await
            .unwrap();
            assert_eq!(status, 201, "{body}");
            tenants.push((
                body["id"].as_str().unwrap().to_owned(),
                body["api_key"]["secret"].as_str().unwrap().to_owned(),
            ));
        }
        let ((tenant_a, key_a), (tenant_b, _)) = (&tenants[0], &tenants[1]);
        let cert_a = authority.issue(&[], &[&format!("urn:rtpay:tenant:{tenant_a}")]);
        let cert_b = authority.issue(&[], &[&format!("urn:rtpay:tenant:{tenant_b}")]);
        // A guess naming the key (its id, another secret), from the key's own tenant's certificate.
        let (named, _) = key_a.rsplit_once('_').unwrap();
        let guess = format!("{named}_{}", "0".repeat(64));
        let account = json!({"currency": "BRL"});
        // Without a certificate, or with one naming no one, no credential is looked at: the right
        // key and a guess get the same answer (no oracle for a stolen key).
        let unbound = authority.issue(&[], &[]);
        for cert in [None, Some(&unbound)] {
            let right = https(addr, &ca_pem, cert, "POST", "/v1/accounts", key_a, Some(account.clone())).await.unwrap();
            let wrong =
                https(addr, &ca_pem, cert, "POST", "/v1/accounts", &guess, Some(account.clone())).await.unwrap();
            assert_eq!(right.0, 403, "{}", right.1);
            assert_eq!((right.0, right.1["code"].clone()), (wrong.0, wrong.1["code"].clone()));
        }
        for _ in 0..9 {
            let (status, _) =
                https(addr, &ca_pem, Some(&cert_a), "POST", "/v1/accounts", &guess, Some(account.clone()))
                    .await
                    .unwrap();
            assert_eq!(status, 401);
        }
        let (status, body) =
            https(addr, &ca_pem, Some(&cert_b), "POST", "/v1/accounts", key_a, Some(account.clone())).await.unwrap();
        assert_eq!((status, body["code"].clone()), (403, json!("client_certificate_mismatch")));
        let (status, _) =
            https(addr, &ca_pem, Some(&cert_a), "POST", "/v1/accounts", &guess, Some(account.clone())).await.unwrap();
        assert_eq!(status, 401, "the tenth failure in a row");
        let (status, body) =
            https(addr, &ca_pem, Some(&cert_a), "POST", "/v1/accounts", key_a, Some(account.clone())).await.unwrap();
        assert_eq!((status, body["code"].clone()), (429, json!("credential_locked")), "{body}");
    });
}

/// An OAuth client's certificate can present that client only: wrong secrets from it for another
/// client do not lock that client. And the right credential from the wrong certificate, refused
/// and recorded each time, counts against the source: repeated, it is throttled (429, not
/// recorded) instead of growing the audit log at will.
#[test]
fn a_client_certificate_locks_only_its_client_and_mismatches_are_throttled() {
    let authority = TestCa::new("rtpay test CA");
    let ca_pem = authority.pem();
    let server = mutual_tls_server("tls-mismatch", &authority);
    let addr = server.addr;
    runtime().block_on(async {
        let operator_cert = authority.issue(&[], &["urn:rtpay:operator"]);
        let (status, body) =
            https(addr, &ca_pem, Some(&operator_cert), "POST", "/v1/tenants", OPERATOR, Some(json!({"name": "a"})))
                .await
                .unwrap();
        assert_eq!(status, 201, "{body}");
        let tenant = body["id"].as_str().unwrap().to_owned();
        let key = body["api_key"]["secret"].as_str().unwrap().to_owned();
        let cert_tenant = authority.issue(&[], &[&format!("urn:rtpay:tenant:{tenant}")]);
        let mut clients = Vec::new();
        for _ in 0..2 {
            let scopes = json!({"scopes": ["accounts:read"]});
            let (status, body) =
                https(addr, &ca_pem, Some(&cert_tenant), "POST", "/v1/oauth-clients", &key, Some(scopes))
                    .await
                    .unwrap();
            assert_eq!(status, 201, "{body}");
            clients.push((
                body["client_id"].as_str().unwrap().to_owned(),
                body["client_secret"].as_str().unwrap().to_owned(),
            ));
        }
        let (one, two) = (&clients[0], &clients[1]);
        let cert_one = authority.issue(&[], &[&format!("urn:rtpay:client:{}", one.0)]);
        let wrong = "0".repeat(43);
        for _ in 0..10 {
            let (status, body) = token_over_https(addr, &ca_pem, Some(&cert_one), &two.0, &wrong).await;
            assert_eq!((status, body["error"].clone()), (401, json!("invalid_client")), "{body}");
        }
        let (status, body) = token_over_https(addr, &ca_pem, Some(&cert_tenant), &two.0, &two.1).await;
        assert_eq!(status, 200, "client one's certificate could never present client two: {body}");

        // Ten failures counted against this address so far (its burst is 20).
        let mut answers = Vec::new();
        for _ in 0..15 {
            let (status, body) =
                https(addr, &ca_pem, Some(&cert_one), "GET", "/v1/accounts/not-read", &key, None).await.unwrap();
            answers.push((status, body["code"].as_str().unwrap_or_default().to_owned()));
        }
        let mismatches = answers.iter().filter(|a| *a == &(403, "client_certificate_mismatch".to_owned())).count();
        let throttled = answers.iter().filter(|a| *a == &(429, "auth_throttled".to_owned())).count();
        assert_eq!(mismatches + throttled, 15, "{answers:?}");
        assert!((10..=11).contains(&mismatches), "the address's budget ends the mismatches: {answers:?}");
        // The address's budget refills at 10 a minute; the operator reads from the same address.
        std::thread::sleep(std::time::Duration::from_secs(7));
        let (status, body) =
            https(addr, &ca_pem, Some(&operator_cert), "GET", "/v1/audit?limit=1000", OPERATOR, None).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let recorded = body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == json!("GET /v1/accounts/{id}") && e["outcome"] == json!("403"))
            .count();
        assert_eq!(recorded, mismatches, "each refusal recorded, no throttled one");
        let made: Vec<_> = body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == json!("POST /v1/oauth-clients"))
            .map(|e| e["resource"].clone())
            .collect();
        assert_eq!(made, [json!(format!("client:{}", one.0)), json!(format!("client:{}", two.0))], "named");
    });
}

#[test]
fn bad_pem_files_are_refused_before_anything_is_created() {
    let certs = temp_dir("tls-bad");
    let authority = TestCa::new("ca");
    let (cert, key) = authority.issue(&["localhost"], &[]);
    let (_, other_key) = authority.issue(&["localhost"], &[]);
    let good_cert = write(&certs, "cert.pem", &cert);
    let good_key = write(&certs, "key.pem", &key);
    let garbage = write(&certs, "garbage.pem", "not a certificate\n");
    let mismatched = write(&certs, "other.key", &other_key);
    let missing = certs.join("missing.pem").to_str().unwrap().to_owned();
    let cases = [
        (garbage.as_str(), good_key.as_str(), None, "--tls-cert"),
        (missing.as_str(), good_key.as_str(), None, "--tls-cert"),
        (good_cert.as_str(), garbage.as_str(), None, "--tls-key"),
        (good_cert.as_str(), mismatched.as_str(), None, "does not fit"),
        (good_cert.as_str(), good_key.as_str(), Some(garbage.as_str()), "--tls-client-ca"),
    ];
    for (i, (cert, key, client_ca, expected)) in cases.into_iter().enumerate() {
        let data = certs.join(format!("data-{i}"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rtpay"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key])
            .arg("--data")
            .arg(&data);
        if let Some(ca) = client_ca {
            command.args(["--tls-client-ca", ca]);
        }
        let out = command.env_remove("RTPAY_POSTGRES").output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(text.contains(expected), "case {i}: expected {expected:?} in {text}");
        assert!(!data.exists(), "case {i}: nothing is created");
        // No key material in the error.
        assert!(!text.contains("PRIVATE KEY"), "case {i}: {text}");
    }
}
