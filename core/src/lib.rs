//! What pg_ihub does that needs no Postgres: signing and verification,
//! retry policy and error classification, target (SSRF) checks, masking,
//! the HTTP sender, OAuth2 token requests, the inbound rate limiter and cron. No pgrx here: every
//! module is unit-tested with plain `cargo test -p pg_ihub_core`.

pub mod cron;
pub mod inbound;
pub mod oauth2;
pub mod outbound;
pub mod retry;
