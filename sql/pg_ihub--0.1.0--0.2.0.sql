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
-- One vocabulary for the three queues (deliveries, jobs, inbound items)
-------------------------------------------------------------------------------
-- States: pending, running, retry, done, failed, dead, cancelled (partial
-- for jobs); times: run_at (next due), started_at, finished_at; the worker
-- holding a running item: worker_pid. 0.1.0 said 'delivered' and
-- delivered_at, next_attempt_at and lease_owner for deliveries, and 'queued',
-- 'processing', execute_at, processed_at and processor_pid for inbound items.
-- Views keep their row types (inbound handlers take ihub.inbound_items), so
-- their columns are renamed in place.

ALTER TABLE ihub.delivery DROP CONSTRAINT delivery_state_check;
UPDATE ihub.delivery SET state = 'done' WHERE state = 'delivered';
ALTER TABLE ihub.delivery ADD CONSTRAINT delivery_state_check
    CHECK (state IN ('pending', 'running', 'done', 'retry', 'failed', 'dead'));
ALTER TABLE ihub.delivery RENAME COLUMN next_attempt_at TO run_at;
ALTER TABLE ihub.delivery RENAME COLUMN lease_owner TO worker_pid;
ALTER TABLE ihub.delivery RENAME COLUMN delivered_at TO finished_at;
ALTER VIEW ihub.deliveries RENAME COLUMN next_attempt_at TO run_at;
ALTER VIEW ihub.deliveries RENAME COLUMN delivered_at TO finished_at;

ALTER TABLE ihub.inbound_item DROP CONSTRAINT inbound_item_state_check;
DROP INDEX ihub.inbound_due_idx, ihub.inbound_ordering_idx, ihub.inbound_processing_idx;
UPDATE ihub.inbound_item SET state = CASE state WHEN 'queued' THEN 'pending' ELSE 'running' END
WHERE state IN ('queued', 'processing');
ALTER TABLE ihub.inbound_item ALTER COLUMN state SET DEFAULT 'pending';
ALTER TABLE ihub.inbound_item ADD CONSTRAINT inbound_item_state_check
    CHECK (state IN ('pending', 'running', 'done', 'failed'));
ALTER TABLE ihub.inbound_item RENAME COLUMN execute_at TO run_at;
ALTER TABLE ihub.inbound_item RENAME COLUMN processor_pid TO worker_pid;
ALTER TABLE ihub.inbound_item RENAME COLUMN processed_at TO finished_at;
ALTER VIEW ihub.inbound_items RENAME COLUMN execute_at TO run_at;
ALTER VIEW ihub.inbound_items RENAME COLUMN processed_at TO finished_at;
CREATE INDEX inbound_due_idx ON ihub.inbound_item (run_at, id) WHERE state = 'pending';
CREATE INDEX inbound_ordering_idx ON ihub.inbound_item (source_id, ordering_key, id)
    WHERE state IN ('pending', 'running') AND ordering_key IS NOT NULL;
CREATE INDEX inbound_running_idx ON ihub.inbound_item (worker_pid) WHERE state = 'running';

-- One de-duplication key computation, in Rust, for the listener and receive.
DROP FUNCTION ihub._dedup_key(ihub.inbound_source, jsonb, bytea);
CREATE FUNCTION ihub._dedup_key("verify" text, "id_header" text, "headers" jsonb, "body" bytea) RETURNS text
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'dedup_key_wrapper';
COMMENT ON FUNCTION ihub._dedup_key(text, text, jsonb, bytea) IS
    'Internal: a request''s de-duplication key (the webhook-id, else the id header, else the body''s SHA-256), as the listener computes it.';

COMMENT ON VIEW ihub.deliveries IS
    'Outbound deliveries: state (pending, running, retry, done, failed, dead), attempts, next attempt (run_at), last status and error, latency from commit to delivery.';

-- Named arguments change with the vocabulary: receive(..., run_at).
DROP FUNCTION ihub.receive(text, text, jsonb, bytea, timestamptz);
DROP FUNCTION ihub._accept_inbound(bigint[], jsonb[], bytea[], text[], text[], timestamptz[]);

-------------------------------------------------------------------------------
-- Job retries are decided in Rust (pg_ihub_core::retry), like deliveries'
-------------------------------------------------------------------------------

DROP FUNCTION ihub._job_failed(bigint, integer, text, double precision, integer);
DROP FUNCTION ihub._job_retry_delay(ihub.job, integer);

-- What deciding a failed attempt needs, with the job locked; no row when this
-- worker does not hold it. The decision is pg_ihub_core::retry::job_next.
-- The schedule is the job's own, else its integration's
-- settings->'job_retry_schedule', else the default, in seconds.
CREATE FUNCTION ihub._job_attempt(p_id bigint, p_owner integer)
RETURNS TABLE (attempts integer, max_attempts integer, cancel_requested boolean, schedule_s double precision[])
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    SELECT j.attempts - j.budget_start, j.max_attempts, j.cancel_requested,
           ARRAY(SELECT extract(epoch FROM u.step)::double precision
                 FROM unnest(coalesce(
                     j.retry_schedule,
                     (SELECT ARRAY(SELECT jsonb_array_elements_text(i.settings -> 'job_retry_schedule')::interval)
                      FROM ihub.integration i
                      WHERE i.id = j.integration_id AND jsonb_typeof(i.settings -> 'job_retry_schedule') = 'array'),
                     ihub._default_job_retry_schedule())) WITH ORDINALITY AS u(step, n)
                 ORDER BY u.n)
    FROM ihub.job j
    WHERE j.id = p_id AND j.state = 'running' AND j.worker_pid = p_owner
    FOR UPDATE OF j
$$;

