//! Card products, cards (issued on ledger accounts, numbers only in the vault), their lifecycle,
//! the audited reveal, and the authorizations the network sent for them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use ledger::{AccountCommand, AccountFlags, AccountId, AccountKey, AccountResult, Currency, NewAccount};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit_trail::Audit;
use crate::auth::{new_uuid, random_32, Tenant};
use crate::card_network::{
    cvk_record, pan_record, seal_pan, settlement_key, AuthorizationView, LimitsBody, StoredCard, StoredProduct,
};
use crate::dto::{civil_date, parse_id, rfc3339, uuid_string};
use crate::json::{reply, Json, Params, Path};
use crate::oauth::{base64_decode, base64_encode};
use crate::problem::Problem;
use crate::routes::query;
use crate::vault_service::VaultFailure;
use crate::AppState;

pub const PRODUCT_NAME_LEN_MAX: usize = 100;
pub const BLOCKED_MCCS_MAX: usize = 100;
/// Cards are valid this many years from issue (to the end of the month).
pub const CARD_VALIDITY_YEARS: i64 = 4;
/// Authorizations per card within a minute before the next is declined (59), unless the product
/// says otherwise.
pub const VELOCITY_PER_MINUTE_DEFAULT: u32 = 30;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductBody {
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    /// 6 to 8 digits, unique across the platform.
    #[schema(pattern = "^[0-9]{6,8}$")]
    pub bin: String,
    /// ISO 4217, e.g. `BRL`.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// e.g. `visa`, `mastercard`, `elo`.
    #[schema(pattern = r"^\s*[A-Za-z0-9-]{1,32}\s*$")]
    pub network: String,
    pub limits: Option<LimitsBody>,
    /// Authorizations a card may ask for in a minute (default 30).
    #[schema(minimum = 1, maximum = 10000)]
    pub velocity_per_minute: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct ProductView {
    pub id: String,
    pub name: String,
    pub bin: String,
    pub currency: String,
    pub network: String,
    pub limits: LimitsBody,
    pub velocity_per_minute: u32,
    /// The tenant's card settlement account for the currency (what it owes the network).
    pub settlement_account_id: String,
    pub created_at: String,
}

fn product_view(id: u128, p: &StoredProduct) -> ProductView {
    ProductView {
        id: uuid_string(id),
        name: p.name.clone(),
        bin: p.bin.clone(),
        currency: p.currency.clone(),
        network: p.network.clone(),
        limits: p.limits,
        velocity_per_minute: p.velocity_per_minute,
        settlement_account_id: p.settlement_account_id.clone(),
        created_at: p.created_at.clone(),
    }
}

fn check_limits(field: &str, limits: &LimitsBody) -> Result<(), Problem> {
    for (name, value) in
        [("per_transaction", limits.per_transaction), ("daily", limits.daily), ("monthly", limits.monthly)]
    {
        if value.is_some_and(|v| v == 0 || v > ledger::AMOUNT_MAX) {
            return Err(Problem::invalid(
                format!("{field}.{name}"),
                "invalid_limit",
                format!("`{field}.{name}` must be 1..={}", ledger::AMOUNT_MAX),
            ));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/card-products", tag = "cards", request_body = ProductBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a creation safe to retry: a repeat answers the product it made")),
    responses((status = 201, body = ProductView), (status = 200, body = ProductView, description = "a repeat under the same Idempotency-Key"),
        (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_product(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    headers: axum::http::HeaderMap,
    Json(body): Json<ProductBody>,
) -> Result<Response, Problem> {
    tenant.require("cards:write")?;
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let name = crate::dto::display_name("name", &body.name, PRODUCT_NAME_LEN_MAX)?;
    if !cards::pan::valid_bin(&body.bin) {
        return Err(Problem::invalid("bin", "invalid_bin", "`bin` must be 6 to 8 digits"));
    }
    let currency = Currency::parse(&body.currency)
        .map_err(|e| Problem::invalid("currency", "invalid_currency", format!("`currency` {e}")))?;
    let network = body.network.trim().to_ascii_lowercase();
    if network.is_empty() || network.len() > 32 || !network.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Problem::invalid("network", "invalid_network", "`network` must be 1..=32 letters, digits or `-`"));
    }
    let limits = body.limits.unwrap_or_default();
    check_limits("limits", &limits)?;
    let velocity = body.velocity_per_minute.unwrap_or(VELOCITY_PER_MINUTE_DEFAULT);
    if velocity == 0 || velocity > 10_000 {
        return Err(Problem::invalid(
            "velocity_per_minute",
            "invalid_velocity",
            "`velocity_per_minute` must be 1..=10000",
        ));
    }
    let id = match crate::routes::tenants::idempotency_key(&headers)? {
        Some(key) => state.keys.derived_id(b"card-product", tenant.id, &key).as_u128(),
        None => new_uuid().as_u128(),
    };
    audit.0.set_resource(uuid_string(id));
    let taken = || Problem::new(StatusCode::CONFLICT, "exists", "a card product with this BIN exists").field("bin");
    // A repeat under its Idempotency-Key finds the product it made: the same BIN, name, currency,
    // network, limits and velocity answer it; anything else is a conflict.
    let tenant_id = tenant.id;
    let repeat = |made: Option<String>| -> Result<Option<StoredProduct>, Problem> {
        let Some(made) = made else { return Ok(None) };
        let made: StoredProduct = serde_json::from_str(&made).map_err(|_| Problem::internal())?;
        let same = made.bin == body.bin
            && made.name == name
            && made.currency == currency.as_str()
            && made.network == network
            && made.limits == limits
            && made.velocity_per_minute == velocity;
        match same {
            true => Ok(Some(made)),
            false => Err(Problem::new(
                StatusCode::CONFLICT,
                "exists_with_different_fields",
                "a card product was already made under this Idempotency-Key with other fields",
            )
            .field("Idempotency-Key")),
        }
    };
    if let Some(made) = repeat(query(&state, move |q| q.card_product(tenant_id, id)).await?)? {
        return Ok(reply(StatusCode::OK, &product_view(id, &made)));
    }
    // A BIN already taken is refused before anything is made (the insert below still decides a
    // race between two requests for one BIN).
    let bin = body.bin.clone();
    if query(&state, move |q| q.card_bin_taken(&bin)).await? {
        return Err(taken());
    }
    // The settlement account first (idempotent), so no product exists without it; the request's
    // own entry is the middleware's.
    let settlement = settlement_key(&state, tenant.id, currency);
    let open = AccountCommand::Create(NewAccount {
        key: settlement,
        currency,
        code: crate::dto::CARD_CODE,
        flags: AccountFlags::default(),
        credit_limit: 0,
        metadata: Some(r#"{"rtpay":"card settlement"}"#.into()),
        holder: None,
    });
    match crate::routes::submit_unrecorded(&state, store::Command::Accounts(vec![open])).await? {
        store::Reply::Accounts(r) if matches!(r.first(), Some((AccountResult::Created | AccountResult::Exists, _))) => {
        }
        _ => return Err(Problem::internal()),
    }
    let mut product = StoredProduct {
        name: name.clone(),
        bin: body.bin.clone(),
        currency: currency.as_str().to_owned(),
        network: network.clone(),
        limits,
        velocity_per_minute: velocity,
        cvk_sealed: String::new(),
        settlement_account_id: uuid_string(settlement.id.0),
        created_at: rfc3339(store::now_nanos()),
    };
    let stored = product.clone();
    let result = query(&state, move |q| {
        Ok((|| -> Result<StoredProduct, VaultFailure> {
            let dek = vault.data_key(q, tenant_id)?;
            let cvk = random_32();
            let mut stored = stored;
            stored.cvk_sealed = base64_encode(&vault::seal(&dek, &cvk_record(tenant_id, id), &cvk[..16])?);
            let body = serde_json::to_string(&stored).expect("serializable");
            q.create_card_product(tenant_id, id, &stored.bin, &body)?;
            Ok(stored)
        })())
    })
    .await?;
    product = match result {
        Ok(made) => made,
        // The BIN taken meanwhile: by a repeat running alongside (the same key), or by another.
        Err(VaultFailure::Store(store::StoreError::Conflict(_))) => {
            return match repeat(query(&state, move |q| q.card_product(tenant_id, id)).await?)? {
                Some(made) => Ok(reply(StatusCode::OK, &product_view(id, &made))),
                None => Err(taken()),
            };
        }
        Err(f) => return Err(Problem::from(f)),
    };
    Ok(reply(StatusCode::CREATED, &product_view(id, &product)))
}

#[utoipa::path(get, path = "/v1/card-products/{id}", tag = "cards", params(("id" = String, Path)),
    responses((status = 200, body = ProductView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_product(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("cards:read")?;
    let id = parse_id("id", &id)?;
    let tenant_id = tenant.id;
    let body = query(&state, move |q| q.card_product(tenant_id, id))
        .await?
        .ok_or_else(|| Problem::not_found("card product"))?;
    let product: StoredProduct = serde_json::from_str(&body).map_err(|_| Problem::internal())?;
    Ok(reply(StatusCode::OK, &product_view(id, &product)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CardBody {
    #[schema(format = Uuid)]
    pub account_id: String,
    #[schema(format = Uuid)]
    pub product_id: String,
    #[schema(format = Uuid)]
    pub holder_id: Option<String>,
    /// `virtual` (active at once) or `physical` (inactive until activated).
    #[serde(rename = "type")]
    #[schema(value_type = CardType)]
    pub kind: String,
    pub limits: Option<LimitsBody>,
    /// Merchant category codes (4 digits) the card may not be used at.
    #[schema(value_type = Option<Vec<Mcc>>, max_items = 100)]
    pub blocked_mccs: Option<Vec<String>>,
    /// Card-not-present (e-commerce, keyed) use; default true.
    pub ecommerce: Option<bool>,
}

/// A card's type, for the document (the body reads it as text and names the field when it is
/// neither).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum CardType {
    Virtual,
    Physical,
}

/// A merchant category code, for the document.
#[derive(ToSchema)]
#[schema(pattern = "^[0-9]{4}$")]
#[allow(dead_code)]
pub struct Mcc(String);

#[derive(Serialize, ToSchema)]
pub struct CardView {
    pub id: String,
    pub account_id: String,
    pub product_id: String,
    pub holder_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    /// BIN and last four digits; the rest masked.
    pub number: String,
    pub last4: String,
    /// `MM/YY`.
    pub expiry: String,
    pub status: String,
    pub limits: LimitsBody,
    pub blocked_mccs: Vec<String>,
    pub ecommerce: bool,
    pub created_at: String,
}

fn mm_yy(yymm: &str) -> String {
    format!("{}/{}", &yymm[2..], &yymm[..2])
}

fn card_view(id: u128, status: &str, c: &StoredCard) -> CardView {
    CardView {
        id: uuid_string(id),
        account_id: c.account_id.clone(),
        product_id: c.product_id.clone(),
        holder_id: c.holder_id.clone(),
        kind: c.kind.clone(),
        number: format!("{}{}{}", c.bin, "*".repeat(16 - c.bin.len() - 4), c.last4),
        last4: c.last4.clone(),
        expiry: mm_yy(&c.expiry),
        status: status.to_owned(),
        limits: c.limits,
        blocked_mccs: c.blocked_mccs.clone(),
        ecommerce: c.ecommerce,
        created_at: c.created_at.clone(),
    }
}

/// A decimal digit from the OS CSPRNG, without modulo bias.
fn random_digit() -> u8 {
    loop {
        let b = random_32()[0];
        if b < 250 {
            return b % 10;
        }
    }
}

#[utoipa::path(post, path = "/v1/cards", tag = "cards", request_body = CardBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a creation safe to retry: a repeat answers the card it made")),
    responses((status = 201, body = CardView), (status = 200, body = CardView, description = "a repeat under the same Idempotency-Key"),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_card(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    headers: axum::http::HeaderMap,
    Json(body): Json<CardBody>,
) -> Result<Response, Problem> {
    tenant.require("cards:write")?;
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let account_id = parse_id("account_id", &body.account_id)?;
    let product_id = parse_id("product_id", &body.product_id)?;
    let holder_id = body.holder_id.as_deref().map(|h| parse_id("holder_id", h)).transpose()?;
    let status = match body.kind.as_str() {
        "virtual" => cards::CardStatus::Active,
        "physical" => cards::CardStatus::Inactive,
        _ => return Err(Problem::invalid("type", "invalid_type", "`type` must be `virtual` or `physical`")),
    };
    let limits = body.limits.unwrap_or_default();
    check_limits("limits", &limits)?;
    let blocked = body.blocked_mccs.unwrap_or_default();
    if blocked.len() > BLOCKED_MCCS_MAX {
        return Err(Problem::invalid("blocked_mccs", "too_many", format!("at most {BLOCKED_MCCS_MAX} codes")));
    }
    for (i, mcc) in blocked.iter().enumerate() {
        if mcc.len() != 4 || !mcc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Problem::invalid(
                format!("blocked_mccs[{i}]"),
                "invalid_mcc",
                "a merchant category code is 4 digits",
            ));
        }
    }
    let tenant_id = tenant.id;
    // A retry under its Idempotency-Key names the card it made: no second number is issued.
    let keyed = crate::routes::tenants::idempotency_key(&headers)?;
    let id = match &keyed {
        Some(key) => state.keys.derived_id(b"card", tenant.id, key).as_u128(),
        None => new_uuid().as_u128(),
    };
    let (product, account, holder, made) = query(&state, {
        let keyed = keyed.is_some();
        move |q| {
            Ok((
                q.card_product(tenant_id, product_id)?,
                q.account(AccountKey { tenant: ledger::TenantId(tenant_id), id: AccountId(account_id) })?,
                match holder_id {
                    Some(h) => Some(q.holder(tenant_id, h)?.is_some()),
                    None => None,
                },
                if keyed { q.card(tenant_id, id)? } else { None },
            ))
        }
    })
    .await?;
    // A repeat is answered before the checks of the moment (an account closed since, say): the
    // card was made, and the client that lost the answer learns it.
    if let Some(row) = made {
        let found: StoredCard = serde_json::from_str(&row.body).map_err(|_| Problem::internal())?;
        let asked = StoredCard {
            product_id: uuid_string(product_id),
            account_id: uuid_string(account_id),
            holder_id: holder_id.map(uuid_string),
            kind: body.kind.clone(),
            limits,
            blocked_mccs: blocked.clone(),
            ecommerce: body.ecommerce.unwrap_or(true),
            ..found.clone()
        };
        audit.0.set_resource(uuid_string(id));
        return repeat_answer(id, &row.status, &found, &asked);
    }
    let product: StoredProduct = match product {
        Some(p) => serde_json::from_str(&p).map_err(|_| Problem::internal())?,
        None => {
            return Err(Problem::invalid(
                "product_id",
                "unknown_product",
                "`product_id` names no card product of this tenant",
            ))
        }
    };
    let Some(account) = account else {
        return Err(Problem::invalid("account_id", "unknown_account", "`account_id` names no account of this tenant"));
    };
    if account.currency.as_str() != product.currency {
        return Err(Problem::invalid("account_id", "currency_mismatch", "the account's currency is not the product's"));
    }
    if account.flags.closed() {
        return Err(Problem::invalid("account_id", "account_closed", "the account is closed"));
    }
    if holder == Some(false) {
        return Err(Problem::invalid("holder_id", "unknown_holder", "`holder_id` names no holder of this tenant"));
    }
    // A card spends its account's money: it is for the account's holder, where the account has one.
    if let (Some(owner), Some(named)) = (account.holder, holder_id) {
        if owner != named {
            return Err(Problem::invalid(
                "holder_id",
                "holder_mismatch",
                "`holder_id` is not the holder of the account the card spends from",
            ));
        }
    }
    audit.0.set_resource(uuid_string(id));
    let now = store::now_nanos();
    let (y, m, _) = civil_date(now);
    let expiry = format!("{:02}{:02}", (y + CARD_VALIDITY_YEARS) % 100, m);
    let template = StoredCard {
        product_id: uuid_string(product_id),
        account_id: uuid_string(account_id),
        holder_id: holder_id.map(uuid_string),
        kind: body.kind.clone(),
        bin: product.bin.clone(),
        last4: String::new(),
        expiry,
        limits,
        blocked_mccs: blocked,
        ecommerce: body.ecommerce.unwrap_or(true),
        pan_sealed: String::new(),
        created_at: rfc3339(now),
        blocked_inactive: false,
    };
    let result = query(&state, {
        let template = template.clone();
        move |q| {
            Ok((|| -> Result<Result<StoredCard, (String, StoredCard)>, VaultFailure> {
                // The card this id already names (a repeat), if any.
                let made = || -> Result<Option<(String, StoredCard)>, VaultFailure> {
                    let Some(row) = q.card(tenant_id, id)? else { return Ok(None) };
                    let card = serde_json::from_str(&row.body)
                        .map_err(|_| store::StoreError::Corrupt("a card's stored body".into()))?;
                    Ok(Some((row.status, card)))
                };
                if let Some(found) = made()? {
                    return Ok(Err(found));
                }
                // A number already issued (on this platform) is drawn again.
                for _ in 0..8 {
                    let pan = cards::pan::generate(&template.bin, random_digit);
                    let (sealed, index) = seal_pan(&vault, q, tenant_id, id, &pan)?;
                    let mut card = template.clone();
                    card.last4 = pan[pan.len() - 4..].to_owned();
                    card.pan_sealed = base64_encode(&sealed);
                    let row = store::CardRow {
                        tenant_id,
                        id,
                        pan_index: index,
                        status: status.as_str().to_owned(),
                        body: serde_json::to_string(&card).expect("serializable"),
                    };
                    match q.create_card(&row) {
                        Ok(()) => return Ok(Ok(card)),
                        // The same id made meanwhile (a repeat running alongside), or the number taken.
                        Err(store::StoreError::Conflict(_)) => match made()? {
                            Some(found) => return Ok(Err(found)),
                            None => continue,
                        },
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(VaultFailure::Store(store::StoreError::Unavailable("no free card number in this BIN".into())))
            })())
        }
    })
    .await?;
    match result.map_err(Problem::from)? {
        Ok(card) => Ok(reply(StatusCode::CREATED, &card_view(id, status.as_str(), &card))),
        Err((status, found)) => repeat_answer(id, &status, &found, &template),
    }
}

/// The answer to a repeat under an `Idempotency-Key` that made `found`: the card, when `asked` is
/// the same request; else 409.
fn repeat_answer(id: u128, status: &str, found: &StoredCard, asked: &StoredCard) -> Result<Response, Problem> {
    if same_request(found, asked) {
        return Ok(reply(StatusCode::OK, &card_view(id, status, found)));
    }
    Err(Problem::new(
        StatusCode::CONFLICT,
        "exists_with_different_fields",
        "a card was already made under this Idempotency-Key with other fields",
    )
    .field("Idempotency-Key"))
}

/// Whether a card made before asked for what `card` asks: the same account, product, holder, type,
/// limits, blocked codes and e-commerce setting.
fn same_request(made: &StoredCard, card: &StoredCard) -> bool {
    let asked = |c: &StoredCard| {
        (
            c.product_id.clone(),
            c.account_id.clone(),
            c.holder_id.clone(),
            c.kind.clone(),
            c.blocked_mccs.clone(),
            c.ecommerce,
        )
    };
    asked(made) == asked(card) && made.limits == card.limits
}

async fn load_card(state: &AppState, tenant: &Tenant, id: &str) -> Result<(store::CardRow, StoredCard), Problem> {
    let id = parse_id("id", id)?;
    let tenant_id = tenant.id;
    let row = query(state, move |q| q.card(tenant_id, id)).await?.ok_or_else(|| Problem::not_found("card"))?;
    let card = serde_json::from_str(&row.body).map_err(|_| Problem::internal())?;
    Ok((row, card))
}

#[utoipa::path(get, path = "/v1/cards/{id}", tag = "cards", params(("id" = String, Path)),
    responses((status = 200, body = CardView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_card(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("cards:read")?;
    let (row, card) = load_card(&state, &tenant, &id).await?;
    Ok(reply(StatusCode::OK, &card_view(row.id, &row.status, &card)))
}

#[utoipa::path(post, path = "/v1/cards/{id}/{action}", tag = "cards",
    params(("id" = String, Path), ("action" = String, Path, description = "activate, block, unblock or cancel")),
    responses((status = 200, body = CardView), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("api_key" = [])))]
pub async fn card_action(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, Problem> {
    if action == "reveal" {
        return reveal(state, tenant, audit, id).await;
    }
    tenant.require("cards:write")?;
    let action = cards::Action::parse(&action).ok_or_else(|| Problem::not_found("card action"))?;
    let (row, card) = load_card(&state, &tenant, &id).await?;
    audit.0.set_resource(uuid_string(row.id));
    let current = cards::CardStatus::parse(&row.status).ok_or_else(Problem::internal)?;
    let next = current.after(action, card.blocked_inactive).ok_or_else(|| {
        Problem::new(
            StatusCode::CONFLICT,
            "invalid_transition",
            format!("`{}` is not allowed for a {} card", format!("{action:?}").to_lowercase(), current.as_str()),
        )
    })?;
    let card = StoredCard {
        blocked_inactive: next == cards::CardStatus::Blocked && current == cards::CardStatus::Inactive,
        ..card
    };
    let body = serde_json::to_string(&card).map_err(|_| Problem::internal())?;
    let updated = store::CardRow { status: next.as_str().to_owned(), body, ..row.clone() };
    let expected = row.status.clone();
    let stored = updated.clone();
    if !query(&state, move |q| q.update_card(&stored, &expected)).await? {
        return Err(Problem::new(StatusCode::CONFLICT, "conflict", "the card changed meanwhile; read it and retry"));
    }
    Ok(reply(StatusCode::OK, &card_view(updated.id, &updated.status, &card)))
}

#[derive(Serialize, ToSchema)]
pub struct RevealView {
    pub id: String,
    /// The full card number. Keep it out of logs.
    pub number: String,
    /// `MM/YY`.
    pub expiry: String,
    /// Computed from the product's card verification key; never stored.
    pub cvv2: String,
}

/// `POST /v1/cards/{id}/reveal` (scope `cards:reveal`): the full number, expiry and CVV2, once per
/// request and recorded in the audit log.
async fn reveal(state: AppState, tenant: Tenant, audit: Audit, id: String) -> Result<Response, Problem> {
    tenant.require("cards:reveal")?;
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let (row, card) = load_card(&state, &tenant, &id).await?;
    audit.0.set_resource(format!("card:{} reveal", uuid_string(row.id)));
    if row.status == "cancelled" {
        return Err(Problem::new(StatusCode::CONFLICT, "card_cancelled", "a cancelled card is not revealed"));
    }
    let product_id = parse_id("product_id", &card.product_id)?;
    let (tenant_id, card_id) = (tenant.id, row.id);
    let sealed_pan = base64_decode(&card.pan_sealed).ok_or_else(Problem::internal)?;
    let expiry = card.expiry.clone();
    let result = query(&state, move |q| {
        Ok((|| -> Result<(String, String), VaultFailure> {
            let dek = vault.data_key(q, tenant_id)?;
            let product: StoredProduct = q
                .card_product(tenant_id, product_id)?
                .and_then(|p| serde_json::from_str(&p).ok())
                .ok_or_else(|| store::StoreError::Corrupt("a card's product is missing".into()))?;
            let pan = vault::open(&dek, &pan_record(tenant_id, card_id), &sealed_pan)?;
            let cvk_sealed = base64_decode(&product.cvk_sealed)
                .ok_or_else(|| store::StoreError::Corrupt("a sealed key is not base64".into()))?;
            let cvk: [u8; 16] = vault::open(&dek, &cvk_record(tenant_id, product_id), &cvk_sealed)?
                .try_into()
                .map_err(|_| store::StoreError::Corrupt("a card verification key is not 16 bytes".into()))?;
            let pan =
                String::from_utf8(pan).map_err(|_| store::StoreError::Corrupt("a card number is not text".into()))?;
            let cvv2 = cards::cvv::cvv(&cvk, &pan, &expiry, cards::cvv::CVV2_SERVICE_CODE);
            Ok((pan, cvv2))
        })())
    })
    .await?;
    let (number, cvv2) = result.map_err(Problem::from)?;
    crate::routes::record_before_answer(&state, &audit, StatusCode::OK).await?;
    Ok(crate::json::secret_reply(
        StatusCode::OK,
        &RevealView { id: uuid_string(row.id), number, expiry: mm_yy(&card.expiry), cvv2 },
    ))
}

#[derive(Serialize, ToSchema)]
pub struct AuthorizationList {
    pub authorizations: Vec<AuthorizationView>,
}

#[utoipa::path(get, path = "/v1/cards/{id}/authorizations", tag = "cards", params(("id" = String, Path), ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1..=1000")),
    responses((status = 200, body = AuthorizationList), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn card_authorizations(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Params(params): Params,
) -> Result<Response, Problem> {
    tenant.require("cards:read")?;
    let limit = match params.get("limit") {
        None => 100,
        Some(l) => crate::dto::digits::<usize>(l)
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| Problem::invalid("limit", "invalid_limit", "`limit` must be 1..=1000"))?,
    };
    let (row, _) = load_card(&state, &tenant, &id).await?;
    let (tenant_id, card_id) = (tenant.id, row.id);
    let rows = query(&state, move |q| q.card_authorizations(tenant_id, card_id, limit)).await?;
    let now = store::now_nanos();
    let authorizations = rows
        .iter()
        .map(|r| serde_json::from_str(&r.body).map(|v| as_of(v, r, now)))
        .collect::<Result<_, _>>()
        .map_err(|_| Problem::internal())?;
    Ok(reply(StatusCode::OK, &AuthorizationList { authorizations }))
}

/// The authorization as it stands at `now`: one whose hold lapsed (the ledger released it; its
/// record is written only by the card network's messages) is shown `expired`, as its record
/// would be once a capture or reversal comes.
fn as_of(mut view: AuthorizationView, row: &store::AuthorizationRow, now: u64) -> AuthorizationView {
    if view.status == "approved" && row.held_until != 0 && row.held_until <= now {
        view.status = "expired".into();
    }
    view
}

#[utoipa::path(get, path = "/v1/authorizations/{id}", tag = "cards", params(("id" = String, Path)),
    responses((status = 200, body = AuthorizationView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_authorization(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("cards:read")?;
    let id = parse_id("id", &id)?;
    let tenant_id = tenant.id;
    let row = query(&state, move |q| q.authorization(tenant_id, id))
        .await?
        .ok_or_else(|| Problem::not_found("authorization"))?;
    let view: AuthorizationView = serde_json::from_str(&row.body).map_err(|_| Problem::internal())?;
    Ok(reply(StatusCode::OK, &as_of(view, &row, store::now_nanos())))
}
