//! Outbound delivery against a real cluster (pg_ihub preloaded, dispatchers
//! running) and real HTTP receivers on loopback. Each test makes its own
//! table, integration and endpoint, so the tests run side by side.

use std::time::Duration;

use pg_ihub_e2e::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn row_changes_arrive_signed_with_the_documented_payload() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/orders"), "");
    rx.expect_secret(&s.secret);
    hub.exec(&format!(
        "SELECT ihub.subscribe('{t}', '{e}');
         INSERT INTO {t} (customer, amount) VALUES ('alice', 10);
         UPDATE {t} SET status = 'paid' WHERE customer = 'alice';
         DELETE FROM {t} WHERE customer = 'alice';",
        t = s.table,
        e = s.endpoint
    ));
    assert!(rx.wait_for(3, WAIT), "3 requests expected, got {}", rx.count());
    assert_eq!(hub.wait_settled(&s.endpoint, 3, WAIT), vec!["done"; 3]);

    let got = rx.received();
    let by_type = |t: &str| got.iter().find(|r| r.json()["type"] == format!("{}.{t}", s.table)).unwrap().clone();
    let (ins, upd, del) = (by_type("insert"), by_type("update"), by_type("delete"));
    for r in [&ins, &upd, &del] {
        assert_eq!(r.signature_valid, Some(true), "signature must verify with the endpoint secret");
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/orders");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        assert_eq!(r.header("webhook-id"), body["id"].as_str(), "webhook-id is the event id");
        assert!(body["id"].as_str().unwrap().starts_with("evt_"));
        let ts: i64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((now - ts).abs() < 60, "timestamp is the send time");
        assert_eq!(body["table"], s.table.as_str());
        assert_eq!(body["schema"], "public");
        assert_eq!(body["tenant"], "acme");
        assert!(body["txid"].as_str().unwrap().parse::<u64>().is_ok());
        assert!(body["occurred_at"].is_string());
    }
    let i = ins.json();
    assert_eq!(i["operation"], "insert");
    assert_eq!(i["data"]["customer"], "alice");
    assert_eq!(i["data"]["status"], "new");
    assert!(i.get("old").is_none());
    let u = upd.json();
    assert_eq!(u["data"]["status"], "paid");
    assert_eq!(u["old"]["status"], "new");
    assert_eq!(u["changed"], serde_json::json!(["status"]));
    let d = del.json();
    assert_eq!(d["operation"], "delete");
    assert_eq!(d["old"]["customer"], "alice");
    assert_eq!(d["data"]["customer"], "alice");

    // Every attempt is on record, with the receiver's answer.
    let recorded: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.delivery_attempts WHERE endpoint = '{}' AND response_status = 200 \
           AND response_body LIKE '%valid%' AND request_headers ? 'webhook-signature' AND error_category = 'ok'",
        s.endpoint
    ));
    assert_eq!(recorded, 3);
}

#[test]
fn columns_select_the_payload_and_watch_and_condition_filter() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    hub.exec(&format!(
        "SELECT ihub.subscribe('{t}', '{e}', events => '{{update}}', columns => '{{id,status,amount}}',
                               watch => '{{status}}', condition => 'new.amount > 100');
         INSERT INTO {t} (customer, amount) VALUES ('small', 50), ('big', 500);
         UPDATE {t} SET note = 'not watched';
         UPDATE {t} SET status = 'paid' WHERE customer = 'small';
         UPDATE {t} SET status = 'paid' WHERE customer = 'big';",
        t = s.table,
        e = s.endpoint
    ));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    assert!(rx.wait_for(1, WAIT));
    std::thread::sleep(Duration::from_millis(300));
    let got = rx.received();
    assert_eq!(got.len(), 1, "only the watched change passing the condition is sent");
    let body = got[0].json();
    assert_eq!(body["data"]["status"], "paid");
    assert_eq!(body["data"]["amount"], serde_json::json!(500.0));
    assert!(body["data"].get("customer").is_none(), "unselected columns stay out: {body}");
    assert!(body["old"].get("note").is_none());
    assert_eq!(body["changed"], serde_json::json!(["status"]));
}

