//! The worker runtime: the registry of background workers in shared memory
//! (`registry`), what a worker backend does with Postgres (`backend`), and
//! the one place that runs user code as the role that asked (`user_code`).

pub mod backend;
pub mod registry;
pub mod user_code;
pub mod worker;
