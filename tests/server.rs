//! Tests that stop workers, crash the server or change its settings. They
//! take a lock so that they run one at a time.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use pg_ihub_e2e::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every one of `rows` rows must reach the receiver at least once and every
/// delivery end delivered.
fn assert_all_arrived(hub: &mut Hub, rx: &Receiver, s: &Setup, rows: i64) {
    let states = hub.wait_settled(&s.endpoint, rows, Duration::from_secs(90));
    assert!(states.iter().all(|s| s == "done"), "{states:?}");
    assert_eq!(distinct_row_ids(rx) as i64, rows, "some rows never arrived");
}

/// 600 rows on their way to a receiver that takes 400 ms per request, with
/// the first already arrived: batches are in flight.
fn bulk_in_flight(hub: &mut Hub) -> (Receiver, Setup) {
    let rx = Receiver::start();
    rx.script(|_, _| Reply::delayed(200, Duration::from_millis(400)));
    let s = hub.setup(&rx.url("/"), "");
    hub.subscribe_and_insert(&s, 600);
    assert!(rx.wait_for(1, Duration::from_secs(20)), "sending started");
    (rx, s)
}

#[test]
fn terminating_dispatchers_mid_batch_loses_nothing() {
    let _g = serial();
    let mut hub = hub();
    let (rx, s) = bulk_in_flight(&mut hub);
    let terminated: i64 = hub
        .one("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM ihub.workers WHERE kind = 'dispatcher') t");
    assert!(terminated >= 1);
    assert_all_arrived(&mut hub, &rx, &s, 600);
    // The workers came back by themselves.
    assert!(hub.wait_true("SELECT count(*) >= 1 FROM ihub.workers WHERE kind = 'dispatcher'", Duration::from_secs(20)));
}

#[test]
fn an_immediate_shutdown_mid_batch_loses_nothing() {
    let _g = serial();
    let mut hub = hub();
    let (rx, s) = bulk_in_flight(&mut hub);
    drop(hub);
    let cluster = Cluster::from_env();
    cluster.crash_and_restart();
    let mut hub = pg_ihub_e2e::hub();
    assert_all_arrived(&mut hub, &rx, &s, 600);
}

