//! Crash safety: `rtpay serve` is killed with SIGKILL at random moments under concurrent load,
//! restarted, and checked: every acknowledged transfer is there with the right balances and its
//! audit entry, every
//! acknowledged failure keeps its answer (even once funds would let it through), every request
//! whose answer the kill cut off is applied at most once when retried, and `rtpay verify` and
//! `rtpay audit verify` pass. Both engines, many rounds, each killed after transfers of its own
//! were acknowledged.
//!
//! A process crash, not a power loss: what the kernel holds survives SIGKILL, so this does not
//! show that every acknowledged commit was synced to the disk (the engine's tests check that no
//! answer leaves before its sync).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;

/// Rounds per engine; each is a kill at a random moment under load.
const ROUNDS: usize = 8;
const CLIENTS: usize = 8;
const WALLETS: usize = 6;
const FUNDING: u64 = 5_000;
/// Lent to every wallet while remembered failures are asked again: a failure whose record was
/// lost would be decided anew, and pass.
const TOP_UP: u64 = 1_000_000;

#[derive(Clone, Debug)]
struct Sent {
    id: String,
    debit: usize,
    credit: usize,
    amount: u64,
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged as created (201/200).
    created: Vec<Sent>,
    /// Acknowledged failures: id → (body, code).
    failed: Vec<(Sent, String)>,
    /// Sent, but the answer was lost with the process.
    unknown: Vec<Sent>,
    /// Posted to (and then from) every wallet by the checks: the top-ups lent to each.
    lent: u64,
}

/// xorshift: tests need repeatable randomness, not a crate.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn run(postgres: Option<String>) {
    let data = temp_dir("crash");
    let mut server = Server::start(&data, postgres.as_deref());
    let rt = runtime();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ store::now_nanos();
    eprintln!("crash test seed {seed:#x}");
    let (key, bank, wallets) = rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "crash").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let mut wallets = Vec::new();
        for _ in 0..WALLETS {
            let w =
                account(&mut c, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}}))
                    .await;
            let r = c
                .post(
                    "/v1/transfers",
                    &key,
                    &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": FUNDING}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201);
            wallets.push(w);
        }
        (key, bank, wallets)
    });
    let book = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(next(&mut seed) % 400);
        let created_before = book.lock().unwrap().created.len();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..CLIENTS {
                let addr = server.addr;
                let key = key.clone();
                let wallets = wallets.clone();
                let book = book.clone();
                let mut seed = seed ^ ((t as u64 + 1) * 0x1000_0000_01B3);
                tasks.push(tokio::spawn(async move {
                    let mut c = rtpay::client::Client::new(addr);
                    loop {
                        let debit = (next(&mut seed) % WALLETS as u64) as usize;
                        let credit = (debit + 1 + (next(&mut seed) % (WALLETS as u64 - 1)) as usize) % WALLETS;
                        let sent = Sent { id: uuid(), debit, credit, amount: 1 + next(&mut seed) % 700 };
                        let body = json!({"id": sent.id, "debit_account_id": wallets[debit], "credit_account_id": wallets[credit], "amount": sent.amount});
                        match c.post("/v1/transfers", &key, &body).await {
                            Ok(r) if r.status == 201 || r.status == 200 => book.lock().unwrap().created.push(sent),
                            Ok(r) if r.status == 422 => {
                                let code = r.json()["code"].as_str().unwrap().to_owned();
                                book.lock().unwrap().failed.push((sent, code));
                            }
                            Ok(r) => panic!("unexpected status {} {:?}", r.status, r.json()),
                            Err(_) => {
                                book.lock().unwrap().unknown.push(sent);
                                return;
                            }
                        }
                    }
                }));
            }
            // The kill comes at a random moment after this round's first acknowledged transfer.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while book.lock().unwrap().created.len() == created_before {
                assert!(std::time::Instant::now() < deadline, "round {round}: nothing acknowledged in 30 s");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(kill_after).await;
            server.kill9();
            for task in tasks {
                task.await.unwrap();
            }
        });
        let (acknowledged, cut_off, failed) = {
            let b = book.lock().unwrap();
            (b.created.len() - created_before, b.unknown.len(), b.failed.len())
        };
        server.restart();
        rt.block_on(check(&server, &key, &bank, &wallets, &book));
        let (ok, report) = server.verify();
        assert!(ok, "round {round}: rtpay verify failed after SIGKILL:\n{report}");
        let (ok, audit) = server.audit_verify();
        assert!(ok, "round {round}: rtpay audit verify failed after SIGKILL:\n{audit}");
        eprintln!(
            "round {round}: killed {kill_after:?} after the first of {acknowledged} acknowledged, \
             {cut_off} cut off, {failed} failures remembered so far; {report}"
        );
    }
    let book = book.lock().unwrap();
    assert!(
        book.created.len() > ROUNDS * 10,
        "the load was too light to mean anything: {} created",
        book.created.len()
    );
    let _ = std::fs::remove_dir_all(&data);
}

