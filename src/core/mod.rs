//! The hub's core, independent of any transport: authentication, twins and direct methods.

pub mod auth;
pub mod methods;
pub mod twins;
