//! The one loop every background worker runs. A worker kind says what it
//! needs and what one round of its work is (`Worker`); `run` does the rest:
//! signals, connecting, the registry slot and its heartbeat, pg_stat_activity,
//! configuration reloads, waiting for the extension, labelled errors and a
//! capped back-off while rounds keep failing, and the exit that makes the
//! postmaster start the worker again.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::runtime::backend::{self, in_transaction, set_session, shutdown_requested};
use crate::runtime::registry::{self, Kind};
use crate::settings;

extern "C-unwind" {
    /// Postgres's own SIGTERM handler for backends (pgrx wraps `pg_sys::die`
    /// as a Rust function, which a signal handler cannot be).
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// The first back-off after a failed round; it doubles while rounds keep
/// failing (a dropped table, a full disk) up to `MAX_BACKOFF`, so that a
/// broken database is retried without flooding the log.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One kind of background worker.
pub trait Worker: Sized {
    const KIND: Kind;
    /// A function of the extension this worker calls: until it exists
    /// (before CREATE EXTENSION, after DROP EXTENSION, or in an older
    /// version) the worker waits.
    const NEEDS: Option<&'static str>;
    /// SIGTERM stops the worker at once, as in a backend, even inside user
    /// code (job workers, processors): the transaction rolls back and the
    /// item is rescued. Otherwise the current round finishes first.
    const STOP_AT_ONCE: bool = false;
    /// Session settings of the worker's connection.
    const SESSION: &'static [(&'static str, &'static str)] = &[];

    /// Sets the worker up once connected; an error (an address in use, say)
    /// is retried by a restart a minute later.
    fn start() -> Result<Self, String>;
    /// The configuration file was reloaded.
    fn reloaded(&mut self) {}
    /// One round of work. Returns how long the worker may sleep before the
    /// next; commits that queue work and signals wake it sooner.
    fn round(&mut self, poll: Duration) -> Duration;
    /// Sleeps until woken or `timeout` (the listener also wakes for its socket).
    fn sleep(&mut self, timeout: Duration) {
        backend::wait(timeout);
    }
    /// The worker is stopping (SIGTERM or DROP EXTENSION is not a reason:
    /// only shutdown and termination are).
    fn stop(&mut self) {}
}

/// Runs a worker until it is asked to stop. Never returns.
pub fn run<W: Worker>() -> ! {
    if W::STOP_AT_ONCE {
        BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
        unsafe { pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die)) };
    } else {
        BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    }
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    registry::register(W::KIND);
    for (name, value) in W::SESSION {
        set_session(name, value);
    }
    let label = backend::worker_label();
    let mut worker = match W::start() {
        Ok(worker) => worker,
        Err(e) => {
            warning!("{label}: {e}; trying again in a minute");
            restart_later();
        }
    };
    log!("{label} started for database \"{database}\"");

    let mut ready = false;
    let mut backoff = Duration::ZERO;
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            worker.reloaded();
        }
        registry::heartbeat(true);
        let poll = Duration::from_millis(settings::POLL_INTERVAL_MS.get() as u64);
        if !ready {
            ready = W::NEEDS.is_none_or(|function| {
                in_transaction("look for the extension", || extension_has(function)).unwrap_or(false)
            });
            if !ready {
                worker.sleep(poll);
                continue;
            }
        }
        let failed_before = backend::failed_steps();
        let sleep = worker.round(poll);
        if backend::failed_steps() == failed_before {
            backoff = Duration::ZERO;
            if sleep.is_zero() {
                // More work waits: no sleep, but a termination still stops us.
                pg_sys::check_for_interrupts!();
            } else {
                worker.sleep(sleep);
            }
        } else {
            // The failure was logged by the step. The extension may be gone
            // (DROP EXTENSION): look again before the next round.
            ready = false;
            backoff = (backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
            // Idle while it waits, so that commits wake another worker.
            registry::heartbeat(true);
            worker.sleep(backoff);
        }
    }
    worker.stop();
    registry::unregister();
    log!("{label} for database \"{database}\" stopping");
    // Exit code 1 makes the postmaster start the worker again after a
    // pg_terminate_backend; at server shutdown no restart happens anyway.
    unsafe { pg_sys::proc_exit(1) }
}

fn extension_has(function: &str) -> bool {
    Spi::get_one_with_args::<bool>("SELECT pg_catalog.to_regprocedure($1) IS NOT NULL", &[function.into()])
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Waits a minute (or until asked to stop), then exits so that the
/// postmaster starts the worker again: an address in use may be free by
/// then, and a corrected setting applies. Exit code 0 would mean "never
/// restart".
fn restart_later() -> ! {
    let started = std::time::Instant::now();
    while !shutdown_requested() && started.elapsed() < Duration::from_secs(60) {
        registry::heartbeat(true);
        backend::wait(Duration::from_secs(10));
    }
    unsafe { pg_sys::proc_exit(1) }
}
