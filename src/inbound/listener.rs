//! The inbound webhook listener: a background worker that serves HTTP on
//! `ihub.listen_address` with hyper, on a tokio runtime of its own.
//!
//! HTTP tasks (runtime threads) parse, rate-limit and verify requests
//! themselves, from a cache of the sources, and hand accepted ones to the
//! worker's main thread, the only one that touches Postgres. The main thread
//! writes everything that queued up while it was busy in one transaction
//! (group commit) and only then answers 202, so a burst costs one commit per
//! batch rather than one per request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, JsonB, PgAtomic, PgOid};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::runtime::backend::{column, in_transaction, nullable, run_prepared};
use crate::runtime::registry::{self, Kind};
use crate::runtime::worker::{run, Worker};
use crate::settings;
use pg_ihub_core::inbound::bounds::{self, Connections, Throttle};
use pg_ihub_core::inbound::limiter::Bucket;
use pg_ihub_core::inbound::verify::{body_hash, dedup_key, handshake, verify, Mode, Rule, URL_HEADER};
use pg_ihub_core::oauth2;
use pg_ihub_core::outbound::mask;
use pg_ihub_core::outbound::signature::constant_time_eq;

/// A source as the HTTP tasks see it.
struct Source {
    id: i64,
    active: bool,
    rule: Rule,
    id_header: Option<String>,
    /// The source's fixed answer to a request it accepted (or had already):
    /// status, content type and body, instead of 202 and the item's id.
    response: Option<(StatusCode, String, Bytes)>,
}

/// Work for the main thread.
enum Work {
    Accept {
        source: i64,
        headers: Value,
        body: Vec<u8>,
        dedup: String,
        remote: String,
        run_at: Option<f64>,
        reply: oneshot::Sender<Accepted>,
    },
    Reload(oneshot::Sender<()>),
    Health(oneshot::Sender<Result<(bool, Value), ()>>),
    /// An OAuth2 authorization came back: check and use up its state; the
    /// answer is what exchanging the code needs, or {"error", "status"}.
    OAuth2Callback {
        integration: String,
        name: String,
        state: Option<String>,
        declined: Option<String>,
        reply: oneshot::Sender<Option<Value>>,
    },
    /// What the token endpoint answered for a code.
    OAuth2Tokens {
        id: i64,
        /// The token version when the code came back.
        version: i32,
        outcome: Result<oauth2::Tokens, oauth2::TokenError>,
        reply: oneshot::Sender<()>,
    },
}

/// A request refused by verification, to be recorded. These wait in a
/// bounded queue of their own (REJECTION_QUEUE): past it they are counted,
/// not kept, so that a flood of bad requests cannot grow the listener.
struct Rejection {
    source: i64,
    reason: String,
    remote: String,
    hash: String,
    headers: Value,
}

/// Rejections waiting to be recorded, at most.
const REJECTION_QUEUE: usize = 1000;

/// How often a request for an unknown path may have the sources reloaded;
/// in between, unknown paths are answered 404 from the cache. (Changes to
/// sources reach the cache at commit anyway.)
const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The listener's counters, in shared memory (ihub.listener_stats()).
static SOURCE_RELOADS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_ihub_listener_reloads") };
static REJECTIONS_DROPPED: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_ihub_rejections_dropped") };
static CONNECTIONS_REFUSED: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_ihub_connections_refused") };

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init_shmem() {
    pg_shmem_init!(SOURCE_RELOADS);
    pg_shmem_init!(REJECTIONS_DROPPED);
    pg_shmem_init!(CONNECTIONS_REFUSED);
}

fn count(counter: &PgAtomic<AtomicU64>) {
    if registry::preloaded() {
        counter.get().fetch_add(1, Ordering::Relaxed);
    }
}

fn read(counter: &PgAtomic<AtomicU64>) -> i64 {
    if registry::preloaded() {
        counter.get().load(Ordering::Relaxed) as i64
    } else {
        0
    }
}

/// The listener's counters since the server started: reloads of its cache
/// of sources, rejected requests not recorded because their queue was full,
/// and connections refused with 503 (too many in all or from one address).
#[pg_extern(name = "listener_stats", volatile)]
fn listener_stats(
) -> TableIterator<'static, (name!(source_reloads, i64), name!(rejections_dropped, i64), name!(connections_refused, i64))>
{
    TableIterator::once((read(&SOURCE_RELOADS), read(&REJECTIONS_DROPPED), read(&CONNECTIONS_REFUSED)))
}

/// What became of a request handed to the main thread.
#[derive(Clone, Copy)]
enum Accepted {
    Queued(i64),
    /// Seen before within the source's window: the first item's id.
    Duplicate(i64),
    /// The source was dropped after the request was verified.
    SourceGone,
    Failed,
}

