//! The inbound processor worker: claims the next queued item due (in order
//! of execution time, and in arrival order among items with the same
//! ordering key) and calls its source's handler in a transaction of its own,
//! as the role that created the source. A failed item is archived.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::PgOid;

use crate::runtime::backend::{column, in_transaction, run_prepared};
use crate::runtime::registry::{self, Kind};
use crate::runtime::user_code::run_user_call;
use crate::runtime::worker::{run, Worker};
use crate::settings;

struct Item {
    id: i64,
    call: String,
    run_as: pg_sys::Oid,
    timeout_ms: i32,
    more_due: bool,
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
    const NEEDS: Option<&'static str> = Some("ihub._claim_inbound(integer, integer)");
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
        let pid = self.pid;
        let mut ran = 0;
        while ran < settings::INBOUND_BATCH.get() {
            let Some(Some(item)) = in_transaction("claim an item", || claim(pid)) else { break };
            registry::heartbeat(false);
            if item.more_due {
                registry::wake_peer(Kind::Processor);
            }
            process(item, pid);
            ran += 1;
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

fn claim(pid: i32) -> Option<Item> {
    Spi::connect_mut(|client| {
        // As for jobs: the handler's own commit flushes this claim.
        run_prepared(client, "SET LOCAL synchronous_commit = off", &[], &[]).ok()?;
        let rows = run_prepared(
            client,
            "SELECT id, call, run_as, timeout_ms, more_due FROM ihub._claim_inbound($1, $2)",
            &[PgOid::from(pg_sys::INT4OID), PgOid::from(pg_sys::INT4OID)],
            &[pid.into(), settings::JOB_TIMEOUT_MS.get().into()],
        )
        .ok()?;
        let row = rows.into_iter().next()?;
        Some(Item {
            id: column(&row, 1, "id"),
            call: column(&row, 2, "call"),
            run_as: column(&row, 3, "run_as"),
            timeout_ms: column(&row, 4, "timeout_ms"),
            more_due: column(&row, 5, "more_due"),
        })
    })
}

fn process(item: Item, pid: i32) {
    let id = item.id;
    // The handler's call, visible in pg_stat_activity while it runs.
    crate::runtime::backend::report_activity(Some(&format!("inbound item {id}: {}", item.call)));
    let outcome =
        run_user_call(&item.call, PgOid::from(pg_sys::INT8OID), id.into(), item.run_as, item.timeout_ms, |result| {
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
        });
    if let Err(failure) = outcome {
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
    crate::runtime::backend::report_activity(None);
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
    let outcome = crate::runtime::backend::in_subtransaction(|| {
        Spi::get_one_with_args::<pgrx::JsonB>(&call, &[id.into()]).unwrap_or_else(|e| panic!("{e}"))
    });
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
