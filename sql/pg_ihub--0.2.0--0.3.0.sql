-- pg_ihub 0.2.0 -> 0.3.0
--
-- Faults stay where they happen (issue 10): subscriptions survive DDL on
-- their tables or are marked broken alone, jobs and inbound items whose
-- function is gone end failed, and the listener's queues, records and
-- connections are bounded.

\echo Use "ALTER EXTENSION pg_ihub UPDATE TO '0.3.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Capture: DDL on subscribed tables, partitions, TRUNCATE
-------------------------------------------------------------------------------

-------------------------------------------------------------------------------
-- Jobs and inbound items whose function is gone; rescue and cancel
-------------------------------------------------------------------------------

-------------------------------------------------------------------------------
-- The listener: per-item commits, bounded rejections and connections
-------------------------------------------------------------------------------
