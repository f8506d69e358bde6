//! Card issuing and ISO 8583 authorization end to end, with PyPI `pyiso8583` as the network (an
//! independent implementation, run by `tests/peers/iso8583_client.py` in the virtual environment
//! `scripts/setup` makes): sign-on, approvals, each decline, partial and over captures,
//! reversals, refunds, duplicates, expiry and malformed frames, with balances read over HTTP
//! after each.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use bytes::Bytes;
use common::*;
use hyper::Method;
use rtpay::client::Client;
use serde_json::{json, Value};

/// The network, speaking pyiso8583 over one TCP connection.
struct Network {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Network {
    fn connect(addr: SocketAddr) -> Network {
        Network::connect_with(addr, &[])
    }

    /// Over TLS (Python's `ssl`): the server checked against `ca`, presenting `client` (certificate
    /// and key files) if given.
    fn connect_tls(addr: SocketAddr, ca: &str, client: Option<(&str, &str)>) -> Network {
        let mut args = vec![ca];
        args.extend(client.map(|(cert, key)| [cert, key]).into_iter().flatten());
        Network::connect_with(addr, &args)
    }

    fn connect_with(addr: SocketAddr, tls: &[&str]) -> Network {
        let python = std::env::var("RTPAY_TEST_PYTHON")
            .unwrap_or_else(|_| format!("{}/.cache/rtpay/venv/bin/python", std::env::var("HOME").unwrap_or_default()));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/iso8583_client.py");
        let mut child = Command::new(&python)
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .args(tls)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} is required (scripts/setup makes it, with pyiso8583): {e}"));
        let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        Network { child, stdin, stdout }
    }

    fn command(&mut self, command: Value) -> Value {
        let answer = self.try_command(command);
        assert!(answer.get("error").is_none(), "{answer}");
        answer
    }

    /// A command's answer, an `error` included.
    fn try_command(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn send(&mut self, msg: &Value) {
        self.command(json!({"op": "send", "msg": msg}));
    }

    fn recv(&mut self, n: usize) -> Vec<Value> {
        self.command(json!({"op": "recv", "n": n}))["messages"].as_array().unwrap().clone()
    }

    /// One request, its one answer.
    fn ask(&mut self, msg: &Value) -> Value {
        self.send(msg);
        self.recv(1).pop().expect("an answer")
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A purchase authorization (0100) in pyiso8583's field names.
fn auth(pan: &str, expiry: &str, amount: u64, stan: u32, rrn: &str) -> Value {
    json!({
        "t": "0100", "2": pan, "3": "000000", "4": format!("{amount:012}"), "7": "1122093000",
        "11": format!("{stan:06}"), "12": "093000", "13": "1122", "14": expiry, "18": "5411", "22": "051",
        "37": rrn, "41": "TERM0001", "42": "MERCHANT0000001", "49": "986",
    })
}

fn with(mut msg: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        msg[k] = v.clone();
    }
    msg
}

async fn available(c: &mut Client, key: &str, account: &str) -> (i64, u64, u64) {
    let b = balance(c, key, account).await;
    (b["available"].as_i64().unwrap(), b["debits_pending"].as_u64().unwrap(), b["debits_posted"].as_u64().unwrap())
}

struct Issued {
    key: String,
    account: String,
    card: String,
    pan: String,
    /// DE14 form, `YYMM`.
    expiry: String,
}

/// A tenant, a funded account (R$ 100.00), a product and a card on it.
async fn issue(c: &mut Client, product_extra: Value, card_extra: Value) -> Issued {
    issue_in(c, "BRL", product_extra, card_extra).await
}

/// As [`issue`], in `currency` (10,000 of its minor units).
async fn issue_in(c: &mut Client, currency: &str, product_extra: Value, card_extra: Value) -> Issued {
    let (_, key) = tenant(c, "cards").await;
    let bank = account(c, &key, json!({"currency": currency})).await;
    let account_id =
        account(c, &key, json!({"currency": currency, "flags": {"debits_must_not_exceed_credits": true}})).await;
    let r = c
        .post(
            "/v1/transfers",
            &key,
            &json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": account_id, "amount": 10_000}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let bin = format!("4{:07}", store::now_nanos() % 10_000_000);
    let product = with(json!({"name": "Gold", "bin": bin, "currency": currency, "network": "visa"}), product_extra);
    let r = c.post("/v1/card-products", &key, &product).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let product_id = r.json()["id"].as_str().unwrap().to_owned();
    let body = with(json!({"account_id": account_id, "product_id": product_id, "type": "virtual"}), card_extra);
    let r = c.post("/v1/cards", &key, &body).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let card = r.json();
    assert_eq!(card["status"], json!("active"));
    let card_id = card["id"].as_str().unwrap().to_owned();
    let r = c.post(&format!("/v1/cards/{card_id}/reveal"), &key, &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.headers.get("cache-control").map(|v| v.to_str().unwrap()),
        Some("no-store"),
        "a card's number is kept by no cache"
    );
    let revealed = r.json();
    let pan = revealed["number"].as_str().unwrap().to_owned();
    assert!(pan.starts_with(&bin) && cards::pan::valid(&pan), "{pan}");
    assert_eq!(card["number"], json!(format!("{bin}****{}", &pan[12..])));
    let expiry = revealed["expiry"].as_str().unwrap();
    let yymm = format!("{}{}", &expiry[3..], &expiry[..2]);
    Issued { key, account: account_id, card: card_id, pan, expiry: yymm }
}

#[test]
fn authorizations_captures_reversals_and_refunds_over_iso8583() {
    let dir = temp_dir("cards");
    let log = temp_dir("cards-log").join("server.log");
    let mut server =
        Server::start_logged(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"], Some(&log));
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    let rt = runtime();
    let (pan, cvv2) = rt.block_on(async {
        let mut c = server.client();
        let i = issue(
            &mut c,
            // Velocity is tested on its own (below); this card makes about 40 authorizations in a second.
            json!({"limits": {"per_transaction": 50_000}, "velocity_per_minute": 1_000}),
            json!({"limits": {"daily": 30_000}, "blocked_mccs": ["7995"], "ecommerce": false}),
        )
        .await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let r = c.post(&format!("/v1/cards/{}/reveal", i.card), key, &json!({})).await.unwrap();
        let cvv2 = r.json()["cvv2"].as_str().unwrap().to_owned();
        assert!(cvv2.len() == 3 && cvv2.bytes().all(|b| b.is_ascii_digit()), "{cvv2}");
        let mut net = Network::connect(iso);

        // Sign-on.
        let r = net.ask(&json!({"t": "0800", "7": "1122093000", "11": "000001", "70": "001"}));
        assert_eq!((r["t"].clone(), r["39"].clone(), r["11"].clone()), (json!("0810"), json!("00"), json!("000001")));

        // An approval holds the amount.
        let a1 = auth(&i.pan, &i.expiry, 1_000, 2, "000000000001");
        let r = net.ask(&a1);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0110"), json!("00")), "{r}");
        let code = r["38"].as_str().unwrap().to_owned();
        assert_eq!(code.len(), 6);
        assert_eq!((r["11"].clone(), r["37"].clone()), (json!("000002"), json!("000000000001")));
        assert_eq!(available(&mut c, key, acct).await, (9_000, 1_000, 0));
        // The same message again: the same answer, nothing moves.
        let again = net.ask(&a1);
        assert_eq!((again["39"].clone(), again["38"].clone()), (json!("00"), json!(code)));
        assert_eq!(available(&mut c, key, acct).await, (9_000, 1_000, 0));

        // Each decline, and nothing held by any.
        let unknown = cards::pan::generate("99999999", || 3);
        let declines = [
            ("unknown card", auth(&unknown, &i.expiry, 100, 10, "000000000010"), "14"),
            ("wrong expiry", auth(&i.pan, "2001", 100, 11, "000000000011"), "54"),
            ("blocked MCC", with(auth(&i.pan, &i.expiry, 100, 12, "000000000012"), json!({"18": "7995"})), "57"),
            ("e-commerce off", with(auth(&i.pan, &i.expiry, 100, 13, "000000000013"), json!({"22": "812"})), "57"),
            ("other currency", with(auth(&i.pan, &i.expiry, 100, 14, "000000000014"), json!({"49": "840"})), "57"),
            ("product per-transaction", auth(&i.pan, &i.expiry, 50_001, 15, "000000000015"), "61"),
            ("card daily", auth(&i.pan, &i.expiry, 29_001, 16, "000000000016"), "61"),
            ("funds", auth(&i.pan, &i.expiry, 9_001, 17, "000000000017"), "51"),
        ];
        for (what, msg, expected) in &declines {
            let r = net.ask(msg);
            assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0110"), json!(expected)), "{what}: {r}");
            assert!(r.get("38").is_none(), "{what}: no authorization code on a decline");
        }
        assert_eq!(available(&mut c, key, acct).await, (9_000, 1_000, 0));

        // A partial capture posts part of the hold and releases the rest.
        let capture = |msg: &Value, amount: u64, stan: u32| {
            with(msg.clone(), json!({"t": "0220", "4": format!("{amount:012}"), "11": format!("{stan:06}")}))
        };
        let r = net.ask(&capture(&a1, 800, 20));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (9_200, 0, 800));
        // Over-capture within the 20 % tolerance (a tip), and beyond it.
        let a2 = auth(&i.pan, &i.expiry, 2_000, 21, "000000000021");
        assert_eq!(net.ask(&a2)["39"], json!("00"));
        assert_eq!(net.ask(&capture(&a2, 2_300, 22))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (6_900, 0, 3_100));
        let a3 = auth(&i.pan, &i.expiry, 1_000, 23, "000000000023");
        assert_eq!(net.ask(&a3)["39"], json!("00"));
        assert_eq!(net.ask(&capture(&a3, 1_300, 24))["39"], json!("61"));
        assert_eq!(available(&mut c, key, acct).await, (5_900, 1_000, 3_100));

        // Reversals: of a hold (void), of a capture (money back), of nothing (acknowledged).
        let reversal = |msg: &Value, mti: &str, stan: u32| {
            let original = format!("0100{}1122093000{}", msg["11"].as_str().unwrap(), "0".repeat(22));
            with(msg.clone(), json!({"t": mti, "11": format!("{stan:06}"), "90": original}))
        };
        let r = net.ask(&reversal(&a3, "0400", 30));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0410"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (6_900, 0, 3_100));
        let r = net.ask(&reversal(&a1, "0420", 31));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0430"), json!("00")));
        assert_eq!(available(&mut c, key, acct).await, (7_700, 0, 3_100), "the capture of 8.00 came back");
        let stray = auth(&i.pan, &i.expiry, 500, 32, "000000000099");
        assert_eq!(net.ask(&reversal(&stray, "0400", 33))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (7_700, 0, 3_100), "an unknown reversal moves nothing");

        // A refund (0200, processing code 20xxxx) credits the account; its repeat does not.
        let refund = with(auth(&i.pan, &i.expiry, 500, 40, "000000000040"), json!({"t": "0200", "3": "200000"}));
        let r = net.ask(&refund);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0210"), json!("00")), "{r}");
        assert_eq!(net.ask(&refund)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (8_200, 0, 3_100));

        // Many in flight on one connection, answered (in any order) and matched by STAN.
        for n in 0..20u32 {
            net.send(&auth(&i.pan, &i.expiry, 10, 100 + n, &format!("{:012}", 100 + n)));
        }
        let answers = net.recv(20);
        let mut stans: Vec<u64> = answers.iter().map(|a| a["11"].as_str().unwrap().parse().unwrap()).collect();
        stans.sort_unstable();
        assert_eq!(stans, (100..120).collect::<Vec<u64>>());
        assert!(answers.iter().all(|a| a["39"] == json!("00")), "{answers:?}");
        assert_eq!(available(&mut c, key, acct).await, (8_000, 200, 3_100));

        // The JSON view: each authorization with its hold, captures, reversals and reasons.
        let r = c.get(&format!("/v1/cards/{}/authorizations?limit=1000", i.card), key).await.unwrap();
        assert_eq!(r.status, 200);
        let all = r.json()["authorizations"].as_array().unwrap().clone();
        let first = all.iter().find(|a| a["rrn"] == json!("000000000001")).unwrap();
        assert_eq!(first["status"], json!("reversed"));
        let kinds: Vec<&str> =
            first["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["authorization", "capture", "reversal"]);
        assert_eq!((first["captured"].clone(), first["reversed"].clone()), (json!(800), json!(800)));
        let declined = all.iter().find(|a| a["rrn"] == json!("000000000012")).unwrap();
        assert_eq!(declined["response_code"], json!("57"));
        assert!(declined["reasons"][0].as_str().unwrap().contains("7995"), "{declined}");
        let id = first["id"].as_str().unwrap();
        let r = c.get(&format!("/v1/authorizations/{id}"), key).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["hold_id"].clone()), (200, first["hold_id"].clone()));
        let (_, other) = tenant(&mut c, "other").await;
        assert_eq!(c.get(&format!("/v1/authorizations/{id}"), &other).await.unwrap().status, 404);

        // Lifecycle: blocked cards are declined; a cancelled card never comes back.
        let path = |action: &str| format!("/v1/cards/{}/{action}", i.card);
        assert_eq!(c.post(&path("block"), key, &json!({})).await.unwrap().json()["status"], json!("blocked"));
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 100, 50, "000000000050"))["39"], json!("05"));
        assert_eq!(c.post(&path("unblock"), key, &json!({})).await.unwrap().status, 200);
        assert_eq!(c.post(&path("activate"), key, &json!({})).await.unwrap().status, 409);
        assert_eq!(c.post(&path("cancel"), key, &json!({})).await.unwrap().status, 200);
        let r = c.post(&path("unblock"), key, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (409, json!("invalid_transition")));
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 100, 51, "000000000051"))["39"], json!("05"));

        // The reveal is audited.
        let audit = c.get("/v1/audit?limit=1000", key).await.unwrap().json();
        let reveals = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"].as_str().is_some_and(|r| r.ends_with("reveal")))
            .count();
        assert_eq!(reveals, 2);
        (i.pan, cvv2)
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
    server.stop();
    // No card number in clear at rest or in the log.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(pan.len()).any(|w| w == pan.as_bytes()), "{} holds the card number", path.display());
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(&pan), "the log holds the card number");
    assert!(!text.contains(&format!("\"cvv2\":\"{cvv2}\"")), "the log holds the CVV2");
}

