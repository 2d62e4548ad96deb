-- pg_ihub timed conditions: ihub.subscribe_timed(source, endpoint, column,
-- offset, condition) sends a row once, at <column> + <offset> (one day
-- after closed_at, say). It is a subscription like any other, whose capture
-- trigger computes each changed row's due time in the writer's transaction,
-- as the subscriber (a payload template with one computed field, so the
-- condition is the subscriber's code and runs with its rights). The route
-- turns captured changes into timers instead of deliveries: one per row,
-- moved when the column changes, dropped when the row is deleted or no
-- longer matches. Dispatchers fire due timers by the timers' own index
-- (ihub._fire_timers, woken by ihub._next_due): nothing polls the table.

-- The due time of the captured row, as the template computes it.
CREATE FUNCTION ihub._timer_template(p_column text, p_offset interval, p_condition text) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object('compute', jsonb_build_object('_ihub_due',
        format('CASE WHEN %s THEN (new.%I + %L::interval)::timestamptz END',
               coalesce(format(E'(\n%s\n)', p_condition), 'true'), p_column, p_offset)))
$$;

CREATE FUNCTION ihub._subscribe_timed_by(
    source regclass,
    endpoint text,
    "column" text,
    "offset" interval,
    condition text DEFAULT NULL,
    event_type text DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_type regtype;
    v_id bigint;
BEGIN
    SELECT a.atttypid::regtype INTO v_type FROM pg_attribute a
    WHERE a.attrelid = source AND a.attname = _subscribe_timed_by."column" AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_type IS NULL THEN
        RAISE EXCEPTION 'table % has no column %', source, quote_ident("column")
            USING ERRCODE = 'undefined_column', HINT = 'Name the timestamp column the time is counted from, e.g. closed_at.';
    ELSIF v_type NOT IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype) THEN
        RAISE EXCEPTION 'column % of % is %, not a time', quote_ident("column"), source, v_type
            USING ERRCODE = 'datatype_mismatch', HINT = 'Use a timestamptz, timestamp or date column.';
    END IF;
    IF "offset" IS NULL THEN
        RAISE EXCEPTION 'offset must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'For example interval ''1 day'' (0 sends at the column''s time; negative, before it).';
    END IF;
    IF condition IS NOT NULL THEN
        PERFORM ihub._check_expression(condition);
    END IF;
    v_id := ihub._subscribe_by(source, endpoint, '{insert,update,delete}', NULL, NULL, NULL, false,
                               coalesce(event_type, (SELECT c.relname || '.timer' FROM pg_class c WHERE c.oid = source)),
                               NULL, ihub._timer_template("column", "offset", condition), p_caller);
    UPDATE ihub.subscription s
    SET timer_column = _subscribe_timed_by."column", timer_offset = _subscribe_timed_by."offset",
        timer_condition = _subscribe_timed_by.condition
    WHERE s.id = v_id;
    -- Routed by key: the table needs one.
    PERFORM ihub._ordering_columns(s) FROM ihub.subscription s WHERE s.id = v_id;
    RETURN v_id;
END
$$;

-- A C entry point (src/caller.rs): the condition runs as the caller.
CREATE FUNCTION ihub.subscribe_timed(
    source regclass,
    endpoint text,
    "column" text,
    "offset" interval,
    condition text DEFAULT NULL,
    event_type text DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- Turns a timed subscription's captured changes (ctids p_taken of its
-- capture table) into timers: per row (its primary key), the last change
-- wins; a delete, or a due time of NULL (the condition failed, the column
-- is NULL), drops the timer; a new due time re-arms it (fired_at NULL);
-- otherwise the timer keeps its state and takes the row's new data.
CREATE FUNCTION ihub._route_timers(p_sub ihub.subscription, p_taken tid[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key text := (SELECT string_agg(format('r -> %L', c), ', ') FROM unnest(ihub._ordering_columns(p_sub)) c);
    v_n bigint;
BEGIN
    EXECUTE format($q$
        WITH moved AS (
            DELETE FROM ihub_capture.%1$I c WHERE c.ctid = ANY ($1)
            RETURNING c.op, c.seq, c.data, to_jsonb(coalesce(c.new_row, c.old_row)) AS r
        ), last AS (
            SELECT DISTINCT ON (k) k, op, data, (data ->> '_ihub_due')::timestamptz AS due
            FROM (SELECT jsonb_build_array(%2$s) AS k, m.* FROM moved m) x
            ORDER BY k, seq DESC NULLS LAST
        ), dropped AS (
            DELETE FROM ihub.timer t USING last l
            WHERE t.subscription_id = $2 AND t.row_key = l.k AND (l.op = 'd' OR l.due IS NULL)
        )
        INSERT INTO ihub.timer AS t (subscription_id, row_key, due_at, data)
        SELECT $2, l.k, l.due, l.data - '_ihub_due' FROM last l WHERE l.op <> 'd' AND l.due IS NOT NULL
        ON CONFLICT (subscription_id, row_key) DO UPDATE
        SET data = EXCLUDED.data, due_at = EXCLUDED.due_at,
            fired_at = CASE WHEN t.due_at = EXCLUDED.due_at THEN t.fired_at END
    $q$, 'sub_' || p_sub.id, v_key) USING p_taken, p_sub.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- Fires due timers: a pending delivery each, typed as the subscription says
-- (default <table>.timer), with the row as its last change left it. Rows of
-- timers whose subscription's endpoint is disabled wait like any delivery.
CREATE FUNCTION ihub._fire_timers(p_limit integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    v_n bigint;
BEGIN
    WITH due AS (
        SELECT t.id FROM ihub.timer t
        WHERE t.fired_at IS NULL AND t.due_at <= now()
        ORDER BY t.due_at LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), fired AS (
        UPDATE ihub.timer t SET fired_at = now() FROM due WHERE t.id = due.id
        RETURNING t.*
    )
    INSERT INTO ihub.delivery (event_id, endpoint_id, subscription_id, event_type, payload, test_mode, occurred_at,
                               ordering_key)
    SELECT ev.id, s.endpoint_id, s.id, s.event_type,
           jsonb_build_object('id', ev.id, 'type', s.event_type, 'schema', n.nspname, 'table', c.relname,
                              'operation', 'timer', 'occurred_at', f.due_at, 'tenant', i.tenant,
                              -- Custom fields go only to the integrations they are exported to.
                              'due_at', f.due_at, 'data', f.data - ihub._custom_fields_hidden(s.source, i.name)),
           s.test_mode, f.due_at,
           ihub._ordering_key_of(e.ordering, s.id::text || ':' || md5(f.row_key::text))
    FROM fired f
    JOIN ihub.subscription s ON s.id = f.subscription_id
    JOIN ihub.endpoint e ON e.id = s.endpoint_id
    JOIN ihub.integration i ON i.id = e.integration_id
    JOIN pg_class c ON c.oid = s.source
    JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL (SELECT 'evt_' || replace(gen_random_uuid()::text, '-', '') AS id) ev
    -- A type the endpoint does not accept is not queued (the timer fired).
    WHERE ihub._type_accepted(e.event_types, s.event_type);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

CREATE VIEW ihub.timers AS
SELECT t.id, t.subscription_id AS subscription, i.name AS integration, e.name AS endpoint, s.source,
       s.timer_column AS "column", s.timer_offset AS "offset", t.row_key, t.due_at, t.fired_at, t.data
FROM ihub.timer t
JOIN ihub.subscription s ON s.id = t.subscription_id
JOIN ihub.endpoint e ON e.id = s.endpoint_id
JOIN ihub.integration i ON i.id = e.integration_id;

COMMENT ON VIEW ihub.timers IS 'Timed subscriptions'' timers: one per row, due at column + offset; fired_at once sent.';
COMMENT ON FUNCTION ihub._timer_template(text, interval, text) IS 'Internal: the payload template that computes a timed subscription''s due time.';
COMMENT ON FUNCTION ihub.subscribe_timed(regclass, text, text, interval, text, text) IS
    'Sends each row of a table once at <column> + <offset> while it matches condition (over new): follows updates of the column, cancelled when the row is deleted or no longer matches. Returns the subscription id.';
COMMENT ON FUNCTION ihub._route_timers(ihub.subscription, tid[]) IS 'Internal (dispatcher): turns a timed subscription''s captured changes into timers.';
COMMENT ON FUNCTION ihub._fire_timers(integer) IS 'Internal (dispatcher): turns due timers into deliveries.';
