-- The pg_ihub catalog as sorted lines, to compare an upgraded database with
-- a fresh CREATE EXTENSION of the same version: relations, columns,
-- constraints, indexes, views, triggers, functions with their signatures,
-- bodies and properties, privileges, comments, settings and extension
-- membership. Object ids and the order objects were made in do not count.
WITH ns AS (
    SELECT oid, nspname FROM pg_namespace WHERE nspname IN ('ihub', 'ihub_capture')
), rel AS (
    SELECT c.* , ns.nspname FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'i', 'c') AND c.relname !~ '^sub_[0-9]+$'
      -- log partitions are made per day and level, not by the extension script
      AND NOT (c.relkind IN ('r', 'i') AND c.relispartition)
      AND c.relname !~ '^log_entry_(debug|info|warning)_[0-9]{8}_(id|logged_at)_idx$'
), fn AS (
    SELECT p.*, ns.nspname FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
)
SELECT line FROM (
    SELECT format('schema %s owner %s acl %s comment %s', nspname, pg_get_userbyid(n.nspowner), n.nspacl,
                  obj_description(n.oid, 'pg_namespace')) AS line
    FROM pg_namespace n WHERE n.oid IN (SELECT oid FROM ns)
    UNION ALL
    SELECT format('relation %s.%s kind %s acl %s comment %s options %s', nspname, relname, relkind, relacl,
                  obj_description(oid, 'pg_class'), reloptions)
    FROM rel
    UNION ALL
    SELECT format('column %s.%s #%s %s %s %s default %s comment %s', r.nspname, r.relname,
                  row_number() OVER (PARTITION BY r.oid ORDER BY a.attnum), a.attname,
                  format_type(a.atttypid, a.atttypmod), CASE WHEN a.attnotnull THEN 'not null' ELSE 'null' END,
                  pg_get_expr(d.adbin, d.adrelid), col_description(r.oid, a.attnum))
    FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = r.oid AND d.adnum = a.attnum
    WHERE r.relkind <> 'i'
    UNION ALL
    SELECT format('constraint %s.%s %s %s', r.nspname, r.relname, c.conname, pg_get_constraintdef(c.oid))
    FROM pg_constraint c JOIN rel r ON r.oid = c.conrelid
    UNION ALL
    SELECT format('index %s', regexp_replace(pg_get_indexdef(i.indexrelid), 'INDEX \S+ ON', 'INDEX ON'))
           || ' name ' || (SELECT relname FROM pg_class WHERE oid = i.indexrelid)
    FROM pg_index i JOIN rel r ON r.oid = i.indrelid
    UNION ALL
    SELECT format('view %s.%s %s', nspname, relname, pg_get_viewdef(oid)) FROM rel WHERE relkind IN ('v', 'm')
    UNION ALL
    SELECT format('trigger %s.%s %s %s comment %s', r.nspname, r.relname, t.tgname, pg_get_triggerdef(t.oid),
                  obj_description(t.oid, 'pg_trigger'))
    FROM pg_trigger t JOIN rel r ON r.oid = t.tgrelid WHERE NOT t.tgisinternal
    UNION ALL
    SELECT format('function %s returns %s lang %s secdef %s volatile %s strict %s parallel %s config %s acl %s owner %s src %s comment %s',
                  p.oid::regprocedure, pg_get_function_result(p.oid), l.lanname, p.prosecdef, p.provolatile,
                  p.proisstrict, p.proparallel, p.proconfig, p.proacl, pg_get_userbyid(p.proowner),
                  md5(p.prosrc), obj_description(p.oid, 'pg_proc'))
           || ' args ' || pg_get_function_arguments(p.oid)
    FROM fn p JOIN pg_language l ON l.oid = p.prolang
    UNION ALL
    SELECT format('setting %s %s %s %s', name, boot_val, context, short_desc) FROM pg_settings WHERE name LIKE 'ihub.%'
    UNION ALL
    SELECT format('member %s', pg_describe_object(d.classid, d.objid, d.objsubid))
    FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
    WHERE d.refclassid = 'pg_extension'::regclass AND e.extname = 'pg_ihub' AND d.deptype = 'e'
      AND pg_describe_object(d.classid, d.objid, d.objsubid) !~ 'ihub\.log_entry_'
    UNION ALL
    SELECT format('role %s', rolname) FROM pg_roles WHERE rolname LIKE 'ihub\_%'
    UNION ALL
    SELECT format('extension %s version %s', extname, extversion) FROM pg_extension WHERE extname = 'pg_ihub'
) lines
ORDER BY line;