/// Messages on one card in flight together are decided one after another: a burst of
/// authorizations stops at the card's daily limit, and a purchase's reversal and its repeat (an
/// 0400 and the 0420 after it) give the money back once. A refund's reversal takes the refund back.
#[test]
fn concurrent_messages_on_a_card_are_decided_in_turn() {
    let dir = temp_dir("cards-turns");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({"velocity_per_minute": 1_000}), json!({"limits": {"daily": 3_000}})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let mut net = Network::connect(iso);
        for n in 0..10u32 {
            net.send(&auth(&i.pan, &i.expiry, 1_000, 200 + n, &format!("{:012}", 200 + n)));
        }
        let answers = net.recv(10);
        let approved = answers.iter().filter(|a| a["39"] == json!("00")).count();
        assert_eq!(approved, 3, "{answers:?}");
        assert_eq!(available(&mut c, key, acct).await, (7_000, 3_000, 0));
        // Release the holds: one reversal each.
        for a in answers.iter().filter(|a| a["39"] == json!("00")) {
            let stan: u32 = a["11"].as_str().unwrap().parse().unwrap();
            let original = auth(&i.pan, &i.expiry, 1_000, stan, a["37"].as_str().unwrap());
            assert_eq!(
                net.ask(&with(original, json!({"t": "0400", "11": format!("{:06}", stan + 100)})))["39"],
                json!("00")
            );
        }
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0));

        // A purchase (0200), then its reversal and the reversal's repeat, sent together.
        let purchase = with(auth(&i.pan, &i.expiry, 500, 300, "000000000300"), json!({"t": "0200"}));
        assert_eq!(net.ask(&purchase)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (9_500, 0, 500));
        net.send(&with(purchase.clone(), json!({"t": "0400", "11": "000301"})));
        net.send(&with(purchase.clone(), json!({"t": "0420", "11": "000302"})));
        let answers = net.recv(2);
        assert!(answers.iter().all(|a| a["39"] == json!("00")), "{answers:?}");
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 500), "the purchase came back once");

        // A refund credits the account; its reversal takes the credit back, once.
        let refund = with(auth(&i.pan, &i.expiry, 700, 400, "000000000400"), json!({"t": "0200", "3": "200000"}));
        assert_eq!(net.ask(&refund)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (10_700, 0, 500));
        let r = net.ask(&with(refund.clone(), json!({"t": "0400", "11": "000401"})));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0410"), json!("00")), "{r}");
        assert_eq!(net.ask(&with(refund.clone(), json!({"t": "0420", "11": "000402"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 1_200), "the refund was taken back once");

        // The card rail's holds are its own: the native API neither voids nor posts them, nor
        // makes transfers under the rails' codes.
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 900, 500, "000000000500"))["39"], json!("00"));
        let all = c.get(&format!("/v1/cards/{}/authorizations", i.card), key).await.unwrap().json();
        let held =
            all["authorizations"].as_array().unwrap().iter().find(|a| a["rrn"] == json!("000000000500")).unwrap();
        let hold = held["hold_id"].as_str().unwrap().to_owned();
        for action in ["void", "post"] {
            let r = c.post(&format!("/v1/transfers/{hold}/{action}"), key, &json!({"id": uuid()})).await.unwrap();
            assert_eq!(
                (r.status.as_u16(), r.json()["code"].clone(), r.json()["field"].clone()),
                (422, json!("rail_hold"), json!("pending_id"))
            );
        }
        let batch = json!({"transfers": [{"id": uuid(), "void_pending_id": hold}]});
        let r = c.post("/v1/transfers/batch", key, &batch).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!("transfers[0].void_pending_id")));
        assert_eq!(available(&mut c, key, acct).await, (9_100, 900, 1_200), "the hold stands");

        // Repeats (xxx1), sent again with a new transmission time (DE7): the first answer, under
        // the original's response MTI, and nothing moves again.
        let first = auth(&i.pan, &i.expiry, 900, 500, "000000000500");
        let original = net.ask(&first);
        let repeat = net.ask(&with(first.clone(), json!({"t": "0101", "7": "1122093105"})));
        assert_eq!(
            (repeat["t"].clone(), repeat["39"].clone(), repeat["38"].clone()),
            (json!("0110"), json!("00"), original["38"].clone())
        );
        assert_eq!(available(&mut c, key, acct).await, (9_100, 900, 1_200));
        let reversal = with(first, json!({"t": "0420", "11": "000502"}));
        assert_eq!(net.ask(&reversal)["39"], json!("00"));
        let r = net.ask(&with(reversal, json!({"t": "0421", "7": "1122093207"})));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0430"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 1_200));

        // Partial reversals (DE95 names what did happen): a hold of 10.00 of which 6.00 stands,
        // then captured; a purchase of 10.00 of which 3.00 stands gets 7.00 back.
        let replaced = |actual: u64| format!("{actual:012}{}", "0".repeat(30));
        let atm = auth(&i.pan, &i.expiry, 1_000, 600, "000000000600");
        assert_eq!(net.ask(&atm)["39"], json!("00"));
        let partial = with(atm.clone(), json!({"t": "0400", "11": "000601", "95": replaced(600)}));
        assert_eq!(net.ask(&partial)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (9_400, 600, 1_200), "6.00 stays held");
        let capture = with(atm, json!({"t": "0220", "11": "000602", "4": format!("{:012}", 600)}));
        assert_eq!(net.ask(&capture)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (9_400, 0, 1_800));
        let purchase = with(auth(&i.pan, &i.expiry, 1_000, 700, "000000000700"), json!({"t": "0200"}));
        assert_eq!(net.ask(&purchase)["39"], json!("00"));
        let partial = with(purchase, json!({"t": "0400", "11": "000701", "95": replaced(300)}));
        assert_eq!(net.ask(&partial)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (9_100, 0, 2_800), "7.00 came back");
        assert_eq!(net.ask(&with(partial, json!({"t": "0420"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (9_100, 0, 2_800), "its repeat as an advice moves nothing");

        // An advice for a purchase approved in stand-in (never authorized here) is acknowledged
        // and paid by the account, once; one the account cannot pay is acknowledged and recorded.
        let stand_in = with(auth(&i.pan, &i.expiry, 400, 800, "000000000800"), json!({"t": "0220"}));
        let r = net.ask(&stand_in);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
        assert_eq!(net.ask(&with(stand_in, json!({"t": "0221", "7": "1122093301"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (8_700, 0, 3_200), "the stand-in purchase paid once");
        let too_much = with(auth(&i.pan, &i.expiry, 50_000, 801, "000000000801"), json!({"t": "0220"}));
        assert_eq!(net.ask(&too_much)["39"], json!("00"), "an advice is acknowledged");
        assert_eq!(available(&mut c, key, acct).await, (8_700, 0, 3_200));
        let all = c.get(&format!("/v1/cards/{}/authorizations?limit=1000", i.card), key).await.unwrap().json();
        let unposted =
            all["authorizations"].as_array().unwrap().iter().find(|a| a["rrn"] == json!("000000000801")).unwrap();
        assert_eq!(unposted["status"], json!("unposted"), "{unposted}");
        assert!(unposted["reasons"][0].as_str().unwrap().contains("insufficient_funds"), "{unposted}");

        // A reversal the account cannot pay yet (the refund was spent) is refused, and succeeds
        // when tried again once it can.
        let refund = with(auth(&i.pan, &i.expiry, 300, 900, "000000000900"), json!({"t": "0200", "3": "200000"}));
        assert_eq!(net.ask(&refund)["39"], json!("00"));
        let elsewhere = account(&mut c, key, json!({"currency": "BRL"})).await;
        let out = json!({"id": uuid(), "debit_account_id": acct, "credit_account_id": elsewhere, "amount": 9_000});
        assert_eq!(c.post("/v1/transfers", key, &out).await.unwrap().status, 201);
        assert_eq!(available(&mut c, key, acct).await, (0, 0, 12_200));
        assert_eq!(net.ask(&with(refund.clone(), json!({"t": "0400", "11": "000901"})))["39"], json!("51"));
        let back = json!({"id": uuid(), "debit_account_id": elsewhere, "credit_account_id": acct, "amount": 1_000});
        assert_eq!(c.post("/v1/transfers", key, &back).await.unwrap().status, 201);
        assert_eq!(net.ask(&with(refund, json!({"t": "0400", "11": "000902"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (700, 0, 12_500), "the refund taken back");

        // An authorization and its repeat in flight together: one hold, one answer.
        let first = auth(&i.pan, &i.expiry, 100, 910, "000000000910");
        net.send(&first);
        net.send(&with(first.clone(), json!({"t": "0101", "7": "1122093401"})));
        let answers = net.recv(2);
        assert!(answers.iter().all(|a| a["39"] == json!("00") && a["38"] == answers[0]["38"]), "{answers:?}");
        assert_eq!(available(&mut c, key, acct).await, (600, 100, 12_500), "held once");
        // Reversed in part, then in full: the record shows all of it reversed.
        let partial = with(first.clone(), json!({"t": "0400", "11": "000911", "95": replaced(40)}));
        assert_eq!(net.ask(&partial)["39"], json!("00"));
        assert_eq!(net.ask(&with(first, json!({"t": "0400", "11": "000912"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (700, 0, 12_500));
        let all = c.get(&format!("/v1/cards/{}/authorizations?limit=1000", i.card), key).await.unwrap().json();
        let done =
            all["authorizations"].as_array().unwrap().iter().find(|a| a["rrn"] == json!("000000000910")).unwrap();
        assert_eq!((done["status"].clone(), done["reversed"].clone()), (json!("reversed"), json!(100)), "{done}");

        // A capture or reversal in another currency than the authorization's is refused.
        let held = auth(&i.pan, &i.expiry, 200, 920, "000000000920");
        assert_eq!(net.ask(&held)["39"], json!("00"));
        for mti in ["0220", "0400"] {
            let dollars = with(held.clone(), json!({"t": mti, "11": "000921", "49": "840"}));
            assert_eq!(net.ask(&dollars)["39"], json!("30"), "{mti}");
        }
        assert_eq!(available(&mut c, key, acct).await, (500, 200, 12_500), "the hold stands, untouched");
        assert_eq!(net.ask(&with(held, json!({"t": "0400", "11": "000922"})))["39"], json!("00"));

        // An RRN is unique only within one acquirer's and terminal's messages: two authorizations
        // under one RRN from two terminals are captured and reversed each by its own terminal's
        // message, whichever came last.
        let at = |terminal: &str, amount: u64, stan: u32| {
            with(auth(&i.pan, &i.expiry, amount, stan, "000000000930"), json!({"41": terminal, "32": "12345678"}))
        };
        let (one, two) = (at("TERM0001", 100, 930), at("TERM0002", 250, 931));
        assert_eq!(net.ask(&one)["39"], json!("00"));
        assert_eq!(net.ask(&two)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (350, 350, 12_500));
        assert_eq!(net.ask(&with(one.clone(), json!({"t": "0220", "11": "000932"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (350, 250, 12_600), "TERM0001's 1.00 captured");
        assert_eq!(net.ask(&with(two.clone(), json!({"t": "0400", "11": "000933"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (600, 0, 12_600), "TERM0002's 2.50 released");
        // Another acquirer's message under that RRN, from a terminal of the same name, finds neither.
        let stranger = with(one, json!({"t": "0400", "11": "000934", "32": "87654321"}));
        assert_eq!(net.ask(&stranger)["39"], json!("00"), "acknowledged: nothing to reverse");
        assert_eq!(available(&mut c, key, acct).await, (600, 0, 12_600), "nothing moved");
        let own = json!({"id": uuid(), "debit_account_id": acct, "credit_account_id": acct, "amount": 1, "code": 7600});
        let r = c.post("/v1/transfers", key, &own).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (422, json!("reserved_code")));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// An acquirer that timed out on an 0100 reverses it; when the reversal arrives first it finds
/// nothing, and the 0100 arriving after it is declined and holds nothing (before, it was approved
/// and its hold stood for the hold period). Other authorizations are decided as usual.
#[test]
fn an_authorization_arriving_after_its_reversal_holds_nothing() {
    let dir = temp_dir("cards-late-original");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let mut net = Network::connect(iso);
        let original = with(auth(&i.pan, &i.expiry, 1_000, 700, "000000000700"), json!({"41": "TERM0001"}));
        let reversal = net.ask(&with(original.clone(), json!({"t": "0400", "11": "000701"})));
        assert_eq!((reversal["t"].clone(), reversal["39"].clone()), (json!("0410"), json!("00")), "{reversal}");
        let late = net.ask(&original);
        assert_eq!((late["t"].clone(), late["39"].clone()), (json!("0110"), json!("05")), "{late}");
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0), "nothing held");
        assert_eq!(net.ask(&original)["39"], json!("05"), "its repeat is answered the same");
        // A reversal from one terminal says nothing of another terminal's purchase under its RRN.
        let other = with(auth(&i.pan, &i.expiry, 1_000, 800, "000000000800"), json!({"41": "TERM0001"}));
        assert_eq!(net.ask(&with(other.clone(), json!({"t": "0400", "11": "000801"})))["39"], json!("00"));
        let elsewhere = with(other, json!({"11": "000802", "41": "TERM0002"}));
        assert_eq!(net.ask(&elsewhere)["39"], json!("00"));
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 1_000, 703, "000000000703"))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (8_000, 2_000, 0));
        let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), key).await.unwrap();
        let all = r.json()["authorizations"].as_array().unwrap().clone();
        let declined = all.iter().find(|a| a["stan"] == json!("000700")).expect("the late original's record");
        assert_eq!(declined["status"], json!("declined"), "{declined}");
        assert_eq!(declined["reasons"], json!(["reversed before it arrived"]), "{declined}");
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// An 0100 for a zero amount is an account verification (a card put on file, a token
/// provisioned): answered 85 with an authorization code, nothing held; a reversal of it moves
/// nothing. A zero-amount purchase (0200) is 13, an invalid amount.
/// (Verifications were answered 30, a format error.)
#[test]
fn a_zero_amount_authorization_verifies_the_card_and_holds_nothing() {
    let dir = temp_dir("cards-verification");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let mut net = Network::connect(iso);
        let verification = auth(&i.pan, &i.expiry, 0, 900, "000000000900");
        let answer = net.ask(&verification);
        assert_eq!((answer["t"].clone(), answer["39"].clone()), (json!("0110"), json!("85")), "{answer}");
        assert!(answer["38"].as_str().is_some_and(|a| a.len() == 6), "an authorization code: {answer}");
        assert_eq!(net.ask(&verification)["39"], json!("85"), "its repeat is answered the same");
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0), "nothing held");
        let reversal = net.ask(&with(verification.clone(), json!({"t": "0400", "11": "000901"})));
        assert_eq!(reversal["39"], json!("00"), "{reversal}");
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0));
        let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), key).await.unwrap();
        let all = r.json()["authorizations"].as_array().unwrap().clone();
        let verified = all.iter().find(|a| a["stan"] == json!("000900")).expect("the verification's record");
        assert_eq!((verified["status"].clone(), verified["response_code"].clone()), (json!("verified"), json!("85")));
        // An unknown card is not verified.
        let blocked = auth("4000000000000002", &i.expiry, 0, 902, "000000000902");
        assert_ne!(net.ask(&blocked)["39"], json!("85"), "an unknown card");
        let purchase = with(auth(&i.pan, &i.expiry, 0, 903, "000000000903"), json!({"t": "0200"}));
        assert_eq!(net.ask(&purchase)["39"], json!("13"));
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// Runs `test` against a server with an ISO 8583 listener on each engine (embedded, then
/// PostgreSQL), given the server and the listener's address; then checks every invariant.
fn on_each_engine(tag: &str, test: impl Fn(&Server, SocketAddr)) {
    for postgres in [None, Some(store::testing::fresh_postgres_database())] {
        let dir = temp_dir(tag);
        let args = ["--iso8583-listen", "127.0.0.1:0"];
        let server = Server::start_with_args(&dir, postgres.as_deref(), "127.0.0.1:0", true, &args);
        test(&server, server.iso8583.expect("the ISO 8583 listener's address is printed"));
        let (ok, report) = server.verify();
        assert!(ok, "{report}");
    }
}

/// A capture above the hold (a tip, within the tolerance) whose excess the account cannot cover:
/// the network has settled the purchase and an advice is not declined, so the hold is posted, the
/// amount not collected is recorded, and the answer is 00. (Before, it answered 51 and posted
/// nothing: the hold stood until it expired and gave the cardholder back what the network paid.)
#[test]
fn a_capture_whose_tip_the_account_cannot_cover_posts_the_hold() {
    // On both engines: the refusal and the hold's post are two guarded commits.
    on_each_engine("cards-short-tip", |server, iso| {
        runtime().block_on(async {
            let mut c = server.client();
            let i = issue(&mut c, json!({}), json!({})).await;
            let (key, acct) = (i.key.as_str(), i.account.as_str());
            let mut net = Network::connect(iso);
            let a = auth(&i.pan, &i.expiry, 9_000, 1, "000000000001");
            assert_eq!(net.ask(&a)["39"], json!("00"));
            assert_eq!(available(&mut c, key, acct).await, (1_000, 9_000, 0));
            // 1,500 above the hold, within 20 % of it; the account has 1,000 left.
            let capture = with(a.clone(), json!({"t": "0220", "4": format!("{:012}", 10_500), "11": "000002"}));
            let r = net.ask(&capture);
            assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
            assert_eq!(available(&mut c, key, acct).await, (1_000, 0, 9_000), "the hold is posted, the tip is not");
            assert_eq!(net.ask(&capture)["39"], json!("00"), "a repeat is answered the same");
            assert_eq!(available(&mut c, key, acct).await, (1_000, 0, 9_000), "and moves nothing");
            let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), key).await.unwrap();
            let record = r.json()["authorizations"][0].clone();
            assert_eq!(
                (record["status"].clone(), record["captured"].clone()),
                (json!("captured"), json!(9_000)),
                "{record}"
            );
            let reasons = record["reasons"].to_string();
            assert!(reasons.contains("1500 above the hold not collected"), "{record}");
            // The chain the ledger refused is on the record too, with no money moved by it.
            let steps: Vec<(&str, &str, usize)> = record["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let moved = e["transfer_ids"].as_array().unwrap().len();
                    (e["kind"].as_str().unwrap(), e["response_code"].as_str().unwrap(), moved)
                })
                .collect();
            assert_eq!(steps, [("authorization", "00", 1), ("capture", "51", 0), ("capture", "00", 1)], "{record}");
            // Reversed, the purchase gives back what was collected.
            let original = format!("0100000001{}{}", "1122093000", "0".repeat(22));
            let reversal = with(a, json!({"t": "0400", "11": "000003", "90": original}));
            assert_eq!(net.ask(&reversal)["39"], json!("00"));
            assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 9_000));
        });
    });
}

/// An authorization advice (0120: the network approved in rtpay's stead) holds the amount, and
/// its capture (0220) collects what was spent; one of an authorization rtpay approved changes
/// nothing; one the funds cannot hold is collected on its own at capture. A refund advice is held
/// to its authorization within the tolerance; a DE95 that is not an amount is refused; a chip's
/// offline approval (DE39 `Y1`) is an approval. (Before, the 0120 was taken for a capture: the
/// stand-in authorization was charged in full and its smaller capture refused; a refund advice
/// credited any amount; a garbled DE95 reversed everything; `Y1` released the hold.)
#[test]
fn authorization_advices_hold_and_advices_are_held_to_their_authorizations() {
    let dir = temp_dir("cards-advices");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.unwrap();
    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let mut net = Network::connect(iso);
        let stan = |m: &Value, t: &str, n: u32| with(m.clone(), json!({"t": t, "11": format!("{n:06}")}));

        // A fuel pump's pre-authorization of 5,000, approved by the network in stand-in.
        let pump = auth(&i.pan, &i.expiry, 5_000, 1, "000000000001");
        let r = net.ask(&stan(&pump, "0120", 1));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0130"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (5_000, 5_000, 0), "held, not charged");
        // 1,200 of fuel: the capture collects that, and the rest is released.
        let fuel = with(stan(&pump, "0220", 2), json!({"4": format!("{:012}", 1_200)}));
        let r = net.ask(&fuel);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (8_800, 0, 1_200));

        // An advice of an authorization rtpay approved (its answer came too late): it stands.
        let shop = auth(&i.pan, &i.expiry, 2_000, 3, "000000000003");
        assert_eq!(net.ask(&shop)["39"], json!("00"));
        assert_eq!(net.ask(&stan(&shop, "0120", 4))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (6_800, 2_000, 1_200), "held once, not charged");
        assert_eq!(net.ask(&stan(&shop, "0400", 5))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (8_800, 0, 1_200), "its reversal releases it");

        // A chip's offline approval (Y1) of a purchase rtpay held: captured, not released.
        let chip = auth(&i.pan, &i.expiry, 300, 6, "000000000006");
        assert_eq!(net.ask(&chip)["39"], json!("00"));
        assert_eq!(net.ask(&with(stan(&chip, "0220", 7), json!({"39": "Y1"})))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (8_500, 0, 1_500));

        // A stand-in authorization the funds cannot hold: acknowledged, collected on its own at
        // capture as far as the ledger allows (here not at all: recorded for reconciliation).
        let big = auth(&i.pan, &i.expiry, 60_000, 8, "000000000008");
        assert_eq!(net.ask(&stan(&big, "0120", 8))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (8_500, 0, 1_500));
        let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), key).await.unwrap();
        let record = r.json()["authorizations"][0].clone();
        assert_eq!(
            (record["status"].clone(), record["rrn"].clone()),
            (json!("expired"), json!("000000000008")),
            "{record}"
        );

        // A refund authorized for 1,000 is credited up to the tolerance (20 %), not beyond.
        let refund = with(auth(&i.pan, &i.expiry, 1_000, 9, "000000000009"), json!({"3": "200000"}));
        assert_eq!(net.ask(&refund)["39"], json!("00"));
        let inflated = with(stan(&refund, "0220", 10), json!({"4": format!("{:012}", 100_000)}));
        assert_eq!(net.ask(&inflated)["39"], json!("61"));
        assert_eq!(available(&mut c, key, acct).await, (8_500, 0, 1_500), "nothing credited");
        assert_eq!(net.ask(&stan(&refund, "0220", 11))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (9_500, 0, 1_500));

        // A partial reversal whose DE95 is not an amount is refused: the hold stands.
        let atm = auth(&i.pan, &i.expiry, 3_000, 12, "000000000012");
        assert_eq!(net.ask(&atm)["39"], json!("00"));
        let garbled = with(stan(&atm, "0400", 13), json!({"95": format!("00000000060X{}", "0".repeat(30))}));
        assert_eq!(net.ask(&garbled)["39"], json!("30"));
        assert_eq!(available(&mut c, key, acct).await, (6_500, 3_000, 1_500), "nothing reversed");

        // Declined here (an expiry date that is not the card's), approved by the network in
        // stand-in: its advice holds the amount, and its capture collects it.
        let late = with(auth(&i.pan, &i.expiry, 700, 14, "000000000014"), json!({"14": "2001"}));
        assert_eq!(net.ask(&late)["39"], json!("54"));
        assert_eq!(net.ask(&stan(&late, "0120", 15))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (5_800, 3_700, 1_500), "held");
        assert_eq!(net.ask(&stan(&late, "0220", 16))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (5_800, 3_000, 2_200), "collected");
        // Its capture arriving with no 0120 first is collected on its own.
        let late = with(auth(&i.pan, &i.expiry, 400, 17, "000000000017"), json!({"14": "2001"}));
        assert_eq!(net.ask(&late)["39"], json!("54"));
        assert_eq!(net.ask(&stan(&late, "0220", 18))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (5_400, 3_000, 2_600), "collected on its own");
        // One the acquirer reversed before the network's advice came: nothing is held for it.
        let late = with(auth(&i.pan, &i.expiry, 500, 19, "000000000019"), json!({"14": "2001"}));
        assert_eq!(net.ask(&late)["39"], json!("54"));
        assert_eq!(net.ask(&stan(&late, "0400", 20))["39"], json!("00"));
        assert_eq!(net.ask(&stan(&late, "0120", 21))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (5_400, 3_000, 2_600), "nothing held");
    });
}

/// The processing code (DE3) says which way the money goes, and an advice's DE39 whether it goes
/// at all: a refund's authorization (0100, `20xxxx`) holds nothing and its advice credits the
/// account, as do a refund advice with no authorization and an original credit (`26xxxx`); a
/// refund reversed in part takes back only what did not happen; an advice reporting a decline
/// releases the hold and moves nothing; a card in XCG (whose numeric code, 532, is ANG's too) is
/// captured and reversed. (Before, the refund's authorization held the amount and its advice
/// debited the cardholder, the declined advice captured the hold, the partial reversal took back
/// the whole refund, and every XCG capture or reversal was refused with 30.)
#[test]
fn credits_declined_advices_and_shared_currency_codes_move_money_the_right_way() {
    let dir = temp_dir("cards-credits");
    let mut server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.unwrap();
    let held = runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({"limits": {"daily": 5_000}})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let mut net = Network::connect(iso);
        let advice = |msg: &Value, stan: u32| with(msg.clone(), json!({"t": "0220", "11": format!("{stan:06}")}));
        let credit = |msg: Value| with(msg, json!({"3": "200000"}));

        // A refund's authorization, above the card's daily limit: approved, nothing held.
        let refund_auth = credit(auth(&i.pan, &i.expiry, 7_000, 1, "000000000001"));
        let r = net.ask(&refund_auth);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0110"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0));
        // Its advice credits the account, once.
        let r = net.ask(&advice(&refund_auth, 2));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (17_000, 0, 0), "the refund is credited");
        assert_eq!(net.ask(&advice(&refund_auth, 2))["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (17_000, 0, 0), "a repeat moves nothing");
        // Refunds count against no limit: a purchase up to the daily limit is still approved.
        let purchase = auth(&i.pan, &i.expiry, 5_000, 3, "000000000003");
        assert_eq!(net.ask(&purchase)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (12_000, 5_000, 0));
        // An advice of that purchase reporting a decline in stand-in: acknowledged, the hold
        // released, nothing captured.
        let declined = with(advice(&purchase, 4), json!({"39": "05"}));
        let r = net.ask(&declined);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (17_000, 0, 0), "the hold is released");
        assert_eq!(net.ask(&advice(&purchase, 5))["39"], json!("05"), "a declined purchase is not captured after");
        // A declined advice with nothing to match moves nothing either.
        let lone = with(advice(&auth(&i.pan, &i.expiry, 900, 6, "000000000006"), 6), json!({"39": "51"}));
        assert_eq!(net.ask(&lone)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (17_000, 0, 0));

        // A refund advice with no authorization (approved in stand-in) credits; so does an original
        // credit sent as a single message.
        let lone = credit(advice(&auth(&i.pan, &i.expiry, 300, 7, "000000000007"), 7));
        assert_eq!(net.ask(&lone)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (17_300, 0, 0));
        let oct = with(auth(&i.pan, &i.expiry, 700, 8, "000000000008"), json!({"t": "0200", "3": "260000"}));
        assert_eq!(net.ask(&oct)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (18_000, 0, 0));

        // A refund of 1,000 of which 600 happened (DE95): the other 400 is taken back.
        let refund = credit(with(auth(&i.pan, &i.expiry, 1_000, 9, "000000000009"), json!({"t": "0200"})));
        assert_eq!(net.ask(&refund)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (19_000, 0, 0));
        let replaced = format!("{:012}{}", 600, "0".repeat(30));
        let partial = with(refund.clone(), json!({"t": "0400", "11": "000010", "95": replaced}));
        assert_eq!(net.ask(&partial)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (18_600, 0, 400), "only what did not happen");
        // Reversed in full after that, the 600 left.
        let reversal = with(refund, json!({"t": "0400", "11": "000011"}));
        assert_eq!(net.ask(&reversal)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (18_000, 0, 1_000));
        // A refund's authorization reversed: nothing to give back, nothing credited after.
        let refund_auth = credit(auth(&i.pan, &i.expiry, 400, 12, "000000000012"));
        assert_eq!(net.ask(&refund_auth)["39"], json!("00"));
        assert_eq!(net.ask(&with(refund_auth.clone(), json!({"t": "0400", "11": "000013"})))["39"], json!("00"));
        assert_eq!(net.ask(&advice(&refund_auth, 14))["39"], json!("05"), "a reversed refund is not credited");
        assert_eq!(available(&mut c, key, acct).await, (18_000, 0, 1_000));

        // A refund advice on a purchase's authorization: refused, nothing moves.
        let held = auth(&i.pan, &i.expiry, 800, 15, "000000000015");
        assert_eq!(net.ask(&held)["39"], json!("00"));
        assert_eq!(available(&mut c, key, acct).await, (17_200, 800, 1_000));
        let r = net.ask(&credit(advice(&held, 16)));
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("30")), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (17_200, 800, 1_000));
        // A refund's authorization whose reversal came first is declined, and holds nothing.
        let late = credit(auth(&i.pan, &i.expiry, 500, 17, "000000000017"));
        assert_eq!(net.ask(&with(late.clone(), json!({"t": "0400", "11": "000018"})))["39"], json!("00"));
        assert_eq!(net.ask(&late)["39"], json!("05"));
        assert_eq!(available(&mut c, key, acct).await, (17_200, 800, 1_000));

        let r = c.get(&format!("/v1/cards/{}/authorizations?limit=100", i.card), key).await.unwrap();
        let all = r.json()["authorizations"].as_array().unwrap().clone();
        let held = all.iter().find(|a| a["rrn"] == json!("000000000015")).unwrap();
        assert_eq!((held["status"].clone(), held["processing_code"].clone()), (json!("approved"), json!("000000")));
        let by_rrn = |rrn: &str| all.iter().find(|a| a["rrn"] == json!(rrn)).unwrap().clone();
        let first = by_rrn("000000000001");
        assert_eq!((first["status"].clone(), first["credit"].clone()), (json!("refunded"), json!(true)), "{first}");
        assert_eq!(first["captured"], json!(7_000));
        let third = by_rrn("000000000003");
        assert_eq!(third["status"], json!("declined"), "{third}");
        assert!(third["reasons"].to_string().contains("DE39 05"), "{third}");

        // XCG and ANG share 532: an XCG card's authorization, capture and reversal all apply.
        let x = issue_in(&mut c, "XCG", json!({}), json!({})).await;
        let a = with(auth(&x.pan, &x.expiry, 2_000, 20, "000000000020"), json!({"49": "532"}));
        assert_eq!(net.ask(&a)["39"], json!("00"));
        let r = net.ask(&advice(&a, 21));
        assert_eq!(r["39"], json!("00"), "{r}");
        assert_eq!(available(&mut c, &x.key, &x.account).await, (8_000, 0, 2_000));
        let r = net.ask(&with(a, json!({"t": "0400", "11": "000022"})));
        assert_eq!(r["39"], json!("00"), "{r}");
        assert_eq!(available(&mut c, &x.key, &x.account).await, (10_000, 0, 2_000));
        let r = net.ask(&with(advice(&auth(&x.pan, &x.expiry, 100, 23, "000000000023"), 23), json!({"49": "532"})));
        assert_eq!(r["39"], json!("00"), "a stand-in advice in XCG: {r}");
        assert_eq!(available(&mut c, &x.key, &x.account).await, (9_900, 0, 2_100));
        (i.key.clone(), i.account.clone(), i.pan.clone(), i.expiry.clone())
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");

    // The held purchase's record as the version before this one stored a refund's 0100 (it kept
    // no processing code, and held the amount): a refund advice on it releases the hold and
    // credits the refund.
    let (key, acct, pan, expiry) = held;
    server.stop();
    let db = rusqlite::Connection::open(dir.join("rtpay.db")).unwrap();
    let sql = "UPDATE card_authorizations SET body = json_remove(body, '$.processing_code') WHERE rrn = '000000000015'";
    assert_eq!(db.execute(sql, []).unwrap(), 1);
    drop(db);
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    runtime().block_on(async {
        let mut c = server.client();
        let mut net = Network::connect(server.iso8583.unwrap());
        let refund = with(auth(&pan, &expiry, 800, 24, "000000000015"), json!({"t": "0220", "3": "200000"}));
        let r = net.ask(&refund);
        assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0230"), json!("00")), "{r}");
        assert_eq!(available(&mut c, &key, &acct).await, (18_800, 0, 1_000), "released and credited");
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// A reversal whose RRN finds nothing is matched by DE90's original STAN only together with its
/// original transmission time (DE7): a STAN comes round again, and the reversal of a purchase that
/// never arrived must not void an earlier one that had the same STAN. (Before, it voided it.)
#[test]
fn a_reversal_by_stan_needs_the_originals_time_too() {
    // On both engines: the records are read back from each engine's storage.
    on_each_engine("cards-stan-time", |server, iso| {
        runtime().block_on(async {
            let mut c = server.client();
            let i = issue(&mut c, json!({}), json!({})).await;
            let (key, acct) = (i.key.as_str(), i.account.as_str());
            let mut net = Network::connect(iso);
            let first = auth(&i.pan, &i.expiry, 1_000, 7, "000000000070");
            assert_eq!(net.ask(&first)["39"], json!("00"));
            assert_eq!(available(&mut c, key, acct).await, (9_000, 1_000, 0));
            // A later purchase at the same terminal, under the same STAN, that never reached rtpay;
            // the acquirer reverses it.
            let lost = with(auth(&i.pan, &i.expiry, 2_000, 7, "000000000071"), json!({"7": "1123101500"}));
            let de90 = |stan: &str, sent: &str| format!("0100{stan}{sent}{}", "0".repeat(22));
            let reversal = with(lost.clone(), json!({"t": "0400", "11": "000008", "90": de90("000007", "1123101500")}));
            assert_eq!(net.ask(&reversal)["39"], json!("00"), "a reversal is acknowledged");
            assert_eq!(available(&mut c, key, acct).await, (9_000, 1_000, 0), "the first purchase is still held");
            // Arriving after all, the lost one holds nothing.
            assert_eq!(net.ask(&lost)["39"], json!("05"));
            assert_eq!(available(&mut c, key, acct).await, (9_000, 1_000, 0));
            // A reversal under a new RRN naming the first purchase's STAN and time finds it.
            let change = json!({"t": "0400", "11": "000009", "37": "000000000072", "90": de90("000007", "1122093000")});
            assert_eq!(net.ask(&with(first, change))["39"], json!("00"));
            assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0), "the first purchase's hold is void");
            // A purchase first heard of in its repeat (0101, with a renewed DE7): a reversal under a
            // new RRN naming the 0100's time still finds it.
            let repeat =
                with(auth(&i.pan, &i.expiry, 500, 20, "000000000080"), json!({"t": "0101", "7": "1122094500"}));
            assert_eq!(net.ask(&repeat)["39"], json!("00"));
            assert_eq!(available(&mut c, key, acct).await, (9_500, 500, 0));
            let change = json!({"t": "0400", "11": "000021", "37": "000000000081", "90": de90("000020", "1122093000")});
            assert_eq!(net.ask(&with(repeat, change))["39"], json!("00"));
            assert_eq!(available(&mut c, key, acct).await, (10_000, 0, 0), "the repeated purchase's hold is void");
        });
    });
}

/// A card blocked while a burst of its authorizations waits for the card's turn declines the
/// ones decided after the block: none is approved later than the block's answer. (Before, each
/// message read the card's status before waiting its turn, and those waiting were approved.)
#[test]
fn a_card_blocked_during_a_burst_declines_what_is_decided_after() {
    const BURST: u32 = 300;
    let dir = temp_dir("cards-block-burst");
    let server = Server::start_with_args(&dir, None, "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    runtime().block_on(async {
        let mut c = server.client();
        let mut net = Network::connect(iso);
        // A machine fast enough to decide the whole burst before the block arrives proves
        // nothing: a new card and burst then, at most five.
        let mut raced = false;
        for _ in 0..5 {
            let i = issue(&mut c, json!({"velocity_per_minute": 10_000}), json!({})).await;
            let key = i.key.as_str();
            for n in 0..BURST {
                net.send(&auth(&i.pan, &i.expiry, 1, 1_000 + n, &format!("{:012}", 1_000 + n)));
            }
            let r = c.post(&format!("/v1/cards/{}/block", i.card), key, &json!({})).await.unwrap();
            assert_eq!(r.json()["status"], json!("blocked"));
            let blocked_at = server::dto::rfc3339(store::now_nanos());
            let answers = net.recv(BURST as usize);
            let approved = answers.iter().filter(|a| a["39"] == json!("00")).count();
            let r = c.get(&format!("/v1/cards/{}/authorizations?limit=1000", i.card), key).await.unwrap();
            let all = r.json()["authorizations"].as_array().unwrap().clone();
            assert_eq!(all.len(), BURST as usize);
            let late: Vec<_> = all
                .iter()
                .filter(|a| a["status"] == json!("approved") && a["created_at"].as_str().unwrap() > blocked_at.as_str())
                .collect();
            assert!(late.is_empty(), "approved after the block's answer ({blocked_at}): {late:?}");
            assert_eq!(all.iter().filter(|a| a["status"] == json!("approved")).count(), approved);
            if approved < BURST as usize {
                raced = true;
                break;
            }
        }
        assert!(raced, "every burst was over before its block: the test proved nothing");
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// A capture sent to one node of a cluster and a reversal of the same authorization sent to the
/// other at the same moment: whichever commits first, the other is decided again on what that
/// left, so every purchase ends reversed, its money back, and its record keeps all three steps.
/// (Before, the loser wrote its stale record, "approved", over the winner's.)
#[test]
fn a_capture_and_a_reversal_racing_on_two_nodes_both_count() {
    // Rounds come in sets until one has raced (a step decided again after the other node's
    // committed first: most sets of 20 have several), at most 10 sets.
    const SET: u32 = 20;
    let (a, b) = two_nodes("cards-race", &["--iso8583-listen", "127.0.0.1:0"]);
    let (iso_a, iso_b) = (a.iso8583.expect("node a's ISO 8583 listener"), b.iso8583.expect("node b's"));
    runtime().block_on(async {
        let raced = || async {
            let mut raced = 0;
            for node in [&a, &b] {
                let r = node.client().send(hyper::Method::GET, "/metrics", None, None).await.unwrap();
                let text = String::from_utf8_lossy(&r.body).into_owned();
                let line = text.lines().find(|l| l.starts_with("rtpay_card_steps_raced_total ")).expect("the metric");
                raced += line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
            }
            raced
        };
        let mut c = a.client();
        let i = issue(&mut c, json!({"velocity_per_minute": 1_000}), json!({})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let (mut net_a, mut net_b) = (Network::connect(iso_a), Network::connect(iso_b));
        let mut rounds = 0;
        while rounds < 10 * SET && (rounds == 0 || raced().await == 0) {
            for _ in 0..SET {
                let stan = 1_000 + 10 * rounds;
                rounds += 1;
                let original = auth(&i.pan, &i.expiry, 100, stan, &format!("{stan:012}"));
                assert_eq!(net_a.ask(&original)["39"], json!("00"));
                net_a.send(&with(original.clone(), json!({"t": "0220", "11": format!("{:06}", stan + 1)})));
                net_b.send(&with(original, json!({"t": "0400", "11": format!("{:06}", stan + 2)})));
                let (capture, reversal) = (net_a.recv(1).remove(0), net_b.recv(1).remove(0));
                assert_eq!(reversal["39"], json!("00"), "a reversal is always acknowledged: {reversal}");
                // The capture is approved when it came first, refused when the reversal did.
                assert!(["00", "05"].contains(&capture["39"].as_str().unwrap()), "{capture}");
            }
        }
        assert!(raced().await > 0, "no round of {rounds} raced: the test proved nothing");
        assert_eq!(available(&mut c, key, acct).await.0, 10_000, "every purchase came back");
        let r = c.get(&format!("/v1/cards/{}/authorizations?limit=1000", i.card), key).await.unwrap();
        let all = r.json()["authorizations"].as_array().unwrap().clone();
        assert_eq!(all.len(), rounds as usize);
        for a in &all {
            let kinds: Vec<&str> =
                a["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
            assert_eq!(a["status"], json!("reversed"), "{a}");
            assert_eq!(kinds.len(), 3, "the authorization, the capture and the reversal: {a}");
            assert!(kinds.contains(&"capture") && kinds.contains(&"reversal"), "{a}");
        }
    });
}

/// With its storage gone the issuer cannot decide: the network hears 91 (issuer unavailable) at
/// once, nothing is held, and the same message after storage returns is decided as usual. A card
/// row rtpay cannot read answers 96 (system malfunction).
#[test]
fn an_issuer_without_its_storage_answers_91_and_a_garbled_card_96() {
    let url = store::testing::fresh_postgres_database();
    let rt = runtime();
    let (switch, proxied) = rt.block_on(proxied_postgres(&url));
    let dir = temp_dir("cards-outage");
    let server =
        Server::start_with_args(&dir, Some(&proxied), "127.0.0.1:0", true, &["--iso8583-listen", "127.0.0.1:0"]);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    rt.block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({})).await;
        let (key, acct) = (i.key.as_str(), i.account.as_str());
        let mut net = Network::connect(iso);
        let r = net.ask(&auth(&i.pan, &i.expiry, 1_000, 1, "000000000001"));
        assert_eq!(r["39"], json!("00"), "{r}");

        switch.cut();
        let second = auth(&i.pan, &i.expiry, 2_000, 2, "000000000002");
        let r = net.ask(&second);
        assert_eq!((r["t"].clone(), r["39"].clone(), r.get("38")), (json!("0110"), json!("91"), None), "{r}");

        switch.restore();
        let mut answer = Value::Null;
        for _ in 0..100 {
            answer = net.ask(&second);
            if answer["39"] != json!("91") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(answer["39"], json!("00"), "no recovery after storage returned: {answer}");
        // Held once each: the 91 held nothing, the approval after it once.
        assert_eq!(available(&mut c, key, acct).await, (7_000, 3_000, 0));
        let again = net.ask(&second);
        assert_eq!((again["39"].clone(), again["38"].clone()), (json!("00"), answer["38"].clone()));
        assert_eq!(available(&mut c, key, acct).await, (7_000, 3_000, 0));

        // A card row storage holds but rtpay cannot read (edited behind its back): 96, nothing held.
        let out = std::process::Command::new("psql")
            .args([url.as_str(), "-qAtc", "UPDATE cards SET status = 'garbled'"])
            .output()
            .expect("psql (scripts/setup installs PostgreSQL's client)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r = net.ask(&auth(&i.pan, &i.expiry, 500, 3, "000000000003"));
        assert_eq!((r["39"].clone(), r.get("38")), (json!("96"), None), "{r}");
        assert_eq!(available(&mut c, key, acct).await, (7_000, 3_000, 0));
    });
    let (ok, report) = server.verify();
    assert!(ok, "{report}");
}

/// What a reveal shows (a card's number and CVV2, the webhooks' signing secret), and a new
/// credential's secret (a tenant's, an API key's, an OAuth client's), never leaves without its
/// audit entry: one that cannot be recorded answers 503 and shows nothing. (The entry
/// was written after the answer was decided, and a failure to write it only logged.)
#[test]
fn a_reveal_that_cannot_be_recorded_shows_nothing() {
    let url = store::testing::fresh_postgres_database();
    let server = Server::start(&temp_dir("cards-reveal-unrecorded"), Some(&url));
    let rt = runtime();
    let i = rt.block_on(async { issue(&mut server.client(), json!({}), json!({})).await });
    let (tenant_id, tenant_key) = rt.block_on(async { tenant(&mut server.client(), "unrecorded").await });
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    // From here no audit entry can be written; the reads a reveal makes are untouched.
    refuse_inserts(&mut admin, "audit_entries");
    let reveal = format!("/v1/cards/{}/reveal", i.card);
    let made = rt.block_on(async {
        let mut c = server.client();
        let r = c.post(&reveal, &i.key, &json!({})).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(!String::from_utf8_lossy(&r.body).contains(&i.pan[6..]), "{:?}", r.json());
        let r = c.get("/v1/pix/webhook-secret", &i.key).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(r.json().get("secret").is_none());
        // Nor does a new credential's secret. The key is revoked unseen; the tenant, made, is
        // named, so that a key can be made for it later.
        let r = c.post("/v1/tenants", OPERATOR, &json!({"name": "t"})).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(r.json().get("api_key").is_none(), "{:?}", r.json());
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("was created") && detail.contains("revoked"), "{detail}");
        let made = detail.split_whitespace().nth(1).unwrap().to_owned();
        let r = c.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &json!({})).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(r.json().get("secret").is_none(), "{:?}", r.json());
        let r = c.post("/v1/oauth-clients", &tenant_key, &json!({"scopes": ["accounts:read"]})).await.unwrap();
        assert_eq!(r.status, 503, "{:?}", r.json());
        assert!(r.json().get("client_secret").is_none(), "{:?}", r.json());
        made
    });
    allow_inserts(&mut admin, "audit_entries");
    rt.block_on(async {
        let mut c = server.client();
        let r = c.post(&format!("/v1/tenants/{made}/api-keys"), OPERATOR, &json!({})).await.unwrap();
        assert_eq!(r.status, 201, "the tenant the refused creation named: {:?}", r.json());
        let r = c.post(&reveal, &i.key, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["number"].clone()), (200, json!(i.pan)));
        let entries = c.get("/v1/audit?limit=1000", &i.key).await.unwrap().json();
        let reveals: Vec<_> = entries["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"].as_str().unwrap_or("").ends_with(" reveal"))
            .map(|e| e["outcome"].clone())
            .collect();
        assert_eq!(reveals, [json!("200"), json!("200")], "issue's reveal and this one; the refused ones left none");
    });
}

