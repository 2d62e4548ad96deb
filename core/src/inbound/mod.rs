//! Inbound webhooks without Postgres: signature verification, the
//! per-source rate limiter and the listener's bounds, used by the listener
//! worker and ihub.receive.

pub mod bounds;
pub mod form;
pub mod limiter;
pub mod verify;
