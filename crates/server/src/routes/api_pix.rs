//! The Central Bank's API Pix (receiver side), as `shared/spec/pix-api/openapi.yaml` v2.9.0
//! describes it, under `/api/v2`: immediate charges (`cob`), received Pix (`pix`) and their
//! refunds (`devolucao`). Errors are the spec's `Problema` (`type`
//! `https://pix.bcb.gov.br/api/v2/error/<TipoErro>`, `violacoes`), with the status codes each
//! operation documents. Every money movement is a ledger transfer made by `pix_rail`.
//!
//! A charge is kept as a document: its revisions (the payer-facing content, keys and the debtor's
//! document included) sealed under the tenant's data key, its status and the Pix that concluded it
//! in clear, and its location (the dynamic BR Code's URL) as the document's unique lookup.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pix::charge::CobStatus;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audit_trail::Audit;
use crate::auth::{random_32, Tenant};
use crate::dto::{rfc3339, uuid_string};
use crate::json::{reply, Path};
use crate::oauth::{base64_decode, base64_encode};
use crate::pix_rail::*;
use crate::problem::Problem;
use crate::routes::pix::find_key;
use crate::routes::query;
use crate::vault_service::VaultFailure;
use crate::AppState;

pub mod cobv;
pub mod lote;

pub const COB_KIND: &str = "pix-cob";
pub const REFUND_KIND: &str = "pix-refund";
/// Revisions kept per charge: a change of content beyond answers 400 (a removal is always taken,
/// as the last).
pub const REVISIONS_MAX: usize = 100;
/// Rows a listing reads at most to answer one page (pages beyond read as empty).
pub const LISTING_SCAN_MAX: usize = 10_000;
/// Refunds one Pix may have (each listing of them reads one page).
pub const REFUNDS_MAX: usize = store::PAGE_LEN_MAX - 1;
/// The storage id of a MED return's refund: `:` is not in a refund id, so no refund can take it.
/// The refund id a MED return is listed and notified under; no refund request may take it.
pub const MED_REFUND_ID: &str = "MED";

pub fn med_refund_doc_id(e2e: &str) -> String {
    format!("{e2e}:#med")
}

/// What a MED return's webhook notification is recorded under after the Pix's EndToEndId (its
/// delivery id `{e2e}:MED<claim>`): `MED` and the claim's id, hex without hyphens — one per claim.
/// Under one id for every claim, a claim opened again after a failed return would be notified
/// under the id of the first's notification, which a receiver that drops repeats by delivery id
/// (as it should) would drop.
pub fn med_notified_as(claim_id: &str) -> String {
    format!("{MED_REFUND_ID}{}", claim_id.replace('-', ""))
}

/// Whether `id` is one no refund request may take: `MED`, or the shape of a MED return's
/// notification ([`med_notified_as`]), so that no refund's notification shares its delivery id.
fn reserved_refund_id(id: &str) -> bool {
    id == MED_REFUND_ID
        || (id.len() == MED_REFUND_ID.len() + 32
            && id.starts_with(MED_REFUND_ID)
            && id.as_bytes()[MED_REFUND_ID.len()..].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}
/// Refunds are accepted for 90 days after the Pix settled (`shared/spec/SOURCES.md`).
pub const REFUND_WINDOW_NANOS: u64 = 90 * 86_400 * 1_000_000_000;
/// Additional information items a charge may carry (the spec's `infoAdicionais`).
pub const INFO_ITEMS_MAX: usize = 50;
const ERROR_BASE: &str = "https://pix.bcb.gov.br/api/v2/error/";

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Serialize, Debug, Clone)]
pub struct Violacao {
    pub razao: String,
    pub propriedade: String,
}

/// The spec's `Problema`.
#[derive(Debug, Clone)]
pub struct PixError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub detail: String,
    pub violacoes: Vec<Violacao>,
    pub retry_after_seconds: Option<u32>,
}

impl PixError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> PixError {
        PixError {
            status,
            kind,
            detail: vault::mask::redact_pans(&detail.into()),
            violacoes: vec![],
            retry_after_seconds: None,
        }
    }

    /// 400 of `kind` naming the property and the rule it breaks.
    pub fn violation(kind: &'static str, propriedade: &str, razao: impl Into<String>) -> PixError {
        let razao = vault::mask::redact_pans(&razao.into());
        let mut e = PixError::new(StatusCode::BAD_REQUEST, kind, format!("{propriedade}: {razao}"));
        e.violacoes.push(Violacao { razao, propriedade: propriedade.to_owned() });
        e
    }
}

impl IntoResponse for PixError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("{ERROR_BASE}{}", self.kind),
            "title": self.status.canonical_reason().unwrap_or("Erro"),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "violacoes": self.violacoes,
        });
        let mut response = (self.status, serde_json::to_vec(&body).expect("serializable")).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(s) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// rtpay's own problems (scopes, storage, the vault) in the spec's terms.
impl From<Problem> for PixError {
    fn from(p: Problem) -> PixError {
        let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match status {
            StatusCode::FORBIDDEN => "AcessoNegado",
            StatusCode::NOT_FOUND => "NaoEncontrado",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => "ServicoIndisponivel",
            StatusCode::INTERNAL_SERVER_ERROR => "ErroInternoDoServidor",
            _ => "RequisicaoInvalida",
        };
        let status = match status {
            StatusCode::TOO_MANY_REQUESTS => StatusCode::SERVICE_UNAVAILABLE,
            // A body too large or too slow to arrive keeps its status: it is no schema violation.
            s if s.is_client_error()
                && !matches!(
                    s,
                    StatusCode::FORBIDDEN
                        | StatusCode::NOT_FOUND
                        | StatusCode::REQUEST_TIMEOUT
                        | StatusCode::PAYLOAD_TOO_LARGE
                ) =>
            {
                StatusCode::BAD_REQUEST
            }
            s => s,
        };
        let mut e = PixError::new(status, kind, p.detail);
        if let Some(field) = p.field {
            e.violacoes.push(Violacao { razao: e.detail.clone(), propriedade: field });
        }
        e.retry_after_seconds = p.retry_after_seconds;
        e
    }
}

impl From<VaultFailure> for PixError {
    fn from(f: VaultFailure) -> PixError {
        Problem::from(f).into()
    }
}

impl From<store::StoreError> for PixError {
    fn from(e: store::StoreError) -> PixError {
        Problem::from(e).into()
    }
}

pub(crate) type PixResult<T> = Result<T, PixError>;

/// Runs `f` on the blocking pool, like `routes::query`, for reads whose answer is already a
/// [`PixResult`] (a spec `Problema` or the value).
pub(crate) async fn pix_query<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn store::Queries) -> PixResult<T> + Send + 'static,
) -> PixResult<T> {
    query(state, move |q| Ok(f(q))).await?
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> store::StoreError {
    store::StoreError::Corrupt(e.to_string())
}

/// A request body as every route reads one (`json::limited_body`: at most `json::BODY_LEN_MAX` bytes,
/// a larger declared length refused before any is read, and within `json::BODY_READ_TIMEOUT`),
/// refused in the spec's error form. (axum's `Bytes` waited for a stalled body for good.)
pub struct PixBody(pub Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for PixBody {
    type Rejection = PixError;

    async fn from_request(request: axum::extract::Request, _state: &S) -> Result<Self, PixError> {
        let (parts, body) = request.into_parts();
        let read = crate::json::limited_body(&parts.headers, body, crate::json::BODY_LEN_MAX).await;
        read.map(PixBody).map_err(PixError::from)
    }
}

/// A JSON body of the kind's schema: malformed JSON, wrong types and unknown fields are 400.
pub(crate) fn body_of<T: serde::de::DeserializeOwned>(bytes: &Bytes, kind: &'static str, root: &str) -> PixResult<T> {
    let text = std::str::from_utf8(bytes).map_err(|_| PixError::violation(kind, root, "the body is not UTF-8"))?;
    // Objects only, at every depth (see `json_objects`): a list of a struct's fields is no body.
    let mut de = serde_json::Deserializer::from_str(text);
    T::deserialize(crate::json_objects::Objects(&mut de)).and_then(|v| de.end().map(|()| v)).map_err(|e| {
        // serde's message names the field and the expected type; the values it quotes are left out
        // (a CPF sent as a number), as are unknown keys (a secret pasted as a key).
        let message = e.to_string();
        let message = match crate::json::unknown_field_name(&message) {
            Some(name) if crate::json::shown_as_field(&name) => message,
            // What follows the key (cut at its last `, expected`, as the native API's is), not it.
            Some(name) => {
                let rest = &message["unknown field `".len() + name.len()..];
                format!("an unknown field (its name is not shown){}", rest.strip_prefix('`').unwrap_or(rest))
            }
            // The struct's own names (`missing field `valor``) are shown; what the client sent is
            // not.
            None if message.starts_with("missing field") || message.starts_with("duplicate field") => message,
            None => crate::json::without_values(&message),
        };
        PixError::violation(kind, root, format!("does not respect the schema: {message}"))
    })
}

pub(crate) fn params_of(raw: Option<String>, kind: &'static str) -> PixResult<HashMap<String, String>> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw.as_deref().unwrap_or(""))
        .map(|v| v.into_iter().collect())
        .map_err(|_| PixError::violation(kind, "query", "the query string is malformed"))
}

/// An RFC 3339 date-time (`2020-04-01T00:00:00Z`, `...T12:00:00.5-03:00`) as nanoseconds since
/// the epoch, clamped to what a `u64` of nanoseconds holds.
pub fn parse_date_time(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i128> { crate::dto::digits(text.get(r)?) };
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_nanos: i128 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &text[start..i.min(start + 9)];
        frac_nanos = digits.parse::<i128>().ok()? * 10i128.pow(9 - digits.len() as u32);
    }
    let offset_secs: i128 = match &text[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && tz.as_bytes()[3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm), in i128 so any year fits.
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Some((secs * 1_000_000_000 + frac_nanos).clamp(0, i128::from(u64::MAX)) as u64)
}

/// `paginacao.paginaAtual` (from 0) and `paginacao.itensPorPagina` (1..=1000, default 100).
pub(crate) fn pagination(p: &HashMap<String, String>, kind: &'static str) -> PixResult<(usize, usize)> {
    let page = match p.get("paginacao.paginaAtual") {
        Some(v) => crate::dto::digits::<usize>(v)
            .ok_or_else(|| PixError::violation(kind, "paginacao.paginaAtual", "must be an integer ≥ 0"))?,
        None => 0,
    };
    let per_page = match p.get("paginacao.itensPorPagina") {
        Some(v) => crate::dto::digits::<usize>(v)
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| PixError::violation(kind, "paginacao.itensPorPagina", "must be an integer in 1..=1000"))?,
        None => 100,
    };
    Ok((page, per_page))
}

pub(crate) fn bool_param(p: &HashMap<String, String>, name: &str, kind: &'static str) -> PixResult<Option<bool>> {
    match p.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(PixError::violation(kind, name, "must be true or false")),
    }
}

