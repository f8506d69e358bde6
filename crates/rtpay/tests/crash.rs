//! Crash safety: `rtpay serve` is killed with SIGKILL at random moments under concurrent load,
//! restarted, and checked: every acknowledged transfer is there with the right balances, every
//! acknowledged failure keeps its answer, and `rtpay verify` passes. Both engines, many rounds.

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
        let kill_after = Duration::from_millis(30 + next(&mut seed) % 400);
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
            tokio::time::sleep(kill_after).await;
            server.kill9();
            for task in tasks {
                task.await.unwrap();
            }
        });
        server.restart();
        rt.block_on(check(&server, &key, &bank, &wallets, &book));
        let (ok, report) = server.verify();
        assert!(ok, "round {round}: rtpay verify failed after SIGKILL:\n{report}");
        eprintln!("round {round}: killed after {kill_after:?}; {report}");
    }
    let book = book.lock().unwrap();
    assert!(
        book.created.len() > ROUNDS * 10,
        "the load was too light to mean anything: {} created",
        book.created.len()
    );
    let _ = std::fs::remove_dir_all(&data);
}

async fn check(server: &Server, key: &str, _bank: &str, wallets: &[String], book: &Mutex<Ledger>) {
    let mut c = server.client();
    let (created, failed, unknown) = {
        let b = book.lock().unwrap();
        (b.created.clone(), b.failed.clone(), b.unknown.clone())
    };
    let mut applied = created.clone();
    for sent in &created {
        let r = c.get(&format!("/v1/transfers/{}", sent.id), key).await.unwrap();
        assert_eq!(r.status, 200, "acknowledged transfer {} lost after SIGKILL", sent.id);
        assert_eq!(r.json()["amount"], sent.amount);
    }
    for (sent, code) in &failed {
        // The remembered failure answers again, the same way.
        let body = json!({"id": sent.id, "debit_account_id": wallets[sent.debit], "credit_account_id": wallets[sent.credit], "amount": sent.amount});
        let r = c.post("/v1/transfers", key, &body).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.json()["code"].as_str().unwrap_or("")),
            (422, code.as_str()),
            "failure of {} not kept",
            sent.id
        );
    }
    for sent in &unknown {
        let r = c.get(&format!("/v1/transfers/{}", sent.id), key).await.unwrap();
        if r.status == 200 {
            applied.push(sent.clone());
        } else {
            assert_eq!(r.status, 404);
        }
    }
    let mut expected: HashMap<usize, (u64, u64)> = HashMap::new();
    for sent in &applied {
        expected.entry(sent.debit).or_default().0 += sent.amount;
        expected.entry(sent.credit).or_default().1 += sent.amount;
    }
    for (i, w) in wallets.iter().enumerate() {
        let b = balance(&mut c, key, w).await;
        let (debits, credits) = expected.get(&i).copied().unwrap_or_default();
        assert_eq!(b["debits_posted"], debits, "wallet {i} debits");
        assert_eq!(b["credits_posted"], credits + FUNDING, "wallet {i} credits");
        assert!(b["available"].as_i64().unwrap() >= 0, "wallet {i} overdrawn");
    }
    // Unknown outcomes are settled now: a retry must not apply twice.
    book.lock().unwrap().unknown.clear();
    book.lock().unwrap().created = applied;
}

#[test]
fn embedded_survives_sigkill_under_load() {
    run(None);
}

#[test]
fn postgres_survives_sigkill_under_load() {
    run(Some(store::testing::fresh_postgres_database()));
}
