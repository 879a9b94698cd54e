//! edgehub: an IoT Edge hub. Modules and leaf devices connect with the Azure IoT device SDKs
//! over AMQP 1.0; the hub authenticates them with SAS tokens, routes their messages to each
//! other with edgeHub's route language, and exposes Prometheus metrics.
//!
//! # Layout
//!
//! * Pure core, no IO: [`identity`] (ids, keys, connection strings), [`sas`] (tokens),
//!   [`address`] (link addresses), [`route`] (route statements), [`config`] (settings),
//!   [`message`] (the hub's message and its AMQP mapping), [`router`] (route evaluation),
//!   [`queue`] (endpoint queues behind the store interface).
//! * IO: [`amqp`] (listener, connections, links), [`http`] (metrics endpoint), [`tls`]
//!   (certificates), [`hub`] (start-up and shutdown), [`upstream`] (the connection to a
//!   parent hub or IoT Hub).
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