/// The listing's window, `inicio` and `fim` both required, as `[from, to)`.
pub(crate) fn window(p: &HashMap<String, String>, kind: &'static str) -> PixResult<(u64, u64)> {
    let at = |name: &str| -> PixResult<u64> {
        let text = p.get(name).ok_or_else(|| PixError::violation(kind, name, "is required"))?;
        parse_date_time(text).ok_or_else(|| PixError::violation(kind, name, "must be an RFC 3339 date-time"))
    };
    let (from, to) = (at("inicio")?, at("fim")?);
    ordered(kind, from, to)?;
    Ok((from, to.saturating_add(1)))
}

/// The spec's rule for every listing: `fim` may not be before `inicio`.
fn ordered(kind: &'static str, from: u64, to: u64) -> PixResult<()> {
    if to < from {
        return Err(PixError::violation(kind, "fim", "must not be before inicio"));
    }
    Ok(())
}

/// The spec's rule for the listings filtered by the debtor's or payer's document: a CPF or a
/// CNPJ, not both.
pub(crate) fn one_document(p: &HashMap<String, String>, kind: &'static str) -> PixResult<()> {
    if p.contains_key("cpf") && p.contains_key("cnpj") {
        return Err(PixError::violation(kind, "cnpj", "must not be given with cpf"));
    }
    Ok(())
}

/// `revisao` of `GET /cob/{txid}` and `GET /cobv/{txid}`: a revision the charge has, else the
/// spec's 400 (`kind`, a `ConsultaInvalida`).
pub(crate) fn revision(revisao: Option<&String>, revisions: usize, kind: &'static str) -> PixResult<usize> {
    let no_such = || PixError::violation(kind, "revisao", "the charge has no such revision");
    match revisao {
        None => revisions.checked_sub(1).ok_or_else(|| corrupt("a charge without revisions").into()),
        Some(r) => crate::dto::digits::<usize>(r).filter(|n| *n < revisions).ok_or_else(no_such),
    }
}

/// Every document of the kind in the window that `keep` accepts, up to [`LISTING_SCAN_MAX`] read.
pub(crate) fn scan(
    q: &dyn store::Queries,
    kind: &str,
    tenant: u128,
    (from, to): (u64, u64),
    mut keep: impl FnMut(&store::Document) -> bool,
) -> store::Result<Vec<store::Document>> {
    let mut out = Vec::new();
    let mut after = None;
    let mut read = 0;
    while read < LISTING_SCAN_MAX {
        let page = q.documents(&store::DocumentQuery {
            kind,
            tenant_id: tenant,
            owner: None,
            from,
            to,
            after: after.clone(),
            limit: store::PAGE_LEN_MAX,
        })?;
        read += page.len();
        let last = page.last().map(|d| (d.created_at, d.id.clone()));
        let full = page.len() == store::PAGE_LEN_MAX;
        out.extend(page.into_iter().filter(|d| keep(d)));
        match (full, last) {
            (true, Some(l)) => after = Some(l),
            _ => break,
        }
    }
    Ok(out)
}

pub(crate) fn paginacao(page: usize, per_page: usize, total: usize) -> Value {
    json!({
        "paginaAtual": page,
        "itensPorPagina": per_page,
        "quantidadeDePaginas": total.div_ceil(per_page).max(1),
        "quantidadeTotalDeItens": total,
    })
}

// ---------------------------------------------------------------------------------------------
// Charges (cob)

