//! The BR Code vectors collected from independent projects (`shared/testdata/brcode/vectors.json`,
//! each names its source): every `valid` payload decodes to the same fields,
//! every `valid_lenient` one decodes with a warning, every `invalid` one is refused; and what we
//! encode from a valid payload's fields decodes to the same Pix data.

use std::collections::BTreeMap;

use pix::brcode::{decode, encode, Spec, Value};
use serde_json::Value as Json;

fn vectors() -> Vec<Json> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/testdata/brcode/vectors.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e} (is ../shared checked out?)"));
    serde_json::from_str::<Vec<Json>>(&text).unwrap()
}

fn as_json(fields: &[(String, Value)]) -> Json {
    let mut map = BTreeMap::new();
    for (id, value) in fields {
        let v = match value {
            Value::Text(t) => Json::String(t.clone()),
            Value::Template(subs) => {
                Json::Object(subs.iter().map(|(k, v)| (k.clone(), Json::String(v.clone()))).collect())
            }
        };
        map.insert(id.clone(), v);
    }
    Json::Object(map.into_iter().collect())
}

#[test]
fn every_vector_gets_its_expected_verdict() {
    let all = vectors();
    assert_eq!(all.len(), 51, "the vectors file changed");
    let mut counts = BTreeMap::new();
    for v in &all {
        let payload = v["payload"].as_str().unwrap();
        let expect = v["expect"].as_str().unwrap();
        let source = v["source"].as_str().unwrap();
        *counts.entry(expect).or_insert(0) += 1;
        match (expect, decode(payload)) {
            // One `valid` vector (an amount written `100`) gets a warning too: accepted either way.
            ("valid", Ok(code)) => assert_eq!(as_json(&code.fields), v["decoded"], "{source}: {payload}"),
            ("valid_lenient", Ok(code)) => {
                assert!(!code.warnings.is_empty(), "{source}: {payload}: accepted without a warning");
                assert_eq!(as_json(&code.fields), v["decoded"], "{source}: {payload}");
            }
            ("invalid", Err(e)) => assert!(!e.rule.is_empty(), "{source}: a reason"),
            (expect, got) => panic!("{source}: {payload}: expected {expect}, got {got:?}"),
        }
    }
    assert_eq!(counts.get("invalid"), Some(&8));
}

#[test]
fn valid_vectors_survive_our_encoder() {
    for v in vectors().iter().filter(|v| v["expect"] == "valid") {
        let code = decode(v["payload"].as_str().unwrap()).unwrap();
        let spec = Spec {
            key: code.key.clone(),
            url: code.url.clone().filter(|_| code.key.is_none()),
            info: code.info.clone().filter(|i| i.len() + code.key.as_deref().map_or(0, str::len) <= 60),
            amount: code.amount,
            name: code.name.clone(),
            city: code.city.clone(),
            txid: code.txid.clone().filter(|t| t.bytes().all(|b| b.is_ascii_alphanumeric())),
        };
        let again = decode(&encode(&spec).unwrap()).unwrap();
        assert_eq!(
            (&again.key, &again.url, again.amount, &again.name, &again.city, &again.txid),
            (&code.key, &spec.url, code.amount, &code.name, &code.city, &spec.txid),
            "{}",
            v["payload"]
        );
    }
}

#[test]
fn named_rules_for_the_broken_vectors() {
    let reason = |p: &str| decode(p).unwrap_err();
    let bad_crc = "00020126580014br.gov.bcb.pix0136123e4567-e12b-12d1-a456-426614174000520400005303986540510.005802BR5913FULANO DE TAL6008BRASILIA62070503***630457B8";
    assert_eq!(reason(bad_crc).field, "63");
    let name_26 = "00020126830014br.gov.bcb.pix01364004901d-bd85-4769-8e52-cb4c42c506dc0221Jornada pagador 57768520400005303986540573.625802BR5926BANCOCENTRALDOBRASIL0003816008BRASILIA62080504oooo6304EFF5";
    assert_eq!(reason(name_26).field, "59");
    let url_scheme = "00020126990014br.gov.bcb.pix2577https://qr-h.sandbox.pix.bcb.gov.br/rest/api/v2/ac8ab4efe7db4200885f5ab3c34725204000053039865802BR5903Pix6008BRASILIA62070503***63041043";
    assert_eq!(reason(url_scheme).field, "26.25");
}
