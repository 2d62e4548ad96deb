-- pg_ihub inbound webhooks: sources, accepting (from the listener worker or
-- ihub.receive), the processing queue, and its views.

-- The body as jsonb, or NULL when it is not JSON.
CREATE FUNCTION ihub._try_jsonb(p_body bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN convert_from(p_body, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- What a handler receives: CREATE FUNCTION my_handler(item ihub.inbound_items) RETURNS jsonb.
CREATE VIEW ihub.inbound_items AS
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

CREATE FUNCTION ihub._source_row(p_integration text, p_name text) RETURNS ihub.inbound_source
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.inbound_source;
BEGIN
    SELECT * INTO v FROM ihub.inbound_source
    WHERE integration_id = ihub._integration_id(p_integration) AND name = p_name;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'integration "%" has no inbound source "%"', p_integration, p_name
            USING ERRCODE = 'undefined_object', HINT = 'Create it with ihub.create_source, or list them in ihub.inbound_sources.';
    END IF;
    RETURN v;
END
$$;

-- A source's fixed response to the requests it accepts: {"status": 2xx,
-- "content_type": "text/plain", "body": "..."} (a body of 64 kB at most).
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

CREATE FUNCTION ihub.drop_source(integration text, name text) RETURNS void
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

-- The listener caches sources; any change to them, their secrets or an
-- integration's state tells it at commit (ihub._sources_changed), so that
-- it never answers from a stale cache.
CREATE FUNCTION ihub._sources_changed_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ihub._sources_changed();
    RETURN NULL;
END
$$;

CREATE TRIGGER sources_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ihub.inbound_source
    FOR EACH STATEMENT EXECUTE FUNCTION ihub._sources_changed_trigger();
CREATE TRIGGER sources_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ihub.inbound_secret
    FOR EACH STATEMENT EXECUTE FUNCTION ihub._sources_changed_trigger();
CREATE TRIGGER sources_changed AFTER UPDATE OR DELETE ON ihub.integration
    FOR EACH STATEMENT EXECUTE FUNCTION ihub._sources_changed_trigger();

-- Sources as the listener caches them (with their secrets: the listener
-- verifies signatures itself).
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

-- The ordering key of an item, per its source's rule. A key longer than
-- 256 bytes is stored as 'sha256:' and its hash, so that no sender's value
-- can exceed the index's row limit (the rule of pg_ihub_core's bounded_key).
-- (PL/pgSQL: the listener calls it for every item, and a SQL function that
-- cannot be inlined is parsed and planned again at each call; make bench:
-- 4,700 -> 7,400 requests accepted a second.)
CREATE FUNCTION ihub._ordering_key(p_rule text, p_headers jsonb, p_body bytea) RETURNS text
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

