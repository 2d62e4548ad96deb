//! Row-change capture. `ihub.subscribe` (sql/api.sql) generates, per
//! subscription, a capture table typed like the source table and
//! statement-level triggers that copy the transition rows into it unchanged.
//! Copying typed rows costs the writer little; turning them into JSON is
//! left to the dispatcher (see `ihub._route`). This module holds the parts of
//! that machinery that need Postgres internals.

use std::ffi::CString;

use pgrx::prelude::*;
use pgrx::{PgList, PgMemoryContexts};

/// Checks that `expr` parses as exactly one scalar expression: wrapped as
/// `SELECT (<expr>)` it must give one SELECT with one target and nothing else.
/// This keeps a condition from closing its parenthesis and adding clauses or
/// statements to the trigger code it is pasted into.
pub fn single_expression(expr: &str) -> Result<(), String> {
    if expr.trim().is_empty() {
        return Err("the condition is empty".into());
    }
    let sql =
        CString::new(format!("SELECT (\n{expr}\n)")).map_err(|_| "the condition contains a NUL byte".to_string())?;
    let parsed =
        PgTryBuilder::new(|| unsafe { Ok(pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT)) })
            .catch_others(|e| {
                let message = match e {
                    pg_sys::panic::CaughtError::PostgresError(report)
                    | pg_sys::panic::CaughtError::ErrorReport(report)
                    | pg_sys::panic::CaughtError::RustPanic { ereport: report, .. } => report.message().to_string(),
                };
                Err(message)
            })
            .execute()?;
    unsafe {
        let stmts = PgList::<pg_sys::RawStmt>::from_pg(parsed);
        if stmts.len() != 1 {
            return Err("it must be a single expression, not several statements".into());
        }
        let raw = stmts.get_ptr(0).ok_or("it did not parse")?;
        let node = (*raw).stmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_SelectStmt {
            return Err("it must be an expression".into());
        }
        let select = node as *mut pg_sys::SelectStmt;
        let s = &*select;
        let clean = s.op == pg_sys::SetOperation::SETOP_NONE
            && s.fromClause.is_null()
            && s.whereClause.is_null()
            && s.groupClause.is_null()
            && s.havingClause.is_null()
            && s.windowClause.is_null()
            && s.withClause.is_null()
            && s.sortClause.is_null()
            && s.limitCount.is_null()
            && s.limitOffset.is_null()
            && s.lockingClause.is_null()
            && s.distinctClause.is_null()
            && s.intoClause.is_null()
            && s.valuesLists.is_null();
        if !clean || PgList::<pg_sys::Node>::from_pg(s.targetList).len() != 1 {
            return Err("it must be a single expression; it closes its parenthesis and adds to the statement".into());
        }
    }
    Ok(())
}

/// Rows per multi-insert, as COPY does.
const BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("ihub._capture_rows must run as an AFTER ... FOR EACH STATEMENT trigger with a transition table")]
    NotAStatementTrigger,
    #[error("ihub._capture_rows needs the capture table's name (ihub_capture.sub_<id>) as its only argument")]
    BadArgument,
    #[error("capture table {0} does not hold rows of this table")]
    WrongCaptureTable(String),
    #[error("could not read the subscription: {0}")]
    Lookup(String),
    #[error("the role that made subscription {0} no longer exists, so its condition cannot run")]
    SubscriberGone(i64),
}

/// The capture trigger for subscriptions without watch or condition: copies
/// the transition table's rows into the subscription's capture table with
/// one multi-insert per 1,000 rows, as COPY does, instead of running an
/// INSERT ... SELECT through the executor. Each row is stored as a composite
/// datum of the source table's row type, taken from the transition tuple
/// as is; turning it into JSON is left to the dispatcher.
#[pg_trigger]
fn _capture_rows<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, CaptureError> {
    if unsafe { echo_suppressed(trigger.trigger_data()) } {
        return Ok(None);
    }
    let captured = unsafe { capture_rows(trigger.trigger_data(), None) }.unwrap_or_else(|e| raise_capture_error(e));
    if captured > 0 {
        crate::runtime::registry::wake_at_commit(crate::runtime::registry::Kind::Dispatcher);
    }
    Ok(None)
}

