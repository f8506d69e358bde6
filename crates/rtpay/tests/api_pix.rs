//! The Central Bank's API Pix (`/api/v2`) end to end against a real `rtpay serve --ispb`:
//! immediate charges (cob) created, revised, listed and removed; their dynamic BR Codes paid on us
//! and from another institution, which concludes them; received Pix listed; refunds within the
//! received amount; errors in the spec's `Problema` form; the ledger's invariants after it all.

mod common;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

const ISPB: &str = "12345678";
const CPF_MARIA: &str = "52998224725";
const CNPJ_ACME: &str = "11222333000181";
const TXID: &str = "pedido42abcdefghijklmnopqrstuvwxyz";

async fn send(
    c: &mut rtpay::client::Client,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value, String) {
    let body = body.map(|b| serde_json::to_vec(&b).unwrap().into());
    let r = c.send(method, path, Some(key), body).await.unwrap();
    let content_type = r.headers.get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (r.status.as_u16(), r.json(), content_type)
}

/// A holder's BRL account (funded with `funds` centavos).
async fn holder_account(
    c: &mut rtpay::client::Client,
    key: &str,
    kind: &str,
    name: &str,
    doc: &str,
    funds: u64,
) -> String {
    let holder = new_holder(c, key, kind, name, doc).await;
    let acct = account(
        c,
        key,
        json!({"currency": "BRL", "holder_id": holder, "flags": {"debits_must_not_exceed_credits": true}}),
    )
    .await;
    if funds > 0 {
        let funding = account(c, key, json!({"currency": "BRL"})).await;
        let body = json!({"id": uuid(), "debit_account_id": funding, "credit_account_id": acct, "amount": funds});
        assert_eq!(c.post("/v1/transfers", key, &body).await.unwrap().status, 201);
    }
    acct
}

/// ACME's account in `shop`, with its CNPJ as its Pix key.
async fn acme_with_key(c: &mut rtpay::client::Client, shop: &str) -> String {
    let acme = holder_account(c, shop, "company", "ACME Comércio", CNPJ_ACME, 0).await;
    let r = c.post("/v1/pix/keys", shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME})).await.unwrap();
    assert_eq!(r.status, 201);
    acme
}

fn assert_problem(got: &(u16, Value, String), status: u16, kind: &str, property: Option<&str>) {
    let (s, v, ct) = got;
    assert_eq!((*s, ct.as_str()), (status, "application/problem+json"), "{v}");
    assert_eq!(v["type"], json!(format!("https://pix.bcb.gov.br/api/v2/error/{kind}")), "{v}");
    assert_eq!(v["status"], json!(status));
    if let Some(p) = property {
        assert_eq!(v["violacoes"][0]["propriedade"], json!(p), "{v}");
    }
}

