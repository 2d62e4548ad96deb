//! Loop prevention. A transaction marked as syncing an integration (by
//! `ihub.syncing(integration)`, or by the workers for that integration's
//! inbound handlers and jobs) writes to subscribed tables like any other,
//! but the capture triggers of that integration's subscriptions skip its
//! rows: the change came from that system and is not sent back to it.
//! Every other integration's subscriptions capture as usual.
//!
//! The mark is the transaction-local setting `ihub.syncing` (superuser
//! context: a role cannot set it by hand, only through `ihub.syncing`,
//! which checks the integration). Unset, it costs a capture trigger one
//! setting lookup.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::prelude::*;

thread_local! {
    /// The integration of each subscription seen: fixed for its life (an
    /// endpoint never changes integration, ids are never reused).
    static INTEGRATION_OF: RefCell<HashMap<i64, Option<String>>> = RefCell::new(HashMap::new());
}

/// Whether the rows of subscription `sub_id` are not to be captured now:
/// the transaction syncs the subscription's integration.
pub fn suppresses(sub_id: i64) -> bool {
    let marked = crate::settings::syncing();
    if marked.is_empty() {
        return false;
    }
    let integration = INTEGRATION_OF.with(|cache| {
        if let Some(known) = cache.borrow().get(&sub_id) {
            return known.clone();
        }
        // In the writer's trigger, under the writer's search path: as_owner
        // fixes it, or the writer's own `=` would run as the owner.
        let found = crate::runtime::user_code::as_owner(|| {
            Spi::get_one_with_args::<String>(
                "SELECT i.name FROM ihub.subscription s JOIN ihub.endpoint e ON e.id = s.endpoint_id \
                 JOIN ihub.integration i ON i.id = e.integration_id WHERE s.id = $1",
                &[sub_id.into()],
            )
        })
        .ok()
        .flatten();
        if found.is_some() {
            cache.borrow_mut().insert(sub_id, found.clone());
        }
        found
    });
    integration.is_some_and(|name| marked.split(',').any(|m| m == name))
}

/// Marks the current transaction (or the GUC nest level a worker opened
/// for one call) as syncing `integration`, besides any marked already.
/// For workers and internal callers: no check of who asks.
pub fn mark(integration: &str) {
    let current = crate::settings::syncing();
    if current.split(',').any(|m| m == integration) {
        return;
    }
    let value = if current.is_empty() { integration.to_string() } else { format!("{current},{integration}") };
    let value = CString::new(value).expect("integration names have no NUL");
    unsafe {
        pg_sys::set_config_option(
            c"ihub.syncing".as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// For the TRUNCATE capture trigger, in SQL.
#[pg_extern(name = "_echo_suppressed", stable, parallel_safe)]
fn echo_suppressed(subscription: i64) -> bool {
    suppresses(subscription)
}