/// A charge's request body (`CobSolicitada`, or `CobRevisada` for PATCH: every field optional).
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct CobBody {
    calendario: Option<CalendarioBody>,
    devedor: Option<DevedorBody>,
    loc: Option<Value>,
    valor: Option<ValorBody>,
    chave: Option<String>,
    #[serde(rename = "solicitacaoPagador")]
    solicitacao_pagador: Option<String>,
    #[serde(rename = "infoAdicionais")]
    info_adicionais: Option<Vec<InfoBody>>,
    status: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct CalendarioBody {
    expiracao: Option<i64>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct DevedorBody {
    cpf: Option<String>,
    cnpj: Option<String>,
    nome: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ValorBody {
    original: Option<String>,
    #[serde(rename = "modalidadeAlteracao")]
    modalidade_alteracao: Option<i64>,
    retirada: Option<Value>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct InfoBody {
    nome: String,
    valor: String,
}

/// One revision's content, as sealed (status and payments live beside it, in clear).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct CobContent {
    expiracao: i64,
    /// (`cpf` or `cnpj`, the document, the name).
    devedor: Option<(String, String, String)>,
    original: u64,
    modalidade_alteracao: i64,
    chave: String,
    solicitacao_pagador: Option<String>,
    info_adicionais: Vec<InfoBody>,
    /// When this revision was made.
    at: u64,
    /// A charge with a due date's terms and parties (`cobv`); `expiracao` and
    /// `modalidade_alteracao` are unused then.
    #[serde(default)]
    cobv: Option<cobv::CobVContent>,
}

/// A charge as stored: the document's body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredCob {
    pub txid: String,
    pub account_id: String,
    pub status: String,
    /// Its location (`loc.id`, the URL without scheme, when it was made), while it has one: the
    /// document's lookup is the location then, which makes one charge per location.
    #[serde(default)]
    pub loc_id: Option<u64>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub loc_created_at: Option<u64>,
    /// When it was created (`calendario.criacao`).
    pub created_at: u64,
    pub expiracao: i64,
    /// Centavos, and whether the payer may change it (`modalidadeAlteracao` 1).
    pub original: u64,
    pub amount_editable: bool,
    /// The blind index of the debtor's document, for listings by `cpf`/`cnpj`.
    pub devedor_index: Option<String>,
    /// The revisions (`Vec<CobContent>` as JSON), sealed.
    pub revisions_sealed: String,
    pub revisions: usize,
    /// The EndToEndId of the Pix that concluded it.
    pub paid_by: Option<String>,
    /// The blind index of its key (which webhook hears of its payment).
    #[serde(default)]
    pub chave_index: Option<String>,
    /// A charge with a due date (`cobv`, same txids as `cob`): its terms, for the payment's amount.
    #[serde(default)]
    pub cobv: Option<cobv::CobVTerms>,
    /// The batch (`lotecobv`) that made it, if one did.
    #[serde(default)]
    pub lote_id: Option<u64>,
}

fn cob_record(tenant: u128, txid: &str) -> Vec<u8> {
    format!("pix-cob:{}:{txid}", uuid_string(tenant)).into_bytes()
}

/// Checks a request body against the spec's rules, over `base` (a revision's current content)
/// when revising. Violations are of `kind`, their properties under `root` (`cob`, or `cobv` for
/// the fields a cobv shares).
fn content_of(
    body: &CobBody,
    base: Option<&CobContent>,
    now: u64,
    kind: &'static str,
    root: &str,
) -> PixResult<CobContent> {
    let expiracao = match body.calendario.as_ref().and_then(|c| c.expiracao) {
        Some(e) => {
            pix::charge::cob_expires_at(now, Some(e)).map_err(|_| {
                let rule =
                    format!("must be in {}..={} seconds", pix::charge::EXPIRACAO_MIN_S, pix::charge::EXPIRACAO_MAX_S);
                PixError::violation(kind, &format!("{root}.calendario.expiracao"), rule)
            })?;
            e
        }
        None => base.map_or(pix::charge::EXPIRACAO_DEFAULT_S, |b| b.expiracao),
    };
    let (original, modalidade_alteracao) = match &body.valor {
        Some(v) => {
            if v.retirada.is_some() {
                return Err(PixError::violation(
                    kind,
                    &format!("{root}.valor.retirada"),
                    "withdrawal and change (Pix Saque/Troco) are not offered",
                ));
            }
            let original = match (&v.original, base) {
                (Some(text), _) => pix::amount::parse(text)
                    .ok_or_else(|| PixError::violation(kind, &format!("{root}.valor.original"), pix::amount::RULE))?,
                (None, Some(b)) => b.original,
                (None, None) => {
                    return Err(PixError::violation(kind, &format!("{root}.valor.original"), "is required"))
                }
            };
            if original == 0 {
                return Err(PixError::violation(kind, &format!("{root}.valor.original"), "must not be zero"));
            }
            let modalidade = v.modalidade_alteracao.unwrap_or(base.map_or(0, |b| b.modalidade_alteracao));
            if !(0..=1).contains(&modalidade) {
                return Err(PixError::violation(kind, &format!("{root}.valor.modalidadeAlteracao"), "must be 0 or 1"));
            }
            (original, modalidade)
        }
        None => match base {
            Some(b) => (b.original, b.modalidade_alteracao),
            None => return Err(PixError::violation(kind, &format!("{root}.valor"), "is required")),
        },
    };
    let chave = match (&body.chave, base) {
        (Some(k), _) => {
            pix::PixKey::infer(k).map_err(|e| PixError::violation(kind, &format!("{root}.chave"), e.to_string()))?.value
        }
        (None, Some(b)) => b.chave.clone(),
        (None, None) => return Err(PixError::violation(kind, &format!("{root}.chave"), "is required")),
    };
    let devedor = match &body.devedor {
        None => base.and_then(|b| b.devedor.clone()),
        Some(d) => {
            let nome = d
                .nome
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty() && n.chars().count() <= 200 && !n.chars().any(char::is_control))
                .ok_or_else(|| {
                    PixError::violation(
                        kind,
                        &format!("{root}.devedor.nome"),
                        "is required: 1 to 200 printable characters",
                    )
                })?
                .to_owned();
            match (&d.cpf, &d.cnpj) {
                (Some(cpf), None) => Some((
                    "cpf".to_owned(),
                    pix::document::cpf(cpf)
                        .map_err(|e| PixError::violation(kind, &format!("{root}.devedor.cpf"), e.to_string()))?,
                    nome,
                )),
                (None, Some(cnpj)) => Some((
                    "cnpj".to_owned(),
                    pix::document::cnpj(cnpj)
                        .map_err(|e| PixError::violation(kind, &format!("{root}.devedor.cnpj"), e.to_string()))?,
                    nome,
                )),
                _ => {
                    return Err(PixError::violation(
                        kind,
                        &format!("{root}.devedor"),
                        "must have either `cpf` or `cnpj`",
                    ))
                }
            }
        }
    };
    let solicitacao_pagador = match &body.solicitacao_pagador {
        Some(s) if s.chars().count() > 140 || s.chars().any(char::is_control) => {
            return Err(PixError::violation(
                kind,
                &format!("{root}.solicitacaoPagador"),
                "at most 140 printable characters",
            ))
        }
        Some(s) => Some(s.clone()),
        None => base.and_then(|b| b.solicitacao_pagador.clone()),
    };
    let info_adicionais = match &body.info_adicionais {
        Some(items) => {
            if items.len() > INFO_ITEMS_MAX {
                return Err(PixError::violation(kind, &format!("{root}.infoAdicionais"), "at most 50 items"));
            }
            for (i, item) in items.iter().enumerate() {
                if item.nome.chars().count() > 50 || item.valor.chars().count() > 200 {
                    return Err(PixError::violation(
                        kind,
                        &format!("{root}.infoAdicionais[{i}]"),
                        "`nome` at most 50 characters, `valor` at most 200",
                    ));
                }
            }
            items.clone()
        }
        None => base.map(|b| b.info_adicionais.clone()).unwrap_or_default(),
    };
    Ok(CobContent {
        expiracao,
        devedor,
        original,
        modalidade_alteracao,
        chave,
        solicitacao_pagador,
        info_adicionais,
        at: now,
        cobv: None,
    })
}

/// The charge as the spec shows it (`CobCompleta`): `content` is the revision shown.
fn cob_view(stored: &StoredCob, content: &CobContent, revisao: usize, pix: Option<Value>) -> Value {
    let mut v = json!({
        "calendario": {"criacao": rfc3339(stored.created_at), "expiracao": content.expiracao},
        "txid": stored.txid,
        "revisao": revisao,
        "status": stored.status,
        "valor": {"original": pix::amount::format(content.original), "modalidadeAlteracao": content.modalidade_alteracao},
        "chave": content.chave,
    });
    if let (Some(id), Some(location)) = (stored.loc_id, &stored.location) {
        // The BR Code carries the location without a scheme (its field 25); the JSON `location`
        // is typed `uri` by the spec, so it is shown as an absolute HTTPS URI.
        let uri = format!("https://{location}");
        let criacao = rfc3339(stored.loc_created_at.unwrap_or(stored.created_at));
        v["loc"] = json!({"id": id, "location": uri, "tipoCob": "cob", "criacao": criacao, "txid": stored.txid});
        v["location"] = json!(uri);
        v["pixCopiaECola"] = json!(stored_payload(stored, location));
    }
    if let Some((kind, doc, nome)) = &content.devedor {
        v["devedor"] = json!({ kind.as_str(): doc, "nome": nome });
    }
    if let Some(s) = &content.solicitacao_pagador {
        v["solicitacaoPagador"] = json!(s);
    }
    if !content.info_adicionais.is_empty() {
        v["infoAdicionais"] = json!(content.info_adicionais);
    }
    if let Some(p) = pix {
        v["pix"] = json!([p]);
    }
    v
}

/// The payload a charge's location serves (the spec's `CobPayload`), `at` its presentation.
pub(crate) fn cob_payload(
    state: &AppState,
    q: &dyn store::Queries,
    stored: &StoredCob,
    tenant: u128,
    at: u64,
) -> PixResult<Value> {
    let revisions = open_revisions(state, q, tenant, stored)?;
    let n = revisions.len().checked_sub(1).ok_or_else(|| corrupt("a charge without revisions"))?;
    let content = &revisions[n];
    let mut v = json!({
        "calendario": {"criacao": rfc3339(stored.created_at), "apresentacao": rfc3339(at), "expiracao": content.expiracao},
        "txid": stored.txid,
        "revisao": n,
        "status": stored.status,
        "valor": {"original": pix::amount::format(content.original), "modalidadeAlteracao": content.modalidade_alteracao},
        "chave": content.chave,
    });
    if let Some((kind, doc, nome)) = &content.devedor {
        v["devedor"] = json!({ kind.as_str(): doc, "nome": nome });
    }
    if let Some(s) = &content.solicitacao_pagador {
        v["solicitacaoPagador"] = json!(s);
    }
    if !content.info_adicionais.is_empty() {
        v["infoAdicionais"] = json!(content.info_adicionais);
    }
    Ok(v)
}

/// The dynamic BR Code of a charge: its location, its amount unless the payer may change it.
fn stored_payload(stored: &StoredCob, location: &str) -> String {
    pix::brcode::encode(&pix::brcode::Spec {
        key: None,
        url: Some(location.to_owned()),
        info: None,
        amount: (!stored.amount_editable).then_some(stored.original),
        name: COB_MERCHANT_NAME.into(),
        city: COB_MERCHANT_CITY.into(),
        txid: None,
    })
    .unwrap_or_default()
}

/// The merchant fields of dynamic codes (the payer's app shows the receiver from the charge's
/// payload and the directory, not from these).
const COB_MERCHANT_NAME: &str = "RTPAY RECEBEDOR";
const COB_MERCHANT_CITY: &str = "SAO PAULO";

fn open_revisions(
    state: &AppState,
    q: &dyn store::Queries,
    tenant: u128,
    stored: &StoredCob,
) -> Result<Vec<CobContent>, PixError> {
    let vault = state.vault_or_503()?;
    let dek = vault.data_key(q, tenant)?;
    let sealed =
        base64_decode(&stored.revisions_sealed).ok_or_else(|| corrupt("a charge's revisions are not base64"))?;
    let plain = vault::open(&dek, &cob_record(tenant, &stored.txid), &sealed).map_err(VaultFailure::from)?;
    Ok(serde_json::from_slice(&plain).map_err(corrupt)?)
}

fn seal_revisions(
    state: &AppState,
    q: &dyn store::Queries,
    tenant: u128,
    txid: &str,
    revisions: &[CobContent],
) -> Result<String, PixError> {
    let vault = state.vault_or_503()?;
    let dek = vault.data_key(q, tenant)?;
    let plain = serde_json::to_vec(revisions).expect("serializable");
    Ok(base64_encode(&vault::seal(&dek, &cob_record(tenant, txid), &plain).map_err(VaultFailure::from)?))
}

pub fn read_cob(
    q: &dyn store::Queries,
    tenant: u128,
    txid: &str,
) -> store::Result<Option<(store::Document, StoredCob)>> {
    read_document(q, COB_KIND, tenant, txid)
}

/// The received Pix that concluded a charge, as the spec's `Pix`.
fn concluding_pix(q: &dyn store::Queries, tenant: u128, stored: &StoredCob) -> store::Result<Option<Value>> {
    let Some(e2e) = &stored.paid_by else { return Ok(None) };
    read_received(q, tenant, e2e)?.map(|(_, r)| pix_view(q, tenant, &r)).transpose()
}

/// Creates or replaces (PUT on an active charge) a charge.
async fn put_cob(
    state: AppState,
    tenant: Tenant,
    audit: Audit,
    txid: String,
    bytes: Bytes,
    created: StatusCode,
) -> PixResult<Response> {
    const K: &str = "CobOperacaoInvalida";
    tenant.require("cob.write")?;
    state.ispb()?;
    let body: CobBody = body_of(&bytes, K, "cob")?;
    if body.status.is_some() {
        return Err(PixError::violation(K, "cob.status", "is set by the PSP; a charge is created ATIVA"));
    }
    let vault = state.vault_or_503()?;
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-cob:{}", crate::audit_trail::client_id(&txid)));
    let _guard = state.pix_runtime.lock(&[cob_lock(&state, tenant_id, &txid)]).await;
    let st = state.clone();
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let now = store::now_nanos();
        let content = content_of(&body, None, now, K, "cob")?;
        let key = pix::PixKey::infer(&content.chave).map_err(|e| PixError::violation(K, "cob.chave", e.to_string()))?;
        let account = match find_key(&vault, q, &key)? {
            Some((doc, stored)) if doc.tenant_id == tenant_id => stored.account_id,
            _ => return Err(PixError::violation(K, "cob.chave", "is not a key of an account of this receiver")),
        };
        let wanted = super::pix_loc::loc_ref(body.loc.as_ref(), K, "cob.loc.id")?;
        let existing = read_cob(q, tenant_id, &txid)?;
        let (revisions, version, created_at, loc) = match &existing {
            Some((_, s)) if s.cobv.is_some() => {
                return Err(PixError::violation(K, "txid", "a charge with a due date (cobv) has this txid"))
            }
            Some((_, s)) if s.status != CobStatus::Ativa.as_str() => {
                return Err(PixError::violation(K, "txid", "the charge exists and is not ATIVA"))
            }
            Some((doc, s)) => {
                let mut r = open_revisions(&st, q, tenant_id, s)?;
                if r.len() >= REVISIONS_MAX {
                    return Err(PixError::violation(K, "txid", "the charge has 100 revisions, the most kept"));
                }
                r.push(content.clone());
                (r, doc.version, s.created_at, super::pix_loc::Linked::of(s))
            }
            None => {
                // A txid a batch of cobv holds is the batch's (cob and cobv share txids).
                if let Some(batch) = lote::batch_holding(q, tenant_id, &txid)? {
                    return Err(PixError::violation(
                        K,
                        "txid",
                        format!("batch {batch} of charges with a due date holds this txid"),
                    ));
                }
                (vec![content.clone()], 0, now, None)
            }
        };
        let place = super::pix_loc::Place { tenant: tenant_id, tipo: "cob", txid: &txid, kind: K, prop: "cob.loc.id" };
        let fresh = existing.is_none().then(|| st.location_prefix());
        let loc = place.link(q, wanted, loc, fresh.as_deref(), now)?;
        let stored = StoredCob {
            txid: txid.clone(),
            account_id: account,
            status: CobStatus::Ativa.as_str().into(),
            loc_id: loc.as_ref().map(|l| l.id),
            location: loc.as_ref().map(|l| l.location.clone()),
            loc_created_at: loc.as_ref().map(|l| l.created_at),
            created_at,
            expiracao: content.expiracao,
            original: content.original,
            amount_editable: content.modalidade_alteracao == 1,
            devedor_index: content
                .devedor
                .as_ref()
                .map(|(_, d, _)| crate::auth::hex(&vault.index().of(b"document", d.as_bytes()))),
            revisions_sealed: seal_revisions(&st, q, tenant_id, &txid, &revisions)?,
            revisions: revisions.len(),
            paid_by: None,
            chave_index: Some(key_lookup(&vault, &key)),
            cobv: None,
            lote_id: None,
        };
        if !save_charge(q, tenant_id, &stored, version)? {
            return Err(PixError::violation(K, "txid", "the charge changed meanwhile; retry"));
        }
        Ok(cob_view(&stored, &content, revisions.len() - 1, None))
    })
    .await?;
    Ok(reply(created, &view))
}

