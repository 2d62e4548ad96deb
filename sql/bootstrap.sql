-- pg_ihub tables. Loaded first (bootstrap); functions and views follow in
-- api.sql once the Rust functions exist.

-- Roles are cluster-wide, so they may already exist from another database.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ihub_viewer') THEN
        CREATE ROLE ihub_viewer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ihub_developer') THEN
        CREATE ROLE ihub_developer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ihub_admin') THEN
        CREATE ROLE ihub_admin NOLOGIN;
    END IF;
END
$roles$;
-- Each role includes the one below it.
GRANT ihub_viewer TO ihub_developer;
GRANT ihub_developer TO ihub_admin;

-- Per-subscription capture tables and their trigger functions live here;
-- they are made at run time by ihub.subscribe().
CREATE SCHEMA ihub_capture;
COMMENT ON SCHEMA ihub_capture IS
    'pg_ihub: capture tables (one per subscription) holding raw row changes until a dispatcher turns them into deliveries. Managed by ihub.subscribe/unsubscribe.';
-- Numbers the statements whose changes the capture triggers copy (one value
-- a statement): a row's later change always has the higher number, since
-- its writer waited for the earlier one's commit. Routes of ordered
-- endpoints take captured changes in this order.
CREATE SEQUENCE ihub.capture_seq;
COMMENT ON SEQUENCE ihub.capture_seq IS 'pg_ihub: numbers captured statements, in the order their row changes must be delivered.';

CREATE TABLE ihub.integration_kind (
    kind              text PRIMARY KEY,
    required_settings text[] NOT NULL DEFAULT '{}',
    description       text
);
COMMENT ON TABLE ihub.integration_kind IS
    'Kinds of integration and the settings each needs before it can be enabled.';
INSERT INTO ihub.integration_kind (kind, required_settings, description) VALUES
    ('webhook', '{}', 'Outbound webhooks to endpoints that need no further settings'),
    ('rest', '{base_url}', 'A REST API reached at settings->>''base_url''');

