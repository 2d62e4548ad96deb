//! The security model, tried end to end as non-superuser roles against a
//! real cluster: a developer (`ihub_developer`), a second developer, a viewer
//! (`ihub_viewer`), an application role that only writes rows, and an admin
//! (`ihub_admin`), each logging in as itself. Every path that runs user code
//! records who it ran as (current_user, session_user, superuser or not)
//! from inside; the tests assert that nothing ran as a superuser or as
//! another role, that nothing could be forged, and that no secret is
//! readable by a viewer or developer.

use std::time::Duration;

use pg_ihub_e2e::*;
use postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

/// Roles of one test, and a table where user code records who it ran as.
struct Roles {
    p: String,
    dev: String,
    dev2: String,
    viewer: String,
    app: String,
    admin: String,
}

/// Creates the roles and, owned by the developer, `<p>_ident` (open to
/// everyone for inserts) and `<p>_who(what)`, which records the identity it
/// runs with and returns true; `<p>_who_job(args)` does the same as a job.
fn roles(hub: &mut Hub) -> Roles {
    let p = unique("sec");
    let r = Roles {
        dev: format!("{p}_dev"),
        dev2: format!("{p}_dev2"),
        viewer: format!("{p}_viewer"),
        app: format!("{p}_app"),
        admin: format!("{p}_admin"),
        p,
    };
    hub.exec(&format!(
        // One test at a time: concurrent GRANTs on one schema collide.
        "BEGIN; SELECT pg_advisory_xact_lock(84708470);
         CREATE ROLE {dev} LOGIN IN ROLE ihub_developer;
         CREATE ROLE {dev2} LOGIN IN ROLE ihub_developer;
         CREATE ROLE {viewer} LOGIN IN ROLE ihub_viewer;
         CREATE ROLE {app} LOGIN;
         CREATE ROLE {admin} LOGIN IN ROLE ihub_admin;
         GRANT CREATE ON SCHEMA public TO {dev}, {dev2}, {app};
         COMMIT;",
        dev = r.dev,
        dev2 = r.dev2,
        viewer = r.viewer,
        app = r.app,
        admin = r.admin
    ));
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE TABLE {p}_ident (id serial, what text, cur name, sess name, super boolean);
         GRANT INSERT, SELECT ON {p}_ident TO PUBLIC; GRANT USAGE ON SEQUENCE {p}_ident_id_seq TO PUBLIC;
         CREATE FUNCTION {p}_who(what text) RETURNS boolean LANGUAGE sql AS $$
             INSERT INTO public.{p}_ident (what, cur, sess, super)
             SELECT what, current_user, session_user, rolsuper FROM pg_roles WHERE rolname = current_user
             RETURNING true $$;
         CREATE FUNCTION {p}_who_job(args jsonb) RETURNS boolean LANGUAGE sql AS $$
             SELECT public.{p}_who(args->>'what') $$;
         GRANT EXECUTE ON FUNCTION {p}_who(text), {p}_who_job(jsonb) TO PUBLIC;",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    r
}

impl Roles {
    fn connect(&self, role: &str) -> Client {
        let cluster = Cluster::from_env();
        cluster.connect_as(role, &cluster.dbname)
    }

