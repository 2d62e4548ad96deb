-- Changes made here, by the application: plain SQL. Both go to the CRM
-- (with the loyalty tier, which only the CRM gets) and to the newsletter.
\set ON_ERROR_STOP on
INSERT INTO contacts (name, email, status, country, loyalty) VALUES ('Mary Somerville', 'mary@example.com', 'open', 'GB', 'gold');
UPDATE contacts SET status = 'won', loyalty = 'silver' WHERE email = 'grace@example.com';
