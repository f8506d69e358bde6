//! Several `rtpay serve` nodes on one PostgreSQL: correct under concurrent transfers on the same
//! accounts, and honest when PostgreSQL goes away (503 + Retry-After, then recovery).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn two_nodes_share_one_ledger_without_overdraft_or_deadlock() {
    let url = store::testing::fresh_postgres_database();
    let (dir_a, dir_b) = (temp_dir("node-a"), temp_dir("node-b"));
    let a = Server::start(&dir_a, Some(&url));
    let b = Server::start(&dir_b, Some(&url));
    let rt = runtime();
    rt.block_on(async {
        let mut ca = a.client();
        let (_, key) = tenant(&mut ca, "cluster").await;
        let bank = account(&mut ca, &key, json!({"currency": "BRL"})).await;
        let mut wallets = Vec::new();
        for _ in 0..4 {
            let w = account(&mut ca, &key, json!({"currency": "BRL", "flags": {"debits_must_not_exceed_credits": true}})).await;
            let r = ca.post("/v1/transfers", &key, &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 1_000})).await.unwrap();
            assert_eq!(r.status, 201);
            wallets.push(w);
        }
        // Eight clients per node hammer the same four wallets; each wallet can cover only a few.
        let mut tasks = Vec::new();
        for (n, addr) in [a.addr, b.addr].into_iter().enumerate() {
            for t in 0..8usize {
                let (key, wallets) = (key.clone(), wallets.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = rtpay::client::Client::new(addr);
                    let (mut created, mut refused) = (0u32, 0u32);
                    for i in 0..60usize {
                        let d = (t + i + n) % 4;
                        let cr = (d + 1 + i % 3) % 4;
                        let body = json!({"id": uuid(), "debit_account_id": wallets[d], "credit_account_id": wallets[cr], "amount": 37});
                        let r = c.post("/v1/transfers", &key, &body).await.unwrap();
                        match r.status.as_u16() {
                            201 => created += 1,
                            422 => {
                                assert_eq!(r.json()["code"], "insufficient_funds");
                                refused += 1
                            }
                            s => panic!("node {n}: status {s}: {:?}", r.json()),
                        }
                    }
                    (created, refused)
                }));
            }
        }
        let mut created = 0;
        for t in tasks {
            created += t.await.unwrap().0;
        }
        assert!(created > 0);
        let mut total = 0i64;
        for w in &wallets {
            // Both nodes see the same committed balance.
            let ba = balance(&mut ca, &key, w).await;
            let bb = balance(&mut b.client(), &key, w).await;
            assert_eq!(ba, bb);
            let available = ba["available"].as_i64().unwrap();
            assert!(available >= 0, "overdraft: {ba}");
            total += available;
        }
        assert_eq!(total, 4_000, "money created or destroyed across nodes");
    });
    let (ok, report) = a.verify();
    assert!(ok, "{report}");
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore.
struct Switch {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

async fn proxy(target: SocketAddr) -> Switch {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (up2, gen2) = (up.clone(), generation.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            if !up2.load(Ordering::SeqCst) {
                drop(inbound);
                continue;
            }
            let born = gen2.load(Ordering::SeqCst);
            let gen3 = gen2.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                let cut = async {
                    while gen3.load(Ordering::SeqCst) == born {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! { _ = copy => {}, _ = cut => {} }
            });
        }
    });
    Switch { addr, up, generation }
}

#[test]
fn postgres_outage_answers_503_then_recovers_losing_nothing() {
    let url = store::testing::fresh_postgres_database();
    let rt = runtime();
    let pg: SocketAddr = {
        let config: postgres_url::Parts = postgres_url::parse(&url);
        format!("{}:{}", config.host, config.port).parse().unwrap()
    };
    let switch = rt.block_on(proxy(pg));
    let proxied = url.replacen(&format!("{}:{}", pg.ip(), pg.port()), &switch.addr.to_string(), 1);
    let dir = temp_dir("outage");
    let server = Server::start(&dir, Some(&proxied));
    rt.block_on(async {
        let mut c = server.client();
        let (_, key) = tenant(&mut c, "outage").await;
        let bank = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let w = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let before = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 10});
        assert_eq!(c.post("/v1/transfers", &key, &before).await.unwrap().status, 201);

        // PostgreSQL goes away: existing connections are cut and new ones refused.
        switch.up.store(false, Ordering::SeqCst);
        switch.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let during = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": w, "amount": 20});
        let r = c.post("/v1/transfers", &key, &during).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(r.headers.get("retry-after").is_some(), "503 without Retry-After");
        assert_eq!(r.json()["code"], "unavailable");
        let r = c.get("/readyz", &key).await.unwrap();
        assert_eq!(r.status, 503);

        // It comes back: the same request now succeeds, exactly once.
        switch.up.store(true, Ordering::SeqCst);
        let mut status = 0;
        for _ in 0..100 {
            status = c.post("/v1/transfers", &key, &during).await.unwrap().status.as_u16();
            if status == 201 {
                break;
            }
            assert_eq!(status, 503);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 201, "no recovery after PostgreSQL returned");
        assert_eq!(c.post("/v1/transfers", &key, &during).await.unwrap().status, 200);
        assert_eq!(balance(&mut c, &key, &w).await["credits_posted"], 30);
    });
}

/// Just enough URL parsing for the proxy test.
mod postgres_url {
    pub struct Parts {
        pub host: String,
        pub port: u16,
    }
    pub fn parse(url: &str) -> Parts {
        let rest = url.split("://").nth(1).unwrap();
        let rest = rest.split('@').next_back().unwrap();
        let hostport = rest.split('/').next().unwrap();
        let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
        Parts { host: host.to_owned(), port: port.parse().unwrap() }
    }
}
