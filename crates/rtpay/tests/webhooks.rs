//! API Pix webhooks end to end: registration through `/api/v2/webhook/{chave}` (https only), and
//! the notification of a received Pix POSTed to `{webhookUrl}/pix` over TLS to a receiver made
//! here, which demands rtpay's client certificate (mTLS) and fails the first two tries: rtpay
//! retries with backoff, signs the body with HMAC-SHA256 (checked with Python's `hmac`, not our
//! code), and records the delivery.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use hyper::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISPB: &str = "12345678";
const CNPJ_ACME: &str = "11222333000181";

struct Issued {
    cert: String,
    key: String,
}

fn pki() -> (String, Issued, Issued, rustls::pki_types::CertificateDer<'static>) {
    let ca = TestCa::new("webhook test CA");
    let issue = |name: &str| {
        let (cert, key) = ca.issue(&[name], &[]);
        Issued { cert, key }
    };
    let server = issue("localhost");
    let client = issue("rtpay.example");
    (ca.pem(), server, client, ca.cert.der().clone())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// What the receiver saw: (path, signature header, body, whether the client presented a
/// certificate, the delivery header, the timestamp header).
type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>, bool, String, String)>>>;

/// An HTTPS receiver that requires a client certificate of `ca` and answers 500 to the first
/// `fail_first` requests, 200 after.
async fn receiver(server: &Issued, ca: rustls::pki_types::CertificateDer<'static>, fail_first: usize) -> (u16, Seen) {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(server.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
            let presented = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let (head_end, length) = loop {
                let n = tls.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed mid-request");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    break (i + 4, length);
                }
            };
            while buf.len() < head_end + length {
                let n = tls.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let signature = head
                .lines()
                .find_map(|l| l.to_lowercase().strip_prefix("x-rtpay-signature:").map(|v| v.trim().to_owned()))
                .unwrap_or_default();
            let header = |name: &str| {
                head.lines()
                    .find(|l| l.to_lowercase().starts_with(&format!("{name}:")))
                    .map(|l| l[name.len() + 1..].trim().to_owned())
                    .unwrap_or_default()
            };
            let (delivery, timestamp) = (header("x-rtpay-delivery"), header("x-rtpay-timestamp"));
            let count = {
                let mut s = log.lock().unwrap();
                s.push((path, signature, buf[head_end..head_end + length].to_vec(), presented, delivery, timestamp));
                s.len()
            };
            let status = if count <= fail_first { "500 Internal Server Error" } else { "200 OK" };
            let _ = tls
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes())
                .await;
            let _ = tls.shutdown().await;
        }
    });
    (port, seen)
}

/// The request the receiver saw after its first `n`, once it has arrived.
async fn seen_after(seen: &Seen, n: usize) -> (String, String, Vec<u8>, bool, String, String) {
    for _ in 0..200 {
        if let Some(request) = seen.lock().unwrap().get(n) {
            return request.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the receiver saw no request after its first {n}");
}

/// HMAC-SHA256 of `{timestamp}.{delivery}.{body}` under the hex `secret`, as the docs tell a
/// receiver to check it, by Python's standard library.
fn python_hmac(secret: &str, timestamp: &str, delivery: &str, body: &[u8]) -> String {
    use std::io::Write;
    let script = "import hmac,hashlib,sys; \
        signed = sys.argv[2].encode() + b'.' + sys.argv[3].encode() + b'.' + sys.stdin.buffer.read(); \
        print(hmac.new(bytes.fromhex(sys.argv[1]), signed, hashlib.sha256).hexdigest())";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, secret, timestamp, delivery])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `rtpay serve` with webhooks on a test PKI (receivers on this machine allowed), retrying
/// `retry_ms` apart at first, doubling up to `retry_max_ms`: the server, the receiver's
/// certificate and the CA to trust.
fn start_with_pki(
    dir: &Path,
    retry_ms: u32,
    retry_max_ms: u32,
) -> (Server, Issued, rustls::pki_types::CertificateDer<'static>) {
    let (ca_pem, server_cert, client_cert, ca_der) = pki();
    let ca = write(dir, "ca.pem", &ca_pem);
    let (cert, key) = (write(dir, "client.pem", &client_cert.cert), write(dir, "client.key", &client_cert.key));
    let (retry, retry_max) = (retry_ms.to_string(), retry_max_ms.to_string());
    let args = [
        "--ispb",
        ISPB,
        "--webhook-ca",
        &ca,
        "--webhook-client-cert",
        &cert,
        "--webhook-client-key",
        &key,
        "--webhook-retry-ms",
        &retry,
        "--webhook-retry-max-ms",
        &retry_max,
        "--webhook-allow-private",
    ];
    (Server::start_with_args(&dir.join("data"), None, "127.0.0.1:0", true, &args), server_cert, ca_der)
}

/// ACME's account in `shop`, with ACME's CNPJ as its Pix key.
async fn acme_with_key(c: &mut rtpay::client::Client, shop: &str) {
    let holder = new_holder(c, shop, "company", "ACME", CNPJ_ACME).await;
    let acme = account(c, shop, json!({"currency": "BRL", "holder_id": holder})).await;
    let key = json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME});
    assert_eq!(c.post("/v1/pix/keys", shop, &key).await.unwrap().status, 201);
}