/// Writes made by user code that a worker runs (a job, an inbound handler)
/// go through the same capture triggers, conditions included.
#[test]
fn writes_of_jobs_and_handlers_are_captured_with_watch_and_condition() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/orders"), "");
    let integration = &s.integration;
    hub.exec(&format!(
        "SELECT ihub.subscribe('{t}', '{e}', watch => '{{status}}', condition => 'new.amount > 0');
         CREATE FUNCTION {t}_job(args jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO {t} (customer, amount) VALUES ('from a job', 1);
             UPDATE {t} SET status = 'paid' WHERE customer = 'from a job' $$;
         CREATE FUNCTION {t}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$
             INSERT INTO {t} (customer, amount) VALUES ('from a handler', 2) RETURNING '{{}}'::jsonb $$;
         -- The source is another system's: a handler's writes are not sent
         -- back to its own integration (loop prevention, tests/sync.rs).
         SELECT ihub.create_integration('{integration}_in');
         SELECT ihub.enable_integration('{integration}_in');
         SELECT ihub.create_source('{integration}_in', 'src', '{t}_handle(ihub.inbound_items)', 'none');
         SELECT ihub.enqueue('{t}_job(jsonb)');
         SELECT ihub.receive('{integration}_in', 'src', '{{}}', convert_to('{{}}', 'UTF8'));",
        t = s.table,
        e = s.endpoint
    ));
    assert_eq!(hub.wait_settled(&s.endpoint, 3, WAIT), vec!["done"; 3]);
    let failed: i64 = hub.one("SELECT count(*) FROM ihub.inbound_failed WHERE source = 'src'");
    assert_eq!(failed, 0);
}

#[test]
fn a_rolled_back_write_sends_nothing() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    hub.exec(&format!("SELECT ihub.subscribe('{}', '{}')", s.table, s.endpoint));
    hub.exec(&format!("BEGIN; INSERT INTO {} (customer, amount) VALUES ('ghost', 1); ROLLBACK;", s.table));
    hub.exec(&format!("INSERT INTO {} (customer, amount) VALUES ('marker', 2)", s.table));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    std::thread::sleep(Duration::from_millis(300));
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["data"]["customer"], "marker");
}

#[test]
fn server_errors_are_retried_until_success() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, n| if n < 2 { Reply::status(500) } else { Reply::status(200) });
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{FAST_RETRY}'"));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{\"n\": 1}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    let got = rx.received();
    assert_eq!(got.len(), 3);
    let ids: Vec<_> = got.iter().map(|r| r.header("webhook-id").unwrap().to_string()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "retries keep the webhook-id");
    // Backoff: 0.2 s then 0.4 s between attempts.
    assert!(got[1].at - got[0].at >= Duration::from_millis(180), "{:?}", got[1].at - got[0].at);
    assert!(got[2].at - got[1].at >= Duration::from_millis(380), "{:?}", got[2].at - got[1].at);
    let categories: Vec<String> = hub
        .db
        .query(
            &format!(
                "SELECT error_category FROM ihub.delivery_attempts WHERE endpoint = '{}' ORDER BY attempt",
                s.endpoint
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(categories, vec!["http_5xx", "http_5xx", "ok"]);
    assert_eq!(hub.one::<i32>(&format!("SELECT attempts FROM ihub.deliveries WHERE endpoint = '{}'", s.endpoint)), 3);
}

#[test]
fn client_errors_fail_at_once() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, _| Reply::status(400));
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{FAST_RETRY}'"));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["failed"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rx.count(), 1, "a 400 is not retried");
    let (status, error): (i32, String) = {
        let row = hub
            .db
            .query_one(
                &format!("SELECT last_status, last_error FROM ihub.deliveries WHERE endpoint = '{}'", s.endpoint),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(status, 400);
    assert!(error.contains("400"), "{error}");
}

#[test]
fn gone_disables_the_endpoint_until_it_is_enabled_again() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, n| if n == 0 { Reply::status(410) } else { Reply::status(200) });
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{FAST_RETRY}'"));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["failed"]);
    let (enabled, reason): (bool, String) = {
        let row = hub
            .db
            .query_one(
                &format!("SELECT enabled, disabled_reason FROM ihub.endpoints WHERE name = '{}'", s.endpoint),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(!enabled);
    assert!(reason.contains("410"), "{reason}");
    // Held while disabled ...
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{\"second\": true}}')", s.endpoint));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(hub.delivery_states(&s.endpoint), vec!["failed", "pending"]);
    assert_eq!(rx.count(), 1);
    // ... and sent once enabled.
    hub.exec(&format!("SELECT ihub.enable_endpoint('{}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 2, WAIT), vec!["failed", "done"]);
}

#[test]
fn a_receiver_that_never_answers_times_out_and_is_retried() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, n| if n == 0 { Reply::Hang } else { Reply::status(200) });
    let s = hub.setup(&rx.url("/"), &format!(", timeout_ms => 300, retry => '{FAST_RETRY}'"));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    let first: (String, f64) = {
        let row = hub
            .db
            .query_one(
                &format!("SELECT error_category, duration_ms FROM ihub.delivery_attempts WHERE endpoint = '{}' AND attempt = 1", s.endpoint),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(first.0, "timeout");
    assert!(first.1 >= 290.0 && first.1 < 5000.0, "timed out after {} ms", first.1);
}

#[test]
fn a_dropped_connection_is_retried() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, n| if n == 0 { Reply::HangUp } else { Reply::status(200) });
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{FAST_RETRY}'"));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    let category: String = hub.one(&format!(
        "SELECT error_category FROM ihub.delivery_attempts WHERE endpoint = '{}' AND attempt = 1",
        s.endpoint
    ));
    assert_eq!(category, "connection");
}

