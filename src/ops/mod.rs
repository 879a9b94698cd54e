//! Operations: certificates and `edgehub check`.

pub mod check;
pub mod tls;
