-- Helpers shared by the isolation specs, loaded by each spec's setup
-- (tests/isolation/run points the setting ihub_test.helpers at this file):
--
--   setup { DO $$ BEGIN EXECUTE pg_read_file(current_setting('ihub_test.helpers')); END $$; }
--
-- Everything lives in the schema t, which each spec's teardown drops. The
-- sessions of a spec play pg_ihub's workers: they call the functions the
-- dispatchers and job workers call (ihub._claim, ihub._settle,
-- ihub._claim_job, ihub._job_attempt, ...) with their own pid as the owner.
--
-- This file is the one place that names the queues' columns (state,
-- worker_pid, budget_start, cancel_requested) and calls the workers'
-- internal functions with their argument lists; the specs go through it.

-- A spec whose teardown failed must not break the next one.
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS t CASCADE;
CREATE SCHEMA t;

-------------------------------------------------------------------------------
-- Outbound
-------------------------------------------------------------------------------

-- Integration shop (active) with endpoint hook.
CREATE FUNCTION t.make_endpoint() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ihub.create_integration('shop');
    PERFORM ihub.create_endpoint('shop', 'hook', 'https://hooks.example.com/orders');
    PERFORM ihub.enable_integration('shop');
END
$$;

-- What each session claimed.
CREATE TABLE t.claims (who text NOT NULL, id bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());

-- Claims up to p_limit deliveries as a dispatcher does (ihub._claim: routes
-- captured changes, then claims due deliveries, leased to this session's
-- pid) and records them in t.claims. A negative p_lease_ms leaves them with
-- a lease that has already run out, as when a request outlasts its lease.
-- Returns how many it claimed.
CREATE FUNCTION t.claim(p_who text, p_lease_ms integer DEFAULT 10000, p_limit integer DEFAULT 100) RETURNS bigint
LANGUAGE sql
AS $$
    WITH c AS (
        INSERT INTO t.claims (who, id)
        SELECT p_who, c.delivery_id FROM ihub._claim(pg_backend_pid(), p_limit, p_lease_ms, 1) c
        RETURNING 1
    )
    SELECT count(*) FROM c
$$;

-- Settles every delivery as a dispatcher does (ihub._settle): one attempt
-- each, with the outcome the dispatcher decided ('done', 'retry', 'failed'
-- or 'dead'). _settle applies only those still leased to this session.
-- Returns how many it settled.
CREATE FUNCTION t.settle(p_state text) RETURNS bigint
LANGUAGE sql
AS $$
    SELECT ihub._settle(pg_backend_pid(), coalesce(jsonb_agg(jsonb_build_object(
        'delivery_id', d.id,
        'state', p_state,
        'next_at', CASE WHEN p_state = 'retry' THEN extract(epoch FROM now() + interval '1 hour') END,
        'status', CASE WHEN p_state = 'done' THEN 200 ELSE 500 END,
        'error', CASE WHEN p_state = 'done' THEN NULL ELSE 'HTTP 500' END,
        'category', CASE WHEN p_state = 'done' THEN 'ok' ELSE 'http_5xx' END,
        'request_headers', '{}'::jsonb,
        'response_headers', '{}'::jsonb,
        'response_body', '',
        'started_at', extract(epoch FROM now()),
        'duration_ms', 1.5,
        'disable_endpoint', false) ORDER BY d.id), '[]'))
    FROM ihub.delivery d
$$;

-- The first (in the specs that use it: the only) delivery.
CREATE FUNCTION t.the_delivery() RETURNS bigint
LANGUAGE sql STABLE
AS $$ SELECT id FROM ihub.delivery ORDER BY id LIMIT 1 $$;

-- Deliveries as the specs check them: state, attempts, attempts spent
-- before the last replay (budget_start), attempts on record, and the
-- session holding it (from t.claims; none when no worker holds it).
CREATE FUNCTION t.deliveries()
RETURNS TABLE (state text, attempts integer, budget_start integer, recorded bigint, holder text)
LANGUAGE sql STABLE
AS $$
    SELECT d.state, d.attempts, d.budget_start,
           (SELECT count(*) FROM ihub.delivery_attempt a WHERE a.delivery_id = d.id),
           CASE WHEN d.worker_pid IS NULL THEN 'none'
                ELSE coalesce((SELECT c.who FROM t.claims c WHERE c.id = d.id ORDER BY c.at DESC LIMIT 1), '?') END
    FROM ihub.delivery d
    ORDER BY d.id
$$;

-- ihub.replay of the first delivery, its outcome as text rather than an
-- error: replayed, or refused with the state it had.
CREATE FUNCTION t.try_replay() RETURNS text
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ihub.replay(t.the_delivery());
    RETURN 'replayed';
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RETURN 'refused: ' || (SELECT d.state FROM ihub.delivery d WHERE d.id = t.the_delivery());
END
$$;

-- What is left of subscriptions: capture tables, capture triggers on a table.
CREATE FUNCTION t.capture_tables() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM pg_class WHERE relnamespace = 'ihub_capture'::regnamespace AND relkind = 'r'
$$;

CREATE FUNCTION t.capture_triggers(p_table regclass) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM pg_trigger WHERE tgrelid = p_table AND tgname LIKE 'ihub_sub_%'
$$;

-------------------------------------------------------------------------------
-- Jobs
-------------------------------------------------------------------------------

