-- pg_ihub 0.1.0 -> 0.2.0
--
-- Security (issue 8): every action runs with the rights of the role that
-- asked for it. Functions that act for their caller become C entry points
-- passing the caller to internal SECURITY DEFINER halves (src/caller.rs);
-- schedules, jobs and inbound items are acted on only by members of their
-- role; subscription conditions run as the subscriber from a definer trigger
-- (src/capture.rs), so nobody needs a privilege on capture tables; custom
-- header values and signatures are masked in views.

\echo Use "ALTER EXTENSION pg_ihub UPDATE TO '0.2.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Who asked: internal halves and C entry points
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._capture_filter(p_sub ihub.subscription, p_event text)
RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rowtype text := format_type((SELECT reltype FROM pg_class WHERE oid = p_sub.source), NULL);
    v_from text;
    v_filters text[] := '{}';
BEGIN
    IF p_event = 'insert' THEN
        v_from := format('FROM (SELECT row_number() OVER () AS _ihub_n, t.* FROM ihub_new t) AS new '
                         'CROSS JOIN LATERAL (SELECT (NULL::%s).*) AS old', v_rowtype);
    ELSIF p_event = 'delete' THEN
        v_from := format('FROM (SELECT row_number() OVER () AS _ihub_n, t.* FROM ihub_old t) AS old '
                         'CROSS JOIN LATERAL (SELECT (NULL::%s).*) AS new', v_rowtype);
    ELSE
        v_from := 'FROM (SELECT row_number() OVER () AS _ihub_n, t.* FROM ihub_new t) AS new '
                  'JOIN (SELECT row_number() OVER () AS _ihub_n, t.* FROM ihub_old t) AS old USING (_ihub_n)';
        IF p_sub.watch IS NOT NULL THEN
            v_filters := v_filters || (
                SELECT '(' || string_agg(format('new.%1$I IS DISTINCT FROM old.%1$I', c), ' OR ') || ')'
                FROM unnest(p_sub.watch) AS c);
        END IF;
    END IF;
    IF p_sub.condition IS NOT NULL THEN
        -- Checked by ihub._check_expression to be exactly one expression.
        v_filters := v_filters || format(E'(\n%s\n)', p_sub.condition);
    END IF;
    RETURN format('SELECT %s._ihub_n %s%s', CASE p_event WHEN 'delete' THEN 'old' ELSE 'new' END, v_from,
                  CASE WHEN cardinality(v_filters) > 0 THEN ' WHERE ' || array_to_string(v_filters, ' AND ') ELSE '' END);
END
$$;

CREATE FUNCTION ihub._subscribe_by(
    source regclass,
    endpoint text,
    events text[] DEFAULT '{insert,update,delete}',
    columns text[] DEFAULT NULL,
    watch text[] DEFAULT NULL,
    condition text DEFAULT NULL,
    test_mode boolean DEFAULT false,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_caller name := pg_get_userbyid(p_caller);
    v_endpoint ihub.endpoint;
    v_integration ihub.integration;
    v_rel record;
    v_events text[];
    v_sub ihub.subscription;
    v_event text;
    v_bad text;
    v_capture text;
    v_function text;
    v_columns text[];
BEGIN
    PERFORM ihub._require_workers();
    v_endpoint := ihub._endpoint(_subscribe_by.endpoint);
    SELECT * INTO v_integration FROM ihub.integration WHERE id = v_endpoint.integration_id;

    SELECT c.relkind, c.reltype, n.nspname, c.relname INTO v_rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = source;
    IF v_rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', source
            USING ERRCODE = 'wrong_object_type', HINT = 'Subscribe to an ordinary or partitioned table; views and foreign tables have no row-change triggers.';
    END IF;
    IF v_rel.nspname IN ('ihub', 'ihub_capture', 'pg_catalog', 'information_schema') THEN
        RAISE EXCEPTION 'cannot subscribe to %', source
            USING ERRCODE = 'wrong_object_type', HINT = 'Subscribe to your own tables.';
    END IF;
    IF NOT has_table_privilege(v_caller, source, 'SELECT') OR NOT has_table_privilege(v_caller, source, 'TRIGGER') THEN
        RAISE EXCEPTION 'permission denied to subscribe to %', source
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Role %s needs SELECT and TRIGGER on the table (or to own it).', v_caller);
    END IF;

    SELECT array_agg(DISTINCT lower(e) ORDER BY lower(e)) INTO v_events FROM unnest(events) AS e;
    v_bad := (SELECT string_agg(e, ', ') FROM unnest(v_events) AS e WHERE e NOT IN ('insert', 'update', 'delete'));
    IF v_events IS NULL OR v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'invalid events: %', coalesce(v_bad, 'none given')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use any of insert, update and delete, e.g. ''{insert,update}''.';
    END IF;

    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO v_columns
    FROM pg_attribute a WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped;
    v_bad := (SELECT string_agg(format('%I', c), ', ') FROM unnest(columns || watch) AS c WHERE c <> ALL (v_columns));
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'table % has no column %', source, v_bad
            USING ERRCODE = 'undefined_column', HINT = format('Its columns are: %s.', array_to_string(v_columns, ', '));
    END IF;
    IF cardinality(columns) = 0 OR cardinality(watch) = 0 THEN
        RAISE EXCEPTION 'columns and watch must list at least one column when given'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL for all columns.';
    END IF;
    IF watch IS NOT NULL AND 'update' <> ALL (v_events) THEN
        RAISE EXCEPTION 'watch applies to updates, but events has no update'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Add update to events, or drop watch.';
    END IF;
    IF '_ihub_row' = ANY (v_columns) OR '_ihub_n' = ANY (v_columns) THEN
        RAISE EXCEPTION 'table % has a column named _ihub_row or _ihub_n, which pg_ihub reserves', source
            USING ERRCODE = 'duplicate_column', HINT = 'Rename the column to subscribe to this table.';
    END IF;
    IF ihub._json_cast_hazard(source) IS NOT NULL THEN
        RAISE EXCEPTION 'cannot subscribe to %: %', source, ihub._json_cast_hazard(source)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'pg_ihub renders changes as JSON with its workers'' rights and never runs such a cast: drop it (DROP CAST), or subscribe to a table without that type.';
    END IF;
    IF condition IS NOT NULL THEN
        PERFORM ihub._check_expression(condition);
        -- Parse analysis only (names, types), never planned or run here: the
        -- condition runs later in the writer's transaction as its subscriber.
        BEGIN
            EXECUTE format(E'PREPARE ihub_condition_check AS SELECT (\n%s\n)::boolean FROM %s AS new, %s AS old',
                           condition, source, source);
            DEALLOCATE ihub_condition_check;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid condition: %', SQLERRM
                USING ERRCODE = 'syntax_error',
                      HINT = 'Write one SQL boolean expression over new and old, e.g. new.amount > 100 AND old.status <> new.status.';
        END;
    END IF;

    INSERT INTO ihub.subscription (endpoint_id, source, events, columns, watch, condition, test_mode, created_by)
    VALUES (v_endpoint.id, source, v_events, columns, watch, condition, coalesce(test_mode, false), v_caller)
    RETURNING * INTO v_sub;

    v_capture := format('ihub_capture.%I', 'sub_' || v_sub.id);
    EXECUTE format('CREATE TABLE %s (op "char" NOT NULL, xid xid8 NOT NULL, occurred_at timestamptz NOT NULL, new_row %s, old_row %s) '
                   'WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)',
                   v_capture, format_type(v_rel.reltype, NULL), format_type(v_rel.reltype, NULL));
    EXECUTE format('COMMENT ON TABLE %s IS %L', v_capture,
                   format('pg_ihub capture table of subscription %s (%s -> %s)', v_sub.id, source, v_endpoint.name));
    FOREACH v_event IN ARRAY v_events LOOP
        -- C-language triggers copy the rows in bulk; with watched columns or
        -- a condition, ihub._capture_filtered first selects the rows that
        -- pass, as the subscriber. By name, not OID: a dumped and restored
        -- trigger must still find its capture table.
        v_function := format(CASE WHEN condition IS NULL AND (watch IS NULL OR v_event <> 'update')
                                  THEN 'ihub._capture_rows(%L)' ELSE 'ihub._capture_filtered(%L)' END,
                             'ihub_capture.sub_' || v_sub.id);
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %I FOR EACH STATEMENT EXECUTE FUNCTION %s',
                       format('ihub_sub_%s_%s', v_sub.id, v_event), upper(v_event), source,
                       CASE v_event WHEN 'insert' THEN 'NEW' WHEN 'delete' THEN 'OLD' ELSE 'OLD TABLE AS ihub_old NEW' END,
                       CASE v_event WHEN 'delete' THEN 'ihub_old' ELSE 'ihub_new' END,
                       v_function);
    END LOOP;
    IF v_integration.state = 'inactive' THEN
        PERFORM ihub._set_capture_enabled(v_sub.id, false);
    END IF;
    RETURN v_sub.id;
