//! Operations: certificates and `edgehub check`.

pub mod check;
pub mod proxy;
pub mod tls;
pub mod x509;