CREATE FUNCTION t.job_fn(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;

-- The first (in the specs that use it: the only) job.
CREATE FUNCTION t.job_id() RETURNS bigint LANGUAGE sql STABLE AS $$ SELECT id FROM ihub.job ORDER BY id LIMIT 1 $$;

-- A pid no backend has: the owner of work whose worker is gone.
CREATE FUNCTION t.gone_pid() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 2147483647 $$;

CREATE TABLE t.job_claims (who text NOT NULL, id bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());

-- Claims a job as a job worker does (ihub._claim_job) for the owner pid
-- (this session's by default) and records it in t.job_claims. Returns how
-- many it claimed (0 or 1).
CREATE FUNCTION t.claim_job(p_who text, p_owner integer DEFAULT pg_backend_pid()) RETURNS bigint
LANGUAGE sql
AS $$
    WITH c AS (
        INSERT INTO t.job_claims (who, id)
        SELECT p_who, j.id FROM ihub._claim_job(p_owner, 60000) j
        RETURNING 1
    )
    SELECT count(*) FROM c
$$;

-- The end of a successful run of the first job, as the job's own
-- transaction records it (ihub._job_done, as this session's pid: it raises
-- unless this session holds the job).
CREATE FUNCTION t.job_done() RETURNS void
LANGUAGE sql
AS $$ SELECT ihub._job_done(t.job_id(), pg_backend_pid(), '"ok"', 0, NULL, NULL) $$;

-- A failed attempt of the first job, recorded as the job worker does after
-- the job's transaction rolled back: in a transaction of its own, lock the
-- job if this worker still holds it (ihub._job_attempt), decide (cancelled
-- when asked, failed when the attempts are used up, else retry in a minute;
-- the worker's decision, pg_ihub_core::retry::job_next, also weighs the
-- schedule), record it (ihub._job_failed). Returns the state recorded, or
-- NULL when the job was no longer this worker's.
CREATE FUNCTION t.job_failed(p_error text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v record;
    v_state text;
BEGIN
    SELECT * INTO v FROM ihub._job_attempt(t.job_id(), pg_backend_pid());
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_state := CASE WHEN v.cancel_requested THEN 'cancelled'
                    WHEN v.attempts >= v.max_attempts THEN 'failed'
                    ELSE 'retry' END;
    RETURN ihub._job_failed(t.job_id(), pg_backend_pid(), p_error, v_state,
                            CASE WHEN v_state = 'retry' THEN 60 END);
END
$$;

-- Jobs as the specs check them: state, attempts, the session holding it
-- (from t.job_claims; gone for t.gone_pid(); none when no worker holds it)
-- and the last error.
CREATE FUNCTION t.jobs()
RETURNS TABLE (state text, attempts integer, holder text, last_error text)
LANGUAGE sql STABLE
AS $$
    SELECT j.state, j.attempts,
           CASE WHEN j.worker_pid IS NULL THEN 'none'
                WHEN j.worker_pid = t.gone_pid() THEN 'gone'
                ELSE coalesce((SELECT c.who FROM t.job_claims c WHERE c.id = j.id ORDER BY c.at DESC LIMIT 1), '?') END,
           j.last_error
    FROM ihub.job j
    ORDER BY j.id
$$;

-- Makes the running jobs look as if they started an hour ago: past any
-- timeout.
CREATE FUNCTION t.backdate_running() RETURNS void LANGUAGE sql AS $$
    UPDATE ihub.job SET started_at = started_at - interval '1 hour' WHERE state = 'running'
$$;

-- Whether the first job has a cancel pending.
CREATE FUNCTION t.cancel_requested() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT cancel_requested FROM ihub.job WHERE id = t.job_id()
$$;

-- Enqueues t.job_fn with the identity key 'sync-orders' and records the id
-- this session got in t.enqueued.
CREATE TABLE t.enqueued (who text NOT NULL, id bigint NOT NULL);

CREATE FUNCTION t.enqueue_keyed(p_who text) RETURNS text
LANGUAGE sql
AS $$
    INSERT INTO t.enqueued (who, id)
    VALUES (p_who, ihub.enqueue('t.job_fn(jsonb)'::regprocedure, identity_key => 'sync-orders'))
    RETURNING 'enqueued'
$$;

-------------------------------------------------------------------------------
-- Inbound
-------------------------------------------------------------------------------

-- Integration shop with the source orders: no verification, the default
-- de-duplication window, a handler that does nothing.
CREATE FUNCTION t.on_order(item ihub.inbound_items) RETURNS void LANGUAGE sql AS $$ SELECT $$;

CREATE FUNCTION t.make_source() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ihub.create_integration('shop');
    PERFORM ihub.create_source('shop', 'orders', 't.on_order(ihub.inbound_items)', 'none');
END
$$;

-- Accepts one request for orders as the listener does (a batch of one)
-- with delivery id p_key, and records what this session got in t.accepted.
CREATE TABLE t.accepted (who text NOT NULL, item_id bigint, duplicate boolean);

CREATE FUNCTION t.accept(p_who text, p_key text) RETURNS text
LANGUAGE sql
AS $$
    INSERT INTO t.accepted (who, item_id, duplicate)
    SELECT p_who, a.item_id, a.duplicate
    FROM ihub._accept_inbound(ARRAY[(SELECT id FROM ihub.inbound_source WHERE name = 'orders')], ARRAY['{}'::jsonb],
                              ARRAY[convert_to(p_who, 'UTF8')], ARRAY[p_key], ARRAY['127.0.0.1'],
                              ARRAY[NULL::timestamptz]) a
    RETURNING 'accepted'
$$;