#[test]
fn connections_the_receiver_closed_while_idle_are_not_reused() {
    let mut hub = hub();
    let rx = Receiver::start();
    let port = rx.addr.port();
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{FAST_RETRY}'"));
    let send = |hub: &mut Hub, n: usize| {
        for _ in 0..n {
            // One transaction each, so that both dispatchers get some.
            hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
        }
    };
    send(&mut hub, 10);
    hub.wait_settled(&s.endpoint, 10, WAIT);
    // The receiver restarts: every kept-alive connection is closed while
    // the dispatchers sleep.
    drop(rx);
    let rx = Receiver::start_on(port, 2, true);
    std::thread::sleep(Duration::from_millis(100));
    send(&mut hub, 10);
    let states = hub.wait_settled(&s.endpoint, 20, WAIT);
    assert!(states.iter().all(|s| s == "done"), "{states:?}");
    let failed: Vec<String> = hub
        .db
        .query(
            &format!(
                "SELECT error FROM ihub.delivery_attempts WHERE endpoint = '{}' AND error IS NOT NULL",
                s.endpoint
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(failed.is_empty(), "first attempts failed on stale connections: {failed:?}");
    assert_eq!(rx.count(), 10);
}

#[test]
fn retry_after_is_honoured_for_429_and_503() {
    for status in [429u16, 503] {
        let mut hub = hub();
        let rx = Receiver::start();
        rx.script(move |_, n| if n == 0 { Reply::with_header(status, "retry-after", "1") } else { Reply::status(200) });
        // Without Retry-After the next attempt would come a minute later.
        let s = hub.setup(&rx.url("/"), r#", retry => '{"initial_delay": 60, "jitter": 0}'"#);
        hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
        assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"], "status {status}");
        let got = rx.received();
        let gap = got[1].at - got[0].at;
        assert!(gap >= Duration::from_millis(900) && gap < Duration::from_secs(10), "{status}: gap {gap:?}");
    }
}

#[test]
fn exhausted_retries_go_dead_and_replay_brings_them_back() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, _| Reply::status(502));
    let s = hub.setup(&rx.url("/"), r#", retry => '{"initial_delay": 0.1, "jitter": 0, "max_attempts": 2}'"#);
    let first: i64 = hub.one(&format!("SELECT ihub.http_request('{}', '{{\"n\": 1}}')", s.endpoint));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{\"n\": 2}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 2, WAIT), vec!["dead", "dead"]);
    assert_eq!(rx.count(), 4);

    rx.script(|_, _| Reply::status(200));
    hub.exec(&format!("SELECT ihub.replay({first})"));
    assert!(hub.wait_true(&format!("SELECT state = 'done' FROM ihub.deliveries WHERE id = {first}"), WAIT));
    assert_eq!(hub.one::<i32>(&format!("SELECT attempts FROM ihub.deliveries WHERE id = {first}")), 3);

    let replayed: i64 = hub.one(&format!("SELECT ihub.replay_dead('{}', now() - interval '1 hour')", s.endpoint));
    assert_eq!(replayed, 1);
    assert_eq!(hub.wait_settled(&s.endpoint, 2, WAIT), vec!["done", "done"]);
    let err = hub.error(&format!("SELECT ihub.replay({first})"));
    assert!(err.contains("only dead or failed"), "{err}");
}

#[test]
fn test_mode_records_the_signed_request_without_sending_it() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    hub.exec(&format!(
        "SELECT ihub.subscribe('{t}', '{e}', test_mode => true);
         INSERT INTO {t} (customer, amount) VALUES ('dry', 1);",
        t = s.table,
        e = s.endpoint
    ));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.count(), 0, "test mode must not send");
    let row = hub
        .db
        .query_one(
            &format!(
                "SELECT a.error_category, a.request_headers->>'webhook-signature', d.test_mode \
                 FROM ihub.delivery_attempts a JOIN ihub.deliveries d ON d.id = a.delivery_id WHERE d.endpoint = '{}'",
                s.endpoint
            ),
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "test_mode");
    assert!(row.get::<_, String>(1).starts_with("v1,"));
    assert!(row.get::<_, bool>(2));
}

#[test]
fn credentials_reach_the_receiver_but_never_the_records_or_the_log() {
    let mut hub = hub();
    let rx = Receiver::start();
    let token = format!("tok-{}", unique("secret"));
    let s = hub.setup(
        &rx.url("/?page=1&api_key=querysecret"),
        &format!(r#", auth => '{{"type": "bearer", "token": "{token}"}}', headers => '{{"X-Shop-Token": "hdrsecret", "X-Tenant": {{"value": "acme", "secret": false}}}}'"#),
    );
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}', method => 'PUT', path => '/x')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    let got = rx.received();
    assert_eq!(got[0].header("authorization"), Some(format!("Bearer {token}").as_str()));
    assert_eq!(got[0].header("x-shop-token"), Some("hdrsecret"));
    assert_eq!(got[0].method, "PUT");
    let views: String = hub.one(&format!(
        "SELECT concat_ws(' ', (SELECT row_to_json(a)::text FROM ihub.delivery_attempts a WHERE endpoint = '{e}'),
                              (SELECT row_to_json(x)::text FROM ihub.endpoints x WHERE name = '{e}'))",
        e = s.endpoint
    ));
    for secret in [token.as_str(), "hdrsecret", "querysecret"] {
        assert!(!views.contains(secret), "{secret} leaked into a view: {views}");
    }
    assert!(views.contains("X-Tenant") && views.contains("acme"), "non-secret headers stay visible");
    assert!(!hub.cluster.log().contains(&token), "the token must not reach the server log");
}

