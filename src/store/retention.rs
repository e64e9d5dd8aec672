//! Ledger retention: decided results older than the retention period are deleted, their
//! provider usage first added to daily totals (`usage_rollup`), so that `org usage` still
//! counts every request. A ledger row is what answers a redelivery without calling the
//! provider again, so the period must outlast any redelivery (90 days by default; days, not
//! the minutes a delivery can spend in delay queues).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// Rows deleted per statement: each statement is one short transaction.
const BATCH: i64 = 5_000;
/// How often a process prunes (every replica does; they take disjoint rows).
const EVERY: Duration = Duration::from_secs(3600);
/// The first round waits this long after start, out of the way of a cold start.
const FIRST_AFTER: Duration = Duration::from_secs(60);

impl Store {
    /// Deletes every ledger row older than `keep_days`, org by org and `BATCH` rows at a
    /// time, rolling their usage up. Returns the rows deleted.
    pub async fn prune_ledger(&self, keep_days: u32) -> Result<u64, StoreError> {
        let mut total = 0;
        for org in self.ledger_orgs().await? {
            loop {
                let gone = self.prune_ledger_of(&org, keep_days, BATCH).await?;
                total += gone;
                if gone < BATCH as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }
}

/// Prunes the ledger every [`EVERY`] until `stop`; `keep_days` 0 never prunes.
pub async fn keep_pruning(store: Store, keep_days: u32, stop: CancellationToken) {
    if keep_days == 0 {
        return;
    }
    let mut wait = FIRST_AFTER;
    while crate::sleep_unless_stopped(wait, &stop).await {
        wait = EVERY;
        let pruning = store.prune_ledger(keep_days);
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = pruning => outcome,
        };
        match outcome {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, keep_days, "pruned ledger results past retention"),
            Err(err) => tracing::warn!(error = %err, "ledger pruning failed; next round"),
        }
    }
}