CREATE TABLE ihub.integration (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE
                CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    kind        text NOT NULL REFERENCES ihub.integration_kind (kind),
    tenant      text,
    settings    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    state       text NOT NULL DEFAULT 'inactive' CHECK (state IN ('inactive', 'test', 'active')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ihub.integration IS
    'Integrations: a named connection to an external system. Lifecycle inactive -> test (staging servers) or active.';

CREATE TABLE ihub.endpoint (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id  bigint NOT NULL REFERENCES ihub.integration (id),
    name            text NOT NULL UNIQUE
                    CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    url             text NOT NULL,
    method          text NOT NULL DEFAULT 'POST'
                    CHECK (method IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE')),
    headers         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(headers) = 'object'),
    auth_type       text NOT NULL DEFAULT 'none',
    timeout_ms      integer CHECK (timeout_ms BETWEEN 1 AND 300000),
    retry           jsonb NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    disabled_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The circuit breaker policy (ihub._normalize_circuit), NULL when off.
    circuit         jsonb,
    -- Requests per second and requests in flight at most, across all
    -- dispatchers (ihub._claim_limited); NULL for no limit.
    rate_limit      double precision CHECK (rate_limit > 0),
    max_in_flight   integer CHECK (max_in_flight >= 1),
    -- The event types it accepts (exact, or a prefix ending in *); NULL: all.
    event_types     text[],
    -- 'key': one delivery in flight per ordering key, in commit order;
    -- 'endpoint': one at a time, first in first out; NULL: no order.
    ordering        text CHECK (ordering IN ('key', 'endpoint'))
);
CREATE INDEX ON ihub.endpoint (integration_id);
-- Every claim asks whether any endpoint has limits (ihub._claim_limited).
CREATE INDEX endpoint_limited_idx ON ihub.endpoint (id)
    WHERE rate_limit IS NOT NULL OR max_in_flight IS NOT NULL OR ordering IS NOT NULL;
COMMENT ON TABLE ihub.endpoint IS
    'HTTP endpoints deliveries are sent to. Credentials live in endpoint_credential and endpoint_secret, readable by ihub_admin only.';

-- An endpoint's delivery state (endpoint_controls.sql): its circuit, failure streak,
-- rate-limit bucket and 429 pause. Runtime state, not configuration. A row
-- appears with the endpoint's first failed attempt, or its first limited
-- claim; a batch delivered to an endpoint with nothing on record writes
-- nothing here.
CREATE TABLE ihub.endpoint_state (
    endpoint_id     bigint PRIMARY KEY REFERENCES ihub.endpoint (id) ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    -- consecutive failed attempts (5xx, timeouts, connections)
    failures        integer NOT NULL DEFAULT 0,
    -- the failure-rate window, from the first failure in it
    window_start    timestamptz,
    window_attempts integer NOT NULL DEFAULT 0,
    window_failures integer NOT NULL DEFAULT 0,
    opened_at       timestamptz,
    -- open: when a probe may be sent; half_open: the probe's lease
    retry_at        timestamptz,
    probe_until     timestamptz,
    -- the first failed attempt since the last delivered one
    failing_since   timestamptz,
    -- the last 20 changes of state: [{at, from, to, reason}]
    changes         jsonb NOT NULL DEFAULT '[]',
    -- rate_limit's token bucket: tokens left at tokens_at
    tokens          double precision,
    tokens_at       timestamptz,
    -- a 429 holds every delivery to the endpoint until then
    paused_until    timestamptz
);
-- Every claim asks whether any circuit is not closed.
CREATE INDEX endpoint_state_held_idx ON ihub.endpoint_state (endpoint_id) WHERE state <> 'closed';
COMMENT ON TABLE ihub.endpoint_state IS
    'Each endpoint''s delivery state: circuit breaker (closed, open, half_open), failure streak, last 20 changes of state, rate-limit bucket and 429 pause.';

-- Credentials are kept apart so that a plain SELECT privilege on endpoints
-- can never reveal them.
CREATE TABLE ihub.endpoint_credential (
    endpoint_id bigint PRIMARY KEY REFERENCES ihub.endpoint (id) ON DELETE CASCADE,
    auth        jsonb NOT NULL
);
COMMENT ON TABLE ihub.endpoint_credential IS
    'Endpoint authentication (basic, bearer, api_key) with its secret values. ihub_admin only.';

CREATE TABLE ihub.endpoint_secret (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id bigint NOT NULL REFERENCES ihub.endpoint (id) ON DELETE CASCADE,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);
CREATE INDEX ON ihub.endpoint_secret (endpoint_id);
COMMENT ON TABLE ihub.endpoint_secret IS
    'Standard Webhooks signing secrets (whsec_...). During a rotation the old key keeps signing until expires_at. ihub_admin only.';

CREATE TABLE ihub.subscription (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id   bigint NOT NULL REFERENCES ihub.endpoint (id),
    source        regclass NOT NULL,
    events        text[] NOT NULL,
    columns       text[],
    watch         text[],
    condition     text,
    test_mode     boolean NOT NULL DEFAULT false,
    created_by    name NOT NULL DEFAULT current_user,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Set when routing its changes fails for a reason that does not pass
    -- (its table or capture table broken): the others go on, and it is tried
    -- again every 10 seconds until it works.
    broken_at     timestamptz,
    broken_reason text,
    -- The event type of its deliveries; NULL: <table>.<operation>.
    event_type    text,
    -- The columns whose values make a change's ordering key when its
    -- endpoint orders by key; NULL: the table's primary key.
    ordering_key  text[],
    -- The payload template (sql/payloads.sql); NULL: the row as it is.
    payload       jsonb,
    -- A timed subscription (sql/timers.sql): each row is sent once at
    -- timer_column + timer_offset while it matches timer_condition.
    timer_column    text,
    timer_offset    interval,
    timer_condition text
);
CREATE INDEX ON ihub.subscription (endpoint_id);
COMMENT ON TABLE ihub.subscription IS
    'Row-change subscriptions: which table events are captured for which endpoint. Capture table: ihub_capture.sub_<id>.';

-- No foreign keys: checking them cost a query per delivery queued (10-14 us
-- of the ~190 a delivery costs, make bench); ihub._endpoint_deleted and
-- ihub._subscription_deleted (outbound.sql) do their work when an endpoint
-- or subscription is deleted instead.
CREATE TABLE ihub.delivery (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text NOT NULL,
    endpoint_id     bigint NOT NULL,
    subscription_id bigint,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    -- Per-delivery extras from ihub.http_request(); NULL means the endpoint's.
    method          text,
    path            text,
    headers         jsonb,
    test_mode       boolean NOT NULL DEFAULT false,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'retry', 'failed', 'dead', 'skipped')),
    attempts        integer NOT NULL DEFAULT 0,
    -- attempts already spent when the delivery was last (re)queued, so that a
    -- replay gets a fresh retry budget while the attempt count keeps growing.
    budget_start    integer NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    worker_pid     integer,
    lease_until     timestamptz,
    last_status     integer,
    last_error      text,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    -- ihub.http_request(..., on_response => ...): the function run as a job
    -- of requested_by with the response once the delivery ends, and the
    -- context handed to it.
    on_response     regprocedure,
    response_context jsonb,
    requested_by    regrole,
    -- The version of its endpoint's OAuth2 access token that the receiver
    -- last answered 401 to (see ihub._settle).
    refused_token   integer,
    -- Its place in the order of an ordered endpoint (ihub._ordered_heads):
    -- '' for the whole endpoint, or <subscription>:<key values>. NULL: none.
    ordering_key    text
)
-- Every delivery is updated at least twice; vacuum early so that the partial
-- indexes do not fill with dead entries. Half of each page stays free for
-- those updates: settling a batch rewrites each delivery on its own page,
-- where Postgres logs only the changed part of a row (the payload comes
-- before the state) and no lock of the old version. WAL per delivery
-- 2,359-2,646 -> 1,822-1,936 bytes (make bench); the history takes about
-- twice the pages.
WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02, fillfactor = 50);
-- The claim scans only due work; finished deliveries stay out of this index.
CREATE INDEX delivery_due_idx ON ihub.delivery (run_at)
    WHERE state IN ('pending', 'retry');
