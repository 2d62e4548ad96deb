-- pg_ihub statistics and health.

-- Upper bounds (ms) of the latency histogram buckets; the last bucket holds
-- everything slower.
CREATE FUNCTION ihub._latency_bounds() RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{1,2,5,10,20,50,100,200,500,1000,2000,5000,10000,30000,60000}'::double precision[] $$;

CREATE AGGREGATE ihub._histogram_sum(bigint[]) (sfunc = ihub._histogram_add, stype = bigint[], combinefunc = ihub._histogram_add, parallel = safe);

-- A percentile from a histogram, interpolated within its bucket.
CREATE FUNCTION ihub._percentile(p_histogram bigint[], p_fraction double precision) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v_bounds double precision[] := ihub._latency_bounds();
    v_total bigint := (SELECT sum(x) FROM unnest(p_histogram) x);
    v_seen bigint := 0;
    v_lower double precision := 0;
    v_upper double precision;
BEGIN
    IF coalesce(v_total, 0) = 0 THEN
        RETURN NULL;
    END IF;
    FOR i IN 1 .. cardinality(p_histogram) LOOP
        v_upper := coalesce(v_bounds[i], v_bounds[cardinality(v_bounds)] * 2);
        IF v_seen + p_histogram[i] >= p_fraction * v_total THEN
            RETURN v_lower + (v_upper - v_lower) * ((p_fraction * v_total - v_seen) / greatest(p_histogram[i], 1));
        END IF;
        v_seen := v_seen + p_histogram[i];
        v_lower := v_upper;
    END LOOP;
    RETURN v_lower;
END
$$;

