//! Background jobs, scheduled actions, cronwatch and integration dates
//! against a real cluster with real job workers and a real scheduler. Each
//! test makes its own functions and tables, so the tests run side by side.

use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use pg_ihub_e2e::*;

const WAIT: Duration = Duration::from_secs(20);

/// A table `<p>_effects` and job functions writing to it:
/// `<p>_note(args)` notes args->>'note' (with the role it ran as), and
/// `<p>_fail(args)` notes an attempt and fails (so the note rolls back).
fn job_kit(hub: &mut Hub) -> String {
    let p = unique("j");
    hub.exec(&format!(
        "CREATE TABLE {p}_effects (id serial, note text, role name DEFAULT current_user, at timestamptz DEFAULT clock_timestamp());
         CREATE FUNCTION {p}_note(args jsonb) RETURNS jsonb LANGUAGE sql AS $$
             INSERT INTO {p}_effects (note) VALUES (args->>'note') RETURNING jsonb_build_object('id', id) $$;
         CREATE FUNCTION {p}_fail(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_effects (note) VALUES ('attempt');
             RAISE EXCEPTION 'not yet';
         END $$;"
    ));
    p
}

fn job_state(hub: &mut Hub, id: i64) -> String {
    hub.one(&format!("SELECT state FROM ihub.jobs WHERE id = {id}"))
}

fn wait_job(hub: &mut Hub, id: i64, state: &str) {
    let ok = hub.wait_true(&format!("SELECT state = '{state}' FROM ihub.jobs WHERE id = {id}"), WAIT);
    let now = job_state(hub, id);
    assert!(ok, "job {id} is {now}, not {state}");
}

#[test]
fn a_job_runs_as_the_role_that_queued_it() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let role = unique("jobrole");
    hub.exec(&format!(
        "CREATE ROLE {role} NOLOGIN IN ROLE ihub_developer;
         GRANT ALL ON {p}_effects TO {role}; GRANT ALL ON SEQUENCE {p}_effects_id_seq TO {role};
         SET ROLE {role};"
    ));
    let id: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}_note(jsonb)', '{{\"note\": \"hello\"}}')"));
    hub.exec("RESET ROLE");
    wait_job(&mut hub, id, "done");
    let (note, ran_as): (String, String) = {
        let r = hub.db.query_one(&format!("SELECT note, role::text FROM {p}_effects"), &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((note.as_str(), ran_as.as_str()), ("hello", role.as_str()));
    let result: String = hub.one(&format!("SELECT result::text FROM ihub.jobs WHERE id = {id}"));
    assert!(result.starts_with("{\"id\":"), "{result}");
}

/// Job workers run due jobs of one role in one transaction (issue 11), each
/// in a subtransaction: a failing job is rolled back and recorded alone, a
/// job's settings end with it, other roles' jobs never share the
/// transaction, and a batch that cannot commit (a deferred trigger refuses)
/// runs again job by job so that only the guilty job fails.
#[test]
fn jobs_of_one_role_share_a_transaction_and_each_failure_is_its_own() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let (r1, r2) = (unique("batchrole"), unique("batchrole"));
    hub.exec(&format!(
        "CREATE FUNCTION {p}_tx(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_effects (note) VALUES (
                 format('%s|%s|%s', args->>'note', txid_current(), current_setting('search_path')));
             PERFORM set_config('search_path', 'leaked', false);
         END $$;
         CREATE TABLE {p}_deferred (v int);
         CREATE FUNCTION {p}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.v < 0 THEN RAISE EXCEPTION 'negative % refused at commit', NEW.v; END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER {p}_refuse AFTER INSERT ON {p}_deferred DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION {p}_refuse();
         CREATE FUNCTION {p}_defer(args jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO {p}_deferred VALUES ((args->>'v')::int) $$;
         CREATE ROLE {r1} NOLOGIN IN ROLE ihub_developer;
         CREATE ROLE {r2} NOLOGIN IN ROLE ihub_developer;
         GRANT ALL ON {p}_effects, {p}_deferred TO {r1}, {r2};
         GRANT ALL ON SEQUENCE {p}_effects_id_seq TO {r1}, {r2};"
    ));
    // All queued in one transaction: due together, r1's first.
    hub.exec(&format!(
        "BEGIN;
         SET LOCAL ROLE {r1};
         SELECT ihub.enqueue('{p}_tx(jsonb)', '{{\"note\": \"a\"}}');
         SELECT ihub.enqueue('{p}_tx(jsonb)', '{{\"note\": \"b\"}}');
         SELECT ihub.enqueue('{p}_fail(jsonb)', max_attempts => 1);
         SELECT ihub.enqueue('{p}_tx(jsonb)', '{{\"note\": \"c\"}}');
         SET LOCAL ROLE {r2};
         SELECT ihub.enqueue('{p}_tx(jsonb)', '{{\"note\": \"d\"}}');
         SELECT ihub.enqueue('{p}_tx(jsonb)', '{{\"note\": \"e\"}}');
         COMMIT;"
    ));
    let finished = format!(
        "SELECT count(*) = 0 FROM ihub.jobs WHERE function::text LIKE '{p}%' AND state NOT IN ('done', 'failed')"
    );
    assert!(hub.wait_true(&finished, WAIT), "jobs still open");
    let notes: Vec<(String, String, String, String)> = hub
        .db
        .query(&format!("SELECT note, role::text FROM {p}_effects ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| {
            let note: String = r.get(0);
            let parts: Vec<&str> = note.split('|').collect();
            (parts[0].to_string(), parts[1].to_string(), parts[2].to_string(), r.get(1))
        })
        .collect();
    let names: Vec<&str> = notes.iter().map(|n| n.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    // The failed job's insert was rolled back with it, and only with it.
    assert_eq!(sorted, ["a", "b", "c", "d", "e"], "{notes:?}");
    let failed: String =
        hub.one(&format!("SELECT state || ': ' || last_error FROM ihub.jobs WHERE function::text LIKE '{p}_fail%'"));
    assert_eq!(failed, "failed: not yet");
    for (note, _, search_path, role) in &notes {
        assert_ne!(search_path, "leaked", "job {note} saw the setting an earlier job made");
        let expected = if ["a", "b", "c"].contains(&note.as_str()) { &r1 } else { &r2 };
        assert_eq!(role, expected, "job {note}");
    }
    let txid = |n: &str| notes.iter().find(|x| x.0 == n).map(|x| x.1.clone()).unwrap();
    let r1_txids: std::collections::HashSet<String> = ["a", "b", "c"].iter().map(|n| txid(n)).collect();
    assert!(r1_txids.len() < 3, "r1's three jobs ran in three transactions: {notes:?}");
    assert!(!r1_txids.contains(&txid("d")) && !r1_txids.contains(&txid("e")), "roles shared a transaction: {notes:?}");

    // A deferred trigger refuses one job's row at commit: that job fails
    // alone, the others' work is kept.
    hub.exec(&format!(
        "BEGIN;
         SET LOCAL ROLE {r1};
         SELECT ihub.enqueue('{p}_defer(jsonb)', '{{\"v\": 1}}');
         SELECT ihub.enqueue('{p}_defer(jsonb)', '{{\"v\": -1}}', max_attempts => 1);
         SELECT ihub.enqueue('{p}_defer(jsonb)', '{{\"v\": 2}}');
         COMMIT;"
    ));
    assert!(hub.wait_true(&finished, WAIT), "jobs still open");
    let kept: String = hub.one(&format!("SELECT string_agg(v::text, ',' ORDER BY v) FROM {p}_deferred"));
    assert_eq!(kept, "1,2");
    let refused: String = hub.one(&format!(
        "SELECT state || ': ' || last_error FROM ihub.jobs WHERE function::text LIKE '{p}_defer%' AND args->>'v' = '-1'"
    ));
    assert_eq!(refused, "failed: negative -1 refused at commit");
}

#[test]
fn higher_priority_jobs_start_first() {
    let mut hub = hub();
    let p = unique("prio");
    let lock = rand::random::<u32>() as i64;
    hub.exec(&format!(
        "CREATE TABLE {p}_order (n serial, priority int);
         CREATE FUNCTION {p}_take(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_advisory_xact_lock({lock});
             INSERT INTO {p}_order (priority) VALUES ((args->>'priority')::int);
         END $$;"
    ));
    // Hold the lock so that the first jobs claimed wait, while the rest queue.
    let cluster = Cluster::from_env();
    let mut holder = cluster.connect();
    holder.batch_execute(&format!("SELECT pg_advisory_lock({lock})")).unwrap();
    // Queued lowest priority first, in one transaction: all due together.
    let mut tx = hub.db.transaction().unwrap();
    for priority in [9, 8, 7, 6, 5, 4, 3, 2, 1, 0] {
        tx.execute(
            &format!(
                "SELECT ihub.enqueue('{p}_take(jsonb)', jsonb_build_object('priority', $1::int), priority => $1::int)"
            ),
            &[&priority],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    holder.batch_execute(&format!("SELECT pg_advisory_unlock({lock})")).unwrap();
    assert!(hub.wait_true(&format!("SELECT count(*) = 10 FROM {p}_order"), WAIT));
    let order: Vec<i32> = hub
        .db
        .query(&format!("SELECT priority FROM {p}_order ORDER BY n"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Two job workers take jobs side by side: each job starts at most one
    // place away from its priority rank.
    for (position, priority) in order.iter().enumerate() {
        assert!((position as i32 - priority).abs() <= 1, "start order {order:?}");
    }
}

#[test]
fn concurrent_enqueues_with_one_identity_key_make_one_job() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let key = unique("key");
    let cluster = Cluster::from_env();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let cluster = cluster.clone();
            let (p, key) = (p.clone(), key.clone());
            std::thread::spawn(move || {
                let mut c = cluster.connect();
                let mut tx = c.transaction().unwrap();
                let id: i64 = tx
                    .query_one(
                        &format!("SELECT ihub.enqueue('{p}_note(jsonb)', run_at => now() + interval '1 hour', identity_key => $1)"),
                        &[&key],
                    )
                    .unwrap()
                    .get(0);
                std::thread::sleep(Duration::from_millis(200));
                tx.commit().unwrap();
                id
            })
        })
        .collect();
    let ids: Vec<i64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let count: i64 = hub.one(&format!("SELECT count(*) FROM ihub.job WHERE identity_key = '{key}'"));
    assert_eq!(count, 1);
}

#[test]
fn retry_later_follows_the_schedule_or_its_own_delay() {
    let mut hub = hub();
    let p = unique("later");
    hub.exec(&format!(
        "CREATE FUNCTION {p}_flaky(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF (SELECT attempts FROM ihub.job WHERE id = ihub._current_job()) < 3 THEN
                 IF args ? 'after' THEN
                     PERFORM ihub.retry_later('not ready', (args->>'after')::interval);
                 END IF;
                 PERFORM ihub.retry_later('not ready');
             END IF;
         END $$;"
    ));
    // Retried per its schedule: 0.3 s, then 0.6 s.
    let scheduled: i64 =
        hub.one(&format!("SELECT ihub.enqueue('{p}_flaky(jsonb)', retry_schedule => '{{0.3 s, 0.6 s}}')"));
    // Retried after the delay it asked for, whatever its schedule says.
    let asked: i64 = hub.one(&format!(
        "SELECT ihub.enqueue('{p}_flaky(jsonb)', '{{\"after\": \"0.2 s\"}}', retry_schedule => '{{1 hour}}')"
    ));
    for id in [scheduled, asked] {
        wait_job(&mut hub, id, "done");
    }
    let attempts: i32 = hub.one(&format!("SELECT attempts FROM ihub.jobs WHERE id = {scheduled}"));
    assert_eq!(attempts, 3);
    let spent: f64 = hub.one(&format!(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM ihub.job WHERE id = {scheduled}"
    ));
    assert!(spent >= 0.9, "two retries of 0.3 s and 0.6 s took {spent} s");
    let asked_spent: f64 = hub
        .one(&format!("SELECT extract(epoch FROM finished_at - created_at)::float8 FROM ihub.job WHERE id = {asked}"));
    assert!((0.4..60.0).contains(&asked_spent), "retry_later(after) wins over a 1-hour schedule: {asked_spent} s");
}

#[test]
fn failing_jobs_give_up_after_max_attempts_and_can_be_retried() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let id: i64 =
        hub.one(&format!("SELECT ihub.enqueue('{p}_fail(jsonb)', max_attempts => 2, retry_schedule => '{{0.1 s}}')"));
    wait_job(&mut hub, id, "failed");
    let (attempts, error): (i32, String) = {
        let r = hub.db.query_one(&format!("SELECT attempts, last_error FROM ihub.jobs WHERE id = {id}"), &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((attempts, error.as_str()), (2, "not yet"));
    // Failed attempts leave no effects behind: each ran in its own transaction.
    let effects: i64 = hub.one(&format!("SELECT count(*) FROM {p}_effects"));
    assert_eq!(effects, 0);
    hub.exec(&format!("SELECT ihub.retry_job({id})"));
    assert!(hub.wait_true(&format!("SELECT attempts = 4 AND state = 'failed' FROM ihub.jobs WHERE id = {id}"), WAIT));
}

#[test]
fn a_job_over_its_timeout_is_stopped_and_a_running_job_can_be_cancelled() {
    let mut hub = hub();
    let p = unique("slow");
    hub.exec(&format!("CREATE FUNCTION {p}(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT pg_sleep(30) $$;"));
    let timed: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}(jsonb)', max_attempts => 1, timeout => '300 ms')"));
    wait_job(&mut hub, timed, "failed");
    let error: String = hub.one(&format!("SELECT last_error FROM ihub.jobs WHERE id = {timed}"));
    assert!(error.contains("longer than its timeout"), "{error}");

    let running: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}(jsonb)')"));
    wait_job(&mut hub, running, "running");
    let answer: String = hub.one(&format!("SELECT ihub.cancel_job({running})"));
    assert_eq!(answer, "cancelling");
    wait_job(&mut hub, running, "cancelled");
}

#[test]
fn a_job_whose_function_was_dropped_fails_naming_it_and_frees_its_identity_key() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    hub.exec(&format!("CREATE FUNCTION {p}_gone(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;"));
    // Queued and dropped in one transaction: the function is gone before
    // any worker sees the job.
    let key = format!("{p}-key");
    let id: i64 = {
        let mut tx = hub.db.transaction().unwrap();
        let id = tx
            .query_one(&format!("SELECT ihub.enqueue('{p}_gone(jsonb)', identity_key => '{key}')"), &[])
            .unwrap()
            .get(0);
        tx.batch_execute(&format!("DROP FUNCTION {p}_gone(jsonb)")).unwrap();
        tx.commit().unwrap();
        id
    };
    wait_job(&mut hub, id, "failed");
    let error: String = hub.one(&format!("SELECT last_error FROM ihub.jobs WHERE id = {id}"));
    assert!(error.contains(&format!("{p}_gone(jsonb)")), "the error names the function: {error}");
    let logged: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.logs WHERE level = 'error' AND message LIKE 'job {id} %' AND message LIKE '%{p}_gone(jsonb)%'"
    ));
    assert_eq!(logged, 1);
    // Its identity key is free again: the next job with it is a new one, and runs.
    let next: i64 =
        hub.one(&format!("SELECT ihub.enqueue('{p}_note(jsonb)', '{{\"note\": \"after\"}}', identity_key => '{key}')"));
    assert_ne!(next, id);
    wait_job(&mut hub, next, "done");
}