/// The capture trigger of subscriptions with a condition or watched
/// columns. It is SECURITY DEFINER (see sql/finalize.sql): it reads the
/// subscription, then selects the transition rows that pass as the
/// subscriber, in a security-restricted operation, since the condition is
/// the subscriber's code and must run with its rights, never the writer's
/// or the extension owner's; then it copies those rows like `_capture_rows`.
/// Writers and subscribers need no privilege on the capture table.
#[pg_trigger]
fn _capture_filtered<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, CaptureError> {
    let data = trigger.trigger_data();
    if unsafe { echo_suppressed(data) } {
        return Ok(None);
    }
    let captured = unsafe { passing_rows(data).and_then(|pass| capture_rows(data, Some(&pass))) }
        .unwrap_or_else(|e| raise_capture_error(e));
    if captured > 0 {
        crate::runtime::registry::wake_at_commit(crate::runtime::registry::Kind::Dispatcher);
    }
    Ok(None)
}

/// The next value of `ihub.capture_seq`, without a privilege check: writers
/// hold no right on it, as on the capture tables.
unsafe fn statement_number() -> Result<i64, CaptureError> {
    let ihub = pg_sys::get_namespace_oid(c"ihub".as_ptr(), true);
    let seq = pg_sys::get_relname_relid(c"capture_seq".as_ptr(), ihub);
    if seq == pg_sys::InvalidOid {
        return Err(CaptureError::WrongCaptureTable("ihub.capture_seq".to_string()));
    }
    Ok(pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| nextval_internal(seq, false)))
}

/// The transaction syncs this subscription's integration (loop prevention,
/// `crate::sync::syncing`): its rows are not captured.
unsafe fn echo_suppressed(data: &pg_sys::TriggerData) -> bool {
    let trigger = &*data.tg_trigger;
    if trigger.tgnargs != 1 || crate::settings::syncing().is_empty() {
        return false;
    }
    std::ffi::CStr::from_ptr(*trigger.tgargs)
        .to_str()
        .ok()
        .and_then(|name| name.strip_prefix("ihub_capture.sub_"))
        .and_then(|id| id.parse().ok())
        .is_some_and(crate::sync::syncing::suppresses)
}

fn raise_capture_error(e: CaptureError) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION, e.to_string(), "pg_ihub")
        .set_hint("Capture triggers are made by ihub.subscribe(); drop this one.")
        .report(PgLogLevel::ERROR);
    unreachable!()
}

/// The transition rows that pass a subscription's watch and condition, by
/// position (the filter query numbers them in the transition tables'
/// order), and the data its payload template made of each (JSON text).
pub(crate) struct Passing {
    keep: Vec<bool>,
    data: Vec<Option<String>>,
}

