-- Helpers shared by the isolation specs, loaded by each spec's setup
-- (tests/isolation/run points the setting ihub_test.helpers at this file):
--
--   DO $$ BEGIN EXECUTE pg_read_file(current_setting('ihub_test.helpers')); END $$;
--
-- Everything lives in the schema t, which each spec's teardown drops.
--
-- Queue vocabulary: the specs speak the new one (delivery state 'done';
-- columns run_at and worker_pid). This file is the only place that names
-- the queue columns; against a schema that still has the old names
-- (next_attempt_at, lease_owner, state 'delivered'), it translates. Once
-- the rename has landed, the branch marked OLD can go.

-- A spec whose teardown failed must not break the next one.
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS t CASCADE;
CREATE SCHEMA t;

-- Which vocabulary the installed schema speaks.
CREATE FUNCTION t.old_vocabulary() RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'ihub.delivery'::regclass AND attname = 'lease_owner' AND NOT attisdropped)
$$;

DO $compat$
BEGIN
    IF t.old_vocabulary() THEN
        -- OLD: the schema before the rename.
        CREATE VIEW t.delivery AS
        SELECT d.id, CASE d.state WHEN 'delivered' THEN 'done' ELSE d.state END AS state,
               d.attempts, d.budget_start, d.lease_owner AS worker_pid, d.lease_until,
               d.next_attempt_at AS run_at, d.endpoint_id
        FROM ihub.delivery d;
    ELSE
        CREATE VIEW t.delivery AS
        SELECT d.id, d.state, d.attempts, d.budget_start, d.worker_pid, d.lease_until, d.run_at, d.endpoint_id
        FROM ihub.delivery d;
    END IF;
END
$compat$;

-- A delivery state of the new vocabulary, as the installed schema spells it.
CREATE FUNCTION t.installed_state(p_state text) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT CASE WHEN p_state = 'done' AND t.old_vocabulary() THEN 'delivered' ELSE p_state END $$;

-- An outbound setup: integration shop (active), endpoint hook.
CREATE FUNCTION t.make_endpoint() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ihub.create_integration('shop');
    PERFORM ihub.create_endpoint('shop', 'hook', 'https://hooks.example.com/orders',
                                 retry => '{"max_attempts": 1}');
    PERFORM ihub.enable_integration('shop');
END
$$;

-- Claims, as a dispatcher would (ihub._claim, this session's pid as the
-- owner), and records what each session claimed in t.claims. A negative
-- lease leaves the claimed deliveries with a lease that has already run out
-- (as when a request outlasts it). Returns how many were claimed.
CREATE TABLE t.claims (who text NOT NULL, id bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());

CREATE FUNCTION t.claim(p_who text, p_lease_ms integer DEFAULT 10000) RETURNS bigint
LANGUAGE sql
AS $$
    WITH c AS (
        INSERT INTO t.claims (who, id)
        SELECT p_who, c.delivery_id FROM ihub._claim(pg_backend_pid(), 100, p_lease_ms, 1) c
        RETURNING 1
    )
    SELECT count(*) FROM c
$$;

-- Settles, as a dispatcher would (ihub._settle), every delivery: one attempt
-- each with the given outcome ('done', 'retry', 'failed', 'dead'). _settle
-- applies only those still leased to this session. Returns how many it
-- settled.
CREATE FUNCTION t.settle(p_state text) RETURNS bigint
LANGUAGE sql
AS $$
    SELECT ihub._settle(pg_backend_pid(), coalesce(jsonb_agg(jsonb_build_object(
        'delivery_id', d.id,
        'state', t.installed_state(p_state),
        'next_at', extract(epoch FROM now() + interval '1 hour'),
        'status', CASE WHEN p_state = 'done' THEN 200 ELSE 500 END,
        'error', CASE WHEN p_state = 'done' THEN NULL ELSE 'HTTP 500' END,
        'category', CASE WHEN p_state = 'done' THEN 'ok' ELSE 'http_5xx' END,
        'request_headers', '{}'::jsonb,
        'response_headers', '{}'::jsonb,
        'response_body', '',
        'started_at', extract(epoch FROM now()),
        'duration_ms', 1.5) ORDER BY d.id), '[]'))
    FROM ihub.delivery d
$$;

-- The one delivery of a spec with a single delivery.
CREATE FUNCTION t.the_delivery() RETURNS bigint
LANGUAGE sql STABLE
AS $$ SELECT id FROM ihub.delivery ORDER BY id LIMIT 1 $$;

-- Deliveries with what a spec checks, without ids (they differ between
-- permutations): state, attempts, recorded attempts, and who holds it
-- (a session name from t.claims, or none).
CREATE FUNCTION t.deliveries()
RETURNS TABLE (state text, attempts integer, recorded bigint, holder text)
LANGUAGE sql STABLE
AS $$
    SELECT d.state, d.attempts,
           (SELECT count(*) FROM ihub.delivery_attempt a WHERE a.delivery_id = d.id),
           CASE WHEN d.worker_pid IS NULL THEN 'none'
                ELSE coalesce((SELECT c.who FROM t.claims c WHERE c.id = d.id ORDER BY c.at DESC LIMIT 1), '?') END
    FROM t.delivery d
    ORDER BY d.id
$$;

-- Jobs: a job function, and the claims each session made.
CREATE FUNCTION t.job_fn(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;

CREATE TABLE t.job_claims (who text NOT NULL, id bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());

-- Claims a job as a job worker would (ihub._claim_job) with the given
-- owner pid (this session's by default). Returns how many (0 or 1).
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

-- A pid no backend has: the owner of work whose worker is gone.
CREATE FUNCTION t.gone_pid() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 2147483647 $$;

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

CREATE FUNCTION t.job_id() RETURNS bigint LANGUAGE sql STABLE AS $$ SELECT id FROM ihub.job ORDER BY id LIMIT 1 $$;

-- Enqueues the job with identity key 'sync-orders' as a session and records
-- the id it got in t.enqueued.
CREATE TABLE t.enqueued (who text NOT NULL, id bigint NOT NULL);

CREATE FUNCTION t.enqueue_keyed(p_who text) RETURNS text
LANGUAGE sql
AS $$
    INSERT INTO t.enqueued (who, id)
    VALUES (p_who, ihub.enqueue('t.job_fn(jsonb)'::regprocedure, identity_key => 'sync-orders'))
    RETURNING 'enqueued'
$$;

-- ihub.replay of the one delivery, with the outcome as text rather than an
-- error (whose message would name the state in the installed vocabulary).
CREATE FUNCTION t.try_replay() RETURNS text
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ihub.replay(t.the_delivery());
    RETURN 'replayed';
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RETURN 'refused: ' || (SELECT d.state FROM t.delivery d WHERE d.id = t.the_delivery());
END
$$;

-- What is left of subscriptions: capture tables, capture triggers on a table.
CREATE FUNCTION t.capture_tables() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM pg_class WHERE relnamespace = 'ihub_capture'::regnamespace AND relkind = 'r'
$$;

CREATE FUNCTION t.capture_triggers(p_table regclass) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM pg_trigger WHERE tgrelid = p_table AND tgname LIKE 'ihub_sub_%'
$$;
