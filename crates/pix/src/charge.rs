//! Pix charges as the API Pix defines them (`shared/spec/pix-api/openapi.yaml`, v2.9.0): the status
//! of a charge's record and which revisions may change it (`CobrancaStatus`, `CobRevisada`,
//! `CobVRevisada`, the `CobOperacaoInvalida`/`CobVOperacaoInvalida` violations), when an immediate
//! charge (`cob`) expires (`CobExpiracao`), and what a charge with a due date (`cobv`) costs on a
//! payment date once its `multa`, `juros`, `abatimento` and `desconto` apply (`CobVValor`,
//! `CobDataDeVencimento`, `CobVPayloadValor`).
//!
//! The invariant this module keeps: money is integer centavos and percentages integer hundredths of
//! a percent (`2.00` → 200), both parsed exactly from `\d{1,10}\.\d{2}`; each computed component is
//! rounded once, half-up, to the centavo; and the components add up exactly to the final value,
//! `final = original − abatimento + multa + juros − desconto`, which is never zero and always fits
//! `\d{1,10}\.\d{2}`. A payload shows each component separately, so they must add up.
//!
//! # Calendar
//!
//! Dates are UTC civil dates (`ledger::time`). Business days are Monday to Friday except Brazil's
//! **national bank holidays** (ANBIMA's national calendar: New Year, Carnival's Monday and Tuesday,
//! Good Friday, Tiradentes, Labour Day, Corpus Christi, 7 September, 12 October, 2 November, 15
//! November, 20 November from 2024, Christmas; the movable ones from Easter). **State and municipal
//! holidays are not modelled**: the spec moves dates past "um fim de semana ou um feriado para o
//! usuário pagador", which needs the payer's municipality (`codMun`) and a local calendar this crate
//! does not have; on a local holiday these figures treat the day as a business day.
//!
//! The spec (`validadeAposVencimento`): "Sempre que a data de vencimento cair em um fim de semana
//! ou em um feriado [...] ela deve ser automaticamente prorrogada para o primeiro dia útil
//! subsequente. Todos os campos que façam referência a esta data (`validadeAposVencimento`;
//! `desconto`; `juros` e `multa`) devem assumir essa prorrogação." So every rule below uses the
//! **adjusted due date** `V` (the due date, moved to the next business day when it is not one). The
//! last payable day is `V + validadeAposVencimento` calendar days, itself moved to the next business
//! day — the only reading that matches all of the spec's Examples A–G (A: due Tue 2020-10-20,
//! validity 4, the 4th day is Sat 24, payable until Mon 26; E: due Fri 2020-12-25, Christmas, so V is
//! Mon 28, and 28 + 4 is New Year's Friday, payable until Mon 2021-01-04). The spec contradicts
//! itself once: its `CobPayloadOperacaoInvalida` example (due 2020-12-25, validity 10, invalid
//! from 2021-01-05) counts from the due date as written; Examples B–E, which spell each day out,
//! count from `V`, and so do we (payable until Thu 2021-01-07 there).
//!
//! # Formulas
//!
//! `Vo` original, `Va` abatimento, `B = Vo − Va` the amount the other rules work on, `P` a
//! `valorPerc` in hundredths of a percent, `D` the day of payment, `V` the adjusted due date.
//! "Days" are calendar days, or for the business-day modalities the business days in the half-open
//! range named.
//!
//! - **abatimento** always applies: 1 `Va = valor`; 2 `Va = Vo × P / 10000`.
//! - **multa**, only when `D > V`, once ("sempre um valor flat", maintainers in bacen/pix-api#297):
//!   1 `valor`; 2 `B × P / 10000`. It does not depend on the juros modality: paying on the Saturday
//!   after a Friday due date is late, and the fine applies.
//! - **juros**, only when `D > V`, simple interest over the late days `n`: calendar `D − V`, business
//!   days in `(V, D]`. Value modalities (1, 5): `valor × n`. Percentage modalities: `B × P × n /
//!   (10000 × base)` with base 1 per day (2, 6), 30 per month in calendar days (3), 365 per year in
//!   calendar days (4), 21 per month in business days (7), 252 per year in business days (8). The
//!   spec names the periods only; the interest is on `Vo − Va` and the business-day bases 21 and
//!   252 follow the Manual de Padrões para Iniciação do Pix as its maintainers quote it
//!   (bacen/pix-api#607: `Vj = (Vo − Va) × ((Ij / 100) / n) × Dα`; #205: "n: 1, 21 ou 252"). 30
//!   and 365 for calendar days are the month and year in calendar days (our choice; the Manual is
//!   not in `shared/spec`). Counting from `V`, not from the unadjusted due date, is the spec's
//!   "devem assumir essa prorrogação" read literally (also bacen/pix-api#167: interest starts "a
//!   partir do próximo dia útil após a data de vencimento ajustada"). The rate is never rounded
//!   on its own (#607 asks about exactly that); only the component is.
//! - **desconto**, only when `D ≤ V`. 1, 2: each `descontoDataFixa` element applies while `D` is on
//!   or before its date, the date moved to a business day like the due date (the Manual, quoted in
//!   bacen/pix-api#412: "Sempre que a data limite para desconto cair em um fim de semana [...] deve
//!   ser automaticamente prorrogada"); when several apply (always so for an earlier date, and two
//!   dates can land on the same business day) the largest wins (our choice: paying earlier is never worse).
//!   1 `valor`; 2 `B × P / 10000`. 3–6, per day of anticipation `n`: calendar `V − D`, business days
//!   in `(D, V]` (paying on Saturday earns what paying on Friday does); 3, 4 `valor × n`; 5, 6
//!   `B × P × n / 10000`. A discount that would leave nothing to pay is an error, not a zero-value
//!   charge (bacen/pix-api#408: "é uma situação de erro").
//!
//! **Rounding**: each of `Va`, multa, juros and desconto is computed exactly as a fraction of
//! integers and rounded half-up to the centavo (`x.5` centavos goes up); nothing else is rounded.

use std::fmt;

use ledger::time::{civil_date, nanos_of_date};
use ledger::Timestamp;

use crate::amount::{self, MAX_CENTAVOS};

const SEC: u64 = 1_000_000_000;
const NANOS_PER_DAY: u64 = 86_400 * SEC;

/// A UTC civil date (year, month, day), as `ledger::time` writes it.
pub type Date = (i64, i64, i64);

/// The civil date in Brasília time (UTC−3, no daylight saving since 2019) at `now`: the day a
/// payer pays on, for due dates.
pub fn brasilia_date(now: Timestamp) -> Date {
    civil_date(now.saturating_sub(crate::limits::OFFSET_HOURS * 3_600 * SEC))
}

/// A `YYYY-MM-DD` text as a date, if it has that shape and is a calendar date.
pub fn parse_date(text: &str) -> Option<Date> {
    let b = text.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    let date = (text[..4].parse().ok()?, text[5..7].parse().ok()?, text[8..].parse().ok()?);
    day_of(date, "").ok().map(|_| date)
}

/// Dates before 1970 clamp to the epoch in `ledger::time`; 2500 keeps every date far inside the
/// nanosecond `Timestamp`, which ends in 2554.
pub const YEAR_MIN: i64 = 1970;
pub const YEAR_MAX: i64 = 2500;

/// `calendario.expiracao` when absent (`CobExpiracao.default`).
pub const EXPIRACAO_DEFAULT_S: i64 = 86_400;
/// `expiracao` is an int32, and "igual ou menor que zero" is a violation.
pub const EXPIRACAO_MIN_S: i64 = 1;
pub const EXPIRACAO_MAX_S: i64 = i32::MAX as i64;

/// `calendario.validadeAposVencimento` when absent (`CobDataDeVencimento.default`).
pub const VALIDADE_APOS_VENCIMENTO_DEFAULT_DAYS: i64 = 30;
/// An int32, and "menor do que zero" is a violation.
pub const VALIDADE_APOS_VENCIMENTO_MAX_DAYS: i64 = i32::MAX as i64;

/// `descontoDataFixa`: `minItems: 1`, `maxItems: 3`.
pub const DESCONTO_DATA_FIXA_LEN_MIN: usize = 1;
pub const DESCONTO_DATA_FIXA_LEN_MAX: usize = 3;

/// 100.00% in hundredths of a percent.
pub const PERCENT_100: u64 = 10_000;

/// The status of a charge's record, for cob and cobv alike (`CobrancaStatus`). It says nothing
/// about whether the charge is expired or overdue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CobStatus {
    /// Created, neither paid nor removed.
    Ativa,
    /// Paid; it takes no other payment.
    Concluida,
    /// Removed at the receiving user's request.
    RemovidaPeloUsuarioRecebedor,
    /// Removed by the receiving PSP.
    RemovidaPeloPsp,
}

impl CobStatus {
    pub const ALL: [CobStatus; 4] =
        [CobStatus::Ativa, CobStatus::Concluida, CobStatus::RemovidaPeloUsuarioRecebedor, CobStatus::RemovidaPeloPsp];

