-- Ledger retention: results older than the retention period are deleted, and their provider
-- usage is first added to this table, one row per org, UTC day, worker and model, so that
-- `org usage` still counts every request after its ledger row is gone.
CREATE TABLE usage_rollup (
    org_id            TEXT   NOT NULL,
    day               DATE   NOT NULL,
    worker            TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (org_id, day, worker, model)
);
