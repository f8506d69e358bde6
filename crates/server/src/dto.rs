//! The JSON shapes of the native API, and their checks. Every check names the field and the rule;
//! nothing here touches state.

use ledger::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::problem::Problem;

/// A number written in decimal digits only: what Rust's `parse` also takes (a leading `+`) is
/// not a number an API client writes, and is refused like any other malformed value.
pub fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses a UUID field; the nil UUID is refused since it cannot identify anything.
pub fn parse_id(field: &str, value: &str) -> Result<u128, Problem> {
    // Only the hyphenated form the schema's `format: uuid` names: `uuid` alone also takes 32 bare
    // hex digits, braces and `urn:uuid:`, which would make one id several strings.
    let hyphenated = if value.len() == uuid::fmt::Hyphenated::LENGTH { Some(value) } else { None };
    let id = hyphenated.ok_or(()).and_then(|v| uuid::Uuid::try_parse(v).map_err(|_| ())).map_err(|_| {
        Problem::invalid(
            field,
            "invalid_uuid",
            format!("`{field}` must be a UUID like 3f0c2e3a-8d5e-4a5b-9a41-2b8f3f2f6c10"),
        )
    })?;
    if id.is_nil() {
        return Err(Problem::invalid(field, "invalid_uuid", format!("`{field}` must not be the nil UUID")));
    }
    Ok(id.as_u128())
}

pub fn uuid_string(v: u128) -> String {
    // Encoded straight into a buffer: `to_string` goes through the formatting machinery, and
    // every answer holds several ids.
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::from_u128(v).hyphenated().encode_lower(&mut buf).to_owned()
}

pub fn check_amount(field: &str, amount: u64) -> Result<u64, Problem> {
    if amount == 0 || amount > AMOUNT_MAX {
        return Err(Problem::invalid(
            field,
            "invalid_amount",
            format!("`{field}` must be an integer number of minor units in 1..=2^63-1"),
        ));
    }
    Ok(amount)
}

/// Metadata: a JSON object, stored as canonical (key-sorted) JSON text of bounded size.
pub fn metadata_text(field: &str, value: Option<Metadata>) -> Result<Option<String>, Problem> {
    let Some(Metadata(map)) = value else { return Ok(None) };
    let text = serde_json::to_string(&map).expect("JSON values serialize");
    if text.len() > METADATA_LEN_MAX {
        return Err(Problem::invalid(
            field,
            "metadata_too_long",
            format!("`{field}` must serialize to at most {METADATA_LEN_MAX} bytes of JSON"),
        ));
    }
    Ok(Some(text))
}

/// A client's `metadata`: a JSON object holding any JSON, but no key twice in one object, at any
/// depth. (serde_json's own map keeps a repeated key's last value without a word, while the API
/// refuses a repeated key everywhere else: `{"a":1,"a":2}` would be taken, and stored, as
/// `{"a":2}`.) Refused with the message `repeated key `NAME``, which `json::Json` turns into
/// `duplicate_field`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metadata(pub serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(UniqueKeys).map(|v| match v {
            serde_json::Value::Object(map) => Metadata(map),
            _ => unreachable!("a map visitor makes objects"),
        })
    }
}

/// Any JSON value, refusing a key repeated in any of its objects.
struct UniqueKeys;

struct UniqueValue(serde_json::Value);

impl<'de> Deserialize<'de> for UniqueValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys).map(UniqueValue)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_unit<E>(self) -> Result<serde_json::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<serde_json::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<serde_json::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<serde_json::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let UniqueValue(value) = map.next_value()?;
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!("repeated key `{key}`")));
            }
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

fn metadata_value(text: &Option<String>) -> Option<serde_json::Value> {
    text.as_ref().and_then(|t| serde_json::from_str(t).ok())
}

/// A display name: trimmed, 1..=`max` characters, none a control character (422 on `field`).
pub fn display_name(field: &str, text: &str, max: usize) -> Result<String, Problem> {
    let name = text.trim();
    if name.is_empty() || name.chars().count() > max || name.chars().any(char::is_control) {
        return Err(Problem::invalid(
            field,
            "invalid_name",
            format!("`{field}` must be 1..={max} printable characters"),
        ));
    }
    Ok(name.to_owned())
}

