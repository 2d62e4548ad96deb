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
}

/// Runs user code (`call`, one statement taking `arg`) in a transaction of
/// its own, as `run_as`, under a timeout; then `finish` with the call's jsonb
/// result, as the worker, in the same transaction. An error rolls
/// everything back and is returned.
pub fn run_user_call(
    call: &str,
    arg_type: PgOid,
    arg: pgrx::datum::DatumWithOid<'_>,
    run_as: pg_sys::Oid,
    timeout_ms: i32,
    finish: impl FnOnce(Option<JsonB>) + std::panic::UnwindSafe,
) -> Result<(), Failure> {
    let worker = unsafe { pg_sys::GetAuthenticatedUserId() };
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = PgTryBuilder::new(|| {
        become_role(run_as);
        // Postgres arms statement_timeout only for client queries; a worker
        // arms the timer itself. When it fires, the query is cancelled.
        unsafe { enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms.max(1)) };
        let result = Spi::connect_mut(|client| {
            let rows = run_prepared(client, call, &[arg_type], &[arg])?;
            rows.into_iter().next().map(|row| row.get::<JsonB>(1)).transpose().map(Option::flatten)
        })
        .expect("the user function ran");
        unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
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
    .catch_others(|e| {
        let detail = match &e {
            pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                r.detail().map(str::to_string)
            }
            _ => None,
        };
        // ihub.retry_later puts its delay (seconds, maybe empty) in the detail.
        let retry_after = detail.as_deref().and_then(|d| d.strip_prefix(RETRY_LATER)).and_then(|s| s.parse().ok());
        let mut message = caught_message(&e).to_string();
        if message.contains("statement timeout") {
            message = format!("it ran longer than its timeout ({timeout_ms} ms) and was stopped");
        }
        Err(Failure { message, retry_after })
    })
    .execute();
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        if outcome.is_err() {
            pg_sys::AbortCurrentTransaction();
        }
        // Back to the worker's own identity, only now that nothing of the
        // call's transaction is left to run.
        pg_sys::SetUserIdAndSecContext(worker, 0);
        pg_sys::SetSessionAuthorization(worker, true);
        // Then nothing of the call's session state either: the worker's own
        // statements run as the superuser, and a search_path the call left
        // behind would have them find the call's functions first.
        pg_sys::StartTransactionCommand();
        discard_session_state();
        pg_sys::CommitTransactionCommand();
        pg_sys::pgstat_report_stat(false);
    }
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
