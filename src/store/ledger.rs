//! The idempotency ledger: the decided result of each (event id, worker).
//!
//! A result is recorded *before* it is published and the delivery acked. A redelivery finds
//! the row and republishes the very same result (same id, same bytes) without calling the
//! provider; when two replicas race on one event, the first insert wins and both publish it.

use super::batch::Batcher;
use super::{Store, StoreError};

/// One decided (event, worker).
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    pub event_id: String,
    pub worker: String,
    pub org_id: String,
    pub ticket_id: String,
    pub result_id: String,
    /// `completed` or `failed`.
    pub outcome: String,
    /// Hash of what the worker was given; lets an unchanged ticket be skipped.
    pub input_hash: Option<String>,
    /// The full result event exactly as published (JSON text). Stored verbatim (a `json`
    /// column), so that a republished result has the very same bytes.
    pub result: String,
}

/// Provider usage of one run, stored with its ledger row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRecord {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// A run about to start: which event, for which worker, and who would hold its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub event_id: String,
    pub worker: String,
    pub org_id: String,
    pub ticket_id: String,
    pub holder: String,
}

/// What [`Store::begin_runs`] found for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStart {
    pub decided: Option<LedgerEntry>,
    pub last_completed_hash: Option<String>,
    pub claimed: bool,
}

/// One row of `org usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub day: String,
    pub worker: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// The decided row of (event $1, worker $2), in the columns `entry_from_row` reads.
pub(crate) const SELECT_ENTRY: &str = "SELECT org_id, ticket_id, result_id, outcome, input_hash, result::text \
                            FROM processed_events WHERE event_id = $1 AND worker = $2";

/// The batched `record` statement (see [`Store::record_results`]): inserts, and says for each
/// row whether it was this one that went in. It reads no table, so its kept plan is safe.
pub(crate) const RECORD_RESULTS: &str = "WITH input AS ( \
   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
   $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int4[], \
   $11::int8[], $12::int8[]) WITH ORDINALITY AS i(event_id, worker, org_id, \
   ticket_id, result_id, outcome, input_hash, result, model, requests, \
   prompt_tokens, completion_tokens, n) \
 ), inserted AS ( \
   INSERT INTO processed_events (event_id, worker, org_id, ticket_id, result_id, \
   outcome, input_hash, result, model, requests, prompt_tokens, completion_tokens) \
   SELECT event_id, worker, org_id, ticket_id, result_id, outcome, input_hash, \
   result::json, model, requests, prompt_tokens, completion_tokens \
   FROM input ORDER BY event_id, worker \
   ON CONFLICT (event_id, worker) DO NOTHING RETURNING event_id, worker \
 ) SELECT EXISTS (SELECT 1 FROM inserted x \
   WHERE x.event_id = i.event_id AND x.worker = i.worker) \
 FROM input i ORDER BY i.n";

/// The batched `start` statement (see [`Store::begin_runs`]). Each input row looks up its
/// decided row by primary key and its ticket's last completed hash through
/// `processed_events_last_completed`, each in a `LATERAL ... LIMIT 1`: a nested loop of index
/// lookups is the only plan shape left to Postgres, and a plan kept for the connection's
/// life (store/mod.rs) stays right however large the ledger grows. Events already decided
/// take no claim.
pub(crate) const BEGIN_RUNS: &str = "WITH input AS ( \
   SELECT i.event_id, i.worker, i.holder, i.n, d.org_id, d.ticket_id, d.result_id, \
     d.outcome, d.input_hash, d.result, h.input_hash AS last_hash \
   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY \
     AS i(event_id, worker, org_id, ticket_id, holder, n) \
   LEFT JOIN LATERAL (SELECT p.org_id, p.ticket_id, p.result_id, p.outcome, p.input_hash, \
       p.result::text AS result FROM processed_events p \
       WHERE p.event_id = i.event_id AND p.worker = i.worker LIMIT 1) d ON true \
   LEFT JOIN LATERAL (SELECT h.input_hash FROM processed_events h \
       WHERE h.org_id = i.org_id AND h.ticket_id = i.ticket_id AND h.worker = i.worker \
       AND h.outcome = 'completed' ORDER BY h.created_at DESC LIMIT 1) h ON true \
 ), claimed AS ( \
   INSERT INTO event_claims (event_id, worker, holder, expires_at) \
   SELECT event_id, worker, holder, now() + make_interval(secs => $6) FROM input \
   WHERE result_id IS NULL ORDER BY event_id, worker \
   ON CONFLICT (event_id, worker) DO UPDATE SET holder = EXCLUDED.holder, \
   expires_at = EXCLUDED.expires_at \
   WHERE event_claims.expires_at < now() OR event_claims.holder = EXCLUDED.holder \
   RETURNING event_id, worker \
 ) SELECT i.org_id, i.ticket_id, i.result_id, i.outcome, i.input_hash, i.result, i.last_hash, \
   EXISTS (SELECT 1 FROM claimed c WHERE c.event_id = i.event_id AND c.worker = i.worker), \
   set_config('synchronous_commit', 'off', true) \
 FROM input i ORDER BY i.n";