#[test]
fn secret_rotation_signs_with_both_keys_during_the_grace_period() {
    let mut hub = hub();
    let old_rx = Receiver::start();
    let s = hub.setup(&old_rx.url("/"), "");
    old_rx.expect_secret(&s.secret);
    let new_secret: String = hub.one(&format!("SELECT ihub.rotate_secret('{}')", s.endpoint));
    assert_ne!(new_secret, s.secret);
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert!(old_rx.wait_for(1, WAIT));
    let r = &old_rx.received()[0];
    assert_eq!(r.signature_valid, Some(true), "a receiver still holding the old key verifies");
    assert_eq!(r.header("webhook-signature").unwrap().split(' ').count(), 2);
    assert!(pg_ihub_testkit::verify::verify(
        &new_secret,
        r.header("webhook-id").unwrap(),
        r.header("webhook-timestamp").unwrap(),
        r.header("webhook-signature").unwrap(),
        &r.body
    ));
    // With no grace the old key stops signing at once.
    hub.exec(&format!("SELECT ihub.rotate_secret('{}', grace => interval '0')", s.endpoint));
    let signing: i64 =
        hub.one(&format!("SELECT count(*) FROM ihub.endpoint_secrets WHERE endpoint = '{}' AND signing", s.endpoint));
    assert_eq!(signing, 1);
}

#[test]
fn a_bulk_insert_is_delivered_once_per_row() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    hub.subscribe_and_insert(&s, 2000);
    let states = hub.wait_settled(&s.endpoint, 2000, Duration::from_secs(60));
    assert!(states.iter().all(|s| s == "done"));
    assert_eq!(distinct_row_ids(&rx), 2000, "every row arrives");
    let sub: i64 = hub.one(&format!("SELECT id FROM ihub.subscriptions WHERE endpoint = '{}'", s.endpoint));
    let leftover: i64 = hub.one(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}"));
    assert_eq!(leftover, 0, "the capture table is drained");
}

