//! Operations: certificates, `edgehub check`, and what `edgehub module-env` tells a user.

pub mod check;
pub mod connect;
pub mod proxy;
pub mod tls;
pub mod x509;