#[test]
fn charges_are_created_revised_paid_and_refunded() {
    let dir = temp_dir("api-pix");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let (_, wallet) = tenant(&mut c, "wallet").await;
        let acme = acme_with_key(&mut c, &shop).await;
        let maria = holder_account(&mut c, &wallet, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let available = |v: Value| v["available"].as_i64().unwrap();

        // Create, read, revise.
        let cob = json!({"calendario": {"expiracao": 3600}, "devedor": {"cpf": CPF_MARIA, "nome": "Maria Quitéria"},
            "valor": {"original": "123.45"}, "chave": CNPJ_ACME, "solicitacaoPagador": "Pedido 42",
            "infoAdicionais": [{"nome": "Loja", "valor": "Centro"}]});
        let (s, v, _) = send(&mut c, Method::PUT, &format!("/api/v2/cob/{TXID}"), &shop, Some(cob.clone())).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!((v["status"].clone(), v["revisao"].clone(), v["txid"].clone()), (json!("ATIVA"), json!(0), json!(TXID)));
        assert_eq!((v["valor"]["original"].clone(), v["devedor"]["cpf"].clone()), (json!("123.45"), json!(CPF_MARIA)));
        let location = v["location"].as_str().unwrap().strip_prefix("https://").unwrap().to_owned();
        assert_eq!(v["loc"]["location"], v["location"]);
        // Handed to the payer before the amount changes below (it says 123.45).
        let issued = v["pixCopiaECola"].clone();
        let r = c.post("/v1/pix/brcode/decode", &wallet, &json!({"payload": v["pixCopiaECola"]})).await.unwrap();
        let decoded = r.json();
        assert_eq!(
            (decoded["type"].clone(), decoded["url"].clone(), decoded["amount"].clone()),
            (json!("dynamic"), json!(location), json!(12_345)),
            "{decoded}"
        );
        let (s, got, _) = send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}"), &shop, None).await;
        assert_eq!((s, got["solicitacaoPagador"].clone()), (200, json!("Pedido 42")));
        let (s, v, _) =
            send(&mut c, Method::PATCH, &format!("/api/v2/cob/{TXID}"), &shop, Some(json!({"valor": {"original": "100.00"}}))).await;
        assert_eq!((s, v["revisao"].clone(), v["valor"]["original"].clone()), (200, json!(1), json!("100.00")), "{v}");
        assert_eq!(v["devedor"]["cpf"], json!(CPF_MARIA), "unchanged fields are kept");
        let (s, same, _) = send(&mut c, Method::PATCH, &format!("/api/v2/cob/{TXID}"), &shop, Some(json!({}))).await;
        assert_eq!((s, same["revisao"].clone()), (200, json!(1)), "a PATCH that changes nothing is no revision: {same}");
        let (_, old, _) = send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}?revisao=0"), &shop, None).await;
        assert_eq!(old["valor"]["original"], json!("123.45"));
        let payload = v["pixCopiaECola"].as_str().unwrap().to_owned();

        // The spec's errors, and nothing changed by them.
        for (body, property) in [
            (json!({"calendario": {"expiracao": 0}, "valor": {"original": "1.00"}, "chave": CNPJ_ACME}), "cob.calendario.expiracao"),
            (json!({"valor": {"original": "0.00"}, "chave": CNPJ_ACME}), "cob.valor.original"),
            (json!({"valor": {"original": "1,00"}, "chave": CNPJ_ACME}), "cob.valor.original"),
            (json!({"valor": {"original": "1.00"}, "chave": "someone@example.com"}), "cob.chave"),
            (json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME, "devedor": {"cpf": "52998224724", "nome": "x"}}), "cob.devedor.cpf"),
            (json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME, "extra": true}), "cob"),
            (json!({"calendario": {"expiracao": 2_147_483_648_i64}, "valor": {"original": "1.00"}, "chave": CNPJ_ACME}), "cob.calendario.expiracao"),
            // A list of the fields in order is no object, nor anywhere inside one.
            (json!([{"expiracao": 60}, null, null, {"original": "1.00"}, CNPJ_ACME]), "cob"),
            (json!({"valor": ["1.00"], "chave": CNPJ_ACME}), "cob"),
        ] {
            let got = send(&mut c, Method::PUT, "/api/v2/cob/otherTxid0000000000000000000001", &shop, Some(body.clone())).await;
            assert_problem(&got, 400, "CobOperacaoInvalida", Some(property));
        }
        // The schema's own names are shown; what the client sent is not, even shaped to slip out
        // (a backtick in a key, a key holding serde's own words, a value of the wrong type).
        let got = send(&mut c, Method::PUT, &format!("/api/v2/webhook/{CNPJ_ACME}"), &shop, Some(json!({}))).await;
        assert_problem(&got, 400, "WebhookOperacaoInvalida", Some("webhook"));
        assert!(got.1["violacoes"][0]["razao"].as_str().unwrap().contains("webhookUrl"), "the missing field is named: {}", got.1);
        for (body, shown) in [
            (json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME, "valor`rtpay_sk_ECHOED": 1}), None::<&str>),
            (json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME, "zz, expected rtpay_sk_ECHOED": 1}), None),
            (json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME, "solicitacaoPagador": 52998224725u64}), None),
        ] {
            let got = send(&mut c, Method::PUT, "/api/v2/cob/otherTxid0000000000000000000001", &shop, Some(body.clone())).await;
            assert_problem(&got, 400, "CobOperacaoInvalida", Some("cob"));
            let detail = got.1["violacoes"][0]["razao"].as_str().unwrap_or_default().to_owned() + got.1["detail"].as_str().unwrap_or_default();
            assert!(!detail.contains("ECHOED") && !detail.contains("52998224725"), "{body}: {detail}");
            assert!(shown.is_none_or(|name| detail.contains(name)), "{body}: {detail}");
        }
        assert_problem(&send(&mut c, Method::GET, "/api/v2/cob/otherTxid0000000000000000000001", &shop, None).await, 404, "CobNaoEncontrado", None);
        assert_problem(&send(&mut c, Method::PUT, "/api/v2/cob/short", &shop, Some(cob.clone())).await, 400, "CobOperacaoInvalida", Some("txid"));
        assert_problem(&send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}"), &wallet, None).await, 404, "CobNaoEncontrado", None);

        // Paid on us by its BR Code: the charge is concluded and its Pix listed.
        // A code issued before the revision pays what the charge asks now: a dynamic code's
        // amount is the charge's, at its location, whatever the code was printed with.
        let pay = json!({"id": uuid(), "debit_account_id": maria, "amount": 10_000, "brcode": issued});
        let r = c.post("/v1/pix/payments", &wallet, &pay).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let paid = r.json();
        assert_eq!((paid["status"].clone(), paid["txid"].clone()), (json!("completed"), json!(TXID)), "{paid}");
        let e2e = paid["end_to_end_id"].as_str().unwrap().to_owned();
        assert_eq!(available(balance(&mut c, &shop, &acme).await), 10_000);
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}"), &shop, None).await;
        assert_eq!((v["status"].clone(), v["pix"][0]["endToEndId"].clone()), (json!("CONCLUIDA"), json!(e2e)), "{v}");
        let again = json!({"id": uuid(), "debit_account_id": maria, "amount": 10_000, "brcode": payload});
        let r = c.post("/v1/pix/payments", &wallet, &again).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (422, json!("charge_not_payable")), "paid once");
        let got = send(&mut c, Method::PATCH, &format!("/api/v2/cob/{TXID}"), &shop, Some(json!({"solicitacaoPagador": "x"}))).await;
        assert_problem(&got, 400, "CobOperacaoInvalida", Some("cob.status"));

        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/pix/{e2e}"), &shop, None).await;
        assert_eq!((s, v["valor"].clone(), v["txid"].clone()), (200, json!("100.00"), json!(TXID)), "{v}");
        assert_problem(&send(&mut c, Method::GET, &format!("/api/v2/pix/{e2e}"), &wallet, None).await, 404, "PixNaoEncontrado", None);

        // Refunds: up to the received amount, once per id, back to the payer's account.
        let refund = |id: &str| format!("/api/v2/pix/{e2e}/devolucao/{id}");
        let (s, v, _) = send(&mut c, Method::PUT, &refund("D1"), &shop, Some(json!({"valor": "40.00"}))).await;
        assert_eq!((s, v["status"].clone(), v["valor"].clone()), (201, json!("DEVOLVIDO"), json!("40.00")), "{v}");
        let rtr = v["rtrId"].as_str().unwrap();
        assert_eq!((rtr.len(), &rtr[..9]), (32, format!("D{ISPB}").as_str()));
        assert_eq!(available(balance(&mut c, &wallet, &maria).await), 100_000 - 10_000 + 4_000);
        let (s, repeat, _) = send(&mut c, Method::PUT, &refund("D1"), &shop, Some(json!({"valor": "40.00"}))).await;
        assert_eq!((s, repeat["rtrId"].clone()), (201, v["rtrId"].clone()), "a repeat answers the first refund");
        assert_problem(&send(&mut c, Method::PUT, &refund("D1"), &shop, Some(json!({"valor": "1.00"}))).await, 400, "PixDevolucaoInvalida", Some("id"));
        assert_problem(&send(&mut c, Method::PUT, &refund("D2"), &shop, Some(json!({"valor": "60.01"}))).await, 400, "PixDevolucaoInvalida", Some("devolucao.valor"));
        assert_problem(&send(&mut c, Method::PUT, &refund("D2"), &shop, Some(json!({"valor": "1.00", "natureza": "MED_FRAUDE"}))).await, 400, "PixDevolucaoInvalida", Some("devolucao.natureza"));
        let (s, _, _) = send(&mut c, Method::PUT, &refund("D2"), &shop, Some(json!({"valor": "60.00", "natureza": "ORIGINAL"}))).await;
        assert_eq!(s, 201);
        assert_eq!(available(balance(&mut c, &shop, &acme).await), 0, "all of it back");
        assert_eq!(available(balance(&mut c, &wallet, &maria).await), 100_000);
        let (s, v, _) = send(&mut c, Method::GET, &refund("D2"), &shop, None).await;
        assert_eq!((s, v["status"].clone()), (200, json!("DEVOLVIDO")));
        assert_problem(&send(&mut c, Method::GET, &refund("D3"), &shop, None).await, 404, "PixDevolucaoNaoEncontrada", None);
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/pix/{e2e}"), &shop, None).await;
        assert_eq!(v["devolucoes"].as_array().unwrap().len(), 2, "{v}");

        // A charge with a PSP-made txid, paid from another institution (the sandbox SPI).
        let (s, v, _) = send(&mut c, Method::POST, "/api/v2/cob", &shop, Some(json!({"valor": {"original": "5.00"}, "chave": CNPJ_ACME}))).await;
        assert_eq!(s, 201, "{v}");
        let txid2 = v["txid"].as_str().unwrap().to_owned();
        assert!(txid2.len() >= 26 && txid2.bytes().all(|b| b.is_ascii_alphanumeric()));
        let incoming = json!({"amount": 500, "brcode": v["pixCopiaECola"],
            "payer": {"ispb": "60701190", "name": "Joana Prado", "document": "11144477735"}});
        let r = c.post("/v1/sandbox/spi/incoming", &shop, &incoming).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["txid"].clone()), (201, json!(txid2)), "{:?}", r.json());
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob/{txid2}"), &shop, None).await;
        assert_eq!(v["status"], json!("CONCLUIDA"));

        // Removed by the receiver: no longer payable.
        let (_, v, _) = send(&mut c, Method::POST, "/api/v2/cob", &shop, Some(json!({"valor": {"original": "7.00"}, "chave": CNPJ_ACME}))).await;
        let (txid3, payload3) = (v["txid"].as_str().unwrap().to_owned(), v["pixCopiaECola"].clone());
        let got = send(&mut c, Method::PATCH, &format!("/api/v2/cob/{txid3}"), &shop,
            Some(json!({"status": "REMOVIDA_PELO_USUARIO_RECEBEDOR", "valor": {"original": "8.00"}}))).await;
        assert_problem(&got, 400, "CobOperacaoInvalida", Some("cob.status"));
        let (s, v, _) = send(&mut c, Method::PATCH, &format!("/api/v2/cob/{txid3}"), &shop, Some(json!({"status": "REMOVIDA_PELO_USUARIO_RECEBEDOR"}))).await;
        assert_eq!((s, v["status"].clone()), (200, json!("REMOVIDA_PELO_USUARIO_RECEBEDOR")));
        let r = c.post("/v1/pix/payments", &wallet, &json!({"id": uuid(), "debit_account_id": maria, "amount": 700, "brcode": payload3})).await.unwrap();
        assert_eq!(r.json()["code"], json!("charge_not_payable"));

        // Listings.
        let window = "inicio=2020-01-01T00:00:00Z&fim=2100-01-01T00:00:00Z";
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob?{window}"), &shop, None).await;
        assert_eq!((s, v["cobs"].as_array().unwrap().len()), (200, 3), "{v}");
        assert_eq!(v["parametros"]["paginacao"]["quantidadeTotalDeItens"], json!(3));
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob?{window}&status=CONCLUIDA"), &shop, None).await;
        assert_eq!(v["cobs"].as_array().unwrap().len(), 2);
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob?{window}&cpf={CPF_MARIA}"), &shop, None).await;
        assert_eq!(v["cobs"][0]["txid"], json!(TXID), "{v}");
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob?{window}&paginacao.itensPorPagina=2&paginacao.paginaAtual=1"), &shop, None).await;
        assert_eq!((v["cobs"].as_array().unwrap().len(), v["parametros"]["paginacao"]["quantidadeDePaginas"].clone()), (1, json!(2)));
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/pix?{window}"), &shop, None).await;
        assert_eq!((s, v["pix"].as_array().unwrap().len()), (200, 2), "{v}");
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/pix?{window}&devolucaoPresente=true"), &shop, None).await;
        assert_eq!(v["pix"][0]["endToEndId"], json!(e2e));
        assert_problem(&send(&mut c, Method::GET, "/api/v2/cob?inicio=yesterday&fim=2100-01-01T00:00:00Z", &shop, None).await, 400, "CobConsultaInvalida", Some("inicio"));
        // The spec's semantic rules for listings: `fim` not before `inicio`; a CPF or a CNPJ.
        let backwards = "inicio=2100-01-01T00:00:00Z&fim=2020-01-01T00:00:00Z";
        for (path, kind) in [
            ("/api/v2/cob", "CobConsultaInvalida"),
            ("/api/v2/cobv", "CobVConsultaInvalida"),
            ("/api/v2/pix", "PixConsultaInvalida"),
            ("/api/v2/loc", "PayloadLocationConsultaInvalida"),
            ("/api/v2/webhook", "WebhookConsultaInvalida"),
            ("/api/v2/lotecobv", "LoteCobVConsultaInvalida"),
        ] {
            let got = send(&mut c, Method::GET, &format!("{path}?{backwards}"), &shop, None).await;
            assert_problem(&got, 400, kind, Some("fim"));
        }
        for (path, kind) in
            [("/api/v2/cob", "CobConsultaInvalida"), ("/api/v2/cobv", "CobVConsultaInvalida"), ("/api/v2/pix", "PixConsultaInvalida")]
        {
            let got =
                send(&mut c, Method::GET, &format!("{path}?{window}&cpf={CPF_MARIA}&cnpj={CNPJ_ACME}"), &shop, None).await;
            assert_problem(&got, 400, kind, Some("cnpj"));
        }
        // A revision the charge does not have (it has 0 and 1), or not written in digits (`%2B1`
        // is `+1`).
        for revisao in ["2", "-1", "x", "%2B1", "1.0", ""] {
            let got = send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}?revisao={revisao}"), &shop, None).await;
            assert_problem(&got, 400, "CobConsultaInvalida", Some("revisao"));
        }
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}?revisao=1"), &shop, None).await;
        assert_eq!((s, v["revisao"].clone()), (200, json!(1)), "{v}");
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

