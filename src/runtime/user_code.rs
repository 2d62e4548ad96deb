//! The one place where a worker runs user code: job functions, scheduled
//! runs and inbound handlers all come through `run_user_call`.
//!
//! Workers connect as the bootstrap superuser. For the whole transaction of
//! a call, commit included, the session *is* the role that asked (session
//! user, outer user and current user), so that code deferred to commit
//! (deferred constraint triggers, WITH HOLD cursors) runs as that role too,
//! and anything queued from inside (`ihub.enqueue`, `ihub.schedule`, ...) is
//! recorded as asked by that role. The security context forbids `SET ROLE`
//! and `SET SESSION AUTHORIZATION` inside, as in a SECURITY DEFINER function.
//! Whatever user code leaves in the session (settings, temporary objects,
//! cursors, prepared statements, LISTEN, advisory locks) is discarded as soon
//! as its transaction ends: the worker's own statements and the next call,
//! which may be another role's, never see it.

use pgrx::prelude::*;
use pgrx::{JsonB, PgOid};

use crate::runtime::backend::{caught_message, run_prepared};

extern "C-unwind" {
    // utils/timeout.h, which pgrx does not bind.
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    // commands/async.h and sequence.h: what DISCARD ALL calls.
    fn Async_UnlistenAll();
    fn ResetSequenceCaches();
}

/// `STATEMENT_TIMEOUT` of `enum TimeoutId` (the same in PostgreSQL 15 to 17).
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
/// The lock method of advisory locks (storage/lock.h).
const USER_LOCKMETHOD: pg_sys::LOCKMETHODID = 2;

/// Marks errors raised by `ihub.retry_later`.
pub const RETRY_LATER: &str = "ihub.retry_later:";

/// Why a job attempt (or a handler call) did not finish.
pub struct Failure {
    pub message: String,
    pub retry_after: Option<f64>,
    /// A deadlock or serialization failure: another transaction was in the
    /// way, which in a batch may be another batch holding what it wrote.
    pub conflict: bool,
}

fn failure_of(e: &pg_sys::panic::CaughtError, timeout_ms: i32) -> Failure {
    let report = match e {
        pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => Some(r),
        _ => None,
    };
    // ihub.retry_later puts its delay (seconds, maybe empty) in the detail.
    let retry_after =
        report.and_then(|r| r.detail()).and_then(|d| d.strip_prefix(RETRY_LATER)).and_then(|s| s.parse().ok());
    let conflict = report.is_some_and(|r| {
        matches!(
            r.sql_error_code(),
            PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED | PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
        )
    });
    let mut message = caught_message(e).to_string();
    if message.contains("statement timeout") {
        message = format!("it ran longer than its timeout ({timeout_ms} ms) and was stopped");
    }
    Failure { message, retry_after, conflict }
}

/// Runs user code (`call`, one statement taking `arg`) in a transaction of
/// its own, as `run_as`, under a timeout, the transaction marked as syncing
/// `syncing` (its integration, if any); then `finish` with the call's jsonb
/// result, as the worker, in the same transaction. An error rolls
/// everything back and is returned.
#[allow(clippy::too_many_arguments)]
pub fn run_user_call(
    call: &str,
    arg_type: PgOid,
    arg: pgrx::datum::DatumWithOid<'_>,
    run_as: pg_sys::Oid,
    timeout_ms: i32,
    syncing: Option<&str>,
    finish: impl FnOnce(Option<JsonB>) + std::panic::UnwindSafe,
) -> Result<(), Failure> {
    let worker = unsafe { pg_sys::GetAuthenticatedUserId() };
    start_transaction();
    let outcome = PgTryBuilder::new(|| {
        become_role(run_as);
        if let Some(integration) = syncing {
            crate::sync::syncing::mark(integration);
        }
        let result = call_with_timeout(call, arg_type, arg, timeout_ms);
        // The worker's own bookkeeping; no user code runs in it.
        as_user(worker, || finish(result));
        // Commits as run_as: deferred triggers and WITH HOLD cursors run
        // with its rights, never the worker's; an error they raise fails the
        // call like any other.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(())
    })
    .catch_others(|e| Err(failure_of(&e, timeout_ms)))
    .execute();
    unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    back_to_worker(worker, outcome.is_err());
    outcome
}