/// The decided row of (event, worker), if any, on `client`.
async fn select_entry(
    client: &deadpool_postgres::Client,
    event_id: &str,
    worker: &str,
) -> Result<Option<LedgerEntry>, StoreError> {
    let statement = client.prepare_cached(SELECT_ENTRY).await?;
    let row = client.query_opt(&statement, &[&event_id, &worker]).await?;
    row.map(|row| entry_from_row(event_id, worker, &row))
        .transpose()
}

/// One text column of a batch, for an `unnest($n::text[])` parameter.
fn texts<T>(items: &[T], field: fn(&T) -> &str) -> Vec<&str> {
    items.iter().map(field).collect()
}

/// A batched statement answers with one row per input row.
fn one_row_each(rows: &[tokio_postgres::Row], inputs: usize) -> Result<(), StoreError> {
    if rows.len() == inputs {
        return Ok(());
    }
    Err(StoreError::Invalid(format!(
        "a batched statement returned {} rows for {inputs} inputs",
        rows.len()
    )))
}

/// A ledger entry from columns 0-5: org_id, ticket_id, result_id, outcome, input_hash, result.
fn entry_from_row(
    event_id: &str,
    worker: &str,
    row: &tokio_postgres::Row,
) -> Result<LedgerEntry, StoreError> {
    let result: String = row.try_get(5)?;
    Ok(LedgerEntry {
        event_id: event_id.to_owned(),
        worker: worker.to_owned(),
        org_id: row.try_get(0)?,
        ticket_id: row.try_get(1)?,
        result_id: row.try_get(2)?,
        outcome: row.try_get(3)?,
        input_hash: row.try_get(4)?,
        result,
    })
}

