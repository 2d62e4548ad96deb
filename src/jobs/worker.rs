//! Background jobs. A job worker claims a batch of due jobs of one role
//! (priority 0 first, then the oldest) with FOR UPDATE SKIP LOCKED, commits
//! the claim, and runs the jobs' SQL functions as that role, under each
//! job's timeout: in one transaction, each job in a subtransaction of its
//! own (`ihub.jobs_per_transaction`; 1 gives each job a transaction of its own).
//! The queue logic is SQL (`sql/jobs.sql`); this module runs the worker and
//! the function calls.

use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{JsonB, PgOid};

use crate::runtime::backend::{column, in_transaction, nullable, run_prepared};
use crate::runtime::registry::{self, Kind};
use crate::runtime::user_code::{run_user_batch, run_user_call, Failure, UserCall, BATCH_BUDGET};
use crate::runtime::worker::{run, Worker};
use crate::settings;
use pg_ihub_core::retry::{job_next, JobAttempt, JobNext};

/// The job this backend is running, 0 when none.
static CURRENT_JOB: AtomicI64 = AtomicI64::new(0);
/// Error and critical entries logged through ihub.log during the current job.
static ERRORS_LOGGED: AtomicI32 = AtomicI32::new(0);

struct Job {
    id: i64,
    call: String,
    args: JsonB,
    run_as: pg_sys::Oid,
    timeout_ms: i32,
    /// Other jobs were due when this one was claimed.
    more_due: bool,
    /// Its integration: what it writes is not sent back there.
    integration: Option<String>,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_job_worker_main(_arg: pg_sys::Datum) {
    run::<JobWorker>();
}

struct JobWorker {
    pid: i32,
    last_rescue: Option<Instant>,
    last_vacuum: Instant,
}

impl Worker for JobWorker {
    const KIND: Kind = Kind::JobWorker;
    const NEEDS: Option<&'static str> = Some("ihub._claim_jobs(integer, integer, integer, integer)");
    // SIGTERM (pg_terminate_backend, shutdown) must stop a running job at
    // once, as in any backend: the job's transaction rolls back, the worker
    // exits and is restarted, and the job is found orphaned and queued again.
    const STOP_AT_ONCE: bool = true;

    fn start() -> Result<Self, String> {
        Ok(JobWorker { pid: unsafe { pg_sys::MyProcPid }, last_rescue: None, last_vacuum: Instant::now() })
    }

    fn round(&mut self, poll: Duration) -> Duration {
        // Jobs whose worker died (crash, termination, restart) go back to
        // the queue: at start, and at the poll cadence.
        if self.last_rescue.is_none_or(|t| t.elapsed() >= poll) {
            in_transaction("rescue jobs", || Spi::run("SELECT ihub._rescue_jobs()"));
            self.last_rescue = Some(Instant::now());
        }
        // One run: jobs until none is due or a bound is reached, then yield.
        let started = Instant::now();
        let max_jobs = settings::MAX_JOBS_PER_RUN.get();
        let max_runtime = Duration::from_secs(settings::MAX_RUNTIME_SECONDS.get() as u64);
        let mut ran = 0;
        while ran < max_jobs && started.elapsed() < max_runtime {
            let (pid, limit) = (self.pid, settings::JOBS_PER_TRANSACTION.get().min(max_jobs - ran).max(1));
            let Some(jobs) = in_transaction("claim jobs", || claim(pid, limit)) else { break };
            if jobs.is_empty() {
                break;
            }
            registry::heartbeat(false);
            if jobs.iter().any(|j| j.more_due) {
                registry::wake_peer(Kind::JobWorker);
            }
            ran += jobs.len() as i32;
            run_batch(jobs, pid);
        }
        if ran == 0 {
            let due = in_transaction("next due job", next_due).flatten();
            return due.map_or(poll, |d| d.min(poll));
        }
        if self.last_vacuum.elapsed() >= Duration::from_secs(2) {
            // Every claimed job leaves a dead entry at the head of the queue
            // index, which each claim steps over until vacuum removes it.
            vacuum_job_table();
            self.last_vacuum = Instant::now();
        }
        Duration::ZERO
    }
}

/// Dead job versions that make a VACUUM of ihub.job worth its cost.
const JOB_DEAD_ROWS: i64 = 10_000;

fn vacuum_job_table() {
    let dead = in_transaction("count dead jobs", || {
        Spi::get_one::<i64>("SELECT pg_catalog.pg_stat_get_dead_tuples('ihub.job'::regclass)")
            .ok()
            .flatten()
            .unwrap_or(0)
    })
    .unwrap_or(0);
    if dead >= JOB_DEAD_ROWS {
        crate::runtime::backend::vacuum("ihub", "job");
    }
}

fn next_due() -> Option<Duration> {
    let secs = Spi::get_one::<f64>("SELECT ihub._next_job_due()").ok().flatten()?;
    Some(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)))
}

