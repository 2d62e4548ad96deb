//! The dispatcher background worker: claim a batch, send it, settle it.
//! SQL does the queue work (`ihub._claim`, `ihub._settle`, `ihub._rescue`);
//! `outbound` does the HTTP and the retry decisions. SPI stays on this
//! thread; HTTP runs on a single-threaded tokio runtime between transactions.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::runtime::backend::{in_transaction, set_session, shutdown_requested, wait};
use crate::runtime::{backend as bgw, registry as workers};
use crate::settings;
use pg_ihub_core::outbound::auth::Auth;
use pg_ihub_core::outbound::retry::{category, classify, decide, Next, RetryPolicy, Verdict};
use pg_ihub_core::outbound::sender::{headers_from_json, Attempt, Request, Sender};
use pg_ihub_core::outbound::target::AllowList;

/// A claimed delivery: the request plus what deciding its fate needs.
struct Claimed {
    request: Request,
    policy: RetryPolicy,
    attempts_used: u32,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_dispatcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    workers::register(workers::Kind::Dispatcher);
    // DDL (DROP EXTENSION, ALTER TABLE on a subscribed table) must never wait
    // behind a dispatcher: the dispatcher gives up and tries again later.
    set_session("lock_timeout", "100ms");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime builds");
    let mut sender = new_sender();
    let pid = unsafe { pg_sys::MyProcPid };
    let mut last_rescue: Option<Instant> = None;
    let mut last_maintenance = Instant::now();

    log!("pg_ihub dispatcher started for database \"{database}\"");
    // Attempts of the last batch, settled in the same transaction as the next
    // claim: one commit per batch instead of two.
    let mut unsettled: Option<Value> = None;
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            sender = new_sender();
        }
        workers::heartbeat(true);
        let poll = Duration::from_millis(settings::POLL_INTERVAL_MS.get() as u64);
        let batch_size = settings::BATCH_SIZE.get();
        // Deliveries whose worker died (or whose lease ran out) go back to the
        // queue; checked at the poll cadence, and at once after a start.
        let rescue_now = last_rescue.is_none_or(|t| t.elapsed() >= poll);
        let started = Instant::now();
        let results = unsettled.take();
        let concurrency = sender.concurrency();
        let round = in_transaction(|| next_round(pid, batch_size, concurrency, results.as_ref(), rescue_now));
        if rescue_now {
            last_rescue = Some(Instant::now());
        }
        let round = match round {
            Some(Some(round)) => round,
            // The extension is not (or no longer) installed here.
            Some(None) => {
                wait(poll);
                continue;
            }
            // The round failed and was rolled back (logged). Settle alone, once
            // more; if that fails too the leases run out and the deliveries are
            // sent again, with the same webhook-id.
            None => {
                if let Some(results) = results {
                    in_transaction(|| settle(pid, &results));
                }
                wait(Duration::from_millis(100).min(poll));
                continue;
            }
        };
        // Between bursts, vacuum capture tables full of routed (deleted) or
        // rolled-back rows, which every route would otherwise scan again;
        // after sending, so that no claimed delivery waits for it.
        let between_bursts = (round.claimed.len() as i32) < batch_size;
        let mut vacuum_if_due = || {
            if between_bursts && last_maintenance.elapsed() >= Duration::from_secs(1) {
                vacuum_capture_tables();
                last_maintenance = Instant::now();
            }
        };
        if round.claimed.is_empty() {
            vacuum_if_due();
            wait(round.next_due.map_or(poll, |d| d.min(poll)));
            continue;
        }
        workers::heartbeat(false);
        if round.claimed.len() as i32 >= batch_size {
            workers::wake_peer(workers::Kind::Dispatcher);
        }
        let claimed_at = Instant::now();
        let requests = round.claimed.iter().map(|c| c.request.clone()).collect();
        bgw::report_activity(Some(&format!("dispatching {} deliveries", round.claimed.len())));
        let attempts = runtime.block_on(sender.send_all(requests, shutdown_requested));
        bgw::report_activity(None);
        debug1!(
            "pg_ihub dispatcher: {} deliveries: settle and claim {:.1} ms, send {:.1} ms",
            round.claimed.len(),
            (claimed_at - started).as_secs_f64() * 1000.0,
            claimed_at.elapsed().as_secs_f64() * 1000.0
        );
        unsettled = Some(decide_all(&round.claimed, attempts));
        vacuum_if_due();
    }
    if let Some(results) = unsettled {
        in_transaction(|| settle(pid, &results));
    }
    workers::unregister();
    log!("pg_ihub dispatcher for database \"{database}\" stopping");
    // Exit code 1 makes the postmaster start us again after a
    // pg_terminate_backend; at server shutdown no restart happens anyway.
    unsafe { pg_sys::proc_exit(1) };
}