-- Records a failed attempt as the job worker decided it: cancelled, failed,
-- or retry after p_delay_s seconds. NULL when this worker does not hold it.
CREATE FUNCTION ihub._job_failed(p_id bigint, p_owner integer, p_error text, p_state text, p_delay_s double precision)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.job;
BEGIN
    IF p_state NOT IN ('retry', 'failed', 'cancelled') OR (p_state = 'retry') <> (p_delay_s IS NOT NULL) THEN
        RAISE EXCEPTION 'a failed job goes to retry (with a delay), failed or cancelled, not % (delay %)', p_state, p_delay_s;
    END IF;
    UPDATE ihub.job
    SET state = p_state, worker_pid = NULL, last_error = p_error,
        finished_at = CASE WHEN p_state = 'retry' THEN NULL ELSE clock_timestamp() END,
        run_at = CASE WHEN p_state = 'retry' THEN now() + make_interval(secs => p_delay_s) ELSE run_at END
    WHERE id = p_id AND state = 'running' AND worker_pid = p_owner
    RETURNING * INTO v;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM ihub.log(CASE WHEN p_state = 'failed' THEN 'error' ELSE 'warning' END,
                     format('job %s (%s) attempt %s failed: %s', p_id, v.fn, v.attempts, p_error),
                     jsonb_build_object('job', p_id, 'state', p_state),
                     (SELECT name FROM ihub.integration WHERE id = v.integration_id));
    RETURN p_state;
END
$$;

COMMENT ON FUNCTION ihub._job_attempt(bigint, integer) IS
    'Internal (job worker): locks a running job and returns what deciding its failed attempt needs.';