    /// (what, current_user, session_user, superuser) rows recorded for `what`.
    fn idents(&self, hub: &mut Hub, what: &str) -> Vec<(String, String, bool)> {
        hub.db
            .query(
                &format!("SELECT cur::text, sess::text, super FROM {}_ident WHERE what = $1 ORDER BY id", self.p),
                &[&what],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    fn wait_ident(&self, hub: &mut Hub, what: &str) -> Vec<(String, String, bool)> {
        let ok = hub.wait_true(&format!("SELECT count(*) > 0 FROM {}_ident WHERE what = '{what}'", self.p), WAIT);
        assert!(ok, "nothing recorded for {what}");
        self.idents(hub, what)
    }

    /// Asserts that everything recorded for `what` ran as `role`, with
    /// `role` as session user too, and never as a superuser.
    fn assert_ran_as(&self, hub: &mut Hub, what: &str, role: &str) {
        for (cur, sess, sup) in self.wait_ident(hub, what) {
            assert_eq!((cur.as_str(), sess.as_str(), sup), (role, role, false), "{what} ran as someone else");
        }
    }
}

fn is_superuser(hub: &mut Hub, role: &str) -> bool {
    hub.one(&format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'"))
}

#[test]
fn a_job_and_everything_it_queues_run_as_the_developer_and_cannot_switch_roles() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let integration = unique("it");
    hub.exec(&format!("SELECT ihub.create_integration('{integration}')"));
    let mut dev = r.connect(&r.dev);
    // Each escape attempt is made in its own block and recorded only if it
    // worked; then the job queues another job and a schedule, and records
    // who it is.
    dev.batch_execute(&format!(
        "CREATE FUNCTION {p}_escape(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             BEGIN EXECUTE 'ALTER ROLE {dev} SUPERUSER'; PERFORM {p}_who('escaped: alter role'); EXCEPTION WHEN OTHERS THEN END;
             BEGIN SET ROLE postgres; PERFORM {p}_who('escaped: set role'); EXCEPTION WHEN OTHERS THEN END;
             BEGIN RESET ROLE; PERFORM {p}_who('escaped: reset role'); EXCEPTION WHEN OTHERS THEN END;
             BEGIN SET SESSION AUTHORIZATION postgres; PERFORM {p}_who('escaped: session authorization'); EXCEPTION WHEN OTHERS THEN END;
             BEGIN PERFORM set_config('role', 'postgres', true); PERFORM {p}_who('escaped: set_config'); EXCEPTION WHEN OTHERS THEN END;
             BEGIN RESET SESSION AUTHORIZATION; PERFORM {p}_who('escaped: reset session authorization'); EXCEPTION WHEN OTHERS THEN END;
             PERFORM {p}_who('job');
             PERFORM ihub.enqueue('{p}_who_job(jsonb)', '{{\"what\": \"queued by job\"}}');
             PERFORM ihub.schedule('{p}_sched', '{p}_who_job(jsonb)', every => '1 hour', args => '{{\"what\": \"scheduled by job\"}}',
                                   active => false);
         END $$;
         SELECT ihub.enqueue('{p}_escape(jsonb)', integration => '{integration}');",
        p = r.p,
        dev = r.dev
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));

    r.assert_ran_as(&mut hub, "job", &r.dev);
    r.assert_ran_as(&mut hub, "queued by job", &r.dev);
    let escaped: i64 = hub.one(&format!("SELECT count(*) FROM {}_ident WHERE what LIKE 'escaped%'", r.p));
    assert_eq!(escaped, 0, "a role switch worked inside a job: {:?}", r.idents(&mut hub, "escaped: set role"));
    assert!(!is_superuser(&mut hub, &r.dev));
    let runs_as: Vec<String> = hub
        .db
        .query(&format!("SELECT run_as::text FROM ihub.jobs WHERE function LIKE '{}%' ORDER BY id", r.p), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(runs_as, vec![r.dev.clone(), r.dev.clone()]);
    let schedule_role: String =
        hub.one(&format!("SELECT run_as::text FROM ihub.schedules WHERE name = '{}_sched'", r.p));
    assert_eq!(schedule_role, r.dev);
    // The scheduled action runs as the developer too.
    dev.batch_execute(&format!("SELECT ihub.run_now('{}_sched')", r.p)).unwrap();
    r.assert_ran_as(&mut hub, "scheduled by job", &r.dev);
}

#[test]
fn deferred_triggers_and_hold_cursors_of_a_job_run_as_its_role_at_commit() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE TABLE {p}_t (id int);
         CREATE FUNCTION {p}_deferred() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM {p}_who('deferred trigger'); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER {p}_late AFTER INSERT ON {p}_t DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION {p}_deferred();
         CREATE FUNCTION {p}_defer(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_t VALUES (1);
             EXECUTE 'DECLARE {p}_c CURSOR WITH HOLD FOR SELECT {p}_who(''hold cursor'') FROM generate_series(1, 2)';
         END $$;
         SELECT ihub.enqueue('{p}_defer(jsonb)');",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    r.assert_ran_as(&mut hub, "deferred trigger", &r.dev);
    r.assert_ran_as(&mut hub, "hold cursor", &r.dev);
}

#[test]
fn an_inbound_handler_queues_schedules_creates_and_subscribes_as_the_source_role() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let integration = unique("it");
    hub.exec(&format!(
        "SELECT ihub.create_integration('{integration}');
         SELECT ihub.create_endpoint('{integration}', 'ep_{p}', 'http://127.0.0.1:9/');
         SELECT ihub.enable_integration('{integration}');",
        p = r.p
    ));
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE TABLE {p}_rows (id int);
         CREATE FUNCTION {p}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM {p}_who('handler');
             PERFORM ihub.enqueue('{p}_who_job(jsonb)', '{{\"what\": \"queued by handler\"}}');
             PERFORM ihub.schedule('{p}_hs', '{p}_who_job(jsonb)', every => '1 hour', active => false);
             PERFORM ihub.create_source('{integration}', '{p}_made', '{p}_handle(ihub.inbound_items)', 'none');
             PERFORM ihub.subscribe('{p}_rows', 'ep_{p}', test_mode => true);
             RETURN '{{}}';
         END $$;
         SELECT ihub.create_source('{integration}', 'src', '{p}_handle(ihub.inbound_items)', 'none');",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let sent = http().post(listener_url(&format!("/webhooks/{integration}/src"))).body("{}").send().unwrap();
    assert_eq!(sent.status().as_u16(), 202);
    r.assert_ran_as(&mut hub, "handler", &r.dev);
    r.assert_ran_as(&mut hub, "queued by handler", &r.dev);
    let recorded: String = hub.one(&format!(
        "SELECT concat_ws(' ', (SELECT run_as::text FROM ihub.schedules WHERE name = '{p}_hs'),
                              (SELECT run_as::text FROM ihub.inbound_sources WHERE name = '{p}_made'),
                              (SELECT created_by::text FROM ihub.subscription WHERE source = '{p}_rows'::regclass))",
        p = r.p
    ));
    assert_eq!(recorded, format!("{d} {d} {d}", d = r.dev));
}

#[test]
fn a_subscription_condition_runs_as_the_subscriber_whoever_writes_the_row() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    let mut app = r.connect(&r.app);
    // The application's own table, and a table only it may read.
    app.batch_execute(&format!(
        "CREATE TABLE {p}_orders (id serial PRIMARY KEY, amount int);
         GRANT SELECT, TRIGGER ON {p}_orders TO {dev};
         CREATE TABLE {p}_app_private (secret text); INSERT INTO {p}_app_private VALUES ('app only');",
        p = r.p,
        dev = r.dev
    ))
    .unwrap();
    hub.exec(&format!("GRANT INSERT ON {p}_orders TO postgres", p = r.p));
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "SELECT ihub.subscribe('{p}_orders', '{e}', condition =>
             $c$ public.{p}_who('condition') AND ihub.enqueue('public.{p}_who_job(jsonb)', '{{\"what\": \"queued by condition\"}}') > 0 $c$);",
        p = r.p,
        e = s.endpoint
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    app.batch_execute(&format!("INSERT INTO {}_orders (amount) VALUES (1)", r.p)).unwrap();
    hub.exec(&format!("INSERT INTO {}_orders (amount) VALUES (2)", r.p));
    hub.wait_settled(&s.endpoint, 2, WAIT);
    // The condition ran as the subscriber (in the writer's session).
    for (cur, _sess, sup) in r.wait_ident(&mut hub, "condition") {
        assert_eq!((cur.as_str(), sup), (r.dev.as_str(), false));
    }
    // What it queued runs as the subscriber, not as the app or the superuser.
    let ok = hub.wait_true(&format!("SELECT count(*) = 2 FROM {}_ident WHERE what = 'queued by condition'", r.p), WAIT);
    assert!(ok);
    r.assert_ran_as(&mut hub, "queued by condition", &r.dev);

    // A condition never reads with the writer's rights.
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "SELECT ihub.subscribe('{p}_orders', '{e}', condition => $c$ EXISTS (SELECT FROM public.{p}_app_private) $c$)",
        p = r.p,
        e = s.endpoint
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let refused = error_of(&mut app, &format!("INSERT INTO {}_orders (amount) VALUES (3)", r.p));
    assert!(refused.contains("permission denied"), "{refused}");
}