/// Writes a charge's document: inserted at version 1 when `version` (the one read) is 0, else
/// compared and set. False when another request changed it (or took its location) meanwhile.
fn save_charge(q: &dyn store::Queries, tenant_id: u128, stored: &StoredCob, version: u64) -> PixResult<bool> {
    let doc = store::Document {
        kind: COB_KIND.into(),
        tenant_id,
        id: stored.txid.clone(),
        lookup: stored.location.clone(),
        owner: None,
        created_at: stored.created_at,
        version: version + 1,
        body: serde_json::to_string(stored).expect("serializable"),
    };
    let result = if version == 0 { q.insert_document(&doc).map(|()| true) } else { q.update_document(&doc, version) };
    match result {
        Err(store::StoreError::Conflict(_)) => Ok(false),
        other => Ok(other?),
    }
}

/// A revision's `status`: only the receiver's removal may be asked for.
fn removal_requested(status: Option<&str>, kind: &'static str, prop: &str) -> PixResult<Option<CobStatus>> {
    status
        .map(|s| {
            CobStatus::parse(s)
                .filter(|s| *s == CobStatus::RemovidaPeloUsuarioRecebedor)
                .ok_or_else(|| PixError::violation(kind, prop, "may only be REMOVIDA_PELO_USUARIO_RECEBEDOR"))
        })
        .transpose()
}

/// A txid a charge may be created under (`PUT`): else 400.
fn valid_txid(txid: &str) -> PixResult<()> {
    if pix::ids::valid_txid(txid) {
        Ok(())
    } else {
        Err(PixError::violation("CobOperacaoInvalida", "txid", "must match [a-zA-Z0-9]{26,35}"))
    }
}

pub async fn cob_put(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(txid): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    valid_txid(&txid)?;
    put_cob(state, tenant, audit, txid, bytes, StatusCode::CREATED).await
}

pub async fn cob_post(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    let r = random_32();
    const ALNUM: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let txid: String = r.iter().map(|b| ALNUM[usize::from(*b) % 62] as char).collect();
    put_cob(state, tenant, audit, txid, bytes, StatusCode::CREATED).await
}

