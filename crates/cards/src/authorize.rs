//! The authorization decision for a purchase (0100), before the ledger is asked for the hold: the
//! card's status and expiry, the merchant category and channel, the currency, the product's and
//! the card's amount limits, and a velocity rule. Funds (code 51) are the ledger's to judge.

use crate::CardStatus;

/// ISO 8583 (1987) DE39 response codes rtpay answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseCode {
    Approved,
    DoNotHonor,
    InvalidCard,
    /// An amount out of range (above what the ledger takes; zero where money must move).
    InvalidAmount,
    FormatError,
    InsufficientFunds,
    ExpiredCard,
    NotPermitted,
    SuspectedFraud,
    ExceedsAmountLimit,
    /// An account verification (an 0100 for a zero amount) that checked out: nothing is held.
    NoReasonToDecline,
    IssuerUnavailable,
    SystemMalfunction,
}

impl ResponseCode {
    pub fn code(self) -> &'static str {
        match self {
            ResponseCode::Approved => "00",
            ResponseCode::DoNotHonor => "05",
            ResponseCode::InvalidCard => "14",
            ResponseCode::InvalidAmount => "13",
            ResponseCode::FormatError => "30",
            ResponseCode::InsufficientFunds => "51",
            ResponseCode::ExpiredCard => "54",
            ResponseCode::NotPermitted => "57",
            ResponseCode::SuspectedFraud => "59",
            ResponseCode::ExceedsAmountLimit => "61",
            ResponseCode::NoReasonToDecline => "85",
            ResponseCode::IssuerUnavailable => "91",
            ResponseCode::SystemMalfunction => "96",
        }
    }
}

/// Amount limits, in the card's currency's minor units; `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_transaction: Option<u64>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// What the card facts say, as storage holds them.
#[derive(Clone, Debug)]
pub struct Card<'a> {
    pub status: CardStatus,
    /// `YYMM`.
    pub expiry: &'a str,
    /// ISO 4217 numeric code of the card's account.
    pub currency: u16,
    pub product_limits: Limits,
    pub card_limits: Limits,
    /// Merchant category codes (4 digits) the card may not be used at.
    pub blocked_mccs: &'a [String],
    /// Whether card-not-present e-commerce use is allowed.
    pub ecommerce: bool,
    /// Most authorizations in any 60 seconds before the next is declined as suspected fraud.
    pub velocity_per_minute: u32,
}

/// What the card has already spent (approved holds and captures, less reversals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spent {
    pub today: u64,
    pub this_month: u64,
    /// Authorizations of this card in the last 60 seconds.
    pub last_minute: u32,
}

/// The purchase, as the 0100 carries it.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub amount: u64,
    /// DE49.
    pub currency: u16,
    /// DE14, `YYMM`, when sent.
    pub expiry: Option<&'a str>,
    /// DE18.
    pub mcc: Option<&'a str>,
    /// DE22 (POS entry mode); `81` is e-commerce.
    pub entry_mode: Option<&'a str>,
    /// Today, `YYMM`.
    pub today: &'a str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ask the ledger for the hold.
    Hold,
    Decline {
        code: ResponseCode,
        reason: String,
    },
}

fn decline(code: ResponseCode, reason: impl Into<String>) -> Decision {
    Decision::Decline { code, reason: reason.into() }
}

/// Whether `entry_mode` (DE22) says the card was not present: e-commerce (`81`) or keyed (`01`).
pub fn card_not_present(entry_mode: Option<&str>) -> bool {
    matches!(entry_mode.map(|m| m.get(..2).unwrap_or(m)), Some("81") | Some("01"))
}

/// Whether DE3's transaction type (its first two digits) credits the cardholder's account: a
/// refund (`20`), a deposit (`21`), a credit adjustment (`22`), an original credit (`26`) or a
/// payment (`28`). Every other type is answered as a purchase, a debit.
pub fn credits_cardholder(processing_code: &str) -> bool {
    matches!(processing_code.get(..2), Some("20" | "21" | "22" | "26" | "28"))
}

/// Whether an advice's DE39 reports a transaction the network approved (in stand-in, or on the
/// issuer's late answer): `00`, `08` (honour with identification), `10` (approved for a partial
/// amount), `11` (VIP), or a chip card's offline approval, `Y1` (approved offline) or `Y3`
/// (unable to go online, approved offline). An advice without DE39 reports an approval.
pub fn advice_approved(response_code: Option<&str>) -> bool {
    matches!(response_code, None | Some("00" | "08" | "10" | "11" | "Y1" | "Y3"))
}

