//! pg_dump and pg_restore with the real tools (issue 9): a database with
//! real pg_ihub state is dumped (-Fc) and restored into a new database,
//! which must be a working hub; and DROP EXTENSION pg_ihub needs no CASCADE
//! and leaves no capture objects behind. Both databases must be listed in
//! ihub.databases (tests/run).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use pg_ihub_e2e::*;
use postgres::Client;

const SOURCE: &str = "ihub_dump_src";
const RESTORED: &str = "ihub_dump";
/// A port nothing listens on: deliveries there stay queued for retry.
const CLOSED: &str = "http://127.0.0.1:9/hook";
/// Workers of a database made after the server started take a moment to come.
const WAIT: Duration = Duration::from_secs(60);

fn exec(db: &mut Client, sql: &str) {
    db.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
}

fn one<T: for<'a> postgres::types::FromSql<'a>>(db: &mut Client, sql: &str) -> T {
    db.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e))).get(0)
}

fn wait(db: &mut Client, what: &str, sql: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(row) = db.query_one(sql, &[]) {
            if row.get::<_, Option<bool>>(0) == Some(true) {
                return;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {sql}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh, empty database (a previous run's is dropped, its workers too).
fn fresh_database(hub: &mut Hub, name: &str) -> Client {
    hub.exec(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    hub.exec(&format!("CREATE DATABASE {name}"));
    hub.cluster.connect_as("postgres", name)
}

/// Runs one of the cluster's client programs (pg_dump, pg_restore).
fn run(cluster: &Cluster, program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(cluster.bindir.join(program))
        .args(["-h", &cluster.host, "-p", &cluster.port.to_string(), "-U", "postgres"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Rows of a query as text, to compare the two databases.
fn rows(db: &mut Client, sql: &str) -> String {
    one(db, &format!("SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM ({sql}) t"))
}

/// What DROP EXTENSION must leave: no capture schema, table or trigger.
fn assert_no_capture_left(db: &mut Client, what: &str) {
    let schema: i64 = one(db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'ihub_capture'");
    assert_eq!(schema, 0, "{what}: the ihub_capture schema is gone");
    let tables: i64 = one(db, "SELECT count(*) FROM pg_class WHERE relname ~ '^sub_[0-9]+$'");
    assert_eq!(tables, 0, "{what}: no capture tables");
    let triggers: Option<String> = one(
        db,
        "SELECT string_agg(tgname, ', ') FROM pg_trigger WHERE tgrelid IN ('orders'::regclass, 'other'::regclass)
         AND NOT tgisinternal",
    );
    assert_eq!(triggers, None, "{what}: no triggers on user tables");
    let orders: i64 = one(db, "SELECT count(*) FROM orders");
    assert!(orders > 0, "{what}: the user's table and rows stay");
    exec(db, "INSERT INTO orders (customer, amount) VALUES ('after drop', 1)");
}

#[test]
fn dump_and_restore_keep_a_working_hub() {
    let mut hub = hub();
    let rx = Receiver::start();
    let (live, cond) = (rx.url("/live"), rx.url("/cond"));
    let fast = r#"{"initial_delay": 0.2, "multiplier": 2, "jitter": 0, "max_attempts": 5}"#;
    let slow = r#"{"initial_delay": 3600, "multiplier": 2, "jitter": 0, "max_attempts": 5}"#;

    // The source: every kind of state pg_ihub keeps.
    let mut src = fresh_database(&mut hub, SOURCE);
    exec(
        &mut src,
        &format!(
            "CREATE EXTENSION pg_ihub;
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric NOT NULL);
             CREATE TABLE other (id int PRIMARY KEY, v text);
             CREATE FUNCTION dump_note(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT 1 $$;
             CREATE FUNCTION dump_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{{}}'::jsonb $$;
             SELECT ihub.create_integration('shop', tenant => 'acme', settings => '{{\"api_key\": \"k-123\"}}');
             SELECT ihub.create_integration('off');
             SELECT ihub.create_endpoint('shop', 'live', '{live}', retry => '{fast}',
                                         auth => '{{\"type\": \"bearer\", \"token\": \"tok-123\"}}');
             SELECT ihub.create_endpoint('shop', 'cond', '{cond}', retry => '{fast}');
             SELECT ihub.create_endpoint('shop', 'queued', '{CLOSED}', retry => '{slow}');
             SELECT ihub.create_endpoint('off', 'idle', '{live}');
             SELECT ihub.rotate_secret('live', NULL, '1 day');
             SELECT ihub.enable_integration('shop');
             SELECT ihub.subscribe('orders', 'live');
             SELECT ihub.subscribe('orders', 'cond', events => '{{insert}}', condition => 'new.amount > 10');
             SELECT ihub.subscribe('orders', 'queued', events => '{{insert}}');
             SELECT ihub.subscribe('other', 'idle');
             INSERT INTO orders (customer, amount) VALUES ('before-small', 5), ('before-big', 50);

             SELECT ihub.enqueue('dump_note(jsonb)', '{{\"what\": \"later\"}}', run_at => now() + interval '1 day');
             SELECT ihub.schedule('nightly', 'dump_note(jsonb)', cron => '0 3 * * *', integration => 'shop');
             SELECT ihub.create_source('shop', 'payments', 'dump_handle(ihub.inbound_items)', 'hmac-sha256',
                                       'inbound-secret-123', header => 'X-Sig');
             SELECT ihub.create_source('shop', 'open', 'dump_handle(ihub.inbound_items)', 'none');
             SELECT ihub.receive('shop', 'open', '{{}}', convert_to('{{\"n\": 1}}', 'UTF8'), now() + interval '1 day');
             SELECT ihub.set_activity_users('ihub_admin');
             SELECT ihub.log('info', 'an info entry', integration => 'shop');
             SELECT ihub.log('warning', 'a warning entry', integration => 'shop');
             SELECT ihub.log('critical', 'a critical entry', integration => 'shop');
             SELECT ihub.set_log_level('shop', 'debug');
             SELECT ihub.set_retention('debug', '2 days');
             SELECT ihub.set_retention('error', '90 days');
             SELECT ihub.set_retention('deliveries', NULL);
             SELECT ihub.set_date('shop', 'last_sync', '2026-11-30 12:00+00');
             CREATE TABLE countries (code text PRIMARY KEY);
             INSERT INTO countries VALUES ('DE'), ('FR');
             SELECT ihub.create_mapper('shop', 'country', 'table', 'countries', 'code', on_import => 'auto');
             SELECT ihub.create_mapper('shop', 'status', 'enum', local_values => '{{open,won}}');
             SELECT ihub.map_item('shop', 'status', '{{Open,OPEN}}', 'open');
             SELECT ihub.map_import('shop', 'country', 'de');
             SELECT ihub.map_import('shop', 'status', 'Unknown');
             SELECT ihub.bind('shop', 'order', 'orders', (SELECT min(id)::text FROM orders), 'o_1', '{{\"a\": 1}}');"
        ),
    );
    // Everything routed and settled before the dump: nothing running.
    wait(
        &mut src,
        "source deliveries",
        "SELECT count(*) FILTER (WHERE endpoint IN ('live', 'cond') AND state = 'done') = 3
            AND count(*) FILTER (WHERE endpoint = 'queued' AND state = 'retry') = 2
            AND count(*) = 5 FROM ihub.deliveries",
    );
    assert!(rx.wait_for(3, WAIT));

    // What the restored database must show as it was.
    let kept = [
        "SELECT kind, keep FROM ihub.retention",
        "SELECT * FROM ihub.log_settings",
        "SELECT * FROM ihub.activity_setting",
        "SELECT * FROM ihub.integration",
        "SELECT * FROM ihub.endpoint",
        "SELECT * FROM ihub.endpoint_credential",
        "SELECT * FROM ihub.endpoint_secret",
        "SELECT * FROM ihub.subscription",
        "SELECT id, state, endpoint_id, run_at FROM ihub.delivery",
        "SELECT id, state, run_at FROM ihub.job",
        "SELECT name, fn, cron, integration_id, active FROM ihub.schedule",
        "SELECT * FROM ihub.inbound_source",
        "SELECT * FROM ihub.inbound_secret",
        "SELECT id, state, run_at FROM ihub.inbound_item",
        "SELECT * FROM ihub.integration_date",
        "SELECT * FROM ihub.mapper",
        "SELECT * FROM ihub.mapper_item",
        "SELECT * FROM ihub.mapper_value",
        "SELECT * FROM ihub.binding",
        "SELECT id, level, message FROM ihub.log_entry WHERE message LIKE 'a% entry'",
        "SELECT id, summary, state FROM ihub.activity",
        "SELECT tgrelid::regclass, tgname, tgenabled, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname LIKE 'ihub_sub_%'",
    ];
    let before: Vec<String> = kept.iter().map(|q| rows(&mut src, q)).collect();
    let (max_log, max_job, max_delivery, max_sub): (i64, i64, i64, i64) = {
        let r = src
            .query_one(
                "SELECT (SELECT max(id) FROM ihub.log_entry), (SELECT max(id) FROM ihub.job),
                        (SELECT max(id) FROM ihub.delivery), (SELECT max(id) FROM ihub.subscription)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };

    // The maintenance worker's daily log partitions (tomorrow's and the
    // next day's, for three levels) are part of what is dumped.
    wait(
        &mut src,
        "daily log partitions",
        "SELECT count(*) >= 6 FROM pg_class WHERE relname ~ '^log_entry_(debug|info|warning)_[0-9]{8}$'",
    );

    // The real tools.
    let file: PathBuf = std::env::temp_dir().join(format!("{}.dump", unique("ihub")));
    let file_arg = file.to_string_lossy().to_string();
    let (ok, err) = run(&hub.cluster, "pg_dump", &["-Fc", "-f", &file_arg, SOURCE]);
    assert!(ok, "pg_dump failed: {err}");
    fresh_database(&mut hub, RESTORED);
    let (ok, err) = run(&hub.cluster, "pg_restore", &["-d", RESTORED, &file_arg]);
    let _ = std::fs::remove_file(&file);
    // Not one error: the daily log partitions and their indexes are dumped
    // as tables of their own and must attach without colliding.
    assert!(ok && !err.contains("error"), "pg_restore failed:\n{err}");
    let mut dst = hub.cluster.connect_as("postgres", RESTORED);

    // Configuration, secrets, settings, retention, queued work: as they were.
    for (query, expected) in kept.iter().zip(&before) {
        assert_eq!(&rows(&mut dst, query), expected, "restored: {query}");
    }
    // Mappers work on: a new item takes a new id, the restored table is read.
    let max_item: i64 = one(&mut src, "SELECT max(id) FROM ihub.mapper_item");
    let fr: String = one(&mut dst, "SELECT ihub.map_import('shop', 'country', 'fr')");
    assert_eq!(fr, "FR");
    let new_item: i64 = one(&mut dst, "SELECT id FROM ihub.mapper_items WHERE 'fr' = ANY (external_values)");
    assert!(new_item > max_item, "item ids continue after the restored ones");
    // Bindings too, and their cleanup trigger on the user's table came along.
    let bound: Option<String> = one(&mut dst, "SELECT ihub.local_key('shop', 'order', 'o_1')");
    let bound = bound.expect("the binding is restored");
    // (Marked as the shop's sync: the delete is not sent to its endpoints.)
    exec(&mut dst, &format!("BEGIN; SELECT ihub.syncing('shop'); DELETE FROM orders WHERE id = {bound}; COMMIT"));
    let left: i64 = one(&mut dst, "SELECT count(*) FROM ihub.binding");
    assert_eq!(left, 0, "deleting the restored row removes its binding");
    let queued: i64 = one(
        &mut dst,
        "SELECT (SELECT count(*) FROM ihub.deliveries WHERE endpoint = 'queued' AND state = 'retry')
              + (SELECT count(*) FROM ihub.jobs WHERE state = 'pending')
              + (SELECT count(*) FROM ihub.inbound_items WHERE state = 'pending')",
    );
    assert_eq!(queued, 2 + 1 + 1, "queued deliveries, jobs and inbound items survive");
    let retention: String = one(&mut dst, "SELECT keep::text FROM ihub.retention WHERE kind = 'debug'");
    assert_eq!(retention, "2 days");

    // New ids continue after the restored ones.
    let log_id: i64 = one(&mut dst, "SELECT ihub.log('error', 'after the restore')");
    assert!(log_id > max_log, "log id {log_id} after {max_log}");
    let job_id: i64 = one(&mut dst, "SELECT ihub.enqueue('dump_note(jsonb)', run_at => now() + interval '1 day')");
    assert!(job_id > max_job, "job id {job_id} after {max_job}");

    // A write to a subscribed table is captured, routed and delivered,
    // signed with the restored secret; the condition still filters.
    let secrets: Vec<String> = dst
        .query("SELECT secret FROM ihub.endpoint_secrets WHERE endpoint IN ('live', 'cond') AND signing", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(secrets.len(), 3, "two signing secrets of live (rotation), one of cond");
    let source_secrets: String = rows(&mut src, "SELECT secret FROM ihub.endpoint_secret");
    for s in &secrets {
        assert!(source_secrets.contains(s.as_str()), "the restored secret is the dumped one");
        rx.expect_secret(s);
    }
    let seen = rx.count();
    exec(&mut dst, "INSERT INTO orders (customer, amount) VALUES ('restored-small', 5), ('restored-big', 50)");
    wait(
        &mut dst,
        "deliveries after the restore",
        "SELECT count(*) FILTER (WHERE endpoint = 'live') = 2 AND count(*) FILTER (WHERE endpoint = 'cond') = 1
            AND bool_and(state = 'done') FILTER (WHERE endpoint IN ('live', 'cond'))
            FROM ihub.deliveries WHERE payload->'data'->>'customer' LIKE 'restored-%'",
    );
    let new_ids: i64 = one(
        &mut dst,
        &format!("SELECT min(id) FROM ihub.deliveries WHERE payload->'data'->>'customer' LIKE 'restored-%'"),
    );
    assert!(new_ids > max_delivery, "delivery ids continue after {max_delivery}");
    assert!(rx.wait_for(seen + 3, WAIT), "the receiver got the three deliveries");
    let after: Vec<Received> = rx.received().into_iter().skip(seen).collect();
    let at = |path: &str| -> Vec<String> {
        let mut c: Vec<String> = after
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.json()["data"]["customer"].as_str().unwrap_or("").to_string())
            .collect();
        c.sort();
        c
    };
    assert_eq!(at("/live"), ["restored-big", "restored-small"]);
    assert_eq!(at("/cond"), ["restored-big"], "the condition new.amount > 10 still filters");
    for r in &after {
        assert_eq!(r.signature_valid, Some(true), "{} is signed with the restored secret", r.path);
    }
    // The disabled integration's capture stays off.
    exec(&mut dst, "INSERT INTO other VALUES (1, 'x')");
    let idle: i64 = one(&mut dst, "SELECT count(*) FROM ihub_capture.sub_4");
    assert_eq!(idle, 0, "the disabled integration's triggers stay disabled");
    // A new subscription gets the next id.
    let sub: i64 = one(&mut dst, "SELECT ihub.subscribe('other', 'cond', events => '{insert}')");
    assert!(sub > max_sub);

    // DROP EXTENSION without CASCADE, in the restored database and in the
    // source. The handler's argument type is pg_ihub's: that function is
    // the user's and must go first, as with any extension's type.
    for (db, what) in [(&mut dst, "restored"), (&mut src, "source")] {
        exec(db, "DROP FUNCTION dump_handle(ihub.inbound_items)");
        db.batch_execute("DROP EXTENSION pg_ihub")
            .unwrap_or_else(|e| panic!("DROP EXTENSION pg_ihub in the {what} database: {}", describe(&e)));
        assert_no_capture_left(db, what);
    }
    // DROP EXTENSION of another extension keeps pg_ihub's capture objects.
    let mut other = fresh_database(&mut hub, SOURCE);
    exec(
        &mut other,
        &format!(
            "CREATE EXTENSION pg_ihub; CREATE EXTENSION hstore;
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric NOT NULL);
             SELECT ihub.create_integration('shop');
             SELECT ihub.create_endpoint('shop', 'live', '{live}');
             SELECT ihub.subscribe('orders', 'live');
             DROP EXTENSION hstore;"
        ),
    );
    let kept: i64 =
        one(&mut other, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal");
    assert_eq!(kept, 3, "dropping another extension leaves capture triggers alone");
    exec(&mut other, "DROP EXTENSION pg_ihub");
    assert_no_capture_left_empty(&mut other);
}

fn assert_no_capture_left_empty(db: &mut Client) {
    let left: i64 = one(
        db,
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'ihub_capture')
              + (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal)",
    );
    assert_eq!(left, 0);
}