CREATE INDEX delivery_running_idx ON ihub.delivery (lease_until)
    WHERE state = 'running';
-- Only problem deliveries, for ihub.replay_dead. An index over all of an
-- endpoint's deliveries cost an insert per delivery and tempted the planner
-- into scanning an endpoint's whole history when claiming.
CREATE INDEX delivery_problem_idx ON ihub.delivery (endpoint_id, created_at)
    WHERE state IN ('dead', 'failed');
-- An endpoint's due deliveries, for claims that go endpoint by endpoint
-- (rate limits, circuit probes). Deliveries routed straight to a
-- dispatcher (running) never enter it.
CREATE INDEX delivery_due_endpoint_idx ON ihub.delivery (endpoint_id, run_at)
    WHERE state IN ('pending', 'retry');
-- The deliveries of ordered endpoints that hold their key: the first of
-- each key is the one that may go (ihub._ordered_heads, a skip scan). Dead
-- and failed ones hold it until replayed or skipped.
CREATE INDEX delivery_ordered_idx ON ihub.delivery (endpoint_id, ordering_key, id)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'retry', 'running', 'failed', 'dead');
-- Timed subscriptions' timers (sql/timers.sql): one per row of the
-- table, due at its column + offset; fired_at once its delivery is queued.
CREATE TABLE ihub.timer (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES ihub.subscription (id) ON DELETE CASCADE,
    -- the row's primary key values
    row_key         jsonb NOT NULL,
    due_at          timestamptz NOT NULL,
    fired_at        timestamptz,
    -- the row as its last change left it
    data            jsonb NOT NULL,
    UNIQUE (subscription_id, row_key)
);
-- Dispatchers fire (and wake for) the first due timers by this index.
CREATE INDEX timer_due_idx ON ihub.timer (due_at) WHERE fired_at IS NULL;
COMMENT ON TABLE ihub.timer IS 'Timed subscriptions'' timers: one per row, due at column + offset (ihub.subscribe_timed).';

COMMENT ON TABLE ihub.delivery IS
    'The outbound queue and its history: one row per event per endpoint, with its state and retry schedule.';