#[test]
fn product_and_card_input_is_checked() {
    let dir = temp_dir("cards-input");
    let server = Server::start(&dir, None);
    runtime().block_on(async {
        let mut c = server.client();
        let (tenant_id, key) = tenant(&mut c, "input").await;
        let acct = account(&mut c, &key, json!({"currency": "BRL"})).await;
        for (body, field) in [
            (json!({"name": "x", "bin": "12345", "currency": "BRL", "network": "visa"}), "bin"),
            (json!({"name": "x", "bin": "123456789", "currency": "BRL", "network": "visa"}), "bin"),
            (json!({"name": "x", "bin": "123456", "currency": "XXX", "network": "visa"}), "currency"),
            (json!({"name": "", "bin": "123456", "currency": "BRL", "network": "visa"}), "name"),
            (
                json!({"name": "x", "bin": "123456", "currency": "BRL", "network": "visa", "limits": {"daily": 0}}),
                "limits.daily",
            ),
        ] {
            let r = c.post("/v1/card-products", &key, &body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{body}");
        }
        let bin = format!("5{:07}", store::now_nanos() % 10_000_000);
        let r = c
            .post(
                "/v1/card-products",
                &key,
                &json!({"name": "x", "bin": bin, "currency": "BRL", "network": "mastercard"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let product = r.json()["id"].as_str().unwrap().to_owned();
        let accounts = || {
            let (ok, report) = server.verify();
            assert!(ok, "{report}");
            report.split(" accounts").next().unwrap().trim_start_matches("ok: ").to_owned()
        };
        let before = accounts();
        // In a currency the tenant has no product in yet: refused before its settlement account
        // is opened, and audited as what it was.
        let r = c
            .post("/v1/card-products", &key, &json!({"name": "y", "bin": bin, "currency": "USD", "network": "visa"}))
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (409, json!("bin")), "BINs are unique");
        assert_eq!(accounts(), before, "nothing was opened");
        let queries = store::Store::open_queries(&store::Location::Embedded(dir.clone())).unwrap();
        let outcomes: Vec<String> = queries
            .audit_entries(0, 1000, None)
            .unwrap()
            .into_iter()
            .filter(|e| e.draft.action == "POST /v1/card-products")
            .map(|e| e.draft.outcome)
            .collect();
        assert_eq!(outcomes, ["422", "422", "422", "422", "422", "201", "409"], "each as the request ended");
        // A creation retried under its Idempotency-Key answers what it made (a product, whose BIN
        // it took; a card, whose number is issued once); other fields under the key: 409.
        let send_to = |path: &'static str, body: &Value, idem: &'static str| {
            let bytes: Option<Bytes> = Some(serde_json::to_vec(body).unwrap().into());
            let key = key.clone();
            let mut c = server.client();
            async move {
                c.send_with_headers(Method::POST, path, Some(&key), bytes, &[("idempotency-key", idem)]).await.unwrap()
            }
        };
        let retried_bin = format!("5{:07}", store::now_nanos() % 10_000_000);
        let gold = json!({"name": "Gold", "bin": retried_bin, "currency": "BRL", "network": "mastercard"});
        let first = send_to("/v1/card-products", &gold, "product-once").await;
        assert_eq!(first.status, 201, "{:?}", first.json());
        let again = send_to("/v1/card-products", &gold, "product-once").await;
        assert_eq!((again.status.as_u16(), again.json()), (200, first.json()));
        let silver = json!({"name": "Silver", "bin": retried_bin, "currency": "BRL", "network": "mastercard"});
        let other = send_to("/v1/card-products", &silver, "product-once").await;
        assert_eq!((other.status.as_u16(), other.json()["field"].clone()), (409, json!("Idempotency-Key")));
        let usd = account(&mut c, &key, json!({"currency": "USD"})).await;
        for (body, field) in [
            (json!({"account_id": acct, "product_id": product, "type": "plastic"}), "type"),
            (json!({"account_id": usd, "product_id": product, "type": "virtual"}), "account_id"),
            (json!({"account_id": uuid(), "product_id": product, "type": "virtual"}), "account_id"),
            (json!({"account_id": acct, "product_id": uuid(), "type": "virtual"}), "product_id"),
            (
                json!({"account_id": acct, "product_id": product, "type": "virtual", "blocked_mccs": ["54"]}),
                "blocked_mccs[0]",
            ),
            (json!({"account_id": acct, "product_id": product, "type": "virtual", "holder_id": uuid()}), "holder_id"),
        ] {
            let r = c.post("/v1/cards", &key, &body).await.unwrap();
            assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (422, json!(field)), "{body}");
        }
        // A card spends its account's money: it is for the account's holder, not another.
        let owner = new_holder(&mut c, &key, "person", "Maria Quitéria", "52998224725").await;
        let stranger = new_holder(&mut c, &key, "person", "Joana Prado", "11144477735").await;
        let owned = account(&mut c, &key, json!({"currency": "BRL", "holder_id": owner})).await;
        let card =
            |holder: &str| json!({"account_id": owned, "product_id": product, "type": "virtual", "holder_id": holder});
        let r = c.post("/v1/cards", &key, &card(&stranger)).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["code"].clone()), (422, json!("holder_mismatch")), "{:?}", r.json());
        assert_eq!(c.post("/v1/cards", &key, &card(&owner)).await.unwrap().status, 201);
        // A retry whose first answer was lost is answered with the card, whatever changed since
        // (its account closed): not refused by the checks of the moment.
        let spare = account(&mut c, &key, json!({"currency": "BRL"})).await;
        let spare_card = json!({"account_id": spare, "product_id": product, "type": "virtual"});
        let made = send_to("/v1/cards", &spare_card, "card-then-close").await;
        assert_eq!(made.status, 201, "{:?}", made.json());
        assert_eq!(c.post(&format!("/v1/accounts/{spare}/close"), &key, &json!({})).await.unwrap().status, 200);
        let again = send_to("/v1/cards", &spare_card, "card-then-close").await;
        assert_eq!((again.status.as_u16(), again.json()["id"].clone()), (200, made.json()["id"].clone()));
        // A physical card waits for activation.
        let r = c
            .post("/v1/cards", &key, &json!({"account_id": acct, "product_id": product, "type": "physical"}))
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (201, json!("inactive")));
        let id = r.json()["id"].as_str().unwrap().to_owned();
        // Blocked before activation, it is unblocked inactive: a block never activates a card.
        let r = c.post(&format!("/v1/cards/{id}/block"), &key, &json!({})).await.unwrap();
        assert_eq!(r.json()["status"], json!("blocked"));
        let r = c.post(&format!("/v1/cards/{id}/unblock"), &key, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (200, json!("inactive")));
        let r = c.post(&format!("/v1/cards/{id}/activate"), &key, &json!({})).await.unwrap();
        assert_eq!(r.json()["status"], json!("active"));
        let r = c.post(&format!("/v1/cards/{id}/block"), &key, &json!({})).await.unwrap();
        assert_eq!(r.json()["status"], json!("blocked"));
        let r = c.post(&format!("/v1/cards/{id}/unblock"), &key, &json!({})).await.unwrap();
        assert_eq!(r.json()["status"], json!("active"), "an active card comes back active");
        let body = json!({"account_id": acct, "product_id": product, "type": "virtual"});
        let send = |body: &Value, idem: &'static str| send_to("/v1/cards", body, idem);
        let first = send(&body, "card-once").await;
        assert_eq!(first.status, 201, "{:?}", first.json());
        let again = send(&body, "card-once").await;
        assert_eq!((again.status.as_u16(), again.json()), (200, first.json()));
        let other = send(&json!({"account_id": acct, "product_id": product, "type": "physical"}), "card-once").await;
        assert_eq!((other.status.as_u16(), other.json()["code"].clone()), (409, json!("exists_with_different_fields")));
        assert_eq!(send(&body, "card-twice").await.status, 201, "another key, another card");
        // Reveal takes its own scope.
        let scopes = json!({"scopes": ["cards:read", "cards:write"]});
        let r = c.post(&format!("/v1/tenants/{tenant_id}/api-keys"), OPERATOR, &scopes).await.unwrap();
        let limited = r.json()["secret"].as_str().unwrap().to_owned();
        assert_eq!(c.get(&format!("/v1/cards/{id}"), &limited).await.unwrap().status, 200);
        let r = c.post(&format!("/v1/cards/{id}/reveal"), &limited, &json!({})).await.unwrap();
        assert_eq!((r.status.as_u16(), r.json()["field"].clone()), (403, json!("cards:reveal")));
        assert!(!String::from_utf8_lossy(&r.body).contains("number"));
        assert_eq!(c.post(&format!("/v1/cards/{id}/fold"), &key, &json!({})).await.unwrap().status, 404);
    });
}

