-- pg_ihub delivery controls per endpoint: circuit breaker, rate and
-- in-flight limits, 429 pauses. Enforced in the claim so that they
-- hold across every dispatcher. Circuits: the settle counts each batch's outcomes
-- per endpoint (ihub._circuit_settle); the claim sends nothing to an open
-- circuit and, once its cooldown is over, one probe (ihub._circuit_probes).
--
--   closed --failures or failure rate--> open --cooldown, a probe claimed--> half_open
--   half_open --probe answered--> closed;  half_open --probe failed--> open
--
-- A failure is a 5xx, a timeout or a refused or dropped connection. Any
-- other answer (2xx, 4xx, 429) shows the receiver is up. Outcomes of
-- requests sent before a circuit opened change nothing while it is open.

-- Records a change of state: the entry for the circuit's history, a NOTIFY
-- on ihub_circuit and a log entry. Returns the history with it (the last 20).
CREATE FUNCTION ihub._circuit_changed(p_endpoint_id bigint, p_changes jsonb, p_from text, p_to text, p_reason text)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_change jsonb := jsonb_build_object('at', now(), 'from', p_from, 'to', p_to, 'reason', p_reason);
    v_endpoint text;
    v_integration text;
BEGIN
    SELECT e.name, i.name INTO v_endpoint, v_integration
    FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id WHERE e.id = p_endpoint_id;
    PERFORM pg_notify('ihub_circuit', (jsonb_build_object('endpoint', v_endpoint) || v_change)::text);
    PERFORM ihub.log(CASE p_to WHEN 'open' THEN 'warning' ELSE 'info' END,
                     format('circuit of endpoint %s %s: %s', v_endpoint,
                            CASE p_to WHEN 'open' THEN 'opened' WHEN 'half_open' THEN 'half-open, a probe is sent' ELSE 'closed' END,
                            p_reason),
                     jsonb_build_object('endpoint', v_endpoint, 'circuit', p_to, 'from', p_from), v_integration);
    RETURN (SELECT jsonb_agg(x ORDER BY n)
            FROM (SELECT x, n FROM jsonb_array_elements(p_changes || v_change) WITH ORDINALITY a(x, n)
                  ORDER BY n DESC LIMIT 20) last);
END
$$;