async fn check(server: &Server, key: &str, bank: &str, wallets: &[String], book: &Mutex<Ledger>) {
    let mut c = server.client();
    let (created, mut failed, unknown, mut lent) = {
        let b = book.lock().unwrap();
        (b.created.clone(), b.failed.clone(), b.unknown.clone(), b.lent)
    };
    let body_of = |sent: &Sent| json!({"id": sent.id, "debit_account_id": wallets[sent.debit], "credit_account_id": wallets[sent.credit], "amount": sent.amount});
    let mut applied = created.clone();
    for sent in &created {
        let r = c.get(&format!("/v1/transfers/{}", sent.id), key).await.unwrap();
        assert_eq!(r.status, 200, "acknowledged transfer {} lost after SIGKILL", sent.id);
        assert_eq!(r.json()["amount"], sent.amount);
    }
    // And each has its audit entry, committed with it.
    let mut audited = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page = c.get(&format!("/v1/audit?after={after}&limit=1000"), key).await.unwrap().json();
        for e in page["entries"].as_array().unwrap() {
            if e["action"] == json!("POST /v1/transfers") && e["outcome"] == json!("created") {
                audited.insert(e["resource"].as_str().unwrap().to_owned());
            }
        }
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    for sent in &created {
        assert!(audited.contains(&sent.id), "acknowledged transfer {} has no audit entry", sent.id);
    }
    // Whatever the kill cut off is sent again, as a client would: applied once at most.
    for sent in &unknown {
        let found = c.get(&format!("/v1/transfers/{}", sent.id), key).await.unwrap().status;
        let r = c.post("/v1/transfers", key, &body_of(sent)).await.unwrap();
        match (found.as_u16(), r.status.as_u16()) {
            (200, 200) | (404, 201) => applied.push(sent.clone()),
            (404, 422) => failed.push((sent.clone(), r.json()["code"].as_str().unwrap().to_owned())),
            other => panic!("transfer {} cut off by the kill: found and retried {other:?} {:?}", sent.id, r.json()),
        }
    }
    // Every wallet could now pay any of the failed transfers: each must still answer its failure.
    for w in wallets {
        let top_up = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": TOP_UP});
        assert_eq!(c.post("/v1/transfers", key, &top_up).await.unwrap().status, 201);
    }
    for (sent, code) in &failed {
        let r = c.post("/v1/transfers", key, &body_of(sent)).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.json()["code"].as_str().unwrap_or("")),
            (422, code.as_str()),
            "failure of {} not kept",
            sent.id
        );
    }
    for w in wallets {
        let back = json!({"id": uuid(), "debit_account_id": w, "credit_account_id": bank, "amount": TOP_UP});
        assert_eq!(c.post("/v1/transfers", key, &back).await.unwrap().status, 201);
    }
    lent += TOP_UP;
    let mut expected: HashMap<usize, (u64, u64)> = HashMap::new();
    for sent in &applied {
        expected.entry(sent.debit).or_default().0 += sent.amount;
        expected.entry(sent.credit).or_default().1 += sent.amount;
    }
    for (i, w) in wallets.iter().enumerate() {
        let b = balance(&mut c, key, w).await;
        let (debits, credits) = expected.get(&i).copied().unwrap_or_default();
        assert_eq!(b["debits_posted"], debits + lent, "wallet {i} debits");
        assert_eq!(b["credits_posted"], credits + FUNDING + lent, "wallet {i} credits");
        assert!(b["available"].as_i64().unwrap() >= 0, "wallet {i} overdrawn");
    }
    // The bank paid the funding and the top-ups, and was paid the top-ups back.
    let b = balance(&mut c, key, bank).await;
    let wallets_n = wallets.len() as u64;
    assert_eq!(
        (b["debits_posted"].clone(), b["credits_posted"].clone()),
        (json!(wallets_n * (FUNDING + lent)), json!(wallets_n * lent)),
        "the bank"
    );
    let mut b = book.lock().unwrap();
    b.unknown.clear();
    b.created = applied;
    b.failed = failed;
    b.lent = lent;
}

#[test]
fn embedded_survives_sigkill_under_load() {
    run(None);
}

#[test]
fn postgres_survives_sigkill_under_load() {
    run(Some(store::testing::fresh_postgres_database()));
}