/// `v` in decimal, as `Display` writes it, without the formatting machinery (the busiest answers
/// and the request middleware write several numbers each).
pub fn push_decimal(out: &mut Vec<u8>, v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = v;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Nanoseconds since the epoch as RFC 3339 UTC, e.g. `2026-11-22T02:01:26.123456789Z`.
pub fn rfc3339(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    let rem = secs % 86_400;
    let (year, month, day) = civil_date(nanos);
    // `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, digit by digit: every answer holds times, and `format!`
    // was three quarters of building a transfer's view.
    let mut out = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    // A u64 of nanoseconds ends in the year 2554: always four digits.
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, (rem / 60) % 60);
    put(17, 2, rem % 60);
    put(20, 9, nanos % 1_000_000_000);
    String::from_utf8(out.to_vec()).expect("ASCII digits")
}

pub use ledger::time::{civil_date, nanos_of_date};

#[derive(Deserialize, Serialize, ToSchema, Default, Debug, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct FlagsBody {
    /// The account's debits may not exceed its credits (plus `credit_limit`): it cannot go negative.
    #[serde(default)]
    pub debits_must_not_exceed_credits: bool,
    /// The account's credits may not exceed its debits (plus `credit_limit`).
    #[serde(default)]
    pub credits_must_not_exceed_debits: bool,
    /// Closed accounts take no new transfers.
    #[serde(default)]
    pub closed: bool,
}

impl FlagsBody {
    fn bits(&self) -> u16 {
        let mut bits = 0;
        if self.debits_must_not_exceed_credits {
            bits |= AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS;
        }
        if self.credits_must_not_exceed_debits {
            bits |= AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS;
        }
        if self.closed {
            bits |= AccountFlags::CLOSED;
        }
        bits
    }

    fn of(flags: AccountFlags) -> FlagsBody {
        FlagsBody {
            debits_must_not_exceed_credits: flags.debits_must_not_exceed_credits(),
            credits_must_not_exceed_debits: flags.credits_must_not_exceed_debits(),
            closed: flags.closed(),
        }
    }
}

/// `POST /v1/accounts`.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct AccountBody {
    /// Client-chosen id; generated when absent (derived from `Idempotency-Key` when given).
    #[schema(format = Uuid)]
    pub id: Option<String>,
    /// ISO 4217 code, e.g. `BRL`.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// Chart-of-accounts category, 0..=65535.
    pub code: Option<u16>,
    pub flags: Option<FlagsBody>,
    /// Overdraft allowed on the flagged side, in minor units.
    #[schema(maximum = 9223372036854775807_u64)]
    pub credit_limit: Option<u64>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
    /// The account holder (`POST /v1/holders`) of the same tenant.
    #[schema(format = Uuid)]
    pub holder_id: Option<String>,
}

