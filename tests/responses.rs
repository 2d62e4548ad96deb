//! Responses in SQL (issue 12): `ihub.http_request(..., on_response =>
//! ...)` hands the response of a request that ended (delivered, failed, or
//! dead) to a SQL function, as a job of the role that asked, marked as a
//! sync of the endpoint's integration. As non-superuser roles, against real
//! receivers on loopback. The paginated pull with a restart is in
//! `server.rs`, which may restart the cluster.

use std::time::Duration;

use pg_ihub_e2e::*;

/// A developer's integration with an endpoint to `url`, fast retries of at
/// most `attempts`, and a table the handler writes each response to.
fn setup(url: &str, attempts: u32) -> Team {
    let mut t = team("resp");
    t.exec(&format!(
        "CREATE TABLE {{p}}_seen (delivery_id bigint, state text, status integer, headers jsonb, body text, body_json jsonb,
                                  context jsonb, attempts integer, error text, who name, syncing text);
         CREATE FUNCTION {{p}}_got(r ihub.http_response) RETURNS void LANGUAGE sql AS $$
             INSERT INTO public.{{p}}_seen VALUES (r.delivery_id, r.state, r.status, r.headers, r.body, r.body_json,
                                                   r.context, r.attempts, r.error, current_user,
                                                   current_setting('ihub.syncing', true)) $$;
         SELECT ihub.create_integration('{{p}}');
         SELECT ihub.create_endpoint('{{p}}', '{{p}}_api', '{url}',
                                     retry => '{{\"initial_delay\": 0.2, \"multiplier\": 1, \"jitter\": 0, \"max_attempts\": {attempts}}}');
         SELECT ihub.enable_integration('{{p}}');"
    ));
    t
}

fn wait_seen(t: &mut Team, n: i64) {
    assert!(
        t.wait_true(&format!("SELECT count(*) >= {n} FROM public.{{p}}_seen"), Duration::from_secs(60)),
        "the handler did not see {n} response(s)"
    );
}

#[test]
fn a_response_handler_gets_the_response_as_a_job_of_the_requester() {
    let rx = Receiver::start();
    let mut t = setup(&rx.url("/api"), 3);
    let id: i64 = t.one(
        "SELECT ihub.http_request('{p}_api', NULL, method => 'GET', path => '/items',
                                  query => '{\"page\": 2, \"tag\": [\"a b\", \"c\"], \"skip\": null}',
                                  on_response => '{p}_got(ihub.http_response)', context => '{\"page\": 2}')",
    );
    wait_seen(&mut t, 1);

    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].method.as_str(), got[0].path.as_str()), ("GET", "/api/items?page=2&tag=a+b&tag=c"));
    assert!(got[0].body.is_empty(), "a GET sends no body");

    let row = t
        .dev
        .query_one(&t.sql("SELECT delivery_id, state, status, headers->>'content-type', body, body_json->>'signature', context->>'page', attempts, error, who::text, syncing FROM {p}_seen"), &[])
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), id);
    assert_eq!(row.get::<_, String>(1), "done");
    assert_eq!(row.get::<_, i32>(2), 200);
    assert_eq!(row.get::<_, String>(3), "application/json");
    assert_eq!(row.get::<_, String>(4), r#"{"signature":"unchecked"}"#);
    assert_eq!(row.get::<_, String>(5), "unchecked", "body_json is the body as JSON");
    assert_eq!(row.get::<_, String>(6), "2", "the context comes back");
    assert_eq!(row.get::<_, i32>(7), 1);
    assert_eq!(row.get::<_, Option<String>>(8), None);
    assert_eq!(row.get::<_, String>(9), format!("{}_dev", t.p), "it ran as the role that asked");
    assert_eq!(row.get::<_, String>(10), t.p, "marked as a sync of the endpoint's integration");
    // Once: the job is done and no second one came.
    assert!(t.wait_true(
        "SELECT count(*) = 1 AND bool_and(state = 'done') FROM ihub.jobs WHERE function LIKE '%{p}_got%'",
        Duration::from_secs(30)
    ));
}

