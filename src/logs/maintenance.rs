//! The maintenance worker: creates the daily log partitions ahead of time,
//! runs the retention cleanup every `ihub.cleanup_interval`, in small
//! batches so that it never holds long locks, and asks OAuth2 token
//! endpoints for new access tokens when they are due (`sync::oauth2`): it
//! sleeps until the next one is, and a commit that makes one due wakes it.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::runtime::backend::in_transaction;
use crate::runtime::registry::{self, Kind};
use crate::runtime::worker::{run, Worker};
use crate::settings;

/// Hourly: log partitions for today and the next two days.
const PARTITION_CHECK: Duration = Duration::from_secs(3600);
/// The first cleanup waits a little after a start, not to add to its load.
const FIRST_CLEANUP: Duration = Duration::from_secs(60);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_maintenance_main(_arg: pg_sys::Datum) {
    run::<Maintenance>();
}

struct Maintenance {
    started: Instant,
    last_partitions: Option<Instant>,
    last_cleanup: Option<Instant>,
    /// For token requests, which run between transactions.
    runtime: tokio::runtime::Runtime,
    tokens: pg_ihub_core::oauth2::TokenClient,
}

impl Worker for Maintenance {
    const KIND: Kind = Kind::Maintenance;
    const NEEDS: Option<&'static str> = Some("ihub._cleanup(integer)");
    // Dropping a partition needs a strong lock on its table: wait for it only
    // briefly, and try again next time rather than queue writers behind us.
    const SESSION: &'static [(&'static str, &'static str)] = &[("lock_timeout", "1s")];

    fn start() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("no tokio runtime: {e}"))?;
        Ok(Maintenance {
            started: Instant::now(),
            last_partitions: None,
            last_cleanup: None,
            runtime,
            tokens: crate::sync::oauth2::token_client(),
        })
    }

    fn reloaded(&mut self) {
        self.tokens = crate::sync::oauth2::token_client();
    }

    fn round(&mut self, _poll: Duration) -> Duration {
        let interval = Duration::from_secs(settings::CLEANUP_INTERVAL_S.get().max(60) as u64);
        if self.last_partitions.is_none_or(|t| t.elapsed() >= PARTITION_CHECK) {
            in_transaction("create log partitions", || Spi::run("SELECT ihub._ensure_log_partitions()"));
            self.last_partitions = Some(Instant::now());
        }
        let due = match self.last_cleanup {
            None => self.started.elapsed() >= FIRST_CLEANUP,
            Some(t) => t.elapsed() >= interval,
        };
        if due {
            registry::heartbeat(false);
            let removed = in_transaction("cleanup", || {
                Spi::get_one::<i64>("SELECT coalesce(sum(removed), 0)::bigint FROM ihub._cleanup()").ok().flatten()
            })
            .flatten();
            if let Some(n) = removed.filter(|n| *n > 0) {
                log!("pg_ihub cleanup removed {n} expired rows");
            }
            self.last_cleanup = Some(Instant::now());
        }
        // Token requests: a few batches of due credentials per round; the
        // rest are due at once next round.
        for _ in 0..5 {
            if crate::sync::oauth2::refresh_due(&self.runtime, &self.tokens) == 0 {
                break;
            }
            registry::heartbeat(false);
        }
        let next_token = crate::sync::oauth2::next_due().unwrap_or(Duration::MAX);
        let next_cleanup = match self.last_cleanup {
            None => FIRST_CLEANUP.saturating_sub(self.started.elapsed()),
            Some(t) => interval.saturating_sub(t.elapsed()),
        };
        // Half an hour at most: health calls a worker silent after an hour.
        // Idle again (the cleanup and token requests marked it busy), so
        // that a commit making a token due wakes it.
        registry::heartbeat(true);
        let sleep = next_cleanup.min(PARTITION_CHECK).min(Duration::from_secs(1800)).max(Duration::from_secs(1));
        // A token is asked for on time, not up to a second late; but a due
        // credential that another transaction holds locked (skipped above)
        // is looked at again only a little later, never in a tight loop.
        sleep.min(next_token.max(Duration::from_millis(250)))
    }
}