    /// The spec's spelling, exactly (upper case).
    pub fn parse(text: &str) -> Option<CobStatus> {
        CobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CobStatus::Ativa => "ATIVA",
            CobStatus::Concluida => "CONCLUIDA",
            CobStatus::RemovidaPeloUsuarioRecebedor => "REMOVIDA_PELO_USUARIO_RECEBEDOR",
            CobStatus::RemovidaPeloPsp => "REMOVIDA_PELO_PSP",
        }
    }

    /// The status after a revision (`PATCH`, or `PUT` on an existing charge) that asks for
    /// `requested` (its `status`, if any) and, when `alters_other_fields`, changes anything else.
    ///
    /// Rules (`CobRevisada`/`CobVRevisada` and the `PUT|PATCH` violations): a revision may set
    /// only `REMOVIDA_PELO_USUARIO_RECEBEDOR`; a charge that is not `ATIVA` cannot be altered (so a
    /// `CONCLUIDA` charge stays so, and nothing leaves `REMOVIDA_*`); removal cannot come with other
    /// changes. A revision that asks for nothing changes nothing and is allowed in any status.
    pub fn revise(self, requested: Option<CobStatus>, alters_other_fields: bool) -> Result<CobStatus, RevisionError> {
        if let Some(status) = requested {
            if status != CobStatus::RemovidaPeloUsuarioRecebedor {
                return Err(RevisionError::StatusNotRevisable(status));
            }
        }
        if self != CobStatus::Ativa {
            return if requested.is_some() || alters_other_fields {
                Err(RevisionError::NotActive(self))
            } else {
                Ok(self)
            };
        }
        match requested {
            Some(_) if alters_other_fields => Err(RevisionError::RemovalWithOtherChanges),
            Some(status) => Ok(status),
            None => Ok(CobStatus::Ativa),
        }
    }
}

impl fmt::Display for CobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a revision was refused; each is a `CobOperacaoInvalida`/`CobVOperacaoInvalida` violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevisionError {
    /// `status` in a revision may only be `REMOVIDA_PELO_USUARIO_RECEBEDOR`.
    StatusNotRevisable(CobStatus),
    /// The charge is in this status, not `ATIVA`, and the request seeks to alter it.
    NotActive(CobStatus),
    /// Removal asked for together with other changes, which would never be used.
    RemovalWithOtherChanges,
}

impl fmt::Display for RevisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RevisionError::StatusNotRevisable(s) => {
                write!(f, "status: a revision may set only REMOVIDA_PELO_USUARIO_RECEBEDOR, not {s}")
            }
            RevisionError::NotActive(s) => {
                write!(f, "status: the charge is {s}, not ATIVA, so it can no longer be changed")
            }
            RevisionError::RemovalWithOtherChanges => f.write_str(
                "status: REMOVIDA_PELO_USUARIO_RECEBEDOR cannot come with other changes (they would never be used)",
            ),
        }
    }
}

impl std::error::Error for RevisionError {}

/// A charge input or computation refused: the field, as the spec's JSON path, and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeError {
    pub field: String,
    pub rule: Rule,
}

/// The rule a [`ChargeError`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Not in the spec's table of modalities, `1..=max`.
    Modalidade {
        max: u8,
    },
    /// An integer outside the spec's range.
    Range {
        min: i64,
        max: i64,
    },
    /// Not `\d{1,10}\.\d{2}`.
    Format,
    /// More than `\d{1,10}\.\d{2}` can write.
    TooLarge,
    /// Zero where the spec forbids it.
    Zero,
    /// At least `valor.original`.
    NotBelowOriginal,
    /// At least 100%.
    NotBelowHundredPercent,
    Required,
    Forbidden,
    Count {
        min: usize,
        max: usize,
    },
    /// Repeats an earlier element (`uniqueItems`).
    Duplicate,
    /// After `calendario.dataDeVencimento`.
    AfterDueDate,
    /// Not a calendar date in `YEAR_MIN..=YEAR_MAX`.
    Date,
    /// Paid after the last day the charge can be paid.
    PastValidity {
        last_payable: Date,
    },
    /// Would leave nothing to pay; a charge's value is never zero.
    NotBelowAmount,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Modalidade { max } => write!(f, "must be a modality in the spec's table, 1 to {max}"),
            Rule::Range { min, max } => write!(f, "must be an integer from {min} to {max}"),
            Rule::Format => f.write_str(amount::RULE),
            Rule::TooLarge => write!(
                f,
                "must be at most {} (the most \\d{{1,10}}\\.\\d{{2}} can write)",
                amount::format(MAX_CENTAVOS)
            ),
            Rule::Zero => f.write_str("must be greater than zero"),
            Rule::NotBelowOriginal => f.write_str("must be less than valor.original"),
            Rule::NotBelowHundredPercent => f.write_str("must be less than 100.00 (percent)"),
            Rule::Required => f.write_str("is required for this modalidade"),
            Rule::Forbidden => f.write_str("must be absent for this modalidade"),
            Rule::Count { min, max } => write!(f, "must have {min} to {max} elements"),
            Rule::Duplicate => f.write_str("repeats an earlier element (elements must be unique)"),
            Rule::AfterDueDate => f.write_str("must not be after calendario.dataDeVencimento"),
            Rule::Date => write!(f, "must be a calendar date (YYYY-MM-DD) from {YEAR_MIN} to {YEAR_MAX}"),
            Rule::PastValidity { last_payable: (y, m, d) } => write!(
                f,
                "the charge could be paid until {y:04}-{m:02}-{d:02} (dataDeVencimento plus validadeAposVencimento, \
                 moved past weekends and national holidays); it can no longer be paid"
            ),
            Rule::NotBelowAmount => f.write_str("would leave nothing to pay (a charge's value cannot be zero)"),
        }
    }
}

impl fmt::Display for ChargeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

impl std::error::Error for ChargeError {}

fn err(field: impl Into<String>, rule: Rule) -> ChargeError {
    ChargeError { field: field.into(), rule }
}

/// A `valorPerc` (or `original`) from its API text: centavos, or hundredths of a percent, exactly.
pub fn parse_valor_perc(field: &str, text: &str) -> Result<u64, ChargeError> {
    amount::parse(text).ok_or_else(|| err(field, Rule::Format))
}

/// When an immediate charge stops being payable: `criacao` plus `expiracao` seconds (`None` is the
/// spec's default, 86400).
pub fn cob_expires_at(criacao: Timestamp, expiracao_s: Option<i64>) -> Result<Timestamp, ChargeError> {
    let expiracao_s = expiracao_s.unwrap_or(EXPIRACAO_DEFAULT_S);
    if !(EXPIRACAO_MIN_S..=EXPIRACAO_MAX_S).contains(&expiracao_s) {
        return Err(err("calendario.expiracao", Rule::Range { min: EXPIRACAO_MIN_S, max: EXPIRACAO_MAX_S }));
    }
    Ok(criacao.saturating_add(expiracao_s as u64 * SEC))
}

/// Whether an immediate charge has not yet expired at `now`: its life is `[criacao, criacao +
/// expiracao)`, so at exactly `criacao + expiracao` it has expired. A `now` before `criacao` (another
/// node's clock) counts as alive: the charge exists. Expiry only; the status must also be `ATIVA`.
pub fn cob_payable(criacao: Timestamp, expiracao_s: Option<i64>, now: Timestamp) -> Result<bool, ChargeError> {
    Ok(now < cob_expires_at(criacao, expiracao_s)?)
}

/// `modalidade` and `valorPerc` of `multa`, `juros` or `abatimento`. `valor_perc` is centavos for
/// the value modalities and hundredths of a percent for the percentage ones (both what
/// [`parse_valor_perc`] returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModalidadeValorPerc {
    pub modalidade: u8,
    pub valor_perc: u64,
}

/// An element of `desconto.descontoDataFixa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescontoDataFixa {
    pub data: Date,
    pub valor_perc: u64,
}

/// `desconto`: modalities 1 and 2 carry `descontoDataFixa` and no `valorPerc`; 3 to 6 the reverse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desconto {
    pub modalidade: u8,
    pub valor_perc: Option<u64>,
    pub desconto_data_fixa: Vec<DescontoDataFixa>,
}

/// `CobVValor`, in centavos and hundredths of a percent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CobVValor {
    pub original: u64,
    pub multa: Option<ModalidadeValorPerc>,
    pub juros: Option<ModalidadeValorPerc>,
    pub abatimento: Option<ModalidadeValorPerc>,
    pub desconto: Option<Desconto>,
}

/// `CobDataDeVencimento`. `None` validity is the spec's default, 30 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CobVCalendario {
    pub data_de_vencimento: Date,
    pub validade_apos_vencimento: Option<i64>,
}

/// What a cobv costs on a day (`CobVPayloadValor`), all in centavos:
/// `valor_final = original − abatimento + multa + juros − desconto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CobVValorCalculado {
    pub original: u64,
    pub abatimento: u64,
    pub multa: u64,
    pub juros: u64,
    pub desconto: u64,
    pub valor_final: u64,
}

/// Checks a cobv's `valor` and `calendario` against the spec (what a `PUT /cobv` must refuse), made
/// or changed on `today`: each rule on its own, and together — a charge must be payable from today
/// on. The spec refuses an abatimento or a discount element that reaches the original value; one
/// that reaches it only with the other (an abatimento of 60% and a discount of 50%), or a per-day
/// discount that does so over the days left until the due date, would make a charge nobody can pay
/// until it is overdue, fine and interest included. Discounts only shrink as the days go by, so
/// today's amount is the one to check before the due date; after it, the first late day's (a fine
/// too large to write). Interest that grows past the largest value over a long validity is left
/// to the day it does (that day cannot pay it; the days before can).
pub fn validate_cobv(valor: &CobVValor, calendario: &CobVCalendario, today: Date) -> Result<(), ChargeError> {
    let terms = terms(valor, calendario)?;
    let today = day_of(today, "calendario.criacao")?;
    if today <= terms.due_day {
        terms.amount_on(today)?;
    }
    if terms.due_day < terms.last_day {
        terms.amount_on(terms.due_day + 1)?;
    }
    Ok(())
}

