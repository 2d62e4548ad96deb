//! Rust helpers behind the outbound SQL API (`sql/outbound.sql`):
//! validation and normalisation of user input, signing, and masking for
//! views. Each is a thin wrapper over `pg_ihub_core::outbound`.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::error::{IhubError, OrRaise};
use crate::settings;
use pg_ihub_core::outbound::circuit::CircuitPolicy;
use pg_ihub_core::outbound::{auth::Auth, mask, request_url, sender, signature, target};
use pg_ihub_core::retry::RetryPolicy;

pub fn allow_list() -> target::AllowList {
    target::AllowList::parse(&settings::allow_private_hosts()).unwrap_or_else(|e| IhubError::AllowList(e).raise())
}

/// The allow-list as a worker reads it: an invalid setting is a warning and
/// allows no private host, rather than stopping the worker.
pub fn worker_allow_list() -> target::AllowList {
    target::AllowList::parse(&settings::allow_private_hosts()).unwrap_or_else(|e| {
        warning!("pg_ihub: ignoring invalid ihub.allow_private_hosts: {e}");
        target::AllowList::default()
    })
}

/// Checks an endpoint URL against scheme rules and the private-host allow-list.
#[pg_extern(name = "_check_url", stable)]
fn check_url(url: &str) -> String {
    target::check_url(url, &allow_list()).or_raise().to_string()
}

#[pg_extern(name = "_normalize_retry", immutable)]
fn normalize_retry(policy: Option<JsonB>) -> JsonB {
    let value = policy.map(|j| j.0).unwrap_or(Value::Null);
    let policy = RetryPolicy::from_json(&value).or_raise();
    JsonB(serde_json::to_value(policy).expect("a policy serialises"))
}

/// An endpoint's circuit breaker policy with its defaults filled in, or NULL
/// when it is off (NULL, false).
#[pg_extern(name = "_normalize_circuit", immutable)]
fn normalize_circuit(policy: Option<JsonB>) -> Option<JsonB> {
    let value = policy.map(|j| j.0).unwrap_or(Value::Null);
    let policy = CircuitPolicy::from_json(&value).or_raise()?;
    Some(JsonB(serde_json::to_value(policy).expect("a policy serialises")))
}

#[pg_extern(name = "_normalize_auth", immutable)]
fn normalize_auth(auth: Option<JsonB>) -> JsonB {
    let value = auth.map(|j| j.0).unwrap_or(Value::Null);
    JsonB(serde_json::to_value(Auth::from_json(&value).or_raise()).expect("auth serialises"))
}

#[pg_extern(name = "_check_secret", immutable)]
fn check_secret(secret: &str) {
    signature::decode_secret(secret).or_raise();
}

#[pg_extern(name = "_generate_secret", volatile)]
fn generate_secret() -> String {
    signature::generate_secret()
}

/// An endpoint's signing secret: `whsec_…` (HMAC, v1) or `whsk_…` (ed25519, v1a).
#[pg_extern(name = "_check_signing_key", immutable)]
fn check_signing_key(secret: &str) {
    signature::decode_signing_key(secret).or_raise();
}

#[pg_extern(name = "_generate_ed25519_key", volatile)]
fn generate_ed25519_key() -> String {
    signature::generate_ed25519_key()
}

/// Parse analysis of a subscriber's SQL (a condition, a payload template)
/// as that role, in a security-restricted operation: names and types are
/// checked, and literals are read by their types' input functions, which
/// can be a role's own code (a domain's CHECK), so never with the rights
/// of the extension owner that ihub.subscribe runs as. Nothing is planned
/// or run.
#[pg_extern(name = "_parse_as", volatile)]
fn parse_as(sql: &str, role: pg_sys::Oid) {
    let sql =
        std::ffi::CString::new(sql).unwrap_or_else(|_| IhubError::Condition("it contains a NUL byte".into()).raise());
    crate::runtime::user_code::restricted_as(role, || {
        Spi::connect(|_| unsafe {
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), 0, std::ptr::null_mut());
            if !plan.is_null() {
                pg_sys::SPI_freeplan(plan);
            }
        })
    });
}

/// The `whpk_` public key of a `whsk_` secret key; NULL for an HMAC secret.
#[pg_extern(name = "_public_key", immutable, parallel_safe)]
fn public_key(secret: &str) -> Option<String> {
    signature::public_key(secret)
}

/// Custom headers must be an object of valid, unreserved names to a string
/// (secret) or `{"value": "…", "secret": true|false}`; see
/// `outbound::sender::check_headers`. Errors name the header, never its value.
#[pg_extern(name = "_check_headers", immutable)]
fn check_headers(headers: JsonB) {
    sender::check_headers(&headers.0).or_raise();
}

