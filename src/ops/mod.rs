//! Operations: certificates, `edgehub check`, what `edgehub module-env` tells a user, and the
//! IoT Edge runtime's APIs (the workload API, the parent's device-scope API).

pub mod check;
pub mod connect;
pub mod device_scope;
pub mod proxy;
pub mod runtime;
pub mod tls;
pub mod workload;
pub mod x509;
