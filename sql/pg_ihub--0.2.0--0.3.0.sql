-- pg_ihub 0.2.0 -> 0.3.0
--
-- Faults stay where they happen (issue 10): subscriptions survive DDL on
-- their tables or are marked broken alone, jobs and inbound items whose
-- function is gone end failed, and the listener's queues, records and
-- connections are bounded. Delivery failures are logged aggregated (issue 11).
-- Mappers translate values between this database and other systems, bindings
-- link rows to external objects, a sync's writes are not sent back to the
-- system they came from, custom fields go to chosen integrations, and
-- ihub.test_connection probes an endpoint (issue 12).

\echo Use "ALTER EXTENSION pg_ihub UPDATE TO '0.3.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Capture: DDL on subscribed tables, partitions, TRUNCATE
-------------------------------------------------------------------------------

-- A subscription whose table or capture table is broken is marked (and
-- retried every 10 seconds), the others go on; DROP TABLE of a subscribed table
-- delivers what was captured and ends the subscription; a table dropped with
-- its schema marks it broken; ALTER TABLE adding a column or changing a type
-- delivers what was captured and remakes the capture table.

ALTER TABLE ihub.subscription ADD COLUMN broken_at timestamptz, ADD COLUMN broken_reason text;

-- Writes addressed to any partition of a subscribed table are captured, and
-- TRUNCATE is an event for subscriptions that ask for it.

-- The tables whose writes a subscription captures: its table and, when that
-- is partitioned, every partition below it, since a statement's triggers
-- fire on the table it names only. Foreign partitions cannot have
-- transition tables: writes addressed to them are not captured.
CREATE FUNCTION ihub._capture_relations(p_source oid) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    -- pg_partition_tree gives nothing for a table outside any partition tree.
    SELECT p_source
    UNION
    SELECT t.relid::oid FROM pg_partition_tree(p_source::regclass) t
    JOIN pg_class c ON c.oid = t.relid
    WHERE c.relkind IN ('r', 'p')
$$;

-- A subscription's capture triggers, on whichever tables they are.
CREATE FUNCTION ihub._capture_triggers(p_sub ihub.subscription) RETURNS TABLE (rel regclass, name name)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.tgrelid::regclass, t.tgname FROM pg_trigger t
    WHERE t.tgname IN (SELECT format('ihub_sub_%s_%s', p_sub.id, e) FROM unnest(p_sub.events) AS e)
      AND t.tgfoid IN (SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'ihub'::regnamespace
                       AND p.proname IN ('_capture_rows', '_capture_filtered', '_capture_truncate'))
$$;

-- Makes a subscription's capture triggers on one of its tables (see
-- ihub._capture_relations), those that are not there yet. C-language
-- triggers copy the rows in bulk; with watched columns or a condition,
-- ihub._capture_filtered first selects the rows that pass, as the
-- subscriber. By name, not OID: a dumped and restored trigger must still
-- find its capture table.
CREATE FUNCTION ihub._create_capture_triggers(p_sub ihub.subscription, p_rel oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_capture text := 'ihub_capture.sub_' || p_sub.id;
    v_event text;
    v_name text;
BEGIN
    FOREACH v_event IN ARRAY p_sub.events LOOP
        v_name := format('ihub_sub_%s_%s', p_sub.id, v_event);
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_rel AND tgname = v_name);
        IF v_event = 'truncate' THEN
            EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION ihub._capture_truncate(%L)',
                           v_name, p_rel::regclass, v_capture);
        ELSE
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %I FOR EACH STATEMENT EXECUTE FUNCTION %s(%L)',
                           v_name, upper(v_event), p_rel::regclass,
                           CASE v_event WHEN 'insert' THEN 'NEW' WHEN 'delete' THEN 'OLD' ELSE 'OLD TABLE AS ihub_old NEW' END,
                           CASE v_event WHEN 'delete' THEN 'ihub_old' ELSE 'ihub_new' END,
                           CASE WHEN p_sub.condition IS NULL AND p_sub.payload IS NULL AND (p_sub.watch IS NULL OR v_event <> 'update')
                                THEN 'ihub._capture_rows' ELSE 'ihub._capture_filtered' END,
                           v_capture);
        END IF;
    END LOOP;
END
$$;

-- The capture trigger of TRUNCATE, for subscriptions whose events include
-- truncate: a row without data, which the route sends as <table>.truncate.
-- A TRUNCATE of a partitioned table fires it on the table and on each of
-- its partitions: one row per statement is kept. SECURITY DEFINER: the
-- writer has no right on the capture table.
CREATE FUNCTION ihub._capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub bigint := substring(TG_ARGV[0] FROM '^ihub_capture\.sub_([0-9]+)$')::bigint;
BEGIN
    IF TG_OP <> 'TRUNCATE' OR TG_LEVEL <> 'STATEMENT' OR NOT EXISTS (
        SELECT 1 FROM ihub.subscription s
        WHERE s.id = v_sub AND 'truncate' = ANY (s.events)
          AND (s.source = TG_RELID OR TG_RELID IN (SELECT ihub._capture_relations(s.source))))
    THEN
        RAISE EXCEPTION 'ihub._capture_truncate() runs only as the TRUNCATE trigger ihub.subscribe made, not on % for %',
                        TG_RELID::regclass, TG_ARGV[0]
            USING ERRCODE = 'triggered_action_exception', HINT = 'Capture triggers are made by ihub.subscribe(); drop this one.';
    END IF;
    -- The transaction syncs this subscription's integration: not sent back.
    IF ihub._echo_suppressed(v_sub) THEN
        RETURN NULL;
    END IF;
    EXECUTE format($q$
        INSERT INTO ihub_capture.%1$I (op, xid, occurred_at, seq)
        SELECT 't', pg_current_xact_id(), statement_timestamp(), nextval('ihub.capture_seq')
        WHERE NOT EXISTS (SELECT 1 FROM ihub_capture.%1$I
                          WHERE op = 't' AND xid = pg_current_xact_id() AND occurred_at = statement_timestamp())
    $q$, 'sub_' || v_sub);
    PERFORM ihub._wake();
    RETURN NULL;
END
$$;

-- Keeps the capture triggers of subscriptions on partitioned tables on
-- exactly their partitions: made on partitions created or attached since,
-- removed from those detached, whose writes are no longer the table's.
-- From ihub._on_ddl_end, after CREATE TABLE and ALTER TABLE.
CREATE FUNCTION ihub._sync_partition_triggers() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
    v record;
    v_made boolean;
BEGIN
    FOR v_sub IN
        SELECT s.* FROM ihub.subscription s JOIN pg_class c ON c.oid = s.source
        WHERE c.relkind = 'p' ORDER BY s.id
    LOOP
        v_made := false;
        FOR v IN
            SELECT r AS rel FROM ihub._capture_relations(v_sub.source) AS r
            WHERE (SELECT count(*) FROM ihub._capture_triggers(v_sub) t WHERE t.rel = r) < cardinality(v_sub.events)
        LOOP
            PERFORM ihub._create_capture_triggers(v_sub, v.rel);
            v_made := true;
        END LOOP;
        FOR v IN
            SELECT t.rel, t.name FROM ihub._capture_triggers(v_sub) t
            WHERE t.rel NOT IN (SELECT ihub._capture_relations(v_sub.source))
        LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', v.name, v.rel);
        END LOOP;
        IF v_made AND (SELECT i.state = 'inactive' FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                       WHERE e.id = v_sub.endpoint_id) THEN
            PERFORM ihub._set_capture_enabled(v_sub.id, false);
        END IF;
    END LOOP;
END
$$;

-- DROP EXTENSION pg_ihub without CASCADE: capture tables and the capture
-- triggers on users' tables are made at run time and so are not members of
-- the extension; the event trigger ihub_drop_extension (a member, made by
-- CREATE EXTENSION and by the upgrade, never dumped) removes them first
-- when, and only when, the statement drops pg_ihub (src/outbound/capture.rs).
CREATE OR REPLACE FUNCTION ihub._drop_capture() RETURNS void
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
        WHERE t.tgfoid IN ('ihub._capture_rows()'::regprocedure, 'ihub._capture_filtered()'::regprocedure,
                           'ihub._capture_truncate()'::regprocedure, 'ihub._binding_deleted()'::regprocedure)
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

CREATE FUNCTION ihub._create_capture_table(p_sub ihub.subscription) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_capture text := format('ihub_capture.%I', 'sub_' || p_sub.id);
    v_type text := format_type((SELECT reltype FROM pg_class WHERE oid = p_sub.source), NULL);
BEGIN
    EXECUTE format('CREATE TABLE %s (op "char" NOT NULL, xid xid8 NOT NULL, occurred_at timestamptz NOT NULL, new_row %s, old_row %s, seq bigint, data jsonb) '
                   'WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)',
                   v_capture, v_type, v_type);
    EXECUTE format('COMMENT ON TABLE %s IS %L', v_capture,
                   format('pg_ihub capture table of subscription %s (%s -> %s)', p_sub.id, p_sub.source,
                          (SELECT name FROM ihub.endpoint WHERE id = p_sub.endpoint_id)));
END
$$;

-- Takes what ending or emptying a subscription's capture table needs, in an
-- order that waits for everyone and deadlocks with no one: the table (its
-- open writers finish and new ones wait), then the capture table (a
-- dispatcher routing it finishes: it holds captured rows and, to insert
-- their deliveries, needs the subscription row), then the subscription row.
-- The subscription as it is now, or NULL when another session ended it.
CREATE FUNCTION ihub._lock_subscription(p_sub ihub.subscription, p_table_mode text) RETURNS ihub.subscription
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_capture text := format('ihub_capture.%I', 'sub_' || p_sub.id);
    v_sub ihub.subscription;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = p_sub.source) THEN
        EXECUTE format('LOCK TABLE %s IN %s MODE', p_sub.source, p_table_mode);
    END IF;
    -- Looked up after the wait: another session may have ended the
    -- subscription (or remade its capture table) meanwhile.
    IF to_regclass(v_capture) IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %s IN EXCLUSIVE MODE', v_capture);
    END IF;
    SELECT * INTO v_sub FROM ihub.subscription s WHERE s.id = p_sub.id FOR UPDATE;
    RETURN v_sub;
END
$$;

CREATE FUNCTION ihub._end_subscription(p_sub ihub.subscription) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    v_routed bigint := 0;
BEGIN
    p_sub := ihub._lock_subscription(p_sub, 'SHARE ROW EXCLUSIVE');
    IF p_sub.id IS NULL THEN
        RETURN 0; -- ended meanwhile
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = p_sub.source) THEN
        BEGIN
            SELECT count(*) INTO v_routed FROM ihub._route(p_sub, NULL, NULL);
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE; -- a cast to json in the way: dropping it lets them go
            WHEN OTHERS THEN
                -- A broken capture table: what it holds cannot be sent.
                PERFORM ihub.log('error',
                                 format('subscription %s ended: its captured changes could not be sent: %s', p_sub.id, SQLERRM),
                                 jsonb_build_object('subscription', p_sub.id));
        END;
    END IF;
    FOR v IN SELECT * FROM ihub._capture_triggers(p_sub) LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v.name, v.rel);
    END LOOP;
    EXECUTE format('DROP TABLE IF EXISTS ihub_capture.%I', 'sub_' || p_sub.id);
    DELETE FROM ihub.subscription s WHERE s.id = p_sub.id;
    RETURN v_routed;
END
$$;

