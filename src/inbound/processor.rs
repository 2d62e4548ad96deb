//! The inbound processor worker: claims the next queued items due (in order
//! of execution time, and in arrival order among items with the same
//! ordering key) whose handlers run as one role, and calls each source's
//! handler as the role that created the source: in one transaction, each
//! item in a subtransaction of its own (`ihub.inbound_items_per_transaction`;
//! 1 gives each item a transaction of its own). A failed item is archived.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::PgOid;

use crate::runtime::backend::{column, in_transaction, nullable, run_prepared};
use crate::runtime::registry::{self, Kind};
use crate::runtime::user_code::{run_user_batch, run_user_call, Failure, UserCall, BATCH_BUDGET};
use crate::runtime::worker::{run, Worker};
use crate::settings;

struct Item {
    id: i64,
    call: String,
    run_as: pg_sys::Oid,
    timeout_ms: i32,
    more_due: bool,
    /// The source's integration: what the handler writes is not sent back there.
    integration: Option<String>,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn ihub_processor_main(_arg: pg_sys::Datum) {
    run::<Processor>();
}

struct Processor {
    pid: i32,
    last_rescue: Option<Instant>,
}

impl Worker for Processor {
    const KIND: Kind = Kind::Processor;
    const NEEDS: Option<&'static str> = Some("ihub._claim_inbound_items(integer, integer, integer, integer)");
    // As for job workers: a termination stops a running handler at once.
    const STOP_AT_ONCE: bool = true;

    fn start() -> Result<Self, String> {
        Ok(Processor { pid: unsafe { pg_sys::MyProcPid }, last_rescue: None })
    }

    fn round(&mut self, poll: Duration) -> Duration {
        if self.last_rescue.is_none_or(|t| t.elapsed() >= poll) {
            in_transaction("rescue items", || Spi::run("SELECT ihub._rescue_inbound()"));
            self.last_rescue = Some(Instant::now());
        }
        // At most ihub.inbound_batch items per round, then yield.
        let (pid, per_round) = (self.pid, settings::INBOUND_BATCH.get());
        let mut ran = 0;
        while ran < per_round {
            let limit = settings::INBOUND_ITEMS_PER_TRANSACTION.get().min(per_round - ran).max(1);
            let Some(items) = in_transaction("claim items", || claim(pid, limit)) else { break };
            if items.is_empty() {
                break;
            }
            registry::heartbeat(false);
            if items.iter().any(|i| i.more_due) {
                registry::wake_peer(Kind::Processor);
            }
            ran += items.len() as i32;
            process_batch(items, pid);
        }
        if ran > 0 {
            return Duration::ZERO;
        }
        let due = in_transaction("next due item", || {
            Spi::get_one::<f64>("SELECT ihub._next_inbound_due()")
                .ok()
                .flatten()
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)))
        })
        .flatten();
        due.map_or(poll, |d| d.min(poll))
    }
}

fn claim(pid: i32, limit: i32) -> Vec<Item> {
    Spi::connect_mut(|client| {
        // As for jobs: the handlers' own commit flushes this claim.
        let int4 = PgOid::from(pg_sys::INT4OID);
        run_prepared(client, "SET LOCAL synchronous_commit = off", &[], &[]).expect("SET LOCAL runs");
        run_prepared(
            client,
            "SELECT id, call, run_as, timeout_ms, more_due, integration FROM ihub._claim_inbound_items($1, $2, $3, $4)",
            &[int4, int4, int4, int4],
            &[
                pid.into(),
                settings::JOB_TIMEOUT_MS.get().into(),
                limit.into(),
                settings::INBOUND_PROCESSORS.get().into(),
            ],
        )
        .unwrap_or_else(|e| error!("ihub._claim_inbound_items: {e}"))
        .into_iter()
        .map(|row| Item {
            id: column(&row, 1, "id"),
            call: column(&row, 2, "call"),
            run_as: column(&row, 3, "run_as"),
            timeout_ms: column(&row, 4, "timeout_ms"),
            more_due: column(&row, 5, "more_due"),
            integration: nullable(&row, 6, "integration"),
        })
        .collect()
    })
}

/// Handles claimed items (their handlers all run as one role) in one
/// transaction, then archives the failures. As for jobs: an item whose
/// handler failed on a deadlock or serialization failure is handled again
/// alone, all of them again one by one if the transaction fails, and those
/// the batch's time left unstarted go back to the queue.
fn process_batch(items: Vec<Item>, pid: i32) {
    if items.len() == 1 {
        return items.into_iter().for_each(|item| process(item, pid));
    }
    let outcomes = run_user_batch(
        items[0].run_as,
        &items,
        BATCH_BUDGET,
        |item| UserCall {
            sql: item.call.clone(),
            arg_type: PgOid::from(pg_sys::INT8OID),
            arg: item.id.into(),
            timeout_ms: item.timeout_ms,
            syncing: item.integration.clone(),
        },
        |item, starting| {
            let activity = format!("inbound item {}: {}", item.id, item.call);
            crate::runtime::backend::report_activity(starting.then_some(activity.as_str()));
        },
        |item, result| record_done(item.id, pid, result),
    );
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(message) => {
            warning!("pg_ihub: {} inbound items did not commit ({message}); handling them one by one", items.len());
            return items.into_iter().for_each(|item| process(item, pid));
        }
    };
    let ran = outcomes.len();
    let mut items = items.into_iter();
    for (item, outcome) in items.by_ref().take(ran).zip(outcomes) {
        match outcome {
            Ok(()) => {}
            Err(failure) if failure.conflict => process(item, pid),
            Err(failure) => archive_failure(item.id, pid, &failure),
        }
    }
    let rest: Vec<i64> = items.map(|item| item.id).collect();
    if !rest.is_empty() {
        in_transaction("give back unstarted items", || {
            Spi::run_with_args("SELECT ihub._unclaim_inbound_items($1, $2)", &[rest.clone().into(), pid.into()])
        });
    }
}