/// What the HTTP side shares with the main thread.
struct Shared {
    sources: RwLock<HashMap<(String, String), Arc<Source>>>,
    buckets: Mutex<HashMap<i64, Bucket>>,
    work: Mutex<Sender<Work>>,
    rejections: SyncSender<Rejection>,
    /// Open connections per remote address.
    connections: Mutex<Connections<std::net::IpAddr>>,
    /// Reloads on a cache miss (an unknown path), at most one per MISS_RELOAD_INTERVAL.
    miss_reload: Mutex<Throttle>,
    /// A byte written here wakes the main thread from its latch wait.
    wake: Mutex<UnixStream>,
    ready: AtomicBool,
    /// The shared sources version (bumped at commit of any change) and the
    /// one the cache was loaded at.
    version: Option<&'static AtomicU64>,
    loaded_version: AtomicU64,
    max_body: AtomicU64,
    rate_limit: AtomicU64,
    burst: AtomicU64,
    timeout_ms: AtomicU64,
    header_timeout_ms: AtomicU64,
    per_address: AtomicU64,
    /// SHA-256 of `ihub.health_token`; None: /healthz never shows detail.
    health_token: RwLock<Option<[u8; 32]>>,
    /// Exchanges OAuth2 authorization codes (allow-list and proxy applied),
    /// within `ihub.default_timeout`.
    tokens: RwLock<Arc<oauth2::TokenClient>>,
    token_timeout_ms: AtomicU64,
}

impl Shared {
    fn send(&self, work: Work) -> bool {
        let sent = self.work.lock().map(|tx| tx.send(work).is_ok()).unwrap_or(false);
        if let Ok(mut w) = self.wake.lock() {
            let _ = w.write(&[1]);
        }
        sent
    }