#[test]
fn only_members_of_the_run_as_role_or_an_admin_act_on_schedules_and_jobs() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE FUNCTION {p}_fail(args jsonb) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$;
         SELECT ihub.schedule('{p}_s', '{p}_who_job(jsonb)', every => '1 hour', args => '{{\"what\": \"schedule\"}}', active => false);",
        p = r.p
    ))
    .unwrap();
    let failed: i64 =
        dev.query_one(&format!("SELECT ihub.enqueue('{}_fail(jsonb)', max_attempts => 1)", r.p), &[]).unwrap().get(0);
    let ok = hub.wait_true(&format!("SELECT state = 'failed' FROM ihub.jobs WHERE id = {failed}"), WAIT);
    assert!(ok);
    let queued: i64 = dev
        .query_one(&format!("SELECT ihub.enqueue('{}_who_job(jsonb)', run_at => now() + interval '1 day')", r.p), &[])
        .unwrap()
        .get(0);

    let mut dev2 = r.connect(&r.dev2);
    let p = &r.p;
    for attempt in [
        format!("SELECT ihub.alter_schedule('{p}_s', args => '{{\"what\": \"hijacked\"}}')"),
        format!("SELECT ihub.run_now('{p}_s')"),
        format!("SELECT ihub.set_schedule_params('{p}_s', NULL, '{{\"what\": \"hijacked\"}}')"),
        format!("SELECT ihub.unschedule('{p}_s')"),
        format!("SELECT ihub.retry_job({failed})"),
        format!("SELECT ihub.cancel_job({queued})"),
    ] {
        let e = error_of(&mut dev2, &attempt);
        assert!(e.contains("may not act on"), "{attempt}: {e}");
    }
    assert!(r.idents(&mut hub, "hijacked").is_empty());

    // The owner and an admin may.
    dev.batch_execute(&format!("SELECT ihub.alter_schedule('{p}_s', args => '{{\"what\": \"by owner\"}}')")).unwrap();
    let mut admin = r.connect(&r.admin);
    admin
        .batch_execute(&format!(
            "SELECT ihub.run_now('{p}_s'); SELECT ihub.retry_job({failed}); SELECT ihub.cancel_job({queued});"
        ))
        .unwrap();
    r.assert_ran_as(&mut hub, "by owner", &r.dev);
    // Nor another role's subscription.
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    hub.exec(&format!("GRANT SELECT, TRIGGER ON {} TO {}", s.table, r.dev));
    let sub: i64 =
        dev.query_one(&format!("SELECT ihub.subscribe('{}', '{}')", s.table, s.endpoint), &[]).unwrap().get(0);
    let e = error_of(&mut dev2, &format!("SELECT ihub.unsubscribe({sub})"));
    assert!(e.contains("may not act on subscription"), "{e}");
    dev.batch_execute(&format!("SELECT ihub.unsubscribe({sub})")).unwrap();
    // Not on work that runs as a superuser.
    hub.exec(&format!("SELECT ihub.schedule('{p}_su', '{p}_who_job(jsonb)', every => '1 hour', active => false)"));
    let e = error_of(&mut admin, &format!("SELECT ihub.run_now('{p}_su')"));
    assert!(e.contains("may not act on"), "{e}");
    hub.exec(&format!("SELECT ihub.unschedule('{p}_su')"));
}

