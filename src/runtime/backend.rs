//! Plumbing shared by pg_ihub's background workers: transactions that
//! survive errors, sleeping on the latch, session settings, and VACUUM.

use std::panic::{RefUnwindSafe, UnwindSafe};
use std::time::Duration;

use pgrx::prelude::*;

/// True once SIGTERM arrived (pgrx's handler sets this flag and the latch).
pub fn shutdown_requested() -> bool {
    unsafe { (&raw const pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Sleeps on the latch; woken by commits that enqueued, by signals, or by the timeout.
pub fn wait(timeout: Duration) {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis().max(1) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// The message of an error caught from Postgres or a Rust panic.
pub fn caught_message(e: &pg_sys::panic::CaughtError) -> &str {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r)
        | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message(),
    }
}

thread_local! {
    /// Steps of this worker that failed so far (see `in_transaction`).
    static FAILED_STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many steps of this worker failed so far: the runtime backs off
/// while rounds keep failing.
pub fn failed_steps() -> u64 {
    FAILED_STEPS.with(|n| n.get())
}

/// Runs `f` in its own transaction. An error is logged as a WARNING naming
/// the worker and the step ("pg_ihub dispatcher 0: claim: ...") and the
/// transaction rolled back, so that one bad batch never stops the worker.
pub fn in_transaction<R>(step: &str, f: impl FnOnce() -> R + UnwindSafe + RefUnwindSafe) -> Option<R> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(|| Some(f()))
        .catch_others(|e| {
            warning!("{}: {step}: {}", worker_label(), caught_message(&e));
            FAILED_STEPS.with(|n| n.set(n.get() + 1));
            None
        })
        .execute();
    unsafe {
        if result.is_some() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
        // Backends flush their table statistics between commands; a worker
        // must do it itself, or autovacuum never learns of the rows it
        // inserts and deletes. At most once a second unless forced.
        pg_sys::pgstat_report_stat(false);
    }
    result
}

pub fn set_session(name: &str, value: &str) {
    let name = std::ffi::CString::new(name).expect("no NUL");
    let value = std::ffi::CString::new(value).expect("no NUL");
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// A plain `VACUUM (SKIP_LOCKED, TRUNCATE false)` of one table. VACUUM runs
/// its own transactions and must be called at top level, the way
/// PostgresMain calls it: inside a started transaction command. It never
/// blocks writers; SKIP_LOCKED leaves a table another vacuum holds, and
/// TRUNCATE false keeps it from waiting for a lock to shrink the file.
pub fn vacuum(schema: &str, table: &str) {
    let (Ok(schema), Ok(table)) = (std::ffi::CString::new(schema), std::ffi::CString::new(table)) else { return };
    // SKIP_LOCKED reports a table it skipped as a WARNING; another worker or
    // autovacuum being at it is no news, so keep that out of the server log.
    set_session("log_min_messages", "error");
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let done = PgTryBuilder::new(|| unsafe {
        let option = |name: &std::ffi::CStr, value: &std::ffi::CStr| {
            pg_sys::makeDefElem(
                pg_sys::pstrdup(name.as_ptr()),
                pg_sys::makeString(pg_sys::pstrdup(value.as_ptr())).cast(),
                -1,
            )
        };
        let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::VacuumStmt>()).cast::<pg_sys::VacuumStmt>();
        (*stmt).type_ = pg_sys::NodeTag::T_VacuumStmt;
        (*stmt).is_vacuumcmd = true;
        (*stmt).options = pg_sys::lappend(
            pg_sys::lappend(std::ptr::null_mut(), option(c"skip_locked", c"true").cast()),
            option(c"truncate", c"false").cast(),
        );
        let relation = pg_sys::makeRangeVar(pg_sys::pstrdup(schema.as_ptr()), pg_sys::pstrdup(table.as_ptr()), -1);
        (*stmt).rels = pg_sys::lappend(
            std::ptr::null_mut(),
            pg_sys::makeVacuumRelation(relation, pg_sys::InvalidOid, std::ptr::null_mut()).cast(),
        );
        // VACUUM keeps its working memory under PortalContext, which must
        // outlive the transactions it commits.
        let saved = pg_sys::PortalContext;
        pg_sys::PortalContext = pg_sys::TopMemoryContext;
        pg_sys::ExecVacuum(pg_sys::make_parsestate(std::ptr::null_mut()), stmt, true);
        pg_sys::PortalContext = saved;
        true
    })
    .catch_others(|e| {
        if let pg_sys::panic::CaughtError::PostgresError(r) = &e {
            warning!(
                "pg_ihub: vacuum of {}.{} failed: {}",
                schema.to_string_lossy(),
                table.to_string_lossy(),
                r.message()
            );
        }
        false
    })
    .execute();
    unsafe {
        if done {
            if pg_sys::ActiveSnapshotSet() {
                pg_sys::PopActiveSnapshot();
            }
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::PortalContext = std::ptr::null_mut();
            pg_sys::AbortCurrentTransaction();
        }
    }
    // RESET, not the old value set again: a session value would outrank the
    // configuration file, and later changes to it would never apply here.
    unsafe {
        pg_sys::SetConfigOption(
            c"log_min_messages".as_ptr(),
            std::ptr::null(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

thread_local! {
    /// Statements prepared once per worker (SPI_keepplan), by their text.
    static PLANS: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<pgrx::spi::OwnedPreparedStatement>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Runs `sql` from a plan prepared on first use and kept for the worker's
/// life: a worker runs the same few statements thousands of times a second,
/// and parsing and planning them each time was most of its CPU.
///
/// Re-entrant: the statement may run user code (a job function) that fires
/// a capture trigger using this cache too, so no borrow of the cache is held
/// while it runs.
pub fn run_prepared<'conn>(
    client: &mut pgrx::spi::SpiClient<'conn>,
    sql: &str,
    types: &[pgrx::PgOid],
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> pgrx::spi::SpiResult<pgrx::spi::SpiTupleTable<'conn>> {
    let cached = PLANS.with(|plans| plans.borrow().get(sql).cloned());
    let statement = match cached {
        Some(statement) => statement,
        None => {
            let statement = std::rc::Rc::new(client.prepare_mut(sql, types)?.keep());
            PLANS.with(|plans| {
                let mut plans = plans.borrow_mut();
                // Job functions are many but few; never let the cache grow without bound.
                if plans.len() >= 1000 {
                    plans.clear();
                }
                plans.insert(sql.to_string(), statement.clone());
            });
            statement
        }
    };
    client.update(&*statement, None, args)
}

/// Runs `f` in a subtransaction, as PL/pgSQL runs a block with an EXCEPTION
/// clause: an error rolls back only what `f` did and is returned.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R + UnwindSafe + RefUnwindSafe) -> Result<R, String> {
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    PgTryBuilder::new(|| {
        let result = f();
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        restore();
        Ok(result)
    })
    .catch_others(|e| {
        let message = caught_message(&e).to_string();
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        restore();
        Err(message)
    })
    .execute()
}

/// Shows what this worker does in pg_stat_activity (`query`, `state`
/// active), or that it is idle: "job 42: ...", "dispatching 500 deliveries".
pub fn report_activity(activity: Option<&str>) {
    let text = activity.and_then(|a| std::ffi::CString::new(a).ok());
    unsafe {
        match &text {
            Some(text) => pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr()),
            None => pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()),
        }
    }
}

/// This worker's name without its database ("pg_ihub job worker 1"), or
/// "pg_ihub" in a session that is not a background worker.
pub fn worker_label() -> String {
    let name = unsafe {
        let entry = pg_sys::MyBgworkerEntry;
        if entry.is_null() {
            return "pg_ihub".into();
        }
        std::ffi::CStr::from_ptr((*entry).bgw_name.as_ptr()).to_string_lossy().into_owned()
    };
    name.split(" [").next().unwrap_or(&name).to_string()
}

/// Names this worker in pg_stat_activity's application_name, as its
/// background worker name without the database ("pg_ihub job worker 1").
/// Set as an override, so neither RESET ALL nor user code changes it.
pub fn set_application_name() {
    let Ok(name) = std::ffi::CString::new(worker_label()) else { return };
    unsafe {
        pg_sys::SetConfigOption(
            c"application_name".as_ptr(),
            name.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
}

/// A column of a row a worker claimed, which must not be NULL and must have
/// the type the worker expects. Anything else is an error naming the column
/// (the step fails and is logged), never a default: an empty URL or a zero
/// timeout would be a wrong request, not a visible fault.
pub fn column<T: pgrx::FromDatum + pgrx::IntoDatum>(
    row: &pgrx::spi::SpiHeapTupleData,
    ordinal: usize,
    name: &str,
) -> T {
    match row.get::<T>(ordinal) {
        Ok(Some(value)) => value,
        Ok(None) => error!("pg_ihub: column \"{name}\" of a claimed row is NULL"),
        Err(e) => error!("pg_ihub: column \"{name}\" of a claimed row: {e}"),
    }
}

/// Like `column`, for a column that may be NULL.
pub fn nullable<T: pgrx::FromDatum + pgrx::IntoDatum>(
    row: &pgrx::spi::SpiHeapTupleData,
    ordinal: usize,
    name: &str,
) -> Option<T> {
    row.get::<T>(ordinal).unwrap_or_else(|e| error!("pg_ihub: column \"{name}\" of a claimed row: {e}"))
}
