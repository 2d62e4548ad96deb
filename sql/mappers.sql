-- pg_ihub mappers: translating values between this database and another
-- system (iHub's mapper types and mapper items). A mapper belongs to an
-- integration; its local values are either a column of a table (`table`:
-- a tax code, a country code) or a fixed set (`enum`: a status). Each item
-- maps one or more external values to one local value; the first external
-- value is the one exported. What happens to a value with no item is set
-- separately for import and export: auto, manual or fail.
--
-- Mappers are configuration a person edits (items waiting for a local
-- value): they survive pg_dump. Comments on the Rust helper and privileges
-- are in finalize.sql.

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