/// A server with a card listener whose holds last 1 s.
fn with_one_second_holds(tag: &str) -> Server {
    let args = ["--iso8583-listen", "127.0.0.1:0", "--card-hold-seconds", "1"];
    Server::start_with_args(&temp_dir(tag), None, "127.0.0.1:0", true, &args)
}

/// A hold counts against the card's limits while it stands, and no more once it lapses (the
/// ledger released it; the authorization says when, `hold_expires_at`). (Before, an approved
/// authorization never captured counted against the month's limit for good.)
#[test]
fn a_lapsed_hold_no_longer_counts_against_the_cards_limits() {
    let server = with_one_second_holds("cards-lapsed");
    let iso = server.iso8583.unwrap();
    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({"limits": {"daily": 3_000, "monthly": 3_000}})).await;
        let mut net = Network::connect(iso);
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 2_500, 1, "000000000001"))["39"], json!("00"));
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 1_000, 2, "000000000002"))["39"], json!("61"), "the hold counts");
        let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), &i.key).await.unwrap();
        let held = r.json()["authorizations"][1].clone();
        assert_eq!(held["status"], json!("approved"), "{held}");
        assert!(held["hold_expires_at"].as_str().is_some_and(|at| at > held["created_at"].as_str().unwrap()), "{held}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while available(&mut c, &i.key, &i.account).await != (10_000, 0, 0) {
            assert!(std::time::Instant::now() < deadline, "the ledger released the hold");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let lapsed = c.get(&format!("/v1/authorizations/{}", held["id"].as_str().unwrap()), &i.key).await.unwrap();
        assert_eq!(lapsed.json()["status"], json!("expired"), "shown as it stands: {:?}", lapsed.json());
        let r = net.ask(&auth(&i.pan, &i.expiry, 2_000, 3, "000000000003"));
        assert_eq!(r["39"], json!("00"), "the lapsed hold no longer counts: {r}");
        assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 1_500, 4, "000000000004"))["39"], json!("61"), "the new one does");
    });
}