#[test]
fn progress_of_a_failed_job_is_not_carried_into_the_next() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    hub.exec(&format!(
        "CREATE FUNCTION {p}_half(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM ihub.job_progress(5, 10);
             RAISE EXCEPTION 'gave up halfway';
         END $$;"
    ));
    // Wake-ups take turns among idle workers: of the next jobs, one at a
    // time, some land on the worker that ran the failed one.
    for _ in 0..3 {
        let half: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}_half(jsonb)', max_attempts => 1)"));
        wait_job(&mut hub, half, "failed");
        for _ in 0..3 {
            let next: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}_note(jsonb)', '{{\"note\": \"n\"}}')"));
            wait_job(&mut hub, next, "done");
            let progress: Option<i64> = hub.one(&format!("SELECT progress_done FROM ihub.job WHERE id = {next}"));
            assert_eq!(progress, None, "job {next} got the progress of job {half}");
        }
    }
}

#[test]
fn errors_logged_make_a_job_partial_and_progress_shows_while_it_runs() {
    let mut hub = hub();
    let p = unique("prog");
    hub.exec(&format!(
        "CREATE FUNCTION {p}(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM ihub.job_progress(3, 10);
             PERFORM pg_sleep(1.5);
             PERFORM ihub.job_progress(10, 10);
             PERFORM ihub.log('error', 'row 7 could not be imported', '{{\"row\": 7, \"api_key\": \"k-secret\"}}');
         END $$;"
    ));
    let id: i64 = hub.one(&format!("SELECT ihub.enqueue('{p}(jsonb)')"));
    assert!(
        hub.wait_true(
            &format!(
                "SELECT progress_done = 3 AND progress_total = 10 AND state = 'running' FROM ihub.jobs WHERE id = {id}"
            ),
            WAIT
        ),
        "progress is visible while the job runs"
    );
    wait_job(&mut hub, id, "partial");
    let (percent, details): (f64, String) = {
        let r = hub
            .db
            .query_one(
                &format!(
                    "SELECT j.progress_percent::float8, l.details::text FROM ihub.jobs j JOIN ihub.logs l ON l.job = j.id WHERE j.id = {id}"
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(percent, 100.0);
    assert!(!details.contains("k-secret") && details.contains("\"row\": 7"), "{details}");
}

#[test]
fn integration_dates_advance_with_the_data_or_not_at_all() {
    let mut hub = hub();
    let p = unique("dates");
    let integration = unique("crm");
    hub.exec(&format!(
        "SELECT ihub.create_integration('{integration}');
         CREATE TABLE {p}_imported (id int);
         CREATE FUNCTION {p}_import(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_imported VALUES ((args->>'batch')::int);
             PERFORM ihub.set_date('{integration}', 'last_import', (args->>'until')::timestamptz);
             IF args ? 'crash' THEN
                 RAISE EXCEPTION 'the API went away';
             END IF;
         END $$;"
    ));
    let failed: i64 = hub.one(&format!(
        "SELECT ihub.enqueue('{p}_import(jsonb)', '{{\"batch\": 1, \"until\": \"2026-02-01\", \"crash\": true}}', max_attempts => 1)"
    ));
    wait_job(&mut hub, failed, "failed");
    let (rows, date): (i64, Option<String>) = {
        let r = hub
            .db
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {p}_imported), ihub.get_date('{integration}', 'last_import')::text"
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, date), (0, None), "neither the data nor the date moved");

    let ok: i64 = hub.one(&format!(
        "SELECT ihub.enqueue('{p}_import(jsonb)', '{{\"batch\": 2, \"until\": \"2026-03-01 00:00+00\"}}', integration => '{integration}')"
    ));
    wait_job(&mut hub, ok, "done");
    let moved: bool =
        hub.one(&format!("SELECT ihub.get_date('{integration}', 'last_import') = '2026-03-01 00:00+00' AND count(*) = 1 FROM {p}_imported"));
    assert!(moved);
    // Set by a job: not a hand edit.
    let hand_edits: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.integration_dates WHERE integration = '{integration}' AND warning IS NOT NULL"
    ));
    assert_eq!(hand_edits, 0);
}

