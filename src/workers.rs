//! The background-worker registry in shared memory, and waking dispatchers
//! at commit. A registry slot holds a worker's pid, latch (by PGPROC number),
//! database and heartbeat, so that any backend can wake the dispatchers of
//! its database and `ihub.workers` can show who is alive.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Free => "free",
            Kind::Dispatcher => "dispatcher",
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

/// True in every process forked from a postmaster that preloaded us.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Set once per transaction that enqueued work; cleared at its end.
static WAKE_REGISTERED: AtomicBool = AtomicBool::new(false);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init_preloaded() {
    PRELOADED.store(true, Ordering::SeqCst);
    pg_shmem_init!(REGISTRY);
    pg_shmem_init!(NEXT_WAKE);
    let workers = settings::DISPATCH_WORKERS.get();
    for db in settings::databases() {
        for n in 0..workers {
            BackgroundWorkerBuilder::new(&format!("pg_ihub dispatcher {n} [{db}]"))
                .set_type("pg_ihub dispatcher")
                .set_library("pg_ihub")
                .set_function("ihub_dispatcher_main")
                .set_argument(n.into_datum())
                .set_extra(&db)
                .enable_spi_access()
                .set_start_time(BgWorkerStartTime::RecoveryFinished)
                // Also restarts a worker stopped with pg_terminate_backend.
                .set_restart_time(Some(std::time::Duration::from_secs(2)))
                .load();
        }
    }
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
                idle: true,
            };
        }
        None => {
            warning!("pg_ihub: worker registry is full; this worker will not be woken at commit")
        }
    }
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
        slot.idle = idle;
    }
}

/// Sets the latch of one idle dispatcher of `dboid`, taking turns. Waking
/// all of them made every commit cost a claim round per worker.
fn wake_dispatchers(dboid: pg_sys::Oid) {
    let reg = REGISTRY.share();
    let idle: Vec<&Slot> = reg
        .slots
        .iter()
        .filter(|s| s.kind == Kind::Dispatcher && s.dboid == dboid && s.procno >= 0 && s.idle)
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

/// Asks for the dispatchers to be woken when the current transaction commits.
/// Called by capture triggers and every function that queues a delivery.
#[pg_extern(name = "_wake", volatile, parallel_unsafe)]
fn wake() {
    wake_at_commit();
}

pub fn wake_at_commit() {
    if !preloaded() || WAKE_REGISTERED.swap(true, Ordering::SeqCst) {
        return;
    }
    let dboid = unsafe { pg_sys::MyDatabaseId };
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        WAKE_REGISTERED.store(false, Ordering::SeqCst);
        wake_dispatchers(dboid);
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || WAKE_REGISTERED.store(false, Ordering::SeqCst));
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
    ),
> {
    let rows: Vec<_> = if preloaded() {
        let reg = REGISTRY.share();
        reg.slots
            .iter()
            .filter(|s| s.kind != Kind::Free)
            .map(|s| (s.pid, s.kind.name().to_string(), s.dboid, to_ts(s.started_ms), to_ts(s.heartbeat_ms)))
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