unsafe fn passing_rows(data: &pg_sys::TriggerData) -> Result<Passing, CaptureError> {
    let trigger = &*data.tg_trigger;
    if trigger.tgnargs != 1 {
        return Err(CaptureError::BadArgument);
    }
    let capture_name = std::ffi::CStr::from_ptr(*trigger.tgargs).to_str().map_err(|_| CaptureError::BadArgument)?;
    let sub_id: i64 = capture_name
        .strip_prefix("ihub_capture.sub_")
        .and_then(|id| id.parse().ok())
        .ok_or(CaptureError::BadArgument)?;
    let event = match data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => "insert",
        pg_sys::TRIGGER_EVENT_DELETE => "delete",
        pg_sys::TRIGGER_EVENT_UPDATE => "update",
        _ => return Err(CaptureError::NotAStatementTrigger),
    };
    let count = {
        let store = if data.tg_newtable.is_null() { data.tg_oldtable } else { data.tg_newtable };
        if store.is_null() {
            return Err(CaptureError::NotAStatementTrigger);
        }
        pg_sys::tuplestore_tuple_count(store) as usize
    };
    let source = (*data.tg_relation).rd_id;
    // As the extension owner (this function is SECURITY DEFINER).
    let (filter, subscriber): (String, Option<pg_sys::Oid>) = Spi::connect_mut(|client| {
        let rows = crate::runtime::backend::run_prepared(
            client,
            // The role by its name, not `::regrole`: that parses a name of
            // digits as an OID.
            "SELECT ihub._capture_filter(s, $2), (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = s.created_by) \
             FROM ihub.subscription s \
             WHERE s.id = $1 AND (s.source = $3 OR $3 IN (SELECT ihub._capture_relations(s.source)))",
            &[
                pgrx::PgOid::from(pg_sys::INT8OID),
                pgrx::PgOid::from(pg_sys::TEXTOID),
                pgrx::PgOid::from(pg_sys::OIDOID),
            ],
            &[sub_id.into(), event.into(), source.into()],
        )?;
        let row = rows.into_iter().next();
        Ok::<_, pgrx::spi::Error>(match row {
            Some(row) => Some((row.get::<String>(1)?.unwrap_or_default(), row.get::<pg_sys::Oid>(2)?)),
            None => None,
        })
    })
    .map_err(|e| CaptureError::Lookup(e.to_string()))?
    .ok_or_else(|| CaptureError::WrongCaptureTable(capture_name.to_string()))?;
    let subscriber = subscriber.ok_or(CaptureError::SubscriberGone(sub_id))?;

    let mut keep = vec![false; count];
    let mut made: Vec<Option<String>> = vec![None; count];
    let filter = CString::new(filter).map_err(|_| CaptureError::BadArgument)?;
    // Settings the condition makes (set_config(..., false) included) end
    // with it, as after REFRESH MATERIALIZED VIEW: nothing of the
    // subscriber's stays in the writer's session.
    let guc_level = pg_sys::NewGUCNestLevel();
    let passed = crate::runtime::user_code::restricted_as(subscriber, || {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            return Err(CaptureError::Lookup("SPI_connect failed".into()));
        }
        pg_sys::SPI_register_trigger_data(data as *const _ as *mut _);
        pg_sys::SPI_execute(filter.as_ptr(), false, 0);
        let table = pg_sys::SPI_tuptable;
        if !table.is_null() {
            for i in 0..pg_sys::SPI_processed as usize {
                let tuple = *(*table).vals.add(i);
                let mut isnull = false;
                let n = pg_sys::SPI_getbinval(tuple, (*table).tupdesc, 1, &mut isnull);
                let n = n.value() as i64;
                if !isnull && n >= 1 && (n as usize) <= count {
                    keep[n as usize - 1] = true;
                    // The template's data, when the query has it.
                    if (*(*table).tupdesc).natts >= 2 {
                        let text = pg_sys::SPI_getvalue(tuple, (*table).tupdesc, 2);
                        if !text.is_null() {
                            made[n as usize - 1] = Some(std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned());
                        }
                    }
                }
            }
        }
        pg_sys::SPI_finish();
        Ok(())
    });
    pg_sys::AtEOXact_GUC(false, guc_level);
    passed?;
    Ok(Passing { keep, data: made })
}

