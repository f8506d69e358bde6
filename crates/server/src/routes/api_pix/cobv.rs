//! Charges with a due date (`cobv`): PUT/PATCH/GET by txid and the listing, and what their
//! locations serve (`GET /qr/v2/cobv/{token}`, the spec's `GET /cobv/{pixUrlAccessToken}`), with
//! the value on the day of payment: fine, interest, rebate and discount per `pix::charge`.
//!
//! A cobv is a charge document like a cob (one txid namespace, one lookup by location, concluded by
//! the same payment path) with its terms beside it: in clear in [`CobVTerms`] (what a payment must
//! pay today), and with the parties' data sealed in the revision ([`CobVContent`]). The receiver
//! (`recebedor`) is the holder of the key's account, with the address set by
//! `PUT /v1/holders/{id}/address`.

use super::*;
use crate::routes::holders::{read_address, record_id};
use crate::routes::pix_loc;
use pix::charge::{self as charge, ChargeError, Rule};

const K: &str = "CobVOperacaoInvalida";

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModV {
    modalidade: i64,
    #[serde(rename = "valorPerc")]
    valor_perc: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DataFixaV {
    data: String,
    #[serde(rename = "valorPerc")]
    valor_perc: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DescV {
    modalidade: i64,
    #[serde(rename = "valorPerc", skip_serializing_if = "Option::is_none")]
    valor_perc: Option<String>,
    #[serde(rename = "descontoDataFixa", skip_serializing_if = "Option::is_none")]
    desconto_data_fixa: Option<Vec<DataFixaV>>,
}

/// `CobVValor` as the API writes it (and as a charge shows it back).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ValorV {
    #[serde(skip_serializing_if = "Option::is_none")]
    original: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multa: Option<ModV>,
    #[serde(skip_serializing_if = "Option::is_none")]
    juros: Option<ModV>,
    #[serde(skip_serializing_if = "Option::is_none")]
    abatimento: Option<ModV>,
    #[serde(skip_serializing_if = "Option::is_none")]
    desconto: Option<DescV>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct CalendarioV {
    #[serde(rename = "dataDeVencimento")]
    data_de_vencimento: Option<String>,
    #[serde(rename = "validadeAposVencimento")]
    validade_apos_vencimento: Option<i64>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct DevedorV {
    cpf: Option<String>,
    cnpj: Option<String>,
    nome: Option<String>,
    email: Option<String>,
    logradouro: Option<String>,
    cidade: Option<String>,
    uf: Option<String>,
    cep: Option<String>,
}

/// `valor` as a request gives it: a rule given as `null` is removed by a `PATCH` (absent, it is
/// kept); for a `PUT`, which gives the whole charge, the two are the same.
#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct ValorBodyV {
    original: Option<String>,
    #[serde(default, deserialize_with = "given")]
    multa: Option<Option<ModV>>,
    #[serde(default, deserialize_with = "given")]
    juros: Option<Option<ModV>>,
    #[serde(default, deserialize_with = "given")]
    abatimento: Option<Option<ModV>>,
    #[serde(default, deserialize_with = "given")]
    desconto: Option<Option<DescV>>,
}

/// A field that is there, `null` or not (an absent one is `None` by `default`).
fn given<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `CobVSolicitada`, or `CobVRevisada` for PATCH (every field optional).
#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct CobVBody {
    calendario: Option<CalendarioV>,
    devedor: Option<DevedorV>,
    loc: Option<Value>,
    valor: Option<ValorBodyV>,
    chave: Option<String>,
    #[serde(rename = "solicitacaoPagador")]
    solicitacao_pagador: Option<String>,
    #[serde(rename = "infoAdicionais")]
    info_adicionais: Option<Vec<InfoBody>>,
    pub(super) status: Option<String>,
}

/// The terms a payment is checked against (in clear beside the charge: amounts and dates only).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CobVTerms {
    pub valor: ValorV,
    pub data_de_vencimento: String,
    pub validade_apos_vencimento: i64,
}

