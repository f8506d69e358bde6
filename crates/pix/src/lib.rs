//! The Pix domain, free of I/O: what a key, a BR Code, a txid, an EndToEndId and an amount may be,
//! the DICT anti-scanning bucket and the transaction limits. The server feeds it time, randomness
//! and what storage knows; every money movement it decides on is a ledger transfer made elsewhere.
//!
//! Rules come from `shared/spec/SOURCES.md` (BR Code layout, identifiers, DICT, limits) and
//! `shared/spec/pix-api/openapi.yaml` (API Pix formats); each module cites its own.

pub mod amount;
pub mod brcode;
pub mod charge;
pub mod dict;
pub mod document;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod spi;

pub use keys::{KeyError, KeyType, PixKey};
