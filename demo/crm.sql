-- pg_ihub demo, part two: a two-way sync of a contacts table with a CRM
-- (target/release/ihub-crm, which demo/run starts on :crm_port). Safe to
-- run again.
--
--   CRM -> here: a paginated pull (a scheduled action requests page 1, each
--                page's handler imports it and requests the next), then
--                the CRM's signed webhooks, upserted with no echo back;
--   here -> CRM: row changes, through a subscription, with an OAuth2 token;
--   both ways:   a status mapper and a country mapper (one value is left
--                for a person), and a custom field only the CRM gets.
\set ON_ERROR_STOP on
SELECT ihub.disable_integration(name) FROM ihub.integrations WHERE name IN ('crm', 'newsletter');
DELETE FROM ihub.inbound_item t USING ihub.inbound_source s, ihub.integration i
WHERE t.source_id = s.id AND s.integration_id = i.id AND i.name IN ('crm', 'newsletter');
SELECT ihub.unschedule(name) FROM ihub.schedules WHERE name = 'crm-pull';
SELECT ihub.delete_integration(name) FROM ihub.integrations WHERE name IN ('crm', 'newsletter');
DROP TABLE IF EXISTS contacts;
DROP TABLE IF EXISTS countries;

CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
INSERT INTO countries VALUES ('GB', 'United Kingdom'), ('US', 'United States'), ('AT', 'Austria'), ('DE', 'Germany');
CREATE TABLE contacts (
    id      bigserial PRIMARY KEY,
    name    text NOT NULL,
    email   text NOT NULL UNIQUE,
    status  text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'won', 'lost')),
    country text REFERENCES countries
);

SELECT ihub.create_integration('crm');
SELECT ihub.create_integration('newsletter');

-- The CRM's deal statuses are not ours; its country codes are ours in
-- another case. A country it has and we do not ('Atlantis') is left for a
-- person: ihub.mapper_items shows what waits.
SELECT ihub.create_mapper('crm', 'status', 'enum', local_values => ARRAY['open', 'won', 'lost'],
                          on_import => 'manual', on_export => 'auto');
SELECT ihub.map_item('crm', 'status', ARRAY['Open', 'open'], 'open');
SELECT ihub.map_item('crm', 'status', ARRAY['Closed Won', 'won'], 'won');
SELECT ihub.map_item('crm', 'status', ARRAY['Closed Lost', 'lost'], 'lost');
SELECT ihub.create_mapper('crm', 'country', 'table', 'countries', 'code', on_import => 'auto', on_export => 'auto');

-- Data only the CRM needs: sent to it, and to no other integration.
SELECT ihub.add_custom_field('contacts', 'loyalty', 'selection', label => 'Loyalty tier',
                             options => ARRAY['bronze', 'silver', 'gold'], export_to => ARRAY['crm']);

-- OAuth2: a person authorizes pg_ihub at the CRM once (demo/run plays
-- them); the maintenance worker keeps the access token fresh after that.
SELECT ihub.create_oauth2('crm', 'crm', 'http://127.0.0.1:' || :'crm_port' || '/oauth/token',
                          'pg-ihub-demo', 'crm-client-secret-7f3a', scope => 'contacts',
                          authorize_url => 'http://127.0.0.1:' || :'crm_port' || '/oauth/authorize');
SELECT ihub.create_endpoint('crm', 'crm-api', 'http://127.0.0.1:' || :'crm_port', method => 'GET',
                            auth => '{"type": "oauth2", "credential": "crm"}', retry => '{"initial_delay": 1, "max_attempts": 5}');
SELECT ihub.create_endpoint('crm', 'crm-events', 'http://127.0.0.1:' || :'crm_port' || '/hooks/ihub',
                            auth => '{"type": "oauth2", "credential": "crm"}', retry => '{"initial_delay": 1, "max_attempts": 5}');
SELECT ihub.subscribe('contacts', 'crm-events', events => '{insert,update}');
-- Another system that follows contacts: it gets what the CRM sends too.
SELECT ihub.create_endpoint('newsletter', 'newsletter-hook', 'http://127.0.0.1:' || :'receiver_port' || '/newsletter',
                            retry => '{"initial_delay": 1, "max_attempts": 5}');
SELECT ihub.subscribe('contacts', 'newsletter-hook', events => '{insert,update}');

-- A CRM contact as a row of ours.
CREATE OR REPLACE FUNCTION crm_contact_row(c jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('name', c ->> 'name', 'email', c ->> 'email',
                              'status', coalesce(ihub.map_import('crm', 'status', c ->> 'status'), 'open'),
                              'country', ihub.map_import('crm', 'country', c ->> 'country'))
$$;

-- The pull: a scheduled action asks for page 1; each page's handler runs
-- as a job of the crm integration (so its writes are not sent back to the
-- CRM), imports the page, and asks for the next one in the same
-- transaction. The last page sets the integration date.
CREATE OR REPLACE FUNCTION crm_import_page(r ihub.http_response) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
BEGIN
    IF r.state <> 'done' THEN
        PERFORM ihub.log('error', format('CRM pull: page %s failed: %s', r.context ->> 'page', r.error), integration => 'crm');
        RETURN;
    END IF;
    FOR c IN SELECT * FROM jsonb_array_elements(r.body_json -> 'data') LOOP
        PERFORM ihub.upsert('crm', 'contact', 'contacts', c ->> 'id', crm_contact_row(c));
    END LOOP;
    IF r.body_json ->> 'next_cursor' IS NOT NULL THEN
        PERFORM ihub.http_request('crm-api', NULL, path => '/contacts',
                                  query => jsonb_build_object('cursor', r.body_json ->> 'next_cursor'),
                                  on_response => 'crm_import_page(ihub.http_response)',
                                  context => r.context || jsonb_build_object('page', (r.context ->> 'page')::int + 1));
    ELSE
        PERFORM ihub.set_date('crm', 'contacts_pulled', (r.context ->> 'started')::timestamptz);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION crm_pull(args jsonb) RETURNS void LANGUAGE sql AS $$
    SELECT ihub.http_request('crm-api', NULL, path => '/contacts',
                             on_response => 'crm_import_page(ihub.http_response)',
                             context => jsonb_build_object('page', 1, 'started', now()))
$$;
SELECT ihub.schedule('crm-pull', 'crm_pull(jsonb)', every => '1 hour', integration => 'crm');

-- The CRM's webhooks (POST /webhooks/crm/contacts, Standard Webhooks): a
-- contact edited there is upserted here; one first made here (which the
-- CRM took by email) is bound first.
CREATE OR REPLACE FUNCTION crm_contact_changed(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    c jsonb := item.payload -> 'data';
    result record;
BEGIN
    IF ihub.local_key('crm', 'contact', c ->> 'id') IS NULL THEN
        PERFORM ihub.bind('crm', 'contact', 'contacts', id::text, c ->> 'id') FROM contacts WHERE email = c ->> 'email';
    END IF;
    SELECT * INTO result FROM ihub.upsert('crm', 'contact', 'contacts', c ->> 'id', crm_contact_row(c));
    RETURN to_jsonb(result);
END
$$;
-- A fixed secret, for the demo only: the CRM signs with it too.
SELECT ihub.create_source('crm', 'contacts', 'crm_contact_changed(ihub.inbound_items)',
                          secret => 'whsec_cGdfaWh1Yi1kZW1vLWNybS13ZWJob29rcw==');

SELECT ihub.enable_integration('crm');
SELECT ihub.enable_integration('newsletter');