/// A revision's cobv part (sealed with the rest of the revision).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CobVContent {
    pub terms: CobVTerms,
    /// The debtor's `email`, `logradouro`, `cidade`, `uf`, `cep`, as given.
    pub devedor_extra: serde_json::Map<String, Value>,
    /// The receiver as the spec shows it (`DadosRecebedor`), when the revision was made.
    pub recebedor: Value,
}

fn charge_error(e: ChargeError) -> PixError {
    PixError::violation(K, &format!("cobv.{}", e.field), e.rule.to_string())
}

impl CobVTerms {
    fn calendario(&self) -> Result<charge::CobVCalendario, ChargeError> {
        let date = charge::parse_date(&self.data_de_vencimento)
            .ok_or(ChargeError { field: "calendario.dataDeVencimento".into(), rule: Rule::Date })?;
        Ok(charge::CobVCalendario {
            data_de_vencimento: date,
            validade_apos_vencimento: Some(self.validade_apos_vencimento),
        })
    }

    fn domain(&self) -> Result<charge::CobVValor, ChargeError> {
        let v = &self.valor;
        let parse = |field: &str, text: &str| charge::parse_valor_perc(field, text);
        let modalidade = |m: i64| u8::try_from(m).unwrap_or(0);
        let mvp = |field: &str, m: &Option<ModV>| -> Result<Option<charge::ModalidadeValorPerc>, ChargeError> {
            m.as_ref()
                .map(|m| {
                    Ok(charge::ModalidadeValorPerc {
                        modalidade: modalidade(m.modalidade),
                        valor_perc: parse(&format!("valor.{field}.valorPerc"), &m.valor_perc)?,
                    })
                })
                .transpose()
        };
        let original = parse("valor.original", v.original.as_deref().unwrap_or(""))?;
        let desconto = match &v.desconto {
            None => None,
            Some(d) => {
                let mut fixed = Vec::new();
                for (i, f) in d.desconto_data_fixa.iter().flatten().enumerate() {
                    let at = format!("valor.desconto.descontoDataFixa[{i}]");
                    let data = charge::parse_date(&f.data)
                        .ok_or(ChargeError { field: format!("{at}.data"), rule: Rule::Date })?;
                    fixed.push(charge::DescontoDataFixa {
                        data,
                        valor_perc: parse(&format!("{at}.valorPerc"), &f.valor_perc)?,
                    });
                }
                if d.desconto_data_fixa.as_ref().is_some_and(Vec::is_empty) {
                    return Err(ChargeError {
                        field: "valor.desconto.descontoDataFixa".into(),
                        rule: Rule::Count { min: 1, max: 3 },
                    });
                }
                Some(charge::Desconto {
                    modalidade: modalidade(d.modalidade),
                    valor_perc: d.valor_perc.as_deref().map(|t| parse("valor.desconto.valorPerc", t)).transpose()?,
                    desconto_data_fixa: fixed,
                })
            }
        };
        Ok(charge::CobVValor {
            original,
            multa: mvp("multa", &v.multa)?,
            juros: mvp("juros", &v.juros)?,
            abatimento: mvp("abatimento", &v.abatimento)?,
            desconto,
        })
    }

    /// What the charge costs when paid on `day`.
    pub fn amount_on(&self, day: charge::Date) -> Result<charge::CobVValorCalculado, ChargeError> {
        charge::cobv_amount(&self.domain()?, &self.calendario()?, day)
    }

    /// The charge's terms as made or changed on `today` (see [`charge::validate_cobv`]).
    fn validate(&self, today: charge::Date) -> Result<(), ChargeError> {
        charge::validate_cobv(&self.domain()?, &self.calendario()?, today)
    }
}