pub async fn cob_patch(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(txid): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    const K: &str = "CobOperacaoInvalida";
    tenant.require("cob.write")?;
    state.ispb()?;
    // No charge has a txid no charge may be made under: not found, as `GET` answers.
    if !pix::ids::valid_txid(&txid) {
        return Err(PixError::new(StatusCode::NOT_FOUND, "CobNaoEncontrado", "no charge with this txid"));
    }
    let body: CobBody = body_of(&bytes, K, "cob")?;
    let requested = removal_requested(body.status.as_deref(), K, "cob.status")?;
    let alters_content = body.calendario.is_some()
        || body.devedor.is_some()
        || body.valor.is_some()
        || body.chave.is_some()
        || body.solicitacao_pagador.is_some()
        || body.info_adicionais.is_some();
    let alters = alters_content || body.loc.is_some();
    // The spec's rule (`Revisao`): a change of `loc` alone is no revision; nor is a change of
    // nothing.
    let revises = requested.is_some() || alters_content;
    let vault = state.vault_or_503()?;
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-cob:{}", crate::audit_trail::client_id(&txid)));
    let _guard = state.pix_runtime.lock(&[cob_lock(&state, tenant_id, &txid)]).await;
    let st = state.clone();
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let (doc, mut stored) = read_cob(q, tenant_id, &txid)?
            .filter(|(_, s)| s.cobv.is_none())
            .ok_or_else(|| PixError::new(StatusCode::NOT_FOUND, "CobNaoEncontrado", "no charge with this txid"))?;
        let status = CobStatus::parse(&stored.status).ok_or_else(|| corrupt("a charge's status"))?;
        let next = status.revise(requested, alters).map_err(|e| PixError::violation(K, "cob.status", e.to_string()))?;
        let mut revisions = open_revisions(&st, q, tenant_id, &stored)?;
        if revisions.len() >= REVISIONS_MAX && alters_content {
            return Err(PixError::violation(K, "txid", "the charge has 100 revisions, the most kept"));
        }
        let wanted = super::pix_loc::loc_ref(body.loc.as_ref(), K, "cob.loc.id")?;
        let place = super::pix_loc::Place { tenant: tenant_id, tipo: "cob", txid: &txid, kind: K, prop: "cob.loc.id" };
        if let Some(l) = place.link(q, wanted, super::pix_loc::Linked::of(&stored), None, 0)? {
            stored.loc_id = Some(l.id);
            stored.location = Some(l.location);
            stored.loc_created_at = Some(l.created_at);
        }
        let base = revisions.last().cloned().ok_or_else(|| corrupt("a charge without revisions"))?;
        let now = store::now_nanos();
        let content =
            if alters { content_of(&body, Some(&base), now, K, "cob")? } else { CobContent { at: now, ..base } };
        if body.chave.is_some() {
            let key =
                pix::PixKey::infer(&content.chave).map_err(|e| PixError::violation(K, "cob.chave", e.to_string()))?;
            match find_key(&vault, q, &key)? {
                Some((d, k)) if d.tenant_id == tenant_id => {
                    stored.account_id = k.account_id;
                    stored.chave_index = Some(key_lookup(&vault, &key));
                }
                _ => return Err(PixError::violation(K, "cob.chave", "is not a key of an account of this receiver")),
            }
        }
        if revises {
            revisions.push(content.clone());
        }
        stored.status = next.as_str().into();
        stored.expiracao = content.expiracao;
        stored.original = content.original;
        stored.amount_editable = content.modalidade_alteracao == 1;
        stored.devedor_index =
            content.devedor.as_ref().map(|(_, d, _)| crate::auth::hex(&vault.index().of(b"document", d.as_bytes())));
        stored.revisions_sealed = seal_revisions(&st, q, tenant_id, &txid, &revisions)?;
        stored.revisions = revisions.len();
        let updated = store::Document {
            version: doc.version + 1,
            lookup: stored.location.clone(),
            body: serde_json::to_string(&stored).expect("serializable"),
            ..doc.clone()
        };
        let written = match q.update_document(&updated, doc.version) {
            Err(store::StoreError::Conflict(_)) => false,
            other => other?,
        };
        if !written {
            return Err(PixError::violation(
                K,
                "txid",
                "the charge or its location changed meanwhile (it may have been paid); retry",
            ));
        }
        Ok(cob_view(&stored, &content, revisions.len() - 1, None))
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn cob_get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(txid): Path<String>,
    RawQuery(raw): RawQuery,
) -> PixResult<Response> {
    tenant.require("cob.read")?;
    state.ispb()?;
    let not_found = || PixError::new(StatusCode::NOT_FOUND, "CobNaoEncontrado", "no charge with this txid");
    if !pix::ids::valid_txid(&txid) {
        return Err(not_found());
    }
    let params = params_of(raw, "CobConsultaInvalida")?;
    let revisao = params.get("revisao").cloned();
    let tenant_id = tenant.id;
    let st = state.clone();
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let (_, stored) = read_cob(q, tenant_id, &txid)?.filter(|(_, s)| s.cobv.is_none()).ok_or_else(not_found)?;
        let revisions = open_revisions(&st, q, tenant_id, &stored)?;
        let n = revision(revisao.as_ref(), revisions.len(), "CobConsultaInvalida")?;
        Ok(cob_view(&stored, &revisions[n], n, concluding_pix(q, tenant_id, &stored)?))
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn cob_list(State(state): State<AppState>, tenant: Tenant, RawQuery(raw): RawQuery) -> PixResult<Response> {
    list_charges(state, tenant, raw, false).await
}

/// `GET /cob` and (`due`) `GET /cobv`: the charges of one type created in the window, filtered by
/// debtor, status, location and (cobv) batch, by pages.
pub(crate) async fn list_charges(
    state: AppState,
    tenant: Tenant,
    raw: Option<String>,
    due: bool,
) -> PixResult<Response> {
    let k = if due { "CobVConsultaInvalida" } else { "CobConsultaInvalida" };
    tenant.require(if due { "cobv.read" } else { "cob.read" })?;
    state.ispb()?;
    let vault = state.vault_or_503()?;
    let p = params_of(raw, k)?;
    let span = window(&p, k)?;
    one_document(&p, k)?;
    let (page, per_page) = pagination(&p, k)?;
    let location = bool_param(&p, "locationPresente", k)?;
    let (cpf, cnpj) = (p.get("cpf").cloned(), p.get("cnpj").cloned());
    let status = p.get("status").cloned();
    let lote = match p.get("loteCobVId").filter(|_| due) {
        // An int32; a negative one names no batch.
        Some(l) => Some(
            crate::dto::digits::<i64>(l.strip_prefix('-').unwrap_or(l))
                .map(|n| if l.starts_with('-') { -n } else { n })
                .ok_or_else(|| PixError::violation(k, "loteCobVId", "must be an integer"))?,
        ),
        None => None,
    };
    let document = cpf
        .as_ref()
        .or(cnpj.as_ref())
        .map(|d| crate::auth::hex(&vault.index().of(b"document", pix::document::normalize(d).as_bytes())));
    let mut parametros = json!({"inicio": p["inicio"], "fim": p["fim"]});
    for (name, value) in [("cpf", &cpf), ("cnpj", &cnpj), ("status", &status)] {
        if let Some(v) = value {
            parametros[name] = json!(v);
        }
    }
    if let Some(l) = location {
        parametros["locationPresente"] = json!(l);
    }
    let tenant_id = tenant.id;
    let st = state.clone();
    let (cobs, total) = pix_query(&state, move |q| -> PixResult<(Vec<Value>, usize)> {
        let docs = scan(q, COB_KIND, tenant_id, span, |d| {
            let Ok(s) = serde_json::from_str::<StoredCob>(&d.body) else { return false };
            s.cobv.is_some() == due
                && lote.is_none_or(|l| s.lote_id.map(|m| m as i64) == Some(l))
                && location.is_none_or(|w| w == s.location.is_some())
                && status.as_ref().is_none_or(|w| *w == s.status)
                && document.as_ref().is_none_or(|w| s.devedor_index.as_ref() == Some(w))
        })?;
        let total = docs.len();
        let mut out = Vec::new();
        for doc in docs.iter().skip(page.saturating_mul(per_page)).take(per_page) {
            let stored: StoredCob = serde_json::from_str(&doc.body).map_err(corrupt)?;
            let revisions = open_revisions(&st, q, tenant_id, &stored)?;
            let n = revisions.len().checked_sub(1).ok_or_else(|| corrupt("a charge without revisions"))?;
            let pix = concluding_pix(q, tenant_id, &stored)?;
            let view = if due { cobv::cobv_view } else { cob_view };
            let mut v = view(&stored, &revisions[n], n, pix);
            v["idCob"] = json!(stored.txid);
            out.push(v);
        }
        Ok((out, total))
    })
    .await?;
    parametros["paginacao"] = paginacao(page, per_page, total);
    Ok(reply(StatusCode::OK, &json!({"parametros": parametros, "cobs": cobs})))
}

// ---------------------------------------------------------------------------------------------
// Received Pix and refunds

pub fn read_received(
    q: &dyn store::Queries,
    tenant: u128,
    e2e: &str,
) -> store::Result<Option<(store::Document, StoredReceived)>> {
    read_document(q, RECEIVED_KIND, tenant, e2e)
}

/// A refund as stored and shown (the spec's `Devolucao`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredRefund {
    pub id: String,
    #[serde(rename = "rtrId")]
    pub rtr_id: String,
    pub valor: String,
    pub natureza: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub descricao: Option<String>,
    pub horario: Value,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub motivo: Option<String>,
}

/// A refund's document: the refund, its amount in centavos and the request's keyed fingerprint
/// (the same request again is answered again; another under the same id is refused).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RefundDoc {
    pub refund: StoredRefund,
    pub centavos: u64,
    pub fingerprint: String,
}

/// The document again with its version moved on (what a guarded request that read it writes).
pub fn bumped(doc: &store::Document) -> store::Record {
    store::Record::Document(store::Document { version: doc.version + 1, ..doc.clone() })
}

pub fn refunds_of(q: &dyn store::Queries, tenant: u128, e2e: &str) -> store::Result<Vec<RefundDoc>> {
    let owner = format!("{}:{e2e}", uuid_string(tenant));
    let docs = q.documents(&store::DocumentQuery {
        kind: REFUND_KIND,
        tenant_id: tenant,
        owner: Some(&owner),
        from: 0,
        to: u64::MAX,
        after: None,
        limit: store::PAGE_LEN_MAX,
    })?;
    docs.iter().map(|d| serde_json::from_str(&d.body).map_err(corrupt)).collect()
}

/// A received Pix as the spec's `Pix`, without its refunds (a webhook's notification).
pub fn pix_notification(e2e: &str, amount: u64, txid: Option<&str>, description: Option<&str>, at: u64) -> Value {
    let mut v = json!({"endToEndId": e2e, "valor": pix::amount::format(amount), "horario": rfc3339(at)});
    if let Some(t) = txid {
        v["txid"] = json!(t);
    }
    if let Some(d) = description {
        v["infoPagador"] = json!(d);
    }
    v
}

/// The webhook's notification that `refund` reached a final status (`DEVOLVIDO` or
/// `NAO_REALIZADO`), as the spec's callback asks: the received Pix with its refunds, `earlier` and
/// this one, due from the refund's commit on; recorded under the delivery id `{e2e}:{notified_as}`
/// (the refund's id; a MED return's, [`med_notified_as`]).
pub fn refund_outbox(
    tenant: u128,
    key_index: &str,
    received: &StoredReceived,
    earlier: &[StoredRefund],
    refund: &StoredRefund,
    notified_as: &str,
    at: u64,
) -> store::Record {
    let mut pix = pix_notification(
        &received.end_to_end_id,
        received.amount,
        received.txid.as_deref(),
        received.description.as_deref(),
        received.received_at_nanos,
    );
    let refunds: Vec<&StoredRefund> = earlier.iter().chain([refund]).collect();
    pix["devolucoes"] = serde_json::to_value(refunds).expect("serializable");
    let e2e = &received.end_to_end_id;
    let id = crate::webhook::delivery_id(e2e, Some(notified_as));
    crate::webhook::outbox_record_as(tenant, key_index, e2e, Some(&refund.id), id, &pix, at)
}

pub(crate) fn pix_view(q: &dyn store::Queries, tenant: u128, r: &StoredReceived) -> store::Result<Value> {
    let mut v =
        pix_notification(&r.end_to_end_id, r.amount, r.txid.as_deref(), r.description.as_deref(), r.received_at_nanos);
    let refunds: Vec<StoredRefund> = refunds_of(q, tenant, &r.end_to_end_id)?.into_iter().map(|d| d.refund).collect();
    if !refunds.is_empty() {
        v["devolucoes"] = serde_json::to_value(refunds).expect("serializable");
    }
    Ok(v)
}