/// Starts the transaction user code runs in, with its snapshot.
fn start_transaction() {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

/// Runs one statement of user code taking `arg`, under `timeout_ms`, and
/// returns its jsonb result. Postgres arms statement_timeout only for
/// client queries; a worker arms the timer itself. When it fires, the query
/// is cancelled.
fn call_with_timeout(sql: &str, arg_type: PgOid, arg: pgrx::datum::DatumWithOid<'_>, timeout_ms: i32) -> Option<JsonB> {
    unsafe { enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms.max(1)) };
    let result = Spi::connect_mut(|client| {
        let rows = run_prepared(client, sql, &[arg_type], &[arg])?;
        rows.into_iter().next().map(|row| row.get::<JsonB>(1)).transpose().map(Option::flatten)
    })
    .expect("the user function ran");
    unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    result
}

/// Ends a call's (or batch's) transaction, rolling it back if it `failed`:
/// back to the worker's own identity, only now that nothing of the
/// transaction is left to run; then nothing of its session state either:
/// the worker's own statements run as the superuser, and a search_path the
/// call left behind would have them find the call's functions first.
fn back_to_worker(worker: pg_sys::Oid, failed: bool) {
    unsafe {
        if failed {
            pg_sys::AbortCurrentTransaction();
        }
        pg_sys::SetUserIdAndSecContext(worker, 0);
        pg_sys::SetSessionAuthorization(worker, true);
        pg_sys::StartTransactionCommand();
        discard_session_state();
        pg_sys::CommitTransactionCommand();
        pg_sys::pgstat_report_stat(false);
    }
}

/// Once a batch has run this long, the calls that ran commit and no further
/// one starts in its transaction: a slow call delays the commit of those
/// before it, never of those after it.
pub const BATCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(50);

/// One call of user code in a batch (see `run_user_batch`).
pub struct UserCall {
    pub sql: String,
    pub arg_type: PgOid,
    pub arg: pgrx::datum::DatumWithOid<'static>,
    pub timeout_ms: i32,
    /// The integration whose handler or job this is (loop prevention).
    pub syncing: Option<String>,
}

/// Runs the calls of `items`, all as `run_as`, in one transaction: one
/// commit (and WAL flush) for the batch instead of one per call, which is
/// what a trivial job or handler cost most (make bench). Each call runs in a
/// subtransaction of its own under its own timeout, its settings end with it
/// (`SET` included), and `finish` records it as the worker inside that
/// subtransaction; a call that fails is rolled back alone and reported.
/// After `budget` no further call starts: the calls that ran commit, and the
/// rest are left to the caller. `around(item, true)` and `around(item,
/// false)` bracket each call.
///
/// Returns each started call's outcome, in order. Err when the batch's own
/// transaction failed, at commit say (a deferred trigger, a WITH HOLD
/// cursor): nothing of it is kept, and the caller runs the calls again one
/// by one (`run_user_call`), so that the failure is the one call's own.
pub fn run_user_batch<T>(
    run_as: pg_sys::Oid,
    items: &[T],
    budget: std::time::Duration,
    call: impl Fn(&T) -> UserCall,
    mut around: impl FnMut(&T, bool),
    finish: impl Fn(&T, Option<JsonB>),
) -> Result<Vec<Result<(), Failure>>, String> {
    let worker = unsafe { pg_sys::GetAuthenticatedUserId() };
    let started = std::time::Instant::now();
    start_transaction();
    let mut outcomes = Vec::with_capacity(items.len());
    let committed = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        become_role(run_as);
        for item in items {
            if !outcomes.is_empty() && started.elapsed() >= budget {
                break;
            }
            around(item, true);
            let outcome = call_in_subtransaction(call(item), worker, |result| finish(item, result));
            around(item, false);
            outcomes.push(outcome);
        }
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(())
    }))
    .catch_others(|e| Err(caught_message(&e).to_string()))
    .execute();
    back_to_worker(worker, committed.is_err());
    committed.map(|()| outcomes)
}

