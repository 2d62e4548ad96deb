//! Upgrading a database with real state from the released 0.1.0 to this
//! version with `ALTER EXTENSION pg_ihub UPDATE`. Run by tests/upgrade/run in
//! two phases, each an ignored test: `prepare` on a cluster running 0.1.0,
//! then, with this build installed and the server restarted, `check`.

use std::time::Duration;

use pg_ihub_e2e::*;

/// Where the endpoints of both phases deliver (outside the ephemeral range).
const RECEIVER_PORT: u16 = 8493;
/// A port nothing listens on: deliveries there fail and are retried.
const CLOSED: &str = "http://127.0.0.1:9/hook";
const WAIT: Duration = Duration::from_secs(30);

/// A row as text, without the columns later versions added (a new column
/// changes every row's text): job.fn_name and inbound_source.handler_name
/// (0.3.0, filled by the upgrade), subscription.broken_at and broken_reason
/// (0.3.0, NULL), endpoint.circuit, rate_limit, max_in_flight, event_types
/// and ordering, subscription.event_type and ordering_key, and
/// delivery.ordering_key, inbound_source.response and subscription.payload
/// and timer_* (0.3.0, NULL: none; delivery.payload, stripped too, is not
/// compared).
const ROW: &str = "(to_jsonb(t) - '{handler_name,fn_name,broken_at,broken_reason,circuit,rate_limit,max_in_flight,\
                   event_types,event_type,ordering,ordering_key,response,payload,timer_column,timer_offset,\
                   timer_condition}'::text[])::text";

/// Tables whose rows only the test changes: they must come through equal.
const KEPT: &[&str] = &[
    "integration",
    "endpoint",
    "endpoint_secret",
    "endpoint_credential",
    "subscription",
    "delivery",
    "job",
    "schedule",
    "schedule_param",
    "watcher",
    "inbound_source",
    "inbound_secret",
    "inbound_item",
    "retention",
    "log_setting",
    "activity_setting",
    "integration_date",
    "activity",
];

fn wait(hub: &mut Hub, what: &str, query: &str) {
    assert!(hub.wait_true(query, WAIT), "{what}: {query}");
}