fn claim(pid: i32, limit: i32) -> Vec<Job> {
    // The claim need not wait for its WAL flush: the jobs' own commit
    // flushes it, and if both are lost in a crash the jobs are simply pending.
    Spi::connect_mut(|client| {
        let int4 = PgOid::from(pg_sys::INT4OID);
        run_prepared(client, "SET LOCAL synchronous_commit = off", &[], &[]).expect("SET LOCAL runs");
        run_prepared(
            client,
            "SELECT id, call, args, run_as, timeout_ms, more_due, integration FROM ihub._claim_jobs($1, $2, $3, $4)",
            &[int4, int4, int4, int4],
            &[pid.into(), settings::JOB_TIMEOUT_MS.get().into(), limit.into(), settings::JOB_WORKERS.get().into()],
        )
        .unwrap_or_else(|e| error!("ihub._claim_jobs: {e}"))
        .into_iter()
        .map(|row| Job {
            id: column(&row, 1, "id"),
            call: column(&row, 2, "call"),
            args: column(&row, 3, "args"),
            run_as: column(&row, 4, "run_as"),
            timeout_ms: column(&row, 5, "timeout_ms"),
            more_due: column(&row, 6, "more_due"),
            integration: nullable(&row, 7, "integration"),
        })
        .collect()
    })
}

/// Runs claimed jobs (all of one role) in one transaction, then records the
/// failures. A job that failed on a deadlock or serialization failure runs
/// again alone (another batch may have held what it needed); the whole
/// batch runs again job by job if its transaction fails (at commit, say),
/// so that every failure recorded is the job's own. Jobs the batch's time
/// left unstarted go back to the queue for any worker: a long job never
/// keeps the rest of its batch from running elsewhere meanwhile.
fn run_batch(jobs: Vec<Job>, pid: i32) {
    if jobs.len() == 1 {
        return jobs.into_iter().for_each(|job| run_job(job, pid));
    }
    let outcomes = run_user_batch(
        jobs[0].run_as,
        &jobs,
        BATCH_BUDGET,
        |job| UserCall {
            sql: job.call.clone(),
            arg_type: PgOid::from(pg_sys::JSONBOID),
            arg: JsonB(job.args.0.clone()).into(),
            timeout_ms: job.timeout_ms,
            syncing: job.integration.clone(),
        },
        |job, starting| if starting { job_started(job) } else { job_ended() },
        |job, result| record_done(job.id, pid, result),
    );
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(message) => {
            warning!("pg_ihub: a batch of {} jobs did not commit ({message}); running them one by one", jobs.len());
            return jobs.into_iter().for_each(|job| run_job(job, pid));
        }
    };
    let ran = outcomes.len();
    let mut jobs = jobs.into_iter();
    for (job, outcome) in jobs.by_ref().take(ran).zip(outcomes) {
        match outcome {
            Ok(()) => {}
            Err(failure) if failure.conflict => run_job(job, pid),
            Err(failure) => record_failure_of(job.id, pid, &failure),
        }
    }
    let rest: Vec<i64> = jobs.map(|job| job.id).collect();
    if !rest.is_empty() {
        in_transaction("give back unstarted jobs", || {
            Spi::run_with_args("SELECT ihub._unclaim_jobs($1, $2)", &[rest.clone().into(), pid.into()])
        });
    }
}

