//! Outbound webhook logic that knows nothing of Postgres: signing, retry
//! policy, error classification, target checks, header masking and the HTTP
//! sender. Everything here is unit-tested with plain `#[test]`.

pub mod auth;
pub mod mask;
pub mod sender;
pub mod signature;
pub mod target;