/// What a cobv costs when paid on `pagamento` (the field `DPP` in errors: the spec's "data de
/// pagamento pretendida"). Validates first, as [`validate_cobv`]; see the module docs for the
/// formulas.
pub fn cobv_amount(
    valor: &CobVValor,
    calendario: &CobVCalendario,
    pagamento: Date,
) -> Result<CobVValorCalculado, ChargeError> {
    let terms = terms(valor, calendario)?;
    let day = day_of(pagamento, "DPP")?;
    terms.amount_on(day)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Basis {
    Value,
    Percent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Days {
    Calendar,
    Business,
}

/// An amount per day: `valor × n`, or `B × P × n / (10000 × per_days)`.
#[derive(Clone, Copy, Debug)]
struct Rate {
    basis: Basis,
    days: Days,
    per_days: u64,
    valor_perc: u64,
}

impl Rate {
    fn over(&self, base: u64, days: i64) -> u128 {
        debug_assert!(days >= 0);
        let days = days as u128;
        match self.basis {
            Basis::Value => u128::from(self.valor_perc) * days,
            Basis::Percent => round_half_up(
                u128::from(base) * u128::from(self.valor_perc) * days,
                u128::from(PERCENT_100) * u128::from(self.per_days),
            ),
        }
    }
}

#[derive(Clone, Debug)]
enum Discount {
    /// (the element's date moved to a business day, as a day number; valorPerc)
    UntilDates {
        basis: Basis,
        deadlines: Vec<(i64, u64)>,
    },
    PerDayEarly(Rate),
}

/// A cobv's validated rules, dates as day numbers since 1970-01-01.
#[derive(Clone, Debug)]
struct Terms {
    original: u64,
    /// The due date moved to a business day (past a weekend or a national holiday).
    due_day: i64,
    /// The last day it can be paid; may lie far beyond `YEAR_MAX` (the validity is an int32).
    last_day: i64,
    abatimento: Option<(Basis, u64)>,
    multa: Option<(Basis, u64)>,
    juros: Option<Rate>,
    desconto: Option<Discount>,
}

fn terms(valor: &CobVValor, calendario: &CobVCalendario) -> Result<Terms, ChargeError> {
    let original = valor.original;
    if original == 0 {
        return Err(err("valor.original", Rule::Zero));
    }
    if original > MAX_CENTAVOS {
        return Err(err("valor.original", Rule::TooLarge));
    }
    let due = day_of(calendario.data_de_vencimento, "calendario.dataDeVencimento")?;
    let validade = calendario.validade_apos_vencimento.unwrap_or(VALIDADE_APOS_VENCIMENTO_DEFAULT_DAYS);
    if !(0..=VALIDADE_APOS_VENCIMENTO_MAX_DAYS).contains(&validade) {
        return Err(err(
            "calendario.validadeAposVencimento",
            Rule::Range { min: 0, max: VALIDADE_APOS_VENCIMENTO_MAX_DAYS },
        ));
    }
    let due_day = next_business_day(due);
    let last_day = next_business_day(due_day + validade);

    let multa = match &valor.multa {
        None => None,
        Some(m) => {
            let basis = match m.modalidade {
                1 => Basis::Value,
                2 => Basis::Percent,
                _ => return Err(err("valor.multa.modalidade", Rule::Modalidade { max: 2 })),
            };
            Some((basis, fits("valor.multa.valorPerc", m.valor_perc)?))
        }
    };
    let juros = match &valor.juros {
        None => None,
        Some(j) => {
            let (basis, days, per_days) = match j.modalidade {
                1 => (Basis::Value, Days::Calendar, 1),
                2 => (Basis::Percent, Days::Calendar, 1),
                3 => (Basis::Percent, Days::Calendar, 30),
                4 => (Basis::Percent, Days::Calendar, 365),
                5 => (Basis::Value, Days::Business, 1),
                6 => (Basis::Percent, Days::Business, 1),
                7 => (Basis::Percent, Days::Business, 21),
                8 => (Basis::Percent, Days::Business, 252),
                _ => return Err(err("valor.juros.modalidade", Rule::Modalidade { max: 8 })),
            };
            Some(Rate { basis, days, per_days, valor_perc: fits("valor.juros.valorPerc", j.valor_perc)? })
        }
    };
    let abatimento = match &valor.abatimento {
        None => None,
        Some(a) => {
            let basis = match a.modalidade {
                1 => Basis::Value,
                2 => Basis::Percent,
                _ => return Err(err("valor.abatimento.modalidade", Rule::Modalidade { max: 2 })),
            };
            Some((basis, below_whole("valor.abatimento.valorPerc", basis, a.valor_perc, original)?))
        }
    };
    let desconto = match &valor.desconto {
        None => None,
        Some(d) => Some(discount(d, original, calendario.data_de_vencimento)?),
    };
    Ok(Terms { original, due_day, last_day, abatimento, multa, juros, desconto })
}

fn discount(d: &Desconto, original: u64, due: Date) -> Result<Discount, ChargeError> {
    let list = "valor.desconto.descontoDataFixa";
    let (basis, days) = match d.modalidade {
        1 => (Basis::Value, None),
        2 => (Basis::Percent, None),
        3 => (Basis::Value, Some(Days::Calendar)),
        4 => (Basis::Value, Some(Days::Business)),
        5 => (Basis::Percent, Some(Days::Calendar)),
        6 => (Basis::Percent, Some(Days::Business)),
        _ => return Err(err("valor.desconto.modalidade", Rule::Modalidade { max: 6 })),
    };
    let Some(days) = days else {
        if d.valor_perc.is_some() {
            return Err(err("valor.desconto.valorPerc", Rule::Forbidden));
        }
        let len = d.desconto_data_fixa.len();
        if !(DESCONTO_DATA_FIXA_LEN_MIN..=DESCONTO_DATA_FIXA_LEN_MAX).contains(&len) {
            return Err(err(list, Rule::Count { min: DESCONTO_DATA_FIXA_LEN_MIN, max: DESCONTO_DATA_FIXA_LEN_MAX }));
        }
        let mut deadlines = Vec::with_capacity(len);
        for (i, item) in d.desconto_data_fixa.iter().enumerate() {
            let field = format!("{list}[{i}]");
            if d.desconto_data_fixa[..i].contains(item) {
                return Err(err(field, Rule::Duplicate));
            }
            let day = day_of(item.data, &format!("{field}.data"))?;
            // Compared with the due date as written, before any weekend move (the spec's wording).
            if item.data > due {
                return Err(err(format!("{field}.data"), Rule::AfterDueDate));
            }
            let valor_perc = below_whole(&format!("{field}.valorPerc"), basis, item.valor_perc, original)?;
            deadlines.push((next_business_day(day), valor_perc));
        }
        return Ok(Discount::UntilDates { basis, deadlines });
    };
    if !d.desconto_data_fixa.is_empty() {
        return Err(err(list, Rule::Forbidden));
    }
    let Some(valor_perc) = d.valor_perc else {
        return Err(err("valor.desconto.valorPerc", Rule::Required));
    };
    let valor_perc = below_whole("valor.desconto.valorPerc", basis, valor_perc, original)?;
    Ok(Discount::PerDayEarly(Rate { basis, days, per_days: 1, valor_perc }))
}

/// A `valorPerc` within `\d{1,10}\.\d{2}`.
fn fits(field: &str, valor_perc: u64) -> Result<u64, ChargeError> {
    if valor_perc > MAX_CENTAVOS {
        return Err(err(field, Rule::TooLarge));
    }
    Ok(valor_perc)
}

/// An abatimento or desconto element: less than the original value, or less than 100% ("maior ou
/// igual ao valor da cobrança original ou maior ou igual a 100%" is a violation).
fn below_whole(field: &str, basis: Basis, valor_perc: u64, original: u64) -> Result<u64, ChargeError> {
    let valor_perc = fits(field, valor_perc)?;
    match basis {
        Basis::Value if valor_perc >= original => Err(err(field, Rule::NotBelowOriginal)),
        Basis::Percent if valor_perc >= PERCENT_100 => Err(err(field, Rule::NotBelowHundredPercent)),
        _ => Ok(valor_perc),
    }
}

impl Terms {
    fn amount_on(&self, day: i64) -> Result<CobVValorCalculado, ChargeError> {
        if day > self.last_day {
            // `day` is at most YEAR_MAX's last day, so `last_day` is a date we can write.
            return Err(err("DPP", Rule::PastValidity { last_payable: date_of(self.last_day) }));
        }
        let original = self.original;
        let abatimento = match self.abatimento {
            None => 0,
            Some((Basis::Value, valor)) => valor,
            // Validated below 100%, so at most `original`.
            Some((Basis::Percent, perc)) => percent_of(original, perc) as u64,
        };
        // Below 100%, rounding can still reach the whole of a tiny original (1 centavo × 99.99%).
        if abatimento >= original {
            return Err(err("valor.abatimento.valorPerc", Rule::NotBelowAmount));
        }
        let base = original - abatimento;
        let (mut multa, mut juros, mut desconto) = (0u128, 0u128, 0u128);
        if day > self.due_day {
            multa = match self.multa {
                None => 0,
                Some((Basis::Value, valor)) => u128::from(valor),
                Some((Basis::Percent, perc)) => percent_of(base, perc),
            };
            if let Some(rate) = &self.juros {
                let late = match rate.days {
                    Days::Calendar => day - self.due_day,
                    Days::Business => business_days_between(self.due_day, day),
                };
                juros = rate.over(base, late);
            }
        } else {
            desconto = match &self.desconto {
                None => 0,
                Some(Discount::UntilDates { basis, deadlines }) => deadlines
                    .iter()
                    .filter(|(deadline, _)| day <= *deadline)
                    .map(|&(_, valor_perc)| match basis {
                        Basis::Value => u128::from(valor_perc),
                        Basis::Percent => percent_of(base, valor_perc),
                    })
                    .max()
                    .unwrap_or(0),
                Some(Discount::PerDayEarly(rate)) => {
                    let early = match rate.days {
                        Days::Calendar => self.due_day - day,
                        Days::Business => business_days_between(day, self.due_day),
                    };
                    rate.over(base, early)
                }
            };
            if desconto >= u128::from(base) {
                return Err(err("valor.desconto", Rule::NotBelowAmount));
            }
        }
        let valor_final = u128::from(base) + multa + juros - desconto;
        if valor_final > u128::from(MAX_CENTAVOS) {
            return Err(err("valor.final", Rule::TooLarge));
        }
        // Each component is at most the final value (or, desconto, below `base`), so all fit.
        let calculated = CobVValorCalculado {
            original,
            abatimento,
            multa: multa as u64,
            juros: juros as u64,
            desconto: desconto as u64,
            valor_final: valor_final as u64,
        };
        debug_assert_eq!(
            u128::from(calculated.original) - u128::from(calculated.abatimento)
                + u128::from(calculated.multa)
                + u128::from(calculated.juros)
                - u128::from(calculated.desconto),
            u128::from(calculated.valor_final)
        );
        debug_assert!(calculated.valor_final > 0);
        debug_assert!(day > self.due_day || calculated.multa + calculated.juros == 0);
        debug_assert!(day <= self.due_day || calculated.desconto == 0);
        Ok(calculated)
    }
}

/// `amount × perc / 10000`, rounded half-up. In u128: a multa percentage has no upper bound.
fn percent_of(amount: u64, perc: u64) -> u128 {
    round_half_up(u128::from(amount) * u128::from(perc), u128::from(PERCENT_100))
}

/// `num / den` rounded to the nearest integer, halves up.
fn round_half_up(num: u128, den: u128) -> u128 {
    debug_assert!(den > 0);
    let (q, r) = (num / den, num % den);
    if r * 2 >= den {
        q + 1
    } else {
        q
    }
}

/// The day number (days since 1970-01-01) of a date, or the named error if it is not a calendar
/// date in `YEAR_MIN..=YEAR_MAX`.
fn day_of(date: Date, field: &str) -> Result<i64, ChargeError> {
    let (y, m, d) = date;
    if !(YEAR_MIN..=YEAR_MAX).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(err(field, Rule::Date));
    }
    let nanos = nanos_of_date(y, m, d);
    // 2024-02-30 becomes 2024-03-01 on the way in; only a real date survives the round trip.
    if civil_date(nanos) != date {
        return Err(err(field, Rule::Date));
    }
    Ok((nanos / NANOS_PER_DAY) as i64)
}

fn date_of(day: i64) -> Date {
    debug_assert!((0..=(u64::MAX / NANOS_PER_DAY) as i64).contains(&day));
    civil_date(day as u64 * NANOS_PER_DAY)
}

/// 0 Monday … 4 Friday, 5 Saturday, 6 Sunday (1970-01-01 was a Thursday).
fn weekday(day: i64) -> i64 {
    (day + 3).rem_euclid(7)
}

/// The civil date of `day` (days from 1970-01-01), for any day: a last payable day may lie far
/// beyond what a nanosecond timestamp holds (a validity of `i32::MAX` days). Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(day: i64) -> (i64, i64, i64) {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days from 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Easter Sunday of `year` (Gregorian; the anonymous algorithm of Meeus), as a day number.
fn easter(year: i64) -> i64 {
    let a = year.rem_euclid(19);
    let (b, c) = (year.div_euclid(100), year.rem_euclid(100));
    let (d, e) = (b / 4, b % 4);
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let (i, k) = (c / 4, c % 4);
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    days_from_civil(year, month, day)
}

/// The national holidays of `year` on which Brazil's banks do not open, as day numbers, sorted
/// and distinct: New Year, Carnival's Monday and Tuesday, Good Friday, Tiradentes, Labour Day,
/// Corpus Christi, Independence, Nossa Senhora Aparecida, All Souls, the Republic, Black
/// Consciousness (a national holiday from 2024, Lei 14.759/2023) and Christmas — ANBIMA's national
/// calendar, which the financial market counts business days by. State and municipal holidays
/// are not here (see the module's docs).
fn national_holidays(year: i64) -> Vec<i64> {
    let e = easter(year);
    let mut days = vec![e - 48, e - 47, e - 2, e + 60];
    let fixed: &[(i64, i64)] = &[(1, 1), (4, 21), (5, 1), (9, 7), (10, 12), (11, 2), (11, 15), (12, 25)];
    days.extend(fixed.iter().map(|&(m, d)| days_from_civil(year, m, d)));
    if year >= 2024 {
        days.push(days_from_civil(year, 11, 20));
    }
    days.sort_unstable();
    days.dedup(); // Good Friday falls on Tiradentes some years (2000, 2079).
    days
}

fn is_business_day(day: i64) -> bool {
    weekday(day) < 5 && national_holidays(civil_from_days(day).0).binary_search(&day).is_err()
}

/// The day itself, or the first business day after it: past a weekend and the national holidays.
fn next_business_day(mut day: i64) -> i64 {
    while !is_business_day(day) {
        day += 1;
    }
    day
}

/// Weekdays from Monday 1969-12-29 (day −3) up to, not including, `day`.
fn weekdays_before(day: i64) -> i64 {
    let from_monday = day + 3;
    from_monday.div_euclid(7) * 5 + from_monday.rem_euclid(7).min(5)
}

/// Business days in `(from, to]`; zero when `to <= from`: the weekdays in closed form, less the
/// national holidays among them, a year at a time.
fn business_days_between(from: i64, to: i64) -> i64 {
    if to <= from {
        return 0;
    }
    let weekdays = weekdays_before(to + 1) - weekdays_before(from + 1);
    let holidays: i64 = (civil_from_days(from + 1).0..=civil_from_days(to).0)
        .map(|year| {
            national_holidays(year).into_iter().filter(|&h| from < h && h <= to && weekday(h) < 5).count() as i64
        })
        .sum();
    weekdays - holidays
}

#[cfg(test)]
mod tests {
    use super::*;

    // January 2024: Monday 1, 8, 15, 22, 29; Friday 5, 12, 19, 26; Saturday 6, 13, 20, 27.
    const DUE: Date = (2024, 1, 10); // a Wednesday
    const R1000: u64 = 100_000; // R$1,000.00
    /// The day a charge is made, in `validate_cobv`'s tests: nine days before `DUE`.
    const TODAY: Date = (2024, 1, 1);

    fn mvp(modalidade: u8, valor_perc: u64) -> Option<ModalidadeValorPerc> {
        Some(ModalidadeValorPerc { modalidade, valor_perc })
    }

    fn plain(original: u64) -> CobVValor {
        CobVValor { original, multa: None, juros: None, abatimento: None, desconto: None }
    }

    fn fixed_dates(modalidade: u8, items: &[(Date, u64)]) -> Option<Desconto> {
        Some(Desconto {
            modalidade,
            valor_perc: None,
            desconto_data_fixa: items.iter().map(|&(data, valor_perc)| DescontoDataFixa { data, valor_perc }).collect(),
        })
    }

    fn per_day(modalidade: u8, valor_perc: u64) -> Option<Desconto> {
        Some(Desconto { modalidade, valor_perc: Some(valor_perc), desconto_data_fixa: vec![] })
    }

    fn cal(due: Date, validade: Option<i64>) -> CobVCalendario {
        CobVCalendario { data_de_vencimento: due, validade_apos_vencimento: validade }
    }

    /// (abatimento, multa, juros, desconto, final)
    type Parts = (u64, u64, u64, u64, u64);

    fn parts(v: CobVValorCalculado) -> Parts {
        (v.abatimento, v.multa, v.juros, v.desconto, v.valor_final)
    }

    #[test]
    fn dates_parse_only_as_calendar_days_and_brasilia_lags_utc_by_three_hours() {
        assert_eq!(parse_date("2024-02-29"), Some((2024, 2, 29)));
        for bad in ["2023-02-29", "2024-13-01", "2024-1-01", "20240101", "2024-01-01T00", "２０２４-01-01"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        let at = |h: u64| nanos_of_date(2024, 3, 10) + h * 3_600 * SEC;
        assert_eq!(brasilia_date(at(2)), (2024, 3, 9));
        assert_eq!(brasilia_date(at(3)), (2024, 3, 10));
    }

    #[test]
    fn status_text_round_trips_and_only_the_spec_spelling_parses() {
        for s in CobStatus::ALL {
            assert_eq!(CobStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(CobStatus::parse("REMOVIDA_PELO_PSP"), Some(CobStatus::RemovidaPeloPsp));
        // The spec's prose says REMOVIDO_*; its enum, which is what goes on the wire, says REMOVIDA_*.
        for bad in ["", "ativa", "Ativa", "REMOVIDO_PELO_PSP", "VENCIDA", " ATIVA"] {
            assert_eq!(CobStatus::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn revisions_follow_the_spec() {
        use CobStatus::*;
        use RevisionError::*;
        let removal = Some(RemovidaPeloUsuarioRecebedor);
        type Case = (CobStatus, Option<CobStatus>, bool, Result<CobStatus, RevisionError>);
        let cases: &[Case] = &[
            (Ativa, removal, false, Ok(RemovidaPeloUsuarioRecebedor)),
            (Ativa, None, true, Ok(Ativa)),
            (Ativa, None, false, Ok(Ativa)),
            (Ativa, removal, true, Err(RemovalWithOtherChanges)),
            (Ativa, Some(Ativa), false, Err(StatusNotRevisable(Ativa))),
            (Ativa, Some(Concluida), false, Err(StatusNotRevisable(Concluida))),
            (Ativa, Some(RemovidaPeloPsp), false, Err(StatusNotRevisable(RemovidaPeloPsp))),
            (Concluida, removal, false, Err(NotActive(Concluida))),
            (Concluida, None, true, Err(NotActive(Concluida))),
            (Concluida, None, false, Ok(Concluida)),
            (Concluida, Some(Ativa), false, Err(StatusNotRevisable(Ativa))),
            (RemovidaPeloUsuarioRecebedor, removal, false, Err(NotActive(RemovidaPeloUsuarioRecebedor))),
            (RemovidaPeloUsuarioRecebedor, None, true, Err(NotActive(RemovidaPeloUsuarioRecebedor))),
            (RemovidaPeloUsuarioRecebedor, Some(Ativa), false, Err(StatusNotRevisable(Ativa))),
            (RemovidaPeloPsp, removal, false, Err(NotActive(RemovidaPeloPsp))),
            (RemovidaPeloPsp, None, true, Err(NotActive(RemovidaPeloPsp))),
            (RemovidaPeloPsp, None, false, Ok(RemovidaPeloPsp)),
        ];
        for &(from, requested, others, want) in cases {
            assert_eq!(from.revise(requested, others), want, "{from} {requested:?} {others}");
        }
        assert_eq!(
            NotActive(Concluida).to_string(),
            "status: the charge is CONCLUIDA, not ATIVA, so it can no longer be changed"
        );
    }

    #[test]
    fn cob_expiry() {
        let t = 1_709_214_307 * SEC;
        let cases: &[(Option<i64>, Timestamp, Result<bool, ChargeError>)] = &[
            (Some(3600), t, Ok(true)),
            (Some(3600), t - 1, Ok(true)), // a clock a little behind: the charge exists
            (Some(3600), t + 3600 * SEC - 1, Ok(true)),
            (Some(3600), t + 3600 * SEC, Ok(false)),
            (None, t + 86_400 * SEC - 1, Ok(true)),
            (None, t + 86_400 * SEC, Ok(false)),
            (Some(1), t + SEC, Ok(false)),
            (Some(i32::MAX as i64), t + 2_147_483_646 * SEC, Ok(true)),
        ];
        for (expiracao, now, want) in cases {
            assert_eq!(&cob_payable(t, *expiracao, *now), want, "{expiracao:?} {now}");
        }
        assert_eq!(cob_expires_at(t, Some(3600)), Ok(t + 3600 * SEC));
        let range = Rule::Range { min: 1, max: i32::MAX as i64 };
        for bad in [0, -1, i32::MAX as i64 + 1] {
            assert_eq!(cob_payable(t, Some(bad), t), Err(err("calendario.expiracao", range)), "{bad}");
        }
        assert_eq!(
            cob_expires_at(t, Some(0)).unwrap_err().to_string(),
            "calendario.expiracao: must be an integer from 1 to 2147483647"
        );
    }

    #[test]
    fn valor_perc_parses_exactly() {
        assert_eq!(parse_valor_perc("valor.juros.valorPerc", "2.00"), Ok(200));
        assert_eq!(parse_valor_perc("valor.juros.valorPerc", "0.50"), Ok(50));
        assert_eq!(parse_valor_perc("valor.multa.valorPerc", "15.00"), Ok(1_500));
        for bad in ["2", "2.5", "0,50", "-1.00", "1e2"] {
            assert_eq!(parse_valor_perc("valor.juros.valorPerc", bad), Err(err("valor.juros.valorPerc", Rule::Format)));
        }
    }

    #[test]
    fn calendar_helpers() {
        let wed = day_of(DUE, "x").unwrap();
        assert_eq!(weekday(wed), 2);
        assert_eq!(weekday(0), 3); // 1970-01-01, a Thursday
        let sat = day_of((2024, 1, 13), "x").unwrap();
        assert_eq!(date_of(next_business_day(sat)), (2024, 1, 15));
        assert_eq!(date_of(next_business_day(sat + 1)), (2024, 1, 15));
        assert_eq!(next_business_day(wed), wed);
        // (Wed 10, Mon 15] = Thu 11, Fri 12, Mon 15.
        assert_eq!(business_days_between(wed, wed + 5), 3);
        assert_eq!(business_days_between(wed, wed), 0);
        assert_eq!(business_days_between(wed + 5, wed), 0);
        // Against counting day by day, across many weeks and every starting weekday, and across
        // years of holidays.
        let holiday_free = (0..30).flat_map(|from| (0..40).map(move |len| (from, len)));
        let across_years = (19_700..19_800).step_by(7).flat_map(|from| [(from, 400), (from, 800)]);
        for (from, len) in holiday_free.chain(across_years) {
            let slow = (from + 1..=from + len).filter(|&d| is_business_day(d)).count() as i64;
            assert_eq!(business_days_between(from, from + len), slow, "{from} {len}");
        }
        // The unbounded calendar against the ledger's, and its inverse.
        for day in (0..80_000).step_by(97) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!((y, m, d), date_of(day));
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn national_bank_holidays() {
        let day = |d: Date| day_of(d, "x").unwrap();
        let holiday = |d: Date| weekday(day(d)) < 5 && !is_business_day(day(d));
        // 2024: Easter Sun Mar 31 → Carnival Mon Feb 12 and Tue 13, Good Friday Mar 29, Corpus
        // Christi Thu May 30; Black Consciousness (Wed Nov 20) is national from 2024. The fixed
        // ones on a weekday in 2023 or 2025.
        let holidays = [
            (2024, 1, 1),
            (2024, 2, 12),
            (2024, 2, 13),
            (2024, 3, 29),
            (2025, 4, 21),
            (2024, 5, 1),
            (2024, 5, 30),
            (2023, 9, 7),
            (2023, 10, 12),
            (2023, 11, 2),
            (2024, 11, 15),
            (2024, 11, 20),
            (2024, 12, 25),
        ];
        for d in holidays {
            assert!(holiday(d), "{d:?}");
        }
        // Not national before 2024; Ash Wednesday and Christmas Eve are business days.
        assert!(is_business_day(day((2023, 11, 20))));
        assert!(is_business_day(day((2024, 2, 14))));
        assert!(is_business_day(day((2024, 12, 24))));
        // Easter by Meeus's algorithm, against known dates.
        for (year, month, d) in
            [(2000, 4, 23), (2019, 4, 21), (2024, 3, 31), (2025, 4, 20), (2038, 4, 25), (2285, 3, 22)]
        {
            assert_eq!(easter(year), days_from_civil(year, month, d), "{year}");
        }
        // Good Friday 2000 was Tiradentes: counted once.
        assert_eq!(national_holidays(2000).len(), 11);
        assert_eq!(national_holidays(2024).len(), 13);
        // (Wed 2020-12-30, Mon 2021-01-04] = Thu 31, Mon 4: New Year's Friday does not count.
        assert_eq!(business_days_between(day((2020, 12, 30)), day((2021, 1, 4))), 2);
    }

    #[test]
    fn a_due_date_on_a_holiday_moves_the_fine_and_interest() {
        // Due Fri 2020-12-25 → Mon 28: no fine on the 28th; on Tue 29 the fine and one business
        // day of interest (1.00% a business-day month on R$1,000.00: 100_000 × 100 / 21 / 10_000).
        let valor = CobVValor { multa: mvp(1, 1_500), juros: mvp(7, 100), ..plain(R1000) };
        let due = cal((2020, 12, 25), Some(10));
        assert_eq!(cobv_amount(&valor, &due, (2020, 12, 28)).map(parts), Ok((0, 0, 0, 0, R1000)));
        assert_eq!(cobv_amount(&valor, &due, (2020, 12, 29)).map(parts), Ok((0, 1_500, 48, 0, R1000 + 1_548)));
        // Mon 2021-01-04: Tue 29, Wed 30, Thu 31 and Mon 4 — four business days, not five.
        assert_eq!(cobv_amount(&valor, &due, (2021, 1, 4)).map(parts), Ok((0, 1_500, 190, 0, R1000 + 1_690)));
    }

    #[test]
    fn amounts_by_modality() {
        let late = (2024, 1, 15); // Mon: 5 calendar days after Wed 10; business days Thu 11, Fri 12, Mon 15 = 3
        let cases: Vec<(&str, CobVValor, Date, Parts)> = vec![
            // multa 1: fixed R$15.00, only after the due date.
            ("multa 1 before", CobVValor { multa: mvp(1, 1_500), ..plain(R1000) }, (2024, 1, 9), (0, 0, 0, 0, R1000)),
            ("multa 1 on due", CobVValor { multa: mvp(1, 1_500), ..plain(R1000) }, DUE, (0, 0, 0, 0, R1000)),
            (
                "multa 1 after",
                CobVValor { multa: mvp(1, 1_500), ..plain(R1000) },
                (2024, 1, 11),
                (0, 1_500, 0, 0, 101_500),
            ),
            // multa 2: 2.00% → 100_000 × 200 / 10_000 = 2_000.
            ("multa 2 on due", CobVValor { multa: mvp(2, 200), ..plain(R1000) }, DUE, (0, 0, 0, 0, R1000)),
            (
                "multa 2 after",
                CobVValor { multa: mvp(2, 200), ..plain(R1000) },
                (2024, 1, 11),
                (0, 2_000, 0, 0, 102_000),
            ),
            // 12_345 × 1_000 / 10_000 = 1_234.5 → 1_235 (half-up; half-even would give 1_234).
            (
                "multa 2 half",
                CobVValor { multa: mvp(2, 1_000), ..plain(12_345) },
                (2024, 1, 11),
                (0, 1_235, 0, 0, 13_580),
            ),
            // 12_345 × 100 / 10_000 = 123.45 → 123.
            ("multa 2 down", CobVValor { multa: mvp(2, 100), ..plain(12_345) }, (2024, 1, 11), (0, 123, 0, 0, 12_468)),
            // juros 1: R$0.33 per calendar day × 5 = 165.
            ("juros 1", CobVValor { juros: mvp(1, 33), ..plain(R1000) }, late, (0, 0, 165, 0, 100_165)),
            ("juros 1 on due", CobVValor { juros: mvp(1, 33), ..plain(R1000) }, DUE, (0, 0, 0, 0, R1000)),
            ("juros 1 before", CobVValor { juros: mvp(1, 33), ..plain(R1000) }, (2024, 1, 2), (0, 0, 0, 0, R1000)),
            // Calendar days count the weekend: Sat 13 is 3 days late → 99.
            (
                "juros 1 saturday",
                CobVValor { juros: mvp(1, 33), ..plain(R1000) },
                (2024, 1, 13),
                (0, 0, 99, 0, 100_099),
            ),
            // juros 2: 0.10% a day: 100_000 × 10 × 5 / 10_000 = 500.
            ("juros 2", CobVValor { juros: mvp(2, 10), ..plain(R1000) }, late, (0, 0, 500, 0, 100_500)),
            // juros 3: 1.00% a month: 100_000 × 100 × 5 / (10_000 × 30) = 166.67 → 167.
            ("juros 3", CobVValor { juros: mvp(3, 100), ..plain(R1000) }, late, (0, 0, 167, 0, 100_167)),
            // juros 4: 12.00% a year: 100_000 × 1_200 × 5 / (10_000 × 365) = 164.38 → 164.
            ("juros 4", CobVValor { juros: mvp(4, 1_200), ..plain(R1000) }, late, (0, 0, 164, 0, 100_164)),
            // juros 5: R$0.33 per business day × 3 = 99.
            ("juros 5", CobVValor { juros: mvp(5, 33), ..plain(R1000) }, late, (0, 0, 99, 0, 100_099)),
            // Across the weekend: Fri 12, Sat 13 and Sun 14 are all 2 business days late (Thu, Fri) → 66.
            ("juros 5 friday", CobVValor { juros: mvp(5, 33), ..plain(R1000) }, (2024, 1, 12), (0, 0, 66, 0, 100_066)),
            (
                "juros 5 saturday",
                CobVValor { juros: mvp(5, 33), ..plain(R1000) },
                (2024, 1, 13),
                (0, 0, 66, 0, 100_066),
            ),
            ("juros 5 sunday", CobVValor { juros: mvp(5, 33), ..plain(R1000) }, (2024, 1, 14), (0, 0, 66, 0, 100_066)),
            // juros 6: 0.10% per business day: 100_000 × 10 × 3 / 10_000 = 300.
            ("juros 6", CobVValor { juros: mvp(6, 10), ..plain(R1000) }, late, (0, 0, 300, 0, 100_300)),
            // juros 7: 1.00% a month of 21 business days: 100_000 × 100 × 3 / (10_000 × 21) = 142.86 → 143.
            ("juros 7", CobVValor { juros: mvp(7, 100), ..plain(R1000) }, late, (0, 0, 143, 0, 100_143)),
            // juros 8: 10.00% a year of 252 business days: 100_000 × 1_000 × 3 / (10_000 × 252) = 119.05 → 119.
            ("juros 8", CobVValor { juros: mvp(8, 1_000), ..plain(R1000) }, late, (0, 0, 119, 0, 100_119)),
            // multa 2% + juros 0.10%/day: 2_000 + 500.
            (
                "multa and juros",
                CobVValor { multa: mvp(2, 200), juros: mvp(2, 10), ..plain(R1000) },
                late,
                (0, 2_000, 500, 0, 102_500),
            ),
            // abatimento 1: R$50.00, before, on and after the due date; after, the 2% fine is on 95_000 → 1_900.
            (
                "abatimento 1 before",
                CobVValor { abatimento: mvp(1, 5_000), ..plain(R1000) },
                (2024, 1, 9),
                (5_000, 0, 0, 0, 95_000),
            ),
            (
                "abatimento 1 on due",
                CobVValor { abatimento: mvp(1, 5_000), ..plain(R1000) },
                DUE,
                (5_000, 0, 0, 0, 95_000),
            ),
            (
                "abatimento 1 after",
                CobVValor { abatimento: mvp(1, 5_000), multa: mvp(2, 200), ..plain(R1000) },
                (2024, 1, 11),
                (5_000, 1_900, 0, 0, 96_900),
            ),
            // abatimento 2: 5.00% → 100_000 × 500 / 10_000 = 5_000.
            ("abatimento 2", CobVValor { abatimento: mvp(2, 500), ..plain(R1000) }, DUE, (5_000, 0, 0, 0, 95_000)),
            // abatimento 10% → base 90_000; juros 0.10%/day × 5: 90_000 × 10 × 5 / 10_000 = 450.
            (
                "abatimento 2 with juros",
                CobVValor { abatimento: mvp(2, 1_000), juros: mvp(2, 10), ..plain(R1000) },
                late,
                (10_000, 0, 450, 0, 90_450),
            ),
            // desconto 1: R$30.00 until Fri 5, R$20.00 until Mon 8; the largest that still applies.
            (
                "desconto 1 early",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 5), 3_000), ((2024, 1, 8), 2_000)]), ..plain(R1000) },
                (2024, 1, 3),
                (0, 0, 0, 3_000, 97_000),
            ),
            (
                "desconto 1 first date",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 5), 3_000), ((2024, 1, 8), 2_000)]), ..plain(R1000) },
                (2024, 1, 5),
                (0, 0, 0, 3_000, 97_000),
            ),
            (
                "desconto 1 saturday after a friday date",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 5), 3_000), ((2024, 1, 8), 2_000)]), ..plain(R1000) },
                (2024, 1, 6),
                (0, 0, 0, 2_000, 98_000),
            ),
            (
                "desconto 1 second date",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 5), 3_000), ((2024, 1, 8), 2_000)]), ..plain(R1000) },
                (2024, 1, 8),
                (0, 0, 0, 2_000, 98_000),
            ),
            (
                "desconto 1 past its dates",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 5), 3_000), ((2024, 1, 8), 2_000)]), ..plain(R1000) },
                (2024, 1, 9),
                (0, 0, 0, 0, R1000),
            ),
            (
                "desconto 1 late",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 5), 3_000), ((2024, 1, 8), 2_000)]), ..plain(R1000) },
                (2024, 1, 11),
                (0, 0, 0, 0, R1000),
            ),
            // A Saturday date lasts until Monday.
            (
                "desconto 1 sat date on sunday",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 6), 3_000)]), ..plain(R1000) },
                (2024, 1, 7),
                (0, 0, 0, 3_000, 97_000),
            ),
            (
                "desconto 1 sat date on monday",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 6), 3_000)]), ..plain(R1000) },
                (2024, 1, 8),
                (0, 0, 0, 3_000, 97_000),
            ),
            (
                "desconto 1 sat date on tuesday",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 6), 3_000)]), ..plain(R1000) },
                (2024, 1, 9),
                (0, 0, 0, 0, R1000),
            ),
            // Sat 6 and Mon 8 both last until Mon 8: the larger applies.
            (
                "desconto 1 dates meeting on monday",
                CobVValor { desconto: fixed_dates(1, &[((2024, 1, 6), 2_000), ((2024, 1, 8), 1_000)]), ..plain(R1000) },
                (2024, 1, 8),
                (0, 0, 0, 2_000, 98_000),
            ),
            // desconto 2: 5.00% until Mon 8: 100_000 × 500 / 10_000 = 5_000.
            (
                "desconto 2",
                CobVValor { desconto: fixed_dates(2, &[((2024, 1, 8), 500)]), ..plain(R1000) },
                (2024, 1, 8),
                (0, 0, 0, 5_000, 95_000),
            ),
            (
                "desconto 2 past its date",
                CobVValor { desconto: fixed_dates(2, &[((2024, 1, 8), 500)]), ..plain(R1000) },
                (2024, 1, 9),
                (0, 0, 0, 0, R1000),
            ),
            // With abatimento R$50.00 the 5% is on 95_000 → 4_750; 100_000 − 5_000 − 4_750 = 90_250.
            (
                "desconto 2 with abatimento",
                CobVValor {
                    abatimento: mvp(1, 5_000),
                    desconto: fixed_dates(2, &[((2024, 1, 8), 500)]),
                    ..plain(R1000)
                },
                (2024, 1, 8),
                (5_000, 0, 0, 4_750, 90_250),
            ),
            // desconto 3: R$1.00 per calendar day early; Fri 5 is 5 days before Wed 10 → 500.
            (
                "desconto 3",
                CobVValor { desconto: per_day(3, 100), ..plain(R1000) },
                (2024, 1, 5),
                (0, 0, 0, 500, 99_500),
            ),
            ("desconto 3 on due", CobVValor { desconto: per_day(3, 100), ..plain(R1000) }, DUE, (0, 0, 0, 0, R1000)),
            (
                "desconto 3 late",
                CobVValor { desconto: per_day(3, 100), ..plain(R1000) },
                (2024, 1, 11),
                (0, 0, 0, 0, R1000),
            ),
            // desconto 4: R$1.00 per business day early: (Fri 5, Wed 10] = Mon, Tue, Wed = 3 → 300;
            // Sat 6 earns the same 3; Thu 4 adds Fri 5 → 400.
            (
                "desconto 4 friday",
                CobVValor { desconto: per_day(4, 100), ..plain(R1000) },
                (2024, 1, 5),
                (0, 0, 0, 300, 99_700),
            ),
            (
                "desconto 4 saturday",
                CobVValor { desconto: per_day(4, 100), ..plain(R1000) },
                (2024, 1, 6),
                (0, 0, 0, 300, 99_700),
            ),
            (
                "desconto 4 thursday",
                CobVValor { desconto: per_day(4, 100), ..plain(R1000) },
                (2024, 1, 4),
                (0, 0, 0, 400, 99_600),
            ),
            // desconto 5: 0.10% per calendar day: 100_000 × 10 × 5 / 10_000 = 500.
            (
                "desconto 5",
                CobVValor { desconto: per_day(5, 10), ..plain(R1000) },
                (2024, 1, 5),
                (0, 0, 0, 500, 99_500),
            ),
            // 0.15% × 3 days (Sun 7): 12_345 × 15 × 3 / 10_000 = 55.5525 → 56.
            (
                "desconto 5 rounding",
                CobVValor { desconto: per_day(5, 15), ..plain(12_345) },
                (2024, 1, 7),
                (0, 0, 0, 56, 12_289),
            ),
            // desconto 6: 0.10% per business day: 100_000 × 10 × 3 / 10_000 = 300.
            (
                "desconto 6",
                CobVValor { desconto: per_day(6, 10), ..plain(R1000) },
                (2024, 1, 5),
                (0, 0, 0, 300, 99_700),
            ),
            // R$50.00 a day on R$100.00, one day early: 5_000 → 5_000 left.
            (
                "desconto 3 large",
                CobVValor { desconto: per_day(3, 5_000), ..plain(10_000) },
                (2024, 1, 9),
                (0, 0, 0, 5_000, 5_000),
            ),
        ];
        for (name, valor, pay, want) in cases {
            let got = cobv_amount(&valor, &cal(DUE, None), pay).map(parts);
            assert_eq!(got, Ok(want), "{name}");
        }
    }

    #[test]
    fn a_weekend_due_date_moves_to_monday() {
        let sat = (2024, 1, 13); // adjusted to Mon 15
        let valor = CobVValor { multa: mvp(2, 200), juros: mvp(1, 33), ..plain(R1000) };
        let cases = [
            ((2024, 1, 13), (0, 0, 0, 0, R1000)),
            ((2024, 1, 14), (0, 0, 0, 0, R1000)),
            ((2024, 1, 15), (0, 0, 0, 0, R1000)),
            // Tue 16: 2% fine 2_000 and one day (from Mon 15) of R$0.33.
            ((2024, 1, 16), (0, 2_000, 33, 0, 102_033)),
        ];
        for (pay, want) in cases {
            assert_eq!(cobv_amount(&valor, &cal(sat, None), pay).map(parts), Ok(want), "{pay:?}");
        }
        // Anticipation counts to Monday: Fri 12 is 3 calendar days early → R$1.00 × 3.
        let valor = CobVValor { desconto: per_day(3, 100), ..plain(R1000) };
        assert_eq!(cobv_amount(&valor, &cal(sat, None), (2024, 1, 12)).map(parts), Ok((0, 0, 0, 300, 99_700)));
    }

    #[test]
    fn validity_after_the_due_date() {
        let past = |last: Date| Err(err("DPP", Rule::PastValidity { last_payable: last }));
        let ok = Ok((0, 0, 0, 0, R1000));
        // (due date, validadeAposVencimento, payment date, outcome)
        type Case = (Date, Option<i64>, Date, Result<Parts, ChargeError>);
        let cases: &[Case] = &[
            // Wed 10 + 3 = Sat 13 → Mon 15.
            (DUE, Some(3), (2024, 1, 15), ok.clone()),
            (DUE, Some(3), (2024, 1, 16), past((2024, 1, 15))),
            (DUE, Some(0), DUE, ok.clone()),
            (DUE, Some(0), (2024, 1, 11), past(DUE)),
            // Default 30: Wed Jan 10 + 30 = Fri Feb 9.
            (DUE, None, (2024, 2, 9), ok.clone()),
            (DUE, None, (2024, 2, 10), past((2024, 2, 9))),
            // The spec's Example A: due Tue 2020-10-20, 4 days; the 4th is Sat 24, payable until Mon 26.
            ((2020, 10, 20), Some(4), (2020, 10, 24), ok.clone()),
            ((2020, 10, 20), Some(4), (2020, 10, 26), ok.clone()),
            ((2020, 10, 20), Some(4), (2020, 10, 27), past((2020, 10, 26))),
            // Example F: due Fri 2021-08-27, 5 days: until Wed 09-01.
            ((2021, 8, 27), Some(5), (2021, 9, 1), ok.clone()),
            ((2021, 8, 27), Some(5), (2021, 9, 2), past((2021, 9, 1))),
            // Example G: due Sat 2021-08-28 → Mon 30; + 5 = Sat 09-04 → Mon 09-06.
            ((2021, 8, 28), Some(5), (2021, 9, 6), ok.clone()),
            ((2021, 8, 28), Some(5), (2021, 9, 7), past((2021, 9, 6))),
            // Examples B–E: due Fri 2020-12-25, Christmas → Mon 28.
            ((2020, 12, 25), Some(0), (2020, 12, 26), ok.clone()),
            ((2020, 12, 25), Some(0), (2020, 12, 28), ok.clone()),
            ((2020, 12, 25), Some(0), (2020, 12, 29), past((2020, 12, 28))),
            ((2020, 12, 25), Some(1), (2020, 12, 29), ok.clone()),
            ((2020, 12, 25), Some(1), (2020, 12, 30), past((2020, 12, 29))),
            ((2020, 12, 25), Some(3), (2020, 12, 31), ok.clone()),
            ((2020, 12, 25), Some(3), (2021, 1, 1), past((2020, 12, 31))),
            // E: Mon 28 + 4 = Fri 2021-01-01, New Year → Mon 04.
            ((2020, 12, 25), Some(4), (2021, 1, 1), ok.clone()),
            ((2020, 12, 25), Some(4), (2021, 1, 4), ok.clone()),
            ((2020, 12, 25), Some(4), (2021, 1, 5), past((2021, 1, 4))),
            // Due Sat 2024-02-10, before Carnival (Mon 12, Tue 13): paid on Wed 14 in time.
            ((2024, 2, 10), Some(0), (2024, 2, 14), ok.clone()),
            ((2024, 2, 10), Some(0), (2024, 2, 15), past((2024, 2, 14))),
            // The largest validity the spec allows does not overflow.
            (DUE, Some(i32::MAX as i64), (2500, 12, 31), ok.clone()),
        ];
        for (due, validade, pay, want) in cases {
            assert_eq!(
                &cobv_amount(&plain(R1000), &cal(*due, *validade), *pay).map(parts),
                want,
                "{due:?} {validade:?} {pay:?}"
            );
        }
        let e = cobv_amount(&plain(R1000), &cal(DUE, Some(0)), (2024, 1, 11)).unwrap_err();
        assert!(e.to_string().starts_with("DPP: the charge could be paid until 2024-01-10"), "{e}");
    }

    #[test]
    fn nothing_left_to_pay_is_an_error() {
        // R$50.00 a day on R$100.00, two days early (Mon 8): 10_000, the whole amount.
        let valor = CobVValor { desconto: per_day(3, 5_000), ..plain(10_000) };
        assert_eq!(
            cobv_amount(&valor, &cal(DUE, None), (2024, 1, 8)),
            Err(err("valor.desconto", Rule::NotBelowAmount))
        );
        // 99.99% of 1 centavo = 0.9999 → 1: nothing left.
        let valor = CobVValor { abatimento: mvp(2, 9_999), ..plain(1) };
        assert_eq!(
            cobv_amount(&valor, &cal(DUE, None), DUE),
            Err(err("valor.abatimento.valorPerc", Rule::NotBelowAmount))
        );
        // A final value past \d{1,10}\.\d{2}.
        let valor = CobVValor { multa: mvp(1, MAX_CENTAVOS), ..plain(MAX_CENTAVOS) };
        assert_eq!(cobv_amount(&valor, &cal(DUE, None), (2024, 1, 11)), Err(err("valor.final", Rule::TooLarge)));
    }

    #[test]
    fn bad_inputs_name_the_field_and_the_rule() {
        let list = "valor.desconto.descontoDataFixa";
        let dd = |items: &[(Date, u64)]| fixed_dates(1, items);
        let cases: Vec<(CobVValor, CobVCalendario, &str, Rule)> = vec![
            (plain(0), cal(DUE, None), "valor.original", Rule::Zero),
            (plain(MAX_CENTAVOS + 1), cal(DUE, None), "valor.original", Rule::TooLarge),
            (plain(R1000), cal((2024, 2, 30), None), "calendario.dataDeVencimento", Rule::Date),
            (plain(R1000), cal((2023, 2, 29), None), "calendario.dataDeVencimento", Rule::Date),
            (plain(R1000), cal((1969, 12, 31), None), "calendario.dataDeVencimento", Rule::Date),
            (plain(R1000), cal((2501, 1, 1), None), "calendario.dataDeVencimento", Rule::Date),
            (
                plain(R1000),
                cal(DUE, Some(-1)),
                "calendario.validadeAposVencimento",
                Rule::Range { min: 0, max: i32::MAX as i64 },
            ),
            (
                plain(R1000),
                cal(DUE, Some(i32::MAX as i64 + 1)),
                "calendario.validadeAposVencimento",
                Rule::Range { min: 0, max: i32::MAX as i64 },
            ),
            (
                CobVValor { multa: mvp(0, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.multa.modalidade",
                Rule::Modalidade { max: 2 },
            ),
            (
                CobVValor { multa: mvp(3, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.multa.modalidade",
                Rule::Modalidade { max: 2 },
            ),
            (
                CobVValor { juros: mvp(0, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.juros.modalidade",
                Rule::Modalidade { max: 8 },
            ),
            (
                CobVValor { juros: mvp(9, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.juros.modalidade",
                Rule::Modalidade { max: 8 },
            ),
            (
                CobVValor { abatimento: mvp(3, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.abatimento.modalidade",
                Rule::Modalidade { max: 2 },
            ),
            (
                CobVValor { desconto: per_day(0, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.modalidade",
                Rule::Modalidade { max: 6 },
            ),
            (
                CobVValor { desconto: per_day(7, 100), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.modalidade",
                Rule::Modalidade { max: 6 },
            ),
            (
                CobVValor { juros: mvp(1, MAX_CENTAVOS + 1), ..plain(R1000) },
                cal(DUE, None),
                "valor.juros.valorPerc",
                Rule::TooLarge,
            ),
            (
                CobVValor { multa: mvp(2, MAX_CENTAVOS + 1), ..plain(R1000) },
                cal(DUE, None),
                "valor.multa.valorPerc",
                Rule::TooLarge,
            ),
            (
                CobVValor { abatimento: mvp(1, R1000), ..plain(R1000) },
                cal(DUE, None),
                "valor.abatimento.valorPerc",
                Rule::NotBelowOriginal,
            ),
            (
                CobVValor { abatimento: mvp(2, 10_000), ..plain(R1000) },
                cal(DUE, None),
                "valor.abatimento.valorPerc",
                Rule::NotBelowHundredPercent,
            ),
            (
                CobVValor {
                    desconto: Some(Desconto {
                        modalidade: 1,
                        valor_perc: Some(100),
                        desconto_data_fixa: vec![DescontoDataFixa { data: DUE, valor_perc: 100 }],
                    }),
                    ..plain(R1000)
                },
                cal(DUE, None),
                "valor.desconto.valorPerc",
                Rule::Forbidden,
            ),
            (CobVValor { desconto: dd(&[]), ..plain(R1000) }, cal(DUE, None), list, Rule::Count { min: 1, max: 3 }),
            (
                CobVValor {
                    desconto: fixed_dates(
                        2,
                        &[((2024, 1, 1), 400), ((2024, 1, 2), 300), ((2024, 1, 3), 200), ((2024, 1, 4), 100)],
                    ),
                    ..plain(R1000)
                },
                cal(DUE, None),
                list,
                Rule::Count { min: 1, max: 3 },
            ),
            (
                CobVValor { desconto: dd(&[((2024, 1, 5), 100), ((2024, 1, 11), 50)]), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.descontoDataFixa[1].data",
                Rule::AfterDueDate,
            ),
            (
                CobVValor { desconto: dd(&[((2024, 13, 1), 100)]), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.descontoDataFixa[0].data",
                Rule::Date,
            ),
            (
                CobVValor { desconto: dd(&[((2024, 1, 5), 100), ((2024, 1, 5), 100)]), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.descontoDataFixa[1]",
                Rule::Duplicate,
            ),
            (
                CobVValor { desconto: dd(&[((2024, 1, 5), R1000)]), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.descontoDataFixa[0].valorPerc",
                Rule::NotBelowOriginal,
            ),
            (
                CobVValor { desconto: fixed_dates(2, &[((2024, 1, 5), 10_000)]), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.descontoDataFixa[0].valorPerc",
                Rule::NotBelowHundredPercent,
            ),
            (
                CobVValor {
                    desconto: Some(Desconto { modalidade: 3, valor_perc: None, desconto_data_fixa: vec![] }),
                    ..plain(R1000)
                },
                cal(DUE, None),
                "valor.desconto.valorPerc",
                Rule::Required,
            ),
            (
                CobVValor {
                    desconto: Some(Desconto {
                        modalidade: 4,
                        valor_perc: Some(100),
                        desconto_data_fixa: vec![DescontoDataFixa { data: DUE, valor_perc: 100 }],
                    }),
                    ..plain(R1000)
                },
                cal(DUE, None),
                list,
                Rule::Forbidden,
            ),
            (
                CobVValor { desconto: per_day(5, 10_000), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.valorPerc",
                Rule::NotBelowHundredPercent,
            ),
            (
                CobVValor { desconto: per_day(3, R1000), ..plain(R1000) },
                cal(DUE, None),
                "valor.desconto.valorPerc",
                Rule::NotBelowOriginal,
            ),
        ];
        for (valor, calendario, field, rule) in cases {
            let want = Err(err(field, rule));
            assert_eq!(validate_cobv(&valor, &calendario, TODAY), want, "{field} {rule:?}");
            assert_eq!(cobv_amount(&valor, &calendario, DUE).map(|_| ()), want, "{field} {rule:?}");
        }
        assert_eq!(cobv_amount(&plain(R1000), &cal(DUE, None), (2024, 2, 30)), Err(err("DPP", Rule::Date)));
        let e = validate_cobv(&CobVValor { juros: mvp(9, 100), ..plain(R1000) }, &cal(DUE, None), TODAY).unwrap_err();
        assert_eq!(e.to_string(), "valor.juros.modalidade: must be a modality in the spec's table, 1 to 8");
        // Every modality the tables define is accepted.
        for m in 1..=2 {
            assert_eq!(
                validate_cobv(
                    &CobVValor { multa: mvp(m, 100), abatimento: mvp(m, 100), ..plain(R1000) },
                    &cal(DUE, None),
                    TODAY
                ),
                Ok(())
            );
        }
        for m in 1..=8 {
            assert_eq!(
                validate_cobv(&CobVValor { juros: mvp(m, 100), ..plain(R1000) }, &cal(DUE, None), TODAY),
                Ok(())
            );
        }
        for m in 3..=6 {
            assert_eq!(
                validate_cobv(&CobVValor { desconto: per_day(m, 100), ..plain(R1000) }, &cal(DUE, None), TODAY),
                Ok(())
            );
        }
    }

    #[test]
    fn a_charge_must_be_payable_from_the_day_it_is_made() {
        // Each rule alone is below the original; together they leave nothing to pay before the
        // due date: an abatimento of R$600 and a fixed discount of R$400 on R$1,000.
        let together =
            CobVValor { abatimento: mvp(1, 60_000), desconto: fixed_dates(1, &[(DUE, 40_000)]), ..plain(R1000) };
        assert_eq!(validate_cobv(&together, &cal(DUE, None), TODAY), Err(err("valor.desconto", Rule::NotBelowAmount)));
        // R$1.00 a day on R$10.00, made 9 days before the due date: R$9.00 off, payable; made 10
        // days before, nothing left to pay on the first day.
        let daily = CobVValor { desconto: per_day(3, 100), ..plain(1_000) };
        assert_eq!(validate_cobv(&daily, &cal(DUE, None), TODAY), Ok(()));
        assert_eq!(
            validate_cobv(&daily, &cal(DUE, None), (2023, 12, 31)),
            Err(err("valor.desconto", Rule::NotBelowAmount))
        );
        // A fine too large to write once late.
        let fine = CobVValor { multa: mvp(1, MAX_CENTAVOS), ..plain(R1000) };
        assert_eq!(validate_cobv(&fine, &cal(DUE, None), TODAY), Err(err("valor.final", Rule::TooLarge)));
        // ... unless the charge cannot be paid late at all.
        assert_eq!(validate_cobv(&fine, &cal(DUE, Some(0)), TODAY), Ok(()));
        // Made after its due date (a charge changed while overdue): judged from the first late day.
        assert_eq!(validate_cobv(&plain(R1000), &cal(DUE, None), (2024, 1, 20)), Ok(()));
    }

    #[test]
    fn components_always_add_up() {
        let valor = CobVValor {
            original: 123_457,
            multa: mvp(2, 237),
            juros: mvp(7, 333),
            abatimento: mvp(2, 1_111),
            desconto: per_day(6, 7),
        };
        let due_day = day_of(DUE, "x").unwrap();
        let mut seen_late = 0;
        for day in due_day - 60..=due_day + 30 {
            let v = cobv_amount(&valor, &cal(DUE, None), date_of(day)).unwrap();
            assert_eq!(v.original - v.abatimento + v.multa + v.juros - v.desconto, v.valor_final, "{:?}", date_of(day));
            // 11.11% of 123_457 = 13_716.07 → 13_716, whatever the day.
            assert_eq!(v.abatimento, 13_716);
            if day > due_day {
                seen_late += 1;
                assert_eq!(v.desconto, 0);
                // 2.37% of 109_741 = 2_600.86 → 2_601.
                assert_eq!(v.multa, 2_601);
            } else {
                assert_eq!(v.multa + v.juros, 0);
            }
        }
        assert_eq!(seen_late, 30);
    }
}
