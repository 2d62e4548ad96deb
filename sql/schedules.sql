-- pg_ihub scheduled actions, cronwatch and integration dates.

-------------------------------------------------------------------------------
-- Scheduled actions
-------------------------------------------------------------------------------

-- The first due time strictly after p_after. An `every` schedule keeps its
-- phase (next = last due time + k * every), so runs do not drift.
CREATE FUNCTION ihub._schedule_next(p_schedule ihub.schedule, p_after timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v timestamptz;
    v_steps double precision;
BEGIN
    IF p_schedule.cron IS NOT NULL THEN
        RETURN ihub._cron_next(p_schedule.cron, p_after);
    END IF;
    v := p_schedule.next_run_at;
    IF v > p_after THEN
        RETURN v;
    END IF;
    -- Jump close with arithmetic, then step (months and days vary in length).
    v_steps := floor(extract(epoch FROM p_after - v) / greatest(extract(epoch FROM p_schedule.every), 0.001));
    IF v_steps > 2 THEN
        v := v + p_schedule.every * (v_steps - 1);
    END IF;
    WHILE v <= p_after LOOP
        v := v + p_schedule.every;
    END LOOP;
    RETURN v;
END
$$;

-- Queues one run of a schedule as job(s): one job, or, for a schedule without
-- an integration that has per-integration parameters, one job per such
-- integration. Returns the id of the (last) job.
CREATE FUNCTION ihub._run_schedule(p_schedule ihub.schedule) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
    v record;
BEGIN
    IF p_schedule.integration_id IS NULL AND EXISTS (SELECT 1 FROM ihub.schedule_param WHERE schedule_id = p_schedule.id) THEN
        FOR v IN SELECT * FROM ihub.schedule_param WHERE schedule_id = p_schedule.id ORDER BY integration_id LOOP
            v_job := ihub._enqueue(p_schedule.fn, p_schedule.args || v.params, p_schedule.priority, now(), 5, NULL,
                                   v.integration_id, NULL, NULL, p_schedule.run_as, p_schedule.id);
        END LOOP;
        RETURN v_job;
    END IF;
    RETURN ihub._enqueue(p_schedule.fn,
                         p_schedule.args || coalesce((SELECT params FROM ihub.schedule_param
                                                      WHERE schedule_id = p_schedule.id
                                                        AND integration_id = p_schedule.integration_id), '{}'),
                         p_schedule.priority, now(), 5, NULL, p_schedule.integration_id, NULL, NULL,
                         p_schedule.run_as, p_schedule.id);
END
$$;

-- Called by the scheduler worker: queues every due run, in due-time then
-- priority order, and returns the seconds until the next schedule is due.
-- Runs missed while the server was down are queued once each when the
-- schedule repeats missed runs; otherwise they collapse into one run. An
-- error in one schedule is logged and skips that run; the others go on.
CREATE FUNCTION ihub._schedule_tick() RETURNS double precision
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s ihub.schedule;
    v_slot timestamptz;
    v_runs integer;
    v_job bigint;
BEGIN
    FOR s IN
        SELECT * FROM ihub.schedule
        WHERE active AND next_run_at <= now()
        ORDER BY next_run_at, priority, id
        FOR UPDATE SKIP LOCKED
    LOOP
        BEGIN
            v_runs := 0;
            v_slot := s.next_run_at;
            LOOP
                v_job := ihub._run_schedule(s);
                v_runs := v_runs + 1;
                EXIT WHEN NOT s.repeat_missed OR v_runs >= 1000
                          OR (s.number_of_calls >= 0 AND v_runs >= s.number_of_calls);
                s.next_run_at := ihub._schedule_next(s, v_slot);
                EXIT WHEN s.next_run_at > now();
                v_slot := s.next_run_at;
            END LOOP;
            s.next_run_at := v_slot;
            UPDATE ihub.schedule
            SET last_run_at = v_slot, last_job_id = v_job, last_error = NULL,
                next_run_at = ihub._schedule_next(s, greatest(now(), v_slot)),
                number_of_calls = CASE WHEN number_of_calls < 0 THEN -1 ELSE greatest(number_of_calls - v_runs, 0) END,
                active = number_of_calls < 0 OR number_of_calls - v_runs > 0
            WHERE id = s.id;
        EXCEPTION WHEN OTHERS THEN
            UPDATE ihub.schedule
            SET last_error = SQLERRM, next_run_at = ihub._schedule_next(s, now())
            WHERE id = s.id;
            PERFORM ihub.log('error', format('scheduled action %s could not be queued: %s', s.name, SQLERRM),
                             jsonb_build_object('schedule', s.name),
                             (SELECT name FROM ihub.integration WHERE id = s.integration_id));
        END;
    END LOOP;
    -- NULL when nothing is scheduled (greatest() skips NULLs: it would say 0).
    RETURN (SELECT CASE WHEN min(next_run_at) IS NOT NULL
                        THEN greatest(0, extract(epoch FROM min(next_run_at) - now()))::double precision END
            FROM ihub.schedule WHERE active);
END
$$;

CREATE FUNCTION ihub._schedule_row(p_name text) RETURNS ihub.schedule
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.schedule;
BEGIN
    SELECT * INTO v FROM ihub.schedule WHERE name = p_name;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'scheduled action "%" does not exist', p_name
            USING ERRCODE = 'undefined_object', HINT = 'Create it with ihub.schedule(name, fn, every => ...), or list them in ihub.schedules.';
    END IF;
    RETURN v;
END
$$;

-- Validates timing and returns the first due time.
-- A scheduled action the caller may act on (see ihub._may_act_for).
CREATE FUNCTION ihub._own_schedule(p_name text, p_caller regrole) RETURNS ihub.schedule
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.schedule := ihub._schedule_row(p_name);
BEGIN
    PERFORM ihub._require_may_act_for(p_caller, v.run_as, format('scheduled action "%s"', p_name));
    RETURN v;
END
$$;

CREATE FUNCTION ihub._check_timing(p_every interval, p_cron text) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF (p_every IS NULL) = (p_cron IS NULL) THEN
        RAISE EXCEPTION 'give exactly one of every and cron'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example every => ''15 minutes'', or cron => ''*/15 * * * *'' (five fields, UTC).';
    END IF;
    IF p_every <= interval '0' THEN
        RAISE EXCEPTION 'every must be a positive interval, got %', p_every
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example every => ''15 minutes''.';
    END IF;
    RETURN coalesce(now() + p_every, ihub._cron_next(p_cron, now()));
END
$$;

CREATE FUNCTION ihub._schedule_by(
    name text,
    fn regprocedure,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT '{}',
    integration text DEFAULT NULL,
    priority integer DEFAULT 10,
    number_of_calls integer DEFAULT -1,
    repeat_missed boolean DEFAULT false,
    run_as regrole DEFAULT NULL,
    active boolean DEFAULT true,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_invoker name := pg_get_userbyid(p_caller);
    v_role regrole := coalesce(run_as, p_caller);
    v_first timestamptz;
    v_id bigint;
BEGIN
    PERFORM ihub._require_workers();
    PERFORM ihub._check_name('scheduled action', _schedule_by.name);
    IF EXISTS (SELECT 1 FROM ihub.schedule s WHERE s.name = _schedule_by.name) THEN
        RAISE EXCEPTION 'scheduled action "%" already exists', _schedule_by.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or change it with ihub.alter_schedule.';
    END IF;
    v_first := ihub._check_timing(every, cron);
    IF NOT pg_has_role(p_caller, v_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % may not schedule actions that run as %', v_invoker, v_role
            USING ERRCODE = 'insufficient_privilege', HINT = 'run_as must be a role you are a member of.';
    END IF;
    PERFORM ihub._check_job_function(fn, pg_get_userbyid(v_role));
    IF args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'args must be a JSON object' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"full": false}.';
    END IF;
    IF priority IS NULL OR priority < 0 OR number_of_calls IS NULL OR number_of_calls < -1 THEN
        RAISE EXCEPTION 'priority must be 0 or more and number_of_calls -1 (unlimited) or more'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Priority 0 runs first; number_of_calls counts down to 0.';
    END IF;
    INSERT INTO ihub.schedule (name, fn, every, cron, args, integration_id, priority, number_of_calls, repeat_missed,
                               run_as, active, next_run_at)
    VALUES (_schedule_by.name, fn, every, cron, args,
            CASE WHEN integration IS NOT NULL THEN ihub._integration_id(integration) END,
            priority, number_of_calls, coalesce(repeat_missed, false), v_role,
            coalesce(active, true) AND number_of_calls <> 0, v_first)
    RETURNING id INTO v_id;
    PERFORM ihub._wake_scheduler();
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.schedule(
    name text,
    fn regprocedure,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT '{}',
    integration text DEFAULT NULL,
    priority integer DEFAULT 10,
    number_of_calls integer DEFAULT -1,
    repeat_missed boolean DEFAULT false,
    run_as regrole DEFAULT NULL,
    active boolean DEFAULT true
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._alter_schedule_by(
    name text,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT NULL,
    priority integer DEFAULT NULL,
    number_of_calls integer DEFAULT NULL,
    repeat_missed boolean DEFAULT NULL,
    active boolean DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.schedule;
    v_next timestamptz;
BEGIN
    -- Lock first, then read: a run the scheduler queues meanwhile has moved
    -- next_run_at on, and writing back the time read before it would queue
    -- that run again.
    PERFORM 1 FROM ihub.schedule s WHERE s.name = _alter_schedule_by.name FOR UPDATE;
    v := ihub._own_schedule(_alter_schedule_by.name, p_caller);
    v_next := v.next_run_at;
    IF every IS NOT NULL OR cron IS NOT NULL THEN
        v_next := ihub._check_timing(every, cron);
        v.every := every;
        v.cron := cron;
    ELSIF active AND NOT v.active THEN
        -- Reactivated: due from now on, not for the time it was off.
        v_next := coalesce(now() + v.every, ihub._cron_next(v.cron, now()));
    END IF;
    IF args IS NOT NULL AND jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'args must be a JSON object' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"full": false}.';
    END IF;
    IF priority < 0 OR number_of_calls < -1 THEN
        RAISE EXCEPTION 'priority must be 0 or more and number_of_calls -1 (unlimited) or more'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Priority 0 runs first; number_of_calls counts down to 0.';
    END IF;
    UPDATE ihub.schedule s
    SET every = v.every, cron = v.cron, next_run_at = v_next,
        args = coalesce(_alter_schedule_by.args, s.args),
        priority = coalesce(_alter_schedule_by.priority, s.priority),
        number_of_calls = coalesce(_alter_schedule_by.number_of_calls, s.number_of_calls),
        repeat_missed = coalesce(_alter_schedule_by.repeat_missed, s.repeat_missed),
        active = coalesce(_alter_schedule_by.active, s.active) AND coalesce(_alter_schedule_by.number_of_calls, s.number_of_calls) <> 0
    WHERE s.id = v.id;
    PERFORM ihub._wake_scheduler();
END
$$;

CREATE FUNCTION ihub.alter_schedule(
    name text,
    every interval DEFAULT NULL,
    cron text DEFAULT NULL,
    args jsonb DEFAULT NULL,
    priority integer DEFAULT NULL,
    number_of_calls integer DEFAULT NULL,
    repeat_missed boolean DEFAULT NULL,
    active boolean DEFAULT NULL
) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._unschedule_by(name text, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM ihub.schedule WHERE id = (ihub._own_schedule(_unschedule_by.name, p_caller)).id;
    PERFORM ihub._wake_scheduler();
END
$$;

CREATE FUNCTION ihub.unschedule(name text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._run_now_by(name text, p_caller regrole) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ihub._require_workers();
    RETURN ihub._run_schedule(ihub._own_schedule(_run_now_by.name, p_caller));
END
$$;

CREATE FUNCTION ihub.run_now(name text) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._set_schedule_params_by(schedule text, integration text, params jsonb, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schedule bigint := (ihub._own_schedule(_set_schedule_params_by.schedule, p_caller)).id;
    v_integration bigint := ihub._integration_id(_set_schedule_params_by.integration);
BEGIN
    IF params IS NULL THEN
        DELETE FROM ihub.schedule_param WHERE schedule_id = v_schedule AND integration_id = v_integration;
        RETURN;
    END IF;
    IF jsonb_typeof(params) <> 'object' THEN
        RAISE EXCEPTION 'params must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'They are merged into the action''s args, e.g. {"warehouse": "north"}; NULL removes them.';
    END IF;
    INSERT INTO ihub.schedule_param (schedule_id, integration_id, params) VALUES (v_schedule, v_integration, params)
    ON CONFLICT (schedule_id, integration_id) DO UPDATE SET params = EXCLUDED.params;
END
$$;

CREATE FUNCTION ihub.set_schedule_params(schedule text, integration text, params jsonb) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE VIEW ihub.schedules AS
SELECT s.id, s.name, s.fn::text AS function, s.every, s.cron, ihub._mask_settings(s.args) AS args,
       i.name AS integration, s.priority, s.number_of_calls, s.repeat_missed, s.run_as, s.active,
       CASE WHEN s.active THEN s.next_run_at END AS next_run_at, s.last_run_at,
       j.state AS last_outcome, j.finished_at AS last_finished_at, coalesce(s.last_error, j.last_error) AS last_error
FROM ihub.schedule s
LEFT JOIN ihub.integration i ON i.id = s.integration_id
LEFT JOIN ihub.job j ON j.id = s.last_job_id;

-------------------------------------------------------------------------------
-- Cronwatch
-------------------------------------------------------------------------------

-- A table of pg_cron's (job, job_run_details), if pg_cron is installed in
-- this database: the relation must belong to the pg_cron extension. A
-- schema named cron that a role made itself, with a view cron.job calling
-- its own functions, is not pg_cron: pg_ihub reads it as the superuser.
CREATE FUNCTION ihub._pg_cron_table(p_name text) RETURNS regclass
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'cron'
    JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_cron'
    WHERE c.relname = p_name AND c.relkind = 'r'
$$;

-- pg_cron's schedule of a job, and whether it is active; NULL when the job
-- or pg_cron is gone.
CREATE FUNCTION ihub._pg_cron_job(p_jobname text, OUT jobid bigint, OUT schedule text, OUT active boolean)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF ihub._pg_cron_table('job') IS NULL THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT jobid, schedule, active FROM cron.job WHERE jobname = $1 ORDER BY jobid LIMIT 1'
        INTO jobid, schedule, active USING p_jobname;
END
$$;

-- When the watched action should last have started, if that was more than
-- the grace period ago and after watching began; and whether it did.
CREATE FUNCTION ihub._cronwatch_problem(w ihub.watcher) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s ihub.schedule;
    c record;
    v_due timestamptz;
    v_started timestamptz;
BEGIN
    IF w.target LIKE 'cron:%' THEN
        c := ihub._pg_cron_job(substr(w.target, 6));
        IF c.jobid IS NULL THEN
            RETURN 'deleted';
        ELSIF NOT c.active THEN
            RETURN 'deactivated';
        END IF;
        IF c.schedule ~ '^\s*[0-9]+\s+seconds?\s*$' THEN
            v_due := now() - w.grace - make_interval(secs => substring(c.schedule FROM '[0-9]+')::int);
        ELSE
            BEGIN
                v_due := ihub._cron_prev(c.schedule, now() - w.grace);
            EXCEPTION WHEN OTHERS THEN
                RETURN NULL; -- a pg_cron schedule syntax we do not read: deletion and deactivation only
            END;
        END IF;
        IF v_due IS NULL OR v_due < w.created_at OR ihub._pg_cron_table('job_run_details') IS NULL THEN
            RETURN NULL;
        END IF;
        EXECUTE 'SELECT max(start_time) FROM cron.job_run_details WHERE jobid = $1' INTO v_started USING c.jobid;
        IF v_started IS NULL OR v_started < v_due - interval '1 second' THEN
            RETURN format('missed its run due at %s', v_due);
        END IF;
        RETURN NULL;
    END IF;

    IF w.schedule_id IS NULL THEN
        RETURN 'deleted';
    END IF;
    SELECT * INTO s FROM ihub.schedule WHERE id = w.schedule_id;
    IF NOT s.active THEN
        RETURN 'deactivated';
    END IF;
    -- Not queued in time (scheduler down or stuck) ...
    IF s.next_run_at + w.grace < now() AND s.next_run_at >= w.created_at THEN
        RETURN format('missed its run due at %s', s.next_run_at);
    END IF;
    -- ... or queued but not started in time (no free job worker, workers down).
    SELECT min(j.run_at) INTO v_due FROM ihub.job j
    WHERE j.schedule_id = s.id AND j.state IN ('pending', 'retry') AND j.run_at + w.grace < now() AND j.run_at >= w.created_at;
    IF v_due IS NOT NULL THEN
        RETURN format('its run due at %s has not started', v_due);
    END IF;
    RETURN NULL;
END
$$;

-- Raises one alert per incident: NOTIFY on the channel, a critical log
-- entry, and a signed request to the notify endpoint if there is one.
CREATE FUNCTION ihub._cronwatch_alert(w ihub.watcher, p_event text, p_problem text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payload jsonb := jsonb_build_object('watcher', w.id, 'target', w.target, 'event', p_event,
                                          'problem', p_problem, 'at', now());
    v_endpoint text;
BEGIN
    PERFORM pg_notify(w.channel, v_payload::text);
    IF p_event = 'alert' THEN
        PERFORM ihub.log('critical', format('cronwatch: %s %s', w.target, p_problem), v_payload);
    END IF;
    SELECT name INTO v_endpoint FROM ihub.endpoint WHERE id = w.notify_endpoint_id;
    IF v_endpoint IS NOT NULL THEN
        BEGIN
            PERFORM ihub.http_request(v_endpoint, v_payload, event_type => 'cronwatch.' || p_event);
        EXCEPTION WHEN OTHERS THEN
            PERFORM ihub.log('error', format('cronwatch could not notify endpoint %s: %s', v_endpoint, SQLERRM), v_payload);
        END;
    END IF;
END
$$;

-- Called by the scheduler worker. Returns the seconds until a watched run
-- can next be late, so that the worker wakes then.
CREATE FUNCTION ihub._cronwatch_check() RETURNS double precision
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w ihub.watcher;
    v_problem text;
BEGIN
    FOR w IN SELECT * FROM ihub.watcher ORDER BY id FOR UPDATE SKIP LOCKED LOOP
        v_problem := ihub._cronwatch_problem(w);
        IF v_problem IS NOT NULL AND (w.status = 'ok' OR split_part(w.incident, ' ', 1) <> split_part(v_problem, ' ', 1)) THEN
            UPDATE ihub.watcher SET status = 'alerting', incident = v_problem, alerted_at = now(), checked_at = now()
            WHERE id = w.id;
            PERFORM ihub._cronwatch_alert(w, 'alert', v_problem);
        ELSIF v_problem IS NULL AND w.status = 'alerting' THEN
            UPDATE ihub.watcher SET status = 'ok', incident = NULL, checked_at = now() WHERE id = w.id;
            PERFORM ihub._cronwatch_alert(w, 'recovered', format('is active and on time again (was: %s)', w.incident));
        ELSE
            UPDATE ihub.watcher SET checked_at = now() WHERE id = w.id;
        END IF;
    END LOOP;
    RETURN (
        SELECT CASE WHEN min(t) IS NOT NULL THEN greatest(0, extract(epoch FROM min(t) - now()))::double precision END
        FROM (SELECT s.next_run_at + w2.grace AS t
              FROM ihub.watcher w2 JOIN ihub.schedule s ON s.id = w2.schedule_id
              WHERE s.active AND s.next_run_at + w2.grace > now()
              UNION ALL
              SELECT j.run_at + w2.grace
              FROM ihub.watcher w2 JOIN ihub.job j ON j.schedule_id = w2.schedule_id
              WHERE j.state IN ('pending', 'retry') AND j.run_at + w2.grace > now()) due);
END
$$;

CREATE FUNCTION ihub.watch(schedule text, notify_endpoint text DEFAULT NULL, channel text DEFAULT 'ihub_cronwatch',
                           grace interval DEFAULT '5 minutes')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schedule bigint;
    v_id bigint;
BEGIN
    PERFORM ihub._require_workers();
    IF schedule LIKE 'cron:%' THEN
        IF ihub._pg_cron_table('job') IS NULL THEN
            RAISE EXCEPTION 'pg_cron is not installed in this database'
                USING ERRCODE = 'undefined_object', HINT = 'CREATE EXTENSION pg_cron, or watch one of pg_ihub''s scheduled actions by name.';
        ELSIF (ihub._pg_cron_job(substr(schedule, 6))).jobid IS NULL THEN
            RAISE EXCEPTION 'pg_cron has no job named "%"', substr(schedule, 6)
                USING ERRCODE = 'undefined_object', HINT = 'See SELECT jobname FROM cron.job.';
        END IF;
    ELSE
        v_schedule := (ihub._schedule_row(watch.schedule)).id;
    END IF;
    IF channel IS NULL OR channel = '' OR octet_length(channel) > 63 THEN
        RAISE EXCEPTION 'invalid channel name "%"', channel
            USING ERRCODE = 'invalid_name', HINT = 'A NOTIFY channel name has 1 to 63 bytes.';
    END IF;
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ''5 minutes''.';
    END IF;
    IF EXISTS (SELECT 1 FROM ihub.watcher c WHERE c.target = watch.schedule) THEN
        RAISE EXCEPTION '% is already watched', schedule
            USING ERRCODE = 'duplicate_object', HINT = 'Remove the watcher with ihub.unwatch first to change it.';
    END IF;
    INSERT INTO ihub.watcher (target, schedule_id, notify_endpoint_id, channel, grace)
    VALUES (schedule, v_schedule,
            CASE WHEN notify_endpoint IS NOT NULL THEN (ihub._endpoint(notify_endpoint)).id END,
            channel, grace)
    RETURNING id INTO v_id;
    PERFORM ihub._wake_scheduler();
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.unwatch(schedule text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM ihub.watcher c WHERE c.target = unwatch.schedule;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not watched', schedule USING ERRCODE = 'undefined_object', HINT = 'See ihub.watcher.';
    END IF;
END
$$;

CREATE VIEW ihub.cronwatch AS
SELECT w.id, w.target, CASE WHEN w.target LIKE 'cron:%' THEN 'pg_cron' ELSE 'pg_ihub' END AS kind,
       w.status, w.incident, w.alerted_at, w.checked_at, w.grace, w.channel, e.name AS notify_endpoint, w.created_at
FROM ihub.watcher w LEFT JOIN ihub.endpoint e ON e.id = w.notify_endpoint_id;

-------------------------------------------------------------------------------
-- Integration dates
-------------------------------------------------------------------------------

CREATE FUNCTION ihub.get_date(integration text, name text) RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT value FROM ihub.integration_date
    WHERE integration_id = ihub._integration_id(get_date.integration) AND integration_date.name = get_date.name
$$;

-- Sets a date in the caller's transaction, so that it advances together with
-- the data it describes. A change outside a job is a hand edit: recorded, and
-- warned about, since the next sync will re-import or skip data.
CREATE FUNCTION ihub._set_date_by(integration text, name text, value timestamptz, p_caller regrole) RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_integration bigint := ihub._integration_id(_set_date_by.integration);
    v_old timestamptz;
    v_who name := pg_get_userbyid(p_caller);
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'a date needs a name' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ''last_import''.';
    END IF;
    SELECT d.value INTO v_old FROM ihub.integration_date d
    WHERE d.integration_id = v_integration AND d.name = _set_date_by.name FOR UPDATE;
    INSERT INTO ihub.integration_date (integration_id, name, value, updated_at, updated_by)
    VALUES (v_integration, _set_date_by.name, _set_date_by.value, now(), v_who)
    ON CONFLICT (integration_id, name) DO UPDATE
        SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by;
    IF ihub._current_job() IS NULL AND v_old IS DISTINCT FROM _set_date_by.value THEN
        INSERT INTO ihub.integration_date_change (integration_id, name, old_value, new_value, changed_by)
        VALUES (v_integration, _set_date_by.name, v_old, _set_date_by.value, v_who);
        RAISE WARNING 'integration date %.% changed by hand from % to %', _set_date_by.integration, _set_date_by.name,
                      coalesce(v_old::text, 'unset'), coalesce(_set_date_by.value::text, 'unset')
            USING HINT = CASE WHEN _set_date_by.value < v_old THEN 'The next sync will import again what it already imported since then.'
                              ELSE 'The next sync will skip what changed in between.' END;
    END IF;
    RETURN v_old;
END
$$;

CREATE FUNCTION ihub.set_date(integration text, name text, value timestamptz) RETURNS timestamptz
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE VIEW ihub.integration_dates AS
SELECT i.name AS integration, d.name, d.value, d.updated_at, d.updated_by,
       c.changed_at AS changed_by_hand_at, c.changed_by AS changed_by_hand_by,
       CASE WHEN c.changed_at >= d.updated_at THEN
           format('changed by hand from %s to %s: the next sync will %s', coalesce(c.old_value::text, 'unset'),
                  coalesce(c.new_value::text, 'unset'),
                  CASE WHEN c.new_value < c.old_value THEN 'import again what it already imported'
                       ELSE 'skip what changed in between' END)
       END AS warning
FROM ihub.integration_date d
JOIN ihub.integration i ON i.id = d.integration_id
LEFT JOIN LATERAL (
    SELECT * FROM ihub.integration_date_change x
    WHERE x.integration_id = d.integration_id AND x.name = d.name
    ORDER BY x.id DESC LIMIT 1
) c ON true;

-------------------------------------------------------------------------------
-- Comments
-------------------------------------------------------------------------------

COMMENT ON FUNCTION ihub._schedule_next(ihub.schedule, timestamptz) IS 'Internal: a schedule''s first due time after a moment.';
COMMENT ON FUNCTION ihub._run_schedule(ihub.schedule) IS 'Internal: queues one run of a schedule as job(s).';
COMMENT ON FUNCTION ihub._schedule_tick() IS 'Internal (scheduler): queues due runs; returns seconds until the next.';
COMMENT ON FUNCTION ihub._schedule_row(text) IS 'Internal: a schedule by name, or an error with a hint.';
COMMENT ON FUNCTION ihub._check_timing(interval, text) IS 'Internal: validates every/cron and returns the first due time.';
COMMENT ON FUNCTION ihub.schedule(text, regprocedure, interval, text, jsonb, text, integer, integer, boolean, regrole, boolean) IS
    'Creates a scheduled action: fn(args jsonb) runs as a background job every interval or on a five-field cron expression (UTC).';
COMMENT ON FUNCTION ihub.alter_schedule(text, interval, text, jsonb, integer, integer, boolean, boolean) IS
    'Changes a scheduled action; NULL arguments keep their value.';
COMMENT ON FUNCTION ihub.unschedule(text) IS 'Deletes a scheduled action (its jobs stay in ihub.jobs).';
COMMENT ON FUNCTION ihub.run_now(text) IS 'Queues a run of a scheduled action now, without changing its next run. Returns the job id.';
COMMENT ON FUNCTION ihub.set_schedule_params(text, text, jsonb) IS
    'Sets the parameters a scheduled action gets, merged into its args, when it runs for an integration (NULL removes them).';
COMMENT ON VIEW ihub.schedules IS 'Scheduled actions with their next and last run and the last run''s outcome.';
COMMENT ON FUNCTION ihub._pg_cron_table(text) IS 'Internal: a table of the pg_cron extension in schema cron, NULL when pg_cron is not installed.';
COMMENT ON FUNCTION ihub._pg_cron_job(text) IS 'Internal: a pg_cron job''s id, schedule and active flag.';
COMMENT ON FUNCTION ihub._cronwatch_problem(ihub.watcher) IS 'Internal: what is wrong with a watched action, if anything.';
COMMENT ON FUNCTION ihub._cronwatch_alert(ihub.watcher, text, text) IS 'Internal: NOTIFY, critical log entry and notify-endpoint request.';
COMMENT ON FUNCTION ihub._cronwatch_check() IS 'Internal (scheduler): checks the watchers; returns seconds until the next check is needed.';
COMMENT ON FUNCTION ihub.watch(text, text, text, interval) IS
    'Watches a scheduled action (or a pg_cron job as cron:<jobname>): one alert per incident when it is deactivated, deleted, or late by more than the grace period.';
COMMENT ON FUNCTION ihub.unwatch(text) IS 'Removes a watcher.';
COMMENT ON VIEW ihub.cronwatch IS 'Cronwatch watchers and their status (ok or alerting, with the incident).';
COMMENT ON FUNCTION ihub.get_date(text, text) IS 'Reads an integration date (a named sync cursor).';
COMMENT ON FUNCTION ihub.set_date(text, text, timestamptz) IS
    'Sets an integration date in the caller''s transaction; outside a job the change is recorded and warned about. Returns the old value.';
COMMENT ON VIEW ihub.integration_dates IS 'Integration dates, with a warning when the last change was made by hand.';
COMMENT ON FUNCTION ihub._own_schedule(text, regrole) IS 'Internal: a scheduled action the caller may act on, or an error with a hint.';
