//! `ihub.test_connection(endpoint)`: one request to an endpoint, made now
//! in the caller's session, reported as status, latency and error. It is
//! sent as a delivery would be (method, URL, headers, credentials, signed
//! with the endpoint's secrets, the private-host allow-list and proxy
//! applied) with a small test body, and recorded nowhere: it is a probe.
//! The report never repeats a credential: no request headers, no body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::settings;
use pg_ihub_core::outbound::auth::Auth;
use pg_ihub_core::outbound::sender::{headers_from_json, Request, Sender};
use pg_ihub_core::retry::category;

#[pg_extern(name = "test_connection", volatile, parallel_unsafe)]
fn test_connection(endpoint: &str) -> JsonB {
    // The endpoint's settings and credentials, read with the extension
    // owner's rights: the caller holds none on those tables.
    let datum = crate::caller::call_internal("_connection_request", &[pg_sys::TEXTOID], &[endpoint.into_datum()])
        .expect("ihub._connection_request returns the request");
    let spec = unsafe { JsonB::from_datum(datum, false) }.expect("a jsonb").0;
    let text = |key: &str| spec[key].as_str().unwrap_or_default().to_string();
    let auth = Auth::from_json(&spec["auth"])
        .unwrap_or_else(|e| error!("endpoint {endpoint}: stored auth does not parse: {e}"));
    let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let event_id = format!("test_{:032x}", rand::random::<u128>());
    let request = Request {
        delivery_id: 0,
        event_id: event_id.clone(),
        method: text("method"),
        url: text("url"),
        headers: headers_from_json(&spec["headers"]),
        auth,
        secrets: spec["secrets"]
            .as_array()
            .map(|s| s.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
        body: json!({"id": event_id, "type": "ihub.test_connection", "timestamp": sent_at, "data": {}}).to_string(),
        timeout: Duration::from_millis(spec["timeout_ms"].as_u64().unwrap_or(10_000).max(1)),
        test_mode: false,
        body_limit: None,
        not_sendable: None,
    };
    let sender = Sender::with_proxy(
        crate::outbound::functions::allow_list(),
        settings::RESPONSE_BODY_LIMIT.get().max(0) as usize,
        1,
        concat!("pg_ihub/", env!("CARGO_PKG_VERSION")),
        &settings::http_proxy(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| error!("pg_ihub: no tokio runtime: {e}"));
    // A cancel (or statement_timeout) stops the wait; Postgres raises it below.
    let attempts = runtime.block_on(sender.send_all(vec![request], || unsafe { pg_sys::InterruptPending != 0 }));
    pgrx::check_for_interrupts!();
    let Some(attempt) = attempts.into_iter().next() else { error!("pg_ihub: the test request did not finish") };
    let ok = matches!(attempt.status, Some(200..=299));
    JsonB(json!({
        "endpoint": endpoint,
        "enabled": spec["enabled"],
        "ok": ok,
        "status": attempt.status,
        "latency_ms": (attempt.duration.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        "category": category(&attempt.outcome),
        "error": attempt.error.map(Value::String).unwrap_or(Value::Null),
    }))
}