/// One call of a batch in a subtransaction, as the role the transaction
/// runs as; `finish` as the worker.
fn call_in_subtransaction(
    call: UserCall,
    worker: pg_sys::Oid,
    finish: impl FnOnce(Option<JsonB>),
) -> Result<(), Failure> {
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    let timeout_ms = call.timeout_ms;
    let outcome = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        // What the call sets (SET, set_config) ends with it, as if its
        // transaction had ended: the next call never sees it.
        let settings = unsafe { pg_sys::NewGUCNestLevel() };
        if let Some(integration) = &call.syncing {
            crate::sync::syncing::mark(integration);
        }
        let result = call_with_timeout(&call.sql, call.arg_type, call.arg, timeout_ms);
        unsafe { pg_sys::AtEOXact_GUC(false, settings) };
        as_user(worker, || finish(result));
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        restore();
        Ok(())
    }))
    .catch_others(|e| {
        let failure = failure_of(&e, timeout_ms);
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        restore();
        Err(failure)
    })
    .execute();
    outcome
}

/// Makes the session `role`'s for the rest of the transaction: session,
/// outer and current user; role changes refused. The transaction's abort
/// restores the current user; the caller restores the session user.
fn become_role(role: pg_sys::Oid) {
    unsafe {
        let exists = !pg_sys::GetUserNameFromId(role, true).is_null();
        if !exists {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("the role this runs as (oid {}) no longer exists", role.to_u32()),
                "pg_ihub",
            )
            .set_hint("It was dropped after this was queued; queue it again as an existing role.")
            .report(PgLogLevel::ERROR);
        }
        pg_sys::SetSessionAuthorization(role, pg_sys::superuser_arg(role));
        pg_sys::SetUserIdAndSecContext(role, pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
}

/// Runs `f` with `role` as the current user, keeping the security context
/// (so role changes stay refused); an error unwinds through the
/// (sub)transaction abort, which restores the user.
pub fn as_user<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    with_user(role, pg_sys::SECURITY_LOCAL_USERID_CHANGE, f)
}

/// Runs `f` as the bootstrap superuser (the extension's owner) with
/// `search_path = pg_catalog, pg_temp`, as a `SECURITY DEFINER` function
/// with that `SET` clause runs: for internal SQL run on a caller's behalf
/// from a trigger or an event trigger, where the search path is the
/// caller's, which could put the caller's own operators and functions
/// before the built-ins and have the owner run them. The setting ends with
/// `f`, or with the (sub)transaction an error aborts.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
    unsafe {
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
    let result = as_user(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), f);
    unsafe { pg_sys::AtEOXact_GUC(true, guc_level) };
    result
}

/// Runs `f` as `role` in a security-restricted operation, as Postgres runs
/// index expressions and materialized view queries: besides role changes,
/// temporary tables, WITH HOLD cursors and deferred triggers are refused, so
/// nothing of `role`'s outlives the call. For subscription conditions, which
/// run inside the writer's transaction.
pub fn restricted_as<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    with_user(role, pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION, f)
}

fn with_user<R>(role: pg_sys::Oid, context: u32, f: impl FnOnce() -> R) -> R {
    let (mut saved_user, mut saved_context) = (pg_sys::InvalidOid, 0);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(role, saved_context | context as i32);
    }
    let result = f();
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
    result
}

/// What DISCARD ALL does, less what only a client session has: settings,
/// temporary objects, cursors (WITH HOLD ones outlive their transaction),
/// prepared statements, LISTEN and advisory locks left by earlier calls.
fn discard_session_state() {
    unsafe {
        pg_sys::PortalHashTableDeleteAll();
        pg_sys::ResetAllOptions();
        pg_sys::DropAllPreparedStatements();
        Async_UnlistenAll();
        pg_sys::ResetTempTableNamespace();
        pg_sys::LockReleaseSession(USER_LOCKMETHOD);
        // Not ResetPlanCache: the worker's kept plans would all be planned
        // again after every call; plans are checked against search_path and
        // role changes when they are used.
        ResetSequenceCaches();
    }
}