impl Store {
    /// Usage of `org_id` since `since` (`YYYY-MM-DD`, inclusive), newest day first: the
    /// ledger's rows and, for results past retention, their rolled-up usage.
    pub async fn usage(&self, org_id: &str, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT to_char(day, 'YYYY-MM-DD'), worker, model, sum(requests)::bigint, \
                 sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint FROM ( \
                   SELECT (created_at AT TIME ZONE 'UTC')::date AS day, worker, \
                   coalesce(model, '') AS model, requests::bigint AS requests, prompt_tokens, \
                   completion_tokens FROM processed_events \
                   WHERE org_id = $1 AND created_at >= $2::text::date AND requests > 0 \
                   UNION ALL \
                   SELECT day, worker, model, requests, prompt_tokens, completion_tokens \
                   FROM usage_rollup WHERE org_id = $1 AND day >= $2::text::date \
                 ) u GROUP BY 1, 2, 3 ORDER BY 1 DESC, 2, 3",
                &[&org_id, &since],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| UsageRow {
                day: row.get(0),
                worker: row.get(1),
                model: row.get(2),
                requests: row.get(3),
                prompt_tokens: row.get(4),
                completion_tokens: row.get(5),
            })
            .collect())
    }

    /// The recorded result for (event, worker), if any.
    pub async fn ledger_entry(
        &self,
        event_id: &str,
        worker: &str,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        select_entry(&self.client().await?, event_id, worker).await
    }

    /// Records decided results unless one is already there for their (event, worker), and
    /// returns, for each, the one that stands. Each run's provider usage is part of its row (so
    /// a run is counted once, with its result). One durable commit serves the whole batch.
    /// The events' claims are left to lapse: once the ledger row exists nothing reads them,
    /// [`Store::renew_claims`] skips them and [`Store::purge_lapsed_claims`] deletes them in
    /// bulk. (Deleting each one here cost a join that Postgres planned as a scan of the whole,
    /// churning claims table.) No two records may share an (event, worker) (see [`Ledger`],
    /// which ensures it).
    pub async fn record_results(
        &self,
        records: &[(LedgerEntry, UsageRecord)],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let client = self.hot_client().await?;
        let statement = client.prepare_cached(RECORD_RESULTS).await?;
        let event_ids = texts(records, |(e, _)| &e.event_id);
        let workers = texts(records, |(e, _)| &e.worker);
        let org_ids = texts(records, |(e, _)| &e.org_id);
        let ticket_ids = texts(records, |(e, _)| &e.ticket_id);
        let result_ids = texts(records, |(e, _)| &e.result_id);
        let outcomes = texts(records, |(e, _)| &e.outcome);
        let models = texts(records, |(_, u)| &u.model);
        let hashes: Vec<Option<&str>> = records
            .iter()
            .map(|(e, _)| e.input_hash.as_deref())
            .collect();
        let results = texts(records, |(e, _)| &e.result);
        let requests: Vec<i32> = records
            .iter()
            .map(|(_, u)| i32::try_from(u.requests).unwrap_or(i32::MAX))
            .collect();
        let prompt: Vec<i64> = records.iter().map(|(_, u)| u.prompt_tokens).collect();
        let completion: Vec<i64> = records.iter().map(|(_, u)| u.completion_tokens).collect();
        let rows = client
            .query(
                &statement,
                &[
                    &event_ids,
                    &workers,
                    &org_ids,
                    &ticket_ids,
                    &result_ids,
                    &outcomes,
                    &hashes,
                    &results,
                    &models,
                    &requests,
                    &prompt,
                    &completion,
                ],
            )
            .await?;
        one_row_each(&rows, records.len())?;
        let mut standing = Vec::with_capacity(records.len());
        for ((entry, _), row) in records.iter().zip(rows) {
            if row.try_get(0)? {
                standing.push(entry.clone());
                continue;
            }
            // Another delivery decided it first: its result stands.
            let stored = select_entry(&client, &entry.event_id, &entry.worker)
                .await?
                .ok_or_else(|| {
                    StoreError::Invalid("ledger row vanished after a conflict".into())
                })?;
            standing.push(stored);
        }
        Ok(standing)
    }

    /// Everything a run needs to know before it starts, for a batch of runs in one round trip:
    /// the decided result of (event, worker) if there is one; else the input hash of the
    /// ticket's last completed run, and whether the run's holder now holds the claim on the
    /// event. The claims commit without waiting for the disk (`synchronous_commit` off for
    /// this statement's transaction): a claim lost in a database crash only lets a redelivery
    /// start sooner. No two requests may share an (event, worker).
    pub async fn begin_runs(
        &self,
        requests: &[RunRequest],
        lease: std::time::Duration,
    ) -> Result<Vec<RunStart>, StoreError> {
        let client = self.hot_client().await?;
        let statement = client.prepare_cached(BEGIN_RUNS).await?;
        let event_ids = texts(requests, |r| &r.event_id);
        let workers = texts(requests, |r| &r.worker);
        let org_ids = texts(requests, |r| &r.org_id);
        let ticket_ids = texts(requests, |r| &r.ticket_id);
        let holders = texts(requests, |r| &r.holder);
        let lease = lease.as_secs_f64();
        let rows = client
            .query(
                &statement,
                &[
                    &event_ids,
                    &workers,
                    &org_ids,
                    &ticket_ids,
                    &holders,
                    &lease,
                ],
            )
            .await?;
        one_row_each(&rows, requests.len())?;
        requests
            .iter()
            .zip(rows)
            .map(|(request, row)| {
                // Columns 0-5 are the decided row, all null when there is none.
                let decided = match row.try_get::<_, Option<String>>(2)? {
                    Some(_) => Some(entry_from_row(&request.event_id, &request.worker, &row)?),
                    None => None,
                };
                Ok(RunStart {
                    decided,
                    last_completed_hash: row.try_get(6)?,
                    claimed: row.try_get(7)?,
                })
            })
            .collect()
    }
}

impl Store {
    /// Empties the ledger; only the demo does this, on its own database.
    pub async fn clear_demo_state(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.batch_execute("DELETE FROM processed_events").await?;
        Ok(())
    }
}

