-- The hot path asks for the input hash of a ticket's last *completed* run. An index that holds
-- exactly those rows, in that order, is the only one that answers it with index conditions
-- alone, so a plan made once and kept (a generic plan, see store/mod.rs) cannot pick another
-- index and filter (the old index ran over failed runs too, and Postgres preferred the
-- (org_id, created_at) index when the ledger looked small). It replaces that index: one index
-- fewer to maintain on every insert.
-- On a large existing ledger this build blocks writes to processed_events while it runs; an
-- operator who cannot afford that creates the index CONCURRENTLY beforehand under this name.
CREATE INDEX IF NOT EXISTS processed_events_last_completed
    ON processed_events (org_id, ticket_id, worker, created_at DESC)
    WHERE outcome = 'completed';
DROP INDEX IF EXISTS processed_events_ticket;
