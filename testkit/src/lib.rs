//! Test kit for pg_ihub: a webhook receiver on loopback that verifies
//! Standard Webhooks signatures and can answer, stall or hang up on demand,
//! a small CRM with OAuth2, paginated contacts and signed webhooks (the
//! two-way sync's other side), and helpers to reach and restart the test cluster.

pub mod cluster;
pub mod crm;
pub mod receiver;
pub mod verify;
