//! Cards as the server keeps them, and the network's messages answered: products (with their card
//! verification keys, sealed), cards (numbers sealed, found by blind index), and each ISO 8583
//! request turned into ledger work — a hold for an authorization, its post for a capture, its void
//! or a reversing transfer for a reversal, a credit for a refund.
//!
//! Money moves between the cardholder's account and the tenant's card settlement account for the
//! currency (what the tenant owes the card network). Every ledger id is derived from the message's
//! identity, and every answer is stored by it, so a repeated message moves nothing and gets the
//! same answer.

use cards::iso8583::Message;
use cards::{CardStatus, Decision, ResponseCode};
use ledger::{AccountId, AccountKey, Currency, EventKind, TransferEvent, TransferId, TransferKey, TransferResult};
use serde::{Deserialize, Serialize};

use crate::dto::{civil_date, nanos_of_date, uuid_string};
use crate::routes::ReadsOwed;
use crate::vault_service::VaultFailure;
use crate::AppState;

/// How holds and over-captures are treated; `rtpay serve --card-hold-seconds` and
/// `--card-capture-tolerance`.
#[derive(Clone, Copy, Debug)]
pub struct CardSettings {
    /// An approved authorization's hold is released by the ledger after this long.
    pub hold_seconds: u32,
    /// A capture may exceed its hold by up to this percentage (tips); above it, 61.
    pub capture_tolerance_percent: u32,
}

impl Default for CardSettings {
    fn default() -> CardSettings {
        CardSettings { hold_seconds: 7 * 24 * 3600, capture_tolerance_percent: 20 }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
// Named apart from the Pix limits (`pix_rail::LimitsBody`): one schema name for both made the
// document describe a card's limits with the Pix fields.
#[schema(as = CardLimits)]
pub struct LimitsBody {
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub per_transaction: Option<u64>,
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub daily: Option<u64>,
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub monthly: Option<u64>,
}

impl From<LimitsBody> for cards::Limits {
    fn from(l: LimitsBody) -> cards::Limits {
        cards::Limits { per_transaction: l.per_transaction, daily: l.daily, monthly: l.monthly }
    }
}

/// A product as stored (`card_products.body`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredProduct {
    pub name: String,
    pub bin: String,
    pub currency: String,
    pub network: String,
    pub limits: LimitsBody,
    pub velocity_per_minute: u32,
    /// CVK A || CVK B, sealed under the tenant's data key (base64).
    pub cvk_sealed: String,
    pub settlement_account_id: String,
    /// RFC 3339. (Stored texts hold no long digit runs: a card-number scan of storage stays
    /// meaningful.)
    pub created_at: String,
}

/// A card as stored (`cards.body`); the number only sealed.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredCard {
    pub product_id: String,
    pub account_id: String,
    pub holder_id: Option<String>,
    pub kind: String,
    pub bin: String,
    pub last4: String,
    /// `YYMM`.
    pub expiry: String,
    pub limits: LimitsBody,
    pub blocked_mccs: Vec<String>,
    pub ecommerce: bool,
    /// Sealed under the tenant's data key (base64).
    pub pan_sealed: String,
    /// RFC 3339.
    pub created_at: String,
    /// Blocked while inactive: an unblock gives it back inactive (see `cards::CardStatus::after`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked_inactive: bool,
}

/// One step in an authorization's life.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct AuthorizationEvent {
    /// `authorization`, `capture`, `reversal`, `refund`, `purchase`.
    pub kind: String,
    pub mti: String,
    pub amount: u64,
    pub response_code: String,
    /// Ledger transfers this step made (the hold, its post or void, an extra or reversing one).
    pub transfer_ids: Vec<String>,
    pub at: String,
}

/// An authorization as stored (`card_authorizations.body`) and shown.
#[derive(Serialize, Deserialize, Clone, Debug, utoipa::ToSchema)]
pub struct AuthorizationView {
    pub id: String,
    pub card_id: String,
    pub account_id: String,
    /// `approved`, `declined`, `captured`, `reversed`, `refunded`, `expired`, `unposted`,
    /// `verified` (a zero-amount account verification: nothing held).
    pub status: String,
    /// It credits the cardholder (a refund, DE3 `20`, or another credit type): nothing is held
    /// for it and no limit counts it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub credit: bool,
    /// DE3 of the message that made it (absent on records of versions before it was kept, which
    /// took every 0100 for a purchase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_code: Option<String>,
    pub amount: u64,
    pub currency: String,
    pub response_code: String,
    pub auth_code: Option<String>,
    /// Why it was declined (empty when approved).
    pub reasons: Vec<String>,
    pub stan: String,
    pub rrn: String,
    /// DE32, the acquiring institution, when the message named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquirer: Option<String>,
    /// DE41, the card acceptor's terminal, when the message named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<String>,
    /// DE7, the transmission date and time (`MMDDhhmmss`), when the message named one and was no
    /// repeat: with the STAN, what a reversal's DE90 names its original by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmitted: Option<String>,
    pub mcc: Option<String>,
    /// The pending ledger transfer holding the funds.
    pub hold_id: Option<String>,
    /// When that hold lapses (the ledger releases it), as placed: from then on the authorization
    /// no longer counts against the card's limits. Absent on records of versions before it was
    /// kept (their lapse was taken from their hold when storage migrated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_expires_at: Option<String>,
    pub captured: u64,
    pub reversed: u64,
    pub events: Vec<AuthorizationEvent>,
    pub created_at: String,
}

/// The card number's record identity (associated data when sealed).
pub fn pan_record(tenant: u128, card: u128) -> Vec<u8> {
    format!("card:{}:{}:pan", uuid_string(tenant), uuid_string(card)).into_bytes()
}

pub fn cvk_record(tenant: u128, product: u128) -> Vec<u8> {
    format!("card-product:{}:{}:cvk", uuid_string(tenant), uuid_string(product)).into_bytes()
}

/// The tenant's card settlement account for `currency`.
pub fn settlement_account(state: &AppState, tenant: u128, currency: &str) -> u128 {
    state.keys.derived_id(b"card-settlement", tenant, currency).as_u128()
}

fn response_mti(mti: &str) -> Option<String> {
    let b = mti.as_bytes();
    if b.len() != 4 || b[0] != b'0' || !(b[2] == b'0' || b[2] == b'2') {
        return None;
    }
    // A repeat's answer is the original's: 0421 → 0430.
    let origin = first_sent(b[3]);
    Some(format!("{}{}{}{}", b[0] as char, b[1] as char, (b[2] + 1) as char, origin as char))
}

/// The message origin of a message's first sending: a repeat (`1`, `3`) is its original (`0`,
/// `2`) sent again.
fn first_sent(origin: u8) -> u8 {
    match origin {
        b'1' => b'0',
        b'3' => b'2',
        other => other,
    }
}

/// Whether a message and an authorization come from one origin: an RRN, or a STAN, is unique only
/// among one acquirer's, or one terminal's, messages, so where both name an acquirer (DE32) or a
/// terminal (DE41), they must be the same.
fn same_origin(request: &Message, v: &AuthorizationView) -> bool {
    let same = |mine: Option<&str>, theirs: &Option<String>| match (mine, theirs) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    same(request.get(32), &v.acquirer) && same(request.get(41), &v.terminal)
}

/// The MTI of the message `mti` repeats (itself if it is no repeat): 0421 → 0420.
fn original_mti(mti: &str) -> String {
    let mut b = mti.as_bytes().to_vec();
    if let Some(last) = b.last_mut() {
        *last = first_sent(*last);
    }
    String::from_utf8(b).unwrap_or_default()
}

/// The request's fields an answer echoes: what identifies the transaction and its amounts to the
/// network. Only these: a field not named here may carry what must never leave or be kept (the
/// expiry date DE14, an extended card number DE34, track data DE35/36/45, DE48's and DE126's
/// CVV2/CVC2 on some networks, the PIN block DE52, chip data DE55). Answers are stored for
/// repeats, so what they echo is kept too. (Before, every field but a few was echoed.) DE70 names
/// the network-management function an 0810 answers. The private-use fields (DE60–63) are not
/// echoed: some processors carry the CVV2 there too.
const ECHOED: [u8; 35] = [
    2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 18, 19, 22, 23, 24, 25, 28, 32, 33, 37, 41, 42, 43, 49, 50, 51, 70,
    90, 95, 100, 102, 103,
];

/// The answer to `request`: the [`ECHOED`] fields it has, the response code, and the
/// authorization code when approved.
fn answer(request: &Message, code: ResponseCode, auth_code: Option<&str>) -> Message {
    let mti = response_mti(&request.mti).unwrap_or_else(|| "0810".into());
    let mut out = Message::new(&mti);
    for (n, v) in request.fields() {
        if ECHOED.contains(&n) {
            out.set(n, v);
        }
    }
    if let Some(a) = auth_code {
        out.set(38, a);
    }
    out.set(39, code.code());
    out
}

/// The answer to a frame that is not a well-formed message: a format error when its MTI can be
/// read and asks for an answer; nothing to send when it asks for none (a response, a message of
/// another version), the connection going on as for a well-formed one; `None` when the MTI
/// cannot be read (the connection is closed).
pub fn format_error(frame: &[u8]) -> Option<Vec<u8>> {
    let mti = std::str::from_utf8(frame.get(..4)?).ok()?;
    if !mti.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let Some(answer_mti) = response_mti(mti) else { return Some(Vec::new()) };
    let mut out = Message::new(&answer_mti);
    out.set(39, ResponseCode::FormatError.code());
    out.encode().ok()
}

