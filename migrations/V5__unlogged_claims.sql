-- Claims are leases: one lost in a crash (or missing on a promoted standby) only lets a
-- redelivery start sooner, exactly as if it had expired; the ledger still answers every decided
-- event. An unlogged table writes no WAL for the insert, renewal and delete each event makes.
ALTER TABLE event_claims SET UNLOGGED;
