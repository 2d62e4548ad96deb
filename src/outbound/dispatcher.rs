//! The dispatcher background worker: claim a batch, send it, settle it.
//! SQL does the queue work (`ihub._claim`, `ihub._settle`, `ihub._rescue`);
//! `outbound` does the HTTP and the retry decisions. SPI stays on this
//! thread; HTTP runs on a single-threaded tokio runtime between transactions.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::runtime::backend::{self, column, in_transaction, nullable, report_activity, shutdown_requested};
use crate::runtime::registry::{self, Kind};
use crate::runtime::worker::{run, Worker};
use crate::settings;
use pg_ihub_core::oauth2::{self, Unauthorized};
use pg_ihub_core::outbound::auth::Auth;
use pg_ihub_core::outbound::gather::Gather;
use pg_ihub_core::outbound::sender::{headers_from_json, Attempt, Request, Sender};
use pg_ihub_core::retry::{category, classify, decide, Next, RetryPolicy, Verdict};

/// Deliveries due later (retries, delayed requests) are claimed in ticks of
/// at least this: a wake-up takes all that are due by then, never early, at
/// most this late. Retries spread by jitter otherwise woke a dispatcher for
/// each few of them: 1,758 rounds per wave of 20,000 retries (make bench);
/// ticks of 250 ms made 76-139 rounds and 1.95-2.14 s of CPU a wave, 500 ms
/// make 59-61 rounds and 1.80-1.90 s. Retry delays are seconds or more.
/// Commits still wake a dispatcher at once.
const DUE_TICK: Duration = Duration::from_millis(500);

/// A batch still sending after this is slow (a slow or unreachable
/// receiver): changes committed meanwhile are not left waiting for it.
const SLOW_BATCH: Duration = Duration::from_millis(5);

/// A dispatcher's session keeps at most 300 prepared route statements (three
/// per subscription; ihub._route_prepare routes further subscriptions as
/// text). Once it holds that many, it drops them all at most this often, so
/// that statements of deleted subscriptions give way; routes prepare those
/// in use again (0.3-0.7 ms per subscription).
const ROUTE_STATEMENTS_FULL: i64 = 300;
const ROUTE_STATEMENTS_FORGET: Duration = Duration::from_secs(10);

/// How long a delivery answered 401 waits for its OAuth2 credential's new
/// access token at most: storing the token makes it due at once.
const OAUTH2_RETRY: Duration = Duration::from_secs(10);

/// What deciding a delivery's fate needs besides its attempt.
struct Fate {
    policy: RetryPolicy,
    /// Attempts its retry budget already spent.
    attempts_used: u32,
    /// The OAuth2 credential whose access token it was sent with, and that
    /// token's version.
    oauth2: Option<(i64, i32)>,
    /// The OAuth2 token version the receiver answered 401 to last.
    refused_token: Option<i32>,
    /// A receiver refused a new token of the credential lately.
    oauth2_refusing: bool,
    /// Its response goes to a response handler once it ends.
    respond: bool,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_dispatcher_main(_arg: pg_sys::Datum) {
    run::<Dispatcher>();
}

struct Dispatcher {
    pid: i32,
    runtime: tokio::runtime::Runtime,
    sender: Sender,
    last_rescue: Option<Instant>,
    last_vacuum: Instant,
    last_forget: Instant,
    last_round: Instant,
    gather: Gather,
    /// Attempts of the last batch, settled in the same transaction as the
    /// next claim: one commit per batch instead of two.
    /// (A JSON array, serialized once: it may be settled twice.)
    unsettled: Option<String>,
}

impl Worker for Dispatcher {
    const KIND: Kind = Kind::Dispatcher;
    const NEEDS: Option<&'static str> = Some("ihub._claim(integer, integer, integer, integer)");
    // DDL (DROP EXTENSION, ALTER TABLE on a subscribed table) must never wait
    // behind a dispatcher: the dispatcher gives up and tries again later.
    // (plan_cache_mode = force_generic_plan made it slower: single-row
    // writes 2,495 -> 1,430 tps, commit-to-receipt p50 3.4 -> 12.4 ms.)
    // No JIT: the queue functions run with enable_seqscan = off, and a
    // sequential scan then costs enough to be compiled: 37-103 ms a claim
    // for a scan of a one-row table (auto_explain), against 1 ms.
    const SESSION: &'static [(&'static str, &'static str)] = &[("lock_timeout", "100ms"), ("jit", "off")];