/// A Pix of `amount` received on the key's static BR Code with `txid` (so notified): its EndToEndId.
async fn pix_with_txid(c: &mut rtpay::client::Client, shop: &str, amount: u64, txid: &str) -> String {
    let code = json!({"key": CNPJ_ACME, "amount": amount, "merchant_name": "ACME", "merchant_city": "SAO PAULO", "txid": txid});
    let brcode = c.post("/v1/pix/brcode", shop, &code).await.unwrap().json()["payload"].clone();
    let payer = json!({"ispb": "60701190", "name": "Joana Prado", "document": "11144477735"});
    let r =
        c.post("/v1/sandbox/spi/incoming", shop, &json!({"amount": amount, "brcode": brcode, "payer": payer})).await;
    r.unwrap().json()["end_to_end_id"].as_str().unwrap().to_owned()
}

/// The node's `/metrics` text once its sample `name` reads `value` (10 s at most).
async fn metrics_when(c: &mut rtpay::client::Client, name: &str, value: f64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = metrics_with(c, name).await;
        if sample(&text, name) == Some(value) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "{name} never read {value}: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// The delivery under `id` once its status is `status` (30 s at most: 24 tries take a few
/// seconds on a busy machine).
async fn delivery_when(c: &mut rtpay::client::Client, key: &str, id: &str, status: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let delivery = c.get(&format!("/v1/pix/webhook-deliveries/{id}"), key).await.unwrap().json();
        if delivery["status"] == json!(status) {
            return delivery;
        }
        assert!(std::time::Instant::now() < deadline, "the delivery never became {status}: {delivery}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A notification whose tries all failed (the receiver was away longer than they last) is sent
/// again on request, from a first attempt; one being made is not, and another tenant's is not
/// found.
#[test]
fn a_failed_delivery_is_sent_again_on_request() {
    let dir = temp_dir("webhooks-again");
    let (rtpay, server_cert, ca_der) = start_with_pki(&dir, 100, 150);
    runtime().block_on(async {
        // 24 failures use every try (over about 3.4 s here: 100 ms, then 150 ms apart); the
        // 25th request fails too, the 26th is answered.
        let (port, seen) = receiver(&server_cert, ca_der, 25).await;
        let mut c = rtpay.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let (_, other) = tenant(&mut c, "other").await;
        acme_with_key(&mut c, &shop).await;
        let hook =
            Some(serde_json::to_vec(&json!({"webhookUrl": format!("https://localhost:{port}/h")})).unwrap().into());
        let path = format!("/api/v2/webhook/{CNPJ_ACME}");
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), hook).await.unwrap().status, 200);
        let e2e = pix_with_txid(&mut c, &shop, 700, "AGAIN2026").await;
        let failed = delivery_when(&mut c, &shop, &e2e, "failed").await;
        assert_eq!((failed["attempts"].clone(), failed["last_status"].clone()), (json!(24), json!(500)), "{failed}");
        // Counted once the record is written (the delivery shows `failed` a moment before).
        let text = metrics_when(&mut c, "rtpay_webhook_deliveries_failed_total", 1.0).await;
        assert_eq!(sample(&text, "rtpay_webhook_attempts_total{outcome=\"refused\"}"), Some(24.0));

        let retry = format!("/v1/pix/webhook-deliveries/{e2e}/retry");
        let r = c.post(&retry, &other, &json!({})).await.unwrap();
        assert_eq!(r.status, 404, "another tenant's delivery is not found");
        let r = c.post("/v1/pix/webhook-deliveries/E00000000202612061200abcdefghijk/retry", &shop, &json!({})).await;
        assert_eq!(r.unwrap().status, 404);
        let r = c.post(&retry, &shop, &json!({})).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.json()["status"].clone(), r.json()["attempts"].clone()),
            (202, json!("pending"), json!(0))
        );
        // Its first attempt fails; until the second, it is being delivered.
        let r = c.post(&retry, &shop, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (409, json!("delivery_pending")), "{:?}", r.json());
        let delivered = delivery_when(&mut c, &shop, &e2e, "delivered").await;
        assert_eq!(delivered["attempts"], json!(2), "{delivered}");
        let sent = seen.lock().unwrap().clone();
        assert_eq!(sent.len(), 26);
        let text = metrics_when(&mut c, "rtpay_webhook_attempts_total{outcome=\"delivered\"}", 1.0).await;
        assert_eq!(sample(&text, "rtpay_webhook_attempts_total{outcome=\"refused\"}"), Some(25.0));
        assert!(sent.iter().all(|(_, _, body, _, _, _)| body == &sent[0].2), "the same notification each time");
        // A delivered one may be sent again too (the receiver lost it).
        assert_eq!(c.post(&retry, &shop, &json!({})).await.unwrap().status, 202);
        assert_eq!(delivery_when(&mut c, &shop, &e2e, "delivered").await["attempts"], json!(1));
        assert_eq!(seen.lock().unwrap().len(), 27);
        // With the key's webhook gone there is nowhere to send it.
        assert_eq!(c.send(Method::DELETE, &path, Some(&shop), None).await.unwrap().status, 204);
        let r = c.post(&retry, &shop, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (409, json!("no_webhook")));
        assert_eq!(delivery_when(&mut c, &shop, &e2e, "delivered").await["attempts"], json!(1), "its record stays");
        // An id that is none is not found, and a card number in it is not written down.
        let pan = "4111111111111111";
        let r = c.post(&format!("/v1/pix/webhook-deliveries/{e2e}:{pan}/retry"), &shop, &json!({})).await.unwrap();
        assert_eq!(r.status, 404);
        // Each request to send again is in the audit log.
        let audit = c.get("/v1/audit?limit=1000", &shop).await.unwrap().json();
        assert!(!audit.to_string().contains(pan), "{audit}");
        let asked = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"] == json!(format!("pix-webhook-delivery:{e2e}")))
            .count();
        assert_eq!(asked, 4, "{audit}");
    });
}