#[test]
fn schedules_fire_at_their_interval_and_stop_after_their_number_of_calls() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let name = unique("every");
    let started = Instant::now();
    hub.exec(&format!(
        "SELECT ihub.schedule('{name}', '{p}_note(jsonb)', every => '0.5 seconds', args => '{{\"note\": \"tick\"}}', number_of_calls => 3)"
    ));
    assert!(hub.wait_true(&format!("SELECT count(*) = 3 FROM {p}_effects"), WAIT));
    assert!(started.elapsed() >= Duration::from_millis(1400), "three runs half a second apart");
    assert!(hub.wait_true(
        &format!("SELECT NOT active AND number_of_calls = 0 FROM ihub.schedules WHERE name = '{name}'"),
        WAIT
    ));
    std::thread::sleep(Duration::from_millis(800));
    let runs: i64 = hub.one(&format!("SELECT count(*) FROM {p}_effects"));
    assert_eq!(runs, 3, "no fourth run");
    let outcome: String = hub.one(&format!("SELECT last_outcome FROM ihub.schedules WHERE name = '{name}'"));
    assert_eq!(outcome, "done");
}

#[test]
fn a_cron_schedule_runs_when_due_and_moves_to_its_next_time() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let name = unique("cron");
    // Once a year, at a time this test never meets: only the run brought
    // forward below can happen while it waits.
    hub.exec(&format!(
        "SELECT ihub.schedule('{name}', '{p}_note(jsonb)', cron => '7 3 1 1 *', args => '{{\"note\": \"cron\"}}')"
    ));
    // Bring the due time forward instead of waiting for it.
    hub.exec(&format!("UPDATE ihub.schedule SET next_run_at = now() WHERE name = '{name}'"));
    hub.exec(&format!("SELECT ihub.alter_schedule('{name}', priority => 5)"));
    assert!(hub.wait_true(&format!("SELECT count(*) >= 1 FROM {p}_effects"), WAIT));
    let aligned: bool = hub.one(&format!(
        "SELECT next_run_at > now() AND next_run_at < now() + interval '367 days'
                AND to_char(next_run_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI:SS') = '01-01 03:07:00'
         FROM ihub.schedules WHERE name = '{name}'"
    ));
    assert!(aligned, "the next run is the next 1 January, 03:07 UTC");
    let runs: i64 = hub.one(&format!("SELECT count(*) FROM {p}_effects"));
    assert_eq!(runs, 1, "the run brought forward is queued once");
}