#[test]
fn failed_and_dead_requests_reach_their_handler_too() {
    let rx = Receiver::start();
    rx.script(|r, _| Reply::status(if r.path.contains("gone") { 404 } else { 503 }));
    let mut t = setup(&rx.url("/api"), 2);
    t.exec(
        "SELECT ihub.http_request('{p}_api', '{\"n\": 1}', path => '/gone', on_response => '{p}_got(ihub.http_response)');
         SELECT ihub.http_request('{p}_api', '{\"n\": 2}', path => '/down', on_response => '{p}_got(ihub.http_response)');",
    );
    wait_seen(&mut t, 2);
    let rows =
        t.dev.query(&t.sql("SELECT state, status, attempts, error FROM {p}_seen ORDER BY delivery_id"), &[]).unwrap();
    let seen: Vec<(String, i32, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(seen[0], ("failed".into(), 404, 1, "receiver answered HTTP 404".into()));
    assert_eq!(seen[1], ("dead".into(), 503, 2, "receiver answered HTTP 503".into()));
    assert_eq!(rx.count(), 3, "the 503 was retried once, then dead");
    // A retry is not an end: one job per request, not per attempt.
    assert_eq!(t.su::<i64>("SELECT count(*) FROM ihub.jobs WHERE function LIKE '%{p}_got%'"), 2);
}

#[test]
fn http_request_refuses_bad_handlers_contexts_and_queries() {
    let rx = Receiver::start();
    let mut t = setup(&rx.url("/api"), 2);
    t.exec("CREATE FUNCTION {p}_job(args jsonb) RETURNS void LANGUAGE sql AS 'SELECT 1'");
    t.hub.exec(&t.sql(
        "CREATE FUNCTION {p}_locked(r ihub.http_response) RETURNS void LANGUAGE sql AS 'SELECT 1';
         REVOKE EXECUTE ON FUNCTION {p}_locked(ihub.http_response) FROM PUBLIC;",
    ));
    let cases = [
        ("on_response => '{p}_job(jsonb)'", "cannot handle responses", "one ihub.http_response argument"),
        ("on_response => '{p}_locked(ihub.http_response)'", "may not execute", "grant it EXECUTE"),
        ("context => '{\"a\": 1}'", "context is for a response handler", "on_response"),
        ("query => '[1]'", "query must be a JSON object", "an array repeats"),
        ("query => '{\"a\": {\"b\": 1}}'", "query parameter \"a\" must be", "For example"),
        ("method => 'POST', path => 'x'", "invalid path", "start it with /"),
        // Would make the endpoint's host a user name, and send its credentials elsewhere.
        ("path => '&@evil.example?x=1'", "invalid path", "start it with /"),
    ];
    for (args, message, hint) in cases {
        let err = t.error(&format!("SELECT ihub.http_request('{{p}}_api', '{{}}', {args})"));
        assert!(err.contains(message) && err.contains(hint), "{args}: {err}");
    }
    let err = t.error("SELECT ihub.http_request('{p}_api', NULL, method => 'POST')");
    assert!(err.contains("body must not be NULL") && err.contains("only a GET"), "{err}");
    assert_eq!(t.su::<i64>("SELECT count(*) FROM ihub.deliveries WHERE integration = '{p}'"), 0, "nothing half-made");
    // A viewer queues nothing.
    let mut viewer = t.connect("viewer");
    let err = error_of(&mut viewer, &t.sql("SELECT ihub.http_request('{p}_api', '{}')"));
    assert!(err.contains("permission denied for function http_request"), "{err}");
}

/// Replaying a request hands its response over again, to a job of the role
/// that made it: only that role (or ihub_admin) may replay it; another
/// developer's replay_dead leaves it.
#[test]
fn only_the_requester_or_an_admin_replays_a_request_with_a_handler() {
    let rx = Receiver::start();
    rx.script(|_, _| Reply::status(404));
    let mut t = setup(&rx.url("/api"), 1);
    let id: i64 = t.one("SELECT ihub.http_request('{p}_api', '{}', on_response => '{p}_got(ihub.http_response)')");
    wait_seen(&mut t, 1);
    assert!(
        t.wait_true(&format!("SELECT state = 'failed' FROM ihub.deliveries WHERE id = {id}"), Duration::from_secs(30))
    );
    let mut other = t.connect("dev2");
    let err = error_of(&mut other, &format!("SELECT ihub.replay({id})"));
    assert!(err.contains("may not act on delivery") && err.contains("Only members of"), "{err}");
    let replayed: i64 = other.query_one(&t.sql("SELECT ihub.replay_dead('{p}_api')"), &[]).unwrap().get(0);
    assert_eq!(replayed, 0, "another developer's replay_dead leaves it");
    t.exec(&format!("SELECT ihub.replay({id})"));
    wait_seen(&mut t, 2);
    let mut admin = t.connect("admin");
    assert!(
        t.wait_true(&format!("SELECT state = 'failed' FROM ihub.deliveries WHERE id = {id}"), Duration::from_secs(30))
    );
    admin.batch_execute(&format!("SELECT ihub.replay({id})")).unwrap();
    wait_seen(&mut t, 3);
    let who: String = t.one("SELECT string_agg(DISTINCT who::text, ',') FROM {p}_seen");
    assert_eq!(who, format!("{}_dev", t.p), "every handler ran as the requester");
    // Skipping it ends it without a response for its handler: the same rule.
    assert!(
        t.wait_true(&format!("SELECT state = 'failed' FROM ihub.deliveries WHERE id = {id}"), Duration::from_secs(30))
    );
    let err = error_of(&mut other, &format!("SELECT ihub.skip({id})"));
    assert!(err.contains("may not act on delivery") && err.contains("Only members of"), "{err}");
    t.exec(&format!("SELECT ihub.skip({id})"));
    let (state, why): (String, String) = {
        let row =
            t.dev.query_one(&format!("SELECT state, last_error FROM ihub.deliveries WHERE id = {id}"), &[]).unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(state, "skipped");
    assert!(why.starts_with(&format!("skipped by {}_dev after: ", t.p)), "{why}");
}

/// A batch takes at most 32 MB of requests with handlers (32 at the default
/// ihub.max_response_size); the rest go back to the queue and are taken by
/// the next rounds: all 80 are handled, once each.
#[test]
fn requests_with_handlers_beyond_a_batch_wait_for_the_next_round() {
    let rx = Receiver::start();
    let mut t = setup(&rx.url("/api"), 3);
    t.exec(
        "SELECT ihub.http_request('{p}_api', jsonb_build_object('n', g), on_response => '{p}_got(ihub.http_response)')
         FROM generate_series(1, 80) g",
    );
    wait_seen(&mut t, 80);
    assert_eq!(t.one::<i64>("SELECT count(DISTINCT delivery_id) FROM {p}_seen"), 80);
    assert_eq!(t.one::<i64>("SELECT count(*) FROM {p}_seen"), 80, "each handled once");
    assert!(rx.count() >= 80);
}
