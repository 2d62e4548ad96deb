//! The background-worker registry in shared memory, and waking dispatchers
//! at commit. A registry slot holds a worker's pid, latch (by PGPROC number),
//! database and heartbeat, so that any backend can wake the dispatchers of
//! its database and `ihub.workers` can show who is alive.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PGRXSharedMemory, PgAtomic, PgLwLock, PgXactCallbackEvent};

use crate::error::IhubError;
use crate::settings;

const MAX_SLOTS: usize = 128;

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Kind {
    Free = 0,
    Dispatcher = 1,
    JobWorker = 2,
    Scheduler = 3,
    Maintenance = 4,
    Listener = 5,
    Processor = 6,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Free => "free",
            Kind::Dispatcher => "dispatcher",
            Kind::JobWorker => "job worker",
            Kind::Scheduler => "scheduler",
            Kind::Maintenance => "maintenance",
            Kind::Listener => "listener",
            Kind::Processor => "processor",
        }
    }
}

#[derive(Copy, Clone)]
pub struct Slot {
    kind: Kind,
    pid: i32,
    procno: i32,
    dboid: pg_sys::Oid,
    started_ms: i64,
    heartbeat_ms: i64,
    /// Set before each claim and cleared when it found work: a worker with
    /// work claims again when it is done, so only idle ones need waking.
    idle: bool,
    /// When the worker last stopped being idle (ms since the epoch).
    busy_since_ms: i64,
    /// The job a job worker is running, and its reported progress.
    job_id: i64,
    progress_done: i64,
    progress_total: i64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            kind: Kind::Free,
            pid: 0,
            procno: -1,
            dboid: pg_sys::InvalidOid,
            started_ms: 0,
            heartbeat_ms: 0,
            idle: true,
            busy_since_ms: 0,
            job_id: 0,
            progress_done: 0,
            progress_total: 0,
        }
    }
}

#[derive(Copy, Clone)]
pub struct Registry {
    slots: [Slot; MAX_SLOTS],
}

impl Default for Registry {
    fn default() -> Self {
        Registry { slots: [Slot::default(); MAX_SLOTS] }
    }
}

unsafe impl PGRXSharedMemory for Registry {}

static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_ihub_registry") };

/// Spreads wakeups over the idle dispatchers.
static NEXT_WAKE: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_ihub_next_wake") };

/// Bumped at the commit of every change to inbound sources, their secrets or
/// integration states: the listener compares it with the version it loaded.
static SOURCES_VERSION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_ihub_sources_version") };
/// One bit per worker kind: work was committed for that kind since a worker
/// of it last looked (see `take_work_committed`). Any database: a spurious
/// extra round costs less than a missed one.
static WORK_COMMITTED: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_ihub_work_committed") };

/// True in every process forked from a postmaster that preloaded us.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Per kind of worker: set once per transaction that enqueued work for it;
/// cleared at the transaction's end.
static WAKE_DISPATCHER: AtomicBool = AtomicBool::new(false);
static WAKE_JOB_WORKER: AtomicBool = AtomicBool::new(false);
static WAKE_SCHEDULER: AtomicBool = AtomicBool::new(false);
static WAKE_MAINTENANCE: AtomicBool = AtomicBool::new(false);
static WAKE_PROCESSOR: AtomicBool = AtomicBool::new(false);
static SOURCES_CHANGED: AtomicBool = AtomicBool::new(false);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init_preloaded() {
    PRELOADED.store(true, Ordering::SeqCst);
    pg_shmem_init!(REGISTRY);
    pg_shmem_init!(NEXT_WAKE);
    pg_shmem_init!(SOURCES_VERSION);
    pg_shmem_init!(WORK_COMMITTED);
    crate::inbound::listener::init_shmem();
    for db in settings::databases() {
        for n in 0..settings::DISPATCH_WORKERS.get() {
            start_worker("dispatcher", n, &db, "ihub_dispatcher_main");
        }
        for n in 0..settings::JOB_WORKERS.get() {
            start_worker("job worker", n, &db, "ihub_job_worker_main");
        }
        start_worker("scheduler", 0, &db, "ihub_scheduler_main");
        start_worker("maintenance", 0, &db, "ihub_maintenance_main");
        for n in 0..settings::INBOUND_PROCESSORS.get() {
            start_worker("processor", n, &db, "ihub_processor_main");
        }
    }
    // One HTTP listener for the server, serving the first database listed.
    if let Some(db) = settings::databases().first() {
        if !settings::listen_address().is_empty() {
            start_worker("listener", 0, db, "ihub_listener_main");
        }
    }
}