#[test]
fn internal_functions_tables_and_capture_tables_are_out_of_reach() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    hub.exec(&format!(
        "GRANT SELECT, TRIGGER, INSERT ON {t} TO {dev}; GRANT USAGE ON SEQUENCE {t}_id_seq TO {dev};",
        t = s.table,
        dev = r.dev
    ));
    let mut dev = r.connect(&r.dev);
    let sub: i64 = dev
        .query_one(
            &format!("SELECT ihub.subscribe('{}', '{}', condition => 'new.amount > 0')", s.table, s.endpoint),
            &[],
        )
        .unwrap()
        .get(0);
    for role in [&r.dev, &r.viewer, &r.app] {
        let definer: Option<String> = hub.one(&format!(
            "SELECT string_agg(oid::regprocedure::text, ', ') FROM pg_proc
             WHERE pronamespace = 'ihub'::regnamespace AND proname LIKE '\\_%' AND prosecdef
               AND has_function_privilege('{role}', oid, 'EXECUTE')"
        ));
        assert_eq!(definer, None, "{role} may execute internal SECURITY DEFINER functions");
        let writable: Option<String> = hub.one(&format!(
            "SELECT string_agg(c.oid::regclass::text, ', ') FROM pg_class c
             WHERE c.relnamespace IN ('ihub'::regnamespace, 'ihub_capture'::regnamespace) AND c.relkind IN ('r', 'p')
               AND has_table_privilege('{role}', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')"
        ));
        assert_eq!(writable, None, "{role} may write pg_ihub tables");
        let capture: Option<String> = hub.one(&format!(
            "SELECT string_agg(c.oid::regclass::text, ', ') FROM pg_class c
             WHERE c.relnamespace = 'ihub_capture'::regnamespace AND has_table_privilege('{role}', c.oid, 'SELECT')"
        ));
        assert_eq!(capture, None, "{role} may read capture tables");
    }
    for forged in [
        format!("INSERT INTO ihub_capture.sub_{sub} (op, xid, occurred_at) VALUES ('i', pg_current_xact_id(), now())"),
        "SELECT ihub._inbound_take(1, current_user::regrole)".to_string(),
        "SELECT ihub._inbound_settle(1, '{}', NULL)".to_string(),
        format!("SELECT ihub._enqueue_by('{}_who_job(jsonb)', p_caller => 'postgres')", r.p),
    ] {
        let e = error_of(&mut dev, &forged);
        assert!(e.contains("permission denied"), "{forged}: {e}");
    }
    // The developer's own writes are still captured, by the definer trigger.
    dev.batch_execute(&format!("INSERT INTO {} (customer, amount) VALUES ('dev', 5)", s.table)).unwrap();
    hub.wait_settled(&s.endpoint, 1, WAIT);
}

