//! Faults stay where they happen (issue 10): DDL on a subscribed table, or a
//! broken capture table, touches that subscription only; every other one
//! goes on delivering. Each test makes its own tables and endpoints, so the
//! tests run side by side.

use std::time::Duration;

use pg_ihub_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

/// A second subscription that must keep delivering whatever happens to the first.
fn bystander(hub: &mut Hub) -> (Receiver, Setup) {
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/bystander"), "");
    hub.exec(&format!("SELECT ihub.subscribe('{}', '{}', events => '{{insert}}')", s.table, s.endpoint));
    (rx, s)
}

/// One more row to the bystander arrives (`n` in all so far).
fn assert_still_delivers(hub: &mut Hub, rx: &Receiver, s: &Setup, n: usize) {
    hub.exec(&format!("INSERT INTO {} (customer, amount) VALUES ('after', 1)", s.table));
    assert!(rx.wait_for(n, WAIT), "the other subscription stopped delivering");
    assert_eq!(hub.wait_settled(&s.endpoint, n as i64, WAIT), vec!["done"; n]);
}

#[test]
fn drop_table_delivers_what_was_captured_then_ends_the_subscription() {
    let mut hub = hub();
    let (other_rx, other) = bystander(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/dropped"), "");
    let sub: i64 = hub.one(&format!("SELECT ihub.subscribe('{}', '{}', events => '{{insert}}')", s.table, s.endpoint));
    // Captured in the same transaction that drops the table: only the drop
    // itself can still deliver it.
    hub.exec(&format!(
        "BEGIN;
         INSERT INTO {t} (customer, amount) VALUES ('last words', 7);
         DROP TABLE {t} CASCADE;
         COMMIT;",
        t = s.table
    ));
    assert!(rx.wait_for(1, WAIT), "the change captured before the drop was not delivered");
    assert_eq!(rx.received()[0].json()["data"]["customer"], "last words");
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
    let left: i64 = hub.one(&format!(
        "SELECT (SELECT count(*) FROM ihub.subscriptions WHERE id = {sub})
              + (SELECT count(*) FROM pg_class WHERE relname = 'sub_{sub}' AND relnamespace = 'ihub_capture'::regnamespace)"
    ));
    assert_eq!(left, 0, "the subscription and its capture table end with the table");
    let logged: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.logs WHERE level = 'warning' AND message LIKE 'subscription {sub} ended%'"
    ));
    assert_eq!(logged, 1);
    assert_still_delivers(&mut hub, &other_rx, &other, 1);
}

#[test]
fn a_table_dropped_with_its_schema_marks_its_subscription_broken_and_the_rest_go_on() {
    let mut hub = hub();
    let (other_rx, other) = bystander(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/schema"), "");
    let schema = unique("gone");
    hub.exec(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id int PRIMARY KEY);
         SELECT ihub.subscribe('{schema}.t', '{e}');",
        e = s.endpoint
    ));
    let sub: i64 = hub.one(&format!("SELECT id FROM ihub.subscriptions WHERE endpoint = '{}'", s.endpoint));
    hub.exec(&format!("DROP SCHEMA {schema} CASCADE"));
    assert_still_delivers(&mut hub, &other_rx, &other, 1);
    let reason: String = hub.one(&format!("SELECT broken FROM ihub.subscriptions WHERE id = {sub}"));
    assert!(reason.contains("dropped"), "{reason}");
    let health: String = hub.one("SELECT status FROM ihub.health() WHERE check_name = 'subscriptions'");
    assert_eq!(health, "critical");
    // Its integration can still be disabled and enabled, and it can be removed.
    hub.exec(&format!(
        "SELECT ihub.disable_integration('{i}'); SELECT ihub.enable_integration('{i}'); SELECT ihub.unsubscribe({sub});",
        i = s.integration
    ));
    assert_still_delivers(&mut hub, &other_rx, &other, 2);
    drop(rx);
}