END
$$;

CREATE OR REPLACE FUNCTION ihub.subscribe(
    source regclass,
    endpoint text,
    events text[] DEFAULT '{insert,update,delete}',
    columns text[] DEFAULT NULL,
    watch text[] DEFAULT NULL,
    condition text DEFAULT NULL,
    test_mode boolean DEFAULT false
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._unsubscribe_by(id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
    v_event text;
BEGIN
    SELECT * INTO v_sub FROM ihub.subscription s WHERE s.id = _unsubscribe_by.id FOR UPDATE;
    IF v_sub.id IS NULL THEN
        RAISE EXCEPTION 'subscription % does not exist', _unsubscribe_by.id
            USING ERRCODE = 'undefined_object', HINT = 'List subscriptions in ihub.subscriptions.';
    END IF;
    -- Its subscriber's (a dropped subscriber's: a superuser's) to remove.
    PERFORM ihub._require_may_act_for(
        p_caller, coalesce((SELECT r.oid FROM pg_roles r WHERE r.rolname = v_sub.created_by), 10)::regrole,
        format('subscription %s', v_sub.id));
    -- Changes captured but not yet routed become deliveries before the
    -- capture table goes, so that nothing committed is lost.
    PERFORM ihub._route(v_sub, NULL, NULL);
    FOREACH v_event IN ARRAY v_sub.events LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('ihub_sub_%s_%s', v_sub.id, v_event), v_sub.source);
        EXECUTE format('DROP FUNCTION IF EXISTS ihub_capture.%I()', format('sub_%s_%s', v_sub.id, v_event));
    END LOOP;
    EXECUTE format('DROP TABLE IF EXISTS ihub_capture.%I', 'sub_' || v_sub.id);
    DELETE FROM ihub.subscription s WHERE s.id = v_sub.id;
END
$$;

CREATE OR REPLACE FUNCTION ihub.unsubscribe(id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._log_by(
    level text,
    message text,
    details jsonb DEFAULT NULL,
    integration text DEFAULT NULL,
    delivery bigint DEFAULT NULL,
    row_table regclass DEFAULT NULL,
    row_key text DEFAULT NULL,
    inbound bigint DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_level text := lower(coalesce(level, 'info'));
    v_integration bigint;
    v_setting ihub.log_setting;
    v_id bigint;
    v_at timestamptz := clock_timestamp();
    v_message text;
BEGIN
    IF ihub._level_rank(v_level) IS NULL THEN
        RAISE WARNING 'pg_ihub: unknown log level "%", logged as info', level
            USING HINT = 'Levels are debug, info, warning, error and critical.';
        v_level := 'info';
    END IF;
    BEGIN
        SELECT id INTO v_integration FROM ihub.integration i WHERE i.name = _log_by.integration;
        SELECT * INTO v_setting FROM ihub.log_setting s WHERE s.integration_id = v_integration;
        IF v_setting.integration_id IS NOT NULL THEN
            IF NOT v_setting.enabled OR ihub._level_rank(v_level) < ihub._level_rank(v_setting.min_level) THEN
                RETURN NULL;
            END IF;
        ELSIF ihub._level_rank(v_level) < ihub._level_rank(ihub._log_min_level()) THEN
            RETURN NULL;
        END IF;
        v_message := ihub._mask_text(left(coalesce(message, ''), 10000));
        INSERT INTO ihub.log_entry (logged_at, level, message, details, integration_id, job_id, delivery_id,
                                    inbound_id, row_table, row_key, logged_by)
        VALUES (v_at, v_level, v_message, ihub._mask_settings(details), v_integration, ihub._current_job(),
                _log_by.delivery, _log_by.inbound, _log_by.row_table, _log_by.row_key, pg_get_userbyid(p_caller))
        RETURNING id INTO v_id;
        PERFORM ihub._count_logged(v_level);
        IF v_level = 'critical' THEN
            PERFORM ihub._open_activity(v_id, v_message, ihub._mask_settings(details), v_integration,
                                        ihub._current_job(), _log_by.delivery, _log_by.row_table, _log_by.row_key, _log_by.inbound);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_ihub: could not write a log entry: %', SQLERRM;
        RETURN NULL;
    END;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION ihub.log(
    level text,
    message text,
    details jsonb DEFAULT NULL,
    integration text DEFAULT NULL,
    delivery bigint DEFAULT NULL,
    row_table regclass DEFAULT NULL,
    row_key text DEFAULT NULL,
    inbound bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._mark_checked_by(ids bigint[], p_caller regrole) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    UPDATE ihub.log_entry SET checked_at = now(), checked_by = pg_get_userbyid(p_caller)
    WHERE id = ANY (ids) AND checked_at IS NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION ihub.mark_checked(ids bigint[]) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._close_activity_by(id bigint, note text DEFAULT NULL, p_caller regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.activity a SET state = 'closed', closed_at = now(), closed_by = pg_get_userbyid(p_caller), note = _close_activity_by.note
    WHERE a.id = _close_activity_by.id AND a.state = 'open';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no open activity %', _close_activity_by.id
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT * FROM ihub.activities WHERE state = ''open''.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION ihub.close_activity(id bigint, note text DEFAULT NULL) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._may_act_for(p_caller regrole, p_role regrole) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_has_role(p_caller, p_role, 'MEMBER')
        OR (pg_has_role(p_caller, 'ihub_admin', 'MEMBER')
            AND coalesce((SELECT NOT (r.rolsuper OR r.rolcreaterole)
                                 AND NOT pg_has_role(r.oid, 'pg_execute_server_program', 'MEMBER')
                                 AND NOT pg_has_role(r.oid, 'pg_write_server_files', 'MEMBER')
                                 AND NOT pg_has_role(r.oid, 'pg_read_server_files', 'MEMBER')
                          FROM pg_roles r WHERE r.oid = p_role), false))
$$;

CREATE FUNCTION ihub._require_may_act_for(p_caller regrole, p_role regrole, p_what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT ihub._may_act_for(p_caller, p_role) THEN
        RAISE EXCEPTION 'role % may not act on %, which runs as %', p_caller, p_what, p_role
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Only members of %s, or ihub_admin when it is not a superuser or otherwise privileged, may change, run, retry or cancel it.', p_role);
    END IF;
END
$$;

CREATE FUNCTION ihub._enqueue_by(
    fn regprocedure,
    args jsonb DEFAULT '{}',
    priority integer DEFAULT 10,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 5,
    identity_key text DEFAULT NULL,
    integration text DEFAULT NULL,
    retry_schedule interval[] DEFAULT NULL,
    timeout interval DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_role name := pg_get_userbyid(p_caller);
BEGIN
    PERFORM ihub._require_workers();
    PERFORM ihub._check_job_function(fn, v_role);
    IF args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'job args must be a JSON object' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"since": "2026-01-01"}.';
    END IF;
    IF priority IS NULL OR priority < 0 THEN
        RAISE EXCEPTION 'priority must be 0 or more' USING ERRCODE = 'invalid_parameter_value', HINT = '0 runs first; the default is 10.';
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1' USING ERRCODE = 'invalid_parameter_value', HINT = 'The default is 5.';
    END IF;
    IF timeout <= interval '0' OR EXISTS (SELECT 1 FROM unnest(retry_schedule) d WHERE d IS NULL OR d < interval '0') THEN
        RAISE EXCEPTION 'timeout and retry delays must be positive intervals' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example retry_schedule => ''{1 minute, 10 minutes}'', timeout => ''15 minutes''.';
    END IF;
    RETURN ihub._enqueue(fn, args, priority, coalesce(run_at, now()), max_attempts, identity_key,
                         CASE WHEN integration IS NOT NULL THEN ihub._integration_id(integration) END,
                         retry_schedule, timeout, p_caller);
END
$$;

CREATE OR REPLACE FUNCTION ihub.enqueue(
    fn regprocedure,
    args jsonb DEFAULT '{}',
    priority integer DEFAULT 10,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 5,
    identity_key text DEFAULT NULL,
    integration text DEFAULT NULL,
    retry_schedule interval[] DEFAULT NULL,
    timeout interval DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._cancel_job_by(id bigint, p_caller regrole) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.job;
BEGIN
    SELECT * INTO v FROM ihub.job j WHERE j.id = _cancel_job_by.id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', _cancel_job_by.id USING ERRCODE = 'undefined_object', HINT = 'List jobs in ihub.jobs.';
    END IF;
    PERFORM ihub._require_may_act_for(p_caller, v.run_as, format('job %s', v.id));
    IF v.state IN ('pending', 'retry') THEN
        UPDATE ihub.job j SET state = 'cancelled', finished_at = now(), last_error = 'cancelled by ' || pg_get_userbyid(p_caller)
        WHERE j.id = v.id;
        RETURN 'cancelled';
    ELSIF v.state = 'running' THEN
        -- The worker's query is cancelled; the failed attempt is then
        -- recorded as cancelled rather than retried.
        UPDATE ihub.job j SET cancel_requested = true WHERE j.id = v.id;
        PERFORM pg_cancel_backend(v.worker_pid);
        RETURN 'cancelling';
    END IF;
    RAISE EXCEPTION 'job % is %; only queued or running jobs can be cancelled', v.id, v.state
        USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Use ihub.retry_job to run a finished job again.';
END
$$;

CREATE OR REPLACE FUNCTION ihub.cancel_job(id bigint) RETURNS text
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._retry_job_by(id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.job;
BEGIN
    PERFORM ihub._require_workers();
    SELECT * INTO v FROM ihub.job j WHERE j.id = _retry_job_by.id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', _retry_job_by.id USING ERRCODE = 'undefined_object', HINT = 'List jobs in ihub.jobs.';
    END IF;
    PERFORM ihub._require_may_act_for(p_caller, v.run_as, format('job %s', v.id));
    IF v.state NOT IN ('failed', 'cancelled', 'partial', 'retry') THEN
        RAISE EXCEPTION 'job % is %; only failed, cancelled, partial or retrying jobs can be retried', v.id, v.state
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'A queued or running job will run anyway.';
    END IF;
    IF v.identity_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM ihub.job j WHERE j.identity_key = v.identity_key AND j.id <> v.id AND j.state IN ('pending', 'running', 'retry')) THEN
        RAISE EXCEPTION 'another job with identity key % is queued or running', v.identity_key
            USING ERRCODE = 'unique_violation', HINT = 'Wait for it, or cancel it first.';
    END IF;
    UPDATE ihub.job j SET state = 'pending', run_at = now(), budget_start = j.attempts, finished_at = NULL,
                          cancel_requested = false
    WHERE j.id = v.id;
    PERFORM ihub._wake_job_worker();
END
$$;

CREATE OR REPLACE FUNCTION ihub.retry_job(id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._own_schedule(p_name text, p_caller regrole) RETURNS ihub.schedule
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.schedule := ihub._schedule_row(p_name);
BEGIN
    PERFORM ihub._require_may_act_for(p_caller, v.run_as, format('scheduled action "%s"', p_name));
    RETURN v;
END
$$;

CREATE FUNCTION ihub._schedule_by(
    name text,
    fn regprocedure,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT '{}',
    integration text DEFAULT NULL,
    priority integer DEFAULT 10,
    number_of_calls integer DEFAULT -1,
    repeat_missed boolean DEFAULT false,
    run_as regrole DEFAULT NULL,
    active boolean DEFAULT true,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_invoker name := pg_get_userbyid(p_caller);
    v_role regrole := coalesce(run_as, p_caller);
    v_first timestamptz;
    v_id bigint;
BEGIN
    PERFORM ihub._require_workers();
    PERFORM ihub._check_name('scheduled action', _schedule_by.name);
    IF EXISTS (SELECT 1 FROM ihub.schedule s WHERE s.name = _schedule_by.name) THEN
        RAISE EXCEPTION 'scheduled action "%" already exists', _schedule_by.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or change it with ihub.alter_schedule.';
    END IF;
    v_first := ihub._check_timing(every, cron);
    IF NOT pg_has_role(p_caller, v_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % may not schedule actions that run as %', v_invoker, v_role
            USING ERRCODE = 'insufficient_privilege', HINT = 'run_as must be a role you are a member of.';
    END IF;
    PERFORM ihub._check_job_function(fn, pg_get_userbyid(v_role));
    IF args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'args must be a JSON object' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"full": false}.';
    END IF;
    IF priority IS NULL OR priority < 0 OR number_of_calls IS NULL OR number_of_calls < -1 THEN
        RAISE EXCEPTION 'priority must be 0 or more and number_of_calls -1 (unlimited) or more'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Priority 0 runs first; number_of_calls counts down to 0.';
    END IF;
    INSERT INTO ihub.schedule (name, fn, every, cron, args, integration_id, priority, number_of_calls, repeat_missed,
                               run_as, active, next_run_at)
    VALUES (_schedule_by.name, fn, every, cron, args,
            CASE WHEN integration IS NOT NULL THEN ihub._integration_id(integration) END,
            priority, number_of_calls, coalesce(repeat_missed, false), v_role,
            coalesce(active, true) AND number_of_calls <> 0, v_first)
    RETURNING id INTO v_id;
    PERFORM ihub._wake_scheduler();
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION ihub.schedule(
    name text,
    fn regprocedure,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT '{}',
    integration text DEFAULT NULL,
    priority integer DEFAULT 10,
    number_of_calls integer DEFAULT -1,
    repeat_missed boolean DEFAULT false,
    run_as regrole DEFAULT NULL,
    active boolean DEFAULT true
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._alter_schedule_by(
    name text,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT NULL,
    priority integer DEFAULT NULL,
    number_of_calls integer DEFAULT NULL,
    repeat_missed boolean DEFAULT NULL,
    active boolean DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.schedule := ihub._own_schedule(_alter_schedule_by.name, p_caller);
    v_next timestamptz := v.next_run_at;
BEGIN
    IF every IS NOT NULL OR cron IS NOT NULL THEN
        v_next := ihub._check_timing(every, cron);
        v.every := every;
        v.cron := cron;
    ELSIF active AND NOT v.active THEN
        -- Reactivated: due from now on, not for the time it was off.
        v_next := coalesce(now() + v.every, ihub._cron_next(v.cron, now()));
    END IF;
    IF args IS NOT NULL AND jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'args must be a JSON object' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"full": false}.';
    END IF;
    IF priority < 0 OR number_of_calls < -1 THEN
        RAISE EXCEPTION 'priority must be 0 or more and number_of_calls -1 (unlimited) or more'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Priority 0 runs first; number_of_calls counts down to 0.';
    END IF;
    UPDATE ihub.schedule s
    SET every = v.every, cron = v.cron, next_run_at = v_next,
        args = coalesce(_alter_schedule_by.args, s.args),
        priority = coalesce(_alter_schedule_by.priority, s.priority),
        number_of_calls = coalesce(_alter_schedule_by.number_of_calls, s.number_of_calls),
        repeat_missed = coalesce(_alter_schedule_by.repeat_missed, s.repeat_missed),
        active = coalesce(_alter_schedule_by.active, s.active) AND coalesce(_alter_schedule_by.number_of_calls, s.number_of_calls) <> 0
    WHERE s.id = v.id;
    PERFORM ihub._wake_scheduler();
END
$$;

CREATE OR REPLACE FUNCTION ihub.alter_schedule(
    name text,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT NULL,
    priority integer DEFAULT NULL,
    number_of_calls integer DEFAULT NULL,
    repeat_missed boolean DEFAULT NULL,
    active boolean DEFAULT NULL
) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._unschedule_by(name text, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM ihub.schedule WHERE id = (ihub._own_schedule(_unschedule_by.name, p_caller)).id;
    PERFORM ihub._wake_scheduler();
END
$$;

CREATE OR REPLACE FUNCTION ihub.unschedule(name text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._run_now_by(name text, p_caller regrole) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ihub._require_workers();
    RETURN ihub._run_schedule(ihub._own_schedule(_run_now_by.name, p_caller));
END
$$;

CREATE OR REPLACE FUNCTION ihub.run_now(name text) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._set_schedule_params_by(schedule text, integration text, params jsonb, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schedule bigint := (ihub._own_schedule(_set_schedule_params_by.schedule, p_caller)).id;
    v_integration bigint := ihub._integration_id(_set_schedule_params_by.integration);
BEGIN
    IF params IS NULL THEN
        DELETE FROM ihub.schedule_param WHERE schedule_id = v_schedule AND integration_id = v_integration;
        RETURN;
    END IF;
    IF jsonb_typeof(params) <> 'object' THEN
        RAISE EXCEPTION 'params must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'They are merged into the action''s args, e.g. {"warehouse": "north"}; NULL removes them.';
    END IF;
    INSERT INTO ihub.schedule_param (schedule_id, integration_id, params) VALUES (v_schedule, v_integration, params)
    ON CONFLICT (schedule_id, integration_id) DO UPDATE SET params = EXCLUDED.params;
END
$$;

CREATE OR REPLACE FUNCTION ihub.set_schedule_params(schedule text, integration text, params jsonb) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._set_date_by(integration text, name text, value timestamptz, p_caller regrole) RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_integration bigint := ihub._integration_id(_set_date_by.integration);
    v_old timestamptz;
    v_who name := pg_get_userbyid(p_caller);
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'a date needs a name' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ''last_import''.';
    END IF;
    SELECT d.value INTO v_old FROM ihub.integration_date d
    WHERE d.integration_id = v_integration AND d.name = _set_date_by.name FOR UPDATE;
    INSERT INTO ihub.integration_date (integration_id, name, value, updated_at, updated_by)
    VALUES (v_integration, _set_date_by.name, _set_date_by.value, now(), v_who)
    ON CONFLICT (integration_id, name) DO UPDATE
        SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by;
    IF ihub._current_job() IS NULL AND v_old IS DISTINCT FROM _set_date_by.value THEN
        INSERT INTO ihub.integration_date_change (integration_id, name, old_value, new_value, changed_by)
        VALUES (v_integration, _set_date_by.name, v_old, _set_date_by.value, v_who);
        RAISE WARNING 'integration date %.% changed by hand from % to %', _set_date_by.integration, _set_date_by.name,
                      coalesce(v_old::text, 'unset'), coalesce(_set_date_by.value::text, 'unset')
            USING HINT = CASE WHEN _set_date_by.value < v_old THEN 'The next sync will import again what it already imported since then.'
                              ELSE 'The next sync will skip what changed in between.' END;
    END IF;
    RETURN v_old;
END
$$;

CREATE OR REPLACE FUNCTION ihub.set_date(integration text, name text, value timestamptz) RETURNS timestamptz
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._create_source_by(
    integration text,
    name text,
    handler regprocedure,
    verify text DEFAULT 'standard-webhooks',
    secret text DEFAULT NULL,
    header text DEFAULT NULL,
    tolerance interval DEFAULT '5 minutes',
    dedup_window interval DEFAULT '24 hours',
    id_header text DEFAULT NULL,
    ordering_key text DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(_create_source_by.integration);
    v_role name := pg_get_userbyid(p_caller);
    v_proc pg_proc;
    v_id bigint;
BEGIN
    PERFORM ihub._check_name('inbound source', _create_source_by.name);
    IF EXISTS (SELECT 1 FROM ihub.inbound_source s WHERE s.integration_id = v_integration AND s.name = _create_source_by.name) THEN
        RAISE EXCEPTION 'integration "%" already has an inbound source "%"', _create_source_by.integration, _create_source_by.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or drop it with ihub.drop_source first.';
    END IF;
    SELECT * INTO v_proc FROM pg_proc WHERE oid = handler;
    IF v_proc.prokind <> 'f' OR v_proc.pronargs <> 1 OR v_proc.proargtypes[0] <> 'ihub.inbound_items'::regtype OR v_proc.proretset THEN
        RAISE EXCEPTION 'function % cannot handle inbound items', handler
            USING ERRCODE = 'invalid_function_definition',
                  HINT = 'A handler takes one ihub.inbound_items and returns jsonb (or void): CREATE FUNCTION on_order(item ihub.inbound_items) RETURNS jsonb.';
    END IF;
    IF NOT has_function_privilege(v_role, handler, 'EXECUTE') THEN
        RAISE EXCEPTION 'role % may not execute %', v_role, handler
            USING ERRCODE = 'insufficient_privilege', HINT = 'Handlers run as the role that created the source; grant it EXECUTE.';
    END IF;
    IF verify IS NULL OR verify NOT IN ('standard-webhooks', 'hmac-sha256', 'shared-secret', 'none') THEN
        RAISE EXCEPTION 'unknown verification "%"', verify
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use standard-webhooks, hmac-sha256, shared-secret or none.';
    END IF;
    IF verify <> 'none' AND coalesce(secret, '') = '' THEN
        RAISE EXCEPTION 'verification % needs a secret', verify
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the secret the sender signs with (whsec_... for Standard Webhooks).';
    END IF;
    IF verify = 'standard-webhooks' THEN
        PERFORM ihub._check_secret(secret);
    END IF;
    IF verify = 'shared-secret' AND header IS NULL THEN
        RAISE EXCEPTION 'shared-secret verification needs the header that carries the secret'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example header => ''X-Zoho-Webhook-Secret''.';
    END IF;
    IF tolerance IS NULL OR tolerance < interval '0' OR dedup_window IS NULL OR dedup_window < interval '0' THEN
        RAISE EXCEPTION 'tolerance and dedup_window must be non-negative intervals'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example tolerance => ''5 minutes'', dedup_window => ''1 day''.';
    END IF;
    IF ordering_key IS NOT NULL AND ordering_key !~ '^header:[A-Za-z0-9_-]+$' AND ordering_key !~ '^\{.+\}$' THEN
        RAISE EXCEPTION 'invalid ordering key "%"', ordering_key
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use header:<name>, or a JSON path into the body as a text array, e.g. ''{customer,id}''.';
    END IF;
    INSERT INTO ihub.inbound_source (integration_id, name, handler, verify, header, id_header, ordering_key,
                                     tolerance, dedup_window, run_as)
    VALUES (v_integration, _create_source_by.name, handler, verify, lower(header), lower(id_header), ordering_key,
            tolerance, dedup_window, p_caller)
    RETURNING id INTO v_id;
    IF secret IS NOT NULL THEN
        INSERT INTO ihub.inbound_secret (source_id, secret) VALUES (v_id, secret);
    END IF;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION ihub.create_source(
    integration text,
    name text,
    handler regprocedure,
    verify text DEFAULT 'standard-webhooks',
    secret text DEFAULT NULL,
    header text DEFAULT NULL,
    tolerance interval DEFAULT '5 minutes',
    dedup_window interval DEFAULT '24 hours',
    id_header text DEFAULT NULL,
    ordering_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._receive_by(integration text, source text, headers jsonb, body bytea,
                             execute_at timestamptz DEFAULT now(),
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.inbound_source := ihub._source_row(_receive_by.integration, _receive_by.source);
    v_state text;
    v_headers jsonb := (SELECT coalesce(jsonb_object_agg(lower(key), value), '{}') FROM jsonb_each_text(coalesce(headers, '{}')));
    v_reason text;
    v_id bigint;
    -- Stored like the listener stores them: credentials and the source's
    -- secret header masked, whether the request passes or not.
    v_stored jsonb := ihub._mask_headers(v_headers, v.header);
BEGIN
    SELECT state INTO v_state FROM ihub.integration WHERE id = v.integration_id;
    IF v_state = 'inactive' THEN
        RAISE EXCEPTION 'integration "%" is inactive', _receive_by.integration
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Enable it first: SELECT ihub.enable_integration(%L);', _receive_by.integration);
    END IF;
    IF body IS NULL OR octet_length(body) > pg_size_bytes(current_setting('ihub.max_body_size')) THEN
        RAISE EXCEPTION 'body is missing or larger than ihub.max_body_size (%)', current_setting('ihub.max_body_size')
            USING ERRCODE = 'program_limit_exceeded', HINT = 'Senders should split large payloads.';
    END IF;
    v_reason := ihub._verify_inbound(v.verify, (SELECT secret FROM ihub.inbound_secret WHERE source_id = v.id),
                                     v.header, extract(epoch FROM v.tolerance)::bigint, v_headers, body);
    IF v_reason IS NOT NULL THEN
        PERFORM ihub._reject_inbound(ARRAY[v.id], ARRAY[v_reason], ARRAY['sql:' || pg_get_userbyid(p_caller)],
                                     ARRAY[encode(sha256(body), 'hex')], ARRAY[v_stored]);
        RAISE WARNING 'pg_ihub: inbound request for %/% refused: %', _receive_by.integration, _receive_by.source, v_reason;
        RETURN NULL;
    END IF;
    SELECT a.item_id INTO v_id
    FROM ihub._accept_inbound(ARRAY[v.id], ARRAY[v_stored], ARRAY[body], ARRAY[ihub._dedup_key(v, v_headers, body)],
                              ARRAY['sql:' || pg_get_userbyid(p_caller)], ARRAY[coalesce(execute_at, now())]) a;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION ihub.receive(integration text, source text, headers jsonb, body bytea,
                             execute_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._reactivate_inbound_by(ids bigint[], p_caller regrole) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
    v_denied text;
    v_role text;
BEGIN
    -- Reactivating runs the source's handler again, as the source's role.
    SELECT string_agg(t.id::text, ', ' ORDER BY t.id), min(s.run_as::text) INTO v_denied, v_role
    FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
    WHERE t.id = ANY (ids) AND t.state = 'failed' AND NOT ihub._may_act_for(p_caller, s.run_as);
    IF v_denied IS NOT NULL THEN
        RAISE EXCEPTION 'role % may not reactivate inbound items %, whose handler runs as %', p_caller, v_denied, v_role
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only members of the source''s role, or ihub_admin when it is not a superuser, may run its handler again.';
    END IF;
    UPDATE ihub.inbound_item
    SET state = 'queued', execute_at = now(), reactivated = reactivated + 1, processed_at = NULL
    WHERE id = ANY (ids) AND state = 'failed';
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM ihub._wake_processor();
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION ihub.reactivate_inbound(ids bigint[]) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._inbound_take(p_id bigint, p_caller regrole) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_state text;
    v_source ihub.inbound_source;
BEGIN
    SELECT t.state INTO v_state FROM ihub.inbound_item t WHERE t.id = p_id FOR UPDATE;
    IF v_state IS NULL THEN
        RAISE EXCEPTION 'inbound item % does not exist', p_id USING ERRCODE = 'undefined_object', HINT = 'See ihub.inbound_items.';
    END IF;
    SELECT s.* INTO v_source FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id WHERE t.id = p_id;
    -- The handler runs in the caller's session with the caller's rights: only
    -- as the source's own role, never with more rights than that role's.
    IF p_caller <> v_source.run_as THEN
        RAISE EXCEPTION 'role % may not process inbound item % by hand: its handler runs as %', p_caller, p_id, v_source.run_as
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('SET ROLE %s first (as a member of it), or queue it again with ihub.reactivate_inbound, and a processor runs it as %s.', v_source.run_as, v_source.run_as);
    END IF;
    IF v_state NOT IN ('queued', 'failed') THEN
        RAISE EXCEPTION 'inbound item % is %', p_id, v_state
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Only queued or failed items can be processed by hand.';
    END IF;
    UPDATE ihub.inbound_item t SET state = 'processing', processor_pid = pg_backend_pid(), attempts = t.attempts + 1
    WHERE t.id = p_id;
    RETURN ihub._handler_call(v_source.handler);
END
$$;


-------------------------------------------------------------------------------
-- Rendering never runs a cast to json a role other than a superuser wrote;
-- statements run as a role name pg_catalog explicitly
-------------------------------------------------------------------------------

-- Rendering a row as JSON (to_jsonb) calls the cast to json of any
-- non-built-in type in it, including types nested in arrays, domains, ranges
-- and composites. The dispatcher renders as the superuser, so a cast whose
-- function a role other than a superuser owns would run with its rights:
-- such a table is not rendered. Returns what stands in the way, or NULL.
CREATE FUNCTION ihub._json_cast_hazard(p_source regclass) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text;
BEGIN
    -- The common case, cheaply: no such cast in the database at all.
    IF NOT EXISTS (SELECT 1 FROM pg_cast c JOIN pg_proc f ON f.oid = c.castfunc JOIN pg_roles r ON r.oid = f.proowner
                   WHERE c.casttarget = 'json'::regtype AND c.castsource >= 16384 AND NOT r.rolsuper) THEN
        RETURN NULL;
    END IF;
    WITH RECURSIVE types(oid) AS (
        SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = p_source AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT x.oid
        FROM types t JOIN pg_type ty ON ty.oid = t.oid
        CROSS JOIN LATERAL (
            SELECT ty.typbasetype UNION ALL SELECT ty.typelem
            UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid
            UNION ALL SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = ty.oid
            UNION ALL SELECT a.atttypid FROM pg_attribute a
                      WHERE a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ) x(oid)
        WHERE x.oid <> 0
    )
    SELECT format('type %s has a cast to json, %s, owned by %s', c.castsource::regtype, c.castfunc::regprocedure,
                  pg_get_userbyid(f.proowner))
    INTO v
    FROM pg_cast c JOIN pg_proc f ON f.oid = c.castfunc JOIN pg_roles r ON r.oid = f.proowner
    WHERE c.casttarget = 'json'::regtype AND c.castsource IN (SELECT oid FROM types) AND NOT r.rolsuper
    LIMIT 1;
    RETURN v;
END
$$;

CREATE OR REPLACE FUNCTION ihub._route(p_sub ihub.subscription, p_limit integer, p_owner integer,
                            p_default_timeout_ms integer DEFAULT 10000, p_rounds integer DEFAULT 1)
RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint;
    v_integration ihub.integration;
    v_rel record;
    v_excluded text[];
    v_claim boolean;
    v_routed bigint;
    v_capture text := format('ihub_capture.%I', 'sub_' || p_sub.id);
    v_hazard text := ihub._json_cast_hazard(p_sub.source);
BEGIN
    IF v_hazard IS NOT NULL THEN
        -- Its changes wait in the capture table until the cast is dropped.
        IF p_owner IS NULL THEN
            RAISE EXCEPTION 'cannot render the changes of subscription %: %', p_sub.id, v_hazard
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'pg_ihub renders changes as JSON with its workers'' rights and never runs such a cast: drop it (DROP CAST).';
        END IF;
        RAISE WARNING 'pg_ihub: the changes of subscription % wait: %; drop the cast to have them sent', p_sub.id, v_hazard;
        RETURN;
    END IF;
    SELECT * INTO v_endpoint FROM ihub.endpoint WHERE id = p_sub.endpoint_id;
    SELECT * INTO v_integration FROM ihub.integration WHERE id = v_endpoint.integration_id;
    SELECT n.nspname, c.relname INTO v_rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_sub.source;
    IF p_sub.columns IS NOT NULL THEN
        SELECT coalesce(array_agg(a.attname::text), '{}') INTO v_excluded
        FROM pg_attribute a
        WHERE a.attrelid = p_sub.source AND a.attnum > 0 AND NOT a.attisdropped AND a.attname::text <> ALL (p_sub.columns);
    ELSE
        v_excluded := '{}';
    END IF;
    v_claim := p_owner IS NOT NULL AND v_endpoint.enabled AND v_integration.state <> 'inactive';

    RETURN QUERY EXECUTE format($q$
        WITH moved AS (
            DELETE FROM ihub_capture.%1$I c
            WHERE c.ctid = ANY (ARRAY(SELECT x.ctid FROM ihub_capture.%1$I x LIMIT $1 FOR UPDATE SKIP LOCKED))
            RETURNING c.op, c.xid, c.occurred_at, c.new_row, c.old_row
        )
        INSERT INTO ihub.delivery AS d (event_id, endpoint_id, subscription_id, event_type, payload, test_mode,
                                        state, lease_owner, lease_until, occurred_at, next_attempt_at)
        SELECT ev.id, $2, $3, ev.type,
               jsonb_build_object('id', ev.id, 'type', ev.type, 'schema', $4, 'table', $5, 'operation', ev.op,
                                  'occurred_at', m.occurred_at, 'txid', m.xid::text, 'tenant', $6,
                                  'data', CASE WHEN m.op = 'd' THEN j.old ELSE j.new END)
               || CASE m.op
                      WHEN 'u' THEN jsonb_build_object('old', j.old, 'changed', to_jsonb(ARRAY(
                          SELECT n.key FROM jsonb_each(j.new) n JOIN jsonb_each(j.old) o USING (key)
                          WHERE n.value IS DISTINCT FROM o.value ORDER BY n.key)))
                      WHEN 'd' THEN jsonb_build_object('old', j.old)
                      ELSE '{}'::jsonb
                  END,
               $7,
               CASE WHEN $8 THEN 'running' ELSE 'pending' END,
               CASE WHEN $8 THEN $9 END,
               CASE WHEN $8 THEN $10 END,
               m.occurred_at, now()
        FROM moved m
        CROSS JOIN LATERAL (SELECT to_jsonb(m.new_row) - $11 AS new, to_jsonb(m.old_row) - $11 AS old) j
        CROSS JOIN LATERAL (
            SELECT 'evt_' || replace(gen_random_uuid()::text, '-', '') AS id,
                   CASE m.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' ELSE 'delete' END AS op,
                   $5 || '.' || CASE m.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' ELSE 'delete' END AS type
        ) ev
        RETURNING d.id
    $q$, 'sub_' || p_sub.id)
    USING coalesce(p_limit, 2147483647), v_endpoint.id, p_sub.id, v_rel.nspname::text, v_rel.relname::text,
          v_integration.tenant, p_sub.test_mode, v_claim, p_owner,
          ihub._lease_until(coalesce(v_endpoint.timeout_ms, p_default_timeout_ms), p_rounds),
          v_excluded;
    GET DIAGNOSTICS v_routed = ROW_COUNT;

    -- The capture table is a queue: routed rows are deleted, and rows of
    -- rolled-back writes are dead too. Until vacuum runs, every route scans
    -- them (14 ms for 1M dead rows). Once drained and large, truncate it, but
    -- only if no writer holds it right now (NOWAIT), and only if still empty
    -- under the lock.
    IF v_routed < coalesce(p_limit, 2147483647) AND pg_relation_size(v_capture::regclass) > 8 * 1024 * 1024 THEN
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT', v_capture);
            IF NOT ihub._has_rows(v_capture) THEN
                EXECUTE format('TRUNCATE %s', v_capture);
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL; -- a writer is busy with it; try again on a later round
        END;
    END IF;
END
$$;

-- Claims the most urgent due job for a worker and returns how to call it.
-- (PL/pgSQL rather than SQL: its plans are cached for the worker's session.)
CREATE OR REPLACE FUNCTION ihub._claim_job(p_owner integer, p_default_timeout_ms integer)
RETURNS TABLE (id bigint, call text, args jsonb, run_as oid, timeout_ms integer, more_due boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Two are locked so that the worker learns whether more are due (and wakes
    -- a peer) without a second scan; the second is released at commit.
    RETURN QUERY
    WITH next AS (
        SELECT j.id, j.priority, j.run_at FROM ihub.job j
        WHERE j.state IN ('pending', 'retry') AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 2
        FOR UPDATE SKIP LOCKED
    ), first AS (
        SELECT (array_agg(next.id ORDER BY next.priority, next.run_at, next.id))[1] AS id, count(*) > 1 AS more
        FROM next
    ), claimed AS (
        UPDATE ihub.job j
        SET state = 'running', worker_pid = p_owner, started_at = clock_timestamp(), finished_at = NULL,
            attempts = j.attempts + 1, cancel_requested = false, errors_logged = 0,
            progress_done = NULL, progress_total = NULL
        FROM first WHERE j.id = first.id
        RETURNING j.id, j.fn, j.args, j.run_as, j.timeout, first.more
    )
    SELECT c.id,
           CASE WHEN p.prorettype = 'void'::regtype
                -- Qualified: the statement is parsed with the role's search_path.
                THEN format('SELECT NULL::pg_catalog.jsonb FROM %I.%I($1) AS f', n.nspname, p.proname)
                ELSE format('SELECT pg_catalog.to_jsonb(%I.%I($1))', n.nspname, p.proname) END,
           c.args, c.run_as::oid,
           coalesce((extract(epoch FROM c.timeout) * 1000)::integer, p_default_timeout_ms),
           c.more
    FROM claimed c
    JOIN pg_proc p ON p.oid = c.fn
    JOIN pg_namespace n ON n.oid = p.pronamespace;
END
$$;

-- The statement that calls a handler for item $1 (a void handler yields NULL).
CREATE OR REPLACE FUNCTION ihub._handler_call(p_handler regprocedure) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p.prorettype = 'void'::regtype
                -- Qualified: the statement is parsed with the role's search_path.
                THEN format('SELECT NULL::pg_catalog.jsonb FROM ihub.inbound_items i, %I.%I(i) f '
                            'WHERE i.id OPERATOR(pg_catalog.=) $1', n.nspname, p.proname)
                ELSE format('SELECT pg_catalog.to_jsonb(%I.%I(i)) FROM ihub.inbound_items i '
                            'WHERE i.id OPERATOR(pg_catalog.=) $1', n.nspname, p.proname) END
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.oid = p_handler
$$;


DROP FUNCTION ihub._invoker();

-------------------------------------------------------------------------------
-- Processing an inbound item by hand: only as the source's role
-------------------------------------------------------------------------------

DROP FUNCTION ihub._inbound_take(bigint);
CREATE OR REPLACE FUNCTION ihub._inbound_settle(p_id bigint, p_result jsonb, p_error text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- pg_backend_pid(): only the session that took the item settles it.
    IF p_error IS NULL THEN
        PERFORM ihub._inbound_done(p_id, pg_backend_pid(), p_result);
    ELSE
        PERFORM ihub._inbound_failed(p_id, pg_backend_pid(), p_error);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION ihub.process_inbound("id" bigint) RETURNS jsonb
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'process_inbound_wrapper';

-------------------------------------------------------------------------------
-- Capture: conditions run as the subscriber from a definer trigger
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._capture_filtered() RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', '_capture_filtered_wrapper';
ALTER FUNCTION ihub._capture_filtered() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Subscriptions with a condition or watched columns had a PL/pgSQL trigger
-- function per event, owned by the subscriber, who held INSERT on the
-- capture table: the triggers now call ihub._capture_filtered, and nobody
-- but the owner keeps a privilege on a capture table.
DO $$
DECLARE
    v record;
    v_event text;
    v_grantee regrole;
BEGIN
    FOR v IN
        SELECT s.*, i.state AS integration_state
        FROM ihub.subscription s
        JOIN ihub.endpoint e ON e.id = s.endpoint_id
        JOIN ihub.integration i ON i.id = e.integration_id
        WHERE s.condition IS NOT NULL OR s.watch IS NOT NULL
    LOOP
        FOREACH v_event IN ARRAY v.events LOOP
            CONTINUE WHEN v.condition IS NULL AND v_event <> 'update';
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('ihub_sub_%s_%s', v.id, v_event), v.source);
            EXECUTE format('DROP FUNCTION IF EXISTS ihub_capture.%I()', format('sub_%s_%s', v.id, v_event));
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %I FOR EACH STATEMENT '
                           'EXECUTE FUNCTION ihub._capture_filtered(%L)',
                           format('ihub_sub_%s_%s', v.id, v_event), upper(v_event), v.source,
                           CASE v_event WHEN 'insert' THEN 'NEW' WHEN 'delete' THEN 'OLD' ELSE 'OLD TABLE AS ihub_old NEW' END,
                           CASE v_event WHEN 'delete' THEN 'ihub_old' ELSE 'ihub_new' END,
                           'ihub_capture.sub_' || v.id);
        END LOOP;
        IF v.integration_state = 'inactive' THEN
            PERFORM ihub._set_capture_enabled(v.id, false);
        END IF;
    END LOOP;
    FOR v IN
        SELECT c.oid::regclass AS capture, a.grantee
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.relnamespace = 'ihub_capture'::regnamespace AND a.grantee <> c.relowner
    LOOP
        IF v.grantee = 0 THEN
            EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', v.capture);
        ELSE
            EXECUTE format('REVOKE ALL ON %s FROM %I', v.capture, pg_get_userbyid(v.grantee));
        END IF;
    END LOOP;
END
$$;

DROP FUNCTION ihub._capture_statement(ihub.subscription, text, text);

-------------------------------------------------------------------------------
-- Masking: custom header values and signatures
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._mask_endpoint_headers("headers" jsonb) RETURNS jsonb
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mask_endpoint_headers_wrapper';

CREATE FUNCTION ihub._mask_attempt_headers("headers" jsonb, "custom" jsonb) RETURNS jsonb
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mask_attempt_headers_wrapper';

CREATE OR REPLACE VIEW ihub.endpoints AS
SELECT e.id, i.name AS integration, e.name, ihub._mask_url(e.url) AS url, e.method,
       ihub._mask_endpoint_headers(e.headers) AS headers, e.auth_type,
       coalesce(e.timeout_ms, ihub._default_timeout_ms()) AS timeout_ms,
       e.retry, e.enabled, e.disabled_reason, e.disabled_at, e.created_at
FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id;

CREATE OR REPLACE VIEW ihub.delivery_attempts AS
SELECT a.delivery_id, a.attempt, e.name AS endpoint, d.event_id, a.started_at, a.duration_ms,
       coalesce(d.method, e.method) AS request_method, ihub._mask_url(ihub._join_url(e.url, d.path)) AS request_url,
       ihub._mask_attempt_headers(a.request_headers, e.headers || coalesce(d.headers, '{}')) AS request_headers,
       d.payload AS request_body,
       a.response_status, a.response_headers, a.response_body, a.error, a.error_category
FROM ihub.delivery_attempt a
JOIN ihub.delivery d ON d.id = a.delivery_id
JOIN ihub.endpoint e ON e.id = d.endpoint_id;

-- Attempts recorded by 0.1.0 kept signatures and some custom header values.
UPDATE ihub.delivery_attempt a
SET request_headers = ihub._mask_attempt_headers(a.request_headers, e.headers || coalesce(d.headers, '{}'))
FROM ihub.delivery d JOIN ihub.endpoint e ON e.id = d.endpoint_id
WHERE d.id = a.delivery_id;

-------------------------------------------------------------------------------
-- Privileges and comments
-------------------------------------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ihub FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION ihub._inbound_settle(bigint, jsonb, text), ihub._wake() FROM ihub_developer;
REVOKE USAGE ON SCHEMA ihub_capture FROM ihub_developer;
REVOKE ALL ON SCHEMA ihub_capture FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ihub.retry_later(text, interval), ihub.job_progress(bigint, bigint) TO PUBLIC;
GRANT EXECUTE ON FUNCTION ihub._mask_endpoint_headers(jsonb), ihub._mask_attempt_headers(jsonb, jsonb) TO ihub_viewer;

COMMENT ON FUNCTION ihub._json_cast_hazard(regclass) IS 'Internal: a cast to json, owned by a role other than a superuser, that rendering the table''s rows would call; NULL when none.';
COMMENT ON FUNCTION ihub._capture_filter(ihub.subscription, text) IS 'Internal: the query that selects the transition rows passing a subscription''s watch and condition.';

COMMENT ON FUNCTION ihub._may_act_for(regrole, regrole) IS 'Internal: whether a role may change, run, retry or cancel work that runs as another.';

COMMENT ON FUNCTION ihub._require_may_act_for(regrole, regrole, text) IS 'Internal: raises unless ihub._may_act_for.';

COMMENT ON FUNCTION ihub._own_schedule(text, regrole) IS 'Internal: a scheduled action the caller may act on, or an error with a hint.';

COMMENT ON FUNCTION ihub._inbound_take(bigint, regrole) IS 'Internal: takes an item for ihub.process_inbound, if the caller may run its handler.';

COMMENT ON FUNCTION ihub._capture_filtered() IS
    'Internal: capture trigger of subscriptions with watched columns or a condition; copies the transition rows that pass (the condition runs as the subscriber) into the capture table named by its argument.';

COMMENT ON FUNCTION ihub.process_inbound(bigint) IS
    'Processes one queued or failed inbound item now, in this session and with the caller''s rights (a member of the source''s role); returns the handler''s result or {"error": ...}.';

COMMENT ON FUNCTION ihub._mask_endpoint_headers(jsonb) IS 'Internal: masks every custom header value except those marked {"secret": false}, for views.';

COMMENT ON FUNCTION ihub._mask_attempt_headers(jsonb, jsonb) IS 'Internal: masks an attempt''s recorded request headers: credentials, the signature and secret custom headers.';


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