COMMENT ON FUNCTION ihub._job_failed(bigint, integer, text, text, double precision) IS
    'Internal (job worker): records a failed attempt as decided: cancelled, failed, or retry after a delay.';

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
    -- capture table goes, so that nothing committed is lost. Writers still
    -- open may have captured changes the route cannot see yet: wait for them
    -- (the lock CREATE TRIGGER takes), and keep new ones out until commit.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', v_sub.source);
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
                             run_at timestamptz DEFAULT now(),
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
    FROM ihub._accept_inbound(ARRAY[v.id], ARRAY[v_stored], ARRAY[body], ARRAY[ihub._dedup_key(v.verify, v.id_header, v_headers, body)],
                              ARRAY['sql:' || pg_get_userbyid(p_caller)], ARRAY[coalesce(run_at, now())]) a;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.receive(integration text, source text, headers jsonb, body bytea,
                             run_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';
GRANT EXECUTE ON FUNCTION ihub.receive(text, text, jsonb, bytea, timestamptz) TO ihub_developer;
COMMENT ON FUNCTION ihub.receive(text, text, jsonb, bytea, timestamptz) IS
    'Verifies and queues a request received by the application itself, like the listener. Returns the item id (the first one''s for a duplicate), or NULL when verification fails.';

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
    SET state = 'pending', run_at = now(), reactivated = reactivated + 1, finished_at = NULL
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
    IF v_state NOT IN ('pending', 'failed') THEN
        RAISE EXCEPTION 'inbound item % is %', p_id, v_state
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Only queued or failed items can be processed by hand.';
    END IF;
    UPDATE ihub.inbound_item t SET state = 'running', worker_pid = pg_backend_pid(), attempts = t.attempts + 1
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
                                        state, worker_pid, lease_until, occurred_at, run_at)
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
-- Functions that speak the queue vocabulary
-------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION ihub.delete_integration(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.integration;
BEGIN
    SELECT * INTO v FROM ihub.integration i WHERE i.id = ihub._integration_id(delete_integration.name) FOR UPDATE;
    IF v.state <> 'inactive' THEN
        RAISE EXCEPTION 'integration "%" is %; an enabled integration cannot be deleted', v.name, v.state
            USING ERRCODE = 'object_in_use',
                  HINT = format('Disable it first: SELECT ihub.disable_integration(%L);', v.name);
    END IF;
    -- Scheduled actions belong to whoever made them: say so rather than drop them.
    IF EXISTS (SELECT 1 FROM ihub.schedule s WHERE s.integration_id = v.id) THEN
        RAISE EXCEPTION 'integration "%" is used by scheduled action(s) %', v.name,
              (SELECT string_agg(s.name, ', ' ORDER BY s.name) FROM ihub.schedule s WHERE s.integration_id = v.id)
            USING ERRCODE = 'object_in_use', HINT = 'Remove them first with ihub.unschedule(name).';
    END IF;
    -- Accepted inbound items were answered 202: they must not vanish unprocessed.
    IF EXISTS (SELECT 1 FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
               WHERE s.integration_id = v.id AND t.state IN ('pending', 'running')) THEN
        RAISE EXCEPTION 'integration "%" has inbound items waiting to be processed', v.name
            USING ERRCODE = 'object_in_use',
                  HINT = 'Let the processors finish them (see ihub.queue_stats()), or delete them from ihub.inbound_item.';
    END IF;
    PERFORM ihub.unsubscribe(s.id)
    FROM ihub.subscription s JOIN ihub.endpoint e ON e.id = s.endpoint_id
    WHERE e.integration_id = v.id;
    DELETE FROM ihub.inbound_dedup d USING ihub.inbound_source s WHERE d.source_id = s.id AND s.integration_id = v.id;
    DELETE FROM ihub.inbound_item t USING ihub.inbound_source s WHERE t.source_id = s.id AND s.integration_id = v.id;
    DELETE FROM ihub.inbound_source WHERE integration_id = v.id;
    DELETE FROM ihub.delivery_attempt a USING ihub.delivery d, ihub.endpoint e
    WHERE a.delivery_id = d.id AND d.endpoint_id = e.id AND e.integration_id = v.id;
    DELETE FROM ihub.delivery d USING ihub.endpoint e WHERE d.endpoint_id = e.id AND e.integration_id = v.id;
    DELETE FROM ihub.endpoint WHERE integration_id = v.id;
    DELETE FROM ihub.integration WHERE id = v.id;
END
$$;

CREATE OR REPLACE FUNCTION ihub._claim(p_owner integer, p_limit integer, p_default_timeout_ms integer, p_rounds integer)
RETURNS TABLE (delivery_id bigint, event_id text, method text, url text, headers jsonb, auth jsonb, secrets text[],
               timeout_ms integer, retry jsonb, body text, test_mode boolean, attempts_used integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids bigint[] := '{}';
    v_sub ihub.subscription;
BEGIN
    FOR v_sub IN SELECT * FROM ihub.subscription ORDER BY id LOOP
        EXIT WHEN cardinality(v_ids) >= p_limit;
        v_ids := v_ids || ARRAY(SELECT ihub._route(v_sub, p_limit - cardinality(v_ids), p_owner, p_default_timeout_ms, p_rounds));
    END LOOP;
    IF cardinality(v_ids) < p_limit THEN
        WITH due AS (
            SELECT d.id FROM ihub.delivery d
            WHERE d.state IN ('pending', 'retry') AND d.run_at <= now()
              AND d.endpoint_id IN (SELECT e.id FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                                    WHERE e.enabled AND i.state <> 'inactive')
            ORDER BY d.run_at
            LIMIT p_limit - cardinality(v_ids)
            FOR UPDATE OF d SKIP LOCKED
        ), claimed AS (
            UPDATE ihub.delivery d
            SET state = 'running', worker_pid = p_owner,
                lease_until = ihub._lease_until(coalesce(e.timeout_ms, p_default_timeout_ms), p_rounds)
            FROM due, ihub.endpoint e
            WHERE d.id = due.id AND e.id = d.endpoint_id
            RETURNING d.id
        )
        SELECT v_ids || coalesce(array_agg(claimed.id), '{}') INTO v_ids FROM claimed;
    END IF;
    RETURN QUERY
        WITH claimed AS (
            SELECT * FROM ihub.delivery d WHERE d.id = ANY (v_ids)
        ), keys AS (
            SELECT s.endpoint_id, array_agg(s.secret ORDER BY s.id DESC) AS secrets
            FROM ihub.endpoint_secret s
            WHERE s.endpoint_id IN (SELECT endpoint_id FROM claimed) AND (s.expires_at IS NULL OR s.expires_at > now())
            GROUP BY s.endpoint_id
        )
        SELECT d.id, d.event_id, coalesce(d.method, e.method), ihub._join_url(e.url, d.path),
               e.headers || coalesce(d.headers, '{}'), c.auth, k.secrets,
               coalesce(e.timeout_ms, p_default_timeout_ms), e.retry, d.payload::text, d.test_mode,
               d.attempts - d.budget_start
        FROM claimed d
        JOIN ihub.endpoint e ON e.id = d.endpoint_id
        LEFT JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
        LEFT JOIN keys k ON k.endpoint_id = e.id;
END
$$;

CREATE OR REPLACE FUNCTION ihub._settle(p_owner integer, p_results jsonb) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settled bigint;
    v_endpoint record;
    v_ids bigint[] := ARRAY(SELECT (x ->> 'delivery_id')::bigint FROM jsonb_array_elements(p_results) x);
BEGIN
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(p_results) AS x(
            delivery_id bigint, state text, next_at double precision, status integer, error text, category text,
            request_headers jsonb, response_headers jsonb, response_body text, started_at double precision,
            duration_ms double precision)
    ), updated AS (
        UPDATE ihub.delivery d
        SET state = r.state,
            attempts = d.attempts + 1,
            run_at = CASE WHEN r.state = 'retry' THEN to_timestamp(r.next_at) ELSE d.run_at END,
            last_status = r.status,
            last_error = r.error,
            finished_at = CASE WHEN r.state = 'done'
                                THEN to_timestamp(r.started_at) + r.duration_ms * interval '1 millisecond' END,
            worker_pid = NULL,
            lease_until = NULL
        FROM r
        -- worker_pid is set only while running, so it alone says "still
        -- ours". Writing state = 'running' here would let the planner scan
        -- delivery_running_idx, whose dead entries (every delivery that was
        -- ever running, until vacuum) made this the hottest query.
        -- The id list lets the planner look deliveries up by primary key; it
        -- cannot estimate the JSON recordset and would otherwise hash-join
        -- it against a scan of the whole delivery history.
        WHERE d.id = ANY (v_ids) AND d.id = r.delivery_id AND d.worker_pid = p_owner
        RETURNING d.id, d.attempts, d.endpoint_id
    ), recorded AS (
        INSERT INTO ihub.delivery_attempt (delivery_id, attempt, started_at, duration_ms, request_headers,
                                           response_status, response_headers, response_body, error, error_category, worker_pid)
        SELECT u.id, u.attempts, to_timestamp(r.started_at), r.duration_ms, r.request_headers,
               r.status, r.response_headers, r.response_body, r.error, r.category, p_owner
        FROM updated u JOIN r ON r.delivery_id = u.id
        RETURNING 1
    ), outcomes AS (
        SELECT u.endpoint_id, u.id, r.state, r.error, r.duration_ms FROM updated u JOIN r ON r.delivery_id = u.id
    ), counted AS (
        -- Rolled-up counters for ihub.endpoint_stats; one row per dispatcher.
        INSERT INTO ihub.endpoint_hourly AS h (endpoint_id, hour, worker, attempts, delivered, retried, failed, dead,
                                               latency, last_error, last_error_at)
        SELECT o.endpoint_id, date_trunc('hour', now()), p_owner, count(*),
               count(*) FILTER (WHERE o.state = 'done'), count(*) FILTER (WHERE o.state = 'retry'),
               count(*) FILTER (WHERE o.state = 'failed'), count(*) FILTER (WHERE o.state = 'dead'),
               ihub._histogram(array_agg(o.duration_ms)),
               (array_agg(o.error) FILTER (WHERE o.error IS NOT NULL))[1],
               CASE WHEN bool_or(o.error IS NOT NULL) THEN now() END
        FROM outcomes o GROUP BY o.endpoint_id
        ON CONFLICT (endpoint_id, hour, worker) DO UPDATE
        SET attempts = h.attempts + EXCLUDED.attempts, delivered = h.delivered + EXCLUDED.delivered,
            retried = h.retried + EXCLUDED.retried, failed = h.failed + EXCLUDED.failed, dead = h.dead + EXCLUDED.dead,
            latency = ihub._histogram_add(h.latency, EXCLUDED.latency),
            last_error = coalesce(EXCLUDED.last_error, h.last_error),
            last_error_at = coalesce(EXCLUDED.last_error_at, h.last_error_at)
    )
    SELECT count(*) INTO v_settled FROM recorded;

    -- Failures go to the log: a summary per endpoint for retries, an error
    -- per delivery that failed for good.
    IF p_results @> '[{"state": "retry"}]' OR p_results @> '[{"state": "dead"}]' OR p_results @> '[{"state": "failed"}]' THEN
        PERFORM ihub._log_failures(p_results);
    END IF;

    -- 410 Gone: the receiver says this endpoint is gone for good.
    IF p_results @> '[{"disable_endpoint": true}]' THEN
        FOR v_endpoint IN
            UPDATE ihub.endpoint e
            SET enabled = false, disabled_at = now(),
                disabled_reason = 'the receiver answered 410 Gone; re-enable with ihub.enable_endpoint()'
            WHERE e.enabled AND e.id IN (
                SELECT d.endpoint_id FROM ihub.delivery d
                JOIN jsonb_to_recordset(p_results) AS x(delivery_id bigint, disable_endpoint boolean) ON x.delivery_id = d.id
                WHERE x.disable_endpoint)
            RETURNING e.name
        LOOP
            RAISE WARNING 'pg_ihub: endpoint "%" disabled: the receiver answered 410 Gone', v_endpoint.name;
            PERFORM ihub.log('critical', format('endpoint %s disabled: the receiver answered 410 Gone', v_endpoint.name),
                             jsonb_build_object('endpoint', v_endpoint.name),
                             (SELECT i.name FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                              WHERE e.name = v_endpoint.name));
        END LOOP;
    END IF;
    RETURN v_settled;
END
$$;

CREATE OR REPLACE FUNCTION ihub._rescue() RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    WITH rescued AS (
        UPDATE ihub.delivery d
        SET state = CASE WHEN d.attempts = 0 THEN 'pending' ELSE 'retry' END,
            worker_pid = NULL, lease_until = NULL, run_at = now()
        WHERE d.state = 'running'
          AND (d.lease_until < now()
               OR NOT ihub._pid_alive(d.worker_pid))
        RETURNING 1
    )
    SELECT count(*) FROM rescued
$$;

CREATE OR REPLACE FUNCTION ihub._next_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN min(d.run_at) IS NOT NULL
                THEN greatest(0, extract(epoch FROM min(d.run_at) - now()))::double precision
           END
    FROM ihub.delivery d
    WHERE d.state IN ('pending', 'retry')
      AND d.endpoint_id IN (SELECT e.id FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                            WHERE e.enabled AND i.state <> 'inactive')
$$;

CREATE OR REPLACE FUNCTION ihub.replay(delivery_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_state text;
BEGIN
    PERFORM ihub._require_workers();
    SELECT state INTO v_state FROM ihub.delivery WHERE id = delivery_id FOR UPDATE;
    IF v_state IS NULL THEN
        RAISE EXCEPTION 'delivery % does not exist', delivery_id
            USING ERRCODE = 'undefined_object', HINT = 'List deliveries in ihub.deliveries.';
    ELSIF v_state NOT IN ('dead', 'failed') THEN
        RAISE EXCEPTION 'delivery % is %; only dead or failed deliveries can be replayed', delivery_id, v_state
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Pending, running and retrying deliveries are still in the queue.';
    END IF;
    UPDATE ihub.delivery SET state = 'pending', budget_start = attempts, run_at = now() WHERE id = delivery_id;
    PERFORM ihub._wake();
END
$$;

CREATE OR REPLACE FUNCTION ihub.replay_dead(endpoint text, since timestamptz DEFAULT '-infinity') RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    PERFORM ihub._require_workers();
    UPDATE ihub.delivery
    SET state = 'pending', budget_start = attempts, run_at = now()
    WHERE endpoint_id = (ihub._endpoint(replay_dead.endpoint)).id
      AND state IN ('dead', 'failed') AND created_at >= coalesce(since, '-infinity');
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM ihub._wake();
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION ihub._cleanup(p_batch integer DEFAULT 10000)
RETURNS TABLE (kind text, removed bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r ihub.retention;
    v_cutoff timestamptz;
    v_part record;
    v_n bigint;
    v_total bigint;
    v_upper timestamptz;
BEGIN
    FOR r IN SELECT * FROM ihub.retention WHERE keep IS NOT NULL ORDER BY kind LOOP
        v_cutoff := now() - r.keep;
        v_total := 0;
        IF r.kind IN ('debug', 'info', 'warning') THEN
            -- Whole daily partitions that ended before the cutoff.
            FOR v_part IN
                SELECT c.oid::regclass AS rel, pg_get_expr(c.relpartbound, c.oid) AS bound
                FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = ('ihub.log_entry_' || r.kind)::regclass
                  AND c.relname ~ '_[0-9]{8}$'
            LOOP
                v_upper := substring(v_part.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
                IF v_upper <= v_cutoff THEN
                    EXECUTE format('SELECT count(*) FROM %s', v_part.rel) INTO v_n;
                    EXECUTE format('DROP TABLE %s', v_part.rel);
                    v_total := v_total + v_n;
                END IF;
            END LOOP;
        END IF;
        IF r.kind IN ('debug', 'info', 'warning', 'error', 'critical') THEN
            LOOP
                DELETE FROM ihub.log_entry l
                WHERE l.level = r.kind AND l.logged_at < v_cutoff
                  AND (l.tableoid, l.ctid) IN (SELECT x.tableoid, x.ctid FROM ihub.log_entry x
                                               WHERE x.level = r.kind AND x.logged_at < v_cutoff LIMIT p_batch);
                GET DIAGNOSTICS v_n = ROW_COUNT;
                v_total := v_total + v_n;
                EXIT WHEN v_n < p_batch;
            END LOOP;
        ELSIF r.kind = 'deliveries' THEN
            LOOP
                WITH gone AS (
                    DELETE FROM ihub.delivery d
                    WHERE d.id = ANY (ARRAY(SELECT x.id FROM ihub.delivery x
                                            WHERE x.state = 'done' AND x.created_at < v_cutoff
                                            ORDER BY x.id LIMIT p_batch))
                    RETURNING d.id
                ), attempts AS (
                    DELETE FROM ihub.delivery_attempt a USING gone WHERE a.delivery_id = gone.id
                )
                SELECT count(*) INTO v_n FROM gone;
                v_total := v_total + v_n;
                EXIT WHEN v_n < p_batch;
            END LOOP;
        ELSIF r.kind = 'jobs' THEN
            LOOP
                DELETE FROM ihub.job j
                WHERE j.id = ANY (ARRAY(SELECT x.id FROM ihub.job x
                                        WHERE x.state IN ('done', 'partial', 'cancelled') AND x.finished_at < v_cutoff
                                        ORDER BY x.id LIMIT p_batch));
                GET DIAGNOSTICS v_n = ROW_COUNT;
                v_total := v_total + v_n;
                EXIT WHEN v_n < p_batch;
            END LOOP;
        ELSIF r.kind = 'inbound' THEN
            v_total := ihub._cleanup_inbound(v_cutoff, p_batch);
        END IF;
        kind := r.kind;
        removed := v_total;
        RETURN NEXT;
    END LOOP;
    -- Rolled-up statistics outlive the deliveries they count, up to a year.
    DELETE FROM ihub.endpoint_hourly WHERE hour < now() - interval '1 year';
    PERFORM ihub._ensure_log_partitions();
END
$$;

CREATE OR REPLACE FUNCTION ihub.health()
RETURNS TABLE (check_name text, status text, message text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind record;
    v_alive bigint;
    v_stale bigint;
    v_age interval := ihub._health_queue_age();
    v_depth bigint := ihub._health_queue_depth();
    v_q record;
    v_names text;
BEGIN
    IF NOT ihub._preloaded() THEN
        RETURN QUERY SELECT 'workers', 'critical',
            'pg_ihub is not in shared_preload_libraries: no background worker runs';
    ELSE
        FOR v_kind IN SELECT * FROM ihub._expected_workers() LOOP
            SELECT count(*) FILTER (WHERE ihub._pid_alive(w.pid)),
                   count(*) FILTER (WHERE ihub._pid_alive(w.pid) AND w.last_heartbeat < now() - v_kind.stale_after)
            INTO v_alive, v_stale
            FROM ihub._workers() w
            WHERE w.kind = v_kind.kind AND w.database_oid = (SELECT oid FROM pg_database WHERE datname = current_database());
            check_name := 'workers: ' || v_kind.kind;
            IF v_alive < v_kind.expected THEN
                status := 'critical';
                message := format('%s of %s running', v_alive, v_kind.expected);
            ELSIF v_stale > 0 THEN
                status := 'warning';
                message := format('%s of %s running, %s silent for over %s', v_alive, v_kind.expected, v_stale, v_kind.stale_after);
            ELSE
                status := 'ok';
                message := format('%s of %s running', v_alive, v_kind.expected);
            END IF;
            RETURN NEXT;
        END LOOP;
    END IF;

    FOR v_q IN
        SELECT 'deliveries' AS queue, count(*) AS depth, now() - min(run_at) AS age
        FROM ihub.delivery WHERE state IN ('pending', 'retry') AND run_at <= now()
        UNION ALL
        SELECT 'jobs', count(*), now() - min(run_at)
        FROM ihub.job WHERE state IN ('pending', 'retry') AND run_at <= now()
    LOOP
        check_name := 'queue: ' || v_q.queue;
        status := CASE WHEN v_q.depth >= v_depth * 10 OR v_q.age >= v_age * 4 THEN 'critical'
                       WHEN v_q.depth >= v_depth OR v_q.age >= v_age THEN 'warning'
                       ELSE 'ok' END;
        message := format('%s due, oldest waiting %s', v_q.depth, coalesce(date_trunc('second', v_q.age)::text, '-'));
        RETURN NEXT;
    END LOOP;

    SELECT string_agg(name, ', ' ORDER BY name) INTO v_names FROM ihub.endpoint WHERE NOT enabled;
    check_name := 'endpoints';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'warning' END;
    message := coalesce('disabled: ' || v_names, 'all enabled');
    RETURN NEXT;

    SELECT string_agg(name, ', ' ORDER BY name) INTO v_names
    FROM ihub.schedule WHERE active AND next_run_at < now() - interval '1 minute';
    check_name := 'schedules';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'warning' END;
    message := coalesce('late: ' || v_names, 'on time');
    RETURN NEXT;

    SELECT string_agg(e.name, ', ' ORDER BY e.name) INTO v_names FROM ihub.endpoint e
    WHERE NOT EXISTS (SELECT 1 FROM ihub.endpoint_secret s
                      WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now() + interval '1 day'));
    check_name := 'credentials';
    status := CASE WHEN v_names IS NULL THEN 'ok'
                   WHEN EXISTS (SELECT 1 FROM ihub.endpoint e WHERE NOT EXISTS (
                       SELECT 1 FROM ihub.endpoint_secret s WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now())))
                   THEN 'critical' ELSE 'warning' END;
    message := coalesce('no signing secret valid for another day: ' || v_names, 'every endpoint has a valid signing secret');
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION ihub.drop_source(integration text, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.inbound_source := ihub._source_row(drop_source.integration, drop_source.name);
BEGIN
    IF EXISTS (SELECT 1 FROM ihub.inbound_item WHERE source_id = v.id AND state IN ('pending', 'running')) THEN
        RAISE EXCEPTION 'inbound source % still has queued items', drop_source.name
            USING ERRCODE = 'object_in_use', HINT = 'Let them be processed first, or delete them from ihub.inbound_item.';
    END IF;
    DELETE FROM ihub.inbound_dedup WHERE source_id = v.id;
    DELETE FROM ihub.inbound_item WHERE source_id = v.id;
    DELETE FROM ihub.inbound_source WHERE id = v.id;
END
$$;

CREATE OR REPLACE FUNCTION ihub._accept_inbound(p_sources bigint[], p_headers jsonb[], p_bodies bytea[], p_dedup text[],
                                     p_remote text[], p_run_at timestamptz[])
RETURNS TABLE (n integer, item_id bigint, duplicate boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_source ihub.inbound_source;
    v_id bigint;
    v_existing bigint;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_sources), 0) LOOP
        SELECT * INTO v_source FROM ihub.inbound_source s WHERE s.id = p_sources[i];
        n := i;
        v_existing := NULL;
        IF v_source.id IS NULL THEN
            -- Dropped since the listener verified the request: it looks again.
            item_id := NULL;
            duplicate := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_dedup[i] IS NOT NULL AND v_source.dedup_window > interval '0' THEN
            SELECT d.item_id INTO v_existing FROM ihub.inbound_dedup d
            WHERE d.source_id = v_source.id AND d.key = p_dedup[i] AND d.expires_at > now();
        END IF;
        IF v_existing IS NOT NULL THEN
            item_id := v_existing;
            duplicate := true;
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO ihub.inbound_item (source_id, run_at, ordering_key, dedup_key, headers, body, remote_addr)
        VALUES (v_source.id, coalesce(p_run_at[i], now()),
                ihub._ordering_key(v_source.ordering_key, p_headers[i], p_bodies[i]),
                p_dedup[i], p_headers[i], p_bodies[i], p_remote[i])
        RETURNING id INTO v_id;
        IF p_dedup[i] IS NOT NULL AND v_source.dedup_window > interval '0' THEN
            INSERT INTO ihub.inbound_dedup (source_id, key, item_id, expires_at)
            VALUES (v_source.id, p_dedup[i], v_id, now() + v_source.dedup_window)
            ON CONFLICT (source_id, key) DO UPDATE SET item_id = EXCLUDED.item_id, expires_at = EXCLUDED.expires_at
                WHERE ihub.inbound_dedup.expires_at <= now()
            RETURNING ihub.inbound_dedup.item_id INTO v_existing;
            IF v_existing IS NULL THEN
                -- Another transaction took this id first: ours is a duplicate.
                DELETE FROM ihub.inbound_item WHERE id = v_id;
                SELECT d.item_id INTO v_id FROM ihub.inbound_dedup d WHERE d.source_id = v_source.id AND d.key = p_dedup[i];
                item_id := v_id;
                duplicate := true;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        item_id := v_id;
        duplicate := false;
        RETURN NEXT;
    END LOOP;
    PERFORM ihub._wake_processor();
END
$$;
COMMENT ON FUNCTION ihub._accept_inbound(bigint[], jsonb[], bytea[], text[], text[], timestamptz[]) IS
    'Internal: queues a batch of verified requests, dropping duplicates.';

CREATE OR REPLACE FUNCTION ihub._claim_inbound(p_owner integer, p_default_timeout_ms integer)
RETURNS TABLE (id bigint, call text, run_as oid, timeout_ms integer, more_due boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    WITH next AS (
        SELECT t.id, t.run_at FROM ihub.inbound_item t
        WHERE t.state = 'pending' AND t.run_at <= now()
          AND (t.ordering_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM ihub.inbound_item e
                WHERE e.source_id = t.source_id AND e.ordering_key = t.ordering_key
                  AND e.state IN ('pending', 'running') AND e.id < t.id))
        ORDER BY t.run_at, t.id
        LIMIT 2
        FOR UPDATE SKIP LOCKED
    ), first AS (
        SELECT (array_agg(next.id ORDER BY next.run_at, next.id))[1] AS id, count(*) > 1 AS more FROM next
    ), claimed AS (
        UPDATE ihub.inbound_item t
        SET state = 'running', worker_pid = p_owner, started_at = clock_timestamp(), attempts = t.attempts + 1
        FROM first WHERE t.id = first.id
        RETURNING t.id, t.source_id, first.more
    )
    SELECT c.id, ihub._handler_call(s.handler), s.run_as::oid, p_default_timeout_ms, c.more
    FROM claimed c
    JOIN ihub.inbound_source s ON s.id = c.source_id;
END
$$;

CREATE OR REPLACE FUNCTION ihub._inbound_done(p_id bigint, p_owner integer, p_result jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.inbound_item SET state = 'done', finished_at = clock_timestamp(), result = p_result,
                                 error = NULL, worker_pid = NULL
    WHERE id = p_id AND state = 'running' AND worker_pid = p_owner;
END
$$;

CREATE OR REPLACE FUNCTION ihub._inbound_failed(p_id bigint, p_owner integer, p_error text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    UPDATE ihub.inbound_item t SET state = 'failed', finished_at = clock_timestamp(), error = p_error, worker_pid = NULL
    WHERE t.id = p_id AND t.state = 'running' AND t.worker_pid = p_owner
    RETURNING t.id, (SELECT i.name FROM ihub.inbound_source s JOIN ihub.integration i ON i.id = s.integration_id
                     WHERE s.id = t.source_id) AS integration
    INTO v;
    IF v.id IS NOT NULL THEN
        PERFORM ihub.log('error', format('inbound item %s failed: %s', p_id, p_error),
                         jsonb_build_object('inbound_item', p_id), v.integration, inbound => p_id);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION ihub._rescue_inbound() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    UPDATE ihub.inbound_item t SET state = 'pending', worker_pid = NULL
    WHERE t.state = 'running' AND NOT ihub._pid_alive(t.worker_pid);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM ihub.log('warning', format('%s inbound item(s) left by a stopped processor queued again', v_count));
        PERFORM ihub._wake_processor();
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION ihub._next_inbound_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN min(t.run_at) IS NOT NULL
                THEN greatest(0, extract(epoch FROM min(t.run_at) - now()))::double precision END
    FROM ihub.inbound_item t
    WHERE t.state = 'pending'
      AND (t.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM ihub.inbound_item e
            WHERE e.source_id = t.source_id AND e.ordering_key = t.ordering_key
              AND e.state IN ('pending', 'running') AND e.id < t.id))
$$;

CREATE OR REPLACE FUNCTION ihub._cleanup_inbound(p_cutoff timestamptz, p_batch integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n bigint;
    v_total bigint := 0;
BEGIN
    LOOP
        DELETE FROM ihub.inbound_item t
        WHERE t.id = ANY (ARRAY(SELECT x.id FROM ihub.inbound_item x WHERE x.state = 'done' AND x.finished_at < p_cutoff
                                ORDER BY x.id LIMIT p_batch));
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_total := v_total + v_n;
        EXIT WHEN v_n < p_batch;
    END LOOP;
    DELETE FROM ihub.inbound_dedup WHERE expires_at < now();
    DELETE FROM ihub.inbound_rejection WHERE received_at < p_cutoff;
    RETURN v_total;
END
$$;

CREATE OR REPLACE FUNCTION ihub._inbound_queue_stats()
RETURNS TABLE (queue text, state text, items bigint, oldest_age interval)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'inbound', s.state, count(t.id), now() - min(t.received_at)
    FROM unnest(ARRAY['pending', 'running', 'done', 'failed']) AS s(state)
    LEFT JOIN ihub.inbound_item t ON t.state = s.state
    GROUP BY s.state
$$;

-------------------------------------------------------------------------------
-- pg_dump / pg_restore and DROP EXTENSION (issue 9)
-------------------------------------------------------------------------------
-- The same objects and marks as sql/bootstrap.sql and sql/outbound.sql make.

-- DROP EXTENSION pg_ihub without CASCADE: capture tables and the capture
-- triggers on users' tables are made at run time and so are not members of
-- the extension; the event trigger ihub_drop_extension (a member, made by
-- CREATE EXTENSION and by the upgrade, never dumped) removes them first
-- when, and only when, the statement drops pg_ihub (src/outbound/capture.rs).
CREATE FUNCTION ihub._drop_capture() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    -- Every trigger calling a capture function, whatever its name; clones on
    -- partitions go with their parent's.
    FOR v IN
        SELECT t.tgname, t.tgrelid::regclass AS rel
        FROM pg_trigger t
        WHERE t.tgfoid IN ('ihub._capture_rows()'::regprocedure, 'ihub._capture_filtered()'::regprocedure)
          AND t.tgparentid = 0
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v.tgname, v.rel);
    END LOOP;
    -- Capture tables, and nothing of the extension's own (the schema).
    FOR v IN
        SELECT c.oid::regclass AS rel
        FROM pg_class c
        WHERE c.relnamespace = 'ihub_capture'::regnamespace AND c.relkind IN ('r', 'p')
          AND NOT c.relispartition
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('DROP TABLE %s', v.rel);
    END LOOP;
END
$$;

CREATE FUNCTION ihub._on_drop_extension() RETURNS event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'ihub_drop_extension';

CREATE EVENT TRIGGER ihub_drop_extension ON ddl_command_start WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION ihub._on_drop_extension();

COMMENT ON FUNCTION ihub._drop_capture() IS
    'Internal: drops every capture trigger and capture table, so that DROP EXTENSION pg_ihub needs no CASCADE.';
COMMENT ON FUNCTION ihub._on_drop_extension() IS
    'Internal: event trigger function; before DROP EXTENSION pg_ihub runs, calls ihub._drop_capture().';
COMMENT ON EVENT TRIGGER ihub_drop_extension IS
    'pg_ihub: removes capture triggers and capture tables (made at run time, not extension members) before DROP EXTENSION pg_ihub.';

-- Retention has a row per kind from CREATE EXTENSION on, so its dumped rows
-- cannot simply be copied back: a restore's COPY (or any INSERT) of a kind
-- that exists updates its row instead.
CREATE FUNCTION ihub._retention_upsert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.retention SET keep = NEW.keep WHERE kind = NEW.kind;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER retention_upsert BEFORE INSERT ON ihub.retention
    FOR EACH ROW EXECUTE FUNCTION ihub._retention_upsert();
COMMENT ON FUNCTION ihub._retention_upsert() IS
    'Internal: trigger making an insert of an existing retention kind (as pg_restore does) update its period.';
COMMENT ON TRIGGER retention_upsert ON ihub.retention IS
    'Restoring a dump keeps the dumped retention periods over the defaults CREATE EXTENSION made.';
SELECT pg_catalog.pg_extension_config_dump('ihub.retention', '');
-- Log entries of days without their own partition; the daily partitions
-- are not members and are dumped as tables of their own.
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_debug_default', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_info_default', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_warning_default', '');
-- The log's identity lives on the partitioned parent, which the loop above
-- does not see: restored entries keep their ids, new ones continue after.
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_id_seq', '');

-------------------------------------------------------------------------------
-- Log partitions carry their own indexes, so that pg_restore can attach them
-------------------------------------------------------------------------------
-- An index on the partitioned parent is built again on every partition
-- pg_restore attaches, colliding with the partition's dumped index; and
-- daily partitions are made by the maintenance worker only (not during a
-- restore), never by CREATE EXTENSION.

DROP INDEX ihub.log_entry_id_idx, ihub.log_entry_logged_at_idx;
CREATE INDEX log_entry_lasting_id_idx ON ihub.log_entry_lasting (id);
CREATE INDEX log_entry_lasting_logged_at_idx ON ihub.log_entry_lasting (logged_at);
CREATE INDEX log_entry_debug_default_id_idx ON ihub.log_entry_debug_default (id);
CREATE INDEX log_entry_debug_default_logged_at_idx ON ihub.log_entry_debug_default (logged_at);
CREATE INDEX log_entry_info_default_id_idx ON ihub.log_entry_info_default (id);
CREATE INDEX log_entry_info_default_logged_at_idx ON ihub.log_entry_info_default (logged_at);
CREATE INDEX log_entry_warning_default_id_idx ON ihub.log_entry_warning_default (id);
CREATE INDEX log_entry_warning_default_logged_at_idx ON ihub.log_entry_warning_default (logged_at);
DO $idx$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT c.relname FROM pg_class c
             WHERE c.relnamespace = 'ihub'::regnamespace AND c.relkind = 'r'
               AND c.relname ~ '^log_entry_(debug|info|warning)_[0-9]{8}$'
    LOOP
        EXECUTE format('CREATE INDEX %I ON ihub.%I (id)', v.relname || '_id_idx', v.relname);
        EXECUTE format('CREATE INDEX %I ON ihub.%I (logged_at)', v.relname || '_logged_at_idx', v.relname);
    END LOOP;
END
$idx$;

CREATE OR REPLACE FUNCTION ihub._ensure_log_partitions() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
-- Making a partition locks its level's table: give up quickly (and try at
-- the next round) rather than wait for a session writing logs, which could
-- be waiting for us in turn (a cleanup run by hand).
SET lock_timeout = '200ms'
AS $$
DECLARE
    v_level text;
    v_day date;
    v_name text;
    v_made integer := 0;
BEGIN
    -- A restore brings the source's partitions: making ours meanwhile would
    -- collide with them (pg_restore names itself in application_name).
    IF EXISTS (SELECT 1 FROM pg_stat_activity
               WHERE datname = current_database() AND application_name = 'pg_restore') THEN
        RETURN 0;
    END IF;
    FOREACH v_level IN ARRAY ARRAY['debug', 'info', 'warning'] LOOP
        FOR v_day IN SELECT generate_series(current_date, current_date + 2, interval '1 day')::date LOOP
            v_name := format('log_entry_%s_%s', v_level, to_char(v_day, 'YYYYMMDD'));
            CONTINUE WHEN to_regclass('ihub.' || v_name) IS NOT NULL;
            BEGIN
                EXECUTE format('CREATE TABLE ihub.%I PARTITION OF ihub.%I FOR VALUES FROM (%L) TO (%L)',
                               v_name, 'log_entry_' || v_level, v_day::timestamptz, (v_day + 1)::timestamptz);
                EXECUTE format('COMMENT ON TABLE ihub.%I IS %L', v_name,
                               format('%s log entries of %s (dropped whole when expired)', v_level, v_day));
                EXECUTE format('CREATE INDEX %I ON ihub.%I (id)', v_name || '_id_idx', v_name);
                EXECUTE format('CREATE INDEX %I ON ihub.%I (logged_at)', v_name || '_logged_at_idx', v_name);
                v_made := v_made + 1;
            EXCEPTION
                WHEN check_violation THEN
                    NULL; -- rows of that day already in the default partition: they stay there
                WHEN lock_not_available OR query_canceled THEN
                    -- Busy: stop here, so that the locks of the partitions
                    -- made so far go with this transaction at once instead
                    -- of being held while waiting for the next (a session
                    -- logging could be waiting for them: a deadlock).
                    RETURN v_made;
            END;
        END LOOP;
    END LOOP;
    RETURN v_made;
END
$$;
COMMENT ON FUNCTION ihub._ensure_log_partitions() IS 'Internal: creates the daily log partitions of today and the next two days, with their indexes (not during a pg_restore).';

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
