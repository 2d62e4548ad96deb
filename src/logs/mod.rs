//! Logs: the Rust helpers of `sql/logs.sql`, and the maintenance worker that
//! keeps log partitions ahead and applies retention to every kind of record.

use pgrx::prelude::*;

use crate::settings;
use pg_ihub_core::outbound::mask;

pub mod maintenance;

/// A log message with credentials masked.
#[pg_extern(name = "_mask_text", immutable, parallel_safe)]
fn mask_text(text: &str) -> String {
    mask::mask_text(text)
}

/// `ihub.log_min_level`: entries below it are dropped unless their
/// integration says otherwise.
#[pg_extern(name = "_log_min_level", stable)]
fn log_min_level() -> String {
    let level = crate::settings::string_setting(&settings::LOG_MIN_LEVEL);
    match level.as_str() {
        "debug" | "info" | "warning" | "error" | "critical" => level,
        _ => "info".into(),
    }
}