CREATE OR REPLACE FUNCTION ihub._unsubscribe_by(id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
    v_event text;
BEGIN
    -- Locked by ihub._end_subscription, in its order.
    SELECT * INTO v_sub FROM ihub.subscription s WHERE s.id = _unsubscribe_by.id;
    IF v_sub.id IS NULL THEN
        RAISE EXCEPTION 'subscription % does not exist', _unsubscribe_by.id
            USING ERRCODE = 'undefined_object', HINT = 'List subscriptions in ihub.subscriptions.';
    END IF;
    -- Its subscriber's (a dropped subscriber's: a superuser's) to remove.
    PERFORM ihub._require_may_act_for(
        p_caller, coalesce((SELECT r.oid FROM pg_roles r WHERE r.rolname = v_sub.created_by), 10)::regrole,
        format('subscription %s', v_sub.id));
    PERFORM ihub._end_subscription(v_sub);
END
$$;

CREATE FUNCTION ihub._subscriptions_dropping(p_tables oid[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
    v_routed bigint;
BEGIN
    -- Not locked here: ihub._end_subscription locks in its order.
    FOR v_sub IN SELECT * FROM ihub.subscription WHERE source = ANY (p_tables) ORDER BY id LOOP
        v_routed := ihub._end_subscription(v_sub);
        PERFORM ihub.log('warning',
                         format('subscription %s ended: its table %s was dropped; %s captured change(s) queued for delivery',
                                v_sub.id, v_sub.source, v_routed),
                         jsonb_build_object('subscription', v_sub.id),
                         (SELECT i.name FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                          WHERE e.id = v_sub.endpoint_id));
    END LOOP;
END
$$;

CREATE FUNCTION ihub._capture_before_alter(p_table oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ihub.subscription WHERE source = p_table) THEN
        RETURN;
    END IF;
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', p_table::regclass);
    FOR v_sub IN SELECT * FROM ihub.subscription WHERE source = p_table ORDER BY id LOOP
        v_sub := ihub._lock_subscription(v_sub, 'ACCESS EXCLUSIVE');
        CONTINUE WHEN v_sub.id IS NULL;
        IF v_sub.broken_at IS NOT NULL THEN
            RAISE EXCEPTION 'cannot alter %: subscription % is broken (%)', p_table::regclass, v_sub.id, v_sub.broken_reason
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Repair it or remove it (SELECT ihub.unsubscribe(id)) first: its captured changes would be lost.';
        END IF;
        PERFORM ihub._route(v_sub, NULL, NULL);
        EXECUTE format('DROP TABLE ihub_capture.%I', 'sub_' || v_sub.id);
    END LOOP;
END
$$;

CREATE FUNCTION ihub._on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ihub.subscription) THEN
        RETURN;
    END IF;
    PERFORM ihub._sync_partition_triggers();
    FOR v_sub IN
        SELECT s.* FROM ihub.subscription s
        WHERE to_regclass(format('ihub_capture.%I', 'sub_' || s.id)) IS NULL
          AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.source)
    LOOP
        -- Made meanwhile: this function also runs for the CREATE TABLE of
        -- each capture table it makes.
        CONTINUE WHEN to_regclass(format('ihub_capture.%I', 'sub_' || v_sub.id)) IS NOT NULL;
        PERFORM ihub._create_capture_table(v_sub);
    END LOOP;
END
$$;

CREATE FUNCTION ihub._subscription_broken(p_sub ihub.subscription, p_reason text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Two dispatchers may find it broken at once: the row lock lets one
    -- mark it and log; the other sees the mark and only moves the next try
    -- on. The first reason stays: it is the incident's cause (a later error,
    -- such as a missing column after its table went, is a consequence).
    UPDATE ihub.subscription SET broken_at = now(), broken_reason = left(p_reason, 1000)
    WHERE id = p_sub.id AND broken_at IS NULL;
    IF NOT FOUND THEN
        UPDATE ihub.subscription SET broken_at = now() WHERE id = p_sub.id;
    ELSE
        PERFORM ihub.log('critical',
                         format('subscription %s is broken: %s; its changes wait, the other subscriptions go on', p_sub.id, p_reason),
                         jsonb_build_object('subscription', p_sub.id),
                         (SELECT i.name FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                          WHERE e.id = p_sub.endpoint_id));
    END IF;
END
$$;

CREATE FUNCTION ihub._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
    v record;
BEGIN
    FOR v IN
        SELECT s.id, d.object_identity FROM ihub.subscription s
        JOIN pg_event_trigger_dropped_objects() d ON d.classid = 'pg_class'::regclass AND d.objid = s.source
        WHERE d.object_type IN ('table', 'partitioned table')
    LOOP
        SELECT * INTO v_sub FROM ihub.subscription WHERE id = v.id;
        PERFORM ihub._subscription_broken(v_sub,
            format('its table %s was dropped (%s); changes not yet sent were lost with it', v.object_identity, tg_tag));
    END LOOP;
END
$$;

CREATE FUNCTION ihub._on_ddl_start() RETURNS event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'ihub_ddl_start';

CREATE OR REPLACE FUNCTION ihub._set_capture_enabled(p_subscription bigint, p_enabled boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    -- On the table and its partitions; none when the table was dropped with
    -- its schema (the subscription is marked broken).
    FOR v IN SELECT t.* FROM ihub.subscription s, ihub._capture_triggers(s) t WHERE s.id = p_subscription LOOP
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', v.rel, CASE WHEN p_enabled THEN 'ENABLE' ELSE 'DISABLE' END, v.name);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION ihub._subscribe_by(
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
    v_bad text;
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
    v_bad := (SELECT string_agg(e, ', ') FROM unnest(v_events) AS e WHERE e NOT IN ('insert', 'update', 'delete', 'truncate'));
    IF v_events IS NULL OR v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'invalid events: %', coalesce(v_bad, 'none given')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use any of insert, update, delete and truncate, e.g. ''{insert,update}''.';
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

    PERFORM ihub._create_capture_table(v_sub);
    PERFORM ihub._create_capture_triggers(v_sub, r) FROM ihub._capture_relations(source) AS r;
    IF v_integration.state = 'inactive' THEN
        PERFORM ihub._set_capture_enabled(v_sub.id, false);
    END IF;
    RETURN v_sub.id;
END
$$;

-- The statements a route runs for one subscription: take captured rows
-- from a block on ($1 rows at most, from block $2), take them from before it,
-- and render the rows taken ($1) as deliveries (see ihub._route for the
-- other parameters).
CREATE FUNCTION ihub._route_sql(p_sub_id bigint, p_step text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE p_step
        WHEN 'take' THEN format('SELECT ARRAY(SELECT x.ctid FROM ihub_capture.%I x WHERE x.ctid >= $2 LIMIT $1 FOR UPDATE SKIP LOCKED)',
                                'sub_' || p_sub_id)
        WHEN 'wrap' THEN format('SELECT ARRAY(SELECT x.ctid FROM ihub_capture.%I x WHERE x.ctid < $2 LIMIT $1 FOR UPDATE SKIP LOCKED)',
                                'sub_' || p_sub_id)
        -- A top-N sort of the whole capture table: ordered endpoints with
        -- a backlog only, whose routes take turns (ihub._route).
        WHEN 'take_ordered' THEN format('SELECT ARRAY(SELECT x.ctid FROM ihub_capture.%I x ORDER BY x.seq NULLS FIRST, x.ctid LIMIT $1 FOR UPDATE)',
                                        'sub_' || p_sub_id)
        WHEN 'render' THEN format($q$
            WITH moved AS (
                DELETE FROM ihub_capture.%1$I c
                WHERE c.ctid = ANY ($1)
                RETURNING c.op, c.xid, c.occurred_at, c.new_row, c.old_row, c.seq, c.data
            )
            INSERT INTO ihub.delivery AS d (event_id, endpoint_id, subscription_id, event_type, payload, test_mode,
                                            state, worker_pid, lease_until, occurred_at, run_at, ordering_key)
            SELECT ev.id, $2, $3, ev.type,
                   jsonb_build_object('id', ev.id, 'type', ev.type, 'schema', $4, 'table', $5, 'operation', ev.op,
                                      'occurred_at', m.occurred_at, 'txid', m.xid::text, 'tenant', $6,
                                      -- What the template made, if any, in the writer's transaction.
                                      'data', coalesce(m.data - $11, CASE WHEN m.op = 'd' THEN j.old ELSE j.new END))
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
                   m.occurred_at, now(),
                   -- A row's key: its subscription and a hash of the key
                   -- columns' values, so that a long value fits the index
                   -- and no value shows (a truncate goes in order with
                   -- itself).
                   CASE $14 WHEN 'endpoint' THEN ''
                            WHEN 'key' THEN CASE WHEN m.op = 't' THEN ev.id
                                                 ELSE $3::text || ':' || md5((
                                                     SELECT jsonb_agg(r.v -> k.c ORDER BY k.n)
                                                     FROM unnest($15) WITH ORDINALITY k(c, n),
                                                          LATERAL (SELECT to_jsonb(coalesce(m.new_row, m.old_row))) r(v))::text) END
                   END
            FROM moved m
            CROSS JOIN LATERAL (SELECT to_jsonb(m.new_row) - $11 AS new, to_jsonb(m.old_row) - $11 AS old) j
            CROSS JOIN LATERAL (
                SELECT 'evt_' || replace(gen_random_uuid()::text, '-', '') AS id,
                       CASE m.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' WHEN 't' THEN 'truncate' ELSE 'delete' END AS op,
                       coalesce($13, $5 || '.' || CASE m.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' WHEN 't' THEN 'truncate' ELSE 'delete' END) AS type
            ) ev
            -- Changes whose event type the endpoint does not accept are
            -- taken from the capture table and not queued.
            WHERE m.op = ANY ($12)
            ORDER BY m.seq NULLS FIRST
            RETURNING d.*
        $q$, 'sub_' || p_sub_id)
    END
$fn$;

-- A dispatcher's session prepares a subscription's route statements once
-- (PREPARE ihub_route_<id>_<step>) and runs them by name with their values
-- inlined: parsing and planning them for every route took about 1.1 ms a
-- round, 25 us per delivery at 40 deliveries a round (make bench, single-row
-- writes, pg_stat_statements). Prepared statements follow a capture table
-- made again (Postgres analyzes them anew).
-- Whether they exist is kept in session settings, read in a microsecond:
-- listing pg_prepared_statements builds a row for every statement (674 us
-- with 300 of them, for each subscription at every round). A setting
-- ihub_route.prepared_<id> equal to ihub_route.generation says this session
-- prepared them and has not dropped them since. Settings are rolled back
-- with a (sub)transaction, prepared statements are not: a setting lost that
-- way only has the next route list them once. Nothing else drops them
-- (ihub._route_forget, in a transaction of its own).
-- At most 300 route statements (100 subscriptions), counted in
-- ihub_route.prepared: the routes of further subscriptions run as text
-- (false) until the dispatcher drops them all (at most every 10 s).
-- Only for the dispatcher itself (ihub._route checks p_owner): other
-- sessions could have prepared statements of the same name.
CREATE FUNCTION ihub._route_prepare(p_sub_id bigint) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := 'ihub_route_' || p_sub_id || '_';
    v_flag text := 'ihub_route.prepared_' || p_sub_id;
    v_generation text := coalesce(nullif(current_setting('ihub_route.generation', true), ''), '0');
    v_have text[];
    v_count integer;
BEGIN
    IF current_setting(v_flag, true) = v_generation THEN
        RETURN true;
    END IF;
    IF coalesce(nullif(current_setting('ihub_route.prepared', true), ''), '0')::integer >= 300 THEN
        RETURN false;
    END IF;
    SELECT coalesce(array_agg(s.name) FILTER (WHERE s.name IN (v_name || 'take', v_name || 'wrap', v_name || 'render')), '{}'),
           count(*)
    INTO v_have, v_count
    FROM pg_prepared_statements s WHERE s.name LIKE 'ihub\_route\_%';
    IF NOT v_name || 'render' = ANY (v_have) THEN
        IF v_count >= 300 THEN
            PERFORM set_config('ihub_route.prepared', v_count::text, false);
            RETURN false;
        END IF;
        -- The others may be left from a route that failed while preparing.
        IF v_name || 'take' = ANY (v_have) THEN
            EXECUTE format('DEALLOCATE %I', v_name || 'take');
            v_count := v_count - 1;
        END IF;
        IF v_name || 'wrap' = ANY (v_have) THEN
            EXECUTE format('DEALLOCATE %I', v_name || 'wrap');
            v_count := v_count - 1;
        END IF;
        EXECUTE format('PREPARE %I (integer, tid) AS %s', v_name || 'take', ihub._route_sql(p_sub_id, 'take'));
        EXECUTE format('PREPARE %I (integer, tid) AS %s', v_name || 'wrap', ihub._route_sql(p_sub_id, 'wrap'));
        EXECUTE format('PREPARE %I (tid[], bigint, bigint, text, text, text, boolean, boolean, integer, timestamptz, text[], text[], text, text, text[]) AS %s',
                       v_name || 'render', ihub._route_sql(p_sub_id, 'render'));
        v_count := v_count + 3;
    END IF;
    PERFORM set_config(v_flag, v_generation, false);
    PERFORM set_config('ihub_route.prepared', v_count::text, false);
    RETURN true;
END
$$;

-- Drops the session's route statements, and with them those of
-- subscriptions deleted since they were prepared: a dispatcher calls it, in
-- a transaction of its own, once it holds 300 (at most every 10 s). Routes
-- prepare those in use again. Only in a transaction that commits: rolled
-- back, the generation would say that the dropped statements exist.
CREATE FUNCTION ihub._route_forget() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM set_config('ihub_route.generation',
                       (coalesce(nullif(current_setting('ihub_route.generation', true), ''), '0')::bigint + 1)::text, false);
    PERFORM set_config('ihub_route.prepared', '0', false);
    DEALLOCATE ALL;
END
$$;

-- Returns the new deliveries' rows now, not their ids (a new result type).
DROP FUNCTION ihub._route(ihub.subscription, integer, integer, integer, integer);
CREATE FUNCTION ihub._route(p_sub ihub.subscription, p_limit integer, p_owner integer,
                            p_default_timeout_ms integer DEFAULT 10000, p_rounds integer DEFAULT 1)
RETURNS SETOF ihub.delivery
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
    v_hazard text;
    v_limit integer := coalesce(p_limit, 2147483647);
    -- Where this session's last route of this subscription stopped: a block
    -- of the capture table. Routed rows stay there as dead tuples until
    -- vacuum, and a route that scanned from the first block stepped over all
    -- of them every round: quadratic in a burst (draining 200,000 changes
    -- spent 19 % of the server's CPU in HeapTupleSatisfiesVisibility, make
    -- bench). Writers append, so a route goes on from there, and wraps to the
    -- first block only when that leaves its batch short (rows written into
    -- space vacuum freed, or rows another dispatcher gave back).
    -- A value it cannot read (unset, set by hand) means the first block.
    v_position text := 'ihub_route.sub_' || p_sub.id;
    v_from tid := CASE WHEN current_setting(v_position, true) ~ '^[0-9]{1,9}$'
                       THEN format('(%s,0)', current_setting(v_position, true))::tid
                       ELSE '(0,0)' END;
    v_taken tid[];
    v_wrapped tid[];
    v_lease timestamptz;
    v_ops text[];
    -- A dispatcher runs the route's statements prepared in its session
    -- (ihub._route_prepare, up to 100 subscriptions' worth); anyone else (an
    -- unsubscribe, an ALTER TABLE) runs them as text.
    v_prepared boolean := p_owner IS NOT NULL AND p_owner = pg_backend_pid();
    v_name text := 'ihub_route_' || p_sub.id || '_';
    v_key_columns text[];
    -- Ordered endpoints and timed subscriptions route in turns and in
    -- statement order.
    v_in_turn boolean;
BEGIN
    -- Kept until commit, as a foreign key check would (see ihub._endpoint_deleted).
    SELECT * INTO v_endpoint FROM ihub.endpoint WHERE id = p_sub.endpoint_id FOR KEY SHARE;

    v_prepared := v_prepared AND ihub._route_prepare(p_sub.id);
    -- Timed subscriptions take turns too: the last change of a row must be
    -- the one its timer keeps (sql/timers.sql).
    v_in_turn := v_endpoint.ordering IS NOT NULL OR p_sub.timer_offset IS NOT NULL;
    IF v_in_turn THEN
        -- Routes to an ordered endpoint take turns, until commit, with each
        -- other and with its claims (ihub._endpoint_turn): each routes
        -- the changes first in statement order, so a key's deliveries get
        -- ids in commit order, and no claim sees a later change of a key
        -- while an earlier one is still being routed. A dispatcher that
        -- finds it taken routes this subscription at its next round.
        IF NOT ihub._endpoint_turn(v_endpoint.id, p_owner IS NULL) THEN
            RETURN;
        END IF;
        IF v_endpoint.ordering = 'key' THEN
            v_key_columns := ihub._ordering_columns(p_sub);
        END IF;
    END IF;
    IF v_prepared THEN
        EXECUTE format('EXECUTE %I(%s, %L)', v_name || 'take', v_limit, v_from) INTO v_taken;
    ELSE
        EXECUTE ihub._route_sql(p_sub.id, 'take') INTO v_taken USING v_limit, v_from;
    END IF;
    IF cardinality(v_taken) < v_limit AND v_from > '(0,0)'::tid THEN
        IF v_prepared THEN
            EXECUTE format('EXECUTE %I(%s, %L)', v_name || 'wrap', v_limit - cardinality(v_taken), v_from) INTO v_wrapped;
        ELSE
            EXECUTE ihub._route_sql(p_sub.id, 'wrap') INTO v_wrapped USING v_limit - cardinality(v_taken), v_from;
        END IF;
        v_taken := v_taken || v_wrapped;
    END IF;
    -- An ordered endpoint's route that took fewer than its limit took every
    -- captured change (its routes take turns: no row was skipped as locked);
    -- the render puts them in statement order. One that took its limit may
    -- have left earlier changes behind: it takes the first ones in
    -- statement order instead, a sort of the whole capture table, paid
    -- only under a backlog: sorting it at every route rescanned the dead
    -- rows of all earlier routes until vacuum. It takes up to ten batches'
    -- worth at once (queued pending, for the claim to take key by key), so
    -- that a backlog pays for few such sorts.
    IF v_in_turn AND cardinality(v_taken) >= v_limit THEN
        EXECUTE ihub._route_sql(p_sub.id, 'take_ordered') INTO v_taken
            USING least(v_limit::bigint * 10, 2147483647)::integer;
        v_limit := cardinality(v_taken);
    END IF;
    -- Nothing captured: no lookups, no rendering statement to parse and
    -- plan (a route of nothing took 0.7 ms, for every subscription at every
    -- dispatcher round).
    IF cardinality(v_taken) = 0 THEN
        v_routed := 0;
    ELSE
        v_hazard := ihub._json_cast_hazard(p_sub.source);
        IF v_hazard IS NOT NULL THEN
            -- Its changes wait in the capture table until the cast is dropped
            -- (the dispatcher marks the subscription broken with this reason).
            RAISE EXCEPTION 'cannot render the changes of subscription %: %', p_sub.id, v_hazard
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'pg_ihub renders changes as JSON with its workers'' rights and never runs such a cast: drop it (DROP CAST).';
        END IF;
        SELECT * INTO v_integration FROM ihub.integration WHERE id = v_endpoint.integration_id;
        SELECT n.nspname, c.relname INTO v_rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_sub.source;
        IF p_sub.columns IS NOT NULL THEN
            SELECT coalesce(array_agg(a.attname::text), '{}') INTO v_excluded
            FROM pg_attribute a
            WHERE a.attrelid = p_sub.source AND a.attnum > 0 AND NOT a.attisdropped AND a.attname::text <> ALL (p_sub.columns);
        ELSE
            v_excluded := '{}';
        END IF;
        -- Custom fields go only to the integrations they are exported to.
        v_excluded := v_excluded || ihub._custom_fields_hidden(p_sub.source, v_integration.name);
        -- Endpoints with limits, an open circuit or a 429 pause get their
        -- deliveries queued, for the claim to take within its rules.
        v_claim := p_owner IS NOT NULL AND v_endpoint.enabled AND v_integration.state <> 'inactive'
                   AND v_endpoint.rate_limit IS NULL AND v_endpoint.max_in_flight IS NULL AND v_endpoint.ordering IS NULL
                   AND NOT EXISTS (SELECT 1 FROM ihub.endpoint_state c WHERE c.endpoint_id = v_endpoint.id
                                   AND (c.state <> 'closed' OR c.paused_until > now()));
        PERFORM set_config(v_position, (SELECT max((t::text::point)[0])::bigint::text FROM unnest(v_taken) t), false);
    END IF;
    -- A timed subscription's changes become timers (sql/timers.sql), not deliveries.
    IF cardinality(v_taken) > 0 AND p_sub.timer_offset IS NOT NULL THEN
        v_routed := cardinality(v_taken);
        PERFORM ihub._route_timers(p_sub, v_taken);
    ELSIF cardinality(v_taken) > 0 THEN

        v_lease := ihub._lease_until(coalesce(v_endpoint.timeout_ms, p_default_timeout_ms), p_rounds);
        -- The operations whose event type the endpoint accepts.
        v_ops := ARRAY(SELECT o FROM unnest('{i,u,d,t}'::text[]) o
                       WHERE ihub._type_accepted(v_endpoint.event_types,
                                                 coalesce(p_sub.event_type, v_rel.relname || '.' || CASE o WHEN 'i' THEN 'insert'
                                                          WHEN 'u' THEN 'update' WHEN 't' THEN 'truncate' ELSE 'delete' END)));
        IF v_prepared THEN
            RETURN QUERY EXECUTE format('EXECUTE %I(%L, %s, %s, %L, %L, %L, %L, %L, %L, %L, %L, %L, %L, %L, %L)', v_name || 'render',
                                        v_taken, v_endpoint.id, p_sub.id, v_rel.nspname, v_rel.relname,
                                        v_integration.tenant, p_sub.test_mode, v_claim, p_owner, v_lease, v_excluded,
                                        v_ops, p_sub.event_type, v_endpoint.ordering, v_key_columns);
        ELSE
            RETURN QUERY EXECUTE ihub._route_sql(p_sub.id, 'render')
            USING v_taken, v_endpoint.id, p_sub.id, v_rel.nspname::text, v_rel.relname::text,
                  v_integration.tenant, p_sub.test_mode, v_claim, p_owner, v_lease, v_excluded,
                  v_ops, p_sub.event_type, v_endpoint.ordering, v_key_columns;
        END IF;
        GET DIAGNOSTICS v_routed = ROW_COUNT;
    END IF;

    -- The capture table is a queue: routed rows are deleted, and rows of
    -- rolled-back writes are dead too. Until vacuum runs, every route scans
    -- them (14 ms for 1M dead rows). Once drained and large, truncate it, but
    -- only if no writer holds it right now (NOWAIT), and only if still empty
    -- under the lock.
    IF v_routed < v_limit AND pg_relation_size(v_capture::regclass) > 8 * 1024 * 1024 THEN
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
COMMENT ON FUNCTION ihub._route(ihub.subscription, integer, integer, integer, integer) IS
    'Internal: turns captured row changes into deliveries with JSON payloads, claiming them for the calling worker.';
COMMENT ON FUNCTION ihub._route_sql(bigint, text) IS
    'Internal: the text of one of the statements that route a subscription''s captured changes (take, wrap, render).';
COMMENT ON FUNCTION ihub._route_prepare(bigint) IS
    'Internal: prepares a subscription''s route statements in a dispatcher''s session, once; false past 300 statements.';
COMMENT ON FUNCTION ihub._route_forget() IS
    'Internal (dispatcher): drops the session''s prepared route statements, in a transaction of its own.';

DROP FUNCTION ihub._claim(integer, integer, integer, integer);
CREATE FUNCTION ihub._claim(p_owner integer, p_limit integer, p_default_timeout_ms integer, p_rounds integer)
RETURNS TABLE (delivery_id bigint, event_id text, method text, url text, headers jsonb, auth jsonb, secrets text[],
               timeout_ms integer, retry jsonb, body text, test_mode boolean, attempts_used integer,
               oauth2_id bigint, oauth2_version integer, not_sendable text, refused_token integer, respond boolean,
               oauth2_refusing boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    -- The claimed deliveries as routed or updated: the requests are made
    -- from these rows, without looking them up again.
    v_claimed ihub.delivery[] := '{}';
    v_sub ihub.subscription;
BEGIN
    -- Each subscription in a subtransaction of its own: one whose table or
    -- capture table is broken is marked and skipped, and the others go on.
    -- A broken one is tried again every 10 seconds (one failed route, no
    -- log entry), and unmarked when it works.
    FOR v_sub IN SELECT * FROM ihub.subscription
                 WHERE broken_at IS NULL OR broken_at < now() - interval '10 seconds' ORDER BY id LOOP
        EXIT WHEN cardinality(v_claimed) >= p_limit;
        BEGIN
            -- Routed for an endpoint that is disabled (or an integration
            -- that is inactive), deliveries stay pending: not sent.
            v_claimed := v_claimed || ARRAY(SELECT r FROM ihub._route(v_sub, p_limit - cardinality(v_claimed), p_owner,
                                                                      p_default_timeout_ms, p_rounds) r
                                            WHERE r.state = 'running');
            IF v_sub.broken_at IS NOT NULL THEN
                UPDATE ihub.subscription SET broken_at = NULL, broken_reason = NULL
                WHERE id = v_sub.id AND broken_at IS NOT NULL;
                IF FOUND THEN
                    PERFORM ihub.log('info', format('subscription %s works again', v_sub.id),
                                     jsonb_build_object('subscription', v_sub.id));
                END IF;
            END IF;
        EXCEPTION
            WHEN lock_not_available OR deadlock_detected OR serialization_failure THEN
                NULL; -- busy (DDL or an unsubscribe holds it): the next round
            WHEN OTHERS THEN
                -- Errors about this subscription's objects or data (names,
                -- types, privileges, values) mark it; anything else (out of
                -- disk, shutdown) fails the round, as before.
                IF left(SQLSTATE, 2) NOT IN ('42', '22', '23', '0A') THEN
                    RAISE;
                END IF;
                PERFORM ihub._subscription_broken(v_sub, SQLERRM);
        END;
    END LOOP;
    -- Open circuits get nothing but, once their cooldown is over, a probe.
    IF cardinality(v_claimed) < p_limit AND EXISTS (SELECT 1 FROM ihub.endpoint_state c WHERE c.state <> 'closed') THEN
        v_claimed := v_claimed || ARRAY(SELECT p FROM ihub._circuit_probes(p_owner, p_default_timeout_ms, p_rounds) p);
    END IF;
    -- Due timers of timed subscriptions become deliveries, claimed below.
    IF EXISTS (SELECT 1 FROM ihub.timer t WHERE t.fired_at IS NULL AND t.due_at <= now()) THEN
        BEGIN
            PERFORM ihub._fire_timers(p_limit);
        EXCEPTION WHEN OTHERS THEN
            -- The timers wait; the round goes on.
            RAISE WARNING 'pg_ihub: firing timers failed: %', SQLERRM;
        END;
    END IF;
    -- Endpoints with limits or an order, endpoint by endpoint.
    IF current_setting('ihub_claim.in_flight_held', true) <> '' THEN
        PERFORM set_config('ihub_claim.in_flight_held', '', false);
    END IF;
    IF cardinality(v_claimed) < p_limit
       AND EXISTS (SELECT 1 FROM ihub.endpoint e
                   WHERE e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL OR e.ordering IS NOT NULL) THEN
        v_claimed := v_claimed || ARRAY(SELECT l FROM ihub._claim_limited(p_owner, p_limit - cardinality(v_claimed),
                                                                          p_default_timeout_ms, p_rounds) l);
    END IF;
    IF cardinality(v_claimed) < p_limit THEN
        WITH due AS (
            SELECT d.id FROM ihub.delivery d
            WHERE d.state IN ('pending', 'retry') AND d.run_at <= now()
              AND d.endpoint_id IN (SELECT e.id FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                                    WHERE e.enabled AND i.state <> 'inactive'
                                      AND e.rate_limit IS NULL AND e.max_in_flight IS NULL AND e.ordering IS NULL
                                      AND NOT EXISTS (SELECT 1 FROM ihub.endpoint_state c WHERE c.endpoint_id = e.id
                                                      AND (c.state <> 'closed' OR c.paused_until > now())))
            ORDER BY d.run_at
            LIMIT p_limit - cardinality(v_claimed)
            FOR UPDATE OF d SKIP LOCKED
        ), claimed AS (
            UPDATE ihub.delivery d
            SET state = 'running', worker_pid = p_owner,
                lease_until = ihub._lease_until(coalesce(e.timeout_ms, p_default_timeout_ms), p_rounds)
            FROM due, ihub.endpoint e
            WHERE d.id = due.id AND e.id = d.endpoint_id
            RETURNING d
        )
        SELECT v_claimed || coalesce(array_agg(claimed.d), '{}') INTO v_claimed FROM claimed;
    END IF;
    -- Requests whose responses go to a handler carry their whole body (up
    -- to ihub.max_response_size) into the settle: a batch holds 32 MB of
    -- them at most, and the rest go back to the queue, due, for the next
    -- round, however they were claimed (limited endpoints too).
    -- (Subscriptions' deliveries never have a handler.)
    IF EXISTS (SELECT 1 FROM unnest(v_claimed) c WHERE c.on_response IS NOT NULL) THEN
        WITH extra AS (
            SELECT c.id FROM unnest(v_claimed) c WHERE c.on_response IS NOT NULL
            ORDER BY c.run_at, c.id
            OFFSET greatest(1, 33554432 / pg_size_bytes(current_setting('ihub.max_response_size')))
        ), released AS (
            UPDATE ihub.delivery d
            SET state = CASE WHEN d.attempts > 0 THEN 'retry' ELSE 'pending' END, worker_pid = NULL, lease_until = NULL
            FROM extra WHERE d.id = extra.id
            RETURNING d.id
        )
        SELECT ARRAY(SELECT c FROM unnest(v_claimed) c WHERE c.id NOT IN (SELECT id FROM released)) INTO v_claimed;
    END IF;
    RETURN QUERY
        -- The secrets of the batch's endpoints, gathered once. Gathered by a
        -- semi-join with the batch, they were gathered again for every
        -- request: 7.8 ms instead of 0.45 for a batch of 500 once another
        -- endpoint had a secret (make bench, retry storm after the outbound
        -- part).
        WITH keys AS MATERIALIZED (
            SELECT s.endpoint_id, array_agg(s.secret ORDER BY s.id DESC) AS secrets
            FROM ihub.endpoint_secret s
            WHERE s.endpoint_id = ANY (ARRAY(SELECT DISTINCT c.endpoint_id FROM unnest(v_claimed) c))
              AND (s.expires_at IS NULL OR s.expires_at > now())
            GROUP BY s.endpoint_id
        )
        SELECT d.id, d.event_id, coalesce(d.method, e.method), ihub._join_url(e.url, d.path),
               e.headers || coalesce(d.headers, '{}'),
               -- An OAuth2 credential's current access token, as a bearer token.
               CASE WHEN o.id IS NULL THEN c.auth
                    WHEN o.access_token IS NOT NULL AND (o.expires_at IS NULL OR o.expires_at > now())
                    THEN jsonb_build_object('type', 'bearer', 'token', o.access_token)
                    ELSE '{"type": "none"}' END,
               k.secrets, coalesce(e.timeout_ms, p_default_timeout_ms), e.retry, d.payload::text, d.test_mode,
               d.attempts - d.budget_start, o.id, o.token_version,
               CASE WHEN o.id IS NOT NULL AND (o.access_token IS NULL OR o.expires_at <= now())
                    THEN format('OAuth2 credential %s has no valid access token (%s)', o.name,
                                coalesce(o.last_error, CASE WHEN o.access_token IS NULL THEN 'none issued yet' ELSE 'it expired' END))
                    WHEN o.id IS NOT NULL AND d.refused_token = o.token_version
                    THEN format('OAuth2 credential %s has no new access token yet (the receiver refused the last one)', o.name)
               END,
               d.refused_token, d.on_response IS NOT NULL, o.refused_at > now() - interval '10 minutes'
        FROM unnest(v_claimed) d
        JOIN ihub.endpoint e ON e.id = d.endpoint_id
        LEFT JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
        LEFT JOIN LATERAL (
            SELECT o.id, o.name, o.token_version, o.expires_at, o.last_error, o.refused_at, s.access_token
            FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id
            WHERE c.auth ->> 'type' = 'oauth2' AND o.integration_id = e.integration_id AND o.name = c.auth ->> 'credential'
        ) o ON true
        LEFT JOIN keys k ON k.endpoint_id = e.id;
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

    SELECT string_agg(format('%s (%s)', id, broken_reason), '; ' ORDER BY id) INTO v_names
    FROM ihub.subscription WHERE broken_at IS NOT NULL;
    check_name := 'subscriptions';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'critical' END;
    message := coalesce('broken: ' || v_names, 'all capturing');
    RETURN NEXT;

    -- Endpoints sent nothing: disabled, an open circuit, paused by a 429,
    -- or keys of an ordered one held.
    SELECT nullif(concat_ws('; ',
               'disabled: ' || (SELECT string_agg(e.name, ', ' ORDER BY e.name) FROM ihub.endpoint e WHERE NOT e.enabled),
               'circuit open: ' || (SELECT string_agg(e.name, ', ' ORDER BY e.name)
                                    FROM ihub.endpoint e JOIN ihub.endpoint_state c ON c.endpoint_id = e.id
                                    WHERE e.enabled AND c.state <> 'closed'),
               'paused by a 429: ' || (SELECT string_agg(e.name, ', ' ORDER BY e.name)
                                       FROM ihub.endpoint e JOIN ihub.endpoint_state c ON c.endpoint_id = e.id
                                       WHERE e.enabled AND c.paused_until > now()),
               -- Ordered endpoints whose keys a failed or dead delivery holds.
               'keys held by failed or dead deliveries: ' || (
                   SELECT string_agg(format('%s (%s)', e.name, e.blocked_keys), ', ' ORDER BY e.name)
                   FROM ihub.endpoints e WHERE e.blocked_keys > 0)), '')
    INTO v_names;
    check_name := 'endpoints';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'warning' END;
    message := coalesce(v_names, 'all enabled, no circuit open');
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

    -- OAuth2 access tokens: expired or missing while asking for a new one
    -- fails is critical; failing while the token still works, or waiting
    -- for a person to authorize, a warning.
    SELECT string_agg(format('%s/%s (%s)', i.name, o.name,
                             CASE WHEN o.failures > 0 THEN 'could not be refreshed: ' || coalesce(o.last_error, '?')
                                  WHEN s.access_token IS NULL THEN 'not authorized yet'
                                  ELSE 'expired' END), '; ' ORDER BY i.name, o.name),
           max(CASE WHEN o.failures > 0 AND (s.access_token IS NULL OR o.expires_at <= now()) THEN 2
                    WHEN o.expires_at <= now() AND o.refresh_at IS NULL THEN 2
                    ELSE 1 END)
    INTO v_names, v_alive
    FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id JOIN ihub.integration i ON i.id = o.integration_id
    WHERE o.failures > 0 OR (s.access_token IS NULL AND o.refresh_at IS NULL) OR o.expires_at <= now() - interval '1 minute';
    check_name := 'oauth2';
    status := CASE WHEN v_names IS NULL THEN 'ok' WHEN v_alive = 2 THEN 'critical' ELSE 'warning' END;
    message := coalesce(v_names, 'every OAuth2 access token is valid or being renewed');
    RETURN NEXT;
END
$$;

CREATE OR REPLACE VIEW ihub.subscriptions AS
SELECT s.id, i.name AS integration, e.name AS endpoint, s.source, s.events, s.columns, s.watch, s.condition,
       s.test_mode, (i.state <> 'inactive') AS capturing, s.created_by, s.created_at,
       s.broken_reason AS broken, s.broken_at
FROM ihub.subscription s
JOIN ihub.endpoint e ON e.id = s.endpoint_id
JOIN ihub.integration i ON i.id = e.integration_id;
CREATE EVENT TRIGGER ihub_ddl_start ON ddl_command_start WHEN TAG IN ('DROP TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION ihub._on_ddl_start();
CREATE EVENT TRIGGER ihub_sql_drop ON sql_drop
    EXECUTE FUNCTION ihub._on_sql_drop();
CREATE EVENT TRIGGER ihub_ddl_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
    EXECUTE FUNCTION ihub._on_ddl_end();

COMMENT ON FUNCTION ihub._lock_subscription(ihub.subscription, text) IS
    'Internal: locks a subscription''s table, capture table and row, in that order; returns the row, or NULL once ended.';
COMMENT ON FUNCTION ihub._end_subscription(ihub.subscription) IS
    'Internal: ends a subscription after routing what it captured; returns how many changes were queued.';
COMMENT ON FUNCTION ihub._subscriptions_dropping(oid[]) IS
    'Internal: before DROP TABLE, ends the subscriptions of the tables dropped, delivering what they captured.';
COMMENT ON FUNCTION ihub._create_capture_table(ihub.subscription) IS
    'Internal: makes a subscription''s capture table, of its table''s current row type.';
COMMENT ON FUNCTION ihub._capture_before_alter(oid) IS
    'Internal: before ALTER TABLE adds a column or changes a type, delivers what was captured and removes the capture tables.';
COMMENT ON FUNCTION ihub._on_ddl_end() IS
    'Internal: event trigger function; after ALTER TABLE, makes again the capture tables of the new row type; keeps capture triggers on the partitions of subscribed tables.';
COMMENT ON FUNCTION ihub._subscription_broken(ihub.subscription, text) IS
    'Internal: marks a subscription broken (a critical log entry the first time).';
COMMENT ON FUNCTION ihub._on_sql_drop() IS
    'Internal: event trigger function; marks broken the subscriptions of tables dropped other than by DROP TABLE.';
COMMENT ON FUNCTION ihub._on_ddl_start() IS
    'Internal: event trigger function; DROP TABLE of a subscribed table ends its subscriptions first, and ALTER TABLE adding a column or changing a type empties the capture tables first.';
COMMENT ON EVENT TRIGGER ihub_ddl_start IS
    'pg_ihub: before DROP TABLE, delivers and ends the subscriptions of the table; before ALTER TABLE adding a column or changing a type, delivers what was captured.';
COMMENT ON EVENT TRIGGER ihub_ddl_end IS
    'pg_ihub: after ALTER TABLE, makes the capture tables again with the new row type; after CREATE or ALTER TABLE, puts capture triggers on new partitions of subscribed tables and removes them from detached ones.';
COMMENT ON FUNCTION ihub._capture_relations(oid) IS
    'Internal: the tables whose writes a subscription on this table captures: the table and, when partitioned, its partitions.';
COMMENT ON FUNCTION ihub._capture_triggers(ihub.subscription) IS
    'Internal: a subscription''s capture triggers and the tables they are on.';
COMMENT ON FUNCTION ihub._create_capture_triggers(ihub.subscription, oid) IS
    'Internal: makes the capture triggers of a subscription that a table of it lacks.';
COMMENT ON FUNCTION ihub._capture_truncate() IS
    'Internal: TRUNCATE capture trigger of subscriptions with the event truncate; records one truncate event per statement.';
COMMENT ON FUNCTION ihub._sync_partition_triggers() IS
    'Internal: puts capture triggers on new partitions of subscribed tables and removes them from detached ones.';
COMMENT ON FUNCTION ihub.subscribe(regclass, text, text[], text[], text[], text, boolean) IS
    'Subscribes an endpoint to row changes of a table (and of all its partitions): events (insert, update, delete, truncate), payload columns, watched columns (updates fire only when one changed), a condition over new and old, and test mode. Returns the subscription id.';
COMMENT ON FUNCTION ihub._drop_capture() IS
    'Internal: drops every capture trigger and capture table, so that DROP EXTENSION pg_ihub needs no CASCADE.';
-- Subscriptions on partitioned tables made before 0.3.0 capture their partitions' writes from now on.
SELECT ihub._sync_partition_triggers();
COMMENT ON VIEW ihub.subscriptions IS 'Row-change subscriptions, whether they are capturing, and why one is broken.';

-------------------------------------------------------------------------------
-- Jobs and inbound items whose function is gone; rescue and cancel
-------------------------------------------------------------------------------

-- The job's function and the source's handler as named when queued or
-- created: once dropped, the error of a job or item names them.
ALTER TABLE ihub.job ADD COLUMN fn_name text;
COMMENT ON COLUMN ihub.job.fn_name IS
    'The job''s function as it was named when queued: the error of a job whose function was dropped names it.';
UPDATE ihub.job j SET fn_name = j.fn::text
WHERE j.state <> 'done' AND EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.oid = j.fn);
ALTER TABLE ihub.inbound_source ADD COLUMN handler_name text;
COMMENT ON COLUMN ihub.inbound_source.handler_name IS
    'The handler as it was named when the source was created: the error of an item whose handler was dropped names it.';
UPDATE ihub.inbound_source s SET handler_name = s.handler::text
WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.oid = s.handler);

CREATE OR REPLACE FUNCTION ihub._enqueue(p_fn regprocedure, p_args jsonb, p_priority integer, p_run_at timestamptz,
                              p_max_attempts integer, p_identity_key text, p_integration_id bigint,
                              p_retry_schedule interval[], p_timeout interval, p_run_as regrole,
                              p_schedule_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    FOR attempt IN 1..10 LOOP
        INSERT INTO ihub.job (fn, args, priority, run_at, max_attempts, identity_key, integration_id,
                              retry_schedule, timeout, run_as, schedule_id, fn_name)
        VALUES (p_fn, p_args, p_priority, p_run_at, p_max_attempts, p_identity_key, p_integration_id,
                p_retry_schedule, p_timeout, p_run_as, p_schedule_id, p_fn::text)
        ON CONFLICT (identity_key) WHERE identity_key IS NOT NULL AND state IN ('pending', 'running', 'retry')
        DO NOTHING
        RETURNING id INTO v_id;
        IF v_id IS NOT NULL THEN
            PERFORM ihub._wake_job_worker();
            RETURN v_id;
        END IF;
        SELECT id INTO v_id FROM ihub.job
        WHERE identity_key = p_identity_key AND state IN ('pending', 'running', 'retry');
        IF v_id IS NOT NULL THEN
            RETURN v_id;
        END IF;
        -- The job holding the key finished in between; try again.
    END LOOP;
    RAISE EXCEPTION 'could not queue a job with identity key %', p_identity_key
        USING ERRCODE = 'serialization_failure', HINT = 'Jobs with this key keep starting and finishing; try again.';
END
$$;

CREATE OR REPLACE FUNCTION ihub._create_source_by(
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
                                     tolerance, dedup_window, run_as, handler_name)
    VALUES (v_integration, _create_source_by.name, handler, verify, lower(header), lower(id_header), ordering_key,
            tolerance, dedup_window, p_caller, handler::text)
    RETURNING id INTO v_id;
    IF secret IS NOT NULL THEN
        INSERT INTO ihub.inbound_secret (source_id, secret) VALUES (v_id, secret);
    END IF;
    RETURN v_id;
END
$$;

-- Claims the most urgent due jobs for a worker, up to p_limit, and returns
-- how to call them, most urgent first. A worker runs them in one transaction
-- (one commit for the batch), so a batch holds the jobs of one role only:
-- those of the most urgent job's role among the next p_limit + 1 due. The
-- one more is locked so that the worker learns whether more are due (and
-- wakes a peer) without a second scan; what is not claimed is released at
-- commit. (PL/pgSQL rather than SQL: its plans are cached for the worker's
-- session.)
CREATE FUNCTION ihub._claim_jobs(p_owner integer, p_default_timeout_ms integer, p_limit integer, p_workers integer)
RETURNS TABLE (id bigint, call text, args jsonb, run_as oid, timeout_ms integer, more_due boolean, integration text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    v_head record;
    v_found boolean;
    v_gone bigint[] := '{}';
    v_gone_fns text[] := '{}';
    v_limit integer := greatest(p_limit, 1);
    v_workers integer := greatest(p_workers, 1);
BEGIN
    LOOP
        SELECT j.id, j.priority, j.run_at, j.run_as INTO v_head FROM ihub.job j
        WHERE j.state IN ('pending', 'retry') AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        v_found := false;
        FOR v IN
            WITH next AS (
                SELECT j.id, j.run_as, j.priority FROM ihub.job j
                WHERE j.state IN ('pending', 'retry') AND j.run_at <= now()
                  AND (j.priority, j.run_at, j.id) >= (v_head.priority, v_head.run_at, v_head.id)
                ORDER BY j.priority, j.run_at, j.id
                LIMIT v_limit * v_workers + 1
            ), picked AS (
                SELECT j.id, j.priority, j.run_at FROM ihub.job j
                WHERE j.id IN (SELECT next.id FROM next
                               WHERE next.run_as = v_head.run_as AND next.priority = v_head.priority)
                  AND j.state IN ('pending', 'retry') AND j.run_at <= now()
                ORDER BY j.priority, j.run_at, j.id
                LIMIT (SELECT least(v_limit, greatest(1, count(*)::integer / v_workers)) FROM next)
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE ihub.job j
                SET state = 'running', worker_pid = p_owner, started_at = clock_timestamp(), finished_at = NULL,
                    attempts = j.attempts + 1, cancel_requested = false, errors_logged = 0,
                    progress_done = NULL, progress_total = NULL
                FROM picked WHERE j.id = picked.id
                RETURNING j.id, j.fn, j.fn_name, j.args, j.run_as, j.timeout, j.priority, j.run_at, j.integration_id
            )
            SELECT c.id, c.fn, c.fn_name, c.args, c.run_as, c.timeout, p.prorettype, p.proname, n.nspname,
                   p.proargtypes[0] = 'ihub.http_response'::regtype AS takes_response,
                   (SELECT count(*) FROM next) > (SELECT count(*) FROM picked) AS more,
                   (SELECT i.name FROM ihub.integration i WHERE i.id = c.integration_id) AS integration
            FROM claimed c
            LEFT JOIN pg_proc p ON p.oid = c.fn
            LEFT JOIN pg_namespace n ON n.oid = p.pronamespace
            ORDER BY c.priority, c.run_at, c.id
        LOOP
            IF v.proname IS NULL THEN
                v_gone := v_gone || v.id;
                v_gone_fns := v_gone_fns || coalesce(v.fn_name, v.fn::text);
                CONTINUE;
            END IF;
            v_found := true;
            id := v.id;
            call := format(CASE WHEN v.prorettype = 'void'::regtype
                                -- Qualified: the statement is parsed with the role's search_path.
                                THEN 'SELECT NULL::pg_catalog.jsonb FROM %I.%I(%s) AS f'
                                ELSE 'SELECT pg_catalog.to_jsonb(%I.%I(%s))' END,
                           v.nspname, v.proname,
                           -- A response handler's job carries its response as jsonb.
                           CASE WHEN v.takes_response
                                THEN 'pg_catalog.jsonb_populate_record(NULL::ihub.http_response, $1)' ELSE '$1' END);
            args := v.args;
            run_as := v.run_as::oid;
            timeout_ms := coalesce((extract(epoch FROM v.timeout) * 1000)::integer, p_default_timeout_ms);
            more_due := v.more;
            -- Its writes are not sent back to its integration (loop prevention).
            integration := v.integration;
            RETURN NEXT;
        END LOOP;
        -- Their function was dropped after they were queued: no attempt can
        -- call it. They fail now (which frees their identity keys), and the
        -- claim goes on to the next jobs if it found none it can run.
        FOR i IN 1 .. cardinality(v_gone) LOOP
            PERFORM ihub._job_failed(v_gone[i], p_owner,
                                     format('its function %s no longer exists: it was dropped after the job was queued',
                                            v_gone_fns[i]),
                                     'failed', NULL);
        END LOOP;
        EXIT WHEN v_found OR cardinality(v_gone) = 0;
        v_gone := '{}';
        v_gone_fns := '{}';
    END LOOP;
END
$$;

-- Now a batch of one (job workers claim batches).
CREATE OR REPLACE FUNCTION ihub._claim_job(p_owner integer, p_default_timeout_ms integer)
RETURNS TABLE (id bigint, call text, args jsonb, run_as oid, timeout_ms integer, more_due boolean)
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ SELECT c.id, c.call, c.args, c.run_as, c.timeout_ms, c.more_due FROM ihub._claim_jobs(p_owner, p_default_timeout_ms, 1, 1) c $$;

-- Gives claimed jobs that a worker did not start back to the queue, as
-- they were (their attempt uncounted), for any worker to take: those left
-- in a batch whose time ran out.
CREATE FUNCTION ihub._unclaim_jobs(p_ids bigint[], p_owner integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE ihub.job j
    SET state = CASE WHEN j.attempts - 1 > j.budget_start THEN 'retry' ELSE 'pending' END,
        attempts = j.attempts - 1, worker_pid = NULL, started_at = NULL
    WHERE j.id = ANY (p_ids) AND j.state = 'running' AND j.worker_pid = p_owner;
    GET DIAGNOSTICS v = ROW_COUNT;
    IF v > 0 THEN
        PERFORM ihub._wake_job_worker();
    END IF;
    RETURN v;
END
$$;

-- Claims the next items due for a processor, up to p_limit, in order of
-- execution time, and returns how to call their handlers. An item with an
-- ordering key waits while an earlier item with its key is pending or
-- running, so a claim takes at most the first of a key. A processor runs
-- the items in one transaction (one commit for them all), so they are the
-- items of one role only: that of the first item's handler, among the
-- p_limit + 1 due items from it on (the one more tells whether more are
-- due). Only what is claimed is locked.
CREATE FUNCTION ihub._claim_inbound_items(p_owner integer, p_default_timeout_ms integer, p_limit integer, p_workers integer)
RETURNS TABLE (id bigint, call text, run_as oid, timeout_ms integer, more_due boolean, integration text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    v_head record;
    v_found boolean;
    v_gone bigint[] := '{}';
    v_gone_handlers text[] := '{}';
    v_limit integer := greatest(p_limit, 1);
    v_workers integer := greatest(p_workers, 1);
BEGIN
    LOOP
        SELECT t.id, t.run_at, s.run_as INTO v_head
        FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
        WHERE t.state = 'pending' AND t.run_at <= now()
          AND (t.ordering_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM ihub.inbound_item e
                WHERE e.source_id = t.source_id AND e.ordering_key = t.ordering_key
                  AND e.state IN ('pending', 'running') AND e.id < t.id))
        ORDER BY t.run_at, t.id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        v_found := false;
        FOR v IN
            WITH next AS (
                SELECT t.id, s.run_as FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
                WHERE t.state = 'pending' AND t.run_at <= now()
                  AND (t.run_at, t.id) >= (v_head.run_at, v_head.id)
                  AND (t.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM ihub.inbound_item e
                        WHERE e.source_id = t.source_id AND e.ordering_key = t.ordering_key
                          AND e.state IN ('pending', 'running') AND e.id < t.id))
                ORDER BY t.run_at, t.id
                LIMIT v_limit * v_workers + 1
            ), picked AS (
                SELECT t.id, t.run_at FROM ihub.inbound_item t
                WHERE t.id IN (SELECT next.id FROM next WHERE next.run_as = v_head.run_as)
                  AND t.state = 'pending' AND t.run_at <= now()
                ORDER BY t.run_at, t.id
                LIMIT (SELECT least(v_limit, greatest(1, count(*)::integer / v_workers)) FROM next)
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE ihub.inbound_item t
                SET state = 'running', worker_pid = p_owner, started_at = clock_timestamp(), attempts = t.attempts + 1
                FROM picked WHERE t.id = picked.id
                RETURNING t.id, t.source_id, t.run_at
            )
            SELECT c.id, ihub._handler_call(s.handler) AS call, s.run_as,
                   (SELECT i.name FROM ihub.integration i WHERE i.id = s.integration_id) AS integration,
                   coalesce(s.handler_name, s.handler::text) AS handler_name,
                   (SELECT count(*) FROM next) > (SELECT count(*) FROM picked) AS more
            FROM claimed c
            JOIN ihub.inbound_source s ON s.id = c.source_id
            ORDER BY c.run_at, c.id
        LOOP
            IF v.call IS NULL THEN
                v_gone := v_gone || v.id;
                v_gone_handlers := v_gone_handlers || v.handler_name;
                CONTINUE;
            END IF;
            v_found := true;
            id := v.id; call := v.call; run_as := v.run_as::oid; timeout_ms := p_default_timeout_ms; more_due := v.more;
            -- Its writes are not sent back to its integration (loop prevention).
            integration := v.integration;
            RETURN NEXT;
        END LOOP;
        -- Their source's handler was dropped: no call can handle them. They
        -- are archived as failed now (so that they hold their ordering keys
        -- no longer), and the claim goes on if it found nothing it can run.
        FOR i IN 1 .. cardinality(v_gone) LOOP
            PERFORM ihub._inbound_failed(v_gone[i], p_owner,
                                         format('its handler %s no longer exists: it was dropped after the source was created',
                                                v_gone_handlers[i]));
        END LOOP;
        EXIT WHEN v_found OR cardinality(v_gone) = 0;
        v_gone := '{}';
        v_gone_handlers := '{}';
    END LOOP;
END
$$;

-- Claims the next item due (a batch of one).
-- The integration of an item's source (ihub.process_inbound marks the
-- handler's writes as that integration's sync).
CREATE FUNCTION ihub._inbound_integration(p_item bigint) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT i.name FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
    JOIN ihub.integration i ON i.id = s.integration_id WHERE t.id = p_item
$$;

CREATE OR REPLACE FUNCTION ihub._claim_inbound(p_owner integer, p_default_timeout_ms integer)
RETURNS TABLE (id bigint, call text, run_as oid, timeout_ms integer, more_due boolean)
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ SELECT c.id, c.call, c.run_as, c.timeout_ms, c.more_due FROM ihub._claim_inbound_items(p_owner, p_default_timeout_ms, 1, 1) c $$;

-- Gives claimed items that a processor did not start back to the queue, as
-- they were, for any processor to take: those left in a batch whose time
-- ran out.
CREATE FUNCTION ihub._unclaim_inbound_items(p_ids bigint[], p_owner integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE ihub.inbound_item t
    SET state = 'pending', attempts = t.attempts - 1, worker_pid = NULL, started_at = NULL
    WHERE t.id = ANY (p_ids) AND t.state = 'running' AND t.worker_pid = p_owner;
    GET DIAGNOSTICS v = ROW_COUNT;
    IF v > 0 THEN
        PERFORM ihub._wake_processor();
    END IF;
    RETURN v;
END
$$;

-- _job_done checks the state and the owner, as _job_failed does.
DROP FUNCTION ihub._job_done(bigint, jsonb, integer, bigint, bigint);
CREATE FUNCTION ihub._job_done(p_id bigint, p_owner integer, p_result jsonb, p_errors integer, p_done bigint, p_total bigint)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.job
    SET state = CASE WHEN p_errors > 0 THEN 'partial' ELSE 'done' END,
        finished_at = clock_timestamp(), worker_pid = NULL, result = p_result, errors_logged = p_errors,
        last_error = CASE WHEN p_errors > 0 THEN format('%s error(s) logged during the run', p_errors) END,
        progress_done = coalesce(p_done, progress_done), progress_total = coalesce(p_total, progress_total)
    WHERE id = p_id AND state = 'running' AND worker_pid = p_owner;
    IF NOT FOUND THEN
        -- Not this worker's job any more: what its run did must not commit.
        RAISE EXCEPTION 'job % is not running in this worker', p_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only the worker that claimed a job records it as done; the run is rolled back.';
    END IF;
END
$$;

-- The rescue cancels the jobs whose cancel could not reach their gone
-- worker, and reports only what it did itself.
CREATE FUNCTION ihub._rescue_stuck_jobs()
RETURNS TABLE (job_id bigint, function text, worker_pid integer, state text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    FOR v IN
        UPDATE ihub.job j
        SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'retry' END,
            run_at = CASE WHEN j.cancel_requested THEN j.run_at ELSE now() END,
            finished_at = CASE WHEN j.cancel_requested THEN clock_timestamp() END,
            worker_pid = NULL,
            last_error = CASE WHEN j.cancel_requested
                              THEN format('cancelled; its worker (pid %s) had stopped during the job', j.worker_pid)
                              ELSE format('its worker (pid %s) stopped during the job; queued again', j.worker_pid) END
        FROM (SELECT s.id, s.worker_pid FROM ihub.job s
              WHERE s.state = 'running' AND NOT ihub._pid_alive(s.worker_pid)) gone
        WHERE j.id = gone.id AND j.state = 'running' AND NOT ihub._pid_alive(j.worker_pid)
        RETURNING j.id, j.fn, j.state, j.last_error, j.integration_id, gone.worker_pid AS pid
    LOOP
        job_id := v.id; function := v.fn::text; worker_pid := v.pid; state := v.state;
        RETURN NEXT;
        PERFORM ihub.log('warning',
                         format('stuck job %s (%s) %s: %s', v.id, v.fn,
                                CASE WHEN v.state = 'cancelled' THEN 'cancelled' ELSE 'resumed' END, v.last_error),
                         jsonb_build_object('job', v.id),
                         (SELECT i.name FROM ihub.integration i WHERE i.id = v.integration_id));
        IF v.state = 'retry' THEN
            PERFORM ihub._wake_job_worker();
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION ihub._rescue_jobs() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT count(*) FROM ihub._rescue_stuck_jobs());
END
$$;

-- Cancel and the timeout check signal only a worker that runs the job.
CREATE OR REPLACE FUNCTION ihub._cancel_job_by(id bigint, p_caller regrole) RETURNS text
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
        -- The attempt is then recorded as cancelled rather than retried, by
        -- its worker, or by the rescue when the worker is gone.
        UPDATE ihub.job j SET cancel_requested = true WHERE j.id = v.id;
        -- The worker's query is cancelled only while the worker reports
        -- running this very job: not while it records the job's outcome
        -- (which the signal would cancel), nor any other job. The row lock
        -- keeps it from finishing this one and moving on meanwhile.
        IF EXISTS (SELECT 1 FROM ihub._workers() w WHERE w.pid = v.worker_pid AND w.job_id = v.id) THEN
            PERFORM pg_cancel_backend(v.worker_pid);
        END IF;
        RETURN 'cancelling';
    END IF;
    RAISE EXCEPTION 'job % is %; only queued or running jobs can be cancelled', v.id, v.state
        USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Use ihub.retry_job to run a finished job again.';
END
$$;

CREATE OR REPLACE FUNCTION ihub.resume_stuck_jobs()
RETURNS TABLE (job_id bigint, function text, worker_pid integer, problem text, action text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    -- What this call rescued: a job another call rescued meanwhile is not
    -- reported twice.
    FOR v IN SELECT r.job_id AS id, r.function AS fn, r.worker_pid AS pid, r.state FROM ihub._rescue_stuck_jobs() r LOOP
        job_id := v.id; function := v.fn; worker_pid := v.pid;
        problem := 'its worker is gone';
        action := CASE WHEN v.state = 'cancelled' THEN 'cancelled, as asked' ELSE 'queued again' END;
        RETURN NEXT;
    END LOOP;
    -- Locked, so that the worker cannot finish the job and move on to
    -- another before the signal; skipped when locked (the worker records it
    -- right now). Signalled only when the worker reports running this very
    -- job, not while it records its outcome.
    FOR v IN
        SELECT j.id, j.fn::text AS fn, j.worker_pid AS pid,
               coalesce(j.timeout, make_interval(secs => ihub._job_timeout_ms() / 1000.0)) AS limit_
        FROM ihub.job j
        WHERE j.state = 'running'
          AND j.started_at + coalesce(j.timeout, make_interval(secs => ihub._job_timeout_ms() / 1000.0)) + interval '5 seconds' < clock_timestamp()
        FOR UPDATE OF j SKIP LOCKED
    LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM ihub._workers() w WHERE w.pid = v.pid AND w.job_id = v.id);
        PERFORM pg_cancel_backend(v.pid);
        job_id := v.id; function := v.fn; worker_pid := v.pid;
        problem := format('running longer than its timeout (%s)', v.limit_); action := 'query cancelled; it will be retried';
        RETURN NEXT;
    END LOOP;
END
$$;

COMMENT ON FUNCTION ihub._claim_jobs(integer, integer, integer, integer) IS
    'Internal (job worker): claims up to p_limit (and its share among p_workers) of the most urgent due jobs of one role, for one transaction; fails the claimed jobs whose function was dropped on the way.';
COMMENT ON FUNCTION ihub._unclaim_jobs(bigint[], integer) IS
    'Internal (job worker): gives claimed jobs it did not start back to the queue, their attempt uncounted.';
COMMENT ON FUNCTION ihub._claim_job(integer, integer) IS
    'Internal: claims the most urgent due job (ihub._claim_jobs with a limit of one).';
COMMENT ON FUNCTION ihub._claim_inbound_items(integer, integer, integer, integer) IS
    'Internal (processor): claims up to p_limit (and its share among p_workers) of the next items due whose handlers run as one role, for one transaction; archives as failed the claimed items whose handler was dropped on the way.';
COMMENT ON FUNCTION ihub._unclaim_inbound_items(bigint[], integer) IS
    'Internal (processor): gives claimed items it did not start back to the queue.';
COMMENT ON FUNCTION ihub._claim_inbound(integer, integer) IS
    'Internal: claims the next item due (ihub._claim_inbound_items with a limit of one).';
COMMENT ON FUNCTION ihub.enqueue(regprocedure, jsonb, integer, timestamptz, integer, text, text, interval[], interval) IS
    'Queues a background job: fn(args jsonb) runs in a job worker, in a subtransaction of its own (jobs of one role share a transaction, see ihub.jobs_per_transaction), as the calling role. Priority 0 runs first. With an identity key, returns the queued or running job that already has it.';
COMMENT ON FUNCTION ihub._job_done(bigint, integer, jsonb, integer, bigint, bigint) IS
    'Internal (job worker): records a finished job (partial when errors were logged); raises unless the worker holds it.';
COMMENT ON FUNCTION ihub._rescue_jobs() IS 'Internal: queues again (or cancels, when asked) the jobs whose worker is gone; returns how many.';
COMMENT ON FUNCTION ihub._rescue_stuck_jobs() IS
    'Internal: queues again (or cancels, when asked) the jobs whose worker is gone; returns each job it rescued and its new state.';
COMMENT ON FUNCTION ihub.resume_stuck_jobs() IS
    'Queues again (or cancels, when asked) the jobs whose worker is gone and stops those running past their timeout; reports what this call did.';
REVOKE ALL ON FUNCTION ihub._job_done(bigint, integer, jsonb, integer, bigint, bigint), ihub._rescue_stuck_jobs() FROM PUBLIC;

-- delete_integration keeps archived failed items, as drop_source does.
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
    -- Archived failures are kept until someone decides about them (README).
    IF EXISTS (SELECT 1 FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
               WHERE s.integration_id = v.id AND t.state = 'failed') THEN
        RAISE EXCEPTION 'integration "%" has failed inbound items', v.name
            USING ERRCODE = 'object_in_use',
                  HINT = 'See them in ihub.inbound_failed; queue them again with ihub.reactivate_inbound, or delete them from ihub.inbound_item yourself.';
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

-- process_inbound of an item whose handler was dropped says so.
CREATE OR REPLACE FUNCTION ihub._inbound_take(p_id bigint, p_caller regrole) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_state text;
    v_source ihub.inbound_source;
    v_call text;
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
    v_call := ihub._handler_call(v_source.handler);
    IF v_call IS NULL THEN
        RAISE EXCEPTION 'the handler % of inbound source % no longer exists', v_source.handler_name, v_source.name
            USING ERRCODE = 'undefined_function',
                  HINT = 'Create the function again, or drop the source and make it anew with ihub.create_source and a handler that exists; the item stays queued.';
    END IF;
    UPDATE ihub.inbound_item t SET state = 'running', worker_pid = pg_backend_pid(), attempts = t.attempts + 1
    WHERE t.id = p_id;
    RETURN v_call;
END
$$;

-------------------------------------------------------------------------------
-- The listener: per-item commits, bounded rejections and connections
-------------------------------------------------------------------------------

-- One request no longer fails the others of its batch: the listener retries
-- a failed batch item by item. Keys over 256 bytes are stored hashed
-- ('sha256:' and 64 hex digits), under the btree row limit.
CREATE OR REPLACE FUNCTION ihub._ordering_key(p_rule text, p_headers jsonb, p_body bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    k text;
BEGIN
    IF p_rule IS NULL THEN
        RETURN NULL;
    END IF;
    k := CASE WHEN p_rule LIKE 'header:%' THEN p_headers ->> lower(substr(p_rule, 8))
              ELSE ihub._try_jsonb(p_body) #>> p_rule::text[] END;
    RETURN CASE WHEN octet_length(k) > 256 THEN 'sha256:' || encode(sha256(convert_to(k, 'UTF8')), 'hex') ELSE k END;
END
$$;
COMMENT ON FUNCTION ihub._ordering_key(text, jsonb, bytea) IS 'Internal: an item''s ordering key (hashed when over 256 bytes).';

-- Queues a batch of verified requests (the listener's group commit).
-- A request whose delivery id (or body hash) was seen by its source within
-- the de-duplication window is not queued again: it gets the first one's id.
-- The listener calls it for every batch; per item it runs two statements
-- where it ran four: the source is looked up once for a run of items of the
-- same source, and the de-duplication entry is claimed first, with the
-- item's id taken from its sequence, instead of being looked up, then
-- inserted after the item (which a concurrent duplicate had to delete).
CREATE OR REPLACE FUNCTION ihub._accept_inbound(p_sources bigint[], p_headers jsonb[], p_bodies bytea[], p_dedup text[],
                                     p_remote text[], p_run_at timestamptz[])
RETURNS TABLE (n integer, item_id bigint, duplicate boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_source ihub.inbound_source;
    v_id bigint;
    v_claimed bigint;
    v_item_ids regclass := pg_get_serial_sequence('ihub.inbound_item', 'id')::regclass;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_sources), 0) LOOP
        IF v_source.id IS DISTINCT FROM p_sources[i] THEN
            SELECT * INTO v_source FROM ihub.inbound_source s WHERE s.id = p_sources[i];
        END IF;
        n := i;
        IF v_source.id IS NULL THEN
            -- Dropped since the listener verified the request: it looks again.
            item_id := NULL;
            duplicate := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_id := nextval(v_item_ids);
        IF p_dedup[i] IS NOT NULL AND v_source.dedup_window > interval '0' THEN
            -- An expired entry is taken over; a live one (or one a concurrent
            -- transaction is inserting, once it commits) makes a duplicate
            -- (no row returned: v_claimed is NULL).
            INSERT INTO ihub.inbound_dedup (source_id, key, item_id, expires_at)
            VALUES (v_source.id, p_dedup[i], v_id, now() + v_source.dedup_window)
            ON CONFLICT (source_id, key) DO UPDATE SET item_id = EXCLUDED.item_id, expires_at = EXCLUDED.expires_at
                WHERE ihub.inbound_dedup.expires_at <= now()
            RETURNING ihub.inbound_dedup.item_id INTO v_claimed;
            IF v_claimed IS NULL THEN
                SELECT d.item_id INTO item_id FROM ihub.inbound_dedup d
                WHERE d.source_id = v_source.id AND d.key = p_dedup[i];
                duplicate := true;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        INSERT INTO ihub.inbound_item (id, source_id, run_at, ordering_key, dedup_key, headers, body, remote_addr)
        OVERRIDING SYSTEM VALUE
        VALUES (v_id, v_source.id, coalesce(p_run_at[i], now()),
                ihub._ordering_key(v_source.ordering_key, p_headers[i], p_bodies[i]),
                p_dedup[i], p_headers[i], p_bodies[i], p_remote[i]);
        item_id := v_id;
        duplicate := false;
        RETURN NEXT;
    END LOOP;
    PERFORM ihub._wake_processor();
END
$$;

-- Failed items are archived and never deleted: a source that has some is not dropped.
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
    -- Failed items are archived and never deleted: the source stays with them.
    IF EXISTS (SELECT 1 FROM ihub.inbound_item WHERE source_id = v.id AND state = 'failed') THEN
        RAISE EXCEPTION 'inbound source % has failed items', drop_source.name
            USING ERRCODE = 'object_in_use',
                  HINT = 'See them in ihub.inbound_failed; queue them again with ihub.reactivate_inbound, or delete them from ihub.inbound_item yourself.';
    END IF;
    DELETE FROM ihub.inbound_dedup WHERE source_id = v.id;
    DELETE FROM ihub.inbound_item WHERE source_id = v.id;
    DELETE FROM ihub.inbound_source WHERE id = v.id;
END
$$;
COMMENT ON FUNCTION ihub.drop_source(text, text) IS
    'Drops an inbound source with nothing queued and no failed items, and its processed items.';

-- Refused requests get a retention of their own (7 days by default).
ALTER TABLE ihub.retention DROP CONSTRAINT retention_kind_check;
ALTER TABLE ihub.retention ADD CONSTRAINT retention_kind_check
    CHECK (kind IN ('debug', 'info', 'warning', 'error', 'critical', 'deliveries', 'jobs', 'inbound', 'rejections'));
INSERT INTO ihub.retention (kind, keep) VALUES ('rejections', '7 days');
COMMENT ON TABLE ihub.retention IS
    'Retention per log level and for delivered deliveries (with their attempts), finished jobs, processed inbound items and refused inbound requests; NULL keeps forever.';
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
    RETURN v_total;
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
                                            WHERE x.state IN ('done', 'skipped') AND x.created_at < v_cutoff
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
        ELSIF r.kind = 'rejections' THEN
            LOOP
                DELETE FROM ihub.inbound_rejection x
                WHERE x.id = ANY (ARRAY(SELECT y.id FROM ihub.inbound_rejection y WHERE y.received_at < v_cutoff
                                        ORDER BY y.id LIMIT p_batch));
                GET DIAGNOSTICS v_n = ROW_COUNT;
                v_total := v_total + v_n;
                EXIT WHEN v_n < p_batch;
            END LOOP;
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

-- The listener's counters.
CREATE FUNCTION ihub.listener_stats() RETURNS TABLE (
	"source_reloads" bigint,
	"rejections_dropped" bigint,
	"connections_refused" bigint
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'listener_stats_wrapper';
REVOKE ALL ON FUNCTION ihub.listener_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ihub.listener_stats() TO ihub_viewer;
COMMENT ON FUNCTION ihub.listener_stats() IS
    'The inbound listener''s counters since the server started: reloads of its cache of sources, rejected requests not recorded (their queue was full), connections refused with 503.';

-------------------------------------------------------------------------------
-- Logs: making partitions gives way to sessions that log
-------------------------------------------------------------------------------

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

-------------------------------------------------------------------------------
-- Schedules: altering one while its run is queued
-------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION ihub._alter_schedule_by(
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
    v ihub.schedule;
    v_next timestamptz;
BEGIN
    -- Lock first, then read: a run the scheduler queues meanwhile has moved
    -- next_run_at on, and writing back the time read before it would queue
    -- that run again.
    PERFORM 1 FROM ihub.schedule s WHERE s.name = _alter_schedule_by.name FOR UPDATE;
    v := ihub._own_schedule(_alter_schedule_by.name, p_caller);
    v_next := v.next_run_at;
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

-------------------------------------------------------------------------------
-- Delivery failures are logged aggregated (issue 11)
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._failure_message(p_outcome text, p_count bigint, p_endpoint text, p_error text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT format('%s %s to %s %s: %s', p_count, CASE WHEN p_count = 1 THEN 'delivery' ELSE 'deliveries' END, p_endpoint,
                  CASE p_outcome WHEN 'retry' THEN 'failed and will be retried'
                                 WHEN 'dead' THEN CASE WHEN p_count = 1 THEN 'is dead, its retries exhausted'
                                                       ELSE 'are dead, their retries exhausted' END
                                 ELSE 'failed for good' END,
                  p_error)
$$;

CREATE OR REPLACE FUNCTION ihub._log_failures(p_results jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    v_level text;
    v_entry ihub.log_entry;
    v_total bigint;
    -- A value, not clock_timestamp() in the query: that is volatile, and
    -- would scan every partition instead of the last minute by index.
    v_since timestamptz := clock_timestamp() - interval '1 minute';
BEGIN
    FOR v IN
        SELECT e.name AS endpoint, i.name AS integration, x.state, count(*) AS n,
               (array_agg(x.error ORDER BY x.delivery_id DESC))[1] AS error,
               array_agg(x.delivery_id ORDER BY x.delivery_id) AS ids
        FROM jsonb_to_recordset(p_results) AS x(delivery_id bigint, state text, error text)
        JOIN ihub.delivery d ON d.id = x.delivery_id
        JOIN ihub.endpoint e ON e.id = d.endpoint_id
        JOIN ihub.integration i ON i.id = e.integration_id
        WHERE x.state IN ('retry', 'dead', 'failed')
        GROUP BY e.name, i.name, x.state
        ORDER BY e.name, x.state
    LOOP
        v_level := CASE WHEN v.state = 'retry' THEN 'warning' ELSE 'error' END;
        SELECT * INTO v_entry FROM ihub.log_entry l
        WHERE l.level = v_level AND l.logged_at > v_since AND l.checked_at IS NULL
          AND l.details ->> 'endpoint' = v.endpoint AND l.details ->> 'outcome' = v.state
          AND l.details ->> 'dispatcher' = pg_backend_pid()::text
        ORDER BY l.logged_at DESC
        LIMIT 1;
        v_total := coalesce((v_entry.details ->> 'deliveries_failed')::bigint, 0) + v.n;
        IF v_entry.id IS NOT NULL THEN
            UPDATE ihub.log_entry l
            SET message = ihub._mask_text(left(ihub._failure_message(v.state, v_total, v.endpoint, v.error), 10000)),
                details = l.details || jsonb_build_object('deliveries_failed', v_total,
                                                          'last_error', ihub._mask_text(left(v.error, 10000)))
            WHERE l.id = v_entry.id AND l.level = v_entry.level AND l.logged_at = v_entry.logged_at;
        ELSE
            PERFORM ihub.log(v_level, ihub._failure_message(v.state, v.n, v.endpoint, v.error),
                             jsonb_build_object('endpoint', v.endpoint, 'outcome', v.state,
                                                'dispatcher', pg_backend_pid(), 'deliveries_failed', v.n,
                                                'deliveries', to_jsonb(v.ids[1:100])),
                             v.integration, delivery => v.ids[1]);
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION ihub._settle(p_owner integer, p_results jsonb) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    v_settled bigint[];
    v_health jsonb;
    v_endpoint record;
    v_ids bigint[] := ARRAY(SELECT (x ->> 'delivery_id')::bigint FROM jsonb_array_elements(p_results) x);
BEGIN
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(p_results) AS x(
            delivery_id bigint, state text, next_at double precision, status integer, error text, category text,
            request_headers jsonb, response_headers jsonb, response_body text, started_at double precision,
            duration_ms double precision, oauth2_stale boolean, oauth2_version integer)
    ), updated AS (
        UPDATE ihub.delivery d
        SET state = r.state,
            attempts = d.attempts + 1,
            refused_token = CASE WHEN r.oauth2_stale THEN r.oauth2_version ELSE d.refused_token END,
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
        RETURNING delivery_id
    ), outcomes AS (
        SELECT u.endpoint_id, u.id, r.state, r.error, r.duration_ms, r.category FROM updated u JOIN r ON r.delivery_id = u.id
    ), health AS (
        -- For circuits (ihub._circuit_settle): failed means the receiver
        -- did not answer well (5xx, timeout, connection), answered that it
        -- did, unsuccessful anything the receiver did not take.
        SELECT jsonb_agg(jsonb_build_object('endpoint_id', h.endpoint_id, 'delivered', h.delivered, 'failed', h.failed,
                                            'answered', h.answered, 'unsuccessful', h.unsuccessful)) AS batch
        FROM (SELECT o.endpoint_id, count(*) FILTER (WHERE o.category = 'ok') AS delivered,
                     count(*) FILTER (WHERE o.category IN ('http_5xx', 'timeout', 'connection')) AS failed,
                     count(*) FILTER (WHERE o.category IN ('ok', 'http_4xx', 'rate_limited', 'http_other')) AS answered,
                     count(*) FILTER (WHERE o.category NOT IN ('ok', 'blocked', 'invalid_request', 'test_mode')) AS unsuccessful
              FROM outcomes o GROUP BY o.endpoint_id) h
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
    SELECT (SELECT coalesce(array_agg(delivery_id), '{}') FROM recorded), (SELECT batch FROM health)
    INTO v_settled, v_health;

    -- Circuits and failure streaks: only when something failed, or an
    -- endpoint of the batch has a failure on record.
    IF v_health @? '$[*] ? (@.unsuccessful > 0)'
       OR EXISTS (SELECT 1 FROM ihub.endpoint_state c
                  WHERE c.endpoint_id IN (SELECT (x ->> 'endpoint_id')::bigint FROM jsonb_array_elements(v_health) x)
                    AND (c.state <> 'closed' OR c.failures > 0 OR c.failing_since IS NOT NULL OR c.window_start IS NOT NULL)) THEN
        PERFORM ihub._circuit_settle(v_health);
    END IF;

    -- Ended requests with a response handler: a job each.
    IF p_results @> '[{"respond": true}]' THEN
        PERFORM ihub._respond(p_results, v_settled);
    END IF;

    -- A 401 to an OAuth2 access token: a new one is asked for at once (once
    -- per token, however many deliveries got the 401), and the deliveries
    -- are due again as soon as it is stored (ihub._oauth2_store). When the
    -- receiver refused a new token too, it means it: 401s ask for no new
    -- token for 10 minutes, or an endpoint that refuses every token would
    -- have a token requested for every delivery (providers cap them).
    IF p_results @> '[{"oauth2_refused": true}]' THEN
        UPDATE ihub.oauth2 o SET refused_at = now()
        WHERE o.id IN (SELECT x.oauth2_id FROM jsonb_to_recordset(p_results) AS x(oauth2_id bigint, oauth2_refused boolean)
                       WHERE x.oauth2_refused);
    END IF;
    IF p_results @> '[{"oauth2_stale": true}]' THEN
        UPDATE ihub.oauth2 o SET refresh_at = now()
        FROM (SELECT DISTINCT x.oauth2_id, x.oauth2_version
              FROM jsonb_to_recordset(p_results) AS x(oauth2_id bigint, oauth2_version integer, oauth2_stale boolean)
              WHERE x.oauth2_stale) x
        WHERE o.id = x.oauth2_id AND o.token_version = x.oauth2_version AND (o.refresh_at IS NULL OR o.refresh_at > now())
          AND (o.refused_at IS NULL OR o.refused_at < now() - interval '10 minutes');
        PERFORM ihub._wake_maintenance();
    END IF;

    -- A 429 pauses its whole endpoint.
    IF p_results @> '[{"category": "rate_limited"}]' THEN
        PERFORM ihub._pause_rate_limited(p_results);
    END IF;

    -- Failures go to the log, aggregated per endpoint and minute.
    IF p_results @> '[{"state": "retry"}]' OR p_results @> '[{"state": "dead"}]' OR p_results @> '[{"state": "failed"}]' THEN
        PERFORM ihub._log_failures(p_results);
    END IF;

    -- 410 Gone: the receiver says this endpoint is gone for good.
    IF p_results @> '[{"disable_endpoint": true}]' THEN
        FOR v_endpoint IN
            SELECT DISTINCT d.endpoint_id FROM ihub.delivery d
            JOIN jsonb_to_recordset(p_results) AS x(delivery_id bigint, disable_endpoint boolean) ON x.delivery_id = d.id
            WHERE x.disable_endpoint
            ORDER BY d.endpoint_id
        LOOP
            PERFORM ihub._disable_endpoint_for(v_endpoint.endpoint_id, 'the receiver answered 410 Gone');
        END LOOP;
    END IF;
    RETURN cardinality(v_settled);
END
$$;

COMMENT ON FUNCTION ihub._log_failures(jsonb) IS
    'Internal (dispatcher): logs retried, dead and failed deliveries, one entry per endpoint, outcome and minute for each dispatcher, with counts.';
COMMENT ON FUNCTION ihub._failure_message(text, bigint, text, text) IS 'Internal: the message of an aggregated delivery-failure log entry.';

-------------------------------------------------------------------------------
-- The running indexes of jobs and inbound items are keyed by id: recording a
-- job or item done walked every entry of its worker (bootstrap.sql).
-------------------------------------------------------------------------------
DROP INDEX ihub.job_running_idx;
CREATE INDEX job_running_idx ON ihub.job (id) WHERE state = 'running';
DROP INDEX ihub.inbound_running_idx;
CREATE INDEX inbound_running_idx ON ihub.inbound_item (id) WHERE state = 'running';

-------------------------------------------------------------------------------
-- ihub.delivery without foreign keys: what they did is done when an
-- endpoint or subscription is deleted (outbound.sql); whatever queues a
-- delivery holds its endpoint FOR KEY SHARE until it commits.
-------------------------------------------------------------------------------
ALTER TABLE ihub.delivery DROP CONSTRAINT delivery_endpoint_id_fkey, DROP CONSTRAINT delivery_subscription_id_fkey;

-- Half of each new page stays free for the updates that settle deliveries
-- (bootstrap.sql); pages already written keep their rows as they are.
ALTER TABLE ihub.delivery SET (fillfactor = 50);

-- Items blocked behind an earlier one with the same ordering key do not
-- count: they become claimable when that one is done, and the processor
-- finishing it claims them; counting them would wake an idle processor
-- over and over. The first in run_at order, from the due index read in
-- order whatever the statistics (see ihub._next_due): with those of a
-- drained queue analyzed empty, min() read every queued item.
CREATE OR REPLACE FUNCTION ihub._next_inbound_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
AS $$
    SELECT greatest(0, extract(epoch FROM t.run_at - now()))::double precision
    FROM ihub.inbound_item t
    WHERE t.state = 'pending'
      AND (t.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM ihub.inbound_item e
            WHERE e.source_id = t.source_id AND e.ordering_key = t.ordering_key
              AND e.state IN ('pending', 'running') AND e.id < t.id))
    ORDER BY t.run_at
    LIMIT 1
$$;

CREATE FUNCTION ihub._endpoint_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ihub.delivery d WHERE d.endpoint_id = OLD.id) THEN
        RAISE EXCEPTION 'endpoint "%" still has deliveries', OLD.name
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'ihub.delete_integration deletes an integration with its endpoints and their deliveries.';
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER endpoint_deleted BEFORE DELETE ON ihub.endpoint
    FOR EACH ROW EXECUTE FUNCTION ihub._endpoint_deleted();

CREATE FUNCTION ihub._subscription_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.delivery d SET subscription_id = NULL WHERE d.subscription_id = OLD.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER subscription_deleted AFTER DELETE ON ihub.subscription
    FOR EACH ROW EXECUTE FUNCTION ihub._subscription_deleted();

COMMENT ON FUNCTION ihub._endpoint_deleted() IS
    'Internal: trigger refusing to delete an endpoint that still has deliveries (ihub.delivery has no foreign keys).';
COMMENT ON FUNCTION ihub._subscription_deleted() IS
    'Internal: trigger clearing the subscription of deliveries when their subscription is deleted (ihub.delivery has no foreign keys).';
COMMENT ON TRIGGER endpoint_deleted ON ihub.endpoint IS 'Refuses to delete an endpoint that still has deliveries.';
COMMENT ON TRIGGER subscription_deleted ON ihub.subscription IS 'Clears the subscription of its deliveries when it is deleted.';

-------------------------------------------------------------------------------
-- Mappers (issue 12): sql/mappers.sql
-------------------------------------------------------------------------------

-- Up to two values of a table mapper's column matching a value, read as
-- the role using the mapper (src/sync/mappers.rs).
CREATE FUNCTION ihub._mapper_matches("target" oid, "column" text, "value" text, "caller" oid) RETURNS text[]
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mapper_matches_wrapper';
COMMENT ON FUNCTION ihub._mapper_matches(oid, text, text, oid) IS
    'Internal: up to two values of a table mapper''s column matching a value (exactly, else ignoring case), read as the given role in a security-restricted operation.';

-- Deleting an integration deletes its mappers.
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
    -- Archived failures are kept until someone decides about them (README).
    IF EXISTS (SELECT 1 FROM ihub.inbound_item t JOIN ihub.inbound_source s ON s.id = t.source_id
               WHERE s.integration_id = v.id AND t.state = 'failed') THEN
        RAISE EXCEPTION 'integration "%" has failed inbound items', v.name
            USING ERRCODE = 'object_in_use',
                  HINT = 'See them in ihub.inbound_failed; queue them again with ihub.reactivate_inbound, or delete them from ihub.inbound_item yourself.';
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
    DELETE FROM ihub.mapper WHERE integration_id = v.id;
    DELETE FROM ihub.binding WHERE integration_id = v.id;
    DELETE FROM ihub.oauth2 WHERE integration_id = v.id;
    DELETE FROM ihub.integration WHERE id = v.id;
END
$$;
COMMENT ON FUNCTION ihub.delete_integration(text) IS
    'Deletes an inactive integration with its endpoints, subscriptions, mappers and delivery history.';

CREATE TABLE ihub.mapper (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id),
    name           text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    kind           text NOT NULL CHECK (kind IN ('table', 'enum')),
    -- table mappers: the column whose values are the local values.
    target         regclass,
    target_column  name,
    -- enum mappers: the allowed local values; NULL allows any.
    local_values   text[],
    on_import      text NOT NULL CHECK (on_import IN ('auto', 'manual', 'fail')),
    on_export      text NOT NULL CHECK (on_export IN ('auto', 'manual', 'fail')),
    created_by     name NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (integration_id, name),
    CHECK ((kind = 'table') = (target IS NOT NULL AND target_column IS NOT NULL)),
    CHECK (kind = 'enum' OR local_values IS NULL)
);
COMMENT ON TABLE ihub.mapper IS
    'Mappers: how values of one kind (a table column or a fixed set) translate between this database and an integration''s system, and what to do with unknown values on import and on export.';

-- An item with a NULL local value waits for a person (an unknown value
-- seen on import); one without external values waits for its external value
-- (an unknown value seen on export).
CREATE TABLE ihub.mapper_item (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mapper_id   bigint NOT NULL REFERENCES ihub.mapper (id) ON DELETE CASCADE,
    local_value text,
    external_id text,
    origin      text NOT NULL CHECK (origin IN ('person', 'import', 'export')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- One item per local value: export is never ambiguous.
CREATE UNIQUE INDEX mapper_item_local_idx ON ihub.mapper_item (mapper_id, local_value) WHERE local_value IS NOT NULL;
COMMENT ON TABLE ihub.mapper_item IS
    'Mapper items: one local value and the external values that map to it (ihub.mapper_value). A NULL local value waits for a person.';

-- One row per external value, so that the database itself keeps an
-- external value from mapping to two items, concurrent imports included.
CREATE TABLE ihub.mapper_value (
    mapper_id      bigint NOT NULL REFERENCES ihub.mapper (id) ON DELETE CASCADE,
    external_value text NOT NULL,
    item_id        bigint NOT NULL REFERENCES ihub.mapper_item (id) ON DELETE CASCADE,
    position       integer NOT NULL,
    PRIMARY KEY (mapper_id, external_value)
);
CREATE INDEX mapper_value_item_idx ON ihub.mapper_value (item_id, position);
COMMENT ON TABLE ihub.mapper_value IS
    'The external values of mapper items; an item''s first value (lowest position) is the one exported.';

SELECT pg_catalog.pg_extension_config_dump('ihub.mapper', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.mapper_item', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.mapper_value', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.mapper_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.mapper_item_id_seq', '');

-------------------------------------------------------------------------------
-- Helpers
-------------------------------------------------------------------------------

-- Whether a list of values is usable: one or more, none NULL or empty, no
-- value twice (external values, enum values, selection options).
CREATE FUNCTION ihub._is_value_list(p_values text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(cardinality(p_values) > 0 AND array_position(p_values, NULL) IS NULL AND NOT '' = ANY (p_values)
                    AND cardinality(p_values) = (SELECT count(DISTINCT v) FROM unnest(p_values) v), false)
$$;

CREATE FUNCTION ihub._mapper(p_integration text, p_name text) RETURNS ihub.mapper
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.mapper;
BEGIN
    SELECT * INTO v FROM ihub.mapper m WHERE m.integration_id = ihub._integration_id(p_integration) AND m.name = p_name;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'integration "%" has no mapper "%"', p_integration, p_name
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with ihub.create_mapper(integration, name, kind), or list them in ihub.mappers.';
    END IF;
    RETURN v;
END
$$;

-- Whether the caller may read a table mapper's column; the read itself
-- (ihub._mapper_matches) runs with the caller's rights anyway, this gives
-- the error a hint.
CREATE FUNCTION ihub._mapper_check_target(p_mapper text, p_target regclass, p_column name, p_caller regrole)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p_target) THEN
        RAISE EXCEPTION 'the table of mapper "%" no longer exists', p_mapper
            USING ERRCODE = 'undefined_table',
                  HINT = 'Drop the mapper with ihub.drop_mapper(integration, name) and create it again.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                   WHERE a.attrelid = p_target AND a.attname = p_column AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'column "%" of % does not exist', p_column, p_target
            USING ERRCODE = 'undefined_column',
                  HINT = format('Mapper "%s" maps the values of one column of its table; name an existing one.', p_mapper);
    END IF;
    IF has_column_privilege(p_caller, p_target, p_column, 'SELECT') IS NOT TRUE THEN
        RAISE EXCEPTION 'permission denied for column "%" of %', p_column, p_target
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Mapper "%s" reads its table with the rights of the role that uses it (%s): grant it SELECT on that column.',
                                p_mapper, p_caller);
    END IF;
END
$$;

-- The local values a mapper could give `p_value`: for a table mapper the
-- matching values of its column (exact, else ignoring case), for an enum
-- mapper its allowed values likewise.
CREATE FUNCTION ihub._mapper_candidates(m ihub.mapper, p_value text, p_caller regrole) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found text[];
BEGIN
    IF m.kind = 'table' THEN
        PERFORM ihub._mapper_check_target(m.name, m.target, m.target_column, p_caller);
        RETURN ihub._mapper_matches(m.target::oid, m.target_column::text, p_value, p_caller::oid);
    END IF;
    v_found := ARRAY(SELECT v FROM unnest(m.local_values) v WHERE v = p_value);
    IF cardinality(v_found) = 0 THEN
        v_found := ARRAY(SELECT v FROM unnest(m.local_values) v WHERE lower(v) = lower(p_value));
    END IF;
    RETURN v_found;
END
$$;

-- Refuses a local value the mapper cannot hold: not among an enum's
-- values, or no row of a table mapper's column has it.
CREATE FUNCTION ihub._mapper_check_local(m ihub.mapper, p_value text, p_caller regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_value IS NULL OR p_value = '' THEN
        RAISE EXCEPTION 'a mapper item needs a local value'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = format('Give the value of mapper "%s" that the external values stand for.', m.name);
    END IF;
    IF m.kind = 'enum' AND m.local_values IS NOT NULL AND NOT p_value = ANY (m.local_values) THEN
        RAISE EXCEPTION 'mapper "%" has no local value "%"', m.name, p_value
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Its values are %s.', array_to_string(m.local_values, ', '));
    END IF;
    IF m.kind = 'table' AND NOT p_value = ANY (ihub._mapper_candidates(m, p_value, p_caller)) THEN
        RAISE EXCEPTION 'no row of % has % = "%"', m.target, m.target_column, p_value
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('The local values of mapper "%s" are the values of %s.%s; add the row first.',
                                m.name, m.target, m.target_column);
    END IF;
END
$$;

-- The item holding an external value, if any.
CREATE FUNCTION ihub._mapper_item_of(p_mapper bigint, p_external text) RETURNS ihub.mapper_item
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT i.* FROM ihub.mapper_value v JOIN ihub.mapper_item i ON i.id = v.item_id
    WHERE v.mapper_id = p_mapper AND v.external_value = p_external
$$;

-- The external value an item exports: its first.
CREATE FUNCTION ihub._mapper_export_value(p_item bigint) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT v.external_value FROM ihub.mapper_value v WHERE v.item_id = p_item ORDER BY v.position LIMIT 1
$$;

-- Records an external value with no local value yet. Returns whether this
-- call created it (a concurrent import of the same value may have).
CREATE FUNCTION ihub._mapper_add_pending(m ihub.mapper, p_external text, p_origin text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_item bigint;
    v_added boolean;
BEGIN
    INSERT INTO ihub.mapper_item (mapper_id, origin) VALUES (m.id, p_origin) RETURNING id INTO v_item;
    INSERT INTO ihub.mapper_value (mapper_id, external_value, item_id, position) VALUES (m.id, p_external, v_item, 1)
    ON CONFLICT DO NOTHING;
    v_added := FOUND;
    IF NOT v_added THEN
        DELETE FROM ihub.mapper_item WHERE id = v_item;
    END IF;
    RETURN v_added;
END
$$;

-- Adds an external value to the item of a local value, creating the item.
-- Returns false if the value belongs to another item meanwhile.
CREATE FUNCTION ihub._mapper_add_value(m ihub.mapper, p_local text, p_external text, p_origin text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_item bigint;
    v_added boolean;
    v_pending ihub.mapper_item := ihub._mapper_item_of(m.id, p_external);
BEGIN
    INSERT INTO ihub.mapper_item (mapper_id, local_value, origin) VALUES (m.id, p_local, p_origin)
    ON CONFLICT (mapper_id, local_value) WHERE local_value IS NOT NULL DO NOTHING;
    SELECT id INTO v_item FROM ihub.mapper_item WHERE mapper_id = m.id AND local_value = p_local;
    -- An import waiting for a person: this is its answer.
    IF v_pending.id IS NOT NULL AND v_pending.local_value IS NULL THEN
        DELETE FROM ihub.mapper_item WHERE id = v_pending.id;
    END IF;
    INSERT INTO ihub.mapper_value (mapper_id, external_value, item_id, position)
    SELECT m.id, p_external, v_item, coalesce(max(v.position), 0) + 1 FROM ihub.mapper_value v WHERE v.item_id = v_item
    ON CONFLICT DO NOTHING;
    v_added := FOUND;
    IF v_added THEN
        UPDATE ihub.mapper_item SET updated_at = now() WHERE id = v_item;
    END IF;
    RETURN v_added;
END
$$;

-- Records a local value waiting for its external value. Returns whether
-- this call created it.
CREATE FUNCTION ihub._mapper_add_local(m ihub.mapper, p_local text, p_origin text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO ihub.mapper_item (mapper_id, local_value, origin) VALUES (m.id, p_local, p_origin)
    ON CONFLICT (mapper_id, local_value) WHERE local_value IS NOT NULL DO NOTHING;
    RETURN FOUND;
END
$$;

CREATE FUNCTION ihub._mapper_warn(m ihub.mapper, p_message text, p_value text, p_direction text, p_caller regrole)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ihub._log_by('warning', p_message,
                         jsonb_build_object('mapper', m.name, 'value', p_value, 'direction', p_direction),
                         (SELECT i.name FROM ihub.integration i WHERE i.id = m.integration_id),
                         NULL, NULL, NULL, NULL, p_caller);
END
$$;

-------------------------------------------------------------------------------
-- Mappers
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._create_mapper_by(
    integration text,
    name text,
    kind text,
    target regclass DEFAULT NULL,
    target_column text DEFAULT NULL,
    on_import text DEFAULT 'manual',
    on_export text DEFAULT 'fail',
    local_values text[] DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(_create_mapper_by.integration);
    v_id bigint;
    v_mode text;
BEGIN
    PERFORM ihub._check_name('mapper', _create_mapper_by.name);
    IF EXISTS (SELECT 1 FROM ihub.mapper m WHERE m.integration_id = v_integration AND m.name = _create_mapper_by.name) THEN
        RAISE EXCEPTION 'integration "%" already has a mapper "%"', _create_mapper_by.integration, _create_mapper_by.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or drop it first with ihub.drop_mapper(integration, name).';
    END IF;
    FOREACH v_mode IN ARRAY ARRAY[_create_mapper_by.on_import, _create_mapper_by.on_export] LOOP
        IF v_mode IS NULL OR v_mode NOT IN ('auto', 'manual', 'fail') THEN
            RAISE EXCEPTION 'unknown mapper mode "%"', v_mode
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'on_import and on_export are each auto (create the item, filling it when possible), manual (create it for a person to fill) or fail (raise an error).';
        END IF;
    END LOOP;
    IF _create_mapper_by.kind = 'table' THEN
        IF target IS NULL OR target_column IS NULL THEN
            RAISE EXCEPTION 'a table mapper needs a table and a column'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Pass target => ''taxes''::regclass, target_column => ''code'': the local values are that column''s values.';
        END IF;
        IF local_values IS NOT NULL THEN
            RAISE EXCEPTION 'a table mapper takes its local values from its table, not from local_values'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave local_values out, or make an enum mapper.';
        END IF;
        PERFORM ihub._mapper_check_target(_create_mapper_by.name, target, target_column, p_caller);
    ELSIF _create_mapper_by.kind = 'enum' THEN
        IF target IS NOT NULL OR target_column IS NOT NULL THEN
            RAISE EXCEPTION 'an enum mapper has no table'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Leave target and target_column out (local_values may list the allowed values), or make a table mapper.';
        END IF;
        IF local_values IS NOT NULL AND NOT ihub._is_value_list(local_values) THEN
            RAISE EXCEPTION 'local_values must list distinct, non-empty values'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ARRAY[''open'', ''won'', ''lost''], or NULL to allow any value.';
        END IF;
    ELSE
        RAISE EXCEPTION 'unknown mapper kind "%"', _create_mapper_by.kind
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A mapper is of kind table (the local values are a column''s values) or enum (a fixed set).';
    END IF;
    INSERT INTO ihub.mapper (integration_id, name, kind, target, target_column, local_values, on_import, on_export, created_by)
    VALUES (v_integration, _create_mapper_by.name, _create_mapper_by.kind, target, target_column, local_values,
            _create_mapper_by.on_import, _create_mapper_by.on_export, p_caller::name)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.create_mapper(
    integration text,
    name text,
    kind text,
    target regclass DEFAULT NULL,
    target_column text DEFAULT NULL,
    on_import text DEFAULT 'manual',
    on_export text DEFAULT 'fail',
    local_values text[] DEFAULT NULL) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub.drop_mapper(integration text, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM ihub.mapper WHERE id = (ihub._mapper(drop_mapper.integration, drop_mapper.name)).id;
END
$$;

-------------------------------------------------------------------------------
-- Items
-------------------------------------------------------------------------------

-- Adds external values to the item of `local_value`, first in its list:
-- the first of them is the one exported from now on. Values waiting for a
-- person join it; a value mapped to another local value is an error (a
-- mapping a person made is never moved silently). Idempotent.
CREATE FUNCTION ihub._map_item_by(
    integration text,
    mapper text,
    external_values text[],
    local_value text,
    external_id text DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m ihub.mapper := ihub._mapper(_map_item_by.integration, _map_item_by.mapper);
    v_item bigint;
    v_taken record;
BEGIN
    IF NOT ihub._is_value_list(external_values) THEN
        RAISE EXCEPTION 'external_values must list one or more distinct, non-empty values'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ARRAY[''DE''], or ARRAY[''DE'', ''GER''] for several values of one local value (the first is exported).';
    END IF;
    PERFORM ihub._mapper_check_local(m, local_value, p_caller);
    -- One change to a mapper's items at a time.
    PERFORM 1 FROM ihub.mapper WHERE id = m.id FOR UPDATE;
    SELECT v.external_value, i.local_value INTO v_taken
    FROM ihub.mapper_value v JOIN ihub.mapper_item i ON i.id = v.item_id
    WHERE v.mapper_id = m.id AND v.external_value = ANY (external_values)
      AND i.local_value IS NOT NULL AND i.local_value <> _map_item_by.local_value
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'external value "%" of mapper "%" already maps to "%"', v_taken.external_value, m.name, v_taken.local_value
            USING ERRCODE = 'duplicate_object',
                  HINT = 'An external value maps to one local value. Map that local value without it first, or remove its item with ihub.delete_mapper_item(integration, mapper, item).';
    END IF;
    SELECT id INTO v_item FROM ihub.mapper_item i WHERE i.mapper_id = m.id AND i.local_value = _map_item_by.local_value;
    IF v_item IS NULL THEN
        INSERT INTO ihub.mapper_item (mapper_id, local_value, external_id, origin)
        VALUES (m.id, _map_item_by.local_value, _map_item_by.external_id, 'person')
        RETURNING id INTO v_item;
    ELSE
        UPDATE ihub.mapper_item i SET external_id = coalesce(_map_item_by.external_id, i.external_id), updated_at = now()
        WHERE i.id = v_item;
    END IF;
    -- The values move here from wherever they are (this item, or items
    -- waiting for a person, which go when emptied); the item's other values
    -- stay, after them.
    DELETE FROM ihub.mapper_value v WHERE v.mapper_id = m.id AND v.external_value = ANY (external_values);
    DELETE FROM ihub.mapper_item i
    WHERE i.mapper_id = m.id AND i.local_value IS NULL
      AND NOT EXISTS (SELECT 1 FROM ihub.mapper_value v WHERE v.item_id = i.id);
    UPDATE ihub.mapper_value v SET position = v.position + cardinality(external_values) WHERE v.item_id = v_item;
    INSERT INTO ihub.mapper_value (mapper_id, external_value, item_id, position)
    SELECT m.id, e.value, v_item, e.position FROM unnest(external_values) WITH ORDINALITY AS e(value, position);
    RETURN v_item;
END
$$;

CREATE FUNCTION ihub.map_item(
    integration text,
    mapper text,
    external_values text[],
    local_value text,
    external_id text DEFAULT NULL) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub.delete_mapper_item(integration text, mapper text, item bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m ihub.mapper := ihub._mapper(delete_mapper_item.integration, delete_mapper_item.mapper);
BEGIN
    DELETE FROM ihub.mapper_item i WHERE i.id = delete_mapper_item.item AND i.mapper_id = m.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'mapper "%" has no item %', m.name, delete_mapper_item.item
            USING ERRCODE = 'undefined_object', HINT = 'See its items in ihub.mapper_items.';
    END IF;
END
$$;

-------------------------------------------------------------------------------
-- Translating
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._map_import_by(integration text, mapper text, external_value text, p_caller regrole DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m ihub.mapper := ihub._mapper(_map_import_by.integration, _map_import_by.mapper);
    v_item ihub.mapper_item;
    v_found text[];
BEGIN
    IF external_value IS NULL THEN
        RETURN NULL;
    END IF;
    v_item := ihub._mapper_item_of(m.id, external_value);
    IF v_item.local_value IS NOT NULL THEN
        RETURN v_item.local_value;
    END IF;
    IF m.on_import = 'fail' THEN
        RAISE EXCEPTION 'mapper "%" of integration "%" has no local value for "%"', m.name, _map_import_by.integration, external_value
            USING ERRCODE = 'no_data_found',
                  HINT = format('Map it first: SELECT ihub.map_item(%L, %L, ARRAY[%L], <local value>);',
                                _map_import_by.integration, m.name, external_value);
    END IF;
    IF m.on_import = 'auto' THEN
        v_found := ihub._mapper_candidates(m, external_value, p_caller);
        IF cardinality(v_found) = 1 THEN
            IF ihub._mapper_add_value(m, v_found[1], external_value, 'import') THEN
                RETURN v_found[1];
            END IF;
            -- Another transaction recorded the value meanwhile: its answer.
            RETURN (ihub._mapper_item_of(m.id, external_value)).local_value;
        END IF;
    END IF;
    IF v_item.id IS NULL THEN
        IF NOT ihub._mapper_add_pending(m, external_value, 'import') THEN
            RETURN (ihub._mapper_item_of(m.id, external_value)).local_value;
        END IF;
        -- Warned once, when the value is first seen: repeated imports add nothing.
        PERFORM ihub._mapper_warn(m, format('mapper %s: no local value for "%s" yet; map it with ihub.map_item', m.name, external_value),
                                  external_value, 'import', p_caller);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION ihub.map_import(integration text, mapper text, external_value text) RETURNS text
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._map_export_by(integration text, mapper text, local_value text, p_caller regrole DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m ihub.mapper := ihub._mapper(_map_export_by.integration, _map_export_by.mapper);
    v_item bigint;
    v_external text;
BEGIN
    IF local_value IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT i.id, ihub._mapper_export_value(i.id) INTO v_item, v_external
    FROM ihub.mapper_item i WHERE i.mapper_id = m.id AND i.local_value = _map_export_by.local_value;
    IF v_external IS NOT NULL THEN
        RETURN v_external;
    END IF;
    IF m.kind = 'enum' AND m.local_values IS NOT NULL AND NOT local_value = ANY (m.local_values) THEN
        RAISE EXCEPTION 'mapper "%" has no local value "%"', m.name, local_value
            USING ERRCODE = 'invalid_parameter_value', HINT = format('Its values are %s.', array_to_string(m.local_values, ', '));
    END IF;
    IF m.on_export = 'fail' THEN
        RAISE EXCEPTION 'mapper "%" of integration "%" has no external value for "%"', m.name, _map_export_by.integration, local_value
            USING ERRCODE = 'no_data_found',
                  HINT = format('Map it first: SELECT ihub.map_item(%L, %L, ARRAY[<external value>], %L);',
                                _map_export_by.integration, m.name, local_value);
    END IF;
    IF m.on_export = 'auto' THEN
        -- The value stands for itself until a person maps it otherwise.
        IF ihub._mapper_add_value(m, local_value, local_value, 'export') THEN
            RETURN local_value;
        END IF;
        -- Mapped by another transaction meanwhile, or that external value is
        -- another item's: then a person decides.
        v_external := ihub._mapper_export_value(
            (SELECT i.id FROM ihub.mapper_item i WHERE i.mapper_id = m.id AND i.local_value = _map_export_by.local_value));
        IF v_external IS NOT NULL THEN
            RETURN v_external;
        END IF;
    ELSIF v_item IS NULL AND NOT ihub._mapper_add_local(m, local_value, 'export') THEN
        RETURN NULL; -- recorded by another transaction meanwhile, which warned
    END IF;
    -- Warned once, when the item is made: repeated exports add nothing.
    IF v_item IS NULL THEN
        PERFORM ihub._mapper_warn(m, format('mapper %s: no external value for "%s" yet; map it with ihub.map_item', m.name, local_value),
                                  local_value, 'export', p_caller);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION ihub.map_export(integration text, mapper text, local_value text) RETURNS text
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------

CREATE VIEW ihub.mappers AS
SELECT m.id, g.name AS integration, m.name, m.kind, m.target, m.target_column, m.local_values,
       m.on_import, m.on_export,
       (SELECT count(*) FROM ihub.mapper_item i WHERE i.mapper_id = m.id) AS items,
       (SELECT count(*) FROM ihub.mapper_item i WHERE i.mapper_id = m.id
          AND (i.local_value IS NULL OR NOT EXISTS (SELECT 1 FROM ihub.mapper_value v WHERE v.item_id = i.id))) AS waiting,
       m.created_by, m.created_at
FROM ihub.mapper m JOIN ihub.integration g ON g.id = m.integration_id;

-- Items waiting for a person first: `WHERE waiting_for IS NOT NULL`.
CREATE VIEW ihub.mapper_items AS
SELECT i.id, g.name AS integration, m.name AS mapper, m.kind,
       v.external_values, i.external_id, i.local_value,
       CASE WHEN i.local_value IS NULL THEN 'local value'
            WHEN v.external_values IS NULL THEN 'external value' END AS waiting_for,
       i.origin, i.created_at, i.updated_at
FROM ihub.mapper_item i
JOIN ihub.mapper m ON m.id = i.mapper_id
JOIN ihub.integration g ON g.id = m.integration_id
LEFT JOIN LATERAL (SELECT array_agg(x.external_value ORDER BY x.position) AS external_values
                   FROM ihub.mapper_value x WHERE x.item_id = i.id) v ON true
ORDER BY (i.local_value IS NULL OR v.external_values IS NULL) DESC, g.name, m.name, i.id;

COMMENT ON FUNCTION ihub._is_value_list(text[]) IS 'Internal: whether a list holds one or more distinct, non-empty values.';
COMMENT ON FUNCTION ihub._mapper(text, text) IS 'Internal: a mapper row by integration and name, or an error with a hint.';
COMMENT ON FUNCTION ihub._mapper_check_target(text, regclass, name, regrole) IS
    'Internal: checks that a table mapper''s column exists and that the role using the mapper may read it.';
COMMENT ON FUNCTION ihub._mapper_candidates(ihub.mapper, text, regrole) IS
    'Internal: the local values that match a value (exactly, else ignoring case), read with the rights of the role using the mapper.';
COMMENT ON FUNCTION ihub._mapper_check_local(ihub.mapper, text, regrole) IS 'Internal: refuses a local value the mapper cannot hold.';
COMMENT ON FUNCTION ihub._mapper_item_of(bigint, text) IS 'Internal: the mapper item holding an external value.';
COMMENT ON FUNCTION ihub._mapper_export_value(bigint) IS 'Internal: the external value a mapper item exports (its first).';
COMMENT ON FUNCTION ihub._mapper_add_pending(ihub.mapper, text, text) IS
    'Internal: records an external value waiting for its local value; true if this call created it.';
COMMENT ON FUNCTION ihub._mapper_add_value(ihub.mapper, text, text, text) IS
    'Internal: adds an external value to the item of a local value (creating it); false if another item took the value meanwhile.';
COMMENT ON FUNCTION ihub._mapper_add_local(ihub.mapper, text, text) IS
    'Internal: records a local value waiting for its external value; true if this call created it.';
COMMENT ON FUNCTION ihub._mapper_warn(ihub.mapper, text, text, text, regrole) IS
    'Internal: logs a warning naming a value that waits for a person.';
COMMENT ON FUNCTION ihub.create_mapper(text, text, text, regclass, text, text, text, text[]) IS
    'Creates a mapper of an integration: kind table (local values are target.target_column''s values) or enum (local_values, or any), with what import and export do with unknown values (auto, manual, fail). Returns its id.';
COMMENT ON FUNCTION ihub.drop_mapper(text, text) IS 'Drops a mapper with its items.';
COMMENT ON FUNCTION ihub.map_item(text, text, text[], text, text) IS
    'Maps one or more external values to a local value, completing items that waited for a person; the item keeps its other values, and the first value given is the one exported. Returns the item id.';
COMMENT ON FUNCTION ihub.delete_mapper_item(text, text, bigint) IS 'Removes a mapper item and its external values.';
COMMENT ON FUNCTION ihub.map_import(text, text, text) IS
    'The local value of an external value. Unknown values: auto creates the item (filled when exactly one local value matches), manual creates it for a person and logs a warning, both return NULL until mapped; fail raises an error.';
COMMENT ON FUNCTION ihub.map_export(text, text, text) IS
    'The external value of a local value (its item''s first). Unknown values: auto maps the value to itself, manual creates the item for a person, logs a warning and returns NULL, fail raises an error.';
COMMENT ON VIEW ihub.mappers IS 'Mappers with their kind, modes, and how many items wait for a person.';
COMMENT ON VIEW ihub.mapper_items IS
    'Mapper items: external values, local value, and waiting_for (local value / external value) while a person must complete them; waiting items first.';

DO $$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT p.oid::regprocedure AS fn, substr(p.proname, 2, length(p.proname) - 4) AS public_name
             FROM pg_proc p WHERE p.pronamespace = 'ihub'::regnamespace AND p.proname IN ('_create_mapper_by', '_map_item_by', '_map_import_by', '_map_export_by')
    LOOP
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', v.fn,
                       format('Internal: ihub.%s for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).', v.public_name));
    END LOOP;
END
$$;
REVOKE ALL ON ihub.mapper, ihub.mapper_item, ihub.mapper_value, ihub.mappers, ihub.mapper_items FROM PUBLIC;
GRANT SELECT ON ihub.mappers, ihub.mapper_items TO ihub_viewer;
GRANT EXECUTE ON FUNCTION
    ihub.create_mapper(text, text, text, regclass, text, text, text, text[]),
    ihub.drop_mapper(text, text),
    ihub.map_item(text, text, text[], text, text),
    ihub.delete_mapper_item(text, text, bigint),
    ihub.map_import(text, text, text),
    ihub.map_export(text, text, text)
TO ihub_developer;

-------------------------------------------------------------------------------
-- Bindings and loop prevention (issue 12): sql/bindings.sql
-------------------------------------------------------------------------------

-- A row's key, if the binding role sees the row (src/sync/bindings.rs).
CREATE FUNCTION ihub._row_key("table" oid, "column" text, "key" text, "caller" oid) RETURNS text
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'row_key_wrapper';
COMMENT ON FUNCTION ihub._row_key(oid, text, text, oid) IS
    'Internal: the primary key (as its type prints it) of the row with this key, if the given role sees it (security-restricted operation).';
-- Whether the transaction syncs a subscription's integration (src/sync/syncing.rs).
CREATE FUNCTION ihub._echo_suppressed("subscription" bigint) RETURNS boolean
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'echo_suppressed_wrapper';
COMMENT ON FUNCTION ihub._echo_suppressed(bigint) IS
    'Internal: whether the current transaction syncs the integration of this subscription (ihub.syncing), so that its changes are not captured.';
COMMENT ON FUNCTION ihub._inbound_integration(bigint) IS 'Internal: the integration of an inbound item''s source.';

CREATE TABLE ihub.binding (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id),
    object_type    text NOT NULL CHECK (object_type ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    local_table    regclass NOT NULL,
    -- The row's primary key as text (its type's output).
    local_key      text NOT NULL,
    external_id    text NOT NULL CHECK (external_id <> ''),
    -- SHA-256 (hex) of the data last synced, NULL when none was given.
    sync_hash      text,
    bound_by       name NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    synced_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT binding_local_key UNIQUE (integration_id, object_type, local_key),
    CONSTRAINT binding_external_id UNIQUE (integration_id, object_type, external_id)
);
-- The cleanup trigger deletes by table and key.
CREATE INDEX binding_local_idx ON ihub.binding (local_table, local_key);
COMMENT ON TABLE ihub.binding IS
    'Bindings: a local row (table, primary key) linked to an external object (integration, object type, external id), with the hash of the data last synced.';

SELECT pg_catalog.pg_extension_config_dump('ihub.binding', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.binding_id_seq', '');


-------------------------------------------------------------------------------
-- Helpers
-------------------------------------------------------------------------------

-- The single-column primary key of a table: the column a binding's key is
-- a value of. NULL (or an error with a hint, when asked) for anything else.
CREATE FUNCTION ihub._binding_key_column(p_table regclass, p_strict boolean DEFAULT true) RETURNS name
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_column name;
BEGIN
    SELECT a.attname INTO v_column
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = p_table AND i.indisprimary AND i.indnkeyatts = 1;
    IF v_column IS NULL AND p_strict THEN
        RAISE EXCEPTION 'table % has no single-column primary key', p_table
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'A binding names its row by its primary key: give the table one of one column (an id).';
    END IF;
    RETURN v_column;
END
$$;

CREATE FUNCTION ihub._sync_hash(p_data jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT encode(sha256(convert_to(p_data::text, 'UTF8')), 'hex') $$;

-- Installs the cleanup triggers on a table the first time a row of it is
-- bound. Making a trigger takes what CREATE TRIGGER takes: the caller must
-- own the table or hold TRIGGER on it.
CREATE FUNCTION ihub._binding_install_cleanup(p_table regclass, p_caller regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = 'ihub_binding_cleanup') THEN
        RETURN;
    END IF;
    IF NOT has_table_privilege(p_caller, p_table, 'TRIGGER') THEN
        RAISE EXCEPTION 'permission denied to bind rows of %: the first binding of a table installs a trigger there', p_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Bind a first row as the table''s owner, or GRANT TRIGGER ON %s TO %s.', p_table, p_caller);
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = p_table) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_table
            USING ERRCODE = 'wrong_object_type', HINT = 'Bind rows of tables.';
    END IF;
    -- A concurrent first binding of the same table waits here, then finds
    -- the trigger made.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', p_table);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = 'ihub_binding_cleanup') THEN
        EXECUTE format('CREATE TRIGGER ihub_binding_cleanup AFTER DELETE ON %s REFERENCING OLD TABLE AS ihub_old '
                       'FOR EACH STATEMENT EXECUTE FUNCTION ihub._binding_deleted()', p_table);
        EXECUTE format('CREATE TRIGGER ihub_binding_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION ihub._binding_deleted()', p_table);
    END IF;
END
$$;

-- The cleanup trigger: the bindings of deleted (or truncated) rows go in
-- the same transaction. The key is printed with its type's output
-- function (format), never a cast, which a user could have written: this
-- runs as the extension owner. A table whose key changed shape keeps its
-- bindings rather than fail the delete.
CREATE FUNCTION ihub._binding_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key name;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM ihub.binding WHERE local_table = TG_RELID;
        RETURN NULL;
    END IF;
    v_key := ihub._binding_key_column(TG_RELID, false);
    IF v_key IS NOT NULL THEN
        EXECUTE format('DELETE FROM ihub.binding b USING ihub_old o WHERE b.local_table = $1 AND b.local_key = format(''%%s'', o.%I)', v_key)
        USING TG_RELID;
    END IF;
    RETURN NULL;
END
$$;

-------------------------------------------------------------------------------
-- Binding and looking up
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._bind_by(
    integration text,
    object_type text,
    local_table regclass,
    local_key text,
    external_id text,
    data jsonb DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(_bind_by.integration);
    v_key_column name;
    v_key text;
    v_other record;
    v_id bigint;
BEGIN
    PERFORM ihub._check_name('object type', _bind_by.object_type);
    IF local_table IS NULL OR coalesce(local_key, '') = '' OR coalesce(external_id, '') = '' THEN
        RAISE EXCEPTION 'a binding needs a table, a local key and an external id'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'For example ihub.bind(''crm'', ''contact'', ''contacts'', ''42'', ''c_981'').';
    END IF;
    v_key_column := ihub._binding_key_column(local_table);
    -- An object type stands for one table.
    SELECT b.local_table INTO v_other FROM ihub.binding b
    WHERE b.integration_id = v_integration AND b.object_type = _bind_by.object_type AND b.local_table <> _bind_by.local_table
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'object type "%" of integration "%" is bound to rows of %, not %',
                        _bind_by.object_type, _bind_by.integration, v_other.local_table, local_table
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use one object type per table.';
    END IF;
    IF NOT has_table_privilege(p_caller, local_table, 'SELECT') THEN
        RAISE EXCEPTION 'permission denied for table %', local_table
            USING ERRCODE = 'insufficient_privilege', HINT = format('Binding a row takes SELECT on its table (%s has none).', p_caller);
    END IF;
    -- The row must exist, as the caller sees it (row-level security too);
    -- its key is kept as its type prints it ('042' binds row 42 as '42'),
    -- which is how the cleanup trigger finds it.
    v_key := ihub._row_key(local_table::oid, v_key_column::text, local_key, p_caller::oid);
    IF v_key IS NULL THEN
        RAISE EXCEPTION 'no row of % has % = %', local_table, v_key_column, local_key
            USING ERRCODE = 'no_data_found', HINT = 'Bind a row once it is written, in the same transaction if you like.';
    END IF;
    SELECT b.local_key INTO v_other FROM ihub.binding b
    WHERE b.integration_id = v_integration AND b.object_type = _bind_by.object_type
      AND b.external_id = _bind_by.external_id AND b.local_key <> v_key;
    IF FOUND THEN
        RAISE EXCEPTION '% "%" of integration "%" is already bound to row % of %', _bind_by.object_type, external_id,
                        _bind_by.integration, v_other.local_key, local_table
            USING ERRCODE = 'unique_violation',
                  HINT = 'One external object is one local row: unbind the other first with ihub.unbind(integration, object_type, local_key).';
    END IF;
    PERFORM ihub._binding_install_cleanup(local_table, p_caller);
    INSERT INTO ihub.binding AS b (integration_id, object_type, local_table, local_key, external_id, sync_hash, bound_by)
    VALUES (v_integration, _bind_by.object_type, local_table, v_key, external_id,
            ihub._sync_hash(data), p_caller::name)
    ON CONFLICT ON CONSTRAINT binding_local_key DO UPDATE
    SET external_id = EXCLUDED.external_id, sync_hash = EXCLUDED.sync_hash, bound_by = EXCLUDED.bound_by, synced_at = now()
    RETURNING b.id INTO v_id;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.bind(
    integration text,
    object_type text,
    local_table regclass,
    local_key text,
    external_id text,
    data jsonb DEFAULT NULL) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub.unbind(integration text, object_type text, local_key text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM ihub.binding b
    WHERE b.integration_id = ihub._integration_id(unbind.integration) AND b.object_type = unbind.object_type
      AND b.local_key = unbind.local_key;
    RETURN FOUND;
END
$$;

CREATE FUNCTION ihub.external_id(integration text, object_type text, local_key text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.external_id FROM ihub.binding b
    WHERE b.integration_id = ihub._integration_id(external_id.integration) AND b.object_type = external_id.object_type
      AND b.local_key = external_id.local_key
$$;

CREATE FUNCTION ihub.local_key(integration text, object_type text, external_id text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.local_key FROM ihub.binding b
    WHERE b.integration_id = ihub._integration_id(local_key.integration) AND b.object_type = local_key.object_type
      AND b.external_id = local_key.external_id
$$;

-- True unless the row is bound with this very data: a push or an import
-- can skip what was synced already.
CREATE FUNCTION ihub.has_changed(integration text, object_type text, local_key text, data jsonb) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT b.sync_hash IS DISTINCT FROM ihub._sync_hash(has_changed.data) OR b.sync_hash IS NULL
                     FROM ihub.binding b
                     WHERE b.integration_id = ihub._integration_id(has_changed.integration)
                       AND b.object_type = has_changed.object_type AND b.local_key = has_changed.local_key), true)
$$;

-------------------------------------------------------------------------------
-- Upsert
-------------------------------------------------------------------------------

-- SECURITY INVOKER on purpose: the row is written with the caller's
-- rights, and the caller's triggers on it see the caller's search_path.
-- Everything else goes through the public functions above.
CREATE FUNCTION ihub.upsert(integration text, object_type text, target regclass, external_id text, data jsonb)
RETURNS TABLE (local_key text, action text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_key_column name;
    v_key_type text;
    v_unknown text;
    v_columns text;
    v_key text;
BEGIN
    IF data IS NULL OR pg_catalog.jsonb_typeof(data) <> 'object' THEN
        RAISE EXCEPTION 'data must be a JSON object of column values'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"name": "Ada", "email": "ada@example.com"}.';
    END IF;
    IF data = '{}' THEN
        RAISE EXCEPTION 'data must name at least one column'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Its keys are column names of the table, its values theirs.';
    END IF;
    IF coalesce(upsert.external_id, '') = '' THEN
        RAISE EXCEPTION 'an upsert needs the external id'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass the id the other system gives the object.';
    END IF;
    -- (As ihub._binding_key_column, which runs as its owner: this runs as the caller.)
    SELECT a.attname, pg_catalog.format_type(a.atttypid, NULL) INTO v_key_column, v_key_type
    FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = target AND i.indisprimary AND i.indnkeyatts = 1;
    IF v_key_column IS NULL THEN
        RAISE EXCEPTION 'table % has no single-column primary key', target
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'A binding names its row by its primary key: give the table one of one column (an id).';
    END IF;
    SELECT k INTO v_unknown FROM pg_catalog.jsonb_object_keys(data) k
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = target AND a.attname = k AND a.attnum > 0 AND NOT a.attisdropped)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'table % has no column "%"', target, v_unknown
            USING ERRCODE = 'undefined_column',
                  HINT = 'The keys of data are column names; map the external fields to columns first.';
    END IF;
    -- One upsert of an external object at a time: a concurrent one waits,
    -- then finds the binding this one makes.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        pg_catalog.format('ihub.upsert %s %s %s', integration, object_type, upsert.external_id), 0));
    v_key := ihub.local_key(integration, object_type, upsert.external_id);
    IF v_key IS NOT NULL AND NOT ihub.has_changed(integration, object_type, v_key, data) THEN
        RETURN QUERY SELECT v_key, 'unchanged'::text;
        RETURN;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(k), ', ') INTO v_columns FROM pg_catalog.jsonb_object_keys(data) k;
    IF v_key IS NOT NULL THEN
        EXECUTE pg_catalog.format(
            'UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM pg_catalog.jsonb_populate_record(NULL::%1$s, $1)) '
            'WHERE t.%3$I = $2::%4$s RETURNING pg_catalog.format(''%%s'', t.%3$I)',
            target, v_columns, v_key_column, v_key_type)
        INTO v_key USING data, v_key;
        IF v_key IS NOT NULL THEN
            PERFORM ihub.bind(integration, object_type, target, v_key, upsert.external_id, data);
            RETURN QUERY SELECT v_key, 'updated'::text;
            RETURN;
        END IF;
    END IF;
    EXECUTE pg_catalog.format(
        'INSERT INTO %1$s AS t (%2$s) SELECT %2$s FROM pg_catalog.jsonb_populate_record(NULL::%1$s, $1) '
        'RETURNING pg_catalog.format(''%%s'', t.%3$I)',
        target, v_columns, v_key_column)
    INTO v_key USING data;
    PERFORM ihub.bind(integration, object_type, target, v_key, upsert.external_id, data);
    RETURN QUERY SELECT v_key, 'created'::text;
END
$$;

-------------------------------------------------------------------------------
-- Loop prevention
-------------------------------------------------------------------------------

-- Marks the current transaction as a sync of `integration` (or, with
-- false, no longer): its writes to subscribed tables are not sent to that
-- integration's endpoints, and still go to every other integration's.
-- Handlers and jobs of an integration are marked already. The mark is the
-- superuser-context setting ihub.syncing, so only this function (which
-- checks the integration) sets it; it ends with the transaction.
CREATE FUNCTION ihub.syncing(integration text, active boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := (SELECT i.name FROM ihub.integration i WHERE i.id = ihub._integration_id(syncing.integration));
    v_marked text[] := array_remove(string_to_array(current_setting('ihub.syncing', true), ','), v_name);
BEGIN
    IF active THEN
        v_marked := v_marked || v_name;
    END IF;
    PERFORM set_config('ihub.syncing', coalesce(array_to_string(v_marked, ','), ''), true);
END
$$;

-------------------------------------------------------------------------------
-- View
-------------------------------------------------------------------------------

CREATE VIEW ihub.bindings AS
SELECT b.id, i.name AS integration, b.object_type, b.local_table, b.local_key, b.external_id, b.sync_hash,
       b.bound_by, b.created_at, b.synced_at
FROM ihub.binding b JOIN ihub.integration i ON i.id = b.integration_id;

COMMENT ON FUNCTION ihub._binding_key_column(regclass, boolean) IS
    'Internal: a table''s single-column primary key, which binding keys are values of.';
COMMENT ON FUNCTION ihub._sync_hash(jsonb) IS 'Internal: the SHA-256 (hex) of synced data, as bindings store it.';
COMMENT ON FUNCTION ihub._binding_install_cleanup(regclass, regrole) IS
    'Internal: installs the triggers that delete a table''s bindings with its rows (first binding of the table).';
COMMENT ON FUNCTION ihub._binding_deleted() IS 'Internal: trigger deleting the bindings of deleted or truncated rows.';
COMMENT ON FUNCTION ihub.bind(text, text, regclass, text, text, jsonb) IS
    'Links a local row (table, primary key as text) to an external object (integration, object type, external id), storing the hash of data. Returns the binding id.';
COMMENT ON FUNCTION ihub.unbind(text, text, text) IS 'Removes the binding of a local row; true if there was one.';
COMMENT ON FUNCTION ihub.external_id(text, text, text) IS 'The external id bound to a local row, or NULL.';
COMMENT ON FUNCTION ihub.local_key(text, text, text) IS 'The local row (primary key as text) bound to an external id, or NULL.';
COMMENT ON FUNCTION ihub.has_changed(text, text, text, jsonb) IS
    'Whether data differs from what was last synced for a local row (true when it is not bound, or bound without data).';
COMMENT ON FUNCTION ihub.upsert(text, text, regclass, text, jsonb) IS
    'Creates or updates the local row bound to an external object from data (keys are column names) and binds it, with the caller''s rights: created, updated, or unchanged (same data as last synced; nothing written).';
COMMENT ON FUNCTION ihub.syncing(text, boolean) IS
    'Marks the current transaction as a sync of an integration (loop prevention): its writes to subscribed tables are not sent to that integration''s endpoints, only to others''. Handlers and jobs of an integration are marked already.';
COMMENT ON VIEW ihub.bindings IS 'Bindings of local rows to external objects, per integration and object type.';

COMMENT ON FUNCTION ihub._bind_by(text, text, regclass, text, text, jsonb, regrole) IS
    'Internal: ihub.bind for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
REVOKE ALL ON ihub.binding, ihub.bindings FROM PUBLIC;
GRANT SELECT ON ihub.bindings TO ihub_viewer;
GRANT EXECUTE ON FUNCTION ihub.external_id(text, text, text), ihub.local_key(text, text, text),
                          ihub.has_changed(text, text, text, jsonb)
TO ihub_viewer;
GRANT EXECUTE ON FUNCTION
    ihub.bind(text, text, regclass, text, text, jsonb),
    ihub.unbind(text, text, text),
    ihub.upsert(text, text, regclass, text, jsonb),
    ihub.syncing(text, boolean)
TO ihub_developer;

-------------------------------------------------------------------------------
-- Custom fields (issue 12): sql/custom_fields.sql
-------------------------------------------------------------------------------

CREATE TABLE ihub.custom_field (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target      regclass NOT NULL,
    name        name NOT NULL,
    -- The column's number, by which a dropped column is recognised (sql_drop).
    attnum      smallint NOT NULL,
    type        text NOT NULL CHECK (type IN ('boolean', 'text', 'float', 'integer', 'selection', 'date', 'timestamp')),
    label       text,
    description text,
    options     text[],
    export_to   text[] NOT NULL DEFAULT '{}',
    created_by  name NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT custom_field_column UNIQUE (target, name),
    CHECK ((type = 'selection') = (options IS NOT NULL))
);
COMMENT ON TABLE ihub.custom_field IS
    'Custom fields: columns added by ihub.add_custom_field, with their type, label, options and the integrations whose payloads include them.';

SELECT pg_catalog.pg_extension_config_dump('ihub.custom_field', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.custom_field_id_seq', '');

-- The column type of each custom field type. timestamp is with time zone:
-- values from other systems come with their offset.
CREATE FUNCTION ihub._custom_field_sql_type(p_type text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE p_type WHEN 'boolean' THEN 'boolean' WHEN 'text' THEN 'text' WHEN 'float' THEN 'double precision'
                       WHEN 'integer' THEN 'bigint' WHEN 'selection' THEN 'text' WHEN 'date' THEN 'date'
                       WHEN 'timestamp' THEN 'timestamp with time zone' END
$$;

-- Altering a table is its owner's right: the caller must be a member of
-- the owner's role, as ALTER TABLE requires.
CREATE FUNCTION ihub._custom_field_check_owner(p_target regclass, p_caller regrole) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pg_class;
BEGIN
    SELECT * INTO v FROM pg_class c WHERE c.oid = p_target;
    IF v.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_target
            USING ERRCODE = 'wrong_object_type', HINT = 'Custom fields are columns of tables.';
    END IF;
    IF NOT pg_has_role(p_caller, v.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table % to change its custom fields', p_target
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Adding or dropping a custom field alters the table: ask its owner (%s), or a member of that role.',
                                v.relowner::regrole);
    END IF;
END
$$;

CREATE FUNCTION ihub._add_custom_field_by(
    target regclass,
    name text,
    type text,
    label text DEFAULT NULL,
    description text DEFAULT NULL,
    options text[] DEFAULT NULL,
    export_to text[] DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sql_type text := ihub._custom_field_sql_type(_add_custom_field_by.type);
    v_unknown text;
    v_id bigint;
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'a custom field needs a table' USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass target => ''contacts''.';
    END IF;
    PERFORM ihub._custom_field_check_owner(target, p_caller);
    IF _add_custom_field_by.name IS NULL OR _add_custom_field_by.name !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'invalid custom field name "%"', _add_custom_field_by.name
            USING ERRCODE = 'invalid_name',
                  HINT = 'Use 1 to 63 lower-case letters, digits and "_", not starting with a digit: it becomes a column name.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = target AND a.attname = _add_custom_field_by.name AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'table % already has a column "%"', target, _add_custom_field_by.name
            USING ERRCODE = 'duplicate_column', HINT = 'Choose another name.';
    END IF;
    IF v_sql_type IS NULL THEN
        RAISE EXCEPTION 'unknown custom field type "%"', _add_custom_field_by.type
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Types: boolean, text, float, integer, selection (one of options), date, timestamp.';
    END IF;
    IF _add_custom_field_by.type = 'selection' THEN
        IF NOT ihub._is_value_list(options) THEN
            RAISE EXCEPTION 'a selection needs its options: distinct, non-empty values'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example options => ARRAY[''bronze'', ''silver'', ''gold''].';
        END IF;
    ELSIF options IS NOT NULL THEN
        RAISE EXCEPTION 'only a selection has options'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave options out, or make the field a selection.';
    END IF;
    SELECT e INTO v_unknown FROM unnest(export_to) e
    WHERE e IS NULL OR NOT EXISTS (SELECT 1 FROM ihub.integration i WHERE i.name = e) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'integration "%" does not exist', v_unknown
            USING ERRCODE = 'undefined_object', HINT = 'export_to lists integrations by name (see ihub.integrations).';
    END IF;
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', target, _add_custom_field_by.name, v_sql_type)
         || CASE WHEN _add_custom_field_by.type = 'selection'
                 THEN format(' CONSTRAINT %I CHECK (%I IN (%s))', _add_custom_field_by.name || '_options', _add_custom_field_by.name,
                             (SELECT string_agg(quote_literal(o), ', ') FROM unnest(options) o))
                 ELSE '' END;
    IF label IS NOT NULL OR description IS NOT NULL THEN
        EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', target, _add_custom_field_by.name, concat_ws(E'\n', label, description));
    END IF;
    INSERT INTO ihub.custom_field (target, name, attnum, type, label, description, options, export_to, created_by)
    SELECT target, a.attname, a.attnum, _add_custom_field_by.type, label, description, options,
           coalesce(ARRAY(SELECT DISTINCT e FROM unnest(export_to) e ORDER BY e), '{}'), p_caller::name
    FROM pg_attribute a WHERE a.attrelid = target AND a.attname = _add_custom_field_by.name
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.add_custom_field(
    target regclass,
    name text,
    type text,
    label text DEFAULT NULL,
    description text DEFAULT NULL,
    options text[] DEFAULT NULL,
    export_to text[] DEFAULT NULL) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._drop_custom_field_by(target regclass, name text, p_caller regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ihub.custom_field f WHERE f.target = _drop_custom_field_by.target AND f.name = _drop_custom_field_by.name) THEN
        RAISE EXCEPTION 'table % has no custom field "%"', target, _drop_custom_field_by.name
            USING ERRCODE = 'undefined_column', HINT = 'See them in ihub.custom_fields; other columns are dropped with ALTER TABLE.';
    END IF;
    PERFORM ihub._custom_field_check_owner(target, p_caller);
    -- The event trigger ihub_sql_drop removes the registration with the column.
    EXECUTE format('ALTER TABLE %s DROP COLUMN %I', target, _drop_custom_field_by.name);
END
$$;

CREATE FUNCTION ihub.drop_custom_field(target regclass, name text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- The columns a subscription's payload leaves out because they are custom
-- fields not exported to its integration (ihub._route).
CREATE FUNCTION ihub._custom_fields_hidden(p_table regclass, p_integration text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(f.name::text), '{}') FROM ihub.custom_field f
    WHERE f.target = p_table AND NOT p_integration = ANY (f.export_to)
$$;

CREATE VIEW ihub.custom_fields AS
SELECT f.id, f.target, f.name, f.type, f.label, f.description, f.options, f.export_to, f.created_by, f.created_at
FROM ihub.custom_field f;

COMMENT ON FUNCTION ihub._custom_field_sql_type(text) IS 'Internal: the column type of a custom field type.';
COMMENT ON FUNCTION ihub._custom_field_check_owner(regclass, regrole) IS
    'Internal: refuses to change the custom fields of a table the caller does not own (as ALTER TABLE would).';
COMMENT ON FUNCTION ihub.add_custom_field(regclass, text, text, text, text, text[], text[]) IS
    'Adds a custom field (a column: boolean, text, float, integer, selection, date or timestamp) to a table you own, commented with its label and description; payloads of the integrations in export_to include it, others never. Returns its id.';
COMMENT ON FUNCTION ihub.drop_custom_field(regclass, text) IS 'Drops a custom field (its column and registration).';
COMMENT ON FUNCTION ihub._custom_fields_hidden(regclass, text) IS
    'Internal: the custom fields of a table that an integration''s payloads leave out.';
COMMENT ON VIEW ihub.custom_fields IS 'Custom fields: table, column, type, label, options and the integrations that get them.';

DO $$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT p.oid::regprocedure AS fn, substr(p.proname, 2, length(p.proname) - 4) AS public_name
             FROM pg_proc p WHERE p.pronamespace = 'ihub'::regnamespace AND p.proname IN ('_add_custom_field_by', '_drop_custom_field_by')
    LOOP
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', v.fn,
                       format('Internal: ihub.%s for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).', v.public_name));
    END LOOP;
END
$$;
REVOKE ALL ON ihub.custom_field, ihub.custom_fields FROM PUBLIC;
GRANT SELECT ON ihub.custom_fields TO ihub_viewer;
GRANT EXECUTE ON FUNCTION ihub.add_custom_field(regclass, text, text, text, text, text[], text[]),
                          ihub.drop_custom_field(regclass, text)
TO ihub_developer;

-- Dropped tables and columns take their bindings and custom fields along.
-- Defined here, once both tables exist: this script's own statements fire
-- the event trigger.
CREATE OR REPLACE FUNCTION ihub._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub ihub.subscription;
    v record;
BEGIN
    FOR v IN
        SELECT s.id, d.object_identity FROM ihub.subscription s
        JOIN pg_event_trigger_dropped_objects() d ON d.classid = 'pg_class'::regclass AND d.objid = s.source
        WHERE d.object_type IN ('table', 'partitioned table')
    LOOP
        SELECT * INTO v_sub FROM ihub.subscription WHERE id = v.id;
        PERFORM ihub._subscription_broken(v_sub,
            format('its table %s was dropped (%s); changes not yet sent were lost with it', v.object_identity, tg_tag));
    END LOOP;
    -- Bindings of rows of dropped tables go with them.
    DELETE FROM ihub.binding b USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = b.local_table AND d.object_type IN ('table', 'partitioned table');
    -- Custom fields go with their column or table.
    DELETE FROM ihub.custom_field f USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = f.target
      AND (d.object_type IN ('table', 'partitioned table') OR (d.object_type = 'table column' AND d.objsubid = f.attnum));
END
$$;

-------------------------------------------------------------------------------
-- ihub.test_connection (issue 12): src/outbound/test_connection.rs
-------------------------------------------------------------------------------

-- What ihub.test_connection sends: the endpoint's method, URL, headers,
-- credentials and live signing secrets, as a claim gives them to a
-- dispatcher. Only for that Rust function (src/outbound/test_connection.rs),
-- which calls it with the owner's rights; nobody holds EXECUTE on it.
CREATE FUNCTION ihub._connection_request(p_endpoint text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object(
        'method', e.method, 'url', e.url, 'headers', e.headers,
        -- An OAuth2 credential's access token, as the claim sends it.
        'auth', CASE WHEN o.id IS NULL THEN c.auth
                     WHEN o.access_token IS NOT NULL AND (o.expires_at IS NULL OR o.expires_at > now())
                     THEN jsonb_build_object('type', 'bearer', 'token', o.access_token)
                     ELSE '{"type": "none"}' END,
        'not_sendable', CASE WHEN o.id IS NOT NULL AND (o.access_token IS NULL OR o.expires_at <= now())
                             THEN format('OAuth2 credential %s has no valid access token (%s)', o.name,
                                         coalesce(o.last_error, CASE WHEN o.access_token IS NULL THEN 'none issued yet' ELSE 'it expired' END))
                        END,
        'timeout_ms', coalesce(e.timeout_ms, ihub._default_timeout_ms()), 'enabled', e.enabled,
        'secrets', (SELECT coalesce(jsonb_agg(s.secret ORDER BY s.id DESC), '[]') FROM ihub.endpoint_secret s
                    WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now())))
    FROM (SELECT (ihub._endpoint(p_endpoint)).*) e
    LEFT JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
    LEFT JOIN LATERAL (
        SELECT o.id, o.name, o.expires_at, o.last_error, s.access_token
        FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id
        WHERE c.auth ->> 'type' = 'oauth2' AND o.integration_id = e.integration_id AND o.name = c.auth ->> 'credential'
    ) o ON true
$$;

CREATE FUNCTION ihub.test_connection("endpoint" text) RETURNS jsonb
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'test_connection_wrapper';
COMMENT ON FUNCTION ihub.test_connection(text) IS
    'Sends one signed test request to an endpoint now, as a delivery would be sent, and reports ok, status, latency, error category and error; records nothing.';
COMMENT ON FUNCTION ihub._connection_request(text) IS
    'Internal (ihub.test_connection): an endpoint''s method, URL, headers, credentials and live secrets, as a claim gives them.';
REVOKE ALL ON FUNCTION ihub.test_connection(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ihub.test_connection(text) TO ihub_developer;

-------------------------------------------------------------------------------
-- Responses in SQL, and OAuth2 (issue 12): sql/outbound.sql, sql/oauth2.sql
-------------------------------------------------------------------------------

ALTER TABLE ihub.delivery ADD COLUMN on_response regprocedure, ADD COLUMN response_context jsonb,
    ADD COLUMN requested_by regrole, ADD COLUMN refused_token integer;

CREATE OR REPLACE FUNCTION ihub._join_url(
	"p_url" TEXT, /* & str */
	"p_path" TEXT /* Option < & str > */
) RETURNS TEXT /* String */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'join_url_wrapper';
CREATE FUNCTION ihub."_with_query"(
	"path" TEXT, /* Option < & str > */
	"query" jsonb /* JsonB */
) RETURNS TEXT /* Option < String > */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'with_query_wrapper';
CREATE FUNCTION ihub."_oauth2_new_state"() RETURNS TEXT /* String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'new_state_wrapper';
CREATE FUNCTION ihub."_oauth2_authorize_link"(
	"authorize_url" TEXT, /* & str */
	"client_id" TEXT, /* & str */
	"redirect_uri" TEXT, /* & str */
	"scope" TEXT, /* Option < & str > */
	"state" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'authorize_link_wrapper';
CREATE FUNCTION ihub."_wake_maintenance"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wake_maintenance_wrapper';

-- What a response handler (ihub.http_request(..., on_response => ...))
-- gets when its request ends: delivered (state done), failed, or dead after
-- its last retry.
CREATE TYPE ihub.http_response AS (
    delivery_id bigint,
    state       text,
    status      integer,
    headers     jsonb,
    body        text,
    -- The body as JSON, NULL when it is not JSON.
    body_json   jsonb,
    context     jsonb,
    attempts    integer,
    error       text
);

-- A function that can handle responses: one ihub.http_response argument,
-- one result or void, executable by the role the job runs as.
CREATE FUNCTION ihub._check_response_function(p_fn regprocedure, p_role name) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pg_proc;
BEGIN
    SELECT * INTO v FROM pg_proc WHERE oid = p_fn;
    IF v.prokind <> 'f' OR v.pronargs <> 1 OR v.proargtypes[0] <> 'ihub.http_response'::regtype OR v.proretset THEN
        RAISE EXCEPTION 'function % cannot handle responses', p_fn
            USING ERRCODE = 'invalid_function_definition',
                  HINT = 'A response handler takes one ihub.http_response argument, e.g. CREATE FUNCTION import_page(r ihub.http_response) RETURNS void.';
    END IF;
    IF NOT has_function_privilege(p_role, p_fn, 'EXECUTE') THEN
        RAISE EXCEPTION 'role % may not execute %', p_role, p_fn
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'The handler runs as a job of the role that made the request; grant it EXECUTE on the function.';
    END IF;
END
$$;

CREATE FUNCTION ihub._http_request_by(
    endpoint text,
    body jsonb DEFAULT NULL,
    method text DEFAULT NULL,
    path text DEFAULT NULL,
    headers jsonb DEFAULT NULL,
    event_type text DEFAULT 'http_request',
    query jsonb DEFAULT NULL,
    on_response regprocedure DEFAULT NULL,
    context jsonb DEFAULT NULL,
    p_caller regrole DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint;
    v_integration ihub.integration;
    v_method text := upper(_http_request_by.method);
    v_path text := _http_request_by.path;
    v_id bigint;
    v_size bigint;
    v_event text := 'evt_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    PERFORM ihub._require_workers();
    LOOP
        v_endpoint := ihub._endpoint(_http_request_by.endpoint);
        -- Kept until commit, as a foreign key check would (see
        -- ihub._endpoint_deleted). An endpoint deleted since it was looked
        -- up leaves nothing to lock: look the name up again. Read again
        -- under the lock: its ordering cannot change until commit.
        SELECT * INTO v_endpoint FROM ihub.endpoint e WHERE e.id = v_endpoint.id FOR KEY SHARE;
        EXIT WHEN FOUND;
    END LOOP;
    -- First in, first out in commit order: requests to an endpoint ordered
    -- as a whole take its turn (ihub._endpoint_turn) until commit, so that
    -- none commits an earlier place in the queue after a later one went.
    IF v_endpoint.ordering = 'endpoint' THEN
        PERFORM ihub._endpoint_turn(v_endpoint.id, true);
    END IF;
    SELECT * INTO v_integration FROM ihub.integration WHERE id = v_endpoint.integration_id;
    IF v_integration.state = 'inactive' THEN
        RAISE EXCEPTION 'integration "%" is inactive', v_integration.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Enable it first: SELECT ihub.enable_integration(%L);', v_integration.name);
    END IF;
    IF v_method IS NOT NULL AND v_method NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') THEN
        RAISE EXCEPTION 'unsupported HTTP method "%"', _http_request_by.method
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use GET, POST, PUT, PATCH or DELETE.';
    END IF;
    -- A GET sends no body, so it needs none.
    IF body IS NULL AND coalesce(v_method, v_endpoint.method) <> 'GET' THEN
        RAISE EXCEPTION 'body must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Pass ''{}'' for an empty object; only a GET goes without a body.';
    END IF;
    v_size := octet_length(coalesce(body, '{}')::text) + coalesce(octet_length(context::text), 0);
    IF v_size > pg_size_bytes(current_setting('ihub.max_body_size')) THEN
        RAISE EXCEPTION 'body and context are % bytes, more than ihub.max_body_size (%)', v_size, current_setting('ihub.max_body_size')
            USING ERRCODE = 'program_limit_exceeded', HINT = 'Send less, or raise ihub.max_body_size.';
    END IF;
    -- A path starts with / or ?: either ends the URL's authority, so no path
    -- can send the request (and the endpoint's credentials) to another host.
    IF v_path IS NOT NULL AND v_path !~ '^[/?][^[:space:]#]*$' THEN
        RAISE EXCEPTION 'invalid path "%"', v_path
            USING ERRCODE = 'invalid_parameter_value', HINT = 'A path is appended to the endpoint URL; start it with / or ? and leave out spaces.';
    END IF;
    IF query IS NOT NULL THEN
        v_path := ihub._with_query(v_path, query);
    END IF;
    IF _http_request_by.headers IS NOT NULL THEN
        PERFORM ihub._check_headers(_http_request_by.headers);
    END IF;
    IF NOT ihub._type_accepted(v_endpoint.event_types, coalesce(event_type, 'http_request')) THEN
        RAISE EXCEPTION 'endpoint "%" does not accept event type "%"', v_endpoint.name, coalesce(event_type, 'http_request')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('It accepts %s; pass one of them as event_type, or change them with ihub.alter_endpoint(%L, event_types => ...).',
                                array_to_string(v_endpoint.event_types, ', '), v_endpoint.name);
    END IF;
    IF on_response IS NOT NULL THEN
        PERFORM ihub._check_response_function(on_response, pg_get_userbyid(p_caller));
    ELSIF context IS NOT NULL THEN
        RAISE EXCEPTION 'context is for a response handler' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass on_response => ''my_handler(ihub.http_response)''::regprocedure too: the handler gets the context.';
    END IF;
    -- An endpoint ordered by key sends each request in order with itself
    -- only (its own key); one ordered as a whole, after all queued before it.
    INSERT INTO ihub.delivery (event_id, endpoint_id, event_type, payload, method, path, headers,
                               on_response, response_context, requested_by, ordering_key)
    VALUES (v_event, v_endpoint.id, coalesce(event_type, 'http_request'),
            coalesce(body, '{}'), v_method, v_path, _http_request_by.headers,
            on_response, CASE WHEN on_response IS NOT NULL THEN context END,
            CASE WHEN on_response IS NOT NULL THEN p_caller END,
            ihub._ordering_key_of(v_endpoint.ordering, v_event))
    RETURNING id INTO v_id;
    PERFORM ihub._wake();
    RETURN v_id;
END
$$;

-- A C entry point now, with new arguments.
DROP FUNCTION ihub.http_request(text, jsonb, text, text, jsonb, text);
-- A C entry point (src/caller.rs): the response handler runs as the role
-- that called it, never as the owner of a SECURITY DEFINER function in
-- between, and the caller cannot be forged.
CREATE FUNCTION ihub.http_request(
    endpoint text,
    body jsonb DEFAULT NULL,
    method text DEFAULT NULL,
    path text DEFAULT NULL,
    headers jsonb DEFAULT NULL,
    event_type text DEFAULT 'http_request',
    query jsonb DEFAULT NULL,
    on_response regprocedure DEFAULT NULL,
    context jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- A text as jsonb, NULL when it is not JSON.
CREATE FUNCTION ihub._try_json(p_text text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN p_text::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- Called by ihub._settle for the deliveries of a batch it settled that have
-- a response handler and ended: one job each, of the role that made the
-- request, marked as syncing the endpoint's integration, with the response
-- (as ihub.http_response, in jsonb) for its argument. In the settle's
-- transaction: a response is handed over once, or not at all.
CREATE FUNCTION ihub._respond(p_results jsonb, p_settled bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT r.delivery_id, r.state, r.status, r.error, r.response_headers, r.response, d.on_response, d.response_context,
               d.requested_by, d.attempts, e.integration_id
        FROM jsonb_to_recordset(p_results) AS r(delivery_id bigint, state text, status integer, error text,
                                                response_headers jsonb, response jsonb, respond boolean)
        JOIN ihub.delivery d ON d.id = r.delivery_id
        JOIN ihub.endpoint e ON e.id = d.endpoint_id
        WHERE r.respond AND r.state IN ('done', 'failed', 'dead') AND r.delivery_id = ANY (p_settled)
          AND d.on_response IS NOT NULL
    LOOP
        PERFORM ihub._enqueue(v.on_response,
                              jsonb_build_object('delivery_id', v.delivery_id, 'state', v.state, 'status', v.status,
                                                 'headers', v.response_headers, 'body', v.response -> 'body',
                                                 'body_json', CASE WHEN NOT coalesce((v.response ->> 'truncated')::boolean, false)
                                                                   THEN ihub._try_json(v.response ->> 'body') END,
                                                 'context', v.response_context,
                                                 'attempts', v.attempts,
                                                 'error', coalesce(v.error, v.response ->> 'problem')),
                              10, now(), 5, NULL, v.integration_id, NULL, NULL, v.requested_by);
    END LOOP;
END
$$;

-- Replays go through the caller now (C entry points), keeping their signatures.
-- A replayed request with a response handler hands its response over
-- again, to a job of the role that made the request: only members of that
-- role (or ihub_admin, see ihub._may_act_for) may replay it.
CREATE FUNCTION ihub._replay_by(delivery_id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.delivery;
BEGIN
    PERFORM ihub._require_workers();
    SELECT * INTO v FROM ihub.delivery d WHERE d.id = _replay_by.delivery_id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'delivery % does not exist', delivery_id
            USING ERRCODE = 'undefined_object', HINT = 'List deliveries in ihub.deliveries.';
    ELSIF v.state NOT IN ('dead', 'failed') THEN
        RAISE EXCEPTION 'delivery % is %; only dead or failed deliveries can be replayed', delivery_id, v.state
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Pending, running and retrying deliveries are still in the queue.';
    END IF;
    IF v.on_response IS NOT NULL THEN
        PERFORM ihub._require_may_act_for(p_caller, v.requested_by, format('delivery %s, whose response handler', v.id));
    END IF;
    -- Its ordering cannot change until commit (see ihub._change_ordering).
    PERFORM FROM ihub.endpoint e WHERE e.id = v.endpoint_id FOR KEY SHARE;
    UPDATE ihub.delivery d SET state = 'pending', budget_start = d.attempts, run_at = now(),
        ordering_key = ihub._ordering_key_of(e.ordering, coalesce(d.ordering_key, d.event_id))
    FROM ihub.endpoint e WHERE d.id = v.id AND e.id = d.endpoint_id;
    PERFORM ihub._wake();
END
$$;

-- Replays an endpoint's dead and failed deliveries since a time, leaving
-- those whose response handler runs as a role the caller may not act for.
CREATE FUNCTION ihub._replay_dead_by(endpoint text, since timestamptz, p_caller regrole) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    PERFORM ihub._require_workers();
    -- Its ordering cannot change until commit (see ihub._change_ordering).
    PERFORM FROM ihub.endpoint e WHERE e.id = (ihub._endpoint(_replay_dead_by.endpoint)).id FOR KEY SHARE;
    UPDATE ihub.delivery d
    SET state = 'pending', budget_start = d.attempts, run_at = now(),
        ordering_key = ihub._ordering_key_of(e.ordering, coalesce(d.ordering_key, d.event_id))
    FROM ihub.endpoint e
    WHERE e.id = d.endpoint_id AND d.endpoint_id = (ihub._endpoint(_replay_dead_by.endpoint)).id
      AND d.state IN ('dead', 'failed') AND d.created_at >= coalesce(since, '-infinity')
      AND (d.on_response IS NULL OR ihub._may_act_for(p_caller, d.requested_by));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM ihub._wake();
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION ihub.replay(delivery_id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE OR REPLACE FUNCTION ihub.replay_dead(endpoint text, since timestamptz DEFAULT '-infinity') RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- Delivery controls (endpoint_controls.sql): new arguments.
DROP FUNCTION ihub.create_endpoint(text, text, text, text, jsonb, jsonb, text, integer, jsonb);
CREATE FUNCTION ihub.create_endpoint(
    integration text,
    name text,
    url text,
    method text DEFAULT 'POST',
    headers jsonb DEFAULT '{}',
    auth jsonb DEFAULT NULL,
    secret text DEFAULT NULL,
    timeout_ms integer DEFAULT NULL,
    retry jsonb DEFAULT NULL,
    circuit jsonb DEFAULT NULL,
    rate_limit double precision DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    ordering text DEFAULT NULL,
    signature text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(create_endpoint.integration);
    v_ordering text := ihub._check_ordering(create_endpoint.ordering);
    -- v1: HMAC-SHA256 with a whsec_ secret; v1a: ed25519 with a whsk_ key.
    v_signature text := lower(coalesce(create_endpoint.signature,
                                       CASE WHEN create_endpoint.secret LIKE 'whsk\_%' THEN 'v1a' ELSE 'v1' END));
    v_method text := upper(coalesce(create_endpoint.method, 'POST'));
    v_auth jsonb := ihub._normalize_auth(create_endpoint.auth);
    v_id bigint;
BEGIN
    PERFORM ihub._check_name('endpoint', create_endpoint.name);
    IF EXISTS (SELECT 1 FROM ihub.endpoint e WHERE e.name = create_endpoint.name) THEN
        RAISE EXCEPTION 'endpoint "%" already exists', create_endpoint.name
            USING ERRCODE = 'duplicate_object', HINT = 'Endpoint names are unique across integrations; choose another.';
    END IF;
    IF v_method NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') THEN
        RAISE EXCEPTION 'unsupported HTTP method "%"', create_endpoint.method
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use GET, POST, PUT, PATCH or DELETE.';
    END IF;
    IF create_endpoint.timeout_ms IS NOT NULL AND create_endpoint.timeout_ms NOT BETWEEN 1 AND 300000 THEN
        RAISE EXCEPTION 'timeout_ms must be between 1 and 300000, got %', create_endpoint.timeout_ms
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL to use ihub.default_timeout.';
    END IF;
    PERFORM ihub._check_headers(coalesce(create_endpoint.headers, '{}'));
    PERFORM ihub._check_limits(create_endpoint.rate_limit, create_endpoint.max_in_flight);
    PERFORM ihub._check_event_type(t, true) FROM unnest(create_endpoint.event_types) t;
    IF v_auth ->> 'type' = 'oauth2' AND NOT EXISTS (
        SELECT 1 FROM ihub.oauth2 o WHERE o.integration_id = v_integration AND o.name = v_auth ->> 'credential') THEN
        RAISE EXCEPTION 'OAuth2 credential "%" of integration "%" does not exist', v_auth ->> 'credential', create_endpoint.integration
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it first with ihub.create_oauth2(integration, name, token_url, client_id, client_secret, ...).';
    END IF;
    IF v_signature NOT IN ('v1', 'v1a') THEN
        RAISE EXCEPTION 'invalid signature "%"', create_endpoint.signature
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use v1 (HMAC-SHA256 with a whsec_ secret) or v1a (ed25519 with a whsk_ secret key; receivers verify with its whpk_ public key, in ihub.endpoints.public_keys).';
    END IF;
    IF create_endpoint.secret IS NOT NULL THEN
        PERFORM ihub._check_signing_key(create_endpoint.secret);
        IF (create_endpoint.secret LIKE 'whsk\_%') <> (v_signature = 'v1a') THEN
            RAISE EXCEPTION 'a % secret does not make % signatures', CASE WHEN v_signature = 'v1a' THEN 'whsec_' ELSE 'whsk_' END, v_signature
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'v1 signs with a whsec_ secret, v1a with a whsk_ secret key; leave out secret to have one generated.';
        END IF;
    END IF;

    INSERT INTO ihub.endpoint (integration_id, name, url, method, headers, auth_type, timeout_ms, retry, circuit,
                               rate_limit, max_in_flight, event_types, ordering)
    VALUES (v_integration, create_endpoint.name, ihub._check_url(create_endpoint.url), v_method,
            coalesce(create_endpoint.headers, '{}'), v_auth ->> 'type', create_endpoint.timeout_ms,
            ihub._normalize_retry(create_endpoint.retry), ihub._normalize_circuit(create_endpoint.circuit),
            nullif(create_endpoint.rate_limit, 0), nullif(create_endpoint.max_in_flight, 0),
            nullif(create_endpoint.event_types, '{}'), v_ordering)
    RETURNING id INTO v_id;
    IF v_auth ->> 'type' <> 'none' THEN
        INSERT INTO ihub.endpoint_credential (endpoint_id, auth) VALUES (v_id, v_auth);
    END IF;
    INSERT INTO ihub.endpoint_secret (endpoint_id, secret)
    VALUES (v_id, coalesce(create_endpoint.secret,
                           CASE v_signature WHEN 'v1a' THEN ihub._generate_ed25519_key() ELSE ihub._generate_secret() END));
    IF coalesce(create_endpoint.rate_limit, 0) > 0 OR coalesce(create_endpoint.max_in_flight, 0) > 0 THEN
        PERFORM ihub._endpoint_state_for(v_id);
    END IF;
    RETURN v_id;
END
$$;

CREATE TABLE ihub.oauth2 (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id),
    name           text NOT NULL,
    grant_type     text NOT NULL CHECK (grant_type IN ('refresh_token', 'client_credentials')),
    token_url      text NOT NULL,
    -- Where a person authorizes the client (the authorization-code flow).
    authorize_url  text,
    client_id      text NOT NULL CHECK (client_id <> ''),
    scope          text,
    client_auth    text NOT NULL DEFAULT 'post' CHECK (client_auth IN ('post', 'basic')),
    -- When the access token expires, if the provider said.
    expires_at     timestamptz,
    -- When the maintenance worker asks for a new access token next. NULL:
    -- nothing to ask with yet (no refresh token), or no expiry to beat.
    refresh_at     timestamptz,
    refreshed_at   timestamptz,
    -- Counts access tokens: a 401 asks for a new one only when it answered
    -- the current one, so that many 401s to one token make one refresh.
    token_version  integer NOT NULL DEFAULT 0,
    -- When a receiver answered 401 to a new token too: for 10 minutes after,
    -- 401s ask for no new token (ihub._settle).
    refused_at     timestamptz,
    -- Failed token requests in a row, and the last one's error.
    failures       integer NOT NULL DEFAULT 0,
    last_error     text,
    last_error_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT oauth2_name UNIQUE (integration_id, name)
);
CREATE INDEX oauth2_refresh_idx ON ihub.oauth2 (refresh_at) WHERE refresh_at IS NOT NULL;
COMMENT ON TABLE ihub.oauth2 IS
    'OAuth2 credentials of integrations: token endpoint, client, grant and the state of the access token. Secrets are in ihub.oauth2_secret.';

CREATE TABLE ihub.oauth2_secret (
    oauth2_id        bigint PRIMARY KEY REFERENCES ihub.oauth2 (id) ON DELETE CASCADE,
    client_secret    text NOT NULL,
    refresh_token    text,
    access_token     text,
    -- An authorization under way (ihub.oauth2_authorize_url): the SHA-256
    -- of its state, until when it may come back, and the redirect URI the
    -- code must be exchanged with.
    state_hash       bytea,
    state_expires_at timestamptz,
    redirect_uri     text
);
COMMENT ON TABLE ihub.oauth2_secret IS
    'Secrets of OAuth2 credentials: client secret, refresh and access tokens, the state of an authorization under way. ihub_admin only.';

SELECT pg_catalog.pg_extension_config_dump('ihub.oauth2', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.oauth2_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.oauth2_secret', '');

-------------------------------------------------------------------------------
-- Configuring
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._oauth2(p_integration text, p_name text) RETURNS ihub.oauth2
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2;
BEGIN
    SELECT * INTO v FROM ihub.oauth2 o
    WHERE o.integration_id = ihub._integration_id(p_integration) AND o.name = p_name;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" of integration "%" does not exist', p_name, p_integration
            USING ERRCODE = 'undefined_object', HINT = 'List them in ihub.oauth2_credentials; create one with ihub.create_oauth2.';
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION ihub.create_oauth2(
    integration text,
    name text,
    token_url text,
    client_id text,
    client_secret text,
    refresh_token text DEFAULT NULL,
    scope text DEFAULT NULL,
    "grant" text DEFAULT 'refresh_token',
    authorize_url text DEFAULT NULL,
    client_auth text DEFAULT 'post'
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(create_oauth2.integration);
    v_id bigint;
BEGIN
    PERFORM ihub._check_name('OAuth2 credential', create_oauth2.name);
    IF EXISTS (SELECT 1 FROM ihub.oauth2 o WHERE o.integration_id = v_integration AND o.name = create_oauth2.name) THEN
        RAISE EXCEPTION 'OAuth2 credential "%" of integration "%" already exists', create_oauth2.name, create_oauth2.integration
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or ihub.drop_oauth2 it first.';
    END IF;
    IF create_oauth2."grant" IS NULL OR create_oauth2."grant" NOT IN ('refresh_token', 'client_credentials') THEN
        RAISE EXCEPTION 'unsupported OAuth2 grant "%"', create_oauth2."grant"
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use ''refresh_token'' (with a refresh token, or authorized by a person through ihub.oauth2_authorize_url) or ''client_credentials''.';
    END IF;
    IF create_oauth2.client_auth IS NULL OR create_oauth2.client_auth NOT IN ('post', 'basic') THEN
        RAISE EXCEPTION 'unsupported client authentication "%"', create_oauth2.client_auth
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '''post'' sends client_id and client_secret in the form, ''basic'' as HTTP Basic credentials.';
    END IF;
    IF coalesce(create_oauth2.client_id, '') = '' OR coalesce(create_oauth2.client_secret, '') = '' THEN
        RAISE EXCEPTION 'client_id and client_secret must not be empty'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'They are what the provider issued when the client was registered.';
    END IF;
    IF create_oauth2.refresh_token = '' THEN
        RAISE EXCEPTION 'refresh_token must not be empty' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass NULL to have a person authorize the client through ihub.oauth2_authorize_url.';
    END IF;
    IF create_oauth2."grant" = 'client_credentials' AND create_oauth2.refresh_token IS NOT NULL THEN
        RAISE EXCEPTION 'the client_credentials grant takes no refresh token' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Leave refresh_token out, or use the refresh_token grant.';
    END IF;
    IF create_oauth2.authorize_url IS NOT NULL AND create_oauth2.authorize_url !~ '^https?://[^[:space:]]+$' THEN
        RAISE EXCEPTION 'authorize_url must be an http or https URL' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The provider''s authorization endpoint, e.g. https://accounts.example.com/oauth/v2/auth.';
    END IF;

    INSERT INTO ihub.oauth2 (integration_id, name, grant_type, token_url, authorize_url, client_id, scope, client_auth,
                             refresh_at)
    VALUES (v_integration, create_oauth2.name, create_oauth2."grant", ihub._check_url(create_oauth2.token_url),
            create_oauth2.authorize_url, create_oauth2.client_id, nullif(create_oauth2.scope, ''), create_oauth2.client_auth,
            -- Something to ask with: the first access token at once.
            CASE WHEN create_oauth2."grant" = 'client_credentials' OR create_oauth2.refresh_token IS NOT NULL THEN now() END)
    RETURNING id INTO v_id;
    INSERT INTO ihub.oauth2_secret (oauth2_id, client_secret, refresh_token)
    VALUES (v_id, create_oauth2.client_secret, create_oauth2.refresh_token);
    PERFORM ihub._wake_maintenance();
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.drop_oauth2(integration text, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2 := ihub._oauth2(drop_oauth2.integration, drop_oauth2.name);
    v_users text;
BEGIN
    SELECT string_agg(e.name, ', ' ORDER BY e.name) INTO v_users
    FROM ihub.endpoint e JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
    WHERE e.integration_id = v.integration_id AND c.auth ->> 'type' = 'oauth2' AND c.auth ->> 'credential' = v.name;
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" is used by endpoint(s) %', v.name, v_users
            USING ERRCODE = 'dependent_objects_still_exist', HINT = 'Delete those endpoints (or their integration) first.';
    END IF;
    DELETE FROM ihub.oauth2 WHERE id = v.id;
END
$$;

-- Asks the maintenance worker for a new access token now.
CREATE FUNCTION ihub.refresh_oauth2(integration text, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2 := ihub._oauth2(refresh_oauth2.integration, refresh_oauth2.name);
BEGIN
    IF v.grant_type = 'refresh_token' AND (SELECT s.refresh_token FROM ihub.oauth2_secret s WHERE s.oauth2_id = v.id) IS NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" has no refresh token yet', v.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('A person authorizes it first: SELECT ihub.oauth2_authorize_url(%L, %L, ''https://<this listener>'');',
                                refresh_oauth2.integration, v.name);
    END IF;
    UPDATE ihub.oauth2 SET refresh_at = now() WHERE id = v.id;
    PERFORM ihub._wake_maintenance();
END
$$;

-- How long an authorization URL may take to come back to the callback.
CREATE FUNCTION ihub._oauth2_state_lifetime() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '10 minutes' $$;

-- The URL a person opens to authorize the client; the provider then sends
-- them to <redirect_base>/oauth2/callback/<integration>/<name>, which the
-- listener serves. A new URL replaces the one before (its state no longer
-- passes); it must come back within ihub._oauth2_state_lifetime().
CREATE FUNCTION ihub.oauth2_authorize_url(integration text, name text, redirect_base text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2 := ihub._oauth2(oauth2_authorize_url.integration, oauth2_authorize_url.name);
    v_state text := ihub._oauth2_new_state();
    v_redirect text;
    v_integration text := (SELECT i.name FROM ihub.integration i WHERE i.id = v.integration_id);
BEGIN
    IF v.authorize_url IS NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" has no authorize_url', v.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Create it with authorize_url => ''<the provider''''s authorization endpoint>'', or pass a refresh token.';
    END IF;
    IF v.grant_type <> 'refresh_token' THEN
        RAISE EXCEPTION 'OAuth2 credential "%" uses the % grant, which no person authorizes', v.name, v.grant_type
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'The authorization-code flow is for the refresh_token grant.';
    END IF;
    IF redirect_base IS NULL OR redirect_base !~ '^https?://[^/?#[:space:]]+(/[^?#[:space:]]*)?$' THEN
        RAISE EXCEPTION 'redirect_base must be the listener''s public http or https address, without query'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ''https://hooks.example.com''; the callback path /oauth2/callback/<integration>/<name> is added.';
    END IF;
    v_redirect := rtrim(redirect_base, '/') || '/oauth2/callback/' || v_integration || '/' || v.name;
    UPDATE ihub.oauth2_secret
    SET state_hash = sha256(convert_to(v_state, 'UTF8')), state_expires_at = now() + ihub._oauth2_state_lifetime(),
        redirect_uri = v_redirect
    WHERE oauth2_id = v.id;
    RETURN ihub._oauth2_authorize_link(v.authorize_url, v.client_id, v_redirect, v.scope, v_state);
END
$$;

-------------------------------------------------------------------------------
-- The maintenance worker and the listener
-------------------------------------------------------------------------------

-- Credentials due for a token request, with what asking needs. Each gets
-- a minute's lease (refresh_at moves on): a worker that dies meanwhile
-- leaves it to be asked for again then.
CREATE FUNCTION ihub._oauth2_due(p_limit integer)
RETURNS TABLE (id bigint, version integer, grant_type text, token_url text, client_id text, client_secret text,
               refresh_token text, scope text, client_auth text)
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    -- Nothing to ask with (a refresh_token grant whose code exchange gave no
    -- refresh token, or failed): not due until a person authorizes again.
    WITH nothing AS (
        UPDATE ihub.oauth2 o SET refresh_at = NULL
        FROM ihub.oauth2_secret s
        WHERE s.oauth2_id = o.id AND o.refresh_at <= now() AND o.grant_type = 'refresh_token' AND s.refresh_token IS NULL
    ), due AS (
        SELECT o.id FROM ihub.oauth2 o
        JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id
        WHERE o.refresh_at <= now() AND (o.grant_type = 'client_credentials' OR s.refresh_token IS NOT NULL)
        ORDER BY o.refresh_at
        LIMIT p_limit
        FOR UPDATE OF o SKIP LOCKED
    ), leased AS (
        UPDATE ihub.oauth2 o SET refresh_at = now() + interval '1 minute'
        FROM due WHERE o.id = due.id
        RETURNING o.*
    )
    SELECT l.id, l.token_version, l.grant_type, l.token_url, l.client_id, s.client_secret, s.refresh_token, l.scope,
           l.client_auth
    FROM leased l JOIN ihub.oauth2_secret s ON s.oauth2_id = l.id
$$;

-- Seconds until the next credential is due, NULL when none is.
CREATE FUNCTION ihub._oauth2_next_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT extract(epoch FROM min(refresh_at) - now())::double precision FROM ihub.oauth2 WHERE refresh_at IS NOT NULL $$;

-- Stores what a token endpoint issued: p_tokens has access_token,
-- expires_in (NULL: no expiry given), refresh_token (NULL: keep the one we
-- have) and refresh_in (seconds until the next refresh, NULL: none).
-- Deliveries waiting for a token of this credential (answered 401, or not
-- sent for want of one) are due at once.
CREATE FUNCTION ihub._oauth2_store(p_id bigint, p_tokens jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    v ihub.oauth2;
BEGIN
    UPDATE ihub.oauth2_secret
    SET access_token = p_tokens ->> 'access_token',
        refresh_token = coalesce(p_tokens ->> 'refresh_token', refresh_token)
    WHERE oauth2_id = p_id;
    UPDATE ihub.oauth2 o
    SET expires_at = now() + (p_tokens ->> 'expires_in')::double precision * interval '1 second',
        refresh_at = now() + (p_tokens ->> 'refresh_in')::double precision * interval '1 second',
        refreshed_at = now(), token_version = o.token_version + 1, failures = 0, last_error = NULL, last_error_at = NULL
    WHERE o.id = p_id
    RETURNING * INTO v;
    IF v.id IS NULL THEN
        RETURN; -- dropped meanwhile
    END IF;
    UPDATE ihub.delivery d SET run_at = now()
    WHERE d.state IN ('pending', 'retry') AND d.state = 'retry'
      AND (d.last_status = 401 OR d.last_error LIKE 'not sent: OAuth2 credential%')
      AND d.endpoint_id IN (SELECT e.id FROM ihub.endpoint e JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
                            WHERE e.integration_id = v.integration_id AND c.auth ->> 'type' = 'oauth2'
                              AND c.auth ->> 'credential' = v.name);
    IF FOUND THEN
        PERFORM ihub._wake();
    END IF;
END
$$;

-- A token request made with token version p_version failed (the message is
-- scrubbed of secrets already). The next is asked for after a back-off of
-- 5 s doubling up to 10 minutes; the first failure in a row is logged as an
-- error, and the health check reports the credential until a request
-- succeeds again. A token stored meanwhile (the version moved on) stands.
CREATE FUNCTION ihub._oauth2_failed(p_id bigint, p_version integer, p_error text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2;
BEGIN
    UPDATE ihub.oauth2 o
    SET failures = o.failures + 1, last_error = left(p_error, 1000), last_error_at = now(),
        refresh_at = now() + least(interval '10 minutes', interval '5 seconds' * power(2, least(o.failures, 10)))
    WHERE o.id = p_id AND o.token_version = p_version
    RETURNING * INTO v;
    IF v.failures = 1 THEN
        PERFORM ihub.log('error', format('OAuth2 credential %s could not get an access token (%s)', v.name, p_error),
                         jsonb_build_object('oauth2', v.name),
                         (SELECT i.name FROM ihub.integration i WHERE i.id = v.integration_id));
    END IF;
END
$$;

-- The listener's first step for /oauth2/callback/<integration>/<name>: the
-- state must be the one the last authorization URL carried, unexpired; it
-- is used up when it matches. Returns what exchanging the code needs (and
-- the token version now), or {"error": ..., "status": ...}.
CREATE FUNCTION ihub._oauth2_callback(p_integration text, p_name text, p_state text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2;
    v_secret ihub.oauth2_secret;
    v_problem text;
BEGIN
    SELECT o.* INTO v FROM ihub.oauth2 o JOIN ihub.integration i ON i.id = o.integration_id
    WHERE i.name = p_integration AND o.name = p_name;
    IF v.id IS NULL THEN
        RETURN jsonb_build_object('error', 'unknown OAuth2 credential', 'status', 404);
    END IF;
    SELECT * INTO v_secret FROM ihub.oauth2_secret s WHERE s.oauth2_id = v.id FOR UPDATE;
    IF v_secret.state_hash IS NULL THEN
        v_problem := 'no authorization is under way';
    ELSIF v_secret.state_expires_at < now() THEN
        v_problem := 'the authorization took too long: its state expired';
    ELSIF p_state IS NULL OR sha256(convert_to(p_state, 'UTF8')) <> v_secret.state_hash THEN
        v_problem := 'the state does not match the last authorization URL';
    END IF;
    -- A state that does not match changes nothing: anyone can send one, and
    -- must not be able to spoil an authorization under way (a real state,
    -- 256 random bits, cannot be guessed). An expired one is cleared.
    IF v_problem IS NOT NULL THEN
        IF v_secret.state_expires_at < now() THEN
            UPDATE ihub.oauth2_secret SET state_hash = NULL, state_expires_at = NULL WHERE oauth2_id = v.id;
            UPDATE ihub.oauth2 SET last_error = 'authorization refused: ' || v_problem, last_error_at = now() WHERE id = v.id;
        END IF;
        RETURN jsonb_build_object('error', v_problem, 'status', 400);
    END IF;
    UPDATE ihub.oauth2_secret SET state_hash = NULL, state_expires_at = NULL WHERE oauth2_id = v.id;
    RETURN jsonb_build_object('id', v.id, 'version', v.token_version, 'token_url', v.token_url, 'client_id', v.client_id,
                              'client_secret', v_secret.client_secret, 'scope', v.scope, 'client_auth', v.client_auth,
                              'redirect_uri', v_secret.redirect_uri);
END
$$;

-- The provider sent the person back with an error instead of a code
-- (they declined, say): recorded on the credential, the state used up.
CREATE FUNCTION ihub._oauth2_declined(p_integration text, p_name text, p_state text, p_error text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT o.id INTO v_id FROM ihub.oauth2 o JOIN ihub.integration i ON i.id = o.integration_id
    JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id
    WHERE i.name = p_integration AND o.name = p_name AND s.state_hash = sha256(convert_to(coalesce(p_state, ''), 'UTF8'));
    IF v_id IS NOT NULL THEN
        UPDATE ihub.oauth2_secret SET state_hash = NULL, state_expires_at = NULL WHERE oauth2_id = v_id;
        UPDATE ihub.oauth2 SET last_error = 'authorization refused by the provider: ' || left(p_error, 200), last_error_at = now()
        WHERE id = v_id;
    END IF;
END
$$;

-------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------

CREATE VIEW ihub.oauth2_credentials AS
SELECT o.id, i.name AS integration, o.name, o.grant_type, ihub._mask_url(o.token_url) AS token_url, o.authorize_url,
       o.client_id, '********'::text AS client_secret, o.scope, o.client_auth,
       CASE WHEN o.failures > 0 AND (o.expires_at IS NULL OR o.expires_at <= now()) THEN 'failing'
            WHEN o.failures > 0 THEN 'refresh failing'
            WHEN NOT o.has_access_token AND o.refresh_at IS NULL THEN 'not authorized'
            WHEN NOT o.has_access_token THEN 'waiting for a token'
            WHEN o.expires_at <= now() THEN 'expired'
            ELSE 'valid' END AS status,
       o.has_refresh_token, o.expires_at, o.refreshed_at, o.refresh_at, o.failures, o.last_error, o.last_error_at,
       (SELECT coalesce(array_agg(e.name ORDER BY e.name), '{}') FROM ihub.endpoint e
        JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
        WHERE e.integration_id = o.integration_id AND c.auth ->> 'type' = 'oauth2' AND c.auth ->> 'credential' = o.name) AS endpoints,
       o.created_at
FROM (SELECT o.*, s.access_token IS NOT NULL AS has_access_token, s.refresh_token IS NOT NULL AS has_refresh_token
      FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id) o
JOIN ihub.integration i ON i.id = o.integration_id;
COMMENT ON VIEW ihub.oauth2_credentials IS
    'OAuth2 credentials and the state of their access tokens (valid, expired, failing, not authorized...), secrets masked.';

CREATE VIEW ihub.oauth2_secrets AS
SELECT o.id, i.name AS integration, o.name, s.client_secret, s.refresh_token, s.access_token, o.expires_at
FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id JOIN ihub.integration i ON i.id = o.integration_id;
COMMENT ON VIEW ihub.oauth2_secrets IS 'Secrets of OAuth2 credentials: client secret, refresh and access tokens (ihub_admin only).';

COMMENT ON FUNCTION ihub._oauth2(text, text) IS 'Internal: an OAuth2 credential by integration and name, or an error with a hint.';
COMMENT ON FUNCTION ihub.create_oauth2(text, text, text, text, text, text, text, text, text, text) IS
    'Registers an OAuth2 credential (grant refresh_token or client_credentials) that endpoints of the integration use with auth {"type": "oauth2", "credential": name}. Returns its id.';
COMMENT ON FUNCTION ihub.drop_oauth2(text, text) IS 'Removes an OAuth2 credential no endpoint uses.';
COMMENT ON FUNCTION ihub.refresh_oauth2(text, text) IS 'Asks the maintenance worker for a new access token of the credential now.';
COMMENT ON FUNCTION ihub._oauth2_state_lifetime() IS 'Internal: how long an authorization URL may take to come back to the callback.';
COMMENT ON FUNCTION ihub.oauth2_authorize_url(text, text, text) IS
    'The URL a person opens to authorize the client (authorization-code flow); the provider sends them back to <redirect_base>/oauth2/callback/<integration>/<name> on the listener.';
COMMENT ON FUNCTION ihub._oauth2_due(integer) IS 'Internal: credentials due for a token request, leased for a minute (maintenance worker).';
COMMENT ON FUNCTION ihub._oauth2_next_due() IS 'Internal: seconds until the next credential is due for a token request.';
COMMENT ON FUNCTION ihub._oauth2_store(bigint, jsonb) IS
    'Internal: stores issued tokens and makes deliveries that waited for them due.';
COMMENT ON FUNCTION ihub._oauth2_failed(bigint, integer, text) IS 'Internal: records a failed token request and backs off.';
COMMENT ON FUNCTION ihub._oauth2_callback(text, text, text) IS
    'Internal: checks and uses up the state of an authorization callback; returns what exchanging its code needs.';
COMMENT ON FUNCTION ihub._oauth2_declined(text, text, text, text) IS
    'Internal: records an authorization the provider reports as refused.';

COMMENT ON FUNCTION ihub.http_request(text, jsonb, text, text, jsonb, text, jsonb, regprocedure, jsonb) IS
    'Queues a one-off durable request to an endpoint, signed and retried like any delivery: body (none for GET), method, path, query parameters, headers, event type; with on_response, that function runs as a job of the caller with the response (ihub.http_response) and the context once the request ends. Returns the delivery id.';
COMMENT ON TYPE ihub.http_response IS
    'What a response handler gets: delivery, state (done, failed, dead), HTTP status, headers, body as text and as JSON, the request''s context, attempts and error.';
COMMENT ON FUNCTION ihub._check_response_function(regprocedure, name) IS
    'Internal: checks that a function takes one ihub.http_response and that the role may execute it.';
COMMENT ON FUNCTION ihub._try_json(text) IS 'Internal: a text as jsonb, NULL when it is not JSON.';
COMMENT ON FUNCTION ihub._respond(jsonb, bigint[]) IS
    'Internal (dispatcher): queues the response handler jobs of the ended requests of a settled batch.';
COMMENT ON FUNCTION ihub.create_endpoint(text, text, text, text, jsonb, jsonb, text, integer, jsonb, jsonb, double precision, integer, text[], text, text) IS
    'Adds an HTTP endpoint to an integration: URL, method, headers, auth (none/basic/bearer/api_key/oauth2), signing secret (whsec_ for v1 or whsk_ for v1a signatures, generated when NULL), timeout, retry policy, circuit breaker, limits, accepted event types and ordering (key or endpoint). Returns its id.';
COMMENT ON FUNCTION ihub._claim(integer, integer, integer, integer) IS
    'Internal (dispatcher): routes captured changes and claims due deliveries with FOR UPDATE SKIP LOCKED and a lease.';
COMMENT ON FUNCTION ihub.health() IS
    'One row per check (workers, queues, endpoints, schedules, credentials, OAuth2 tokens) with status ok, warning or critical and a message.';
COMMENT ON FUNCTION ihub._join_url(text, text) IS
    'Internal: an endpoint URL with a request path appended, before the URL''s own query string.';
COMMENT ON FUNCTION ihub._with_query(text, jsonb) IS 'Internal: a request path with the parameters of a query object added.';
COMMENT ON FUNCTION ihub._oauth2_new_state() IS 'Internal: a random state for an OAuth2 authorization URL.';
COMMENT ON FUNCTION ihub._oauth2_authorize_link(text, text, text, text, text) IS
    'Internal: an OAuth2 authorization URL with client, redirect URI, scope and state.';
COMMENT ON FUNCTION ihub._wake_maintenance() IS 'Internal: wakes the maintenance worker when the current transaction commits.';
COMMENT ON FUNCTION ihub._http_request_by(text, jsonb, text, text, jsonb, text, jsonb, regprocedure, jsonb, regrole) IS
    'Internal: ihub.http_request for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
COMMENT ON FUNCTION ihub._replay_by(bigint, regrole) IS
    'Internal: ihub.replay for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
COMMENT ON FUNCTION ihub._replay_dead_by(text, timestamptz, regrole) IS
    'Internal: ihub.replay_dead for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';

GRANT SELECT ON ihub.oauth2_credentials TO ihub_viewer;
GRANT SELECT ON ihub.oauth2_secrets TO ihub_admin;
REVOKE ALL ON ihub.oauth2, ihub.oauth2_secret FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    ihub.http_request(text, jsonb, text, text, jsonb, text, jsonb, regprocedure, jsonb),
    ihub.create_oauth2(text, text, text, text, text, text, text, text, text, text),
    ihub.drop_oauth2(text, text),
    ihub.refresh_oauth2(text, text),
    ihub.oauth2_authorize_url(text, text, text)
TO ihub_developer;

-------------------------------------------------------------------------------
-- Security (issue 12 review): inbound bodies are parsed with a fixed search
-- path; pg_cron is recognised as the extension, not a schema named cron.
-------------------------------------------------------------------------------

-- The body as jsonb, or NULL when it is not JSON.
CREATE OR REPLACE FUNCTION ihub._try_jsonb(p_body bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN convert_from(p_body, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- A table of pg_cron's (job, job_run_details), if pg_cron is installed in
-- this database: the relation must belong to the pg_cron extension. A
-- schema named cron that a role made itself, with a view cron.job calling
-- its own functions, is not pg_cron: pg_ihub reads it as the superuser.
CREATE FUNCTION ihub._pg_cron_table(p_name text) RETURNS regclass
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'cron'
    JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_cron'
    WHERE c.relname = p_name AND c.relkind = 'r'
$$;

-- pg_cron's schedule of a job, and whether it is active; NULL when the job
-- or pg_cron is gone.
CREATE OR REPLACE FUNCTION ihub._pg_cron_job(p_jobname text, OUT jobid bigint, OUT schedule text, OUT active boolean)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF ihub._pg_cron_table('job') IS NULL THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT jobid, schedule, active FROM cron.job WHERE jobname = $1 ORDER BY jobid LIMIT 1'
        INTO jobid, schedule, active USING p_jobname;
END
$$;

-- When the watched action should last have started, if that was more than
-- the grace period ago and after watching began; and whether it did.
CREATE OR REPLACE FUNCTION ihub._cronwatch_problem(w ihub.watcher) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s ihub.schedule;
    c record;
    v_due timestamptz;
    v_started timestamptz;
BEGIN
    IF w.target LIKE 'cron:%' THEN
        c := ihub._pg_cron_job(substr(w.target, 6));
        IF c.jobid IS NULL THEN
            RETURN 'deleted';
        ELSIF NOT c.active THEN
            RETURN 'deactivated';
        END IF;
        IF c.schedule ~ '^\s*[0-9]+\s+seconds?\s*$' THEN
            v_due := now() - w.grace - make_interval(secs => substring(c.schedule FROM '[0-9]+')::int);
        ELSE
            BEGIN
                v_due := ihub._cron_prev(c.schedule, now() - w.grace);
            EXCEPTION WHEN OTHERS THEN
                RETURN NULL; -- a pg_cron schedule syntax we do not read: deletion and deactivation only
            END;
        END IF;
        IF v_due IS NULL OR v_due < w.created_at OR ihub._pg_cron_table('job_run_details') IS NULL THEN
            RETURN NULL;
        END IF;
        EXECUTE 'SELECT max(start_time) FROM cron.job_run_details WHERE jobid = $1' INTO v_started USING c.jobid;
        IF v_started IS NULL OR v_started < v_due - interval '1 second' THEN
            RETURN format('missed its run due at %s', v_due);
        END IF;
        RETURN NULL;
    END IF;

    IF w.schedule_id IS NULL THEN
        RETURN 'deleted';
    END IF;
    SELECT * INTO s FROM ihub.schedule WHERE id = w.schedule_id;
    IF NOT s.active THEN
        RETURN 'deactivated';
    END IF;
    -- Not queued in time (scheduler down or stuck) ...
    IF s.next_run_at + w.grace < now() AND s.next_run_at >= w.created_at THEN
        RETURN format('missed its run due at %s', s.next_run_at);
    END IF;
    -- ... or queued but not started in time (no free job worker, workers down).
    SELECT min(j.run_at) INTO v_due FROM ihub.job j
    WHERE j.schedule_id = s.id AND j.state IN ('pending', 'retry') AND j.run_at + w.grace < now() AND j.run_at >= w.created_at;
    IF v_due IS NOT NULL THEN
        RETURN format('its run due at %s has not started', v_due);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION ihub.watch(schedule text, notify_endpoint text DEFAULT NULL, channel text DEFAULT 'ihub_cronwatch',
                           grace interval DEFAULT '5 minutes')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schedule bigint;
    v_id bigint;
BEGIN
    PERFORM ihub._require_workers();
    IF schedule LIKE 'cron:%' THEN
        IF ihub._pg_cron_table('job') IS NULL THEN
            RAISE EXCEPTION 'pg_cron is not installed in this database'
                USING ERRCODE = 'undefined_object', HINT = 'CREATE EXTENSION pg_cron, or watch one of pg_ihub''s scheduled actions by name.';
        ELSIF (ihub._pg_cron_job(substr(schedule, 6))).jobid IS NULL THEN
            RAISE EXCEPTION 'pg_cron has no job named "%"', substr(schedule, 6)
                USING ERRCODE = 'undefined_object', HINT = 'See SELECT jobname FROM cron.job.';
        END IF;
    ELSE
        v_schedule := (ihub._schedule_row(watch.schedule)).id;
    END IF;
    IF channel IS NULL OR channel = '' OR octet_length(channel) > 63 THEN
        RAISE EXCEPTION 'invalid channel name "%"', channel
            USING ERRCODE = 'invalid_name', HINT = 'A NOTIFY channel name has 1 to 63 bytes.';
    END IF;
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ''5 minutes''.';
    END IF;
    IF EXISTS (SELECT 1 FROM ihub.watcher c WHERE c.target = watch.schedule) THEN
        RAISE EXCEPTION '% is already watched', schedule
            USING ERRCODE = 'duplicate_object', HINT = 'Remove the watcher with ihub.unwatch first to change it.';
    END IF;
    INSERT INTO ihub.watcher (target, schedule_id, notify_endpoint_id, channel, grace)
    VALUES (schedule, v_schedule,
            CASE WHEN notify_endpoint IS NOT NULL THEN (ihub._endpoint(notify_endpoint)).id END,
            channel, grace)
    RETURNING id INTO v_id;
    PERFORM ihub._wake_scheduler();
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION ihub._pg_cron_table(text) IS 'Internal: a table of the pg_cron extension in schema cron, NULL when pg_cron is not installed.';

-------------------------------------------------------------------------------
-- Delivery controls (issue 13): sql/endpoint_controls.sql
-------------------------------------------------------------------------------

-- The circuit breaker policy (ihub._normalize_circuit), NULL when off; and
-- requests per second and in flight at most, across all dispatchers.
ALTER TABLE ihub.endpoint ADD COLUMN circuit jsonb,
    ADD COLUMN rate_limit double precision CHECK (rate_limit > 0),
    ADD COLUMN max_in_flight integer CHECK (max_in_flight >= 1),
    -- The event types it accepts (exact, or a prefix ending in *); NULL: all.
    ADD COLUMN event_types text[],
    -- 'key': one delivery in flight per ordering key, in commit order;
    -- 'endpoint': one at a time, first in first out; NULL: no order.
    ADD COLUMN ordering text CHECK (ordering IN ('key', 'endpoint'));
-- The event type of its deliveries; NULL: <table>.<operation>. And the
-- columns whose values make a change's ordering key when its endpoint
-- orders by key; NULL: the table's primary key.
ALTER TABLE ihub.subscription ADD COLUMN event_type text, ADD COLUMN ordering_key text[],
    -- The payload template (sql/payloads.sql); NULL: the row as it is.
    ADD COLUMN payload jsonb,
    -- A timed subscription (sql/timers.sql): each row is sent once at
    -- timer_column + timer_offset while it matches timer_condition.
    ADD COLUMN timer_column text, ADD COLUMN timer_offset interval, ADD COLUMN timer_condition text;
-- Every claim asks whether any endpoint has limits (ihub._claim_limited).
CREATE INDEX endpoint_limited_idx ON ihub.endpoint (id)
    WHERE rate_limit IS NOT NULL OR max_in_flight IS NOT NULL OR ordering IS NOT NULL;

-- An endpoint's delivery state (endpoint_controls.sql): its circuit, failure streak,
-- rate-limit bucket and 429 pause. Runtime state, not configuration. A row
-- appears with the endpoint's first failed attempt, or its first limited
-- claim; a batch delivered to an endpoint with nothing on record writes
-- nothing here.
CREATE TABLE ihub.endpoint_state (
    endpoint_id     bigint PRIMARY KEY REFERENCES ihub.endpoint (id) ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    -- consecutive failed attempts (5xx, timeouts, connections)
    failures        integer NOT NULL DEFAULT 0,
    -- the failure-rate window, from the first failure in it
    window_start    timestamptz,
    window_attempts integer NOT NULL DEFAULT 0,
    window_failures integer NOT NULL DEFAULT 0,
    opened_at       timestamptz,
    -- open: when a probe may be sent; half_open: the probe's lease
    retry_at        timestamptz,
    probe_until     timestamptz,
    -- the first failed attempt since the last delivered one
    failing_since   timestamptz,
    -- the last 20 changes of state: [{at, from, to, reason}]
    changes         jsonb NOT NULL DEFAULT '[]',
    -- rate_limit's token bucket: tokens left at tokens_at
    tokens          double precision,
    tokens_at       timestamptz,
    -- a 429 holds every delivery to the endpoint until then
    paused_until    timestamptz
);
-- Every claim asks whether any circuit is not closed.
CREATE INDEX endpoint_state_held_idx ON ihub.endpoint_state (endpoint_id) WHERE state <> 'closed';
COMMENT ON TABLE ihub.endpoint_state IS
    'Each endpoint''s delivery state: circuit breaker (closed, open, half_open), failure streak, last 20 changes of state, rate-limit bucket and 429 pause.';

-- An endpoint's due deliveries, for claims that go endpoint by endpoint
-- (rate limits, circuit probes). Deliveries routed straight to a
-- dispatcher (running) never enter it.
CREATE INDEX delivery_due_endpoint_idx ON ihub.delivery (endpoint_id, run_at)
    WHERE state IN ('pending', 'retry');

-- Ordering: a delivery's place in the order of an ordered endpoint
-- (ihub._ordered_heads): '' for the whole endpoint, or <subscription>:<key
-- values>; NULL: none. ihub.skip ends a delivery unsent (state skipped).
ALTER TABLE ihub.delivery ADD COLUMN ordering_key text;
ALTER TABLE ihub.delivery DROP CONSTRAINT delivery_state_check,
    ADD CONSTRAINT delivery_state_check
    CHECK (state IN ('pending', 'running', 'done', 'retry', 'failed', 'dead', 'skipped')) NOT VALID;
ALTER TABLE ihub.delivery VALIDATE CONSTRAINT delivery_state_check;
-- The deliveries of ordered endpoints that hold their key: the first of
-- each key is the one that may go (ihub._ordered_heads, a skip scan). Dead
-- and failed ones hold it until replayed or skipped.
CREATE INDEX delivery_ordered_idx ON ihub.delivery (endpoint_id, ordering_key, id)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'retry', 'running', 'failed', 'dead');
-- Numbers the statements whose changes the capture triggers copy (one value
-- a statement): a row's later change always has the higher number, since
-- its writer waited for the earlier one's commit. Routes of ordered
-- endpoints take captured changes in this order.
CREATE SEQUENCE ihub.capture_seq;
COMMENT ON SEQUENCE ihub.capture_seq IS 'pg_ihub: numbers captured statements, in the order their row changes must be delivered.';
SELECT pg_catalog.pg_extension_config_dump('ihub.capture_seq', '');
-- Existing capture tables get the statement's number (empty: their
-- changes came first) and the payload template's data (none had one).
DO $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT c.oid::regclass FROM pg_class c
             WHERE c.relnamespace = 'ihub_capture'::regnamespace AND c.relkind = 'r' AND c.relname ~ '^sub_[0-9]+$'
    LOOP
        EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS seq bigint, ADD COLUMN IF NOT EXISTS data jsonb', t);
    END LOOP;
END
$$;

-- The first delivery of each key of an ordered endpoint that still holds
-- it (pending, retrying, in flight, failed or dead): only these may go, and
-- a dead or failed one holds its key until replayed or skipped. A skip scan
-- of delivery_ordered_idx, one descent a key: the work is the number of
-- keys with deliveries open, however many wait behind them.
CREATE FUNCTION ihub._ordered_heads(p_endpoint_id bigint)
RETURNS TABLE (id bigint, state text, run_at timestamptz, ordering_key text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE head AS (
        (SELECT d.ordering_key, d.id, d.state, d.run_at FROM ihub.delivery d
         WHERE d.endpoint_id = p_endpoint_id AND d.ordering_key IS NOT NULL
           AND d.state IN ('pending', 'retry', 'running', 'failed', 'dead')
         ORDER BY d.ordering_key, d.id LIMIT 1)
        UNION ALL
        SELECT n.* FROM head h
        CROSS JOIN LATERAL (
            SELECT d.ordering_key, d.id, d.state, d.run_at FROM ihub.delivery d
            WHERE d.endpoint_id = p_endpoint_id AND d.ordering_key IS NOT NULL AND d.ordering_key > h.ordering_key
              AND d.state IN ('pending', 'retry', 'running', 'failed', 'dead')
            ORDER BY d.ordering_key, d.id LIMIT 1) n
    )
    SELECT h.id, h.state, h.run_at, h.ordering_key FROM head h
$$;
COMMENT ON FUNCTION ihub._ordered_heads(bigint) IS 'Internal: the first open delivery of each key of an ordered endpoint (a skip scan).';

-- Whether a delivery of this key is in flight. The first open delivery of
-- a key is normally the one in flight, but one with a lower id can appear
-- after a later one was claimed (a replay, a request committed late): it
-- waits for that one to end, so that a key never has two in flight.
CREATE FUNCTION ihub._key_in_flight(p_endpoint_id bigint, p_key text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM ihub.delivery r
                   WHERE r.endpoint_id = p_endpoint_id AND r.ordering_key = p_key AND r.state = 'running')
$$;
COMMENT ON FUNCTION ihub._key_in_flight(bigint, text) IS 'Internal: whether a delivery of an ordering key is in flight.';

-- The deliveries of an ordered endpoint that may go now, first due first:
-- the first of each key, due, with nothing of its key in flight.
CREATE FUNCTION ihub._ordered_due(p_endpoint_id bigint, p_limit integer) RETURNS bigint[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY(SELECT h.id FROM ihub._ordered_heads(p_endpoint_id) h
                 WHERE h.state IN ('pending', 'retry') AND h.run_at <= now()
                   AND NOT ihub._key_in_flight(p_endpoint_id, h.ordering_key)
                 ORDER BY h.run_at, h.id LIMIT p_limit)
$$;
COMMENT ON FUNCTION ihub._ordered_due(bigint, integer) IS 'Internal: the deliveries of an ordered endpoint that may go now.';

-- Seconds until the earliest claimable delivery is due (NULL when none; not
-- 0, which would make an idle dispatcher spin). The first in run_at order,
-- not min(): with the endpoint condition (a join) Postgres computed min()
-- over every queued delivery, 33 ms a call at each idle dispatcher round of
-- make bench's retry storm (20,000 queued).
CREATE OR REPLACE FUNCTION ihub._next_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
AS $$
    SELECT least(
        -- The first timer of a timed subscription.
        (SELECT greatest(0, extract(epoch FROM t.due_at - now()))::double precision
         FROM ihub.timer t WHERE t.fired_at IS NULL ORDER BY t.due_at LIMIT 1),
        (SELECT greatest(0, extract(epoch FROM d.run_at - now()))::double precision
         FROM ihub.delivery d
         WHERE d.state IN ('pending', 'retry')
           AND d.endpoint_id IN (SELECT e.id FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
                                 WHERE e.enabled AND i.state <> 'inactive'
                                   AND e.rate_limit IS NULL AND e.max_in_flight IS NULL AND e.ordering IS NULL
                                   AND NOT EXISTS (SELECT 1 FROM ihub.endpoint_state c WHERE c.endpoint_id = e.id
                                                   AND (c.state <> 'closed' OR c.paused_until > now())))
         ORDER BY d.run_at
         LIMIT 1),
        -- Endpoints whose deliveries are held (an open circuit, a 429
        -- pause, a rate or in-flight limit, an order): when the first of
        -- them may go, once one is due. An endpoint at its in-flight limit
        -- waits for a request to end (its settle claims the next), and so
        -- does a key whose first delivery is in flight.
        (SELECT min(greatest(0, extract(epoch FROM greatest(
                    q.run_at,
                    CASE c.state WHEN 'open' THEN c.retry_at WHEN 'half_open' THEN c.probe_until END,
                    c.paused_until,
                    CASE WHEN e.rate_limit IS NOT NULL AND c.tokens < 1
                         THEN c.tokens_at + (1 - c.tokens) / e.rate_limit * interval '1 second' END) - now())))::double precision
         FROM ihub.endpoint e
         JOIN ihub.integration i ON i.id = e.integration_id AND i.state <> 'inactive'
         LEFT JOIN ihub.endpoint_state c ON c.endpoint_id = e.id
         LEFT JOIN LATERAL (SELECT d.run_at FROM ihub.delivery d
                            WHERE e.ordering IS NULL AND d.state IN ('pending', 'retry') AND d.endpoint_id = e.id
                            ORDER BY d.run_at LIMIT 1) q0 ON true
         CROSS JOIN LATERAL (SELECT CASE WHEN e.ordering IS NULL THEN q0.run_at
                                         ELSE (SELECT min(h.run_at) FROM ihub._ordered_heads(e.id) h
                                               WHERE h.state IN ('pending', 'retry')) END AS run_at) q
         WHERE e.enabled AND q.run_at IS NOT NULL
           AND (c.state <> 'closed' OR c.paused_until > now() OR e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL
                OR e.ordering IS NOT NULL)
           AND (e.max_in_flight IS NULL OR (SELECT count(*) FROM ihub.delivery r
                                            WHERE r.state = 'running' AND r.endpoint_id = e.id) < e.max_in_flight)))
$$;

-- Asymmetric signatures (v1a): ed25519 keys for endpoints, and their
-- public keys for anyone who may see the endpoint.
CREATE FUNCTION ihub._check_signing_key("secret" text) RETURNS void
IMMUTABLE STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'check_signing_key_wrapper';
CREATE FUNCTION ihub._generate_ed25519_key() RETURNS text
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'generate_ed25519_key_wrapper';
CREATE FUNCTION ihub._public_key("secret" text) RETURNS text
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'public_key_wrapper';
COMMENT ON FUNCTION ihub._check_signing_key(text) IS 'Internal: validates an endpoint''s signing secret, whsec_ (v1) or whsk_ (v1a).';
COMMENT ON FUNCTION ihub._generate_ed25519_key() IS 'Internal: a new random whsk_ ed25519 secret key.';
COMMENT ON FUNCTION ihub._public_key(text) IS 'The whpk_ public key of a whsk_ secret key (NULL for a whsec_ secret).';
GRANT EXECUTE ON FUNCTION ihub._public_key(text) TO ihub_viewer;

CREATE OR REPLACE FUNCTION ihub.rotate_secret(endpoint text, new_secret text DEFAULT NULL, grace interval DEFAULT '24 hours')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint := ihub._endpoint(rotate_secret.endpoint);
    v_secret text := new_secret;
BEGIN
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace must be a non-negative interval'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example interval ''24 hours''; 0 retires the old key at once.';
    END IF;
    -- A new key of the kind the endpoint signs with now (a given one of the
    -- other kind switches it: both sign during the grace period).
    IF v_secret IS NULL THEN
        v_secret := CASE WHEN (SELECT s.secret FROM ihub.endpoint_secret s
                               WHERE s.endpoint_id = v_endpoint.id AND (s.expires_at IS NULL OR s.expires_at > now())
                               ORDER BY s.id DESC LIMIT 1) LIKE 'whsk\_%'
                         THEN ihub._generate_ed25519_key() ELSE ihub._generate_secret() END;
    END IF;
    PERFORM ihub._check_signing_key(v_secret);
    UPDATE ihub.endpoint_secret
    SET expires_at = least(coalesce(expires_at, 'infinity'), now() + grace)
    WHERE endpoint_id = v_endpoint.id AND (expires_at IS NULL OR expires_at > now());
    INSERT INTO ihub.endpoint_secret (endpoint_id, secret) VALUES (v_endpoint.id, v_secret);
    RETURN v_secret;
END
$$;

CREATE FUNCTION ihub._normalize_circuit("policy" jsonb) RETURNS jsonb
IMMUTABLE
LANGUAGE c
AS 'MODULE_PATHNAME', 'normalize_circuit_wrapper';
COMMENT ON FUNCTION ihub._normalize_circuit(jsonb) IS 'Internal: validates a circuit breaker policy and fills in defaults; NULL when off.';

CREATE OR REPLACE FUNCTION ihub.enable_endpoint(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.endpoint SET enabled = true, disabled_reason = NULL, disabled_at = NULL
    WHERE id = (ihub._endpoint(enable_endpoint.name)).id;
    -- ihub.endpoint_disable_after counts again from the next failure.
    UPDATE ihub.endpoint_state c SET failing_since = NULL
    WHERE c.endpoint_id = (ihub._endpoint(enable_endpoint.name)).id AND c.failing_since IS NOT NULL;
    PERFORM ihub._wake();
END
$$;

-- New columns at the end: the circuit, the failure streak, the limits.
CREATE OR REPLACE VIEW ihub.endpoints AS
SELECT e.id, i.name AS integration, e.name, ihub._mask_url(e.url) AS url, e.method,
       ihub._mask_endpoint_headers(e.headers) AS headers, e.auth_type,
       coalesce(e.timeout_ms, ihub._default_timeout_ms()) AS timeout_ms,
       e.retry, e.enabled, e.disabled_reason, e.disabled_at, e.created_at,
       e.circuit, coalesce(c.state, 'closed') AS circuit_state, c.opened_at AS circuit_opened_at,
       c.retry_at AS circuit_retry_at, c.failures AS consecutive_failures, c.failing_since,
       coalesce(c.changes, '[]') AS circuit_changes, e.rate_limit, e.max_in_flight,
       CASE WHEN c.paused_until > now() THEN c.paused_until END AS paused_until, e.event_types,
       e.ordering,
       -- The schemes its live secrets sign with (v1, v1a), and the public
       -- keys of its v1a ones, newest first: receivers verify with these.
       ARRAY(SELECT DISTINCT CASE WHEN s.secret LIKE 'whsk\_%' THEN 'v1a' ELSE 'v1' END FROM ihub.endpoint_secret s
             WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now())) AS signatures,
       ARRAY(SELECT ihub._public_key(s.secret) FROM ihub.endpoint_secret s
             WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now()) AND s.secret LIKE 'whsk\_%'
             ORDER BY s.id DESC) AS public_keys,
       -- Keys held by a dead or failed delivery until it is replayed or
       -- skipped (ihub.skip).
       CASE WHEN e.ordering IS NOT NULL
            THEN (SELECT count(DISTINCT d.ordering_key) FROM ihub.delivery d
                  WHERE d.endpoint_id = e.id AND d.state IN ('dead', 'failed') AND d.ordering_key IS NOT NULL) END AS blocked_keys
FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
LEFT JOIN ihub.endpoint_state c ON c.endpoint_id = e.id;

-- Records a change of state: the entry for the circuit's history, a NOTIFY
-- on ihub_circuit and a log entry. Returns the history with it (the last 20).
CREATE FUNCTION ihub._circuit_changed(p_endpoint_id bigint, p_changes jsonb, p_from text, p_to text, p_reason text)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_change jsonb := jsonb_build_object('at', now(), 'from', p_from, 'to', p_to, 'reason', p_reason);
    v_endpoint text;
    v_integration text;
BEGIN
    SELECT e.name, i.name INTO v_endpoint, v_integration
    FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id WHERE e.id = p_endpoint_id;
    PERFORM pg_notify('ihub_circuit', (jsonb_build_object('endpoint', v_endpoint) || v_change)::text);
    PERFORM ihub.log(CASE p_to WHEN 'open' THEN 'warning' ELSE 'info' END,
                     format('circuit of endpoint %s %s: %s', v_endpoint,
                            CASE p_to WHEN 'open' THEN 'opened' WHEN 'half_open' THEN 'half-open, a probe is sent' ELSE 'closed' END,
                            p_reason),
                     jsonb_build_object('endpoint', v_endpoint, 'circuit', p_to, 'from', p_from), v_integration);
    RETURN (SELECT jsonb_agg(x ORDER BY n)
            FROM (SELECT x, n FROM jsonb_array_elements(p_changes || v_change) WITH ORDINALITY a(x, n)
                  ORDER BY n DESC LIMIT 20) last);
END
$$;

-- Counts a settled batch's outcomes per endpoint (p_health: endpoint_id,
-- delivered, failed, answered, unsuccessful) and moves circuits. Also
-- disables an endpoint whose attempts have all failed for
-- ihub.endpoint_disable_after. Called by ihub._settle only when something
-- failed or an endpoint of the batch has something on record.
CREATE FUNCTION ihub._circuit_settle(p_health jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h record;
    c ihub.endpoint_state;
    v_to text;
    v_reason text;
    v_after interval := current_setting('ihub.endpoint_disable_after')::interval;
BEGIN
    FOR h IN
        SELECT x.*, e.circuit AS policy, e.enabled, e.name
        FROM jsonb_to_recordset(p_health) AS x(endpoint_id bigint, delivered integer, failed integer,
                                               answered integer, unsuccessful integer)
        JOIN ihub.endpoint e ON e.id = x.endpoint_id
        ORDER BY x.endpoint_id
    LOOP
        IF h.unsuccessful > 0 THEN
            INSERT INTO ihub.endpoint_state (endpoint_id) VALUES (h.endpoint_id) ON CONFLICT DO NOTHING;
        END IF;
        SELECT * INTO c FROM ihub.endpoint_state WHERE endpoint_id = h.endpoint_id FOR UPDATE;
        CONTINUE WHEN NOT FOUND;

        c.failing_since := CASE WHEN h.delivered > 0 THEN NULL
                                WHEN h.unsuccessful > 0 THEN coalesce(c.failing_since, now())
                                ELSE c.failing_since END;
        c.failures := CASE WHEN h.answered > 0 THEN 0 ELSE c.failures + h.failed END;
        IF h.policy ->> 'failure_rate' IS NULL
           OR c.window_start < now() - (h.policy ->> 'window')::float8 * interval '1 second' THEN
            c.window_start := NULL;
            c.window_attempts := 0;
            c.window_failures := 0;
        END IF;
        IF h.policy ->> 'failure_rate' IS NOT NULL AND (c.window_start IS NOT NULL OR h.failed > 0) THEN
            c.window_start := coalesce(c.window_start, now());
            c.window_attempts := c.window_attempts + h.failed + h.answered;
            c.window_failures := c.window_failures + h.failed;
        END IF;

        v_to := c.state;
        IF h.policy IS NULL THEN
            v_to := 'closed';
            v_reason := 'the endpoint has no circuit breaker';
        ELSIF c.state = 'closed' AND c.failures >= (h.policy ->> 'failures')::integer THEN
            v_to := 'open';
            v_reason := format('%s consecutive failed attempts', c.failures);
        ELSIF c.state = 'closed' AND c.window_attempts >= (h.policy ->> 'min_requests')::integer
              AND c.window_failures >= (h.policy ->> 'failure_rate')::float8 * c.window_attempts THEN
            v_to := 'open';
            v_reason := format('%s of %s attempts failed within %s s', c.window_failures, c.window_attempts,
                               h.policy ->> 'window');
        ELSIF c.state = 'half_open' AND h.failed > 0 THEN
            v_to := 'open';
            v_reason := 'the probe failed';
        ELSIF c.state = 'half_open' AND h.answered > 0 THEN
            v_to := 'closed';
            v_reason := 'the probe was answered';
        END IF;
        IF v_to = 'open' THEN
            c.opened_at := CASE WHEN c.state = 'closed' THEN now() ELSE c.opened_at END;
            c.retry_at := now() + (h.policy ->> 'cooldown')::float8 * interval '1 second';
            c.probe_until := NULL;
        ELSIF v_to = 'closed' AND c.state <> 'closed' THEN
            c.failures := 0;
            c.window_start := NULL;
            c.window_attempts := 0;
            c.window_failures := 0;
            c.opened_at := NULL;
            c.retry_at := NULL;
            c.probe_until := NULL;
        END IF;
        IF v_to <> c.state THEN
            c.changes := ihub._circuit_changed(h.endpoint_id, c.changes, c.state, v_to, v_reason);
            c.state := v_to;
        END IF;
        UPDATE ihub.endpoint_state
        SET (state, failures, window_start, window_attempts, window_failures, opened_at, retry_at, probe_until,
             failing_since, changes)
          = (c.state, c.failures, c.window_start, c.window_attempts, c.window_failures, c.opened_at, c.retry_at,
             c.probe_until, c.failing_since, c.changes)
        WHERE endpoint_id = h.endpoint_id;

        IF h.enabled AND v_after > interval '0' AND c.failing_since <= now() - v_after THEN
            PERFORM ihub._disable_endpoint_for(h.endpoint_id,
                format('every attempt failed since %s (ihub.endpoint_disable_after = %s)',
                       c.failing_since, current_setting('ihub.endpoint_disable_after')));
        END IF;
    END LOOP;
END
$$;

-- Claims a probe for each open circuit whose cooldown is over (or each
-- half-open one whose probe's lease ran out): the endpoint's first due
-- delivery, and the circuit half-opens. A circuit another dispatcher is
-- probing is skipped. With nothing due, the circuit stays as it is.
CREATE FUNCTION ihub._circuit_probes(p_owner integer, p_default_timeout_ms integer, p_rounds integer)
RETURNS SETOF ihub.delivery
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    c record;
    v_probe ihub.delivery;
BEGIN
    FOR c IN
        SELECT ci.endpoint_id, ci.state, ci.changes, e.timeout_ms, e.ordering
        FROM ihub.endpoint_state ci
        JOIN ihub.endpoint e ON e.id = ci.endpoint_id
        JOIN ihub.integration i ON i.id = e.integration_id
        WHERE ci.state <> 'closed'
          AND ((ci.state = 'open' AND ci.retry_at <= now()) OR (ci.state = 'half_open' AND ci.probe_until <= now()))
          AND (ci.paused_until IS NULL OR ci.paused_until <= now())
          AND e.enabled AND i.state <> 'inactive'
        FOR UPDATE OF ci SKIP LOCKED
    LOOP
        UPDATE ihub.delivery d
        SET state = 'running', worker_pid = p_owner,
            lease_until = ihub._lease_until(coalesce(c.timeout_ms, p_default_timeout_ms), p_rounds)
        WHERE d.id = CASE WHEN c.ordering IS NULL
                          THEN (SELECT q.id FROM ihub.delivery q
                                WHERE q.state IN ('pending', 'retry') AND q.run_at <= now() AND q.endpoint_id = c.endpoint_id
                                ORDER BY q.run_at LIMIT 1
                                FOR UPDATE SKIP LOCKED)
                          -- An ordered endpoint's probe is the first of its key.
                          ELSE (SELECT q.id FROM ihub.delivery q
                                WHERE q.id = ANY (ihub._ordered_due(c.endpoint_id, NULL))
                                  AND q.state IN ('pending', 'retry')
                                ORDER BY q.run_at, q.id LIMIT 1
                                FOR UPDATE SKIP LOCKED) END
          AND d.state IN ('pending', 'retry')
        RETURNING d.* INTO v_probe;
        CONTINUE WHEN v_probe.id IS NULL;
        UPDATE ihub.endpoint_state
        SET state = 'half_open', probe_until = v_probe.lease_until,
            changes = CASE WHEN c.state = 'open'
                           THEN ihub._circuit_changed(c.endpoint_id, c.changes, 'open', 'half_open',
                                                      format('cooldown over, probe delivery %s', v_probe.id))
                           ELSE c.changes END
        WHERE endpoint_id = c.endpoint_id;
        RETURN NEXT v_probe;
        v_probe := NULL;
    END LOOP;
END
$$;

-------------------------------------------------------------------------------
-- Rate limits, in-flight limits and 429 pauses
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._check_limits(p_rate_limit double precision, p_max_in_flight integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_rate_limit < 0 OR p_rate_limit > 100000 OR p_rate_limit = 'NaN' THEN
        RAISE EXCEPTION 'rate_limit must be from 0 to 100000 requests per second, got %', p_rate_limit
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example 10, or 0.5 for one request every 2 seconds; 0 removes the limit.';
    END IF;
    IF p_max_in_flight < 0 OR p_max_in_flight > 10000 THEN
        RAISE EXCEPTION 'max_in_flight must be from 0 to 10000, got %', p_max_in_flight
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The requests sent to the endpoint at once, by all dispatchers; 0 removes the limit.';
    END IF;
END
$$;

-- Takes an ordered endpoint's turn until commit: its routes and claims take
-- turns (and, for one ordered as a whole, requests too). Not waiting, it
-- returns false when another transaction has the turn. A transaction-level
-- advisory lock, not the endpoint's state row: settling a batch writes that
-- row (failure counts), and a dispatcher that waited for another's claim to
-- write it gave up after its lock_timeout (100 ms) and rolled its settle
-- back, so the requests were sent again once their leases ran out.
CREATE FUNCTION ihub._endpoint_turn(p_endpoint_id bigint, p_wait boolean) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- pg_ihub's class of advisory locks (hashtext('ihub.endpoint_turn')),
    -- and the endpoint: ids beyond 2^31 share a lock with another, which
    -- only makes them take turns too.
    c_class constant integer := -184645567;
    v_key integer := (p_endpoint_id % 2147483647)::integer;
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(c_class, v_key);
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(c_class, v_key);
END
$$;

-- The state row of an endpoint with limits, locked until commit (its
-- token bucket), or NULLs when another transaction holds it. The row is
-- made with the endpoint's limits (ihub._endpoint_state_for), so that two
-- dispatchers never wait on each other's insert of it; here only if missing.
CREATE FUNCTION ihub._endpoint_state_locked(p_endpoint_id bigint) RETURNS ihub.endpoint_state
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s ihub.endpoint_state;
BEGIN
    FOR i IN 1..2 LOOP
        SELECT * INTO s FROM ihub.endpoint_state WHERE endpoint_id = p_endpoint_id FOR UPDATE SKIP LOCKED;
        EXIT WHEN FOUND OR EXISTS (SELECT 1 FROM ihub.endpoint_state WHERE endpoint_id = p_endpoint_id);
        PERFORM ihub._endpoint_state_for(p_endpoint_id);
    END LOOP;
    RETURN s;
END
$$;

-- Makes an endpoint's state row if it has none (a rate-limit bucket with
-- one token, a closed circuit).
CREATE FUNCTION ihub._endpoint_state_for(p_endpoint_id bigint) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO ihub.endpoint_state (endpoint_id, tokens, tokens_at) VALUES (p_endpoint_id, 1, now()) ON CONFLICT DO NOTHING
$$;

-- Claims the due deliveries of endpoints with a rate limit or an in-flight
-- limit, endpoint by endpoint, within both: the endpoint's state row is
-- locked for it (a dispatcher claiming for it already is skipped), so the
-- limits hold across all dispatchers together. The rate limit is a token
-- bucket of one second's worth (at least 1) that starts with one token:
-- dispatchers take work due later in ticks of 500 ms (dispatcher.rs,
-- DUE_TICK), and a bucket of half a second's worth would lose the tokens
-- of any gap between claims longer than that. Nothing is held in memory
-- beyond the claim.
CREATE FUNCTION ihub._claim_limited(p_owner integer, p_limit integer, p_default_timeout_ms integer, p_rounds integer)
RETURNS SETOF ihub.delivery
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    l record;
    s ihub.endpoint_state;
    v_left integer := p_limit;
    v_tokens double precision;
    v_n integer;
    v_in_flight integer;
    v_got integer;
BEGIN
    FOR l IN
        SELECT e.id, e.rate_limit, e.max_in_flight, e.timeout_ms, e.ordering
        FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
        WHERE (e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL OR e.ordering IS NOT NULL)
          AND e.enabled AND i.state <> 'inactive'
          AND EXISTS (SELECT 1 FROM ihub.delivery q
                      WHERE q.endpoint_id = e.id AND q.state IN ('pending', 'retry') AND q.run_at <= now())
        ORDER BY e.id
    LOOP
        EXIT WHEN v_left <= 0;
        -- Another transaction routes or claims for this ordered endpoint.
        CONTINUE WHEN l.ordering IS NOT NULL AND NOT ihub._endpoint_turn(l.id, false);
        IF l.rate_limit IS NOT NULL OR l.max_in_flight IS NOT NULL THEN
            s := ihub._endpoint_state_locked(l.id);
            CONTINUE WHEN s.endpoint_id IS NULL;
        ELSE
            s := NULL;
            SELECT * INTO s FROM ihub.endpoint_state WHERE endpoint_id = l.id;
        END IF;
        CONTINUE WHEN s.state <> 'closed' OR s.paused_until > now();
        v_n := v_left;
        IF l.rate_limit IS NOT NULL THEN
            v_tokens := least(greatest(1, l.rate_limit),
                              coalesce(s.tokens, 1)
                              + l.rate_limit * extract(epoch FROM now() - coalesce(s.tokens_at, now()))::double precision);
            v_n := least(v_n, floor(v_tokens)::integer);
        END IF;
        IF l.max_in_flight IS NOT NULL THEN
            v_in_flight := l.max_in_flight - (SELECT count(*) FROM ihub.delivery r
                                              WHERE r.state = 'running' AND r.endpoint_id = l.id)::integer;
            IF v_in_flight < v_n THEN
                -- Due deliveries wait for requests in flight: the dispatcher
                -- settles its batch as soon as it is sent, not at its next
                -- tick, and claims them (see dispatcher.rs, in_flight_held).
                PERFORM set_config('ihub_claim.in_flight_held', 'on', false);
                v_n := v_in_flight;
            END IF;
        END IF;
        v_got := 0;
        IF v_n > 0 AND l.ordering IS NOT NULL THEN
            -- The first open delivery of each key, if it is due. The
            -- endpoint's turn keeps other claims and routes of it out
            -- until commit.
            RETURN QUERY
                WITH due AS (
                    SELECT q.id FROM ihub.delivery q
                    WHERE q.id = ANY (ihub._ordered_due(l.id, v_n))
                      AND q.state IN ('pending', 'retry')
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE ihub.delivery d
                SET state = 'running', worker_pid = p_owner,
                    lease_until = ihub._lease_until(coalesce(l.timeout_ms, p_default_timeout_ms), p_rounds)
                FROM due WHERE d.id = due.id
                RETURNING d.*;
            GET DIAGNOSTICS v_got = ROW_COUNT;
            -- The next of these keys may go once they are delivered: the
            -- dispatcher settles as soon as its batch is sent.
            IF v_got > 0 THEN
                PERFORM set_config('ihub_claim.in_flight_held', 'on', false);
            END IF;
        ELSIF v_n > 0 THEN
            RETURN QUERY
                WITH due AS (
                    SELECT q.id FROM ihub.delivery q
                    WHERE q.endpoint_id = l.id AND q.state IN ('pending', 'retry') AND q.run_at <= now()
                    ORDER BY q.run_at LIMIT v_n
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE ihub.delivery d
                SET state = 'running', worker_pid = p_owner,
                    lease_until = ihub._lease_until(coalesce(l.timeout_ms, p_default_timeout_ms), p_rounds)
                FROM due WHERE d.id = due.id
                RETURNING d.*;
            GET DIAGNOSTICS v_got = ROW_COUNT;
        END IF;
        IF l.rate_limit IS NOT NULL THEN
            UPDATE ihub.endpoint_state SET tokens = v_tokens - v_got, tokens_at = now() WHERE endpoint_id = l.id;
        END IF;
        v_left := v_left - v_got;
    END LOOP;
END
$$;

-- A 429 holds every delivery to its endpoint until the delivery's own
-- retry is due (its Retry-After, or else its backoff), not only that one.
CREATE FUNCTION ihub._pause_rate_limited(p_results jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
BEGIN
    FOR p IN
        SELECT d.endpoint_id, max(to_timestamp(x.next_at)) AS until
        FROM jsonb_to_recordset(p_results) AS x(delivery_id bigint, state text, category text, next_at double precision)
        JOIN ihub.delivery d ON d.id = x.delivery_id
        WHERE x.category = 'rate_limited' AND x.state = 'retry'
        GROUP BY d.endpoint_id
        ORDER BY d.endpoint_id
    LOOP
        INSERT INTO ihub.endpoint_state AS s (endpoint_id, paused_until) VALUES (p.endpoint_id, p.until)
        ON CONFLICT (endpoint_id) DO UPDATE SET paused_until = greatest(s.paused_until, EXCLUDED.paused_until);
    END LOOP;
END
$$;

-------------------------------------------------------------------------------
-- Ordering
-------------------------------------------------------------------------------

-- An endpoint's ordering: 'key', 'endpoint', or NULL ('none', or not given).
CREATE FUNCTION ihub._check_ordering(p_ordering text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_ordering IS NULL OR lower(p_ordering) = 'none' THEN
        RETURN NULL;
    ELSIF lower(p_ordering) IN ('key', 'endpoint') THEN
        RETURN lower(p_ordering);
    END IF;
    RAISE EXCEPTION 'invalid ordering "%"', p_ordering
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Use key (a row''s changes in commit order, keys in parallel), endpoint (one at a time, first in first out) or none.';
END
$$;

-- The ordering key of a delivery that is not a row change (a request, a
-- replay of one queued without order): its own key, unordered with others,
-- when the endpoint orders by key; the endpoint's when it orders them all.
CREATE FUNCTION ihub._ordering_key_of(p_ordering text, p_own_key text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE p_ordering WHEN 'endpoint' THEN '' WHEN 'key' THEN p_own_key END $$;

-- The columns whose values are a subscription's ordering key: those it was
-- given, or its table's primary key.
CREATE FUNCTION ihub._ordering_columns(p_sub ihub.subscription) RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text[] := p_sub.ordering_key;
BEGIN
    IF v IS NULL THEN
        SELECT array_agg(a.attname::text ORDER BY k.n) INTO v
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = p_sub.source AND i.indisprimary;
    END IF;
    IF v IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key to order its changes by', p_sub.source
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'Add a primary key, or subscribe with the key columns: ihub.subscribe(..., ordering_key => ''{customer_id}'').';
    END IF;
    RETURN v;
END
$$;

-- (ihub._ordered_heads, the first delivery of each key, is in outbound.sql:
-- the views use it.)

-- Sets an endpoint's ordering (from ihub.alter_endpoint). Deliveries queued
-- without an order cannot take a place in one afterwards, so ordering is
-- switched on only when nothing is queued for the endpoint; switching it
-- off is always possible. Either way, dead and failed deliveries give up
-- the keys they held (a replay queues them in the new order).
CREATE FUNCTION ihub._change_ordering(p_endpoint_id bigint, p_ordering text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint;
    v_queued bigint;
BEGIN
    -- FOR UPDATE waits for the routes and requests queueing deliveries for
    -- it (they hold FOR KEY SHARE until commit) and keeps new ones out.
    SELECT * INTO v_endpoint FROM ihub.endpoint WHERE id = p_endpoint_id FOR UPDATE;
    IF v_endpoint.ordering IS NOT DISTINCT FROM p_ordering THEN
        RETURN;
    END IF;
    IF p_ordering IS NOT NULL THEN
        SELECT count(*) INTO v_queued FROM ihub.delivery d
        WHERE d.endpoint_id = p_endpoint_id AND d.state IN ('pending', 'retry', 'running');
        IF v_queued > 0 THEN
            RAISE EXCEPTION 'endpoint "%" has % deliveries queued or in flight, queued without this order', v_endpoint.name, v_queued
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Set the ordering when nothing is queued for it (ihub.deliveries), or create an ordered endpoint and subscribe to that.';
        END IF;
        IF p_ordering = 'key' THEN
            PERFORM ihub._ordering_columns(s) FROM ihub.subscription s WHERE s.endpoint_id = p_endpoint_id;
        END IF;
    END IF;
    -- Switched on, nothing is queued (checked above, and queueing waits
    -- for this transaction); switched off, nothing holds a key any more.
    UPDATE ihub.delivery d SET ordering_key = NULL
    WHERE d.endpoint_id = p_endpoint_id AND d.ordering_key IS NOT NULL
      AND d.state IN ('failed', 'dead', 'pending', 'retry', 'running')
      AND (p_ordering IS NULL OR d.state IN ('failed', 'dead'));
    UPDATE ihub.endpoint SET ordering = p_ordering WHERE id = p_endpoint_id;
END
$$;

-- Ends a delivery without sending it: a dead or failed one that holds its
-- key, or one still waiting (pending or retrying). The next of its key may
-- go. A response handler gets nothing for it, so skipping a request with
-- one is for members of the role that made it (as a replay is), and who
-- skipped is kept in last_error.
CREATE FUNCTION ihub._skip_by(delivery_id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.delivery;
BEGIN
    SELECT * INTO v FROM ihub.delivery d WHERE d.id = _skip_by.delivery_id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'delivery % does not exist', delivery_id
            USING ERRCODE = 'undefined_object', HINT = 'List deliveries in ihub.deliveries.';
    ELSIF v.state NOT IN ('dead', 'failed', 'pending', 'retry') THEN
        RAISE EXCEPTION 'delivery % is %; only dead, failed, pending or retrying deliveries can be skipped', delivery_id, v.state
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE WHEN v.state = 'running' THEN 'It is being sent; skip it if its attempt fails.'
                              ELSE 'It has ended already.' END;
    END IF;
    IF v.on_response IS NOT NULL THEN
        PERFORM ihub._require_may_act_for(p_caller, v.requested_by, format('delivery %s, whose response handler', v.id));
    END IF;
    UPDATE ihub.delivery d
    SET state = 'skipped', finished_at = now(), worker_pid = NULL, lease_until = NULL,
        last_error = format('skipped by %s', p_caller::text) || coalesce(' after: ' || d.last_error, '')
    WHERE d.id = v.id;
    PERFORM ihub.log('info', format('delivery %s skipped by %s (it was %s)', v.id, p_caller::text, v.state),
                     jsonb_build_object('delivery', v.id, 'endpoint_id', v.endpoint_id));
    PERFORM ihub._wake();
END
$$;

-- A C entry point (src/caller.rs): who skips cannot be forged.
CREATE FUNCTION ihub.skip(delivery_id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-------------------------------------------------------------------------------
-- Event types
-------------------------------------------------------------------------------

-- An event type: a name such as order.paid (letters, digits, _ . : -), or,
-- for an endpoint's filter, a prefix ending in * (order.*, or * for all).
CREATE FUNCTION ihub._check_event_type(p_type text, p_pattern boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_type IS NULL AND NOT p_pattern THEN
        RETURN;
    END IF;
    IF p_type IS NULL OR NOT (p_type ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'
                              OR (p_pattern AND p_type ~ '^([A-Za-z0-9][A-Za-z0-9_.:-]{0,98})?\*$')) THEN
        RAISE EXCEPTION 'invalid event type %', coalesce(quote_literal(p_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN p_pattern
                              THEN 'Use names such as order.paid, or a prefix ending in *, e.g. ''{orders.insert,invoice.*}''.'
                              ELSE 'Use a name of letters, digits and _ . : -, e.g. order.paid (at most 100 characters).' END;
    END IF;
END
$$;

-- Whether an endpoint's event types (NULL: all) accept a type.
CREATE FUNCTION ihub._type_accepted(p_accepted text[], p_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_accepted IS NULL
        OR EXISTS (SELECT 1 FROM unnest(p_accepted) a
                   WHERE a = p_type OR (right(a, 1) = '*' AND left(p_type, length(a) - 1) = left(a, -1)))
$$;

-- Changes how an endpoint is delivered to: its timeout, retry policy,
-- circuit breaker, limits, the event types it accepts and its ordering
-- (see ihub._change_ordering). NULL leaves a
-- setting as it is; a limit of 0 removes it, and so does '{}' the event
-- types filter. Not where requests go
-- or what they carry (URL, method, headers, credentials): whoever may call
-- this could otherwise send another integration's payloads and credentials
-- to a host of their own. A circuit policy (true, false or an object, see
-- ihub.create_endpoint) also closes the circuit and starts its counts afresh.
CREATE FUNCTION ihub.alter_endpoint(
    name text,
    timeout_ms integer DEFAULT NULL,
    retry jsonb DEFAULT NULL,
    circuit jsonb DEFAULT NULL,
    rate_limit double precision DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    ordering text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint := ihub._endpoint(alter_endpoint.name);
    v_circuit ihub.endpoint_state;
    v_ordering text := ihub._check_ordering(alter_endpoint.ordering);
BEGIN
    IF alter_endpoint.timeout_ms IS NOT NULL AND alter_endpoint.timeout_ms NOT BETWEEN 1 AND 300000 THEN
        RAISE EXCEPTION 'timeout_ms must be between 1 and 300000, got %', alter_endpoint.timeout_ms
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave it NULL to keep the endpoint''s timeout.';
    END IF;
    PERFORM ihub._check_limits(alter_endpoint.rate_limit, alter_endpoint.max_in_flight);
    PERFORM ihub._check_event_type(t, true) FROM unnest(alter_endpoint.event_types) t;
    IF alter_endpoint.ordering IS NOT NULL THEN
        PERFORM ihub._change_ordering(v_endpoint.id, v_ordering);
    END IF;
    UPDATE ihub.endpoint e
    SET timeout_ms = coalesce(alter_endpoint.timeout_ms, e.timeout_ms),
        event_types = CASE WHEN alter_endpoint.event_types IS NULL THEN e.event_types
                           ELSE nullif(alter_endpoint.event_types, '{}') END,
        rate_limit = CASE WHEN alter_endpoint.rate_limit IS NULL THEN e.rate_limit ELSE nullif(alter_endpoint.rate_limit, 0) END,
        max_in_flight = CASE WHEN alter_endpoint.max_in_flight IS NULL THEN e.max_in_flight
                             ELSE nullif(alter_endpoint.max_in_flight, 0) END,
        retry = CASE WHEN alter_endpoint.retry IS NULL THEN e.retry ELSE ihub._normalize_retry(alter_endpoint.retry) END,
        circuit = CASE WHEN alter_endpoint.circuit IS NULL THEN e.circuit ELSE ihub._normalize_circuit(alter_endpoint.circuit) END
    WHERE e.id = v_endpoint.id;
    IF coalesce(alter_endpoint.rate_limit, 0) > 0 OR coalesce(alter_endpoint.max_in_flight, 0) > 0 THEN
        PERFORM ihub._endpoint_state_for(v_endpoint.id);
    END IF;
    IF alter_endpoint.circuit IS NOT NULL THEN
        SELECT * INTO v_circuit FROM ihub.endpoint_state WHERE endpoint_id = v_endpoint.id FOR UPDATE;
        IF FOUND THEN
            UPDATE ihub.endpoint_state
            SET state = 'closed', failures = 0, window_start = NULL, window_attempts = 0, window_failures = 0,
                opened_at = NULL, retry_at = NULL, probe_until = NULL,
                changes = CASE WHEN v_circuit.state = 'closed' THEN changes
                               ELSE ihub._circuit_changed(v_endpoint.id, changes, v_circuit.state, 'closed',
                                                          'closed by ihub.alter_endpoint') END
            WHERE endpoint_id = v_endpoint.id;
        END IF;
    END IF;
    PERFORM ihub._wake();
END
$$;

COMMENT ON FUNCTION ihub._endpoint_turn(bigint, boolean) IS
    'Internal: takes an ordered endpoint''s turn for routes, claims and requests until commit (an advisory lock); false when taken and not waiting.';
COMMENT ON FUNCTION ihub._endpoint_state_locked(bigint) IS
    'Internal: the state row of an endpoint with limits, locked until commit, or NULLs when another transaction holds it.';
COMMENT ON FUNCTION ihub._endpoint_state_for(bigint) IS 'Internal: makes an endpoint''s state row if it has none.';
COMMENT ON FUNCTION ihub._check_limits(double precision, integer) IS 'Internal: checks an endpoint''s rate_limit and max_in_flight.';
COMMENT ON FUNCTION ihub._claim_limited(integer, integer, integer, integer) IS
    'Internal (dispatcher): claims due deliveries of rate-limited, in-flight-limited or ordered endpoints within their limits, the first of each key for ordered ones.';
COMMENT ON FUNCTION ihub._pause_rate_limited(jsonb) IS
    'Internal (dispatcher): a 429 holds every delivery to its endpoint until that delivery''s retry.';
COMMENT ON FUNCTION ihub._circuit_changed(bigint, jsonb, text, text, text) IS
    'Internal: records a circuit''s change of state (history, NOTIFY ihub_circuit, log entry).';
COMMENT ON FUNCTION ihub._circuit_settle(jsonb) IS
    'Internal (dispatcher): counts a settled batch''s outcomes per endpoint, opens and closes circuits, disables endpoints failing for ihub.endpoint_disable_after.';
COMMENT ON FUNCTION ihub._circuit_probes(integer, integer, integer) IS
    'Internal (dispatcher): claims one probe delivery for each open circuit whose cooldown is over.';
COMMENT ON FUNCTION ihub.alter_endpoint(text, integer, jsonb, jsonb, double precision, integer, text[], text) IS
    'Changes an endpoint''s timeout, retry policy, circuit breaker, rate limit, in-flight limit, accepted event types or ordering; NULL keeps a setting, 0 (or ''{}'', or ''none'') removes a limit. A circuit policy also closes the circuit.';
COMMENT ON FUNCTION ihub._check_ordering(text) IS 'Internal: checks an endpoint''s ordering (key, endpoint or none).';
COMMENT ON FUNCTION ihub._ordering_key_of(text, text) IS 'Internal: the ordering key of a delivery that is not a row change.';
COMMENT ON FUNCTION ihub._ordering_columns(ihub.subscription) IS 'Internal: the columns that make a subscription''s ordering key (given, or the primary key).';
COMMENT ON FUNCTION ihub._change_ordering(bigint, text) IS 'Internal: sets an endpoint''s ordering (only when nothing is queued for it, to switch it on).';
COMMENT ON FUNCTION ihub._skip_by(bigint, regrole) IS
    'Internal: ihub.skip for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
COMMENT ON FUNCTION ihub.skip(bigint) IS
    'Ends a dead, failed, pending or retrying delivery without sending it, so that the next of its ordering key may go.';
COMMENT ON FUNCTION ihub._check_event_type(text, boolean) IS 'Internal: checks an event type name, or a filter pattern (a prefix ending in *).';
COMMENT ON FUNCTION ihub._type_accepted(text[], text) IS 'Internal: whether an endpoint''s event types (NULL: all) accept a type.';

REVOKE ALL ON ihub.endpoint_state FROM PUBLIC;

-- A dispatcher disables an endpoint (410 Gone, failing for days): the
-- reason is recorded, a warning and a critical entry are logged, and
-- ihub_circuit is notified. Nothing if it is disabled already.
CREATE FUNCTION ihub._disable_endpoint_for(p_endpoint_id bigint, p_why text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
    v_integration text;
BEGIN
    UPDATE ihub.endpoint e
    SET enabled = false, disabled_at = now(), disabled_reason = p_why || '; re-enable with ihub.enable_endpoint()'
    WHERE e.id = p_endpoint_id AND e.enabled
    RETURNING e.name, (SELECT i.name FROM ihub.integration i WHERE i.id = e.integration_id) INTO v_name, v_integration;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RAISE WARNING 'pg_ihub: endpoint "%" disabled: %', v_name, p_why;
    PERFORM pg_notify('ihub_circuit', jsonb_build_object('endpoint', v_name, 'at', now(), 'to', 'disabled', 'reason', p_why)::text);
    PERFORM ihub.log('critical', format('endpoint %s disabled: %s', v_name, p_why), jsonb_build_object('endpoint', v_name),
                     v_integration);
END
$$;
COMMENT ON FUNCTION ihub._disable_endpoint_for(bigint, text) IS
    'Internal (dispatcher): disables an endpoint with the reason, a warning, a critical log entry and a NOTIFY on ihub_circuit.';

-- A subscription names its event type: new arguments.
DROP FUNCTION ihub.subscribe(regclass, text, text[], text[], text[], text, boolean);
DROP FUNCTION ihub._subscribe_by(regclass, text, text[], text[], text[], text, boolean, regrole);
CREATE FUNCTION ihub._subscribe_by(
    source regclass,
    endpoint text,
    events text[] DEFAULT '{insert,update,delete}',
    columns text[] DEFAULT NULL,
    watch text[] DEFAULT NULL,
    condition text DEFAULT NULL,
    test_mode boolean DEFAULT false,
    event_type text DEFAULT NULL,
    ordering_key text[] DEFAULT NULL,
    payload jsonb DEFAULT NULL,
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
    v_bad text;
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
    v_bad := (SELECT string_agg(e, ', ') FROM unnest(v_events) AS e WHERE e NOT IN ('insert', 'update', 'delete', 'truncate'));
    IF v_events IS NULL OR v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'invalid events: %', coalesce(v_bad, 'none given')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use any of insert, update, delete and truncate, e.g. ''{insert,update}''.';
    END IF;

    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO v_columns
    FROM pg_attribute a WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped;
    v_bad := (SELECT string_agg(format('%I', c), ', ') FROM unnest(columns || watch || ordering_key) AS c WHERE c <> ALL (v_columns));
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'table % has no column %', source, v_bad
            USING ERRCODE = 'undefined_column', HINT = format('Its columns are: %s.', array_to_string(v_columns, ', '));
    END IF;
    IF cardinality(columns) = 0 OR cardinality(watch) = 0 OR cardinality(ordering_key) = 0 THEN
        RAISE EXCEPTION 'columns, watch and ordering_key must list at least one column when given'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL for all columns.';
    END IF;
    IF watch IS NOT NULL AND 'update' <> ALL (v_events) THEN
        RAISE EXCEPTION 'watch applies to updates, but events has no update'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Add update to events, or drop watch.';
    END IF;
    PERFORM ihub._check_event_type(event_type);
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
        -- Parse analysis only (names, types), never planned or run here, and
        -- as the subscriber: the condition runs later in the writer's
        -- transaction as its subscriber.
        BEGIN
            PERFORM ihub._parse_as(format(E'SELECT (\n%s\n)::boolean FROM %s AS new, %s AS old', condition, source, source),
                                   p_caller::oid);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid condition: %', SQLERRM
                USING ERRCODE = 'syntax_error',
                      HINT = 'Write one SQL boolean expression over new and old, e.g. new.amount > 100 AND old.status <> new.status.';
        END;
    END IF;

    INSERT INTO ihub.subscription (endpoint_id, source, events, columns, watch, condition, test_mode, created_by,
                                   event_type, ordering_key, payload)
    VALUES (v_endpoint.id, source, v_events, columns, watch, condition, coalesce(test_mode, false), v_caller,
            event_type, ordering_key, payload)
    RETURNING * INTO v_sub;
    IF payload IS NOT NULL THEN
        PERFORM ihub._check_payload(v_sub);
    END IF;
    IF v_endpoint.ordering = 'key' THEN
        PERFORM ihub._ordering_columns(v_sub);
    END IF;

    PERFORM ihub._create_capture_table(v_sub);
    PERFORM ihub._create_capture_triggers(v_sub, r) FROM ihub._capture_relations(source) AS r;
    IF v_integration.state = 'inactive' THEN
        PERFORM ihub._set_capture_enabled(v_sub.id, false);
    END IF;
    RETURN v_sub.id;
END
$$;

CREATE FUNCTION ihub.subscribe(
    source regclass,
    endpoint text,
    events text[] DEFAULT '{insert,update,delete}',
    columns text[] DEFAULT NULL,
    watch text[] DEFAULT NULL,
    condition text DEFAULT NULL,
    test_mode boolean DEFAULT false,
    event_type text DEFAULT NULL,
    ordering_key text[] DEFAULT NULL,
    payload jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';
COMMENT ON FUNCTION ihub._subscribe_by(regclass, text, text[], text[], text[], text, boolean, text, text[], jsonb, regrole) IS
    'Internal: ihub.subscribe for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
COMMENT ON FUNCTION ihub.subscribe(regclass, text, text[], text[], text[], text, boolean, text, text[], jsonb) IS
    'Subscribes an endpoint to row changes of a table (and of all its partitions): events (insert, update, delete, truncate), payload columns, watched columns (updates fire only when one changed), a condition over new and old, test mode, event type, the columns of its ordering key (default: the primary key) and a payload template. Returns the subscription id.';
-- New columns at the end: the event type, the ordering key's columns and the payload template.
CREATE OR REPLACE VIEW ihub.subscriptions AS
SELECT s.id, i.name AS integration, e.name AS endpoint, s.source, s.events, s.columns, s.watch, s.condition,
       s.test_mode, (i.state <> 'inactive') AS capturing, s.created_by, s.created_at,
       s.broken_reason AS broken, s.broken_at, s.event_type, s.ordering_key, s.payload
FROM ihub.subscription s
JOIN ihub.endpoint e ON e.id = s.endpoint_id
JOIN ihub.integration i ON i.id = e.integration_id;

GRANT EXECUTE ON FUNCTION
    ihub.create_endpoint(text, text, text, text, jsonb, jsonb, text, integer, jsonb, jsonb, double precision, integer, text[], text, text),
    ihub.alter_endpoint(text, integer, jsonb, jsonb, double precision, integer, text[], text),
    ihub.subscribe(regclass, text, text[], text[], text[], text, boolean, text, text[], jsonb),
    ihub.skip(bigint)
TO ihub_developer;

-- Deliveries show their ordering key.
CREATE OR REPLACE VIEW ihub.deliveries AS
SELECT d.id, i.name AS integration, e.name AS endpoint, d.subscription_id AS subscription,
       d.event_id, d.event_type, d.state, d.attempts,
       CASE WHEN d.state IN ('pending', 'retry') THEN d.run_at END AS run_at,
       d.last_status, d.last_error, d.test_mode, d.occurred_at, d.created_at, d.finished_at,
       d.finished_at - d.occurred_at AS latency, d.payload, d.ordering_key
FROM ihub.delivery d
JOIN ihub.endpoint e ON e.id = d.endpoint_id
JOIN ihub.integration i ON i.id = e.integration_id;

-------------------------------------------------------------------------------
-- Inbound presets (issue 13): sql/inbound.sql
-------------------------------------------------------------------------------

-- Providers' schemes by name, and a fixed response per source.
ALTER TABLE ihub.inbound_source DROP CONSTRAINT inbound_source_verify_check,
    ADD CONSTRAINT inbound_source_verify_check
    CHECK (verify IN ('standard-webhooks', 'hmac-sha256', 'shared-secret', 'none',
                      'stripe', 'github', 'shopify', 'slack', 'twilio', 'svix'));
-- What the listener answers a request it accepted (ihub._check_source_response); NULL: 202 and the item id.
ALTER TABLE ihub.inbound_source ADD COLUMN response jsonb;

CREATE FUNCTION ihub._form_jsonb("body" bytea) RETURNS jsonb
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'form_jsonb_wrapper';
COMMENT ON FUNCTION ihub._form_jsonb(bytea) IS 'Internal: a form-encoded body as a JSON object (repeated fields as arrays).';
-- Used by ihub.inbound_items, which runs functions with the reader's rights.
GRANT EXECUTE ON FUNCTION ihub._form_jsonb(bytea) TO ihub_viewer;

-- Form posts get a payload too.
CREATE OR REPLACE VIEW ihub.inbound_items AS
SELECT t.id, i.name AS integration, s.name AS source, t.received_at, t.run_at, t.state, t.attempts,
       t.headers, t.body,
       -- The first byte is looked at undecoded: a body that is not UTF-8 must
       -- not break the view (and every handler reading it).
       CASE WHEN t.headers ->> 'content-type' LIKE '%json%'
                 OR substring(ltrim(t.body, '\x20090a0d'::bytea) FROM 1 FOR 1) IN ('\x7b'::bytea, '\x5b'::bytea)
            THEN ihub._try_jsonb(t.body)
            -- Form posts (Twilio, Slack commands): an object of the fields.
            WHEN t.headers ->> 'content-type' LIKE 'application/x-www-form-urlencoded%'
            THEN ihub._form_jsonb(t.body) END AS payload,
       t.ordering_key, t.dedup_key, t.remote_addr, t.result, t.error, t.finished_at, t.reactivated
FROM ihub.inbound_item t
JOIN ihub.inbound_source s ON s.id = t.source_id
JOIN ihub.integration i ON i.id = s.integration_id;

-- A new column at the end: the fixed response.
CREATE OR REPLACE VIEW ihub.inbound_sources AS
SELECT s.id, i.name AS integration, s.name, s.handler::text AS handler, s.verify, s.header, s.id_header, s.ordering_key,
       s.tolerance, s.dedup_window, s.run_as, '/webhooks/' || i.name || '/' || s.name AS path, s.created_at,
       s.response
FROM ihub.inbound_source s JOIN ihub.integration i ON i.id = s.integration_id;

DROP FUNCTION ihub._inbound_sources();
CREATE FUNCTION ihub._inbound_sources()
RETURNS TABLE (id bigint, integration text, source text, active boolean, verify text, header text, id_header text,
               secret text, tolerance_s bigint, response jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.id, i.name, s.name, i.state <> 'inactive', s.verify, s.header, s.id_header, k.secret,
           extract(epoch FROM s.tolerance)::bigint, s.response
    FROM ihub.inbound_source s
    JOIN ihub.integration i ON i.id = s.integration_id
    LEFT JOIN ihub.inbound_secret k ON k.source_id = s.id
$$;

CREATE FUNCTION ihub._check_source_response(p_response jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_response IS NULL THEN
        RETURN;
    END IF;
    IF jsonb_typeof(p_response) <> 'object'
       OR EXISTS (SELECT 1 FROM jsonb_object_keys(p_response) k WHERE k NOT IN ('status', 'content_type', 'body'))
       OR jsonb_typeof(p_response -> 'status') IS DISTINCT FROM 'number'
       OR NOT ((p_response ->> 'status') ~ '^2[0-9][0-9]$')
       OR coalesce(jsonb_typeof(p_response -> 'content_type'), 'string') <> 'string'
       OR coalesce(jsonb_typeof(p_response -> 'body'), 'string') <> 'string'
       OR octet_length(coalesce(p_response ->> 'body', '')) > 65536
       OR NOT coalesce(p_response ->> 'content_type', 'text/plain') ~ '^[\x20-\x7e]{1,255}$' THEN
        RAISE EXCEPTION 'invalid response %', left(p_response::text, 200)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give {"status": 200, "content_type": "text/xml", "body": "<Response/>"}: a 2xx status, and a body of 64 kB at most.';
    END IF;
END
$$;
COMMENT ON FUNCTION ihub._check_source_response(jsonb) IS 'Internal: checks a source''s fixed response (status 2xx, content_type, body of 64 kB at most).';

DROP FUNCTION ihub.create_source(text, text, regprocedure, text, text, text, interval, interval, text, text);
DROP FUNCTION ihub._create_source_by(text, text, regprocedure, text, text, text, interval, interval, text, text, regrole);
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
    response jsonb DEFAULT NULL,
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
    IF verify IS NULL OR verify NOT IN ('standard-webhooks', 'hmac-sha256', 'shared-secret', 'none',
                                        'stripe', 'github', 'shopify', 'slack', 'twilio', 'svix') THEN
        RAISE EXCEPTION 'unknown verification "%"', verify
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use standard-webhooks, hmac-sha256, shared-secret or none, or a provider''s preset: stripe, github, shopify, slack, twilio or svix.';
    END IF;
    IF verify <> 'none' AND coalesce(secret, '') = '' THEN
        RAISE EXCEPTION 'verification % needs a secret', verify
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE verify WHEN 'stripe' THEN 'Pass the endpoint''s signing secret (whsec_..., in Stripe''s dashboard).'
                                     WHEN 'github' THEN 'Pass the webhook''s secret.'
                                     WHEN 'shopify' THEN 'Pass the app''s client secret (or the webhook signing secret).'
                                     WHEN 'slack' THEN 'Pass the app''s signing secret.'
                                     WHEN 'twilio' THEN 'Pass the account''s auth token.'
                                     ELSE 'Pass the secret the sender signs with (whsec_... for Standard Webhooks and Svix).' END;
    END IF;
    IF verify IN ('standard-webhooks', 'svix') THEN
        PERFORM ihub._check_secret(secret);
    END IF;
    IF verify IN ('stripe', 'github', 'shopify', 'slack', 'twilio', 'svix') AND (header IS NOT NULL OR id_header IS NOT NULL) THEN
        RAISE EXCEPTION 'the % preset has its own headers', verify
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave out header and id_header: the preset knows which headers its provider sends.';
    END IF;
    PERFORM ihub._check_source_response(response);
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
                                     tolerance, dedup_window, run_as, handler_name, response)
    VALUES (v_integration, _create_source_by.name, handler, verify, lower(header), lower(id_header), ordering_key,
            tolerance, dedup_window, p_caller, handler::text, response)
    RETURNING id INTO v_id;
    IF secret IS NOT NULL THEN
        INSERT INTO ihub.inbound_secret (source_id, secret) VALUES (v_id, secret);
    END IF;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.create_source(
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
    response jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';
COMMENT ON FUNCTION ihub.create_source(text, text, regprocedure, text, text, text, interval, interval, text, text, jsonb) IS
    'Creates an inbound source, POST /webhooks/<integration>/<name>: verification (standard-webhooks, hmac-sha256, shared-secret, none, or a preset: stripe, github, shopify, slack, twilio, svix), secret, tolerance, de-duplication window, ordering key, a fixed response and the SQL handler. Returns its id.';
GRANT EXECUTE ON FUNCTION ihub.create_source(text, text, regprocedure, text, text, text, interval, interval, text, text, jsonb) TO ihub_developer;
COMMENT ON FUNCTION ihub._create_source_by(text, text, regprocedure, text, text, text, interval, interval, text, text, jsonb, regrole) IS
    'Internal: ihub.create_source for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
COMMENT ON FUNCTION ihub._inbound_sources() IS 'Internal (listener): sources with what verifying needs.';

-------------------------------------------------------------------------------
-- Payload templates (issue 13): sql/payloads.sql
-------------------------------------------------------------------------------

-- The query ihub._capture_filtered runs (as the subscriber) for one event of
-- a subscription with watched columns or a condition: the positions of the
-- transition rows that pass, numbered in the transition tables' order. New
-- and old are exposed to the condition by name. Postgres appends each
-- updated row's old and new versions to the two transition tables together,
-- so equal positions pair them even when the update changes the key.
CREATE OR REPLACE FUNCTION ihub._capture_filter(p_sub ihub.subscription, p_event text)
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
    -- With a payload template, its data for each row (as text: the trigger
    -- stores it as jsonb).
    RETURN format('SELECT %s._ihub_n%s %s%s', CASE p_event WHEN 'delete' THEN 'old' ELSE 'new' END,
                  CASE WHEN p_sub.payload IS NOT NULL
                       THEN format(E', (\n%s\n)::text', ihub._payload_expression(p_sub, p_event)) ELSE '' END, v_from,
                  CASE WHEN cardinality(v_filters) > 0 THEN ' WHERE ' || array_to_string(v_filters, ' AND ') ELSE '' END);
END
$$;

-- Subscribers' SQL (conditions, templates) is parsed as the subscriber.
CREATE FUNCTION ihub._parse_as("sql" text, "role" oid) RETURNS void
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'parse_as_wrapper';
COMMENT ON FUNCTION ihub._parse_as(text, oid) IS 'Internal: parse analysis of a subscriber''s SQL as that role, in a security-restricted operation.';

-- pg_ihub payload templates: how a subscription shapes its deliveries'
-- data (ihub.subscribe(…, payload => …)). The template becomes one SQL
-- expression that the capture trigger evaluates in the writer's
-- transaction, as the subscriber (ihub._capture_filter): computed fields
-- are the subscriber's code, and related rows are read in the writer's
-- snapshot, as they were when the change was made.
--
--   {"rename":  {"<column>": "<key>"},
--    "compute": {"<key>": "<SQL expression over new and old>"},
--    "nest":    {"<key>": {"via": "<this table's foreign key column>"}                  -- the row it references
--               ,"<key>": {"from": "<table>", "via": "<its foreign key column>"}}      -- the rows referencing this one
--    "static":  {"<key>": <any JSON>},
--    "omit":    ["<column>", ...],
--    "nulls":   "keep" | "omit"}
--
-- A nested entry takes rename, nest, static and omit again (three levels
-- at most); rows referencing one are 1,000 at most, in primary key order.

-- Renames an object's keys (a key not in p_renames stays).
CREATE FUNCTION ihub._rename_keys(p_object jsonb, p_renames jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(coalesce(p_renames ->> e.key, e.key), e.value), '{}')
    FROM jsonb_each(p_object) e
$$;

-- The single-column foreign key of p_table on p_column: the table and
-- column it references.
CREATE FUNCTION ihub._foreign_key(p_table regclass, p_column text, OUT referenced regclass, OUT referenced_column text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT c.confrelid::regclass, a.attname::text INTO referenced, referenced_column
    FROM pg_constraint c
    JOIN pg_attribute k ON k.attrelid = c.conrelid AND k.attnum = c.conkey[1]
    JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = c.confkey[1]
    WHERE c.contype = 'f' AND c.conrelid = p_table AND cardinality(c.conkey) = 1 AND k.attname = p_column
    ORDER BY c.oid LIMIT 1;
    IF referenced IS NULL THEN
        RAISE EXCEPTION 'payload template: % has no single-column foreign key on column %', p_table, quote_ident(p_column)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Nest along a foreign key: {"nest": {"customer": {"via": "customer_id"}}} needs FOREIGN KEY (customer_id) REFERENCES ....';
    END IF;
END
$$;

-- The SQL of a template for rows of p_table called p_alias: a jsonb
-- expression. p_base is what the row's own columns give (top level: the
-- subscription's columns only). Checks the template as it goes, with p_role
-- needing SELECT on every table it reads.
CREATE FUNCTION ihub._payload_sql(p_table regclass, p_alias text, p_tpl jsonb, p_role name, p_depth integer DEFAULT 0,
                                  p_base text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_columns text[] := ARRAY(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum);
    v_sql text;
    v_parts text[] := '{}';
    e record;
    v_nest jsonb;
    v_fk record;
    v_child regclass;
    v_pk text;
    v_alias text;
    v_bad text;
BEGIN
    IF jsonb_typeof(p_tpl) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'payload template must be a JSON object, got %', coalesce(jsonb_typeof(p_tpl), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"rename": {"amount": "total"}, "static": {"source": "erp"}}.';
    END IF;
    v_bad := (SELECT string_agg(k, ', ') FROM jsonb_object_keys(p_tpl) k
              WHERE k NOT IN ('rename', 'nest', 'static', 'omit') AND (p_depth > 0 OR k NOT IN ('compute', 'nulls')));
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'payload template: unknown key %', v_bad
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN p_depth > 0 THEN 'A nested entry takes via, from, rename, nest, static and omit.'
                              ELSE 'A template takes rename, compute, nest, static, omit and nulls.' END;
    END IF;
    IF p_depth > 0 AND NOT has_table_privilege(p_role, p_table, 'SELECT') THEN
        RAISE EXCEPTION 'payload template: permission denied for table %', p_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Related rows are read as the subscriber: role %s needs SELECT on %s.', p_role, p_table);
    END IF;
    FOR e IN SELECT k AS key, v AS value FROM jsonb_each(coalesce(p_tpl -> 'rename', '{}')) x(k, v) LOOP
        IF e.key <> ALL (v_columns) OR jsonb_typeof(e.value) <> 'string' THEN
            RAISE EXCEPTION 'payload template: cannot rename % of %', quote_ident(e.key), p_table
                USING ERRCODE = 'invalid_parameter_value', HINT = format('Rename columns to keys: {"rename": {"column": "key"}}; the columns are %s.', array_to_string(v_columns, ', '));
        END IF;
    END LOOP;
    IF (p_tpl ? 'omit') AND (jsonb_typeof(p_tpl -> 'omit') <> 'array'
                             OR EXISTS (SELECT 1 FROM jsonb_array_elements(p_tpl -> 'omit') o
                                        WHERE jsonb_typeof(o) <> 'string' OR o #>> '{}' <> ALL (v_columns))) THEN
        RAISE EXCEPTION 'payload template: omit must list columns of %', p_table
            USING ERRCODE = 'invalid_parameter_value', HINT = format('Its columns are %s.', array_to_string(v_columns, ', '));
    END IF;
    v_sql := format('(%s - %L::text[])', coalesce(p_base, format('to_jsonb(%I)', p_alias)),
                    ARRAY(SELECT o FROM jsonb_array_elements_text(coalesce(p_tpl -> 'omit', '[]')) o) || ARRAY['_ihub_n']);
    IF p_tpl ? 'rename' THEN
        v_sql := format('ihub._rename_keys(%s, %L::jsonb)', v_sql, p_tpl -> 'rename');
    END IF;
    FOR e IN SELECT k AS key, v AS value FROM jsonb_each(coalesce(p_tpl -> 'compute', '{}')) x(k, v) LOOP
        IF jsonb_typeof(e.value) <> 'string' THEN
            RAISE EXCEPTION 'payload template: compute % must be an SQL expression in a string', quote_ident(e.key)
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"compute": {"total_cents": "round(new.amount * 100)"}}.';
        END IF;
        BEGIN
            PERFORM ihub._check_expression(e.value #>> '{}');
        EXCEPTION WHEN syntax_error THEN
            RAISE EXCEPTION 'payload template: compute % must be one SQL expression (%)', quote_ident(e.key),
                            regexp_replace(SQLERRM, '^invalid condition: ', '')
                USING ERRCODE = 'syntax_error', HINT = 'For example {"compute": {"total_cents": "round(new.amount * 100)"}}, over new and old.';
        END;
        v_parts := v_parts || format('%L, (%s)', e.key, e.value #>> '{}');
    END LOOP;
    FOR e IN SELECT k AS key, v AS value FROM jsonb_each(coalesce(p_tpl -> 'nest', '{}')) x(k, v) LOOP
        v_nest := e.value;
        IF p_depth >= 3 THEN
            RAISE EXCEPTION 'payload template: nested more than three levels deep at %', quote_ident(e.key)
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Nest at most three levels of related rows.';
        END IF;
        IF jsonb_typeof(v_nest) <> 'object' OR jsonb_typeof(v_nest -> 'via') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'payload template: nest % needs "via", a foreign key column', quote_ident(e.key)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'The row referenced: {"via": "customer_id"}; the rows referencing this one: {"from": "order_lines", "via": "order_id"}.';
        END IF;
        v_alias := format('n%s_%s', p_depth + 1, cardinality(v_parts));
        IF v_nest ? 'from' THEN
            -- A name without a schema is in this table's schema (the
            -- template runs with no search path of the subscriber's).
            v_child := CASE WHEN strpos(v_nest ->> 'from', '.') > 0 THEN to_regclass(v_nest ->> 'from')
                            ELSE to_regclass(format('%I.%s', (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                                              WHERE c.oid = p_table), v_nest ->> 'from')) END;
            IF v_child IS NULL THEN
                RAISE EXCEPTION 'payload template: table % does not exist', v_nest ->> 'from'
                    USING ERRCODE = 'undefined_table',
                          HINT = 'Name the table whose rows reference this one; without a schema, it is looked up in the schema of the table it nests under.';
            END IF;
            SELECT * INTO v_fk FROM ihub._foreign_key(v_child, v_nest ->> 'via');
            IF v_fk.referenced <> p_table THEN
                RAISE EXCEPTION 'payload template: %.% references %, not %', v_child, v_nest ->> 'via', v_fk.referenced, p_table
                    USING ERRCODE = 'invalid_parameter_value', HINT = 'Give the column of the other table that references this one.';
            END IF;
            v_pk := (SELECT string_agg(format('%I.%I', v_alias, a.attname), ', ' ORDER BY k.n)
                     FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     WHERE i.indrelid = v_child AND i.indisprimary);
            v_parts := v_parts || format(
                '%L, (SELECT coalesce(jsonb_agg(x.j), %L) FROM (SELECT %s AS j FROM %s AS %I WHERE %I.%I = %I.%I ORDER BY %s LIMIT 1000) x)',
                e.key, '[]', ihub._payload_sql(v_child, v_alias, v_nest - 'from' - 'via', p_role, p_depth + 1),
                v_child, v_alias, v_alias, v_nest ->> 'via', p_alias, v_fk.referenced_column,
                coalesce(v_pk, format('%I.ctid', v_alias)));
        ELSE
            IF (v_nest ->> 'via') <> ALL (v_columns) THEN
                RAISE EXCEPTION 'payload template: % has no column %', p_table, quote_ident(v_nest ->> 'via')
                    USING ERRCODE = 'undefined_column', HINT = format('Its columns are %s.', array_to_string(v_columns, ', '));
            END IF;
            SELECT * INTO v_fk FROM ihub._foreign_key(p_table, v_nest ->> 'via');
            v_parts := v_parts || format('%L, (SELECT %s FROM %s AS %I WHERE %I.%I = %I.%I)',
                e.key, ihub._payload_sql(v_fk.referenced, v_alias, v_nest - 'via', p_role, p_depth + 1),
                v_fk.referenced, v_alias, v_alias, v_fk.referenced_column, p_alias, v_nest ->> 'via');
        END IF;
    END LOOP;
    IF cardinality(v_parts) > 0 THEN
        v_sql := format('(%s || jsonb_build_object(%s))', v_sql, array_to_string(v_parts, ', '));
    END IF;
    IF p_tpl ? 'static' THEN
        IF jsonb_typeof(p_tpl -> 'static') <> 'object' THEN
            RAISE EXCEPTION 'payload template: static must be an object'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"static": {"source": "erp", "version": 2}}.';
        END IF;
        v_sql := format('(%s || %L::jsonb)', v_sql, p_tpl -> 'static');
    END IF;
    IF p_depth = 0 AND coalesce(p_tpl ->> 'nulls', 'keep') NOT IN ('keep', 'omit') THEN
        RAISE EXCEPTION 'payload template: nulls must be keep or omit'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'omit leaves out keys whose value is null, at every level.';
    END IF;
    IF p_depth = 0 AND p_tpl ->> 'nulls' = 'omit' THEN
        v_sql := format('jsonb_strip_nulls(%s)', v_sql);
    END IF;
    RETURN v_sql;
END
$$;

-- The expression a subscription's capture trigger evaluates for the row
-- of an event (new, or old for a delete), its own columns limited to the
-- subscription's columns. NULL without a template.
CREATE FUNCTION ihub._payload_expression(p_sub ihub.subscription, p_event text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_sub.payload IS NOT NULL THEN
        ihub._payload_sql(p_sub.source, CASE p_event WHEN 'delete' THEN 'old' ELSE 'new' END, p_sub.payload,
                          p_sub.created_by, 0,
                          CASE WHEN p_sub.columns IS NOT NULL
                               THEN format('jsonb_build_object(%s)',
                                           (SELECT string_agg(format('%L, %I.%I', c, CASE p_event WHEN 'delete' THEN 'old' ELSE 'new' END, c), ', ')
                                            FROM unnest(p_sub.columns) c)) END)
    END
$$;

-- Checks a template at subscribe: what it names, the subscriber's rights,
-- and (by parse analysis, never running it) the SQL it makes.
CREATE FUNCTION ihub._check_payload(p_sub ihub.subscription) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sql text := ihub._payload_expression(p_sub, 'insert');
BEGIN
    BEGIN
        PERFORM ihub._parse_as(format(E'SELECT (\n%s\n)::jsonb FROM %s AS new, %s AS old', v_sql, p_sub.source, p_sub.source),
                               (SELECT r.oid FROM pg_roles r WHERE r.rolname = p_sub.created_by));
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'invalid payload template: %', SQLERRM
            USING ERRCODE = 'syntax_error',
                  HINT = 'Computed fields are SQL expressions over new and old, e.g. {"compute": {"total_cents": "round(new.amount * 100)"}}.';
    END;
END
$$;

COMMENT ON FUNCTION ihub._rename_keys(jsonb, jsonb) IS 'Internal: renames an object''s keys.';
COMMENT ON FUNCTION ihub._foreign_key(regclass, text) IS 'Internal: the single-column foreign key of a table on a column.';
COMMENT ON FUNCTION ihub._payload_sql(regclass, text, jsonb, name, integer, text) IS
    'Internal: the jsonb expression of a payload template for rows of a table, checking the template.';
COMMENT ON FUNCTION ihub._payload_expression(ihub.subscription, text) IS
    'Internal: the payload expression a subscription''s capture trigger evaluates for an event; NULL without a template.';
COMMENT ON FUNCTION ihub._check_payload(ihub.subscription) IS 'Internal: checks a subscription''s payload template at subscribe.';

-------------------------------------------------------------------------------
-- Timed conditions (issue 13): sql/timers.sql
-------------------------------------------------------------------------------

-- Timed subscriptions' timers (sql/timers.sql): one per row of the
-- table, due at its column + offset; fired_at once its delivery is queued.
CREATE TABLE ihub.timer (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES ihub.subscription (id) ON DELETE CASCADE,
    -- the row's primary key values
    row_key         jsonb NOT NULL,
    due_at          timestamptz NOT NULL,
    fired_at        timestamptz,
    -- the row as its last change left it
    data            jsonb NOT NULL,
    UNIQUE (subscription_id, row_key)
);
-- Dispatchers fire (and wake for) the first due timers by this index.
CREATE INDEX timer_due_idx ON ihub.timer (due_at) WHERE fired_at IS NULL;
COMMENT ON TABLE ihub.timer IS 'Timed subscriptions'' timers: one per row, due at column + offset (ihub.subscribe_timed).';
SELECT pg_catalog.pg_extension_config_dump('ihub.timer', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.timer_id_seq', '');
REVOKE ALL ON ihub.timer FROM PUBLIC;

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

GRANT SELECT ON ihub.timers TO ihub_viewer;
GRANT EXECUTE ON FUNCTION ihub.subscribe_timed(regclass, text, text, interval, text, text) TO ihub_developer;
COMMENT ON FUNCTION ihub._subscribe_timed_by(regclass, text, text, interval, text, text, regrole) IS
    'Internal: ihub.subscribe_timed for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';

-------------------------------------------------------------------------------
-- Privileges: as a fresh install sets them (finalize.sql)
-------------------------------------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ihub FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ihub.retry_later(text, interval), ihub.job_progress(bigint, bigint) TO PUBLIC;