pub async fn pix_get(State(state): State<AppState>, tenant: Tenant, Path(e2e): Path<String>) -> PixResult<Response> {
    tenant.require("pix.read")?;
    state.ispb()?;
    let not_found = || PixError::new(StatusCode::NOT_FOUND, "PixNaoEncontrado", "no Pix received with this EndToEndId");
    let tenant_id = tenant.id;
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let (_, r) = read_received(q, tenant_id, &e2e)?.ok_or_else(not_found)?;
        Ok(pix_view(q, tenant_id, &r)?)
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn pix_list(State(state): State<AppState>, tenant: Tenant, RawQuery(raw): RawQuery) -> PixResult<Response> {
    const K: &str = "PixConsultaInvalida";
    tenant.require("pix.read")?;
    state.ispb()?;
    let p = params_of(raw, K)?;
    let span = window(&p, K)?;
    one_document(&p, K)?;
    let (page, per_page) = pagination(&p, K)?;
    let with_txid = bool_param(&p, "txIdPresente", K)?;
    let with_refund = bool_param(&p, "devolucaoPresente", K)?;
    let txid = p.get("txid").cloned();
    let (cpf, cnpj) = (p.get("cpf").cloned(), p.get("cnpj").cloned());
    let mut parametros = json!({"inicio": p["inicio"], "fim": p["fim"]});
    for (name, value) in [("txid", &txid), ("cpf", &cpf), ("cnpj", &cnpj)] {
        if let Some(v) = value {
            parametros[name] = json!(v);
        }
    }
    for (name, value) in [("txIdPresente", with_txid), ("devolucaoPresente", with_refund)] {
        if let Some(v) = value {
            parametros[name] = json!(v);
        }
    }
    let tenant_id = tenant.id;
    let (items, total) = pix_query(&state, move |q| -> PixResult<(Vec<Value>, usize)> {
        // Payers' documents are kept masked only: a filter by one matches nothing.
        if cpf.is_some() || cnpj.is_some() {
            return Ok((vec![], 0));
        }
        let mut views = Vec::new();
        for doc in scan(q, RECEIVED_KIND, tenant_id, span, |_| true)? {
            let r: StoredReceived = serde_json::from_str(&doc.body).map_err(corrupt)?;
            if txid.as_ref().is_some_and(|t| r.txid.as_ref() != Some(t))
                || with_txid.is_some_and(|w| w != r.txid.is_some())
            {
                continue;
            }
            // Refunds are read per Pix only when the filter asks about them; else for the page.
            if let Some(w) = with_refund {
                if w == refunds_of(q, tenant_id, &r.end_to_end_id)?.is_empty() {
                    continue;
                }
            }
            views.push(r);
        }
        let total = views.len();
        let page_views = views.iter().skip(page.saturating_mul(per_page)).take(per_page);
        Ok((page_views.map(|r| pix_view(q, tenant_id, r)).collect::<store::Result<_>>()?, total))
    })
    .await?;
    parametros["paginacao"] = paginacao(page, per_page, total);
    // `PixConsultados` in the spec requires `cobs` (beside the `pix` it lists): an empty one keeps
    // strict clients' validation happy.
    Ok(reply(StatusCode::OK, &json!({"parametros": parametros, "pix": items, "cobs": []})))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    valor: String,
    natureza: Option<String>,
    descricao: Option<String>,
}

pub async fn refund_get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((e2e, id)): Path<(String, String)>,
) -> PixResult<Response> {
    tenant.require("pix.read")?;
    state.ispb()?;
    let tenant_id = tenant.id;
    // A MED return is listed as the refund `MED`, and found under that id.
    let doc_id = if id == MED_REFUND_ID { med_refund_doc_id(&e2e) } else { format!("{e2e}:{id}") };
    let refund = query(&state, move |q| q.document(REFUND_KIND, tenant_id, &doc_id)).await?.ok_or_else(|| {
        PixError::new(StatusCode::NOT_FOUND, "PixDevolucaoNaoEncontrada", "no such refund of this Pix")
    })?;
    let doc: RefundDoc = serde_json::from_str(&refund.body).map_err(corrupt)?;
    Ok(reply(StatusCode::OK, &doc.refund))
}

/// What a new refund is checked against: the received Pix's document and record, its refunds so
/// far, and the amount a MED claim blocks.
type RefundBasis = (store::Document, StoredReceived, Vec<RefundDoc>, u64);

/// A refund of a received Pix: the receiving account pays it back (to the payer's account when
/// the payer is of this rtpay, else to the tenant's settlement account, the SPI's side), once per
/// refund id, at most the Pix's amount in total, within 90 days.
pub async fn refund_put(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path((e2e, id)): Path<(String, String)>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    const K: &str = "PixDevolucaoInvalida";
    tenant.require("pix.write")?;
    state.ispb()?;
    if !pix::ids::valid_refund_id(&id) {
        return Err(PixError::violation(K, "id", "must match [a-zA-Z0-9]{1,35}"));
    }
    if id == MED_REFUND_ID {
        // Its refunds' ids name their webhook notifications too: one id, one refund.
        return Err(PixError::violation(K, "id", "MED is the id of a Pix's MED return"));
    }
    let body: RefundBody = body_of(&bytes, K, "devolucao")?;
    let centavos = pix::amount::parse(&body.valor)
        .filter(|c| *c > 0)
        .ok_or_else(|| PixError::violation(K, "devolucao.valor", format!("{}, and not zero", pix::amount::RULE)))?;
    let natureza = body.natureza.clone().unwrap_or_else(|| "ORIGINAL".into());
    if natureza == "RETIRADA" {
        // RETIRADA returns the withdrawal part of a Pix Saque or Troco, which is not offered here.
        return Err(PixError::violation(
            K,
            "devolucao.natureza",
            "RETIRADA applies to Pix Saque/Troco only; use ORIGINAL",
        ));
    }
    if natureza != "ORIGINAL" {
        return Err(PixError::violation(K, "devolucao.natureza", "must be ORIGINAL or RETIRADA"));
    }
    if body.descricao.as_ref().is_some_and(|d| d.chars().count() > 140 || d.chars().any(char::is_control)) {
        return Err(PixError::violation(K, "devolucao.descricao", "at most 140 printable characters"));
    }
    // The parsed request, so that spacing or key order does not make a retry another request.
    let canonical = serde_json::to_vec(&body).expect("serializable");
    let fingerprint = crate::auth::hex(&state.vault_or_503()?.index().of(b"pix-refund-body", &canonical));
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-refund:{}", crate::audit_trail::client_id(&id)));
    let _guard = state.pix_runtime.lock(&[state.keys.derived_id(b"pix-refund-lock", tenant_id, &e2e).as_u128()]).await;
    let (e2e2, id2, print2, st) = (e2e.clone(), id.clone(), fingerprint.clone(), state.clone());
    let checked = pix_query(&state, move |q| -> PixResult<Result<StoredRefund, RefundBasis>> {
        let (doc, received) = read_received(q, tenant_id, &e2e2)?.ok_or_else(|| {
            PixError::new(StatusCode::NOT_FOUND, "PixNaoEncontrado", "no Pix received with this EndToEndId")
        })?;
        let refunds = refunds_of(q, tenant_id, &e2e2)?;
        if let Some(r) = refunds.iter().find(|r| r.refund.id == id2) {
            if r.fingerprint == print2 {
                return Ok(Ok(r.refund.clone()));
            }
            return Err(PixError::violation(K, "id", "is already used by another refund of this Pix"));
        }
        // A new refund may not take the shape of a MED return's notification id (one made
        // before that shape was kept for them still answers its repeats, above).
        if reserved_refund_id(&id2) {
            return Err(PixError::violation(
                K,
                "id",
                "MED followed by 32 lowercase hex digits is the shape of a MED return's notification id",
            ));
        }
        if refunds.len() >= REFUNDS_MAX {
            return Err(PixError::violation(K, "id", "this Pix has 999 refunds, the most it may have"));
        }
        let blocked = super::med::blocked_amount(&st, q, tenant_id, &e2e2)?;
        Ok(Err((doc, received, refunds, blocked)))
    })
    .await?;
    let (received_doc, received, refunds, blocked) = match checked {
        Ok(existing) => return Ok(reply(StatusCode::CREATED, &existing)),
        Err(found) => found,
    };
    let now = store::now_nanos();
    if now.saturating_sub(received.received_at_nanos) > REFUND_WINDOW_NANOS {
        return Err(PixError::violation(K, "devolucao", "refunds are accepted within 90 days of the Pix"));
    }
    // A MED block in force counts: it may yet be returned.
    let refunded: u64 =
        refunds.iter().filter(|r| r.refund.status != "NAO_REALIZADO").map(|r| r.centavos).sum::<u64>() + blocked;
    if refunded.saturating_add(centavos) > received.amount {
        return Err(PixError::violation(
            K,
            "devolucao.valor",
            format!(
                "with the refunds before it ({}), it would exceed the Pix's amount ({})",
                pix::amount::format(refunded),
                pix::amount::format(received.amount)
            ),
        ));
    }
    let ispb = state.ispb()?.to_owned();
    let random = crate::auth::random_bytes();
    let rtr_id = pix::ids::end_to_end_id('D', &ispb, now, random);
    let account = uuid::Uuid::parse_str(&received.credit_account_id).map_err(corrupt)?.as_u128();
    let events = refund_events(&state, tenant_id, account, &received, &id, centavos).await?;
    // Paid by another institution: the refund goes back through the SPI (a pacs.004), its money
    // held until the SPI's verdict (see `pix_return`).
    let off_us = payer_here(&received)?.is_none();
    let refund = StoredRefund {
        id: id.clone(),
        rtr_id,
        valor: pix::amount::format(centavos),
        natureza,
        descricao: body.descricao,
        horario: json!({"solicitacao": rfc3339(now)}),
        status: "EM_PROCESSAMENTO".into(),
        motivo: None,
    };
    let payment_return =
        off_us.then(|| crate::pix_return::of_refund(&state, tenant_id, &received, &refund, centavos, now));
    let template = refund.clone();
    let owner = format!("{}:{e2e}", uuid_string(tenant_id));
    let doc_id = format!("{e2e}:{id}");
    let conclude = move |result: ledger::TransferResult| {
        let mut r = template.clone();
        match result {
            // Held until the SPI's verdict.
            ledger::TransferResult::Created | ledger::TransferResult::Exists if off_us => {}
            ledger::TransferResult::Created | ledger::TransferResult::Exists => {
                r.status = "DEVOLVIDO".into();
                r.horario["liquidacao"] = json!(rfc3339(store::now_nanos().max(now)));
            }
            failure => {
                r.status = "NAO_REALIZADO".into();
                r.motivo = Some(crate::routes::ledger_problem(failure, "").detail.chars().take(140).collect());
            }
        }
        r
    };
    let conclude = std::sync::Arc::new(conclude);
    let in_batch = conclude.clone();
    let (owner2, doc_id2) = (owner.clone(), doc_id.clone());
    // The refunds within the Pix's amount, across every node: the received Pix's document must be
    // as read when this commits, and each refund moves its version on.
    let guards = vec![store::Guard::of(&received_doc)];
    let bumped = bumped(&received_doc);
    // The refund's final status, notified to the charge's key's webhook (not again for a twin's).
    let earlier: Vec<StoredRefund> = refunds.into_iter().map(|r| r.refund).collect();
    let notified = received.notified_key.clone();
    let notice = notified.clone().map(|index| (index, received.clone(), earlier));
    let in_flight = payment_return.clone();
    let records: store::RecordsFn = Box::new(move |reply| {
        let result = reply.chain_result();
        if off_us && result == ledger::TransferResult::Exists {
            // A twin made it, and may have its verdict recorded already: nothing to write over.
            return vec![bumped.clone()];
        }
        let r = in_batch(result);
        // Notified once final: a return's when its verdict is recorded.
        let outbox = notice
            .as_ref()
            .filter(|_| result != ledger::TransferResult::Exists && r.status != "EM_PROCESSAMENTO")
            .map(|(index, received, earlier)| refund_outbox(tenant_id, index, received, earlier, &r, &r.id, now));
        let mut records = vec![
            bumped.clone(),
            store::Record::Document(store::Document {
                kind: REFUND_KIND.into(),
                tenant_id,
                id: doc_id2.clone(),
                lookup: None,
                owner: Some(owner2.clone()),
                created_at: now,
                version: 1,
                body: serde_json::to_string(&RefundDoc { refund: r, centavos, fingerprint: fingerprint.clone() })
                    .expect("serializable"),
            }),
        ];
        records.extend(outbox);
        if let (Some(stored), ledger::TransferResult::Created) = (&in_flight, result) {
            records.push(crate::pix_return::return_document(tenant_id, 1, now, stored, true));
        }
        records
    });
    let answer =
        crate::routes::submit_guarded(&state, &audit, store::Command::Transfers(events), Some(records), guards).await?;
    let result = answer.chain_result();
    let shown = conclude(result);
    if notified.is_some() && result != ledger::TransferResult::Exists && shown.status != "EM_PROCESSAMENTO" {
        crate::webhook::notify(&state, tenant_id, crate::webhook::delivery_id(&e2e, Some(&id)));
    }
    if let (Some(stored), ledger::TransferResult::Created) = (payment_return, result) {
        crate::pix_return::start(&state, tenant_id, now, stored);
    }
    Ok(reply(StatusCode::CREATED, &shown))
}