/// Handles one item in a transaction of its own.
fn process(item: Item, pid: i32) {
    let id = item.id;
    // The handler's call, visible in pg_stat_activity while it runs.
    crate::runtime::backend::report_activity(Some(&format!("inbound item {id}: {}", item.call)));
    let syncing = item.integration.as_deref();
    let outcome = run_user_call(
        &item.call,
        PgOid::from(pg_sys::INT8OID),
        id.into(),
        item.run_as,
        item.timeout_ms,
        syncing,
        |result| record_done(id, pid, result),
    );
    crate::runtime::backend::report_activity(None);
    if let Err(failure) = outcome {
        archive_failure(id, pid, &failure);
    }
}

/// Records a handled item, in its transaction (or subtransaction).
fn record_done(id: i64, pid: i32, result: Option<pgrx::JsonB>) {
    Spi::connect_mut(|client| {
        run_prepared(
            client,
            "SELECT ihub._inbound_done($1, $2, $3)",
            &[PgOid::from(pg_sys::INT8OID), PgOid::from(pg_sys::INT4OID), PgOid::from(pg_sys::JSONBOID)],
            &[id.into(), pid.into(), result.into()],
        )
        .map(|_| ())
    })
    .expect("ihub._inbound_done");
}

/// Archives a failed item, in a transaction of its own.
fn archive_failure(id: i64, pid: i32, failure: &Failure) {
    let recorded = in_transaction("archive a failed item", || {
        Spi::run_with_args(
            "SELECT ihub._inbound_failed($1, $2, $3)",
            &[id.into(), pid.into(), failure.message.clone().into()],
        )
    });
    if recorded.is_none() {
        warning!("pg_ihub: could not archive inbound item {id}; it is rescued later");
    }
}

/// `ihub.process_inbound(id)`: processes one queued or failed item now, in
/// this session and with the caller's rights, if the caller may run the
/// source's handler (a member of its role). Returns the handler's result,
/// or `{"error": ...}` when it failed (the item is then archived as failed).
///
/// Not SECURITY DEFINER, so that the handler runs as the caller with its
/// search_path; taking and settling the item go through internal functions
/// that no role holds EXECUTE on (see `caller::call_internal`).
#[pg_extern(volatile)]
fn process_inbound(id: i64) -> Option<pgrx::JsonB> {
    let caller = unsafe { pg_sys::GetUserId() };
    let int8 = pg_sys::INT8OID;
    let call = crate::caller::call_internal(
        "_inbound_take",
        &[int8, pg_sys::REGROLEOID],
        &[Some(pg_sys::Datum::from(id)), Some(pg_sys::Datum::from(caller))],
    )
    .and_then(|d| unsafe { String::from_datum(d, false) })
    .expect("ihub._inbound_take returns the handler call");
    // Loop prevention for the handler's writes, as in a processor; only
    // for the call: the caller's own writes afterwards are sent as usual.
    let integration = crate::caller::call_internal("_inbound_integration", &[int8], &[Some(pg_sys::Datum::from(id))])
        .and_then(|d| unsafe { String::from_datum(d, false) });
    let settings = unsafe { pg_sys::NewGUCNestLevel() };
    if let Some(integration) = &integration {
        crate::sync::syncing::mark(integration);
    }
    let outcome = crate::runtime::backend::in_subtransaction(|| {
        Spi::get_one_with_args::<pgrx::JsonB>(&call, &[id.into()]).unwrap_or_else(|e| panic!("{e}"))
    });
    unsafe { pg_sys::AtEOXact_GUC(false, settings) };
    let (result, error) = match outcome {
        Ok(result) => (result, None),
        Err(message) => (None, Some(message)),
    };
    let settle_result = result.as_ref().map(|r| pgrx::JsonB(r.0.clone()));
    crate::caller::call_internal(
        "_inbound_settle",
        &[int8, pg_sys::JSONBOID, pg_sys::TEXTOID],
        &[
            Some(pg_sys::Datum::from(id)),
            settle_result.and_then(|r| r.into_datum()),
            error.clone().and_then(|e| e.into_datum()),
        ],
    );
    match error {
        Some(message) => Some(pgrx::JsonB(serde_json::json!({ "error": message }))),
        None => result,
    }
}