/// The circuit breaker against a receiver that fails and recovers: three
/// failed attempts open the circuit, and then the endpoint gets nothing but
/// a probe after each cooldown; a failed probe opens it again, an answered
/// one closes it and the rest follow. Another endpoint is served while it
/// is open. Each change is in the history, on NOTIFY ihub_circuit and logged.
#[test]
fn the_circuit_opens_probes_and_closes_against_a_receiver_that_recovers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut hub = hub();
    let mut watcher = pg_ihub_e2e::hub();
    watcher.exec("LISTEN ihub_circuit");
    let rx = Receiver::start();
    let healthy = Arc::new(AtomicBool::new(false));
    let up = healthy.clone();
    rx.script(move |_, _| Reply::status(if up.load(Ordering::SeqCst) { 200 } else { 500 }));
    let retry = r#"{"initial_delay": 0.1, "multiplier": 1, "jitter": 0, "max_attempts": 50}"#;
    let s =
        hub.setup(&rx.url("/"), &format!(", retry => '{retry}', circuit => '{{\"failures\": 3, \"cooldown\": 1}}'"));
    hub.exec(&format!(
        "SELECT ihub.http_request('{}', jsonb_build_object('n', g)) FROM generate_series(1, 5) g",
        s.endpoint
    ));
    let state = |hub: &mut Hub| {
        hub.one::<String>(&format!("SELECT circuit_state FROM ihub.endpoints WHERE name = '{}'", s.endpoint))
    };
    let reopened = format!(
        "SELECT count(*) >= 2 FROM ihub.endpoints, jsonb_array_elements(circuit_changes) c
         WHERE name = '{}' AND c ->> 'to' = 'open'",
        s.endpoint
    );
    assert!(hub.wait_true(&reopened, WAIT), "the circuit did not open, probe and open again");

    // Another endpoint is served while this circuit is open or probing.
    let other_rx = Receiver::start();
    let other = hub.setup(&other_rx.url("/"), "");
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", other.endpoint));
    assert!(other_rx.wait_for(1, WAIT));
    assert_ne!(state(&mut hub), "closed");

    healthy.store(true, Ordering::SeqCst);
    assert_eq!(hub.wait_settled(&s.endpoint, 5, WAIT), vec!["done"; 5]);
    assert_eq!(state(&mut hub), "closed");
    let changes: Vec<String> = hub
        .db
        .query(
            &format!(
                "SELECT (c ->> 'from') || '->' || (c ->> 'to') FROM ihub.endpoints, jsonb_array_elements(circuit_changes) c
                 WHERE name = '{}'",
                s.endpoint
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(changes[0], "closed->open");
    assert_eq!(changes.last().unwrap(), "half_open->closed");
    assert!(changes.windows(2).all(|w| w[0].split("->").nth(1) == w[1].split("->").next()), "{changes:?}");
    let probes = changes.iter().filter(|c| *c == "open->half_open").count();
    let failed_probes = changes.iter().filter(|c| *c == "half_open->open").count();
    assert!(failed_probes >= 1 && probes == failed_probes + 1, "{changes:?}");
    // While open, nothing but the probes was sent: 0.1 s retries would
    // have sent dozens more.
    let failed: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.delivery_attempts WHERE endpoint = '{}' AND error_category = 'http_5xx'",
        s.endpoint
    ));
    assert!(failed <= 5 + failed_probes as i64, "{failed} failed attempts, {failed_probes} failed probes");
    let logged: i64 =
        hub.one(&format!("SELECT count(*) FROM ihub.logs WHERE message LIKE 'circuit of endpoint {} %'", s.endpoint));
    assert_eq!(logged, changes.len() as i64);
    let notified: Vec<String> = watcher_notes(&mut watcher.db)
        .into_iter()
        .filter(|n| n["endpoint"] == s.endpoint.as_str())
        .map(|n| format!("{}->{}", n["from"].as_str().unwrap(), n["to"].as_str().unwrap()))
        .collect();
    assert_eq!(notified, changes);
}

/// The notifications a LISTENing client has been sent so far.
fn watcher_notes(db: &mut postgres::Client) -> Vec<serde_json::Value> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut got = Vec::new();
    let mut n = db.notifications();
    let mut it = n.timeout_iter(Duration::from_millis(500));
    while let Ok(Some(note)) = it.next() {
        got.push(serde_json::from_str(note.payload()).unwrap());
    }
    got
}

/// A dispatcher prepares the route statements of at most 100 subscriptions
/// and routes the others as text (ihub._route_prepare); once full, it drops
/// them all every 10 s and prepares those in use again. Changes to 110
/// tables in one transaction, in three waves, all arrive, once each.
#[test]
fn more_subscriptions_than_a_dispatcher_prepares_statements_for_are_all_delivered() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    let tables: Vec<String> = (0..110).map(|i| format!("{}_{i}", s.table)).collect();
    for t in &tables {
        hub.exec(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY); SELECT ihub.subscribe('{t}', '{e}', events => '{{insert}}')",
            e = s.endpoint
        ));
    }
    for wave in 1..=3 {
        let inserts: String = tables.iter().map(|t| format!("INSERT INTO {t} VALUES ({wave});")).collect();
        hub.exec(&format!("BEGIN; {inserts} COMMIT;"));
        let states = hub.wait_settled(&s.endpoint, 110 * wave, WAIT);
        assert!(states.iter().all(|s| s == "done"), "{states:?}");
    }
    let mut seen: Vec<(String, i64)> = rx
        .received()
        .iter()
        .map(|r| (r.json()["table"].as_str().unwrap().to_string(), r.json()["data"]["id"].as_i64().unwrap()))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 330, "every change arrives");
    for t in &tables {
        hub.exec(&format!("DROP TABLE {t} CASCADE"));
    }
}

/// A route goes on from where the last one stopped in the capture table
/// (ihub._route). Rows written into space that vacuum freed lie before that:
/// the route must come back for them.
#[test]
fn changes_written_into_space_vacuum_freed_are_delivered() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    hub.subscribe_and_insert(&s, 2000);
    hub.wait_settled(&s.endpoint, 2000, Duration::from_secs(60));
    let sub: i64 = hub.one(&format!("SELECT id FROM ihub.subscriptions WHERE endpoint = '{}'", s.endpoint));
    // Its free space map now points writers at the first pages.
    hub.exec(&format!("VACUUM ihub_capture.sub_{sub}"));
    hub.exec(&format!("INSERT INTO {} (customer, amount) SELECT 'late', g FROM generate_series(1, 10) g", s.table));
    let states = hub.wait_settled(&s.endpoint, 2010, WAIT);
    assert_eq!(states.len(), 2010, "the rows written after the vacuum are delivered too");
    assert_eq!(distinct_row_ids(&rx), 2010);
}

