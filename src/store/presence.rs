//! Which replicas serve which capped org (`org_presence`), so that an org's own concurrency
//! cap is shared among the replicas serving it instead of granted whole to each of them.
//!
//! Every replica writes a row per capped org it served since its last beat and reads the
//! other replicas' recent rows. A row older than the window no longer counts: its replica
//! stopped serving the org, or stopped altogether.

use std::time::Duration;

use super::{Store, StoreError};

/// The other replicas serving one org, as the last beat saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peers {
    /// How many other replicas serve the org.
    pub others: u32,
    /// How many of them sort before this one by instance id: this replica's rank, which
    /// decides who gets the remainder when the cap does not divide evenly.
    pub before: u32,
}

/// Rows older than this are deleted; they stopped counting long before.
const FORGET_AFTER_SECS: f64 = 60.0;

impl Store {
    /// Records that `instance` serves `orgs` now, and returns, for every org some other
    /// replica served within `window`, those replicas.
    pub async fn share_presence(
        &self,
        instance: &str,
        orgs: &[String],
        window: Duration,
    ) -> Result<Vec<(String, Peers)>, StoreError> {
        let client = self.client().await?;
        if !orgs.is_empty() {
            let upsert = client
                .prepare_cached(
                    "INSERT INTO org_presence (org_id, instance, seen_at) \
                     SELECT org_id, $2, now() FROM unnest($1::text[]) AS o(org_id) \
                     ORDER BY org_id \
                     ON CONFLICT (org_id, instance) DO UPDATE SET seen_at = EXCLUDED.seen_at",
                )
                .await?;
            client.execute(&upsert, &[&orgs, &instance]).await?;
        }
        let peers = client
            .prepare_cached(
                "SELECT org_id, count(*)::int4, (count(*) FILTER (WHERE instance < $1))::int4 \
                 FROM org_presence \
                 WHERE instance <> $1 AND seen_at >= now() - make_interval(secs => $2) \
                 GROUP BY org_id",
            )
            .await?;
        let rows = client
            .query(&peers, &[&instance, &window.as_secs_f64()])
            .await?;
        let mut seen = Vec::with_capacity(rows.len());
        for row in rows {
            let others: i32 = row.try_get(1)?;
            let before: i32 = row.try_get(2)?;
            seen.push((
                row.try_get(0)?,
                Peers {
                    others: u32::try_from(others).unwrap_or(0),
                    before: u32::try_from(before).unwrap_or(0),
                },
            ));
        }
        let forget = client
            .prepare_cached(
                "DELETE FROM org_presence WHERE (org_id, instance) IN ( \
                   SELECT org_id, instance FROM org_presence \
                   WHERE seen_at < now() - make_interval(secs => $1) FOR UPDATE SKIP LOCKED)",
            )
            .await?;
        client.execute(&forget, &[&FORGET_AFTER_SECS]).await?;
        Ok(seen)
    }

    /// Removes `instance`'s rows, so that the replicas left take its shares at once.
    pub async fn leave_presence(&self, instance: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM org_presence WHERE instance = $1", &[&instance])
            .await?;
        Ok(())
    }
}
