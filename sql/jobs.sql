-- pg_ihub jobs: enqueueing, the queue functions the job workers call,
-- retries, cancellation, stuck-job rescue, and the jobs view.

-- Default retry schedule, after attempts 1, 2, 3 and 4.
CREATE FUNCTION ihub._default_job_retry_schedule() RETURNS interval[]
LANGUAGE sql IMMUTABLE
AS $$ SELECT '{5 minutes, 15 minutes, 60 minutes, 3 hours}'::interval[] $$;

-- A function a job can run: a plain function taking one jsonb argument.
CREATE FUNCTION ihub._check_job_function(p_fn regprocedure, p_role name) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pg_proc;
BEGIN
    SELECT * INTO v FROM pg_proc WHERE oid = p_fn;
    IF v.prokind <> 'f' OR v.pronargs <> 1 OR v.proargtypes[0] <> 'jsonb'::regtype OR v.proretset THEN
        RAISE EXCEPTION 'function % cannot run as a job', p_fn
            USING ERRCODE = 'invalid_function_definition',
                  HINT = 'A job function takes one jsonb argument and returns one value or void, e.g. CREATE FUNCTION sync_orders(args jsonb) RETURNS void.';
    END IF;
    IF NOT has_function_privilege(p_role, p_fn, 'EXECUTE') THEN
        RAISE EXCEPTION 'role % may not execute %', p_role, p_fn
            USING ERRCODE = 'insufficient_privilege', HINT = 'Jobs run as the role that queues them; grant it EXECUTE on the function.';
    END IF;
END
$$;

-- Whether p_caller may act on work that runs as p_role (change, run, retry,
-- cancel it): as a member of p_role (superusers are members of every role),
-- or as ihub_admin unless p_role holds powers beyond its own objects
-- (superuser, CREATEROLE, or the server file and program roles), whose work
-- no other role may change.
CREATE FUNCTION ihub._may_act_for(p_caller regrole, p_role regrole) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_has_role(p_caller, p_role, 'MEMBER')
        OR (pg_has_role(p_caller, 'ihub_admin', 'MEMBER')
            AND coalesce((SELECT NOT (r.rolsuper OR r.rolcreaterole)
                                 AND NOT pg_has_role(r.oid, 'pg_execute_server_program', 'MEMBER')
                                 AND NOT pg_has_role(r.oid, 'pg_write_server_files', 'MEMBER')
                                 AND NOT pg_has_role(r.oid, 'pg_read_server_files', 'MEMBER')
                          FROM pg_roles r WHERE r.oid = p_role), false))
$$;

