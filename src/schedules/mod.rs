//! Scheduled actions and cronwatch. The scheduler worker sleeps until the
//! next schedule is due (or a change wakes it), then `ihub._schedule_tick()`
//! queues the due runs as jobs and `ihub._cronwatch_check()` looks for
//! schedules that stopped running. Cron expressions are five-field, in UTC.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::runtime::backend::{in_transaction, set_session, shutdown_requested, wait};
use crate::runtime::registry as workers;
use crate::settings;
use pg_ihub_core::cron::{last_at_or_before, next_after, parse_cron};

fn to_chrono(ts: pgrx::datum::TimestampWithTimeZone) -> Option<DateTime<Utc>> {
    // Postgres counts microseconds from 2000-01-01.
    let micros: i64 = ts.into_inner();
    Utc.timestamp_micros(micros + 946_684_800_000_000).single()
}

fn from_chrono(t: DateTime<Utc>) -> Option<pgrx::datum::TimestampWithTimeZone> {
    pgrx::datum::TimestampWithTimeZone::try_from(t.timestamp_micros() - 946_684_800_000_000).ok()
}

fn raise_cron(expr: &str, problem: String) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("invalid cron expression \"{expr}\": {problem}"),
        "pg_ihub",
    )
    .set_hint("Use five fields, minute hour day-of-month month day-of-week, in UTC: '*/15 * * * *', '0 3 * * 1-5', or @hourly, @daily.")
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// The first time strictly after `after` that matches `expr`.
#[pg_extern(name = "_cron_next", immutable, parallel_safe)]
fn cron_next(expr: &str, after: pgrx::datum::TimestampWithTimeZone) -> Option<pgrx::datum::TimestampWithTimeZone> {
    let cron = parse_cron(expr).unwrap_or_else(|e| raise_cron(expr, e));
    next_after(&cron, to_chrono(after)?).and_then(from_chrono)
}

/// The last time at or before `before` that matches `expr`.
#[pg_extern(name = "_cron_prev", immutable, parallel_safe)]
fn cron_prev(expr: &str, before: pgrx::datum::TimestampWithTimeZone) -> Option<pgrx::datum::TimestampWithTimeZone> {
    let cron = parse_cron(expr).unwrap_or_else(|e| raise_cron(expr, e));
    last_at_or_before(&cron, to_chrono(before)?).and_then(from_chrono)
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_scheduler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    workers::register(workers::Kind::Scheduler);
    set_session("lock_timeout", "100ms");
    log!("pg_ihub scheduler started for database \"{database}\"");

    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        workers::heartbeat(true);
        let poll = Duration::from_millis(settings::POLL_INTERVAL_MS.get() as u64);
        let ready = in_transaction(|| {
            Spi::get_one::<bool>("SELECT pg_catalog.to_regprocedure('ihub._schedule_tick()') IS NOT NULL")
                .ok()
                .flatten()
        })
        .flatten()
        .unwrap_or(false);
        if !ready {
            wait(poll);
            continue;
        }
        // Each in its own transaction: an error in one never stops the other.
        let next_run = in_transaction(|| seconds("SELECT ihub._schedule_tick()")).flatten();
        let next_check = in_transaction(|| seconds("SELECT ihub._cronwatch_check()")).flatten();
        let sleep = [next_run, next_check].into_iter().flatten().fold(poll, Duration::min);
        wait(sleep);
    }
    workers::unregister();
    unsafe { pg_sys::proc_exit(1) };
}

fn seconds(query: &str) -> Option<Duration> {
    let secs = Spi::get_one::<f64>(query).ok().flatten()?;
    // Wake a little after the due time rather than a little before it.
    Some(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)) + Duration::from_millis(5))
}