#[test]
fn a_broken_capture_table_stops_only_its_subscription_and_it_recovers_when_repaired() {
    let mut hub = hub();
    let (other_rx, other) = bystander(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/broken"), "");
    let sub: i64 = hub.one(&format!("SELECT ihub.subscribe('{}', '{}', events => '{{insert}}')", s.table, s.endpoint));
    // A superuser breaks the capture table by hand: the change waits in it
    // and every route of it fails.
    hub.exec(&format!(
        "ALTER TABLE ihub_capture.sub_{sub} RENAME COLUMN occurred_at TO oops;
         INSERT INTO {t} (customer, amount) VALUES ('waits', 1);",
        t = s.table
    ));
    assert!(
        hub.wait_true(&format!("SELECT broken IS NOT NULL FROM ihub.subscriptions WHERE id = {sub}"), WAIT),
        "the subscription is not marked broken"
    );
    assert_still_delivers(&mut hub, &other_rx, &other, 1);
    let critical: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.logs WHERE level = 'critical' AND message LIKE 'subscription {sub} is broken%'"
    ));
    assert_eq!(critical, 1, "one critical entry per incident, not one per round");
    // Repaired: the waiting change is delivered and the mark goes.
    hub.exec(&format!("ALTER TABLE ihub_capture.sub_{sub} RENAME COLUMN oops TO occurred_at"));
    assert!(rx.wait_for(1, Duration::from_secs(60)), "the waiting change was not delivered after the repair");
    assert!(hub.wait_true(&format!("SELECT broken IS NULL FROM ihub.subscriptions WHERE id = {sub}"), WAIT));
}

#[test]
fn adding_dropping_renaming_and_retyping_columns_keeps_capture_working() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/ddl"), "");
    // Each change comes after a change captured and not yet sent (same
    // transaction): the ALTER must deliver it, not lose it.
    hub.exec(&format!(
        "SELECT ihub.subscribe('{t}', '{e}', events => '{{insert}}');
         -- A second subscription: each ALTER remakes two capture tables.
         SELECT ihub.subscribe('{t}', '{e}', events => '{{update}}');
         BEGIN;
         INSERT INTO {t} (customer, amount) VALUES ('before', 1);
         ALTER TABLE {t} ADD COLUMN region text DEFAULT 'eu';
         INSERT INTO {t} (customer, amount) VALUES ('added', 2);
         ALTER TABLE {t} DROP COLUMN note;
         INSERT INTO {t} (customer, amount) VALUES ('dropped', 3);
         ALTER TABLE {t} RENAME COLUMN customer TO client;
         INSERT INTO {t} (client, amount) VALUES ('renamed', 4);
         ALTER TABLE {t} ALTER COLUMN amount TYPE numeric(14,2);
         INSERT INTO {t} (client, amount) VALUES ('retyped', 5);
         COMMIT;",
        t = s.table,
        e = s.endpoint
    ));
    assert!(rx.wait_for(5, WAIT), "got {}", rx.count());
    assert_eq!(hub.wait_settled(&s.endpoint, 5, WAIT), vec!["done"; 5]);
    let all: Vec<serde_json::Value> = rx.received().iter().map(|r| r.json()["data"].clone()).collect();
    let by = |name: &str| {
        all.iter()
            .find(|d| d["customer"] == name || d["client"] == name)
            .unwrap_or_else(|| panic!("{name}: {all:?}"))
            .clone()
    };
    assert!(by("before").get("region").is_none());
    assert_eq!(by("added")["region"], "eu");
    assert!(by("dropped").get("note").is_none());
    assert_eq!(by("renamed")["client"], "renamed");
    assert_eq!(by("retyped")["amount"].as_f64(), Some(5.0));
}

/// The events the receiver got, as `type data.id data.note`, sorted.
fn events(rx: &Receiver) -> Vec<String> {
    let mut got: Vec<String> = rx
        .received()
        .iter()
        .map(|r| {
            let j = r.json();
            format!("{} {} {}", j["type"].as_str().unwrap_or("?"), j["data"]["id"], j["data"]["note"])
        })
        .collect();
    got.sort();
    got
}