-- No foreign key to delivery: checking it costs a lookup per attempt on the
-- hot path; attempts are deleted with their deliveries by pg_ihub itself.
CREATE TABLE ihub.delivery_attempt (
    delivery_id      bigint NOT NULL,
    attempt          integer NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    request_headers  jsonb NOT NULL,
    response_status  integer,
    response_headers jsonb,
    response_body    text,
    error            text,
    error_category   text NOT NULL,
    worker_pid       integer,
    PRIMARY KEY (delivery_id, attempt)
);
COMMENT ON TABLE ihub.delivery_attempt IS
    'Every attempt at a delivery: request headers (credentials masked), response status, headers and body (truncated to ihub.response_body_limit), duration and error category.';

-- Configuration survives pg_dump / restore; queues and history are data.
SELECT pg_catalog.pg_extension_config_dump('ihub.integration', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.endpoint', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.endpoint_credential', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.endpoint_secret', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.subscription', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.delivery', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.delivery_attempt', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.capture_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.timer', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.integration_kind', $$WHERE kind NOT IN ('webhook', 'rest')$$);
COMMENT ON SCHEMA ihub IS 'pg_ihub: integration hub (outbound webhooks, jobs, schedules, inbound webhooks). Public API and views.';

-------------------------------------------------------------------------------
-- Jobs, schedules, cronwatch, integration dates, logs
-------------------------------------------------------------------------------

CREATE TABLE ihub.schedule (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    fn              regprocedure NOT NULL,
    every           interval CHECK (every > interval '0'),
    cron            text,
    args            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(args) = 'object'),
    integration_id  bigint REFERENCES ihub.integration (id),
    priority        integer NOT NULL DEFAULT 10 CHECK (priority >= 0),
    number_of_calls integer NOT NULL DEFAULT -1 CHECK (number_of_calls >= -1),
    repeat_missed   boolean NOT NULL DEFAULT false,
    run_as          regrole NOT NULL,
    active          boolean NOT NULL DEFAULT true,
    next_run_at     timestamptz NOT NULL,
    last_run_at     timestamptz,
    last_job_id     bigint,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((every IS NULL) <> (cron IS NULL))
);
CREATE INDEX schedule_due_idx ON ihub.schedule (next_run_at) WHERE active;
COMMENT ON TABLE ihub.schedule IS
    'Scheduled actions: a function run as a background job every interval or on a five-field cron expression (UTC).';

CREATE TABLE ihub.schedule_param (
    schedule_id    bigint NOT NULL REFERENCES ihub.schedule (id) ON DELETE CASCADE,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id) ON DELETE CASCADE,
    params         jsonb NOT NULL CHECK (jsonb_typeof(params) = 'object'),
    PRIMARY KEY (schedule_id, integration_id)
);
COMMENT ON TABLE ihub.schedule_param IS
    'Per-integration parameters of a scheduled action, merged into its args when it runs for that integration.';

CREATE TABLE ihub.job (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fn              regprocedure NOT NULL,
    args            jsonb NOT NULL DEFAULT '{}',
    priority        integer NOT NULL DEFAULT 10 CHECK (priority >= 0),
    run_at          timestamptz NOT NULL DEFAULT now(),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'partial', 'retry', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    -- attempts already spent when the job was last (re)queued by hand
    budget_start    integer NOT NULL DEFAULT 0,
    retry_schedule  interval[],
    timeout         interval,
    identity_key    text,
    integration_id  bigint REFERENCES ihub.integration (id) ON DELETE SET NULL,
    schedule_id     bigint REFERENCES ihub.schedule (id) ON DELETE SET NULL,
    run_as          regrole NOT NULL,
    worker_pid      integer,
    cancel_requested boolean NOT NULL DEFAULT false,
    started_at      timestamptz,
    finished_at     timestamptz,
    last_error      text,
    errors_logged   integer NOT NULL DEFAULT 0,
    progress_done   bigint,
    progress_total  bigint,
    result          jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- fn as queued (schema-qualified), for the error once fn is dropped
    fn_name         text
)
WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
-- Workers take the most urgent due job: priority 0 first, then the oldest.
CREATE INDEX job_due_idx ON ihub.job (priority, run_at, id) WHERE state IN ('pending', 'retry');
-- Running jobs, for the rescue. Keyed by id: a worker records a job done
-- or failed by id, state and worker_pid, and a key of worker_pid made the
-- planner walk every entry of that worker since the last vacuum (one per job
-- it ever claimed), 69 us per job recorded (make bench, 50,000 jobs).
CREATE INDEX job_running_idx ON ihub.job (id) WHERE state = 'running';
CREATE INDEX job_schedule_idx ON ihub.job (schedule_id, id DESC) WHERE schedule_id IS NOT NULL;
-- One queued or running job per identity key; concurrent enqueues meet here.
CREATE UNIQUE INDEX job_identity_key_idx ON ihub.job (identity_key)
    WHERE identity_key IS NOT NULL AND state IN ('pending', 'running', 'retry');