impl Store {
    /// Takes the claim on (event, worker) for `lease` unless another holder's claim is still
    /// live. Returns whether `holder` now holds it.
    pub async fn claim(
        &self,
        event_id: &str,
        worker: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO event_claims (event_id, worker, holder, expires_at) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (event_id, worker) DO UPDATE SET holder = EXCLUDED.holder, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE event_claims.expires_at < now() OR event_claims.holder = EXCLUDED.holder \
                 RETURNING holder",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[&event_id, &worker, &holder, &lease.as_secs_f64()],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Extends to `lease` these claims, each only while its holder still holds it, and returns
    /// the holders renewed. Rows locked right now (being recorded, released or taken over)
    /// are skipped rather than waited for: waiting on them deadlocked with batched
    /// recordings; a skipped claim is renewed next round, well within its lease.
    pub async fn renew_claims(
        &self,
        claims: &[(String, String, String)],
        lease: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE event_claims SET expires_at = now() + make_interval(secs => $4) \
                 WHERE (event_id, worker) IN (SELECT c.event_id, c.worker \
                   FROM unnest($1::text[], $2::text[], $3::text[]) AS u(event_id, worker, holder) \
                   JOIN event_claims c ON c.event_id = u.event_id AND c.worker = u.worker \
                     AND c.holder = u.holder \
                   FOR UPDATE OF c SKIP LOCKED) \
                 RETURNING holder",
                &[
                    &texts(claims, |c| &c.0),
                    &texts(claims, |c| &c.1),
                    &texts(claims, |c| &c.2),
                    &lease.as_secs_f64(),
                ],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Deletes up to `batch` ledger rows of `org_id` older than `keep_days`, adding their
    /// provider usage to `usage_rollup` in the same statement (so usage is never counted
    /// twice nor lost; Postgres runs a data-modifying `WITH` part whether or not the query
    /// reads it). Returns the rows deleted. Replicas may prune at once: each takes rows
    /// the others have not locked.
    pub async fn prune_ledger_of(
        &self,
        org_id: &str,
        keep_days: u32,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let days = i32::try_from(keep_days).unwrap_or(i32::MAX);
        let row = client
            .query_one(
                "WITH doomed AS ( \
                   SELECT event_id, worker FROM processed_events \
                   WHERE org_id = $1 AND created_at < now() - make_interval(days => $2) \
                   LIMIT $3 FOR UPDATE SKIP LOCKED \
                 ), gone AS ( \
                   DELETE FROM processed_events p USING doomed d \
                   WHERE p.event_id = d.event_id AND p.worker = d.worker \
                   RETURNING p.org_id, p.created_at, p.worker, p.model, p.requests, \
                   p.prompt_tokens, p.completion_tokens \
                 ), rolled AS ( \
                   INSERT INTO usage_rollup AS u (org_id, day, worker, model, requests, \
                   prompt_tokens, completion_tokens) \
                   SELECT org_id, (created_at AT TIME ZONE 'UTC')::date, worker, \
                   coalesce(model, ''), sum(requests), sum(prompt_tokens), \
                   sum(completion_tokens) FROM gone WHERE requests > 0 GROUP BY 1, 2, 3, 4 \
                   ON CONFLICT (org_id, day, worker, model) DO UPDATE SET \
                   requests = u.requests + EXCLUDED.requests, \
                   prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens, \
                   completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens \
                 ) SELECT count(*) FROM gone",
                &[&org_id, &days, &batch],
            )
            .await?;
        let gone: i64 = row.try_get(0)?;
        Ok(u64::try_from(gone).unwrap_or(0))
    }

    /// The orgs with rows in the ledger, read from its `(org_id, created_at)` index one org at
    /// a time (a skip scan) rather than by reading every row.
    pub async fn ledger_orgs(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "WITH RECURSIVE orgs AS ( \
                   SELECT min(org_id) AS org_id FROM processed_events \
                   UNION ALL \
                   SELECT (SELECT min(org_id) FROM processed_events WHERE org_id > orgs.org_id) \
                   FROM orgs WHERE orgs.org_id IS NOT NULL \
                 ) SELECT org_id FROM orgs WHERE org_id IS NOT NULL",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .collect()
    }

    /// Deletes the claims whose lease has lapsed: those of recorded results (no longer
    /// renewed) and those of processes that died. Locked rows (being taken over) are skipped.
    pub async fn purge_lapsed_claims(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute(
                "DELETE FROM event_claims WHERE (event_id, worker) IN ( \
                   SELECT event_id, worker FROM event_claims WHERE expires_at < now() \
                   FOR UPDATE SKIP LOCKED)",
                &[],
            )
            .await?)
    }

    /// Gives a claim up before its result exists (the event is parked or deferred).
    pub async fn release_claim(
        &self,
        event_id: &str,
        worker: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "DELETE FROM event_claims WHERE event_id = $1 AND worker = $2 AND holder = $3",
            )
            .await?;
        client
            .execute(&statement, &[&event_id, &worker, &holder])
            .await?;
        Ok(())
    }
}

