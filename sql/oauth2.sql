-- pg_ihub OAuth2: credentials of an integration (Zoho's OAuth2 instances)
-- that endpoints send as bearer tokens (auth => '{"type": "oauth2",
-- "credential": "<name>"}'). The maintenance worker asks the token endpoint
-- for a new access token before the current one expires, keeps a rotated
-- refresh token, and asks again at once when a receiver answers 401 to a
-- token (src/sync/oauth2.rs). The authorization-code flow: a person opens
-- ihub.oauth2_authorize_url(...), the provider sends them back to the
-- listener's /oauth2/callback/<integration>/<name>, which checks the state
-- and exchanges the code (src/inbound/listener.rs).
--
-- Secrets (client secret, refresh and access tokens) live in
-- ihub.oauth2_secret, which only ihub_admin reads (ihub.oauth2_secrets);
-- ihub.oauth2_credentials shows everything else. Comments on Rust helpers
-- and privileges are in finalize.sql.

CREATE TABLE ihub.oauth2 (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration_id bigint NOT NULL REFERENCES ihub.integration (id),
    name           text NOT NULL,
    grant_type     text NOT NULL CHECK (grant_type IN ('refresh_token', 'client_credentials')),
    token_url      text NOT NULL,
    -- Where a person authorizes the client (the authorization-code flow).
    authorize_url  text,
    client_id      text NOT NULL CHECK (client_id <> ''),
    scope          text,
    client_auth    text NOT NULL DEFAULT 'post' CHECK (client_auth IN ('post', 'basic')),
    -- When the access token expires, if the provider said.
    expires_at     timestamptz,
    -- When the maintenance worker asks for a new access token next. NULL:
    -- nothing to ask with yet (no refresh token), or no expiry to beat.
    refresh_at     timestamptz,
    refreshed_at   timestamptz,
    -- Counts access tokens: a 401 asks for a new one only when it answered
    -- the current one, so that many 401s to one token make one refresh.
    token_version  integer NOT NULL DEFAULT 0,
    -- When a receiver answered 401 to a new token too: for 10 minutes after,
    -- 401s ask for no new token (ihub._settle).
    refused_at     timestamptz,
    -- Failed token requests in a row, and the last one's error.
    failures       integer NOT NULL DEFAULT 0,
    last_error     text,
    last_error_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT oauth2_name UNIQUE (integration_id, name)
);
CREATE INDEX oauth2_refresh_idx ON ihub.oauth2 (refresh_at) WHERE refresh_at IS NOT NULL;
COMMENT ON TABLE ihub.oauth2 IS
    'OAuth2 credentials of integrations: token endpoint, client, grant and the state of the access token. Secrets are in ihub.oauth2_secret.';

CREATE TABLE ihub.oauth2_secret (
    oauth2_id        bigint PRIMARY KEY REFERENCES ihub.oauth2 (id) ON DELETE CASCADE,
    client_secret    text NOT NULL,
    refresh_token    text,
    access_token     text,
    -- An authorization under way (ihub.oauth2_authorize_url): the SHA-256
    -- of its state, until when it may come back, and the redirect URI the
    -- code must be exchanged with.
    state_hash       bytea,
    state_expires_at timestamptz,
    redirect_uri     text
);
COMMENT ON TABLE ihub.oauth2_secret IS
    'Secrets of OAuth2 credentials: client secret, refresh and access tokens, the state of an authorization under way. ihub_admin only.';

SELECT pg_catalog.pg_extension_config_dump('ihub.oauth2', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.oauth2_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ihub.oauth2_secret', '');

-------------------------------------------------------------------------------
-- Configuring
-------------------------------------------------------------------------------

CREATE FUNCTION ihub._oauth2(p_integration text, p_name text) RETURNS ihub.oauth2
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2;
BEGIN
    SELECT * INTO v FROM ihub.oauth2 o
    WHERE o.integration_id = ihub._integration_id(p_integration) AND o.name = p_name;
    IF v.id IS NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" of integration "%" does not exist', p_name, p_integration
            USING ERRCODE = 'undefined_object', HINT = 'List them in ihub.oauth2_credentials; create one with ihub.create_oauth2.';
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION ihub.create_oauth2(
    integration text,
    name text,
    token_url text,
    client_id text,
    client_secret text,
    refresh_token text DEFAULT NULL,
    scope text DEFAULT NULL,
    "grant" text DEFAULT 'refresh_token',
    authorize_url text DEFAULT NULL,
    client_auth text DEFAULT 'post'
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_integration bigint := ihub._integration_id(create_oauth2.integration);
    v_id bigint;
BEGIN
    PERFORM ihub._check_name('OAuth2 credential', create_oauth2.name);
    IF EXISTS (SELECT 1 FROM ihub.oauth2 o WHERE o.integration_id = v_integration AND o.name = create_oauth2.name) THEN
        RAISE EXCEPTION 'OAuth2 credential "%" of integration "%" already exists', create_oauth2.name, create_oauth2.integration
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or ihub.drop_oauth2 it first.';
    END IF;
    IF create_oauth2."grant" IS NULL OR create_oauth2."grant" NOT IN ('refresh_token', 'client_credentials') THEN
        RAISE EXCEPTION 'unsupported OAuth2 grant "%"', create_oauth2."grant"
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use ''refresh_token'' (with a refresh token, or authorized by a person through ihub.oauth2_authorize_url) or ''client_credentials''.';
    END IF;
    IF create_oauth2.client_auth IS NULL OR create_oauth2.client_auth NOT IN ('post', 'basic') THEN
        RAISE EXCEPTION 'unsupported client authentication "%"', create_oauth2.client_auth
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '''post'' sends client_id and client_secret in the form, ''basic'' as HTTP Basic credentials.';
    END IF;
    IF coalesce(create_oauth2.client_id, '') = '' OR coalesce(create_oauth2.client_secret, '') = '' THEN
        RAISE EXCEPTION 'client_id and client_secret must not be empty'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'They are what the provider issued when the client was registered.';
    END IF;
    IF create_oauth2.refresh_token = '' THEN
        RAISE EXCEPTION 'refresh_token must not be empty' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass NULL to have a person authorize the client through ihub.oauth2_authorize_url.';
    END IF;
    IF create_oauth2."grant" = 'client_credentials' AND create_oauth2.refresh_token IS NOT NULL THEN
        RAISE EXCEPTION 'the client_credentials grant takes no refresh token' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Leave refresh_token out, or use the refresh_token grant.';
    END IF;
    IF create_oauth2.authorize_url IS NOT NULL AND create_oauth2.authorize_url !~ '^https?://[^[:space:]]+$' THEN
        RAISE EXCEPTION 'authorize_url must be an http or https URL' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The provider''s authorization endpoint, e.g. https://accounts.example.com/oauth/v2/auth.';
    END IF;

    INSERT INTO ihub.oauth2 (integration_id, name, grant_type, token_url, authorize_url, client_id, scope, client_auth,
                             refresh_at)
    VALUES (v_integration, create_oauth2.name, create_oauth2."grant", ihub._check_url(create_oauth2.token_url),
            create_oauth2.authorize_url, create_oauth2.client_id, nullif(create_oauth2.scope, ''), create_oauth2.client_auth,
            -- Something to ask with: the first access token at once.
            CASE WHEN create_oauth2."grant" = 'client_credentials' OR create_oauth2.refresh_token IS NOT NULL THEN now() END)
    RETURNING id INTO v_id;
    INSERT INTO ihub.oauth2_secret (oauth2_id, client_secret, refresh_token)
    VALUES (v_id, create_oauth2.client_secret, create_oauth2.refresh_token);
    PERFORM ihub._wake_maintenance();
    RETURN v_id;
END
$$;

CREATE FUNCTION ihub.drop_oauth2(integration text, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2 := ihub._oauth2(drop_oauth2.integration, drop_oauth2.name);
    v_users text;
BEGIN
    SELECT string_agg(e.name, ', ' ORDER BY e.name) INTO v_users
    FROM ihub.endpoint e JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
    WHERE e.integration_id = v.integration_id AND c.auth ->> 'type' = 'oauth2' AND c.auth ->> 'credential' = v.name;
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" is used by endpoint(s) %', v.name, v_users
            USING ERRCODE = 'dependent_objects_still_exist', HINT = 'Delete those endpoints (or their integration) first.';
    END IF;
    DELETE FROM ihub.oauth2 WHERE id = v.id;
END
$$;

-- Asks the maintenance worker for a new access token now.
CREATE FUNCTION ihub.refresh_oauth2(integration text, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2 := ihub._oauth2(refresh_oauth2.integration, refresh_oauth2.name);
BEGIN
    IF v.grant_type = 'refresh_token' AND (SELECT s.refresh_token FROM ihub.oauth2_secret s WHERE s.oauth2_id = v.id) IS NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" has no refresh token yet', v.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('A person authorizes it first: SELECT ihub.oauth2_authorize_url(%L, %L, ''https://<this listener>'');',
                                refresh_oauth2.integration, v.name);
    END IF;
    UPDATE ihub.oauth2 SET refresh_at = now() WHERE id = v.id;
    PERFORM ihub._wake_maintenance();
END
$$;

-- How long an authorization URL may take to come back to the callback.
CREATE FUNCTION ihub._oauth2_state_lifetime() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '10 minutes' $$;

-- The URL a person opens to authorize the client; the provider then sends
-- them to <redirect_base>/oauth2/callback/<integration>/<name>, which the
-- listener serves. A new URL replaces the one before (its state no longer
-- passes); it must come back within ihub._oauth2_state_lifetime().
CREATE FUNCTION ihub.oauth2_authorize_url(integration text, name text, redirect_base text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2 := ihub._oauth2(oauth2_authorize_url.integration, oauth2_authorize_url.name);
    v_state text := ihub._oauth2_new_state();
    v_redirect text;
    v_integration text := (SELECT i.name FROM ihub.integration i WHERE i.id = v.integration_id);
BEGIN
    IF v.authorize_url IS NULL THEN
        RAISE EXCEPTION 'OAuth2 credential "%" has no authorize_url', v.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Create it with authorize_url => ''<the provider''''s authorization endpoint>'', or pass a refresh token.';
    END IF;
    IF v.grant_type <> 'refresh_token' THEN
        RAISE EXCEPTION 'OAuth2 credential "%" uses the % grant, which no person authorizes', v.name, v.grant_type
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'The authorization-code flow is for the refresh_token grant.';
    END IF;
    IF redirect_base IS NULL OR redirect_base !~ '^https?://[^/?#[:space:]]+(/[^?#[:space:]]*)?$' THEN
        RAISE EXCEPTION 'redirect_base must be the listener''s public http or https address, without query'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ''https://hooks.example.com''; the callback path /oauth2/callback/<integration>/<name> is added.';
    END IF;
    v_redirect := rtrim(redirect_base, '/') || '/oauth2/callback/' || v_integration || '/' || v.name;
    UPDATE ihub.oauth2_secret
    SET state_hash = sha256(convert_to(v_state, 'UTF8')), state_expires_at = now() + ihub._oauth2_state_lifetime(),
        redirect_uri = v_redirect
    WHERE oauth2_id = v.id;
    RETURN ihub._oauth2_authorize_link(v.authorize_url, v.client_id, v_redirect, v.scope, v_state);
END
$$;

-------------------------------------------------------------------------------
-- The maintenance worker and the listener
-------------------------------------------------------------------------------

-- Credentials due for a token request, with what asking needs. Each gets
-- a minute's lease (refresh_at moves on): a worker that dies meanwhile
-- leaves it to be asked for again then.
CREATE FUNCTION ihub._oauth2_due(p_limit integer)
RETURNS TABLE (id bigint, version integer, grant_type text, token_url text, client_id text, client_secret text,
               refresh_token text, scope text, client_auth text)
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    -- Nothing to ask with (a refresh_token grant whose code exchange gave no
    -- refresh token, or failed): not due until a person authorizes again.
    WITH nothing AS (
        UPDATE ihub.oauth2 o SET refresh_at = NULL
        FROM ihub.oauth2_secret s
        WHERE s.oauth2_id = o.id AND o.refresh_at <= now() AND o.grant_type = 'refresh_token' AND s.refresh_token IS NULL
    ), due AS (
        SELECT o.id FROM ihub.oauth2 o
        JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id
        WHERE o.refresh_at <= now() AND (o.grant_type = 'client_credentials' OR s.refresh_token IS NOT NULL)
        ORDER BY o.refresh_at
        LIMIT p_limit
        FOR UPDATE OF o SKIP LOCKED
    ), leased AS (
        UPDATE ihub.oauth2 o SET refresh_at = now() + interval '1 minute'
        FROM due WHERE o.id = due.id
        RETURNING o.*
    )
    SELECT l.id, l.token_version, l.grant_type, l.token_url, l.client_id, s.client_secret, s.refresh_token, l.scope,
           l.client_auth
    FROM leased l JOIN ihub.oauth2_secret s ON s.oauth2_id = l.id
$$;

-- Seconds until the next credential is due, NULL when none is.
CREATE FUNCTION ihub._oauth2_next_due() RETURNS double precision
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT extract(epoch FROM min(refresh_at) - now())::double precision FROM ihub.oauth2 WHERE refresh_at IS NOT NULL $$;

-- Stores what a token endpoint issued: p_tokens has access_token,
-- expires_in (NULL: no expiry given), refresh_token (NULL: keep the one we
-- have) and refresh_in (seconds until the next refresh, NULL: none).
-- Deliveries waiting for a token of this credential (answered 401, or not
-- sent for want of one) are due at once.
CREATE FUNCTION ihub._oauth2_store(p_id bigint, p_tokens jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
DECLARE
    v ihub.oauth2;
BEGIN
    UPDATE ihub.oauth2_secret
    SET access_token = p_tokens ->> 'access_token',
        refresh_token = coalesce(p_tokens ->> 'refresh_token', refresh_token)
    WHERE oauth2_id = p_id;
    UPDATE ihub.oauth2 o
    SET expires_at = now() + (p_tokens ->> 'expires_in')::double precision * interval '1 second',
        refresh_at = now() + (p_tokens ->> 'refresh_in')::double precision * interval '1 second',
        refreshed_at = now(), token_version = o.token_version + 1, failures = 0, last_error = NULL, last_error_at = NULL
    WHERE o.id = p_id
    RETURNING * INTO v;
    IF v.id IS NULL THEN
        RETURN; -- dropped meanwhile
    END IF;
    UPDATE ihub.delivery d SET run_at = now()
    WHERE d.state IN ('pending', 'retry') AND d.state = 'retry'
      AND (d.last_status = 401 OR d.last_error LIKE 'not sent: OAuth2 credential%')
      AND d.endpoint_id IN (SELECT e.id FROM ihub.endpoint e JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
                            WHERE e.integration_id = v.integration_id AND c.auth ->> 'type' = 'oauth2'
                              AND c.auth ->> 'credential' = v.name);
    IF FOUND THEN
        PERFORM ihub._wake();
    END IF;
END
$$;

-- A token request made with token version p_version failed (the message is
-- scrubbed of secrets already). The next is asked for after a back-off of
-- 5 s doubling up to 10 minutes; the first failure in a row is logged as an
-- error, and the health check reports the credential until a request
-- succeeds again. A token stored meanwhile (the version moved on) stands.
CREATE FUNCTION ihub._oauth2_failed(p_id bigint, p_version integer, p_error text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2;
BEGIN
    UPDATE ihub.oauth2 o
    SET failures = o.failures + 1, last_error = left(p_error, 1000), last_error_at = now(),
        refresh_at = now() + least(interval '10 minutes', interval '5 seconds' * power(2, least(o.failures, 10)))
    WHERE o.id = p_id AND o.token_version = p_version
    RETURNING * INTO v;
    IF v.failures = 1 THEN
        PERFORM ihub.log('error', format('OAuth2 credential %s could not get an access token (%s)', v.name, p_error),
                         jsonb_build_object('oauth2', v.name),
                         (SELECT i.name FROM ihub.integration i WHERE i.id = v.integration_id));
    END IF;
END
$$;

-- The listener's first step for /oauth2/callback/<integration>/<name>: the
-- state must be the one the last authorization URL carried, unexpired; it
-- is used up when it matches. Returns what exchanging the code needs (and
-- the token version now), or {"error": ..., "status": ...}.
CREATE FUNCTION ihub._oauth2_callback(p_integration text, p_name text, p_state text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v ihub.oauth2;
    v_secret ihub.oauth2_secret;
    v_problem text;
BEGIN
    SELECT o.* INTO v FROM ihub.oauth2 o JOIN ihub.integration i ON i.id = o.integration_id
    WHERE i.name = p_integration AND o.name = p_name;
    IF v.id IS NULL THEN
        RETURN jsonb_build_object('error', 'unknown OAuth2 credential', 'status', 404);
    END IF;
    SELECT * INTO v_secret FROM ihub.oauth2_secret s WHERE s.oauth2_id = v.id FOR UPDATE;
    IF v_secret.state_hash IS NULL THEN
        v_problem := 'no authorization is under way';
    ELSIF v_secret.state_expires_at < now() THEN
        v_problem := 'the authorization took too long: its state expired';
    ELSIF p_state IS NULL OR sha256(convert_to(p_state, 'UTF8')) <> v_secret.state_hash THEN
        v_problem := 'the state does not match the last authorization URL';
    END IF;
    -- A state that does not match changes nothing: anyone can send one, and
    -- must not be able to spoil an authorization under way (a real state,
    -- 256 random bits, cannot be guessed). An expired one is cleared.
    IF v_problem IS NOT NULL THEN
        IF v_secret.state_expires_at < now() THEN
            UPDATE ihub.oauth2_secret SET state_hash = NULL, state_expires_at = NULL WHERE oauth2_id = v.id;
            UPDATE ihub.oauth2 SET last_error = 'authorization refused: ' || v_problem, last_error_at = now() WHERE id = v.id;
        END IF;
        RETURN jsonb_build_object('error', v_problem, 'status', 400);
    END IF;
    UPDATE ihub.oauth2_secret SET state_hash = NULL, state_expires_at = NULL WHERE oauth2_id = v.id;
    RETURN jsonb_build_object('id', v.id, 'version', v.token_version, 'token_url', v.token_url, 'client_id', v.client_id,
                              'client_secret', v_secret.client_secret, 'scope', v.scope, 'client_auth', v.client_auth,
                              'redirect_uri', v_secret.redirect_uri);
END
$$;

-- The provider sent the person back with an error instead of a code
-- (they declined, say): recorded on the credential, the state used up.
CREATE FUNCTION ihub._oauth2_declined(p_integration text, p_name text, p_state text, p_error text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT o.id INTO v_id FROM ihub.oauth2 o JOIN ihub.integration i ON i.id = o.integration_id
    JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id
    WHERE i.name = p_integration AND o.name = p_name AND s.state_hash = sha256(convert_to(coalesce(p_state, ''), 'UTF8'));
    IF v_id IS NOT NULL THEN
        UPDATE ihub.oauth2_secret SET state_hash = NULL, state_expires_at = NULL WHERE oauth2_id = v_id;
        UPDATE ihub.oauth2 SET last_error = 'authorization refused by the provider: ' || left(p_error, 200), last_error_at = now()
        WHERE id = v_id;
    END IF;
END
$$;

-------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------

CREATE VIEW ihub.oauth2_credentials AS
SELECT o.id, i.name AS integration, o.name, o.grant_type, ihub._mask_url(o.token_url) AS token_url, o.authorize_url,
       o.client_id, '********'::text AS client_secret, o.scope, o.client_auth,
       CASE WHEN o.failures > 0 AND (o.expires_at IS NULL OR o.expires_at <= now()) THEN 'failing'
            WHEN o.failures > 0 THEN 'refresh failing'
            WHEN NOT o.has_access_token AND o.refresh_at IS NULL THEN 'not authorized'
            WHEN NOT o.has_access_token THEN 'waiting for a token'
            WHEN o.expires_at <= now() THEN 'expired'
            ELSE 'valid' END AS status,
       o.has_refresh_token, o.expires_at, o.refreshed_at, o.refresh_at, o.failures, o.last_error, o.last_error_at,
       (SELECT coalesce(array_agg(e.name ORDER BY e.name), '{}') FROM ihub.endpoint e
        JOIN ihub.endpoint_credential c ON c.endpoint_id = e.id
        WHERE e.integration_id = o.integration_id AND c.auth ->> 'type' = 'oauth2' AND c.auth ->> 'credential' = o.name) AS endpoints,
       o.created_at
FROM (SELECT o.*, s.access_token IS NOT NULL AS has_access_token, s.refresh_token IS NOT NULL AS has_refresh_token
      FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id) o
JOIN ihub.integration i ON i.id = o.integration_id;
COMMENT ON VIEW ihub.oauth2_credentials IS
    'OAuth2 credentials and the state of their access tokens (valid, expired, failing, not authorized...), secrets masked.';

CREATE VIEW ihub.oauth2_secrets AS
SELECT o.id, i.name AS integration, o.name, s.client_secret, s.refresh_token, s.access_token, o.expires_at
FROM ihub.oauth2 o JOIN ihub.oauth2_secret s ON s.oauth2_id = o.id JOIN ihub.integration i ON i.id = o.integration_id;
COMMENT ON VIEW ihub.oauth2_secrets IS 'Secrets of OAuth2 credentials: client secret, refresh and access tokens (ihub_admin only).';

COMMENT ON FUNCTION ihub._oauth2(text, text) IS 'Internal: an OAuth2 credential by integration and name, or an error with a hint.';
COMMENT ON FUNCTION ihub.create_oauth2(text, text, text, text, text, text, text, text, text, text) IS
    'Registers an OAuth2 credential (grant refresh_token or client_credentials) that endpoints of the integration use with auth {"type": "oauth2", "credential": name}. Returns its id.';
COMMENT ON FUNCTION ihub.drop_oauth2(text, text) IS 'Removes an OAuth2 credential no endpoint uses.';
COMMENT ON FUNCTION ihub.refresh_oauth2(text, text) IS 'Asks the maintenance worker for a new access token of the credential now.';
COMMENT ON FUNCTION ihub._oauth2_state_lifetime() IS 'Internal: how long an authorization URL may take to come back to the callback.';
COMMENT ON FUNCTION ihub.oauth2_authorize_url(text, text, text) IS
    'The URL a person opens to authorize the client (authorization-code flow); the provider sends them back to <redirect_base>/oauth2/callback/<integration>/<name> on the listener.';
COMMENT ON FUNCTION ihub._oauth2_due(integer) IS 'Internal: credentials due for a token request, leased for a minute (maintenance worker).';
COMMENT ON FUNCTION ihub._oauth2_next_due() IS 'Internal: seconds until the next credential is due for a token request.';
COMMENT ON FUNCTION ihub._oauth2_store(bigint, jsonb) IS
    'Internal: stores issued tokens and makes deliveries that waited for them due.';
COMMENT ON FUNCTION ihub._oauth2_failed(bigint, integer, text) IS 'Internal: records a failed token request and backs off.';
COMMENT ON FUNCTION ihub._oauth2_callback(text, text, text) IS
    'Internal: checks and uses up the state of an authorization callback; returns what exchanging its code needs.';
COMMENT ON FUNCTION ihub._oauth2_declined(text, text, text, text) IS
    'Internal: records an authorization the provider reports as refused.';