COMMENT ON TABLE ihub.job IS
    'Background jobs: a SQL function called with jsonb args in a worker, in its own transaction, as the role that enqueued it.';
COMMENT ON COLUMN ihub.job.fn_name IS
    'The job''s function as it was named when queued: the error of a job whose function was dropped names it.';

CREATE TABLE ihub.watcher (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target             text NOT NULL UNIQUE,
    schedule_id        bigint REFERENCES ihub.schedule (id) ON DELETE SET NULL,
    notify_endpoint_id bigint REFERENCES ihub.endpoint (id) ON DELETE SET NULL,
    channel            text NOT NULL DEFAULT 'ihub_cronwatch',
    grace              interval NOT NULL DEFAULT '5 minutes' CHECK (grace >= interval '0'),
    status             text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'alerting')),
    incident           text,
    alerted_at         timestamptz,
    checked_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ihub.watcher IS
    'Watchers of scheduled actions (pg_ihub''s, or pg_cron''s as cron:<jobname>): alert once when one is deactivated, deleted or late.';

CREATE TABLE ihub.integration_date (
    integration_id bigint NOT NULL REFERENCES ihub.integration (id) ON DELETE CASCADE,
    name           text NOT NULL,
    value          timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    updated_by     name NOT NULL DEFAULT current_user,
    PRIMARY KEY (integration_id, name)
);
COMMENT ON TABLE ihub.integration_date IS
    'Named sync cursors per integration ("last successful import"), advanced in the same transaction as the data.';

CREATE TABLE ihub.integration_date_change (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id) ON DELETE CASCADE,
    name           text NOT NULL,
    old_value      timestamptz,
    new_value      timestamptz,
    changed_by     name NOT NULL,
    changed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON ihub.integration_date_change (integration_id, name, changed_at DESC);
COMMENT ON TABLE ihub.integration_date_change IS
    'Manual changes of integration dates (made outside a job): who, when, old and new value.';

-- Log entries, partitioned by level and, for the levels with a retention
-- period, by day: the daily cleanup drops whole expired partitions instead of
-- deleting rows one by one (cheap with 10 million rows), and deletes only in
-- the one partition the cutoff falls into. Errors and criticals are kept
-- until someone removes them (unless a retention is set for them).
CREATE TABLE ihub.log_entry (
    id             bigint GENERATED ALWAYS AS IDENTITY,
    logged_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    level          text NOT NULL CHECK (level IN ('debug', 'info', 'warning', 'error', 'critical')),
    message        text NOT NULL,
    details        jsonb,
    integration_id bigint,
    job_id         bigint,
    delivery_id    bigint,
    inbound_id     bigint,
    row_table      regclass,
    row_key        text,
    logged_by      name NOT NULL DEFAULT current_user,
    checked_at     timestamptz,
    checked_by     name
) PARTITION BY LIST (level);
-- No index on the parent: each partition has its own (id) and (logged_at)
-- indexes. A parent index would be rebuilt on every partition pg_restore
-- attaches, colliding with the partition's own dumped index.
COMMENT ON TABLE ihub.log_entry IS
    'Log entries written through ihub.log by SQL code, jobs and pg_ihub''s own workers; partitioned by level, then by day.';
