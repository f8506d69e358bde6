//! The API Pix against its contract: PyPI `schemathesis` (an independent peer, installed by
//! `scripts/setup`) reads `shared/spec/pix-api/openapi.yaml` and drives a live `rtpay serve` with
//! requests generated from it — the cob, cobv, lotecobv, loc, pix, devolução and webhook operations — checking that no answer is
//! a server error, and that every status code, content type and body is one the spec documents.
//! It authenticates as an OAuth2 client with the spec's scopes, and is given a charge and a
//! received Pix to find, so its requests reach the operations' logic, not only their 404s.
//!
//! The cobv is given a debtor with a CNPJ: the spec's CPF pattern is written `/^\d{11}$/` (slashes
//! included), which no CPF matches, so no charge with a CPF debtor can conform to the schema.
//!
//! Generation is `positive` (requests the schema allows): for schema-invalid queries the spec
//! defines `CobConsultaInvalida`/`PixConsultaInvalida` (400) in its text but documents no 400 on
//! the listings, so negative generation would ask for a 200 to a malformed request.
//!
//! The same gap on requests the schema allows: the spec's error catalogue answers 400
//! (`…ConsultaInvalida`) to a listing whose `fim` is before its `inicio` or that names a `cpf` and
//! a `cnpj`, and to a `revisao` the charge does not have, on operations whose `responses` list no
//! 400. schemathesis reads a copy of the spec with that 400 (a problem, the spec's `Problema`)
//! added to those eight operations, and nothing else changed ([`with_catalogued_400s`]).
//!
//! rtpay's own API against the document it serves at `/openapi.json`: generation `all` (requests
//! the schema allows and requests it forbids), every operation, as a tenant and then as the
//! operator. Every answer must be documented, status, content type, headers and body; none may be
//! a server error.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use hyper::Method;
use serde_json::json;

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/spec/pix-api/openapi.yaml");
const TXID: &str = "schemathesisTxid000000000000001";
const COBV_TXID: &str = "schemathesisCobv000000000000001";
const E2E: &str = "E6070119020261201120000000000001";

/// The Python of the tests' environment.
fn python() -> String {
    std::env::var("RTPAY_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/rtpay/venv/bin/python", std::env::var("HOME").unwrap_or_default()))
}

/// The `schemathesis` command of the tests' Python environment.
fn schemathesis() -> std::path::PathBuf {
    let schemathesis = std::path::Path::new(&python()).with_file_name("schemathesis");
    assert!(schemathesis.exists(), "{} is missing: run scripts/setup", schemathesis.display());
    schemathesis
}

/// The GET operations whose `…ConsultaInvalida` (400) the spec's error catalogue names for
/// requests its schema allows, and whose `responses` list no 400.
const CATALOGUED_400: [&str; 8] =
    ["/cob", "/cob/{txid}", "/cobv", "/cobv/{txid}", "/lotecobv", "/loc", "/pix", "/webhook"];

