//! The SPI connector: how a payment to another institution leaves rtpay and how its verdict comes
//! back. The built-in connector is a sandbox simulator (latency, rejection and time-out rates are
//! configured); a production connector to the RSFN speaks the same [`SpiConnector`] trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pix::spi::{CreditTransfer, PaymentReturn, RejectReason, Status};

/// What a connector may fail with besides a verdict (as with no answer in time, the caller then
/// asks the SPI for the payment's status).
#[derive(Debug)]
pub struct SpiError(pub String);

pub type SpiFuture = Pin<Box<dyn Future<Output = Result<Status, SpiError>> + Send>>;

/// What the SPI says of a payment asked about by its EndToEndId.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Its verdict (pacs.002).
    Settled(Status),
    /// Received, verdict still to come.
    InProcess,
    /// Never received: it will never be settled.
    Unknown,
}

pub type StatusFuture = Pin<Box<dyn Future<Output = Result<Found, SpiError>> + Send>>;

pub trait SpiConnector: Send + Sync {
    /// Sends a pacs.008 and resolves with the pacs.002 verdict. It may never resolve (a lost
    /// message): the caller bounds it with its time-out. Once the future is dropped, the
    /// connector must not write the message any more (the caller then asks its status, and a
    /// sweep may release its hold on "never received").
    fn send(&self, transfer: CreditTransfer) -> SpiFuture;

    /// Sends a pacs.004 (a refund of a Pix another institution paid) and resolves with its
    /// verdict, as [`SpiConnector::send`] does; its status is asked by its `return_id`.
    fn send_return(&self, payment_return: PaymentReturn) -> SpiFuture;

    /// Asks the SPI what became of the payment `end_to_end_id` (a status query, pacs.028): how a
    /// payment in flight when rtpay stopped learns its verdict without being sent twice. A
    /// connector answers [`Found::Unknown`] only for a payment the SPI has no trace of (rtpay may
    /// have stopped before sending it): rtpay then releases its hold.
    fn status(&self, end_to_end_id: &str) -> StatusFuture;
}

/// The sandbox's behaviour.
#[derive(Clone, Copy, Debug)]
pub struct SimulatorSettings {
    /// How long the simulated SPI takes to answer.
    pub latency: Duration,
    /// Percent of payments rejected (AC03), 0..=100.
    pub reject_percent: u8,
    /// Percent of payments never answered, 0..=100 (drawn before rejections).
    pub timeout_percent: u8,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        SimulatorSettings { latency: Duration::from_millis(50), reject_percent: 0, timeout_percent: 0 }
    }
}

/// The sandbox SPI: answers after `latency`, rejecting or losing the configured shares.
///
/// A payment's fate is a function of its EndToEndId, as a real SPI's record of it would be: a
/// status query gives the verdict the payment got (or would get), also after rtpay restarted, and
/// [`Found::Unknown`] for a payment it loses. The simulator keeps nothing, so it takes every
/// payment asked about as sent when its EndToEndId was made (the time the id carries), and
/// answers [`Found::InProcess`] until its latency has passed since then.
pub struct Simulator(pub SimulatorSettings);

impl Simulator {
    /// The payment's fate: `None` when it is lost (never answered).
    fn fate(&self, end_to_end_id: &str) -> Option<Status> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(end_to_end_id.as_bytes());
        let draw = (u32::from_be_bytes(digest[..4].try_into().expect("4 bytes")) % 100) as u8;
        let s = self.0;
        if draw < s.timeout_percent {
            None
        } else if draw < s.timeout_percent.saturating_add(s.reject_percent) {
            Some(Status::Rejected(RejectReason::InvalidCreditorAccount))
        } else {
            Some(Status::Accepted)
        }
    }
}

impl Simulator {
    /// The answer to a message of id `id` (a pacs.008's EndToEndId, a pacs.004's return id): its
    /// fate after the latency, or never.
    fn answer(&self, id: &str, amount: u64) -> SpiFuture {
        debug_assert!(amount > 0);
        let fate = self.fate(id);
        let latency = self.0.latency;
        Box::pin(async move {
            let Some(verdict) = fate else { return std::future::pending().await };
            tokio::time::sleep(latency).await;
            Ok(verdict)
        })
    }
}

impl SpiConnector for Simulator {
    fn send(&self, transfer: CreditTransfer) -> SpiFuture {
        self.answer(&transfer.end_to_end_id, transfer.amount)
    }

    fn send_return(&self, payment_return: PaymentReturn) -> SpiFuture {
        self.answer(&payment_return.return_id, payment_return.amount)
    }

    fn status(&self, end_to_end_id: &str) -> StatusFuture {
        let answered_at =
            pix::ids::end_to_end_time(end_to_end_id).map(|made| made.saturating_add(self.0.latency.as_nanos() as u64));
        let found = match self.fate(end_to_end_id) {
            None => Found::Unknown,
            Some(_) if answered_at.is_some_and(|at| store::now_nanos() < at) => Found::InProcess,
            Some(verdict) => Found::Settled(verdict),
        };
        Box::pin(async move { Ok(found) })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The fate follows the EndToEndId: a status query agrees with what sending gave, and the
    /// configured shares come out over many payments.
    #[tokio::test]
    async fn the_simulator_answers_a_status_query_with_the_verdict_sending_gave() {
        let sim = Simulator(SimulatorSettings { latency: Duration::ZERO, reject_percent: 30, timeout_percent: 20 });
        let (mut accepted, mut rejected, mut lost) = (0, 0, 0);
        for n in 0..1000u32 {
            let e2e = format!("E9999999920261205{n:015}");
            let transfer = CreditTransfer {
                end_to_end_id: e2e.clone(),
                amount: 1,
                debtor: party(),
                creditor: party(),
                remittance: None,
            };
            let asked = sim.status(&e2e).await.expect("the simulator always answers");
            // A lost payment is never answered: given up on here after a millisecond; the others
            // answer at once, given a second.
            let wait = Duration::from_millis(if asked == Found::Unknown { 1 } else { 1000 });
            let sent = tokio::time::timeout(wait, sim.send(transfer)).await;
            match (sent, asked) {
                (Ok(Ok(Status::Accepted)), Found::Settled(Status::Accepted)) => accepted += 1,
                (Ok(Ok(Status::Rejected(r))), Found::Settled(Status::Rejected(q))) if r == q => rejected += 1,
                (Err(_), Found::Unknown) => lost += 1,
                (sent, asked) => panic!("{e2e}: sent {sent:?}, asked {asked:?}"),
            }
        }
        assert!((440..=560).contains(&accepted), "{accepted} accepted of 1000 (50 %)");
        assert!((240..=360).contains(&rejected), "{rejected} rejected of 1000 (30 %)");
        assert!((140..=260).contains(&lost), "{lost} lost of 1000 (20 %)");
    }

    /// A party the SPI takes (for tests of the rail too).
    pub(crate) fn party() -> pix::spi::Party {
        pix::spi::Party {
            ispb: "60701190".into(),
            branch: "0001".into(),
            account: "123456".into(),
            account_type: "CACC".into(),
            document: String::new(),
            name: "X".into(),
        }
    }
}
