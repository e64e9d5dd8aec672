-- Which replicas are serving which org right now, so that an org's own concurrency cap
-- (provider_configs.max_concurrency) holds across replicas: each replica refreshes its rows
-- every few seconds for the capped orgs it is serving and takes its share of each cap from
-- the others' rows (pipeline/gate.rs). The rows are ephemeral, hence unlogged: after a
-- crash the table is empty and every replica writes its rows again at its next beat.
CREATE UNLOGGED TABLE org_presence (
    org_id   TEXT COLLATE "C" NOT NULL,
    instance TEXT COLLATE "C" NOT NULL,
    seen_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (org_id, instance)
);
