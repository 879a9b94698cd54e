//! The transports: adapters that turn frames into core calls and core events into frames.

pub mod amqp;
pub mod http;
pub mod mqtt;
pub mod upstream;
pub mod ws;
