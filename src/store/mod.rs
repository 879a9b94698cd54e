//! Message storage: the queue interface and its in-memory implementation ([`queue`]), the
//! durable store on fjall ([`durable`]), the retained event log of the built-in endpoint
//! ([`log`]), and the identity registry's records ([`registry`]).

pub mod durable;
pub mod log;
pub mod queue;
pub mod registry;
