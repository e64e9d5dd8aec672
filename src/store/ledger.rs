//! The idempotency ledger: the decided result of each (event id, worker).
//!
//! A result is recorded *before* it is published and the delivery acked. A redelivery finds
//! the row and republishes the very same result (same id, same bytes) without calling the
//! provider; when two replicas race on one event, the first insert wins and both publish it.

use serde_json::Value;
use tokio_postgres::types::Json;

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
    /// The full result event as published.
    pub result: Value,
}

/// Provider usage of one run, stored with its ledger row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRecord {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// What [`Store::begin_run`] found.
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

/// A ledger entry from columns 0-5: org_id, ticket_id, result_id, outcome, input_hash, result.
fn entry_from_row(
    event_id: &str,
    worker: &str,
    row: &tokio_postgres::Row,
) -> Result<LedgerEntry, StoreError> {
    let Json(result): Json<Value> = row.try_get(5)?;
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
    /// Usage of `org_id` since `since` (`YYYY-MM-DD`, inclusive), newest day first.
    pub async fn usage(&self, org_id: &str, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, worker, \
                 coalesce(model, ''), sum(requests)::bigint, sum(prompt_tokens)::bigint, \
                 sum(completion_tokens)::bigint FROM processed_events \
                 WHERE org_id = $1 AND created_at >= $2::text::date AND requests > 0 \
                 GROUP BY 1, 2, 3 ORDER BY 1 DESC, 2, 3",
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
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT org_id, ticket_id, result_id, outcome, input_hash, result \
                 FROM processed_events WHERE event_id = $1 AND worker = $2",
            )
            .await?;
        let row = client.query_opt(&statement, &[&event_id, &worker]).await?;
        row.map(|row| entry_from_row(event_id, worker, &row))
            .transpose()
    }

    /// Records a decided result unless one is already there, and returns the one that stands.
    /// The run's provider usage is part of the row (so a run is counted once, with its
    /// result), and the event's claim is released in the same statement.
    pub async fn record_result(
        &self,
        entry: &LedgerEntry,
        usage: &UsageRecord,
    ) -> Result<LedgerEntry, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH inserted AS ( \
                   INSERT INTO processed_events (event_id, worker, org_id, ticket_id, result_id, \
                   outcome, input_hash, result, model, requests, prompt_tokens, completion_tokens) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                   ON CONFLICT (event_id, worker) DO NOTHING RETURNING 1 \
                 ), released AS ( \
                   DELETE FROM event_claims WHERE event_id = $1 AND worker = $2 \
                 ) SELECT EXISTS (SELECT 1 FROM inserted)",
            )
            .await?;
        let inserted: bool = client
            .query_one(
                &statement,
                &[
                    &entry.event_id,
                    &entry.worker,
                    &entry.org_id,
                    &entry.ticket_id,
                    &entry.result_id,
                    &entry.outcome,
                    &entry.input_hash,
                    &Json(&entry.result),
                    &usage.model,
                    &i32::try_from(usage.requests).unwrap_or(i32::MAX),
                    &usage.prompt_tokens,
                    &usage.completion_tokens,
                ],
            )
            .await?
            .get(0);
        drop(client);
        if inserted {
            return Ok(entry.clone());
        }
        self.ledger_entry(&entry.event_id, &entry.worker)
            .await?
            .ok_or_else(|| StoreError::Invalid("ledger row vanished after a conflict".into()))
    }

    /// Everything a run needs to know before it starts, in one round trip: the decided result
    /// of (event, worker) if there is one; else the input hash of the ticket's last completed
    /// run, and whether `holder` now holds the claim on the event. The claim commits without
    /// waiting for the disk (`synchronous_commit` off for this statement's transaction): a
    /// claim lost in a database crash only lets a redelivery start sooner, and half the WAL
    /// flushes of the hot path go away.
    pub async fn begin_run(
        &self,
        event_id: &str,
        worker: &str,
        org_id: &str,
        ticket_id: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<RunStart, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH decided AS ( \
                   SELECT org_id, ticket_id, result_id, outcome, input_hash, result \
                   FROM processed_events WHERE event_id = $1 AND worker = $2 \
                 ), claimed AS ( \
                   INSERT INTO event_claims (event_id, worker, holder, expires_at) \
                   SELECT $1, $2, $5, now() + make_interval(secs => $6) \
                   WHERE NOT EXISTS (SELECT 1 FROM decided) \
                   ON CONFLICT (event_id, worker) DO UPDATE SET holder = EXCLUDED.holder, \
                   expires_at = EXCLUDED.expires_at \
                   WHERE event_claims.expires_at < now() OR event_claims.holder = EXCLUDED.holder \
                   RETURNING holder \
                 ) SELECT d.org_id, d.ticket_id, d.result_id, d.outcome, d.input_hash, d.result, \
                   (SELECT input_hash FROM processed_events WHERE org_id = $3 AND ticket_id = $4 \
                    AND worker = $2 AND outcome = 'completed' ORDER BY created_at DESC LIMIT 1), \
                   EXISTS (SELECT 1 FROM claimed), \
                   set_config('synchronous_commit', 'off', true) \
                 FROM (SELECT 1) AS one LEFT JOIN decided d ON TRUE",
            )
            .await?;
        let lease = lease.as_secs_f64();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&event_id, &worker, &org_id, &ticket_id, &holder, &lease];
        let row = client.query_one(&statement, &params).await?;
        // Columns 0-5 are the decided row, all null when there is none.
        let decided = match row.try_get::<_, Option<String>>(2)? {
            Some(_) => Some(entry_from_row(event_id, worker, &row)?),
            None => None,
        };
        Ok(RunStart {
            decided,
            last_completed_hash: row.try_get(6)?,
            claimed: row.try_get(7)?,
        })
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

    /// Extends the lease of every claim held by this process (holder ids `<instance>-<n>`).
    pub async fn renew_claims(
        &self,
        instance: &str,
        lease: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let pattern = format!("{instance}-%");
        Ok(client
            .execute(
                "UPDATE event_claims SET expires_at = now() + make_interval(secs => $2) \
                 WHERE holder LIKE $1",
                &[&pattern, &lease.as_secs_f64()],
            )
            .await?)
    }

    /// Gives a claim up (after the result is published, or when the event is parked).
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
}
