-- pg_ihub outbound: endpoints, subscriptions and the delivery queue, with
-- their views (integrations are in integrations.sql). Comments on the Rust helpers and all privileges
-- are in finalize.sql.
--
-- Public functions are SECURITY DEFINER with a fixed search_path: they write
-- tables no caller can touch directly, and EXECUTE grants decide who may call
-- them (finalize.sql).

-------------------------------------------------------------------------------
-- Endpoints
-------------------------------------------------------------------------------

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

CREATE FUNCTION ihub.enable_endpoint(name text) RETURNS void
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

CREATE FUNCTION ihub.disable_endpoint(name text, reason text DEFAULT 'disabled by hand') RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.endpoint SET enabled = false, disabled_reason = reason, disabled_at = now()
    WHERE id = (ihub._endpoint(disable_endpoint.name)).id;
END
$$;

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

CREATE FUNCTION ihub.rotate_secret(endpoint text, new_secret text DEFAULT NULL, grace interval DEFAULT '24 hours')
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

-------------------------------------------------------------------------------
-- Subscriptions: capture tables and triggers
-------------------------------------------------------------------------------

-- The query ihub._capture_filtered runs (as the subscriber) for one event of
-- a subscription with watched columns or a condition: the positions of the
-- transition rows that pass, numbered in the transition tables' order. New
-- and old are exposed to the condition by name. Postgres appends each
-- updated row's old and new versions to the two transition tables together,
-- so equal positions pair them even when the update changes the key.
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
    -- With a payload template, its data for each row (as text: the trigger
    -- stores it as jsonb).
    RETURN format('SELECT %s._ihub_n%s %s%s', CASE p_event WHEN 'delete' THEN 'old' ELSE 'new' END,
                  CASE WHEN p_sub.payload IS NOT NULL
                       THEN format(E', (\n%s\n)::text', ihub._payload_expression(p_sub, p_event)) ELSE '' END, v_from,
                  CASE WHEN cardinality(v_filters) > 0 THEN ' WHERE ' || array_to_string(v_filters, ' AND ') ELSE '' END);
END
$$;

-- A subscription's capture table: the captured rows keep the table's own
-- row type, copied unchanged by the capture triggers, the number of their
-- statement (ihub.capture_seq) and, with a payload template, the data the
-- template made of them in the writer's transaction.
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

CREATE FUNCTION ihub._unsubscribe_by(id bigint, p_caller regrole) RETURNS void
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

-- Ends a subscription: what it captured becomes deliveries, then its
-- triggers, capture table and row go. Writers still open may have captured
-- changes the route cannot see yet: it waits for them (the lock CREATE
-- TRIGGER takes) and keeps new ones out until commit; so it does for a
-- dispatcher routing (see ihub._lock_subscription). A subscription whose
-- table is gone (dropped with its schema) has nothing left to route.
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

-- DROP TABLE of subscribed tables (from the event trigger ihub_ddl_start,
-- src/outbound/ddl.rs): each subscription delivers what it captured, then
-- ends, before the table goes.
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

-- ALTER TABLE ... ADD COLUMN or ALTER COLUMN ... TYPE of a subscribed table
-- (from ihub_ddl_start): Postgres refuses to change a row type that another
-- table stores (the capture table) when the change needs a default or a
-- rewrite. So, with the table locked against writers, what was captured is
-- delivered and the capture table goes; ihub._on_ddl_end makes it again
-- with the new row type once the ALTER is done, in the same transaction.
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

-- After ALTER TABLE: capture tables that ihub._capture_before_alter removed
-- are made again with the table's new row type. After CREATE TABLE and
-- ALTER TABLE: partitions made, attached or detached get or lose capture
-- triggers.
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

-- Marks a subscription broken (the first time: a critical log entry, hence
-- an activity), or keeps the mark with the latest reason on a retry.
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

