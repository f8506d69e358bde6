//! Batches of charges with a due date (`lotecobv`): `PUT /lotecobv/{id}` creates up to
//! [`LOTE_LEN_MAX`] cobv at once (or revises exactly the batch's charges again), `PATCH` revises
//! some of them, `GET` shows each request's outcome (`CRIADA`, or `NEGADA` with the `problema` a
//! `PUT /cobv/{txid}` would have answered), and the listing pages through batches.
//!
//! The batch is checked whole before anything is written (its shape, repeated txids, a txid that
//! exists already, a revision naming other charges than the batch's): any of those is a 400 and
//! nothing changes. Then each request is applied as `PUT`/`PATCH /cobv/{txid}` would, under that
//! charge's lock, and its outcome recorded; the answer, 202, comes once all are applied, so a
//! `GET` right after shows no request `EM_PROCESSAMENTO` — unless storage failed midway: the batch
//! is recorded before its charges are made, so what was not applied shows `EM_PROCESSAMENTO` and
//! the same `PUT` again finishes it. A batch holds its txids from when it is recorded
//! ([`LOTE_TXID_KIND`]): no other batch, and no `PUT /cobv` while the batch has no charge under
//! it, takes one; and a batch writes only over charges it made.

use super::cobv::CobVBody;
use super::*;

