-- Who is working on an (event, worker) right now. A claim is a lease renewed while its holder
-- works; a holder that dies stops renewing and its claim expires, so another replica can take
-- the event over. Together with the ledger this keeps concurrent deliveries of one event from
-- calling the provider twice.
CREATE TABLE event_claims (
    event_id   TEXT        NOT NULL,
    worker     TEXT        NOT NULL,
    holder     TEXT        NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (event_id, worker)
);