/// The job is this worker's current one: in pg_stat_activity, the
/// registry (for ihub.cancel_job) and what ihub.log and job_progress count.
fn job_started(job: &Job) {
    crate::runtime::backend::report_activity(Some(&format!("job {}: {}", job.id, job.call)));
    CURRENT_JOB.store(job.id, Ordering::SeqCst);
    ERRORS_LOGGED.store(0, Ordering::SeqCst);
    // A failed job never reads its progress back: clear it for this one.
    for p in &PROGRESS {
        p.store(-1, Ordering::SeqCst);
    }
    registry::set_job(job.id, -1, -1);
}

/// The job's code has ended. From now on ihub.cancel_job and
/// ihub.resume_stuck_jobs see that this worker runs no job, and leave it
/// alone: a cancel would only cancel the recording, or the next job. A
/// cancel sent before the registry said so was meant for the job's code and
/// is forgotten.
fn job_ended() {
    CURRENT_JOB.store(0, Ordering::SeqCst);
    registry::set_job(0, 0, 0);
    clear_pending_cancel();
    crate::runtime::backend::report_activity(None);
}

/// Runs one job in a transaction of its own and records how it went.
fn run_job(job: Job, pid: i32) {
    job_started(&job);
    let id = job.id;
    let outcome = attempt(job, pid);
    job_ended();
    if let Err(failure) = outcome {
        record_failure_of(id, pid, &failure);
    }
}

/// Records a failed attempt in a transaction of its own. A cancel that
/// still arrives during the recording cancels it once; the second try is
/// not signalled any more (the registry says no job runs). Unrecorded, the
/// job would stay running for as long as this worker lives: the rescue takes
/// only jobs whose worker is gone.
fn record_failure_of(id: i64, pid: i32, failure: &Failure) {
    for _ in 0..RECORD_TRIES {
        clear_pending_cancel();
        if in_transaction("record a job's failure", || record_failure(id, pid, failure)).is_some() {
            clear_pending_cancel();
            return;
        }
    }
    clear_pending_cancel();
    warning!("pg_ihub: could not record the failure of job {id}; it stays running until this worker stops");
}

/// Tries at recording a failed attempt.
const RECORD_TRIES: usize = 2;

/// Forgets a query cancel (pg_cancel_backend) that reached this worker for
/// a job whose code has ended.
fn clear_pending_cancel() {
    unsafe { pg_sys::QueryCancelPending = 0 };
}

/// Decides what follows a failed attempt (`pg_ihub_core::retry::job_next`)
/// and records it, with the job locked.
fn record_failure(id: i64, pid: i32, failure: &Failure) {
    let (int4, int8) = (PgOid::from(pg_sys::INT4OID), PgOid::from(pg_sys::INT8OID));
    Spi::connect_mut(|client| {
        let rows = run_prepared(
            client,
            "SELECT attempts, max_attempts, cancel_requested, schedule_s FROM ihub._job_attempt($1, $2)",
            &[int8, int4],
            &[id.into(), pid.into()],
        )
        .unwrap_or_else(|e| error!("ihub._job_attempt: {e}"));
        // Not ours any more (cancelled and rescued meanwhile): nothing to record.
        let Some(row) = rows.into_iter().next() else { return };
        let attempt = JobAttempt {
            attempts: column::<i32>(&row, 1, "attempts").max(0) as u32,
            max_attempts: column::<i32>(&row, 2, "max_attempts").max(1) as u32,
            cancel_requested: column(&row, 3, "cancel_requested"),
            schedule: column::<Vec<f64>>(&row, 4, "schedule_s")
                .into_iter()
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9)))
                .collect(),
        };
        let cap = Duration::from_secs(settings::JOB_BACKOFF_CAP_S.get().max(0) as u64);
        let retry_after = failure.retry_after.map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9)));
        let (state, delay) = match job_next(&attempt, retry_after, cap) {
            JobNext::Cancelled => ("cancelled", None),
            JobNext::Failed => ("failed", None),
            JobNext::Retry { after } => ("retry", Some(after.as_secs_f64())),
        };
        let text = PgOid::from(pg_sys::TEXTOID);
        run_prepared(
            client,
            "SELECT ihub._job_failed($1, $2, $3, $4, $5)",
            &[int8, int4, text, text, PgOid::from(pg_sys::FLOAT8OID)],
            &[id.into(), pid.into(), failure.message.clone().into(), state.into(), delay.into()],
        )
        .unwrap_or_else(|e| error!("ihub._job_failed: {e}"));
    })
}

