//! A strict double-entry ledger as a pure state machine.
//!
//! Invariants this crate protects (and asserts):
//! - money is neither created nor destroyed: every transfer debits one account and credits another
//!   of the same tenant and currency by the same amount, so per tenant and currency Σ debits = Σ
//!   credits, posted and pending separately;
//! - no account ends a batch in violation of its flags;
//! - a pending transfer is posted, voided or expired at most once;
//! - an id's first outcome is final: a repeat gets it again, a different body is refused, and a
//!   failure that depended on state is remembered.
//!
//! It does no I/O, reads no clock and decides nothing at random: the caller prefetches state, passes
//! the time, and persists the [`Changes`]. (Its hash maps draw a random seed each, against keys
//! chosen to collide; nothing it returns depends on their order.)

mod currency;
mod machine;
mod memory;
pub mod time;
mod types;
pub mod verify;

pub use currency::{Currency, CurrencyError};
pub use machine::{
    apply_accounts, apply_transfers, expire_pending, validate_account, validate_event, AccountCommand, Changes, Clock,
    Outcome, Prefetch, State,
};
pub use memory::MemoryLedger;
pub use types::*;

/// The hash map the ledger keeps its state in, keyed by ids clients choose: `foldhash`, several
/// times faster than the standard library's SipHash on these 32-byte keys, with a per-map random
/// seed so that no set of ids is known in advance to collide.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
