//! Test kit for pg_ihub: a webhook receiver on loopback that verifies
//! Standard Webhooks signatures and can answer, stall or hang up on demand,
//! and helpers to reach and restart the test cluster.

pub mod cluster;
pub mod receiver;
pub mod verify;