/// A developer sets an endpoint's delivery controls (alter_endpoint); a
/// viewer may not; and alter_endpoint has no way to send an endpoint's
/// payloads and credentials elsewhere (no URL, method or headers).
#[test]
fn a_developer_sets_delivery_controls_but_cannot_redirect_an_endpoint() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!("SELECT ihub.alter_endpoint('{}', circuit => 'true', timeout_ms => 3000)", s.endpoint))
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let (state, timeout): (String, i32) = {
        let row = hub
            .db
            .query_one(
                &format!("SELECT circuit_state, timeout_ms FROM ihub.endpoints WHERE name = '{}'", s.endpoint),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((state.as_str(), timeout), ("closed", 3000));
    let mut viewer = r.connect(&r.viewer);
    let e = error_of(&mut viewer, &format!("SELECT ihub.alter_endpoint('{}', circuit => 'false')", s.endpoint));
    assert!(e.contains("permission denied"), "{e}");
    let e = error_of(
        &mut dev,
        &format!("SELECT ihub.alter_endpoint('{}', url => 'https://evil.example.com/')", s.endpoint),
    );
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn reserved_request_headers_are_refused() {
    let mut hub = hub();
    let integration = unique("it");
    hub.exec(&format!(
        "SELECT ihub.create_integration('{integration}');
         SELECT ihub.create_endpoint('{integration}', 'ok_{integration}', 'http://127.0.0.1:9/');
         SELECT ihub.enable_integration('{integration}');"
    ));
    for header in ["Host", "connection", "Expect", "Transfer-Encoding", "Content-Length", "webhook-signature"] {
        let e = hub.error(&format!(
            "SELECT ihub.create_endpoint('{integration}', '{}', 'http://127.0.0.1:9/', headers => '{{\"{header}\": \"x\"}}')",
            unique("ep")
        ));
        assert!(e.to_lowercase().contains(&header.to_lowercase()), "{header}: {e}");
        let e = hub.error(&format!(
            "SELECT ihub.http_request('ok_{integration}', '{{}}', headers => '{{\"{header}\": \"x\"}}')"
        ));
        assert!(e.to_lowercase().contains(&header.to_lowercase()), "{header}: {e}");
    }
}

#[test]
fn secrets_never_reach_a_viewer_or_developer() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(
        &rx.url("/hook"),
        r#", headers => '{"X-Functions-Key": "fkey-0123456789", "Ocp-Apim-Subscription-Key": "apim-0123456789",
                          "X-Trace": {"value": "trace-visible", "secret": false}}',
            auth => '{"type": "bearer", "token": "bearer-0123456789"}'"#,
    );
    hub.subscribe_and_insert(&s, 1);
    hub.wait_settled(&s.endpoint, 1, WAIT);
    let got = &rx.received()[0];
    assert_eq!(got.header("x-functions-key"), Some("fkey-0123456789"), "the receiver gets the real value");
    let signature = got.header("webhook-signature").expect("signed").to_string();

    for role in [&r.viewer, &r.dev] {
        let mut client = r.connect(role);
        let views: Vec<String> = hub
            .db
            .query(
                &format!(
                    "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'ihub'::regnamespace
                     AND c.relkind IN ('v', 'r', 'm') AND has_table_privilege('{role}', c.oid, 'SELECT')"
                ),
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert!(views.iter().any(|v| v == "ihub.delivery_attempts"), "{views:?}");
        let mut everything = String::new();
        for view in &views {
            let rows = client.query(&format!("SELECT t::text FROM {view} t"), &[]).unwrap();
            for row in rows {
                everything.push_str(&row.get::<_, String>(0));
            }
        }
        for secret in [
            "fkey-0123456789",
            "apim-0123456789",
            "bearer-0123456789",
            s.secret.as_str(),
            signature.as_str(),
            signature.trim_start_matches("v1,"),
        ] {
            assert!(!everything.contains(secret), "{role} can read {secret}");
        }
        assert!(everything.contains("trace-visible"), "a header marked safe is shown");
    }
}

#[test]
fn targets_that_embed_private_ipv4_or_are_site_local_are_refused() {
    let mut hub = hub();
    let integration = unique("it");
    hub.exec(&format!("SELECT ihub.create_integration('{integration}')"));
    for host in [
        "[::10.0.0.1]",
        "[::ffff:10.0.0.1]",
        "[::ffff:0:a00:1]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:a00:1::1]",
        "[fec0::1]",
        "[::192.168.1.1]",
    ] {
        let e = hub
            .error(&format!("SELECT ihub.create_endpoint('{integration}', '{}', 'http://{host}/hook')", unique("ep")));
        assert!(!e.is_empty(), "{host} was accepted");
    }
}

#[test]
fn proxy_variables_in_the_server_environment_are_ignored() {
    let mut hub = hub();
    // tests/run starts the cluster with HTTP(S)_PROXY pointing at a closed port.
    // The postmaster's: backends overwrite their own environ area with the
    // process title (they keep a copy for getenv).
    let environment: String = hub.one(
        "SELECT replace(encode(pg_read_binary_file(format('/proc/%s/environ',
                split_part(pg_read_file('postmaster.pid'), E'\\n', 1))), 'escape'), '\\000', E'\\n')",
    );
    assert!(environment.lines().any(|l| l.starts_with("HTTP_PROXY=")), "the test cluster has no HTTP_PROXY set");
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    hub.subscribe_and_insert(&s, 1);
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
}