#[test]
fn med_blocks_then_returns_or_releases() {
    let dir = temp_dir("pix-med");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let (_, wallet) = tenant(&mut c, "wallet").await;
        let acme = acme_with_key(&mut c, &shop).await;
        let maria = holder_account(&mut c, &wallet, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let pay = |amount: u64| json!({"id": uuid(), "debit_account_id": maria, "amount": amount, "key": CNPJ_ACME});
        let r = c.post("/v1/pix/payments", &wallet, &pay(10_000)).await.unwrap();
        let e2e = r.json()["end_to_end_id"].as_str().unwrap().to_owned();

        // The block: a hold on the receiver's funds, counted against refunds.
        let r = c
            .post("/v1/pix/med", &shop, &json!({"end_to_end_id": e2e, "reason": "golpe do falso parente"}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        assert_eq!((r.json()["status"].clone(), r.json()["amount"].clone()), (json!("blocked"), json!(10_000)));
        let b = balance(&mut c, &shop, &acme).await;
        assert_eq!((b["available"].clone(), b["debits_pending"].clone()), (json!(0), json!(10_000)));
        let again = c.post("/v1/pix/med", &shop, &json!({"end_to_end_id": e2e, "reason": "x"})).await.unwrap();
        assert_eq!((again.status.as_u16(), again.json()["code"].clone()), (409, json!("claim_exists")));
        let got = send(
            &mut c,
            Method::PUT,
            &format!("/api/v2/pix/{e2e}/devolucao/D1"),
            &shop,
            Some(json!({"valor": "1.00"})),
        )
        .await;
        assert_problem(&got, 400, "PixDevolucaoInvalida", Some("devolucao.valor"));
        for (body, field) in [
            (json!({"end_to_end_id": e2e, "reason": " "}), "reason"),
            (json!({"end_to_end_id": e2e, "reason": "x", "amount": 0}), "amount"),
        ] {
            let r = c.post("/v1/pix/med", &shop, &body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{body}");
        }
        let r = c.post("/v1/pix/med", &wallet, &json!({"end_to_end_id": e2e, "reason": "x"})).await.unwrap();
        assert_eq!(r.status, 404, "only the receiver's tenant");
        // Ids that are no EndToEndId (here a card number) are refused before the audit log names
        // them; a refund id, any letters and digits, is named with card-like digits masked.
        let pan = "4111111111111111";
        let r = c.post("/v1/pix/med", &shop, &json!({"end_to_end_id": pan, "reason": "x"})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("end_to_end_id")));
        let r = c.post(&format!("/v1/pix/med/{pan}/return"), &shop, &json!({})).await.unwrap();
        assert_eq!(r.status, 404);
        let refund = format!("/api/v2/pix/{e2e}/devolucao/{pan}");
        let got = send(&mut c, Method::PUT, &refund, &shop, Some(json!({"valor": "1.00"}))).await;
        assert_problem(&got, 400, "PixDevolucaoInvalida", Some("devolucao.valor"));
        let audit = c.get("/v1/audit?limit=1000", &shop).await.unwrap().json().to_string();
        assert!(!audit.contains(pan), "the audit log names a card number");
        assert!(audit.contains(&format!("pix-med:{e2e}")), "an EndToEndId is named as it is");

        // Returned: the hold is posted and the payer is paid back, as a MED_FRAUDE refund.
        let r = c.post(&format!("/v1/pix/med/{e2e}/return"), &shop, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (200, json!("returned")), "{:?}", r.json());
        assert_eq!(balance(&mut c, &wallet, &maria).await["available"], json!(100_000));
        let b = balance(&mut c, &shop, &acme).await;
        assert_eq!((b["available"].clone(), b["debits_pending"].clone()), (json!(0), json!(0)));
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/pix/{e2e}"), &shop, None).await;
        assert_eq!(v["devolucoes"][0]["natureza"], json!("MED_FRAUDE"), "{v}");
        let r = c.post(&format!("/v1/pix/med/{e2e}/release"), &shop, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (409, json!("claim_resolved")));

        // Released: part of a second Pix blocked, then given back to the receiver.
        let r = c.post("/v1/pix/payments", &wallet, &pay(5_000)).await.unwrap();
        let e2e2 = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
        let r = c
            .post("/v1/pix/med", &shop, &json!({"end_to_end_id": e2e2, "amount": 2_000, "reason": "suspeita"}))
            .await
            .unwrap();
        assert_eq!(r.json()["amount"], json!(2_000));
        assert_eq!(balance(&mut c, &shop, &acme).await["available"], json!(3_000));
        let r = c.post(&format!("/v1/pix/med/{e2e2}/release"), &shop, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (200, json!("released")));
        assert_eq!(balance(&mut c, &shop, &acme).await["available"], json!(5_000));
        let r = c.get(&format!("/v1/pix/med/{e2e2}"), &shop).await.unwrap();
        assert_eq!(r.json()["status"], json!("released"));
        assert_eq!(c.post(&format!("/v1/pix/med/{e2e2}/undo"), &shop, &json!({})).await.unwrap().status, 404);
        let r = c
            .post("/v1/pix/med", &shop, &json!({"end_to_end_id": "E0000000020260101000000000000000", "reason": "x"}))
            .await
            .unwrap();
        assert_eq!(r.status, 404);
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// The payload at a location, verified by PyPI jwcrypto (crates/rtpay/tests/peers/jws_verify.py).
fn verified_payload(server: &Server, path: &str) -> Value {
    verified_payload_on(server, path, "pix.rtpay.local")
}

fn verified_payload_on(server: &Server, path: &str, host: &str) -> Value {
    verified_payload_with(server, path, host, &[])
}

/// `more`: the algorithm the header must name, and a CA the key's certificate must be issued by.
fn verified_payload_with(server: &Server, path: &str, host: &str, more: &[&str]) -> Value {
    let out = jws_peer(server, path, host, more);
    assert!(out.status.success(), "jwcrypto refused: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the JOSE peer says of the payload at `path`.
fn jws_peer(server: &Server, path: &str, host: &str, more: &[&str]) -> std::process::Output {
    let python = std::env::var("RTPAY_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/rtpay/venv/bin/python", std::env::var("HOME").unwrap_or_default()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/jws_verify.py");
    std::process::Command::new(&python)
        .args([script, &format!("http://{}", server.addr), path, &format!("https://{host}/qr/jwks")])
        .args(more)
        .output()
        .unwrap_or_else(|e| panic!("{python} is required (scripts/setup makes it, with jwcrypto): {e}"))
}

/// A CA, and a certificate it issued for the locations' host to the RSA key in `key_pem`: (the
/// CA's PEM, the chain's PEM, leaf first).
fn location_certificate(key_pem: &str) -> (String, String) {
    let ca = TestCa::new("payload test CA");
    let key = rcgen::KeyPair::from_pem_and_sign_algo(key_pem, &rcgen::PKCS_RSA_SHA256).unwrap();
    let leaf = ca.issue_to(&key, &["qr.banco.example"], &[]);
    (ca.pem(), leaf.pem() + &ca.pem())
}

#[test]
fn payloads_are_signed_with_the_operators_certified_key() {
    let dir = temp_dir("api-pix-jws");
    let key_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../server/tests/data/rsa-2048-test-key.pem");
    let (ca_pem, chain_pem) = location_certificate(&std::fs::read_to_string(key_file).unwrap());
    let (ca, chain) = (dir.join("ca.pem"), dir.join("chain.pem"));
    std::fs::write(&ca, &ca_pem).unwrap();
    std::fs::write(&chain, &chain_pem).unwrap();

    // A key the certificate is not for stops the start, before anything is made.
    let other = dir.join("other-key.pem");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let refused = dir.join("refused");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rtpay"))
        .args(["serve", "--data", refused.to_str().unwrap(), "--listen", "127.0.0.1:0", "--ispb", ISPB])
        .args(["--pix-jws-cert", chain.to_str().unwrap(), "--pix-jws-key", other.to_str().unwrap()])
        .env_remove("RTPAY_POSTGRES")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("is not for the key"), "{said}");
    assert!(!refused.exists(), "nothing is created");

    let data = dir.join("data");
    let args = ["--ispb", ISPB, "--pix-location-host", "qr.banco.example", "--pix-jws-cert", chain.to_str().unwrap()];
    let server =
        Server::start_with_args(&data, None, "127.0.0.1:0", true, &[&args[..], &["--pix-jws-key", key_file]].concat());
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        acme_with_key(&mut c, &shop).await;
        let cob = json!({"valor": {"original": "12.34"}, "chave": CNPJ_ACME});
        let (s, v, _) = send(&mut c, Method::PUT, &format!("/api/v2/cob/{TXID}"), &shop, Some(cob)).await;
        assert_eq!(s, 201, "{v}");
        let path = v["location"].as_str().unwrap().strip_prefix("https://qr.banco.example").unwrap().to_owned();
        let (srv, ca) = (&server, ca.to_str().unwrap());
        let body =
            tokio::task::block_in_place(|| verified_payload_with(srv, &path, "qr.banco.example", &["RS256", ca]));
        assert_eq!((body["txid"].clone(), body["valor"]["original"].clone()), (json!(TXID), json!("12.34")), "{body}");
        // Against another CA the peer refuses the chain: it does check it.
        let stranger = dir.join("stranger-ca.pem");
        std::fs::write(&stranger, location_certificate(&std::fs::read_to_string(key_file).unwrap()).0).unwrap();
        let out = tokio::task::block_in_place(|| {
            jws_peer(srv, &path, "qr.banco.example", &["RS256", stranger.to_str().unwrap()])
        });
        assert!(!out.status.success(), "a chain from another CA passed");
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

#[test]
fn locations_serve_signed_payloads_and_are_linked_and_unlinked() {
    let dir = temp_dir("api-pix-loc");
    // This institution's own host for locations.
    let server = Server::start_with_args(
        &dir,
        None,
        "127.0.0.1:0",
        true,
        &["--ispb", ISPB, "--pix-location-host", "qr.banco.example"],
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let (_, wallet) = tenant(&mut c, "wallet").await;
        let acme = acme_with_key(&mut c, &shop).await;
        let maria = holder_account(&mut c, &wallet, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;

        // A location made on its own, then given to a charge.
        let (s, loc, _) = send(&mut c, Method::POST, "/api/v2/loc", &shop, Some(json!({"tipoCob": "cob"}))).await;
        assert_eq!(s, 201, "{loc}");
        let id = loc["id"].as_u64().unwrap();
        let url = loc["location"].as_str().unwrap().to_owned();
        assert!(url.starts_with("https://qr.banco.example/qr/v2/") && url.len() <= 77, "{url}");
        assert_eq!((loc["tipoCob"].clone(), loc.get("txid")), (json!("cob"), None));
        for bad in [json!({"tipoCob": "boleto"}), json!({}), json!({"tipoCob": "cob", "x": 1})] {
            let got = send(&mut c, Method::POST, "/api/v2/loc", &shop, Some(bad)).await;
            assert_problem(&got, 400, "PayloadLocationOperacaoInvalida", Some("tipoCob"));
        }
        assert_problem(
            &send(&mut c, Method::GET, &format!("/api/v2/loc/{id}"), &wallet, None).await,
            404,
            "PayloadLocationNaoEncontrado",
            None,
        );
        assert_problem(
            &send(&mut c, Method::GET, "/api/v2/loc/x1", &shop, None).await,
            404,
            "PayloadLocationNaoEncontrado",
            None,
        );

        let cob = json!({"loc": {"id": id}, "devedor": {"cpf": CPF_MARIA, "nome": "Maria Quitéria"},
            "valor": {"original": "25.00"}, "chave": CNPJ_ACME, "solicitacaoPagador": "Pedido 7"});
        let (s, v, _) = send(&mut c, Method::PUT, &format!("/api/v2/cob/{TXID}"), &shop, Some(cob.clone())).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!((v["loc"]["id"].clone(), v["location"].clone()), (json!(id), json!(url)), "{v}");
        let payload = v["pixCopiaECola"].clone();
        let other = "otherTxid0000000000000000000001";
        let got = send(&mut c, Method::PUT, &format!("/api/v2/cob/{other}"), &shop, Some(cob.clone())).await;
        assert_problem(&got, 400, "CobOperacaoInvalida", Some("cob.loc.id"));
        let got = send(
            &mut c,
            Method::PUT,
            &format!("/api/v2/cob/{other}"),
            &shop,
            Some(json!({"loc": {"id": 12345}, "valor": {"original": "1.00"}, "chave": CNPJ_ACME})),
        )
        .await;
        assert_problem(&got, 400, "CobOperacaoInvalida", Some("cob.loc.id"));
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/loc/{id}"), &shop, None).await;
        assert_eq!(v["txid"], json!(TXID), "{v}");
        let window = "inicio=2020-01-01T00:00:00Z&fim=2100-01-01T00:00:00Z";
        let (s, v, _) =
            send(&mut c, Method::GET, &format!("/api/v2/loc?{window}&txIdPresente=true"), &shop, None).await;
        assert_eq!((s, v["loc"].as_array().unwrap().len(), v["loc"][0]["id"].clone()), (200, 1, json!(id)), "{v}");
        let (_, v, _) =
            send(&mut c, Method::GET, &format!("/api/v2/loc?{window}&txIdPresente=false"), &shop, None).await;
        assert_eq!(v["loc"].as_array().unwrap().len(), 0, "{v}");
        assert_problem(
            &send(&mut c, Method::GET, &format!("/api/v2/loc?{window}&tipoCob=x"), &shop, None).await,
            400,
            "PayloadLocationConsultaInvalida",
            Some("tipoCob"),
        );

        // The payload at the location, signed; checked by an independent JOSE library.
        let path = url.strip_prefix("https://qr.banco.example").unwrap().to_owned();
        let (srv, p) = (&server, path.clone());
        let body = tokio::task::block_in_place(|| verified_payload_on(srv, &p, "qr.banco.example"));
        assert_eq!(
            (body["txid"].clone(), body["status"].clone(), body["revisao"].clone()),
            (json!(TXID), json!("ATIVA"), json!(0)),
            "{body}"
        );
        assert_eq!((body["valor"]["original"].clone(), body["chave"].clone()), (json!("25.00"), json!(CNPJ_ACME)));
        assert_eq!(
            (body["devedor"]["cpf"].clone(), body["solicitacaoPagador"].clone()),
            (json!(CPF_MARIA), json!("Pedido 7"))
        );
        assert!(body["calendario"]["apresentacao"].is_string(), "{body}");
        let r = c.send(Method::GET, "/qr/v2/00000000000000000000000000000000", None, None).await.unwrap();
        assert_eq!(r.status, 404);

        // Unlinked: the charge keeps its status and loses its location; its BR Code pays nothing.
        let (s, v, _) = send(&mut c, Method::DELETE, &format!("/api/v2/loc/{id}/txid"), &shop, None).await;
        assert_eq!((s, v.get("txid")), (200, None), "{v}");
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}"), &shop, None).await;
        assert_eq!(
            (v["status"].clone(), v.get("location"), v.get("pixCopiaECola")),
            (json!("ATIVA"), None, None),
            "{v}"
        );
        assert_eq!(c.send(Method::GET, &path, None, None).await.unwrap().status, 404);
        let pay = json!({"id": uuid(), "debit_account_id": maria, "amount": 2_500, "brcode": payload});
        let r = c.post("/v1/pix/payments", &wallet, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (422, json!("charge_not_found")), "{:?}", r.json());
        assert_eq!(balance(&mut c, &wallet, &maria).await["available"], json!(100_000), "nothing moved");

        // Linked again by a revision, paid, and then no longer served.
        let (s, v, _) =
            send(&mut c, Method::PATCH, &format!("/api/v2/cob/{TXID}"), &shop, Some(json!({"loc": {"id": id}}))).await;
        // A change of `loc` alone is no revision (the spec's `Revisao`).
        assert_eq!((s, v["location"].clone(), v["revisao"].clone()), (200, json!(url), json!(0)), "{v}");
        let pay = json!({"id": uuid(), "debit_account_id": maria, "amount": 2_500, "brcode": v["pixCopiaECola"]});
        let r = c.post("/v1/pix/payments", &wallet, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("completed")), "{:?}", r.json());
        let r = c.send(Method::GET, &path, None, None).await.unwrap();
        assert_eq!(r.status, 410);
        assert_eq!(balance(&mut c, &shop, &acme).await["available"], json!(2_500));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// `YYYY-MM-DD` of the day `days` from today in Brasília.
fn brasilia_day(days: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let shifted = (now as i128 + i128::from(days) * 86_400_000_000_000) as u64;
    let (y, m, d) = pix::charge::brasilia_date(shifted);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn charges_with_a_due_date_cost_what_the_day_of_payment_says() {
    let dir = temp_dir("api-pix-cobv");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let (_, wallet) = tenant(&mut c, "wallet").await;
        let holder = new_holder(&mut c, &shop, "company", "ACME Comércio", CNPJ_ACME).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": holder})).await;
        let maria = holder_account(&mut c, &wallet, "person", "Maria Quitéria", CPF_MARIA, 100_000).await;
        let r = c.post("/v1/pix/keys", &shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME})).await.unwrap();
        assert_eq!(r.status, 201);

        let due = brasilia_day(20);
        let cobv = json!({
            "calendario": {"dataDeVencimento": due, "validadeAposVencimento": 30},
            "devedor": {"cpf": CPF_MARIA, "nome": "Maria Quitéria", "logradouro": "Rua A, 1", "cidade": "Recife", "uf": "PE", "cep": "50000000"},
            "valor": {"original": "100.00", "multa": {"modalidade": 2, "valorPerc": "2.00"},
                      "juros": {"modalidade": 1, "valorPerc": "0.50"},
                      "desconto": {"modalidade": 1, "descontoDataFixa": [{"data": brasilia_day(3), "valorPerc": "10.00"}]}},
            "chave": CNPJ_ACME, "solicitacaoPagador": "Mensalidade"});
        let path = format!("/api/v2/cobv/{TXID}");
        // The receiver's address is part of a cobv: none yet.
        let got = send(&mut c, Method::PUT, &path, &shop, Some(cobv.clone())).await;
        assert_problem(&got, 400, "CobVOperacaoInvalida", Some("cobv.recebedor"));
        let address = json!({"street": "Av. Paulista, 1000", "city": "São Paulo", "state": "SP", "postal_code": "01310100"});
        for (bad, field) in [(json!({"state": "XX"}), "state"), (json!({"postal_code": "0131010"}), "postal_code"), (json!({"street": " "}), "street")] {
            let mut body = address.clone();
            body.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
            let r = c.send(Method::PUT, &format!("/v1/holders/{holder}/address"), Some(&shop), Some(serde_json::to_vec(&body).unwrap().into())).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{:?}", r.json());
        }
        let r = c.send(Method::PUT, &format!("/v1/holders/{}/address", uuid()), Some(&shop), Some(serde_json::to_vec(&address).unwrap().into())).await.unwrap();
        assert_eq!(r.status, 404);
        let r = c.send(Method::PUT, &format!("/v1/holders/{holder}/address"), Some(&shop), Some(serde_json::to_vec(&address).unwrap().into())).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(c.get(&format!("/v1/holders/{holder}"), &shop).await.unwrap().json()["address"]["city"], json!("São Paulo"));

        let (s, v, _) = send(&mut c, Method::PUT, &path, &shop, Some(cobv.clone())).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!((v["status"].clone(), v["calendario"]["dataDeVencimento"].clone()), (json!("ATIVA"), json!(due)));
        assert_eq!((v["recebedor"]["cnpj"].clone(), v["recebedor"]["cep"].clone()), (json!(CNPJ_ACME), json!("01310100")), "{v}");
        assert_eq!((v["devedor"]["cidade"].clone(), v["loc"]["tipoCob"].clone()), (json!("Recife"), json!("cobv")));
        assert_eq!(v["valor"]["multa"], json!({"modalidade": 2, "valorPerc": "2.00"}));
        let url = v["location"].as_str().unwrap().to_owned();
        assert!(url.starts_with("https://pix.rtpay.local/qr/v2/cobv/"), "{url}");
        let brcode = v["pixCopiaECola"].clone();
        let (s, _, _) = send(&mut c, Method::GET, &path, &shop, None).await;
        assert_eq!(s, 200);
        assert_problem(&send(&mut c, Method::GET, &format!("/api/v2/cob/{TXID}"), &shop, None).await, 404, "CobNaoEncontrado", None);
        assert_problem(&send(&mut c, Method::GET, &path, &wallet, None).await, 404, "CobVNaoEncontrada", None);
        let got = send(&mut c, Method::PUT, &format!("/api/v2/cob/{TXID}"), &shop, Some(json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME}))).await;
        assert_problem(&got, 400, "CobOperacaoInvalida", Some("txid"));
        // A PATCH finds no charge where a GET finds none: under an immediate charge's txid, or a
        // txid no charge may have.
        let cob_txid = "immediateTxid00000000000000001";
        let (s, _, _) = send(&mut c, Method::PUT, &format!("/api/v2/cob/{cob_txid}"), &shop, Some(json!({"valor": {"original": "1.00"}, "chave": CNPJ_ACME}))).await;
        assert_eq!(s, 201);
        let got = send(&mut c, Method::PATCH, &format!("/api/v2/cobv/{cob_txid}"), &shop, Some(json!({"solicitacaoPagador": "x"}))).await;
        assert_problem(&got, 404, "CobVNaoEncontrada", None);
        let got = send(&mut c, Method::PATCH, "/api/v2/cob/short", &shop, Some(json!({"solicitacaoPagador": "x"}))).await;
        assert_problem(&got, 404, "CobNaoEncontrado", None);

        // Refused as the spec says, nothing made.
        let other = "otherTxid0000000000000000000002";
        let (s, v, _) = send(&mut c, Method::POST, "/api/v2/loc", &shop, Some(json!({"tipoCob": "cobv"}))).await;
        assert_eq!(s, 201, "{v}");
        let free_loc = v["id"].clone();
        for (change, field) in [
            (json!({"calendario": {"dataDeVencimento": "2030-02-30"}}), "cobv.calendario.dataDeVencimento"),
            (json!({"calendario": {"dataDeVencimento": "2020-01-02"}, "valor": {"original": "100.00"}}), "cobv.calendario.dataDeVencimento"),
            (json!({"valor": {"original": "100.00", "multa": {"modalidade": 3, "valorPerc": "1.00"}}}), "cobv.valor.multa.modalidade"),
            (json!({"valor": {"original": "100,00"}}), "cobv.valor.original"),
            (json!({"valor": {"original": "100.00", "desconto": {"modalidade": 1, "descontoDataFixa": [{"data": brasilia_day(25), "valorPerc": "1.00"}]}}}),
             "cobv.valor.desconto.descontoDataFixa[0].data"),
            // Each alone below the original, together the whole of it: nothing to pay until overdue.
            (json!({"valor": {"original": "100.00", "abatimento": {"modalidade": 1, "valorPerc": "60.00"},
                "desconto": {"modalidade": 1, "descontoDataFixa": [{"data": cobv["calendario"]["dataDeVencimento"], "valorPerc": "40.00"}]}}}),
             "cobv.valor.desconto"),
            (json!({"devedor": null}), "cobv.devedor"),
            (json!({"status": "ATIVA"}), "cobv.status"),
            // A free location named as a list of its fields in order is no `{"id"}`.
            (json!({"loc": [free_loc.clone(), "cobv"]}), "cobv.loc.id"),
        ] {
            let mut body = cobv.clone();
            for (k, v) in change.as_object().unwrap() {
                if v.is_null() { body.as_object_mut().unwrap().remove(k); } else { body[k] = v.clone(); }
            }
            let got = send(&mut c, Method::PUT, &format!("/api/v2/cobv/{other}"), &shop, Some(body)).await;
            assert_problem(&got, 400, "CobVOperacaoInvalida", Some(field));
        }
        assert_problem(&send(&mut c, Method::GET, &format!("/api/v2/cobv/{other}"), &shop, None).await, 404, "CobVNaoEncontrada", None);

        // The payload at its location: today the fixed-date discount applies.
        let qr = url.strip_prefix("https://pix.rtpay.local").unwrap().to_owned();
        let (srv, p) = (&server, qr.clone());
        let body = tokio::task::block_in_place(|| verified_payload(srv, &p));
        assert_eq!(body["valor"], json!({"original": "100.00", "desconto": "10.00", "final": "90.00"}), "{body}");
        assert_eq!((body["recebedor"]["uf"].clone(), body["devedor"]["cpf"].clone()), (json!("SP"), json!(CPF_MARIA)));
        assert_eq!(body["calendario"]["validadeAposVencimento"], json!(30));
        // Ten days from now: no discount, not late.
        let (srv, p) = (&server, format!("{qr}?DPP={}", brasilia_day(10)));
        let body = tokio::task::block_in_place(|| verified_payload(srv, &p));
        assert_eq!(body["valor"], json!({"original": "100.00", "final": "100.00"}), "{body}");
        // Late: the fine (2% of 100.00) and interest (0.50 a day) add up to the final value.
        let (srv, p) = (&server, format!("{qr}?DPP={}", brasilia_day(30)));
        let body = tokio::task::block_in_place(|| verified_payload(srv, &p));
        let cents = |v: &Value| v.as_str().map(|t| (t.parse::<f64>().unwrap() * 100.0).round() as i64).unwrap_or(0);
        let valor = &body["valor"];
        assert_eq!(valor["multa"], json!("2.00"), "{body}");
        // 0.50 a day from the due date moved to a business day: 10 days late, or down to 6 when
        // the due date falls on a weekend or a national holiday (Carnival's Saturday moves to Wednesday).
        assert!((300..=500).contains(&cents(&valor["juros"])) && cents(&valor["juros"]) % 50 == 0, "{body}");
        assert_eq!(cents(&valor["final"]), 10_000 + 200 + cents(&valor["juros"]), "{body}");
        for (query, field) in [(format!("DPP={}", brasilia_day(-1)), "DPP"), (format!("DPP={}", brasilia_day(60)), "DPP"), ("DPP=2030-1-1".into(), "DPP"), ("codMun=12".into(), "codMun")] {
            let r = c.send(Method::GET, &format!("{qr}?{query}"), None, None).await.unwrap();
            let v = r.json();
            assert_eq!((r.status.as_u16(), v["violacoes"][0]["propriedade"].clone()), (400, json!(field)), "{query}: {v}");
        }

        // Paid by its BR Code: today's value, exactly.
        let pay = json!({"id": uuid(), "debit_account_id": maria, "amount": 10_000, "brcode": brcode});
        let r = c.post("/v1/pix/payments", &wallet, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (422, json!("amount_mismatch")), "{:?}", r.json());
        assert_eq!(balance(&mut c, &wallet, &maria).await["available"], json!(100_000), "nothing moved");
        let pay = json!({"id": uuid(), "debit_account_id": maria, "amount": 9_000, "brcode": brcode});
        let r = c.post("/v1/pix/payments", &wallet, &pay).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone(), r.json()["txid"].clone()), (201, json!("completed"), json!(TXID)), "{:?}", r.json());
        let e2e = r.json()["end_to_end_id"].as_str().unwrap().to_owned();
        assert_eq!(balance(&mut c, &shop, &acme).await["available"], json!(9_000));
        let (_, v, _) = send(&mut c, Method::GET, &path, &shop, None).await;
        assert_eq!((v["status"].clone(), v["pix"][0]["endToEndId"].clone()), (json!("CONCLUIDA"), json!(e2e)), "{v}");
        assert_eq!(c.send(Method::GET, &qr, None, None).await.unwrap().status, 410);
        let got = send(&mut c, Method::PATCH, &path, &shop, Some(json!({"solicitacaoPagador": "x"}))).await;
        assert_problem(&got, 400, "CobVOperacaoInvalida", Some("cobv.status"));

        // Revised, then removed by the receiver; listed.
        let mut second = cobv.clone();
        second.as_object_mut().unwrap().remove("valor");
        second["valor"] = json!({"original": "50.00"});
        let (s, v, _) = send(&mut c, Method::PUT, &format!("/api/v2/cobv/{other}"), &shop, Some(second)).await;
        assert_eq!(s, 201, "{v}");
        let (s, v, _) = send(&mut c, Method::PATCH, &format!("/api/v2/cobv/{other}"), &shop, Some(json!({"valor": {"original": "55.00"}}))).await;
        assert_eq!((s, v["revisao"].clone(), v["valor"]["original"].clone()), (200, json!(1), json!("55.00")), "{v}");
        let (s, v, _) = send(&mut c, Method::PATCH, &format!("/api/v2/cobv/{other}"), &shop, Some(json!({"status": "REMOVIDA_PELO_USUARIO_RECEBEDOR"}))).await;
        assert_eq!((s, v["status"].clone()), (200, json!("REMOVIDA_PELO_USUARIO_RECEBEDOR")));
        let window = "inicio=2020-01-01T00:00:00Z&fim=2100-01-01T00:00:00Z";
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv?{window}"), &shop, None).await;
        assert_eq!((s, v["cobs"].as_array().unwrap().len()), (200, 2), "{v}");
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv?{window}&status=CONCLUIDA"), &shop, None).await;
        assert_eq!(v["cobs"][0]["txid"], json!(TXID));
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cob?{window}"), &shop, None).await;
        let listed: Vec<&Value> = v["cobs"].as_array().unwrap().iter().map(|c| &c["txid"]).collect();
        assert_eq!(listed, [&json!(cob_txid)], "a cobv is not a cob: {v}");
        // Revisions 0 to 2 exist (the removal is one); 3 is the spec's 400.
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv/{other}?revisao=0"), &shop, None).await;
        assert_eq!((s, v["valor"]["original"].clone()), (200, json!("50.00")), "{v}");
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv/{other}?revisao=2"), &shop, None).await;
        assert_eq!((s, v["status"].clone()), (200, json!("REMOVIDA_PELO_USUARIO_RECEBEDOR")), "{v}");
        let got = send(&mut c, Method::GET, &format!("/api/v2/cobv/{other}?revisao=3"), &shop, None).await;
        assert_problem(&got, 400, "CobVConsultaInvalida", Some("revisao"));

        // A PUT on an existing charge replaces it whole: the fine, interest, discount and message
        // it no longer gives are gone, not kept from the revision before.
        let third = "/api/v2/cobv/thirdTxid0000000000000000000003";
        let mut first = cobv.clone();
        first["calendario"]["validadeAposVencimento"] = json!(5);
        let (s, _, _) = send(&mut c, Method::PUT, third, &shop, Some(first)).await;
        assert_eq!(s, 201);
        let replacement = json!({"calendario": {"dataDeVencimento": due}, "devedor": {"cpf": CPF_MARIA, "nome": "Maria Quitéria"},
                                 "valor": {"original": "70.00"}, "chave": CNPJ_ACME});
        let (s, v, _) = send(&mut c, Method::PUT, third, &shop, Some(replacement)).await;
        assert_eq!((s, v["revisao"].clone(), v["valor"].clone()), (201, json!(1), json!({"original": "70.00"})), "{v}");
        assert_eq!((v.get("solicitacaoPagador"), v["devedor"].get("cidade")), (None, None), "{v}");
        assert_eq!(v["calendario"]["validadeAposVencimento"], json!(30), "the default, not the earlier 5: {v}");
        let payload = tokio::task::block_in_place(|| verified_payload(&server, &v["location"].as_str().unwrap()["https://pix.rtpay.local".len()..]));
        assert_eq!(payload["valor"], json!({"original": "70.00", "final": "70.00"}), "{payload}");
        // Its 100th revision is its last change of content; it can still be removed.
        for n in 2..100 {
            let (s, v, _) = send(&mut c, Method::PATCH, third, &shop, Some(json!({"solicitacaoPagador": format!("r{n}")}))).await;
            assert_eq!((s, v["revisao"].clone()), (200, json!(n)), "{v}");
        }
        let got = send(&mut c, Method::PATCH, third, &shop, Some(json!({"solicitacaoPagador": "one more"}))).await;
        assert_problem(&got, 400, "CobVOperacaoInvalida", Some("txid"));
        let (s, v, _) = send(&mut c, Method::PATCH, third, &shop, Some(json!({"status": "REMOVIDA_PELO_USUARIO_RECEBEDOR"}))).await;
        assert_eq!((s, v["status"].clone(), v["revisao"].clone()), (200, json!("REMOVIDA_PELO_USUARIO_RECEBEDOR"), json!(100)), "{v}");

        // A PATCH removes a rule given as `null`, and keeps one it does not name.
        let dropped = "dropTxid00000000000000000000003";
        let (s, v, _) = send(&mut c, Method::PUT, &format!("/api/v2/cobv/{dropped}"), &shop, Some(cobv.clone())).await;
        assert_eq!(s, 201, "{v}");
        let (s, v, _) =
            send(&mut c, Method::PATCH, &format!("/api/v2/cobv/{dropped}"), &shop, Some(json!({"valor": {"multa": null}}))).await;
        assert_eq!(
            (s, v["revisao"].clone(), v["valor"].get("multa"), v["valor"]["juros"].clone()),
            (200, json!(1), None, json!({"modalidade": 1, "valorPerc": "0.50"})),
            "{v}"
        );
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

#[test]
fn batches_of_charges_with_a_due_date_are_applied_request_by_request() {
    let dir = temp_dir("api-pix-lote");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--ispb", ISPB]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = server.client();
        let (_, shop) = tenant(&mut c, "shop").await;
        let holder = new_holder(&mut c, &shop, "company", "ACME", CNPJ_ACME).await;
        let acme = account(&mut c, &shop, json!({"currency": "BRL", "holder_id": holder})).await;
        let address = json!({"street": "Rua B, 2", "city": "Curitiba", "state": "PR", "postal_code": "80000000"});
        let r = c
            .send(
                Method::PUT,
                &format!("/v1/holders/{holder}/address"),
                Some(&shop),
                Some(serde_json::to_vec(&address).unwrap().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let r = c
            .post("/v1/pix/keys", &shop, &json!({"account_id": acme, "type": "cnpj", "key": CNPJ_ACME}))
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let txid = |n: u32| format!("loteTxid{n:023}");
        let item = |n: u32, original: &str, multa: i64| {
            json!({"txid": txid(n),
            "calendario": {"dataDeVencimento": brasilia_day(15)},
            "devedor": {"cpf": CPF_MARIA, "nome": "Maria"},
            "valor": {"original": original, "multa": {"modalidade": multa, "valorPerc": "1.00"}},
            "chave": CNPJ_ACME})
        };
        let batch = |items: Vec<Value>| json!({"descricao": "Mensalidades de dezembro", "cobsv": items});

        // The batch is checked whole first: nothing is made from a malformed one. (A charge's
        // object given as a list of its fields in order is no object, as in a single `cobv`.)
        let mut listed = item(2, "10.00", 1);
        listed["calendario"] = json!([brasilia_day(15), 30]);
        for (body, field) in [
            (batch(vec![item(1, "10.00", 1), listed]), "loteCobV.cobsV[1]"),
            (batch(vec![item(1, "10.00", 1), item(1, "11.00", 1)]), "loteCobV.cobsV[1].txid"),
            (batch(vec![]), "loteCobV.cobsV"),
            (json!({"cobsv": [item(1, "10.00", 1)]}), "loteCobV.descricao"),
            (json!({"descricao": "x", "cobsv": [item(1, "10.00", 1)], "extra": 1}), "loteCobV.extra"),
        ] {
            let got = send(&mut c, Method::PUT, "/api/v2/lotecobv/1", &shop, Some(body)).await;
            assert_problem(&got, 400, "LoteCobVOperacaoInvalida", Some(field));
        }
        assert_problem(
            &send(&mut c, Method::GET, "/api/v2/lotecobv/1", &shop, None).await,
            404,
            "LoteCobVNaoEncontrado",
            None,
        );

        // Each request applied on its own: a refused one is NEGADA with the reason, the rest made.
        let (s, _, _) = send(
            &mut c,
            Method::PUT,
            "/api/v2/lotecobv/1",
            &shop,
            Some(batch(vec![item(1, "10.00", 1), item(2, "20.00", 1), item(3, "30.00", 3)])),
        )
        .await;
        assert_eq!(s, 202);
        let (s, v, _) = send(&mut c, Method::GET, "/api/v2/lotecobv/1", &shop, None).await;
        assert_eq!(
            (s, v["id"].clone(), v["descricao"].clone()),
            (200, json!(1), json!("Mensalidades de dezembro")),
            "{v}"
        );
        let statuses: Vec<Value> = v["cobsv"].as_array().unwrap().iter().map(|i| i["status"].clone()).collect();
        assert_eq!(statuses, vec![json!("CRIADA"), json!("CRIADA"), json!("NEGADA")], "{v}");
        assert!(v["cobsv"][0]["criacao"].is_string(), "{v}");
        let problema = &v["cobsv"][2]["problema"];
        assert_eq!(problema["type"], json!("https://pix.bcb.gov.br/api/v2/error/CobVOperacaoInvalida"), "{v}");
        assert_eq!(problema["violacoes"][0]["propriedade"], json!("cobv.valor.multa.modalidade"));
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv/{}", txid(1)), &shop, None).await;
        assert_eq!((s, v["valor"]["original"].clone()), (200, json!("10.00")), "{v}");
        assert_problem(
            &send(&mut c, Method::GET, &format!("/api/v2/cobv/{}", txid(3)), &shop, None).await,
            404,
            "CobVNaoEncontrada",
            None,
        );
        let window = "inicio=2020-01-01T00:00:00Z&fim=2100-01-01T00:00:00Z";
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv?{window}&loteCobVId=1"), &shop, None).await;
        assert_eq!(v["cobs"].as_array().unwrap().len(), 2, "{v}");
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv?{window}&loteCobVId=2"), &shop, None).await;
        assert_eq!(v["cobs"].as_array().unwrap().len(), 0, "{v}");

        // The refused request's txid is the batch's: neither a `PUT /cobv` nor another batch takes it.
        let mut alone = item(3, "30.00", 1);
        alone.as_object_mut().unwrap().remove("txid");
        let got = send(&mut c, Method::PUT, &format!("/api/v2/cobv/{}", txid(3)), &shop, Some(alone)).await;
        assert_problem(&got, 400, "CobVOperacaoInvalida", Some("txid"));
        let got = send(&mut c, Method::PUT, "/api/v2/lotecobv/3", &shop, Some(batch(vec![item(3, "30.00", 1)]))).await;
        assert_problem(&got, 400, "LoteCobVOperacaoInvalida", Some("loteCobV.cobsV[0].txid"));
        assert_problem(
            &send(&mut c, Method::GET, "/api/v2/lotecobv/3", &shop, None).await,
            404,
            "LoteCobVNaoEncontrado",
            None,
        );
        // A batch refused so holds none of its txids: txid(5), named beside the held txid(3),
        // is free for the next batch.
        let got = send(
            &mut c,
            Method::PUT,
            "/api/v2/lotecobv/4",
            &shop,
            Some(batch(vec![item(5, "50.00", 1), item(3, "30.00", 1)])),
        )
        .await;
        assert_problem(&got, 400, "LoteCobVOperacaoInvalida", Some("loteCobV.cobsV[1].txid"));
        let (s, _, _) =
            send(&mut c, Method::PUT, "/api/v2/lotecobv/5", &shop, Some(batch(vec![item(5, "50.00", 1)]))).await;
        assert_eq!(s, 202);
        let (_, v, _) = send(&mut c, Method::GET, "/api/v2/lotecobv/5", &shop, None).await;
        assert_eq!(v["cobsv"][0]["status"], json!("CRIADA"), "{v}");
        // Nor does an immediate charge take a txid a batch holds.
        let cob = json!({"calendario": {"expiracao": 3600}, "valor": {"original": "1.00"}, "chave": CNPJ_ACME});
        let got = send(&mut c, Method::PUT, &format!("/api/v2/cob/{}", txid(3)), &shop, Some(cob)).await;
        assert_problem(&got, 400, "CobOperacaoInvalida", Some("txid"));

        // A batch only creates charges, and its charges are fixed.
        let got = send(&mut c, Method::PUT, "/api/v2/lotecobv/2", &shop, Some(batch(vec![item(1, "10.00", 1)]))).await;
        assert_problem(&got, 400, "LoteCobVOperacaoInvalida", Some("loteCobV.cobsV[0].txid"));
        let got = send(
            &mut c,
            Method::PUT,
            "/api/v2/lotecobv/1",
            &shop,
            Some(batch(vec![item(1, "10.00", 1), item(2, "20.00", 1)])),
        )
        .await;
        assert_problem(&got, 400, "LoteCobVOperacaoInvalida", Some("loteCobV.cobsV"));
        let got = send(
            &mut c,
            Method::PATCH,
            "/api/v2/lotecobv/1",
            &shop,
            Some(json!({"cobsv": [{"txid": txid(9), "valor": {"original": "1.00"}}]})),
        )
        .await;
        assert_problem(&got, 400, "LoteCobVOperacaoInvalida", Some("loteCobV.cobsV"));

        // The same batch again, the refused request corrected: all made; the others revised.
        let (s, _, _) = send(
            &mut c,
            Method::PUT,
            "/api/v2/lotecobv/1",
            &shop,
            Some(batch(vec![item(1, "12.00", 1), item(2, "20.00", 1), item(3, "30.00", 2)])),
        )
        .await;
        assert_eq!(s, 202);
        let (_, v, _) = send(&mut c, Method::GET, "/api/v2/lotecobv/1", &shop, None).await;
        assert!(v["cobsv"].as_array().unwrap().iter().all(|i| i["status"] == json!("CRIADA")), "{v}");
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv/{}", txid(1)), &shop, None).await;
        assert_eq!((v["revisao"].clone(), v["valor"]["original"].clone()), (json!(1), json!("12.00")), "{v}");
        // Some of them revised.
        let (s, _, _) = send(
            &mut c,
            Method::PATCH,
            "/api/v2/lotecobv/1",
            &shop,
            Some(json!({"cobsv": [{"txid": txid(2), "valor": {"original": "25.00"}}]})),
        )
        .await;
        assert_eq!(s, 202);
        let (_, v, _) = send(&mut c, Method::GET, &format!("/api/v2/cobv/{}", txid(2)), &shop, None).await;
        assert_eq!((v["revisao"].clone(), v["valor"]["original"].clone()), (json!(2), json!("25.00")), "{v}");
        let (s, v, _) = send(&mut c, Method::GET, &format!("/api/v2/lotecobv?{window}"), &shop, None).await;
        assert_eq!((s, v["lotes"].as_array().unwrap().len()), (200, 2), "batches 1 and 5: {v}");
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}
