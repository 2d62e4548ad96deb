\pset footer off
\echo
\echo 'Here: contacts, with the CRM object each is bound to (ihub.bindings):'
SELECT c.id, c.name, c.email, c.status, c.country, c.loyalty, b.external_id AS crm_id
FROM contacts c LEFT JOIN ihub.bindings b ON b.integration = 'crm' AND b.object_type = 'contact' AND b.local_key = c.id::text
ORDER BY c.id;
\echo
\echo 'Mapper items (ihub.mapper_items); waiting_for says what a person must complete:'
SELECT mapper, external_values, local_value, waiting_for FROM ihub.mapper_items WHERE integration = 'crm' ORDER BY mapper, id;
\echo
\echo 'The pull: one request per page, each handled by crm_import_page() as a job of the crm integration:'
SELECT d.id, a.request_url, d.state, d.last_status AS http, j.function AS handler, j.state AS handled
FROM ihub.deliveries d
JOIN ihub.delivery_attempts a ON a.delivery_id = d.id AND a.attempt = d.attempts
LEFT JOIN ihub.jobs j ON j.integration = 'crm' AND j.args ->> 'delivery_id' = d.id::text
WHERE d.endpoint = 'crm-api' ORDER BY d.id;
\echo
\echo 'Row changes sent (ihub.deliveries): changes that came from the CRM went to the newsletter, never back to the CRM:'
SELECT d.id, d.endpoint, d.event_type, d.payload #>> '{data,name}' AS name, d.payload #>> '{data,status}' AS status,
       coalesce(d.payload #>> '{data,loyalty}', '(not sent)') AS loyalty, d.state, d.last_status AS http
FROM ihub.deliveries d WHERE d.endpoint IN ('crm-events', 'newsletter-hook') ORDER BY d.id;
\echo
\echo 'The CRM''s webhooks (ihub.inbound_items), upserted by crm_contact_changed():'
SELECT id, payload #>> '{data,id}' AS crm_id, payload #>> '{data,name}' AS name, state, result ->> 'action' AS action
FROM ihub.inbound_items WHERE integration = 'crm' ORDER BY id;
\echo
\echo 'OAuth2 (ihub.oauth2_credentials; the secrets are ihub_admin''s only):'
SELECT name, grant_type, status, client_secret, has_refresh_token, expires_at, refreshed_at FROM ihub.oauth2_credentials;
