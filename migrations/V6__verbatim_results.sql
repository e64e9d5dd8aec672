-- A result is stored as the very text that was published (json keeps it verbatim; jsonb would
-- reorder keys and respace it), so that a redelivery republishes the same bytes without the
-- worker building a JSON tree to normalize it, and Postgres no longer converts each result to
-- jsonb on the hot path.
ALTER TABLE processed_events ALTER COLUMN result TYPE json USING result::json;