    fn start() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("no tokio runtime: {e}"))?;
        Ok(Dispatcher {
            pid: unsafe { pg_sys::MyProcPid },
            runtime,
            sender: new_sender(),
            last_rescue: None,
            last_vacuum: Instant::now(),
            last_forget: Instant::now(),
            last_round: Instant::now(),
            gather: Gather::default(),
            unsettled: None,
        })
    }

    fn reloaded(&mut self) {
        self.sender = new_sender();
    }

    fn round(&mut self, poll: Duration) -> Duration {
        let (pid, batch_size) = (self.pid, settings::BATCH_SIZE.get());
        // Deliveries whose worker died (or whose lease ran out) go back to the
        // queue; checked at the poll cadence, and at once after a start.
        let rescue_now = self.last_rescue.is_none_or(|t| t.elapsed() >= poll);
        let started = Instant::now();
        let since_last_round = started.duration_since(std::mem::replace(&mut self.last_round, started));
        // Busy from here until the round ends: commits made in its first
        // 20 ms join this dispatcher's next round (registry::wake_for_commit).
        registry::heartbeat(false);
        // What this round claims includes every commit made until now.
        registry::take_work_committed(Kind::Dispatcher);
        if route_statements() >= ROUTE_STATEMENTS_FULL && self.last_forget.elapsed() >= ROUTE_STATEMENTS_FORGET {
            in_transaction("forget route statements", || Spi::run("SELECT ihub._route_forget()").unwrap());
            self.last_forget = Instant::now();
        }
        let results = self.unsettled.take();
        let concurrency = self.sender.concurrency();
        let round = in_transaction("settle and claim", || {
            next_round(pid, batch_size, concurrency, results.as_deref(), rescue_now)
        });
        if rescue_now {
            self.last_rescue = Some(Instant::now());
        }
        let Some(round) = round else {
            // Rolled back (and logged). Settle alone, once more, waiting for
            // locks up to 10 s instead of the session's 100 ms: the round
            // most often fails on a lock another transaction holds briefly
            // (a claim holding a limited endpoint's state row), and a settle
            // lost has the leases run out and the deliveries sent again,
            // with the same webhook-id.
            if let Some(results) = results {
                in_transaction("settle", || {
                    Spi::run("SET LOCAL lock_timeout = '10s'").unwrap();
                    settle(pid, &results)
                });
            }
            return idle_unless_committed(poll);
        };
        // Between bursts, vacuum capture tables full of routed (deleted) or
        // rolled-back rows, which every route would otherwise scan again;
        // after sending, so that no claimed delivery waits for it.
        let count = round.requests.len();
        let between_bursts = (count as i32) < batch_size;
        if count == 0 {
            self.gather.busy_after(0, since_last_round);
            let sleep = idle_unless_committed(round.next_due.map_or(poll, |d| d.max(DUE_TICK).min(poll)));
            self.vacuum_if_due(between_bursts);
            return sleep;
        }
        if !between_bursts {
            registry::wake_peer(Kind::Dispatcher);
        }
        let claimed_at = Instant::now();
        report_activity(Some(&format!("dispatching {count} deliveries")));
        // Commits made while this batch is sent wait for this dispatcher
        // (see registry::wake_for_commit) unless sending takes long: then a
        // peer is woken for them (it takes the flag when it starts).
        let tick = || {
            if claimed_at.elapsed() >= SLOW_BATCH && registry::work_committed(Kind::Dispatcher) {
                registry::wake_peer(Kind::Dispatcher);
            }
            shutdown_requested()
        };
        let attempts = self.runtime.block_on(self.sender.send_all(round.requests, tick));
        report_activity(None);
        debug1!(
            "pg_ihub dispatcher: {} deliveries: settle and claim {:.1} ms, send {:.1} ms",
            count,
            (claimed_at - started).as_secs_f64() * 1000.0,
            claimed_at.elapsed().as_secs_f64() * 1000.0
        );
        self.unsettled = Some(decide_all(&round.fates, attempts).to_string());
        if !between_bursts || in_flight_held() {
            // A full batch (more is due), or deliveries waiting for requests
            // of this batch to end (max_in_flight): settle and claim now.
            return Duration::ZERO;
        }
        // Busy writers: gather their commits a little longer. Going on at
        // once made rounds as short as the last one (16 changes at 4,600
        // single-row commits/s), each paying the fixed cost of a round.
        // Still busy (not idle) meanwhile, so commits do not wake a peer.
        if self.gather.busy_after(count, since_last_round) && registry::work_committed(Kind::Dispatcher) {
            let gather = Duration::from_millis(settings::DISPATCH_GATHER_MS.get().max(0) as u64);
            let rest = gather.saturating_sub(started.elapsed());
            if !rest.is_zero() {
                return rest;
            }
        }
        // All that was due is taken. Go on at once only if a commit came
        // meanwhile; otherwise sleep to the next tick (a commit wakes us
        // earlier, and the next round settles this batch). Going on at once
        // after every round made retries spread by jitter keep a dispatcher
        // busy claiming a few at a time: 945 rounds per wave of 20,000.
        let sleep = idle_unless_committed(DUE_TICK.min(poll));
        self.vacuum_if_due(between_bursts);
        sleep
    }

    fn stop(&mut self) {
        if let Some(results) = self.unsettled.take() {
            let pid = self.pid;
            in_transaction("settle", || settle(pid, &results));
        }
    }
}

