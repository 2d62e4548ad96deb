-- pg_ihub custom fields: a typed column added to a table for data that only
-- exists in another system (iHub's custom fields), registered so that the
-- integrations it is exported to get it in their payloads and no other
-- integration ever does. The column is the user's, made with ALTER TABLE by
-- the table's owner (or a member of its role); ihub._route leaves it out of
-- other integrations' payloads. Comments on Rust helpers and privileges are
-- in finalize.sql.

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