/// The ledger transfers of a refund: receiver → payer on us (through both tenants' settlement
/// accounts when they differ); for a payer at another institution, a hold receiver → settlement
/// that the SPI's verdict on the return posts or voids.
async fn refund_events(
    state: &AppState,
    tenant: u128,
    account: u128,
    received: &StoredReceived,
    id: &str,
    amount: u64,
) -> Result<Vec<ledger::TransferEvent>, Problem> {
    let key = |t: u128, n: u32| ledger::TransferKey {
        tenant: ledger::TenantId(t),
        id: ledger::TransferId(
            state.keys.derived_id(b"pix-refund", tenant, &format!("{}:{id}:{n}", received.end_to_end_id)).as_u128(),
        ),
    };
    let event = |k: ledger::TransferKey, debit: u128, credit: u128, linked: bool| ledger::TransferEvent {
        key: k,
        kind: ledger::EventKind::Posted { debit: ledger::AccountId(debit), credit: ledger::AccountId(credit), amount },
        code: crate::dto::PIX_REFUND_CODE,
        metadata: Some(format!(r#"{{"pix_refund":"{}:{id}"}}"#, received.end_to_end_id)),
        linked,
    };
    let ours = ensure_settlement(state, tenant).await?;
    Ok(match payer_here(received)? {
        Some((payer_tenant, payer_account)) if payer_tenant == tenant => {
            vec![event(key(tenant, 1), account, payer_account, false)]
        }
        Some((payer_tenant, payer_account)) => {
            let theirs = ensure_settlement(state, payer_tenant).await?;
            vec![
                event(key(tenant, 1), account, ours.id.0, true),
                event(key(payer_tenant, 2), theirs.id.0, payer_account, false),
            ]
        }
        None => {
            vec![crate::pix_return::hold_event(state, tenant, &received.end_to_end_id, id, account, ours.id.0, amount)]
        }
    })
}

/// The paying account of a received Pix when it is of this rtpay (tenant, account); `None` for a
/// payer at another institution. One that does not read is corrupt storage, never taken for a
/// payer at another institution (its refund would go to the SPI).
pub fn payer_here(received: &StoredReceived) -> store::Result<Option<(u128, u128)>> {
    received
        .payer_account
        .as_deref()
        .map(|owner| parse_owner(owner).ok_or_else(|| corrupt("a received Pix's payer account does not parse")))
        .transpose()
}

/// `tenant:account` (as [`account_owner`] writes it) back to ids.
pub fn parse_owner(text: &str) -> Option<(u128, u128)> {
    let (t, a) = text.split_once(':')?;
    Some((uuid::Uuid::parse_str(t).ok()?.as_u128(), uuid::Uuid::parse_str(a).ok()?.as_u128()))
}

// ---------------------------------------------------------------------------------------------
// Paying a charge (its dynamic BR Code), for the payment routes

/// The lock a charge's changes and its payment share.
pub fn cob_lock(state: &AppState, tenant: u128, txid: &str) -> u128 {
    state.keys.derived_id(b"pix-cob-lock", tenant, txid).as_u128()
}

/// The charge a dynamic BR Code's URL locates, as (tenant, txid), if any.
pub fn locate_cob(q: &dyn store::Queries, url: &str) -> store::Result<Option<(u128, String)>> {
    Ok(q.document_by_lookup(COB_KIND, url)?.map(|d| (d.tenant_id, d.id)))
}

/// The charge at `url`, if it can be paid `amount` centavos now; else the problem (422 on
/// `field`) a payer sees.
pub fn payable_cob(
    q: &dyn store::Queries,
    url: &str,
    amount: u64,
    field: &str,
) -> store::Result<Result<(store::Document, StoredCob), Problem>> {
    let Some(doc) = q.document_by_lookup(COB_KIND, url)? else {
        return Ok(Err(Problem::invalid(field, "charge_not_found", "the BR Code's location holds no charge")));
    };
    let stored: StoredCob = serde_json::from_str(&doc.body).map_err(corrupt)?;
    if stored.status != CobStatus::Ativa.as_str() {
        return Ok(Err(Problem::invalid(
            field,
            "charge_not_payable",
            format!("the charge is {}, not ATIVA", stored.status),
        )));
    }
    if let Some(terms) = &stored.cobv {
        // What a charge with a due date costs today, in Brasília.
        let today = pix::charge::brasilia_date(store::now_nanos());
        let due = match terms.amount_on(today) {
            Ok(calc) => calc.valor_final,
            Err(e) => {
                let why = format!("the charge cannot be paid today: {e}");
                return Ok(Err(Problem::invalid(field, "charge_expired", why)));
            }
        };
        if amount != due {
            return Ok(Err(Problem::invalid(
                "amount",
                "amount_mismatch",
                format!("the charge costs {due} centavos today; `amount` says {amount}"),
            )));
        }
        return Ok(Ok((doc, stored)));
    }
    if !pix::charge::cob_payable(stored.created_at, Some(stored.expiracao), store::now_nanos()).unwrap_or(false) {
        return Ok(Err(Problem::invalid(field, "charge_expired", "the charge has expired (calendario.expiracao)")));
    }
    if !stored.amount_editable && amount != stored.original {
        return Ok(Err(Problem::invalid(
            "amount",
            "amount_mismatch",
            format!("the charge asks for {} centavos; `amount` says {amount}", stored.original),
        )));
    }
    Ok(Ok((doc, stored)))
}

// ---------------------------------------------------------------------------------------------
// Webhooks

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    #[serde(rename = "webhookUrl")]
    webhook_url: String,
}

/// The tenant's key `chave` and its blind index, or the spec's error.
fn own_key(
    vault: &crate::vault_service::VaultService,
    q: &dyn store::Queries,
    tenant: u128,
    chave: &str,
) -> PixResult<Option<(pix::PixKey, String, u128)>> {
    let Ok(key) = pix::PixKey::infer(chave) else { return Ok(None) };
    Ok(match find_key(vault, q, &key)? {
        Some((doc, stored)) if doc.tenant_id == tenant => {
            let account = uuid::Uuid::parse_str(&stored.account_id).map_err(corrupt)?.as_u128();
            let index = key_lookup(vault, &key);
            Some((key, index, account))
        }
        _ => None,
    })
}

fn webhook_view(state: &AppState, q: &dyn store::Queries, tenant: u128, doc: &store::Document) -> PixResult<Value> {
    let hook: crate::webhook::StoredWebhook = serde_json::from_str(&doc.body).map_err(corrupt)?;
    let vault = state.vault_or_503()?;
    let dek = vault.data_key(q, tenant)?;
    let sealed = base64_decode(&hook.key_sealed).ok_or_else(|| corrupt("a webhook's key is not base64"))?;
    let chave = vault::open(&dek, &webhook_record(tenant, &doc.id), &sealed).map_err(VaultFailure::from)?;
    let chave = String::from_utf8_lossy(&chave).into_owned();
    let mut v = json!({"webhookUrl": hook.url, "chave": chave, "criacao": rfc3339(hook.created_at)});
    // The spec's `cnpj`: the receiver's, when the key is one.
    if pix::PixKey::parse(pix::KeyType::Cnpj, &chave).is_ok() {
        v["cnpj"] = json!(chave);
    }
    Ok(v)
}

fn webhook_record(tenant: u128, index: &str) -> Vec<u8> {
    format!("pix-webhook:{}:{index}", uuid_string(tenant)).into_bytes()
}

pub async fn webhook_put(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(chave): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    const K: &str = "WebhookOperacaoInvalida";
    tenant.require("webhook.write")?;
    state.ispb()?;
    let body: WebhookBody = body_of(&bytes, K, "webhook")?;
    let url = body.webhook_url.trim().to_owned();
    let host_ok = url.strip_prefix("https://").is_some_and(|rest| {
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    });
    if !host_ok
        || url.len() > crate::webhook::URL_LEN_MAX
        || url.contains(['?', '#'])
        || !url.bytes().all(|b| b.is_ascii_graphic())
    {
        // Printable ASCII only: a control character or raw non-ASCII can go in no request line,
        // so every delivery would fail (percent-encode them).
        return Err(PixError::violation(
            K,
            "webhookUrl",
            "must be an https:// URL of at most 512 printable ASCII characters (others percent-encoded), without query or fragment",
        ));
    }
    // The authority must be one a delivery can reach: a port in 1..=65535, and a host name TLS can
    // name or an address literal. An address literal must be public unless the server allows
    // private receivers (a host name's addresses are checked at each delivery, when it is
    // resolved). A name whose last label is all digits (`127.1`, `2130706433`, `0177.0.0.1`) is
    // no host name: resolvers read it as an address.
    let authority = url.trim_start_matches("https://").split('/').next().unwrap_or("");
    let private_ok = state.webhooks.as_ref().is_some_and(|w| w.allow_private);
    let refused = |why: &str| PixError::violation(K, "webhookUrl", why.to_owned());
    let (host, port) = crate::webhook::host_and_port(authority).map_err(|_| refused("has a bad host or port"))?;
    if port == 0 {
        return Err(refused("has a bad host or port"));
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if !crate::webhook::is_public(ip) && !private_ok => {
            return Err(refused("must not point at a loopback, private or link-local address"));
        }
        Ok(_) => {}
        Err(_) => {
            let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
            let name_ok = rustls::pki_types::ServerName::try_from(host.to_owned()).is_ok()
                && !last.is_empty()
                && !last.bytes().all(|b| b.is_ascii_digit());
            if !name_ok {
                return Err(refused("has a bad host or port"));
            }
        }
    }
    let vault = state.vault_or_503()?;
    let tenant_id = tenant.id;
    pix_query(&state, move |q| -> PixResult<()> {
        let (key, index, _) = own_key(&vault, q, tenant_id, &chave)?
            .ok_or_else(|| PixError::violation(K, "chave", "is not a key of an account of this receiver"))?;
        let dek = vault.data_key(q, tenant_id)?;
        let sealed =
            vault::seal(&dek, &webhook_record(tenant_id, &index), key.value.as_bytes()).map_err(VaultFailure::from)?;
        let now = store::now_nanos();
        let hook = crate::webhook::StoredWebhook { url, key_sealed: base64_encode(&sealed), created_at: now };
        let body = serde_json::to_string(&hook).expect("serializable");
        match q.document(crate::webhook::WEBHOOK_KIND, tenant_id, &index)? {
            Some(doc) => {
                let next = store::Document { version: doc.version + 1, body, ..doc.clone() };
                if !q.update_document(&next, doc.version)? {
                    return Err(PixError::violation(K, "chave", "the webhook changed meanwhile; retry"));
                }
            }
            None => q.insert_document(&store::Document {
                kind: crate::webhook::WEBHOOK_KIND.into(),
                tenant_id,
                id: index,
                lookup: None,
                owner: None,
                created_at: now,
                version: 1,
                body,
            })?,
        }
        Ok(())
    })
    .await?;
    audit.0.set_resource("pix-webhook");
    Ok(StatusCode::OK.into_response())
}

fn webhook_not_found() -> PixError {
    PixError::new(StatusCode::NOT_FOUND, "WebhookNaoEncontrado", "no webhook for this key")
}

pub async fn webhook_get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(chave): Path<String>,
) -> PixResult<Response> {
    tenant.require("webhook.read")?;
    state.ispb()?;
    let vault = state.vault_or_503()?;
    let tenant_id = tenant.id;
    let st = state.clone();
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let (_, index, _) = own_key(&vault, q, tenant_id, &chave)?.ok_or_else(webhook_not_found)?;
        let doc = q.document(crate::webhook::WEBHOOK_KIND, tenant_id, &index)?.ok_or_else(webhook_not_found)?;
        webhook_view(&st, q, tenant_id, &doc)
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn webhook_delete(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(chave): Path<String>,
) -> PixResult<Response> {
    tenant.require("webhook.write")?;
    state.ispb()?;
    let vault = state.vault_or_503()?;
    let tenant_id = tenant.id;
    pix_query(&state, move |q| -> PixResult<()> {
        let (_, index, _) = own_key(&vault, q, tenant_id, &chave)?.ok_or_else(webhook_not_found)?;
        if q.delete_document(crate::webhook::WEBHOOK_KIND, tenant_id, &index)? {
            Ok(())
        } else {
            Err(webhook_not_found())
        }
    })
    .await?;
    audit.0.set_resource("pix-webhook");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn webhook_list(
    State(state): State<AppState>,
    tenant: Tenant,
    RawQuery(raw): RawQuery,
) -> PixResult<Response> {
    const K: &str = "WebhookConsultaInvalida";
    tenant.require("webhook.read")?;
    state.ispb()?;
    let p = params_of(raw, K)?;
    let at = |name: &str, default: u64| -> PixResult<u64> {
        match p.get(name) {
            Some(t) => parse_date_time(t).ok_or_else(|| PixError::violation(K, name, "must be an RFC 3339 date-time")),
            None => Ok(default),
        }
    };
    let (from, to) = (at("inicio", 0)?, at("fim", u64::MAX)?);
    ordered(K, from, to)?;
    let (page, per_page) = pagination(&p, K)?;
    let mut parametros = json!({});
    for name in ["inicio", "fim"] {
        if let Some(v) = p.get(name) {
            parametros[name] = json!(v);
        }
    }
    let tenant_id = tenant.id;
    let st = state.clone();
    let (items, total) = pix_query(&state, move |q| -> PixResult<(Vec<Value>, usize)> {
        let docs = scan(q, crate::webhook::WEBHOOK_KIND, tenant_id, (from, to.saturating_add(1)), |_| true)?;
        let total = docs.len();
        let page_docs = docs.iter().skip(page.saturating_mul(per_page)).take(per_page);
        Ok((page_docs.map(|d| webhook_view(&st, q, tenant_id, d)).collect::<PixResult<_>>()?, total))
    })
    .await?;
    parametros["paginacao"] = paginacao(page, per_page, total);
    Ok(reply(StatusCode::OK, &json!({"parametros": parametros, "webhooks": items})))
}

#[cfg(test)]
mod tests {
    use super::parse_date_time;

    #[test]
    fn date_times_parse_exactly_and_refuse_without_panicking() {
        const SEC: u64 = 1_000_000_000;
        assert_eq!(parse_date_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_date_time("2020-04-01T00:00:00Z"), Some(1_585_699_200 * SEC));
        assert_eq!(parse_date_time("2020-04-01T00:00:00.5Z"), Some(1_585_699_200 * SEC + SEC / 2));
        assert_eq!(parse_date_time("2020-04-01T00:00:00-03:00"), Some((1_585_699_200 + 3 * 3600) * SEC));
        assert_eq!(parse_date_time("1900-01-01T00:00:00Z"), Some(0), "before the epoch clamps");
        for bad in [
            "2020-04-01",
            "2020-13-01T00:00:00Z",
            "2020-04-01T00:00:00",
            "2020-04-01T00:00:00+0é00",
            "2020-04-01T00:00:00.Z",
            "ab",
        ] {
            assert_eq!(parse_date_time(bad), None, "{bad}");
        }
    }
}