    /// Queues a rejection to be recorded, unless its queue is full: then it
    /// is only counted (ihub.listener_stats().rejections_dropped).
    fn reject(&self, rejection: Rejection) {
        match self.rejections.try_send(rejection) {
            Ok(()) => {
                if let Ok(mut w) = self.wake.lock() {
                    let _ = w.write(&[1]);
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => count(&REJECTIONS_DROPPED),
        }
    }

    /// Whether a cache miss may reload the sources now.
    fn miss_reload_allowed(&self) -> bool {
        self.miss_reload.lock().map(|mut t| t.allow(Instant::now(), MISS_RELOAD_INTERVAL)).unwrap_or(false)
    }

    fn load_settings(&self) {
        self.max_body.store(settings::MAX_BODY_SIZE.get().max(0) as u64, Ordering::Relaxed);
        self.rate_limit.store(settings::INBOUND_RATE_LIMIT.get().max(0) as u64, Ordering::Relaxed);
        self.burst.store(settings::INBOUND_BURST.get().max(1) as u64, Ordering::Relaxed);
        self.timeout_ms.store(settings::INBOUND_REQUEST_TIMEOUT_MS.get().max(100) as u64, Ordering::Relaxed);
        self.header_timeout_ms.store(settings::INBOUND_HEADER_TIMEOUT_MS.get().max(100) as u64, Ordering::Relaxed);
        self.per_address.store(settings::INBOUND_MAX_CONNECTIONS_PER_ADDRESS.get().max(1) as u64, Ordering::Relaxed);
        let token = settings::health_token();
        let digest = (!token.is_empty()).then(|| sha256(token.as_bytes()));
        if let Ok(mut t) = self.health_token.write() {
            *t = digest;
        }
        if let Ok(mut t) = self.tokens.write() {
            *t = Arc::new(crate::sync::oauth2::token_client());
        }
        self.token_timeout_ms.store(crate::sync::oauth2::request_timeout().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the request carries `Authorization: Bearer <ihub.health_token>`.
    /// Digests are compared, in constant time, so neither the token's
    /// content nor its length shows in the timing.
    fn health_detail_allowed(&self, headers: &hyper::HeaderMap) -> bool {
        let Some(expected) = self.health_token.read().ok().and_then(|t| *t) else {
            return false;
        };
        headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .is_some_and(|token| constant_time_eq(&sha256(token.as_bytes()), &expected))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms.load(Ordering::Relaxed))
    }

    /// True when sources changed since the cache was loaded.
    fn stale(&self) -> bool {
        self.version.is_some_and(|v| v.load(Ordering::SeqCst) != self.loaded_version.load(Ordering::SeqCst))
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_listener_main(_arg: pg_sys::Datum) {
    run::<Listener>();
}

/// The main thread: sleeps on its latch and the wake socket; writes what the
/// HTTP tasks handed over, a batch per transaction. HTTP runs on a tokio
/// runtime of its own and never touches SPI.
struct Listener {
    shared: Arc<Shared>,
    work: Receiver<Work>,
    rejections: Receiver<Rejection>,
    wake: UnixStream,
    runtime: tokio::runtime::Runtime,
    last_reload: Option<Instant>,
    /// The dropped-rejections count last logged, and when.
    dropped_logged: (u64, Option<Instant>),
}

impl Worker for Listener {
    const KIND: Kind = Kind::Listener;
    // Serves at once: without the extension, requests get 404 or 503.
    const NEEDS: Option<&'static str> = None;
    const SESSION: &'static [(&'static str, &'static str)] = &[("lock_timeout", "1s")];

    fn start() -> Result<Self, String> {
        let address = settings::listen_address();
        let addr: SocketAddr = address
            .parse()
            .map_err(|_| format!("ihub.listen_address \"{address}\" is not host:port; not listening"))?;
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| format!("no socket pair: {e}"))?;
        wake_rx.set_nonblocking(true).map_err(|e| e.to_string())?;
        wake_tx.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let (reject_tx, reject_rx) = mpsc::sync_channel(REJECTION_QUEUE);
        let shared = Arc::new(Shared {
            sources: RwLock::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            work: Mutex::new(tx),
            rejections: reject_tx,
            connections: Mutex::new(Connections::new()),
            miss_reload: Mutex::new(Throttle::default()),
            wake: Mutex::new(wake_tx),
            ready: AtomicBool::new(false),
            version: registry::sources_version(),
            loaded_version: AtomicU64::new(0),
            max_body: AtomicU64::new(0),
            rate_limit: AtomicU64::new(0),
            burst: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(30_000),
            header_timeout_ms: AtomicU64::new(10_000),
            per_address: AtomicU64::new(100),
            health_token: RwLock::new(None),
            tokens: RwLock::new(Arc::new(crate::sync::oauth2::token_client())),
            token_timeout_ms: AtomicU64::new(10_000),
        });
        shared.load_settings();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pg_ihub-listener")
            .enable_all()
            .build()
            .map_err(|e| format!("no tokio runtime: {e}"))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        log!("pg_ihub listener serving http://{addr}");
        let max_connections = settings::INBOUND_MAX_CONNECTIONS.get().max(1) as usize;
        runtime.spawn(serve(listener, shared.clone(), max_connections));
        Ok(Listener {
            shared,
            work: rx,
            rejections: reject_rx,
            wake: wake_rx,
            runtime,
            last_reload: None,
            dropped_logged: (read(&REJECTIONS_DROPPED) as u64, None),
        })
    }

    fn reloaded(&mut self) {
        self.shared.load_settings();
    }

    fn round(&mut self, _poll: Duration) -> Duration {
        // Sources are re-read when a commit changed them (it wakes us), on a
        // cache miss, and every half minute in case.
        if self.shared.stale() || self.last_reload.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            reload_sources(&self.shared);
            self.last_reload = Some(Instant::now());
        }
        let mut rejections = Vec::new();
        while let Ok(rejection) = self.rejections.try_recv() {
            rejections.push(rejection);
            if rejections.len() >= REJECTION_QUEUE {
                break;
            }
        }
        if !rejections.is_empty() {
            in_transaction("record rejections", AssertUnwindSafe(|| record_rejections(&rejections)));
        }
        self.log_dropped();
        let mut batch = Vec::new();
        while let Ok(work) = self.work.try_recv() {
            batch.push(work);
            if batch.len() >= 2000 {
                break;
            }
        }
        if batch.is_empty() {
            return if rejections.is_empty() { Duration::from_secs(1) } else { Duration::ZERO };
        }
        handle_batch(&self.shared, batch);
        Duration::ZERO
    }

    fn sleep(&mut self, timeout: Duration) {
        if timeout.is_zero() {
            return;
        }
        // Senders wait for their answers: never the runtime's long back-off
        // after a failed step (a table locked for a while), at most a second.
        let timeout = timeout.min(Duration::from_secs(1));
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_SOCKET_READABLE | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                    as i32,
                self.wake.as_raw_fd(),
                timeout.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        let mut sink = [0u8; 256];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        pg_sys::check_for_interrupts!();
    }

    fn stop(&mut self) {
        // Dropping the runtime would wait for open connections.
        let runtime = std::mem::replace(
            &mut self.runtime,
            tokio::runtime::Builder::new_current_thread().build().expect("an empty runtime"),
        );
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

impl Listener {
    /// Rejections dropped from a full queue show in the server log, at most
    /// once a minute (and in ihub.listener_stats() at once).
    fn log_dropped(&mut self) {
        let dropped = read(&REJECTIONS_DROPPED) as u64;
        let (logged, at) = self.dropped_logged;
        if dropped > logged && at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            warning!(
                "pg_ihub listener: {} rejected request(s) not recorded: more arrived than could be written (queue of {REJECTION_QUEUE})",
                dropped - logged
            );
            self.dropped_logged = (dropped, Some(Instant::now()));
        }
    }
}

fn handle_batch(shared: &Shared, batch: Vec<Work>) {
    let mut accepts = Vec::new();
    for work in batch {
        match work {
            Work::Reload(reply) => {
                reload_sources(shared);
                let _ = reply.send(());
            }
            Work::Health(reply) => {
                let _ = reply.send(in_transaction("health", health).flatten().ok_or(()));
            }
            Work::OAuth2Callback { integration, name, state, declined, reply } => {
                let answer = in_transaction(
                    "OAuth2 callback",
                    AssertUnwindSafe(|| oauth2_callback(&integration, &name, state.as_deref(), declined.as_deref())),
                );
                let _ = reply.send(answer.flatten());
            }
            Work::OAuth2Tokens { id, version, outcome, reply } => {
                crate::sync::oauth2::record(id, version, &outcome);
                let _ = reply.send(());
            }
            Work::Accept { .. } => accepts.push(work),
        }
    }
    if accepts.is_empty() {
        return;
    }
    let mut results = in_transaction("accept", AssertUnwindSafe(|| accept(&accepts))).flatten();
    if results.is_none() && accepts.len() > 1 {
        // One bad request must not fail the others: each alone, in a
        // transaction of its own. Only while their senders still wait: when
        // the database itself fails, this must not stall the listener.
        let deadline = Instant::now() + shared.timeout();
        let mut alone = HashMap::new();
        for (i, work) in accepts.iter().enumerate() {
            if Instant::now() >= deadline {
                break;
            }
            let one = in_transaction("accept one", AssertUnwindSafe(|| accept(std::slice::from_ref(work)))).flatten();
            if let Some(accepted) = one.and_then(|r| r.get(&1).copied()) {
                alone.insert(i as i32 + 1, accepted);
            }
        }
        results = Some(alone);
    }
    if results.as_ref().is_some_and(|r| r.values().any(|a| matches!(a, Accepted::SourceGone))) {
        // Before answering, so that the retried lookups see the change.
        reload_sources(shared);
    }
    for (i, work) in accepts.into_iter().enumerate() {
        if let Work::Accept { reply, .. } = work {
            let _ =
                reply.send(results.as_ref().and_then(|r| r.get(&(i as i32 + 1)).copied()).unwrap_or(Accepted::Failed));
        }
    }
}

fn reload_sources(shared: &Shared) {
    count(&SOURCE_RELOADS);
    // Read first: a change committed while loading makes the cache stale again.
    let version = shared.version.map(|v| v.load(Ordering::SeqCst)).unwrap_or(0);
    let loaded = in_transaction("load sources", || {
        if !Spi::get_one::<bool>("SELECT pg_catalog.to_regprocedure('ihub._inbound_sources()') IS NOT NULL").ok().flatten()? {
            return None;
        }
        Spi::connect(|client| {
            let rows = client
                .select(
                    // SELECT *: the response column is new in 0.3.0 and read by
                    // name, so that sources still load before ALTER EXTENSION
                    // UPDATE has run.
                    "SELECT * FROM ihub._inbound_sources()",
                    None,
                    &[],
                )
                .ok()?;
            let mut map = HashMap::new();
            for row in rows {
                let (integration, name): (String, String) = (column(&row, 2, "integration"), column(&row, 3, "source"));
                let verify_mode: String = column(&row, 5, "verify");
                // Fails closed for that source only (404), never for the rest.
                let Some(mode) = Mode::parse(&verify_mode) else {
                    warning!("pg_ihub listener: source {integration}/{name} has unknown verification \"{verify_mode}\"; not served");
                    continue;
                };
                let source = Source {
                    id: column(&row, 1, "id"),
                    active: column(&row, 4, "active"),
                    rule: Rule::new(
                        mode,
                        &nullable::<String>(&row, 8, "secret").unwrap_or_default(),
                        nullable::<String>(&row, 6, "header"),
                        column::<i64>(&row, 9, "tolerance_s"),
                    ),
                    id_header: nullable::<String>(&row, 7, "id_header"),
                    response: row.get_by_name::<JsonB, _>("response").ok().flatten().and_then(|r| fixed_response(&r.0)),
                };
                map.insert((integration, name), Arc::new(source));
            }
            Some(map)
        })
    })
    .flatten();
    shared.ready.store(loaded.is_some(), Ordering::Relaxed);
    if let (Some(map), Ok(mut sources)) = (loaded, shared.sources.write()) {
        *sources = map;
        shared.loaded_version.store(version, Ordering::SeqCst);
    }
}

/// One transaction for the whole batch; returns what became of each
/// request, by 1-based position.
fn accept(works: &[Work]) -> Option<HashMap<i32, Accepted>> {
    let (mut sources, mut headers, mut bodies, mut dedup, mut remote, mut run_at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for work in works {
        if let Work::Accept { source, headers: h, body, dedup: d, remote: r, run_at: e, .. } = work {
            sources.push(*source);
            headers.push(JsonB(h.clone()));
            bodies.push(body.clone());
            dedup.push(d.clone());
            remote.push(r.clone());
            // Postgres timestamps count microseconds from 2000-01-01.
            run_at.push(e.and_then(|secs| {
                pgrx::datum::TimestampWithTimeZone::try_from((secs * 1_000_000.0) as i64 - 946_684_800_000_000).ok()
            }));
        }
    }
    Spi::connect_mut(|client| {
        let array = |oid: pg_sys::Oid| PgOid::from(unsafe { pg_sys::get_array_type(oid) });
        let rows = run_prepared(
            client,
            "SELECT n, item_id, duplicate FROM ihub._accept_inbound($1, $2, $3, $4, $5, $6)",
            &[
                array(pg_sys::INT8OID),
                array(pg_sys::JSONBOID),
                array(pg_sys::BYTEAOID),
                array(pg_sys::TEXTOID),
                array(pg_sys::TEXTOID),
                array(pg_sys::TIMESTAMPTZOID),
            ],
            &[sources.into(), headers.into(), bodies.into(), dedup.into(), remote.into(), run_at.into()],
        )
        .unwrap_or_else(|e| error!("ihub._accept_inbound: {e}"));
        let mut out = HashMap::new();
        for row in rows {
            let accepted = match (nullable::<i64>(&row, 2, "item_id"), nullable::<bool>(&row, 3, "duplicate")) {
                (Some(id), Some(true)) => Accepted::Duplicate(id),
                (Some(id), _) => Accepted::Queued(id),
                (None, _) => Accepted::SourceGone,
            };
            out.insert(column::<i32>(&row, 1, "n"), accepted);
        }
        Some(out)
    })
}

fn record_rejections(rejections: &[Rejection]) {
    let (mut sources, mut reasons, mut remote, mut hashes, mut headers) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rejections {
        sources.push(r.source);
        reasons.push(r.reason.clone());
        remote.push(r.remote.clone());
        hashes.push(r.hash.clone());
        headers.push(JsonB(r.headers.clone()));
    }
    // Loud: a rejection record lost must show in the log (the step's WARNING).
    Spi::run_with_args(
        "SELECT ihub._reject_inbound($1, $2, $3, $4, $5)",
        &[sources.into(), reasons.into(), remote.into(), hashes.into(), headers.into()],
    )
    .unwrap_or_else(|e| error!("ihub._reject_inbound: {e}"));
}

/// The first step of an OAuth2 callback (`ihub._oauth2_callback`), or, when
/// the provider reports the authorization declined, its record.
fn oauth2_callback(integration: &str, name: &str, state: Option<&str>, declined: Option<&str>) -> Option<Value> {
    if let Some(error) = declined {
        Spi::run_with_args(
            "SELECT ihub._oauth2_declined($1, $2, $3, $4)",
            &[integration.into(), name.into(), state.into(), error.into()],
        )
        .unwrap_or_else(|e| error!("ihub._oauth2_declined: {e}"));
        return Some(json!({"error": "the provider reports that the authorization was refused", "status": 400}));
    }
    Spi::get_one_with_args::<JsonB>(
        "SELECT ihub._oauth2_callback($1, $2, $3)",
        &[integration.into(), name.into(), state.into()],
    )
    .unwrap_or_else(|e| error!("ihub._oauth2_callback: {e}"))
    .map(|j| j.0)
}

fn health() -> Option<(bool, Value)> {
    Spi::connect(|client| {
        let rows = client
            .select("SELECT check_name, status, message FROM ihub.health()", None, &[])
            .unwrap_or_else(|e| error!("ihub.health(): {e}"));
        let mut checks = Vec::new();
        let mut statuses = Vec::new();
        for row in rows {
            let status: String = column(&row, 2, "status");
            checks.push(json!({
                "check": column::<String>(&row, 1, "check_name"),
                "status": status,
                "message": nullable::<String>(&row, 3, "message"),
            }));
            statuses.push(status);
        }
        let overall = overall_status(statuses.iter().map(String::as_str));
        Some((overall != "critical", json!({ "status": overall, "checks": checks })))
    })
}

// ---------------------------------------------------------------------------
// HTTP side (runtime threads; never touches Postgres)
// ---------------------------------------------------------------------------

/// The answer to a connection over the limits, written without reading
/// anything, before the connection is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
    content-length: 32\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"error\":\"too many connections\"}";

/// Ends a connection's count for its address, however its task ends.
struct Counted {
    shared: Arc<Shared>,
    from: std::net::IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.connections.lock() {
            c.close(&self.from);
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, max_connections: usize) {
    let limit = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(pair) => pair,
            Err(_) => {
                // Out of descriptors, say: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over ihub.inbound_max_connections in all, or
        // ihub.inbound_max_connections_per_address from this address: 503
        // at once, so that idle connections cannot lock others out.
        let per_address = shared.per_address.load(Ordering::Relaxed) as usize;
        let permit = limit.clone().try_acquire_owned().ok();
        let counted = permit.as_ref().and_then(|_| {
            let open = shared.connections.lock().ok()?.try_open(remote.ip(), per_address);
            open.then(|| Counted { shared: shared.clone(), from: remote.ip() })
        });
        let (Some(permit), Some(counted)) = (permit, counted) else {
            count(&CONNECTIONS_REFUSED);
            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            if let Ok(stream) = stream.into_std() {
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let header_timeout = shared.header_timeout();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared, remote).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(counted);
            drop(permit);
        });
    }
}

/// A source's fixed response, `{"status": 200, "content_type": …, "body": …}`
/// (checked by ihub.create_source).
fn fixed_response(value: &Value) -> Option<(StatusCode, String, Bytes)> {
    let status = StatusCode::from_u16(value.get("status")?.as_u64()? as u16).ok()?;
    let content_type = value.get("content_type").and_then(Value::as_str).unwrap_or("text/plain").to_string();
    let body = value.get("body").and_then(Value::as_str).unwrap_or("").to_string();
    Some((status, content_type, Bytes::from(body)))
}

fn raw_reply(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "invalid response"))
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message }))
}