unsafe fn capture_rows(data: &pg_sys::TriggerData, pass: Option<&Passing>) -> Result<usize, CaptureError> {
    let keep = pass.map(|p| p.keep.as_slice());
    let event = data.tg_event;
    if event & pg_sys::TRIGGER_EVENT_ROW != 0 || event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
    {
        return Err(CaptureError::NotAStatementTrigger);
    }
    let trigger = &*data.tg_trigger;
    if trigger.tgnargs != 1 {
        return Err(CaptureError::BadArgument);
    }
    // The capture table, as `ihub_capture.sub_<id>`: by name, so that a
    // dumped and restored trigger still finds it.
    let capture_name = std::ffi::CStr::from_ptr(*trigger.tgargs).to_str().map_err(|_| CaptureError::BadArgument)?;
    let capture_oid = match capture_name.split_once('.') {
        Some(("ihub_capture", table)) if !table.is_empty() => {
            let (schema, table) =
                (c"ihub_capture", std::ffi::CString::new(table).map_err(|_| CaptureError::BadArgument)?);
            pg_sys::get_relname_relid(table.as_ptr(), pg_sys::get_namespace_oid(schema.as_ptr(), true))
        }
        _ => return Err(CaptureError::BadArgument),
    };
    if capture_oid == pg_sys::InvalidOid {
        return Err(CaptureError::WrongCaptureTable(capture_name.to_string()));
    }
    let (op, new_store, old_store) = match event & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => (b'i', data.tg_newtable, std::ptr::null_mut()),
        pg_sys::TRIGGER_EVENT_DELETE => (b'd', std::ptr::null_mut(), data.tg_oldtable),
        pg_sys::TRIGGER_EVENT_UPDATE => (b'u', data.tg_newtable, data.tg_oldtable),
        _ => return Err(CaptureError::NotAStatementTrigger),
    };
    if (op != b'd' && new_store.is_null()) || (op != b'i' && old_store.is_null()) {
        return Err(CaptureError::NotAStatementTrigger);
    }

    let source = data.tg_relation;
    let capture = pg_sys::table_open(capture_oid, pg_sys::RowExclusiveLock as _);
    // Only the subscribed table and its partitions can feed its capture
    // table: the row columns have its row type. Capture tables have no
    // indexes, which a raw multi-insert would not maintain.
    let capture_desc = (*capture).rd_att;
    let attrs = (*capture_desc).attrs.as_slice((*capture_desc).natts as usize);
    let row_type = attrs.get(3).map_or(pg_sys::InvalidOid, |a| a.atttypid);
    // A plain table: only a heap has the table AM's multi-insert. Capture
    // tables made before 0.3.0 have no sixth and seventh columns (the
    // statement's number, the template's data) until ALTER EXTENSION UPDATE
    // adds them.
    let numbered = attrs.len() == 7 && attrs[5].atttypid == pg_sys::INT8OID && attrs[6].atttypid == pg_sys::JSONBOID;
    if !(attrs.len() == 5 || numbered)
        || attrs[4].atttypid != row_type
        || !feeds(source, row_type)
        || (*(*capture).rd_rel).relhasindex
        || (*(*capture).rd_rel).relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
        || (*capture).rd_tableam.is_null()
    {
        pg_sys::table_close(capture, pg_sys::NoLock as _);
        return Err(CaptureError::WrongCaptureTable(capture_name.to_string()));
    }

    let count = pg_sys::tuplestore_tuple_count(if new_store.is_null() { old_store } else { new_store }) as usize;
    let passing = keep.map_or(count, |k| k.iter().filter(|k| **k).count());
    if passing == 0 {
        pg_sys::table_close(capture, pg_sys::NoLock as _);
        return Ok(0);
    }
    let xid = pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value);
    let at = pg_sys::Datum::from(pg_sys::GetCurrentStatementStartTimestamp());
    let cid = pg_sys::GetCurrentCommandId(true);
    // One number for the statement: a row appears at most once in it.
    let seq = if numbered { Some(pg_sys::Datum::from(statement_number()?)) } else { None };
    let multi_insert = (*(*capture).rd_tableam).multi_insert.expect("table AM has multi_insert");
    let bulk = if passing > BATCH { pg_sys::GetBulkInsertState() } else { std::ptr::null_mut() };

    let rows_as = RowConversion::new(source, row_type);
    let reader = |store: *mut pg_sys::Tuplestorestate| {
        if store.is_null() {
            return std::ptr::null_mut();
        }
        pg_sys::tuplestore_rescan(store);
        pg_sys::MakeSingleTupleTableSlot(rows_as.read_desc, &pg_sys::TTSOpsMinimalTuple)
    };
    let (new_slot, old_slot) = (reader(new_store), reader(old_store));
    let mut slots: Vec<*mut pg_sys::TupleTableSlot> =
        (0..passing.min(BATCH)).map(|_| pg_sys::table_slot_create(capture, std::ptr::null_mut())).collect();
    let mut rows = PgMemoryContexts::new("pg_ihub capture rows");

    let mut filled = 0;
    let mut done = 0;
    let mut position = 0;
    loop {
        // Old and new versions of updated rows come in the same order from
        // their two transition tables.
        let more = (new_slot.is_null() || pg_sys::tuplestore_gettupleslot(new_store, true, false, new_slot))
            && (old_slot.is_null() || pg_sys::tuplestore_gettupleslot(old_store, true, false, old_slot));
        let passes = keep.is_none_or(|k| k.get(position).copied().unwrap_or(false));
        position += 1;
        if more && passes {
            let slot = slots[filled];
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, attrs.len());
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, attrs.len());
            rows.switch_to(|_| {
                values[0] = pg_sys::Datum::from(op as i8);
                values[1] = xid;
                values[2] = at;
                for (i, row) in [(3, new_slot), (4, old_slot)] {
                    nulls[i] = row.is_null();
                    values[i] = if row.is_null() { pg_sys::Datum::from(0) } else { rows_as.datum(row) };
                }
            });
            nulls[0] = false;
            nulls[1] = false;
            nulls[2] = false;
            if let Some(seq) = seq {
                values[5] = seq;
                nulls[5] = false;
                // The template's data, read by jsonb's own input function
                // (numbers keep their precision).
                let made = pass.and_then(|p| p.data.get(position - 1)).and_then(|d| d.as_deref());
                nulls[6] = true;
                if let Some(text) = made.and_then(|t| CString::new(t).ok()) {
                    values[6] = rows.switch_to(|_| {
                        pg_sys::OidInputFunctionCall(
                            pg_sys::Oid::from(pg_sys::F_JSONB_IN),
                            text.as_ptr() as *mut std::ffi::c_char,
                            pg_sys::InvalidOid,
                            -1,
                        )
                    });
                    nulls[6] = false;
                }
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            filled += 1;
        }
        if filled > 0 && (filled == slots.len() || !more) {
            multi_insert(capture, slots.as_mut_ptr(), filled as i32, cid, 0, bulk);
            for slot in &slots[..filled] {
                (*(**slot).tts_ops).clear.expect("slot ops clear")(*slot);
            }
            rows.reset();
            done += filled;
            filled = 0;
        }
        if !more {
            break;
        }
    }
    for slot in slots.into_iter().chain([new_slot, old_slot]).filter(|s| !s.is_null()) {
        pg_sys::ExecDropSingleTupleTableSlot(slot);
    }
    rows_as.release();
    if !bulk.is_null() {
        pg_sys::FreeBulkInsertState(bulk);
    }
    pg_sys::table_close(capture, pg_sys::NoLock as _);
    Ok(done)
}