CREATE TABLE ihub.log_entry_lasting PARTITION OF ihub.log_entry FOR VALUES IN ('error', 'critical');
COMMENT ON TABLE ihub.log_entry_lasting IS 'Error and critical log entries.';
CREATE TABLE ihub.log_entry_debug PARTITION OF ihub.log_entry FOR VALUES IN ('debug') PARTITION BY RANGE (logged_at);
CREATE TABLE ihub.log_entry_info PARTITION OF ihub.log_entry FOR VALUES IN ('info') PARTITION BY RANGE (logged_at);
CREATE TABLE ihub.log_entry_warning PARTITION OF ihub.log_entry FOR VALUES IN ('warning') PARTITION BY RANGE (logged_at);
COMMENT ON TABLE ihub.log_entry_debug IS 'Debug log entries, one partition per day.';
COMMENT ON TABLE ihub.log_entry_info IS 'Info log entries, one partition per day.';
COMMENT ON TABLE ihub.log_entry_warning IS 'Warning log entries, one partition per day.';
-- Rows of days without a partition yet land here (never an insert error).
CREATE TABLE ihub.log_entry_debug_default PARTITION OF ihub.log_entry_debug DEFAULT;
CREATE TABLE ihub.log_entry_info_default PARTITION OF ihub.log_entry_info DEFAULT;
CREATE TABLE ihub.log_entry_warning_default PARTITION OF ihub.log_entry_warning DEFAULT;
COMMENT ON TABLE ihub.log_entry_debug_default IS 'Debug entries of days without their own partition.';
COMMENT ON TABLE ihub.log_entry_info_default IS 'Info entries of days without their own partition.';
COMMENT ON TABLE ihub.log_entry_warning_default IS 'Warning entries of days without their own partition.';
CREATE INDEX log_entry_lasting_id_idx ON ihub.log_entry_lasting (id);
CREATE INDEX log_entry_lasting_logged_at_idx ON ihub.log_entry_lasting (logged_at);
CREATE INDEX log_entry_debug_default_id_idx ON ihub.log_entry_debug_default (id);
CREATE INDEX log_entry_debug_default_logged_at_idx ON ihub.log_entry_debug_default (logged_at);
CREATE INDEX log_entry_info_default_id_idx ON ihub.log_entry_info_default (id);
CREATE INDEX log_entry_info_default_logged_at_idx ON ihub.log_entry_info_default (logged_at);
CREATE INDEX log_entry_warning_default_id_idx ON ihub.log_entry_warning_default (id);
CREATE INDEX log_entry_warning_default_logged_at_idx ON ihub.log_entry_warning_default (logged_at);

-- Logging per integration: on or off, and the lowest level kept.
CREATE TABLE ihub.log_setting (
    integration_id bigint PRIMARY KEY REFERENCES ihub.integration (id) ON DELETE CASCADE,
    enabled        boolean NOT NULL DEFAULT true,
    min_level      text NOT NULL DEFAULT 'info' CHECK (min_level IN ('debug', 'info', 'warning', 'error', 'critical'))
);
COMMENT ON TABLE ihub.log_setting IS 'Per-integration logging: on or off, and the minimum level (debug is off by default).';

-- How long each kind of record is kept; NULL keeps it until removed by hand.
CREATE TABLE ihub.retention (
    kind  text PRIMARY KEY CHECK (kind IN ('debug', 'info', 'warning', 'error', 'critical',
                                           'deliveries', 'jobs', 'inbound', 'rejections')),
    keep  interval CHECK (keep > interval '0')
);
INSERT INTO ihub.retention (kind, keep) VALUES
    ('debug', '4 hours'), ('info', '14 days'), ('warning', '14 days'), ('error', NULL), ('critical', NULL),
    ('deliveries', '30 days'), ('jobs', '30 days'), ('inbound', '30 days'), ('rejections', '7 days');
COMMENT ON TABLE ihub.retention IS
    'Retention per log level and for delivered deliveries (with their attempts), finished jobs, processed inbound items and refused inbound requests; NULL keeps forever.';

CREATE TABLE ihub.activity_setting (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    primary_role   name NOT NULL,
    secondary_role name
);
COMMENT ON TABLE ihub.activity_setting IS 'Who critical log entries are assigned to as activities (one row).';