fn text_field(
    extra: &mut serde_json::Map<String, Value>,
    name: &str,
    value: &Option<String>,
    ok: impl Fn(&str) -> bool,
    rule: &str,
) -> PixResult<()> {
    if let Some(v) = value {
        if !ok(v) || v.chars().any(char::is_control) {
            return Err(PixError::violation(K, &format!("cobv.devedor.{name}"), rule.to_owned()));
        }
        extra.insert(name.to_owned(), json!(v));
    }
    Ok(())
}

/// Checks a body against the spec's rules, over `base` (the current revision) when revising.
fn content_of_v(body: &CobVBody, base: Option<&CobContent>, recebedor: Value, now: u64) -> PixResult<CobContent> {
    let base_v = base.and_then(|b| b.cobv.as_ref());
    // The fields a cob has too are checked by the cob's rules.
    let as_cob = CobBody {
        devedor: body.devedor.as_ref().map(|d| DevedorBody {
            cpf: d.cpf.clone(),
            cnpj: d.cnpj.clone(),
            nome: d.nome.clone(),
        }),
        valor: body.valor.as_ref().and_then(|v| v.original.clone()).map(|o| ValorBody {
            original: Some(o),
            modalidade_alteracao: None,
            retirada: None,
        }),
        chave: body.chave.clone(),
        solicitacao_pagador: body.solicitacao_pagador.clone(),
        info_adicionais: body.info_adicionais.clone(),
        ..CobBody::default()
    };
    let base_cob = base.map(|b| CobContent { expiracao: pix::charge::EXPIRACAO_DEFAULT_S, ..b.clone() });
    if base.is_none() && as_cob.valor.is_none() {
        return Err(PixError::violation(K, "cobv.valor.original", "is required"));
    }
    let mut content = content_of(&as_cob, base_cob.as_ref(), now, K, "cobv")?;
    if content.devedor.is_none() {
        return Err(PixError::violation(K, "cobv.devedor", "is required: `cpf` or `cnpj`, and `nome`"));
    }
    let devedor_extra = match &body.devedor {
        None => base_v.map(|b| b.devedor_extra.clone()).unwrap_or_default(),
        Some(d) => {
            let mut extra = serde_json::Map::new();
            let len = |max: usize| move |v: &str| !v.trim().is_empty() && v.chars().count() <= max;
            text_field(
                &mut extra,
                "email",
                &d.email,
                |v| pix::keys::PixKey::parse(pix::keys::KeyType::Email, v).is_ok(),
                "must be an e-mail address",
            )?;
            text_field(&mut extra, "logradouro", &d.logradouro, len(200), "1 to 200 characters")?;
            text_field(&mut extra, "cidade", &d.cidade, len(200), "1 to 200 characters")?;
            text_field(
                &mut extra,
                "uf",
                &d.uf,
                |v| v.len() == 2 && v.bytes().all(|b| b.is_ascii_uppercase()),
                "two capital letters",
            )?;
            text_field(
                &mut extra,
                "cep",
                &d.cep,
                |v| v.len() == 8 && v.bytes().all(|b| b.is_ascii_digit()),
                "8 digits",
            )?;
            extra
        }
    };
    let (data_de_vencimento, validade) = match (&body.calendario, base_v) {
        (Some(c), b) => (
            match (&c.data_de_vencimento, b) {
                (Some(d), _) => d.clone(),
                (None, Some(b)) => b.terms.data_de_vencimento.clone(),
                (None, None) => return Err(PixError::violation(K, "cobv.calendario.dataDeVencimento", "is required")),
            },
            c.validade_apos_vencimento
                .or(b.map(|b| b.terms.validade_apos_vencimento))
                .unwrap_or(charge::VALIDADE_APOS_VENCIMENTO_DEFAULT_DAYS),
        ),
        (None, Some(b)) => (b.terms.data_de_vencimento.clone(), b.terms.validade_apos_vencimento),
        (None, None) => return Err(PixError::violation(K, "cobv.calendario", "is required")),
    };
    if !(0..=charge::VALIDADE_APOS_VENCIMENTO_MAX_DAYS).contains(&validade) {
        return Err(PixError::violation(K, "cobv.calendario.validadeAposVencimento", "must be an integer ≥ 0"));
    }
    // The value: what is given replaces the revision's, part by part.
    let mut valor = base_v.map(|b| b.terms.valor.clone()).unwrap_or_default();
    if let Some(v) = &body.valor {
        let v = v.clone();
        valor.original = v.original.or(valor.original);
        // Given (`null` included) replaces; absent keeps.
        valor.multa = v.multa.unwrap_or(valor.multa);
        valor.juros = v.juros.unwrap_or(valor.juros);
        valor.abatimento = v.abatimento.unwrap_or(valor.abatimento);
        valor.desconto = v.desconto.unwrap_or(valor.desconto);
    }
    valor.original = Some(pix::amount::format(content.original));
    let terms = CobVTerms { valor, data_de_vencimento, validade_apos_vencimento: validade };
    terms.validate(charge::brasilia_date(now)).map_err(charge_error)?;
    content.expiracao = 0;
    content.modalidade_alteracao = 0;
    content.cobv = Some(CobVContent { terms, devedor_extra, recebedor });
    Ok(content)
}

