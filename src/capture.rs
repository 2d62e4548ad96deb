//! Row-change capture. `ihub.subscribe` (sql/api.sql) generates, per
//! subscription, a capture table typed like the source table and
//! statement-level triggers that copy the transition rows into it unchanged.
//! Copying typed rows costs the writer little; turning them into JSON is
//! left to the dispatcher (see `ihub._route`). This module holds the parts of
//! that machinery that need Postgres internals.

use std::ffi::CString;

use pgrx::prelude::*;
use pgrx::PgList;

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