pub fn decide(card: &Card<'_>, request: &Request<'_>, spent: Spent) -> Decision {
    match card.status {
        CardStatus::Active => {}
        status => return decline(ResponseCode::DoNotHonor, format!("the card is {}", status.as_str())),
    }
    if card.expiry < request.today {
        return decline(ResponseCode::ExpiredCard, "the card has expired");
    }
    if let Some(sent) = request.expiry {
        if sent != card.expiry {
            return decline(ResponseCode::ExpiredCard, "the expiry date (DE14) does not match the card's");
        }
    }
    if request.currency != card.currency {
        return decline(ResponseCode::NotPermitted, "the currency (DE49) is not the card's");
    }
    if let Some(mcc) = request.mcc {
        if card.blocked_mccs.iter().any(|b| b == mcc) {
            return decline(ResponseCode::NotPermitted, format!("merchant category {mcc} is blocked for this card"));
        }
    }
    if !card.ecommerce && card_not_present(request.entry_mode) {
        return decline(ResponseCode::NotPermitted, "card-not-present use is disabled for this card");
    }
    for (whose, limits) in [("product", card.product_limits), ("card", card.card_limits)] {
        if limits.per_transaction.is_some_and(|max| request.amount > max) {
            return decline(ResponseCode::ExceedsAmountLimit, format!("above the {whose}'s per-transaction limit"));
        }
        if limits.daily.is_some_and(|max| spent.today.saturating_add(request.amount) > max) {
            return decline(ResponseCode::ExceedsAmountLimit, format!("above the {whose}'s daily limit"));
        }
        if limits.monthly.is_some_and(|max| spent.this_month.saturating_add(request.amount) > max) {
            return decline(ResponseCode::ExceedsAmountLimit, format!("above the {whose}'s monthly limit"));
        }
    }
    if spent.last_minute >= card.velocity_per_minute {
        return decline(
            ResponseCode::SuspectedFraud,
            format!("more than {} authorizations in a minute", card.velocity_per_minute),
        );
    }
    Decision::Hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(blocked: &[String]) -> Card<'_> {
        Card {
            status: CardStatus::Active,
            expiry: "3012",
            currency: 986,
            product_limits: Limits { per_transaction: Some(100_000), daily: None, monthly: Some(500_000) },
            card_limits: Limits { per_transaction: None, daily: Some(20_000), monthly: None },
            blocked_mccs: blocked,
            ecommerce: false,
            velocity_per_minute: 5,
        }
    }

    fn request(amount: u64) -> Request<'static> {
        Request {
            amount,
            currency: 986,
            expiry: Some("3012"),
            mcc: Some("5411"),
            entry_mode: Some("051"),
            today: "2611",
        }
    }

    fn code(d: Decision) -> &'static str {
        match d {
            Decision::Hold => "hold",
            Decision::Decline { code, .. } => code.code(),
        }
    }

    #[test]
    fn each_rule_answers_its_code() {
        let blocked = vec!["7995".to_owned()];
        let c = card(&blocked);
        let none = Spent::default();
        assert_eq!(code(decide(&c, &request(1_000), none)), "hold");
        for status in [CardStatus::Inactive, CardStatus::Blocked, CardStatus::Cancelled] {
            assert_eq!(code(decide(&Card { status, ..c.clone() }, &request(1_000), none)), "05");
        }
        assert_eq!(code(decide(&Card { expiry: "2610", ..c.clone() }, &request(1_000), none)), "54");
        assert_eq!(code(decide(&c, &Request { expiry: Some("3011"), ..request(1_000) }, none)), "54");
        assert_eq!(code(decide(&c, &Request { expiry: None, ..request(1_000) }, none)), "hold");
        assert_eq!(code(decide(&c, &Request { currency: 840, ..request(1_000) }, none)), "57");
        assert_eq!(code(decide(&c, &Request { mcc: Some("7995"), ..request(1_000) }, none)), "57");
        assert_eq!(code(decide(&c, &Request { entry_mode: Some("812"), ..request(1_000) }, none)), "57");
        let online = Card { ecommerce: true, ..c.clone() };
        assert_eq!(code(decide(&online, &Request { entry_mode: Some("812"), ..request(1_000) }, none)), "hold");
        assert_eq!(code(decide(&c, &request(100_001), none)), "61", "product per-transaction");
        assert_eq!(code(decide(&c, &request(20_001), none)), "61", "card daily");
        let spent = Spent { today: 19_000, this_month: 0, last_minute: 0 };
        assert_eq!(code(decide(&c, &request(1_000), spent)), "hold");
        assert_eq!(code(decide(&c, &request(1_001), spent)), "61");
        let spent = Spent { today: 0, this_month: 499_500, last_minute: 0 };
        assert_eq!(code(decide(&c, &request(501), spent)), "61", "product monthly");
        let spent = Spent { last_minute: 5, ..Spent::default() };
        assert_eq!(code(decide(&c, &request(1), spent)), "59");
    }

    #[test]
    fn credits_and_approved_advices_are_told_apart() {
        for credit in ["200000", "210000", "220000", "260000", "280000", "20"] {
            assert!(credits_cardholder(credit), "{credit}");
        }
        for debit in ["000000", "010000", "090000", "110000", "300000", "2", ""] {
            assert!(!credits_cardholder(debit), "{debit}");
        }
        for approved in [None, Some("00"), Some("08"), Some("10"), Some("11"), Some("Y1"), Some("Y3")] {
            assert!(advice_approved(approved), "{approved:?}");
        }
        for declined in [Some("05"), Some("51"), Some("91"), Some("0"), Some(""), Some("Z1"), Some("Z3"), Some("y1")] {
            assert!(!advice_approved(declined), "{declined:?}");
        }
    }
}
