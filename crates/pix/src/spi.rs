//! Payments to other institutions through the SPI (the Central Bank's instant payment system),
//! in the terms of ISO 20022: a payment goes out as a pacs.008 credit transfer and comes back as a
//! pacs.002 status report, accepted (`ACSC`) or rejected (`RJCT`) with a reason code of the
//! ExternalStatusReason1Code list (`shared/spec/iso20022/pacs.002.001.10.xsd`). The SPI validates
//! within 34 s and settles within 40 s (IN BCB 5/2020, `shared/spec/SOURCES.md`); past the
//! connector's time-out the payment is given up and its hold released.
//!
//! [`Breaker`] keeps a failing connector from being hammered: after `threshold` failures in a row
//! it opens for `cool_down`, then lets one trial through (half-open) and closes on its success.

use ledger::Timestamp;

/// One side of a credit transfer (debtor or creditor) as pacs.008 carries it. Its `Debug` leaves
/// out the name and the document.
#[derive(Clone, PartialEq, Eq)]
pub struct Party {
    /// The institution (agent) by its ISPB.
    pub ispb: String,
    pub branch: String,
    pub account: String,
    /// ISO 20022 cash account type: `CACC`, `SVGS`, `TRAN`, `SLRY`.
    pub account_type: String,
    /// CPF or CNPJ, digits only.
    pub document: String,
    pub name: String,
}

impl std::fmt::Debug for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Party")
            .field("ispb", &self.ispb)
            .field("branch", &self.branch)
            .field("account", &self.account)
            .field("account_type", &self.account_type)
            .finish_non_exhaustive()
    }
}

/// A pacs.008 credit transfer, the fields the SPI needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditTransfer {
    pub end_to_end_id: String,
    /// Centavos (the interbank settlement amount, BRL).
    pub amount: u64,
    pub debtor: Party,
    pub creditor: Party,
    /// Unstructured remittance information (the payer's description).
    pub remittance: Option<String>,
}

/// A pacs.004 payment return: a refund (devolução) of a Pix received from another institution,
/// sent back to the institution that paid it, which credits its payer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentReturn {
    /// The return's own id (`D` + ISPB + time + random, as an EndToEndId).
    pub return_id: String,
    /// The EndToEndId of the Pix it returns.
    pub original_end_to_end_id: String,
    /// Centavos.
    pub amount: u64,
    /// The institution that paid the original Pix, by its ISPB.
    pub payer_ispb: String,
    /// `MD06`: the receiver asked for it (a refund); `FR01`: fraud (a MED return).
    pub reason: &'static str,
    pub remittance: Option<String>,
}

/// Why the SPI or the receiving institution refused a payment (pacs.002 `StsRsnInf/Rsn/Cd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// AC03: the creditor account number is invalid or missing.
    InvalidCreditorAccount,
    /// AC06: the account is blocked.
    BlockedAccount,
    /// AB03: settlement aborted on a time-out.
    Timeout,
    /// AG03: the transaction type is not supported by the receiver.
    NotSupported,
}

impl RejectReason {
    /// The ISO 20022 code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::InvalidCreditorAccount => "AC03",
            RejectReason::BlockedAccount => "AC06",
            RejectReason::Timeout => "AB03",
            RejectReason::NotSupported => "AG03",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            RejectReason::InvalidCreditorAccount => "the receiving institution has no such creditor account (AC03)",
            RejectReason::BlockedAccount => "the creditor account is blocked (AC06)",
            RejectReason::Timeout => "the SPI did not settle the payment in time (AB03)",
            RejectReason::NotSupported => "the receiving institution does not take this payment (AG03)",
        }
    }
}

/// A pacs.002 status report's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// ACSC: settled.
    Accepted,
    /// RJCT.
    Rejected(RejectReason),
}

/// How [`Breaker::try_admit`] let a payment through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// The breaker is closed.
    Closed,
    /// Half-open: this payment is the trial, the others wait until `until` for its outcome.
    Trial { until: Timestamp },
}