CREATE FUNCTION ihub._require_may_act_for(p_caller regrole, p_role regrole, p_what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT ihub._may_act_for(p_caller, p_role) THEN
        RAISE EXCEPTION 'role % may not act on %, which runs as %', p_caller, p_what, p_role
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Only members of %s, or ihub_admin when it is not a superuser or otherwise privileged, may change, run, retry or cancel it.', p_role);
    END IF;
END
$$;

-- Queues a job; with an identity key, returns the queued or running job
-- that already has it instead. The unique partial index on identity_key
-- makes concurrent enqueues with one key meet: the second waits for the
-- first to commit, then finds its job.
CREATE FUNCTION ihub._enqueue(p_fn regprocedure, p_args jsonb, p_priority integer, p_run_at timestamptz,
                              p_max_attempts integer, p_identity_key text, p_integration_id bigint,
                              p_retry_schedule interval[], p_timeout interval, p_run_as regrole,
                              p_schedule_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    FOR attempt IN 1..10 LOOP
        INSERT INTO ihub.job (fn, args, priority, run_at, max_attempts, identity_key, integration_id,
                              retry_schedule, timeout, run_as, schedule_id, fn_name)
        VALUES (p_fn, p_args, p_priority, p_run_at, p_max_attempts, p_identity_key, p_integration_id,
                p_retry_schedule, p_timeout, p_run_as, p_schedule_id, p_fn::text)
        ON CONFLICT (identity_key) WHERE identity_key IS NOT NULL AND state IN ('pending', 'running', 'retry')
        DO NOTHING
        RETURNING id INTO v_id;
        IF v_id IS NOT NULL THEN
            PERFORM ihub._wake_job_worker();
            RETURN v_id;
        END IF;
        SELECT id INTO v_id FROM ihub.job
        WHERE identity_key = p_identity_key AND state IN ('pending', 'running', 'retry');
        IF v_id IS NOT NULL THEN
            RETURN v_id;
        END IF;
        -- The job holding the key finished in between; try again.
    END LOOP;
    RAISE EXCEPTION 'could not queue a job with identity key %', p_identity_key
        USING ERRCODE = 'serialization_failure', HINT = 'Jobs with this key keep starting and finishing; try again.';
END
$$;

CREATE FUNCTION ihub._enqueue_by(
    fn regprocedure,
    args jsonb DEFAULT '{}',
    priority integer DEFAULT 10,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 5,
    identity_key text DEFAULT NULL,
    integration text DEFAULT NULL,
    retry_schedule interval[] DEFAULT NULL,
    timeout interval DEFAULT NULL,
    p_caller regrole DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_role name := pg_get_userbyid(p_caller);
BEGIN
    PERFORM ihub._require_workers();
    PERFORM ihub._check_job_function(fn, v_role);
    IF args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'job args must be a JSON object' USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"since": "2026-01-01"}.';
    END IF;
    IF priority IS NULL OR priority < 0 THEN
        RAISE EXCEPTION 'priority must be 0 or more' USING ERRCODE = 'invalid_parameter_value', HINT = '0 runs first; the default is 10.';
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1' USING ERRCODE = 'invalid_parameter_value', HINT = 'The default is 5.';
    END IF;
    IF timeout <= interval '0' OR EXISTS (SELECT 1 FROM unnest(retry_schedule) d WHERE d IS NULL OR d < interval '0') THEN
        RAISE EXCEPTION 'timeout and retry delays must be positive intervals' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example retry_schedule => ''{1 minute, 10 minutes}'', timeout => ''15 minutes''.';
    END IF;
    RETURN ihub._enqueue(fn, args, priority, coalesce(run_at, now()), max_attempts, identity_key,
                         CASE WHEN integration IS NOT NULL THEN ihub._integration_id(integration) END,
                         retry_schedule, timeout, p_caller);
END
$$;

CREATE FUNCTION ihub.enqueue(
    fn regprocedure,
    args jsonb DEFAULT '{}',
    priority integer DEFAULT 10,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 5,
    identity_key text DEFAULT NULL,
    integration text DEFAULT NULL,
    retry_schedule interval[] DEFAULT NULL,
    timeout interval DEFAULT NULL
) RETURNS bigint
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- Claims the most urgent due jobs for a worker and returns how to call
-- them, most urgent first. A worker runs them in one transaction (one commit
-- for the batch), so a batch holds the jobs of one role only: the most
-- urgent job's; and of its priority only, so that no urgent job waits in a
-- batch behind less urgent ones. It takes at most p_limit, and at most its share (rounded
-- down, at least one) of the due jobs among p_workers (of the next
-- p_limit * p_workers + 1 in queue order, from the most urgent on), so that
-- a few long jobs queued together still run side by side on idle workers; the one more tells the worker whether
-- more are due (it then wakes a peer). Only what is claimed is locked.
-- (PL/pgSQL rather than SQL: its plans are cached for the worker's session.)
CREATE FUNCTION ihub._claim_jobs(p_owner integer, p_default_timeout_ms integer, p_limit integer, p_workers integer)
RETURNS TABLE (id bigint, call text, args jsonb, run_as oid, timeout_ms integer, more_due boolean, integration text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    v_head record;
    v_found boolean;
    v_gone bigint[] := '{}';
    v_gone_fns text[] := '{}';
    v_limit integer := greatest(p_limit, 1);
    v_workers integer := greatest(p_workers, 1);
BEGIN
    LOOP
        SELECT j.id, j.priority, j.run_at, j.run_as INTO v_head FROM ihub.job j
        WHERE j.state IN ('pending', 'retry') AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        v_found := false;
        FOR v IN
            WITH next AS (
                SELECT j.id, j.run_as, j.priority FROM ihub.job j
                WHERE j.state IN ('pending', 'retry') AND j.run_at <= now()
                  AND (j.priority, j.run_at, j.id) >= (v_head.priority, v_head.run_at, v_head.id)
                ORDER BY j.priority, j.run_at, j.id
                LIMIT v_limit * v_workers + 1
            ), picked AS (
                SELECT j.id, j.priority, j.run_at FROM ihub.job j
                WHERE j.id IN (SELECT next.id FROM next
                               WHERE next.run_as = v_head.run_as AND next.priority = v_head.priority)
                  AND j.state IN ('pending', 'retry') AND j.run_at <= now()
                ORDER BY j.priority, j.run_at, j.id
                LIMIT (SELECT least(v_limit, greatest(1, count(*)::integer / v_workers)) FROM next)
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE ihub.job j
                SET state = 'running', worker_pid = p_owner, started_at = clock_timestamp(), finished_at = NULL,
                    attempts = j.attempts + 1, cancel_requested = false, errors_logged = 0,
                    progress_done = NULL, progress_total = NULL
                FROM picked WHERE j.id = picked.id
                RETURNING j.id, j.fn, j.fn_name, j.args, j.run_as, j.timeout, j.priority, j.run_at, j.integration_id
            )
            SELECT c.id, c.fn, c.fn_name, c.args, c.run_as, c.timeout, p.prorettype, p.proname, n.nspname,
                   p.proargtypes[0] = 'ihub.http_response'::regtype AS takes_response,
                   (SELECT count(*) FROM next) > (SELECT count(*) FROM picked) AS more,
                   (SELECT i.name FROM ihub.integration i WHERE i.id = c.integration_id) AS integration
            FROM claimed c
            LEFT JOIN pg_proc p ON p.oid = c.fn
            LEFT JOIN pg_namespace n ON n.oid = p.pronamespace
            ORDER BY c.priority, c.run_at, c.id
        LOOP
            IF v.proname IS NULL THEN
                v_gone := v_gone || v.id;
                v_gone_fns := v_gone_fns || coalesce(v.fn_name, v.fn::text);
                CONTINUE;
            END IF;
            v_found := true;
            id := v.id;
            call := format(CASE WHEN v.prorettype = 'void'::regtype
                                -- Qualified: the statement is parsed with the role's search_path.
                                THEN 'SELECT NULL::pg_catalog.jsonb FROM %I.%I(%s) AS f'
                                ELSE 'SELECT pg_catalog.to_jsonb(%I.%I(%s))' END,
                           v.nspname, v.proname,
                           -- A response handler's job carries its response as jsonb.
                           CASE WHEN v.takes_response
                                THEN 'pg_catalog.jsonb_populate_record(NULL::ihub.http_response, $1)' ELSE '$1' END);
            args := v.args;
            run_as := v.run_as::oid;
            timeout_ms := coalesce((extract(epoch FROM v.timeout) * 1000)::integer, p_default_timeout_ms);
            more_due := v.more;
            -- Its writes are not sent back to its integration (loop prevention).
            integration := v.integration;
            RETURN NEXT;
        END LOOP;
        -- Their function was dropped after they were queued: no attempt can
        -- call it. They fail now (which frees their identity keys), and the
        -- claim goes on to the next jobs if it found none it can run.
        FOR i IN 1 .. cardinality(v_gone) LOOP
            PERFORM ihub._job_failed(v_gone[i], p_owner,
                                     format('its function %s no longer exists: it was dropped after the job was queued',
                                            v_gone_fns[i]),
                                     'failed', NULL);
        END LOOP;
        EXIT WHEN v_found OR cardinality(v_gone) = 0;
        v_gone := '{}';
        v_gone_fns := '{}';
    END LOOP;
END
$$;

-- Claims the most urgent due job (a batch of one).
CREATE FUNCTION ihub._claim_job(p_owner integer, p_default_timeout_ms integer)
RETURNS TABLE (id bigint, call text, args jsonb, run_as oid, timeout_ms integer, more_due boolean)
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ SELECT c.id, c.call, c.args, c.run_as, c.timeout_ms, c.more_due FROM ihub._claim_jobs(p_owner, p_default_timeout_ms, 1, 1) c $$;

-- Gives claimed jobs that a worker did not start back to the queue, as
-- they were (their attempt uncounted), for any worker to take: those left
-- in a batch whose time ran out.
CREATE FUNCTION ihub._unclaim_jobs(p_ids bigint[], p_owner integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE ihub.job j
    SET state = CASE WHEN j.attempts - 1 > j.budget_start THEN 'retry' ELSE 'pending' END,
        attempts = j.attempts - 1, worker_pid = NULL, started_at = NULL
    WHERE j.id = ANY (p_ids) AND j.state = 'running' AND j.worker_pid = p_owner;
    GET DIAGNOSTICS v = ROW_COUNT;
    IF v > 0 THEN
        PERFORM ihub._wake_job_worker();
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION ihub._job_done(p_id bigint, p_owner integer, p_result jsonb, p_errors integer, p_done bigint, p_total bigint)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.job
    SET state = CASE WHEN p_errors > 0 THEN 'partial' ELSE 'done' END,
        finished_at = clock_timestamp(), worker_pid = NULL, result = p_result, errors_logged = p_errors,
        last_error = CASE WHEN p_errors > 0 THEN format('%s error(s) logged during the run', p_errors) END,
        progress_done = coalesce(p_done, progress_done), progress_total = coalesce(p_total, progress_total)
    WHERE id = p_id AND state = 'running' AND worker_pid = p_owner;
    IF NOT FOUND THEN
        -- Not this worker's job any more: what its run did must not commit.
        RAISE EXCEPTION 'job % is not running in this worker', p_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only the worker that claimed a job records it as done; the run is rolled back.';
    END IF;
END
$$;

-- What deciding a failed attempt needs, with the job locked; no row when this
-- worker does not hold it. The decision is pg_ihub_core::retry::job_next.
-- The schedule is the job's own, else its integration's
-- settings->'job_retry_schedule', else the default, in seconds.
CREATE FUNCTION ihub._job_attempt(p_id bigint, p_owner integer)
RETURNS TABLE (attempts integer, max_attempts integer, cancel_requested boolean, schedule_s double precision[])
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    SELECT j.attempts - j.budget_start, j.max_attempts, j.cancel_requested,
           ARRAY(SELECT extract(epoch FROM u.step)::double precision
                 FROM unnest(coalesce(
                     j.retry_schedule,
                     (SELECT ARRAY(SELECT jsonb_array_elements_text(i.settings -> 'job_retry_schedule')::interval)
                      FROM ihub.integration i
                      WHERE i.id = j.integration_id AND jsonb_typeof(i.settings -> 'job_retry_schedule') = 'array'),
                     ihub._default_job_retry_schedule())) WITH ORDINALITY AS u(step, n)
                 ORDER BY u.n)
    FROM ihub.job j
    WHERE j.id = p_id AND j.state = 'running' AND j.worker_pid = p_owner
    FOR UPDATE OF j
$$;

-- Records a failed attempt as the job worker decided it: cancelled, failed,
-- or retry after p_delay_s seconds. NULL when this worker does not hold it.
CREATE FUNCTION ihub._job_failed(p_id bigint, p_owner integer, p_error text, p_state text, p_delay_s double precision)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.job;
BEGIN
    IF p_state NOT IN ('retry', 'failed', 'cancelled') OR (p_state = 'retry') <> (p_delay_s IS NOT NULL) THEN
        RAISE EXCEPTION 'a failed job goes to retry (with a delay), failed or cancelled, not % (delay %)', p_state, p_delay_s;
    END IF;
    UPDATE ihub.job
    SET state = p_state, worker_pid = NULL, last_error = p_error,
        finished_at = CASE WHEN p_state = 'retry' THEN NULL ELSE clock_timestamp() END,
        run_at = CASE WHEN p_state = 'retry' THEN now() + make_interval(secs => p_delay_s) ELSE run_at END
    WHERE id = p_id AND state = 'running' AND worker_pid = p_owner
    RETURNING * INTO v;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM ihub.log(CASE WHEN p_state = 'failed' THEN 'error' ELSE 'warning' END,
                     format('job %s (%s) attempt %s failed: %s', p_id, v.fn, v.attempts, p_error),
                     jsonb_build_object('job', p_id, 'state', p_state),
                     (SELECT name FROM ihub.integration WHERE id = v.integration_id));
    RETURN p_state;
END
$$;

-- Jobs left running by a worker that is gone: queued again at once, or
-- cancelled when ihub.cancel_job asked for it meanwhile (it cannot reach a
-- worker that is gone). Returns the jobs this call rescued, with their
-- worker's pid and new state: a concurrent call waits for the rows, then
-- finds them no longer stuck.
CREATE FUNCTION ihub._rescue_stuck_jobs()
RETURNS TABLE (job_id bigint, function text, worker_pid integer, state text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    FOR v IN
        UPDATE ihub.job j
        SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'retry' END,
            run_at = CASE WHEN j.cancel_requested THEN j.run_at ELSE now() END,
            finished_at = CASE WHEN j.cancel_requested THEN clock_timestamp() END,
            worker_pid = NULL,
            last_error = CASE WHEN j.cancel_requested
                              THEN format('cancelled; its worker (pid %s) had stopped during the job', j.worker_pid)
                              ELSE format('its worker (pid %s) stopped during the job; queued again', j.worker_pid) END
        FROM (SELECT s.id, s.worker_pid FROM ihub.job s
              WHERE s.state = 'running' AND NOT ihub._pid_alive(s.worker_pid)) gone
        WHERE j.id = gone.id AND j.state = 'running' AND NOT ihub._pid_alive(j.worker_pid)
        RETURNING j.id, j.fn, j.state, j.last_error, j.integration_id, gone.worker_pid AS pid
    LOOP
        job_id := v.id; function := v.fn::text; worker_pid := v.pid; state := v.state;
        RETURN NEXT;
        PERFORM ihub.log('warning',
                         format('stuck job %s (%s) %s: %s', v.id, v.fn,
                                CASE WHEN v.state = 'cancelled' THEN 'cancelled' ELSE 'resumed' END, v.last_error),
                         jsonb_build_object('job', v.id),
                         (SELECT i.name FROM ihub.integration i WHERE i.id = v.integration_id));
        IF v.state = 'retry' THEN
            PERFORM ihub._wake_job_worker();
        END IF;
    END LOOP;
END
$$;

-- The rescue the job workers run; returns how many jobs it rescued.
CREATE FUNCTION ihub._rescue_jobs() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT count(*) FROM ihub._rescue_stuck_jobs());
END
$$;

CREATE FUNCTION ihub._next_job_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN min(run_at) IS NOT NULL THEN greatest(0, extract(epoch FROM min(run_at) - now()))::double precision END
    FROM ihub.job WHERE state IN ('pending', 'retry')
$$;

-- Raised by a job to ask for another attempt later; its reason becomes the
-- job's last error.
CREATE FUNCTION ihub.retry_later(reason text, after interval DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION USING
        MESSAGE = coalesce(reason, 'retry requested'),
        DETAIL = 'ihub.retry_later:' || coalesce(extract(epoch FROM after)::text, ''),
        ERRCODE = 'IHRTY',
        HINT = 'Raised by ihub.retry_later(); a job worker retries the job.';
END
$$;

CREATE FUNCTION ihub._cancel_job_by(id bigint, p_caller regrole) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.job;
BEGIN
    SELECT * INTO v FROM ihub.job j WHERE j.id = _cancel_job_by.id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', _cancel_job_by.id USING ERRCODE = 'undefined_object', HINT = 'List jobs in ihub.jobs.';
    END IF;
    PERFORM ihub._require_may_act_for(p_caller, v.run_as, format('job %s', v.id));
    IF v.state IN ('pending', 'retry') THEN
        UPDATE ihub.job j SET state = 'cancelled', finished_at = now(), last_error = 'cancelled by ' || pg_get_userbyid(p_caller)
        WHERE j.id = v.id;
        RETURN 'cancelled';
    ELSIF v.state = 'running' THEN
        -- The attempt is then recorded as cancelled rather than retried, by
        -- its worker, or by the rescue when the worker is gone.
        UPDATE ihub.job j SET cancel_requested = true WHERE j.id = v.id;
        -- The worker's query is cancelled only while the worker reports
        -- running this very job: not while it records the job's outcome
        -- (which the signal would cancel), nor any other job. The row lock
        -- keeps it from finishing this one and moving on meanwhile.
        IF EXISTS (SELECT 1 FROM ihub._workers() w WHERE w.pid = v.worker_pid AND w.job_id = v.id) THEN
            PERFORM pg_cancel_backend(v.worker_pid);
        END IF;
        RETURN 'cancelling';
    END IF;
    RAISE EXCEPTION 'job % is %; only queued or running jobs can be cancelled', v.id, v.state
        USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Use ihub.retry_job to run a finished job again.';
END
$$;

CREATE FUNCTION ihub.cancel_job(id bigint) RETURNS text
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

CREATE FUNCTION ihub._retry_job_by(id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.job;
BEGIN
    PERFORM ihub._require_workers();
    SELECT * INTO v FROM ihub.job j WHERE j.id = _retry_job_by.id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', _retry_job_by.id USING ERRCODE = 'undefined_object', HINT = 'List jobs in ihub.jobs.';
    END IF;
    PERFORM ihub._require_may_act_for(p_caller, v.run_as, format('job %s', v.id));
    IF v.state NOT IN ('failed', 'cancelled', 'partial', 'retry') THEN
        RAISE EXCEPTION 'job % is %; only failed, cancelled, partial or retrying jobs can be retried', v.id, v.state
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'A queued or running job will run anyway.';
    END IF;
    IF v.identity_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM ihub.job j WHERE j.identity_key = v.identity_key AND j.id <> v.id AND j.state IN ('pending', 'running', 'retry')) THEN
        RAISE EXCEPTION 'another job with identity key % is queued or running', v.identity_key
            USING ERRCODE = 'unique_violation', HINT = 'Wait for it, or cancel it first.';
    END IF;
    UPDATE ihub.job j SET state = 'pending', run_at = now(), budget_start = j.attempts, finished_at = NULL,
                          cancel_requested = false
    WHERE j.id = v.id;
    PERFORM ihub._wake_job_worker();
END
$$;

CREATE FUNCTION ihub.retry_job(id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-- The stuck-job check on demand: jobs whose worker is gone are queued
-- again; jobs running past their timeout have their query cancelled (the
-- attempt then fails and is retried). Reports each job and what was done.
CREATE FUNCTION ihub.resume_stuck_jobs()
RETURNS TABLE (job_id bigint, function text, worker_pid integer, problem text, action text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    -- What this call rescued: a job another call rescued meanwhile is not
    -- reported twice.
    FOR v IN SELECT r.job_id AS id, r.function AS fn, r.worker_pid AS pid, r.state FROM ihub._rescue_stuck_jobs() r LOOP
        job_id := v.id; function := v.fn; worker_pid := v.pid;
        problem := 'its worker is gone';
        action := CASE WHEN v.state = 'cancelled' THEN 'cancelled, as asked' ELSE 'queued again' END;
        RETURN NEXT;
    END LOOP;
    -- Locked, so that the worker cannot finish the job and move on to
    -- another before the signal; skipped when locked (the worker records it
    -- right now). Signalled only when the worker reports running this very
    -- job, not while it records its outcome.
    FOR v IN
        SELECT j.id, j.fn::text AS fn, j.worker_pid AS pid,
               coalesce(j.timeout, make_interval(secs => ihub._job_timeout_ms() / 1000.0)) AS limit_
        FROM ihub.job j
        WHERE j.state = 'running'
          AND j.started_at + coalesce(j.timeout, make_interval(secs => ihub._job_timeout_ms() / 1000.0)) + interval '5 seconds' < clock_timestamp()
        FOR UPDATE OF j SKIP LOCKED
    LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM ihub._workers() w WHERE w.pid = v.pid AND w.job_id = v.id);
        PERFORM pg_cancel_backend(v.pid);
        job_id := v.id; function := v.fn; worker_pid := v.pid;
        problem := format('running longer than its timeout (%s)', v.limit_); action := 'query cancelled; it will be retried';
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE VIEW ihub.jobs AS
SELECT j.id, j.fn::text AS function, ihub._mask_settings(j.args) AS args, j.priority, j.state,
       j.attempts, j.max_attempts, j.run_at, j.started_at, j.finished_at,
       coalesce(j.finished_at, CASE WHEN j.state = 'running' THEN clock_timestamp() END) - j.started_at AS duration,
       j.last_error,
       coalesce(w.progress_done, j.progress_done) AS progress_done,
       coalesce(w.progress_total, j.progress_total) AS progress_total,
       round(100.0 * coalesce(w.progress_done, j.progress_done) / nullif(coalesce(w.progress_total, j.progress_total), 0), 1)
           AS progress_percent,
       j.identity_key, i.name AS integration, s.name AS schedule, j.run_as, j.worker_pid, j.result, j.created_at
FROM ihub.job j
LEFT JOIN ihub.integration i ON i.id = j.integration_id
LEFT JOIN ihub.schedule s ON s.id = j.schedule_id
LEFT JOIN ihub._workers() w ON w.job_id = j.id AND j.state = 'running';

COMMENT ON FUNCTION ihub._default_job_retry_schedule() IS 'Internal: 5 min, 15 min, 60 min, 3 h.';
COMMENT ON FUNCTION ihub._check_job_function(regprocedure, name) IS 'Internal: checks that a function can run as a job for a role.';
COMMENT ON FUNCTION ihub._enqueue(regprocedure, jsonb, integer, timestamptz, integer, text, bigint, interval[], interval, regrole, bigint) IS
    'Internal: queues a job, honouring its identity key.';
COMMENT ON FUNCTION ihub.enqueue(regprocedure, jsonb, integer, timestamptz, integer, text, text, interval[], interval) IS
    'Queues a background job: fn(args jsonb) runs in a job worker, in a subtransaction of its own (jobs of one role share a transaction, see ihub.jobs_per_transaction), as the calling role. Priority 0 runs first. With an identity key, returns the queued or running job that already has it.';
COMMENT ON FUNCTION ihub._claim_jobs(integer, integer, integer, integer) IS
    'Internal (job worker): claims up to p_limit (and its share among p_workers) of the most urgent due jobs of one role, for one transaction; fails the claimed jobs whose function was dropped on the way.';
COMMENT ON FUNCTION ihub._unclaim_jobs(bigint[], integer) IS
    'Internal (job worker): gives claimed jobs it did not start back to the queue, their attempt uncounted.';
COMMENT ON FUNCTION ihub._claim_job(integer, integer) IS
    'Internal: claims the most urgent due job (ihub._claim_jobs with a limit of one).';
COMMENT ON FUNCTION ihub._job_done(bigint, integer, jsonb, integer, bigint, bigint) IS
    'Internal (job worker): records a finished job (partial when errors were logged); raises unless the worker holds it.';
COMMENT ON FUNCTION ihub._job_attempt(bigint, integer) IS
    'Internal (job worker): locks a running job and returns what deciding its failed attempt needs.';
COMMENT ON FUNCTION ihub._job_failed(bigint, integer, text, text, double precision) IS
    'Internal (job worker): records a failed attempt as decided: cancelled, failed, or retry after a delay.';
COMMENT ON FUNCTION ihub._rescue_jobs() IS 'Internal: queues again (or cancels, when asked) the jobs whose worker is gone; returns how many.';
COMMENT ON FUNCTION ihub._rescue_stuck_jobs() IS
    'Internal: queues again (or cancels, when asked) the jobs whose worker is gone; returns each job it rescued and its new state.';
COMMENT ON FUNCTION ihub._next_job_due() IS 'Internal (job worker): seconds until the next job is due.';
COMMENT ON FUNCTION ihub.retry_later(text, interval) IS
    'Called by a job to be retried: after the given delay, or per its retry schedule. Raises an error (SQLSTATE IHRTY).';
COMMENT ON FUNCTION ihub.cancel_job(bigint) IS 'Cancels a queued job, or stops a running one. Returns cancelled or cancelling.';
COMMENT ON FUNCTION ihub.retry_job(bigint) IS 'Queues a failed, cancelled or partial job again, with a fresh retry budget.';
COMMENT ON FUNCTION ihub.resume_stuck_jobs() IS
    'Queues again (or cancels, when asked) the jobs whose worker is gone and stops those running past their timeout; reports what this call did.';
COMMENT ON VIEW ihub.jobs IS
    'Background jobs: state (pending, running, done, partial, retry, failed, cancelled), attempts, timings, last error and progress.';
COMMENT ON FUNCTION ihub._may_act_for(regrole, regrole) IS 'Internal: whether a role may change, run, retry or cancel work that runs as another.';
COMMENT ON FUNCTION ihub._require_may_act_for(regrole, regrole, text) IS 'Internal: raises unless ihub._may_act_for.';