fn start_worker(kind: &str, n: i32, db: &str, function: &str) {
    BackgroundWorkerBuilder::new(&format!("pg_ihub {kind} {n} [{db}]"))
        .set_type(&format!("pg_ihub {kind}"))
        .set_library("pg_ihub")
        .set_function(function)
        .set_argument(n.into_datum())
        .set_extra(db)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // Also restarts a worker stopped with pg_terminate_backend.
        .set_restart_time(Some(std::time::Duration::from_secs(2)))
        .load();
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::SeqCst)
}

fn current_database() -> String {
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Raises unless background workers serve the current database.
pub fn require_workers() {
    if !preloaded() {
        IhubError::NotPreloaded.raise();
    }
    let db = current_database();
    if !settings::databases().iter().any(|d| *d == db) || settings::DISPATCH_WORKERS.get() == 0 {
        IhubError::DatabaseNotServed(db).raise();
    }
}

/// Claims a registry slot for this worker process.
pub fn register(kind: Kind) {
    crate::runtime::backend::set_application_name();
    let mut reg = REGISTRY.exclusive();
    let pid = unsafe { pg_sys::MyProcPid };
    // A slot left by a worker that crashed carries its old pid: reuse it.
    let slot = reg.slots.iter_mut().find(|s| s.kind == Kind::Free || s.pid == pid);
    match slot {
        Some(slot) => {
            *slot = Slot {
                kind,
                pid,
                procno: unsafe { (*pg_sys::MyProc).pgprocno },
                dboid: unsafe { pg_sys::MyDatabaseId },
                started_ms: now_ms(),
                heartbeat_ms: now_ms(),
                ..Slot::default()
            };
        }
        None => {
            warning!("pg_ihub: worker registry is full; this worker will not be woken at commit")
        }
    }
    drop(reg);
    // However the worker ends (pg_terminate_backend ends a running job or
    // handler at once, without returning to its loop), its slot is freed.
    unsafe { pg_sys::before_shmem_exit(Some(unregister_at_exit), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn unregister_at_exit(_code: std::os::raw::c_int, _arg: pg_sys::Datum) {
    unregister();
}

pub fn unregister() {
    let pid = unsafe { pg_sys::MyProcPid };
    let mut reg = REGISTRY.exclusive();
    for slot in reg.slots.iter_mut().filter(|s| s.pid == pid) {
        *slot = Slot::default();
    }
}

/// Records a heartbeat and whether this worker is idle (see `Slot::idle`).
pub fn heartbeat(idle: bool) {
    let pid = unsafe { pg_sys::MyProcPid };
    let mut reg = REGISTRY.exclusive();
    if let Some(slot) = reg.slots.iter_mut().find(|s| s.pid == pid && s.kind != Kind::Free) {
        slot.heartbeat_ms = now_ms();
        if slot.idle && !idle {
            slot.busy_since_ms = slot.heartbeat_ms;
        }
        slot.idle = idle;
    }
}

/// Wakes one idle worker of this worker's kind and database, if there is
/// one: called when there is more work than this worker is taking, since a
/// single commit (a bulk insert, say) wakes only one worker.
pub fn wake_peer(kind: Kind) {
    wake_one(kind, unsafe { pg_sys::MyDatabaseId });
}

/// Whether work for this kind was committed (or a peer asked for help)
/// since the last call, clearing the flag. A worker that ends a round with
/// less than a full batch sleeps only when this says no: commits made
/// while every worker was busy woke nobody.
pub fn take_work_committed(kind: Kind) -> bool {
    preloaded() && WORK_COMMITTED.get().fetch_and(!(1 << kind as u32), Ordering::SeqCst) & (1 << kind as u32) != 0
}

/// Whether work for this kind was committed since a worker last took the
/// flag, leaving it set.
pub fn work_committed(kind: Kind) -> bool {
    preloaded() && WORK_COMMITTED.get().load(Ordering::SeqCst) & (1 << kind as u32) != 0
}

/// At commit: wakes a worker for the work just committed. Dispatcher
/// rounds are short, so while one has been in a round for less than
/// `GATHER_MS` the commit only raises the flag, and that dispatcher takes
/// the work when its round is done, together with whatever else was
/// committed meanwhile (a dispatcher whose batch is slow to send wakes a
/// peer itself). Waking an idle dispatcher for every commit made two
/// dispatchers run rounds of 7 deliveries while 4 clients wrote single
/// rows, 2,952 tps; one dispatcher alone gathered 28 per round, 4,331 tps
/// (make bench). Waiting for a round of any length put commit-to-receipt
/// p99 at 11-21 ms in 3 runs of 8 (a slow round holds every commit made
/// meanwhile); 20 ms keeps 15-18 per round and p99 at 4-6 ms, while 5 ms,
/// shorter than a round under load, gathered 9-11 and took writers from
/// about 2x back to 2.4-3.3x.
fn wake_for_commit(kind: Kind, dboid: pg_sys::Oid) {
    if kind == Kind::Dispatcher {
        WORK_COMMITTED.get().fetch_or(1 << kind as u32, Ordering::SeqCst);
        let now = now_ms();
        let gathering = REGISTRY.share().slots.iter().any(|s| {
            s.kind == kind && s.dboid == dboid && s.procno >= 0 && !s.idle && now - s.busy_since_ms < GATHER_MS
        });
        if gathering {
            return;
        }
    }
    wake_one(kind, dboid);
}

/// See `wake_for_commit`.
const GATHER_MS: i64 = 20;

/// Sets the latch of one idle worker of a kind in `dboid`, taking turns.
/// Waking all of them made every commit cost a claim round per worker.
fn wake_one(kind: Kind, dboid: pg_sys::Oid) {
    // First the flag, then the latch: a worker finishing a round marks
    // itself idle, then takes the flag, so it either sees the flag or is
    // seen idle here.
    WORK_COMMITTED.get().fetch_or(1 << kind as u32, Ordering::SeqCst);
    let me = unsafe { pg_sys::MyProcPid };
    let reg = REGISTRY.share();
    let idle: Vec<&Slot> = reg
        .slots
        .iter()
        .filter(|s| s.kind == kind && s.dboid == dboid && s.procno >= 0 && s.idle && s.pid != me)
        .collect();
    if idle.is_empty() {
        return; // every dispatcher is busy and will claim again when done
    }
    let turn = NEXT_WAKE.get().fetch_add(1, Ordering::Relaxed) as usize % idle.len();
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(idle[turn].procno as usize);
        // A stale slot (worker gone) points at a PGPROC another process may
        // use now; setting its latch only causes a spurious wakeup there.
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

/// Asks for a dispatcher to be woken when the current transaction commits.
/// Called by capture triggers and every function that queues a delivery.
#[pg_extern(name = "_wake", volatile, parallel_unsafe)]
fn wake() {
    wake_at_commit(Kind::Dispatcher);
}

/// Asks for a job worker to be woken at commit (a job was queued).
#[pg_extern(name = "_wake_job_worker", volatile, parallel_unsafe)]
fn wake_job_worker() {
    wake_at_commit(Kind::JobWorker);
}

/// Asks for an inbound processor to be woken at commit (an item was queued).
#[pg_extern(name = "_wake_processor", volatile, parallel_unsafe)]
pub fn wake_processor() {
    wake_at_commit(Kind::Processor);
}

/// Asks for the scheduler to be woken at commit (a schedule changed).
#[pg_extern(name = "_wake_scheduler", volatile, parallel_unsafe)]
fn wake_scheduler() {
    wake_at_commit(Kind::Scheduler);
}

/// Asks for the maintenance worker to be woken at commit (an OAuth2
/// credential wants a token request).
#[pg_extern(name = "_wake_maintenance", volatile, parallel_unsafe)]
pub fn wake_maintenance() {
    wake_at_commit(Kind::Maintenance);
}

/// The shared sources version, when preloaded. The listener's HTTP threads
/// read it directly: it is a plain atomic in shared memory.
pub fn sources_version() -> Option<&'static AtomicU64> {
    preloaded().then(|| SOURCES_VERSION.get())
}

/// Called (by triggers) when sources, secrets or integration states change:
/// at commit the version moves on and the listener is woken to reload.
#[pg_extern(name = "_sources_changed", volatile, parallel_unsafe)]
fn sources_changed() {
    if !preloaded() || SOURCES_CHANGED.swap(true, Ordering::SeqCst) {
        return;
    }
    let dboid = unsafe { pg_sys::MyDatabaseId };
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        SOURCES_CHANGED.store(false, Ordering::SeqCst);
        SOURCES_VERSION.get().fetch_add(1, Ordering::SeqCst);
        wake_one(Kind::Listener, dboid);
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || SOURCES_CHANGED.store(false, Ordering::SeqCst));
}

pub fn wake_at_commit(kind: Kind) {
    let flag: &'static AtomicBool = match kind {
        Kind::JobWorker => &WAKE_JOB_WORKER,
        Kind::Scheduler => &WAKE_SCHEDULER,
        Kind::Maintenance => &WAKE_MAINTENANCE,
        Kind::Processor => &WAKE_PROCESSOR,
        _ => &WAKE_DISPATCHER,
    };
    if !preloaded() || flag.swap(true, Ordering::SeqCst) {
        return;
    }
    let dboid = unsafe { pg_sys::MyDatabaseId };
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        flag.store(false, Ordering::SeqCst);
        wake_for_commit(kind, dboid);
    });
    register_xact_callback(PgXactCallbackEvent::Abort, move || flag.store(false, Ordering::SeqCst));
}