/// Ends a round that took all that was due: idle, then (in this order, see
/// registry::wake_for_commit) no sleep if changes were committed meanwhile.
fn idle_unless_committed(sleep: Duration) -> Duration {
    registry::heartbeat(true);
    if registry::take_work_committed(Kind::Dispatcher) {
        Duration::ZERO
    } else {
        sleep
    }
}

impl Dispatcher {
    /// Called once the dispatcher is idle again: commits made while it
    /// vacuums wake a dispatcher rather than wait for the vacuum.
    fn vacuum_if_due(&mut self, between_bursts: bool) {
        if between_bursts && self.last_vacuum.elapsed() >= Duration::from_secs(1) {
            vacuum_capture_tables();
            self.last_vacuum = Instant::now();
        }
    }
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
    let allow = crate::outbound::functions::worker_allow_list();
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
    let tables: Vec<(String, String)> = in_transaction("find bloated capture tables", || {
        Spi::connect(|client| {
            client
                .select("SELECT schema, name FROM ihub._bloated_capture_tables($1)", None, &[CAPTURE_DEAD_ROWS.into()])
                .unwrap_or_else(|e| error!("ihub._bloated_capture_tables: {e}"))
                .map(|r| (column(&r, 1, "schema"), column(&r, 2, "name")))
                .collect()
        })
    })
    .unwrap_or_default();
    for (schema, name) in tables {
        backend::vacuum(&schema, &name);
    }
}