impl AccountBody {
    pub fn into_new(self, tenant: TenantId, generated_id: impl FnOnce() -> u128) -> Result<NewAccount, Problem> {
        let id = match &self.id {
            Some(id) => parse_id("id", id)?,
            None => generated_id(),
        };
        let currency = Currency::parse(&self.currency)
            .map_err(|e| Problem::invalid("currency", "invalid_currency", format!("`currency` {e}")))?;
        let flags = self.flags.unwrap_or_default();
        let credit_limit = self.credit_limit.unwrap_or(0);
        let new = NewAccount {
            key: AccountKey { tenant, id: AccountId(id) },
            currency,
            code: self.code.unwrap_or(0),
            flags: AccountFlags(flags.bits()),
            credit_limit,
            metadata: metadata_text("metadata", self.metadata)?,
            holder: self.holder_id.as_deref().map(|h| parse_id("holder_id", h)).transpose()?,
        };
        validate_account(&new).map_err(|code| {
            let (field, detail) = match code {
                AccountResult::FlagsAreMutuallyExclusive => (
                    "flags",
                    "`debits_must_not_exceed_credits` and `credits_must_not_exceed_debits` cannot both be set",
                ),
                AccountResult::CreditLimitRequiresBalanceFlag => (
                    "credit_limit",
                    "`credit_limit` needs `debits_must_not_exceed_credits` or `credits_must_not_exceed_debits`",
                ),
                AccountResult::CreditLimitExceedsMax => ("credit_limit", "`credit_limit` must be at most 2^63-1"),
                AccountResult::MetadataTooLong => ("metadata", "`metadata` is too long"),
                _ => ("id", "`id` is not acceptable"),
            };
            Problem::invalid(field, code.as_str(), detail)
        })?;
        Ok(new)
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct BalanceView {
    pub debits_posted: u64,
    pub credits_posted: u64,
    pub debits_pending: u64,
    pub credits_pending: u64,
    /// What can be spent now (may be negative for an unconstrained account), held to the range
    /// of a signed 64-bit integer: a credit limit of 2^63-1 over credits would count past it,
    /// and no amount is larger anyway.
    pub available: i64,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct AccountView {
    #[schema(format = Uuid)]
    pub id: String,
    pub currency: String,
    pub code: u16,
    pub flags: FlagsBody,
    pub credit_limit: u64,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    #[schema(format = Uuid)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_id: Option<String>,
    /// Engine timestamp (ns since the epoch).
    pub timestamp: u64,
    pub created_at: String,
    pub balance: BalanceView,
}

impl AccountView {
    pub fn of(a: &Account) -> AccountView {
        AccountView {
            id: uuid_string(a.key.id.0),
            currency: a.currency.as_str().to_owned(),
            code: a.code,
            flags: FlagsBody::of(a.flags),
            credit_limit: a.credit_limit,
            metadata: metadata_value(&a.metadata),
            holder_id: a.holder.map(uuid_string),
            timestamp: a.timestamp,
            created_at: rfc3339(a.timestamp),
            balance: BalanceView {
                debits_posted: a.debits_posted,
                credits_posted: a.credits_posted,
                debits_pending: a.debits_pending,
                credits_pending: a.credits_pending,
                available: a.available().clamp(i64::MIN.into(), i64::MAX.into()) as i64,
            },
        }
    }
}

/// `POST /v1/transfers`.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    /// The transfer's id, and its idempotency key.
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub debit_account_id: String,
    #[schema(format = Uuid)]
    pub credit_account_id: String,
    /// Minor units, 1..=2^63−1.
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub amount: u64,
    /// Place a hold instead of moving the money now.
    pub pending: Option<bool>,
    /// For a hold: seconds until it expires and is released (0 or absent: never).
    #[schema(maximum = 2147483647)]
    pub timeout_seconds: Option<u32>,
    pub code: Option<u16>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
}

/// `POST /v1/transfers/{pending_id}/post` and `/void`.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// The id of the post or void transfer itself (idempotency key).
    #[schema(format = Uuid)]
    pub id: String,
    /// For a post: how much of the hold to move (default: all of it). Not allowed for a void.
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub amount: Option<u64>,
    pub code: Option<u16>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
}

/// `POST /v1/transfers/{pending_id}/void`, as the document shows it: the handler reads a
/// [`ResolveBody`] and refuses its `amount` (`field_not_allowed`).
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct VoidBody {
    /// The id of the void transfer itself (idempotency key).
    #[schema(format = Uuid)]
    id: String,
    code: Option<u16>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Metadata>,
}

/// One item of `POST /v1/transfers/batch`: a transfer (as `POST /v1/transfers`), or a post or
/// void of a hold (`post_pending_id` / `void_pending_id`).
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub debit_account_id: Option<String>,
    #[schema(format = Uuid)]
    pub credit_account_id: Option<String>,
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub amount: Option<u64>,
    pub pending: Option<bool>,
    #[schema(maximum = 2147483647)]
    pub timeout_seconds: Option<u32>,
    #[schema(format = Uuid)]
    pub post_pending_id: Option<String>,
    #[schema(format = Uuid)]
    pub void_pending_id: Option<String>,
    pub code: Option<u16>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
}

#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// 1 to 8,190 items.
    #[schema(min_items = 1, max_items = 8190)]
    pub transfers: Vec<BatchItem>,
    /// All or nothing: if one fails, none applies.
    pub linked: Option<bool>,
}

