//! Outbound webhook logic that knows nothing of Postgres: signing, retry
//! policy, circuit breaker policy, error classification, target checks, header masking, the HTTP
//! sender and when a dispatcher gathers commits. Everything here is unit-tested with plain `#[test]`.

pub mod auth;
pub mod circuit;
pub mod gather;
pub mod mask;
pub mod request_url;
pub mod sender;
pub mod signature;
pub mod target;
