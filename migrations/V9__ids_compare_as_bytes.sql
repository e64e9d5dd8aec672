-- Ids compare as bytes. Every lookup on the hot path walks B-tree indexes keyed by text ids
-- (event id, worker, org id, ticket id), and under a database's linguistic collation
-- (en_US.UTF-8, or even C.UTF-8 on PostgreSQL 15) each comparison goes through strcoll:
-- a profile of Postgres at saturation put B-tree comparisons of these keys at ~9 % of its CPU.
-- Ids are opaque, so byte order ("C") is the right order for them, and it compares with
-- memcmp. Queries need no change: a column's collation wins over a parameter's default one.
-- Changing a column's collation keeps the table's rows but rebuilds the indexes that use the
-- column, which blocks writes to that table while it runs: on a large existing ledger, run
-- this migration (`copilot-workers migrate`) in a quiet hour.
ALTER TABLE processed_events
    ALTER COLUMN event_id  TYPE TEXT COLLATE "C",
    ALTER COLUMN worker    TYPE TEXT COLLATE "C",
    ALTER COLUMN org_id    TYPE TEXT COLLATE "C",
    ALTER COLUMN ticket_id TYPE TEXT COLLATE "C";
ALTER TABLE event_claims
    ALTER COLUMN event_id TYPE TEXT COLLATE "C",
    ALTER COLUMN worker   TYPE TEXT COLLATE "C",
    ALTER COLUMN holder   TYPE TEXT COLLATE "C";
ALTER TABLE usage_rollup
    ALTER COLUMN org_id TYPE TEXT COLLATE "C",
    ALTER COLUMN worker TYPE TEXT COLLATE "C",
    ALTER COLUMN model  TYPE TEXT COLLATE "C";
ALTER TABLE provider_configs
    ALTER COLUMN org_id TYPE TEXT COLLATE "C";
