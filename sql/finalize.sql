-- Loaded last: comments on the functions written in Rust, and privileges.

COMMENT ON FUNCTION ihub._capture_rows() IS
    'Internal: capture trigger of subscriptions without watch or condition; bulk-copies transition rows into the capture table named by its argument.';
COMMENT ON FUNCTION ihub._wake() IS 'Internal: wakes the dispatchers when the current transaction commits.';
COMMENT ON FUNCTION ihub._require_workers() IS
    'Internal: raises an error with a hint unless pg_ihub''s workers serve this database.';
COMMENT ON FUNCTION ihub._workers() IS 'Internal: the worker registry in shared memory.';
COMMENT ON FUNCTION ihub.listener_stats() IS
    'The inbound listener''s counters since the server started: reloads of its cache of sources, rejected requests not recorded (their queue was full), connections refused with 503.';
COMMENT ON FUNCTION ihub._pid_alive(integer) IS 'Internal: whether a process with this pid runs now (read from the proc array, not a snapshot).';
-- Reads the subscription as the extension owner, then runs the condition as
-- the subscriber (src/capture.rs); conditions see only pg_catalog and pg_temp.
ALTER FUNCTION ihub._capture_filtered() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION ihub._capture_filtered() IS
    'Internal: capture trigger of subscriptions with watched columns or a condition; copies the transition rows that pass (the condition runs as the subscriber) into the capture table named by its argument.';
COMMENT ON FUNCTION ihub.process_inbound(bigint) IS
    'Processes one queued or failed inbound item now, in this session and with the caller''s rights (a member of the source''s role); returns the handler''s result or {"error": ...}.';
-- The internal halves of the functions that act for their caller.
DO $$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT p.oid::regprocedure AS fn, substr(p.proname, 2, length(p.proname) - 4) AS public_name
             FROM pg_proc p WHERE p.pronamespace = 'ihub'::regnamespace AND p.proname ~ '^_.*_by$'
    LOOP
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', v.fn,
                       format('Internal: ihub.%s for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).', v.public_name));
    END LOOP;
END
$$;
COMMENT ON FUNCTION ihub._default_timeout_ms() IS 'Internal: ihub.default_timeout in milliseconds.';
COMMENT ON FUNCTION ihub._check_url(text) IS 'Internal: validates an endpoint URL and the private-host allow-list.';
COMMENT ON FUNCTION ihub._normalize_retry(jsonb) IS 'Internal: validates a retry policy and fills in defaults.';
COMMENT ON FUNCTION ihub._normalize_circuit(jsonb) IS 'Internal: validates a circuit breaker policy and fills in defaults; NULL when off.';
COMMENT ON FUNCTION ihub._normalize_auth(jsonb) IS 'Internal: validates endpoint auth JSON.';
COMMENT ON FUNCTION ihub._check_secret(text) IS 'Internal: validates a whsec_ secret.';
COMMENT ON FUNCTION ihub._generate_secret() IS 'Internal: a new random whsec_ secret.';
COMMENT ON FUNCTION ihub._parse_as(text, oid) IS 'Internal: parse analysis of a subscriber''s SQL as that role, in a security-restricted operation.';
COMMENT ON FUNCTION ihub._check_signing_key(text) IS 'Internal: validates an endpoint''s signing secret, whsec_ (v1) or whsk_ (v1a).';
COMMENT ON FUNCTION ihub._generate_ed25519_key() IS 'Internal: a new random whsk_ ed25519 secret key.';
COMMENT ON FUNCTION ihub._public_key(text) IS 'The whpk_ public key of a whsk_ secret key (NULL for a whsec_ secret).';
COMMENT ON FUNCTION ihub._check_headers(jsonb) IS 'Internal: validates custom request headers.';
COMMENT ON FUNCTION ihub._mask_endpoint_headers(jsonb) IS 'Internal: masks every custom header value except those marked {"secret": false}, for views.';
COMMENT ON FUNCTION ihub._mask_attempt_headers(jsonb, jsonb) IS 'Internal: masks an attempt''s recorded request headers: credentials, the signature and secret custom headers.';
COMMENT ON FUNCTION ihub._mask_headers(jsonb) IS 'Internal: masks credential header values for views.';
COMMENT ON FUNCTION ihub._mask_headers(jsonb, text) IS 'Internal: masks credential header values and one more header (an inbound source''s secret header).';
COMMENT ON FUNCTION ihub._mask_settings(jsonb) IS 'Internal: masks secret-looking setting values for views.';
COMMENT ON FUNCTION ihub._mask_url(text) IS 'Internal: masks secret-looking query parameters for views.';
COMMENT ON FUNCTION ihub._join_url(text, text) IS
    'Internal: an endpoint URL with a request path appended, before the URL''s own query string.';
COMMENT ON FUNCTION ihub._with_query(text, jsonb) IS 'Internal: a request path with the parameters of a query object added.';
COMMENT ON FUNCTION ihub._oauth2_new_state() IS 'Internal: a random state for an OAuth2 authorization URL.';
COMMENT ON FUNCTION ihub._oauth2_authorize_link(text, text, text, text, text) IS
    'Internal: an OAuth2 authorization URL with client, redirect URI, scope and state.';