/// Reserves up to `wanted` file descriptors from Postgres for sockets, so
/// that the server's own file handling (which counts descriptors) is not
/// starved. Returns how many were granted.
fn reserve_sockets(wanted: usize) -> usize {
    static RESERVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut have = RESERVED.load(std::sync::atomic::Ordering::Relaxed);
    while have < wanted && unsafe { pg_sys::AcquireExternalFD() } {
        have += 1;
    }
    RESERVED.store(have, std::sync::atomic::Ordering::Relaxed);
    have
}

fn new_sender() -> Sender {
    let allow = AllowList::parse(&settings::allow_private_hosts()).unwrap_or_else(|e| {
        warning!("pg_ihub: ignoring invalid ihub.allow_private_hosts: {e}");
        AllowList::default()
    });
    let limit = settings::RESPONSE_BODY_LIMIT.get().max(0) as usize;
    let wanted = settings::MAX_CONCURRENCY.get().max(1) as usize;
    let granted = reserve_sockets(wanted);
    if granted < wanted {
        warning!("pg_ihub: only {granted} of ihub.max_concurrency = {wanted} sockets are available; raise the open-files limit");
    }
    let sender = Sender::with_proxy(
        allow,
        limit,
        granted.max(1),
        concat!("pg_ihub/", env!("CARGO_PKG_VERSION")),
        &settings::http_proxy(),
    );
    if let Some(reason) = sender.unusable() {
        warning!("pg_ihub: {reason}; no request is sent until it is fixed");
    }
    sender
}

/// Dead rows in a capture table worth a VACUUM: a few ms of work that saves
/// every later route from stepping over them.
const CAPTURE_DEAD_ROWS: i64 = 10_000;

fn vacuum_capture_tables() {
    let tables: Vec<(String, String)> = in_transaction(|| {
        Spi::connect(|client| {
            client
                .select("SELECT schema, name FROM ihub._bloated_capture_tables($1)", None, &[CAPTURE_DEAD_ROWS.into()])
                .map(|rows| {
                    rows.map(|r| {
                        (r.get(1).ok().flatten().unwrap_or_default(), r.get(2).ok().flatten().unwrap_or_default())
                    })
                    .collect()
                })
                .unwrap_or_default()
        })
    })
    .unwrap_or_default();
    for (schema, name) in tables {
        bgw::vacuum(&schema, &name);
    }
}

fn extension_ready() -> bool {
    // The function, not just the pg_extension row: CREATE EXTENSION may still
    // be running, or a DROP may have committed since.
    Spi::get_one::<bool>(
        "SELECT pg_catalog.to_regprocedure('ihub._claim(integer, integer, integer, integer)') IS NOT NULL",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

fn rescue() {
    if let Ok(Some(n)) = Spi::get_one::<i64>("SELECT ihub._rescue()") {
        if n > 0 {
            log!("pg_ihub: {n} deliveries whose worker stopped are queued again");
        }
    }
}

fn next_due() -> Option<Duration> {
    let secs = Spi::get_one::<f64>("SELECT ihub._next_due()").ok().flatten()?;
    Some(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)))
}

struct Round {
    claimed: Vec<Claimed>,
    /// When nothing was claimed: how long until the next delivery is due.
    next_due: Option<Duration>,
}

/// One transaction: settle the last batch, rescue if due, claim the next.
/// None when the extension is not installed in this database.
fn next_round(
    pid: i32,
    batch_size: i32,
    concurrency: usize,
    results: Option<&Value>,
    rescue_now: bool,
) -> Option<Round> {
    if !extension_ready() {
        return None;
    }
    if let Some(results) = results {
        settle(pid, results);
    }
    if rescue_now {
        rescue();
    }
    let claimed = claim(pid, batch_size, concurrency);
    let next_due = if claimed.is_empty() { next_due() } else { None };
    Some(Round { claimed, next_due })
}