async fn route(req: Request<Incoming>, shared: &Shared, remote: SocketAddr) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => {
            let detail = shared.health_detail_allowed(req.headers());
            healthz(shared, detail).await
        }
        (&Method::POST, ["webhooks", integration, source]) => {
            let (integration, source) = (integration.to_string(), source.to_string());
            receive(req, shared, remote, integration, source).await
        }
        (_, ["webhooks", _, _]) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (&Method::GET, ["oauth2", "callback", integration, name]) => {
            let (integration, name) = (integration.to_string(), name.to_string());
            oauth2_callback_page(req.uri().query().unwrap_or(""), shared, integration, name).await
        }
        _ => error(StatusCode::NOT_FOUND, "no such path; POST /webhooks/<integration>/<source>"),
    }
}

/// A small page for the person a provider sent back (never a secret in it).
fn page(status: StatusCode, title: &str, text: &str) -> Response<Full<Bytes>> {
    let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family: sans-serif; margin: 3em\"><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-store")
        .header("referrer-policy", "no-referrer")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// `GET /oauth2/callback/<integration>/<name>?code=…&state=…`: the state
/// must be the one `ihub.oauth2_authorize_url` put in the last URL (it is
/// used up either way); then the code is exchanged for tokens, which are
/// stored before the page answers.
async fn oauth2_callback_page(
    query: &str,
    shared: &Shared,
    integration: String,
    name: String,
) -> Response<Full<Bytes>> {
    let params = oauth2::callback_params(query);
    if params.code.is_none() && params.error.is_none() {
        return page(
            StatusCode::BAD_REQUEST,
            "Authorization failed",
            "The request carries neither a code nor an error.",
        );
    }
    let (tx, rx) = oneshot::channel();
    let work = Work::OAuth2Callback {
        integration: integration.clone(),
        name: name.clone(),
        state: params.state.clone(),
        declined: params.error.clone(),
        reply: tx,
    };
    if !shared.send(work) {
        return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The listener is stopping.");
    }
    let answer = match tokio::time::timeout(shared.timeout(), rx).await {
        Ok(Ok(Some(answer))) => answer,
        _ => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The database did not answer."),
    };
    if let Some(problem) = answer["error"].as_str() {
        let status =
            StatusCode::from_u16(answer["status"].as_u64().unwrap_or(400) as u16).unwrap_or(StatusCode::BAD_REQUEST);
        return page(status, "Authorization failed", problem);
    }
    let text = |key: &str| answer[key].as_str().unwrap_or_default().to_string();
    let (Some(id), Some(code)) = (answer["id"].as_i64(), params.code) else {
        return page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Authorization failed",
            "pg_ihub could not read the credential.",
        );
    };
    let client = oauth2::Client {
        token_url: text("token_url"),
        client_id: text("client_id"),
        client_secret: text("client_secret"),
        scope: answer["scope"].as_str().map(str::to_string),
        client_auth: oauth2::ClientAuth::parse(&text("client_auth")).unwrap_or(oauth2::ClientAuth::Post),
    };
    let grant = oauth2::Grant::AuthorizationCode { code, redirect_uri: text("redirect_uri") };
    let tokens = shared.tokens.read().map(|t| t.clone()).ok();
    let Some(tokens) = tokens else {
        return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The listener is stopping.");
    };
    // (Settings are read on the main thread only: the timeout is kept in Shared.)
    let timeout = Duration::from_millis(shared.token_timeout_ms.load(Ordering::Relaxed));
    let outcome = tokens.request(&client, &grant, timeout).await;
    let result = outcome.as_ref().map(|_| ()).map_err(|e| e.to_string());
    let (tx, rx) = oneshot::channel();
    let version = answer["version"].as_i64().unwrap_or(0) as i32;
    if !shared.send(Work::OAuth2Tokens { id, version, outcome, reply: tx }) {
        return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The listener is stopping.");
    }
    if !matches!(tokio::time::timeout(shared.timeout(), rx).await, Ok(Ok(()))) {
        return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The database did not answer.");
    }
    match result {
        Ok(()) => page(
            StatusCode::OK,
            "Authorized",
            &format!("pg_ihub holds an access token for {integration}/{name} now. You may close this window."),
        ),
        Err(problem) => {
            page(StatusCode::BAD_GATEWAY, "Authorization failed", &format!("The code was not accepted: {problem}"))
        }
    }
}

