-- Per-organization AI provider configuration (BYOK). The API key is stored only as an
-- AES-256-GCM envelope (see src/crypto.rs) with the id of the master key that sealed it.
CREATE TABLE provider_configs (
    org_id          TEXT PRIMARY KEY CHECK (length(org_id) BETWEEN 1 AND 200),
    profile         TEXT NOT NULL,
    base_url        TEXT NOT NULL,
    model           TEXT NOT NULL,
    api_key_key_id  TEXT,
    api_key_sealed  BYTEA,
    params          JSONB NOT NULL DEFAULT '{}'::jsonb,
    enabled_workers TEXT[],
    worker_models   JSONB NOT NULL DEFAULT '{}'::jsonb,
    context         JSONB NOT NULL DEFAULT '{}'::jsonb,
    max_concurrency INTEGER CHECK (max_concurrency IS NULL OR max_concurrency > 0),
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    healthy         BOOLEAN NOT NULL DEFAULT TRUE,
    last_success_at TIMESTAMPTZ,
    last_error_at   TIMESTAMPTZ,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((api_key_key_id IS NULL) = (api_key_sealed IS NULL))
);

-- Every change to a config is announced, so that each replica's cache drops it at once.
CREATE FUNCTION copilot_notify_provider_config() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('copilot_provider_configs',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.org_id ELSE NEW.org_id END);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER provider_configs_notify
    AFTER INSERT OR UPDATE OR DELETE ON provider_configs
    FOR EACH ROW EXECUTE FUNCTION copilot_notify_provider_config();

-- The idempotency ledger: one row per (event, worker) whose result has been decided. A
-- redelivered event finds its row, republishes the same result and never calls the provider.
CREATE TABLE processed_events (
    event_id   TEXT NOT NULL,
    worker     TEXT NOT NULL,
    org_id     TEXT NOT NULL,
    ticket_id  TEXT NOT NULL,
    result_id  TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    input_hash TEXT,
    result     JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, worker)
);

CREATE INDEX processed_events_ticket ON processed_events (org_id, ticket_id, worker, created_at DESC);