/// How many route statements this session holds, as ihub._route_prepare
/// counted them: a session setting, read without a query.
fn route_statements() -> i64 {
    session_setting(c"ihub_route.prepared").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Whether the last claim left due deliveries behind for an endpoint's
/// max_in_flight (ihub._claim_limited sets it).
fn in_flight_held() -> bool {
    session_setting(c"ihub_claim.in_flight_held").is_some_and(|v| v == "on")
}

/// A session setting's value, read without a query (None when unset).
fn session_setting(name: &std::ffi::CStr) -> Option<String> {
    let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
    if value.is_null() {
        return None;
    }
    unsafe { std::ffi::CStr::from_ptr(value) }.to_str().ok().map(str::to_owned)
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
    requests: Vec<Request>,
    /// By delivery id.
    fates: HashMap<i64, Fate>,
    /// When nothing was claimed: how long until the next delivery is due.
    next_due: Option<Duration>,
}

/// One transaction: settle the last batch, rescue if due, claim the next.
fn next_round(pid: i32, batch_size: i32, concurrency: usize, results: Option<&str>, rescue_now: bool) -> Round {
    if let Some(results) = results {
        settle(pid, results);
    }
    if rescue_now {
        rescue();
    }
    let (requests, fates) = claim(pid, batch_size, concurrency);
    let next_due = if requests.is_empty() { next_due() } else { None };
    Round { requests, fates, next_due }
}

/// The claimed deliveries' requests, and what deciding their fates needs.
fn claim(pid: i32, limit: i32, concurrency: usize) -> (Vec<Request>, HashMap<i64, Fate>) {
    let default_timeout = settings::DEFAULT_TIMEOUT_MS.get();
    let rounds = (limit as usize).div_ceil(concurrency.max(1)) as i32;
    Spi::connect_mut(|client| {
        let rows = client
            .update(
                "SELECT delivery_id, event_id, method, url, headers, auth, secrets, timeout_ms, retry, body, test_mode, attempts_used, \
                        oauth2_id, oauth2_version, not_sendable, refused_token, respond, oauth2_refusing \
                 FROM ihub._claim($1, $2, $3, $4)",
                None,
                &[pid.into(), limit.into(), default_timeout.into(), rounds.into()],
            )
            .expect("ihub._claim runs");
        rows.map(|row| {
            let delivery_id: i64 = column(&row, 1, "delivery_id");
            let json = |n: usize, name: &str| nullable::<JsonB>(&row, n, name).map_or(Value::Null, |j| j.0);
            // Checked when the endpoint was created: a stored value that no
            // longer parses fails the round loudly, never sends without auth.
            let auth = Auth::from_json(&json(6, "auth"))
                .unwrap_or_else(|e| error!("pg_ihub: delivery {delivery_id}: stored auth does not parse: {e}"));
            let policy = RetryPolicy::from_json(&json(9, "retry"))
                .unwrap_or_else(|e| error!("pg_ihub: delivery {delivery_id}: stored retry policy does not parse: {e}"));
            let timeout_ms: i32 = nullable(&row, 8, "timeout_ms").unwrap_or(default_timeout);
            let respond: bool = column(&row, 17, "respond");
            let fate = Fate {
                policy,
                attempts_used: column::<i32>(&row, 12, "attempts_used").max(0) as u32,
                oauth2: nullable::<i64>(&row, 13, "oauth2_id")
                    .map(|id| (id, nullable::<i32>(&row, 14, "oauth2_version").unwrap_or(0))),
                refused_token: nullable(&row, 16, "refused_token"),
                oauth2_refusing: nullable(&row, 18, "oauth2_refusing").unwrap_or(false),
                respond,
            };
            let request = Request {
                delivery_id,
                event_id: column(&row, 2, "event_id"),
                method: column(&row, 3, "method"),
                url: column(&row, 4, "url"),
                headers: headers_from_json(&json(5, "headers")),
                auth,
                secrets: nullable::<Vec<String>>(&row, 7, "secrets").unwrap_or_default(),
                body: column(&row, 10, "body"),
                timeout: Duration::from_millis(timeout_ms.max(1) as u64),
                test_mode: column(&row, 11, "test_mode"),
                body_limit: respond.then(|| settings::MAX_RESPONSE_SIZE.get().max(0) as usize),
                not_sendable: nullable(&row, 15, "not_sendable"),
            };
            (request, (delivery_id, fate))
        })
        .unzip()
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

/// `text` cut to at most `limit` bytes, at a character boundary.
fn cut(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One settle record per finished attempt, with the delivery's next state.
fn decide_all(fates: &HashMap<i64, Fate>, attempts: Vec<Attempt>) -> Value {
    let mut rng = rand::thread_rng();
    let now = SystemTime::now();
    let record_limit = settings::RESPONSE_BODY_LIMIT.get().max(0) as usize;
    let results: Vec<Value> = attempts
        .into_iter()
        .filter_map(|a| {
            let fate = fates.get(&a.delivery_id)?;
            let verdict = classify(&a.outcome);
            // A 401 to an OAuth2 access token: a new token is asked for (in
            // the settle) and the delivery goes again once it is there; a
            // 401 to the new token too is what any 4xx is.
            let unauthorized = match (a.status, fate.oauth2) {
                (Some(401), Some((_, sent))) => Some(oauth2::after_401(fate.refused_token, sent, fate.oauth2_refusing)),
                _ => None,
            };
            let attempt = fate.attempts_used + 1;
            let next = match unauthorized {
                Some(Unauthorized::RefreshAndRetry) => Next::Retry { at: now + OAUTH2_RETRY },
                Some(Unauthorized::WaitForToken) => {
                    decide(&fate.policy, Verdict::Retry { after: None }, attempt, now, &mut rng)
                }
                _ => decide(&fate.policy, verdict, attempt, now, &mut rng),
            };
            let (state, next_at) = match next {
                Next::Delivered => ("done", None),
                Next::Retry { at } => ("retry", Some(epoch(at))),
                Next::Failed => ("failed", None),
                Next::Dead => ("dead", None),
            };
            let body = a.response_body.as_deref().map(clean);
            // The whole response for its handler, once the request ended
            // (parsed as JSON in the settle, not carried twice).
            let response = (fate.respond && state != "retry").then(|| {
                let problem = a.response_truncated.then(|| {
                    format!(
                        "the response body was longer than ihub.max_response_size ({} bytes) and was cut there",
                        settings::MAX_RESPONSE_SIZE.get()
                    )
                });
                json!({ "body": body, "truncated": a.response_truncated, "problem": problem })
            });
            let mut record = json!({
                "delivery_id": a.delivery_id,
                "state": state,
                "next_at": next_at,
                "status": a.status,
                "error": a.error.as_deref().map(clean),
                "category": category(&a.outcome),
                "request_headers": headers_json(&a.request_headers),
                "response_headers": if a.status.is_some() { headers_json(&a.response_headers) } else { Value::Null },
                "response_body": body.as_deref().map(|b| cut(b, record_limit)),
                "started_at": epoch(a.started_at),
                "duration_ms": a.duration.as_secs_f64() * 1000.0,
                "disable_endpoint": verdict == Verdict::Gone,
            });
            if let Some(response) = response {
                record["respond"] = Value::Bool(true);
                record["response"] = response;
            }
            if let (Some(unauthorized), Some((id, version))) = (&unauthorized, fate.oauth2) {
                record["oauth2_id"] = json!(id);
                record["oauth2_version"] = json!(version);
                match unauthorized {
                    Unauthorized::Final => record["oauth2_refused"] = Value::Bool(true),
                    _ => record["oauth2_stale"] = Value::Bool(true),
                }
            }
            Some(record)
        })
        .collect();
    Value::Array(results)
}

fn settle(pid: i32, results: &str) {
    Spi::connect_mut(|client| {
        client
            .update("SELECT ihub._settle($1, $2::jsonb)", None, &[pid.into(), results.into()])
            .expect("ihub._settle runs");
    });
}