/// The receiver as the spec shows it: the key's account's holder, with its address.
fn recebedor_of(state: &AppState, q: &dyn store::Queries, tenant: u128, account: &str) -> PixResult<Value> {
    let vault = state.vault_or_503()?;
    let id = uuid::Uuid::parse_str(account).map_err(|_| corrupt("a key's account id"))?.as_u128();
    let key = ledger::AccountKey { tenant: ledger::TenantId(tenant), id: ledger::AccountId(id) };
    let holder = q
        .account(key)?
        .and_then(|a| a.holder)
        .ok_or_else(|| PixError::violation(K, "cobv.chave", "the key's account has no holder"))?;
    let h = q.holder(tenant, holder)?.ok_or_else(|| corrupt("an account's holder is missing"))?;
    let dek = vault.data_key(q, tenant)?;
    let name = vault::open(&dek, &record_id(tenant, holder, "name"), &h.name_sealed).map_err(VaultFailure::from)?;
    let doc =
        vault::open(&dek, &record_id(tenant, holder, "document"), &h.document_sealed).map_err(VaultFailure::from)?;
    let address = read_address(&vault, q, tenant, holder)?.ok_or_else(|| {
        PixError::violation(
            K,
            "cobv.recebedor",
            format!(
                "the receiver's address is required: set it with PUT /v1/holders/{}/address",
                crate::dto::uuid_string(holder)
            ),
        )
    })?;
    let kind = if h.kind == "person" { "cpf" } else { "cnpj" };
    Ok(json!({
        kind: String::from_utf8_lossy(&doc),
        "nome": String::from_utf8_lossy(&name),
        "logradouro": address.street,
        "cidade": address.city,
        "uf": address.state,
        "cep": address.postal_code,
    }))
}

/// The spec's `DadosRecebedor` requires `logradouro`, `cidade`, `uf` and `cep` of the object it is
/// part of (the charge, the payload), not only of its `recebedor`: they are written in both places.
fn with_receiver_address(out: &mut Value, recebedor: &Value) {
    for field in ["logradouro", "cidade", "uf", "cep"] {
        out[field] = recebedor[field].clone();
    }
}

fn devedor_json(content: &CobContent) -> Value {
    let mut d = match &content.devedor {
        Some((kind, doc, nome)) => json!({ kind.as_str(): doc, "nome": nome }),
        None => json!({}),
    };
    if let Some(v) = &content.cobv {
        for (k, value) in &v.devedor_extra {
            d[k] = value.clone();
        }
    }
    d
}

