//! Outbound: row changes captured in the writer's transaction
//! (`capture`), dispatchers that route, claim, send and settle deliveries
//! (`dispatcher`), and the helpers of `sql/outbound.sql` (`functions`).
//! Signing, retry decisions and HTTP are in `pg_ihub_core::outbound`.

pub mod capture;
pub mod ddl;
pub mod dispatcher;
pub mod functions;
pub mod test_connection;