/// A copy of the spec in `dir` with a 400 problem added to [`CATALOGUED_400`] (see the module's
/// docs), written by PyYAML (schemathesis's own YAML reader); fails if an operation is missing
/// or already documents a 400.
fn with_catalogued_400s(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("openapi-with-catalogued-400s.yaml");
    let script = r##"
import sys, yaml
src, dst, paths = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
spec = yaml.safe_load(open(src, encoding="utf-8"))
problem = {"description": "ConsultaInvalida, as the error catalogue names it",
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problema"}}}}
for path in paths:
    responses = spec["paths"][path]["get"]["responses"]
    assert "400" not in responses and 400 not in responses, path
    responses["400"] = problem
yaml.safe_dump(spec, open(dst, "w", encoding="utf-8"), allow_unicode=True, sort_keys=False)
"##;
    let status =
        Command::new(python()).args(["-c", script, SPEC]).arg(&out).arg(CATALOGUED_400.join(",")).status().unwrap();
    assert!(status.success(), "the spec's copy was not written");
    out
}

/// Runs `command` (a `schemathesis run` with its spec, target and options) from `dir`, reporting
/// into `dir/report-<who>`; fails if schemathesis found failures or generated nothing. Its output.
fn run(mut command: Command, dir: &std::path::Path, who: &str) -> String {
    let out = command
        .arg("--report-dir")
        .arg(dir.join(format!("report-{who}")))
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures ({who}):\n{text}");
    let generated = text.lines().find(|l| l.contains("generated,")).unwrap_or_default();
    assert!(generated.contains("passed"), "no test cases ran ({who}):\n{text}");
    text
}

/// Every check of an answer against the document, and that a request breaking its schemas is
/// refused. (Not that every request the schemas allow is accepted: rules on stored state and on
/// check digits, such as an account that exists or a CPF's digits, are not a schema's to say.)
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
     response_schema_conformance,response_headers_conformance,negative_data_rejection";

#[test]
fn the_api_pix_conforms_to_its_openapi_spec() {
    assert!(std::path::Path::new(SPEC).exists(), "{SPEC} is missing (is ../shared checked out?)");
    let schemathesis = schemathesis();

    let dir = temp_dir("schemathesis");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", "12345678"]);
    let (token, loc_id) = runtime().block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "schemathesis").await;
        let r = c
            .post("/v1/holders", &key, &json!({"kind": "company", "name": "ACME", "document": "11222333000181"}))
            .await
            .unwrap();
        let holder = r.json()["id"].as_str().unwrap().to_owned();
        let acct = account(&mut c, &key, json!({"currency": "BRL", "holder_id": holder})).await;
        let r = c
            .post("/v1/pix/keys", &key, &json!({"account_id": acct, "type": "cnpj", "key": "11222333000181"}))
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let cob = json!({"valor": {"original": "10.00"}, "chave": "11222333000181"});
        let r = c
            .send(
                Method::PUT,
                &format!("/api/v2/cob/{TXID}"),
                Some(&key),
                Some(serde_json::to_vec(&cob).unwrap().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let loc_id = r.json()["loc"]["id"].as_u64().unwrap();
        let address =
            json!({"street": "Av. Paulista, 1000", "city": "São Paulo", "state": "SP", "postal_code": "01310100"});
        let r = c
            .send(
                Method::PUT,
                &format!("/v1/holders/{holder}/address"),
                Some(&key),
                Some(serde_json::to_vec(&address).unwrap().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let cobv = json!({"calendario": {"dataDeVencimento": "2099-12-31"}, "valor": {"original": "10.00"},
            "devedor": {"cnpj": "11444777000161", "nome": "Fornecedora SA"}, "chave": "11222333000181"});
        let r = c
            .send(
                Method::PUT,
                &format!("/api/v2/cobv/{COBV_TXID}"),
                Some(&key),
                Some(serde_json::to_vec(&cobv).unwrap().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let mut item = cobv.clone();
        item["txid"] = json!("schemathesisLote000000000000001");
        let lote = json!({"descricao": "lote", "cobsv": [item]});
        let r = c
            .send(Method::PUT, "/api/v2/lotecobv/77", Some(&key), Some(serde_json::to_vec(&lote).unwrap().into()))
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{:?}", r.json());
        let incoming = json!({"end_to_end_id": E2E, "amount": 5_000, "account_id": acct,
            "payer": {"ispb": "60701190", "name": "Joana Prado", "document": "11144477735"}});
        assert_eq!(c.post("/v1/sandbox/spi/incoming", &key, &incoming).await.unwrap().status, 201);
        let r = c
            .post(
                "/v1/oauth-clients",
                &key,
                &json!({"scopes": ["cob.write", "cob.read", "pix.write", "pix.read", "webhook.write", "webhook.read",
                    "payloadlocation.write", "payloadlocation.read", "cobv.write", "cobv.read", "lotecobv.write", "lotecobv.read"]}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let (id, secret) = (
            r.json()["client_id"].as_str().unwrap().to_owned(),
            r.json()["client_secret"].as_str().unwrap().to_owned(),
        );
        let form = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
        let headers = [("content-type", "application/x-www-form-urlencoded")];
        let r =
            c.send_with_headers(Method::POST, "/oauth/token", None, Some(Bytes::from(form)), &headers).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        (r.json()["access_token"].as_str().unwrap().to_owned(), loc_id)
    });

    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[parameters]\ntxid = \"{TXID}\"\ne2eid = \"{E2E}\"\nchave = \"11222333000181\"\nid = \"{loc_id}\"\n\n\
             [[operations]]\ninclude-path-regex = \"^/cobv\"\nparameters = {{ txid = \"{COBV_TXID}\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/lotecobv\"\nparameters = {{ id = \"77\" }}\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(&schemathesis);
    command
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(with_catalogued_400s(&dir))
        .args(["--url", &format!("http://{}/api/v2", server.addr)])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--include-path-regex", "^/(cob|cobv|lotecobv|pix|webhook|loc)(/.*)?$"])
        // What a location serves is on the receiver's own host (its `servers`), not under /api/v2.
        .args(["--exclude-path", "/cobv/{pixUrlAccessToken}"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--mode", "positive", "--max-examples", "50", "--seed", "20261201", "--no-color"]);
    let text = run(command, &dir, "api-pix");
    assert!(
        text.contains("Selected: 25/"),
        "the 25 cob, cobv, lotecobv, loc, pix, devolução and webhook operations were not all selected:\n{text}"
    );
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

#[test]
fn the_native_api_conforms_to_the_document_it_serves() {
    let dir = temp_dir("schemathesis-native");
    // The tenant's rate is raised so that no answer is a 429 of the load's own making.
    let server =
        Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", "12345678", "--rate-limit", "1000000"]);
    let base = format!("http://{}", server.addr);
    let (spec, key, tenant_id, held, pending, holder) = runtime().block_on(async {
        let mut c = server.client();
        let r = c.send(Method::GET, "/openapi.json", None, None).await.unwrap();
        assert_eq!(r.status, 200);
        let spec = r.body;
        let (tenant_id, key) = tenant(&mut c, "schemathesis").await;
        let holder = new_holder(&mut c, &key, "company", "ACME", "11222333000181").await;
        let held = account(&mut c, &key, json!({"currency": "BRL", "holder_id": holder})).await;
        let other = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let pending = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".to_owned();
        let body = json!({"id": pending, "debit_account_id": other, "credit_account_id": held, "amount": 100, "pending": true});
        let r = c.post("/v1/transfers", &key, &body).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        (spec, key, tenant_id, held, pending, holder)
    });
    let spec_path = dir.join("openapi.json");
    std::fs::write(&spec_path, &spec).unwrap();
    // Known resources for the operations that name one, so that requests reach more than a 404.
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[[operations]]\ninclude-path-regex = \"^/v1/accounts/\"\nparameters = {{ id = \"{held}\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/v1/transfers/\"\nparameters = {{ id = \"{pending}\", pending_id = \"{pending}\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/v1/holders/\"\nparameters = {{ id = \"{holder}\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/v1/tenants/\"\nparameters = {{ id = \"{tenant_id}\" }}\n"
        ),
    )
    .unwrap();
    // As a tenant, every operation but the operator's; then those as the operator. Requests
    // without a credential are not generated: their 401s would spend the address's budget of
    // failed authentications, and every answer after it would be a 429.
    let passes =
        [("tenant", key.as_str(), "--exclude-path-regex", 44), ("operator", OPERATOR, "--include-path-regex", 4)];
    for (who, token, filter, operations) in passes {
        let mut command = Command::new(schemathesis());
        command
            .arg("--config-file")
            .arg(&config)
            .args(["run"])
            .arg(&spec_path)
            .args(["--url", &base])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args([filter, "^/v1/(tenants|keys/rotate)"])
            .args(["--checks", CHECKS, "--generation-with-security-parameters", "false"])
            .args(["--mode", "all", "--max-examples", "40", "--seed", "20261206", "--no-color"]);
        let text = run(command, &dir, who);
        assert!(
            text.contains(&format!("Tested: {operations}")),
            "not all {operations} operations of the {who} were tested:\n{text}"
        );
        assert!(!text.contains("Rate limited"), "answers were 429s, leaving the logic untested:\n{text}");
    }
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}