CREATE TABLE ihub.activity (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    summary        text NOT NULL,
    details        jsonb,
    log_id         bigint,
    integration_id bigint,
    job_id         bigint,
    delivery_id    bigint,
    inbound_id     bigint,
    row_table      regclass,
    row_key        text,
    assigned_to    name,
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
    closed_at      timestamptz,
    closed_by      name,
    note           text
);
CREATE INDEX ON ihub.activity (state, created_at);
COMMENT ON TABLE ihub.activity IS 'Activities: a task for a person, made from each critical log entry.';

-- Delivery counters rolled up per endpoint, hour and dispatcher (one row per
-- dispatcher, so that two never wait on each other's row), updated in the
-- settle of each batch: statistics over millions of attempts read a few
-- hundred rows. Latencies are a histogram of attempt durations (ms) with
-- bucket upper bounds ihub._latency_bounds().
CREATE TABLE ihub.endpoint_hourly (
    endpoint_id  bigint NOT NULL,
    hour         timestamptz NOT NULL,
    worker       integer NOT NULL,
    attempts     bigint NOT NULL DEFAULT 0,
    delivered    bigint NOT NULL DEFAULT 0,
    retried      bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    dead         bigint NOT NULL DEFAULT 0,
    latency      bigint[] NOT NULL,
    last_error   text,
    last_error_at timestamptz,
    PRIMARY KEY (endpoint_id, hour, worker)
);
COMMENT ON TABLE ihub.endpoint_hourly IS 'Delivery counters and latency histograms per endpoint and hour (rolled up at settle).';

DO $seq$
DECLARE
    t text;
BEGIN
    -- Configuration survives pg_dump / restore.
    FOREACH t IN ARRAY ARRAY['ihub.schedule', 'ihub.schedule_param', 'ihub.watcher', 'ihub.integration_date',
                             'ihub.integration_date_change', 'ihub.job', 'ihub.log_entry_lasting',
                             'ihub.log_setting', 'ihub.activity_setting', 'ihub.activity', 'ihub.endpoint_hourly'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(t, '');
    END LOOP;
END
$seq$;

-------------------------------------------------------------------------------
-- Inbound webhooks
-------------------------------------------------------------------------------

CREATE TABLE ihub.inbound_source (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id),
    name           text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    handler        regprocedure NOT NULL,
    verify         text NOT NULL DEFAULT 'standard-webhooks'
                   CHECK (verify IN ('standard-webhooks', 'hmac-sha256', 'shared-secret', 'none',
                                     'stripe', 'github', 'shopify', 'slack', 'twilio', 'svix')),
    -- The digest header (hmac-sha256) or the secret header (shared-secret).
    header         text,
    -- A header carrying the sender's delivery id, for de-duplication.
    id_header      text,
    -- 'header:<name>' or a JSON path ('{customer,id}'): items with the same
    -- key are processed in arrival order.
    ordering_key   text,
    tolerance      interval NOT NULL DEFAULT '5 minutes' CHECK (tolerance >= interval '0'),
    dedup_window   interval NOT NULL DEFAULT '24 hours' CHECK (dedup_window >= interval '0'),
    run_as         regrole NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- handler as given (schema-qualified), for the error once it is dropped
    handler_name   text,
    -- What the listener answers a request it accepted (ihub._check_source_response); NULL: 202 and the item id.
    response       jsonb,
    UNIQUE (integration_id, name)
);
COMMENT ON TABLE ihub.inbound_source IS
    'Inbound webhook sources: POST /webhooks/<integration>/<source>, their verification and their SQL handler.';
COMMENT ON COLUMN ihub.inbound_source.handler_name IS
    'The handler as it was named when the source was created: the error of an item whose handler was dropped names it.';

CREATE TABLE ihub.inbound_secret (
    source_id bigint PRIMARY KEY REFERENCES ihub.inbound_source (id) ON DELETE CASCADE,
    secret    text NOT NULL
);
COMMENT ON TABLE ihub.inbound_secret IS 'Verification secrets of inbound sources. ihub_admin only.';

CREATE TABLE ihub.inbound_item (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id     bigint NOT NULL REFERENCES ihub.inbound_source (id),
    received_at   timestamptz NOT NULL DEFAULT now(),
    run_at    timestamptz NOT NULL DEFAULT now(),
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'failed')),
    ordering_key  text,
    dedup_key     text,
    headers       jsonb NOT NULL DEFAULT '{}',
    body          bytea NOT NULL,
    remote_addr   text,
    attempts      integer NOT NULL DEFAULT 0,
    worker_pid integer,
    started_at    timestamptz,
    finished_at  timestamptz,
    result        jsonb,
    error         text,
    reactivated   integer NOT NULL DEFAULT 0
)
WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
CREATE INDEX inbound_due_idx ON ihub.inbound_item (run_at, id) WHERE state = 'pending';
CREATE INDEX inbound_ordering_idx ON ihub.inbound_item (source_id, ordering_key, id)
    WHERE state IN ('pending', 'running') AND ordering_key IS NOT NULL;
