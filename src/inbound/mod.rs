//! Inbound webhooks: the listener worker that verifies, de-duplicates and
//! queues requests, the processors that run each item's SQL handler, and the
//! helpers of `sql/inbound.sql`. Verification itself is in
//! `pg_ihub_core::inbound`.

use pg_ihub_core::inbound::verify::{verify as check, Mode, Rule};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

pub mod listener;
pub mod processor;

/// Verifies an inbound request as the listener does: NULL when it passes,
/// else the reason it is refused (never the secret or the signature).
#[pg_extern(name = "_verify_inbound", stable)]
fn verify_inbound(
    verify: &str,
    secret: Option<&str>,
    header: Option<&str>,
    tolerance_s: i64,
    headers: JsonB,
    body: &[u8],
) -> Option<String> {
    // Fails closed: an unknown mode never lets a request through.
    let Some(mode) = Mode::parse(verify) else {
        return Some(format!("unknown verification {verify}"));
    };
    let rule = Rule::new(mode, secret.unwrap_or(""), header.map(str::to_ascii_lowercase), tolerance_s);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let map = headers.0.as_object();
    check(&rule, |name| map.and_then(|m| m.get(name)).and_then(Value::as_str), body, now).err().map(|e| e.to_string())
}

/// A form-encoded body as a JSON object (see `pg_ihub_core::inbound::form`).
#[pg_extern(name = "_form_jsonb", immutable, parallel_safe)]
fn form_jsonb(body: &[u8]) -> JsonB {
    JsonB(pg_ihub_core::inbound::form::form_to_json(body))
}

/// A request's de-duplication key, as the listener computes it
/// (`pg_ihub_core::inbound::verify::dedup_key`), for `ihub.receive`.
#[pg_extern(name = "_dedup_key", immutable, parallel_safe)]
fn dedup_key(verify: &str, id_header: Option<&str>, headers: JsonB, body: &[u8]) -> String {
    let mode = Mode::parse(verify).unwrap_or(Mode::None);
    let map = headers.0.as_object();
    pg_ihub_core::inbound::verify::dedup_key(
        mode,
        id_header,
        |name| map.and_then(|m| m.get(name)).and_then(Value::as_str),
        body,
    )
}