fn claim(pid: i32, limit: i32, concurrency: usize) -> Vec<Claimed> {
    let default_timeout = settings::DEFAULT_TIMEOUT_MS.get();
    let rounds = (limit as usize).div_ceil(concurrency.max(1)) as i32;
    Spi::connect_mut(|client| {
        let rows = client
            .update(
                "SELECT delivery_id, event_id, method, url, headers, auth, secrets, timeout_ms, retry, body, test_mode, attempts_used \
                 FROM ihub._claim($1, $2, $3, $4)",
                None,
                &[pid.into(), limit.into(), default_timeout.into(), rounds.into()],
            )
            .expect("ihub._claim runs");
        rows.map(|row| {
            let get_json = |n: usize| row.get::<JsonB>(n).ok().flatten().map(|j| j.0).unwrap_or(Value::Null);
            let headers = headers_from_json(&get_json(5));
            let timeout_ms: i32 = row.get(8).ok().flatten().unwrap_or(default_timeout);
            Claimed {
                request: Request {
                    delivery_id: row.get(1).ok().flatten().unwrap_or_default(),
                    event_id: row.get(2).ok().flatten().unwrap_or_default(),
                    method: row.get(3).ok().flatten().unwrap_or_else(|| "POST".into()),
                    url: row.get(4).ok().flatten().unwrap_or_default(),
                    headers,
                    auth: Auth::from_json(&get_json(6)).unwrap_or(Auth::None),
                    secrets: row.get::<Vec<String>>(7).ok().flatten().unwrap_or_default(),
                    body: row.get(10).ok().flatten().unwrap_or_default(),
                    timeout: Duration::from_millis(timeout_ms.max(1) as u64),
                    test_mode: row.get(11).ok().flatten().unwrap_or(false),
                },
                policy: RetryPolicy::from_json(&get_json(9)).unwrap_or_default(),
                attempts_used: row.get::<i32>(12).ok().flatten().unwrap_or(0).max(0) as u32,
            }
        })
        .collect()
    })
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Postgres text cannot hold NUL; receivers can send it.
fn clean(s: &str) -> String {
    s.replace('\0', "")
}

fn headers_json(headers: &[(String, String)]) -> Value {
    let mut map = serde_json::Map::new();
    for (k, v) in headers {
        let v = clean(v);
        match map.get_mut(k) {
            // Repeated headers (set-cookie, say) are joined as HTTP allows.
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&v);
            }
            _ => {
                map.insert(clean(k), Value::String(v));
            }
        }
    }
    Value::Object(map)
}

/// One settle record per finished attempt, with the delivery's next state.
fn decide_all(claimed: &[Claimed], attempts: Vec<Attempt>) -> Value {
    let mut rng = rand::thread_rng();
    let now = SystemTime::now();
    let results: Vec<Value> = attempts
        .into_iter()
        .filter_map(|a| {
            let c = claimed.iter().find(|c| c.request.delivery_id == a.delivery_id)?;
            let verdict = classify(&a.outcome);
            let next = decide(&c.policy, verdict, c.attempts_used + 1, now, &mut rng);
            let (state, next_at) = match next {
                Next::Delivered => ("done", None),
                Next::Retry { at } => ("retry", Some(epoch(at))),
                Next::Failed => ("failed", None),
                Next::Dead => ("dead", None),
            };
            Some(json!({
                "delivery_id": a.delivery_id,
                "state": state,
                "next_at": next_at,
                "status": a.status,
                "error": a.error.as_deref().map(clean),
                "category": category(&a.outcome),
                "request_headers": headers_json(&a.request_headers),
                "response_headers": if a.status.is_some() { headers_json(&a.response_headers) } else { Value::Null },
                "response_body": a.response_body.as_deref().map(clean),
                "started_at": epoch(a.started_at),
                "duration_ms": a.duration.as_secs_f64() * 1000.0,
                "disable_endpoint": verdict == Verdict::Gone,
            }))
        })
        .collect();
    Value::Array(results)
}

fn settle(pid: i32, results: &Value) {
    Spi::connect_mut(|client| {
        client
            .update("SELECT ihub._settle($1, $2)", None, &[pid.into(), JsonB(results.clone()).into()])
            .expect("ihub._settle runs");
    });
}