/// A receiver moved between two attempts gets the next one: each attempt reads the webhook anew.
#[test]
fn a_retry_goes_to_the_webhook_as_it_is_now() {
    let dir = temp_dir("webhooks-moved");
    let (rtpay, server_cert, ca_der) = start_with_pki(&dir, 500, 60_000);
    runtime().block_on(async {
        let (old_port, old_seen) = receiver(&server_cert, ca_der.clone(), usize::MAX).await;
        let (new_port, new_seen) = receiver(&server_cert, ca_der, 0).await;
        let mut c = rtpay.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        acme_with_key(&mut c, &shop).await;
        let put = |url: String| Some(serde_json::to_vec(&json!({"webhookUrl": url})).unwrap().into());
        let path = format!("/api/v2/webhook/{CNPJ_ACME}");
        let old = put(format!("https://localhost:{old_port}/old"));
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), old).await.unwrap().status, 200);
        let e2e = pix_with_txid(&mut c, &shop, 500, "MOVED2026").await;
        for _ in 0..400 {
            if !old_seen.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(old_seen.lock().unwrap().len(), 1, "the first attempt went to the old receiver, and failed");
        let moved = put(format!("https://localhost:{new_port}/new"));
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), moved).await.unwrap().status, 200);
        let delivery = delivery_when(&mut c, &shop, &e2e, "delivered").await;
        assert_eq!(delivery["attempts"], json!(2), "{delivery}");
        assert_eq!(delivery["url"], json!(format!("https://localhost:{new_port}/new/pix")));
        assert_eq!(old_seen.lock().unwrap().len(), 1, "no attempt went to the old receiver after the move");
        let new_seen = new_seen.lock().unwrap().clone();
        assert_eq!(new_seen.len(), 1);
        assert_eq!(new_seen[0].0, "/new/pix");
    });
}

