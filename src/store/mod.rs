//! Message storage: the queue interface and its in-memory implementation ([`queue`]), the
//! durable store on fjall ([`durable`]), and the identity registry's records ([`registry`]).

pub mod durable;
pub mod queue;
pub mod registry;
