//! `rtpay demo`: an embedded server in a temporary directory, driven through its real HTTP API,
//! narrating each step with the curl line that does the same.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::client::{Client, Error};
use crate::serve::{run, ServeConfig};

/// The demo institution's ISPB (a sandbox value, not a real participant's).
const DEMO_ISPB: &str = "99999999";

struct Narrator {
    client: Client,
    base: String,
}

impl Narrator {
    async fn call(
        &mut self,
        title: &str,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        println!("\n== {title}");
        // Quoted: a `?` in the URL is a pattern to zsh, and pasted unquoted it fails there.
        let mut curl = format!("curl -s -X {method} '{}{path}' -H 'Authorization: Bearer {token}'", self.base);
        if let Some(body) = &body {
            curl.push_str(&format!(" -H 'Content-Type: application/json' -d '{body}'"));
        }
        println!("$ {curl}");
        let response = match (method, body) {
            ("GET", _) => self.client.get(path, token).await?,
            (_, Some(body)) => self.client.post(path, token, &body).await?,
            (_, None) => self.client.send(hyper::Method::POST, path, Some(token), None).await?,
        };
        let value = response.json();
        println!("-> {} {}", response.status.as_u16(), serde_json::to_string_pretty(&value)?);
        Ok(value)
    }
}

fn uuid() -> String {
    server::auth::new_uuid().to_string()
}

pub async fn tour(addr: SocketAddr, operator: &str) -> Result<(String, String), Error> {
    let mut n = Narrator { client: Client::new(addr), base: format!("http://{addr}") };
    let tenant = n
        .call(
            "The operator creates a tenant (its API key is shown once)",
            "POST",
            "/v1/tenants",
            operator,
            Some(json!({"name": "Acme Pay"})),
        )
        .await?;
    let key = tenant["api_key"]["secret"].as_str().ok_or("no api key in the answer")?.to_owned();
    let (bank, alice, bob) = (uuid(), uuid(), uuid());
    n.call(
        "Open the bank's funding account (unconstrained)",
        "POST",
        "/v1/accounts",
        &key,
        Some(json!({"id": bank, "currency": "BRL", "code": 100})),
    )
    .await?;
    for (id, name) in [(&alice, "alice"), (&bob, "bob")] {
        n.call(&format!("Open {name}'s wallet: it may never go negative"), "POST", "/v1/accounts", &key,
            Some(json!({"id": id, "currency": "BRL", "code": 200, "flags": {"debits_must_not_exceed_credits": true}, "metadata": {"holder": name}}))).await?;
    }
    let deposit = uuid();
    n.call(
        "Deposit R$ 100.00 into alice's wallet",
        "POST",
        "/v1/transfers",
        &key,
        Some(json!({"id": deposit, "debit_account_id": bank, "credit_account_id": alice, "amount": 10000})),
    )
    .await?;
    n.call(
        "Retry the same request: same answer, no second deposit",
        "POST",
        "/v1/transfers",
        &key,
        Some(json!({"id": deposit, "debit_account_id": bank, "credit_account_id": alice, "amount": 10000})),
    )
    .await?;
    n.call(
        "Alice pays bob R$ 25.50",
        "POST",
        "/v1/transfers",
        &key,
        Some(json!({"id": uuid(), "debit_account_id": alice, "credit_account_id": bob, "amount": 2550})),
    )
    .await?;
    n.call(
        "Alice tries to pay R$ 1,000.00: refused, nothing moves",
        "POST",
        "/v1/transfers",
        &key,
        Some(json!({"id": uuid(), "debit_account_id": alice, "credit_account_id": bob, "amount": 100000})),
    )
    .await?;
    let hold = uuid();
    n.call("Hold R$ 30.00 of alice's (a card authorization, say), for 10 minutes", "POST", "/v1/transfers", &key,
        Some(json!({"id": hold, "debit_account_id": alice, "credit_account_id": bob, "amount": 3000, "pending": true, "timeout_seconds": 600}))).await?;
    n.call(
        "Capture R$ 20.00 of the hold; the rest goes back",
        "POST",
        &format!("/v1/transfers/{hold}/post"),
        &key,
        Some(json!({"id": uuid(), "amount": 2000})),
    )
    .await?;
    n.call("Alice's wallet now", "GET", &format!("/v1/accounts/{alice}"), &key, None).await?;
    n.call("Her statement, newest first", "GET", &format!("/v1/accounts/{alice}/transfers?limit=10"), &key, None)
        .await?;
    n.call(
        "The tenant's audit trail: every change, who made it, and how it ended",
        "GET",
        "/v1/audit?limit=3",
        &key,
        None,
    )
    .await?;
    n.call("The signed head of the audit log's Merkle tree", "GET", "/v1/audit/tree-head", &key, None).await?;
    Ok((key, alice))
}

/// Runs the demo; with `exit_after` it stops when the tour is done, otherwise it keeps serving
/// until Ctrl-C so the printed curl lines can be pasted.
pub async fn demo(listen: SocketAddr, exit_after: bool) -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("rtpay-demo-{}-{}", std::process::id(), store::now_nanos()));
    println!("rtpay demo: embedded storage in {}", dir.display());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig {
        data: dir.clone(),
        listen,
        postgres: None,
        audit_key: None,
        rate_limit: server::TENANT_RATE_DEFAULT,
        rate_burst: None,
        trusted_proxies: Default::default(),
        metrics_token: None,
        tls: None,
        kek: None,
        iso8583_listen: None,
        iso8583_plain: false,
        card_settings: Default::default(),
        pix: server::pix_rail::PixSettings { ispb: Some(DEMO_ISPB.into()), ..Default::default() },
        pix_jws: None,
        webhooks: Default::default(),
        // Its operator token is printed: never one from the environment.
        env_secrets: false,
    };
    let server = tokio::spawn(run(
        config,
        async move {
            let _ = stop_rx.await;
        },
        move |running| drop(ready_tx.send((running.addr, running.operator_token.clone()))),
    ));
    let (addr, operator) = ready_rx.await.map_err(|_| "the demo server did not start")?;
    println!("listening on http://{addr}");
    let (key, alice) = tour(addr, &operator).await?;
    println!("\n== Try it yourself while the demo runs:");
    println!("export RTPAY=http://{addr} KEY={key}");
    println!("curl -s $RTPAY/v1/accounts/{alice} -H \"Authorization: Bearer $KEY\"");
    println!("curl -s -X POST $RTPAY/v1/accounts -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' -d '{{\"currency\":\"BRL\"}}'");
    println!("curl -s $RTPAY/metrics | grep rtpay_ledger");
    println!("curl -s \"$RTPAY/v1/audit/proof/inclusion?seq=2\" -H \"Authorization: Bearer $KEY\"");
    println!("curl -s $RTPAY/openapi.json | head -c 300");
    if exit_after {
        let _ = stop_tx.send(());
    } else {
        println!("\nPress Ctrl-C to stop.");
        crate::serve::shutdown_signal().await;
        let _ = stop_tx.send(());
    }
    server.await??;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
