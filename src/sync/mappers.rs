//! The one part of mappers that reads user data: the local values of a
//! `table` mapper's column that match a value. It runs as the role that
//! uses the mapper, in a security-restricted operation, so that the read
//! has exactly that role's rights: its column privileges and row-level
//! security apply, and a view's functions run as that role, never as the
//! extension owner that `ihub._map_*_by` run as.

use pgrx::prelude::*;

use crate::runtime::user_code::restricted_as;

/// Up to two values of `target.column` (as text) equal to `value`, or, if
/// none is, equal to it ignoring case: enough to tell none, exactly one and
/// several apart.
#[pg_extern(name = "_mapper_matches", volatile, parallel_unsafe)]
fn mapper_matches(target: pg_sys::Oid, column: &str, value: &str, caller: pg_sys::Oid) -> Vec<String> {
    // The relation prints schema-qualified under the caller's fixed
    // search_path (pg_catalog, pg_temp); the column is quoted.
    let relation = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[target.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| error!("pg_ihub: relation {} of a mapper does not exist", target.to_u32()));
    let column = spi::quote_identifier(column);
    let query = |compare: &str| {
        format!(
            "SELECT {column}::text FROM {relation} WHERE {compare} LIMIT 2",
            compare = compare.replace("{c}", &column)
        )
    };
    let (exact, any_case) = (query("{c}::text = $1"), query("lower({c}::text) = lower($1)"));
    let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
    let found = restricted_as(caller, || {
        Spi::connect(|client| {
            let read = |sql: &str| -> Vec<String> {
                client
                    .select(sql, None, &[value.into()])
                    .unwrap_or_else(|e| error!("{e}"))
                    .filter_map(|row| row.get::<String>(1).ok().flatten())
                    .collect()
            };
            let exact = read(&exact);
            if exact.is_empty() {
                read(&any_case)
            } else {
                exact
            }
        })
    });
    // Settings made meanwhile (none expected) end with the read.
    unsafe { pg_sys::AtEOXact_GUC(false, guc_level) };
    found
}
