//! The one part of bindings that reads user data: whether the row a binding
//! names exists, and its key as its type prints it. It runs as the role binding it, in a security-restricted
//! operation, so that row-level security hides from it what it cannot see,
//! and the key's conversion (a cast the table's owner may have written)
//! runs with that role's rights, never the extension owner's.

use pgrx::prelude::*;

use crate::runtime::user_code::restricted_as;

/// The key of `table`'s row whose `column` (its primary key) is `key`, as
/// its type prints it, if `caller` sees such a row.
#[pg_extern(name = "_row_key", volatile, parallel_unsafe)]
fn row_key(table: pg_sys::Oid, column: &str, key: &str, caller: pg_sys::Oid) -> Option<String> {
    // The relation prints schema-qualified under the caller's fixed
    // search_path (pg_catalog, pg_temp); the type likewise.
    let (relation, key_type) = Spi::get_two_with_args::<String, String>(
        "SELECT $1::regclass::text, pg_catalog.format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[table.into(), column.into()],
    )
    .unwrap_or_else(|e| error!("pg_ihub: {e}"));
    let (Some(relation), Some(key_type)) = (relation, key_type) else {
        error!("pg_ihub: column {column} of relation {} does not exist", table.to_u32())
    };
    // One row always, NULL when there is no such row.
    let query = format!(
        "SELECT (SELECT pg_catalog.format('%s', {column}) FROM {relation} WHERE {column} = $1::{key_type})",
        column = spi::quote_identifier(column)
    );
    let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
    let found = restricted_as(caller, || Spi::get_one_with_args::<String>(&query, &[key.into()]))
        .unwrap_or_else(|e| error!("{e}"));
    unsafe { pg_sys::AtEOXact_GUC(false, guc_level) };
    found
}