/// A circuit breaker around the connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub threshold: u32,
    pub cool_down_nanos: u64,
    failures: u32,
    open_until: Option<Timestamp>,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down_nanos: u64) -> Breaker {
        assert!(threshold > 0, "a breaker that opens before any failure refuses everything");
        Breaker { threshold, cool_down_nanos, failures: 0, open_until: None }
    }

    /// Whether a payment may go to the connector now (closed, or half-open after the cool-down).
    pub fn admits(&self, now: Timestamp) -> bool {
        self.open_until.is_none_or(|until| now >= until)
    }

    /// Lets one payment through now if the breaker admits it: closed, or half-open, where the
    /// first one through is the trial and the next wait another cool-down for its verdict.
    pub fn try_admit(&mut self, now: Timestamp) -> Option<Admitted> {
        if !self.admits(now) {
            return None;
        }
        match self.open_until {
            None => Some(Admitted::Closed),
            Some(_) => {
                let until = now + self.cool_down_nanos;
                self.open_until = Some(until);
                Some(Admitted::Trial { until })
            }
        }
    }

    /// Gives back a trial whose payment never reached the connector (refused by the ledger, or
    /// made by a twin): the next payment is the trial at once, instead of a cool-down later. A
    /// trial that reached the connector is ended by its [`Breaker::success`] or
    /// [`Breaker::failure`].
    pub fn give_back(&mut self, admitted: Admitted, now: Timestamp) {
        if let Admitted::Trial { until } = admitted {
            if self.open_until == Some(until) {
                self.open_until = Some(now);
            }
        }
    }

    /// Seconds until [`Breaker::admits`] (0 when it does now).
    pub fn retry_after_seconds(&self, now: Timestamp) -> u64 {
        self.open_until.map_or(0, |until| until.saturating_sub(now).div_ceil(1_000_000_000))
    }

    /// The connector answered (accepted or rejected: it works).
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }

    /// The connector failed or timed out.
    pub fn failure(&mut self, now: Timestamp) {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.threshold {
            self.open_until = Some(now + self.cool_down_nanos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn opens_after_the_threshold_and_half_opens_after_the_cool_down() {
        let mut b = Breaker::new(3, 30 * SEC);
        for t in 0..2 {
            b.failure(t);
            assert!(b.admits(t), "below the threshold");
        }
        b.success();
        b.failure(10);
        b.failure(11);
        assert!(b.admits(11), "success reset the count");
        b.failure(12);
        assert!(!b.admits(12) && !b.admits(12 + 30 * SEC - 1));
        assert_eq!(b.retry_after_seconds(12), 30);
        assert!(b.admits(12 + 30 * SEC), "half-open");
        let mut trial = b;
        let admitted = trial.try_admit(12 + 30 * SEC);
        assert!(matches!(admitted, Some(Admitted::Trial { .. })), "the trial goes through");
        assert!(trial.try_admit(12 + 30 * SEC + 1).is_none(), "one trial at a time");
        // A trial whose payment never reached the connector is given back: the next one is the
        // trial at once (given back late, after another trial began, it changes nothing).
        let mut given_back = trial;
        given_back.give_back(admitted.unwrap(), 12 + 30 * SEC + 2);
        let next = given_back.try_admit(12 + 30 * SEC + 2);
        assert!(matches!(next, Some(Admitted::Trial { .. })), "the next is the trial");
        given_back.give_back(admitted.unwrap(), 12 + 30 * SEC + 3);
        assert!(given_back.try_admit(12 + 30 * SEC + 3).is_none(), "the new trial stands");
        given_back.give_back(Admitted::Closed, 12 + 30 * SEC + 3);
        assert!(given_back.try_admit(12 + 30 * SEC + 4).is_none(), "nothing to give back when closed");
        trial.success();
        assert_eq!(trial.try_admit(12 + 30 * SEC + 2), Some(Admitted::Closed), "closed again");
        assert!(trial.try_admit(12 + 30 * SEC + 3).is_some());
        b.failure(12 + 30 * SEC);
        assert!(!b.admits(12 + 30 * SEC + 1), "a failed trial reopens at once");
        b.success();
        assert!(b.admits(12 + 30 * SEC + 1));
        assert_eq!(b.retry_after_seconds(0), 0);
    }

    #[test]
    fn reasons_carry_iso_codes() {
        assert_eq!(RejectReason::InvalidCreditorAccount.code(), "AC03");
        assert_eq!(RejectReason::Timeout.code(), "AB03");
        assert!(RejectReason::Timeout.describe().contains("AB03"));
    }
}