#[test]
fn holds_expire_and_malformed_frames_leave_the_listener_working() {
    let server = with_one_second_holds("cards-expiry");
    let iso = server.iso8583.unwrap();
    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({"velocity_per_minute": 8}), json!({})).await;
        let mut net = Network::connect(iso);
        let a = auth(&i.pan, &i.expiry, 2_500, 1, "000000000001");
        assert_eq!(net.ask(&a)["39"], json!("00"));
        assert_eq!(available(&mut c, &i.key, &i.account).await, (7_500, 2_500, 0));
        // The hold lasts 1 s; the writer sweeps for due holds every 0.5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while available(&mut c, &i.key, &i.account).await != (10_000, 0, 0) {
            assert!(std::time::Instant::now() < deadline, "the ledger released the hold");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // The network settles the purchase all the same: its capture is posted on its own.
        let capture = with(a.clone(), json!({"t": "0220", "11": "000002"}));
        assert_eq!(net.ask(&capture)["39"], json!("00"), "an expired hold's capture is collected");
        assert_eq!(available(&mut c, &i.key, &i.account).await, (7_500, 0, 2_500));
        assert_eq!(net.ask(&capture)["39"], json!("00"));
        assert_eq!(available(&mut c, &i.key, &i.account).await, (7_500, 0, 2_500), "a repeat moves nothing");
        let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), &i.key).await.unwrap();
        let record = r.json()["authorizations"][0].clone();
        assert_eq!((record["status"].clone(), record["captured"].clone()), (json!("captured"), json!(2_500)));
        // One the account can no longer cover is acknowledged too, and recorded to reconcile; one
        // reversed after its hold expired is not collected.
        let b = auth(&i.pan, &i.expiry, 6_000, 3, "000000000003");
        assert_eq!(net.ask(&b)["39"], json!("00"));
        let d = auth(&i.pan, &i.expiry, 1_000, 6, "000000000006");
        assert_eq!(net.ask(&d)["39"], json!("00"));
        let e = auth(&i.pan, &i.expiry, 300, 10, "000000000010");
        assert_eq!(net.ask(&e)["39"], json!("00"));
        let g = auth(&i.pan, &i.expiry, 200, 11, "000000000011");
        assert_eq!(net.ask(&g)["39"], json!("00"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while available(&mut c, &i.key, &i.account).await != (7_500, 0, 2_500) {
            assert!(std::time::Instant::now() < deadline, "the ledger released the four holds");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let purchase = with(auth(&i.pan, &i.expiry, 3_000, 4, "000000000004"), json!({"t": "0200"}));
        assert_eq!(net.ask(&purchase)["39"], json!("00"));
        let capture = with(b.clone(), json!({"t": "0220", "11": "000005"}));
        assert_eq!(net.ask(&capture)["39"], json!("00"), "an advice is acknowledged");
        assert_eq!(available(&mut c, &i.key, &i.account).await, (4_500, 0, 5_500), "nothing collected");
        let r = c.get(&format!("/v1/cards/{}/authorizations", i.card), &i.key).await.unwrap();
        let all = r.json()["authorizations"].as_array().unwrap().clone();
        let record = all.iter().find(|a| a["rrn"] == json!("000000000003")).unwrap();
        assert_eq!(record["status"], json!("expired"), "{record}");
        assert!(record["reasons"].to_string().contains("6000 not collected"), "{record}");
        // Funded again, the account pays the next advice of it.
        let bank = account(&mut c, &i.key, json!({"currency": "BRL"})).await;
        let fund = json!({"id": uuid(), "debit_account_id": bank, "credit_account_id": i.account, "amount": 2_000});
        assert_eq!(c.post("/v1/transfers", &i.key, &fund).await.unwrap().status, 201);
        let again = with(b, json!({"t": "0220", "11": "000007"}));
        assert_eq!(net.ask(&again)["39"], json!("00"));
        assert_eq!(available(&mut c, &i.key, &i.account).await, (500, 0, 11_500), "collected this time");
        let reversal = with(d.clone(), json!({"t": "0400", "11": "000008"}));
        assert_eq!(net.ask(&reversal)["39"], json!("00"));
        assert_eq!(net.ask(&with(d, json!({"t": "0220", "11": "000009"})))["39"], json!("05"));
        assert_eq!(
            available(&mut c, &i.key, &i.account).await,
            (500, 0, 11_500),
            "a reversed purchase is not collected"
        );
        // Reversed in part after its hold expired (DE95: 100 of 300 happened): its advice
        // collects what did happen.
        let replaced = |actual: u64| format!("{actual:012}{}", "0".repeat(30));
        assert_eq!(
            net.ask(&with(e.clone(), json!({"t": "0400", "11": "000012", "95": replaced(100)})))["39"],
            json!("00")
        );
        let capture = with(e, json!({"t": "0220", "11": "000013", "4": format!("{:012}", 100)}));
        assert_eq!(net.ask(&capture)["39"], json!("00"));
        assert_eq!(available(&mut c, &i.key, &i.account).await, (400, 0, 11_600));
        // Reversed in part, then in full: nothing is collected after.
        assert_eq!(
            net.ask(&with(g.clone(), json!({"t": "0400", "11": "000014", "95": replaced(150)})))["39"],
            json!("00")
        );
        assert_eq!(net.ask(&with(g.clone(), json!({"t": "0400", "11": "000015"})))["39"], json!("00"));
        assert_eq!(net.ask(&with(g, json!({"t": "0220", "11": "000016"})))["39"], json!("05"));
        assert_eq!(
            available(&mut c, &i.key, &i.account).await,
            (400, 0, 11_600),
            "a reversed purchase is not collected"
        );

        // Malformed frames on their own connections: a format error (DE39 30) when the type can be
        // read, else the connection closes. Every time, the listener goes on.
        let cases: [(&str, &[u8], Option<&str>); 5] = [
            ("unknown MTI", b"0300000000000000000000", Some("0310")),
            ("bad bitmap", b"0100ZZ00000000000000", Some("0110")),
            ("truncated field", b"0100400000000000000016411111", Some("0110")),
            ("non-ASCII", b"0100\xff\xfe000000000000000000", Some("0110")),
            ("garbage MTI", b"\x00\x01garbage-garbage!!", None),
        ];
        for (what, body, answer) in cases {
            let mut raw = Network::connect(iso);
            let mut framed = (body.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(body);
            raw.command(json!({"op": "raw", "hex": hex(&framed)}));
            let got = raw.command(json!({"op": "recv", "n": 1}));
            match answer {
                Some(mti) => {
                    let m = &got["messages"][0];
                    assert_eq!((m["t"].clone(), m["39"].clone()), (json!(mti), json!("30")), "{what}: {got}");
                }
                None => assert_eq!(got["closed"], json!(true), "{what}: {got}"),
            }
        }
        // A malformed message that asks for no answer (an 0810, a 1100 of another version) gets
        // none, and the connection goes on. (It was closed.)
        for body in [&b"0810ZZ00000000000000"[..], b"1100ZZ00000000000000"] {
            let mut raw = Network::connect(iso);
            let mut framed = (body.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(body);
            raw.command(json!({"op": "raw", "hex": hex(&framed)}));
            let r = raw.ask(&json!({"t": "0800", "7": "1122093000", "11": "000010", "70": "301"}));
            assert_eq!((r["t"].clone(), r["39"].clone()), (json!("0810"), json!("00")), "{r}");
        }
        // A zero length closes the connection.
        let mut zero = Network::connect(iso);
        zero.command(json!({"op": "raw", "hex": "0000"}));
        assert_eq!(zero.command(json!({"op": "recv", "n": 1}))["closed"], json!(true));
        // The first connection was never disturbed.
        let r = net.ask(&json!({"t": "0800", "7": "1122093000", "11": "000009", "70": "301"}));
        assert_eq!(r["39"], json!("00"));
        // Velocity: the product allows 8 authorizations a minute (6 made above); the 9th is
        // suspected fraud.
        for n in 0..2u32 {
            assert_eq!(net.ask(&auth(&i.pan, &i.expiry, 10, 60 + n, &format!("{:012}", 60 + n)))["39"], json!("00"));
        }
        let r = net.ask(&auth(&i.pan, &i.expiry, 10, 70, "000000000070"));
        assert_eq!(r["39"], json!("59"), "{r}");
    });
}

/// The listener holds at most `CONNECTIONS_PER_ADDRESS_MAX` connections from one address (one more is closed at once, and
/// taken again once one ends); a well-formed request of a type not handled gets a format error
/// the network can match, and a message asking for no answer gets none, the connection going on;
/// answers echo no expiry date and no private field that may carry a CVV2, in the answer as in the
/// stored one a repeat gets. (Before, connections were unbounded; an 0300's answer carried no
/// STAN; an 0810 closed the connection; DE14 and DE48 were echoed.)
#[test]
fn the_card_listener_bounds_its_connections_and_answers_what_it_does_not_handle() {
    use std::io::Read;
    let server = Server::start_with_args(
        &temp_dir("cards-bounds"),
        None,
        "127.0.0.1:0",
        true,
        &["--iso8583-listen", "127.0.0.1:0"],
    );
    let iso = server.iso8583.unwrap();
    let echo = json!({"t": "0800", "7": "1206093000", "11": "000001", "70": "001"});
    let mut idle: Vec<std::net::TcpStream> =
        (0..server::iso8583::CONNECTIONS_PER_ADDRESS_MAX).map(|_| std::net::TcpStream::connect(iso).unwrap()).collect();
    let mut extra = std::net::TcpStream::connect(iso).unwrap();
    extra.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    assert_eq!(extra.read(&mut [0u8; 16]).unwrap(), 0, "one connection more is closed at once");
    idle.pop();
    let mut answered = None;
    for _ in 0..50 {
        let mut net = Network::connect(iso);
        let got = net.try_command(json!({"op": "send", "msg": echo}));
        let got = if got.get("error").is_some() { got } else { net.try_command(json!({"op": "recv", "n": 1})) };
        if let Some(m) = got["messages"].as_array().and_then(|m| m.first()) {
            answered = Some((m.clone(), net));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (first, mut net) = answered.expect("a connection is taken again once one ends");
    assert_eq!(first["39"], json!("00"));
    drop(idle);

    let other = json!({"t": "0300", "3": "000000", "11": "000123", "37": "000000000123", "41": "TERM0001"});
    let r = net.ask(&other);
    assert_eq!(
        (r["t"].clone(), r["39"].clone(), r["11"].clone(), r["37"].clone(), r["41"].clone()),
        (json!("0310"), json!("30"), json!("000123"), json!("000000000123"), json!("TERM0001")),
        "{r}"
    );
    net.send(&json!({"t": "0810", "11": "000124", "39": "00", "70": "001"}));
    let r = net.ask(&echo);
    assert_eq!(
        (r["t"].clone(), r["11"].clone(), r["39"].clone(), r["70"].clone()),
        (json!("0810"), json!("000001"), json!("00"), json!("001")),
        "the connection goes on, with no answer to the 0810, and the echo's answer names its function: {r}"
    );

    runtime().block_on(async {
        let mut c = server.client();
        let i = issue(&mut c, json!({}), json!({})).await;
        let a = with(auth(&i.pan, &i.expiry, 100, 200, "000000000200"), json!({"48": "92CVC2123"}));
        let r = net.ask(&a);
        assert_eq!(r["39"], json!("00"), "{r}");
        assert!(r.get("14").is_none() && r.get("48").is_none(), "{r}");
        assert_eq!((r["11"].clone(), r["4"].clone()), (a["11"].clone(), a["4"].clone()));
        let repeat = net.ask(&with(a, json!({"t": "0101"})));
        assert_eq!(repeat["38"], r["38"], "{repeat}");
        assert!(repeat.get("14").is_none() && repeat.get("48").is_none(), "{repeat}");

        // Each message is counted by its MTI and the code answered; the approved volume once.
        let text = metrics_with(&mut c, "rtpay_card_messages_total").await;
        let count = |labels: &str| sample(&text, &format!("rtpay_card_messages_total{{{labels}}}"));
        assert_eq!(count(r#"mti="0100",response_code="00""#), Some(1.0), "{text}");
        assert_eq!(count(r#"mti="0101",response_code="00""#), Some(1.0));
        assert_eq!(count(r#"mti="other",response_code="30""#), Some(1.0));
        assert!(count(r#"mti="0800",response_code="00""#) >= Some(2.0));
        assert_eq!(sample(&text, "rtpay_card_approved_amount_minor_total"), Some(100.0));
        assert!(sample(&text, "rtpay_card_message_duration_seconds_count") >= Some(5.0), "{text}");
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// With a certificate, the card listener speaks TLS and, with a client CA, admits only a network
/// presenting a certificate from it that names the card network: no certificate, another CA's,
/// one of the CA's naming a tenant, or plain TCP get no answer.
/// `--iso8583-plain` keeps plain TCP (a link encrypted below it). The network here is Python's
/// `ssl` with pyiso8583.
#[test]
fn the_card_listener_speaks_tls_and_admits_the_networks_certificate_only() {
    let certs = temp_dir("cards-tls-certs");
    let file = |name: &str, text: &str| {
        let path = certs.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let authority = TestCa::new("rtpay test CA");
    let (server_cert, server_key) = authority.issue(&["localhost"], &[]);
    let (client_cert, client_key) = authority.issue(&[], &["urn:rtpay:card-network"]);
    let (tenant_cert, tenant_key) = authority.issue(&[], &["urn:rtpay:tenant:0195c3a0-0000-7000-8000-000000000001"]);
    let (foreign_cert, foreign_key) = TestCa::new("someone else").issue(&[], &[]);
    let ca = file("ca.pem", &authority.pem());
    let (cert, key) = (file("server.pem", &server_cert), file("server.key", &server_key));
    let (network_cert, network_key) = (file("network.pem", &client_cert), file("network.key", &client_key));
    let (foreign_cert, foreign_key) = (file("foreign.pem", &foreign_cert), file("foreign.key", &foreign_key));
    let (tenant_cert, tenant_key) = (file("tenant.pem", &tenant_cert), file("tenant.key", &tenant_key));
    let echo = json!({"t": "0800", "7": "1206093000", "11": "000001", "70": "001"});
    let echoed = |answer: &Value| (answer["t"].clone(), answer["39"].clone()) == (json!("0810"), json!("00"));
    // Whatever a refused peer gets: an error, or a closed connection, never an answer.
    let refused = |mut peer: Network| {
        let sent = peer.try_command(json!({"op": "send", "msg": echo}));
        let got = if sent.get("error").is_some() { sent } else { peer.try_command(json!({"op": "recv", "n": 1})) };
        assert!(got.get("error").is_some() || got["closed"] == json!(true), "{got}");
        assert!(got["messages"].as_array().is_none_or(Vec::is_empty), "{got}");
    };
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca, "--iso8583-listen", "127.0.0.1:0"];

    let server = Server::start_with_args(&temp_dir("cards-tls"), None, "127.0.0.1:0", true, &tls);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    let mut network = Network::connect_tls(iso, &ca, Some((&network_cert, &network_key)));
    let answer = network.ask(&echo);
    assert!(echoed(&answer), "{answer}");
    refused(Network::connect_tls(iso, &ca, None));
    refused(Network::connect_tls(iso, &ca, Some((&foreign_cert, &foreign_key))));
    refused(Network::connect_tls(iso, &ca, Some((&tenant_cert, &tenant_key))));
    refused(Network::connect(iso));
    // The listener goes on serving the network.
    assert!(echoed(&network.ask(&echo)));
    drop(network);
    drop(server);

    let plain: Vec<&str> = tls.iter().copied().chain(["--iso8583-plain"]).collect();
    let server = Server::start_with_args(&temp_dir("cards-tls-plain"), None, "127.0.0.1:0", true, &plain);
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    let answer = Network::connect(iso).ask(&echo);
    assert!(echoed(&answer), "{answer}");
}

/// A peer that sends and never reads cannot hold its connection, and the messages in flight on
/// it, for good: once an answer has waited 30 s for the peer to take it, the connection closes.
/// (It waited for ever: the answers filled the queue, the messages waited for room in it, and the
/// reading loop for their slots.)
#[test]
fn a_peer_that_never_reads_its_answers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start_with_args(
        &temp_dir("cards-no-reader"),
        None,
        "127.0.0.1:0",
        true,
        &["--iso8583-listen", "127.0.0.1:0"],
    );
    let iso = server.iso8583.expect("the ISO 8583 listener's address is printed");
    runtime().block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(iso).await.unwrap();
        let mut echo = cards::iso8583::Message::new("0800");
        echo.set(7, "1206093000").set(11, "000001").set(70, "001");
        let burst = cards::iso8583::frame(&echo.encode().unwrap()).repeat(1000);
        // Echo tests until the server stops reading: its answers wait for this peer.
        let started = std::time::Instant::now();
        while tokio::time::timeout(std::time::Duration::from_secs(2), stream.write_all(&burst)).await.is_ok() {
            assert!(started.elapsed() < std::time::Duration::from_secs(120), "the server went on reading");
        }
        tokio::time::sleep(server::iso8583::WRITE_TIMEOUT + std::time::Duration::from_secs(5)).await;
        // Taken now, the answers come until the server's end: it closed the connection.
        let mut sink = vec![0u8; 1 << 16];
        let drained = tokio::time::timeout(std::time::Duration::from_secs(15), async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "the connection was still open after the write time-out");
    });
}