/// Answers one frame; `None`: close the connection; an empty answer: nothing to send (a
/// well-formed message that asks for no answer), the connection goes on.
pub async fn handle(state: &AppState, frame: &[u8]) -> Option<Vec<u8>> {
    let started = std::time::Instant::now();
    let message = match Message::decode(frame) {
        Ok(m) => m,
        Err(why) => {
            tracing::info!(%why, "ISO 8583 format error");
            state.metrics.observe_card_message("unreadable", ResponseCode::FormatError.code(), 0);
            return format_error(frame);
        }
    };
    let reply = match message.mti.as_str() {
        "0800" => answer(&message, ResponseCode::Approved, None),
        // Each also as a repeat (0101, 0421, ...): the acquirer sending it again, unanswered.
        "0100" | "0120" | "0200" | "0220" | "0400" | "0420" | "0101" | "0121" | "0201" | "0221" | "0401" | "0421" => {
            // Reads made before the message's own commit owe nothing once it is durable; an
            // answer given without one (a stored answer, a refusal) waits for what they saw.
            let owed = ReadsOwed::default();
            let reply = match Flow::new(state, &message, &owed).await {
                Ok(flow) => flow.run().await,
                Err(code) => answer(&message, code, None),
            };
            match owed.settle().await {
                Ok(()) => reply,
                Err(_) => answer(&message, ResponseCode::IssuerUnavailable, None),
            }
        }
        // A well-formed request of a type not handled: a format error the network can match
        // (its STAN, RRN and terminal echoed). A message that asks no answer (a response, an
        // 0810 say) gets none, and the connection goes on.
        other => {
            tracing::info!(mti = other, "ISO 8583 message type not handled");
            if response_mti(other).is_none() {
                return Some(Vec::new());
            }
            answer(&message, ResponseCode::FormatError, None)
        }
    };
    let code = reply.get(39).unwrap_or("");
    state.metrics.observe_card_message(&message.mti, code, started.elapsed().as_micros() as u64);
    // Repeats (0101, 0201) are the same transaction: its volume counts once.
    if code == ResponseCode::Approved.code() && matches!(message.mti.as_str(), "0100" | "0200") {
        let amount = message.get(4).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
        state.metrics.card_approved_minor.fetch_add(amount, std::sync::atomic::Ordering::Relaxed);
    }
    match reply.encode() {
        Ok(bytes) => Some(bytes),
        Err(why) => {
            tracing::error!(%why, "an ISO 8583 answer could not be encoded");
            format_error(frame)
        }
    }
}

/// Stripes of locks by card: a card's messages are taken one at a time on a node, from reading
/// what they refer to (the authorization, the card's spending) to their commit. Without it two
/// messages on one card read the same state: two reversals of one purchase both found it
/// captured, a burst of authorizations all found nothing spent against the card's limits, and a
/// capture refused after a concurrent reversal wrote its stale view back over the reversal's.
/// Across the nodes of a cluster, a step commits only while the authorization is still as it was
/// read (`store::Guard::Authorization`, checked under the writers' common lock); one that lost
/// to another node's step applies nothing and is decided again on what won. (The ledger would
/// move the money once anyway, the ids of a step's transfers coming from the authorization, but
/// the loser wrote its stale record over the winner's: a captured purchase left "approved".)
pub struct CardLocks(Vec<tokio::sync::Mutex<()>>);

const CARD_LOCK_STRIPES: usize = 256;

impl Default for CardLocks {
    fn default() -> Self {
        CardLocks((0..CARD_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect())
    }
}

impl CardLocks {
    async fn lock(&self, card: u128) -> tokio::sync::MutexGuard<'_, ()> {
        self.0[(card % CARD_LOCK_STRIPES as u128) as usize].lock().await
    }
}

/// One request on its way through: the card found, the message identified. Owned, so that what
/// the writer runs inside the batch (making the records from the ledger's answer) can hold it.
struct Ctx {
    request: Message,
    tenant: u128,
    card_id: u128,
    card: StoredCard,
    status: CardStatus,
    /// The message's identity: HMAC over the fields that make it this message.
    key: [u8; 32],
    amount: u64,
    currency: u16,
    auth_code: String,
    keys: std::sync::Arc<crate::auth::Keys>,
    /// The stored answer (sealed), when this message was answered before.
    answered: Option<Vec<u8>>,
    /// The tenant's data key: stored answers are sealed under it.
    dek: std::sync::Arc<vault::Secret32>,
    /// How long a hold stands (`--card-hold-seconds`).
    hold_seconds: u32,
}

/// Why a step gave no answer of its own.
enum Failed {
    /// Answered with this code, nothing recorded.
    Code(ResponseCode),
    /// The authorization the step was decided on changed (on another node: on this one the
    /// card's lock keeps steps apart) before the step's commit, which applied nothing: decide
    /// again on what is stored now.
    Raced,
}

impl From<ResponseCode> for Failed {
    fn from(code: ResponseCode) -> Self {
        Failed::Code(code)
    }
}

type Step = Result<Message, Failed>;

/// How many times a message is decided again after losing a race before it is answered 91: each
/// loss means another node's step on the card committed meanwhile.
const RACES_MAX: usize = 8;

/// A step's records and its answer, made from the ledger's result.
struct Concluded {
    records: Vec<store::Record>,
    reply: Message,
}

struct Flow<'a> {
    state: &'a AppState,
    ctx: std::sync::Arc<Ctx>,
    /// The durability waits of the flow's reads, owed until its commit.
    owed: &'a ReadsOwed,
}

fn field(m: &Message, n: u8) -> Result<&str, ResponseCode> {
    m.get(n).ok_or(ResponseCode::FormatError)
}

fn digits(text: &str) -> Result<u64, ResponseCode> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ResponseCode::FormatError);
    }
    text.parse().map_err(|_| ResponseCode::FormatError)
}

impl Ctx {
    /// A ledger id derived from this message (and `purpose`): the same message, the same id.
    fn transfer_id(&self, purpose: &str) -> u128 {
        let mut input = self.key.to_vec();
        input.extend_from_slice(purpose.as_bytes());
        let digest = self.keys.mac(b"card-transfer", &input);
        u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
    }

    /// A ledger id derived from the authorization `view` (and `purpose`): whichever message
    /// captures or reverses it (an 0400 and its 0420 repeat, say, even on two nodes), the same
    /// id, so the ledger applies the step once. The count of the authorization's steps that
    /// failed is part of it: the ledger keeps a failure under its id for good, and a capture or
    /// reversal refused for want of funds may succeed when tried again later.
    fn step_id(&self, view: &AuthorizationView, purpose: &str) -> u128 {
        let failed = view.events.iter().filter(|e| e.response_code != ResponseCode::Approved.code()).count();
        let digest = self.keys.mac(b"card-step", format!("{}:{purpose}:{failed}", view.id).as_bytes());
        u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
    }

    fn account(&self) -> Result<u128, ResponseCode> {
        uuid::Uuid::parse_str(&self.card.account_id).map(|u| u.as_u128()).map_err(|_| ResponseCode::SystemMalfunction)
    }

    fn event(&self, id: u128, kind: EventKind) -> TransferEvent {
        TransferEvent {
            key: TransferKey { tenant: ledger::TenantId(self.tenant), id: TransferId(id) },
            kind,
            code: crate::dto::CARD_CODE,
            metadata: None,
            linked: false,
        }
    }

    /// The basis of a step that makes a new authorization: none is stored under its id yet.
    fn fresh(&self, view: &AuthorizationView) -> store::Guard {
        let id = uuid::Uuid::parse_str(&view.id).map(|u| u.as_u128()).unwrap_or_default();
        store::Guard::Authorization { tenant_id: self.tenant, id, body: None }
    }

    /// A hold of `amount`, `debit` → `credit`, for `--card-hold-seconds`.
    fn hold(&self, debit: AccountId, credit: AccountId, amount: u64) -> EventKind {
        EventKind::Pending { debit, credit, amount, timeout_seconds: self.hold_seconds }
    }

    /// When a hold placed at `now` lapses (`--card-hold-seconds` on).
    fn hold_expiry(&self, now: u64) -> String {
        crate::dto::rfc3339(now.saturating_add(u64::from(self.hold_seconds) * 1_000_000_000))
    }

    fn new_view(&self, currency: Currency, now: u64) -> AuthorizationView {
        AuthorizationView {
            id: uuid_string(self.transfer_id("hold")),
            card_id: uuid_string(self.card_id),
            account_id: self.card.account_id.clone(),
            status: "declined".into(),
            credit: false,
            processing_code: self.request.get(3).map(str::to_owned),
            amount: self.amount,
            currency: currency.as_str().to_owned(),
            response_code: String::new(),
            auth_code: None,
            reasons: vec![],
            stan: self.request.get(11).unwrap_or("").to_owned(),
            rrn: self.request.get(37).unwrap_or("").to_owned(),
            acquirer: self.request.get(32).map(str::to_owned),
            terminal: self.request.get(41).map(str::to_owned),
            // A repeat (0101) may carry a renewed DE7, not the original's that DE90 names.
            transmitted: (original_mti(&self.request.mti) == self.request.mti)
                .then(|| self.request.get(7).map(str::to_owned))
                .flatten(),
            mcc: self.request.get(18).map(str::to_owned),
            hold_id: None,
            hold_expires_at: None,
            captured: 0,
            reversed: 0,
            events: vec![],
            created_at: crate::dto::rfc3339(now),
        }
    }