/// Deleting a Pix key deletes its webhook: the webhook no longer lists, and the key registered
/// again starts without one (before, the webhook outlived its key, could not be deleted, and came
/// back with the key).
#[test]
fn a_deleted_key_takes_its_webhook_with_it() {
    let dir = temp_dir("webhooks-key-deleted");
    let (rtpay, _, _) = start_with_pki(&dir, 100, 200);
    runtime().block_on(async {
        let mut c = rtpay.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let holder = new_holder(&mut c, &shop, "company", "ACME", CNPJ_ACME).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": holder})).await;
        let key = json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME});
        assert_eq!(c.post("/v1/pix/keys", &shop, &key).await.unwrap().status, 201);
        let hook = Some(serde_json::to_vec(&json!({"webhookUrl": "https://localhost:9/h"})).unwrap().into());
        let path = format!("/api/v2/webhook/{CNPJ_ACME}");
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), hook).await.unwrap().status, 200);
        assert_eq!(c.get("/api/v2/webhook", &shop).await.unwrap().json()["webhooks"].as_array().unwrap().len(), 1);

        let r = c.send(Method::DELETE, &format!("/v1/pix/keys/{CNPJ_ACME}"), Some(&shop), None).await.unwrap();
        assert_eq!(r.status, 204);
        let r = c.get("/api/v2/webhook", &shop).await.unwrap();
        assert_eq!(r.json()["webhooks"], json!([]), "{:?}", r.json());
        assert_eq!(c.post("/v1/pix/keys", &shop, &key).await.unwrap().status, 201, "the key registered again");
        let r = c.get(&path, &shop).await.unwrap();
        assert_eq!(r.status, 404, "the old webhook came back with the key: {:?}", r.json());
    });
}