/// A field's name inside `prefix` (a batch item's `transfers[3]`), borrowed when there is none:
/// each event names several fields, and only a failure needs them.
fn field_of<'a>(prefix: &str, name: &'a str) -> std::borrow::Cow<'a, str> {
    if prefix.is_empty() {
        std::borrow::Cow::Borrowed(name)
    } else {
        std::borrow::Cow::Owned(format!("{prefix}.{name}"))
    }
}

fn event_problem(prefix: &str, code: TransferResult) -> Problem {
    let (field, detail) = match code {
        TransferResult::AmountMustNotBeZero | TransferResult::AmountExceedsMax => {
            ("amount", "must be an integer number of minor units in 1..=2^63-1")
        }
        TransferResult::AccountsMustBeDifferent => ("credit_account_id", "must differ from `debit_account_id`"),
        TransferResult::PendingIdMustBeDifferent => ("id", "must differ from the pending transfer's id"),
        TransferResult::TimeoutExceedsMax => ("timeout_seconds", "must be at most 2147483647"),
        TransferResult::MetadataTooLong => ("metadata", "is too long"),
        _ => ("id", "is not acceptable"),
    };
    let field = field_of(prefix, field);
    Problem::invalid(field.clone(), code.as_str(), format!("`{field}` {detail}"))
}

/// Transfer codes of the rails' own transfers: Pix payments and received Pix, Pix refunds, MED
/// blocks, card holds and their steps. Reserved: the native API neither makes a transfer with one
/// nor posts or voids a hold that has one (see `routes::transfers`), since a rail resolves its
/// holds on the network's word (an SPI verdict, a capture or reversal) and a hold resolved behind
/// its back would let the network pay out money the payer kept.
pub const PIX_CODE: u16 = 7600;
pub const PIX_REFUND_CODE: u16 = 7601;
pub const MED_CODE: u16 = 7602;
pub const CARD_CODE: u16 = 8583;
pub const RAIL_CODES: [u16; 4] = [PIX_CODE, PIX_REFUND_CODE, MED_CODE, CARD_CODE];

/// Builds and validates a ledger event; `prefix` locates the item in a batch (`transfers[3]`).
pub struct EventParts<'a> {
    pub prefix: &'a str,
    pub tenant: TenantId,
    pub id: &'a str,
    pub code: Option<u16>,
    pub metadata: Option<Metadata>,
}

impl EventParts<'_> {
    pub fn finish(self, kind: EventKind) -> Result<TransferEvent, Problem> {
        let id = parse_id(&field_of(self.prefix, "id"), self.id)?;
        if let Some(code) = self.code.filter(|c| RAIL_CODES.contains(c)) {
            let field = field_of(self.prefix, "code");
            return Err(Problem::invalid(
                field.clone(),
                "reserved_code",
                format!("`{field}` {code} is reserved for the Pix and card rails' own transfers"),
            ));
        }
        let event = TransferEvent {
            key: TransferKey { tenant: self.tenant, id: TransferId(id) },
            kind,
            code: self.code.unwrap_or(0),
            metadata: metadata_text(&field_of(self.prefix, "metadata"), self.metadata)?,
            linked: false,
        };
        validate_event(&event).map_err(|code| event_problem(self.prefix, code))?;
        Ok(event)
    }
}

pub fn transfer_kind(
    prefix: &str,
    debit: &str,
    credit: &str,
    amount: u64,
    pending: bool,
    timeout_seconds: Option<u32>,
) -> Result<EventKind, Problem> {
    let debit = AccountId(parse_id(&field_of(prefix, "debit_account_id"), debit)?);
    let credit = AccountId(parse_id(&field_of(prefix, "credit_account_id"), credit)?);
    let amount = check_amount(&field_of(prefix, "amount"), amount)?;
    if !pending && timeout_seconds.is_some_and(|t| t > 0) {
        let field = field_of(prefix, "timeout_seconds");
        return Err(Problem::invalid(
            field.clone(),
            "timeout_requires_pending",
            format!("`{field}` is only allowed with `pending: true`"),
        ));
    }
    Ok(if pending {
        EventKind::Pending { debit, credit, amount, timeout_seconds: timeout_seconds.unwrap_or(0) }
    } else {
        EventKind::Posted { debit, credit, amount }
    })
}

