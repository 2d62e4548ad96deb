-- pg_ihub integrations: what every capability hangs off. Creating,
-- enabling (checking required settings; test or active by ihub.environment),
-- disabling (capture stops, queued work waits) and deleting integrations,
-- and the name lookups the other files use. Comments on the Rust helpers and
-- all privileges are in finalize.sql.
--
-- Public functions are SECURITY DEFINER with a fixed search_path: they write
-- tables no caller can touch directly, and EXECUTE grants decide who may call
-- them (finalize.sql).

-------------------------------------------------------------------------------
-- Helpers
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._integration_id(p_name text) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT id INTO v_id FROM ihub.integration WHERE name = p_name;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'integration "%" does not exist', p_name
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with ihub.create_integration(name), or list them in ihub.integrations.';
    END IF;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub._endpoint(p_name text) RETURNS ihub.endpoint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.endpoint;
BEGIN
    SELECT * INTO v FROM ihub.endpoint WHERE name = p_name;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'endpoint "%" does not exist', p_name
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with ihub.create_endpoint(integration, name, url), or list them in ihub.endpoints.';
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION ihub._check_name(p_what text, p_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid % name "%"', p_what, p_name
            USING ERRCODE = 'invalid_name',
                  HINT = 'Use 1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit.';
    END IF;
END
$$;

-------------------------------------------------------------------------------
-- Integrations
-------------------------------------------------------------------------------

CREATE FUNCTION ihub.create_integration(
    name text,
    kind text DEFAULT 'webhook',
    tenant text DEFAULT NULL,
    settings jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    PERFORM ihub._check_name('integration', create_integration.name);
    IF NOT EXISTS (SELECT 1 FROM ihub.integration_kind k WHERE k.kind = create_integration.kind) THEN
        RAISE EXCEPTION 'unknown integration kind "%"', create_integration.kind
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Known kinds: %s (see ihub.integration_kind).',
                                (SELECT string_agg(k.kind, ', ' ORDER BY k.kind) FROM ihub.integration_kind k));
    END IF;
    IF settings IS NULL OR jsonb_typeof(settings) <> 'object' THEN
        RAISE EXCEPTION 'integration settings must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"base_url": "https://api.example.com"}.';
    END IF;
    IF EXISTS (SELECT 1 FROM ihub.integration i WHERE i.name = create_integration.name) THEN
        RAISE EXCEPTION 'integration "%" already exists', create_integration.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or use the existing integration.';
    END IF;
    INSERT INTO ihub.integration (name, kind, tenant, settings)
    VALUES (create_integration.name, create_integration.kind, create_integration.tenant, create_integration.settings)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

-- Capture triggers run only while their integration is enabled, so that a
-- disabled integration costs its tables' writers nothing.
CREATE FUNCTION ihub._set_capture_enabled(p_subscription bigint, p_enabled boolean) RETURNS void
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

CREATE FUNCTION ihub.enable_integration(name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.integration;
    v_missing text[];
    v_state text;
BEGIN
    PERFORM ihub._require_workers();
    SELECT * INTO v FROM ihub.integration i WHERE i.id = ihub._integration_id(enable_integration.name) FOR UPDATE;
    SELECT array_agg(req ORDER BY req) INTO v_missing
    FROM ihub.integration_kind k, unnest(k.required_settings) AS req
    WHERE k.kind = v.kind AND coalesce(v.settings ->> req, '') = '';
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'integration "%" lacks required settings: %', v.name, array_to_string(v_missing, ', ')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Integrations of kind %s need %s in their settings.', v.kind, array_to_string(v_missing, ', '));
    END IF;
    v_state := CASE WHEN current_setting('ihub.environment') = 'staging' THEN 'test' ELSE 'active' END;
    UPDATE ihub.integration SET state = v_state, updated_at = now() WHERE id = v.id;
    PERFORM ihub._set_capture_enabled(s.id, true)
    FROM ihub.subscription s JOIN ihub.endpoint e ON e.id = s.endpoint_id
    WHERE e.integration_id = v.id;
    -- Deliveries held while the integration was off can go now.
    PERFORM ihub._wake();
    RETURN v_state;
END
$$;

CREATE FUNCTION ihub.disable_integration(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint := ihub._integration_id(disable_integration.name);
BEGIN
    UPDATE ihub.integration SET state = 'inactive', updated_at = now() WHERE id = v_id;
    PERFORM ihub._set_capture_enabled(s.id, false)
    FROM ihub.subscription s JOIN ihub.endpoint e ON e.id = s.endpoint_id
    WHERE e.integration_id = v_id;
END
$$;

CREATE FUNCTION ihub.delete_integration(name text) RETURNS void
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

CREATE VIEW ihub.integrations AS
SELECT i.id, i.name, i.kind, i.tenant, i.state, ihub._mask_settings(i.settings) AS settings,
       i.created_at, i.updated_at
FROM ihub.integration i;

COMMENT ON FUNCTION ihub._integration_id(text) IS 'Internal: id of an integration by name, or an error with a hint.';
COMMENT ON FUNCTION ihub._endpoint(text) IS 'Internal: an endpoint row by name, or an error with a hint.';
COMMENT ON FUNCTION ihub._check_name(text, text) IS 'Internal: validates an integration or endpoint name.';
COMMENT ON FUNCTION ihub.create_integration(text, text, text, jsonb) IS
    'Registers an integration (inactive until ihub.enable_integration). Returns its id.';
COMMENT ON FUNCTION ihub._set_capture_enabled(bigint, boolean) IS 'Internal: enables or disables a subscription''s capture triggers.';
COMMENT ON FUNCTION ihub.enable_integration(text) IS
    'Checks the integration''s required settings and enables it: state test when ihub.environment = staging, active otherwise. Returns the new state.';
COMMENT ON FUNCTION ihub.disable_integration(text) IS
    'Sets the integration inactive: its capture triggers stop and its queued deliveries wait.';
COMMENT ON FUNCTION ihub.delete_integration(text) IS
    'Deletes an inactive integration with its endpoints, subscriptions, mappers and delivery history.';
COMMENT ON VIEW ihub.integrations IS 'Integrations with their state; secret-looking settings masked.';