#[test]
fn received_pix_are_notified_over_mtls_signed_and_retried() {
    let dir = temp_dir("webhooks");
    let (rtpay, server_cert, ca_der) = start_with_pki(&dir, 50, 60_000);
    let rt = runtime();
    rt.block_on(async {
        let (port, seen) = receiver(&server_cert, ca_der, 2).await;
        let mut c = rtpay.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let holder = new_holder(&mut c, &shop, "company", "ACME", CNPJ_ACME).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": holder})).await;
        assert_eq!(
            c.post("/v1/pix/keys", &shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME}))
                .await
                .unwrap()
                .status,
            201
        );

        let put = |url: &str| Some(serde_json::to_vec(&json!({"webhookUrl": url})).unwrap().into());
        let path = format!("/api/v2/webhook/{CNPJ_ACME}");
        let r = c.send(Method::PUT, &path, Some(&shop), put("http://localhost/hooks")).await.unwrap();
        assert_eq!(r.status, 400, "plain http is refused");
        assert_eq!(r.json()["type"], json!("https://pix.bcb.gov.br/api/v2/error/WebhookOperacaoInvalida"));
        // A path no request line can carry (a control character, raw non-ASCII) is refused: it
        // could never be sent.
        for bad in ["https://localhost/a\u{1}b", "https://localhost/caf\u{e9}", "https://localhost/a\u{7f}"] {
            let r = c.send(Method::PUT, &path, Some(&shop), put(bad)).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["violacoes"][0]["propriedade"].clone()), (400, json!("webhookUrl")), "{bad:?}");
        }
        let r = c
            .send(Method::PUT, "/api/v2/webhook/someone@example.com", Some(&shop), put("https://localhost/x"))
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.json()["violacoes"][0]["propriedade"].clone()), (400, json!("chave")));
        let url = format!("https://localhost:{port}/hooks");
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), put(&url)).await.unwrap().status, 200);
        let r = c.get(&path, &shop).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.json()["webhookUrl"].clone(), r.json()["chave"].clone(), r.json()["cnpj"].clone()),
            (200, json!(url), json!(CNPJ_ACME), json!(CNPJ_ACME))
        );
        let r = c.get("/api/v2/webhook", &shop).await.unwrap();
        assert_eq!(r.json()["webhooks"].as_array().unwrap().len(), 1, "{:?}", r.json());

        // A Pix without a txid is not notified (the API Pix notifies those associated with one).
        let payer = json!({"ispb": "60701190", "name": "Joana Prado", "document": "11144477735"});
        let r = c.post("/v1/sandbox/spi/incoming", &shop, &json!({"amount": 1, "key": CNPJ_ACME, "payer": payer})).await.unwrap();
        let untold = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
        // A Pix on the key's BR Code with a txid: notified after two failed tries.
        let code = json!({"key": CNPJ_ACME, "amount": 1_234, "merchant_name": "ACME", "merchant_city": "SAO PAULO", "txid": "MENSAL2026"});
        let brcode = c.post("/v1/pix/brcode", &shop, &code).await.unwrap().json()["payload"].clone();
        let incoming = json!({"amount": 1_234, "brcode": brcode, "description": "mensalidade", "payer": payer});
        let r = c.post("/v1/sandbox/spi/incoming", &shop, &incoming).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let e2e = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
        let delivery = delivery_when(&mut c, &shop, &e2e, "delivered").await;
        assert_eq!(
            (delivery["status"].clone(), delivery["attempts"].clone()),
            (json!("delivered"), json!(3)),
            "{delivery}"
        );
        let received = seen.lock().unwrap().clone();
        assert_eq!(received.len(), 3);
        let secret =
            c.get("/v1/pix/webhook-secret", &shop).await.unwrap().json()["secret"].as_str().unwrap().to_owned();
        // Revealing the signing key is an action of its own, in the audit log.
        let audit = c.get("/v1/audit?limit=1000", &shop).await.unwrap().json();
        let reveals: Vec<_> =
            audit["entries"].as_array().unwrap().iter().filter(|e| e["resource"] == json!("pix-webhook-secret")).collect();
        assert_eq!(reveals.len(), 1, "{audit}");
        assert_eq!(reveals[0]["outcome"], json!("200"), "{audit}");
        for (path, signature, body, presented, delivery, timestamp) in &received {
            assert_eq!(delivery, &e2e, "the delivery's id goes with it");
            assert_eq!(path, "/hooks/pix");
            assert!(presented, "rtpay presented its client certificate");
            let signed = python_hmac(&secret, timestamp, delivery, body);
            assert_eq!(signature, &format!("sha256={signed}"), "the signature checks out");
            let age = (store::now_nanos() / 1_000_000_000).abs_diff(timestamp.parse().unwrap());
            assert!(age < 60, "the timestamp is the attempt's: {timestamp}");
            let v: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(
                (v["pix"][0]["endToEndId"].clone(), v["pix"][0]["valor"].clone(), v["pix"][0]["infoPagador"].clone()),
                (json!(e2e), json!("12.34"), json!("mensalidade"))
            );
            assert_eq!(v["pix"][0]["txid"], json!("MENSAL2026"));
        }
        assert_eq!(c.get(&format!("/v1/pix/webhook-deliveries/{untold}"), &shop).await.unwrap().status, 404);

        // A refund of the Pix reaching its final status is notified too (the callback's second
        // case), with the Pix and its refunds, under its own delivery record. (The Pix came from
        // another institution: its refund is in process until the SPI settles its return.)
        let refund = Some(serde_json::to_vec(&json!({"valor": "2.00"})).unwrap().into());
        let r = c.send(Method::PUT, &format!("/api/v2/pix/{e2e}/devolucao/D1"), Some(&shop), refund).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("EM_PROCESSAMENTO")), "{:?}", r.json());
        let delivery = delivery_when(&mut c, &shop, &format!("{e2e}:D1"), "delivered").await;
        assert_eq!(
            (delivery["status"].clone(), delivery["end_to_end_id"].clone(), delivery["refund_id"].clone()),
            (json!("delivered"), json!(e2e), json!("D1")),
            "{delivery}"
        );
        let (to, signature, body, _, delivery, timestamp) = seen_after(&seen, 3).await;
        assert_eq!(delivery, format!("{e2e}:D1"));
        assert_eq!(to, "/hooks/pix");
        assert_eq!(signature, format!("sha256={}", python_hmac(&secret, &timestamp, &delivery, &body)));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((v["pix"][0]["endToEndId"].clone(), v["pix"][0]["txid"].clone()), (json!(e2e), json!("MENSAL2026")));
        let refunds = v["pix"][0]["devolucoes"].as_array().unwrap();
        assert_eq!(refunds.len(), 1, "{v}");
        assert_eq!(
            (refunds[0]["id"].clone(), refunds[0]["valor"].clone(), refunds[0]["status"].clone()),
            (json!("D1"), json!("2.00"), json!("DEVOLVIDO"))
        );
        assert_eq!(seen.lock().unwrap().len(), 4, "the receipt is not sent again");
        // A MED return is a refund too: notified with both.
        let claim = json!({"end_to_end_id": e2e, "reason": "golpe", "amount": 100});
        let r = c.post("/v1/pix/med", &shop, &claim).await.unwrap();
        assert_eq!(r.status, 201);
        // Under the claim's own delivery id: a claim opened again (after a return another
        // institution refused) is notified under another, not as a repeat of this one.
        let med = format!("{e2e}:MED{}", r.json()["claim_id"].as_str().unwrap().replace('-', ""));
        let r = c.post(&format!("/v1/pix/med/{e2e}/return"), &shop, &json!({})).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let (_, signature, body, _, delivery, timestamp) = seen_after(&seen, 4).await;
        assert_eq!(delivery, med);
        assert_eq!(signature, format!("sha256={}", python_hmac(&secret, &timestamp, &delivery, &body)));
        let v: Value = serde_json::from_slice(&body).unwrap();
        let refunds: Vec<_> = v["pix"][0]["devolucoes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["id"].as_str().unwrap().to_owned(), r["valor"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(refunds, [("D1".to_owned(), "2.00".to_owned()), ("MED".to_owned(), "1.00".to_owned())], "{v}");
        assert_eq!(delivery_when(&mut c, &shop, &med, "delivered").await["refund_id"], json!("MED"));
        // The MED return is the refund `MED`: found under that id, which no refund may take.
        let r = c.get(&format!("/api/v2/pix/{e2e}/devolucao/MED"), &shop).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["natureza"].clone()), (200, json!("MED_FRAUDE")), "{:?}", r.json());
        let refund = Some(serde_json::to_vec(&json!({"valor": "0.01"})).unwrap().into());
        let r = c.send(Method::PUT, &format!("/api/v2/pix/{e2e}/devolucao/MED"), Some(&shop), refund.clone()).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["violacoes"][0]["propriedade"].clone()), (400, json!("id")));
        // Nor the shape of a MED return's delivery id.
        let shaped = format!("MED{}", "0a".repeat(16));
        let r = c.send(Method::PUT, &format!("/api/v2/pix/{e2e}/devolucao/{shaped}"), Some(&shop), refund).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["violacoes"][0]["propriedade"].clone()), (400, json!("id")), "{shaped}");

        // The secret rotated: the new one signs at once, the old one too while the overlap lasts
        // (a receiver accepts a notification if one signature checks out under a secret it holds).
        let r = c.post("/v1/pix/webhook-secret/rotate", &shop, &json!({})).await.unwrap();
        let rotated = r.json();
        assert_eq!((r.status.as_u16(), rotated["generation"].clone()), (200, json!(1)), "{rotated}");
        assert!(rotated["previous_valid_until"].is_string(), "{rotated}");
        let second = rotated["secret"].as_str().unwrap().to_owned();
        assert_ne!(second, secret);
        let shown = c.get("/v1/pix/webhook-secret", &shop).await.unwrap().json();
        assert_eq!((shown["secret"].clone(), shown["generation"].clone()), (json!(second), json!(1)), "{shown}");
        let retried = med.clone();
        let r = c.post(&format!("/v1/pix/webhook-deliveries/{retried}/retry"), &shop, &json!({})).await.unwrap();
        assert_eq!(r.status, 202, "{:?}", r.json());
        let (_, signature, body, _, delivery, timestamp) = seen_after(&seen, 5).await;
        assert_eq!(delivery, retried);
        let (new, old) =
            (python_hmac(&second, &timestamp, &delivery, &body), python_hmac(&secret, &timestamp, &delivery, &body));
        assert_eq!(signature, format!("sha256={new},sha256={old}"));
        // Rotated again with no overlap: the newest secret alone signs.
        let r = c.post("/v1/pix/webhook-secret/rotate", &shop, &json!({"overlap_seconds": 0})).await.unwrap();
        let rotated = r.json();
        assert_eq!((r.status.as_u16(), rotated["generation"].clone()), (200, json!(2)), "{rotated}");
        assert!(rotated.get("previous_valid_until").is_none(), "{rotated}");
        let third = rotated["secret"].as_str().unwrap().to_owned();
        assert!(third != second && third != secret);
        delivery_when(&mut c, &shop, &retried, "delivered").await;
        let r = c.post(&format!("/v1/pix/webhook-deliveries/{retried}/retry"), &shop, &json!({})).await.unwrap();
        assert_eq!(r.status, 202, "{:?}", r.json());
        let (_, signature, body, _, delivery, timestamp) = seen_after(&seen, 6).await;
        assert_eq!(signature, format!("sha256={}", python_hmac(&third, &timestamp, &delivery, &body)));
        // Bad input changes nothing.
        for (body, status) in [
            (json!({"overlap_seconds": 604_801}), 422),
            (json!({"overlap_seconds": -1}), 422),
            (json!({"overlap_seconds": "1"}), 422),
        ] {
            let r = c.post("/v1/pix/webhook-secret/rotate", &shop, &body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (status, json!("overlap_seconds")), "{body}: {:?}", r.json());
        }
        let r = c.post("/v1/pix/webhook-secret/rotate", &shop, &json!({"overlap": 1})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("overlap")), "{:?}", r.json());
        let shown = c.get("/v1/pix/webhook-secret", &shop).await.unwrap().json();
        assert_eq!((shown["secret"].clone(), shown["generation"].clone()), (json!(third), json!(2)), "{shown}");

        assert_eq!(c.send(Method::DELETE, &path, Some(&shop), None).await.unwrap().status, 204);
        assert_eq!(c.get(&path, &shop).await.unwrap().status, 404);
    });

    // Without --webhook-allow-private, receivers in rtpay's own network are refused.
    let strict = Server::start_with_args(&dir.join("strict"), None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    rt.block_on(async {
        let mut c = strict.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let holder = new_holder(&mut c, &shop, "company", "ACME", CNPJ_ACME).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": holder})).await;
        assert_eq!(c.post("/v1/pix/keys", &shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME})).await.unwrap().status, 201);
        let path = format!("/api/v2/webhook/{CNPJ_ACME}");
        for url in [
            "https://127.0.0.1:8443/x",
            "https://10.1.2.3/x",
            "https://[::1]:443/x",
            "https://169.254.169.254/latest",
            // Numeric forms resolvers read as addresses, and ports no delivery can use.
            "https://127.1/hook",
            "https://2130706433/hook",
            "https://0177.0.0.1/hook",
            "https://example.com:0/x",
            "https://example.com:99999/x",
            "https://exa mple.com/x",
        ] {
            let body = Some(serde_json::to_vec(&json!({"webhookUrl": url})).unwrap().into());
            let r = c.send(Method::PUT, &path, Some(&shop), body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["violacoes"][0]["propriedade"].clone()), (400, json!("webhookUrl")), "{url}");
        }
        // A host name is checked when it is resolved, at delivery: `localhost` is loopback.
        let body = Some(serde_json::to_vec(&json!({"webhookUrl": "https://localhost:9/x"})).unwrap().into());
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), body).await.unwrap().status, 200);
        // The first attempt's record of a Pix with `txid` on the key.
        let first_attempt = |txid: &'static str| {
            let (mut c, shop) = (strict.client(), shop.clone());
            async move {
                let code = json!({"key": CNPJ_ACME, "amount": 5, "merchant_name": "ACME", "merchant_city": "SAO PAULO", "txid": txid});
                let brcode = c.post("/v1/pix/brcode", &shop, &code).await.unwrap().json()["payload"].clone();
                let incoming = json!({"amount": 5, "brcode": brcode, "payer": {"ispb": "60701190", "name": "J", "document": "11144477735"}});
                let r = c.post("/v1/sandbox/spi/incoming", &shop, &incoming).await.unwrap();
                let e2e = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
                for _ in 0..600 {
                    let r = c.get(&format!("/v1/pix/webhook-deliveries/{e2e}"), &shop).await.unwrap();
                    // The record exists from the Pix's commit on (pending, no attempt yet).
                    if r.status == 200 && r.json()["attempts"].as_u64() >= Some(1) {
                        return r.json();
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                panic!("no attempt was made");
            }
        };
        let private = first_attempt("T1").await;
        assert!(private["last_error"].as_str().unwrap_or("").contains("no public address"), "{private}");
        // A name that does not resolve reads the same: a tenant cannot map rtpay's network.
        let body = Some(serde_json::to_vec(&json!({"webhookUrl": "https://rtpay-test.invalid/x"})).unwrap().into());
        assert_eq!(c.send(Method::PUT, &path, Some(&shop), body).await.unwrap().status, 200);
        let unknown = first_attempt("T2").await;
        assert_eq!(unknown["last_error"], private["last_error"], "{unknown}");
    });
}

