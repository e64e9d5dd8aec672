-- Provider usage per org, day, worker and model. Written in the same transaction as the
-- ledger row of the run that used it, so a redelivered event is never counted twice.
CREATE TABLE usage_daily (
    org_id            TEXT   NOT NULL,
    day               DATE   NOT NULL,
    worker            TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, day, worker, model)
);