/// A dispatcher routes a disabled endpoint's changes (its capture table is
/// drained) but sends nothing until the endpoint is enabled again.
#[test]
fn a_disabled_endpoint_is_sent_nothing_until_enabled() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    let sub: i64 = hub.one(&format!("SELECT ihub.subscribe('{}', '{}')", s.table, s.endpoint));
    hub.exec(&format!("SELECT ihub.disable_endpoint('{}')", s.endpoint));
    hub.exec(&format!("INSERT INTO {} (customer, amount) SELECT 'c' || g, g FROM generate_series(1, 5) g", s.table));
    assert!(
        hub.wait_true(
            &format!(
                "SELECT NOT EXISTS (SELECT FROM ihub_capture.sub_{sub}) AND                  (SELECT count(*) = 5 FROM ihub.deliveries WHERE endpoint = '{}' AND state = 'pending')",
                s.endpoint
            ),
            WAIT
        ),
        "routed into pending deliveries: {:?}",
        hub.delivery_states(&s.endpoint)
    );
    // A request to another endpoint, queued after the route and delivered:
    // a later round. Nothing else was sent.
    let marker = unique("ep");
    hub.exec(&format!(
        "SELECT ihub.create_endpoint('{}', '{marker}', '{}'); SELECT ihub.http_request('{marker}', '{{}}')",
        s.integration,
        rx.url("/marker")
    ));
    assert_eq!(hub.wait_settled(&marker, 1, WAIT), vec!["done"]);
    let paths: Vec<String> = rx.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/marker"], "a disabled endpoint was sent requests");
    hub.exec(&format!("SELECT ihub.enable_endpoint('{}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 5, WAIT), vec!["done"; 5]);
    assert_eq!(distinct_row_ids(&rx), 5);
}

#[test]
fn unsubscribe_stops_capture_and_keeps_what_was_captured() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    // Captured while the integration is enabled but held by a disabled endpoint.
    hub.exec(&format!("SELECT ihub.disable_endpoint('{}')", s.endpoint));
    let sub: i64 = hub.one(&format!("SELECT ihub.subscribe('{}', '{}')", s.table, s.endpoint));
    hub.exec(&format!(
        "BEGIN; INSERT INTO {t} (customer, amount) VALUES ('before', 1); SELECT ihub.unsubscribe({sub}); COMMIT;
         INSERT INTO {t} (customer, amount) VALUES ('after', 2);",
        t = s.table
    ));
    let triggers: i64 = hub.one(&format!("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'ihub_sub_{sub}_%'"));
    assert_eq!(triggers, 0);
    let capture: Option<String> = hub.one(&format!("SELECT to_regclass('ihub_capture.sub_{sub}')::text"));
    assert_eq!(capture, None);
    hub.exec(&format!("SELECT ihub.enable_endpoint('{}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    assert_eq!(rx.received()[0].json()["data"]["customer"], "before");
}

#[test]
fn a_disabled_integration_captures_nothing_and_holds_its_queue() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    hub.exec(&format!(
        "SELECT ihub.subscribe('{t}', '{e}');
         SELECT ihub.disable_integration('{i}');
         INSERT INTO {t} (customer, amount) VALUES ('while-off', 1);",
        t = s.table,
        e = s.endpoint,
        i = s.integration
    ));
    let err = hub.error(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert!(err.contains("inactive") && err.contains("enable_integration"), "{err}");
    hub.exec(&format!("SELECT ihub.enable_integration('{}')", s.integration));
    hub.exec(&format!("INSERT INTO {} (customer, amount) VALUES ('while-on', 2)", s.table));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    assert_eq!(rx.received()[0].json()["data"]["customer"], "while-on");
    let err = hub.error(&format!("SELECT ihub.delete_integration('{}')", s.integration));
    assert!(err.contains("cannot be deleted") && err.contains("disable_integration"), "{err}");
}

/// Changes of one row arrive in commit order, one in flight per key, while
/// keys go in parallel: 10,000 changes over 100 rows, a receiver that fails
/// one request in seven, and both dispatchers. Every request of a row,
/// failed ones included, carries a version no lower than the one before it,
/// and the accepted ones are exactly 0, 1, ..., 99.
#[test]
fn ordering_by_key_keeps_each_rows_changes_in_commit_order_under_retries() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, n| if n % 7 == 3 { Reply::status(500) } else { Reply::status(200) });
    let retry = r#"{"initial_delay": 0.05, "multiplier": 1, "jitter": 0, "max_attempts": 50}"#;
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{retry}', ordering => 'key'"));
    let table = unique("rows");
    hub.exec(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL);
         SELECT ihub.subscribe('{table}', '{}', events => '{{insert,update}}');
         INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 100) g;",
        s.endpoint
    ));
    // Some rounds update every row in one statement, others row by row in
    // transactions of their own, from two connections taking turns.
    let mut other = hub.cluster.connect();
    for round in 1..100 {
        if round % 3 == 0 {
            for id in 1..=100 {
                let db = if id % 2 == 0 { &mut hub.db } else { &mut other };
                db.batch_execute(&format!("UPDATE {table} SET v = v + 1 WHERE id = {id}")).unwrap();
            }
        } else {
            hub.exec(&format!("UPDATE {table} SET v = v + 1"));
        }
    }
    assert_eq!(
        hub.wait_settled(&s.endpoint, 10_000, Duration::from_secs(180)).iter().filter(|s| *s == "done").count(),
        10_000
    );

    let mut seen: std::collections::HashMap<i64, Vec<(i64, bool)>> = Default::default();
    for (n, r) in rx.received().iter().enumerate() {
        let data = &r.json()["data"];
        seen.entry(data["id"].as_i64().unwrap()).or_default().push((data["v"].as_i64().unwrap(), n % 7 != 3));
    }
    assert_eq!(seen.len(), 100);
    for (id, requests) in &seen {
        let versions: Vec<i64> = requests.iter().map(|(v, _)| *v).collect();
        assert!(versions.windows(2).all(|w| w[0] <= w[1]), "row {id} was sent out of order: {versions:?}");
        let accepted: Vec<i64> = requests.iter().filter(|(_, ok)| *ok).map(|(v, _)| *v).collect();
        // Each change accepted once: a second 2xx for one would mean it was
        // sent again after its lease ran out (the dispatcher stalled).
        assert_eq!(accepted, (0..100).collect::<Vec<_>>(), "row {id}: requests (version, accepted) {requests:?}");
    }
    assert!(seen.values().any(|r| r.iter().any(|(_, ok)| !ok)), "some requests failed and were retried");
}

