//! Monitoring: the Rust helpers of `sql/monitoring.sql` (latency
//! histograms, which workers this database should have, health thresholds).

use pgrx::prelude::*;

use crate::settings;

/// The histogram (counts per `ihub._latency_bounds()` bucket) of durations.
#[pg_extern(name = "_histogram", immutable, parallel_safe)]
fn histogram(durations_ms: Vec<Option<f64>>) -> Vec<i64> {
    const BOUNDS: [f64; 15] =
        [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0];
    let mut counts = vec![0i64; BOUNDS.len() + 1];
    for d in durations_ms.into_iter().flatten() {
        counts[BOUNDS.iter().position(|b| d <= *b).unwrap_or(BOUNDS.len())] += 1;
    }
    counts
}

/// Element-wise sum of two histograms (the state function of ihub._histogram_sum).
#[pg_extern(name = "_histogram_add", immutable, parallel_safe)]
fn histogram_add(a: Option<Vec<Option<i64>>>, b: Option<Vec<Option<i64>>>) -> Option<Vec<i64>> {
    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
    let len = a.len().max(b.len());
    if len == 0 {
        return None;
    }
    Some(
        (0..len).map(|i| a.get(i).copied().flatten().unwrap_or(0) + b.get(i).copied().flatten().unwrap_or(0)).collect(),
    )
}

#[pg_extern(name = "_preloaded", stable)]
fn preloaded() -> bool {
    crate::runtime::registry::preloaded()
}

/// The background workers this database should have, and after how long
/// without a heartbeat one counts as stale.
#[pg_extern(name = "_expected_workers", stable)]
fn expected_workers(
) -> TableIterator<'static, (name!(kind, String), name!(expected, i64), name!(stale_after, pgrx::datum::Interval))> {
    let poll_ms = settings::POLL_INTERVAL_MS.get() as i64;
    // A heartbeat comes at least every poll interval; jobs and cleanup can
    // keep a worker busy longer, hence the generous margin.
    let stale = |ms: i64| pgrx::datum::Interval::new(0, 0, (ms * 1000).max(60_000_000)).expect("an interval");
    let rows = vec![
        ("dispatcher".to_string(), settings::DISPATCH_WORKERS.get() as i64, stale(poll_ms * 3)),
        ("job worker".to_string(), settings::JOB_WORKERS.get() as i64, stale(settings::JOB_TIMEOUT_MS.get() as i64)),
        ("scheduler".to_string(), 1, stale(poll_ms * 3)),
        ("maintenance".to_string(), 1, stale(3_600_000)),
        (
            "processor".to_string(),
            settings::INBOUND_PROCESSORS.get() as i64,
            stale(settings::JOB_TIMEOUT_MS.get() as i64),
        ),
    ];
    // The listener serves the first database listed, if it listens at all.
    let mut rows = rows;
    let current = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) };
    if !settings::listen_address().is_empty()
        && settings::databases().first().map(String::as_str) == Some(&*current.to_string_lossy())
    {
        rows.push(("listener".to_string(), 1, stale(poll_ms * 3 + 60_000)));
    }
    TableIterator::new(rows)
}

#[pg_extern(name = "_health_queue_age", stable)]
fn health_queue_age() -> pgrx::datum::Interval {
    pgrx::datum::Interval::new(0, 0, settings::HEALTH_QUEUE_AGE_S.get() as i64 * 1_000_000).expect("an interval")
}

#[pg_extern(name = "_health_queue_depth", stable)]
fn health_queue_depth() -> i64 {
    settings::HEALTH_QUEUE_DEPTH.get() as i64
}
