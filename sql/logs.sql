-- pg_ihub logs: ihub.log (callable from any SQL function, job or handler,
-- and used by pg_ihub's own workers), per-integration levels, checking,
-- retention and cleanup, and activities made from critical entries.

CREATE FUNCTION ihub._level_rank(p_level text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT array_position(ARRAY['debug', 'info', 'warning', 'error', 'critical'], p_level) $$;

-- Writes a log entry in the caller's transaction. It never makes the
-- caller's work fail: a problem writing the entry becomes a WARNING. Values
-- of secret-looking keys in details, and tokens, passwords and
-- Authorization values in the message, are masked before they are stored.
-- Returns the entry's id, or NULL when the integration's settings leave it out.
CREATE FUNCTION ihub._log_by(
    level text,
    message text,
    details jsonb DEFAULT NULL,
    integration text DEFAULT NULL,
    delivery bigint DEFAULT NULL,
    row_table regclass DEFAULT NULL,
    row_key text DEFAULT NULL,
    inbound bigint DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_level text := lower(coalesce(level, 'info'));
    v_integration bigint;
    v_setting ihub.log_setting;
    v_id bigint;
    v_at timestamptz := clock_timestamp();
    v_message text;
BEGIN
    IF ihub._level_rank(v_level) IS NULL THEN
        RAISE WARNING 'pg_ihub: unknown log level "%", logged as info', level
            USING HINT = 'Levels are debug, info, warning, error and critical.';
        v_level := 'info';
    END IF;
    BEGIN
        SELECT id INTO v_integration FROM ihub.integration i WHERE i.name = _log_by.integration;
        SELECT * INTO v_setting FROM ihub.log_setting s WHERE s.integration_id = v_integration;
        IF v_setting.integration_id IS NOT NULL THEN
            IF NOT v_setting.enabled OR ihub._level_rank(v_level) < ihub._level_rank(v_setting.min_level) THEN
                RETURN NULL;
            END IF;
        ELSIF ihub._level_rank(v_level) < ihub._level_rank(ihub._log_min_level()) THEN
            RETURN NULL;
        END IF;
        v_message := ihub._mask_text(left(coalesce(message, ''), 10000));
        INSERT INTO ihub.log_entry (logged_at, level, message, details, integration_id, job_id, delivery_id,
                                    inbound_id, row_table, row_key, logged_by)
        VALUES (v_at, v_level, v_message, ihub._mask_settings(details), v_integration, ihub._current_job(),
                _log_by.delivery, _log_by.inbound, _log_by.row_table, _log_by.row_key, pg_get_userbyid(p_caller))
        RETURNING id INTO v_id;
        PERFORM ihub._count_logged(v_level);
        IF v_level = 'critical' THEN
            PERFORM ihub._open_activity(v_id, v_message, ihub._mask_settings(details), v_integration,
                                        ihub._current_job(), _log_by.delivery, _log_by.row_table, _log_by.row_key, _log_by.inbound);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_ihub: could not write a log entry: %', SQLERRM;
        RETURN NULL;
    END;
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.log(
    level text,
    message text,
    details jsonb DEFAULT NULL,
    integration text DEFAULT NULL,
    delivery bigint DEFAULT NULL,
    row_table regclass DEFAULT NULL,
    row_key text DEFAULT NULL,
    inbound bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub.set_log_level(integration text, level text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(set_log_level.integration);
    v_level text := lower(level);
BEGIN
    IF v_level IS NULL OR (v_level <> 'off' AND ihub._level_rank(v_level) IS NULL) THEN
        RAISE EXCEPTION 'invalid log level "%"', level
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use debug, info, warning, error, critical, or off.';
    END IF;
    INSERT INTO ihub.log_setting (integration_id, enabled, min_level)
    VALUES (v_integration, v_level <> 'off', CASE WHEN v_level = 'off' THEN 'info' ELSE v_level END)
    ON CONFLICT (integration_id) DO UPDATE
        SET enabled = EXCLUDED.enabled,
            min_level = CASE WHEN EXCLUDED.enabled THEN EXCLUDED.min_level ELSE ihub.log_setting.min_level END;
END
$$;

CREATE FUNCTION ihub._mark_checked_by(ids bigint[], p_caller regrole) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    UPDATE ihub.log_entry SET checked_at = now(), checked_by = pg_get_userbyid(p_caller)
    WHERE id = ANY (ids) AND checked_at IS NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

CREATE FUNCTION ihub.mark_checked(ids bigint[]) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub.set_retention(kind text, keep interval) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF keep <= interval '0' THEN
        RAISE EXCEPTION 'retention must be a positive interval or NULL (keep forever)'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example interval ''14 days''.';
    END IF;
    UPDATE ihub.retention r SET keep = set_retention.keep WHERE r.kind = lower(set_retention.kind);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown retention kind "%"', kind
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Kinds: debug, info, warning, error, critical, deliveries, jobs, inbound.';
    END IF;
END
$$;

-------------------------------------------------------------------------------
-- Activities
-------------------------------------------------------------------------------

CREATE FUNCTION ihub.set_activity_users(primary_role regrole, secondary_role regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF primary_role IS NULL THEN
        DELETE FROM ihub.activity_setting;
        RETURN;
    END IF;
    INSERT INTO ihub.activity_setting (primary_role, secondary_role)
    VALUES (primary_role::text, secondary_role::text)
    ON CONFLICT (id) DO UPDATE SET primary_role = EXCLUDED.primary_role, secondary_role = EXCLUDED.secondary_role;
END
$$;

-- Opens an activity for a critical entry, assigned to the primary role, or
-- to the secondary one when the primary no longer exists or cannot log in.
CREATE FUNCTION ihub._open_activity(p_log bigint, p_summary text, p_details jsonb, p_integration bigint,
                                    p_job bigint, p_delivery bigint, p_row_table regclass, p_row_key text,
                                    p_inbound bigint)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.activity_setting;
    v_assignee name;
    v_id bigint;
BEGIN
    SELECT * INTO v FROM ihub.activity_setting;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_assignee := CASE
        WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v.primary_role AND rolcanlogin) THEN v.primary_role
        WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v.secondary_role) THEN v.secondary_role
        ELSE v.primary_role END;
    INSERT INTO ihub.activity (summary, details, log_id, integration_id, job_id, delivery_id, inbound_id, row_table,
                               row_key, assigned_to)
    VALUES (p_summary, p_details, p_log, p_integration, p_job, p_delivery, p_inbound, p_row_table, p_row_key, v_assignee)
    RETURNING id INTO v_id;
    PERFORM pg_notify('ihub_activity', jsonb_build_object('activity', v_id, 'assigned_to', v_assignee,
                                                          'summary', left(p_summary, 500))::text);
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub._close_activity_by(id bigint, note text DEFAULT NULL, p_caller regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.activity a SET state = 'closed', closed_at = now(), closed_by = pg_get_userbyid(p_caller), note = _close_activity_by.note
    WHERE a.id = _close_activity_by.id AND a.state = 'open';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no open activity %', _close_activity_by.id
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT * FROM ihub.activities WHERE state = ''open''.';
    END IF;
END
$$;

CREATE FUNCTION ihub.close_activity(id bigint, note text DEFAULT NULL) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-------------------------------------------------------------------------------
-- Retention and cleanup
-------------------------------------------------------------------------------

-- Daily partitions for the leveled log tables, today and the next two days.
-- A day whose rows already sit in the default partition keeps them there.
CREATE FUNCTION ihub._ensure_log_partitions() RETURNS integer
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

-- Removes what retention says, in batches of at most p_batch rows per
-- statement so that no lock is held long: expired log partitions are
-- dropped whole, the rest deleted. Dead and failed deliveries and failed
-- jobs stay until someone acts. Returns what was removed.
CREATE FUNCTION ihub._cleanup(p_batch integer DEFAULT 10000)
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

CREATE FUNCTION ihub.cleanup() RETURNS TABLE (kind text, removed bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM ihub._cleanup() $$;

CREATE VIEW ihub.logs AS
SELECT l.id, l.logged_at, l.level, l.message, l.details, i.name AS integration, l.job_id AS job,
       l.delivery_id AS delivery, l.inbound_id AS inbound_item, l.row_table, l.row_key, l.logged_by,
       CASE WHEN l.checked_at IS NULL THEN 'not checked' ELSE 'checked' END AS check_state,
       l.checked_at, l.checked_by
FROM ihub.log_entry l LEFT JOIN ihub.integration i ON i.id = l.integration_id;

CREATE VIEW ihub.activities AS
SELECT a.id, a.created_at, a.state, a.assigned_to, a.summary, a.details, i.name AS integration,
       a.job_id AS job, a.delivery_id AS delivery, a.inbound_id AS inbound_item, a.row_table, a.row_key,
       a.log_id, a.closed_at, a.closed_by, a.note
FROM ihub.activity a LEFT JOIN ihub.integration i ON i.id = a.integration_id;

CREATE VIEW ihub.retention_settings AS
SELECT kind, keep, CASE WHEN keep IS NULL THEN 'kept until removed by hand' END AS note FROM ihub.retention;

CREATE VIEW ihub.log_settings AS
SELECT i.name AS integration, coalesce(s.enabled, true) AS enabled,
       coalesce(s.min_level, ihub._log_min_level()) AS min_level
FROM ihub.integration i LEFT JOIN ihub.log_setting s ON s.integration_id = i.id;

COMMENT ON FUNCTION ihub._level_rank(text) IS 'Internal: the order of log levels, debug 1 to critical 5.';
COMMENT ON FUNCTION ihub.log(text, text, jsonb, text, bigint, regclass, text, bigint) IS
    'Writes a log entry (debug, info, warning, error, critical) linked to the integration, the current job, a delivery, an inbound item and a local row; masks secrets; never fails the caller. Returns its id, or NULL when filtered out.';
COMMENT ON FUNCTION ihub.set_log_level(text, text) IS 'Sets an integration''s minimum log level (debug ... critical), or off.';
COMMENT ON FUNCTION ihub.mark_checked(bigint[]) IS 'Marks log entries checked, recording who and when. Returns how many changed.';
COMMENT ON FUNCTION ihub.set_retention(text, interval) IS
    'Sets how long a log level, delivered deliveries, finished jobs or processed inbound items are kept (NULL: forever). Applied at the next cleanup.';
COMMENT ON FUNCTION ihub.set_activity_users(regrole, regrole) IS
    'Turns activity creation on (NULL primary: off): each critical entry becomes an activity for the primary role, or the secondary one.';
COMMENT ON FUNCTION ihub._open_activity(bigint, text, jsonb, bigint, bigint, bigint, regclass, text, bigint) IS
    'Internal: opens the activity of a critical entry and sends NOTIFY ihub_activity.';
COMMENT ON FUNCTION ihub.close_activity(bigint, text) IS 'Closes an open activity with a note.';
COMMENT ON FUNCTION ihub._ensure_log_partitions() IS 'Internal: creates the daily log partitions of today and the next two days, with their indexes (not during a pg_restore).';
COMMENT ON FUNCTION ihub._cleanup(integer) IS 'Internal: removes what retention says, in batches.';
COMMENT ON FUNCTION ihub.cleanup() IS 'Runs the retention cleanup now; returns what it removed per kind.';
COMMENT ON VIEW ihub.logs IS 'Log entries with their links and whether someone checked them.';
COMMENT ON VIEW ihub.activities IS 'Activities made from critical log entries, open or closed.';
COMMENT ON VIEW ihub.retention_settings IS 'How long each kind of record is kept.';
COMMENT ON VIEW ihub.log_settings IS 'Logging per integration: on or off and the minimum level.';

-- Daily partitions are made by the maintenance worker, never by CREATE
-- EXTENSION: tables it made would be members of the extension, and in a
-- restore they would collide with the dumped ones. Until the worker makes
-- them, entries land in the default partitions.