    /// The step recorded on the authorization, the answer, and the records that keep both.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        mut view: AuthorizationView,
        created_at: u64,
        kind: &str,
        code: ResponseCode,
        auth_code: Option<String>,
        transfers: Vec<u128>,
        reasons: Vec<String>,
    ) -> Concluded {
        if view.events.is_empty() {
            view.response_code = code.code().to_owned();
            view.reasons = reasons;
        } else {
            view.reasons.extend(reasons);
        }
        view.events.push(AuthorizationEvent {
            kind: kind.to_owned(),
            mti: self.request.mti.clone(),
            amount: self.amount,
            response_code: code.code().to_owned(),
            transfer_ids: transfers.iter().map(|t| uuid_string(*t)).collect(),
            at: crate::dto::rfc3339(store::now_nanos()),
        });
        let reply = answer(&self.request, code, auth_code.as_deref());
        let stored = self.stored(&reply);
        let spend = match view.status.as_str() {
            _ if view.credit => 0,
            "approved" => view.amount,
            "captured" => view.captured,
            _ => 0,
        };
        let id = uuid::Uuid::parse_str(&view.id).map(|u| u.as_u128()).unwrap_or_default();
        // A hold standing stops counting once it lapses (nothing else tells the record so).
        let held_until = match (&view.hold_id, &view.hold_expires_at) {
            (Some(_), Some(at)) if view.status == "approved" && !view.credit => {
                crate::routes::api_pix::parse_date_time(at).unwrap_or(0)
            }
            _ => 0,
        };
        let row = store::AuthorizationRow {
            tenant_id: self.tenant,
            id,
            card_id: self.card_id,
            rrn: view.rrn.clone(),
            created_at,
            spend,
            held_until,
            body: serde_json::to_string(&view).expect("serializable"),
        };
        Concluded { records: vec![store::Record::Authorization { row, message: stored }], reply }
    }

    /// `reply` as stored: sealed and without the card number (a replay puts the request's back).
    fn stored(&self, reply: &Message) -> Option<([u8; 32], Vec<u8>)> {
        let mut stored = reply.clone();
        stored.remove(2);
        stored.encode().ok().and_then(|b| vault::seal(&self.dek, &self.key, &b).ok()).map(|s| (self.key, s))
    }

    /// `concluded`, its step recorded as refused, answered `00` all the same: an advice is
    /// acknowledged whatever the ledger said. (Recorded as refused, the step counts among the
    /// authorization's failures, so that trying it again later takes a new ledger id: see
    /// `step_id`.)
    fn acknowledged(&self, mut concluded: Concluded) -> Concluded {
        concluded.reply = answer(&self.request, ResponseCode::Approved, None);
        let stored = self.stored(&concluded.reply);
        for record in &mut concluded.records {
            if let store::Record::Authorization { message, .. } = record {
                *message = stored.clone();
            }
        }
        concluded
    }
}

