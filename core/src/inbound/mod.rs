//! Inbound webhooks without Postgres: signature verification and the
//! per-source rate limiter, used by the listener worker and ihub.receive.

pub mod limiter;
pub mod verify;
