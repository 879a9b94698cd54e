//! edgehub: an IoT Edge hub. Modules and leaf devices connect with the Azure IoT device SDKs
//! over AMQP 1.0 or MQTT 3.1.1; the hub authenticates them with SAS tokens, routes their
//! messages to each other with edgeHub's route language, and exposes Prometheus metrics.
//!
//! # Layout
//!
//! Layers, top to bottom; a module imports only modules below it (`tests/layering.rs` checks
//! it, so no import cycle between these modules can come back):
//!
//! * [`app`]: builds the core from the settings, starts every transport and stops them. The
//!   only module that imports both the core and the servers.
//! * [`servers`]: the transports, adapters that turn frames into core calls and back:
//!   [`servers::amqp`] (listener, connections, link tasks, the frame guard, `$cbs`),
//!   [`servers::mqtt`] (MQTT 3.1.1 listener and sessions; pure topic and property-bag parsing
//!   inside), [`servers::http`] (metrics endpoint and the HTTPS API), [`servers::ws`] (AMQP
//!   over WebSockets on the HTTPS listener), [`servers::upstream`] (the connection to a parent
//!   hub or IoT Hub, directly or over WebSockets through a proxy).
//! * [`ops`]: certificates ([`ops::tls`]), client-certificate authentication
//!   ([`ops::x509`]), an HTTP proxy's tunnel ([`ops::proxy`]) and `edgehub check`
//!   ([`ops::check`]).
//! * [`core`]: the hub, independent of any transport: [`core::HubCore`], [`core::auth`],
//!   [`core::ingest`] (route + enqueue), [`core::delivery`] (the one windowed pump from an
//!   endpoint to a peer), [`core::twins`], [`core::twin_requests`] (a client's twin GET or
//!   reported PATCH, for every transport), [`core::methods`], [`core::outbox`]. The core
//!   imports no server.
//! * [`config`]: JSON config and environment → validated settings (reads the config file;
//!   otherwise pure).
//! * [`routing`]: route statements, the condition language, the router and its endpoints (pure).
//! * [`store`]: the queue interface and its in-memory queue ([`store::queue`]), the durable
//!   store on fjall ([`store::durable`], which does file IO on its own threads).
//! * [`metrics`]: metric names and recorders.
//! * [`model`]: identities and keys, SAS tokens, link addresses, the hub's message and its AMQP
//!   mapping (fe2o3 types are the message's sections), time formatting, configured certificate
//!   identities (pure).
//!
//! `client` (feature `client`, for the tests and benchmarks) is a small AMQP client.
//!
//! `docs/ARCHITECTURE.md` shows the tasks, channels and the path of a message.

pub mod app;
#[cfg(feature = "client")]
pub mod client;
pub mod config;
pub mod core;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod routing;
pub mod servers;
pub mod store;

pub use app::Hub;
