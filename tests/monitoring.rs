//! Logs, activities and statistics against a real cluster with real
//! dispatchers and receivers.

use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use pg_ihub_e2e::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn a_critical_entry_opens_an_activity_and_notifies_listeners() {
    let mut hub = hub();
    let role = unique("oncall");
    hub.exec(&format!("CREATE ROLE {role} LOGIN; SELECT ihub.set_activity_users('{role}'); LISTEN ihub_activity;"));
    let marker = unique("disk full");
    let cluster = Cluster::from_env();
    let mut other = cluster.connect();
    other.batch_execute(&format!("SELECT ihub.log('critical', '{marker}')")).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut seen = None;
    while seen.is_none() && Instant::now() < deadline {
        let mut n = hub.db.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while let Ok(Some(note)) = it.next() {
            let v: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
            if v["summary"] == marker.as_str() {
                seen = Some(v);
            }
        }
    }
    let v = seen.expect("a NOTIFY on ihub_activity");
    assert_eq!(v["assigned_to"], role.as_str());
    let activities: i64 =
        hub.one(&format!("SELECT count(*) FROM ihub.activities WHERE summary = '{marker}' AND assigned_to = '{role}'"));
    assert_eq!(activities, 1);
}

#[test]
fn statistics_match_what_the_dispatchers_did() {
    let mut hub = hub();
    let rx = Receiver::start();
    // /ok: 200; /flaky: 500 then 200; /down: always 502.
    rx.script(|r, _| {
        if r.path.starts_with("/down") {
            Reply::status(502)
        } else if r.path.starts_with("/flaky") && r.header("x-try").is_none() {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    });
    let s = hub.setup(&rx.url(""), r#", retry => '{"initial_delay": 0.1, "jitter": 0, "max_attempts": 2}'"#);
    hub.exec(&format!(
        "SELECT ihub.http_request('{e}', '{{}}', path => '/ok') FROM generate_series(1, 5);
         SELECT ihub.http_request('{e}', '{{}}', path => '/down') FROM generate_series(1, 2);",
        e = s.endpoint
    ));
    assert_eq!(hub.wait_settled(&s.endpoint, 7, WAIT).iter().filter(|s| *s == "dead").count(), 2);
    let stats: String = hub.one(&format!(
        "SELECT concat_ws(',', deliveries, delivered, success_rate, retries, dead, last_error LIKE '%502%', p50_ms > 0)
         FROM ihub.endpoint_stats() WHERE endpoint = '{}'",
        s.endpoint
    ));
    assert_eq!(stats, "7,5,71.43,2,2,t,t");
    // The dead ones were logged as errors, aggregated: one entry a minute
    // per dispatcher, linked to the first delivery, counting them all.
    let dead_logged: i64 = hub.one(&format!(
        "SELECT sum((l.details ->> 'deliveries_failed')::bigint)::bigint FROM ihub.logs l JOIN ihub.deliveries d ON d.id = l.delivery
         WHERE d.endpoint = '{}' AND l.level = 'error' AND l.message LIKE '%dead, %retries exhausted%'",
        s.endpoint
    ));
    assert_eq!(dead_logged, 2);
    let retry_warnings: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.logs WHERE integration = '{}' AND level = 'warning' AND message LIKE '%will be retried%'",
        s.integration
    ));
    assert!(retry_warnings >= 1);
}

#[test]
fn an_endpoint_that_is_gone_is_logged_as_critical() {
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, _| Reply::status(410));
    let s = hub.setup(&rx.url("/"), "");
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", s.endpoint));
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["failed"]);
    let critical: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.logs WHERE level = 'critical' AND integration = '{}' AND message LIKE '%disabled%410%'",
        s.integration
    ));
    assert_eq!(critical, 1);
    let health: String = hub.one("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'endpoints'");
    assert!(health.starts_with("warning") && health.contains(&s.endpoint), "{health}");
}

/// Every worker is named in pg_stat_activity, and a running job shows its
/// code there (as pg_net's workers do).
#[test]
fn workers_show_what_they_do_in_pg_stat_activity() {
    let mut hub = hub();
    let names: i64 = hub.one(
        "SELECT count(DISTINCT backend_type) FROM pg_stat_activity
         WHERE backend_type LIKE 'pg_ihub %' AND application_name LIKE 'pg_ihub %'
           AND application_name NOT LIKE '%[%'",
    );
    assert_eq!(names, 6, "dispatcher, job worker, scheduler, maintenance, listener and processor are named");
    let p = unique("busy");
    let key = rand::random::<u32>() as i64;
    hub.exec(&format!(
        "CREATE FUNCTION {p}(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT pg_advisory_lock({key}) $$;"
    ));
    // Held here, so that the job waits for it while we look.
    hub.exec(&format!("SELECT pg_advisory_lock({key})"));
    let id: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}(jsonb)')"));
    let shown = hub.wait_true(
        &format!(
            "SELECT count(*) = 1 FROM pg_stat_activity
             WHERE backend_type = 'pg_ihub job worker' AND application_name LIKE 'pg_ihub job worker %'
               AND state = 'active' AND query LIKE 'job {id}: %{p}%'"
        ),
        Duration::from_secs(20),
    );
    hub.exec(&format!("SELECT pg_advisory_unlock({key})"));
    assert!(shown, "the running job is not shown in pg_stat_activity");
    assert!(hub.wait_true(&format!("SELECT state = 'done' FROM ihub.jobs WHERE id = {id}"), Duration::from_secs(20)));
    let still: i64 =
        hub.one(&format!("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'job {id}: %'"));
    assert_eq!(still, 0, "a finished job is still shown as running");
}