#[test]
#[ignore = "run by tests/upgrade/run"]
fn prepare() {
    let mut hub = hub();
    let rx = Receiver::start_on(RECEIVER_PORT, 2, true);
    let live = rx.url("/live");
    let fast = r#"{"initial_delay": 0.2, "multiplier": 2, "jitter": 0, "max_attempts": 3}"#;
    let slow = r#"{"initial_delay": 3600, "multiplier": 2, "jitter": 0, "max_attempts": 5}"#;
    let once = r#"{"initial_delay": 1, "multiplier": 1, "jitter": 0, "max_attempts": 1}"#;
    hub.exec(&format!(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric NOT NULL);
         CREATE TABLE upgrade_flag (fail boolean); INSERT INTO upgrade_flag VALUES (true);
         CREATE TABLE upgrade_seen (what text, role name DEFAULT current_user);
         CREATE FUNCTION upgrade_note(args jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO upgrade_seen (what) VALUES (coalesce(args->>'what', 'job')) $$;
         CREATE FUNCTION upgrade_flaky(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF (SELECT fail FROM upgrade_flag) THEN RAISE EXCEPTION 'not yet'; END IF;
             INSERT INTO upgrade_seen (what) VALUES ('flaky job');
         END $$;
         CREATE FUNCTION upgrade_partial(args jsonb) RETURNS void LANGUAGE sql AS $$
             SELECT ihub.log('error', 'a row was skipped', '{{\"password\": \"hunter2\"}}') $$;
         CREATE FUNCTION upgrade_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             IF (item.payload->>'fail')::boolean AND (SELECT fail FROM upgrade_flag) THEN RAISE EXCEPTION 'cannot'; END IF;
             INSERT INTO upgrade_seen (what) VALUES ('item ' || (item.payload->>'n'));
             RETURN '{{}}';
         END $$;

         SELECT ihub.create_integration('shop', tenant => 'acme', settings => '{{\"api_key\": \"k-123\"}}');
         SELECT ihub.create_endpoint('shop', 'live', '{live}', retry => '{fast}',
                                     auth => '{{\"type\": \"bearer\", \"token\": \"tok-123\"}}');
         SELECT ihub.create_endpoint('shop', 'retrying', '{CLOSED}', retry => '{slow}');
         SELECT ihub.create_endpoint('shop', 'dead', '{CLOSED}', retry => '{once}');
         SELECT ihub.create_endpoint('shop', 'held', '{live}', headers => '{{\"X-Key\": \"hdr-123\"}}');
         SELECT ihub.rotate_secret('live', NULL, '1 day');
         SELECT ihub.enable_integration('shop');
         SELECT ihub.disable_endpoint('held', 'maintenance');
         SELECT ihub.subscribe('orders', 'live', condition => 'new.amount > 0');
         SELECT ihub.subscribe('orders', 'retrying', events => '{{insert}}');
         SELECT ihub.subscribe('orders', 'dead', events => '{{insert}}');
         SELECT ihub.subscribe('orders', 'held', watch => '{{amount}}');

         CREATE ROLE upgrade_dev NOLOGIN IN ROLE ihub_developer;
         GRANT SELECT, TRIGGER ON orders TO upgrade_dev;
         GRANT ALL ON upgrade_seen, upgrade_flag TO upgrade_dev;
         SET ROLE upgrade_dev;
         SELECT ihub.subscribe('orders', 'live', condition => 'new.amount > 10 AND new.customer <> ''skip''');
         RESET ROLE;

         INSERT INTO orders (customer, amount) VALUES ('a', 5), ('b', 50), ('skip', 60);
         UPDATE orders SET amount = amount + 1 WHERE customer = 'a';

         SELECT ihub.enqueue('upgrade_note(jsonb)', '{{\"what\": \"done job\"}}');
         SELECT ihub.enqueue('upgrade_note(jsonb)', '{{\"what\": \"later job\"}}', run_at => now() + interval '1 day');
         SELECT ihub.enqueue('upgrade_flaky(jsonb)', max_attempts => 1, identity_key => 'failed-once');
         SELECT ihub.enqueue('upgrade_flaky(jsonb)', retry_schedule => '{{1 day}}', identity_key => 'retrying');
         SELECT ihub.cancel_job(ihub.enqueue('upgrade_note(jsonb)', run_at => now() + interval '1 day'));
         SELECT ihub.enqueue('upgrade_partial(jsonb)');
         SELECT ihub.schedule('nightly', 'upgrade_note(jsonb)', cron => '0 3 * * *', integration => 'shop');
         SELECT ihub.schedule('hourly', 'upgrade_note(jsonb)', every => '1 hour', args => '{{\"what\": \"hourly\"}}');
         SELECT ihub.set_schedule_params('hourly', 'shop', '{{\"region\": \"eu\"}}');
         SELECT ihub.watch('nightly', 'live');
         SELECT ihub.set_date('shop', 'last_sync', '2026-11-30 12:00+00');

         SELECT ihub.create_source('shop', 'payments', 'upgrade_handle(ihub.inbound_items)', 'hmac-sha256',
                                   'inbound-secret-123', header => 'X-Sig');
         SELECT ihub.create_source('shop', 'open', 'upgrade_handle(ihub.inbound_items)', 'none');
         SELECT ihub.receive('shop', 'open', '{{}}', convert_to('{{\"n\": 1}}', 'UTF8'), now() + interval '1 day');
         SELECT ihub.receive('shop', 'open', '{{}}', convert_to('{{\"n\": 2, \"fail\": true}}', 'UTF8'));

         SELECT ihub.set_activity_users('ihub_admin');
         SELECT ihub.log('info', 'upgrade test started', integration => 'shop');
         SELECT ihub.log('critical', 'something to look at', '{{\"token\": \"t-1\"}}', integration => 'shop');
         SELECT ihub.set_log_level('shop', 'debug');
         SELECT ihub.set_retention('debug', '2 days');"
    ));
    // live: 3 inserts and an update pass the first condition, one insert the
    // developer's; held: 3 inserts and the update of a watched column.
    wait(
        &mut hub,
        "live deliveries",
        "SELECT count(*) = 5 AND bool_and(state = 'delivered') FROM ihub.deliveries WHERE endpoint = 'live'",
    );
    wait(
        &mut hub,
        "retrying deliveries",
        "SELECT count(*) = 3 AND bool_and(state = 'retry') FROM ihub.deliveries WHERE endpoint = 'retrying'",
    );
    wait(
        &mut hub,
        "dead deliveries",
        "SELECT count(*) = 3 AND bool_and(state = 'dead') FROM ihub.deliveries WHERE endpoint = 'dead'",
    );
    wait(&mut hub, "held deliveries", "SELECT count(*) = 4 FROM ihub.deliveries WHERE endpoint = 'held'");
    wait(
        &mut hub,
        "jobs in every state",
        "SELECT array_agg(DISTINCT state ORDER BY state) = '{cancelled,done,failed,partial,pending,retry}' FROM ihub.jobs",
    );
    wait(&mut hub, "a failed item", "SELECT count(*) = 1 FROM ihub.inbound_failed");
    let routed: i64 = hub.one("SELECT count(*) FROM ihub.deliveries");
    assert_eq!(routed, 5 + 3 + 3 + 4, "deliveries");

    // What the check phase compares against.
    hub.exec(
        "CREATE TABLE upgrade_expect (tab text PRIMARY KEY, n bigint, digest text);
         CREATE TABLE upgrade_secrets AS
             SELECT 'endpoint' AS kind, e.name, s.secret FROM ihub.endpoint_secret s JOIN ihub.endpoint e ON e.id = s.endpoint_id
             UNION ALL
             SELECT 'inbound', i.name, s.secret FROM ihub.inbound_secret s JOIN ihub.inbound_source i ON i.id = s.source_id;",
    );
    for table in KEPT {
        hub.exec(&format!(
            "INSERT INTO upgrade_expect SELECT '{table}', count(*), md5(coalesce(string_agg({ROW}, '|' ORDER BY {ROW}), ''))
             FROM ihub.{table} t"
        ));
    }
}

#[test]
#[ignore = "run by tests/upgrade/run"]
fn check() {
    let mut hub = hub();
    let rx = Receiver::start_on(RECEIVER_PORT, 2, true);
    let before: String = hub.one("SELECT extversion FROM pg_extension WHERE extname = 'pg_ihub'");
    assert_eq!(before, "0.1.0");
    hub.exec("ALTER EXTENSION pg_ihub UPDATE");
    let version: String = hub.one("SELECT extversion FROM pg_extension WHERE extname = 'pg_ihub'");
    let installed: String = hub.one("SELECT default_version FROM pg_available_extensions WHERE name = 'pg_ihub'");
    assert_eq!(version, installed, "the upgrade reaches this build's version");
    assert_ne!(version, "0.1.0");

    // Every row kept, as it was; retention periods of kinds added since
    // 0.1.0 come with their defaults.
    assert_eq!(hub.one::<String>("SELECT keep::text FROM ihub.retention WHERE kind = 'rejections'"), "7 days");
    for table in KEPT {
        let added = if *table == "retention" { " WHERE t.kind <> 'rejections'" } else { "" };
        let (n, digest): (i64, String) = {
            let row = hub
                .db
                .query_one(
                    &format!(
                        "SELECT count(*), md5(coalesce(string_agg({ROW}, '|' ORDER BY {ROW}), '')) FROM ihub.{table} t{added}"
                    ),
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        let (n0, digest0): (i64, String) = {
            let row =
                hub.db.query_one("SELECT n, digest FROM upgrade_expect WHERE tab = $1", &[&table.to_string()]).unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(n, n0, "rows of ihub.{table}");
        if !["delivery", "job", "schedule", "watcher", "inbound_item"].contains(table) {
            assert_eq!(digest, digest0, "contents of ihub.{table}");
        }
    }
    let lost: i64 = hub.one(
        "SELECT count(*) FROM upgrade_secrets u WHERE NOT EXISTS (
             SELECT 1 FROM ihub.endpoint_secret s JOIN ihub.endpoint e ON e.id = s.endpoint_id
             WHERE u.kind = 'endpoint' AND e.name = u.name AND s.secret = u.secret
             UNION ALL
             SELECT 1 FROM ihub.inbound_secret s JOIN ihub.inbound_source i ON i.id = s.source_id
             WHERE u.kind = 'inbound' AND i.name = u.name AND s.secret = u.secret)",
    );
    assert_eq!(lost, 0, "secrets kept");
    let logs: i64 =
        hub.one("SELECT count(*) FROM ihub.logs WHERE message IN ('upgrade test started', 'something to look at')");
    assert_eq!(logs, 2);
    let activities: i64 = hub.one("SELECT count(*) FROM ihub.activities WHERE summary = 'something to look at'");
    assert_eq!(activities, 1);

    // The condition subscription of a developer now captures through the
    // definer trigger; the developer keeps no privilege on capture tables.
    let grants: Option<String> = hub.one(
        "SELECT string_agg(c.relname, ', ') FROM pg_class c WHERE c.relnamespace = 'ihub_capture'::regnamespace
         AND has_table_privilege('upgrade_dev', c.oid, 'INSERT')",
    );
    assert_eq!(grants, None);
    let leftovers: i64 = hub.one("SELECT count(*) FROM pg_proc WHERE pronamespace = 'ihub_capture'::regnamespace");
    assert_eq!(leftovers, 0, "per-subscription trigger functions are gone");

    // Everything queued is processed.
    let signing: String = hub.one(
        "SELECT secret FROM ihub.endpoint_secrets WHERE endpoint = 'live' AND signing ORDER BY created_at LIMIT 1",
    );
    assert!(signing.starts_with("whsec_"));
    hub.exec(&format!(
        "UPDATE upgrade_flag SET fail = false;
         UPDATE ihub.endpoint SET url = '{live}' WHERE name IN ('retrying', 'dead');
         UPDATE ihub.delivery SET run_at = now() WHERE state = 'retry';
         SELECT ihub.replay_dead('dead');
         SELECT ihub.enable_endpoint('held');
         UPDATE ihub.job SET run_at = now() WHERE state IN ('pending', 'retry');
         SELECT ihub.retry_job(id) FROM ihub.jobs WHERE state = 'failed';
         UPDATE ihub.inbound_item SET run_at = now() WHERE state = 'pending';
         SELECT ihub.reactivate_inbound(array_agg(id)) FROM ihub.inbound_failed;
         INSERT INTO orders (customer, amount) VALUES ('after', 70);",
        live = rx.url("/live")
    ));
    // The 15 of before, and one row written after the upgrade for each of
    // the five subscriptions.
    wait(&mut hub, "deliveries", "SELECT bool_and(state = 'done') AND count(*) = 15 + 5 FROM ihub.deliveries");
    wait(&mut hub, "jobs", "SELECT bool_and(state IN ('done', 'cancelled', 'partial')) FROM ihub.jobs");
    wait(&mut hub, "inbound items", "SELECT bool_and(state = 'done') FROM ihub.inbound_items");
    let seen: String = hub.one(
        "SELECT string_agg(what, ',' ORDER BY what) FROM upgrade_seen WHERE what LIKE 'item%' OR what LIKE '%job'",
    );
    assert_eq!(seen, "done job,flaky job,flaky job,item 1,item 2,later job");
    assert!(rx.count() >= 3 + 3 + 4 + 5, "the receiver got {}", rx.count());

    // The catalog equals that of a fresh CREATE EXTENSION of this version.
    hub.exec("DROP DATABASE IF EXISTS ihub_fresh");
    hub.exec("CREATE DATABASE ihub_fresh");
    let mut fresh = hub.cluster.connect_as("postgres", "ihub_fresh");
    fresh.batch_execute("CREATE EXTENSION pg_ihub").unwrap();
    let catalog = |client: &mut postgres::Client| -> Vec<String> {
        client
            .query(include_str!("upgrade/catalog.sql"), &[])
            .unwrap_or_else(|e| panic!("{}", describe(&e)))
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let (upgraded, created) = (catalog(&mut hub.db), catalog(&mut fresh));
    let only_upgraded: Vec<&String> = upgraded.iter().filter(|l| !created.contains(l)).collect();
    let only_created: Vec<&String> = created.iter().filter(|l| !upgraded.contains(l)).collect();
    assert!(
        only_upgraded.is_empty() && only_created.is_empty(),
        "the upgraded catalog differs from a fresh one.\nonly after the upgrade:\n  {}\nonly when created fresh:\n  {}",
        only_upgraded.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n  "),
        only_created.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n  ")
    );
    assert!(upgraded.len() > 500, "the catalog query sees the extension ({} lines)", upgraded.len());
}