/// The overall status (200, or 503 when critical). The checks themselves
/// (endpoint, schedule and source names) only with `detail`: a request
/// carrying the bearer token `ihub.health_token`.
async fn healthz(shared: &Shared, detail: bool) -> Response<Full<Bytes>> {
    let (tx, rx) = oneshot::channel();
    if !shared.send(Work::Health(tx)) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "listener stopping");
    }
    let (ok, body) = match tokio::time::timeout(shared.timeout(), rx).await {
        Ok(Ok(Ok(answer))) => answer,
        _ => return error(StatusCode::SERVICE_UNAVAILABLE, "the database did not answer"),
    };
    let body = if detail { body } else { json!({ "status": body["status"] }) };
    reply(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

/// The worst of the checks' statuses: critical, warning or ok.
fn overall_status<'a>(statuses: impl Iterator<Item = &'a str>) -> &'static str {
    let mut overall = "ok";
    for status in statuses {
        match status {
            "critical" => return "critical",
            "warning" => overall = "warning",
            _ => {}
        }
    }
    overall
}

/// The token of an `Authorization: Bearer <token>` value (scheme in any case).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn cached(shared: &Shared, integration: &str, source: &str) -> Option<Arc<Source>> {
    shared.sources.read().ok()?.get(&(integration.to_string(), source.to_string())).cloned()
}

