//! The maintenance worker: creates the daily log partitions ahead of time
//! and runs the retention cleanup every `ihub.cleanup_interval`, in small
//! batches so that it never holds long locks.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::runtime::backend::{in_transaction, set_session, shutdown_requested, wait};
use crate::runtime::registry as workers;
use crate::settings;

/// Hourly: log partitions for today and the next two days.
const PARTITION_CHECK: Duration = Duration::from_secs(3600);
/// The first cleanup waits a little after a start, not to add to its load.
const FIRST_CLEANUP: Duration = Duration::from_secs(60);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_maintenance_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    workers::register(workers::Kind::Maintenance);
    // Dropping a partition needs a strong lock on its table: wait for it only
    // briefly, and try again next time rather than queue writers behind us.
    set_session("lock_timeout", "1s");
    log!("pg_ihub maintenance worker started for database \"{database}\"");

    let started = Instant::now();
    let mut last_partitions: Option<Instant> = None;
    let mut last_cleanup: Option<Instant> = None;
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        workers::heartbeat(true);
        let ready = in_transaction(|| {
            Spi::get_one::<bool>("SELECT pg_catalog.to_regprocedure('ihub._cleanup(integer)') IS NOT NULL")
                .ok()
                .flatten()
        })
        .flatten()
        .unwrap_or(false);
        let interval = Duration::from_secs(settings::CLEANUP_INTERVAL_S.get().max(60) as u64);
        if ready {
            if last_partitions.is_none_or(|t| t.elapsed() >= PARTITION_CHECK) {
                in_transaction(|| Spi::run("SELECT ihub._ensure_log_partitions()"));
                last_partitions = Some(Instant::now());
            }
            let due = match last_cleanup {
                None => started.elapsed() >= FIRST_CLEANUP,
                Some(t) => t.elapsed() >= interval,
            };
            if due {
                workers::heartbeat(false);
                let removed = in_transaction(|| {
                    Spi::get_one::<i64>("SELECT coalesce(sum(removed), 0)::bigint FROM ihub._cleanup()").ok().flatten()
                })
                .flatten();
                if let Some(n) = removed.filter(|n| *n > 0) {
                    log!("pg_ihub cleanup removed {n} expired rows");
                }
                last_cleanup = Some(Instant::now());
            }
        }
        let next_cleanup = match last_cleanup {
            None => FIRST_CLEANUP.saturating_sub(started.elapsed()),
            Some(t) => interval.saturating_sub(t.elapsed()),
        };
        // Half an hour at most: health calls a worker silent after an hour.
        wait(next_cleanup.min(PARTITION_CHECK).min(Duration::from_secs(1800)).max(Duration::from_secs(1)));
    }
    workers::unregister();
    unsafe { pg_sys::proc_exit(1) };
}
