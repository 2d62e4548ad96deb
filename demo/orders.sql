-- Application writes: plain SQL, no knowledge of webhooks.
\set ON_ERROR_STOP on
INSERT INTO orders (customer, amount) VALUES ('Ada', 120.00), ('Grace', 75.50), ('Linus', 12.99);
UPDATE orders SET status = 'paid' WHERE customer = 'Ada';
UPDATE orders SET amount = amount + 1 WHERE customer = 'Grace';   -- status unchanged: not sent
BEGIN;
INSERT INTO orders (customer, amount) VALUES ('Nobody', 1);        -- rolled back: never sent
ROLLBACK;
UPDATE orders SET status = 'shipped' WHERE customer = 'Ada';