/// Whether a backend or worker with this pid runs now, read from the proc
/// array at the moment of the call. Rescues use it rather than
/// pg_stat_activity, whose contents are a snapshot taken once per
/// transaction: a worker started after that snapshot looked dead, and a
/// rescue re-checking a row it had just claimed queued it a second time.
#[pg_extern(name = "_pid_alive", volatile, parallel_safe)]
fn pid_alive(pid: Option<i32>) -> bool {
    match pid {
        Some(pid) if pid > 0 => unsafe { !pg_sys::BackendPidGetProc(pid).is_null() },
        _ => false,
    }
}

/// Records the job this worker runs and its progress, for ihub.jobs.
pub fn set_job(job_id: i64, done: i64, total: i64) {
    let pid = unsafe { pg_sys::MyProcPid };
    let mut reg = REGISTRY.exclusive();
    if let Some(slot) = reg.slots.iter_mut().find(|s| s.pid == pid && s.kind != Kind::Free) {
        slot.job_id = job_id;
        slot.progress_done = done;
        slot.progress_total = total;
    }
}

#[pg_extern(name = "_require_workers", volatile)]
fn require_workers_sql() {
    require_workers();
}

/// Registered workers, their database and heartbeat.
#[pg_extern(name = "_workers", volatile)]
fn workers_sql() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(kind, String),
        name!(database_oid, pg_sys::Oid),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_heartbeat, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(job_id, Option<i64>),
        name!(progress_done, Option<i64>),
        name!(progress_total, Option<i64>),
    ),
> {
    let rows: Vec<_> = if preloaded() {
        let reg = REGISTRY.share();
        reg.slots
            .iter()
            .filter(|s| s.kind != Kind::Free)
            .map(|s| {
                let job = (s.job_id > 0).then_some(s.job_id);
                let progress = |v: i64| job.and((v >= 0).then_some(v));
                (
                    s.pid,
                    s.kind.name().to_string(),
                    s.dboid,
                    to_ts(s.started_ms),
                    to_ts(s.heartbeat_ms),
                    job,
                    progress(s.progress_done),
                    progress(s.progress_total),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    TableIterator::new(rows)
}

fn to_ts(ms: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    // Postgres timestamps count microseconds from 2000-01-01.
    pgrx::datum::TimestampWithTimeZone::try_from((ms - 946_684_800_000) * 1000).ok()
}
