//! The model: the values every layer passes around. Identities and keys, SAS tokens, link
//! addresses and the hub's message. Plain data and pure functions; no IO, no state.

pub mod address;
pub mod identity;
pub mod message;
pub mod sas;
pub mod time;
