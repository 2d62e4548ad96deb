-- pg_ihub demo: an orders table whose changes are sent, signed, to a small
-- receiver on loopback (demo/run starts it). Safe to run again.
\set ON_ERROR_STOP on
SELECT ihub.disable_integration(name) FROM ihub.integrations WHERE name IN ('shop', 'payments');
-- The last run's inbound items (one failed on purpose) go first: an
-- integration with failed items is not deleted otherwise.
DELETE FROM ihub.inbound_item t USING ihub.inbound_source s, ihub.integration i
WHERE t.source_id = s.id AND s.integration_id = i.id AND i.name IN ('shop', 'payments');
SELECT ihub.delete_integration(name) FROM ihub.integrations WHERE name IN ('shop', 'payments');
DROP TABLE IF EXISTS orders;

CREATE TABLE orders (
    id         bigserial PRIMARY KEY,
    customer   text NOT NULL,
    amount     numeric(12,2) NOT NULL,
    status     text NOT NULL DEFAULT 'new',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- An integration, its endpoint (a signing secret is generated), and a
-- subscription: inserts, and updates that change the status.
SELECT ihub.create_integration('shop', tenant => 'demo');
SELECT ihub.create_endpoint('shop', 'orders-webhook', 'http://127.0.0.1:' || :'receiver_port' || '/webhooks/orders',
                            retry => '{"initial_delay": 1, "max_attempts": 5}');
SELECT ihub.subscribe('orders', 'orders-webhook', events => '{insert,update}', watch => '{status}');
SELECT ihub.enable_integration('shop');

-- Inbound: the payment provider, an integration of its own, posts signed
-- webhooks (Standard Webhooks) to POST /webhooks/payments/events. Each is
-- queued, answered 202, and then handled by this function in its own
-- transaction: marking the order paid is an ordinary write, so the shop's
-- subscription above sends it on (a write made while syncing the shop
-- would not go back to the shop: loop prevention).
CREATE OR REPLACE FUNCTION on_payment(item ihub.inbound_items) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order bigint := (item.payload ->> 'order_id')::bigint;
BEGIN
    UPDATE orders SET status = 'paid' WHERE id = v_order AND status = 'new';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'order % is not awaiting payment', v_order;
    END IF;
    RETURN jsonb_build_object('order', v_order, 'status', 'paid');
END
$$;
SELECT ihub.create_integration('payments');
SELECT ihub.enable_integration('payments');
-- A fixed secret, for the demo only; the provider gives you yours.
SELECT ihub.create_source('payments', 'events', 'on_payment(ihub.inbound_items)',
                          secret => 'whsec_cGdfaWh1Yi1kZW1vLXBheW1lbnRzLWtleQ==');
