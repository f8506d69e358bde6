//! The audit log: entries (a tenant sees its own, the operator all), the signed tree head, and
//! inclusion and consistency proofs anyone holding the public key can check (RFC 6962 / 9162).

use std::collections::HashMap;

use axum::extract::State;

use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{hex, Caller};
use crate::dto::{rfc3339, uuid_string};
use crate::json::{reply, Params};
use crate::problem::Problem;
use crate::routes::query;
use crate::AppState;

#[derive(Serialize, ToSchema)]
pub struct AuditEntryView {
    /// Position in the log, from 1.
    pub seq: u64,
    pub time: String,
    pub tenant_id: Option<String>,
    /// `operator`, `key:<id>`, `client:<id>` or `anonymous`.
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub request_id: String,
    pub source: String,
    pub outcome: String,
    /// RFC 6962 leaf hash of the entry's canonical form, hex.
    pub leaf_hash: String,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntryView>,
    /// Pass as `after` for the next page; absent on the last.
    pub next_after: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct TreeHeadView {
    pub tree_size: u64,
    /// Hex SHA-256 root of the first `tree_size` entries.
    pub root_hash: String,
    /// Nanoseconds since the UNIX epoch (signed as such).
    pub timestamp: u64,
    /// Ed25519 over `"rtpay audit tree head v1\0" || size (u64 BE) || timestamp (u64 BE) || root`, hex.
    pub signature: String,
    /// The Ed25519 public key, hex.
    pub public_key: String,
}

#[derive(Serialize, ToSchema)]
pub struct InclusionView {
    pub seq: u64,
    pub tree_size: u64,
    pub leaf_index: u64,
    pub leaf_hash: String,
    /// The audit path from the leaf up, hex.
    pub audit_path: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ConsistencyView {
    pub first: u64,
    pub second: u64,
    pub first_root: String,
    pub second_root: String,
    pub proof: Vec<String>,
}

fn view(e: &audit::Entry) -> AuditEntryView {
    let d = &e.draft;
    AuditEntryView {
        seq: e.seq,
        time: rfc3339(e.time),
        tenant_id: d.tenant.map(uuid_string),
        actor: d.actor.clone(),
        action: d.action.clone(),
        resource: d.resource.clone(),
        request_id: d.request_id.clone(),
        source: d.source.clone(),
        outcome: d.outcome.clone(),
        leaf_hash: hex(&e.leaf_hash()),
    }
}

/// Reads the named integer parameters, refusing any other: an unknown one first, then a bad value,
/// each the first by name (the same answer whatever the map's order).
fn params_of(params: &HashMap<String, String>, names: &[&str]) -> Result<HashMap<String, u64>, Problem> {
    if let Some(name) = params.keys().filter(|n| !names.contains(&n.as_str())).min() {
        return Err(crate::json::unknown_parameter(name, &format!("one of {}", names.join(", "))));
    }
    let mut sorted: Vec<(&String, &String)> = params.iter().collect();
    sorted.sort_unstable();
    let mut out = HashMap::new();
    for (name, value) in sorted {
        // Sequence numbers and sizes are stored as signed 64-bit integers: a larger `after` read
        // as negative would list the log from its start.
        let v = crate::dto::digits::<u64>(value).filter(|v| *v <= i64::MAX as u64).ok_or_else(|| {
            Problem::invalid(name.clone(), "invalid_integer", format!("`{name}` must be an integer in 0..=2^63-1"))
        })?;
        out.insert(name.clone(), v);
    }
    Ok(out)
}

fn required(params: &HashMap<String, u64>, name: &str) -> Result<u64, Problem> {
    params
        .get(name)
        .copied()
        .ok_or_else(|| Problem::invalid(name, "missing_parameter", format!("`{name}` is required")))
}

fn tenant_of(caller: Caller) -> Option<u128> {
    match caller {
        Caller::Operator => None,
        Caller::Tenant(t) => Some(t.id),
    }
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(("after" = Option<u64>, Query, maximum = 9223372036854775807_u64, description = "entries with a larger `seq`; default 0"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "1..=1000, default 100")),
    responses((status = 200, body = AuditPage), (status = 401, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = []), ("operator" = [])))]
pub async fn list_entries(
    State(state): State<AppState>,
    caller: Caller,
    Params(params): Params,
) -> Result<Response, Problem> {
    caller.require("audit:read")?;
    let p = params_of(&params, &["after", "limit"])?;
    let after = p.get("after").copied().unwrap_or(0);
    let limit = p.get("limit").copied().unwrap_or(100);
    if limit == 0 || limit > store::AUDIT_PAGE_LEN_MAX as u64 {
        return Err(Problem::invalid(
            "limit",
            "invalid_limit",
            format!("`limit` must be an integer in 1..={}", store::AUDIT_PAGE_LEN_MAX),
        ));
    }
    let tenant = tenant_of(caller);
    let entries = query(&state, move |q| q.audit_entries(after, limit as usize, tenant)).await?;
    let next_after = if entries.len() as u64 == limit { entries.last().map(|e| e.seq) } else { None };
    Ok(reply(StatusCode::OK, &AuditPage { entries: entries.iter().map(view).collect(), next_after }))
}

#[utoipa::path(get, path = "/v1/audit/tree-head", tag = "audit",
    responses((status = 200, body = TreeHeadView), (status = 404, body = Problem, description = "the log is empty")),
    security(("api_key" = []), ("operator" = [])))]