impl TransferBody {
    pub fn into_event(self, tenant: TenantId) -> Result<TransferEvent, Problem> {
        let kind = transfer_kind(
            "",
            &self.debit_account_id,
            &self.credit_account_id,
            self.amount,
            self.pending.unwrap_or(false),
            self.timeout_seconds,
        )?;
        EventParts { prefix: "", tenant, id: &self.id, code: self.code, metadata: self.metadata }.finish(kind)
    }
}

impl BatchItem {
    pub fn into_event(self, index: usize, tenant: TenantId) -> Result<TransferEvent, Problem> {
        let prefix = format!("transfers[{index}]");
        let forbid = |present: bool, name: &str, why: &str| -> Result<(), Problem> {
            if present {
                let field = field_of(&prefix, name);
                return Err(Problem::invalid(
                    field.clone(),
                    "field_not_allowed",
                    format!("`{field}` is not allowed {why}"),
                ));
            }
            Ok(())
        };
        let require = |value: Option<&String>, name: &str| -> Result<String, Problem> {
            value.cloned().ok_or_else(|| {
                let field = field_of(&prefix, name);
                Problem::invalid(field.clone(), "missing_field", format!("`{field}` is required"))
            })
        };
        let kind = match (&self.post_pending_id, &self.void_pending_id) {
            (Some(_), Some(_)) => {
                forbid(true, "void_pending_id", "together with `post_pending_id`")?;
                unreachable!()
            }
            (Some(pending), None) | (None, Some(pending)) => {
                let post = self.post_pending_id.is_some();
                let why = "when posting or voiding a hold";
                forbid(self.debit_account_id.is_some(), "debit_account_id", why)?;
                forbid(self.credit_account_id.is_some(), "credit_account_id", why)?;
                forbid(self.pending.is_some(), "pending", why)?;
                forbid(self.timeout_seconds.is_some(), "timeout_seconds", why)?;
                let name = if post { "post_pending_id" } else { "void_pending_id" };
                let pending_id = TransferId(parse_id(&field_of(&prefix, name), pending)?);
                if post {
                    let amount = self.amount.map(|a| check_amount(&field_of(&prefix, "amount"), a)).transpose()?;
                    EventKind::PostPending { pending_id, amount }
                } else {
                    forbid(self.amount.is_some(), "amount", "when voiding a hold")?;
                    EventKind::VoidPending { pending_id }
                }
            }
            (None, None) => {
                let debit = require(self.debit_account_id.as_ref(), "debit_account_id")?;
                let credit = require(self.credit_account_id.as_ref(), "credit_account_id")?;
                let amount = self.amount.ok_or_else(|| {
                    let field = field_of(&prefix, "amount");
                    Problem::invalid(field.clone(), "missing_field", format!("`{field}` is required"))
                })?;
                transfer_kind(&prefix, &debit, &credit, amount, self.pending.unwrap_or(false), self.timeout_seconds)?
            }
        };
        EventParts { prefix: &prefix, tenant, id: &self.id, code: self.code, metadata: self.metadata }.finish(kind)
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct TransferView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub debit_account_id: String,
    #[schema(format = Uuid)]
    pub credit_account_id: String,
    pub amount: u64,
    pub currency: String,
    /// `posted`, `pending`, `post_pending` or `void_pending`.
    pub kind: &'static str,
    /// `posted` or `voided` for moves and resolutions; for a hold: `pending`, `posted`, `voided`
    /// or `expired`.
    pub status: &'static str,
    #[schema(format = Uuid)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub code: u16,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    pub timestamp: u64,
    pub created_at: String,
}

/// A transfer's `kind` and `status`, as its view names them.
fn kind_and_status(t: &Transfer) -> (&'static str, &'static str) {
    match (t.kind, t.state) {
        (TransferKind::Posted, _) => ("posted", "posted"),
        (TransferKind::PostPending, _) => ("post_pending", "posted"),
        (TransferKind::VoidPending, _) => ("void_pending", "voided"),
        (TransferKind::Pending, PendingState::Posted) => ("pending", "posted"),
        (TransferKind::Pending, PendingState::Voided) => ("pending", "voided"),
        (TransferKind::Pending, PendingState::Expired) => ("pending", "expired"),
        (TransferKind::Pending, _) => ("pending", "pending"),
    }
}

impl TransferView {
    /// [`TransferView::of`] as JSON, written straight into the buffer: the bytes `serde_json`
    /// writes for the view (a test holds the two together), without making the view's strings
    /// and scanning each for characters to escape. The answer to a single transfer is the
    /// busiest route's reply.
    pub fn json(t: &Transfer) -> Vec<u8> {
        fn uuid(out: &mut Vec<u8>, name: &[u8], v: u128) {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            out.extend_from_slice(name);
            out.push(b'"');
            out.extend_from_slice(uuid::Uuid::from_u128(v).hyphenated().encode_lower(&mut buf).as_bytes());
            out.push(b'"');
        }
        fn number(out: &mut Vec<u8>, name: &[u8], v: u64) {
            out.extend_from_slice(name);
            push_decimal(out, v);
        }
        fn time(out: &mut Vec<u8>, name: &[u8], nanos: u64) {
            out.extend_from_slice(name);
            out.push(b'"');
            out.extend_from_slice(rfc3339(nanos).as_bytes());
            out.push(b'"');
        }
        let (kind, status) = kind_and_status(t);
        let mut out = Vec::with_capacity(512);
        uuid(&mut out, b"{\"id\":", t.key.id.0);
        uuid(&mut out, b",\"debit_account_id\":", t.debit_account_id.0);
        uuid(&mut out, b",\"credit_account_id\":", t.credit_account_id.0);
        number(&mut out, b",\"amount\":", t.amount);
        out.extend_from_slice(b",\"currency\":");
        serde_json::to_writer(&mut out, t.currency.as_str()).expect("a string serializes");
        for (name, value) in [(&b",\"kind\":\""[..], kind), (b",\"status\":\"", status)] {
            out.extend_from_slice(name);
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        }
        if let Some(p) = t.pending_id {
            uuid(&mut out, b",\"pending_id\":", p.0);
        }
        if t.kind == TransferKind::Pending {
            number(&mut out, b",\"timeout_seconds\":", u64::from(t.timeout_seconds));
        }
        if let Some(at) = t.expires_at {
            time(&mut out, b",\"expires_at\":", at);
        }
        number(&mut out, b",\"code\":", u64::from(t.code));
        out.extend_from_slice(b",\"metadata\":");
        match metadata_value(&t.metadata) {
            Some(value) => serde_json::to_writer(&mut out, &value).expect("a JSON value serializes"),
            None => out.extend_from_slice(b"null"),
        }
        number(&mut out, b",\"timestamp\":", t.timestamp);
        time(&mut out, b",\"created_at\":", t.timestamp);
        out.push(b'}');
        out
    }

