-- pg_ihub bindings: which local row is which object of another system, per
-- integration and object type, with a hash of the data last synced (Zoho's
-- bindings, Studio's links). ihub.upsert creates or updates a local row from
-- external data and binds it, writing nothing when the hash says nothing
-- changed. A binding goes when its row is deleted: the first binding of a
-- table installs a statement trigger there (ihub_binding_cleanup).
--
-- Loop prevention: ihub.syncing marks a transaction; the capture triggers
-- skip that integration's subscriptions (src/sync/syncing.rs). Comments on
-- Rust helpers and privileges are in finalize.sql.

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
