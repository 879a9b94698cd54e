//! Routing: route statements, the condition language and the router that evaluates them and
//! owns the endpoints. Pure: no IO beyond the queues the endpoints wrap.

pub mod condition;
pub mod route;
pub mod router;
pub mod view;