COMMENT ON FUNCTION ihub._wake_maintenance() IS 'Internal: wakes the maintenance worker when the current transaction commits.';
COMMENT ON FUNCTION ihub._check_expression(text) IS 'Internal: checks that a condition is exactly one SQL expression.';
COMMENT ON FUNCTION ihub.sign(text, text, bigint, text) IS
    'The Standard Webhooks signature (v1,<base64>) of a message id, timestamp and body under a whsec_ secret.';
COMMENT ON FUNCTION ihub.verify_signature(text, text, text, bigint, text) IS
    'Verifies a webhook-signature header (any of its space-separated signatures) in constant time.';

COMMENT ON FUNCTION ihub._wake_job_worker() IS 'Internal: wakes a job worker when the current transaction commits.';
COMMENT ON FUNCTION ihub._wake_scheduler() IS 'Internal: wakes the scheduler when the current transaction commits.';
COMMENT ON FUNCTION ihub._current_job() IS 'Internal: the job this session is running, NULL outside a job.';
COMMENT ON FUNCTION ihub._count_logged(text) IS 'Internal: counts errors logged during the current job (it then ends partial).';
COMMENT ON FUNCTION ihub._job_timeout_ms() IS 'Internal: ihub.job_timeout in milliseconds.';
COMMENT ON FUNCTION ihub.job_progress(bigint, bigint) IS
    'Reports the running job''s progress (done of total), shown in ihub.jobs while it runs. Returns false outside a job.';
COMMENT ON FUNCTION ihub._cron_next(text, timestamptz) IS 'Internal: the next time a five-field cron expression matches (UTC).';
COMMENT ON FUNCTION ihub._cron_prev(text, timestamptz) IS 'Internal: the last time a five-field cron expression matched (UTC).';

COMMENT ON FUNCTION ihub._mask_text(text) IS 'Internal: a log message with tokens, passwords and Authorization values masked.';
COMMENT ON FUNCTION ihub._log_min_level() IS 'Internal: ihub.log_min_level.';
COMMENT ON FUNCTION ihub._histogram(double precision[]) IS 'Internal: a latency histogram of durations (ms).';
COMMENT ON FUNCTION ihub._histogram_add(bigint[], bigint[]) IS 'Internal: element-wise sum of two histograms.';
COMMENT ON FUNCTION ihub._preloaded() IS 'Internal: whether pg_ihub was loaded through shared_preload_libraries.';
COMMENT ON FUNCTION ihub._expected_workers() IS 'Internal: the background workers this database should have.';
COMMENT ON FUNCTION ihub._health_queue_age() IS 'Internal: ihub.health_queue_age.';
COMMENT ON FUNCTION ihub._health_queue_depth() IS 'Internal: ihub.health_queue_depth.';

COMMENT ON FUNCTION ihub._verify_inbound(text, text, text, bigint, jsonb, bytea) IS
    'Internal: verifies an inbound request; NULL when it passes, else the reason.';
COMMENT ON FUNCTION ihub._dedup_key(text, text, jsonb, bytea) IS
    'Internal: a request''s de-duplication key (the webhook-id, else the id header, else the body''s SHA-256), as the listener computes it.';
COMMENT ON FUNCTION ihub._sources_changed() IS 'Internal: bumps the sources version and wakes the listener when the current transaction commits.';
COMMENT ON FUNCTION ihub._wake_processor() IS 'Internal: wakes an inbound processor when the current transaction commits.';
COMMENT ON FUNCTION ihub.test_connection(text) IS
    'Sends one signed test request to an endpoint now, as a delivery would be sent, and reports ok, status, latency, error category and error; records nothing.';
COMMENT ON FUNCTION ihub._row_key(oid, text, text, oid) IS
    'Internal: the primary key (as its type prints it) of the row with this key, if the given role sees it (security-restricted operation).';
COMMENT ON FUNCTION ihub._echo_suppressed(bigint) IS
    'Internal: whether the current transaction syncs the integration of this subscription (ihub.syncing), so that its changes are not captured.';
COMMENT ON FUNCTION ihub._mapper_matches(oid, text, text, oid) IS
    'Internal: up to two values of a table mapper''s column matching a value (exactly, else ignoring case), read as the given role in a security-restricted operation.';

-------------------------------------------------------------------------------
-- Privileges
-------------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA ihub FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ihub FROM PUBLIC;
GRANT USAGE ON SCHEMA ihub TO ihub_viewer;
-- Capture tables are written by pg_ihub's triggers only.
REVOKE ALL ON SCHEMA ihub_capture FROM PUBLIC;

GRANT SELECT ON ihub.integrations, ihub.endpoints, ihub.subscriptions, ihub.deliveries,
                ihub.delivery_attempts, ihub.workers, ihub.jobs, ihub.schedules, ihub.cronwatch,
                ihub.integration_dates, ihub.logs, ihub.activities, ihub.retention_settings,
                ihub.log_settings, ihub.inbound_items, ihub.inbound_failed, ihub.inbound_sources,
                ihub.inbound_rejections, ihub.mappers, ihub.mapper_items, ihub.bindings, ihub.custom_fields,
                ihub.oauth2_credentials, ihub.timers TO ihub_viewer;