/// `ordering => 'endpoint'` sends one request at a time, first in first out;
/// a failed delivery holds the endpoint (shown in ihub.endpoints) until it
/// is skipped, and a replayed one goes first again.
#[test]
fn ordering_by_endpoint_is_fifo_and_a_failed_delivery_holds_it_until_skipped() {
    let mut hub = hub();
    let rx = Receiver::start();
    // The third request is refused (a 400 fails at once); all others pass.
    rx.script(|r, _| if r.json()["n"] == 3 { Reply::status(400) } else { Reply::status(200) });
    let s = hub.setup(&rx.url("/"), ", ordering => 'endpoint'");
    for n in 1..=6 {
        hub.exec(&format!("SELECT ihub.http_request('{}', '{{\"n\": {n}}}')", s.endpoint));
    }
    assert!(hub.wait_true(&format!("SELECT blocked_keys = 1 FROM ihub.endpoints WHERE name = '{}'", s.endpoint), WAIT));
    let failed: i64 =
        hub.one(&format!("SELECT id FROM ihub.deliveries WHERE endpoint = '{}' AND state = 'failed'", s.endpoint));
    // Nothing behind it goes: a request to another endpoint, queued after
    // the failure, is delivered meanwhile.
    let other = unique("ep");
    hub.exec(&format!(
        "SELECT ihub.create_endpoint('{}', '{other}', '{}'); SELECT ihub.http_request('{other}', '{{\"n\": 100}}')",
        s.integration,
        rx.url("/")
    ));
    assert!(rx.wait_for(4, WAIT));
    let ns = |rx: &Receiver| rx.received().iter().map(|r| r.json()["n"].as_i64().unwrap()).collect::<Vec<_>>();
    assert_eq!(ns(&rx), vec![1, 2, 3, 100]);
    assert_eq!(
        hub.one::<i64>(&format!(
            "SELECT count(*) FROM ihub.deliveries WHERE endpoint = '{}' AND state = 'pending'",
            s.endpoint
        )),
        3
    );
    assert!(hub.error("SELECT ihub.skip(-1)").contains("does not exist"));

    hub.exec(&format!("SELECT ihub.skip({failed})"));
    assert_eq!(hub.wait_settled(&s.endpoint, 6, WAIT), vec!["done", "done", "skipped", "done", "done", "done"]);
    assert_eq!(ns(&rx), vec![1, 2, 3, 100, 4, 5, 6]);
    assert!(hub.error(&format!("SELECT ihub.skip({failed})")).contains("ended already"));
    assert_eq!(hub.one::<i64>(&format!("SELECT blocked_keys FROM ihub.endpoints WHERE name = '{}'", s.endpoint)), 0);
}

