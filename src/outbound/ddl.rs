//! DDL on subscribed tables and on the extension, seen from event triggers
//! at `ddl_command_start`, where only C can read the statement:
//! - `DROP TABLE` of a subscribed table first delivers what was captured and
//!   ends the subscription (`ihub._subscriptions_dropping`), in the same
//!   transaction, so no CASCADE reaches the capture table;
//! - `ALTER TABLE … ADD COLUMN` or `ALTER COLUMN … TYPE` of a subscribed
//!   table first delivers what was captured and removes the capture table,
//!   which stores the table's row type and would make Postgres refuse the
//!   change; `ihub._on_ddl_end` makes it again with the new row type;
//! - `DROP EXTENSION pg_ihub` first removes capture triggers and tables,
//!   which are made at run time and so are not members of the extension.
//!
//! Tables dropped another way (`DROP SCHEMA … CASCADE`, `DROP OWNED`) are
//! seen at `sql_drop`, in SQL (`ihub._on_sql_drop`): their subscriptions are
//! marked broken. The internal functions called here have no EXECUTE grant:
//! they run as the bootstrap superuser, on the tables the statement names.

use pgrx::prelude::*;
use pgrx::PgList;

use crate::runtime::user_code::as_owner;

macro_rules! event_trigger_function {
    ($finfo:ident) => {
        #[no_mangle]
        pub extern "C" fn $finfo() -> &'static pg_sys::Pg_finfo_record {
            const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
event_trigger_function!(pg_finfo_ihub_drop_extension);
event_trigger_function!(pg_finfo_ihub_ddl_start);

/// The statement an event trigger fires for.
unsafe fn statement(fcinfo: pg_sys::FunctionCallInfo, what: &str) -> *mut pg_sys::Node {
    let context = (*fcinfo).context;
    if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_EventTriggerData {
        pgrx::error!("{what} must be called as an event trigger");
    }
    (*(context as *const pg_sys::EventTriggerData)).parsetree
}

/// Runs internal SQL as the bootstrap superuser (the extension's owner):
/// the role issuing the DDL holds no EXECUTE on these functions.
fn owner_runs(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) {
    as_owner(|| Spi::run_with_args(sql, args)).unwrap_or_else(|e| pgrx::error!("{e}"));
}

/// `ihub_drop_extension` (DROP EXTENSION): when the statement drops pg_ihub,
/// `ihub._drop_capture()` removes capture triggers and tables first; a DROP
/// EXTENSION of any other extension is left alone. Being a member, the event
/// trigger is made by CREATE EXTENSION (or the upgrade) and never dumped.
///
/// # Safety
/// Called by the function manager as an event trigger.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn ihub_drop_extension(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let tree = statement(fcinfo, "ihub._on_drop_extension()");
    if drops_pg_ihub(tree) {
        owner_runs("SELECT ihub._drop_capture()", &[]);
    }
    pg_sys::Datum::from(0)
}

/// `ihub_ddl_start` (DROP TABLE, ALTER TABLE).
///
/// # Safety
/// Called by the function manager as an event trigger.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn ihub_ddl_start(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let tree = statement(fcinfo, "ihub._on_ddl_start()");
    if tree.is_null() {
        return pg_sys::Datum::from(0);
    }
    match (*tree).type_ {
        pg_sys::NodeTag::T_DropStmt => {
            let tables = dropped_tables(&*(tree as *const pg_sys::DropStmt));
            if !tables.is_empty() {
                owner_runs("SELECT ihub._subscriptions_dropping($1)", &[tables.into()]);
            }
        }
        pg_sys::NodeTag::T_AlterTableStmt => {
            let stmt = &*(tree as *const pg_sys::AlterTableStmt);
            let changes_row_type = PgList::<pg_sys::Node>::from_pg(stmt.cmds).iter_ptr().any(|cmd| {
                !cmd.is_null() && (*cmd).type_ == pg_sys::NodeTag::T_AlterTableCmd && {
                    let subtype = (*(cmd as *const pg_sys::AlterTableCmd)).subtype;
                    subtype == pg_sys::AlterTableType::AT_AddColumn
                        || subtype == pg_sys::AlterTableType::AT_AlterColumnType
                }
            });
            if changes_row_type && !stmt.relation.is_null() {
                let table = pg_sys::RangeVarGetRelidExtended(
                    stmt.relation,
                    pg_sys::NoLock as _,
                    pg_sys::RVROption::RVR_MISSING_OK as _,
                    None,
                    std::ptr::null_mut(),
                );
                if table != pg_sys::InvalidOid {
                    owner_runs("SELECT ihub._capture_before_alter($1)", &[table.into()]);
                }
            }
        }
        _ => {}
    }
    pg_sys::Datum::from(0)
}

/// The existing tables a DROP TABLE names.
unsafe fn dropped_tables(drop: &pg_sys::DropStmt) -> Vec<pg_sys::Oid> {
    if drop.removeType != pg_sys::ObjectType::OBJECT_TABLE {
        return Vec::new();
    }
    PgList::<pg_sys::List>::from_pg(drop.objects)
        .iter_ptr()
        .filter(|names| !names.is_null())
        .map(|names| {
            let relation = pg_sys::makeRangeVarFromNameList(names);
            pg_sys::RangeVarGetRelidExtended(
                relation,
                pg_sys::NoLock as _,
                pg_sys::RVROption::RVR_MISSING_OK as _,
                None,
                std::ptr::null_mut(),
            )
        })
        .filter(|oid| *oid != pg_sys::InvalidOid)
        .collect()
}

/// Whether a statement is a DROP EXTENSION naming pg_ihub.
unsafe fn drops_pg_ihub(tree: *mut pg_sys::Node) -> bool {
    if tree.is_null() || (*tree).type_ != pg_sys::NodeTag::T_DropStmt {
        return false;
    }
    let drop = &*(tree as *const pg_sys::DropStmt);
    if drop.removeType != pg_sys::ObjectType::OBJECT_EXTENSION {
        return false;
    }
    PgList::<pg_sys::Node>::from_pg(drop.objects).iter_ptr().any(|name| {
        !name.is_null()
            && (*name).type_ == pg_sys::NodeTag::T_String
            && std::ffi::CStr::from_ptr((*(name as *const pg_sys::String)).sval).to_bytes() == b"pg_ihub"
    })
}
