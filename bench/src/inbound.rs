//! Inbound benchmark: signed Standard Webhooks requests from 64 keep-alive
//! clients on loopback (accepted per second, response time), first with the
//! items delayed so that the processors stay idle and the listener is
//! measured alone; then how fast the processors drain that backlog with a
//! trivial handler; then both at once.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pg_ihub_testkit::verify::sign;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn setup(db: &mut postgres::Client) {
    db.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION bench_inbound(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
         SELECT ihub.create_integration('bench_in') WHERE NOT EXISTS (SELECT 1 FROM ihub.integrations WHERE name = 'bench_in');
         SELECT ihub.enable_integration('bench_in');
         SELECT ihub.create_source('bench_in', 'signed', 'bench_inbound(ihub.inbound_items)', secret => '{SECRET}')
         WHERE NOT EXISTS (SELECT 1 FROM ihub.inbound_sources WHERE integration = 'bench_in' AND name = 'signed');"
    ))
    .unwrap();
}

/// `clients` tasks, each one keep-alive connection sending requests back to
/// back for `length`; prints accepted/s and response-time percentiles.
pub fn accept_rate(listen: &str, clients: usize, length: Duration, delayed: bool) -> u64 {
    let query = if delayed { "?delay=86400" } else { "" };
    let url = Arc::new(format!("http://{listen}/webhooks/bench_in/signed{query}"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (accepted, mut times, other) = runtime.block_on(async move {
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let url = url.clone();
                tokio::spawn(async move {
                    // One client per task: one connection each, kept alive.
                    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
                    let mut times = Vec::new();
                    let (mut accepted, mut other) = (0u64, 0u64);
                    let mut n = 0u64;
                    while start.elapsed() < length {
                        n += 1;
                        let id = format!("msg_{c}_{n}_{}", start.elapsed().as_nanos());
                        let body = format!(r#"{{"type": "order.paid", "client": {c}, "n": {n}}}"#);
                        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
                        let signature = sign(SECRET, &id, ts, body.as_bytes());
                        let sent = Instant::now();
                        let response = client
                            .post(url.as_str())
                            .header("content-type", "application/json")
                            .header("webhook-id", id)
                            .header("webhook-timestamp", ts.to_string())
                            .header("webhook-signature", signature)
                            .body(body)
                            .send()
                            .await;
                        match response {
                            Ok(r) if r.status() == 202 => {
                                let _ = r.bytes().await;
                                times.push(sent.elapsed().as_secs_f64() * 1000.0);
                                accepted += 1;
                            }
                            _ => other += 1,
                        }
                    }
                    (accepted, times, other)
                })
            })
            .collect();
        let (mut accepted, mut times, mut other) = (0u64, Vec::new(), 0u64);
        for t in tasks {
            let (a, ts, o) = t.await.unwrap();
            accepted += a;
            times.extend(ts);
            other += o;
        }
        (accepted, times, other)
    });
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| times.get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1))).copied();
    println!(
        "inbound: {accepted} signed webhooks accepted (202) from {clients} keep-alive clients in {:.0} s ({}) -> {:.0}/s{}; \
         response p50 {:.2} ms, p99 {:.2} ms{}",
        length.as_secs_f64(),
        if delayed { "delayed: processors idle" } else { "processors busy at the same time" },
        accepted as f64 / length.as_secs_f64(),
        crate::machine::ratio(accepted as f64 / length.as_secs_f64()),
        pct(0.50).unwrap_or(f64::NAN),
        pct(0.99).unwrap_or(f64::NAN),
        if other > 0 { format!(" ({other} other answers)") } else { String::new() }
    );
    accepted
}

/// Waits until no inbound item is queued or being processed.
fn wait_drained(db: &mut postgres::Client, timeout: Duration) {
    let (due, running) = ("ihub.inbound_item WHERE state = 'pending'", "ihub.inbound_item WHERE state = 'running'");
    crate::wait_until_none(db, due, running, "inbound items", timeout, Duration::from_millis(10));
}

/// Makes every queued item due now and times the processors draining them.
pub fn process_rate(db: &mut postgres::Client) {
    let processors: i64 =
        db.query_one("SELECT count(*) FROM ihub.workers WHERE kind = 'processor'", &[]).unwrap().get(0);
    let n = db.execute("UPDATE ihub.inbound_item SET run_at = now() WHERE state = 'pending'", &[]).unwrap();
    db.batch_execute("SELECT ihub._wake_processor()").unwrap();
    let start = Instant::now();
    wait_drained(db, Duration::from_secs(900));
    let took = start.elapsed().as_secs_f64();
    println!(
        "inbound: {n} queued items handled by {processors} processors (trivial handler) in {took:.2} s -> {:.0} items/s{}",
        n as f64 / took,
        crate::machine::ratio(n as f64 / took)
    );
}