/// Has the main thread reload the sources and waits for it.
async fn reload(shared: &Shared) {
    let (tx, rx) = oneshot::channel();
    if shared.send(Work::Reload(tx)) {
        let _ = tokio::time::timeout(shared.timeout(), rx).await;
    }
}

/// The source for a path, from a cache that is fresh: reloaded first when a
/// commit changed sources, and once on a miss (maybe created a moment ago).
async fn lookup(shared: &Shared, integration: &str, name: &str) -> Result<Arc<Source>, Response<Full<Bytes>>> {
    if shared.stale() {
        reload(shared).await;
    }
    let source = match cached(shared, integration, name) {
        Some(s) => s,
        None => {
            // Maybe created a moment ago; but unknown paths must not have
            // the sources reloaded for every request.
            if shared.miss_reload_allowed() {
                reload(shared).await;
            }
            match cached(shared, integration, name) {
                Some(s) => s,
                None if !shared.ready.load(Ordering::Relaxed) => {
                    return Err(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "pg_ihub is not installed in the listener's database",
                    ))
                }
                None => return Err(error(StatusCode::NOT_FOUND, "unknown integration or source")),
            }
        }
    };
    if !source.active {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "the integration is disabled"));
    }
    Ok(source)
}

async fn receive(
    req: Request<Incoming>,
    shared: &Shared,
    remote: SocketAddr,
    integration: String,
    name: String,
) -> Response<Full<Bytes>> {
    let mut source = match lookup(shared, &integration, &name).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let run_at = match req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay="))) {
        None => None,
        Some(text) => match text.parse::<f64>() {
            Ok(delay) if (0.0..=31_536_000.0).contains(&delay) => Some(now_secs() + delay),
            _ => return error(StatusCode::BAD_REQUEST, "delay must be a number of seconds"),
        },
    };
    // The URL the sender called, for schemes that sign it (Twilio): as a
    // proxy in front says it was (X-Forwarded-Proto, X-Forwarded-Host),
    // else as it arrived.
    let called_url = {
        let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let scheme = h("x-forwarded-proto").unwrap_or_else(|| "http".into());
        let host = h("x-forwarded-host").or_else(|| h("host")).unwrap_or_default();
        let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        format!("{scheme}://{host}{path}")
    };
    let max_body = shared.max_body.load(Ordering::Relaxed);
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Far too large: refuse at once. Somewhat too large: read it and throw it
    // away first (below), so that a sender still writing can read the 413
    // instead of a reset connection.
    if declared.is_some_and(|n| n > max_body.saturating_mul(DRAIN_FACTOR)) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body larger than ihub.max_body_size");
    }
    let rate = shared.rate_limit.load(Ordering::Relaxed);
    if rate > 0 {
        let burst = shared.burst.load(Ordering::Relaxed) as u32;
        let now = Instant::now();
        let verdict = shared
            .buckets
            .lock()
            .map(|mut b| b.entry(source.id).or_insert_with(|| Bucket::new(burst, now)).take(rate as f64, burst, now));
        if let Ok(Err(wait)) = verdict {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
            );
            return response;
        }
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in req.headers() {
        match v.to_str() {
            Ok(v) => headers.push((k.as_str().to_string(), v.to_string())),
            Err(_) => return error(StatusCode::BAD_REQUEST, "header values must be visible ASCII"),
        }
    }
    let body = match tokio::time::timeout(shared.timeout(), read_body(req.into_body(), max_body)).await {
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the body did not arrive in time"),
        Ok(Err(BodyError::TooLarge)) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body larger than ihub.max_body_size")
        }
        Ok(Err(BodyError::Unreadable)) => return error(StatusCode::BAD_REQUEST, "the body could not be read"),
        Ok(Ok(body)) => body,
    };
    let header = |name: &str| {
        if name == URL_HEADER {
            return Some(called_url.as_str());
        }
        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    };
    // Twice at most: a source dropped (and maybe created again) after the
    // lookup is looked up, and the request verified, once more.
    for pass in 0..2 {
        if pass > 0 {
            source = match lookup(shared, &integration, &name).await {
                Ok(s) => s,
                Err(response) => return response,
            };
        }
        // The secret header of a shared-secret source is masked like any credential.
        let extra = source.rule.header.iter().cloned().collect::<Vec<_>>();
        let stored_headers = Value::Object(
            mask::mask_headers(&headers, &extra).into_iter().map(|(k, v)| (k, Value::String(v))).collect(),
        );
        if let Err(refusal) = verify(&source.rule, header, &body, now_secs() as i64) {
            // Kept bounded: a refused request is not trusted with space.
            let kept = bounds::bounded_headers(&headers, bounds::REJECTION_VALUE_BYTES, bounds::REJECTION_HEADER_BYTES);
            let kept = Value::Object(
                mask::mask_headers(&kept, &extra).into_iter().map(|(k, v)| (k, Value::String(v))).collect(),
            );
            shared.reject(Rejection {
                source: source.id,
                reason: refusal.to_string(),
                remote: remote.ip().to_string(),
                hash: body_hash(&body),
                headers: kept,
            });
            return error(StatusCode::UNAUTHORIZED, &refusal.to_string());
        }
        // A provider's endpoint check (Slack's url_verification) is answered
        // at once, verified, and not queued.
        if let Some((content_type, answer)) = handshake(source.rule.mode, &body) {
            return raw_reply(StatusCode::OK, content_type, Bytes::from(answer));
        }
        let dedup = dedup_key(source.rule.mode, source.id_header.as_deref(), header, &body);
        let (tx, rx) = oneshot::channel();
        let queued = shared.send(Work::Accept {
            source: source.id,
            headers: stored_headers,
            body: body.to_vec(),
            dedup,
            remote: remote.ip().to_string(),
            run_at,
            reply: tx,
        });
        if !queued {
            return error(StatusCode::SERVICE_UNAVAILABLE, "listener stopping");
        }
        match tokio::time::timeout(shared.timeout(), rx).await {
            Ok(Ok(Accepted::Queued(_) | Accepted::Duplicate(_))) if source.response.is_some() => {
                let (status, content_type, body) = source.response.clone().expect("checked");
                return raw_reply(status, &content_type, body);
            }
            Ok(Ok(Accepted::Queued(id))) => return reply(StatusCode::ACCEPTED, json!({ "id": id })),
            Ok(Ok(Accepted::Duplicate(id))) => return reply(StatusCode::OK, json!({ "id": id, "duplicate": true })),
            Ok(Ok(Accepted::SourceGone)) => continue,
            _ => return error(StatusCode::SERVICE_UNAVAILABLE, "could not queue the request; try again"),
        }
    }
    error(StatusCode::NOT_FOUND, "unknown integration or source")
}

