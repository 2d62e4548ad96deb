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
