//! pg_ihub: an integration hub inside PostgreSQL.
//!
//! Layout: `outbound` is pure Rust (signing, retries, HTTP); `capture`,
//! `dispatch`, `workers` and `api` are the Postgres glue; the schema and the
//! public SQL API are in `sql/`.

use pgrx::prelude::*;

pub mod api;
pub mod bgw;
pub mod caller;
pub mod capture;
pub mod dispatch;
pub mod error;
pub mod inbound;
pub mod jobs;
pub mod listener;
pub mod maintenance;
pub mod outbound;
pub mod processor;
pub mod schedule;
pub mod settings;
pub mod user_code;
pub mod workers;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// Order: tables, then each capability's functions and views (views call
// Rust helpers, hence the requires), then comments on the Rust functions and
// all privileges.
pgrx::extension_sql_file!(
    "../sql/outbound.sql",
    name = "outbound",
    requires = [
        "bootstrap",
        api::mask_settings,
        api::mask_headers,
        api::mask_endpoint_headers,
        api::mask_attempt_headers,
        api::mask_url,
        api::default_timeout_ms,
        workers::workers_sql,
        workers::pid_alive
    ]
);
pgrx::extension_sql_file!(
    "../sql/logs.sql",
    name = "logs",
    requires = ["outbound", api::mask_settings, api::mask_text, api::log_min_level]
);
pgrx::extension_sql_file!(
    "../sql/jobs.sql",
    name = "jobs",
    requires = ["logs", api::mask_settings, workers::workers_sql]
);
pgrx::extension_sql_file!("../sql/schedules.sql", name = "schedules", requires = ["jobs", api::mask_settings]);
pgrx::extension_sql_file!(
    "../sql/monitoring.sql",
    name = "monitoring",
    requires = ["schedules", api::histogram_add, api::histogram, api::preloaded, api::expected_workers]
);
pgrx::extension_sql_file!(
    "../sql/inbound.sql",
    name = "inbound",
    requires = [
        "monitoring",
        api::mask_headers,
        api::verify_inbound,
        workers::wake_processor,
        workers::sources_changed,
        processor::process_inbound
    ]
);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    settings::init(preloading);
    if preloading {
        workers::init_preloaded();
    }
}

#[cfg(feature = "pg_test")]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_ihub'",
            "ihub.databases = 'pgrx_tests'",
            "ihub.allow_private_hosts = '127.0.0.0/8, ::1, localhost'",
            "ihub.listen_address = ''",
        ]
    }
}