impl Store {
    /// Empties every table; only the benchmark does this, on its own database.
    pub async fn clear_bench_state(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .batch_execute("TRUNCATE processed_events, event_claims, provider_configs")
            .await?;
        Ok(())
    }

    /// Fills the ledger with `rows` earlier results of other orgs (a thousand orgs, five
    /// workers, small results) and has Postgres analyze it, so that the benchmark's phases
    /// meet a ledger the size of a running installation's; only the benchmark does this.
    pub async fn seed_bench_ledger(&self, rows: u32) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO processed_events (event_id, worker, org_id, ticket_id, result_id, \
                 outcome, input_hash, result, model, requests, prompt_tokens, completion_tokens) \
                 SELECT 'seed-' || g, (ARRAY['summarize', 'triage', 'sentiment', 'language', \
                 'reply_draft'])[1 + g % 5], 'seed-org-' || g % 1000, 'T-' || g / 5, \
                 'seed-result-' || g, CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END, \
                 md5(g::text), '{\"seed\": true}', 'seed-model', 1, 500, 100 \
                 FROM generate_series(1, $1::int4) g",
                &[&i32::try_from(rows).unwrap_or(i32::MAX)],
            )
            .await?;
        client.batch_execute("ANALYZE processed_events").await?;
        Ok(())
    }
}

/// Largest batch of runs started or results recorded in one statement.
const MAX_BATCH: usize = 256;
/// Statements of each kind in flight at once; the rest of the pool serves everything else.
/// Measured (BENCHMARKS.md): one or two give batches three times larger, and 15 % more
/// events/s, than four; two keep a slow statement from stalling its kind.
const FLUSHES: usize = 2;
/// Connections of the hot path's own pool: one per batched statement that can be in flight.
pub(crate) const HOT_CONNECTIONS: usize = 2 * FLUSHES;

/// The hot path's way to the ledger: starts runs and records results through batchers, so
/// that under load one statement (and one commit) serves many events.
#[derive(Clone)]
pub struct Ledger {
    runs: Batcher<RunRequest, RunStart>,
    records: Batcher<(LedgerEntry, UsageRecord), LedgerEntry>,
}

impl Ledger {
    /// Starts the batchers (on the current Tokio runtime); claims are taken for `lease`.
    pub fn start(store: &Store, lease: std::time::Duration) -> Ledger {
        let runs = Batcher::start(
            "start",
            MAX_BATCH,
            FLUSHES,
            |r: &RunRequest| (r.event_id.clone(), r.worker.clone()),
            {
                let store = store.clone();
                move |requests: Vec<RunRequest>| {
                    let store = store.clone();
                    async move {
                        let outcome = store.begin_runs(&requests, lease).await;
                        (requests, outcome)
                    }
                }
            },
        );
        let records = Batcher::start(
            "record",
            MAX_BATCH,
            FLUSHES,
            |(e, _): &(LedgerEntry, UsageRecord)| (e.event_id.clone(), e.worker.clone()),
            {
                let store = store.clone();
                move |records: Vec<(LedgerEntry, UsageRecord)>| {
                    let store = store.clone();
                    async move {
                        let outcome = store.record_results(&records).await;
                        (records, outcome)
                    }
                }
            },
        );
        Ledger { runs, records }
    }

    /// See [`Store::begin_runs`].
    pub async fn begin_run(&self, request: RunRequest) -> Result<RunStart, StoreError> {
        self.runs.submit(request).await
    }

    /// See [`Store::record_results`].
    pub async fn record_result(
        &self,
        entry: LedgerEntry,
        usage: UsageRecord,
    ) -> Result<LedgerEntry, StoreError> {
        self.records.submit((entry, usage)).await
    }
}
