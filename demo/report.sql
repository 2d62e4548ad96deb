\pset footer off
\echo
\echo 'Deliveries (ihub.deliveries), with the receiver''s verdict on each signature:'
SELECT d.id, d.event_type, d.payload #>> '{data,customer}' AS customer, d.payload #>> '{data,status}' AS status,
       d.state, d.attempts, d.last_status AS http,
       round(extract(epoch FROM d.latency) * 1000, 1) AS latency_ms,
       a.response_body::jsonb ->> 'signature' AS signature
FROM ihub.deliveries d
LEFT JOIN ihub.delivery_attempts a ON a.delivery_id = d.id AND a.attempt = d.attempts
WHERE d.integration = 'shop'
ORDER BY d.id;

\echo
\echo 'Inbound webhooks (ihub.inbound_items): processed by on_payment(), or archived with the error:'
SELECT id, source, payload ->> 'order_id' AS order_id, state, coalesce(result::text, error) AS outcome
FROM ihub.inbound_items WHERE integration = 'payments' ORDER BY id;
\echo
\echo 'Refused requests (ihub.inbound_rejections):'
SELECT id, source, reason, remote_addr FROM ihub.inbound_rejections WHERE integration = 'payments' ORDER BY id;