-- Tables dropped other than by DROP TABLE (DROP SCHEMA ... CASCADE, DROP
-- OWNED): their subscriptions are marked broken; what their capture tables
-- held went with the table's row type. ihub.unsubscribe removes them.
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
    -- Bindings of rows of dropped tables go with them.
    DELETE FROM ihub.binding b USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = b.local_table AND d.object_type IN ('table', 'partitioned table');
    -- Custom fields go with their column or table.
    DELETE FROM ihub.custom_field f USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = f.target
      AND (d.object_type IN ('table', 'partitioned table') OR (d.object_type = 'table column' AND d.objsubid = f.attnum));
END
$$;

CREATE FUNCTION ihub._on_ddl_start() RETURNS event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'ihub_ddl_start';

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
COMMENT ON EVENT TRIGGER ihub_sql_drop IS
    'pg_ihub: marks broken the subscriptions of tables dropped with their schema or owner.';

CREATE FUNCTION ihub.unsubscribe(id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

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

-------------------------------------------------------------------------------
-- Queue: routing, claiming, settling (called by the dispatcher workers)
-------------------------------------------------------------------------------

-- Moves up to p_limit captured changes of one subscription into deliveries,
-- rendering their JSON payloads. With p_owner set and the endpoint able to
-- send, the new deliveries are claimed at once (state running, leased to
-- p_owner), which saves the dispatcher a second write per delivery.
-- Returns the new deliveries' rows.
-- A lease covers the requests queued ahead of this one in the batch (the
-- sender keeps at most ihub.max_concurrency in flight: p_rounds = batch size
-- / concurrency, rounded up), each up to the endpoint's timeout, plus 30 s.
CREATE FUNCTION ihub._lease_until(p_timeout_ms integer, p_rounds integer) RETURNS timestamptz
LANGUAGE sql STABLE
AS $$ SELECT now() + make_interval(secs => p_timeout_ms * greatest(p_rounds, 1) / 1000.0 + 30) $$;

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

-- The statements a route runs for one subscription: take captured rows
-- from a block on ($1 rows at most, from block $2), take them from before it,
-- or take the first $1 in statement order (for ordered endpoints), and render
-- the rows taken ($1) as deliveries, in statement order: those of the
-- operations $12 whose event type the endpoint accepts, typed $13 or
-- <table>.<operation>, with an ordering key for the endpoint's ordering $14
-- made of the columns $15 (see ihub._route for the other parameters).
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

CREATE FUNCTION ihub._has_rows(p_table text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', p_table) INTO v;
    RETURN v;
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

-- Routes captured changes and claims due deliveries for one dispatcher.
-- enable_seqscan = off (here and in ihub._settle): a dispatcher plans these
-- statements once and keeps the plans. Planned while the delivery table was
-- tiny, they were sequential scans, kept while the table grew (in one make
-- bench run of three, looking 60 claimed deliveries up took 12 ms instead of
-- 0.16). Every statement here reads a few rows by key or from a partial
-- index; an index is right at any size.
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

-- Records a batch of attempts and moves each delivery to its next state.
-- Only deliveries still leased to p_owner are settled: one whose lease ran
-- out was claimed again elsewhere, and that claim settles it.
-- (enable_seqscan = off: see ihub._claim.)
CREATE FUNCTION ihub._settle(p_owner integer, p_results jsonb) RETURNS bigint
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

-- Failed attempts go to the log aggregated: per endpoint and outcome
-- (retried, dead, failed) one entry a minute for each dispatcher, whose
-- count and last error grow until the minute is over. An entry per round
-- and one per dead delivery made a retry storm of 20,000 deliveries write
-- 7,000 entries a wave (make bench). Each dispatcher updates only its own
-- entries, so two never wait for each other here.
CREATE FUNCTION ihub._log_failures(p_results jsonb) RETURNS void
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

-- The message of an aggregated failure entry (see ihub._log_failures).
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

-- Deliveries left running by a worker that is gone (crash, termination,
-- restart) or whose lease ran out go back to the queue.
CREATE FUNCTION ihub._rescue() RETURNS bigint
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

-- Capture tables with at least p_min_dead dead rows (routed or rolled back),
-- which the dispatcher vacuums.
CREATE FUNCTION ihub._bloated_capture_tables(p_min_dead bigint)
RETURNS TABLE (relid oid, schema text, name text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid, 'ihub_capture', c.relname::text
    FROM pg_class c
    WHERE c.relnamespace = 'ihub_capture'::regnamespace AND c.relkind = 'r'
      AND pg_stat_get_dead_tuples(c.oid) >= p_min_dead
$$;

-- Seconds until the earliest claimable delivery is due (NULL when none; not
-- 0, which would make an idle dispatcher spin). The first in run_at order,
-- not min(): with the endpoint condition (a join) Postgres computed min()
-- over every queued delivery, 33 ms a call at each idle dispatcher round of
-- make bench's retry storm (20,000 queued). Only the due index read in order
-- is allowed: with the statistics of an empty queue (a drained one that was
-- analyzed), Postgres read and sorted every queued delivery instead.
CREATE FUNCTION ihub._next_due() RETURNS double precision
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

-------------------------------------------------------------------------------
-- One-off requests and replay
-------------------------------------------------------------------------------

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

-- What the foreign keys of ihub.delivery would do (it has none: see
-- bootstrap.sql), checked when an endpoint or a subscription is deleted,
-- which is rare, instead of for every delivery queued. Whatever queues a
-- delivery holds its endpoint FOR KEY SHARE until it commits, as a foreign
-- key check would: a concurrent delete waits, then finds the delivery.
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

CREATE FUNCTION ihub.replay(delivery_id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

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

CREATE FUNCTION ihub.replay_dead(endpoint text, since timestamptz DEFAULT '-infinity') RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';


-------------------------------------------------------------------------------
-- Views (credentials masked; secrets only in endpoint_secrets, for ihub_admin)
-------------------------------------------------------------------------------

CREATE VIEW ihub.endpoints AS
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

CREATE VIEW ihub.endpoint_secrets AS
SELECT e.name AS endpoint, s.secret, s.created_at, s.expires_at,
       (s.expires_at IS NULL OR s.expires_at > now()) AS signing
FROM ihub.endpoint_secret s JOIN ihub.endpoint e ON e.id = s.endpoint_id;

CREATE VIEW ihub.subscriptions AS
SELECT s.id, i.name AS integration, e.name AS endpoint, s.source, s.events, s.columns, s.watch, s.condition,
       s.test_mode, (i.state <> 'inactive') AS capturing, s.created_by, s.created_at,
       s.broken_reason AS broken, s.broken_at, s.event_type, s.ordering_key, s.payload
FROM ihub.subscription s
JOIN ihub.endpoint e ON e.id = s.endpoint_id
JOIN ihub.integration i ON i.id = e.integration_id;

CREATE VIEW ihub.deliveries AS
SELECT d.id, i.name AS integration, e.name AS endpoint, d.subscription_id AS subscription,
       d.event_id, d.event_type, d.state, d.attempts,
       CASE WHEN d.state IN ('pending', 'retry') THEN d.run_at END AS run_at,
       d.last_status, d.last_error, d.test_mode, d.occurred_at, d.created_at, d.finished_at,
       d.finished_at - d.occurred_at AS latency, d.payload, d.ordering_key
FROM ihub.delivery d
JOIN ihub.endpoint e ON e.id = d.endpoint_id
JOIN ihub.integration i ON i.id = e.integration_id;

CREATE VIEW ihub.delivery_attempts AS
SELECT a.delivery_id, a.attempt, e.name AS endpoint, d.event_id, a.started_at, a.duration_ms,
       coalesce(d.method, e.method) AS request_method, ihub._mask_url(ihub._join_url(e.url, d.path)) AS request_url,
       ihub._mask_attempt_headers(a.request_headers, e.headers || coalesce(d.headers, '{}')) AS request_headers,
       d.payload AS request_body,
       a.response_status, a.response_headers, a.response_body, a.error, a.error_category
FROM ihub.delivery_attempt a
JOIN ihub.delivery d ON d.id = a.delivery_id
JOIN ihub.endpoint e ON e.id = d.endpoint_id;

CREATE VIEW ihub.workers AS
SELECT w.pid, w.kind, db.datname AS database, w.started_at, w.last_heartbeat
FROM ihub._workers() w LEFT JOIN pg_database db ON db.oid = w.database_oid;

-------------------------------------------------------------------------------
-- Comments
-------------------------------------------------------------------------------

COMMENT ON FUNCTION ihub.create_endpoint(text, text, text, text, jsonb, jsonb, text, integer, jsonb, jsonb, double precision, integer, text[], text, text) IS
    'Adds an HTTP endpoint to an integration: URL, method, headers, auth (none/basic/bearer/api_key/oauth2), signing secret (whsec_ for v1 or whsk_ for v1a signatures, generated when NULL), timeout, retry policy, circuit breaker, limits, accepted event types and ordering (key or endpoint). Returns its id.';
COMMENT ON FUNCTION ihub.enable_endpoint(text) IS 'Re-enables an endpoint (after a 410 Gone, say); its held deliveries resume.';
COMMENT ON FUNCTION ihub.disable_endpoint(text, text) IS 'Stops deliveries to an endpoint; they wait until it is enabled again.';
COMMENT ON FUNCTION ihub.rotate_secret(text, text, interval) IS
    'Adds a new signing secret (generated when NULL) and keeps the old ones signing for the grace period. Returns the new secret. ihub_admin only.';
COMMENT ON FUNCTION ihub._capture_filter(ihub.subscription, text) IS 'Internal: the query that selects the transition rows passing a subscription''s watch and condition.';
COMMENT ON FUNCTION ihub.subscribe(regclass, text, text[], text[], text[], text, boolean, text, text[], jsonb) IS
    'Subscribes an endpoint to row changes of a table (and of all its partitions): events (insert, update, delete, truncate), payload columns, watched columns (updates fire only when one changed), a condition over new and old, test mode, event type, the columns of its ordering key (default: the primary key) and a payload template. Returns the subscription id.';
COMMENT ON FUNCTION ihub.unsubscribe(bigint) IS
    'Removes a subscription''s triggers and capture table; changes already captured are queued first.';
COMMENT ON FUNCTION ihub._json_cast_hazard(regclass) IS 'Internal: a cast to json, owned by a role other than a superuser, that rendering the table''s rows would call; NULL when none.';
COMMENT ON FUNCTION ihub._lease_until(integer, integer) IS 'Internal: when a lease on a claimed delivery runs out.';
COMMENT ON FUNCTION ihub._route(ihub.subscription, integer, integer, integer, integer) IS
    'Internal: turns captured row changes into deliveries with JSON payloads, claiming them for the calling worker.';
COMMENT ON FUNCTION ihub._route_sql(bigint, text) IS
    'Internal: the text of one of the statements that route a subscription''s captured changes (take, wrap, render).';
COMMENT ON FUNCTION ihub._route_prepare(bigint) IS
    'Internal: prepares a subscription''s route statements in a dispatcher''s session, once; false past 300 statements.';
COMMENT ON FUNCTION ihub._route_forget() IS
    'Internal (dispatcher): drops the session''s prepared route statements, in a transaction of its own.';
COMMENT ON FUNCTION ihub._disable_endpoint_for(bigint, text) IS
    'Internal (dispatcher): disables an endpoint with the reason, a warning, a critical log entry and a NOTIFY on ihub_circuit.';
COMMENT ON FUNCTION ihub._has_rows(text) IS 'Internal: whether a table has any visible row.';
COMMENT ON FUNCTION ihub._claim(integer, integer, integer, integer) IS
    'Internal (dispatcher): routes captured changes and claims due deliveries with FOR UPDATE SKIP LOCKED and a lease.';
COMMENT ON FUNCTION ihub._settle(integer, jsonb) IS
    'Internal (dispatcher): records a batch of attempts and moves each delivery to its next state in one transaction.';
COMMENT ON FUNCTION ihub._connection_request(text) IS
    'Internal (ihub.test_connection): an endpoint''s method, URL, headers, credentials and live secrets, as a claim gives them.';
COMMENT ON FUNCTION ihub._log_failures(jsonb) IS
    'Internal (dispatcher): logs retried, dead and failed deliveries, one entry per endpoint, outcome and minute for each dispatcher, with counts.';
COMMENT ON FUNCTION ihub._failure_message(text, bigint, text, text) IS 'Internal: the message of an aggregated delivery-failure log entry.';
COMMENT ON FUNCTION ihub._rescue() IS 'Internal (dispatcher): requeues deliveries whose worker is gone or whose lease expired.';
COMMENT ON FUNCTION ihub._bloated_capture_tables(bigint) IS 'Internal (dispatcher): capture tables with many dead rows, to vacuum.';
COMMENT ON FUNCTION ihub._next_due() IS 'Internal (dispatcher): seconds until the next claimable delivery is due.';
COMMENT ON FUNCTION ihub.http_request(text, jsonb, text, text, jsonb, text, jsonb, regprocedure, jsonb) IS
    'Queues a one-off durable request to an endpoint, signed and retried like any delivery: body (none for GET), method, path, query parameters, headers, event type; with on_response, that function runs as a job of the caller with the response (ihub.http_response) and the context once the request ends. Returns the delivery id.';
COMMENT ON TYPE ihub.http_response IS
    'What a response handler gets: delivery, state (done, failed, dead), HTTP status, headers, body as text and as JSON, the request''s context, attempts and error.';
COMMENT ON FUNCTION ihub._check_response_function(regprocedure, name) IS
    'Internal: checks that a function takes one ihub.http_response and that the role may execute it.';
COMMENT ON FUNCTION ihub._try_json(text) IS 'Internal: a text as jsonb, NULL when it is not JSON.';
COMMENT ON FUNCTION ihub._respond(jsonb, bigint[]) IS
    'Internal (dispatcher): queues the response handler jobs of the ended requests of a settled batch.';
COMMENT ON FUNCTION ihub._endpoint_deleted() IS
    'Internal: trigger refusing to delete an endpoint that still has deliveries (ihub.delivery has no foreign keys).';
COMMENT ON FUNCTION ihub._subscription_deleted() IS
    'Internal: trigger clearing the subscription of deliveries when their subscription is deleted (ihub.delivery has no foreign keys).';
COMMENT ON TRIGGER endpoint_deleted ON ihub.endpoint IS 'Refuses to delete an endpoint that still has deliveries.';
COMMENT ON TRIGGER subscription_deleted ON ihub.subscription IS 'Clears the subscription of its deliveries when it is deleted.';
COMMENT ON FUNCTION ihub.replay(bigint) IS 'Puts a dead or failed delivery back in the queue with a fresh retry budget.';
COMMENT ON FUNCTION ihub.replay_dead(text, timestamptz) IS
    'Puts every dead or failed delivery of an endpoint created since the given time back in the queue. Returns how many.';

COMMENT ON VIEW ihub.endpoints IS 'Endpoints with masked headers and URL; credentials are never shown here.';
COMMENT ON VIEW ihub.endpoint_secrets IS 'Signing secrets per endpoint, with rotation expiry. ihub_admin only.';
COMMENT ON VIEW ihub.subscriptions IS 'Row-change subscriptions, whether they are capturing, and why one is broken.';
COMMENT ON VIEW ihub.deliveries IS
    'Outbound deliveries: state (pending, running, retry, done, failed, dead), attempts, next attempt (run_at), last status and error, latency from commit to delivery.';
COMMENT ON VIEW ihub.delivery_attempts IS
    'Every delivery attempt: request (credentials masked), response status, headers and body (truncated), duration, error category.';
COMMENT ON VIEW ihub.workers IS 'pg_ihub background workers alive now, with their database and last heartbeat.';