#[test]
fn healthz_tells_only_the_status_without_the_token() {
    let mut hub = hub();
    let integration = unique("it");
    // A schedule whose name must not leak.
    let p = unique("hz");
    hub.exec(&format!(
        "SELECT ihub.create_integration('{integration}');
         CREATE FUNCTION {p}_noop(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         SELECT ihub.schedule('{p}_secret_schedule', '{p}_noop(jsonb)', every => '1 hour');"
    ));
    let client = http();
    let body = client.get(listener_url("/healthz")).send().unwrap().text().unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(["ok", "warning", "critical"].contains(&json["status"].as_str().unwrap_or("")), "{body}");
    assert_eq!(json.as_object().map(|o| o.len()), Some(1), "more than the status: {body}");
    let wrong = client.get(listener_url("/healthz")).bearer_auth("not-the-token").send().unwrap().text().unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&wrong).unwrap().as_object().map(|o| o.len()), Some(1));
    let token = std::env::var("IHUB_HEALTH_TOKEN").unwrap_or_else(|_| "health-test-token".into());
    let full = client.get(listener_url("/healthz")).bearer_auth(token).send().unwrap().text().unwrap();
    let full: serde_json::Value = serde_json::from_str(&full).unwrap();
    assert!(full.as_object().map(|o| o.len()).unwrap_or(0) > 1, "the token shows the detail: {full}");
    hub.exec(&format!("SELECT ihub.unschedule('{p}_secret_schedule')"));
}