    pub fn of(t: &Transfer) -> TransferView {
        let (kind, status) = kind_and_status(t);
        TransferView {
            id: uuid_string(t.key.id.0),
            debit_account_id: uuid_string(t.debit_account_id.0),
            credit_account_id: uuid_string(t.credit_account_id.0),
            amount: t.amount,
            currency: t.currency.as_str().to_owned(),
            kind,
            status,
            pending_id: t.pending_id.map(|p| uuid_string(p.0)),
            timeout_seconds: (t.kind == TransferKind::Pending).then_some(t.timeout_seconds),
            expires_at: t.expires_at.map(rfc3339),
            code: t.code,
            metadata: metadata_value(&t.metadata),
            timestamp: t.timestamp,
            created_at: rfc3339(t.timestamp),
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct BatchResult {
    pub index: usize,
    #[schema(format = Uuid)]
    pub id: String,
    /// The ledger result code: `created`, `exists`, or the reason it failed.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferView>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct BatchView {
    pub results: Vec<BatchResult>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct TransferPage {
    pub data: Vec<TransferView>,
    /// Pass as `cursor` to get the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    /// 1..=200 characters.
    pub name: String,
}

/// `POST /v1/tenants/{id}/api-keys` (the body is optional).
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyBody {
    /// Limit the key to these scopes (as OAuth clients are); absent: every scope.
    pub scopes: Option<Vec<String>>,
}

/// No `Debug`: it holds a secret.
#[derive(Serialize, ToSchema)]
pub struct ApiKeyView {
    #[schema(format = Uuid)]
    pub id: String,
    /// Shown once; store it now. rtpay keeps only a keyed hash.
    pub secret: String,
    /// The scopes the key is limited to; absent: every scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct TenantView {
    #[schema(format = Uuid)]
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub api_key: ApiKeyView,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_is_decimal_digits_only() {
        assert_eq!(digits::<usize>("0"), Some(0));
        assert_eq!(digits::<usize>("0042"), Some(42));
        assert_eq!(digits::<u64>("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "+1", "-1", " 1", "1 ", "1.0", "1e3", "0x10", "١"] {
            assert_eq!(digits::<u64>(bad), None, "{bad:?}");
        }
        assert_eq!(digits::<u64>("18446744073709551616"), None, "past the type's range");
    }

    /// The hand-written JSON of a transfer's view is what `serde_json` writes for it, for every
    /// kind and state, with and without metadata, hold and expiry.
    #[test]
    fn a_transfers_json_is_what_serde_writes_for_its_view() {
        use ledger::{AccountId, Currency, TenantId, TransferId, TransferKey};
        let base = Transfer {
            key: TransferKey { tenant: TenantId(1), id: TransferId(0x0190_a000_0000_7000_8000_0000_0000_0001) },
            debit_account_id: AccountId(u128::MAX),
            credit_account_id: AccountId(7),
            amount: 1,
            currency: Currency::parse("BRL").unwrap(),
            kind: TransferKind::Posted,
            pending_id: None,
            amount_defaulted: false,
            timeout_seconds: 0,
            expires_at: None,
            code: 0,
            metadata: None,
            timestamp: 1_796_470_810_078_063_726,
            state: PendingState::Final,
        };
        let mut cases = vec![base.clone()];
        for state in [PendingState::Pending, PendingState::Posted, PendingState::Voided, PendingState::Expired] {
            cases.push(Transfer {
                kind: TransferKind::Pending,
                timeout_seconds: 3600,
                expires_at: Some(base.timestamp + 3_600_000_000_000),
                state,
                ..base.clone()
            });
        }
        cases.push(Transfer { kind: TransferKind::Pending, state: PendingState::Pending, ..base.clone() });
        for kind in [TransferKind::PostPending, TransferKind::VoidPending] {
            cases.push(Transfer { kind, pending_id: Some(TransferId(42)), amount_defaulted: true, ..base.clone() });
        }
        cases.push(Transfer {
            amount: u64::MAX >> 1,
            code: u16::MAX,
            currency: Currency::parse("JPY").unwrap(),
            metadata: Some(r#"{"z":[1,2.5,"a\"b\u0001"],"a":{"nested":null},"é":true}"#.into()),
            timestamp: 1,
            ..base.clone()
        });
        for t in &cases {
            let serde = serde_json::to_vec(&TransferView::of(t)).unwrap();
            assert_eq!(String::from_utf8(TransferView::json(t)).unwrap(), String::from_utf8(serde).unwrap());
        }
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
        assert_eq!(rfc3339(1_795_312_886_000_000_000), "2026-11-22T02:01:26.000000000Z");
        assert_eq!(rfc3339(1_795_312_886_123_456_789 + 3_599_000_000_000), "2026-11-22T03:01:25.123456789Z");
        assert_eq!(rfc3339(u64::MAX), "2554-07-21T23:34:33.709551615Z");
    }

    #[test]
    fn uuid_strings_are_hyphenated_lower_case() {
        let v = 0x0190_A1B2_C3D4_7E5F_8A9B_0C1D_2E3F_4A5Bu128;
        assert_eq!(uuid_string(v), "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(uuid_string(v), uuid::Uuid::from_u128(v).to_string());
    }

    #[test]
    fn ids_must_be_uuids_and_not_nil() {
        assert!(parse_id("id", "not-a-uuid").is_err());
        assert_eq!(parse_id("id", "00000000-0000-0000-0000-000000000000").unwrap_err().code, "invalid_uuid");
        assert_eq!(parse_id("id", "00000000-0000-0000-0000-000000000001").unwrap(), 1);
    }
}
