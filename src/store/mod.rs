//! Message storage: the queue interface and its in-memory implementation ([`queue`]), and the
//! durable store on fjall ([`durable`]), and the retained event log of the built-in endpoint
//! ([`log`]).

pub mod durable;
pub mod log;
pub mod queue;