// From catalog/partition.h, which pgrx's bindings leave out; called
// through pgrx's guard, as its own bindings are.
unsafe extern "C-unwind" {
    fn get_partition_ancestors(relid: pg_sys::Oid) -> *mut pg_sys::List;
    // From commands/sequence.h, likewise.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// Whether writes to `source` belong in a capture table of rows of
/// `row_type`: the subscribed table's own, or one of its partitions'.
unsafe fn feeds(source: pg_sys::Relation, row_type: pg_sys::Oid) -> bool {
    if (*(*source).rd_rel).reltype == row_type {
        return true;
    }
    if !(*(*source).rd_rel).relispartition {
        return false;
    }
    let subscribed = pg_sys::get_typ_typrelid(row_type);
    subscribed != pg_sys::InvalidOid
        && PgList::<pg_sys::Oid>::from_pg(pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            get_partition_ancestors((*source).rd_id)
        }))
        .iter_oid()
        .any(|ancestor| ancestor == subscribed)
}

/// Transition rows of a partition, stored as rows of the subscribed
/// (partitioned) table: its columns may lie in another order or around
/// dropped ones, and a stored composite names its row type.
struct RowConversion {
    /// The descriptor the transition tuples are read with.
    read_desc: pg_sys::TupleDesc,
    /// The subscribed table's row type, when it is not the source's.
    target: pg_sys::TupleDesc,
    /// Set when the layouts differ: the columns are moved into `out`.
    map: *mut pg_sys::TupleConversionMap,
    out: *mut pg_sys::TupleTableSlot,
}

impl RowConversion {
    unsafe fn new(source: pg_sys::Relation, row_type: pg_sys::Oid) -> RowConversion {
        let source_desc = (*source).rd_att;
        if (*(*source).rd_rel).reltype == row_type {
            return RowConversion {
                read_desc: source_desc,
                target: std::ptr::null_mut(),
                map: std::ptr::null_mut(),
                out: std::ptr::null_mut(),
            };
        }
        let target = pg_sys::lookup_rowtype_tupdesc(row_type, -1);
        let map = pg_sys::convert_tuples_by_name(source_desc, target);
        if map.is_null() {
            // Same physical layout: the tuples read as the target's rows.
            RowConversion { read_desc: target, target, map, out: std::ptr::null_mut() }
        } else {
            let out = pg_sys::MakeSingleTupleTableSlot(target, &pg_sys::TTSOpsVirtual);
            RowConversion { read_desc: source_desc, target, map, out }
        }
    }

    /// The row in `slot` as a composite datum of the subscribed row type.
    unsafe fn datum(&self, slot: *mut pg_sys::TupleTableSlot) -> pg_sys::Datum {
        if self.map.is_null() {
            return pg_sys::ExecFetchSlotHeapTupleDatum(slot);
        }
        pg_sys::execute_attr_map_slot((*self.map).attrMap, slot, self.out);
        pg_sys::ExecFetchSlotHeapTupleDatum(self.out)
    }

    unsafe fn release(self) {
        if !self.out.is_null() {
            pg_sys::ExecDropSingleTupleTableSlot(self.out);
        }
        if !self.target.is_null() && (*self.target).tdrefcount >= 0 {
            pg_sys::DecrTupleDescRefCount(self.target);
        }
    }
}