#[test]
fn settings_a_job_leaves_behind_never_reach_the_worker() {
    let mut hub = hub();
    let r = roles(&mut hub);
    hub.exec(&format!(
        "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {}', current_database()); END $$",
        r.dev
    ));
    let mut dev = r.connect(&r.dev);
    // A session-level search_path that puts the developer's schema before
    // pg_catalog: the worker's own statements (run as the superuser) must
    // never find the developer's functions through it.
    dev.batch_execute(&format!(
        "CREATE SCHEMA {p}_trap;
         GRANT USAGE ON SCHEMA {p}_trap TO PUBLIC;
         CREATE FUNCTION {p}_trap.to_regprocedure(text) RETURNS regprocedure LANGUAGE sql AS $$
             SELECT public.{p}_who('trap'); SELECT pg_catalog.to_regprocedure($1) $$;
         CREATE FUNCTION {p}_trap.pg_stat_get_dead_tuples(oid) RETURNS bigint LANGUAGE sql AS $$
             SELECT public.{p}_who('trap'); SELECT pg_catalog.pg_stat_get_dead_tuples($1) $$;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {p}_trap TO PUBLIC;
         CREATE FUNCTION {p}_set_trap(args jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM set_config('search_path', '{p}_trap, pg_catalog, public', false);
             PERFORM set_config('statement_timeout', '1ms', false);
         END $$;",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let id: i64 = dev.query_one(&format!("SELECT ihub.enqueue('{}_set_trap(jsonb)')", r.p), &[]).unwrap().get(0);
    assert!(hub.wait_true(&format!("SELECT state = 'done' FROM ihub.jobs WHERE id = {id}"), WAIT));
    // Workers loop at least every ihub.poll_interval (500 ms here).
    let trapped =
        hub.wait_true(&format!("SELECT count(*) > 0 FROM {}_ident WHERE what = 'trap'", r.p), Duration::from_secs(3));
    assert!(!trapped, "a worker ran the developer's function: {:?}", r.idents(&mut hub, "trap"));
    // And the next job of that worker runs with clean settings.
    dev.batch_execute(&format!("SELECT ihub.enqueue('{}_who_job(jsonb)', '{{\"what\": \"after\"}}')", r.p)).unwrap();
    r.assert_ran_as(&mut hub, "after", &r.dev);
}

#[test]
fn a_cast_to_json_of_a_developer_type_never_runs_as_the_dispatcher() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    let mut dev = r.connect(&r.dev);
    // to_jsonb() calls a non-built-in type's cast to json.
    dev.batch_execute(&format!(
        "CREATE TYPE {p}_mood AS ENUM ('ok');
         CREATE FUNCTION {p}_mood_json({p}_mood) RETURNS json LANGUAGE plpgsql AS $$
         BEGIN PERFORM {p}_who('cast'); RETURN '\"ok\"'; END $$;
         CREATE TABLE {p}_t (id serial PRIMARY KEY, mood {p}_mood);
         CREATE TABLE {p}_later (id serial PRIMARY KEY, moods {p}_mood[]);
         SELECT ihub.subscribe('{p}_later', '{e}');
         CREATE CAST ({p}_mood AS json) WITH FUNCTION {p}_mood_json({p}_mood);",
        p = r.p,
        e = s.endpoint
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let refused = error_of(&mut dev, &format!("SELECT ihub.subscribe('{}_t', '{}')", r.p, s.endpoint));
    assert!(refused.contains("has a cast to json"), "{refused}");
    // Subscribed before the cast was made: its changes wait, unrendered.
    dev.batch_execute(&format!("INSERT INTO {}_later (moods) VALUES ('{{ok}}')", r.p)).unwrap();
    let rendered = hub.wait_true(
        &format!("SELECT count(*) > 0 FROM ihub.deliveries WHERE endpoint = '{}'", s.endpoint),
        Duration::from_secs(3),
    );
    assert!(!rendered, "a change was rendered through the developer's cast");
    assert!(r.idents(&mut hub, "cast").is_empty(), "the cast ran: {:?}", r.idents(&mut hub, "cast"));
    let e = error_of(
        &mut dev,
        &format!("SELECT ihub.unsubscribe(id) FROM ihub.subscriptions WHERE endpoint = '{}'", s.endpoint),
    );
    assert!(e.contains("has a cast to json"), "{e}");
    // Without the cast, what waited is sent.
    dev.batch_execute(&format!("DROP CAST ({}_mood AS json)", r.p)).unwrap();
    assert_eq!(hub.wait_settled(&s.endpoint, 1, WAIT), vec!["done"]);
}

#[test]
fn only_the_source_role_processes_an_item_by_hand() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let integration = unique("it");
    hub.exec(&format!(
        "SELECT ihub.create_integration('{integration}'); SELECT ihub.enable_integration('{integration}');"
    ));
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE FUNCTION {p}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM {p}_who('handled by hand'); RETURN '{{}}'; END $$;
         SELECT ihub.create_source('{integration}', 'src', '{p}_handle(ihub.inbound_items)', 'none');",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    // Queued for tomorrow, so that only a hand processes it now.
    let item: i64 = dev
        .query_one(
            &format!("SELECT ihub.receive('{integration}', 'src', '{{}}', convert_to('{{}}', 'UTF8'), now() + interval '1 day')"),
            &[],
        )
        .unwrap()
        .get(0);
    let mut admin = r.connect(&r.admin);
    for client in [&mut admin, &mut hub.db] {
        let e = error_of(client, &format!("SELECT ihub.process_inbound({item})"));
        assert!(e.contains("may not process inbound item"), "{e}");
    }
    dev.batch_execute(&format!("SELECT ihub.process_inbound({item})")).unwrap();
    r.assert_ran_as(&mut hub, "handled by hand", &r.dev);
}

#[test]
fn a_subscriber_named_with_digits_is_still_itself_and_its_condition_leaves_no_settings() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let rx = Receiver::start();
    let s = hub.setup(&rx.url("/hook"), "");
    // regrole would read this name as an OID (10 is the bootstrap superuser's).
    let digits = format!("{}", 10_000_000 + rand::random::<u32>() % 80_000_000);
    hub.exec(&format!(
        "CREATE ROLE \"{digits}\" LOGIN IN ROLE ihub_developer;
         GRANT SELECT, TRIGGER, INSERT ON {t} TO \"{digits}\", {app}; GRANT USAGE ON SEQUENCE {t}_id_seq TO {app};",
        t = s.table,
        app = r.app
    ));
    let mut numeric = r.connect(&digits);
    numeric
        .batch_execute(&format!(
            "SELECT ihub.subscribe('{t}', '{e}', condition =>
                 $c$ public.{p}_who('numeric condition') AND pg_catalog.set_config('search_path', 'pg_temp', false) IS NOT NULL $c$)",
            t = s.table,
            e = s.endpoint,
            p = r.p
        ))
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let mut app = r.connect(&r.app);
    let before: String = app.query_one("SHOW search_path", &[]).unwrap().get(0);
    app.batch_execute(&format!("INSERT INTO {} (customer, amount) VALUES ('x', 1)", s.table)).unwrap();
    let after: String = app.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(before, after, "the condition changed the writer's session");
    for (cur, _sess, sup) in r.wait_ident(&mut hub, "numeric condition") {
        assert_eq!((cur.as_str(), sup), (digits.as_str(), false));
    }
    hub.wait_settled(&s.endpoint, 1, WAIT);
}

#[test]
fn an_error_at_commit_fails_the_job_and_keeps_the_worker() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE TABLE {p}_late (id int);
         CREATE FUNCTION {p}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
         CREATE CONSTRAINT TRIGGER {p}_refuse AFTER INSERT ON {p}_late DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION {p}_refuse();
         CREATE FUNCTION {p}_job(args jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO {p}_late VALUES (1) $$;",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let workers: Vec<i32> = hub
        .db
        .query("SELECT pid FROM ihub.workers WHERE kind = 'job worker' ORDER BY pid", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let id: i64 =
        dev.query_one(&format!("SELECT ihub.enqueue('{}_job(jsonb)', max_attempts => 1)", r.p), &[]).unwrap().get(0);
    assert!(hub.wait_true(&format!("SELECT state = 'failed' FROM ihub.jobs WHERE id = {id}"), WAIT));
    let error: String = hub.one(&format!("SELECT last_error FROM ihub.jobs WHERE id = {id}"));
    assert!(error.contains("refused at commit"), "{error}");
    let now: Vec<i32> = hub
        .db
        .query("SELECT pid FROM ihub.workers WHERE kind = 'job worker' ORDER BY pid", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(workers, now, "a job worker exited");
}

/// Reading an inbound item's payload runs no code of a developer's with
/// another role's rights: with the developer's own `convert_from(bytea,
/// text)` in a schema on the reader's search path (public, where the
/// developer may create, is on every default path), a superuser reads
/// `ihub.inbound_items` and an item is handled; the function, if anything
/// ran it, records who it ran as.
#[test]
fn reading_inbound_payloads_runs_no_code_of_a_developer() {
    let mut hub = hub();
    let r = roles(&mut hub);
    let integration = unique("it");
    hub.exec(&format!(
        "SELECT ihub.create_integration('{integration}'); SELECT ihub.enable_integration('{integration}');
         CREATE SCHEMA {p}_trap AUTHORIZATION {dev}; GRANT USAGE ON SCHEMA {p}_trap TO PUBLIC;",
        p = r.p,
        dev = r.dev
    ));
    let mut dev = r.connect(&r.dev);
    dev.batch_execute(&format!(
        "CREATE TABLE {p}_trap.ran_as (who name); GRANT INSERT ON {p}_trap.ran_as TO PUBLIC;
         CREATE FUNCTION {p}_trap.convert_from(b bytea, e text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO {p}_trap.ran_as VALUES (current_user); RETURN pg_catalog.convert_from(b, e::name); END $$;
         CREATE FUNCTION {p}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS 'SELECT item.payload';
         SELECT ihub.create_source('{integration}', 'src', '{p}_handle(ihub.inbound_items)', 'none');
         SELECT ihub.receive('{integration}', 'src', '{{}}', convert_to('{{\"a\": 1}}', 'UTF8'));",
        p = r.p
    ))
    .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert!(hub.wait_true(
        &format!("SELECT state = 'done' FROM ihub.inbound_items WHERE integration = '{integration}'"),
        WAIT
    ));
    hub.exec(&format!("SET search_path = \"$user\", {p}_trap, public", p = r.p));
    let payload: String =
        hub.one(&format!("SELECT payload::text FROM ihub.inbound_items WHERE integration = '{integration}'"));
    hub.exec("RESET search_path");
    assert_eq!(payload, r#"{"a": 1}"#);
    let ran: Option<String> = hub.one(&format!(
        "SELECT string_agg(DISTINCT who::text, ',') FROM {p}_trap.ran_as WHERE who <> '{dev}'",
        p = r.p,
        dev = r.dev
    ));
    assert_eq!(ran, None, "the developer's convert_from ran with someone else's rights");
}
