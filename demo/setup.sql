-- pg_ihub demo: an orders table whose changes are sent, signed, to a small
-- receiver on loopback (demo/run starts it). Safe to run again.
\set ON_ERROR_STOP on
SELECT ihub.disable_integration(name) FROM ihub.integrations WHERE name = 'shop';
SELECT ihub.delete_integration(name) FROM ihub.integrations WHERE name = 'shop';
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

-- Inbound: the payment provider posts signed webhooks (Standard Webhooks)
-- to POST /webhooks/shop/payments. Each is queued, answered 202, and then
-- handled by this function in its own transaction: marking the order paid
-- is an ordinary write, so the subscription above sends it on.
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
-- A fixed secret, for the demo only; the provider gives you yours.
SELECT ihub.create_source('shop', 'payments', 'on_payment(ihub.inbound_items)',
                          secret => 'whsec_cGdfaWh1Yi1kZW1vLXBheW1lbnRzLWtleQ==');