/// Stored headers (inbound requests and rejections; name to string) for
/// views: credential-looking names masked. An object value (a custom header
/// form) is masked unless it is `{"value": …, "secret": false}`.
#[pg_extern(name = "_mask_headers", immutable, parallel_safe)]
fn mask_headers(headers: Option<JsonB>) -> Option<JsonB> {
    mask_headers_and(headers, None)
}

/// The same, also masking `extra` (an inbound source's secret header), as
/// the listener stores headers.
#[pg_extern(name = "_mask_headers", immutable, parallel_safe)]
fn mask_headers_and(headers: Option<JsonB>, extra: Option<&str>) -> Option<JsonB> {
    let headers = headers?.0;
    if !headers.is_object() {
        return None;
    }
    let extra: Vec<String> = extra.map(str::to_ascii_lowercase).into_iter().collect();
    Some(JsonB(mask::mask_stored_headers(headers, &extra)))
}

/// An endpoint's custom headers for views: every value masked except those
/// given as `{"value": "…", "secret": false}`, shown plain.
#[pg_extern(name = "_mask_endpoint_headers", immutable, parallel_safe)]
fn mask_endpoint_headers(headers: Option<JsonB>) -> Option<JsonB> {
    let headers = headers?.0;
    if !headers.is_object() {
        return None;
    }
    Some(JsonB(mask::mask_endpoint_headers(headers)))
}

/// A delivery attempt's recorded request headers for views: as
/// `_mask_headers`, plus the signature and the secret ones among `custom`
/// (the endpoint's headers merged with the request's). New attempts are
/// recorded masked already; this also covers those recorded by 0.1.0.
#[pg_extern(name = "_mask_attempt_headers", immutable, parallel_safe)]
fn mask_attempt_headers(headers: Option<JsonB>, custom: Option<JsonB>) -> Option<JsonB> {
    let headers = headers?.0;
    if !headers.is_object() {
        return None;
    }
    let custom = custom.map(|j| j.0).unwrap_or(Value::Null);
    Some(JsonB(mask::mask_attempt_headers(headers, &custom)))
}

/// Settings with the values of secret-looking keys masked, at any depth.
#[pg_extern(name = "_mask_settings", immutable, parallel_safe)]
fn mask_settings(settings: Option<JsonB>) -> Option<JsonB> {
    Some(JsonB(mask::mask_json(settings?.0)))
}

/// An endpoint URL with an `ihub.http_request` path appended
/// (`request_url::join_url`: the path goes before the URL's own query).
#[pg_extern(name = "_join_url", immutable, parallel_safe)]
fn join_url(p_url: &str, p_path: Option<&str>) -> String {
    // The argument names of the SQL function it replaced (0.2.0).
    request_url::join_url(p_url, p_path)
}

/// A request path with the parameters of a `query` object added.
#[pg_extern(name = "_with_query", immutable, parallel_safe)]
fn with_query(path: Option<&str>, query: JsonB) -> Option<String> {
    request_url::with_query(path, &request_url::query_string(&query.0).or_raise())
}

/// A URL with secret-looking query parameters masked.
#[pg_extern(name = "_mask_url", immutable, parallel_safe)]
fn mask_url(url: &str) -> String {
    mask::mask_url(url)
}

/// Checks that `expr` is exactly one SQL expression, so that it can be placed
/// inside a generated statement without changing that statement's shape.
#[pg_extern(name = "_check_expression", immutable)]
fn check_expression(expr: &str) {
    if let Err(problem) = crate::outbound::capture::single_expression(expr) {
        IhubError::Condition(problem).raise();
    }
}

/// The `webhook-signature` value pg_ihub sends for this message.
#[pg_extern(immutable, parallel_safe)]
fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> String {
    signature::decode_signing_key(secret).or_raise();
    signature::signature_header(&[secret.to_string()], msg_id, timestamp, body.as_bytes())
}

/// Verifies a `webhook-signature` header (any of its space-separated entries).
#[pg_extern(immutable, parallel_safe)]
fn verify_signature(secret: &str, signature_header: &str, msg_id: &str, timestamp: i64, body: &str) -> bool {
    signature::verify(secret, signature_header, msg_id, timestamp, body.as_bytes())
}

/// `ihub.default_timeout` in milliseconds (current_setting shows it with a unit).
#[pg_extern(name = "_default_timeout_ms", stable)]
fn default_timeout_ms() -> i32 {
    settings::DEFAULT_TIMEOUT_MS.get()
}