-- Queues a batch of verified requests (the listener's group commit).
-- A request whose delivery id (or body hash) was seen by its source within
-- the de-duplication window is not queued again: it gets the first one's id.
-- The listener calls it for every batch; per item it runs two statements
-- where it ran four: the source is looked up once for a run of items of the
-- same source, and the de-duplication entry is claimed first, with the
-- item's id taken from its sequence, instead of being looked up, then
-- inserted after the item (which a concurrent duplicate had to delete).
CREATE FUNCTION ihub._accept_inbound(p_sources bigint[], p_headers jsonb[], p_bodies bytea[], p_dedup text[],
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

CREATE FUNCTION ihub._reject_inbound(p_sources bigint[], p_reasons text[], p_remote text[], p_hashes text[], p_headers jsonb[])
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO ihub.inbound_rejection (source_id, reason, remote_addr, body_sha256, headers)
    -- A source dropped meanwhile: the rejection is kept without it.
    SELECT (SELECT id FROM ihub.inbound_source WHERE id = s), r, a, h, ihub._mask_headers(hd)
    FROM unnest(p_sources, p_reasons, p_remote, p_hashes, p_headers) AS x(s, r, a, h, hd)
$$;

-- The listener's path from SQL, for applications that receive HTTP
-- themselves. Returns the item id (the first one's for a duplicate), or
-- NULL with a WARNING when verification fails (the rejection is recorded).
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

-------------------------------------------------------------------------------
-- Processing
-------------------------------------------------------------------------------

-- The statement that calls a handler for item $1 (a void handler yields NULL).
CREATE FUNCTION ihub._handler_call(p_handler regprocedure) RETURNS text
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

-- Claims the next items due for a processor and returns how to call their
-- handlers, in order of execution time. An item with an ordering key waits
-- while an earlier item with its key is pending or running, so a claim
-- takes at most the first of a key. A processor runs the items in one
-- transaction (one commit for them all), so they are the items of one role
-- only: that of the first item's handler. It takes at most p_limit, and at
-- most its share (rounded down, at least one) of the due items among
-- p_workers (of the next p_limit * p_workers + 1 from the first on), so
-- that a few slow handlers still run side by side on idle processors; the
-- one more tells whether more are due. Only what is claimed is locked.
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

CREATE FUNCTION ihub._claim_inbound(p_owner integer, p_default_timeout_ms integer)
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

-- Only the process that took the item (p_owner) can settle it.
CREATE FUNCTION ihub._inbound_done(p_id bigint, p_owner integer, p_result jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.inbound_item SET state = 'done', finished_at = clock_timestamp(), result = p_result,
                                 error = NULL, worker_pid = NULL
    WHERE id = p_id AND state = 'running' AND worker_pid = p_owner;
END
$$;

-- A failed item is archived with its error, kept out of the queue and
-- never deleted; ihub.reactivate_inbound queues it again.
CREATE FUNCTION ihub._inbound_failed(p_id bigint, p_owner integer, p_error text) RETURNS void
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

CREATE FUNCTION ihub._rescue_inbound() RETURNS bigint
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

-- Items blocked behind an earlier one with the same ordering key do not
-- count: they become claimable when that one is done, and the processor
-- finishing it claims them; counting them would wake an idle processor
-- over and over. The first in run_at order, from the due index read in
-- order whatever the statistics (see ihub._next_due): with those of a
-- drained queue analyzed empty, min() read every queued item.
CREATE FUNCTION ihub._next_inbound_due() RETURNS double precision
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

CREATE FUNCTION ihub.reactivate_inbound(ids bigint[]) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- For ihub.process_inbound (src/processor.rs): takes a queued or failed item
-- for this session, if the caller may run the source's handler; returns the
-- statement that calls it.
CREATE FUNCTION ihub._inbound_take(p_id bigint, p_caller regrole) RETURNS text
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

CREATE FUNCTION ihub._inbound_settle(p_id bigint, p_result jsonb, p_error text) RETURNS void
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

CREATE FUNCTION ihub._cleanup_inbound(p_cutoff timestamptz, p_batch integer) RETURNS bigint
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

CREATE FUNCTION ihub._inbound_queue_stats()
RETURNS TABLE (queue text, state text, items bigint, oldest_age interval)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'inbound', s.state, count(t.id), now() - min(t.received_at)
    FROM unnest(ARRAY['pending', 'running', 'done', 'failed']) AS s(state)
    LEFT JOIN ihub.inbound_item t ON t.state = s.state
    GROUP BY s.state
$$;

CREATE VIEW ihub.inbound_failed AS
SELECT id, integration, source, received_at, finished_at AS failed_at, attempts, reactivated, error, headers, payload, body
FROM ihub.inbound_items WHERE state = 'failed';

CREATE VIEW ihub.inbound_sources AS
SELECT s.id, i.name AS integration, s.name, s.handler::text AS handler, s.verify, s.header, s.id_header, s.ordering_key,
       s.tolerance, s.dedup_window, s.run_as, '/webhooks/' || i.name || '/' || s.name AS path, s.created_at,
       s.response
FROM ihub.inbound_source s JOIN ihub.integration i ON i.id = s.integration_id;

CREATE VIEW ihub.inbound_rejections AS
SELECT r.id, r.received_at, i.name AS integration, s.name AS source, r.reason, r.remote_addr, r.body_sha256, r.headers
FROM ihub.inbound_rejection r
LEFT JOIN ihub.inbound_source s ON s.id = r.source_id
LEFT JOIN ihub.integration i ON i.id = s.integration_id;

COMMENT ON VIEW ihub.inbound_items IS
    'Inbound items with their source and body (payload: the body as jsonb when it is JSON). Handlers take a row of this view.';
COMMENT ON FUNCTION ihub._try_jsonb(bytea) IS 'Internal: a body as jsonb, or NULL when it is not JSON.';
COMMENT ON FUNCTION ihub._form_jsonb(bytea) IS 'Internal: a form-encoded body as a JSON object (repeated fields as arrays).';
COMMENT ON FUNCTION ihub._source_row(text, text) IS 'Internal: an inbound source by name, or an error with a hint.';
COMMENT ON FUNCTION ihub.create_source(text, text, regprocedure, text, text, text, interval, interval, text, text, jsonb) IS
    'Creates an inbound source, POST /webhooks/<integration>/<name>: verification (standard-webhooks, hmac-sha256, shared-secret, none, or a preset: stripe, github, shopify, slack, twilio, svix), secret, tolerance, de-duplication window, ordering key, a fixed response and the SQL handler. Returns its id.';
COMMENT ON FUNCTION ihub._check_source_response(jsonb) IS 'Internal: checks a source''s fixed response (status 2xx, content_type, body of 64 kB at most).';
COMMENT ON FUNCTION ihub.drop_source(text, text) IS
    'Drops an inbound source with nothing queued and no failed items, and its processed items.';
COMMENT ON FUNCTION ihub._sources_changed_trigger() IS 'Internal: tells the listener at commit that sources changed.';
COMMENT ON TRIGGER sources_changed ON ihub.inbound_source IS 'Tells the listener to reload its cache of sources at commit.';
COMMENT ON TRIGGER sources_changed ON ihub.inbound_secret IS 'Tells the listener to reload its cache of sources at commit.';
COMMENT ON TRIGGER sources_changed ON ihub.integration IS 'Tells the listener to reload its cache of sources at commit.';
COMMENT ON FUNCTION ihub._inbound_sources() IS 'Internal (listener): sources with what verifying needs.';
COMMENT ON FUNCTION ihub._ordering_key(text, jsonb, bytea) IS 'Internal: an item''s ordering key (hashed when over 256 bytes).';
COMMENT ON FUNCTION ihub._accept_inbound(bigint[], jsonb[], bytea[], text[], text[], timestamptz[]) IS
    'Internal: queues a batch of verified requests, dropping duplicates.';
COMMENT ON FUNCTION ihub._reject_inbound(bigint[], text[], text[], text[], jsonb[]) IS 'Internal: records refused requests.';
COMMENT ON FUNCTION ihub.receive(text, text, jsonb, bytea, timestamptz) IS
    'Verifies and queues a request received by the application itself, like the listener. Returns the item id (the first one''s for a duplicate), or NULL when verification fails.';
COMMENT ON FUNCTION ihub._handler_call(regprocedure) IS 'Internal: the statement that calls an inbound handler for an item.';
COMMENT ON FUNCTION ihub._claim_inbound_items(integer, integer, integer, integer) IS
    'Internal (processor): claims up to p_limit (and its share among p_workers) of the next items due whose handlers run as one role, for one transaction; archives as failed the claimed items whose handler was dropped on the way.';
COMMENT ON FUNCTION ihub._unclaim_inbound_items(bigint[], integer) IS
    'Internal (processor): gives claimed items it did not start back to the queue.';
COMMENT ON FUNCTION ihub._inbound_integration(bigint) IS 'Internal: the integration of an inbound item''s source.';
COMMENT ON FUNCTION ihub._claim_inbound(integer, integer) IS
    'Internal: claims the next item due (ihub._claim_inbound_items with a limit of one).';
COMMENT ON FUNCTION ihub._inbound_done(bigint, integer, jsonb) IS 'Internal: records a processed item (by the process that took it).';
COMMENT ON FUNCTION ihub._inbound_failed(bigint, integer, text) IS 'Internal: archives a failed item with its error.';
COMMENT ON FUNCTION ihub._rescue_inbound() IS 'Internal: queues again items whose processor is gone.';
COMMENT ON FUNCTION ihub._next_inbound_due() IS 'Internal (processor): seconds until the next item is due.';
COMMENT ON FUNCTION ihub.reactivate_inbound(bigint[]) IS 'Queues failed inbound items again. Returns how many.';
COMMENT ON FUNCTION ihub._inbound_take(bigint, regrole) IS 'Internal: takes an item for ihub.process_inbound, if the caller may run its handler.';
COMMENT ON FUNCTION ihub._inbound_settle(bigint, jsonb, text) IS 'Internal: records the outcome of ihub.process_inbound.';
COMMENT ON FUNCTION ihub._cleanup_inbound(timestamptz, integer) IS 'Internal: removes processed items past their retention.';
COMMENT ON FUNCTION ihub._inbound_queue_stats() IS 'Internal: inbound counts for ihub.queue_stats.';
COMMENT ON VIEW ihub.inbound_failed IS 'Failed inbound items, archived with their error until reactivated.';
COMMENT ON VIEW ihub.inbound_sources IS 'Inbound sources and their listener paths (secrets not shown).';
COMMENT ON VIEW ihub.inbound_rejections IS 'Requests refused by verification: source, reason, remote address, body hash.';