impl<'a> Flow<'a> {
    async fn new(state: &'a AppState, request: &'a Message, owed: &'a ReadsOwed) -> Result<Flow<'a>, ResponseCode> {
        let vault = state.vault.clone().ok_or(ResponseCode::IssuerUnavailable)?;
        let pan = field(request, 2)?;
        let (stan, rrn) = (field(request, 11)?, field(request, 37)?);
        let amount = digits(field(request, 4)?)?;
        let currency = digits(field(request, 49)?)? as u16;
        digits(field(request, 3)?)?;
        if !cards::pan::valid(pan) {
            return Err(ResponseCode::InvalidCard);
        }
        let index = vault.index().of(b"pan", pan.as_bytes());
        // A message and its repeats are one: the MTI as first sent, and not the transmission's
        // date and time (DE7), which a retransmission may renew; the transaction's local time
        // and date (DE12, DE13) instead.
        let mti = original_mti(&request.mti);
        let mut identity = Vec::with_capacity(96);
        let (terminal, time, date) =
            (request.get(41).unwrap_or(""), request.get(12).unwrap_or(""), request.get(13).unwrap_or(""));
        for part in [mti.as_str(), stan, rrn, terminal, time, date] {
            identity.extend_from_slice(part.as_bytes());
            identity.push(0);
        }
        identity.extend_from_slice(&index);
        let key = state.keys.mac(b"card-message", &identity);
        // The card, the tenant's data key, and the answer if this message was answered before, in
        // one trip.
        let (row, answered, dek) = owed
            .read(state, move |q| {
                let row = q.card_by_index(&index)?;
                let dek = row.as_ref().map(|r| vault.data_key(q, r.tenant_id));
                Ok((row, q.card_message(&key)?, dek))
            })
            .await
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        let row = row.ok_or(ResponseCode::InvalidCard)?;
        let dek = match dek {
            Some(Ok(dek)) => dek,
            _ => return Err(ResponseCode::IssuerUnavailable),
        };
        let card: StoredCard = serde_json::from_str(&row.body).map_err(|_| ResponseCode::SystemMalfunction)?;
        let status = CardStatus::parse(&row.status).ok_or(ResponseCode::SystemMalfunction)?;
        let digest = state.keys.mac(b"card-auth-code", &key);
        let auth_code = format!("{:06}", u32::from_be_bytes(digest[..4].try_into().expect("4 bytes")) % 1_000_000);
        let ctx = Ctx {
            request: request.clone(),
            tenant: row.tenant_id,
            card_id: row.id,
            card,
            status,
            key,
            amount,
            currency,
            auth_code,
            keys: state.keys.clone(),
            answered,
            dek,
            hold_seconds: state.card_settings.hold_seconds,
        };
        Ok(Flow { state, ctx: std::sync::Arc::new(ctx), owed })
    }

    async fn run(self) -> Message {
        let _card = self.state.card_locks.lock(self.ctx.card_id).await;
        let request = &self.ctx.request;
        let mut stored = self.ctx.answered.clone();
        for _ in 0..RACES_MAX {
            match self.decide(stored.take()).await {
                Ok(m) => return m,
                Err(Failed::Code(code)) => return answer(request, code, None),
                Err(Failed::Raced) => {
                    self.state.metrics.card_steps_raced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        tracing::warn!(mti = %request.mti, "a card message lost every race to other nodes' steps on its card");
        answer(request, ResponseCode::IssuerUnavailable, None)
    }

    /// Decides the message on what is stored, under the card's lock; `answered` is the stored
    /// answer found before the lock was taken, if any.
    async fn decide(&self, answered: Option<Vec<u8>>) -> Step {
        let request = &self.ctx.request;
        // A repeat gets the first answer, with the card number put back (it is not stored).
        // Looked for again under the card's lock when the first look found none: the same
        // message in flight twice (an 0100 and its 0101) is decided once, and the second waits
        // for the first's answer instead of deciding again against the first's own hold. (And
        // again after a lost race: the step that won may have been this very message.)
        let answered = match answered {
            Some(stored) => Some(stored),
            None => {
                let key = self.ctx.key;
                self.owed
                    .read(self.state, move |q| q.card_message(&key))
                    .await
                    .map_err(|_| ResponseCode::IssuerUnavailable)?
            }
        };
        if let Some(stored) = &answered {
            let opened = vault::open(&self.ctx.dek, &self.ctx.key, stored);
            return match opened.map_err(|_| ()).and_then(|b| Message::decode(&b).map_err(|_| ())) {
                Ok(stored) => {
                    // Only what an answer echoes now: one stored by an earlier version may hold
                    // more (DE14, DE48).
                    let mut m = Message::new(&stored.mti);
                    for (n, v) in stored.fields() {
                        if ECHOED.contains(&n) || n == 38 || n == 39 {
                            m.set(n, v);
                        }
                    }
                    if let Some(pan) = request.get(2) {
                        m.set(2, pan);
                    }
                    Ok(m)
                }
                Err(_) => Err(ResponseCode::SystemMalfunction.into()),
            };
        }
        let credit = cards::credits_cardholder(request.get(3).unwrap_or("000000"));
        match (original_mti(&request.mti).as_str(), credit) {
            ("0100", false) => self.authorize(false).await,
            ("0100", true) => self.authorize_credit().await,
            ("0200", false) => self.authorize(true).await,
            ("0200", true) => self.refund(false).await,
            ("0120", _) => self.authorization_advice().await,
            ("0220", _) => self.capture().await,
            _ => self.reverse().await,
        }
    }

    /// Commits `events` (one linked chain, possibly none) with the records `conclude` makes from
    /// the ledger's result, in one transaction of the writer, if the authorization is still as
    /// `basis` says it was read; answers as `conclude` says.
    async fn execute(
        &self,
        mut events: Vec<TransferEvent>,
        basis: store::Guard,
        conclude: impl Fn(TransferResult) -> Concluded + Send + Sync + 'static,
    ) -> Step {
        let n = events.len();
        for (i, e) in events.iter_mut().enumerate() {
            e.linked = i + 1 < n;
        }
        let ctx = &self.ctx;
        let draft = audit::Draft {
            tenant: Some(ctx.tenant),
            actor: "network".into(),
            action: format!("iso8583 {}", ctx.request.mti),
            resource: format!("card:{}", uuid_string(ctx.card_id)),
            request_id: ctx.request.get(37).unwrap_or("").to_owned(),
            source: "iso8583".into(),
            outcome: String::new(),
        };
        let conclude = std::sync::Arc::new(conclude);
        let in_batch = conclude.clone();
        let records: store::RecordsFn = Box::new(move |reply| in_batch(reply.chain_result()).records);
        let command = if events.is_empty() { store::Command::Audit(vec![]) } else { store::Command::Transfers(events) };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.state
            .store
            .engine
            .submit_guarded(command, Some(draft), Some(records), vec![basis], Box::new(move |r| drop(tx.send(r))))
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        let reply = match rx.await.map_err(|_| ResponseCode::IssuerUnavailable)? {
            Ok(reply) => reply,
            Err(store::StoreError::Conflict(_)) => return Err(Failed::Raced),
            Err(e) => {
                tracing::warn!(error = %e, "a card message was not committed");
                return Err(ResponseCode::IssuerUnavailable.into());
            }
        };
        self.owed.committed();
        Ok(conclude(reply.chain_result()).reply)
    }

    /// A step that moves no money: recorded and answered as given.
    async fn record(
        &self,
        view: AuthorizationView,
        basis: store::Guard,
        created_at: u64,
        kind: &'static str,
        code: ResponseCode,
        reason: String,
    ) -> Step {
        let ctx = self.ctx.clone();
        self.execute(vec![], basis, move |_| {
            ctx.conclude(view.clone(), created_at, kind, code, None, vec![], vec![reason.clone()])
        })
        .await
    }

    /// The currency DE49 names: the card's own when its numeric code is DE49's (two currencies
    /// may share a code: ANG and XCG are both 532), else the first with that code.
    async fn named_currency(&self) -> Result<Currency, ResponseCode> {
        named_currency(self.card_currency().await?, self.ctx.currency)
    }

    /// The currency of the card's product (of its account).
    async fn card_currency(&self) -> Result<Option<Currency>, ResponseCode> {
        let tenant = self.ctx.tenant;
        let product_id =
            uuid::Uuid::parse_str(&self.ctx.card.product_id).map_err(|_| ResponseCode::SystemMalfunction)?;
        let product = self
            .owed
            .read(self.state, move |q| q.card_product(tenant, product_id.as_u128()))
            .await
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        Ok(product
            .and_then(|p| serde_json::from_str::<StoredProduct>(&p).ok())
            .and_then(|p| Currency::parse(&p.currency).ok()))
    }

    /// A credit's authorization (an 0100 whose DE3 credits the cardholder: a refund, say):
    /// approved unless the card is cancelled or DE49 is not its currency; nothing is held and no
    /// limit counts it. Its advice (0220) moves the money, settlement → account.
    async fn authorize_credit(&self) -> Step {
        let ctx = &self.ctx;
        let now = store::now_nanos();
        let own = self.card_currency().await?;
        let currency = named_currency(own, ctx.currency)?;
        let mut view = ctx.new_view(currency, now);
        view.credit = true;
        let (basis, kind) = (ctx.fresh(&view), "refund authorization");
        if ctx.status == CardStatus::Cancelled {
            let reason = "the card is cancelled".to_owned();
            return self.record(view, basis, now, kind, ResponseCode::DoNotHonor, reason).await;
        }
        if own != Some(currency) {
            let reason = "the currency (DE49) is not the card's".to_owned();
            return self.record(view, basis, now, kind, ResponseCode::NotPermitted, reason).await;
        }
        if self.reversed_first().await? {
            let reason = "reversed before it arrived".to_owned();
            return self.record(view, basis, now, kind, ResponseCode::DoNotHonor, reason).await;
        }
        if ctx.amount == 0 || ctx.amount > ledger::AMOUNT_MAX {
            return Err(ResponseCode::InvalidAmount.into());
        }
        view.status = "approved".into();
        view.auth_code = Some(ctx.auth_code.clone());
        let c = self.ctx.clone();
        self.execute(vec![], basis, move |_| {
            c.conclude(view.clone(), now, kind, ResponseCode::Approved, Some(c.auth_code.clone()), vec![], vec![])
        })
        .await
    }

    /// Whether this message's reversal came first: the latest authorization under its RRN is a
    /// reversal from its origin that found nothing (the acquirer, timing out, cancelled it).
    async fn reversed_first(&self) -> Result<bool, ResponseCode> {
        let (card_id, rrn) = (self.ctx.card_id, self.ctx.request.get(37).unwrap_or("").to_owned());
        if rrn.is_empty() {
            return Ok(false);
        }
        let row = self
            .owed
            .read(self.state, move |q| q.authorization_by_rrn(card_id, &rrn))
            .await
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        Ok(row
            .and_then(|row| serde_json::from_str::<AuthorizationView>(&row.body).ok())
            .is_some_and(|v| v.status == "unmatched" && same_origin(&self.ctx.request, &v)))
    }

    async fn authorize(&self, single_message: bool) -> Step {
        let ctx = &self.ctx;
        let now = store::now_nanos();
        let (y, m, d) = civil_date(now);
        let today = format!("{:02}{:02}", y % 100, m);
        let product_id = uuid::Uuid::parse_str(&ctx.card.product_id).map_err(|_| ResponseCode::SystemMalfunction)?;
        let (tenant, card_id) = (ctx.tenant, ctx.card_id);
        let (day, month, minute) = (nanos_of_date(y, m, d), nanos_of_date(y, m, 1), now.saturating_sub(60_000_000_000));
        // The card's status is read again here, under the card's lock: a card blocked or cancelled
        // while this message waited for the lock (behind others of the card) declines it.
        // So is the latest authorization under this message's RRN: a reversal that came first.
        let rrn = ctx.request.get(37).unwrap_or("").to_owned();
        let (product, spent, row, same_rrn) = self
            .owed
            .read(self.state, move |q| {
                Ok((
                    q.card_product(tenant, product_id.as_u128())?,
                    q.card_spent(card_id, day, month, minute, now)?,
                    q.card(tenant, card_id)?,
                    if rrn.is_empty() { None } else { q.authorization_by_rrn(card_id, &rrn)? },
                ))
            })
            .await
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        let status = row.and_then(|r| CardStatus::parse(&r.status)).ok_or(ResponseCode::SystemMalfunction)?;
        let product: StoredProduct =
            product.and_then(|p| serde_json::from_str(&p).ok()).ok_or(ResponseCode::SystemMalfunction)?;
        let card_currency = Currency::parse(&product.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
        let facts = cards::authorize::Card {
            status,
            expiry: &ctx.card.expiry,
            currency: card_currency.numeric(),
            product_limits: product.limits.into(),
            card_limits: ctx.card.limits.into(),
            blocked_mccs: &ctx.card.blocked_mccs,
            ecommerce: ctx.card.ecommerce,
            velocity_per_minute: product.velocity_per_minute,
        };
        let request = cards::Request {
            amount: ctx.amount,
            currency: ctx.currency,
            expiry: ctx.request.get(14),
            mcc: ctx.request.get(18),
            entry_mode: ctx.request.get(22),
            today: &today,
        };
        let spent = cards::Spent { today: spent.0, this_month: spent.1, last_minute: spent.2 };
        let kind = if single_message { "purchase" } else { "authorization" };
        let view = ctx.new_view(card_currency, now);
        let basis = ctx.fresh(&view);
        if let Decision::Decline { code, reason } = cards::decide(&facts, &request, spent) {
            return self.record(view, basis, now, kind, code, reason).await;
        }
        // An acquirer that timed out on this message reversed it, and the reversal arrived first
        // (and found nothing to reverse): the acquirer has cancelled the purchase, so nothing is
        // held for it.
        let reversed = same_rrn
            .and_then(|row| serde_json::from_str::<AuthorizationView>(&row.body).ok())
            .is_some_and(|v| v.status == "unmatched" && same_origin(&ctx.request, &v));
        if reversed {
            let reason = "reversed before it arrived".to_owned();
            return self.record(view, basis, now, kind, ResponseCode::DoNotHonor, reason).await;
        }
        if ctx.amount == 0 && !single_message {
            // An account verification (a card kept on file, a token provisioned): the card
            // checked out, and nothing is held (ISO 8583's answer: 85, no reason to decline).
            let mut view = view;
            view.status = "verified".into();
            view.auth_code = Some(ctx.auth_code.clone());
            let c = self.ctx.clone();
            return self
                .execute(vec![], basis, move |_| {
                    let (code, auth) = (ResponseCode::NoReasonToDecline, Some(c.auth_code.clone()));
                    c.conclude(view.clone(), now, "account verification", code, auth, vec![], vec![])
                })
                .await;
        }
        if ctx.amount == 0 || ctx.amount > ledger::AMOUNT_MAX {
            return Err(ResponseCode::InvalidAmount.into());
        }
        let hold = ctx.transfer_id("hold");
        let settlement = settlement_account(self.state, ctx.tenant, card_currency.as_str());
        let account = ctx.account()?;
        let event = if single_message {
            EventKind::Posted { debit: AccountId(account), credit: AccountId(settlement), amount: ctx.amount }
        } else {
            ctx.hold(AccountId(account), AccountId(settlement), ctx.amount)
        };
        let c = self.ctx.clone();
        self.execute(vec![ctx.event(hold, event)], basis, move |result| {
            let mut view = view.clone();
            let decline = |code, reason: String| c.conclude(view.clone(), now, kind, code, None, vec![], vec![reason]);
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    view.hold_id = (!single_message).then(|| uuid_string(hold));
                    view.hold_expires_at = (!single_message).then(|| c.hold_expiry(now));
                    view.auth_code = Some(c.auth_code.clone());
                    view.status = if single_message { "captured" } else { "approved" }.into();
                    if single_message {
                        view.captured = c.amount;
                    }
                    c.conclude(view, now, kind, ResponseCode::Approved, Some(c.auth_code.clone()), vec![hold], vec![])
                }
                TransferResult::InsufficientFunds | TransferResult::ExceedsDebits => {
                    decline(ResponseCode::InsufficientFunds, "insufficient funds in the card's account".into())
                }
                TransferResult::DebitAccountClosed => {
                    decline(ResponseCode::DoNotHonor, "the card's account is closed".into())
                }
                other => decline(ResponseCode::DoNotHonor, format!("the ledger refused the hold: {}", other.as_str())),
            }
        })
        .await
    }

    /// The authorization a capture or reversal refers to: by RRN (DE37), else by the original
    /// STAN in DE90; from the message's origin ([`same_origin`]).
    async fn original(&self) -> Result<Option<(store::AuthorizationRow, AuthorizationView)>, ResponseCode> {
        let request = &self.ctx.request;
        let of_this_origin = |v: &AuthorizationView| same_origin(request, v);
        let view_of = |row: &store::AuthorizationRow| serde_json::from_str::<AuthorizationView>(&row.body);
        let rrn = request.get(37).unwrap_or("").to_owned();
        let (card, by) = (self.ctx.card_id, rrn.clone());
        let latest = crate::routes::query(self.state, move |q| q.authorization_by_rrn(card, &by))
            .await
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        if let Some(row) = latest {
            let view = view_of(&row).map_err(|_| ResponseCode::SystemMalfunction)?;
            if of_this_origin(&view) {
                return Ok(Some((row, view)));
            }
        }
        // The card's recent authorizations: by RRN from this origin (another acquirer's used the
        // same RRN later), else by the original STAN in DE90, and its original transmission time
        // where DE90 and the authorization both have one: a STAN comes round again (an
        // acquirer's within hours), and the one this message's RRN did not find (its original
        // never arrived) must not reverse an earlier purchase that had the same STAN.
        let stan = request.get(90).and_then(|d| d.get(4..10)).unwrap_or("").to_owned();
        let sent = request.get(90).and_then(|d| d.get(10..20)).filter(|t| t.bytes().any(|b| b != b'0'));
        let same_time = |v: &AuthorizationView| match (sent, v.transmitted.as_deref()) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let (tenant, card) = (self.ctx.tenant, self.ctx.card_id);
        let recent = crate::routes::query(self.state, move |q| q.card_authorizations(tenant, card, 1000))
            .await
            .map_err(|_| ResponseCode::IssuerUnavailable)?;
        let views: Vec<_> = recent
            .into_iter()
            .filter_map(|row| view_of(&row).ok().map(|v| (row, v)))
            .filter(|(_, v)| of_this_origin(v))
            .collect();
        let by_rrn = views.iter().position(|(_, v)| !rrn.is_empty() && v.rrn == rrn);
        let by_stan = || views.iter().position(|(_, v)| !stan.is_empty() && v.stan == stan && same_time(v));
        Ok(by_rrn.or_else(by_stan).map(|i| views.into_iter().nth(i).expect("found")))
    }

    async fn capture(&self) -> Step {
        let ctx = &self.ctx;
        let credit = cards::credits_cardholder(ctx.request.get(3).unwrap_or("000000"));
        let declined = (!cards::advice_approved(ctx.request.get(39))).then(|| ctx.request.get(39).unwrap_or(""));
        let Some((row, view)) = self.original().await? else {
            return match declined {
                Some(de39) => self.declined_advice(None, de39).await,
                None if credit => self.refund(true).await,
                None => self.stand_in().await,
            };
        };
        let (created_at, basis) = (row.created_at, as_read(&row));
        if let Some(reason) = self.other_currency(&view) {
            return self.record(view, basis, created_at, "capture", ResponseCode::FormatError, reason).await;
        }
        if let Some(de39) = declined {
            return self.declined_advice(Some((view, basis, created_at)), de39).await;
        }
        if credit
            && !view.credit
            && view.processing_code.is_none()
            && view.status == "approved"
            && view.hold_id.is_some()
        {
            return self.credit_held(view, basis, created_at).await;
        }
        if view.credit != credit {
            let reason = format!(
                "the advice's processing code (DE3) {} the cardholder, its authorization {}",
                if credit { "credits" } else { "debits" },
                if view.credit { "credits" } else { "debits" },
            );
            return self.record(view, basis, created_at, "capture", ResponseCode::FormatError, reason).await;
        }
        if credit {
            return self.capture_credit(view, basis, created_at).await;
        }
        // An expired one is collected unless a reversal came (the previous version left a purchase
        // reversed after its hold expired `expired`, with the reversal among its events).
        let reversed = view.events.iter().any(|e| e.kind == "reversal");
        let stood_in = stood_in(&view);
        let collectable = view.status == "approved" || (view.status == "expired" && !reversed) || stood_in;
        if !collectable {
            let reason = format!("the authorization is {}", if reversed { "reversed" } else { view.status.as_str() });
            return self.record(view, basis, created_at, "capture", ResponseCode::DoNotHonor, reason).await;
        }
        let held = view.amount;
        let tolerance =
            (u128::from(held) * u128::from(self.state.card_settings.capture_tolerance_percent) / 100) as u64;
        if ctx.amount == 0 || ctx.amount > held.saturating_add(tolerance) {
            let reason = "the capture exceeds the hold beyond the tolerance".to_owned();
            return self.record(view, basis, created_at, "capture", ResponseCode::ExceedsAmountLimit, reason).await;
        }
        if view.status == "expired" {
            return self.capture_expired(view, basis, created_at, "the hold had expired").await;
        }
        if stood_in {
            // Declined here, approved by the network in stand-in (no 0120 said so first): the
            // network settles it, so it is collected, on its own as there is no hold.
            let why = "declined here, approved by the network in stand-in";
            return self.capture_expired(view, basis, created_at, why).await;
        }
        let hold = uuid::Uuid::parse_str(view.hold_id.as_deref().unwrap_or(""))
            .map_err(|_| ResponseCode::SystemMalfunction)?
            .as_u128();
        let post = ctx.step_id(&view, "post");
        let pending_id = TransferId(hold);
        let mut events =
            vec![ctx.event(post, EventKind::PostPending { pending_id, amount: Some(ctx.amount.min(held)) })];
        let mut ids = vec![post];
        let over = ctx.amount > held;
        if over {
            let extra = ctx.step_id(&view, "over-capture");
            let currency = Currency::parse(&view.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
            let settlement = settlement_account(self.state, ctx.tenant, currency.as_str());
            let amount = ctx.amount - held;
            let event = EventKind::Posted { debit: AccountId(ctx.account()?), credit: AccountId(settlement), amount };
            events.push(ctx.event(extra, event));
            ids.push(extra);
        }
        // Two refusals take a second step: the account cannot cover the amount above the hold
        // (the hold is posted alone, `capture_hold`), or the hold had expired (the amount is
        // posted on its own, `capture_expired`). The refusal is recorded first, so that the
        // refused chain's ids are not used again (see `step_id`), but not stored as the answer:
        // the advice's answer is the second step's.
        let refusal = std::sync::Arc::new(std::sync::OnceLock::new());
        let c = self.ctx.clone();
        let (first, refused) = (view.clone(), refusal.clone());
        let step = self
            .execute(events, basis.clone(), move |result| {
                let mut view = first.clone();
                let kind = "capture";
                let second_step = |mut refusal: Concluded| {
                    for record in &mut refusal.records {
                        if let store::Record::Authorization { row, message } = record {
                            *message = None;
                            // The first call, in the writer's batch, is the one committed.
                            let _ = refused.set((result, row.body.clone()));
                        }
                    }
                    refusal
                };
                match result {
                    TransferResult::Created | TransferResult::Exists => {
                        view.status = "captured".into();
                        view.captured = c.amount;
                        c.conclude(view, created_at, kind, ResponseCode::Approved, None, ids.clone(), vec![])
                    }
                    TransferResult::InsufficientFunds
                    | TransferResult::ExceedsDebits
                    | TransferResult::DebitAccountClosed
                        if over =>
                    {
                        let reason =
                            format!("the ledger refused the {} above the hold ({})", c.amount - held, result.as_str());
                        let code = ResponseCode::InsufficientFunds;
                        second_step(c.conclude(view, created_at, kind, code, None, vec![], vec![reason]))
                    }
                    TransferResult::PendingTransferExpired => {
                        view.status = "expired".into();
                        let reason = "the hold expired before the capture".to_owned();
                        let code = ResponseCode::DoNotHonor;
                        second_step(c.conclude(view, created_at, kind, code, None, vec![], vec![reason]))
                    }
                    other => capture_failed(&c, view, created_at, other),
                }
            })
            .await;
        match (step, refusal.get()) {
            (Ok(_), Some((refused, body))) => {
                let view = serde_json::from_str(body).map_err(|_| ResponseCode::SystemMalfunction)?;
                let basis =
                    store::Guard::Authorization { tenant_id: row.tenant_id, id: row.id, body: Some(body.clone()) };
                if *refused == TransferResult::PendingTransferExpired {
                    self.capture_expired(view, basis, created_at, "the hold had expired").await
                } else {
                    self.capture_hold(view, basis, created_at, *refused).await
                }
            }
            (step, _) => step,
        }
    }

    /// A capture whose hold had expired: the ledger released it, but the network settles the
    /// purchase all the same, so the amount is posted on its own, account → settlement. One the
    /// ledger refuses (the funds are gone, the account closed) is acknowledged too, an advice
    /// not being declined, and the amount not collected is recorded for reconciliation. (Before,
    /// it was answered `05` and the cardholder kept what the network paid.)
    async fn capture_expired(
        &self,
        view: AuthorizationView,
        basis: store::Guard,
        created_at: u64,
        why: &'static str,
    ) -> Step {
        let ctx = &self.ctx;
        let post = ctx.step_id(&view, "post-after-expiry");
        let currency = Currency::parse(&view.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
        let settlement = settlement_account(self.state, ctx.tenant, currency.as_str());
        let event =
            EventKind::Posted { debit: AccountId(ctx.account()?), credit: AccountId(settlement), amount: ctx.amount };
        let c = self.ctx.clone();
        self.execute(vec![ctx.event(post, event)], basis, move |result| {
            let mut view = view.clone();
            let kind = "capture";
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    view.status = "captured".into();
                    view.captured = c.amount;
                    let reason = format!("{why}: the capture was posted on its own");
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![post], vec![reason])
                }
                other => {
                    view.status = "expired".into();
                    let reason = format!(
                        "{} not collected: {why}, and the ledger refused the capture ({}): reconcile",
                        c.amount,
                        other.as_str()
                    );
                    let code = match other {
                        TransferResult::InsufficientFunds | TransferResult::ExceedsDebits => {
                            ResponseCode::InsufficientFunds
                        }
                        _ => ResponseCode::DoNotHonor,
                    };
                    c.acknowledged(c.conclude(view, created_at, kind, code, None, vec![], vec![reason]))
                }
            }
        })
        .await
    }

    /// An advice whose DE39 says the network declined the transaction (in stand-in): no money
    /// moves for it, and a hold placed for its authorization (approved here too late, say) is
    /// released, the acquirer having been told no. Acknowledged all the same.
    async fn declined_advice(&self, matched: Option<(AuthorizationView, store::Guard, u64)>, de39: &str) -> Step {
        let ctx = &self.ctx;
        let kind = "declined advice";
        let why = format!("the network declined it (DE39 {de39})");
        let Some((mut view, basis, created_at)) = matched else {
            let now = store::now_nanos();
            let mut view = ctx.new_view(self.named_currency().await?, now);
            view.credit = cards::credits_cardholder(ctx.request.get(3).unwrap_or("000000"));
            let basis = ctx.fresh(&view);
            return self.record(view, basis, now, kind, ResponseCode::Approved, format!("{why}: nothing moves")).await;
        };
        if view.status != "approved" || view.credit {
            // Nothing is held for it: a credit's authorization, one whose hold expired, or one
            // already concluded.
            if view.status == "approved" || view.status == "expired" {
                view.status = "declined".into();
            }
            let reason = format!("{why}: nothing moves");
            return self.record(view, basis, created_at, kind, ResponseCode::Approved, reason).await;
        }
        let hold = uuid::Uuid::parse_str(view.hold_id.as_deref().unwrap_or(""))
            .map_err(|_| ResponseCode::SystemMalfunction)?
            .as_u128();
        let void = ctx.step_id(&view, "declined-advice");
        let event = ctx.event(void, EventKind::VoidPending { pending_id: TransferId(hold) });
        let c = self.ctx.clone();
        self.execute(vec![event], basis, move |result| {
            let mut view = view.clone();
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    view.status = "declined".into();
                    let reason = format!("{why}: the hold is released");
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![void], vec![reason])
                }
                TransferResult::PendingTransferExpired => {
                    view.status = "declined".into();
                    let reason = format!("{why}: the hold had already expired");
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![], vec![reason])
                }
                other => {
                    let reason = format!("{why}, but the ledger refused to release the hold: {}", other.as_str());
                    c.conclude(view, created_at, kind, ResponseCode::SystemMalfunction, None, vec![], vec![reason])
                }
            }
        })
        .await
    }

    /// A credit's advice whose authorization holds the amount: one a version before this made of a
    /// refund's 0100, reading every 0100 as a purchase (its record keeps no processing code; a
    /// purchase's of this version does, and a credit advice on it is refused `30`). The hold is released (an expired one is
    /// released already) and the authorization becomes the credit's it was, recorded first; then
    /// the advice credits it (`capture_credit`).
    async fn credit_held(&self, view: AuthorizationView, basis: store::Guard, created_at: u64) -> Step {
        let ctx = &self.ctx;
        let hold = uuid::Uuid::parse_str(view.hold_id.as_deref().unwrap_or(""))
            .map_err(|_| ResponseCode::SystemMalfunction)?
            .as_u128();
        let void = ctx.step_id(&view, "credit-held:void");
        let event = ctx.event(void, EventKind::VoidPending { pending_id: TransferId(hold) });
        let released = std::sync::Arc::new(std::sync::OnceLock::new());
        let (c, body) = (self.ctx.clone(), released.clone());
        let step = self
            .execute(vec![event], basis, move |result| {
                let mut view = view.clone();
                let (code, moved, reason) = match result {
                    TransferResult::Created | TransferResult::Exists => (
                        ResponseCode::Approved,
                        vec![void],
                        "a credit's hold, made before credits held nothing: released",
                    ),
                    TransferResult::PendingTransferExpired => {
                        (ResponseCode::Approved, vec![], "a credit's hold, made before credits held nothing: expired")
                    }
                    other => {
                        let reason = format!("the ledger refused to release a credit's hold: {}", other.as_str());
                        return c.conclude(
                            view,
                            created_at,
                            "capture",
                            ResponseCode::SystemMalfunction,
                            None,
                            vec![],
                            vec![reason],
                        );
                    }
                };
                view.credit = true;
                view.hold_id = None;
                let mut released = c.conclude(view, created_at, "release", code, None, moved, vec![reason.to_owned()]);
                for record in &mut released.records {
                    if let store::Record::Authorization { row, message } = record {
                        // Not the advice's answer: the credit's is.
                        *message = None;
                        let _ = body.set(row.body.clone());
                    }
                }
                released
            })
            .await;
        match (step, released.get()) {
            (Ok(_), Some(body)) => {
                let view = serde_json::from_str(body).map_err(|_| ResponseCode::SystemMalfunction)?;
                let basis =
                    store::Guard::Authorization { tenant_id: ctx.tenant, id: view_id(&view), body: Some(body.clone()) };
                self.capture_credit(view, basis, created_at).await
            }
            (step, _) => step,
        }
    }

    /// The advice of a credit's authorization (a refund's): the account is credited, settlement
    /// → account. One the ledger refuses is acknowledged, an advice not being declined, and
    /// recorded as `unposted` for reconciliation.
    async fn capture_credit(&self, view: AuthorizationView, basis: store::Guard, created_at: u64) -> Step {
        let ctx = &self.ctx;
        if view.status != "approved" {
            let reason = format!("the authorization is {}", view.status);
            return self.record(view, basis, created_at, "refund advice", ResponseCode::DoNotHonor, reason).await;
        }
        if ctx.amount == 0 || ctx.amount > ledger::AMOUNT_MAX {
            return Err(ResponseCode::FormatError.into());
        }
        // As a capture may exceed its hold: by the tolerance at most. (Before, any amount was
        // credited: a refund authorized for 10.00 could credit 1,000.00.)
        let tolerance =
            (u128::from(view.amount) * u128::from(self.state.card_settings.capture_tolerance_percent) / 100) as u64;
        if ctx.amount > view.amount.saturating_add(tolerance) {
            let reason = "the refund advice exceeds its authorization beyond the tolerance".to_owned();
            return self
                .record(view, basis, created_at, "refund advice", ResponseCode::ExceedsAmountLimit, reason)
                .await;
        }
        let id = ctx.step_id(&view, "credit");
        let currency = Currency::parse(&view.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
        let settlement = settlement_account(self.state, ctx.tenant, currency.as_str());
        let event =
            EventKind::Posted { debit: AccountId(settlement), credit: AccountId(ctx.account()?), amount: ctx.amount };
        let c = self.ctx.clone();
        self.execute(vec![ctx.event(id, event)], basis, move |result| {
            let mut view = view.clone();
            let kind = "refund advice";
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    view.status = "refunded".into();
                    view.captured = c.amount;
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![id], vec![])
                }
                other => {
                    view.status = "unposted".into();
                    let reason = format!("a refund advice the ledger refused ({}): reconcile", other.as_str());
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![], vec![reason])
                }
            }
        })
        .await
    }

    /// A capture above the hold whose excess the account cannot cover (`refused`, the ledger's
    /// reason). The network has settled the purchase and an advice is not declined, so the hold
    /// is posted in full, and the amount not collected is recorded for reconciliation. (Left
    /// standing, the hold would expire and give the cardholder back what the network paid.)
    async fn capture_hold(
        &self,
        view: AuthorizationView,
        basis: store::Guard,
        created_at: u64,
        refused: TransferResult,
    ) -> Step {
        let ctx = &self.ctx;
        // `view` holds the refusal, so this id is not the refused chain's post.
        let post = ctx.step_id(&view, "post-hold-alone");
        let hold = uuid::Uuid::parse_str(view.hold_id.as_deref().unwrap_or(""))
            .map_err(|_| ResponseCode::SystemMalfunction)?
            .as_u128();
        let (held, uncovered) = (view.amount, ctx.amount - view.amount);
        let event = ctx.event(post, EventKind::PostPending { pending_id: TransferId(hold), amount: Some(held) });
        let c = self.ctx.clone();
        self.execute(vec![event], basis, move |result| {
            let mut view = view.clone();
            let kind = "capture";
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    view.status = "captured".into();
                    view.captured = held;
                    let reason = format!(
                        "{uncovered} above the hold not collected, the ledger refused it ({}): reconcile",
                        refused.as_str()
                    );
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![post], vec![reason])
                }
                other => capture_failed(&c, view, created_at, other),
            }
        })
        .await
    }

    async fn reverse(&self) -> Step {
        let ctx = &self.ctx;
        let Some((row, view)) = self.original().await? else {
            // Nothing to reverse: acknowledged, nothing moves (and the answer is remembered).
            let now = store::now_nanos();
            let currency = self.named_currency().await.unwrap_or(Currency::parse("BRL").expect("BRL"));
            let mut view = ctx.new_view(currency, now);
            view.id = uuid_string(ctx.transfer_id("unmatched-reversal"));
            view.status = "unmatched".into();
            let basis = ctx.fresh(&view);
            let reason = "no authorization to reverse".to_owned();
            return self.record(view, basis, now, "reversal", ResponseCode::Approved, reason).await;
        };
        let (created_at, basis) = (row.created_at, as_read(&row));
        if let Some(reason) = self.other_currency(&view) {
            return self.record(view, basis, created_at, "reversal", ResponseCode::FormatError, reason).await;
        }
        // A partial reversal names, in DE95, the amount that did happen (an ATM that dispensed
        // part of what was asked): only the rest is reversed. One whose amount is not 12 digits
        // is refused: read as absent, it reversed everything.
        let actual = match ctx.request.get(95) {
            None => None,
            Some(d) => match d.get(..12).filter(|a| a.bytes().all(|b| b.is_ascii_digit())) {
                Some(a) => Some(a.parse::<u64>().map_err(|_| ResponseCode::FormatError)?),
                None => {
                    let reason = "DE95's actual amount is not 12 digits".to_owned();
                    return self.record(view, basis, created_at, "reversal", ResponseCode::FormatError, reason).await;
                }
            },
        };
        let standing = match view.status.as_str() {
            "approved" | "expired" => view.amount,
            "captured" => view.captured,
            "refunded" => refunded(&view),
            _ => 0,
        };
        if let Some(actual) = actual.filter(|a| *a > 0 && standing > 0) {
            if actual >= standing {
                let reason = format!("DE95 names {actual}, no less than the {standing} standing: nothing to reverse");
                return self.record(view, basis, created_at, "reversal", ResponseCode::Approved, reason).await;
            }
            return self.reverse_part(view, basis, created_at, actual).await;
        }
        let (events, ids, reversed) = match view.status.as_str() {
            // A credit's authorization holds nothing: it is reversed with nothing to move.
            "approved" if view.credit => (vec![], vec![], view.amount),
            "approved" => {
                let hold = uuid::Uuid::parse_str(view.hold_id.as_deref().unwrap_or(""))
                    .map_err(|_| ResponseCode::SystemMalfunction)?;
                let void = ctx.step_id(&view, "void");
                let event = EventKind::VoidPending { pending_id: TransferId(hold.as_u128()) };
                (vec![ctx.event(void, event)], vec![void], view.amount)
            }
            "captured" => {
                let back = ctx.step_id(&view, "reverse-capture");
                let currency = Currency::parse(&view.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
                let settlement = settlement_account(self.state, ctx.tenant, currency.as_str());
                let amount = view.captured;
                let event =
                    EventKind::Posted { debit: AccountId(settlement), credit: AccountId(ctx.account()?), amount };
                (vec![ctx.event(back, event)], vec![back], amount)
            }
            "refunded" => {
                // The refund did not happen after all: its credit goes back to the settlement
                // account. Acknowledging without this left the cardholder credited.
                let back = ctx.step_id(&view, "reverse-refund");
                let currency = Currency::parse(&view.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
                let settlement = settlement_account(self.state, ctx.tenant, currency.as_str());
                let amount = refunded(&view);
                let event =
                    EventKind::Posted { debit: AccountId(ctx.account()?), credit: AccountId(settlement), amount };
                (vec![ctx.event(back, event)], vec![back], amount)
            }
            "expired" => {
                // Its hold is gone: nothing moves, but it is reversed, so that no advice after
                // it collects the purchase the acquirer cancelled.
                (vec![], vec![], view.amount)
            }
            _ => {
                // Already reversed or declined: acknowledged, nothing moves.
                let reason = format!("the authorization is {}", view.status);
                return self.record(view, basis, created_at, "reversal", ResponseCode::Approved, reason).await;
            }
        };
        let c = self.ctx.clone();
        self.execute(events, basis, move |result| {
            let mut view = view.clone();
            let kind = "reversal";
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    // After a partial reversal, the rest.
                    view.reversed += reversed;
                    view.status = "reversed".into();
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, ids.clone(), vec![])
                }
                TransferResult::PendingTransferExpired => {
                    // Reversed all the same: an advice after it finds it so, and collects nothing.
                    view.reversed += reversed;
                    view.status = "reversed".into();
                    let reason = "the hold had already expired".to_owned();
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![], vec![reason])
                }
                TransferResult::InsufficientFunds | TransferResult::ExceedsDebits => {
                    // A refund's credit already spent: the network is told, and may try again.
                    let reason = "the refunded amount is no longer in the card's account".to_owned();
                    c.conclude(view, created_at, kind, ResponseCode::InsufficientFunds, None, vec![], vec![reason])
                }
                other => {
                    let reason = format!("the ledger refused the reversal: {}", other.as_str());
                    c.conclude(view, created_at, kind, ResponseCode::SystemMalfunction, None, vec![], vec![reason])
                }
            }
        })
        .await
    }

    /// Why a capture or reversal may not apply to the authorization `view`: its DE49 names
    /// another currency (its DE4 would be read in the wrong minor units), if it does.
    fn other_currency(&self, view: &AuthorizationView) -> Option<String> {
        // By numeric code: two currencies may share one (ANG and XCG are both 532).
        let theirs = Currency::parse(&view.currency).map(|c| c.numeric());
        (theirs != Ok(self.ctx.currency))
            .then(|| format!("DE49 ({:03}) is not the authorization's currency ({})", self.ctx.currency, view.currency))
    }

    /// An authorization advice (0120): the network authorized the transaction in rtpay's stead
    /// (stand-in: rtpay was unreachable, or answered too late) and says so. Its money moves as
    /// an authorization's does, with its capture (0220) or reversal later: unmatched, a hold is
    /// placed for it (no limit or check applies: the network has approved it), or for a credit,
    /// a credit's authorization recorded; matched, the authorization stands as it is. A hold the
    /// ledger refuses (the funds are gone) is recorded `expired`, as one whose hold lapsed: its
    /// capture is then posted on its own. Acknowledged whatever happens. (Before, an 0120 was
    /// taken for a capture: a stand-in authorization was charged in full at once, and its
    /// capture for less was refused, the cardholder paying the difference.)
    async fn authorization_advice(&self) -> Step {
        let ctx = &self.ctx;
        let kind = "authorization advice";
        let credit = cards::credits_cardholder(ctx.request.get(3).unwrap_or("000000"));
        let declined = (!cards::advice_approved(ctx.request.get(39))).then(|| ctx.request.get(39).unwrap_or(""));
        let Some((row, view)) = self.original().await? else {
            if let Some(de39) = declined {
                return self.declined_advice(None, de39).await;
            }
            let (mut view, now) = self.unmatched_advice_view().await?;
            view.status = "approved".into();
            view.auth_code = ctx.request.get(38).map(str::to_owned);
            let basis = ctx.fresh(&view);
            let c = self.ctx.clone();
            if credit {
                view.credit = true;
                return self
                    .execute(vec![], basis, move |_| {
                        c.conclude(view.clone(), now, kind, ResponseCode::Approved, None, vec![], vec![])
                    })
                    .await;
            }
            return self.stand_in_hold(view, basis, now, ctx.transfer_id("hold")).await;
        };
        let (created_at, basis) = (row.created_at, as_read(&row));
        if let Some(reason) = self.other_currency(&view) {
            return self.record(view, basis, created_at, kind, ResponseCode::FormatError, reason).await;
        }
        if let Some(de39) = declined {
            return self.declined_advice(Some((view, basis, created_at)), de39).await;
        }
        if stood_in(&view) {
            // Declined here (or answered too late) and approved by the network in stand-in: the
            // network will settle it, so it is held now, and its capture collects it.
            if ctx.amount == 0 || ctx.amount > ledger::AMOUNT_MAX {
                return Err(ResponseCode::FormatError.into());
            }
            let hold = ctx.step_id(&view, &format!("stand-in-hold:{}", view.events.len()));
            let mut view = view;
            view.status = "approved".into();
            view.amount = ctx.amount;
            view.auth_code = ctx.request.get(38).map(str::to_owned);
            return self.stand_in_hold(view, basis, created_at, hold).await;
        }
        let reason = match view.status.as_str() {
            "approved" => "the network's advice of this authorization: it stands".to_owned(),
            other => format!("the network approved in stand-in an authorization that is {other} here: reconcile"),
        };
        self.record(view, basis, created_at, kind, ResponseCode::Approved, reason).await
    }

    /// A new record for an advice with no authorization to match, in DE49's currency, made now
    /// (and when); an amount of 0 or above the ledger's is a format error.
    async fn unmatched_advice_view(&self) -> Result<(AuthorizationView, u64), ResponseCode> {
        let ctx = &self.ctx;
        let now = store::now_nanos();
        let currency = self.named_currency().await?;
        if ctx.amount == 0 || ctx.amount > ledger::AMOUNT_MAX {
            return Err(ResponseCode::FormatError);
        }
        Ok((ctx.new_view(currency, now), now))
    }

    /// The hold of an authorization the network approved in stand-in (`view`, `approved`),
    /// under the id `hold`; one the ledger refuses (the funds are gone) is recorded `expired`, as
    /// a hold that lapsed: its capture is posted on its own. Acknowledged either way.
    async fn stand_in_hold(&self, view: AuthorizationView, basis: store::Guard, created_at: u64, hold: u128) -> Step {
        let ctx = &self.ctx;
        let kind = "authorization advice";
        let settlement = settlement_account(self.state, ctx.tenant, &view.currency);
        let event = ctx.hold(AccountId(ctx.account()?), AccountId(settlement), ctx.amount);
        let c = self.ctx.clone();
        self.execute(vec![ctx.event(hold, event)], basis, move |result| {
            let mut view = view.clone();
            let now = store::now_nanos();
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    view.hold_id = Some(uuid_string(hold));
                    view.hold_expires_at = Some(c.hold_expiry(now));
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![hold], vec![])
                }
                other => {
                    view.status = "expired".into();
                    let reason = format!(
                        "approved by the network in stand-in; the ledger refused its hold ({}): its capture is \
                         posted on its own",
                        other.as_str()
                    );
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![], vec![reason])
                }
            }
        })
        .await
    }

    /// An advice (0220) for a purchase rtpay never authorized: the network approved it in
    /// stand-in (rtpay was unreachable) and will settle it, so the account pays it now. An advice
    /// is acknowledged whatever happens (the network does not take "declined" for an answer);
    /// one the ledger refuses (the funds are gone, the account closed) is recorded as
    /// `unposted`, with the ledger's reason, for reconciliation.
    async fn stand_in(&self) -> Step {
        let ctx = &self.ctx;
        let (mut view, now) = self.unmatched_advice_view().await?;
        view.status = "captured".into();
        view.captured = ctx.amount;
        let post = ctx.transfer_id("stand-in");
        let settlement = settlement_account(self.state, ctx.tenant, &view.currency);
        let event =
            EventKind::Posted { debit: AccountId(ctx.account()?), credit: AccountId(settlement), amount: ctx.amount };
        let (c, basis) = (self.ctx.clone(), ctx.fresh(&view));
        self.execute(vec![ctx.event(post, event)], basis, move |result| {
            let mut view = view.clone();
            let kind = "stand-in advice";
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    c.conclude(view, now, kind, ResponseCode::Approved, None, vec![post], vec![])
                }
                other => {
                    view.status = "unposted".into();
                    view.captured = 0;
                    let reason = format!("a stand-in advice the ledger refused ({}): reconcile", other.as_str());
                    c.conclude(view, now, kind, ResponseCode::Approved, None, vec![], vec![reason])
                }
            }
        })
        .await
    }

    /// Reverses all of the authorization `view` but `actual`: a hold is replaced by one of
    /// `actual` (one linked chain: the void and the new hold apply together); a captured
    /// purchase gets the difference back; a refund takes the difference back; a credit's
    /// authorization, holding nothing, only shrinks.
    async fn reverse_part(&self, view: AuthorizationView, basis: store::Guard, created_at: u64, actual: u64) -> Step {
        /// What the partial reversal changes on the authorization.
        #[derive(Clone, Copy)]
        enum Part {
            /// The hold replaced by this one.
            Hold(u128),
            /// An authorization holding nothing (a credit's, an expired one): its amount.
            Authorized,
            Captured,
            Refunded,
        }
        let ctx = &self.ctx;
        let currency = Currency::parse(&view.currency).map_err(|_| ResponseCode::SystemMalfunction)?;
        let settlement = AccountId(settlement_account(self.state, ctx.tenant, currency.as_str()));
        let account = AccountId(ctx.account()?);
        let purpose = format!("partial-reversal-to-{actual}");
        let back = ctx.step_id(&view, &purpose);
        let (events, ids, part) = match view.status.as_str() {
            // Holding nothing (a credit's, or one whose hold expired): what did happen is what a
            // later advice may collect or credit.
            "approved" if view.credit => (vec![], vec![], Part::Authorized),
            "expired" => (vec![], vec![], Part::Authorized),
            "approved" => {
                let hold = uuid::Uuid::parse_str(view.hold_id.as_deref().unwrap_or(""))
                    .map_err(|_| ResponseCode::SystemMalfunction)?
                    .as_u128();
                let (void, rehold) = (ctx.step_id(&view, &format!("{purpose}:void")), back);
                let kept = ctx.hold(account, settlement, actual);
                let events = vec![
                    ctx.event(void, EventKind::VoidPending { pending_id: TransferId(hold) }),
                    ctx.event(rehold, kept),
                ];
                (events, vec![void, rehold], Part::Hold(rehold))
            }
            "refunded" => {
                let amount = refunded(&view) - actual;
                let event = EventKind::Posted { debit: account, credit: settlement, amount };
                (vec![ctx.event(back, event)], vec![back], Part::Refunded)
            }
            _ => {
                let amount = view.captured - actual;
                let event = EventKind::Posted { debit: settlement, credit: account, amount };
                (vec![ctx.event(back, event)], vec![back], Part::Captured)
            }
        };
        let c = self.ctx.clone();
        self.execute(events, basis, move |result| {
            let mut view = view.clone();
            let kind = "partial reversal";
            match result {
                TransferResult::Created | TransferResult::Exists => {
                    match part {
                        Part::Hold(hold) => {
                            view.reversed += view.amount - actual;
                            view.amount = actual;
                            view.hold_id = Some(uuid_string(hold));
                            view.hold_expires_at = Some(c.hold_expiry(store::now_nanos()));
                        }
                        Part::Authorized => {
                            view.reversed += view.amount - actual;
                            view.amount = actual;
                        }
                        Part::Captured => {
                            view.reversed += view.captured - actual;
                            view.captured = actual;
                        }
                        Part::Refunded => {
                            view.reversed += refunded(&view) - actual;
                            view.captured = actual;
                        }
                    }
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, ids.clone(), vec![])
                }
                TransferResult::PendingTransferExpired => {
                    // What did happen is what a capture after it may collect.
                    view.status = "expired".into();
                    view.reversed += view.amount.saturating_sub(actual);
                    view.amount = actual;
                    let reason = "the hold had already expired".to_owned();
                    c.conclude(view, created_at, kind, ResponseCode::Approved, None, vec![], vec![reason])
                }
                TransferResult::InsufficientFunds | TransferResult::ExceedsDebits => {
                    // A refund's credit already spent: the network is told, and may try again.
                    let reason = "the refunded amount is no longer in the card's account".to_owned();
                    c.conclude(view, created_at, kind, ResponseCode::InsufficientFunds, None, vec![], vec![reason])
                }
                other => {
                    let reason = format!("the ledger refused the partial reversal: {}", other.as_str());
                    c.conclude(view, created_at, kind, ResponseCode::SystemMalfunction, None, vec![], vec![reason])
                }
            }
        })
        .await
    }

    /// A credit to the cardholder, settlement → account: a refund (0200 with a credit processing
    /// code), or an advice (0220) of one with no authorization to match (`advice`; approved
    /// by the network in stand-in). An advice is acknowledged whatever happens: one the ledger
    /// refuses is recorded as `unposted`, with the reason, for reconciliation.
    async fn refund(&self, advice: bool) -> Step {
        let ctx = &self.ctx;
        let now = store::now_nanos();
        let currency = self.named_currency().await?;
        let mut view = ctx.new_view(currency, now);
        view.credit = true;
        let basis = ctx.fresh(&view);
        let kind = if advice { "refund advice" } else { "refund" };
        // An advice reports a refund the network has settled: the cardholder gets it, whatever
        // the card's state.
        if !advice && ctx.status == CardStatus::Cancelled {
            let reason = "the card is cancelled".to_owned();
            return self.record(view, basis, now, kind, ResponseCode::DoNotHonor, reason).await;
        }
        if ctx.amount == 0 || ctx.amount > ledger::AMOUNT_MAX {
            return Err(ResponseCode::FormatError.into());
        }
        let credit = ctx.transfer_id("hold");
        let settlement = settlement_account(self.state, ctx.tenant, currency.as_str());
        let event =
            EventKind::Posted { debit: AccountId(settlement), credit: AccountId(ctx.account()?), amount: ctx.amount };
        view.status = "refunded".into();
        view.captured = ctx.amount;
        let c = self.ctx.clone();
        self.execute(vec![ctx.event(credit, event)], basis, move |result| match result {
            TransferResult::Created | TransferResult::Exists => {
                let code = (!advice).then(|| c.auth_code.clone());
                c.conclude(view.clone(), now, kind, ResponseCode::Approved, code, vec![credit], vec![])
            }
            other if advice => {
                let mut view = view.clone();
                (view.status, view.captured) = ("unposted".into(), 0);
                let reason = format!("a refund advice the ledger refused ({}): reconcile", other.as_str());
                c.conclude(view, now, kind, ResponseCode::Approved, None, vec![], vec![reason])
            }
            other => {
                let mut view = view.clone();
                (view.status, view.captured) = ("declined".into(), 0);
                let reason = format!("the ledger refused the refund: {}", other.as_str());
                c.conclude(view, now, kind, ResponseCode::NotPermitted, None, vec![], vec![reason])
            }
        })
        .await
    }
}

