-- pg_ihub logs: ihub.log, callable from any SQL function, job or handler,
-- and used by pg_ihub's own workers.

-- Writes a log entry in the caller's transaction. It never makes the
-- caller's work fail: a problem writing the entry becomes a WARNING.
-- Secret-looking keys in details are masked before they are stored.
CREATE FUNCTION ihub.log(level text, message text, details jsonb DEFAULT NULL, integration text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_level text := lower(coalesce(level, 'info'));
    v_id bigint;
BEGIN
    IF v_level NOT IN ('debug', 'info', 'warning', 'error', 'critical') THEN
        RAISE WARNING 'pg_ihub: unknown log level "%", logged as info', level
            USING HINT = 'Levels are debug, info, warning, error and critical.';
        v_level := 'info';
    END IF;
    BEGIN
        INSERT INTO ihub.log_entry (level, message, details, integration_id, job_id, logged_by)
        VALUES (v_level, left(coalesce(message, ''), 10000), ihub._mask_settings(details),
                (SELECT id FROM ihub.integration i WHERE i.name = log.integration),
                ihub._current_job(), ihub._invoker())
        RETURNING id INTO v_id;
        PERFORM ihub._count_logged(v_level);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_ihub: could not write a log entry: %', SQLERRM;
    END;
    RETURN v_id;
END
$$;

CREATE VIEW ihub.logs AS
SELECT l.id, l.logged_at, l.level, l.message, l.details, i.name AS integration, l.job_id, l.delivery_id, l.logged_by
FROM ihub.log_entry l LEFT JOIN ihub.integration i ON i.id = l.integration_id;

COMMENT ON FUNCTION ihub.log(text, text, jsonb, text) IS
    'Writes a log entry (debug, info, warning, error, critical) linked to the integration and the current job; never fails the caller. Returns its id.';
COMMENT ON VIEW ihub.logs IS 'Log entries, newest last.';