pub const LOTE_KIND: &str = "pix-lotecobv";
/// A txid a batch holds, for good (the document's id the txid, its body the batch's id): taken
/// when the batch is recorded, before its charges are made, so that no other batch and no `PUT
/// /cobv/{txid}` takes a txid whose request is in process or was refused in the batch (the spec's
/// rule), and a batch sent again never writes over a charge it did not make.
pub const LOTE_TXID_KIND: &str = "pix-lotecobv-txid";
/// Charges one batch may carry.
pub const LOTE_LEN_MAX: usize = 1_000;
const K: &str = "LoteCobVOperacaoInvalida";

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Item {
    txid: String,
    /// `EM_PROCESSAMENTO` (recorded, not applied yet), `CRIADA` or `NEGADA`.
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    problema: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    criacao: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct StoredLote {
    id: u64,
    descricao: String,
    criacao: u64,
    cobsv: Vec<Item>,
}

fn lote_view(l: &StoredLote) -> Value {
    let cobsv: Vec<Value> = l
        .cobsv
        .iter()
        .map(|i| {
            let mut v = json!({"txid": i.txid, "status": i.status});
            if let Some(p) = &i.problema {
                v["problema"] = p.clone();
            }
            if let Some(at) = i.criacao {
                v["criacao"] = json!(rfc3339(at));
            }
            v
        })
        .collect();
    json!({"id": l.id, "descricao": l.descricao, "criacao": rfc3339(l.criacao), "cobsv": cobsv})
}

fn not_found() -> PixError {
    PixError::new(StatusCode::NOT_FOUND, "LoteCobVNaoEncontrado", "no batch with this id")
}

fn lote_id(text: &str) -> PixResult<u64> {
    crate::dto::digits::<u64>(text).filter(|n| *n <= i64::MAX as u64).ok_or_else(not_found)
}

/// The spec's `Problema` of a refused request, as `GET /lotecobv/{id}` shows it.
fn problema(e: &PixError) -> Value {
    json!({
        "type": format!("{ERROR_BASE}{}", e.kind),
        "title": e.status.canonical_reason().unwrap_or("Erro"),
        "status": e.status.as_u16(),
        "detail": e.detail,
        "violacoes": e.violacoes,
    })
}

/// A batch's description and each request (its txid, and the cobv body).
type LoteBody = (Option<String>, Vec<(String, CobVBody)>);

/// The batch's body: its description and each request (its txid, and the cobv body).
fn parse(bytes: &Bytes, revising: bool) -> PixResult<LoteBody> {
    let v: Value = body_of(bytes, K, "loteCobV")?;
    let Value::Object(mut map) = v else { return Err(PixError::violation(K, "loteCobV", "must be an object")) };
    let descricao = match map.remove("descricao") {
        None if revising => None,
        None => return Err(PixError::violation(K, "loteCobV.descricao", "is required")),
        Some(Value::String(d)) if d.chars().count() <= 200 && !d.chars().any(char::is_control) => Some(d),
        Some(_) => return Err(PixError::violation(K, "loteCobV.descricao", "a text of at most 200 characters")),
    };
    let cobsv = match map.remove("cobsv") {
        None if revising => vec![],
        Some(Value::Array(items)) => items,
        _ => return Err(PixError::violation(K, "loteCobV.cobsV", "is required: an array of charges")),
    };
    if let Some(other) = map.keys().next() {
        return Err(PixError::violation(K, &format!("loteCobV.{other}"), "is not a field of a batch"));
    }
    if cobsv.len() > LOTE_LEN_MAX || (!revising && cobsv.is_empty()) {
        return Err(PixError::violation(K, "loteCobV.cobsV", "must hold 1 to 1000 charges"));
    }
    let mut out = Vec::with_capacity(cobsv.len());
    let mut seen = std::collections::HashSet::new();
    for (i, item) in cobsv.into_iter().enumerate() {
        let at = format!("loteCobV.cobsV[{i}]");
        let Value::Object(mut fields) = item else { return Err(PixError::violation(K, &at, "must be an object")) };
        let txid = match fields.remove("txid") {
            Some(Value::String(t)) if pix::ids::valid_txid(&t) => t,
            _ => return Err(PixError::violation(K, &format!("{at}.txid"), "is required: [a-zA-Z0-9]{26,35}")),
        };
        if !seen.insert(txid.clone()) {
            return Err(PixError::violation(K, &format!("{at}.txid"), "repeats an earlier charge of the batch"));
        }
        let body: CobVBody = crate::json_objects::from_value(Value::Object(fields))
            .map_err(|e| PixError::violation(K, &at, format!("does not respect the schema: {e}")))?;
        if body.status.is_some() && !revising {
            return Err(PixError::violation(K, &format!("{at}.status"), "is set by the PSP"));
        }
        out.push((txid, body));
    }
    Ok((descricao, out))
}

fn read_lote(q: &dyn store::Queries, tenant: u128, id: u64) -> store::Result<Option<(store::Document, StoredLote)>> {
    read_document(q, LOTE_KIND, tenant, &id.to_string())
}

pub async fn lote_put(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    apply(state, tenant, audit, id, bytes, false).await
}

pub async fn lote_patch(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    apply(state, tenant, audit, id, bytes, true).await
}

async fn apply(
    state: AppState,
    tenant: Tenant,
    audit: Audit,
    id: String,
    bytes: Bytes,
    patch: bool,
) -> PixResult<Response> {
    tenant.require("lotecobv.write")?;
    state.ispb()?;
    let id = match lote_id(&id) {
        Ok(id) => id,
        Err(_) if !patch => return Err(PixError::violation(K, "id", "a batch's id is a number (int64)")),
        Err(e) => return Err(e),
    };
    let (descricao, requests) = parse(&bytes, patch)?;
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-lotecobv:{}", crate::audit_trail::client_id(&id.to_string())));
    // One batch of a tenant at a time (taken before any stripe; a stripe held across the batch
    // could be one a charge of it needs).
    let batch_lock = state.pix_runtime.batch_lock(tenant_id).lock_owned().await;
    let txids: Vec<String> = requests.iter().map(|(t, _)| t.clone()).collect();
    let first_descricao = descricao.clone();
    // The batch is recorded before its charges are made, its requests EM_PROCESSAMENTO: whatever
    // stops it midway, it exists, and the same PUT again finishes it.
    let recorded = pix_query(&state, move |q| -> PixResult<(store::Document, StoredLote)> {
        let existing = read_lote(q, tenant_id, id)?;
        match existing {
            None if patch => Err(not_found()),
            None => {
                for (i, t) in txids.iter().enumerate() {
                    if read_cob(q, tenant_id, t)?.is_some() {
                        return Err(PixError::violation(
                            K,
                            &format!("loteCobV.cobsV[{i}].txid"),
                            "a charge with this txid exists: a batch only creates charges",
                        ));
                    }
                }
                let held = hold_txids(q, tenant_id, id, &txids)?;
                let now = store::now_nanos();
                let pending =
                    |t: &String| Item { txid: t.clone(), status: "EM_PROCESSAMENTO".into(), problema: None, criacao: None };
                let lote = StoredLote {
                    id,
                    descricao: first_descricao.unwrap_or_default(),
                    criacao: now,
                    cobsv: txids.iter().map(pending).collect(),
                };
                let doc = store::Document {
                    kind: LOTE_KIND.into(),
                    tenant_id,
                    id: id.to_string(),
                    lookup: None,
                    owner: None,
                    created_at: now,
                    version: 1,
                    body: serde_json::to_string(&lote).expect("serializable"),
                };
                if let Err(e) = q.insert_document(&doc) {
                    // Another request recorded this batch first: the holds it names are its own
                    // (they name this batch's id), and only those of txids it does not name go.
                    // Storage failing leaves them all: the commit may have been made, and the
                    // same batch sent again takes them up.
                    if let store::StoreError::Conflict(_) = e {
                        if let Some((_, recorded)) = read_lote(q, tenant_id, id)? {
                            let named: Vec<&str> = recorded.cobsv.iter().map(|i| i.txid.as_str()).collect();
                            let stray: Vec<String> = held.into_iter().filter(|t| !named.contains(&t.as_str())).collect();
                            release_holds(q, tenant_id, &stray);
                        }
                    }
                    return Err(match e {
                        store::StoreError::Conflict(_) => {
                            let mut e = PixError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "ServicoIndisponivel",
                                "the batch was made meanwhile by another request: send it again",
                            );
                            e.retry_after_seconds = Some(1);
                            e
                        }
                        e => e.into(),
                    });
                }
                Ok((doc, lote))
            }
            Some((doc, l)) => {
                let mine: std::collections::HashSet<&str> = l.cobsv.iter().map(|i| i.txid.as_str()).collect();
                let named: std::collections::HashSet<&str> = txids.iter().map(String::as_str).collect();
                if (!patch && mine != named) || (patch && !named.is_subset(&mine)) {
                    return Err(PixError::violation(
                        K,
                        "loteCobV.cobsV",
                        "a batch's charges are fixed when it is made: name the same charges (PUT) or some of them (PATCH)",
                    ));
                }
                // Held when it was made. A batch made before holds were kept takes what no other
                // batch holds now; a request whose txid another holds is refused on its own
                // (NEGADA) when applied.
                for t in &txids {
                    let _ = hold_txids(q, tenant_id, id, std::slice::from_ref(t));
                }
                Ok((doc, l))
            }
        }
    })
    .await?;
    // Applied in a task of its own: a client that goes away does not stop a batch halfway.
    let st = state.clone();
    let task = tokio::spawn(async move {
        let _batch = batch_lock;
        let state = st;
        // Each request as PUT/PATCH /cobv/{txid} would apply it, under its charge's lock.
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut failure = None;
        for (txid, body) in requests {
            let _guard = state.pix_runtime.lock(&[cob_lock(&state, tenant_id, &txid)]).await;
            let st = state.clone();
            let (t, revise) = (txid.clone(), patch);
            let result =
                pix_query(&state, move |q| super::cobv::write_one(&st, q, tenant_id, &t, &body, !revise, Some(id)))
                    .await;
            let item = match result {
                Ok(_) => Item { txid, status: "CRIADA".into(), problema: None, criacao: None },
                // Storage or the key store failing is the batch's failure, not the request's: the
                // rest stays EM_PROCESSAMENTO until the batch is sent again.
                Err(e) if e.status.is_server_error() => {
                    failure = Some(e);
                    break;
                }
                Err(e) => Item { txid, status: "NEGADA".into(), problema: Some(problema(&e)), criacao: None },
            };
            outcomes.push(item);
        }
        let (doc, mut lote) = recorded;
        let written = pix_query(&state, move |q| -> PixResult<()> {
            if let Some(d) = descricao {
                lote.descricao = d;
            }
            for mut item in outcomes {
                let made = read_cob(q, tenant_id, &item.txid)?.filter(|(_, s)| s.lote_id == Some(id));
                // A request refused now whose charge this batch made before (a run stopped midway
                // whose charge was paid since, say) stays CRIADA: the charge exists.
                if item.status == "NEGADA" && made.is_some() {
                    item.status = "CRIADA".into();
                }
                if item.status == "CRIADA" {
                    item.criacao = made.map(|(_, s)| s.created_at);
                }
                match lote.cobsv.iter_mut().find(|i| i.txid == item.txid) {
                    // A refused revision leaves a charge that exists as it was: still CRIADA.
                    Some(old) if old.status == "CRIADA" && item.status == "NEGADA" => old.problema = item.problema,
                    Some(old) => *old = item,
                    None => lote.cobsv.push(item),
                }
            }
            let body = serde_json::to_string(&lote).expect("serializable");
            if !q.update_document(&store::Document { version: doc.version + 1, body, ..doc.clone() }, doc.version)? {
                // Another node changed the batch meanwhile: its charges stand; sent again, the
                // batch records their outcomes.
                let mut e = PixError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServicoIndisponivel",
                    "the batch changed meanwhile; send it again",
                );
                e.retry_after_seconds = Some(1);
                return Err(e);
            }
            Ok(())
        })
        .await;
        written?;
        failure.map_or(Ok(()), Err)
    });
    task.await.map_err(|_| PixError::from(Problem::internal()))??;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Holds `txids` for batch `id` (see [`LOTE_TXID_KIND`]), all or none: every hold is checked