/// What a refund credited: its `captured` (its amount, on records made before that was kept).
fn refunded(view: &AuthorizationView) -> u64 {
    if view.captured > 0 {
        view.captured
    } else {
        view.amount
    }
}

/// The currency DE49's `numeric` code names: `own` (the card's) when it has that code, else the
/// first currency with it.
fn named_currency(own: Option<Currency>, numeric: u16) -> Result<Currency, ResponseCode> {
    own.filter(|c| c.numeric() == numeric).or_else(|| Currency::from_numeric(numeric)).ok_or(ResponseCode::FormatError)
}

/// The id of the authorization `view`.
fn view_id(view: &AuthorizationView) -> u128 {
    uuid::Uuid::parse_str(&view.id).map(|u| u.as_u128()).unwrap_or_default()
}

/// The basis of a step on the stored authorization `row`: it is still as read.
fn as_read(row: &store::AuthorizationRow) -> store::Guard {
    store::Guard::Authorization { tenant_id: row.tenant_id, id: row.id, body: Some(row.body.clone()) }
}

/// A capture the ledger refused (`result`): declined `05`, the hold expired or standing as it was.
fn capture_failed(c: &Ctx, mut view: AuthorizationView, created_at: u64, result: TransferResult) -> Concluded {
    let reason = if result == TransferResult::PendingTransferExpired {
        view.status = "expired".into();
        "the hold expired before the capture".to_owned()
    } else {
        format!("the ledger refused the capture: {}", result.as_str())
    };
    // Storage found inconsistent is rtpay's malfunction, not the cardholder's decline.
    let code = match result {
        TransferResult::PendingTransferInconsistent => ResponseCode::SystemMalfunction,
        _ => ResponseCode::DoNotHonor,
    };
    c.conclude(view, created_at, "capture", code, None, vec![], vec![reason])
}

