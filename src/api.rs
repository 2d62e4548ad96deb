//! Rust helpers behind the SQL API in `sql/api.sql`: validation and
//! normalisation of user input, signing, and masking for views. Each is a
//! thin wrapper over the pure code in `outbound`.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use crate::error::{IhubError, OrRaise};
use crate::outbound::{auth::Auth, mask, retry::RetryPolicy, signature, target};
use crate::settings;

pub fn allow_list() -> target::AllowList {
    target::AllowList::parse(&settings::allow_private_hosts()).unwrap_or_else(|e| IhubError::AllowList(e).raise())
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

/// Headers must be an object of valid names to string values, and may not
/// set the webhook-* headers that carry the signature.
#[pg_extern(name = "_check_headers", immutable)]
fn check_headers(headers: JsonB) {
    let Value::Object(map) = headers.0 else {
        IhubError::Headers("headers must be a JSON object".into()).raise();
    };
    for (name, value) in &map {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            IhubError::Headers(format!("\"{name}\" is not a valid header name")).raise();
        }
        if name.to_ascii_lowercase().starts_with("webhook-") {
            IhubError::Headers(format!("\"{name}\" is reserved for the Standard Webhooks signature")).raise();
        }
        match value {
            Value::String(s) if reqwest::header::HeaderValue::from_str(s).is_ok() => {}
            _ => IhubError::Headers(format!("the value of \"{name}\" must be a string without control characters"))
                .raise(),
        }
    }
}

/// Credentials in header values replaced by a mask, for views.
#[pg_extern(name = "_mask_headers", immutable, parallel_safe)]
fn mask_headers(headers: Option<JsonB>) -> Option<JsonB> {
    let Value::Object(map) = headers?.0 else {
        return None;
    };
    let masked: Map<String, Value> = map
        .into_iter()
        .map(|(k, v)| {
            let v = if mask::is_sensitive_header(&k, &[]) { Value::String(mask::MASK.into()) } else { v };
            (k, v)
        })
        .collect();
    Some(JsonB(Value::Object(masked)))
}

/// Settings with the values of secret-looking keys masked, at any depth.
#[pg_extern(name = "_mask_settings", immutable, parallel_safe)]
fn mask_settings(settings: Option<JsonB>) -> Option<JsonB> {
    Some(JsonB(mask::mask_json(settings?.0)))
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
    if let Err(problem) = crate::capture::single_expression(expr) {
        IhubError::Condition(problem).raise();
    }
}

/// The `webhook-signature` value pg_ihub sends for this message.
#[pg_extern(immutable, parallel_safe)]
fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> String {
    signature::decode_secret(secret).or_raise();
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

/// The role that called into pg_ihub. Inside a SECURITY DEFINER function
/// current_user is the extension owner; the outer user is the caller (after
/// any SET ROLE).
#[pg_extern(name = "_invoker", stable)]
fn invoker() -> String {
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), false);
        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}
