//! edgehub: an IoT Edge hub. Modules and leaf devices connect with the Azure IoT device SDKs
//! over AMQP 1.0 or MQTT 3.1.1; the hub authenticates them with SAS tokens, routes their messages to each
//! other with edgeHub's route language, and exposes Prometheus metrics.
//!
//! # Layout
//!
//! * Pure core, no IO: [`identity`] (ids, keys, connection strings), [`sas`] (tokens),
//!   [`address`] (link addresses), [`route`] (route statements), [`config`] (settings),
//!   [`message`] (the hub's message and its AMQP mapping), [`router`] (route evaluation),
//!   [`queue`] (endpoint queues behind the store interface).
//! * IO: [`amqp`] (listener, connections, links), [`mqtt`] (listener, sessions; pure topic and
//!   property-bag parsing inside), [`http`] (metrics endpoint), [`tls`]
//!   (certificates), [`hub`] (start-up and shutdown), [`upstream`] (the connection to a
//!   parent hub or IoT Hub).
//!
//! `docs/ARCHITECTURE.md` shows the tasks, channels and the path of a message.

pub mod address;
pub mod amqp;
pub mod api;
pub mod auth;
pub mod check;
pub mod client;
pub mod condition;
pub mod config;
pub mod http;
pub mod hub;
pub mod identity;
pub mod message;
pub mod methods;
pub mod metrics;
pub mod mqtt;
pub(crate) mod ops;
pub mod queue;
pub mod route;
pub mod router;
pub mod sas;
pub mod store;
pub mod tls;
pub mod twins;
pub mod upstream;

pub use hub::Hub;