/// before any is written, and a txid another recorded batch holds (or takes meanwhile: each hold
/// is one insert or compare-and-set, atomic across nodes) is refused naming the request, with the
/// holds this call made taken back. A hold whose batch was never recorded is stale, and taken
/// over. Returns the holds it made, for the caller to give back should the batch's record not be
/// written after all. What it held stays held if the process stops midway; the same batch sent
/// again takes it up.
fn hold_txids(q: &dyn store::Queries, tenant_id: u128, id: u64, txids: &[String]) -> PixResult<Vec<String>> {
    let batch = id.to_string();
    let taken =
        |i: usize| PixError::violation(K, &format!("loteCobV.cobsV[{i}].txid"), "another batch holds this txid");
    // (request, txid, the stale hold to take over, if any: one whose batch was never recorded)
    let mut wanted = Vec::new();
    for (i, t) in txids.iter().enumerate() {
        match q.document(LOTE_TXID_KIND, tenant_id, t)? {
            Some(d) if d.body == batch => {}
            Some(d) if q.document(LOTE_KIND, tenant_id, &d.body)?.is_some() => return Err(taken(i)),
            stale => wanted.push((i, t, stale)),
        }
    }
    let mut made = Vec::with_capacity(wanted.len());
    for (i, t, stale) in wanted {
        let outcome = match stale {
            Some(d) => {
                let mine = store::Document { version: d.version + 1, body: batch.clone(), ..d.clone() };
                q.update_document(&mine, d.version)
            }
            None => {
                let hold = store::Document {
                    kind: LOTE_TXID_KIND.into(),
                    tenant_id,
                    id: t.clone(),
                    lookup: None,
                    owner: None,
                    created_at: store::now_nanos(),
                    version: 1,
                    body: batch.clone(),
                };
                match q.insert_document(&hold) {
                    Ok(()) => Ok(true),
                    Err(store::StoreError::Conflict(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        };
        // Not written: taken meanwhile — by another request of this batch, fine; by another
        // batch, or gone again already, refused (to be sent again).
        let refused = match outcome {
            Ok(true) => {
                made.push(t.clone());
                None
            }
            Ok(false) => match q.document(LOTE_TXID_KIND, tenant_id, t) {
                Ok(Some(d)) if d.body == batch => None,
                Ok(_) => Some(taken(i)),
                Err(e) => Some(e.into()),
            },
            Err(e) => Some(e.into()),
        };
        if let Some(e) = refused {
            release_holds(q, tenant_id, &made);
            return Err(e);
        }
    }
    Ok(made)
}

/// Takes back holds [`hold_txids`] made for a batch that was not recorded (best effort: a hold
/// left behind names a batch that does not exist, and only blocks its txid).
fn release_holds(q: &dyn store::Queries, tenant_id: u128, made: &[String]) {
    for t in made {
        if let Err(e) = q.delete_document(LOTE_TXID_KIND, tenant_id, t) {
            tracing::warn!(error = %e, "a batch's txid hold could not be taken back");
        }
    }
}

/// The batch holding `txid`, if one does (see [`LOTE_TXID_KIND`]). A hold whose batch was never
/// recorded (a request that stopped between the two, or a refused batch of a version before holds
/// were all or none) holds nothing.
pub(super) fn batch_holding(q: &dyn store::Queries, tenant_id: u128, txid: &str) -> store::Result<Option<String>> {
    let Some(hold) = q.document(LOTE_TXID_KIND, tenant_id, txid)? else { return Ok(None) };
    Ok(q.document(LOTE_KIND, tenant_id, &hold.body)?.map(|_| hold.body))
}

pub async fn lote_get(State(state): State<AppState>, tenant: Tenant, Path(id): Path<String>) -> PixResult<Response> {
    tenant.require("lotecobv.read")?;
    state.ispb()?;
    let id = lote_id(&id)?;
    let tenant_id = tenant.id;
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let (_, lote) = read_lote(q, tenant_id, id)?.ok_or_else(not_found)?;
        Ok(lote_view(&lote))
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn lote_list(State(state): State<AppState>, tenant: Tenant, RawQuery(raw): RawQuery) -> PixResult<Response> {
    const KL: &str = "LoteCobVConsultaInvalida";
    tenant.require("lotecobv.read")?;
    state.ispb()?;
    let p = params_of(raw, KL)?;
    let span = window(&p, KL)?;
    let (page, per_page) = pagination(&p, KL)?;
    let mut parametros = json!({"inicio": p["inicio"], "fim": p["fim"]});
    let tenant_id = tenant.id;
    let (lotes, total) = pix_query(&state, move |q| -> PixResult<(Vec<Value>, usize)> {
        let docs = scan(q, LOTE_KIND, tenant_id, span, |_| true)?;
        let total = docs.len();
        let mut out = Vec::new();
        for doc in docs.iter().skip(page.saturating_mul(per_page)).take(per_page) {
            let lote: StoredLote = serde_json::from_str(&doc.body).map_err(corrupt)?;
            out.push(lote_view(&lote));
        }
        Ok((out, total))
    })
    .await?;
    parametros["paginacao"] = paginacao(page, per_page, total);
    Ok(reply(StatusCode::OK, &json!({"parametros": parametros, "lotes": lotes})))
}