-- Counts a settled batch's outcomes per endpoint (p_health: endpoint_id,
-- delivered, failed, answered, unsuccessful) and moves circuits. Also
-- disables an endpoint whose attempts have all failed for
-- ihub.endpoint_disable_after. Called by ihub._settle only when something
-- failed or an endpoint of the batch has something on record.
CREATE FUNCTION ihub._circuit_settle(p_health jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h record;
    c ihub.endpoint_state;
    v_to text;
    v_reason text;
    v_after interval := current_setting('ihub.endpoint_disable_after')::interval;
BEGIN
    FOR h IN
        SELECT x.*, e.circuit AS policy, e.enabled, e.name
        FROM jsonb_to_recordset(p_health) AS x(endpoint_id bigint, delivered integer, failed integer,
                                               answered integer, unsuccessful integer)
        JOIN ihub.endpoint e ON e.id = x.endpoint_id
        ORDER BY x.endpoint_id
    LOOP
        IF h.unsuccessful > 0 THEN
            INSERT INTO ihub.endpoint_state (endpoint_id) VALUES (h.endpoint_id) ON CONFLICT DO NOTHING;
        END IF;
        SELECT * INTO c FROM ihub.endpoint_state WHERE endpoint_id = h.endpoint_id FOR UPDATE;
        CONTINUE WHEN NOT FOUND;

        c.failing_since := CASE WHEN h.delivered > 0 THEN NULL
                                WHEN h.unsuccessful > 0 THEN coalesce(c.failing_since, now())
                                ELSE c.failing_since END;
        c.failures := CASE WHEN h.answered > 0 THEN 0 ELSE c.failures + h.failed END;
        IF h.policy ->> 'failure_rate' IS NULL
           OR c.window_start < now() - (h.policy ->> 'window')::float8 * interval '1 second' THEN
            c.window_start := NULL;
            c.window_attempts := 0;
            c.window_failures := 0;
        END IF;
        IF h.policy ->> 'failure_rate' IS NOT NULL AND (c.window_start IS NOT NULL OR h.failed > 0) THEN
            c.window_start := coalesce(c.window_start, now());
            c.window_attempts := c.window_attempts + h.failed + h.answered;
            c.window_failures := c.window_failures + h.failed;
        END IF;

        v_to := c.state;
        IF h.policy IS NULL THEN
            v_to := 'closed';
            v_reason := 'the endpoint has no circuit breaker';
        ELSIF c.state = 'closed' AND c.failures >= (h.policy ->> 'failures')::integer THEN
            v_to := 'open';
            v_reason := format('%s consecutive failed attempts', c.failures);
        ELSIF c.state = 'closed' AND c.window_attempts >= (h.policy ->> 'min_requests')::integer
              AND c.window_failures >= (h.policy ->> 'failure_rate')::float8 * c.window_attempts THEN
            v_to := 'open';
            v_reason := format('%s of %s attempts failed within %s s', c.window_failures, c.window_attempts,
                               h.policy ->> 'window');
        ELSIF c.state = 'half_open' AND h.failed > 0 THEN
            v_to := 'open';
            v_reason := 'the probe failed';
        ELSIF c.state = 'half_open' AND h.answered > 0 THEN
            v_to := 'closed';
            v_reason := 'the probe was answered';
        END IF;
        IF v_to = 'open' THEN
            c.opened_at := CASE WHEN c.state = 'closed' THEN now() ELSE c.opened_at END;
            c.retry_at := now() + (h.policy ->> 'cooldown')::float8 * interval '1 second';
            c.probe_until := NULL;
        ELSIF v_to = 'closed' AND c.state <> 'closed' THEN
            c.failures := 0;
            c.window_start := NULL;
            c.window_attempts := 0;
            c.window_failures := 0;
            c.opened_at := NULL;
            c.retry_at := NULL;
            c.probe_until := NULL;
        END IF;
        IF v_to <> c.state THEN
            c.changes := ihub._circuit_changed(h.endpoint_id, c.changes, c.state, v_to, v_reason);
            c.state := v_to;
        END IF;
        UPDATE ihub.endpoint_state
        SET (state, failures, window_start, window_attempts, window_failures, opened_at, retry_at, probe_until,
             failing_since, changes)
          = (c.state, c.failures, c.window_start, c.window_attempts, c.window_failures, c.opened_at, c.retry_at,
             c.probe_until, c.failing_since, c.changes)
        WHERE endpoint_id = h.endpoint_id;

        IF h.enabled AND v_after > interval '0' AND c.failing_since <= now() - v_after THEN
            PERFORM ihub._disable_endpoint_for(h.endpoint_id,
                format('every attempt failed since %s (ihub.endpoint_disable_after = %s)',
                       c.failing_since, current_setting('ihub.endpoint_disable_after')));
        END IF;
    END LOOP;
END
$$;

-- Claims a probe for each open circuit whose cooldown is over (or each
-- half-open one whose probe's lease ran out): the endpoint's first due
-- delivery, and the circuit half-opens. A circuit another dispatcher is
-- probing is skipped. With nothing due, the circuit stays as it is.
CREATE FUNCTION ihub._circuit_probes(p_owner integer, p_default_timeout_ms integer, p_rounds integer)
RETURNS SETOF ihub.delivery
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    c record;
    v_probe ihub.delivery;
BEGIN
    FOR c IN
        SELECT ci.endpoint_id, ci.state, ci.changes, e.timeout_ms, e.ordering
        FROM ihub.endpoint_state ci
        JOIN ihub.endpoint e ON e.id = ci.endpoint_id
        JOIN ihub.integration i ON i.id = e.integration_id
        WHERE ci.state <> 'closed'
          AND ((ci.state = 'open' AND ci.retry_at <= now()) OR (ci.state = 'half_open' AND ci.probe_until <= now()))
          AND (ci.paused_until IS NULL OR ci.paused_until <= now())
          AND e.enabled AND i.state <> 'inactive'
        FOR UPDATE OF ci SKIP LOCKED
    LOOP
        UPDATE ihub.delivery d
        SET state = 'running', worker_pid = p_owner,
            lease_until = ihub._lease_until(coalesce(c.timeout_ms, p_default_timeout_ms), p_rounds)
        WHERE d.id = CASE WHEN c.ordering IS NULL
                          THEN (SELECT q.id FROM ihub.delivery q
                                WHERE q.state IN ('pending', 'retry') AND q.run_at <= now() AND q.endpoint_id = c.endpoint_id
                                ORDER BY q.run_at LIMIT 1
                                FOR UPDATE SKIP LOCKED)
                          -- An ordered endpoint's probe is the first of its key.
                          ELSE (SELECT q.id FROM ihub.delivery q
                                WHERE q.id = ANY (ihub._ordered_due(c.endpoint_id, NULL))
                                  AND q.state IN ('pending', 'retry')
                                ORDER BY q.run_at, q.id LIMIT 1
                                FOR UPDATE SKIP LOCKED) END
          AND d.state IN ('pending', 'retry')
        RETURNING d.* INTO v_probe;
        CONTINUE WHEN v_probe.id IS NULL;
        UPDATE ihub.endpoint_state
        SET state = 'half_open', probe_until = v_probe.lease_until,
            changes = CASE WHEN c.state = 'open'
                           THEN ihub._circuit_changed(c.endpoint_id, c.changes, 'open', 'half_open',
                                                      format('cooldown over, probe delivery %s', v_probe.id))
                           ELSE c.changes END
        WHERE endpoint_id = c.endpoint_id;
        RETURN NEXT v_probe;
        v_probe := NULL;
    END LOOP;
END
$$;

-------------------------------------------------------------------------------
-- Rate limits, in-flight limits and 429 pauses
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._check_limits(p_rate_limit double precision, p_max_in_flight integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_rate_limit < 0 OR p_rate_limit > 100000 OR p_rate_limit = 'NaN' THEN
        RAISE EXCEPTION 'rate_limit must be from 0 to 100000 requests per second, got %', p_rate_limit
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example 10, or 0.5 for one request every 2 seconds; 0 removes the limit.';
    END IF;
    IF p_max_in_flight < 0 OR p_max_in_flight > 10000 THEN
        RAISE EXCEPTION 'max_in_flight must be from 0 to 10000, got %', p_max_in_flight
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The requests sent to the endpoint at once, by all dispatchers; 0 removes the limit.';
    END IF;
END
$$;

-- Takes an ordered endpoint's turn until commit: its routes and claims take
-- turns (and, for one ordered as a whole, requests too). Not waiting, it
-- returns false when another transaction has the turn. A transaction-level
-- advisory lock, not the endpoint's state row: settling a batch writes that
-- row (failure counts), and a dispatcher that waited for another's claim to
-- write it gave up after its lock_timeout (100 ms) and rolled its settle
-- back, so the requests were sent again once their leases ran out.
CREATE FUNCTION ihub._endpoint_turn(p_endpoint_id bigint, p_wait boolean) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- pg_ihub's class of advisory locks (hashtext('ihub.endpoint_turn')),
    -- and the endpoint: ids beyond 2^31 share a lock with another, which
    -- only makes them take turns too.
    c_class constant integer := -184645567;
    v_key integer := (p_endpoint_id % 2147483647)::integer;
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(c_class, v_key);
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(c_class, v_key);
END
$$;

-- The state row of an endpoint with limits, locked until commit (its
-- token bucket), or NULLs when another transaction holds it. The row is
-- made with the endpoint's limits (ihub._endpoint_state_for), so that two
-- dispatchers never wait on each other's insert of it; here only if missing.
CREATE FUNCTION ihub._endpoint_state_locked(p_endpoint_id bigint) RETURNS ihub.endpoint_state
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s ihub.endpoint_state;
BEGIN
    FOR i IN 1..2 LOOP
        SELECT * INTO s FROM ihub.endpoint_state WHERE endpoint_id = p_endpoint_id FOR UPDATE SKIP LOCKED;
        EXIT WHEN FOUND OR EXISTS (SELECT 1 FROM ihub.endpoint_state WHERE endpoint_id = p_endpoint_id);
        PERFORM ihub._endpoint_state_for(p_endpoint_id);
    END LOOP;
    RETURN s;
END
$$;

-- Makes an endpoint's state row if it has none (a rate-limit bucket with
-- one token, a closed circuit).
CREATE FUNCTION ihub._endpoint_state_for(p_endpoint_id bigint) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO ihub.endpoint_state (endpoint_id, tokens, tokens_at) VALUES (p_endpoint_id, 1, now()) ON CONFLICT DO NOTHING
$$;

-- Claims the due deliveries of endpoints with a rate limit or an in-flight
-- limit, endpoint by endpoint, within both: the endpoint's state row is
-- locked for it (a dispatcher claiming for it already is skipped), so the
-- limits hold across all dispatchers together. The rate limit is a token
-- bucket of one second's worth (at least 1) that starts with one token:
-- dispatchers take work due later in ticks of 500 ms (dispatcher.rs,
-- DUE_TICK), and a bucket of half a second's worth would lose the tokens
-- of any gap between claims longer than that. Nothing is held in memory
-- beyond the claim.
CREATE FUNCTION ihub._claim_limited(p_owner integer, p_limit integer, p_default_timeout_ms integer, p_rounds integer)
RETURNS SETOF ihub.delivery
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    l record;
    s ihub.endpoint_state;
    v_left integer := p_limit;
    v_tokens double precision;
    v_n integer;
    v_in_flight integer;
    v_got integer;
BEGIN
    FOR l IN
        SELECT e.id, e.rate_limit, e.max_in_flight, e.timeout_ms, e.ordering
        FROM ihub.endpoint e JOIN ihub.integration i ON i.id = e.integration_id
        WHERE (e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL OR e.ordering IS NOT NULL)
          AND e.enabled AND i.state <> 'inactive'
          AND EXISTS (SELECT 1 FROM ihub.delivery q
                      WHERE q.endpoint_id = e.id AND q.state IN ('pending', 'retry') AND q.run_at <= now())
        ORDER BY e.id
    LOOP
        EXIT WHEN v_left <= 0;
        -- Another transaction routes or claims for this ordered endpoint.
        CONTINUE WHEN l.ordering IS NOT NULL AND NOT ihub._endpoint_turn(l.id, false);
        IF l.rate_limit IS NOT NULL OR l.max_in_flight IS NOT NULL THEN
            s := ihub._endpoint_state_locked(l.id);
            CONTINUE WHEN s.endpoint_id IS NULL;
        ELSE
            s := NULL;
            SELECT * INTO s FROM ihub.endpoint_state WHERE endpoint_id = l.id;
        END IF;
        CONTINUE WHEN s.state <> 'closed' OR s.paused_until > now();
        v_n := v_left;
        IF l.rate_limit IS NOT NULL THEN
            v_tokens := least(greatest(1, l.rate_limit),
                              coalesce(s.tokens, 1)
                              + l.rate_limit * extract(epoch FROM now() - coalesce(s.tokens_at, now()))::double precision);
            v_n := least(v_n, floor(v_tokens)::integer);
        END IF;
        IF l.max_in_flight IS NOT NULL THEN
            v_in_flight := l.max_in_flight - (SELECT count(*) FROM ihub.delivery r
                                              WHERE r.state = 'running' AND r.endpoint_id = l.id)::integer;
            IF v_in_flight < v_n THEN
                -- Due deliveries wait for requests in flight: the dispatcher
                -- settles its batch as soon as it is sent, not at its next
                -- tick, and claims them (see dispatcher.rs, in_flight_held).
                PERFORM set_config('ihub_claim.in_flight_held', 'on', false);
                v_n := v_in_flight;
            END IF;
        END IF;
        v_got := 0;
        IF v_n > 0 AND l.ordering IS NOT NULL THEN
            -- The first open delivery of each key, if it is due. The
            -- endpoint's turn keeps other claims and routes of it out
            -- until commit.
            RETURN QUERY
                WITH due AS (
                    SELECT q.id FROM ihub.delivery q
                    WHERE q.id = ANY (ihub._ordered_due(l.id, v_n))
                      AND q.state IN ('pending', 'retry')
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE ihub.delivery d
                SET state = 'running', worker_pid = p_owner,
                    lease_until = ihub._lease_until(coalesce(l.timeout_ms, p_default_timeout_ms), p_rounds)
                FROM due WHERE d.id = due.id
                RETURNING d.*;
            GET DIAGNOSTICS v_got = ROW_COUNT;
            -- The next of these keys may go once they are delivered: the
            -- dispatcher settles as soon as its batch is sent.
            IF v_got > 0 THEN
                PERFORM set_config('ihub_claim.in_flight_held', 'on', false);
            END IF;
        ELSIF v_n > 0 THEN
            RETURN QUERY
                WITH due AS (
                    SELECT q.id FROM ihub.delivery q
                    WHERE q.endpoint_id = l.id AND q.state IN ('pending', 'retry') AND q.run_at <= now()
                    ORDER BY q.run_at LIMIT v_n
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE ihub.delivery d
                SET state = 'running', worker_pid = p_owner,
                    lease_until = ihub._lease_until(coalesce(l.timeout_ms, p_default_timeout_ms), p_rounds)
                FROM due WHERE d.id = due.id
                RETURNING d.*;
            GET DIAGNOSTICS v_got = ROW_COUNT;
        END IF;
        IF l.rate_limit IS NOT NULL THEN
            UPDATE ihub.endpoint_state SET tokens = v_tokens - v_got, tokens_at = now() WHERE endpoint_id = l.id;
        END IF;
        v_left := v_left - v_got;
    END LOOP;
END
$$;

-- A 429 holds every delivery to its endpoint until the delivery's own
-- retry is due (its Retry-After, or else its backoff), not only that one.
CREATE FUNCTION ihub._pause_rate_limited(p_results jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
BEGIN
    FOR p IN
        SELECT d.endpoint_id, max(to_timestamp(x.next_at)) AS until
        FROM jsonb_to_recordset(p_results) AS x(delivery_id bigint, state text, category text, next_at double precision)
        JOIN ihub.delivery d ON d.id = x.delivery_id
        WHERE x.category = 'rate_limited' AND x.state = 'retry'
        GROUP BY d.endpoint_id
        ORDER BY d.endpoint_id
    LOOP
        INSERT INTO ihub.endpoint_state AS s (endpoint_id, paused_until) VALUES (p.endpoint_id, p.until)
        ON CONFLICT (endpoint_id) DO UPDATE SET paused_until = greatest(s.paused_until, EXCLUDED.paused_until);
    END LOOP;
END
$$;

-------------------------------------------------------------------------------
-- Ordering
-------------------------------------------------------------------------------

-- An endpoint's ordering: 'key', 'endpoint', or NULL ('none', or not given).
CREATE FUNCTION ihub._check_ordering(p_ordering text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_ordering IS NULL OR lower(p_ordering) = 'none' THEN
        RETURN NULL;
    ELSIF lower(p_ordering) IN ('key', 'endpoint') THEN
        RETURN lower(p_ordering);
    END IF;
    RAISE EXCEPTION 'invalid ordering "%"', p_ordering
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Use key (a row''s changes in commit order, keys in parallel), endpoint (one at a time, first in first out) or none.';
END
$$;

-- The ordering key of a delivery that is not a row change (a request, a
-- replay of one queued without order): its own key, unordered with others,
-- when the endpoint orders by key; the endpoint's when it orders them all.
CREATE FUNCTION ihub._ordering_key_of(p_ordering text, p_own_key text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE p_ordering WHEN 'endpoint' THEN '' WHEN 'key' THEN p_own_key END $$;

-- The columns whose values are a subscription's ordering key: those it was
-- given, or its table's primary key.
CREATE FUNCTION ihub._ordering_columns(p_sub ihub.subscription) RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text[] := p_sub.ordering_key;
BEGIN
    IF v IS NULL THEN
        SELECT array_agg(a.attname::text ORDER BY k.n) INTO v
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = p_sub.source AND i.indisprimary;
    END IF;
    IF v IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key to order its changes by', p_sub.source
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'Add a primary key, or subscribe with the key columns: ihub.subscribe(..., ordering_key => ''{customer_id}'').';
    END IF;
    RETURN v;
END
$$;

-- (ihub._ordered_heads, the first delivery of each key, is in outbound.sql:
-- the views use it.)

-- Sets an endpoint's ordering (from ihub.alter_endpoint). Deliveries queued
-- without an order cannot take a place in one afterwards, so ordering is
-- switched on only when nothing is queued for the endpoint; switching it
-- off is always possible. Either way, dead and failed deliveries give up
-- the keys they held (a replay queues them in the new order).
CREATE FUNCTION ihub._change_ordering(p_endpoint_id bigint, p_ordering text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint;
    v_queued bigint;
BEGIN
    -- FOR UPDATE waits for the routes and requests queueing deliveries for
    -- it (they hold FOR KEY SHARE until commit) and keeps new ones out.
    SELECT * INTO v_endpoint FROM ihub.endpoint WHERE id = p_endpoint_id FOR UPDATE;
    IF v_endpoint.ordering IS NOT DISTINCT FROM p_ordering THEN
        RETURN;
    END IF;
    IF p_ordering IS NOT NULL THEN
        SELECT count(*) INTO v_queued FROM ihub.delivery d
        WHERE d.endpoint_id = p_endpoint_id AND d.state IN ('pending', 'retry', 'running');
        IF v_queued > 0 THEN
            RAISE EXCEPTION 'endpoint "%" has % deliveries queued or in flight, queued without this order', v_endpoint.name, v_queued
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Set the ordering when nothing is queued for it (ihub.deliveries), or create an ordered endpoint and subscribe to that.';
        END IF;
        IF p_ordering = 'key' THEN
            PERFORM ihub._ordering_columns(s) FROM ihub.subscription s WHERE s.endpoint_id = p_endpoint_id;
        END IF;
    END IF;
    -- Switched on, nothing is queued (checked above, and queueing waits
    -- for this transaction); switched off, nothing holds a key any more.
    UPDATE ihub.delivery d SET ordering_key = NULL
    WHERE d.endpoint_id = p_endpoint_id AND d.ordering_key IS NOT NULL
      AND d.state IN ('failed', 'dead', 'pending', 'retry', 'running')
      AND (p_ordering IS NULL OR d.state IN ('failed', 'dead'));
    UPDATE ihub.endpoint SET ordering = p_ordering WHERE id = p_endpoint_id;
END
$$;

-- Ends a delivery without sending it: a dead or failed one that holds its
-- key, or one still waiting (pending or retrying). The next of its key may
-- go. A response handler gets nothing for it, so skipping a request with
-- one is for members of the role that made it (as a replay is), and who
-- skipped is kept in last_error.
CREATE FUNCTION ihub._skip_by(delivery_id bigint, p_caller regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.delivery;
BEGIN
    SELECT * INTO v FROM ihub.delivery d WHERE d.id = _skip_by.delivery_id FOR UPDATE;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'delivery % does not exist', delivery_id
            USING ERRCODE = 'undefined_object', HINT = 'List deliveries in ihub.deliveries.';
    ELSIF v.state NOT IN ('dead', 'failed', 'pending', 'retry') THEN
        RAISE EXCEPTION 'delivery % is %; only dead, failed, pending or retrying deliveries can be skipped', delivery_id, v.state
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE WHEN v.state = 'running' THEN 'It is being sent; skip it if its attempt fails.'
                              ELSE 'It has ended already.' END;
    END IF;
    IF v.on_response IS NOT NULL THEN
        PERFORM ihub._require_may_act_for(p_caller, v.requested_by, format('delivery %s, whose response handler', v.id));
    END IF;
    UPDATE ihub.delivery d
    SET state = 'skipped', finished_at = now(), worker_pid = NULL, lease_until = NULL,
        last_error = format('skipped by %s', p_caller::text) || coalesce(' after: ' || d.last_error, '')
    WHERE d.id = v.id;
    PERFORM ihub.log('info', format('delivery %s skipped by %s (it was %s)', v.id, p_caller::text, v.state),
                     jsonb_build_object('delivery', v.id, 'endpoint_id', v.endpoint_id));
    PERFORM ihub._wake();
END
$$;

-- A C entry point (src/caller.rs): who skips cannot be forged.
CREATE FUNCTION ihub.skip(delivery_id bigint) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ihub_for_caller';

-------------------------------------------------------------------------------
-- Event types
-------------------------------------------------------------------------------

-- An event type: a name such as order.paid (letters, digits, _ . : -), or,
-- for an endpoint's filter, a prefix ending in * (order.*, or * for all).
CREATE FUNCTION ihub._check_event_type(p_type text, p_pattern boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_type IS NULL AND NOT p_pattern THEN
        RETURN;
    END IF;
    IF p_type IS NULL OR NOT (p_type ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'
                              OR (p_pattern AND p_type ~ '^([A-Za-z0-9][A-Za-z0-9_.:-]{0,98})?\*$')) THEN
        RAISE EXCEPTION 'invalid event type %', coalesce(quote_literal(p_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN p_pattern
                              THEN 'Use names such as order.paid, or a prefix ending in *, e.g. ''{orders.insert,invoice.*}''.'
                              ELSE 'Use a name of letters, digits and _ . : -, e.g. order.paid (at most 100 characters).' END;
    END IF;
END
$$;

-- Whether an endpoint's event types (NULL: all) accept a type.
CREATE FUNCTION ihub._type_accepted(p_accepted text[], p_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_accepted IS NULL
        OR EXISTS (SELECT 1 FROM unnest(p_accepted) a
                   WHERE a = p_type OR (right(a, 1) = '*' AND left(p_type, length(a) - 1) = left(a, -1)))
$$;

-- Changes how an endpoint is delivered to: its timeout, retry policy,
-- circuit breaker, limits, the event types it accepts and its ordering
-- (see ihub._change_ordering). NULL leaves a
-- setting as it is; a limit of 0 removes it, and so does '{}' the event
-- types filter. Not where requests go
-- or what they carry (URL, method, headers, credentials): whoever may call
-- this could otherwise send another integration's payloads and credentials
-- to a host of their own. A circuit policy (true, false or an object, see
-- ihub.create_endpoint) also closes the circuit and starts its counts afresh.
CREATE FUNCTION ihub.alter_endpoint(
    name text,
    timeout_ms integer DEFAULT NULL,
    retry jsonb DEFAULT NULL,
    circuit jsonb DEFAULT NULL,
    rate_limit double precision DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    ordering text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint ihub.endpoint := ihub._endpoint(alter_endpoint.name);
    v_circuit ihub.endpoint_state;
    v_ordering text := ihub._check_ordering(alter_endpoint.ordering);
BEGIN
    IF alter_endpoint.timeout_ms IS NOT NULL AND alter_endpoint.timeout_ms NOT BETWEEN 1 AND 300000 THEN
        RAISE EXCEPTION 'timeout_ms must be between 1 and 300000, got %', alter_endpoint.timeout_ms
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave it NULL to keep the endpoint''s timeout.';
    END IF;
    PERFORM ihub._check_limits(alter_endpoint.rate_limit, alter_endpoint.max_in_flight);
    PERFORM ihub._check_event_type(t, true) FROM unnest(alter_endpoint.event_types) t;
    IF alter_endpoint.ordering IS NOT NULL THEN
        PERFORM ihub._change_ordering(v_endpoint.id, v_ordering);
    END IF;
    UPDATE ihub.endpoint e
    SET timeout_ms = coalesce(alter_endpoint.timeout_ms, e.timeout_ms),
        event_types = CASE WHEN alter_endpoint.event_types IS NULL THEN e.event_types
                           ELSE nullif(alter_endpoint.event_types, '{}') END,
        rate_limit = CASE WHEN alter_endpoint.rate_limit IS NULL THEN e.rate_limit ELSE nullif(alter_endpoint.rate_limit, 0) END,
        max_in_flight = CASE WHEN alter_endpoint.max_in_flight IS NULL THEN e.max_in_flight
                             ELSE nullif(alter_endpoint.max_in_flight, 0) END,
        retry = CASE WHEN alter_endpoint.retry IS NULL THEN e.retry ELSE ihub._normalize_retry(alter_endpoint.retry) END,
        circuit = CASE WHEN alter_endpoint.circuit IS NULL THEN e.circuit ELSE ihub._normalize_circuit(alter_endpoint.circuit) END
    WHERE e.id = v_endpoint.id;
    IF coalesce(alter_endpoint.rate_limit, 0) > 0 OR coalesce(alter_endpoint.max_in_flight, 0) > 0 THEN
        PERFORM ihub._endpoint_state_for(v_endpoint.id);
    END IF;
    IF alter_endpoint.circuit IS NOT NULL THEN
        SELECT * INTO v_circuit FROM ihub.endpoint_state WHERE endpoint_id = v_endpoint.id FOR UPDATE;
        IF FOUND THEN
            UPDATE ihub.endpoint_state
            SET state = 'closed', failures = 0, window_start = NULL, window_attempts = 0, window_failures = 0,
                opened_at = NULL, retry_at = NULL, probe_until = NULL,
                changes = CASE WHEN v_circuit.state = 'closed' THEN changes
                               ELSE ihub._circuit_changed(v_endpoint.id, changes, v_circuit.state, 'closed',
                                                          'closed by ihub.alter_endpoint') END
            WHERE endpoint_id = v_endpoint.id;
        END IF;
    END IF;
    PERFORM ihub._wake();
END
$$;

COMMENT ON FUNCTION ihub._endpoint_turn(bigint, boolean) IS
    'Internal: takes an ordered endpoint''s turn for routes, claims and requests until commit (an advisory lock); false when taken and not waiting.';
COMMENT ON FUNCTION ihub._endpoint_state_locked(bigint) IS
    'Internal: the state row of an endpoint with limits, locked until commit, or NULLs when another transaction holds it.';
COMMENT ON FUNCTION ihub._endpoint_state_for(bigint) IS 'Internal: makes an endpoint''s state row if it has none.';
COMMENT ON FUNCTION ihub._check_limits(double precision, integer) IS 'Internal: checks an endpoint''s rate_limit and max_in_flight.';
COMMENT ON FUNCTION ihub._claim_limited(integer, integer, integer, integer) IS
    'Internal (dispatcher): claims due deliveries of rate-limited, in-flight-limited or ordered endpoints within their limits, the first of each key for ordered ones.';
COMMENT ON FUNCTION ihub._pause_rate_limited(jsonb) IS
    'Internal (dispatcher): a 429 holds every delivery to its endpoint until that delivery''s retry.';
COMMENT ON FUNCTION ihub._circuit_changed(bigint, jsonb, text, text, text) IS
    'Internal: records a circuit''s change of state (history, NOTIFY ihub_circuit, log entry).';
COMMENT ON FUNCTION ihub._circuit_settle(jsonb) IS
    'Internal (dispatcher): counts a settled batch''s outcomes per endpoint, opens and closes circuits, disables endpoints failing for ihub.endpoint_disable_after.';
COMMENT ON FUNCTION ihub._circuit_probes(integer, integer, integer) IS
    'Internal (dispatcher): claims one probe delivery for each open circuit whose cooldown is over.';
COMMENT ON FUNCTION ihub.alter_endpoint(text, integer, jsonb, jsonb, double precision, integer, text[], text) IS
    'Changes an endpoint''s timeout, retry policy, circuit breaker, rate limit, in-flight limit, accepted event types or ordering; NULL keeps a setting, 0 (or ''{}'', or ''none'') removes a limit. A circuit policy also closes the circuit.';
COMMENT ON FUNCTION ihub._check_ordering(text) IS 'Internal: checks an endpoint''s ordering (key, endpoint or none).';
COMMENT ON FUNCTION ihub._ordering_key_of(text, text) IS 'Internal: the ordering key of a delivery that is not a row change.';
COMMENT ON FUNCTION ihub._ordering_columns(ihub.subscription) IS 'Internal: the columns that make a subscription''s ordering key (given, or the primary key).';
COMMENT ON FUNCTION ihub._change_ordering(bigint, text) IS 'Internal: sets an endpoint''s ordering (only when nothing is queued for it, to switch it on).';
COMMENT ON FUNCTION ihub._skip_by(bigint, regrole) IS
    'Internal: ihub.skip for the role passed last, the caller its LANGUAGE c entry point saw (src/caller.rs).';
COMMENT ON FUNCTION ihub.skip(bigint) IS
    'Ends a dead, failed, pending or retrying delivery without sending it, so that the next of its ordering key may go.';
COMMENT ON FUNCTION ihub._check_event_type(text, boolean) IS 'Internal: checks an event type name, or a filter pattern (a prefix ending in *).';
COMMENT ON FUNCTION ihub._type_accepted(text[], text) IS 'Internal: whether an endpoint''s event types (NULL: all) accept a type.';