/// The charge as the spec shows it (`CobVCompleta`).
pub(super) fn cobv_view(stored: &StoredCob, content: &CobContent, revisao: usize, pix: Option<Value>) -> Value {
    let Some(v) = &content.cobv else { return json!({}) };
    let mut out = json!({
        "calendario": {
            "criacao": rfc3339(stored.created_at),
            "dataDeVencimento": v.terms.data_de_vencimento,
            "validadeAposVencimento": v.terms.validade_apos_vencimento,
        },
        "txid": stored.txid,
        "revisao": revisao,
        "devedor": devedor_json(content),
        "recebedor": v.recebedor,
        "status": stored.status,
        "valor": v.terms.valor,
        "chave": content.chave,
    });
    with_receiver_address(&mut out, &v.recebedor);
    if let Some(l) = pix_loc::Linked::of(stored) {
        let uri = format!("https://{}", l.location);
        out["loc"] = json!({"id": l.id, "location": uri, "tipoCob": "cobv", "criacao": rfc3339(l.created_at), "txid": stored.txid});
        out["location"] = json!(uri);
        let code = pix::brcode::encode(&pix::brcode::Spec {
            key: None,
            url: Some(l.location),
            info: None,
            // The value depends on the day of payment: the payer's app reads it at the location.
            amount: None,
            name: COB_MERCHANT_NAME.into(),
            city: COB_MERCHANT_CITY.into(),
            txid: None,
        });
        out["pixCopiaECola"] = json!(code.unwrap_or_default());
    }
    if let Some(s) = &content.solicitacao_pagador {
        out["solicitacaoPagador"] = json!(s);
    }
    if !content.info_adicionais.is_empty() {
        out["infoAdicionais"] = json!(content.info_adicionais);
    }
    if let Some(p) = pix {
        out["pix"] = json!([p]);
    }
    out
}

fn not_found() -> PixError {
    PixError::new(StatusCode::NOT_FOUND, "CobVNaoEncontrada", "no charge with a due date has this txid")
}

pub async fn cobv_put(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(txid): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    tenant.require("cobv.write")?;
    state.ispb()?;
    if !pix::ids::valid_txid(&txid) {
        return Err(PixError::violation(K, "txid", "must match [a-zA-Z0-9]{26,35}"));
    }
    let body: CobVBody = body_of(&bytes, K, "cobv")?;
    if body.status.is_some() {
        return Err(PixError::violation(K, "cobv.status", "is set by the PSP; a charge is created ATIVA"));
    }
    write(state, tenant, audit, txid, body, true).await
}

pub async fn cobv_patch(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(txid): Path<String>,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    tenant.require("cobv.write")?;
    state.ispb()?;
    if !pix::ids::valid_txid(&txid) {
        return Err(not_found());
    }
    let body: CobVBody = body_of(&bytes, K, "cobv")?;
    write(state, tenant, audit, txid, body, false).await
}

/// Creates (PUT, `create`) or revises a cobv.
async fn write(
    state: AppState,
    tenant: Tenant,
    audit: Audit,
    txid: String,
    body: CobVBody,
    create: bool,
) -> PixResult<Response> {
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-cob:{}", crate::audit_trail::client_id(&txid)));
    let _guard = state.pix_runtime.lock(&[cob_lock(&state, tenant_id, &txid)]).await;
    let st = state.clone();
    let (status, view) = pix_query(&state, move |q| write_one(&st, q, tenant_id, &txid, &body, create, None)).await?;
    // PUT answers 201 whether it created or replaced an active charge (as PUT /cob does).
    Ok(reply(if create { StatusCode::CREATED } else { status }, &view))
}

