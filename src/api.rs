//! Rust helpers behind the SQL API in `sql/api.sql`: validation and
//! normalisation of user input, signing, and masking for views. Each is a
//! thin wrapper over the pure code in `outbound`.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::error::{IhubError, OrRaise};
use crate::outbound::{auth::Auth, mask, retry::RetryPolicy, sender, signature, target};
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

/// A log message with credentials masked.
#[pg_extern(name = "_mask_text", immutable, parallel_safe)]
fn mask_text(text: &str) -> String {
    mask::mask_text(text)
}

/// `ihub.log_min_level`: entries below it are dropped unless their
/// integration says otherwise.
#[pg_extern(name = "_log_min_level", stable)]
fn log_min_level() -> String {
    let level = crate::settings::string_setting(&settings::LOG_MIN_LEVEL);
    match level.as_str() {
        "debug" | "info" | "warning" | "error" | "critical" => level,
        _ => "info".into(),
    }
}

/// The histogram (counts per `ihub._latency_bounds()` bucket) of durations.
#[pg_extern(name = "_histogram", immutable, parallel_safe)]
fn histogram(durations_ms: Vec<Option<f64>>) -> Vec<i64> {
    const BOUNDS: [f64; 15] =
        [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0];
    let mut counts = vec![0i64; BOUNDS.len() + 1];
    for d in durations_ms.into_iter().flatten() {
        counts[BOUNDS.iter().position(|b| d <= *b).unwrap_or(BOUNDS.len())] += 1;
    }
    counts
}

/// Element-wise sum of two histograms (the state function of ihub._histogram_sum).
#[pg_extern(name = "_histogram_add", immutable, parallel_safe)]
fn histogram_add(a: Option<Vec<Option<i64>>>, b: Option<Vec<Option<i64>>>) -> Option<Vec<i64>> {
    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
    let len = a.len().max(b.len());
    if len == 0 {
        return None;
    }
    Some(
        (0..len).map(|i| a.get(i).copied().flatten().unwrap_or(0) + b.get(i).copied().flatten().unwrap_or(0)).collect(),
    )
}

#[pg_extern(name = "_preloaded", stable)]
fn preloaded() -> bool {
    crate::workers::preloaded()
}

/// The background workers this database should have, and after how long
/// without a heartbeat one counts as stale.
#[pg_extern(name = "_expected_workers", stable)]
fn expected_workers(
) -> TableIterator<'static, (name!(kind, String), name!(expected, i64), name!(stale_after, pgrx::datum::Interval))> {
    let poll_ms = settings::POLL_INTERVAL_MS.get() as i64;
    // A heartbeat comes at least every poll interval; jobs and cleanup can
    // keep a worker busy longer, hence the generous margin.
    let stale = |ms: i64| pgrx::datum::Interval::new(0, 0, (ms * 1000).max(60_000_000)).expect("an interval");
    let rows = vec![
        ("dispatcher".to_string(), settings::DISPATCH_WORKERS.get() as i64, stale(poll_ms * 3)),
        ("job worker".to_string(), settings::JOB_WORKERS.get() as i64, stale(settings::JOB_TIMEOUT_MS.get() as i64)),
        ("scheduler".to_string(), 1, stale(poll_ms * 3)),
        ("maintenance".to_string(), 1, stale(3_600_000)),
        (
            "processor".to_string(),
            settings::INBOUND_PROCESSORS.get() as i64,
            stale(settings::JOB_TIMEOUT_MS.get() as i64),
        ),
    ];
    // The listener serves the first database listed, if it listens at all.
    let mut rows = rows;
    let current = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) };
    if !settings::listen_address().is_empty()
        && settings::databases().first().map(String::as_str) == Some(&*current.to_string_lossy())
    {
        rows.push(("listener".to_string(), 1, stale(poll_ms * 3 + 60_000)));
    }
    TableIterator::new(rows)
}

#[pg_extern(name = "_health_queue_age", stable)]
fn health_queue_age() -> pgrx::datum::Interval {
    pgrx::datum::Interval::new(0, 0, settings::HEALTH_QUEUE_AGE_S.get() as i64 * 1_000_000).expect("an interval")
}

#[pg_extern(name = "_health_queue_depth", stable)]
fn health_queue_depth() -> i64 {
    settings::HEALTH_QUEUE_DEPTH.get() as i64
}

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
    use crate::inbound::verify::{verify as check, Mode, Rule};
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
