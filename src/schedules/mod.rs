//! Scheduled actions and cronwatch. The scheduler worker sleeps until the
//! next schedule is due (or a change wakes it), then `ihub._schedule_tick()`
//! queues the due runs as jobs and `ihub._cronwatch_check()` looks for
//! schedules that stopped running. Cron expressions are five-field, in UTC.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use pgrx::prelude::*;

use crate::runtime::backend::in_transaction;
use crate::runtime::registry::Kind;
use crate::runtime::worker::{run, Worker};
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
    run::<Scheduler>();
}

struct Scheduler;

impl Worker for Scheduler {
    const KIND: Kind = Kind::Scheduler;
    const NEEDS: Option<&'static str> = Some("ihub._schedule_tick()");
    const SESSION: &'static [(&'static str, &'static str)] = &[("lock_timeout", "100ms")];

    fn start() -> Result<Self, String> {
        Ok(Scheduler)
    }

    fn round(&mut self, poll: Duration) -> Duration {
        // Each in its own transaction: an error in one never stops the other.
        let next_run = in_transaction("queue due runs", || seconds("SELECT ihub._schedule_tick()")).flatten();
        let next_check = in_transaction("cronwatch", || seconds("SELECT ihub._cronwatch_check()")).flatten();
        [next_run, next_check].into_iter().flatten().fold(poll, Duration::min)
    }
}

fn seconds(query: &str) -> Option<Duration> {
    let secs = Spi::get_one::<f64>(query).ok().flatten()?;
    // Wake a little after the due time rather than a little before it.
    Some(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)) + Duration::from_millis(5))
}