/// `signature => 'v1a'` signs with a generated ed25519 key: the receiver
/// verifies each request with the endpoint's whpk_ public key (read by a
/// viewer from ihub.endpoints) using ed25519-dalek. Rotating to a whsec_
/// secret signs with both schemes during the grace period.
#[test]
fn v1a_signatures_verify_with_the_public_key_anyone_may_read() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), ", signature => 'v1a'");
    let viewer = unique("viewer");
    hub.exec(&format!("CREATE ROLE {viewer} LOGIN IN ROLE ihub_viewer"));
    let mut as_viewer = hub.cluster.connect_as(&viewer, "ihub_test");
    let row = as_viewer
        .query_one("SELECT signatures, public_keys FROM ihub.endpoints WHERE name = $1", &[&s.endpoint])
        .unwrap();
    let (schemes, keys): (Vec<String>, Vec<String>) = (row.get(0), row.get(1));
    assert_eq!(schemes, vec!["v1a"]);
    assert_eq!(keys.len(), 1);
    assert!(keys[0].starts_with("whpk_"), "{keys:?}");
    assert!(as_viewer.query("SELECT * FROM ihub.endpoint_secrets", &[]).is_err(), "the secret key stays hidden");

    hub.exec(&format!("SELECT ihub.http_request('{}', '{{\"n\": 1}}')", s.endpoint));
    assert!(rx.wait_for(1, WAIT));
    let r = &rx.received()[0];
    let (id, ts, sig) = (
        r.header("webhook-id").unwrap(),
        r.header("webhook-timestamp").unwrap(),
        r.header("webhook-signature").unwrap(),
    );
    assert!(sig.starts_with("v1a,") && !sig.contains(' '), "{sig}");
    assert!(pg_ihub_testkit::verify::verify_v1a(&keys[0], id, ts, sig, &r.body));
    assert!(!pg_ihub_testkit::verify::verify_v1a(&keys[0], id, ts, sig, b"{\"n\": 2}"));

    // Switching to v1: both signatures while the old key lasts.
    let secret: String = hub
        .one(&format!("SELECT ihub.rotate_secret('{}', '{}')", s.endpoint, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{\"n\": 3}}')", s.endpoint));
    assert!(rx.wait_for(2, WAIT));
    let r = &rx.received()[1];
    let (id, ts, sig) = (
        r.header("webhook-id").unwrap(),
        r.header("webhook-timestamp").unwrap(),
        r.header("webhook-signature").unwrap(),
    );
    assert!(pg_ihub_testkit::verify::verify_v1a(&keys[0], id, ts, sig, &r.body), "{sig}");
    assert!(pg_ihub_testkit::verify::verify(&secret, id, ts, sig, &r.body), "{sig}");
    let schemes: Vec<String> = hub.one(&format!("SELECT signatures FROM ihub.endpoints WHERE name = '{}'", s.endpoint));
    assert_eq!(schemes, vec!["v1", "v1a"]);
    hub.exec(&format!("DROP ROLE {viewer}"));
}

/// A subscription's payload template, end to end: the receiver gets the
/// renamed, computed and nested data, made as the writer's transaction saw
/// the related rows (the customer renamed after the commit is not).
#[test]
fn payload_templates_arrive_with_related_rows_as_the_writer_saw_them() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    let (customers, invoices) = (unique("customers"), unique("invoices"));
    hub.exec(&format!(
        "CREATE TABLE {customers} (id int PRIMARY KEY, name text);
         CREATE TABLE {invoices} (id int PRIMARY KEY, customer_id int REFERENCES {customers}, amount numeric);
         INSERT INTO {customers} VALUES (1, 'Ada');
         SELECT ihub.subscribe('{invoices}', '{e}', events => '{{insert}}', payload => '{{
             \"rename\": {{\"amount\": \"total\"}},
             \"compute\": {{\"cents\": \"(new.amount * 100)::int\"}},
             \"nest\": {{\"customer\": {{\"via\": \"customer_id\"}}}},
             \"static\": {{\"v\": 2}}}}');
         BEGIN;
         INSERT INTO {invoices} VALUES (10, 1, 4.25);
         UPDATE {customers} SET name = 'Ada (in the same transaction)';
         COMMIT;
         UPDATE {customers} SET name = 'Ada (later)';",
        e = s.endpoint
    ));
    assert!(rx.wait_for(1, WAIT));
    let data = rx.received()[0].json()["data"].clone();
    assert_eq!(
        data,
        serde_json::json!({"id": 10, "customer_id": 1, "total": 4.25, "cents": 425, "v": 2,
                           "customer": {"id": 1, "name": "Ada"}})
    );
}
