//! pg_ihub: an integration hub inside PostgreSQL.
//!
//! One folder per capability (`outbound`, `inbound`, `jobs`, `schedules`,
//! `logs`, `monitoring`, `sync`), each the Postgres glue of its `sql/<capability>.sql`;
//! `runtime` is what every background worker shares. What needs no Postgres
//! (signing, verification, retry policy, target checks, masking, HTTP, cron)
//! is the `pg_ihub_core` crate in `core/`.

use pgrx::prelude::*;

pub mod caller;
pub mod error;
pub mod inbound;
pub mod jobs;
pub mod logs;
pub mod monitoring;
pub mod outbound;
pub mod runtime;
pub mod schedules;
pub mod settings;
pub mod sync;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// Order: tables, then each capability's functions and views (views call
// Rust helpers, hence the requires), then comments on the Rust functions and
// all privileges.
pgrx::extension_sql_file!(
    "../sql/integrations.sql",
    name = "integrations",
    requires = ["bootstrap", outbound::functions::mask_settings]
);
pgrx::extension_sql_file!(
    "../sql/outbound.sql",
    name = "outbound",
    requires = [
        "integrations",
        outbound::functions::mask_settings,
        outbound::functions::mask_headers,
        outbound::functions::mask_endpoint_headers,
        outbound::functions::mask_attempt_headers,
        outbound::functions::mask_url,
        outbound::functions::join_url,
        outbound::functions::with_query,
        outbound::functions::default_timeout_ms,
        outbound::functions::public_key,
        runtime::registry::workers_sql,
        runtime::registry::pid_alive
    ]
);
pgrx::extension_sql_file!(
    "../sql/logs.sql",
    name = "logs",
    requires = ["outbound", outbound::functions::mask_settings, logs::mask_text, logs::log_min_level]
);
pgrx::extension_sql_file!(
    "../sql/jobs.sql",
    name = "jobs",
    requires = ["logs", outbound::functions::mask_settings, runtime::registry::workers_sql]
);
pgrx::extension_sql_file!(
    "../sql/schedules.sql",
    name = "schedules",
    requires = ["jobs", outbound::functions::mask_settings]
);
pgrx::extension_sql_file!(
    "../sql/monitoring.sql",
    name = "monitoring",
    requires = [
        "schedules",
        monitoring::histogram_add,
        monitoring::histogram,
        monitoring::preloaded,
        monitoring::expected_workers
    ]
);
pgrx::extension_sql_file!(
    "../sql/inbound.sql",
    name = "inbound",
    requires = [
        "monitoring",
        outbound::functions::mask_headers,
        inbound::verify_inbound,
        inbound::dedup_key,
        inbound::form_jsonb,
        runtime::registry::wake_processor,
        runtime::registry::sources_changed,
        inbound::processor::process_inbound
    ]
);
pgrx::extension_sql_file!(
    "../sql/mappers.sql",
    name = "mappers",
    requires = ["inbound", sync::mappers::mapper_matches]
);
pgrx::extension_sql_file!(
    "../sql/bindings.sql",
    name = "bindings",
    requires = ["mappers", sync::bindings::row_key, sync::syncing::echo_suppressed]
);
pgrx::extension_sql_file!("../sql/custom_fields.sql", name = "custom_fields", requires = ["bindings"]);
pgrx::extension_sql_file!(
    "../sql/oauth2.sql",
    name = "oauth2",
    requires = [
        "custom_fields",
        outbound::functions::mask_url,
        sync::oauth2::new_state,
        sync::oauth2::authorize_link,
        runtime::registry::wake_maintenance
    ]
);
pgrx::extension_sql_file!(
    "../sql/endpoint_controls.sql",
    name = "endpoint_controls",
    requires = ["oauth2", outbound::functions::normalize_circuit]
);
pgrx::extension_sql_file!("../sql/payloads.sql", name = "payloads", requires = ["endpoint_controls"]);
pgrx::extension_sql_file!("../sql/timers.sql", name = "timers", requires = ["payloads"]);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    settings::init(preloading);
    if preloading {
        runtime::registry::init_preloaded();
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
