//! Message storage: the queue interface and its in-memory implementation ([`queue`]), and the
//! durable store on fjall ([`durable`]).

pub mod durable;
pub mod queue;