#[test]
fn writes_to_any_partition_are_captured_including_partitions_attached_later() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/partitioned"), "");
    let t = unique("parted");
    hub.exec(&format!(
        "CREATE TABLE {t} (id int NOT NULL, region text NOT NULL, note text) PARTITION BY LIST (region);
         CREATE TABLE {t}_eu PARTITION OF {t} FOR VALUES IN ('eu');
         CREATE TABLE {t}_am PARTITION OF {t} FOR VALUES IN ('us', 'ca') PARTITION BY LIST (region);
         CREATE TABLE {t}_us PARTITION OF {t}_am FOR VALUES IN ('us');
         SELECT ihub.subscribe('{t}', '{e}');",
        e = s.endpoint
    ));
    hub.exec(&format!(
        "INSERT INTO {t} VALUES (1, 'eu', 'by the parent');
         INSERT INTO {t}_eu VALUES (2, 'eu', 'to the partition');
         INSERT INTO {t}_us VALUES (3, 'us', 'to a partition two levels down');
         UPDATE {t}_eu SET note = 'updated in the partition' WHERE id = 2;
         DELETE FROM {t}_am WHERE id = 3;"
    ));
    // Made after the subscription: by CREATE TABLE ... PARTITION OF, and by
    // ATTACH of a table whose columns lie in another order, one dropped.
    hub.exec(&format!(
        "CREATE TABLE {t}_ca PARTITION OF {t}_am FOR VALUES IN ('ca');
         CREATE TABLE {t}_asia (gone int, note text, region text NOT NULL, id int NOT NULL);
         ALTER TABLE {t}_asia DROP COLUMN gone;
         ALTER TABLE {t} ATTACH PARTITION {t}_asia FOR VALUES IN ('jp');
         INSERT INTO {t}_ca VALUES (4, 'ca', 'to a new partition');
         INSERT INTO {t}_asia (id, region, note) VALUES (5, 'jp', 'to an attached partition');"
    ));
    // A detached partition is no longer the table's: its writes are not sent.
    hub.exec(&format!(
        "ALTER TABLE {t} DETACH PARTITION {t}_eu;
         INSERT INTO {t}_eu VALUES (6, 'eu', 'after detach');"
    ));
    assert!(rx.wait_for(7, WAIT), "got {:?}", events(&rx));
    assert_eq!(hub.wait_settled(&s.endpoint, 7, WAIT), vec!["done"; 7]);
    assert_eq!(
        events(&rx),
        vec![
            format!("{t}.delete 3 \"to a partition two levels down\""),
            format!("{t}.insert 1 \"by the parent\""),
            format!("{t}.insert 2 \"to the partition\""),
            format!("{t}.insert 3 \"to a partition two levels down\""),
            format!("{t}.insert 4 \"to a new partition\""),
            format!("{t}.insert 5 \"to an attached partition\""),
            format!("{t}.update 2 \"updated in the partition\""),
        ]
    );
    let attached = rx.received().into_iter().find(|r| r.json()["data"]["id"] == 5).unwrap().json();
    assert_eq!(attached["table"], t.as_str(), "events name the subscribed table");
    assert_eq!(attached["data"], serde_json::json!({"id": 5, "region": "jp", "note": "to an attached partition"}));
    let left: i64 = hub.one(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{t}_eu'::regclass"));
    assert_eq!(left, 0, "the detached partition keeps no capture trigger");
}

#[test]
fn truncate_is_sent_as_an_event_to_subscriptions_that_ask() {
    let mut hub = hub();
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/truncated"), "");
    let quiet = Receiver::start();
    let q = hub.setup(&quiet.url("/quiet"), "");
    let t = unique("parted");
    hub.exec(&format!(
        "CREATE TABLE {t} (id int NOT NULL, region text NOT NULL, note text) PARTITION BY LIST (region);
         CREATE TABLE {t}_eu PARTITION OF {t} FOR VALUES IN ('eu');
         CREATE TABLE {t}_us PARTITION OF {t} FOR VALUES IN ('us');
         SELECT ihub.subscribe('{t}', '{e}', events => '{{insert,truncate}}');
         SELECT ihub.subscribe('{t}', '{qe}', events => '{{delete}}');
         SELECT ihub.subscribe('{plain}', '{e}', events => '{{truncate}}');
         INSERT INTO {t} VALUES (1, 'eu', 'one'), (2, 'us', 'two');",
        e = s.endpoint,
        qe = q.endpoint,
        plain = s.table
    ));
    assert!(rx.wait_for(2, WAIT));
    // One event per TRUNCATE statement: of the table, of one partition, and
    // of a plain table; none for the subscription that did not ask.
    hub.exec(&format!("TRUNCATE {t}"));
    assert!(rx.wait_for(3, WAIT), "no event for TRUNCATE of the partitioned table: {:?}", events(&rx));
    hub.exec(&format!("TRUNCATE {t}_us"));
    assert!(rx.wait_for(4, WAIT), "no event for TRUNCATE of a partition: {:?}", events(&rx));
    hub.exec(&format!("TRUNCATE {}", s.table));
    assert!(rx.wait_for(5, WAIT));
    assert_eq!(hub.wait_settled(&s.endpoint, 5, WAIT), vec!["done"; 5]);
    let truncates: Vec<serde_json::Value> =
        rx.received().iter().map(|r| r.json()).filter(|j| j["operation"] == "truncate").collect();
    assert_eq!(truncates.len(), 3, "{truncates:?}");
    assert_eq!(truncates[0]["type"], format!("{t}.truncate"));
    assert_eq!(truncates[0]["data"], serde_json::Value::Null);
    assert_eq!(truncates[2]["type"], format!("{}.truncate", s.table));
    assert_eq!(quiet.count(), 0);
    let bad =
        hub.error(&format!("SELECT ihub.subscribe('{t}', '{e}', events => '{{truncate,upsert}}')", e = s.endpoint));
    assert!(bad.contains("invalid events: upsert") && bad.contains("truncate"), "{bad}");
}