pub async fn tree_head(State(state): State<AppState>, caller: Caller) -> Result<Response, Problem> {
    caller.require("audit:read")?;
    let head = query(&state, |q| q.audit_head()).await?.ok_or_else(|| Problem::not_found("audit tree head"))?;
    Ok(reply(
        StatusCode::OK,
        &TreeHeadView {
            tree_size: head.head.size,
            root_hash: hex(&head.head.root),
            timestamp: head.head.time,
            signature: hex(&head.signature),
            public_key: hex(&state.audit_public_key),
        },
    ))
}

/// The tree size named by parameter `name`, by default the latest signed head's: proofs are given
/// only within what has been signed.
async fn signed_size(state: &AppState, params: &HashMap<String, u64>, name: &str) -> Result<u64, Problem> {
    let latest = query(state, |q| q.audit_head()).await?.map_or(0, |h| h.head.size);
    let size = params.get(name).copied().unwrap_or(latest);
    if size > latest {
        return Err(Problem::invalid(name, "beyond_tree_head", format!("`{name}` must be at most {latest}")));
    }
    Ok(size)
}

#[utoipa::path(get, path = "/v1/audit/proof/inclusion", tag = "audit",
    params(("seq" = u64, Query, minimum = 1, maximum = 9223372036854775807_u64, description = "1..=the tree's size"),
        ("tree_size" = Option<u64>, Query, maximum = 9223372036854775807_u64, description = "default: the latest signed size")),
    responses((status = 200, body = InclusionView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = []), ("operator" = [])))]
pub async fn inclusion_proof(
    State(state): State<AppState>,
    caller: Caller,
    Params(params): Params,
) -> Result<Response, Problem> {
    caller.require("audit:read")?;
    let p = params_of(&params, &["seq", "tree_size"])?;
    let seq = required(&p, "seq")?;
    let size = signed_size(&state, &p, "tree_size").await?;
    if seq == 0 || seq > size {
        return Err(Problem::invalid("seq", "not_in_tree", format!("`seq` must be in 1..={size}")));
    }
    let tenant = tenant_of(caller);
    let result = query(&state, move |q| {
        // A tenant proves only its own entries; others do not exist for it. (The listing gives
        // the first entry after `seq - 1`: another's, were `seq` missing from storage.)
        let entry = q.audit_entries(seq - 1, 1, None)?.into_iter().next();
        match entry {
            Some(e) if e.seq == seq && (tenant.is_none() || e.draft.tenant == tenant) => {
                Ok(Some((e.leaf_hash(), store::audit_inclusion(q, seq, size)?)))
            }
            _ => Ok(None),
        }
    })
    .await?;
    let (leaf, path) = result.ok_or_else(|| Problem::not_found("audit entry"))?;
    Ok(reply(
        StatusCode::OK,
        &InclusionView {
            seq,
            tree_size: size,
            leaf_index: seq - 1,
            leaf_hash: hex(&leaf),
            audit_path: path.iter().map(|h| hex(h)).collect(),
        },
    ))
}

#[utoipa::path(get, path = "/v1/audit/proof/consistency", tag = "audit",
    params(("first" = u64, Query, minimum = 1, maximum = 9223372036854775807_u64, description = "1..=`second`"),
        ("second" = Option<u64>, Query, maximum = 9223372036854775807_u64, description = "default: the latest signed size")),
    responses((status = 200, body = ConsistencyView), (status = 422, body = Problem)),
    security(("api_key" = []), ("operator" = [])))]
pub async fn consistency_proof(
    State(state): State<AppState>,
    caller: Caller,
    Params(params): Params,
) -> Result<Response, Problem> {
    caller.require("audit:read")?;
    let p = params_of(&params, &["first", "second"])?;
    let first = required(&p, "first")?;
    let second = signed_size(&state, &p, "second").await?;
    if first == 0 || first > second {
        return Err(Problem::invalid("first", "invalid_range", format!("`first` must be in 1..={second}")));
    }
    let (r1, r2, proof) = query(&state, move |q| {
        Ok((store::audit_root(q, first)?, store::audit_root(q, second)?, store::audit_consistency(q, first, second)?))
    })
    .await?;
    Ok(reply(
        StatusCode::OK,
        &ConsistencyView {
            first,
            second,
            first_root: hex(&r1),
            second_root: hex(&r2),
            proof: proof.iter().map(|h| hex(h)).collect(),
        },
    ))
}