/// [`write`] under the charge's lock, in storage: (201 made or 200 revised, the charge). A charge
/// made by a batch (`lote`) is marked with it. Blocking.
pub(super) fn write_one(
    st: &AppState,
    q: &dyn store::Queries,
    tenant_id: u128,
    txid: &str,
    body: &CobVBody,
    create: bool,
    lote: Option<u64>,
) -> PixResult<(StatusCode, Value)> {
    let txid = txid.to_owned();
    let requested = removal_requested(body.status.as_deref(), K, "cobv.status")?;
    let alters_content = body.calendario.is_some()
        || body.devedor.is_some()
        || body.valor.is_some()
        || body.chave.is_some()
        || body.solicitacao_pagador.is_some()
        || body.info_adicionais.is_some();
    let alters = alters_content || body.loc.is_some();
    // The spec's rule (`Revisao`): a change of `loc` alone is no revision; nor is a change of
    // nothing. A PUT writes the whole charge: always one.
    let revises = create || requested.is_some() || alters_content;
    let vault = st.vault_or_503()?;
    let now = store::now_nanos();
    let wanted = pix_loc::loc_ref_of(body.loc.as_ref(), "cobv", K, "cobv.loc.id")?;
    let existing = read_cob(q, tenant_id, &txid)?;
    let (mut revisions, version, created_at, status, linked, paid_by, lote) = match &existing {
        // An immediate charge's txid: a `PUT` may not take it; for a `PATCH` (as for `GET`) no
        // charge with a due date has it.
        Some((_, s)) if s.cobv.is_none() && !create => return Err(not_found()),
        Some((_, s)) if s.cobv.is_none() => {
            return Err(PixError::violation(K, "txid", "an immediate charge (cob) has this txid"))
        }
        // A batch writes only the charges it made: never over one made on its own or by another.
        Some((_, s)) if lote.is_some() && s.lote_id != lote => {
            return Err(PixError::violation(K, "txid", "a charge with this txid exists and this batch did not make it"))
        }
        Some((doc, s)) => {
            let status = CobStatus::parse(&s.status).ok_or_else(|| corrupt("a charge's status"))?;
            let next = if create {
                if status != CobStatus::Ativa {
                    return Err(PixError::violation(K, "txid", "the charge exists and is not ATIVA"));
                }
                status
            } else {
                status.revise(requested, alters).map_err(|e| PixError::violation(K, "cobv.status", e.to_string()))?
            };
            let r = open_revisions(st, q, tenant_id, s)?;
            if r.len() >= REVISIONS_MAX && (create || alters_content) {
                return Err(PixError::violation(K, "txid", "the charge has 100 revisions, the most kept"));
            }
            (r, doc.version, s.created_at, next, pix_loc::Linked::of(s), s.paid_by.clone(), s.lote_id)
        }
        None if !create => return Err(not_found()),
        None => {
            // A txid a batch holds with no charge yet (its request in process, or refused) is
            // that batch's to make (the spec's rule for `PUT /cobv`).
            if let Some(batch) = super::lote::batch_holding(q, tenant_id, &txid)? {
                if lote.is_none_or(|l| l.to_string() != batch) {
                    return Err(PixError::violation(
                        K,
                        "txid",
                        format!("batch {batch} holds this txid (its request is in process or was refused): send the batch again"),
                    ));
                }
            }
            (vec![], 0, now, CobStatus::Ativa, None, None, lote)
        }
    };
    // A PUT gives the whole charge (`CobVSolicitada`): nothing of an earlier revision is kept.
    let base = if create { None } else { revisions.last().cloned() };
    // The key is resolved when given (or for a new charge); a revision that names none keeps the
    // charge's account, so a charge whose key was deleted can still be revised or removed.
    let (account, chave_index) = match (&body.chave, &existing) {
        (None, Some((_, s))) => (s.account_id.clone(), s.chave_index.clone()),
        _ => {
            let chave = body.chave.clone().unwrap_or_default();
            let key = pix::PixKey::infer(&chave).map_err(|e| PixError::violation(K, "cobv.chave", e.to_string()))?;
            match find_key(&vault, q, &key)? {
                Some((doc, stored)) if doc.tenant_id == tenant_id => {
                    (stored.account_id, Some(key_lookup(&vault, &key)))
                }
                _ => return Err(PixError::violation(K, "cobv.chave", "is not a key of an account of this receiver")),
            }
        }
    };
    let content = if alters || create {
        let recebedor = recebedor_of(st, q, tenant_id, &account)?;
        let content = content_of_v(body, base.as_ref(), recebedor, now)?;
        // The spec's rule: a due date before the charge's creation is refused (it would be born
        // overdue, and past its validity unpayable).
        // Judged when a date is given (a charge made before this rule keeps its own).
        let given = create || body.calendario.as_ref().is_some_and(|c| c.data_de_vencimento.is_some());
        let due = content.cobv.as_ref().and_then(|v| charge::parse_date(&v.terms.data_de_vencimento));
        if given && due.is_some_and(|due| due < charge::brasilia_date(created_at)) {
            return Err(PixError::violation(
                K,
                "cobv.calendario.dataDeVencimento",
                "is before the charge's creation date",
            ));
        }
        content
    } else {
        CobContent { at: now, ..base.clone().ok_or_else(|| corrupt("a charge without revisions"))? }
    };
    let place = pix_loc::Place { tenant: tenant_id, tipo: "cobv", txid: &txid, kind: K, prop: "cobv.loc.id" };
    let fresh = existing.is_none().then(|| st.location_prefix());
    let linked = place.link(q, wanted, linked, fresh.as_deref(), now)?;
    if revises {
        revisions.push(content.clone());
    }
    let terms = content.cobv.as_ref().map(|v| v.terms.clone());
    let stored = StoredCob {
        txid: txid.clone(),
        account_id: account,
        status: status.as_str().into(),
        loc_id: linked.as_ref().map(|l| l.id),
        location: linked.as_ref().map(|l| l.location.clone()),
        loc_created_at: linked.as_ref().map(|l| l.created_at),
        created_at,
        expiracao: 0,
        original: content.original,
        amount_editable: false,
        devedor_index: content
            .devedor
            .as_ref()
            .map(|(_, d, _)| crate::auth::hex(&vault.index().of(b"document", d.as_bytes()))),
        revisions_sealed: seal_revisions(st, q, tenant_id, &txid, &revisions)?,
        revisions: revisions.len(),
        paid_by,
        chave_index,
        cobv: terms,
        lote_id: lote,
    };
    if !save_charge(q, tenant_id, &stored, version)? {
        return Err(PixError::violation(
            K,
            "txid",
            "the charge or its location changed meanwhile (it may have been paid); retry",
        ));
    }
    let status = if version == 0 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, cobv_view(&stored, &content, revisions.len() - 1, None)))
}