-- Keyed by id, not worker_pid: see job_running_idx.
CREATE INDEX inbound_running_idx ON ihub.inbound_item (id) WHERE state = 'running';
CREATE INDEX inbound_failed_idx ON ihub.inbound_item (source_id, id) WHERE state = 'failed';
COMMENT ON TABLE ihub.inbound_item IS
    'Inbound items: accepted requests queued for their source''s handler; failed ones are archived here, never deleted.';

CREATE TABLE ihub.inbound_dedup (
    source_id  bigint NOT NULL,
    key        text NOT NULL,
    item_id    bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (source_id, key)
);
COMMENT ON TABLE ihub.inbound_dedup IS 'Recently seen delivery ids (or body hashes) per source, for de-duplication.';

CREATE TABLE ihub.inbound_rejection (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id   bigint REFERENCES ihub.inbound_source (id) ON DELETE SET NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    reason      text NOT NULL,
    remote_addr text,
    body_sha256 text,
    headers     jsonb
);
CREATE INDEX ON ihub.inbound_rejection (received_at);
COMMENT ON TABLE ihub.inbound_rejection IS
    'Inbound requests that failed verification: not queued, recorded for inspection (body kept only as a hash).';

DO $seq$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['ihub.inbound_source', 'ihub.inbound_secret', 'ihub.inbound_item',
                             'ihub.inbound_dedup', 'ihub.inbound_rejection'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(t, '');
    END LOOP;
END
$seq$;

-- The identity sequences of those tables too: restored rows keep their ids,
-- and new ones must not start again at 1.
DO $seq$
DECLARE
    s text;
BEGIN
    FOR s IN
        SELECT DISTINCT pg_get_serial_sequence(t.oid::regclass::text, a.attname)
        FROM pg_extension e, unnest(e.extconfig) t(oid)
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attidentity <> ''
        WHERE e.extname = 'pg_ihub'
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(s, '');
    END LOOP;
END
$seq$;

-- Retention has a row per kind from CREATE EXTENSION on, so its dumped rows
-- cannot simply be copied back: a restore's COPY (or any INSERT) of a kind
-- that exists updates its row instead.
CREATE FUNCTION ihub._retention_upsert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE ihub.retention SET keep = NEW.keep WHERE kind = NEW.kind;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER retention_upsert BEFORE INSERT ON ihub.retention
    FOR EACH ROW EXECUTE FUNCTION ihub._retention_upsert();
COMMENT ON FUNCTION ihub._retention_upsert() IS
    'Internal: trigger making an insert of an existing retention kind (as pg_restore does) update its period.';
COMMENT ON TRIGGER retention_upsert ON ihub.retention IS
    'Restoring a dump keeps the dumped retention periods over the defaults CREATE EXTENSION made.';
SELECT pg_catalog.pg_extension_config_dump('ihub.retention', '');
-- Log entries of days without their own partition; the daily partitions
-- are not members and are dumped as tables of their own.
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_debug_default', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_info_default', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_warning_default', '');
-- The log's identity lives on the partitioned parent, which the loop above
-- does not see: restored entries keep their ids, new ones continue after.
SELECT pg_catalog.pg_extension_config_dump('ihub.log_entry_id_seq', '');