/// The job's own transaction: its function and, if that succeeds, its
/// `done` (or `partial`) state, committed together.
fn attempt(job: Job, pid: i32) -> Result<(), Failure> {
    let id = job.id;
    let syncing = job.integration.as_deref();
    run_user_call(
        &job.call,
        PgOid::from(pg_sys::JSONBOID),
        job.args.into(),
        job.run_as,
        job.timeout_ms,
        syncing,
        |result| record_done(id, pid, result),
    )
}

/// Records a job as done (or partial), with its result and progress, in its
/// transaction (or subtransaction).
fn record_done(id: i64, pid: i32, result: Option<JsonB>) {
    let (done, total) = progress();
    Spi::connect_mut(|client| {
        let (int4, int8) = (PgOid::from(pg_sys::INT4OID), PgOid::from(pg_sys::INT8OID));
        run_prepared(
            client,
            "SELECT ihub._job_done($1, $2, $3, $4, $5, $6)",
            &[int8, int4, PgOid::from(pg_sys::JSONBOID), int4, int8, int8],
            &[
                id.into(),
                pid.into(),
                result.into(),
                ERRORS_LOGGED.load(Ordering::SeqCst).into(),
                done.into(),
                total.into(),
            ],
        )
        .map(|_| ())
    })
    .expect("ihub._job_done");
}

static PROGRESS: [AtomicI64; 2] = [AtomicI64::new(-1), AtomicI64::new(-1)];

/// The current job's last reported progress.
fn progress() -> (Option<i64>, Option<i64>) {
    let get = |i: usize| Some(PROGRESS[i].swap(-1, Ordering::SeqCst)).filter(|v| *v >= 0);
    (get(0), get(1))
}

/// The job this session is running (NULL outside a job).
#[pg_extern(name = "_current_job", stable, parallel_safe)]
fn current_job() -> Option<i64> {
    Some(CURRENT_JOB.load(Ordering::SeqCst)).filter(|id| *id > 0)
}

/// Counts an error logged during the current job, which makes it `partial`.
#[pg_extern(name = "_count_logged", volatile)]
fn count_logged(level: &str) {
    if CURRENT_JOB.load(Ordering::SeqCst) > 0 && matches!(level, "error" | "critical") {
        ERRORS_LOGGED.fetch_add(1, Ordering::SeqCst);
    }
}

/// Reports the current job's progress; visible in ihub.jobs while it runs.
/// Returns false (and does nothing) outside a job.
#[pg_extern(volatile)]
fn job_progress(done: i64, total: default!(Option<i64>, "NULL")) -> bool {
    let job = CURRENT_JOB.load(Ordering::SeqCst);
    if job == 0 {
        return false;
    }
    PROGRESS[0].store(done.max(0), Ordering::SeqCst);
    PROGRESS[1].store(total.unwrap_or(-1).max(-1), Ordering::SeqCst);
    registry::set_job(job, done.max(0), total.unwrap_or(-1));
    true
}

/// `ihub.job_timeout` in milliseconds.
#[pg_extern(name = "_job_timeout_ms", stable)]
fn job_timeout_ms() -> i32 {
    settings::JOB_TIMEOUT_MS.get()
}
