//! In-database tests of the SQL API: run by `cargo pgrx test` inside a
//! transaction that is rolled back. What background workers must see is
//! tested end to end in `tests/`.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Runs `sql` in a subtransaction and returns "message HINT: hint" if it
    /// fails, None if it succeeds. The subtransaction also proves that a failed
    /// call leaves nothing behind.
    fn error_of(sql: &str) -> Option<String> {
        Spi::run(
            r#"CREATE OR REPLACE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
               DECLARE m text; h text;
               BEGIN
                   EXECUTE sql;
                   RETURN NULL;
               EXCEPTION WHEN OTHERS THEN
                   GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
                   RETURN m || ' HINT: ' || coalesce(h, '');
               END $$"#,
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()]).unwrap()
    }

    fn expect_error(sql: &str, parts: &[&str]) {
        let err = error_of(sql).unwrap_or_else(|| panic!("expected an error from: {sql}"));
        for part in parts {
            assert!(err.contains(part), "error of {sql:?} lacks {part:?}: {err}");
        }
    }

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).unwrap_or_else(|| panic!("{sql}: NULL"))
    }

    fn setup() {
        Spi::run(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric NOT NULL, status text DEFAULT 'new');
             SELECT ihub.create_integration('shop', tenant => 'acme', settings => '{\"api_key\": \"k-123\", \"region\": \"eu\"}');
             SELECT ihub.create_endpoint('shop', 'hook', 'https://hooks.example.com/orders');",
        )
        .unwrap();
    }

    fn setup_enabled() {
        setup();
        Spi::run("SELECT ihub.enable_integration('shop')").unwrap();
    }

    /// The caller is the current user at the call: after SET ROLE the role,
    /// inside a SECURITY DEFINER function its owner, never the outer user.
    #[pg_test]
    fn the_caller_is_the_current_user_at_the_call() {
        setup();
        Spi::run(
            "CREATE ROLE ihub_t_owner NOLOGIN IN ROLE ihub_developer;
             CREATE ROLE ihub_t_app NOLOGIN;
             CREATE ROLE ihub_t_other NOLOGIN IN ROLE ihub_developer;
             CREATE FUNCTION noop(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
             GRANT EXECUTE ON FUNCTION noop(jsonb) TO PUBLIC;
             CREATE FUNCTION queue_for_me() RETURNS bigint LANGUAGE sql SECURITY DEFINER
                 AS $$ SELECT ihub.enqueue('noop(jsonb)', run_at => now() + interval '1 day') $$;
             ALTER FUNCTION queue_for_me() OWNER TO ihub_t_owner;
             GRANT EXECUTE ON FUNCTION queue_for_me() TO ihub_t_app;",
        )
        .unwrap();
        let direct = one::<i64>(
            "SET LOCAL ROLE ihub_t_owner; SELECT ihub.enqueue('noop(jsonb)', run_at => now() + interval '1 day')",
        );
        Spi::run("RESET ROLE").unwrap();
        let through_definer = one::<i64>("SET LOCAL ROLE ihub_t_app; SELECT queue_for_me()");
        Spi::run("RESET ROLE").unwrap();
        for id in [direct, through_definer] {
            assert_eq!(one::<String>(&format!("SELECT run_as::text FROM ihub.job WHERE id = {id}")), "ihub_t_owner");
        }
        // The internal halves take any caller, so nobody may call them.
        expect_error(
            "SET LOCAL ROLE ihub_t_owner; SELECT ihub._enqueue_by('noop(jsonb)', p_caller => 'postgres')",
            &["permission denied"],
        );
        Spi::run("RESET ROLE").unwrap();
        // Only members of a job's role (or ihub_admin) act on it.
        expect_error(
            &format!("SET LOCAL ROLE ihub_t_other; SELECT ihub.cancel_job({direct})"),
            &["may not act on job", "Only members of ihub_t_owner"],
        );
        Spi::run("RESET ROLE").unwrap();
        assert!(one::<bool>("SELECT ihub._may_act_for('ihub_t_owner', 'ihub_t_owner')"));
        assert!(!one::<bool>("SELECT ihub._may_act_for('ihub_t_app', 'ihub_t_owner')"));
        assert!(one::<bool>("SELECT ihub._may_act_for('ihub_admin', 'ihub_t_owner')"));
        assert!(!one::<bool>("SELECT ihub._may_act_for('ihub_admin', 'postgres')"));
    }

    #[pg_test]
    fn integration_lifecycle_and_its_errors() {
        setup();
        expect_error("SELECT ihub.create_integration('shop')", &["already exists"]);
        expect_error("SELECT ihub.create_integration('bad name!')", &["invalid integration name", "HINT: Use"]);
        expect_error("SELECT ihub.create_integration('x', kind => 'ftp')", &["unknown integration kind", "webhook"]);
        expect_error("SELECT ihub.enable_integration('nope')", &["does not exist", "create_integration"]);
        assert_eq!(one::<String>("SELECT ihub.enable_integration('shop')"), "active");
        expect_error("SELECT ihub.delete_integration('shop')", &["cannot be deleted", "disable_integration"]);
        Spi::run("SELECT ihub.disable_integration('shop'); SELECT ihub.delete_integration('shop')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.integration"), 0);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.endpoint"), 0);
    }

    #[pg_test]
    fn enabling_checks_required_settings() {
        Spi::run("SELECT ihub.create_integration('crm', kind => 'rest')").unwrap();
        expect_error("SELECT ihub.enable_integration('crm')", &["lacks required settings: base_url"]);
        assert_eq!(one::<String>("SELECT state FROM ihub.integrations WHERE name = 'crm'"), "inactive");
        Spi::run("UPDATE ihub.integration SET settings = '{\"base_url\": \"https://crm\"}' WHERE name = 'crm'")
            .unwrap();
        assert_eq!(one::<String>("SELECT ihub.enable_integration('crm')"), "active");
    }

    #[pg_test]
    fn endpoint_input_is_validated_with_hints() {
        setup();
        let bad = [
            ("'nope', 'e1', 'https://x.example'", vec!["integration \"nope\" does not exist"]),
            ("'shop', 'hook', 'https://x.example'", vec!["already exists"]),
            ("'shop', 'e1', 'not a url'", vec!["invalid endpoint URL", "HINT: Use an absolute"]),
            ("'shop', 'e1', 'ftp://x.example/'", vec!["scheme \"ftp\""]),
            ("'shop', 'e1', 'https://u:p@x.example/'", vec!["credentials"]),
            ("'shop', 'e1', 'http://10.1.2.3/'", vec!["private", "ihub.allow_private_hosts"]),
            ("'shop', 'e1', 'http://169.254.169.254/'", vec!["private"]),
            ("'shop', 'e1', 'https://x.example', method => 'TRACE'", vec!["unsupported HTTP method", "GET, POST"]),
            ("'shop', 'e1', 'https://x.example', auth => '{\"type\": \"oauth9\"}'", vec!["auth type \"oauth9\""]),
            ("'shop', 'e1', 'https://x.example', auth => '{\"type\": \"basic\", \"username\": \"u\"}'", vec!["needs"]),
            (
                "'shop', 'e1', 'https://x.example', retry => '{\"tries\": 3}'",
                vec!["unknown retry policy key", "max_attempts"],
            ),
            ("'shop', 'e1', 'https://x.example', retry => '{\"max_attempts\": 0}'", vec!["max_attempts"]),
            ("'shop', 'e1', 'https://x.example', secret => 'hunter2'", vec!["whsec_"]),
            ("'shop', 'e1', 'https://x.example', headers => '{\"webhook-id\": \"x\"}'", vec!["reserved"]),
            ("'shop', 'e1', 'https://x.example', headers => '{\"X-A\": 1}'", vec!["must be a string"]),
            ("'shop', 'e1', 'https://x.example', timeout_ms => 0", vec!["timeout_ms"]),
        ];
        for (args, parts) in bad {
            expect_error(&format!("SELECT ihub.create_endpoint({args})"), &parts);
        }
        // A secret is never echoed in an error.
        let err = error_of(
            "SELECT ihub.create_endpoint('shop', 'e1', 'https://x.example', secret => 'whsec_hunter2hunter2')",
        )
        .unwrap();
        assert!(!err.contains("hunter2"), "{err}");
        let err = error_of(
            "SELECT ihub.create_endpoint('shop', 'e1', 'https://x.example', auth => '{\"type\": \"bearer\", \"token\": \"tok-999\", \"x\": 1}')",
        )
        .unwrap();
        assert!(!err.contains("tok-999"), "{err}");
        // Nothing half-made by any of the failures.
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.endpoint"), 1);
        // Loopback is allowed here because the test server lists it.
        Spi::run("SELECT ihub.create_endpoint('shop', 'local', 'http://127.0.0.1:9/')").unwrap();
    }

    #[pg_test]
    fn secrets_are_generated_and_only_admins_see_credentials() {
        setup();
        Spi::run(
            "SELECT ihub.create_endpoint('shop', 'authd', 'https://x.example/h?token=qs-secret',
                                         headers => '{\"Authorization\": \"Bearer hdr-secret\", \"X-Tenant\": \"acme\"}',
                                         auth => '{\"type\": \"api_key\", \"header\": \"X-Key\", \"value\": \"key-secret\"}')",
        )
        .unwrap();
        let secret = one::<String>("SELECT secret FROM ihub.endpoint_secrets WHERE endpoint = 'authd'");
        assert!(secret.starts_with("whsec_"), "{secret}");
        let visible = one::<String>(
            "SELECT concat_ws(' ', (SELECT json_agg(e)::text FROM ihub.endpoints e), (SELECT json_agg(i)::text FROM ihub.integrations i))",
        );
        for leaked in ["qs-secret", "hdr-secret", "key-secret", "k-123", &secret] {
            assert!(!visible.contains(leaked), "{leaked} visible: {visible}");
        }
        assert!(visible.contains("acme") && visible.contains("eu") && visible.contains("api_key"));

        Spi::run(
            "CREATE ROLE ihub_test_dev NOLOGIN IN ROLE ihub_developer;
             CREATE ROLE ihub_test_viewer NOLOGIN IN ROLE ihub_viewer;
             CREATE ROLE ihub_test_admin NOLOGIN IN ROLE ihub_admin;",
        )
        .unwrap();
        for (role, sql, denied) in [
            ("ihub_test_dev", "SELECT secret FROM ihub.endpoint_secrets", true),
            ("ihub_test_dev", "SELECT * FROM ihub.endpoint_secret", true),
            ("ihub_test_dev", "SELECT * FROM ihub.endpoint_credential", true),
            ("ihub_test_dev", "SELECT ihub.rotate_secret('hook')", true),
            ("ihub_test_dev", "SELECT ihub.create_endpoint('shop', 'dev-made', 'https://x.example')", false),
            ("ihub_test_viewer", "SELECT * FROM ihub.deliveries", false),
            ("ihub_test_viewer", "SELECT * FROM ihub.endpoints, ihub.integrations, ihub.workers", false),
            ("ihub_test_viewer", "SELECT * FROM ihub.delivery_attempts, ihub.subscriptions", false),
            ("ihub_test_viewer", "SELECT ihub.create_integration('viewer-made')", true),
            ("ihub_test_viewer", "SELECT * FROM ihub.delivery", true),
            ("ihub_test_admin", "SELECT secret FROM ihub.endpoint_secrets", false),
            ("ihub_test_admin", "SELECT ihub.rotate_secret('hook')", false),
        ] {
            let err = error_of(&format!("SET LOCAL ROLE {role}; {sql}"));
            Spi::run("RESET ROLE").unwrap();
            match (denied, err) {
                (true, Some(e)) => assert!(e.contains("permission denied"), "{role}: {sql}: {e}"),
                (true, None) => panic!("{role} may run {sql}"),
                (false, Some(e)) => panic!("{role} may not run {sql}: {e}"),
                (false, None) => {}
            }
        }
    }

    #[pg_test]
    fn subscribe_validates_tables_columns_and_conditions() {
        setup();
        Spi::run("CREATE VIEW order_view AS SELECT * FROM orders").unwrap();
        expect_error("SELECT ihub.subscribe('orders', 'nope')", &["endpoint \"nope\" does not exist"]);
        expect_error("SELECT ihub.subscribe('order_view', 'hook')", &["is not a table"]);
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', columns => '{id,colour}')",
            &["has no column colour", "customer"],
        );
        expect_error("SELECT ihub.subscribe('orders', 'hook', watch => '{nope}')", &["has no column nope"]);
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', events => '{insert}', watch => '{status}')",
            &["no update"],
        );
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', events => '{insert,upsert}')",
            &["invalid events: upsert"],
        );
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', condition => 'new.amount >')",
            &["invalid condition", "HINT: Write one"],
        );
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', condition => 'new.colour = 1')",
            &["invalid condition", "colour"],
        );
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', condition => 'new.amount')",
            &["invalid condition", "boolean"],
        );
        // A condition cannot close its parenthesis to add clauses or statements.
        for injection in [
            "true) UNION SELECT (true",
            "true); DROP TABLE orders; SELECT (true",
            "true) FROM pg_authid WHERE (true",
            "true --",
        ] {
            let err = error_of(&format!("SELECT ihub.subscribe('orders', 'hook', condition => $c${injection}$c$)"));
            if injection == "true --" {
                assert!(err.is_none(), "a trailing comment is harmless: {err:?}");
                continue;
            }
            let err = err.unwrap_or_else(|| panic!("accepted {injection}"));
            assert!(err.contains("invalid condition"), "{injection}: {err}");
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.subscription"), 1, "only the harmless one was made");
        assert!(one::<bool>("SELECT to_regclass('orders') IS NOT NULL"));
    }

    #[pg_test]
    fn captured_changes_become_deliveries_with_payloads() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', columns => '{id,status,amount}')");
        Spi::run(
            "INSERT INTO orders (customer, amount) VALUES ('alice', 10), ('bob', 20);
             UPDATE orders SET status = 'paid', customer = 'ALICE' WHERE customer = 'alice';
             DELETE FROM orders WHERE customer = 'bob';",
        )
        .unwrap();
        // Typed rows wait in the capture table until a dispatcher routes them.
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 4);
        let routed = one::<i64>(&format!(
            "SELECT count(*) FROM ihub._route((SELECT s FROM ihub.subscription s WHERE id = {sub}), NULL, NULL)"
        ));
        assert_eq!(routed, 4);
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 0);
        let update = one::<pgrx::JsonB>("SELECT payload FROM ihub.delivery WHERE event_type LIKE '%.update'").0;
        assert_eq!(update["type"], "orders.update");
        assert_eq!(update["tenant"], "acme");
        assert_eq!(update["data"]["status"], "paid");
        assert_eq!(update["old"]["status"], "new");
        assert!(update["data"].get("customer").is_none(), "only the chosen columns: {update}");
        assert_eq!(
            update["changed"],
            serde_json::json!(["status"]),
            "changes outside the chosen columns are not named"
        );
        assert_eq!(update["id"], one::<String>("SELECT event_id FROM ihub.delivery WHERE event_type LIKE '%.update'"));
        let delete = one::<pgrx::JsonB>("SELECT payload FROM ihub.delivery WHERE event_type LIKE '%.delete'").0;
        assert_eq!(delete["old"]["amount"], serde_json::json!(20));
        assert_eq!(
            one::<String>("SELECT string_agg(state, ',') FROM ihub.delivery"),
            "pending,pending,pending,pending",
            "routed without an owner they wait for a dispatcher"
        );
    }

    #[pg_test]
    fn updates_pair_old_and_new_rows_even_when_the_key_changes() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', events => '{update}')");
        Spi::run(
            "INSERT INTO orders (id, customer, amount) SELECT g, 'c' || g, g FROM generate_series(1, 50) g;
             UPDATE orders SET id = id + 1000, amount = amount * 2;",
        )
        .unwrap();
        let mismatched = one::<i64>(&format!(
            "SELECT count(*) FROM ihub_capture.sub_{sub} WHERE (new_row).customer <> (old_row).customer
                OR (new_row).id <> (old_row).id + 1000 OR (new_row).amount <> (old_row).amount * 2"
        ));
        assert_eq!(mismatched, 0);
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 50);
    }

    #[pg_test]
    fn watch_and_condition_filter_in_the_writer() {
        setup_enabled();
        let sub = one::<i64>(
            "SELECT ihub.subscribe('orders', 'hook', events => '{insert,update}', watch => '{status}',
                                   condition => 'new.amount >= 100 OR old.amount >= 100')",
        );
        Spi::run(
            "INSERT INTO orders (customer, amount) VALUES ('small', 5), ('big', 500);
             UPDATE orders SET customer = upper(customer);
             UPDATE orders SET status = 'paid';",
        )
        .unwrap();
        // big's insert and big's status change; nothing of small, nothing for the customer change.
        assert_eq!(
            one::<String>(&format!("SELECT string_agg(op::text || (coalesce(new_row, old_row)).customer, ',' ORDER BY op) FROM ihub_capture.sub_{sub}")),
            "ibig,uBIG"
        );
    }

    #[pg_test]
    fn a_disabled_integration_does_not_capture() {
        setup();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook')");
        Spi::run("INSERT INTO orders (customer, amount) VALUES ('off', 1)").unwrap();
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 0, "inactive: no capture");
        Spi::run("SELECT ihub.enable_integration('shop'); INSERT INTO orders (customer, amount) VALUES ('on', 1)")
            .unwrap();
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 1);
        assert!(one::<bool>("SELECT capturing FROM ihub.subscriptions"));
    }

    /// ihub.delivery has no foreign keys (checking them cost a query per
    /// delivery queued): deleting an endpoint or a subscription does what
    /// they did.
    #[pg_test]
    fn deleting_what_deliveries_point_at_does_what_foreign_keys_did() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook')");
        Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
        // Routed as a dispatcher does, unclaimed.
        Spi::run(&format!("SELECT ihub._route(s, NULL, NULL) FROM ihub.subscription s WHERE s.id = {sub}")).unwrap();
        Spi::run("SELECT ihub.http_request('hook', '{}')").unwrap();
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub.delivery WHERE subscription_id = {sub}")), 1);
        expect_error(
            "DELETE FROM ihub.endpoint WHERE name = 'hook'",
            &["endpoint \"hook\" still has deliveries", "HINT: ihub.delete_integration"],
        );
        Spi::run(&format!("SELECT ihub.unsubscribe({sub})")).unwrap();
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub.delivery WHERE subscription_id = {sub}")), 0);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery WHERE subscription_id IS NULL"), 2, "both stay");
        Spi::run("SELECT ihub.disable_integration('shop'); SELECT ihub.delete_integration('shop')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery"), 0, "deleted with their integration");
    }

    /// A route goes on from the block its session last stopped at
    /// (ihub._route); a value of that session setting it cannot read (set
    /// by hand, say) makes it start from the first block, never fail.
    #[pg_test]
    fn a_route_position_it_cannot_read_starts_from_the_first_block() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook')");
        for junk in ["x", "99999999999", "1,0) --"] {
            Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
            Spi::run(&format!("SELECT set_config('ihub_route.sub_{sub}', '{junk}', false)")).unwrap();
            let routed = one::<i64>(&format!(
                "SELECT count(*) FROM ihub.subscription s, ihub._route(s, NULL, NULL) WHERE s.id = {sub}"
            ));
            assert_eq!(routed, 1, "the change is routed despite position {junk:?}");
        }
    }

    #[pg_test]
    fn http_request_and_replay_check_their_input() {
        setup();
        expect_error("SELECT ihub.http_request('hook', '{}')", &["inactive", "enable_integration"]);
        Spi::run("SELECT ihub.enable_integration('shop')").unwrap();
        expect_error("SELECT ihub.http_request('nope', '{}')", &["does not exist"]);
        expect_error("SELECT ihub.http_request('hook', NULL)", &["must not be NULL"]);
        expect_error("SELECT ihub.http_request('hook', '{}', method => 'BREW')", &["unsupported HTTP method"]);
        expect_error("SELECT ihub.http_request('hook', '{}', path => 'no slash')", &["invalid path"]);
        expect_error(
            "SELECT ihub.http_request('hook', jsonb_build_object('x', repeat('a', 2000000)))",
            &["ihub.max_body_size", "HINT: Send less"],
        );
        let id = one::<i64>("SELECT ihub.http_request('hook', '{\"a\": 1}', method => 'put', path => '/v2?x=1')");
        assert_eq!(one::<String>(&format!("SELECT state FROM ihub.deliveries WHERE id = {id}")), "pending");
        assert_eq!(one::<String>(&format!("SELECT method FROM ihub.delivery WHERE id = {id}")), "PUT");
        assert_eq!(
            one::<String>("SELECT ihub._join_url('https://h.example/', '/v2?x=1') || ' ' || ihub._join_url('https://h.example/a', '?x=1')"),
            "https://h.example/v2?x=1 https://h.example/a?x=1",
            "no double slash"
        );
        expect_error(&format!("SELECT ihub.replay({id})"), &["is pending", "only dead or failed"]);
        expect_error("SELECT ihub.replay(-1)", &["does not exist"]);
        Spi::run(&format!("UPDATE ihub.delivery SET state = 'dead', attempts = 10 WHERE id = {id}")).unwrap();
        Spi::run(&format!("SELECT ihub.replay({id})")).unwrap();
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || '/' || attempts || '/' || budget_start FROM ihub.delivery WHERE id = {id}"
            )),
            "pending/10/10",
            "a replay keeps the count and gets a fresh budget"
        );
    }

    /// A circuit breaker policy is checked, filled in with its defaults and
    /// changed with ihub.alter_endpoint; false turns it off.
    #[pg_test]
    fn circuit_policies_are_checked_and_filled_in() {
        setup();
        expect_error(
            "SELECT ihub.create_endpoint('shop', 'cb', 'https://hooks.example.com/', circuit => '{\"failures\": 0}')",
            &[
                "invalid circuit breaker: circuit key \"failures\" must be a whole number",
                "HINT: Pass true for the defaults",
            ],
        );
        expect_error(
            "SELECT ihub.alter_endpoint('hook', circuit => '{\"cooldown\": \"30s\"}')",
            &["circuit key \"cooldown\" must be a number"],
        );
        expect_error(
            "SELECT ihub.alter_endpoint('hook', timeout_ms => 0)",
            &["timeout_ms must be between 1 and 300000"],
        );
        expect_error("SELECT ihub.alter_endpoint('nope', circuit => 'true')", &["endpoint \"nope\" does not exist"]);
        assert_eq!(
            one::<bool>("SELECT circuit IS NULL FROM ihub.endpoints WHERE name = 'hook'"),
            true,
            "off by default"
        );
        Spi::run("SELECT ihub.alter_endpoint('hook', circuit => 'true', timeout_ms => 2000)").unwrap();
        assert_eq!(
            one::<String>("SELECT circuit::text || ' ' || timeout_ms || ' ' || circuit_state FROM ihub.endpoints WHERE name = 'hook'"),
            r#"{"window": 60.0, "cooldown": 30.0, "failures": 5, "failure_rate": null, "min_requests": 20} 2000 closed"#
        );
        Spi::run("SELECT ihub.alter_endpoint('hook', circuit => 'false')").unwrap();
        assert_eq!(one::<bool>("SELECT circuit IS NULL FROM ihub.endpoints WHERE name = 'hook'"), true);
    }

    /// Failed attempts open an endpoint's circuit: its due deliveries are
    /// not claimed (another endpoint's are), the next wake-up is the end of
    /// the cooldown rather than now, and the change is on record and logged.
    #[pg_test]
    fn an_open_circuit_gets_nothing_and_other_endpoints_go_on() {
        setup_enabled();
        Spi::run(
            "SELECT ihub.alter_endpoint('hook', circuit => '{\"failures\": 2, \"cooldown\": 60}');
             SELECT ihub.create_endpoint('shop', 'other', 'https://other.example.com/');
             SELECT ihub.http_request('hook', '{}') FROM generate_series(1, 3);",
        )
        .unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 3);
        let failed = one::<i64>(
            "SELECT ihub._settle(4242, jsonb_agg(jsonb_build_object(
                 'delivery_id', id, 'state', 'retry', 'next_at', 0, 'status', 503, 'error', 'HTTP 503',
                 'category', 'http_5xx', 'request_headers', '{}'::jsonb, 'response_headers', '{}'::jsonb,
                 'response_body', '', 'started_at', 0, 'duration_ms', 1)))
             FROM ihub.delivery WHERE state = 'running'",
        );
        assert_eq!(failed, 3);
        assert_eq!(
            one::<String>(
                "SELECT circuit_state || ' ' || (circuit_changes -> 0 ->> 'from') || '->' || (circuit_changes -> 0 ->> 'to')
                        || ' ' || (circuit_changes -> 0 ->> 'reason') || ' ' || (failing_since IS NOT NULL)
                 FROM ihub.endpoints WHERE name = 'hook'"
            ),
            "open closed->open 3 consecutive failed attempts true"
        );
        assert!(one::<bool>(
            "SELECT count(*) = 1 FROM ihub.logs WHERE level = 'warning' AND message LIKE 'circuit of endpoint hook opened: %'"
        ));
        Spi::run("SELECT ihub.http_request('other', '{}')").unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(url, ',') FROM ihub._claim(4242, 10, 1000, 1)"),
            "https://other.example.com/",
            "the open circuit's due retries wait; the other endpoint is served"
        );
        let next = one::<f64>("SELECT ihub._next_due()");
        assert!(next > 50.0 && next <= 60.0, "the next wake-up is the end of the cooldown: {next}");
        assert_eq!(
            one::<String>("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'endpoints'"),
            "warning: circuit open: hook"
        );
        // Changing the policy closes the circuit.
        Spi::run("SELECT ihub.alter_endpoint('hook', circuit => '{\"failures\": 2}')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 3);
    }

    /// An endpoint whose attempts have all failed for
    /// ihub.endpoint_disable_after (5 days) is disabled with the reason;
    /// enabling it again starts the count afresh.
    #[pg_test]
    fn an_endpoint_failing_for_days_is_disabled() {
        setup_enabled();
        let fail = || {
            Spi::run("SELECT ihub.http_request('hook', '{}')").unwrap();
            assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 1);
            Spi::run(
                "SELECT ihub._settle(4242, jsonb_agg(jsonb_build_object(
                     'delivery_id', id, 'state', 'retry', 'next_at', extract(epoch FROM now() + interval '1 hour'),
                     'status', NULL, 'error', 'connection refused', 'category', 'connection',
                     'request_headers', '{}'::jsonb, 'response_headers', NULL, 'response_body', NULL,
                     'started_at', 0, 'duration_ms', 1)))
                 FROM ihub.delivery WHERE state = 'running'",
            )
            .unwrap();
        };
        fail();
        assert!(one::<bool>("SELECT enabled AND failing_since IS NOT NULL FROM ihub.endpoints WHERE name = 'hook'"));
        Spi::run("UPDATE ihub.endpoint_state SET failing_since = now() - interval '5 days 1 minute'").unwrap();
        fail();
        let reason = one::<String>("SELECT disabled_reason FROM ihub.endpoints WHERE name = 'hook' AND NOT enabled");
        assert!(reason.starts_with("every attempt failed since "), "{reason}");
        assert!(reason.contains("ihub.endpoint_disable_after = 5d"), "{reason}");
        assert!(one::<bool>(
            "SELECT count(*) = 1 FROM ihub.logs WHERE level = 'critical' AND message LIKE 'endpoint hook disabled: %'"
        ));
        Spi::run("SELECT ihub.enable_endpoint('hook')").unwrap();
        assert!(one::<bool>("SELECT enabled AND failing_since IS NULL FROM ihub.endpoints WHERE name = 'hook'"));
    }

    #[pg_test]
    fn endpoint_limits_are_checked_and_zero_removes_them() {
        setup();
        expect_error(
            "SELECT ihub.create_endpoint('shop', 'lim', 'https://hooks.example.com/', rate_limit => -1)",
            &["rate_limit must be from 0 to 100000 requests per second, got -1", "HINT: For example 10"],
        );
        expect_error(
            "SELECT ihub.alter_endpoint('hook', max_in_flight => 20000)",
            &["max_in_flight must be from 0 to 10000"],
        );
        Spi::run("SELECT ihub.alter_endpoint('hook', rate_limit => 2.5, max_in_flight => 3)").unwrap();
        assert_eq!(
            one::<String>("SELECT rate_limit || '/' || max_in_flight FROM ihub.endpoints WHERE name = 'hook'"),
            "2.5/3"
        );
        Spi::run("SELECT ihub.alter_endpoint('hook', rate_limit => 0)").unwrap();
        assert_eq!(
            one::<String>("SELECT coalesce(rate_limit::text, 'none') || '/' || max_in_flight FROM ihub.endpoints WHERE name = 'hook'"),
            "none/3"
        );
    }

    /// An endpoint ordered by key gets the first open delivery of each key
    /// claimed, and nothing behind it: not while it is in flight, not while
    /// it is dead (the key shows as blocked) until it is skipped. Ordering
    /// is switched on only when nothing is queued, and checked.
    #[pg_test]
    fn an_ordered_endpoint_claims_only_the_first_delivery_of_each_key() {
        setup_enabled();
        expect_error(
            "SELECT ihub.create_endpoint('shop', 'o', 'https://o.example.com/', ordering => 'random')",
            &["invalid ordering \"random\"", "HINT: Use key"],
        );
        Spi::run(
            "SELECT ihub.alter_endpoint('hook', ordering => 'key');
             CREATE TABLE nokey (a int);",
        )
        .unwrap();
        expect_error("SELECT ihub.subscribe('nokey', 'hook')", &["nokey has no primary key", "ordering_key =>"]);
        expect_error("SELECT ihub.subscribe('nokey', 'hook', ordering_key => '{b}')", &["nokey has no column b"]);
        Spi::run(
            "SELECT ihub.subscribe('orders', 'hook');
             INSERT INTO orders (customer, amount) VALUES ('a', 1), ('b', 2);
             UPDATE orders SET amount = 10 WHERE id = 1;
             UPDATE orders SET amount = 20 WHERE id = 1;",
        )
        .unwrap();
        let claim = || one::<i64>("SELECT count(*) FROM ihub._claim(4242, 100, 1000, 1)");
        let running = || {
            one::<String>(
                "SELECT coalesce(string_agg((payload -> 'data' ->> 'id') || ':' || (payload -> 'data' ->> 'amount'), ',' ORDER BY id), '')
                 FROM ihub.delivery WHERE state = 'running'",
            )
        };
        assert_eq!(claim(), 2);
        assert_eq!(running(), "1:1,2:2", "the first of each key");
        // A key: the subscription and a hash of the key's values, the same
        // for one row's changes.
        assert_eq!(
            one::<String>(
                "SELECT string_agg(DISTINCT (ordering_key ~ '^[0-9]+:[0-9a-f]{32}$')::text || count, ',')
                 FROM (SELECT ordering_key, count(*) FROM ihub.delivery GROUP BY 1) k"
            ),
            "true1,true3"
        );
        assert_eq!(claim(), 0, "nothing behind a delivery in flight");
        Spi::run("UPDATE ihub.delivery SET state = 'done' WHERE state = 'running'").unwrap();
        assert_eq!(claim(), 1);
        assert_eq!(running(), "1:10");
        Spi::run("UPDATE ihub.delivery SET state = 'dead' WHERE state = 'running'").unwrap();
        assert_eq!(claim(), 0, "a dead delivery holds its key");
        assert_eq!(one::<i64>("SELECT blocked_keys FROM ihub.endpoints WHERE name = 'hook'"), 1);
        assert_eq!(
            one::<String>("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'endpoints'"),
            "warning: keys held by failed or dead deliveries: hook (1)"
        );
        expect_error(
            "SELECT ihub.alter_endpoint('hook', ordering => 'endpoint')",
            &[
                "endpoint \"hook\" has 1 deliveries queued or in flight",
                "HINT: Set the ordering when nothing is queued",
            ],
        );
        Spi::run("SELECT ihub.skip(id) FROM ihub.delivery WHERE state = 'dead'").unwrap();
        assert!(one::<bool>("SELECT last_error LIKE 'skipped by %' FROM ihub.delivery WHERE state = 'skipped'"));
        assert_eq!(claim(), 1);
        assert_eq!(running(), "1:20");
        // A delivery of the key with a lower id back in the queue (a replay,
        // or a request committed late) waits for the one in flight.
        Spi::run(
            "UPDATE ihub.delivery SET state = 'pending' WHERE state = 'done' AND payload -> 'data' ->> 'id' = '1'",
        )
        .unwrap();
        assert_eq!(claim(), 0, "never two in flight for a key");
        Spi::run("UPDATE ihub.delivery SET state = 'done' WHERE state = 'pending'").unwrap();
        expect_error("SELECT ihub.skip(id) FROM ihub.delivery WHERE state = 'running'", &["is being sent"]);
        // Switched off, nothing holds a key any more.
        Spi::run("SELECT ihub.alter_endpoint('hook', ordering => 'none')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery WHERE ordering_key IS NOT NULL AND state <> 'done' AND state <> 'skipped'"), 0);
        assert!(one::<bool>(
            "SELECT ordering IS NULL AND blocked_keys IS NULL FROM ihub.endpoints WHERE name = 'hook'"
        ));
    }

    /// v1a endpoints get a generated whsk_ key whose whpk_ public key the
    /// view shows; ihub.sign and ihub.verify_signature work with the pair;
    /// a rotation makes a key of the kind in use; bad keys and schemes are
    /// refused without echoing the key.
    #[pg_test]
    fn v1a_endpoints_sign_with_ed25519_keys() {
        setup();
        Spi::run("SELECT ihub.create_endpoint('shop', 'asym', 'https://a.example.com/', signature => 'v1a')").unwrap();
        let secret = one::<String>("SELECT secret FROM ihub.endpoint_secrets WHERE endpoint = 'asym'");
        assert!(secret.starts_with("whsk_"), "{secret}");
        let public = one::<String>("SELECT public_keys[1] FROM ihub.endpoints WHERE name = 'asym'");
        assert!(public.starts_with("whpk_"));
        assert!(one::<bool>(&format!(
            "SELECT ihub.verify_signature('{public}', ihub.sign('{secret}', 'msg_1', 1700000000, '{{}}'), 'msg_1', 1700000000, '{{}}')
                AND NOT ihub.verify_signature('{public}', ihub.sign('{secret}', 'msg_1', 1700000000, '{{}}'), 'msg_1', 1700000001, '{{}}')"
        )));
        let rotated = one::<String>("SELECT ihub.rotate_secret('asym')");
        assert!(rotated.starts_with("whsk_") && rotated != secret);
        assert_eq!(one::<i64>("SELECT cardinality(public_keys) FROM ihub.endpoints WHERE name = 'asym'"), 2);
        assert_eq!(
            one::<String>("SELECT array_to_string(signatures, ',') FROM ihub.endpoints WHERE name = 'hook'"),
            "v1"
        );
        expect_error(
            "SELECT ihub.create_endpoint('shop', 'b', 'https://b.example.com/', signature => 'v2')",
            &["invalid signature \"v2\"", "HINT: Use v1"],
        );
        expect_error(
            "SELECT ihub.create_endpoint('shop', 'b', 'https://b.example.com/', signature => 'v1a', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')",
            &["a whsec_ secret does not make v1a signatures"],
        );
        expect_error(
            "SELECT ihub.rotate_secret('asym', 'whsk_c2VjcmV0LXNlY3JldA==')",
            &["an ed25519 secret key is 32 bytes"],
        );
        let err = error_of("SELECT ihub.rotate_secret('asym', 'sk_hunter2')").unwrap();
        assert!(
            err.contains("must start with \"whsec_\" (HMAC, v1) or \"whsk_\"") && !err.contains("hunter2"),
            "{err}"
        );
    }

    /// A payload template renames, computes, nests the referenced row and
    /// the referencing rows (two levels), adds static fields and omits
    /// nulls; it is made in the writer's transaction, so related rows are
    /// as they were then. Bad templates are refused before anything is made.
    #[pg_test]
    fn payload_templates_shape_the_data_in_the_writers_transaction() {
        setup_enabled();
        Spi::run(
            "CREATE TABLE countries (code text PRIMARY KEY, name text);
             CREATE TABLE customers (id int PRIMARY KEY, name text, country text REFERENCES countries, note text);
             CREATE TABLE invoices (id int PRIMARY KEY, customer_id int REFERENCES customers, amount numeric, memo text);
             CREATE TABLE invoice_lines (id int PRIMARY KEY, invoice_id int REFERENCES invoices, sku text);
             INSERT INTO countries VALUES ('FR', 'France');
             INSERT INTO customers VALUES (7, 'Ada', 'FR', NULL);",
        )
        .unwrap();
        let sub = one::<i64>(
            r#"SELECT ihub.subscribe('invoices', 'hook', events => '{insert}', payload => '{
                 "rename": {"amount": "total"},
                 "compute": {"total_cents": "round(new.amount * 100)::int"},
                 "nest": {"customer": {"via": "customer_id", "omit": ["note"], "nest": {"country": {"via": "country"}}},
                          "lines": {"from": "invoice_lines", "via": "invoice_id", "rename": {"sku": "product"}}},
                 "static": {"source": "erp"},
                 "nulls": "omit"}')"#,
        );
        Spi::run(
            "INSERT INTO invoices VALUES (1, 7, 12.5, NULL);
             INSERT INTO invoice_lines VALUES (1, 1, 'A-1'), (2, 1, 'B-2');
             INSERT INTO invoices VALUES (2, 7, 3, 'second');
             UPDATE customers SET name = 'Ada L.' WHERE id = 7;",
        )
        .unwrap();
        Spi::run("SELECT count(*) FROM ihub._claim(4242, 100, 1000, 1)").unwrap();
        let data = |id: i32| {
            one::<pgrx::JsonB>(&format!(
                "SELECT payload -> 'data' FROM ihub.delivery WHERE subscription_id = {sub} AND payload -> 'data' ->> 'id' = '{id}'"
            ))
            .0
        };
        assert_eq!(
            data(1),
            serde_json::json!({"id": 1, "customer_id": 7, "total": 12.5, "total_cents": 1250, "source": "erp",
                               "customer": {"id": 7, "name": "Ada", "country": {"code": "FR", "name": "France"}},
                               "lines": []}),
            "lines inserted after the invoice's statement are not there; nulls omitted"
        );
        assert_eq!(data(2)["lines"], serde_json::json!([]));
        assert_eq!(data(2)["memo"], "second");
        let bad = [
            (r#"{"nest": {"c": {"via": "amount"}}}"#, "has no single-column foreign key on column amount"),
            (r#"{"nest": {"c": {"via": "nope"}}}"#, "has no column nope"),
            (r#"{"compute": {"x": "new.amount; DROP TABLE invoices"}}"#, "compute x must be one SQL expression"),
            (r#"{"compute": {"x": "new.nothing + 1"}}"#, "invalid payload template"),
            (r#"{"rename": {"nothing": "x"}}"#, "cannot rename nothing"),
            (r#"{"colour": "red"}"#, "unknown key colour"),
            (r#"{"nulls": "maybe"}"#, "nulls must be keep or omit"),
        ];
        for (template, message) in bad {
            expect_error(&format!("SELECT ihub.subscribe('invoices', 'hook', payload => '{template}')"), &[message]);
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.subscription"), 1, "nothing half-made");
        // Related rows are read as the subscriber: one who may not read
        // them cannot nest them.
        Spi::run(
            "CREATE ROLE ihub_t_sub NOLOGIN IN ROLE ihub_developer;
             GRANT SELECT, TRIGGER ON invoices TO ihub_t_sub;",
        )
        .unwrap();
        expect_error(
            r#"SELECT set_config('role', 'ihub_t_sub', true),
                      ihub.subscribe('invoices', 'hook', payload => '{"nest": {"c": {"via": "customer_id"}}}')"#,
            &["permission denied for table public.customers", "role ihub_t_sub needs SELECT"],
        );
    }

    /// A timed subscription keeps one timer per matching row at column +
    /// offset, moves it with the column, drops it when the row is deleted or
    /// stops matching, and fires each due timer once as a delivery.
    #[pg_test]
    fn timed_subscriptions_keep_one_timer_per_matching_row() {
        setup_enabled();
        Spi::run(
            "CREATE TABLE tickets (id int PRIMARY KEY, status text, closed_at timestamptz);
             SELECT ihub.add_custom_field('tickets', 'internal_note', 'text');",
        )
        .unwrap();
        expect_error(
            "SELECT ihub.subscribe_timed('tickets', 'hook', 'status', '1 day')",
            &["column status of public.tickets is text, not a time"],
        );
        expect_error("SELECT ihub.subscribe_timed('tickets', 'hook', 'nope', '1 day')", &["has no column nope"]);
        let sub = one::<i64>(
            "SELECT ihub.subscribe_timed('tickets', 'hook', 'closed_at', '1 day', $$new.status = 'closed'$$)",
        );
        Spi::run(
            "INSERT INTO tickets VALUES (1, 'closed', now() - interval '2 days'), (2, 'closed', now()), (3, 'open', now()),
                                        (4, 'closed', now()), (5, 'closed', NULL);
             UPDATE tickets SET closed_at = now() - interval '3 days' WHERE id = 2;
             UPDATE tickets SET status = 'reopened' WHERE id = 4;",
        )
        .unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 100, 1000, 1)"), 2, "tickets 1 and 2 are due");
        assert_eq!(
            one::<String>("SELECT string_agg((row_key ->> 0) || ':' || (fired_at IS NOT NULL), ',' ORDER BY row_key ->> 0) FROM ihub.timers"),
            "1:true,2:true"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT string_agg(event_type || '/' || (payload -> 'data' ->> 'id'), ',' ORDER BY payload -> 'data' ->> 'id')
                 FROM ihub.delivery WHERE subscription_id = {sub}"
            )),
            "tickets.timer/1,tickets.timer/2"
        );
        assert!(
            one::<bool>(&format!("SELECT bool_and(NOT payload -> 'data' ? 'internal_note') FROM ihub.delivery WHERE subscription_id = {sub}")),
            "a custom field goes only to the integrations it is exported to"
        );
        // Once per due time: other changes do not send it again; a new
        // closed_at re-arms it; a delete drops it.
        Spi::run(
            "UPDATE tickets SET status = status WHERE id = 1;
             UPDATE tickets SET closed_at = now() + interval '1 hour' WHERE id = 2;
             DELETE FROM tickets WHERE id = 1;",
        )
        .unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 100, 1000, 1)"), 0);
        assert_eq!(
            one::<String>("SELECT string_agg((row_key ->> 0) || ':' || (fired_at IS NULL), ',') FROM ihub.timers"),
            "2:true"
        );
        assert!(one::<f64>("SELECT ihub._next_due()") > 3600.0 * 24.0);
    }

    /// Checking a subscriber's condition or template at subscribe parses it,
    /// and parsing reads literals with their types' input functions: a
    /// domain's CHECK is the role's own code. It runs as the subscriber,
    /// never as the extension owner ihub.subscribe runs as.
    #[pg_test]
    fn subscribe_checks_a_subscribers_sql_with_the_subscribers_rights() {
        setup_enabled();
        Spi::run(
            "CREATE ROLE ihub_t_dev2 NOLOGIN IN ROLE ihub_developer;
             CREATE TABLE seen_users (u name);
             GRANT INSERT ON seen_users TO ihub_t_dev2;
             CREATE FUNCTION record_user(t text) RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO public.seen_users VALUES (current_user) RETURNING true $$;
             ALTER FUNCTION record_user(text) OWNER TO ihub_t_dev2;
             CREATE DOMAIN dev_dom AS text CHECK (public.record_user(VALUE));
             ALTER DOMAIN dev_dom OWNER TO ihub_t_dev2;
             GRANT SELECT, TRIGGER ON orders TO ihub_t_dev2;",
        )
        .unwrap();
        Spi::run(
            "SELECT set_config('role', 'ihub_t_dev2', true),
                    ihub.subscribe('orders', 'hook', condition => $$'{x}'::public.dev_dom[] IS NOT NULL$$);
             SELECT set_config('role', 'ihub_t_dev2', true),
                    ihub.subscribe('orders', 'hook', payload => '{\"compute\": {\"d\": \"''{y}''::public.dev_dom[]\"}}');
             RESET ROLE;",
        )
        .unwrap();
        assert_eq!(one::<String>("SELECT string_agg(DISTINCT u::text, ',') FROM seen_users"), "ihub_t_dev2");
    }

    /// A rate-limited endpoint is claimed within its token bucket (one
    /// token to start with, refilled at the rate) and within max_in_flight;
    /// its routed changes wait as pending for that claim; other endpoints
    /// are claimed as before. (now() stands still in a test: no refill.)
    #[pg_test]
    fn a_limited_endpoint_is_claimed_within_its_rate_and_in_flight_limits() {
        setup_enabled();
        Spi::run(
            "SELECT ihub.alter_endpoint('hook', rate_limit => 4);
             SELECT ihub.subscribe('orders', 'hook');
             SELECT ihub.create_endpoint('shop', 'other', 'https://other.example.com/');
             SELECT ihub.http_request('hook', '{}') FROM generate_series(1, 10);
             SELECT ihub.http_request('other', '{}') FROM generate_series(1, 3);
             INSERT INTO orders (customer, amount) VALUES ('a', 1), ('b', 2);",
        )
        .unwrap();
        let claim = || {
            one::<String>(
                "SELECT coalesce(string_agg(url, ',' ORDER BY url), '') || ' ' || count(*)
                 FROM (SELECT DISTINCT ON (url) url FROM ihub._claim(4242, 100, 1000, 1)) c",
            )
        };
        let claimed = |url: &str| {
            one::<i64>(&format!(
                "SELECT count(*) FROM ihub.deliveries d WHERE state = 'running' AND endpoint = '{url}'"
            ))
        };
        claim();
        assert_eq!(claimed("other"), 3, "other endpoints are not held");
        assert_eq!(claimed("hook"), 1, "one token to start with");
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery WHERE subscription_id IS NOT NULL"), 2, "routed");
        claim();
        assert_eq!(claimed("hook"), 1, "no token left");
        let next = one::<f64>("SELECT ihub._next_due()");
        assert!(next > 0.0 && next <= 0.25, "the next token comes in 0.25 s: {next}");
        // A second's worth at most.
        Spi::run("UPDATE ihub.endpoint_state SET tokens = 100").unwrap();
        claim();
        assert_eq!(claimed("hook"), 5);
        // At most 7 in flight: two more, and the claim says it held some back.
        Spi::run("SELECT ihub.alter_endpoint('hook', max_in_flight => 7); UPDATE ihub.endpoint_state SET tokens = 100")
            .unwrap();
        claim();
        assert_eq!(claimed("hook"), 7);
        assert_eq!(one::<String>("SELECT current_setting('ihub_claim.in_flight_held')"), "on");
        assert!(one::<bool>("SELECT ihub._next_due() IS NULL"), "nothing to wake for until a request ends");
    }

    /// A subscription names its deliveries' event type; an endpoint accepts
    /// only the event types it lists (exact, or a prefix ending in *): the
    /// other changes are taken from the capture table and not queued, by a
    /// dispatcher (prepared statements) or any other session (text).
    #[pg_test]
    fn event_types_name_deliveries_and_endpoints_accept_only_theirs() {
        setup_enabled();
        expect_error(
            "SELECT ihub.subscribe('orders', 'hook', event_type => 'order paid')",
            &["invalid event type 'order paid'"],
        );
        expect_error(
            "SELECT ihub.alter_endpoint('hook', event_types => '{orders.*,*x}')",
            &["invalid event type '*x'", "HINT: Use names"],
        );
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', event_type => 'order.changed')");
        Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
        // (The claim's rows are read in a statement of their own: a join in
        // the claim's statement would not see the deliveries it made.)
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(pg_backend_pid(), 10, 1000, 1)"), 1);
        assert_eq!(
            one::<String>(
                "SELECT event_type || ' ' || (payload ->> 'type') FROM ihub.delivery WHERE state = 'running'"
            ),
            "order.changed order.changed"
        );
        Spi::run(&format!("SELECT ihub.unsubscribe({sub})")).unwrap();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', events => '{insert,update}')");
        Spi::run("SELECT ihub.alter_endpoint('hook', event_types => '{orders.ins*,invoice.paid}')").unwrap();
        let route = |owner: &str, customer: &str| {
            Spi::run(&format!(
                "INSERT INTO orders (customer, amount) VALUES ('{customer}', 2); UPDATE orders SET amount = 3 WHERE customer = '{customer}'"
            ))
            .unwrap();
            Spi::run("UPDATE ihub.delivery SET state = 'done', worker_pid = NULL WHERE state = 'running'").unwrap();
            Spi::run(&format!("SELECT count(*) FROM ihub._claim({owner}, 10, 1000, 1)")).unwrap();
            one::<String>("SELECT coalesce(string_agg(event_type, ',' ORDER BY id), '') FROM ihub.delivery WHERE state = 'running'")
        };
        assert_eq!(route("pg_backend_pid()", "b"), "orders.insert", "the update is not accepted");
        assert_eq!(route("4242", "c"), "orders.insert");
        assert_eq!(
            one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")),
            0,
            "the updates were taken all the same"
        );
        expect_error(
            "SELECT ihub.http_request('hook', '{}', event_type => 'invoice.void')",
            &["endpoint \"hook\" does not accept event type \"invoice.void\"", "It accepts orders.ins*, invoice.paid"],
        );
        Spi::run("SELECT ihub.http_request('hook', '{}', event_type => 'invoice.paid')").unwrap();
        Spi::run("SELECT ihub.alter_endpoint('hook', event_types => '{}')").unwrap();
        assert_eq!(route("4242", "d"), "invoice.paid,orders.insert,orders.update", "'{{}}' accepts all again");
    }

    /// A batch holds at most 32 MB of requests whose responses go to a
    /// handler (32 at the default ihub.max_response_size), whether they were
    /// claimed as due or through an endpoint's limits.
    #[pg_test]
    fn a_batch_holds_32_requests_with_handlers_however_they_were_claimed() {
        setup_enabled();
        Spi::run(
            "CREATE FUNCTION got(r ihub.http_response) RETURNS void LANGUAGE sql AS $$ SELECT $$;
             SELECT ihub.alter_endpoint('hook', max_in_flight => 1000);
             SELECT ihub.http_request('hook', '{}', on_response => 'got(ihub.http_response)') FROM generate_series(1, 40);",
        )
        .unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 100, 1000, 1)"), 32);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery WHERE state = 'pending'"), 8, "the rest wait, due");
    }

    /// A 429 holds every delivery to its endpoint until the answered
    /// delivery's retry, and the dispatcher wakes then.
    #[pg_test]
    fn a_429_pauses_the_whole_endpoint() {
        setup_enabled();
        Spi::run("SELECT ihub.http_request('hook', jsonb_build_object('n', g)) FROM generate_series(1, 3) g").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 3);
        Spi::run(
            "SELECT ihub._settle(4242, jsonb_agg(jsonb_build_object(
                 'delivery_id', id, 'state', 'retry', 'status', CASE WHEN id = (SELECT min(id) FROM ihub.delivery) THEN 429 ELSE 503 END,
                 'next_at', extract(epoch FROM now() + CASE WHEN id = (SELECT min(id) FROM ihub.delivery) THEN interval '30 seconds' ELSE interval '0' END),
                 'error', 'busy', 'category', CASE WHEN id = (SELECT min(id) FROM ihub.delivery) THEN 'rate_limited' ELSE 'http_5xx' END,
                 'request_headers', '{}'::jsonb, 'response_headers', '{}'::jsonb, 'response_body', '', 'started_at', 0, 'duration_ms', 1)))
             FROM ihub.delivery WHERE state = 'running'",
        )
        .unwrap();
        assert!(one::<bool>(
            "SELECT abs(extract(epoch FROM paused_until - now()) - 30) < 0.001 FROM ihub.endpoints WHERE name = 'hook'"
        ));
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 0, "the 503s wait with it");
        let next = one::<f64>("SELECT ihub._next_due()");
        assert!(next > 29.0 && next <= 30.0, "{next}");
    }

    /// Settling rewrites each delivery on its own page (half of each page is
    /// kept free for it): Postgres then logs only the changed part of the
    /// row, not its payload again, and no lock of the old version.
    #[pg_test]
    fn settled_deliveries_stay_on_their_pages() {
        setup_enabled();
        Spi::run("SELECT ihub.subscribe('orders', 'hook')").unwrap();
        Spi::run("INSERT INTO orders (customer, amount) SELECT 'customer ' || g, g FROM generate_series(1, 500) g")
            .unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(pg_backend_pid(), 500, 1000, 1)"), 500);
        Spi::run("CREATE TEMP TABLE claimed AS SELECT id, (ctid::text::point)[0] AS block FROM ihub.delivery").unwrap();
        let settled = one::<i64>(
            "SELECT ihub._settle(pg_backend_pid(), jsonb_agg(jsonb_build_object(
                 'delivery_id', id, 'state', 'done', 'next_at', 0, 'status', 200, 'error', NULL,
                 'category', 'ok', 'request_headers', '{}'::jsonb, 'response_headers', '{}'::jsonb,
                 'response_body', 'ok', 'started_at', 0, 'duration_ms', 1)))
             FROM ihub.delivery WHERE state = 'running'",
        );
        assert_eq!(settled, 500);
        let moved = one::<i64>(
            "SELECT count(*) FROM ihub.delivery d JOIN claimed c USING (id)
             WHERE d.state = 'done' AND (d.ctid::text::point)[0] <> c.block",
        );
        assert_eq!(moved, 0, "settled deliveries moved to other pages");
        assert!(one::<i64>("SELECT count(DISTINCT block) FROM claimed") > 1);
    }

    #[pg_test]
    fn failed_attempts_are_logged_one_entry_a_minute_per_endpoint_and_outcome() {
        // A retry storm logged an entry per dispatcher round and one per
        // dead delivery: thousands a wave.
        setup_enabled();
        let settle_all = |state: &str| {
            Spi::run("SELECT count(*) FROM ihub._claim(pg_backend_pid(), 100, 1000, 1)").unwrap();
            one::<i64>(&format!(
                "SELECT ihub._settle(pg_backend_pid(), jsonb_agg(jsonb_build_object(
                     'delivery_id', id, 'state', '{state}', 'next_at', 0, 'status', 503, 'error', 'HTTP 503 from ' || id,
                     'category', 'http_5xx', 'request_headers', '{{}}'::jsonb, 'response_headers', '{{}}'::jsonb,
                     'response_body', '', 'started_at', 0, 'duration_ms', 1)))
                 FROM ihub.delivery WHERE state = 'running'"
            ))
        };
        for round in 0..3 {
            Spi::run("SELECT ihub.http_request('hook', '{}') FROM generate_series(1, 4)").unwrap();
            assert_eq!(settle_all(if round < 2 { "retry" } else { "dead" }), 4);
            Spi::run("UPDATE ihub.delivery SET state = 'done' WHERE state = 'retry'").unwrap();
        }
        let entries = "SELECT string_agg(level || ' ' || message || ' ' || (details ->> 'deliveries_failed'), ' | ' ORDER BY level DESC)
                       FROM ihub.logs WHERE details ->> 'endpoint' = 'hook'";
        let logged = one::<String>(entries);
        assert!(
            logged.starts_with("warning 8 deliveries to hook failed and will be retried: HTTP 503 from "),
            "{logged}"
        );
        assert!(
            logged.contains(" | error 4 deliveries to hook are dead, their retries exhausted: HTTP 503"),
            "{logged}"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.logs WHERE details ->> 'endpoint' = 'hook'"), 2);
    }

    #[pg_test]
    fn claim_and_settle_move_deliveries_through_their_states() {
        setup();
        Spi::run("SELECT ihub.enable_integration('shop')").unwrap();
        assert_eq!(Spi::get_one::<f64>("SELECT ihub._next_due()").unwrap(), None, "an empty queue is never due");
        let id = one::<i64>("SELECT ihub.http_request('hook', '{\"a\": 1}')");
        assert_eq!(one::<f64>("SELECT ihub._next_due()"), 0.0);
        let claimed = one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)");
        assert_eq!(claimed, 1);
        assert_eq!(
            one::<String>(&format!("SELECT state || ':' || worker_pid FROM ihub.delivery WHERE id = {id}")),
            "running:4242"
        );
        // The lease covers the timeout (the 1 s default passed here, one round) plus 30 s.
        assert!(one::<bool>(&format!(
            "SELECT lease_until - now() BETWEEN interval '30 s' AND interval '32 s' FROM ihub.delivery WHERE id = {id}"
        )));
        // Another worker's settle does not touch a delivery it does not hold.
        let results = format!(
            r#"[{{"delivery_id": {id}, "state": "retry", "next_at": 0, "status": 500, "error": "boom", "category": "http_5xx",
                 "request_headers": {{}}, "response_headers": {{}}, "response_body": "", "started_at": 0, "duration_ms": 1}}]"#
        );
        assert_eq!(one::<i64>(&format!("SELECT ihub._settle(1, '{results}')")), 0);
        assert_eq!(one::<i64>(&format!("SELECT ihub._settle(4242, '{results}')")), 1);
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ':' || attempts || ':' || last_status FROM ihub.deliveries WHERE id = {id}"
            )),
            "retry:1:500"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery_attempts"), 1);
        // A lease held by a process that does not exist is rescued.
        Spi::run(&format!("UPDATE ihub.delivery SET state = 'running', worker_pid = 2147483000, lease_until = now() + interval '1 hour' WHERE id = {id}")).unwrap();
        assert_eq!(one::<i64>("SELECT ihub._rescue()"), 1);
        assert_eq!(one::<String>(&format!("SELECT state FROM ihub.delivery WHERE id = {id}")), "retry");
    }

    /// Changes for a disabled endpoint are routed (the capture table is
    /// drained) but wait as pending deliveries, never handed to the sender.
    #[pg_test]
    fn a_disabled_endpoint_gets_its_changes_queued_not_sent() {
        setup_enabled();
        Spi::run("SELECT ihub.subscribe('orders', 'hook'); SELECT ihub.disable_endpoint('hook')").unwrap();
        Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 0, "nothing to send");
        assert_eq!(one::<String>("SELECT state || ':' || (worker_pid IS NULL) FROM ihub.delivery"), "pending:true");
        Spi::run("SELECT ihub.enable_endpoint('hook')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim(4242, 10, 1000, 1)"), 1);
    }

    /// A batch for several endpoints: each request gets its own endpoint's
    /// URL, headers, auth and signing secrets, whatever else is claimed.
    #[pg_test]
    fn a_batch_for_several_endpoints_gets_each_its_own_settings_and_secrets() {
        setup_enabled();
        Spi::run(
            "SELECT ihub.create_endpoint('shop', 'other', 'https://other.example.com/in', headers => '{\"x-a\": \"1\"}',
                                         auth => '{\"type\": \"bearer\", \"token\": \"t-other-123\"}');
             SELECT ihub.create_endpoint('shop', 'idle', 'https://idle.example.com/');
             SELECT ihub.http_request(e, jsonb_build_object('n', g)) FROM unnest('{hook,other}'::text[]) e, generate_series(1, 3) g",
        )
        .unwrap();
        let secret = |e: &str| {
            one::<String>(&format!("SELECT secret FROM ihub.endpoint_secrets WHERE endpoint = '{e}' AND signing"))
        };
        let claimed = one::<String>(
            "SELECT string_agg(url || ' ' || headers::text || ' ' || coalesce(auth ->> 'type', '-') || ' ' || array_to_string(secrets, ','),
                               ' | ' ORDER BY delivery_id)
             FROM ihub._claim(4242, 10, 1000, 1)",
        );
        let (hook, other) = (secret("hook"), secret("other"));
        let hook_request = format!("https://hooks.example.com/orders {{}} - {hook}");
        let other_request = format!("https://other.example.com/in {{\"x-a\": \"1\"}} bearer {other}");
        assert_eq!(
            claimed,
            [&hook_request, &hook_request, &hook_request, &other_request, &other_request, &other_request]
                .map(|s| s.as_str())
                .join(" | ")
        );
    }

    /// Rows of a table read by the statements since the transaction began.
    fn rows_read(table: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables WHERE relid = '{table}'::regclass"
        ))
    }

    /// Queues 1,000 rows due in an hour or later with `queue`, then checks
    /// that `next_due` finds the first of them reading at most two rows,
    /// with the statistics of an empty queue (a drained one, analyzed).
    fn next_due_reads_only_the_earliest(table: &str, queue: &str, next_due: &str) {
        Spi::run(&format!("ANALYZE {table}")).unwrap();
        Spi::run(queue).unwrap();
        let before = rows_read(table);
        let due = one::<f64>(&format!("SELECT {next_due}"));
        assert!((3600.0..3602.0).contains(&due), "due in {due} s");
        let read = rows_read(table) - before;
        assert!(read <= 2, "{next_due} read {read} rows of {table} to find the next one due");
    }

    /// An idle dispatcher asks when the next delivery is due. It read every
    /// queued delivery to answer: 33 ms a call after make bench's outbound
    /// part, at each idle round of a retry storm.
    #[pg_test]
    fn the_next_due_time_reads_only_the_earliest_delivery() {
        setup_enabled();
        next_due_reads_only_the_earliest(
            "ihub.delivery",
            "INSERT INTO ihub.delivery (event_id, endpoint_id, event_type, payload, state, run_at)
             SELECT 'evt_' || g, e.id, 'x', '{}', 'retry', now() + interval '1 hour' + g * interval '1 second'
             FROM ihub.endpoint e, generate_series(1, 1000) g",
            "ihub._next_due()",
        );
    }

    /// The same for an idle inbound processor.
    #[pg_test]
    fn the_next_inbound_due_time_reads_only_the_earliest_item() {
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        next_due_reads_only_the_earliest(
            "ihub.inbound_item",
            "INSERT INTO ihub.inbound_item (source_id, headers, body, run_at)
             SELECT s.id, '{}', '{}', now() + interval '1 hour' + g * interval '1 second'
             FROM ihub.inbound_source s, generate_series(1, 1000) g",
            "ihub._next_inbound_due()",
        );
    }

    /// A dispatcher session plans its queue statements once and keeps the
    /// plans. Planned while the delivery table was tiny, they were sequential
    /// scans, kept while the table grew: in make bench, claiming 60
    /// deliveries took 12 ms instead of 0.16 in one run of three.
    #[pg_test]
    fn claim_and_settle_keep_using_indexes_after_the_queue_grows() {
        setup_enabled();
        Spi::run("SELECT ihub.subscribe('orders', 'hook')").unwrap();
        let round = || {
            Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
            let id = one::<i64>("SELECT delivery_id FROM ihub._claim(4242, 10, 1000, 1)");
            let done = format!(
                r#"[{{"delivery_id": {id}, "state": "done", "status": 200, "category": "ok", "request_headers": {{}},
                     "response_headers": {{}}, "response_body": "", "started_at": 0, "duration_ms": 1}}]"#
            );
            assert_eq!(one::<i64>(&format!("SELECT ihub._settle(4242, '{done}')")), 1);
            assert_eq!(Spi::get_one::<f64>("SELECT ihub._next_due()").unwrap(), None);
            one::<i64>("SELECT ihub._rescue()");
        };
        // More rounds than the plan cache needs to settle on generic plans.
        for _ in 0..10 {
            round();
        }
        Spi::run(
            "INSERT INTO ihub.delivery (event_id, endpoint_id, event_type, payload, state)
             SELECT 'evt_' || g, endpoint_id, 'x', '{}', 'done' FROM ihub.delivery, generate_series(1, 20000) g LIMIT 20000",
        )
        .unwrap();
        let scans =
            || one::<i64>("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'ihub.delivery'::regclass");
        let before = scans();
        round();
        assert_eq!(scans(), before, "a round scanned the whole delivery table");
    }

    /// A dispatcher (the claim's owner is the session itself) routes with
    /// statements prepared once in its session. They follow a capture table
    /// made again with new columns; session settings say they exist, and a
    /// rolled-back route that lost those settings finds them again. A
    /// session keeps at most 300.
    #[pg_test]
    fn a_dispatcher_routes_with_prepared_statements_that_follow_the_table() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook')");
        let route = || {
            Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
            one::<String>("SELECT body FROM ihub._claim(pg_backend_pid(), 10, 1000, 1)")
        };
        let prepared =
            |like: &str| one::<i64>(&format!("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '{like}'"));
        let counted = || one::<String>("SELECT current_setting('ihub_route.prepared')");
        let mine = format!("ihub\\_route\\_{sub}\\_%");
        assert!(route().contains(r#""customer": "a""#));
        assert_eq!(prepared(&mine), 3, "take, wrap and render are prepared");
        assert_eq!(counted(), "3");
        route();
        assert_eq!(prepared(&mine), 3, "and prepared once");

        // The capture table is made again with the table's new row type.
        Spi::run("ALTER TABLE orders ADD COLUMN note text DEFAULT 'hello'").unwrap();
        let after = route();
        assert!(after.contains(r#""note": "hello""#), "{after}");

        // Dropped (as a dispatcher does past 300), they are prepared again,
        // and counted with every other route statement of the session.
        Spi::run("SELECT ihub._route_forget()").unwrap();
        assert_eq!(prepared("ihub\\_route\\_%"), 0);
        assert_eq!(counted(), "0");
        Spi::run("DO $$ BEGIN FOR i IN 1..5 LOOP EXECUTE format('PREPARE ihub_route_x%s_take AS SELECT 1', i); END LOOP; END $$")
            .unwrap();
        assert!(route().contains(r#""note": "hello""#));
        assert_eq!(prepared(&mine), 3);
        assert_eq!(counted(), "8");

        // A route rolled back after preparing keeps the statements and loses
        // the settings: the next route finds them (PREPARE again would fail).
        Spi::run("SELECT ihub._route_forget()").unwrap();
        Spi::run(
            "DO $$ BEGIN
                 BEGIN
                     INSERT INTO orders (customer, amount) VALUES ('b', 2);
                     PERFORM count(*) FROM ihub._claim(pg_backend_pid(), 10, 1000, 1);
                     RAISE EXCEPTION 'undone';
                 EXCEPTION WHEN raise_exception THEN NULL;
                 END;
             END $$",
        )
        .unwrap();
        assert_eq!(prepared(&mine), 3, "prepared in the rolled-back route");
        assert_eq!(counted(), "0", "the count was rolled back with it");
        assert!(route().contains(r#""customer": "a""#));
        assert_eq!(counted(), "3");

        // A session holding 300 routes further subscriptions as text.
        Spi::run("SELECT ihub._route_forget()").unwrap();
        Spi::run("DO $$ BEGIN FOR i IN 1..300 LOOP EXECUTE format('PREPARE ihub_route_x%s_take AS SELECT 1', i); END LOOP; END $$")
            .unwrap();
        assert!(route().contains(r#""customer": "a""#));
        assert!(route().contains(r#""customer": "a""#));
        assert_eq!(prepared(&mine), 0, "past 300, nothing more is prepared");
        assert_eq!(counted(), "300", "and the dispatcher sees it is full");
        Spi::run("SELECT ihub._route_forget()").unwrap();
        assert!(route().contains(r#""customer": "a""#));
        assert_eq!(prepared("ihub\\_route\\_%"), 3);
    }

    #[pg_test]
    fn signing_helpers_match_the_standard_webhooks_vector() {
        let sig = one::<String>(
            "SELECT ihub.sign('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{\"test\": 2432232314}')",
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(one::<bool>(
            "SELECT ihub.verify_signature('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'v1,x v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=',
                                          'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{\"test\": 2432232314}')"
        ));
    }

    #[pg_test]
    fn every_object_has_a_comment() {
        let missing = Spi::get_one::<String>(
            "SELECT string_agg(what, ', ') FROM (
                 SELECT 'relation ' || c.oid::regclass AS what FROM pg_class c
                 WHERE c.relnamespace = 'ihub'::regnamespace AND c.relkind IN ('r', 'v', 'p')
                   AND obj_description(c.oid, 'pg_class') IS NULL
                 UNION ALL
                 SELECT 'function ' || p.oid::regprocedure FROM pg_proc p
                 WHERE p.pronamespace = 'ihub'::regnamespace AND obj_description(p.oid, 'pg_proc') IS NULL
             ) m",
        )
        .unwrap();
        assert_eq!(missing, None, "objects without COMMENT ON");
    }

    fn route_all(sub: i64) -> i64 {
        one::<i64>(&format!(
            "SELECT count(*) FROM ihub._route((SELECT s FROM ihub.subscription s WHERE id = {sub}), NULL, NULL)"
        ))
    }

    #[pg_test]
    fn the_bulk_capture_trigger_feeds_only_its_own_table() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', events => '{insert}')");
        let capture = format!("ihub_capture.sub_{sub}");
        Spi::run("CREATE TABLE other (id bigserial PRIMARY KEY, customer text, amount numeric, status text)").unwrap();
        Spi::run(&format!(
            "CREATE TRIGGER forged AFTER INSERT ON other REFERENCING NEW TABLE AS n FOR EACH STATEMENT
             EXECUTE FUNCTION ihub._capture_rows('{capture}')"
        ))
        .unwrap();
        expect_error(
            "INSERT INTO other (customer, amount) VALUES ('mallory', 1)",
            &["does not hold rows of this table"],
        );
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 0);
        // Only the extension owner may attach it at all.
        Spi::run(
            "CREATE ROLE ihub_test_owner NOLOGIN IN ROLE ihub_developer; ALTER TABLE other OWNER TO ihub_test_owner",
        )
        .unwrap();
        expect_error(
            &format!(
                "SET LOCAL ROLE ihub_test_owner; CREATE TRIGGER forged2 AFTER INSERT ON other REFERENCING NEW TABLE AS n
                 FOR EACH STATEMENT EXECUTE FUNCTION ihub._capture_rows('{capture}')"
            ),
            &["permission denied"],
        );
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn bulk_capture_keeps_every_row_and_large_values() {
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', events => '{insert,delete}')");
        // More than one multi-insert batch (1,000 rows), and one value stored
        // out of line in TOAST (incompressible, 100 kB).
        Spi::run(
            "INSERT INTO orders (customer, amount) SELECT 'c' || g, g FROM generate_series(1, 2500) g;
             INSERT INTO orders (customer, amount)
                 SELECT string_agg(md5(g::text || random()::text), ''), 1 FROM generate_series(1, 3200) g;",
        )
        .unwrap();
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 2501);
        Spi::run("DELETE FROM orders WHERE amount = 1").unwrap();
        assert_eq!(route_all(sub), 2503);
        let sizes = one::<String>(
            "SELECT string_agg(length(payload #>> '{data,customer}')::text, ',' ORDER BY id)
             FROM ihub.delivery WHERE length(payload #>> '{data,customer}') > 1000",
        );
        assert_eq!(sizes, "102400,102400", "the large value arrives whole, inserted and deleted");
        let ids = one::<i64>(
            "SELECT count(DISTINCT payload #>> '{data,id}') FROM ihub.delivery WHERE event_type = 'orders.insert'",
        );
        assert_eq!(ids, 2501);
    }

    #[pg_test]
    fn partitioned_tables_and_changed_columns_are_captured() {
        setup_enabled();
        Spi::run(
            "CREATE TABLE events (id int, region text, dropped int, body text) PARTITION BY LIST (region);
             CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
             CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
             ALTER TABLE events DROP COLUMN dropped;",
        )
        .unwrap();
        let sub = one::<i64>("SELECT ihub.subscribe('events', 'hook')");
        Spi::run(
            "INSERT INTO events VALUES (1, 'eu', 'a'), (2, 'us', 'b');
             ALTER TABLE events ADD COLUMN added text DEFAULT 'x';
             INSERT INTO events VALUES (3, 'eu', 'c', 'y');
             UPDATE events SET region = 'us', body = 'moved' WHERE id = 1;",
        )
        .unwrap();
        // Adding a column delivered the two rows captured before it (with the
        // columns they had), then made the capture table again.
        assert_eq!(route_all(sub), 2);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery"), 4);
        let payloads = one::<String>(
            "SELECT string_agg(payload->>'type' || ':' || (payload->'data')::text, ' | ' ORDER BY id) FROM ihub.delivery",
        );
        assert_eq!(
            payloads,
            "events.insert:{\"id\": 1, \"body\": \"a\", \"region\": \"eu\"} | \
             events.insert:{\"id\": 2, \"body\": \"b\", \"region\": \"us\"} | \
             events.insert:{\"id\": 3, \"body\": \"c\", \"added\": \"y\", \"region\": \"eu\"} | \
             events.update:{\"id\": 1, \"body\": \"moved\", \"added\": \"x\", \"region\": \"us\"}"
        );
    }

    fn setup_jobs() {
        Spi::run(
            "CREATE TABLE effects (id serial, note text);
             CREATE FUNCTION note_it(args jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO effects (note) VALUES (args->>'note') $$;
             CREATE FUNCTION takes_int(n int) RETURNS void LANGUAGE sql AS $$ SELECT $$;",
        )
        .unwrap();
    }

    #[pg_test]
    fn enqueue_checks_the_function_and_its_arguments() {
        setup_jobs();
        expect_error("SELECT ihub.enqueue('takes_int(int)')", &["cannot run as a job", "one jsonb argument"]);
        expect_error("SELECT ihub.enqueue('now()')", &["cannot run as a job"]);
        expect_error("SELECT ihub.enqueue('nope(jsonb)')", &["does not exist"]);
        expect_error("SELECT ihub.enqueue('note_it(jsonb)', '[1]')", &["must be a JSON object"]);
        expect_error("SELECT ihub.enqueue('note_it(jsonb)', priority => -1)", &["priority"]);
        expect_error("SELECT ihub.enqueue('note_it(jsonb)', max_attempts => 0)", &["max_attempts"]);
        expect_error("SELECT ihub.enqueue('note_it(jsonb)', timeout => '-1 s')", &["positive"]);
        expect_error("SELECT ihub.enqueue('note_it(jsonb)', integration => 'nope')", &["does not exist"]);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.job"), 0);
        Spi::run("CREATE ROLE ihub_test_jobber NOLOGIN IN ROLE ihub_developer; REVOKE EXECUTE ON FUNCTION note_it(jsonb) FROM PUBLIC")
            .unwrap();
        expect_error(
            "SET LOCAL ROLE ihub_test_jobber; SELECT ihub.enqueue('note_it(jsonb)')",
            &["may not execute", "grant it EXECUTE"],
        );
        Spi::run("RESET ROLE").unwrap();
        let id = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', '{\"note\": \"x\"}', priority => 0)");
        assert_eq!(
            one::<String>(&format!("SELECT state || ':' || run_as::text FROM ihub.jobs WHERE id = {id}")),
            "pending:postgres"
        );
    }

    #[pg_test]
    fn identity_keys_keep_one_job_queued() {
        setup_jobs();
        let first = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', identity_key => 'sync:acme')");
        let again = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', '{\"other\": 1}', identity_key => 'sync:acme')");
        assert_eq!(first, again);
        let other = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', identity_key => 'sync:other')");
        assert_ne!(first, other);
        Spi::run(&format!("UPDATE ihub.job SET state = 'done' WHERE id = {first}")).unwrap();
        let fresh = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', identity_key => 'sync:acme')");
        assert_ne!(first, fresh, "a finished job no longer holds its key");
    }

    #[pg_test]
    fn a_failed_attempt_is_decided_with_the_right_schedule() {
        setup_jobs();
        Spi::run("SELECT ihub.create_integration('crm', settings => '{\"job_retry_schedule\": [\"2 minutes\", \"4 minutes\"]}')").unwrap();
        let job = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', max_attempts => 3)");
        assert_eq!(one::<i64>("SELECT id FROM ihub._claim_job(4242, 1000)"), job);
        let inputs = || {
            one::<String>(&format!(
                "SELECT concat_ws(':', attempts, max_attempts, cancel_requested, schedule_s::text) FROM ihub._job_attempt({job}, 4242)"
            ))
        };
        assert_eq!(inputs(), "1:3:f:{300,900,3600,10800}", "the default schedule");
        Spi::run(&format!("UPDATE ihub.job SET integration_id = (SELECT id FROM ihub.integration WHERE name = 'crm') WHERE id = {job}")).unwrap();
        assert_eq!(inputs(), "1:3:f:{120,240}", "the integration's schedule");
        Spi::run(&format!(
            "UPDATE ihub.job SET retry_schedule = '{{10 seconds, 1 day}}', cancel_requested = true WHERE id = {job}"
        ))
        .unwrap();
        assert_eq!(inputs(), "1:3:t:{10,86400}", "the job's own schedule");
        assert_eq!(
            one::<i64>(&format!("SELECT count(*) FROM ihub._job_attempt({job}, 4243)")),
            0,
            "another worker's job"
        );
    }

    #[pg_test]
    fn jobs_a_batch_did_not_start_go_back_as_they_were() {
        setup_jobs();
        let fresh = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)')");
        let retried = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)')");
        Spi::run(&format!("UPDATE ihub.job SET state = 'retry', attempts = 1 WHERE id = {retried}")).unwrap();
        let claimed = one::<i64>("SELECT count(*) FROM ihub._claim_jobs(4242, 1000, 10, 1)");
        assert_eq!(claimed, 2);
        assert_eq!(
            one::<i64>(&format!("SELECT ihub._unclaim_jobs(ARRAY[{fresh}, {retried}], 4243)")),
            0,
            "another worker's jobs stay"
        );
        assert_eq!(one::<i64>(&format!("SELECT ihub._unclaim_jobs(ARRAY[{fresh}, {retried}], 4242)")), 2);
        assert_eq!(
            one::<String>("SELECT string_agg(state || ':' || attempts || ':' || (worker_pid IS NULL), ' ' ORDER BY id) FROM ihub.job"),
            "pending:0:true retry:1:true",
            "back as they were, their attempt uncounted"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim_jobs(4243, 1000, 10, 1)"), 2, "for any worker");
    }

    #[pg_test]
    fn job_attempts_move_through_their_states() {
        setup_jobs();
        let job = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)', max_attempts => 2)");
        assert_eq!(one::<i64>("SELECT id FROM ihub._claim_job(4242, 1000)"), job);
        assert_eq!(
            one::<String>(&format!("SELECT state || ':' || attempts FROM ihub.job WHERE id = {job}")),
            "running:1"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM ihub._claim_job(4243, 1000)"),
            0,
            "a running job is not claimed twice"
        );
        // Someone else's failure report is ignored.
        assert_eq!(
            Spi::get_one::<String>(&format!("SELECT ihub._job_failed({job}, 1, 'x', 'retry', 30)")).unwrap(),
            None
        );
        assert_eq!(one::<String>(&format!("SELECT ihub._job_failed({job}, 4242, 'boom', 'retry', 30)")), "retry");
        assert!(one::<bool>(&format!(
            "SELECT run_at BETWEEN now() + interval '29 s' AND now() + interval '31 s' FROM ihub.job WHERE id = {job}"
        )));
        Spi::run(&format!("UPDATE ihub.job SET run_at = now() WHERE id = {job}")).unwrap();
        assert_eq!(one::<i64>("SELECT id FROM ihub._claim_job(4242, 1000)"), job);
        assert_eq!(
            one::<String>(&format!("SELECT ihub._job_failed({job}, 4242, 'boom again', 'failed', NULL)")),
            "failed"
        );
        assert_eq!(one::<String>("SELECT last_error FROM ihub.jobs"), "boom again");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM ihub.logs WHERE level = 'error' AND message LIKE '%boom again%'"),
            1
        );
        // A decision that does not add up is refused.
        let other = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)')");
        assert_eq!(one::<i64>("SELECT id FROM ihub._claim_job(4242, 1000)"), other);
        expect_error(
            &format!("SELECT ihub._job_failed({other}, 4242, 'x', 'retry', NULL)"),
            &["a failed job goes to retry"],
        );
        expect_error(
            &format!("SELECT ihub._job_failed({other}, 4242, 'x', 'done', NULL)"),
            &["a failed job goes to retry"],
        );
        Spi::run(&format!("DELETE FROM ihub.job WHERE id = {other}")).unwrap();
        // Retried by hand with a fresh budget.
        Spi::run(&format!("SELECT ihub.retry_job({job})")).unwrap();
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ':' || attempts || ':' || budget_start FROM ihub.job WHERE id = {job}"
            )),
            "pending:2:2"
        );
        expect_error(&format!("SELECT ihub.retry_job({job})"), &["is pending"]);
        // Cancelled while queued; cancelling a finished one is refused.
        assert_eq!(one::<String>(&format!("SELECT ihub.cancel_job({job})")), "cancelled");
        expect_error(&format!("SELECT ihub.cancel_job({job})"), &["is cancelled", "retry_job"]);
        expect_error("SELECT ihub.cancel_job(-5)", &["does not exist"]);
        // A job left running by a process that does not exist is rescued.
        Spi::run(&format!("UPDATE ihub.job SET state = 'running', worker_pid = 2147483000 WHERE id = {job}")).unwrap();
        let report = one::<String>("SELECT problem || ' -> ' || action FROM ihub.resume_stuck_jobs()");
        assert_eq!(report, "its worker is gone -> queued again");
        assert_eq!(one::<String>(&format!("SELECT state FROM ihub.job WHERE id = {job}")), "retry");
    }

    #[pg_test]
    fn schedules_check_their_timing() {
        setup_jobs();
        let s = "SELECT ihub.schedule('s1', 'note_it(jsonb)'";
        expect_error(&format!("{s})"), &["exactly one of every and cron"]);
        expect_error(&format!("{s}, every => '1 minute', cron => '* * * * *')"), &["exactly one"]);
        expect_error(&format!("{s}, every => '-1 minute')"), &["positive interval"]);
        expect_error(&format!("{s}, cron => '61 * * * *')"), &["invalid cron expression", "five fields"]);
        expect_error(&format!("{s}, cron => '* * * * * *')"), &["invalid cron expression"]);
        expect_error("SELECT ihub.schedule('s1', 'takes_int(int)', every => '1 minute')", &["cannot run as a job"]);
        expect_error(&format!("{s}, every => '1 minute', integration => 'nope')"), &["does not exist"]);
        Spi::run("CREATE ROLE ihub_test_other NOLOGIN; CREATE ROLE ihub_test_planner NOLOGIN IN ROLE ihub_developer")
            .unwrap();
        expect_error(
            &format!("SET LOCAL ROLE ihub_test_planner; {s}, every => '1 minute', run_as => 'ihub_test_other')"),
            &["may not schedule actions that run as"],
        );
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.schedule"), 0, "nothing half-made");

        Spi::run(&format!("{s}, cron => '*/5 * * * *')")).unwrap();
        expect_error(&format!("{s}, every => '1 hour')"), &["already exists"]);
        assert!(one::<bool>(
            "SELECT next_run_at > now() AND next_run_at <= now() + interval '5 minutes'
                AND extract(minute FROM next_run_at)::int % 5 = 0 AND extract(second FROM next_run_at) = 0
             FROM ihub.schedules WHERE name = 's1'"
        ));
        Spi::run("SELECT ihub.schedule('s2', 'note_it(jsonb)', every => '1 hour')").unwrap();
        assert!(one::<bool>("SELECT next_run_at = now() + interval '1 hour' FROM ihub.schedule WHERE name = 's2'"));
        // An every-schedule keeps its phase when runs were missed.
        assert_eq!(
            one::<String>(
                "SELECT (ihub._schedule_next(s, s.next_run_at + interval '150 minutes') - s.next_run_at)::text
                 FROM ihub.schedule s WHERE name = 's2'"
            ),
            "03:00:00"
        );
        Spi::run("SELECT ihub.alter_schedule('s2', active => false)").unwrap();
        assert_eq!(
            one::<String>("SELECT coalesce(next_run_at::text, 'none') FROM ihub.schedules WHERE name = 's2'"),
            "none"
        );
        Spi::run("SELECT ihub.unschedule('s2')").unwrap();
        expect_error("SELECT ihub.run_now('s2')", &["does not exist", "ihub.schedule"]);
    }

    #[pg_test]
    fn capture_triggers_name_their_capture_table_so_that_a_restore_keeps_them_working() {
        // A dumped trigger keeps its arguments as written: an OID would point
        // nowhere after a restore.
        setup_enabled();
        let sub = one::<i64>("SELECT ihub.subscribe('orders', 'hook', events => '{insert}')");
        let def = one::<String>(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal",
        );
        assert!(def.contains(&format!("'ihub_capture.sub_{sub}'")), "{def}");
        Spi::run("INSERT INTO orders (customer, amount) VALUES ('a', 1)").unwrap();
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ihub_capture.sub_{sub}")), 1);
    }

    #[pg_test]
    fn partitions_made_while_an_integration_is_off_get_its_capture_triggers_disabled() {
        // A disabled integration costs its tables' writers nothing, whichever
        // partition they write to; enabling it turns every trigger on.
        setup();
        Spi::run(
            "CREATE TABLE parted (id int, region text) PARTITION BY LIST (region);
             CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
             SELECT ihub.subscribe('parted', 'hook', events => '{insert,truncate}');
             CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');",
        )
        .unwrap();
        let states = "SELECT string_agg(tgrelid::regclass || ':' || tgname || ':' || tgenabled::text, ' ' ORDER BY tgrelid::regclass::text, tgname)
                      FROM pg_trigger WHERE tgname LIKE 'ihub_sub_%'";
        let sub = one::<i64>("SELECT id FROM ihub.subscription");
        let expect = |state: &str| {
            ["parted", "parted_eu", "parted_us"]
                .iter()
                .flat_map(|t| ["insert", "truncate"].map(|e| format!("{t}:ihub_sub_{sub}_{e}:{state}")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(one::<String>(states), expect("D"));
        Spi::run("SELECT ihub.enable_integration('shop')").unwrap();
        assert_eq!(one::<String>(states), expect("O"));
        Spi::run(&format!("SELECT ihub.unsubscribe({sub})")).unwrap();
        assert_eq!(Spi::get_one::<String>(states).unwrap(), None, "unsubscribe removes them from every partition");
    }

    #[pg_test]
    fn no_log_partition_belongs_to_the_extension() {
        // Members cannot be dropped by the cleanup: retention would stop for good.
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
                 WHERE d.deptype = 'e' AND d.classid = 'pg_class'::regclass AND c.relname ~ '^log_entry_.*_[0-9]{8}$'"
            ),
            0
        );
    }

    #[pg_test]
    fn identity_sequences_of_dumped_tables_are_dumped_too() {
        // Otherwise ids start again at 1 after pg_dump and restore, and collide.
        let missing = one::<String>(
            "SELECT coalesce(string_agg(t.oid::regclass::text, ', '), '') FROM pg_extension e, unnest(e.extconfig) t(oid)
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attidentity <> ''
             WHERE e.extname = 'pg_ihub'
               AND NOT pg_get_serial_sequence(t.oid::regclass::text, a.attname)::regclass::oid = ANY (e.extconfig)",
        );
        assert_eq!(missing, "");
    }

    #[pg_test]
    fn inbound_items_read_bodies_that_are_not_utf8() {
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        let id = one::<i64>("SELECT ihub.receive('shop', 'o', '{\"content-type\": \"text/plain\"}', '\\xff00fe')");
        assert!(one::<bool>(&format!("SELECT payload IS NULL FROM ihub.inbound_items WHERE id = {id}")));
        Spi::run("SELECT ihub.receive('shop', 'o', '{}', '  {\"order\": 3}')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_items WHERE payload ->> 'order' = '3'"), 1);
    }

    #[pg_test]
    fn secrets_and_their_headers_are_handled_per_mode() {
        setup_inbound();
        let sw = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        // A shared secret is compared as written, whatever it looks like.
        Spi::run(&format!(
            "SELECT ihub.create_source('shop', 'k', 'on_order(ihub.inbound_items)', 'shared-secret', '{sw}', 'X-Hook-Key')"
        ))
        .unwrap();
        let ok = Spi::get_one::<i64>(&format!("SELECT ihub.receive('shop', 'k', '{{\"X-Hook-Key\": \"{sw}\"}}', 'a')"));
        assert!(ok.unwrap().is_some(), "the shared secret as sent is accepted");
        // A wrong guess is recorded masked, like the listener does.
        let refused = Spi::get_one::<i64>("SELECT ihub.receive('shop', 'k', '{\"X-Hook-Key\": \"guess-123\"}', 'b')");
        assert_eq!(refused.unwrap(), None);
        assert_eq!(one::<String>("SELECT headers ->> 'x-hook-key' FROM ihub.inbound_rejections"), "********");
        // A Standard Webhooks secret must be one.
        expect_error(
            "SELECT ihub.create_source('shop', 'bad', 'on_order(ihub.inbound_items)', secret => 'whsec_short')",
            &["invalid secret", "HINT:"],
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_source WHERE name = 'bad'"), 0);
    }

    /// Presets take a secret and no header names; a fixed response is
    /// checked; ihub.receive verifies a preset as the listener does (GitHub's
    /// documented example) and keys duplicates by the provider's id.
    #[pg_test]
    fn presets_and_fixed_responses_are_checked() {
        setup_inbound();
        expect_error(
            "SELECT ihub.create_source('shop', 'g', 'on_order(ihub.inbound_items)', 'gitlab', 's')",
            &["unknown verification \"gitlab\"", "stripe, github, shopify, slack, twilio or svix"],
        );
        expect_error(
            "SELECT ihub.create_source('shop', 'g', 'on_order(ihub.inbound_items)', 'twilio')",
            &["verification twilio needs a secret", "auth token"],
        );
        expect_error(
            "SELECT ihub.create_source('shop', 'g', 'on_order(ihub.inbound_items)', 'github', 's', header => 'X-Sig')",
            &["the github preset has its own headers"],
        );
        for bad in [r#"{"status": 500}"#, r#"{"status": "200"}"#, r#"{"status": 200, "colour": "red"}"#] {
            expect_error(
                &format!("SELECT ihub.create_source('shop', 'g', 'on_order(ihub.inbound_items)', 'none', response => '{bad}')"),
                &["invalid response", "HINT: Give"],
            );
        }
        Spi::run(
            "SELECT ihub.create_source('shop', 'g', 'on_order(ihub.inbound_items)', 'github', $$It's a Secret to Everybody$$,
                                       response => '{\"status\": 200, \"body\": \"thanks\"}')",
        )
        .unwrap();
        assert_eq!(one::<String>("SELECT response ->> 'body' FROM ihub.inbound_sources WHERE name = 'g'"), "thanks");
        let headers = r#"{"x-hub-signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", "x-github-delivery": "72d3162e"}"#;
        let id = one::<i64>(&format!("SELECT ihub.receive('shop', 'g', '{headers}', 'Hello, World!')"));
        assert_eq!(one::<String>(&format!("SELECT dedup_key FROM ihub.inbound_items WHERE id = {id}")), "72d3162e");
        let refused = Spi::get_one::<i64>(&format!("SELECT ihub.receive('shop', 'g', '{headers}', 'Hello')"));
        assert_eq!(refused.unwrap(), None);
    }

    #[pg_test]
    fn only_the_session_processing_an_item_can_settle_it() {
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        let id = one::<i64>("SELECT ihub.receive('shop', 'o', '{}', '{\"order\": 1}')");
        Spi::run(&format!("SELECT ihub._inbound_settle({id}, '{{\"forged\": true}}', NULL)")).unwrap();
        Spi::run(&format!("SELECT ihub._inbound_settle({id}, NULL, 'forged')")).unwrap();
        assert_eq!(one::<String>(&format!("SELECT state FROM ihub.inbound_item WHERE id = {id}")), "pending");
    }

    #[pg_test]
    fn a_critical_entry_about_an_inbound_item_opens_an_activity_that_says_so() {
        setup_inbound();
        Spi::run("SELECT ihub.set_activity_users(current_user::regrole)").unwrap();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        let id = one::<i64>("SELECT ihub.receive('shop', 'o', '{}', '{\"order\": 1}')");
        Spi::run(&format!("SELECT ihub.log('critical', 'bad item', NULL, 'shop', inbound => {id})")).unwrap();
        assert_eq!(one::<i64>("SELECT inbound_item FROM ihub.activities"), id);
    }

    #[pg_test]
    fn pid_alive_reads_the_proc_array() {
        assert!(one::<bool>("SELECT ihub._pid_alive(pg_backend_pid())"));
        assert!(!one::<bool>("SELECT ihub._pid_alive(NULL)"));
        // A pid no process has (pid_max is at most 2^22 on Linux).
        assert!(!one::<bool>("SELECT ihub._pid_alive(2147483000)"));
        // Rescue leaves an item being processed by a live session alone.
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        let id = one::<i64>("SELECT ihub.receive('shop', 'o', '{}', '{\"order\": 1}')");
        Spi::run(&format!(
            "UPDATE ihub.inbound_item SET state = 'running', worker_pid = pg_backend_pid() WHERE id = {id}"
        ))
        .unwrap();
        assert_eq!(one::<i64>("SELECT ihub._rescue_inbound()"), 0);
        Spi::run(&format!("UPDATE ihub.inbound_item SET worker_pid = 2147483000 WHERE id = {id}")).unwrap();
        assert_eq!(one::<i64>("SELECT ihub._rescue_inbound()"), 1);
    }

    #[pg_test]
    fn with_nothing_to_do_no_worker_has_a_deadline() {
        // NULL means "sleep until woken or ihub.poll_interval"; 0 would make
        // the worker wake again at once, over and over.
        for f in ["_schedule_tick", "_cronwatch_check", "_next_job_due", "_next_due", "_next_inbound_due"] {
            assert_eq!(Spi::get_one::<f64>(&format!("SELECT ihub.{f}()")).unwrap(), None, "ihub.{f}()");
        }
    }

    #[pg_test]
    fn scheduled_runs_merge_per_integration_parameters() {
        setup_jobs();
        Spi::run(
            "SELECT ihub.create_integration('north'); SELECT ihub.create_integration('south');
             SELECT ihub.schedule('pull', 'note_it(jsonb)', every => '1 hour', args => '{\"note\": \"base\", \"full\": false}');
             SELECT ihub.set_schedule_params('pull', 'north', '{\"note\": \"n\"}');
             SELECT ihub.set_schedule_params('pull', 'south', '{\"note\": \"s\", \"full\": true}');",
        )
        .unwrap();
        expect_error("SELECT ihub.set_schedule_params('pull', 'north', '[]')", &["must be a JSON object"]);
        Spi::run("SELECT ihub.run_now('pull')").unwrap();
        assert_eq!(
            one::<String>(
                "SELECT string_agg(integration || '=' || args::text, ' ' ORDER BY integration) FROM ihub.jobs"
            ),
            "north={\"full\": false, \"note\": \"n\"} south={\"full\": true, \"note\": \"s\"}"
        );
        // Due runs are queued by the tick, which moves the schedule on.
        Spi::run("UPDATE ihub.schedule SET next_run_at = now() - interval '1 second'").unwrap();
        assert!(one::<f64>("SELECT ihub._schedule_tick()") > 3500.0);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.job WHERE schedule_id IS NOT NULL"), 4);
    }

    #[pg_test]
    fn watching_needs_something_to_watch() {
        setup_jobs();
        expect_error("SELECT ihub.watch('nope')", &["does not exist"]);
        expect_error("SELECT ihub.watch('cron:nightly')", &["pg_cron is not installed", "CREATE EXTENSION pg_cron"]);
        Spi::run("SELECT ihub.schedule('s', 'note_it(jsonb)', every => '1 minute')").unwrap();
        expect_error("SELECT ihub.watch('s', channel => '')", &["invalid channel"]);
        expect_error("SELECT ihub.watch('s', notify_endpoint => 'nope')", &["endpoint \"nope\" does not exist"]);
        Spi::run("SELECT ihub.watch('s', grace => '1 second')").unwrap();
        expect_error("SELECT ihub.watch('s')", &["already watched"]);
        let problem = || Spi::get_one::<String>("SELECT ihub._cronwatch_problem(w) FROM ihub.watcher w").unwrap();
        assert_eq!(problem(), None);
        Spi::run(
            "UPDATE ihub.watcher SET created_at = now() - interval '1 hour';
                  UPDATE ihub.schedule SET next_run_at = now() - interval '10 seconds'",
        )
        .unwrap();
        assert!(problem().unwrap().starts_with("missed its run due at"));
        Spi::run("SELECT ihub.alter_schedule('s', active => false)").unwrap();
        assert_eq!(problem().as_deref(), Some("deactivated"));
        Spi::run("SELECT ihub.unschedule('s')").unwrap();
        assert_eq!(problem().as_deref(), Some("deleted"));
        // One alert per incident: the check alerts, then stays quiet.
        Spi::run("SELECT ihub._cronwatch_check(); SELECT ihub._cronwatch_check()").unwrap();
        assert_eq!(one::<String>("SELECT status || ':' || incident FROM ihub.cronwatch"), "alerting:deleted");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM ihub.logs WHERE level = 'critical' AND message LIKE 'cronwatch: s deleted'"
            ),
            1
        );
    }

    #[pg_test]
    fn dates_changed_by_hand_are_recorded_with_a_warning() {
        Spi::run("SELECT ihub.create_integration('shop')").unwrap();
        assert_eq!(
            Spi::get_one::<pgrx::datum::TimestampWithTimeZone>("SELECT ihub.get_date('shop', 'last_import')").unwrap(),
            None
        );
        Spi::run("SELECT ihub.set_date('shop', 'last_import', '2026-01-01 00:00+00')").unwrap();
        Spi::run("SELECT ihub.set_date('shop', 'last_import', '2025-06-01 00:00+00')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.integration_date_change"), 2);
        let warning = one::<String>("SELECT warning FROM ihub.integration_dates WHERE name = 'last_import'");
        assert!(warning.contains("import again"), "{warning}");
        assert_eq!(one::<String>("SELECT changed_by_hand_by::text FROM ihub.integration_dates"), "postgres");
        expect_error("SELECT ihub.set_date('nope', 'x', now())", &["does not exist"]);
        expect_error("SELECT ihub.get_date('nope', 'x')", &["does not exist"]);
    }

    #[pg_test]
    fn log_entries_are_masked_filtered_and_never_fail_the_caller() {
        Spi::run("SELECT ihub.create_integration('shop'); SELECT ihub.create_integration('quiet');").unwrap();
        for level in ["info", "warning", "error", "critical", "debug"] {
            Spi::run(&format!("SELECT ihub.log('{level}', 'a {level} entry', integration => 'shop')")).unwrap();
        }
        assert_eq!(
            one::<String>("SELECT string_agg(level, ',' ORDER BY id) FROM ihub.logs"),
            "info,warning,error,critical",
            "debug is off by default"
        );
        let id = one::<i64>(
            "SELECT ihub.log('error', 'login failed: Authorization: Bearer eyJhbGciOi.x.y, password=hunter2',
                             '{\"user\": \"ada\", \"password\": \"hunter2\", \"nested\": {\"api_key\": \"k\"}}', 'shop',
                             row_table => 'pg_class', row_key => '42')",
        );
        let stored = one::<String>(&format!("SELECT message || ' ' || details::text FROM ihub.logs WHERE id = {id}"));
        assert!(!stored.contains("hunter2") && !stored.contains("eyJhbGciOi") && !stored.contains("\"k\""), "{stored}");
        assert!(stored.contains("ada") && stored.contains("login failed"), "{stored}");
        assert_eq!(
            one::<String>(&format!("SELECT row_table::text || ':' || row_key FROM ihub.logs WHERE id = {id}")),
            "pg_class:42"
        );

        Spi::run("SELECT ihub.set_log_level('shop', 'debug'); SELECT ihub.set_log_level('quiet', 'off')").unwrap();
        assert!(Spi::get_one::<i64>("SELECT ihub.log('debug', 'now kept', integration => 'shop')").unwrap().is_some());
        assert_eq!(Spi::get_one::<i64>("SELECT ihub.log('critical', 'x', integration => 'quiet')").unwrap(), None);
        Spi::run("SELECT ihub.set_log_level('shop', 'error')").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT ihub.log('warning', 'dropped', integration => 'shop')").unwrap(), None);
        expect_error("SELECT ihub.set_log_level('shop', 'loud')", &["invalid log level", "off"]);
        assert_eq!(
            one::<String>("SELECT min_level || ':' || enabled FROM ihub.log_settings WHERE integration = 'quiet'"),
            "info:false"
        );

        // A log write that cannot be stored is a warning, not the caller's error.
        Spi::run("ALTER TABLE ihub.log_entry_lasting ADD CONSTRAINT refuse CHECK (false) NOT VALID").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT ihub.log('error', 'cannot be stored')").unwrap(), None);
        assert_eq!(one::<i32>("SELECT 1"), 1, "the transaction goes on");
    }

    #[pg_test]
    fn entries_start_unchecked_and_checking_records_who() {
        let a = one::<i64>("SELECT ihub.log('warning', 'first')");
        let b = one::<i64>("SELECT ihub.log('error', 'second')");
        assert_eq!(one::<String>("SELECT string_agg(check_state, ',') FROM ihub.logs"), "not checked,not checked");
        assert_eq!(one::<i64>(&format!("SELECT ihub.mark_checked(ARRAY[{a}, {b}, -1])")), 2);
        assert_eq!(one::<i64>(&format!("SELECT ihub.mark_checked(ARRAY[{a}])")), 0, "already checked");
        assert_eq!(
            one::<String>("SELECT string_agg(check_state || ':' || checked_by, ',' ORDER BY id) FROM ihub.logs"),
            "checked:postgres,checked:postgres"
        );
    }

    #[pg_test]
    fn cleanup_removes_exactly_what_retention_says() {
        let old = |level: &str, age: &str, n: i32| {
            Spi::run(&format!(
                "INSERT INTO ihub.log_entry (level, message, logged_at)
                 SELECT '{level}', 'old', now() - interval '{age}' FROM generate_series(1, {n})"
            ))
            .unwrap();
        };
        old("info", "15 days", 3);
        old("info", "13 days", 2);
        old("warning", "20 days", 4);
        old("debug", "5 hours", 5);
        old("debug", "3 hours", 1);
        old("error", "400 days", 2);
        old("critical", "400 days", 1);
        // A whole partition of a past day is dropped, not emptied row by row.
        Spi::run(
            "CREATE TABLE ihub.log_entry_info_20200101 PARTITION OF ihub.log_entry_info
                 FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00');
             INSERT INTO ihub.log_entry (level, message, logged_at)
             SELECT 'info', 'ancient', '2020-01-01 12:00+00' FROM generate_series(1, 10);",
        )
        .unwrap();
        let removed = || {
            one::<String>(
                "SELECT string_agg(kind || '=' || removed, ',' ORDER BY kind) FROM ihub.cleanup() WHERE removed > 0",
            )
        };
        assert_eq!(removed(), "debug=5,info=13,warning=4");
        assert!(one::<bool>("SELECT to_regclass('ihub.log_entry_info_20200101') IS NULL"));
        assert_eq!(
            one::<String>("SELECT string_agg(level || ':' || n, ',' ORDER BY level) FROM (SELECT level, count(*) n FROM ihub.log_entry GROUP BY level) x"),
            "critical:1,debug:1,error:2,info:2"
        );
        // A changed retention touches nothing until the next cleanup.
        Spi::run("SELECT ihub.set_retention('info', '1 day'); SELECT ihub.set_retention('error', '1 year')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.log_entry WHERE level = 'info'"), 2);
        assert_eq!(removed(), "error=2,info=2");
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.log_entry WHERE level = 'critical'"), 1, "critical kept");
        expect_error("SELECT ihub.set_retention('trace', '1 day')", &["unknown retention kind"]);
        expect_error("SELECT ihub.set_retention('info', '-1 day')", &["positive interval"]);
    }

    #[pg_test]
    fn cleanup_keeps_what_needs_attention() {
        setup_enabled();
        setup_jobs();
        let ids: Vec<i64> = (0..4).map(|_| one::<i64>("SELECT ihub.http_request('hook', '{}')")).collect();
        Spi::run(&format!(
            "UPDATE ihub.delivery SET created_at = now() - interval '40 days',
                 state = (ARRAY['done', 'done', 'dead', 'failed'])[array_position(ARRAY[{}]::bigint[], id)]
             WHERE id = ANY (ARRAY[{}]::bigint[]);
             INSERT INTO ihub.delivery_attempt (delivery_id, attempt, started_at, duration_ms, request_headers, error_category)
             SELECT id, 1, now(), 1, '{{}}', 'ok' FROM ihub.delivery;",
            ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","),
            ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        ))
        .unwrap();
        let done = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)')");
        let failed = one::<i64>("SELECT ihub.enqueue('note_it(jsonb)')");
        Spi::run(&format!(
            "UPDATE ihub.job SET state = 'done', finished_at = now() - interval '40 days' WHERE id = {done};
             UPDATE ihub.job SET state = 'failed', finished_at = now() - interval '40 days' WHERE id = {failed};"
        ))
        .unwrap();
        let removed = one::<String>(
            "SELECT string_agg(kind || '=' || removed, ',' ORDER BY kind) FROM ihub.cleanup() WHERE kind IN ('deliveries', 'jobs')",
        );
        assert_eq!(removed, "deliveries=2,jobs=1");
        assert_eq!(one::<String>("SELECT string_agg(state, ',' ORDER BY id) FROM ihub.delivery"), "dead,failed");
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.delivery_attempt"), 2, "attempts go with their deliveries");
        assert_eq!(one::<String>("SELECT string_agg(state, ',') FROM ihub.job"), "failed");
    }

    #[pg_test]
    fn critical_entries_become_activities_for_someone_who_can_act() {
        Spi::run(
            "CREATE ROLE ihub_test_oncall NOLOGIN; CREATE ROLE ihub_test_lead LOGIN;
             SELECT ihub.set_activity_users('ihub_test_oncall', 'ihub_test_lead');",
        )
        .unwrap();
        assert!(Spi::get_one::<i64>("SELECT ihub.log('error', 'not critical')").unwrap().is_some());
        Spi::run("SELECT ihub.log('critical', 'the CRM token expired: token=abc123')").unwrap();
        assert_eq!(
            one::<String>("SELECT assigned_to || ':' || state || ':' || summary FROM ihub.activities"),
            "ihub_test_lead:open:the CRM token expired: token=********",
            "the primary cannot log in, so the secondary gets it"
        );
        Spi::run("ALTER ROLE ihub_test_oncall LOGIN").unwrap();
        Spi::run("SELECT ihub.log('critical', 'again')").unwrap();
        assert_eq!(
            one::<String>("SELECT assigned_to::text FROM ihub.activities ORDER BY id DESC LIMIT 1"),
            "ihub_test_oncall"
        );
        let id = one::<i64>("SELECT min(id) FROM ihub.activities");
        Spi::run(&format!("SELECT ihub.close_activity({id}, 'renewed the token')")).unwrap();
        assert_eq!(
            one::<String>(&format!("SELECT state || ':' || note FROM ihub.activities WHERE id = {id}")),
            "closed:renewed the token"
        );
        expect_error(&format!("SELECT ihub.close_activity({id})"), &["no open activity"]);
        Spi::run("SELECT ihub.set_activity_users(NULL)").unwrap();
        Spi::run("SELECT ihub.log('critical', 'nobody is told')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.activities"), 2);
    }

    #[pg_test]
    fn statistics_count_a_known_mix() {
        setup_enabled();
        // 6 delivered (2 of them after a retry), 2 retrying, 1 dead, 1 failed.
        let ids: Vec<i64> = (0..10).map(|_| one::<i64>("SELECT ihub.http_request('hook', '{}')")).collect();
        let settle = |id: i64, state: &str, ms: f64| {
            Spi::run(&format!("UPDATE ihub.delivery SET state = 'running', worker_pid = 7 WHERE id = {id}")).unwrap();
            let error = if state == "done" { "null".to_string() } else { "\"HTTP 500\"".to_string() };
            Spi::run(&format!(
                r#"SELECT ihub._settle(7, '[{{"delivery_id": {id}, "state": "{state}", "next_at": 0, "status": 500, "error": {error},
                    "category": "x", "request_headers": {{}}, "started_at": 0, "duration_ms": {ms}}}]')"#
            ))
            .unwrap();
        };
        for (i, id) in ids.iter().enumerate() {
            match i {
                0..=3 => settle(*id, "done", 3.0),
                4 | 5 => {
                    settle(*id, "retry", 40.0);
                    settle(*id, "done", 40.0);
                }
                6 | 7 => settle(*id, "retry", 3.0),
                8 => settle(*id, "dead", 3.0),
                _ => settle(*id, "failed", 3.0),
            }
        }
        let stats = one::<String>(
            "SELECT concat_ws(',', deliveries, delivered, success_rate, retries, failed, dead, last_error, p50_ms < 5, p95_ms > 20)
             FROM ihub.endpoint_stats() WHERE endpoint = 'hook'",
        );
        assert_eq!(stats, "8,6,75.00,4,1,1,HTTP 500,t,t");
        assert_eq!(
            one::<String>("SELECT concat_ws(',', attempts, delivered, failures, dead) FROM ihub.daily_stats(1)"),
            "12,6,6,1"
        );
        assert_eq!(
            one::<String>("SELECT string_agg(state || '=' || items, ',' ORDER BY state) FROM ihub.queue_stats() WHERE queue = 'deliveries'"),
            "dead=1,delivered (24 h)=6,failed=1,pending=0,retry=2,running=0"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.logs WHERE level = 'error' AND delivery IS NOT NULL"), 2);
    }

    #[pg_test]
    fn health_reports_each_check() {
        setup_enabled();
        let checks = || {
            one::<String>("SELECT string_agg(check_name || '=' || status, ',' ORDER BY check_name) FROM ihub.health() WHERE check_name NOT LIKE 'workers%'")
        };
        assert_eq!(
            checks(),
            "credentials=ok,endpoints=ok,oauth2=ok,queue: deliveries=ok,queue: jobs=ok,schedules=ok,subscriptions=ok"
        );
        Spi::run(
            "SELECT ihub.create_oauth2('shop', 'crm', 'https://auth.example.com/token', 'id', 'secret',
                                       authorize_url => 'https://auth.example.com/authorize');
             SELECT ihub.create_oauth2('shop', 'erp', 'https://erp.example.com/token', 'id', 'secret', \"grant\" => 'client_credentials');",
        )
        .unwrap();
        assert!(one::<String>("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'oauth2'")
            .starts_with("warning: shop/crm (not authorized yet)"));
        // The machine client cannot get a token: critical, with the reason.
        Spi::run("UPDATE ihub.oauth2 SET failures = 2, last_error = 'HTTP 401: invalid_client' WHERE name = 'erp'")
            .unwrap();
        let oauth2 = one::<String>("SELECT status || ': ' || message FROM ihub.health() WHERE check_name = 'oauth2'");
        assert!(
            oauth2.starts_with("critical")
                && oauth2.contains("shop/erp (could not be refreshed: HTTP 401: invalid_client)"),
            "{oauth2}"
        );
        Spi::run("DELETE FROM ihub.oauth2").unwrap();
        Spi::run(
            "SELECT ihub.disable_endpoint('hook');
             SELECT ihub.http_request('hook', '{}');
             SELECT ihub.create_endpoint('shop', 'live', 'https://x.example');
             SELECT ihub.http_request('live', '{}');
             UPDATE ihub.delivery SET run_at = now() - interval '30 minutes', created_at = now() - interval '30 minutes';
             UPDATE ihub.endpoint_secret SET expires_at = now() - interval '1 minute'
                 WHERE endpoint_id = (SELECT id FROM ihub.endpoint WHERE name = 'live');",
        )
        .unwrap();
        assert_eq!(
            checks(),
            "credentials=critical,endpoints=warning,oauth2=ok,queue: deliveries=critical,queue: jobs=ok,schedules=ok,subscriptions=ok"
        );
        assert!(one::<String>("SELECT message FROM ihub.health() WHERE check_name = 'endpoints'").contains("hook"));
        assert!(one::<bool>("SELECT count(*) = 5 FROM ihub.health() WHERE check_name LIKE 'workers%'"));
    }

    fn setup_inbound() {
        Spi::run(
            "SELECT ihub.create_integration('shop'); SELECT ihub.enable_integration('shop');
             CREATE TABLE handled (item bigint, note text);
             CREATE FUNCTION on_order(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
             BEGIN
                 IF item.payload ? 'fail' AND NOT EXISTS (SELECT 1 FROM handled WHERE note = 'fixed') THEN
                     RAISE EXCEPTION 'cannot handle order %', item.payload->>'order';
                 END IF;
                 INSERT INTO handled VALUES (item.id, item.payload->>'order');
                 RETURN jsonb_build_object('handled', item.id);
             END $$;
             CREATE FUNCTION wrong(n int) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;",
        )
        .unwrap();
    }

    /// Standard Webhooks headers for a body, signed now with `secret`.
    fn signed_headers(secret: &str, id: &str, body: &str, skew_s: i64) -> String {
        one::<String>(&format!(
            "SELECT jsonb_build_object('webhook-id', '{id}', 'webhook-timestamp', (extract(epoch FROM now())::bigint + {skew_s})::text,
                 'webhook-signature', ihub.sign('{secret}', '{id}', extract(epoch FROM now())::bigint + {skew_s}, '{body}'))::text"
        ))
    }

    #[pg_test]
    fn create_source_checks_its_input() {
        setup_inbound();
        let h = "'on_order(ihub.inbound_items)'";
        expect_error(
            "SELECT ihub.create_source('shop', 'o', 'wrong(int)')",
            &["cannot handle inbound items", "ihub.inbound_items"],
        );
        expect_error(&format!("SELECT ihub.create_source('nope', 'o', {h})"), &["does not exist"]);
        expect_error(
            &format!("SELECT ihub.create_source('shop', 'o', {h}, verify => 'md5')"),
            &["unknown verification"],
        );
        expect_error(&format!("SELECT ihub.create_source('shop', 'o', {h})"), &["needs a secret"]);
        expect_error(
            &format!("SELECT ihub.create_source('shop', 'o', {h}, 'shared-secret', 's')"),
            &["needs the header"],
        );
        expect_error(
            &format!("SELECT ihub.create_source('shop', 'o', {h}, 'none', ordering_key => 'customer')"),
            &["invalid ordering key"],
        );
        expect_error(
            &format!("SELECT ihub.create_source('shop', 'bad name', {h}, 'none')"),
            &["invalid inbound source name"],
        );
        Spi::run(&format!("SELECT ihub.create_source('shop', 'o', {h}, 'none')")).unwrap();
        expect_error(
            &format!("SELECT ihub.create_source('shop', 'o', {h}, 'none')"),
            &["already has an inbound source"],
        );
        assert_eq!(one::<String>("SELECT path FROM ihub.inbound_sources"), "/webhooks/shop/o");
    }

    #[pg_test]
    fn receive_verifies_deduplicates_and_records_refusals() {
        setup_inbound();
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        Spi::run(&format!(
            "SELECT ihub.create_source('shop', 'sw', 'on_order(ihub.inbound_items)', secret => '{secret}')"
        ))
        .unwrap();
        let body = r#"{"order": 7}"#;
        let good = signed_headers(secret, "msg_1", body, 0);
        let receive = |headers: &str, body: &str| {
            Spi::get_one::<i64>(&format!(
                "SELECT ihub.receive('shop', 'sw', '{headers}', convert_to('{body}', 'UTF8'))"
            ))
            .unwrap()
        };
        let id = receive(&good, body).expect("accepted");
        assert_eq!(receive(&good, body), Some(id), "a duplicate gets the first id");
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_item"), 1);
        assert_eq!(receive(&good, r#"{"order": 8}"#), None, "tampered body");
        assert_eq!(receive(&signed_headers(secret, "msg_2", body, -3600), body), None, "stale");
        assert_eq!(receive(r#"{"webhook-id": "msg_3"}"#, body), None, "missing headers");
        assert_eq!(
            one::<String>("SELECT string_agg(reason, ' | ' ORDER BY id) FROM ihub.inbound_rejections"),
            "invalid signature | webhook-timestamp is outside the tolerance (replayed or clock skew) | missing header webhook-timestamp"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_rejections WHERE body_sha256 ~ '^[0-9a-f]{64}$'"), 3);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_item"), 1, "refused requests are not queued");

        Spi::run("SELECT ihub.create_source('shop', 'zoho', 'on_order(ihub.inbound_items)', 'shared-secret', 'z-secret', 'X-Zoho-Webhook-Secret', id_header => 'X-Zoho-Id')").unwrap();
        let zoho = |secret: &str, id: &str| {
            Spi::get_one::<i64>(&format!(
                "SELECT ihub.receive('shop', 'zoho', '{{\"X-Zoho-Webhook-Secret\": \"{secret}\", \"X-Zoho-Id\": \"{id}\"}}', convert_to('{{}}', 'UTF8'))"
            ))
            .unwrap()
        };
        let first = zoho("z-secret", "a").expect("accepted");
        assert_eq!(zoho("z-secret", "a"), Some(first), "deduplicated by the id header");
        assert_ne!(zoho("z-secret", "b"), Some(first));
        assert_eq!(zoho("wrong", "c"), None);
        let stored = one::<String>(
            "SELECT headers::text FROM ihub.inbound_item WHERE id = (SELECT max(id) FROM ihub.inbound_item)",
        );
        assert!(!stored.contains("z-secret"), "the shared secret is masked in stored headers: {stored}");
        expect_error("SELECT ihub.receive('shop', 'nope', '{}', '')", &["has no inbound source"]);
    }

    #[pg_test]
    fn processing_by_hand_an_item_whose_handler_was_dropped_says_so() {
        setup_inbound();
        Spi::run(
            "CREATE FUNCTION gone_handler(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
             SELECT ihub.create_source('shop', 'o', 'gone_handler(ihub.inbound_items)', 'none');",
        )
        .unwrap();
        let item = one::<i64>("SELECT ihub.receive('shop', 'o', '{}', '{\"order\": 1}')");
        Spi::run("DROP FUNCTION gone_handler(ihub.inbound_items)").unwrap();
        expect_error(
            &format!("SELECT ihub.process_inbound({item})"),
            &["gone_handler(ihub.inbound_items) of inbound source o no longer exists", "HINT:", "create_source"],
        );
        assert_eq!(one::<String>(&format!("SELECT state FROM ihub.inbound_item WHERE id = {item}")), "pending");
    }

    #[pg_test]
    fn deleting_an_integration_takes_its_sources_and_refuses_while_items_wait() {
        setup_inbound();
        Spi::run(
            "SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'shared-secret', 'k', 'X-Secret')",
        )
        .unwrap();
        let item = one::<i64>("SELECT ihub.receive('shop', 'o', '{\"X-Secret\": \"k\"}', '{\"order\": 1}')");
        let failed = one::<i64>("SELECT ihub.receive('shop', 'o', '{\"X-Secret\": \"k\"}', '{\"order\": 2}')");
        assert_eq!(Spi::get_one::<i64>("SELECT ihub.receive('shop', 'o', '{}', 'forged')").unwrap(), None);
        Spi::run("SELECT ihub.disable_integration('shop')").unwrap();
        expect_error("SELECT ihub.delete_integration('shop')", &["inbound items waiting", "HINT:"]);
        one::<pgrx::JsonB>(&format!("SELECT ihub.process_inbound({item})"));
        // Archived failures are never deleted by pg_ihub (as drop_source).
        Spi::run(&format!("UPDATE ihub.inbound_item SET state = 'failed', error = 'boom' WHERE id = {failed}"))
            .unwrap();
        expect_error("SELECT ihub.delete_integration('shop')", &["failed inbound items", "ihub.inbound_failed"]);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_failed"), 1);
        Spi::run(&format!("DELETE FROM ihub.inbound_item WHERE id = {failed}")).unwrap();
        Spi::run("SELECT ihub.delete_integration('shop')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_source"), 0);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_item"), 0);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_secret"), 0);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM ihub.inbound_rejection WHERE source_id IS NULL"),
            1,
            "rejections stay on record"
        );
    }

    #[pg_test]
    fn a_source_dropped_under_the_listener_is_reported_not_failed() {
        // The listener verified against a cached source that is gone by the
        // time it writes: that request is reported, the rest of the batch queued.
        setup_inbound();
        let id = one::<i64>("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')");
        let rows = one::<String>(&format!(
            "SELECT string_agg(n || ':' || coalesce(item_id::text, 'gone'), ' ' ORDER BY n)
             FROM ihub._accept_inbound(ARRAY[-1, {id}], ARRAY['{{}}', '{{}}']::jsonb[], ARRAY['a', 'b']::bytea[],
                                       ARRAY['k1', 'k2'], ARRAY['127.0.0.1', '127.0.0.1'], ARRAY[NULL, NULL]::timestamptz[])"
        ));
        assert!(rows.starts_with("1:gone 2:"), "{rows}");
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_item"), 1);
        Spi::run("SELECT ihub._reject_inbound(ARRAY[-1], ARRAY['invalid signature'], ARRAY['127.0.0.1'], ARRAY['00'], ARRAY['{}'::jsonb])").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_rejection WHERE source_id IS NULL"), 1);
    }

    #[pg_test]
    fn a_batch_queues_a_key_once_and_answers_repeats_with_the_first_item() {
        // The listener's batch is queued set-based: a key repeated within the
        // batch, or seen before, gets the first item's id, marked duplicate.
        setup_inbound();
        let id = one::<i64>("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')");
        let accept = |keys: &str| {
            one::<String>(&format!(
                "SELECT string_agg(n || ':' || item_id || ':' || duplicate, ' ' ORDER BY n)
                 FROM ihub._accept_inbound(ARRAY[{id}, {id}, {id}], ARRAY['{{}}', '{{}}', '{{}}']::jsonb[],
                                           ARRAY['a', 'b', 'c']::bytea[], {keys}, ARRAY['127.0.0.1', '127.0.0.1', '127.0.0.1'],
                                           ARRAY[NULL, NULL, NULL]::timestamptz[])"
            ))
        };
        let first = accept("ARRAY['k1', 'k1', 'k2']");
        let ids: Vec<&str> = first.split(' ').map(|r| r.split(':').nth(1).unwrap()).collect();
        assert_eq!(first, format!("1:{a}:false 2:{a}:true 3:{b}:false", a = ids[0], b = ids[2]));
        assert_ne!(ids[0], ids[2]);
        let again = accept("ARRAY['k2', NULL, 'k3']");
        let c: String = again.split(' ').nth(2).unwrap().split(':').nth(1).unwrap().to_string();
        let d: String = again.split(' ').nth(1).unwrap().split(':').nth(1).unwrap().to_string();
        assert_eq!(again, format!("1:{b}:true 2:{d}:false 3:{c}:false", b = ids[2]));
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_item"), 4);
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_dedup"), 3);
    }

    #[pg_test]
    fn items_a_batch_did_not_start_go_back_to_the_queue() {
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        for n in 1..=2 {
            Spi::run(&format!("SELECT ihub.receive('shop', 'o', '{{}}', convert_to('{{\"order\": {n}}}', 'UTF8'))"))
                .unwrap();
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim_inbound_items(4242, 1000, 10, 1)"), 2);
        let ids = "(SELECT array_agg(id) FROM ihub.inbound_item)";
        assert_eq!(one::<i64>(&format!("SELECT ihub._unclaim_inbound_items({ids}, 4243)")), 0, "another's");
        assert_eq!(one::<i64>(&format!("SELECT ihub._unclaim_inbound_items({ids}, 4242)")), 2);
        assert_eq!(
            one::<String>("SELECT string_agg(state || ':' || attempts, ' ' ORDER BY id) FROM ihub.inbound_item"),
            "pending:0 pending:0"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub._claim_inbound_items(4243, 1000, 10, 1)"), 2);
    }

    #[pg_test]
    fn deleting_an_integration_with_schedules_says_so() {
        setup_jobs();
        Spi::run(
            "SELECT ihub.create_integration('shop');
             SELECT ihub.schedule('pull', 'note_it(jsonb)', every => '1 hour', integration => 'shop');",
        )
        .unwrap();
        expect_error("SELECT ihub.delete_integration('shop')", &["scheduled action", "pull", "HINT:", "unschedule"]);
        Spi::run("SELECT ihub.unschedule('pull'); SELECT ihub.delete_integration('shop')").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.integration"), 0);
    }

    #[pg_test]
    fn items_are_claimed_by_execution_time_and_ordering_key() {
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none', ordering_key => '{customer}')").unwrap();
        let post = |body: &str, delay: &str| {
            one::<i64>(&format!(
                "SELECT ihub.receive('shop', 'o', '{{}}', convert_to('{body}', 'UTF8'), now() + interval '{delay}')"
            ))
        };
        let a1 = post(r#"{"customer": "a", "n": 1}"#, "-3 s");
        let a2 = post(r#"{"customer": "a", "n": 2}"#, "-5 s");
        let b1 = post(r#"{"customer": "b", "n": 1}"#, "-1 s");
        let _later = post(r#"{"customer": "c", "n": 1}"#, "1 hour");
        assert_eq!(one::<String>(&format!("SELECT ordering_key FROM ihub.inbound_item WHERE id = {a2}")), "a");
        let claim = || Spi::get_one::<i64>("SELECT (SELECT id FROM ihub._claim_inbound(4242, 1000))").unwrap();
        // a2 is due earliest, but a1 came first with the same key: a1 goes first.
        assert_eq!(claim(), Some(a1));
        assert_eq!(claim(), Some(b1), "a2 waits while a1 is being processed");
        assert_eq!(claim(), None, "the delayed item is not due");
        // a2 is past its time but blocked behind a1: waking for it would spin.
        let due = one::<f64>("SELECT ihub._next_inbound_due()");
        assert!(due > 3500.0, "next due in {due} s, expected the delayed item's hour");
        Spi::run(&format!("SELECT ihub._inbound_done({a1}, 4242, NULL)")).unwrap();
        assert_eq!(claim(), Some(a2));
    }

    #[pg_test]
    fn failed_items_are_archived_and_can_be_processed_again() {
        setup_inbound();
        Spi::run("SELECT ihub.create_source('shop', 'o', 'on_order(ihub.inbound_items)', 'none')").unwrap();
        let ok = one::<i64>(r#"SELECT ihub.receive('shop', 'o', '{}', convert_to('{"order": 1}', 'UTF8'))"#);
        let bad =
            one::<i64>(r#"SELECT ihub.receive('shop', 'o', '{}', convert_to('{"order": 2, "fail": true}', 'UTF8'))"#);
        assert_eq!(
            one::<pgrx::JsonB>(&format!("SELECT ihub.process_inbound({ok})")).0,
            serde_json::json!({"handled": ok})
        );
        let err = one::<pgrx::JsonB>(&format!("SELECT ihub.process_inbound({bad})")).0;
        assert_eq!(err, serde_json::json!({"error": "cannot handle order 2"}));
        assert_eq!(
            one::<String>("SELECT string_agg(id || ':' || error, ',') FROM ihub.inbound_failed"),
            format!("{bad}:cannot handle order 2")
        );
        assert_eq!(
            one::<i64>(&format!("SELECT count(*) FROM ihub.logs WHERE inbound_item = {bad} AND level = 'error'")),
            1
        );
        expect_error(&format!("SELECT ihub.process_inbound({ok})"), &["is done"]);
        Spi::run("INSERT INTO handled VALUES (NULL, 'fixed')").unwrap();
        assert_eq!(one::<i64>(&format!("SELECT ihub.reactivate_inbound(ARRAY[{bad}, {ok}])")), 1, "only failed ones");
        assert_eq!(
            one::<String>(&format!("SELECT state || ':' || reactivated FROM ihub.inbound_items WHERE id = {bad}")),
            "pending:1"
        );
        assert_eq!(
            one::<pgrx::JsonB>(&format!("SELECT ihub.process_inbound({bad})")).0,
            serde_json::json!({"handled": bad})
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ihub.inbound_failed"), 0);
    }

    /// A schema named cron is not pg_cron: a developer's own cron.job view,
    /// whose columns call the developer's function, is never read as the
    /// extension owner (ihub.watch and the scheduler read pg_cron's tables
    /// as the superuser). This database has no pg_cron.
    #[pg_test]
    fn a_schema_named_cron_is_not_pg_cron() {
        Spi::run(
            "CREATE SCHEMA cron;
             CREATE TABLE public.cron_trap (who name);
             CREATE FUNCTION cron.evil() RETURNS text LANGUAGE plpgsql AS $$
                 BEGIN INSERT INTO public.cron_trap VALUES (current_user); RETURN '* * * * *'; END $$;
             CREATE VIEW cron.job AS SELECT 1::bigint AS jobid, cron.evil() AS schedule, true AS active, 'x'::text AS jobname;",
        )
        .unwrap();
        assert!(Spi::get_one::<bool>("SELECT ihub._pg_cron_table('job') IS NULL").unwrap().unwrap());
        expect_error("SELECT ihub.watch('cron:x')", &["pg_cron is not installed"]);
        assert_eq!(one::<i64>("SELECT count(*) FROM public.cron_trap"), 0, "the developer's view was read");
    }
}
