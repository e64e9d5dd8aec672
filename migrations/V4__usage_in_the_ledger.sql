-- Usage moves into the ledger row of the run that used it. A shared per-day counter row was a
-- hot spot: every run in a day updated the same row, serializing all ledger commits behind one
-- row lock. Daily totals are now a GROUP BY over the ledger (see `org usage`).
ALTER TABLE processed_events
    ADD COLUMN model             TEXT,
    ADD COLUMN requests          INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN prompt_tokens     BIGINT  NOT NULL DEFAULT 0,
    ADD COLUMN completion_tokens BIGINT  NOT NULL DEFAULT 0;

DROP TABLE usage_daily;

CREATE INDEX processed_events_org_time ON processed_events (org_id, created_at);
