//! The card domain, free of I/O: card numbers, CVV, the lifecycle, the ISO 8583 wire format and
//! the authorization decision. The server feeds it what storage and the ledger know; it answers.

pub mod authorize;
pub mod cvv;
pub mod iso8583;
pub mod lifecycle;
pub mod pan;

pub use authorize::{advice_approved, credits_cardholder, decide, Decision, Limits, Request, ResponseCode, Spent};
pub use lifecycle::{Action, CardStatus};