pub async fn cobv_get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(txid): Path<String>,
    RawQuery(raw): RawQuery,
) -> PixResult<Response> {
    tenant.require("cobv.read")?;
    state.ispb()?;
    if !pix::ids::valid_txid(&txid) {
        return Err(not_found());
    }
    let params = params_of(raw, "CobVConsultaInvalida")?;
    let revisao = params.get("revisao").cloned();
    let tenant_id = tenant.id;
    let st = state.clone();
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let (_, stored) = read_cob(q, tenant_id, &txid)?.filter(|(_, s)| s.cobv.is_some()).ok_or_else(not_found)?;
        let revisions = open_revisions(&st, q, tenant_id, &stored)?;
        let n = revision(revisao.as_ref(), revisions.len(), "CobVConsultaInvalida")?;
        Ok(cobv_view(&stored, &revisions[n], n, concluding_pix(q, tenant_id, &stored)?))
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn cobv_list(State(state): State<AppState>, tenant: Tenant, RawQuery(raw): RawQuery) -> PixResult<Response> {
    list_charges(state, tenant, raw, true).await
}

// ---------------------------------------------------------------------------------------------
// What a cobv's location serves

fn payload_problem(status: StatusCode, detail: impl Into<String>) -> PixError {
    PixError::new(status, "CobPayloadNaoEncontrado", detail)
}

/// `GET /qr/v2/cobv/{token}?DPP&codMun`: the charge's payload with its value on the intended day of
/// payment (`DPP`, today in Brasília by default), signed. `codMun` is checked for its form; holidays
/// are not modelled (see `pix::charge`), so it does not move dates.
pub async fn payload(
    State(state): State<AppState>,
    Path(token): Path<String>,
    RawQuery(raw): RawQuery,
) -> PixResult<Response> {
    const KP: &str = "CobPayloadOperacaoInvalida";
    if !pix_loc::is_token(&token) {
        return Err(payload_problem(StatusCode::NOT_FOUND, "no charge at this location"));
    }
    let p = params_of(raw, KP)?;
    if let Some(m) = p.get("codMun") {
        if m.len() != 7 || !m.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PixError::violation(KP, "codMun", "must be an IBGE municipality code: 7 digits"));
        }
    }
    let now = store::now_nanos();
    let today = charge::brasilia_date(now);
    let day = match p.get("DPP") {
        None => None,
        Some(d) => {
            let day =
                charge::parse_date(d).ok_or_else(|| PixError::violation(KP, "DPP", "must be a date, YYYY-MM-DD"))?;
            if day < today {
                return Err(PixError::violation(KP, "DPP", "must not be before today"));
            }
            Some(day)
        }
    };
    let location = format!("{}cobv/{token}", state.location_prefix());
    let st = state.clone();
    let jws = pix_query(&state, move |q| -> PixResult<String> {
        let doc = q
            .document_by_lookup(COB_KIND, &location)?
            .ok_or_else(|| payload_problem(StatusCode::NOT_FOUND, "no charge at this location"))?;
        let stored: StoredCob = serde_json::from_str(&doc.body).map_err(corrupt)?;
        let Some(terms) = &stored.cobv else {
            return Err(payload_problem(StatusCode::NOT_FOUND, "no charge with a due date at this location"));
        };
        if stored.status != CobStatus::Ativa.as_str() {
            return Err(payload_problem(StatusCode::GONE, "the charge at this location can no longer be paid"));
        }
        let calc = match terms.amount_on(day.unwrap_or(today)) {
            Ok(c) => c,
            Err(e) if day.is_none() => {
                return Err(payload_problem(StatusCode::GONE, format!("the charge can no longer be paid: {e}")))
            }
            Err(e) => return Err(PixError::violation(KP, "DPP", e.rule.to_string())),
        };
        let revisions = open_revisions(&st, q, doc.tenant_id, &stored)?;
        let n = revisions.len().checked_sub(1).ok_or_else(|| corrupt("a charge without revisions"))?;
        let content = &revisions[n];
        let v = content.cobv.as_ref().ok_or_else(|| corrupt("a cobv revision without terms"))?;
        let mut valor =
            json!({"original": pix::amount::format(calc.original), "final": pix::amount::format(calc.valor_final)});
        for (name, part) in
            [("abatimento", calc.abatimento), ("multa", calc.multa), ("juros", calc.juros), ("desconto", calc.desconto)]
        {
            if part > 0 {
                valor[name] = json!(pix::amount::format(part));
            }
        }
        let mut body = json!({
            "calendario": {
                "criacao": rfc3339(stored.created_at),
                "apresentacao": rfc3339(now),
                "dataDeVencimento": v.terms.data_de_vencimento,
                "validadeAposVencimento": v.terms.validade_apos_vencimento,
            },
            "devedor": devedor_json(content),
            "recebedor": v.recebedor,
            "txid": stored.txid,
            "revisao": n,
            "status": stored.status,
            "valor": valor,
            "chave": content.chave,
        });
        with_receiver_address(&mut body, &v.recebedor);
        if let Some(s) = &content.solicitacao_pagador {
            body["solicitacaoPagador"] = json!(s);
        }
        if !content.info_adicionais.is_empty() {
            body["infoAdicionais"] = json!(content.info_adicionais);
        }
        pix_loc::sign_payload(&st, q, &body)
    })
    .await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/jose")], jws).into_response())
}