#[test]
fn the_environment_setting_decides_between_test_and_active() {
    let _g = serial();
    let mut hub = hub();
    let name = unique("stage");
    hub.exec("ALTER SYSTEM SET ihub.environment = 'staging'");
    hub.exec("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
    hub = pg_ihub_e2e::hub();
    hub.exec(&format!("SELECT ihub.create_integration('{name}')"));
    let state: String = hub.one(&format!("SELECT ihub.enable_integration('{name}')"));
    hub.exec("ALTER SYSTEM RESET ihub.environment");
    hub.exec("SELECT pg_reload_conf()");
    assert_eq!(state, "test");
    std::thread::sleep(Duration::from_millis(300));
    let mut hub = pg_ihub_e2e::hub();
    let state: String = hub.one(&format!("SELECT ihub.enable_integration('{name}')"));
    assert_eq!(state, "active");
}

/// A second, small cluster without shared_preload_libraries.
struct Unpreloaded {
    cluster: Cluster,
}

impl Unpreloaded {
    fn start() -> Unpreloaded {
        let base = Cluster::from_env();
        let dir = base.pgdata.with_file_name("unpreloaded");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pgdata = dir.join("data");
        let mut cluster = base.clone();
        cluster.pgdata = pgdata.clone();
        cluster.logfile = dir.join("postgres.log");
        cluster.port = base.port + 1;
        cluster.dbname = "postgres".into();
        let _ = std::process::Command::new("chown").args(["-R", "postgres", &dir.to_string_lossy()]).status();
        cluster.run_as_postgres("initdb", &["-D", &pgdata.to_string_lossy(), "-A", "trust", "-U", "postgres"]);
        let conf =
            format!("port = {}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n", cluster.port, cluster.host);
        let conf_path: PathBuf = pgdata.join("postgresql.auto.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let _ = std::process::Command::new("chown").args(["postgres", &conf_path.to_string_lossy()]).status();
        cluster.start();
        Unpreloaded { cluster }
    }
}

impl Drop for Unpreloaded {
    fn drop(&mut self) {
        let data = self.cluster.pgdata.to_string_lossy().to_string();
        self.cluster.run_as_postgres("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

#[test]
fn without_preloading_the_extension_installs_and_says_what_is_missing() {
    let _g = serial();
    let server = Unpreloaded::start();
    let mut db = server.cluster.connect_wait(Duration::from_secs(30));
    db.batch_execute(
        "CREATE EXTENSION pg_ihub;
         CREATE TABLE t (id int PRIMARY KEY);
         SELECT ihub.create_integration('it');
         SELECT ihub.create_endpoint('it', 'ep', 'https://hooks.example.com/x');",
    )
    .unwrap_or_else(|e| panic!("configuration works without the workers: {}", describe(&e)));
    for call in [
        "SELECT ihub.subscribe('t', 'ep')",
        "SELECT ihub.http_request('ep', '{}')",
        "SELECT ihub.enable_integration('it')",
    ] {
        let err = db.batch_execute(call).expect_err(call);
        let db_err = err.as_db_error().unwrap();
        assert!(db_err.message().contains("shared_preload_libraries"), "{call}: {}", db_err.message());
        assert!(db_err.hint().unwrap_or("").contains("shared_preload_libraries"), "{call}: no hint");
    }
    // Nothing half-made.
    let subs: i64 = db.query_one("SELECT count(*) FROM ihub.subscription", &[]).unwrap().get(0);
    assert_eq!(subs, 0);
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn idle_workers_sleep_instead_of_polling() {
    let _g = serial();
    let mut hub = hub();
    let workers: Vec<(String, i32)> = hub
        .db
        .query("SELECT kind, pid FROM ihub.workers ORDER BY kind, pid", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for kind in ["dispatcher", "job worker", "scheduler", "maintenance", "listener", "processor"] {
        assert!(workers.iter().any(|(k, _)| k == kind), "no {kind} in {workers:?}");
    }
    // A sleeping worker wakes once per ihub.poll_interval at most; with the
    // test cluster's 500 ms, the cost of those rounds (which grows with the
    // subscriptions other tests left) would hide what this test looks for.
    hub.exec("ALTER SYSTEM SET ihub.poll_interval = '10s'");
    hub.exec("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(1500));
    let before: Vec<f64> = workers.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    std::thread::sleep(Duration::from_secs(5));
    hub.exec("ALTER SYSTEM RESET ihub.poll_interval");
    hub.exec("SELECT pg_reload_conf()");
    // A worker that wakes every few milliseconds uses a tenth of a second or
    // more here; one sleeping on its latch next to nothing.
    let busy: Vec<String> = workers
        .iter()
        .zip(before)
        .map(|((kind, pid), before)| (kind, pid, cpu_seconds(*pid) - before))
        .filter(|(_, _, used)| *used >= 0.06)
        .map(|(kind, pid, used)| format!("{kind} {pid}: {used:.2} s"))
        .collect();
    assert!(busy.is_empty(), "CPU used in 5 s of idleness: {busy:?}");
}

#[test]
fn a_job_whose_worker_is_terminated_runs_again_exactly_once() {
    let _g = serial();
    let mut hub = hub();
    let p = unique("killed");
    hub.exec(&format!(
        "CREATE TABLE {p}_effects (note text);
         CREATE TABLE {p}_runs (n int);
         INSERT INTO {p}_runs VALUES (0);
         CREATE FUNCTION {p}(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_effects VALUES ('effect');
             -- The first attempt takes long enough to be terminated.
             IF (SELECT attempts FROM ihub.job WHERE id = ihub._current_job()) = 1 THEN
                 PERFORM pg_sleep(30);
             END IF;
         END $$;"
    ));
    let id: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}(jsonb)')"));
    assert!(hub.wait_true(&format!("SELECT state = 'running' FROM ihub.job WHERE id = {id}"), Duration::from_secs(20)));
    let pid: i32 = hub.one(&format!("SELECT worker_pid FROM ihub.job WHERE id = {id}"));
    let started = std::time::Instant::now();
    hub.exec(&format!("SELECT pg_terminate_backend({pid})"));
    assert!(
        hub.wait_true(&format!("SELECT state = 'done' FROM ihub.job WHERE id = {id}"), Duration::from_secs(30)),
        "the job was not resumed"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "resumed within seconds, not after a long timer");
    let (attempts, effects): (i32, i64) = {
        let r = hub
            .db
            .query_one(
                &format!("SELECT attempts, (SELECT count(*) FROM {p}_effects) FROM ihub.job WHERE id = {id}"),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((attempts, effects), (2, 1), "the terminated attempt left nothing; the second ran once");
    let logged: i64 = hub.one(&format!("SELECT count(*) FROM ihub.logs WHERE message LIKE 'stuck job {id} %'"));
    assert_eq!(logged, 1);
}

#[test]
fn missed_runs_are_caught_up_after_a_restart_only_when_asked() {
    let _g = serial();
    let mut hub = hub();
    let p = unique("missed");
    hub.exec(&format!(
        "CREATE FUNCTION {p}(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         SELECT ihub.schedule('{p}_repeat', '{p}(jsonb)', every => '1 second', repeat_missed => true);
         SELECT ihub.schedule('{p}_skip', '{p}(jsonb)', every => '1 second');"
    ));
    std::thread::sleep(Duration::from_millis(1500));
    drop(hub);
    let cluster = Cluster::from_env();
    let data = cluster.pgdata.to_string_lossy().to_string();
    cluster.run_as_postgres("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    std::thread::sleep(Duration::from_millis(4500));
    cluster.start();
    let mut hub = pg_ihub_e2e::hub();
    // The first tick after the start queues all of a schedule's catch-up runs
    // in one transaction, so they share a creation time.
    let first_burst = |hub: &mut Hub, schedule: &str| -> i64 {
        assert!(hub.wait_true(
            &format!(
                "SELECT count(*) > 0 FROM ihub.job j JOIN ihub.schedule s ON s.id = j.schedule_id
                 WHERE s.name = '{schedule}' AND j.created_at > pg_postmaster_start_time()"
            ),
            Duration::from_secs(20)
        ));
        hub.one(&format!(
            "SELECT count(*) FROM ihub.job j JOIN ihub.schedule s ON s.id = j.schedule_id
             WHERE s.name = '{schedule}' AND j.created_at = (
                 SELECT min(created_at) FROM ihub.job j2 WHERE j2.schedule_id = s.id AND j2.created_at > pg_postmaster_start_time())"
        ))
    };
    let repeated = first_burst(&mut hub, &format!("{p}_repeat"));
    let skipped = first_burst(&mut hub, &format!("{p}_skip"));
    assert!(repeated >= 4, "about five runs were missed while down; {repeated} caught up");
    assert_eq!(skipped, 1, "without repeat_missed the missed runs collapse into one");
    hub.exec(&format!("SELECT ihub.unschedule('{p}_repeat'); SELECT ihub.unschedule('{p}_skip');"));
}

#[test]
fn cronwatch_alerts_when_a_run_is_late() {
    let _g = serial();
    let mut hub = hub();
    let p = unique("late");
    let channel = unique("cwlate");
    hub.exec(&format!(
        "CREATE FUNCTION {p}_busy(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT pg_sleep(4) $$;
         CREATE FUNCTION {p}_tick(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         SELECT ihub.schedule('{p}', '{p}_tick(jsonb)', every => '1 second', priority => 20);
         SELECT ihub.watch('{p}', channel => '{channel}', grace => '1 second');
         LISTEN {channel};"
    ));
    // Both job workers busy: the scheduled runs are queued but cannot start.
    hub.exec(&format!("SELECT ihub.enqueue('{p}_busy(jsonb)', priority => 0) FROM generate_series(1, 2)"));
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let mut events = Vec::new();
    while std::time::Instant::now() < deadline && !events.iter().any(|e: &String| e == "recovered") {
        let mut n = hub.db.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while let Ok(Some(note)) = fallible_iterator::FallibleIterator::next(&mut it) {
            let v: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
            events.push(format!("{}", v["event"].as_str().unwrap()));
            if v["event"] == "alert" {
                assert!(v["problem"].as_str().unwrap().contains("has not started"), "{v}");
            }
        }
    }
    assert_eq!(events, vec!["alert", "recovered"], "one alert while late, one reset when on time again");
    hub.exec(&format!("SELECT ihub.unwatch('{p}'); SELECT ihub.unschedule('{p}');"));
}

#[test]
fn a_pg_cron_job_can_be_watched() {
    let _g = serial();
    let mut hub = hub();
    let job = unique("nightly");
    let channel = unique("cwcron");
    hub.exec(&format!(
        "CREATE EXTENSION IF NOT EXISTS pg_cron;
         SELECT cron.schedule('{job}', '* * * * *', 'SELECT 1');"
    ));
    hub.exec(&format!(
        "SELECT ihub.watch('cron:{job}', channel => '{channel}', grace => '2 seconds'); LISTEN {channel};"
    ));
    std::thread::sleep(Duration::from_secs(2));
    let status: String = hub.one(&format!("SELECT status FROM ihub.cronwatch WHERE target = 'cron:{job}'"));
    assert_eq!(status, "ok", "active and not yet due: on time");
    hub.exec(&format!("SELECT cron.alter_job((SELECT jobid FROM cron.job WHERE jobname = '{job}'), active := false)"));
    assert!(hub.wait_true(
        &format!(
            "SELECT status = 'alerting' AND incident = 'deactivated' FROM ihub.cronwatch WHERE target = 'cron:{job}'"
        ),
        Duration::from_secs(20)
    ));
    hub.exec(&format!("SELECT cron.unschedule('{job}')"));
    assert!(hub.wait_true(
        &format!("SELECT incident = 'deleted' FROM ihub.cronwatch WHERE target = 'cron:{job}'"),
        Duration::from_secs(20)
    ));
    hub.exec(&format!("SELECT ihub.unwatch('cron:{job}')"));
}

#[test]
fn health_turns_critical_while_a_worker_is_gone() {
    let _g = serial();
    let mut hub = hub();
    let status = |hub: &mut Hub| -> String {
        hub.one("SELECT status FROM ihub.health() WHERE check_name = 'workers: job worker'")
    };
    assert!(hub.wait_true(
        "SELECT status = 'ok' FROM ihub.health() WHERE check_name = 'workers: job worker'",
        Duration::from_secs(20)
    ));
    hub.exec("SELECT pg_terminate_backend(pid) FROM ihub.workers WHERE kind = 'job worker' AND database = current_database() LIMIT 1");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status(&mut hub), "critical");
    let message: String = hub.one("SELECT message FROM ihub.health() WHERE check_name = 'workers: job worker'");
    assert!(message.starts_with("1 of 2"), "{message}");
    // The postmaster starts it again after its restart interval.
    assert!(hub.wait_true(
        "SELECT status = 'ok' FROM ihub.health() WHERE check_name = 'workers: job worker'",
        Duration::from_secs(20)
    ));
    // The terminated worker left the registry: ihub.workers lists live processes only.
    let listed: String = hub.one(
        "SELECT count(*) FILTER (WHERE kind = 'job worker') || ' job workers, ' ||
                count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.pid)) || ' gone'
         FROM ihub.workers w WHERE w.database = current_database()",
    );
    assert_eq!(listed, "2 job workers, 0 gone");
}

/// An enabled integration with an unverified source whose handler takes
/// `delay` seconds and records each item it handles in `<p>_effects`.
/// Returns (table prefix, source URL).
fn inbound_kit(hub: &mut Hub, delay: f64) -> (String, String) {
    let p = unique("inq");
    let integration = unique("it");
    hub.exec(&format!(
        "CREATE TABLE {p}_effects (item bigint);
         CREATE FUNCTION {p}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_effects VALUES (item.id);
             PERFORM pg_sleep({delay});
             RETURN NULL;
         END $$;
         SELECT ihub.create_integration('{integration}');
         SELECT ihub.enable_integration('{integration}');
         SELECT ihub.create_source('{integration}', 'q', '{p}_handle(ihub.inbound_items)', 'none');"
    ));
    (p, listener_url(&format!("/webhooks/{integration}/q")))
}

fn post_items(url: &str, count: usize) -> Vec<i64> {
    let client = http();
    (0..count)
        .map(|n| {
            let r = client.post(url).body(format!(r#"{{"n": {n}}}"#)).send().unwrap();
            assert_eq!(r.status(), 202);
            let body: serde_json::Value = r.json().unwrap();
            body["id"].as_i64().unwrap()
        })
        .collect()
}

/// Every item done, and each handled exactly once (an interrupted handler's
/// writes roll back with it).
fn assert_each_handled_once(hub: &mut Hub, p: &str, ids: &[i64]) {
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let done = hub.wait_true(
        &format!("SELECT count(*) = {} FROM ihub.inbound_items WHERE id IN ({list}) AND state = 'done'", ids.len()),
        Duration::from_secs(90),
    );
    let states: String = hub.one(&format!(
        "SELECT string_agg(state || ':' || n, ' ') FROM (SELECT state, count(*) n FROM ihub.inbound_items \
         WHERE id IN ({list}) GROUP BY state) s"
    ));
    assert!(done, "items not all done: {states}");
    let (total, distinct): (i64, i64) = {
        let r = hub.db.query_one(&format!("SELECT count(*), count(DISTINCT item) FROM {p}_effects"), &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((total, distinct), (ids.len() as i64, ids.len() as i64));
}

#[test]
fn terminating_processors_mid_queue_loses_no_item() {
    let _g = serial();
    let mut hub = hub();
    let (p, url) = inbound_kit(&mut hub, 0.05);
    let ids = post_items(&url, 150);
    assert!(hub.wait_true(&format!("SELECT count(*) >= 5 FROM {p}_effects"), Duration::from_secs(20)));
    let terminated: i64 =
        hub.one("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM ihub.workers WHERE kind = 'processor') t");
    assert!(terminated >= 1);
    assert_each_handled_once(&mut hub, &p, &ids);
}

#[test]
fn restarting_postgres_mid_queue_loses_no_accepted_item() {
    let _g = serial();
    let mut hub = hub();
    let (p, url) = inbound_kit(&mut hub, 0.05);
    let ids = post_items(&url, 150);
    assert!(hub.wait_true(&format!("SELECT count(*) >= 5 FROM {p}_effects"), Duration::from_secs(20)));
    drop(hub);
    Cluster::from_env().crash_and_restart();
    let mut hub = pg_ihub_e2e::hub();
    assert_each_handled_once(&mut hub, &p, &ids);
    // And the listener is back.
    let client = http();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.post(&url).body(r#"{"n": "after"}"#).send().map(|r| r.status() != 202).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "the listener did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Settings changed with ALTER SYSTEM, put back even when the test fails.
struct AlterSystem(Vec<&'static str>);

impl AlterSystem {
    fn set(hub: &mut Hub, settings: &[(&'static str, &str)]) -> AlterSystem {
        // One statement each: ALTER SYSTEM refuses to run in a transaction block.
        for (name, value) in settings {
            hub.exec(&format!("ALTER SYSTEM SET {name} = {value}"));
        }
        hub.exec("SELECT pg_reload_conf()");
        AlterSystem(settings.iter().map(|(name, _)| *name).collect())
    }
}

impl Drop for AlterSystem {
    fn drop(&mut self) {
        let mut hub = pg_ihub_e2e::hub();
        for name in &self.0 {
            hub.exec(&format!("ALTER SYSTEM RESET {name}"));
        }
        hub.exec("SELECT pg_reload_conf()");
    }
}

#[test]
fn a_request_that_stalls_gets_408_and_the_listener_goes_on() {
    let _g = serial();
    let mut hub = hub();
    let (p, url) = inbound_kit(&mut hub, 0.0);
    let _timeout = AlterSystem::set(&mut hub, &[("ihub.inbound_request_timeout", "'1s'")]);
    std::thread::sleep(Duration::from_millis(500)); // the listener reloads its settings
    let address = url.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let path = &url[url.find("/webhooks").unwrap()..];
    let client = http(); // once the listener accepts connections
                         // Promises 100 bytes, sends 5, and waits.
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    write!(socket, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort").unwrap();
    let mut answer = [0u8; 64];
    let n = socket.read(&mut answer).unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    // Others were served all along, and nothing half-sent was queued.
    assert_eq!(client.post(&url).body(r#"{"n": 1}"#).send().unwrap().status(), 202);
    assert!(hub.wait_true(&format!("SELECT count(*) = 1 FROM {p}_effects"), Duration::from_secs(20)));
}

#[test]
fn the_rate_limit_answers_429_with_retry_after_then_recovers() {
    let _g = serial();
    let mut hub = hub();
    let (p, url) = inbound_kit(&mut hub, 0.0);
    let client = http();
    let post = |n: usize| client.post(&url).body(format!(r#"{{"n": {n}}}"#)).send().unwrap();
    let _limit = AlterSystem::set(&mut hub, &[("ihub.inbound_rate_limit", "2"), ("ihub.inbound_burst", "4")]);
    // The listener applies the new settings on its next wake-up.
    let mut n = 0;
    let first_refusal = loop {
        n += 1;
        let r = post(n);
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 202);
        assert!(n < 200, "the rate limit never applied");
        std::thread::sleep(Duration::from_millis(20));
    };
    let retry_after: u64 = first_refusal.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    // Refused requests are not queued; an immediate burst gets at most one more slot.
    let burst: Vec<u16> = (0..10).map(|i| post(1000 + i).status().as_u16()).collect();
    assert!(burst.iter().filter(|s| **s == 202).count() <= 1, "{burst:?}");
    assert!(burst.iter().all(|s| *s == 202 || *s == 429), "{burst:?}");
    // After waiting as told, the sender gets through again, up to the burst.
    std::thread::sleep(Duration::from_secs(retry_after) + Duration::from_millis(1500));
    let recovered: Vec<u16> = (0..3).map(|i| post(2000 + i).status().as_u16()).collect();
    assert_eq!(recovered, vec![202, 202, 202]);
    let accepted: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.inbound_items i JOIN ihub.inbound_sources s ON s.name = i.source AND s.integration = i.integration \
         WHERE s.handler LIKE '{p}%'"
    ));
    let answered_202 = (n - 1) as i64 + burst.iter().filter(|s| **s == 202).count() as i64 + 3;
    assert_eq!(accepted, answered_202, "exactly the requests answered 202 were queued");
}

/// A step that keeps failing is logged naming the worker and the step, and
/// the worker carries on by itself once the cause is gone.
#[test]
fn a_failing_step_is_logged_with_its_worker_and_the_worker_recovers() {
    let _g = serial();
    let mut hub = hub();
    let cluster = Cluster::from_env();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    // Idle dispatchers ask when the next delivery is due; make that fail.
    hub.exec("ALTER FUNCTION ihub._next_due() RENAME TO _next_due_gone");
    let expected = ": settle and claim: function ihub._next_due() does not exist";
    let logged = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        cluster.log().lines().any(|l| l.contains("WARNING:  pg_ihub dispatcher ") && l.contains(expected))
    });
    hub.exec("ALTER FUNCTION ihub._next_due_gone() RENAME TO _next_due");
    assert!(logged, "no WARNING \"{expected}\" in the server log");
    hub.subscribe_and_insert(&s, 3);
    assert_all_arrived(&mut hub, &rx, &s, 3);
}

/// The listener's counters (ihub.listener_stats()).
fn listener_stat(hub: &mut Hub, name: &str) -> i64 {
    hub.one(&format!("SELECT {name} FROM ihub.listener_stats()"))
}

#[test]
fn rejected_requests_are_bounded_in_memory_and_in_the_table() {
    let _g = serial();
    let mut hub = hub();
    let integration = unique("it");
    let p = unique("rj");
    hub.exec(&format!(
        "CREATE FUNCTION {p}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
         SELECT ihub.create_integration('{integration}');
         SELECT ihub.enable_integration('{integration}');
         SELECT ihub.create_source('{integration}', 'signed', '{p}_handle(ihub.inbound_items)',
                                   secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');"
    ));
    let url = listener_url(&format!("/webhooks/{integration}/signed"));
    let client = http();
    let junk = "x".repeat(300_000);
    let bad = |client: &reqwest::blocking::Client, junk: &str| {
        client
            .post(&url)
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", now_s().to_string())
            .header("webhook-signature", "v1,Zm9yZ2Vk")
            .header("x-junk", junk)
            .body("{}")
            .send()
            .unwrap()
            .status()
    };
    for _ in 0..10 {
        assert_eq!(bad(&client, &junk), 401);
    }
    let recorded = format!(
        "SELECT count(*) FROM ihub.inbound_rejections WHERE integration = '{integration}' AND source = 'signed'"
    );
    assert!(hub.wait_true(&format!("SELECT ({recorded}) = 10"), Duration::from_secs(20)));
    // Stored headers are cut to a bounded size; the signature never kept.
    let largest: i32 = hub.one(&format!(
        "SELECT max(octet_length(r.headers::text)) FROM ihub.inbound_rejection r JOIN ihub.inbound_sources s ON s.id = r.source_id \
         WHERE s.integration = '{integration}'"
    ));
    assert!(largest <= 16 * 1024, "{largest} bytes of headers stored for one rejection");

    // While the main thread cannot write them, rejections wait in a bounded
    // queue: the overflow is counted, not kept.
    let dropped_before = listener_stat(&mut hub, "rejections_dropped");
    let mut blocker = hub.cluster.connect_wait(Duration::from_secs(10));
    let mut tx = blocker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE ihub.inbound_rejection IN ACCESS EXCLUSIVE MODE").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let (stop, url) = (stop.clone(), url.clone());
            std::thread::spawn(move || {
                let client = http();
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 20_000 {
                    let s = client.post(&url).header("webhook-id", "m").body("{}").send().unwrap().status();
                    assert_eq!(s, 401);
                    sent += 1;
                }
            })
        })
        .collect();
    let mut check = hub.cluster.connect_wait(Duration::from_secs(10));
    let overflowed = (0..).any(|_| {
        let dropped: i64 = check.query_one("SELECT rejections_dropped FROM ihub.listener_stats()", &[]).unwrap().get(0);
        dropped > dropped_before || senders.iter().all(|s| s.is_finished())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    tx.rollback().unwrap();
    assert!(overflowed);
    assert!(listener_stat(&mut hub, "rejections_dropped") > dropped_before, "nothing counted as dropped");
    // The listener goes on recording once it can. The queue may still be
    // full of what arrived while it was blocked (a rejection that finds it
    // full is dropped, as above), so one is sent until one is recorded.
    let short_recorded = format!(
        "SELECT count(*) > 0 FROM ihub.inbound_rejections WHERE integration = '{integration}' \
         AND headers->>'x-junk' = 'short'"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut recorded = false;
    while !recorded && std::time::Instant::now() < deadline {
        assert_eq!(bad(&client, "short"), 401);
        recorded = hub.wait_true(&short_recorded, Duration::from_millis(500));
    }
    assert!(recorded, "no rejection recorded after the table was free again");
}

/// Opens a connection that sends nothing.
fn idle_connection() -> std::net::TcpStream {
    let address = listener_url("").trim_start_matches("http://").to_string();
    let socket = std::net::TcpStream::connect(address).unwrap();
    socket
}

/// What the listener answers before it closes the connection (empty when it
/// closes it without a word).
fn answer_of(socket: &mut std::net::TcpStream) -> String {
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn idle_connections_from_one_address_are_limited_and_timed_out() {
    let _g = serial();
    let mut hub = hub();
    let (p, url) = inbound_kit(&mut hub, 0.0);
    let _limits = AlterSystem::set(
        &mut hub,
        &[("ihub.inbound_max_connections_per_address", "10"), ("ihub.inbound_header_timeout", "'1s'")],
    );
    // Once the listener has the new limit, idle connections from this
    // address past the tenth are answered 503 at once. The listener may take
    // the new limit in the middle of a round (CI once saw 8 of 30 refused),
    // so rounds go on until one had the limit from its start.
    let mut last = 0;
    let held = (0..20)
        .find_map(|_| {
            let sockets: Vec<_> = (0..30).map(|_| idle_connection()).collect();
            let (mut refused, mut held) = (0, Vec::new());
            for mut socket in sockets {
                socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let mut first = [0u8; 12];
                match socket.read(&mut first) {
                    Ok(12) if &first == b"HTTP/1.1 503" => refused += 1,
                    _ => held.push(socket),
                }
            }
            last = refused;
            (refused >= 20 - 1 && !held.is_empty()).then_some(held)
        })
        .unwrap_or_else(|| panic!("{last} of 30 idle connections refused with a limit of 10"));
    assert!(listener_stat(&mut hub, "connections_refused") > 0);
    // The others are closed after the header timeout.
    for mut socket in held {
        let answer = answer_of(&mut socket);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    // The address is served again.
    assert_eq!(http().post(&url).body(r#"{"n": 1}"#).send().unwrap().status(), 202);
    assert_eq!(http().get(listener_url("/healthz")).send().unwrap().status(), 200);
    assert!(hub.wait_true(&format!("SELECT count(*) = 1 FROM {p}_effects"), Duration::from_secs(20)));
}

#[test]
fn unknown_paths_are_answered_from_the_cache_without_reloading_each_time() {
    let _g = serial();
    let mut hub = hub();
    let (_, url) = inbound_kit(&mut hub, 0.0);
    let client = http();
    assert_eq!(client.post(&url).body("{}").send().unwrap().status(), 202);
    let before = listener_stat(&mut hub, "source_reloads");
    let missing = listener_url(&format!("/webhooks/{}/nope", unique("it")));
    for _ in 0..400 {
        assert_eq!(client.post(&missing).body("{}").send().unwrap().status(), 404);
    }
    let reloads = listener_stat(&mut hub, "source_reloads") - before;
    assert!(reloads < 100, "{reloads} reloads for 400 requests to an unknown path");
    // Known sources are still served, and new ones found at once.
    assert_eq!(client.post(&url).body(r#"{"n": 2}"#).send().unwrap().status(), 202);
    let (_, fresh) = inbound_kit(&mut hub, 0.0);
    assert_eq!(client.post(&fresh).body("{}").send().unwrap().status(), 202);
}

/// A commit made while a dispatcher is busy only raises a flag for it, so
/// that single-row writers get fewer, larger rounds. A dispatcher held up by
/// a receiver that does not answer must still not hold up changes committed
/// meanwhile: a batch still sending after a few milliseconds wakes a peer.
#[test]
fn changes_committed_while_a_dispatcher_waits_on_a_silent_receiver_go_to_a_peer() {
    let _g = serial();
    let mut hub = hub();
    // A sleeping dispatcher wakes on its own only after a minute here: the
    // second delivery arrives in time only if something wakes a dispatcher.
    hub.exec("ALTER SYSTEM SET ihub.poll_interval = '60s'");
    hub.exec("SELECT pg_reload_conf()");
    let silent_rx = Receiver::start();
    silent_rx.script(|_, _| Reply::Hang);
    let silent = hub.setup(&silent_rx.url("/"), ", timeout_ms => 60000");
    let fast_rx = Receiver::start();
    let fast = hub.setup(&fast_rx.url("/"), "");
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", silent.endpoint));
    let silent_reached = silent_rx.wait_for(1, Duration::from_secs(20));
    hub.exec(&format!("SELECT ihub.http_request('{}', '{{}}')", fast.endpoint));
    let fast_arrived = fast_rx.wait_for(1, Duration::from_secs(30));
    let silent_state: String =
        hub.one(&format!("SELECT state FROM ihub.deliveries WHERE endpoint = '{}'", silent.endpoint));
    hub.exec("ALTER SYSTEM RESET ihub.poll_interval");
    hub.exec("SELECT pg_reload_conf()");
    hub.exec(&format!("SELECT ihub.disable_endpoint('{}')", silent.endpoint));
    assert!(silent_reached, "the first request never reached its receiver");
    assert!(fast_arrived, "the change committed meanwhile was not sent");
    assert_eq!(silent_state, "running", "the second delivery waited for the first to time out");
}

/// The pull of the README, against the test CRM: 15 contacts in 5 pages of
/// 3, page 3 failing once (the request is retried), and the server crashing
/// while the pull is under way. Each page's handler upserts the page, logs
/// it and requests the next page in one transaction, so every page is
/// imported exactly once, and the integration date is set when the last
/// page is in.
#[test]
fn a_paginated_pull_imports_every_page_once_through_a_failure_and_a_crash() {
    let _g = serial();
    let crm = Crm::start(Duration::from_secs(3600), 3);
    let seed: Vec<serde_json::Value> = (1..=15)
        .map(|n| serde_json::json!({"name": format!("Contact {n:02}"), "email": format!("c{n}@example.com")}))
        .collect();
    crm.seed(&seed);
    crm.fail_next("/contacts?cursor=6&", 503, 1);
    let mut t = team("pull");
    let _guard = t.delete_integration_at_end();
    let setup = crm_sql(&crm, &t.p, "crm", &format!("{}_api", t.p), "client_credentials", None);
    t.exec(&format!(
        "CREATE TABLE {{p}}_contacts (id bigserial PRIMARY KEY, name text NOT NULL, email text);
         CREATE TABLE {{p}}_pages (page integer, next_cursor text, contacts integer);
         SELECT ihub.create_integration('{{p}}');
         {setup}
         SELECT ihub.enable_integration('{{p}}');
         CREATE FUNCTION {{p}}_import(r ihub.http_response) RETURNS void LANGUAGE plpgsql AS $$
         DECLARE
             c jsonb;
             n integer := 0;
         BEGIN
             IF r.state <> 'done' THEN
                 RAISE EXCEPTION 'page % of the pull failed: %', r.context->>'page', r.error;
             END IF;
             FOR c IN SELECT * FROM jsonb_array_elements(r.body_json->'data') LOOP
                 PERFORM ihub.upsert('{{p}}', 'contact', 'public.{{p}}_contacts', c->>'id',
                                     jsonb_build_object('name', c->>'name', 'email', c->>'email'));
                 n := n + 1;
             END LOOP;
             INSERT INTO public.{{p}}_pages VALUES ((r.context->>'page')::integer, r.body_json->>'next_cursor', n);
             PERFORM pg_sleep(0.3); -- so that the crash lands while pages are being imported
             IF r.body_json->>'next_cursor' IS NOT NULL THEN
                 PERFORM ihub.http_request('{{p}}_api', NULL, method => 'GET', path => '/contacts',
                     query => jsonb_build_object('cursor', r.body_json->>'next_cursor', 'limit', 3),
                     on_response => '{{p}}_import(ihub.http_response)',
                     context => jsonb_build_object('page', (r.context->>'page')::integer + 1, 'started', r.context->'started'));
             ELSE
                 PERFORM ihub.set_date('{{p}}', 'contacts_pulled', (r.context->>'started')::timestamptz);
             END IF;
         END $$;
         CREATE FUNCTION {{p}}_pull(args jsonb) RETURNS void LANGUAGE sql AS $$
             SELECT ihub.http_request('{{p}}_api', NULL, method => 'GET', path => '/contacts',
                                      query => jsonb_build_object('limit', 3),
                                      on_response => '{{p}}_import(ihub.http_response)',
                                      context => jsonb_build_object('page', 1, 'started', now()))
         $$;
         SELECT ihub.schedule('{{p}}_pull', '{{p}}_pull(jsonb)', every => '1 day', integration => '{{p}}');
         SELECT ihub.run_now('{{p}}_pull');"
    ));
    assert!(t.wait_true("SELECT count(*) >= 2 FROM public.{p}_pages", Duration::from_secs(60)), "the pull started");
    let Team { hub, p, dev } = t;
    drop((hub, dev));
    Cluster::from_env().crash_and_restart();
    let mut hub = pg_ihub_e2e::hub();
    assert!(
        hub.wait_true(&format!("SELECT ihub.get_date('{p}', 'contacts_pulled') IS NOT NULL"), Duration::from_secs(120)),
        "the pull did not finish"
    );
    let pages: String = hub.one(&format!(
        "SELECT string_agg(page || 'x' || n, ' ' ORDER BY page) FROM (SELECT page, count(*) n FROM public.{p}_pages GROUP BY page) s"
    ));
    assert_eq!(pages, "1x1 2x1 3x1 4x1 5x1", "every page imported exactly once");
    let (rows, bound): (i64, i64) = {
        let r = hub
            .db
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM public.{p}_contacts),
                            (SELECT count(DISTINCT external_id) FROM ihub.bindings WHERE integration = '{p}')"
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, bound), (15, 15));
    let page3: Vec<u16> =
        crm.requests().iter().filter(|r| r.path.starts_with("/contacts?cursor=6&")).map(|r| r.status).collect();
    assert_eq!(&page3[..2], &[503, 200], "the failing page was asked again: {page3:?}");
}

/// A rate limit holds across both dispatchers: 100 requests queued at once
/// reach the receiver at the endpoint's 20 a second (within 10 %). They
/// come in bursts, about two a second, so the rate is the slope of a line
/// fitted to the arrivals, not the first and last alone.
#[test]
fn a_rate_limit_holds_across_dispatchers() {
    // Alone: dispatchers busy with other tests' slow receivers claim late.
    let _g = serial();
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), ", rate_limit => 20");
    hub.exec(&format!(
        "SELECT ihub.http_request('{}', jsonb_build_object('n', g)) FROM generate_series(1, 100) g",
        s.endpoint
    ));
    assert!(rx.wait_for(100, Duration::from_secs(60)), "{} of 100 arrived", rx.count());
    let mut at: Vec<_> = rx.received().iter().map(|r| r.at).collect();
    at.sort();
    let x: Vec<f64> = at.iter().map(|t| (*t - at[0]).as_secs_f64()).collect();
    let n = x.len() as f64;
    let (mean_x, mean_y) = (x.iter().sum::<f64>() / n, (n - 1.0) / 2.0);
    let cov: f64 = x.iter().enumerate().map(|(i, xi)| (xi - mean_x) * (i as f64 - mean_y)).sum();
    let var: f64 = x.iter().map(|xi| (xi - mean_x).powi(2)).sum();
    let rate = cov / var;
    assert!((18.0..=22.0).contains(&rate), "{rate:.1} requests a second with a limit of 20");
    // Never more than the bucket (a second's worth) plus half a second's refill.
    let most = at.iter().map(|t| at.iter().filter(|u| **u >= *t && **u < *t + Duration::from_secs(1)).count()).max();
    assert!(most.unwrap() <= 30, "{most:?} requests within one second");
}

/// max_in_flight holds across both dispatchers, and a slot is used again
/// as soon as a request ends; a 429 pauses the whole endpoint until its
/// Retry-After.
#[test]
fn max_in_flight_and_a_429_pause_hold_the_whole_endpoint() {
    let _g = serial();
    let mut hub = hub();
    let rx = Receiver::start();
    rx.script(|_, n| {
        if n == 0 {
            Reply::Status { status: 429, headers: vec![("retry-after".into(), "2".into())], delay: Duration::ZERO }
        } else {
            Reply::delayed(200, Duration::from_millis(200))
        }
    });
    let s = hub.setup(&rx.url("/"), &format!(", retry => '{FAST_RETRY}', max_in_flight => 2"));
    hub.exec(&format!(
        "SELECT ihub.http_request('{}', jsonb_build_object('n', g)) FROM generate_series(1, 8) g",
        s.endpoint
    ));
    assert_eq!(hub.wait_settled(&s.endpoint, 8, Duration::from_secs(20)), vec!["done"; 8]);
    let got = rx.received();
    assert_eq!(got.len(), 9, "8 requests and the one answered 429 again");
    let mut at: Vec<_> = got.iter().map(|r| r.at).collect();
    at.sort();
    // After the 429 (the first request), nothing for 2 s: the other one in
    // flight then was answered, but no new request went.
    let after_429: Vec<_> = at[1..].iter().filter(|t| **t > at[0] + Duration::from_millis(50)).collect();
    assert!(**after_429.first().unwrap() >= at[0] + Duration::from_millis(1900), "{:?}", *after_429[0] - at[0]);
    // Each request takes 200 ms: never more than 2 arrive within 200 ms.
    for (i, t) in at.iter().enumerate().skip(1) {
        let overlapping = at[..i].iter().filter(|u| *t - **u < Duration::from_millis(190)).count();
        assert!(overlapping < 2, "{} requests in flight at once", overlapping + 1);
    }
}

/// A timed subscription's timers live in a table: one due while the server
/// is down fires once it is back, once; a row deleted or no longer
/// matching before its time is never sent.
#[test]
fn timed_subscriptions_fire_after_a_restart_once() {
    let _g = serial();
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/"), "");
    let table = unique("tickets");
    hub.exec(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, status text, closed_at timestamptz);
         SELECT ihub.subscribe_timed('{table}', '{e}', 'closed_at', '3 seconds', $$new.status = 'closed'$$);
         INSERT INTO {table} VALUES (1, 'closed', now()), (2, 'closed', now()), (3, 'closed', now());
         DELETE FROM {table} WHERE id = 2;
         UPDATE {table} SET status = 'reopened' WHERE id = 3;",
        e = s.endpoint
    ));
    assert!(hub.wait_true(
        &format!("SELECT count(*) = 1 FROM ihub.timers WHERE endpoint = '{}'", s.endpoint),
        Duration::from_secs(30)
    ));
    drop(hub);
    let cluster = Cluster::from_env();
    let data = cluster.pgdata.to_string_lossy().to_string();
    cluster.run_as_postgres("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    // The timer comes due while the server is down.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(rx.count(), 0, "nothing was due before the stop");
    cluster.start();
    let mut hub = pg_ihub_e2e::hub();
    assert_eq!(hub.wait_settled(&s.endpoint, 1, Duration::from_secs(30)), vec!["done"]);
    let got = rx.received();
    assert_eq!(got.len(), 1);
    let body = got[0].json();
    assert_eq!(
        (body["type"].as_str(), body["data"]["id"].as_i64()),
        (Some(format!("{table}.timer").as_str()), Some(1))
    );
    assert!(hub.one::<bool>(&format!("SELECT fired_at IS NOT NULL FROM ihub.timers WHERE endpoint = '{}'", s.endpoint)));
    // The next test may need the listener, which starts a moment after the server.
    let _ = http();
}
