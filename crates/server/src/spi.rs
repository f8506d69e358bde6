//! The SPI connector: how a payment to another institution leaves rtpay and how its verdict comes
//! back. The built-in connector is a sandbox simulator (latency, rejection and time-out rates are
//! configured); a production connector to the RSFN speaks the same [`SpiConnector`] trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pix::spi::{CreditTransfer, RejectReason, Status};

/// What a connector may fail with besides a verdict (the caller treats it as a time-out).
#[derive(Debug)]
pub struct SpiError(pub String);

pub type SpiFuture = Pin<Box<dyn Future<Output = Result<Status, SpiError>> + Send>>;

pub trait SpiConnector: Send + Sync {
    /// Sends a pacs.008 and resolves with the pacs.002 verdict. It may never resolve (a lost
    /// message): the caller bounds it with its time-out.
    fn send(&self, transfer: CreditTransfer) -> SpiFuture;
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
pub struct Simulator(pub SimulatorSettings);

impl SpiConnector for Simulator {
    fn send(&self, transfer: CreditTransfer) -> SpiFuture {
        let s = self.0;
        // One draw in 0..100 per payment decides its fate.
        let draw = (u32::from_be_bytes(crate::auth::random_32()[..4].try_into().expect("4 bytes")) % 100) as u8;
        Box::pin(async move {
            debug_assert!(transfer.amount > 0);
            if draw < s.timeout_percent {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(s.latency).await;
            if draw < s.timeout_percent.saturating_add(s.reject_percent) {
                Ok(Status::Rejected(RejectReason::InvalidCreditorAccount))
            } else {
                Ok(Status::Accepted)
            }
        })
    }
}