GRANT SELECT ON ihub.endpoint_secrets, ihub.oauth2_secrets TO ihub_admin;
GRANT SELECT ON ihub.integration_kind TO ihub_viewer;
GRANT INSERT, UPDATE, DELETE ON ihub.integration_kind TO ihub_admin;

GRANT EXECUTE ON FUNCTION
    -- used by the views, which run functions with the reader's rights
    ihub._mask_settings(jsonb),
    ihub._mask_headers(jsonb),
    ihub._mask_endpoint_headers(jsonb),
    ihub._mask_attempt_headers(jsonb, jsonb),
    ihub._mask_url(text),
    ihub._default_timeout_ms(),
    ihub._workers(),
    ihub.listener_stats(),
    ihub._log_min_level(),
    ihub._join_url(text, text),
    ihub._try_jsonb(bytea),
    ihub._form_jsonb(bytea),
    ihub.endpoint_stats(timestamptz),
    ihub.daily_stats(integer),
    ihub.queue_stats(),
    ihub.health(),
    ihub.sign(text, text, bigint, text),
    ihub._public_key(text),
    ihub.verify_signature(text, text, text, bigint, text),
    ihub.external_id(text, text, text),
    ihub.local_key(text, text, text),
    ihub.has_changed(text, text, text, jsonb)
TO ihub_viewer;

GRANT EXECUTE ON FUNCTION
    ihub.create_integration(text, text, text, jsonb),
    ihub.enable_integration(text),
    ihub.disable_integration(text),
    ihub.delete_integration(text),
    ihub.create_endpoint(text, text, text, text, jsonb, jsonb, text, integer, jsonb, jsonb, double precision, integer, text[], text, text),
    ihub.alter_endpoint(text, integer, jsonb, jsonb, double precision, integer, text[], text),
    ihub.enable_endpoint(text),
    ihub.disable_endpoint(text, text),
    ihub.subscribe(regclass, text, text[], text[], text[], text, boolean, text, text[], jsonb),
    ihub.unsubscribe(bigint),
    ihub.http_request(text, jsonb, text, text, jsonb, text, jsonb, regprocedure, jsonb),
    ihub.replay(bigint),
    ihub.skip(bigint),
    ihub.subscribe_timed(regclass, text, text, interval, text, text),
    ihub.replay_dead(text, timestamptz),
    ihub.enqueue(regprocedure, jsonb, integer, timestamptz, integer, text, text, interval[], interval),
    ihub.cancel_job(bigint),
    ihub.retry_job(bigint),
    ihub.resume_stuck_jobs(),
    ihub.schedule(text, regprocedure, interval, text, jsonb, text, integer, integer, boolean, regrole, boolean),
    ihub.alter_schedule(text, interval, text, jsonb, integer, integer, boolean, boolean),
    ihub.unschedule(text),
    ihub.run_now(text),
    ihub.set_schedule_params(text, text, jsonb),
    ihub.watch(text, text, text, interval),
    ihub.unwatch(text),
    ihub.get_date(text, text),
    ihub.set_date(text, text, timestamptz),
    ihub.log(text, text, jsonb, text, bigint, regclass, text, bigint),
    ihub.set_log_level(text, text),
    ihub.mark_checked(bigint[]),
    ihub.close_activity(bigint, text),
    ihub.create_source(text, text, regprocedure, text, text, text, interval, interval, text, text, jsonb),
    ihub.drop_source(text, text),
    ihub.receive(text, text, jsonb, bytea, timestamptz),
    ihub.reactivate_inbound(bigint[]),
    ihub.process_inbound(bigint),
    ihub.create_mapper(text, text, text, regclass, text, text, text, text[]),
    ihub.drop_mapper(text, text),
    ihub.map_item(text, text, text[], text, text),
    ihub.delete_mapper_item(text, text, bigint),
    ihub.map_import(text, text, text),
    ihub.map_export(text, text, text),
    ihub.bind(text, text, regclass, text, text, jsonb),
    ihub.unbind(text, text, text),
    ihub.upsert(text, text, regclass, text, jsonb),
    ihub.syncing(text, boolean),
    ihub.add_custom_field(regclass, text, text, text, text, text[], text[]),
    ihub.drop_custom_field(regclass, text),
    ihub.test_connection(text),
    ihub.create_oauth2(text, text, text, text, text, text, text, text, text, text),
    ihub.drop_oauth2(text, text),
    ihub.refresh_oauth2(text, text),
    ihub.oauth2_authorize_url(text, text, text)
TO ihub_developer;

-- Harmless anywhere: they only act inside a running job.
GRANT EXECUTE ON FUNCTION ihub.retry_later(text, interval), ihub.job_progress(bigint, bigint) TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    ihub.rotate_secret(text, text, interval),
    ihub.set_retention(text, interval),
    ihub.set_activity_users(regrole, regrole),
    ihub.cleanup()
TO ihub_admin;