/// Collects notifications on `channel` for `within`.
fn notifications(db: &mut postgres::Client, within: Duration) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut n = db.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(100));
        while let Ok(Some(note)) = it.next() {
            got.push(serde_json::from_str(note.payload()).unwrap());
        }
    }
    got
}

#[test]
fn cronwatch_alerts_once_per_incident_and_resets() {
    let mut hub = hub();
    let p = job_kit(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/alerts"), "");
    rx.expect_secret(&s.secret);
    let name = unique("watched");
    let channel = unique("cw");
    hub.exec(&format!(
        "SELECT ihub.schedule('{name}', '{p}_note(jsonb)', every => '1 second');
         SELECT ihub.watch('{name}', notify_endpoint => '{e}', channel => '{channel}', grace => '1 second');
         LISTEN {channel};",
        e = s.endpoint
    ));
    // Deactivated: one alert, however long it stays off.
    hub.exec(&format!("SELECT ihub.alter_schedule('{name}', active => false)"));
    let got = notifications(&mut hub.db, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0]["event"].as_str(), got[0]["problem"].as_str()), (Some("alert"), Some("deactivated")));
    // Back on: it resets.
    hub.exec(&format!("SELECT ihub.alter_schedule('{name}', active => true)"));
    let got = notifications(&mut hub.db, Duration::from_secs(3));
    assert_eq!(got.iter().filter(|n| n["event"] == "recovered").count(), 1, "{got:?}");
    let status: String = hub.one(&format!("SELECT status FROM ihub.cronwatch WHERE target = '{name}'"));
    assert_eq!(status, "ok");
    // Deleted: one more alert.
    hub.exec(&format!("SELECT ihub.unschedule('{name}')"));
    let got = notifications(&mut hub.db, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["problem"], "deleted");
    // Each alert was also a critical log entry and a signed request.
    let critical: i64 = hub.one(&format!(
        "SELECT count(*) FROM ihub.logs WHERE level = 'critical' AND message LIKE 'cronwatch: {name} %'"
    ));
    assert_eq!(critical, 2);
    assert!(rx.wait_for(3, WAIT), "alerts and the recovery reach the notify endpoint");
    let kinds: Vec<String> = rx.received().iter().map(|r| r.json()["event"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, vec!["alert", "recovered", "alert"]);
    assert!(rx.received().iter().all(|r| r.signature_valid == Some(true)));
}