/// How far past ihub.max_body_size a body is still read (and thrown away)
/// before the 413, so that the sender sees the answer.
const DRAIN_FACTOR: u64 = 4;

enum BodyError {
    TooLarge,
    Unreadable,
}

/// The body, if it is at most `max` bytes. A larger one is read on without
/// keeping it, up to DRAIN_FACTOR times `max`, then refused.
async fn read_body(mut body: Incoming, max: u64) -> Result<Bytes, BodyError> {
    let mut kept = bytes::BytesMut::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Unreadable)?;
        let Ok(data) = frame.into_data() else { continue };
        total += data.len() as u64;
        if total > max.saturating_mul(DRAIN_FACTOR) {
            return Err(BodyError::TooLarge);
        }
        if total <= max {
            kept.extend_from_slice(&data);
        }
    }
    if total > max {
        return Err(BodyError::TooLarge);
    }
    Ok(kept.freeze())
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_status_is_the_worst_check() {
        assert_eq!(overall_status(["ok", "ok"].into_iter()), "ok");
        assert_eq!(overall_status(["ok", "warning", "ok"].into_iter()), "warning");
        assert_eq!(overall_status(["warning", "critical", "ok"].into_iter()), "critical");
        assert_eq!(overall_status(std::iter::empty()), "ok");
    }

    #[test]
    fn bearer_tokens_are_read_with_any_scheme_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    fn shared_with(token: Option<&str>) -> Shared {
        let (tx, _rx) = mpsc::channel();
        let (reject_tx, _reject_rx) = mpsc::sync_channel(1);
        let (wake, _other) = UnixStream::pair().unwrap();
        Shared {
            sources: RwLock::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            work: Mutex::new(tx),
            rejections: reject_tx,
            connections: Mutex::new(Connections::new()),
            miss_reload: Mutex::new(Throttle::default()),
            wake: Mutex::new(wake),
            ready: AtomicBool::new(false),
            version: None,
            loaded_version: AtomicU64::new(0),
            max_body: AtomicU64::new(0),
            rate_limit: AtomicU64::new(0),
            burst: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(30_000),
            header_timeout_ms: AtomicU64::new(10_000),
            per_address: AtomicU64::new(100),
            health_token: RwLock::new(token.map(|t| sha256(t.as_bytes()))),
            tokens: RwLock::new(Arc::new(oauth2::TokenClient::new(Default::default(), "", "t"))),
            token_timeout_ms: AtomicU64::new(10_000),
        }
    }

    fn auth(value: &str) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn health_detail_needs_the_configured_token() {
        let shared = shared_with(Some("s3cret-token"));
        assert!(shared.health_detail_allowed(&auth("Bearer s3cret-token")));
        assert!(!shared.health_detail_allowed(&auth("Bearer s3cret-tokeN")));
        assert!(!shared.health_detail_allowed(&auth("Bearer s3cret")));
        assert!(!shared.health_detail_allowed(&auth("Basic s3cret-token")));
        assert!(!shared.health_detail_allowed(&hyper::HeaderMap::new()));
        // No token configured: never any detail, whatever is sent.
        let none = shared_with(None);
        assert!(!none.health_detail_allowed(&auth("Bearer ")));
        assert!(!none.health_detail_allowed(&auth("Bearer s3cret-token")));
    }
}