/// Whether `view` is a purchase declined here that the network may have approved in stand-in:
/// declined by rtpay's own decision, with no reversal, no advice of a decline, and not declined
/// because its reversal came first. Its approved advice (0120) holds it, its capture collects it.
fn stood_in(view: &AuthorizationView) -> bool {
    view.status == "declined"
        && !view.credit
        && !view.events.iter().any(|e| matches!(e.kind.as_str(), "reversal" | "declined advice"))
        && !view.reasons.iter().any(|r| r == "reversed before it arrived")
}

/// The settlement account's key, for opening it with a product.
pub fn settlement_key(state: &AppState, tenant: u128, currency: Currency) -> AccountKey {
    AccountKey { tenant: ledger::TenantId(tenant), id: AccountId(settlement_account(state, tenant, currency.as_str())) }
}

/// Seals a card number, and its blind index.
pub fn seal_pan(
    vault: &crate::vault_service::VaultService,
    q: &dyn store::Queries,
    tenant: u128,
    card: u128,
    pan: &str,
) -> Result<(Vec<u8>, [u8; 32]), VaultFailure> {
    let dek = vault.data_key(q, tenant)?;
    Ok((vault::seal(&dek, &pan_record(tenant, card), pan.as_bytes())?, vault.index().of(b"pan", pan.as_bytes())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeats_are_answered_as_their_originals() {
        for (request, response, original) in
            [("0100", "0110", "0100"), ("0101", "0110", "0100"), ("0421", "0430", "0420"), ("0220", "0230", "0220")]
        {
            assert_eq!(super::response_mti(request).as_deref(), Some(response), "{request}");
            assert_eq!(super::original_mti(request), original, "{request}");
        }
        assert_eq!(super::response_mti("0110"), None, "a response is not answered");
    }
}