CREATE FUNCTION ihub.endpoint_stats(since timestamptz DEFAULT now() - interval '1 day')
RETURNS TABLE (endpoint text, integration text, deliveries bigint, delivered bigint, success_rate numeric,
               p50_ms double precision, p95_ms double precision, retries bigint, failed bigint, dead bigint,
               last_error text, last_error_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.name, i.name,
           sum(h.delivered + h.failed + h.dead)::bigint, sum(h.delivered)::bigint,
           round(100.0 * sum(h.delivered) / nullif(sum(h.delivered + h.failed + h.dead), 0), 2),
           ihub._percentile(ihub._histogram_sum(h.latency), 0.5),
           ihub._percentile(ihub._histogram_sum(h.latency), 0.95),
           sum(h.retried)::bigint, sum(h.failed)::bigint, sum(h.dead)::bigint,
           (array_agg(h.last_error ORDER BY h.last_error_at DESC NULLS LAST))[1],
           max(h.last_error_at)
    FROM ihub.endpoint_hourly h
    JOIN ihub.endpoint e ON e.id = h.endpoint_id
    JOIN ihub.integration i ON i.id = e.integration_id
    WHERE h.hour >= date_trunc('hour', since)
    GROUP BY e.name, i.name
    ORDER BY e.name
$$;

CREATE FUNCTION ihub.daily_stats(days integer DEFAULT 14)
RETURNS TABLE (day date, endpoint text, attempts bigint, delivered bigint, failures bigint, dead bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (h.hour AT TIME ZONE 'UTC')::date, e.name, sum(h.attempts)::bigint, sum(h.delivered)::bigint,
           sum(h.attempts - h.delivered)::bigint, sum(h.dead)::bigint
    FROM ihub.endpoint_hourly h JOIN ihub.endpoint e ON e.id = h.endpoint_id
    WHERE h.hour >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - make_interval(days => greatest(days, 1) - 1)
    GROUP BY 1, 2
    ORDER BY 1, 2
$$;

-- Counts by state and the age of the oldest item waiting, per queue. The
-- waiting states are counted through their partial indexes; delivered
-- deliveries over the last 24 hours come from the rolled-up counters.
CREATE FUNCTION ihub.queue_stats()
RETURNS TABLE (queue text, state text, items bigint, oldest_age interval)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- One literal state per branch: a join on the state would scan the
    -- whole delivery history instead of the partial indexes.
    RETURN QUERY
    SELECT 'deliveries', 'pending', count(*), now() - min(d.created_at) FROM ihub.delivery d WHERE d.state = 'pending'
    UNION ALL
    SELECT 'deliveries', 'running', count(*), now() - min(d.created_at) FROM ihub.delivery d WHERE d.state = 'running'
    UNION ALL
    SELECT 'deliveries', 'retry', count(*), now() - min(d.created_at) FROM ihub.delivery d WHERE d.state = 'retry'
    UNION ALL
    SELECT 'deliveries', 'failed', count(*), now() - min(d.created_at) FROM ihub.delivery d WHERE d.state = 'failed'
    UNION ALL
    SELECT 'deliveries', 'dead', count(*), now() - min(d.created_at) FROM ihub.delivery d WHERE d.state = 'dead';
    RETURN QUERY
    SELECT 'deliveries', 'delivered (24 h)', coalesce(sum(h.delivered), 0)::bigint, NULL::interval
    FROM ihub.endpoint_hourly h WHERE h.hour >= now() - interval '24 hours';
    RETURN QUERY
    SELECT 'jobs', s.state, count(j.id), now() - min(j.created_at)
    FROM unnest(ARRAY['pending', 'running', 'retry', 'done', 'partial', 'failed', 'cancelled']) AS s(state)
    LEFT JOIN ihub.job j ON j.state = s.state
    GROUP BY s.state;
    RETURN QUERY SELECT * FROM ihub._inbound_queue_stats();
END
$$;

CREATE FUNCTION ihub.health()
RETURNS TABLE (check_name text, status text, message text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind record;
    v_alive bigint;
    v_stale bigint;
    v_age interval := ihub._health_queue_age();
    v_depth bigint := ihub._health_queue_depth();
    v_q record;
    v_names text;
BEGIN
    IF NOT ihub._preloaded() THEN
        RETURN QUERY SELECT 'workers', 'critical',
            'pg_ihub is not in shared_preload_libraries: no background worker runs';
    ELSE
        FOR v_kind IN SELECT * FROM ihub._expected_workers() LOOP
            SELECT count(*) FILTER (WHERE ihub._pid_alive(w.pid)),
                   count(*) FILTER (WHERE ihub._pid_alive(w.pid) AND w.last_heartbeat < now() - v_kind.stale_after)
            INTO v_alive, v_stale
            FROM ihub._workers() w
            WHERE w.kind = v_kind.kind AND w.database_oid = (SELECT oid FROM pg_database WHERE datname = current_database());
            check_name := 'workers: ' || v_kind.kind;
            IF v_alive < v_kind.expected THEN
                status := 'critical';
                message := format('%s of %s running', v_alive, v_kind.expected);
            ELSIF v_stale > 0 THEN
                status := 'warning';
                message := format('%s of %s running, %s silent for over %s', v_alive, v_kind.expected, v_stale, v_kind.stale_after);
            ELSE
                status := 'ok';
                message := format('%s of %s running', v_alive, v_kind.expected);
            END IF;
            RETURN NEXT;
        END LOOP;
    END IF;

    FOR v_q IN
        SELECT 'deliveries' AS queue, count(*) AS depth, now() - min(run_at) AS age
        FROM ihub.delivery WHERE state IN ('pending', 'retry') AND run_at <= now()
        UNION ALL
        SELECT 'jobs', count(*), now() - min(run_at)
        FROM ihub.job WHERE state IN ('pending', 'retry') AND run_at <= now()
    LOOP
        check_name := 'queue: ' || v_q.queue;
        status := CASE WHEN v_q.depth >= v_depth * 10 OR v_q.age >= v_age * 4 THEN 'critical'
                       WHEN v_q.depth >= v_depth OR v_q.age >= v_age THEN 'warning'
                       ELSE 'ok' END;
        message := format('%s due, oldest waiting %s', v_q.depth, coalesce(date_trunc('second', v_q.age)::text, '-'));
        RETURN NEXT;
    END LOOP;

    SELECT string_agg(format('%s (%s)', id, broken_reason), '; ' ORDER BY id) INTO v_names
    FROM ihub.subscription WHERE broken_at IS NOT NULL;
    check_name := 'subscriptions';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'critical' END;
    message := coalesce('broken: ' || v_names, 'all capturing');
    RETURN NEXT;

    -- Endpoints sent nothing: disabled, an open circuit, paused by a 429,
    -- or keys of an ordered one held.
    SELECT nullif(concat_ws('; ',
               'disabled: ' || (SELECT string_agg(e.name, ', ' ORDER BY e.name) FROM ihub.endpoint e WHERE NOT e.enabled),
               'circuit open: ' || (SELECT string_agg(e.name, ', ' ORDER BY e.name)
                                    FROM ihub.endpoint e JOIN ihub.endpoint_state c ON c.endpoint_id = e.id
                                    WHERE e.enabled AND c.state <> 'closed'),
               'paused by a 429: ' || (SELECT string_agg(e.name, ', ' ORDER BY e.name)
                                       FROM ihub.endpoint e JOIN ihub.endpoint_state c ON c.endpoint_id = e.id
                                       WHERE e.enabled AND c.paused_until > now()),
               -- Ordered endpoints whose keys a failed or dead delivery holds.
               'keys held by failed or dead deliveries: ' || (
                   SELECT string_agg(format('%s (%s)', e.name, e.blocked_keys), ', ' ORDER BY e.name)
                   FROM ihub.endpoints e WHERE e.blocked_keys > 0)), '')
    INTO v_names;
    check_name := 'endpoints';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'warning' END;
    message := coalesce(v_names, 'all enabled, no circuit open');
    RETURN NEXT;

    SELECT string_agg(name, ', ' ORDER BY name) INTO v_names
    FROM ihub.schedule WHERE active AND next_run_at < now() - interval '1 minute';
    check_name := 'schedules';
    status := CASE WHEN v_names IS NULL THEN 'ok' ELSE 'warning' END;
    message := coalesce('late: ' || v_names, 'on time');
    RETURN NEXT;

    SELECT string_agg(e.name, ', ' ORDER BY e.name) INTO v_names FROM ihub.endpoint e
    WHERE NOT EXISTS (SELECT 1 FROM ihub.endpoint_secret s
                      WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now() + interval '1 day'));
    check_name := 'credentials';
    status := CASE WHEN v_names IS NULL THEN 'ok'
                   WHEN EXISTS (SELECT 1 FROM ihub.endpoint e WHERE NOT EXISTS (
                       SELECT 1 FROM ihub.endpoint_secret s WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now())))
                   THEN 'critical' ELSE 'warning' END;
    message := coalesce('no signing secret valid for another day: ' || v_names, 'every endpoint has a valid signing secret');
    RETURN NEXT;

    -- OAuth2 access tokens: expired or missing while asking for a new one
    -- fails is critical; failing while the token still works, or waiting
    -- for a person to authorize, a warning.
    SELECT string_agg(format('%s/%s (%s)', i.name, o.name,
                             CASE WHEN o.failures > 0 THEN 'could not be refreshed: ' || coalesce(o.last_error, '?')
                                  WHEN s.access_token IS NULL THEN 'not authorized yet'
                                  ELSE 'expired' END), '; ' ORDER BY i.name, o.name),
           max(CASE WHEN o.failures > 0 AND (s.access_token IS NULL OR o.expires_at <= now()) THEN 2
                    WHEN o.expires_at <= now() AND o.refresh_at IS NULL THEN 2
                    ELSE 1 END)
    INTO v_names, v_alive
    FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id JOIN ihub.integration i ON i.id = o.integration_id
    WHERE o.failures > 0 OR (s.access_token IS NULL AND o.refresh_at IS NULL) OR o.expires_at <= now() - interval '1 minute';
    check_name := 'oauth2';
    status := CASE WHEN v_names IS NULL THEN 'ok' WHEN v_alive = 2 THEN 'critical' ELSE 'warning' END;
    message := coalesce(v_names, 'every OAuth2 access token is valid or being renewed');
    RETURN NEXT;
END
$$;

COMMENT ON FUNCTION ihub._latency_bounds() IS 'Internal: latency histogram bucket bounds in ms.';
COMMENT ON AGGREGATE ihub._histogram_sum(bigint[]) IS 'Internal: element-wise sum of latency histograms.';
COMMENT ON FUNCTION ihub._percentile(bigint[], double precision) IS 'Internal: a percentile from a latency histogram.';
COMMENT ON FUNCTION ihub.endpoint_stats(timestamptz) IS
    'Per endpoint since a time: deliveries, success rate, p50/p95 attempt latency (from hourly histograms), retries, failed, dead, last error.';
COMMENT ON FUNCTION ihub.daily_stats(integer) IS 'Per day (UTC) and endpoint: attempts, delivered, failures, dead.';
COMMENT ON FUNCTION ihub.queue_stats() IS 'Counts by state and oldest age for deliveries, jobs and inbound items.';
COMMENT ON FUNCTION ihub.health() IS
    'One row per check (workers, queues, endpoints, schedules, credentials, OAuth2 tokens) with status ok, warning or critical and a message.';