/// A notification is due from the Pix's commit on: a node killed between two attempts delivers it
/// when it starts again, from the attempts already made.
#[test]
fn a_delivery_interrupted_by_a_crash_is_made_after_the_restart() {
    let dir = temp_dir("webhooks-restart");
    // The second attempt would come a second after the first; killed before it, the node's lease
    // (that second, the attempt's 10 s time-out and 2 s) runs out, and the restarted node's sweep
    // takes the delivery over.
    let (mut rtpay, server_cert, ca_der) = start_with_pki(&dir, 1000, 60_000);
    let rt = runtime();
    rt.block_on(async {
        let (port, seen) = receiver(&server_cert, ca_der, 1).await;
        let mut c = rtpay.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let holder = new_holder(&mut c, &shop, "company", "ACME", CNPJ_ACME).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": holder})).await;
        let r = c.post("/v1/pix/keys", &shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME})).await;
        assert_eq!(r.unwrap().status, 201);
        let hook = Some(serde_json::to_vec(&json!({"webhookUrl": format!("https://localhost:{port}/hooks")})).unwrap().into());
        let r = c.send(Method::PUT, &format!("/api/v2/webhook/{CNPJ_ACME}"), Some(&shop), hook).await.unwrap();
        assert_eq!(r.status, 200);
        let code = json!({"key": CNPJ_ACME, "amount": 500, "merchant_name": "ACME", "merchant_city": "SAO PAULO", "txid": "PEDIDO77"});
        let brcode = c.post("/v1/pix/brcode", &shop, &code).await.unwrap().json()["payload"].clone();
        let payer = json!({"ispb": "60701190", "name": "Joana Prado", "document": "11144477735"});
        let r = c.post("/v1/sandbox/spi/incoming", &shop, &json!({"amount": 500, "brcode": brcode, "payer": payer})).await;
        let r = r.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let e2e = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
        let delivery = format!("/v1/pix/webhook-deliveries/{e2e}");
        let mut first = Value::Null;
        for _ in 0..200 {
            first = c.get(&delivery, &shop).await.unwrap().json();
            if first["attempts"] == json!(1) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!((first["status"].clone(), first["attempts"].clone()), (json!("pending"), json!(1)), "{first}");
        assert!(first.get("outbox").is_none(), "the record shows no internals: {first}");

        // Killed while it waits for its second attempt; started again.
        rtpay.kill9();
        rtpay.restart();
        let mut c = rtpay.client();
        let mut done = Value::Null;
        for _ in 0..1200 {
            done = c.get(&delivery, &shop).await.unwrap().json();
            if done["status"] == json!("delivered") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!((done["status"].clone(), done["attempts"].clone()), (json!("delivered"), json!(2)), "{done}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "one failed attempt before the crash, one after");
        let v: Value = serde_json::from_slice(&seen[1].2).unwrap();
        assert_eq!((v["pix"][0]["endToEndId"].clone(), v["pix"][0]["txid"].clone()), (json!(e2e), json!("PEDIDO77")));
    });
    let (ok, report) = rtpay.verify();
    assert!(ok, "{report}");
}
