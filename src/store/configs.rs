//! Provider configs: one row per organization, its API key sealed by [`crate::crypto`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use tokio_postgres::types::Json;

use super::{Store, StoreError};
use crate::crypto::Sealed;
use crate::provider::Profile;

/// Model parameters an org sets for its provider; every one is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// Sampling temperature, 0..=2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Upper bound on completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Per-request timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Azure OpenAI `api-version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

/// What the org tells the prompts about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgContext {
    /// The org's own ticket categories; triage picks only from these when present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Tone for reply drafts, e.g. "friendly and concise".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_tone: Option<String>,
    /// Language for reply drafts (ISO 639-1); otherwise the customer's language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_language: Option<String>,
}

/// The last test or run outcome of an org's config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub last_success_at: Option<String>,
    pub last_error_at: Option<String>,
    pub last_error: Option<String>,
}

/// One org's provider configuration as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub org_id: String,
    pub profile: Profile,
    pub base_url: String,
    pub model: String,
    /// The sealed API key; `None` only for profiles that need none (Ollama).
    pub api_key: Option<Sealed>,
    pub params: ModelParams,
    /// Workers this org runs; `None` means every worker.
    pub enabled_workers: Option<Vec<String>>,
    /// Per-worker model overrides.
    pub worker_models: BTreeMap<String, String>,
    pub context: OrgContext,
    /// Most provider calls in flight at once for this org, across all replicas (each takes
    /// a share).
    pub max_concurrency: Option<u32>,
    pub enabled: bool,
    pub health: Health,
}

impl ProviderConfig {
    /// Whether `worker` runs for this org.
    pub fn runs(&self, worker: &str) -> bool {
        self.enabled_workers
            .as_ref()
            .is_none_or(|workers| workers.iter().any(|name| name == worker))
    }

    /// The model to use for `worker`.
    pub fn model_for(&self, worker: &str) -> &str {
        self.worker_models
            .get(worker)
            .map(String::as_str)
            .unwrap_or(&self.model)
    }
}

const COLUMNS: &str = "org_id, profile, base_url, model, api_key_key_id, api_key_sealed, params, \
    enabled_workers, worker_models, context, max_concurrency, enabled, healthy, \
    to_char(last_success_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
    to_char(last_error_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), last_error";

fn from_row(row: &Row) -> Result<ProviderConfig, StoreError> {
    let org_id: String = row.try_get(0)?;
    let profile_text: String = row.try_get(1)?;
    let profile = Profile::parse(&profile_text).ok_or_else(|| {
        StoreError::Invalid(format!("org {org_id}: unknown profile {profile_text:?}"))
    })?;
    let key_id: Option<String> = row.try_get(4)?;
    let sealed: Option<Vec<u8>> = row.try_get(5)?;
    let Json(params): Json<ModelParams> = row.try_get(6)?;
    let Json(worker_models): Json<BTreeMap<String, String>> = row.try_get(8)?;
    let Json(context): Json<OrgContext> = row.try_get(9)?;
    let max_concurrency: Option<i32> = row.try_get(10)?;
    Ok(ProviderConfig {
        org_id,
        profile,
        base_url: row.try_get(2)?,
        model: row.try_get(3)?,
        api_key: key_id
            .zip(sealed)
            .map(|(key_id, blob)| Sealed { key_id, blob }),
        params,
        enabled_workers: row.try_get(7)?,
        worker_models,
        context,
        max_concurrency: max_concurrency.and_then(|cap| u32::try_from(cap).ok()),
        enabled: row.try_get(11)?,
        health: Health {
            healthy: row.try_get(12)?,
            last_success_at: row.try_get(13)?,
            last_error_at: row.try_get(14)?,
            last_error: row.try_get(15)?,
        },
    })
}

/// What [`Store::edit_provider_config`] stored.
#[derive(Debug)]
pub struct Edited {
    pub config: ProviderConfig,
    /// There was no config for the org before.
    pub created: bool,
    /// The edit changed something. An edit that changes nothing writes nothing: the config
    /// keeps its health (a failing org is not shown healthy by an empty edit) and no replica
    /// is told to forget it.
    pub changed: bool,
}

/// Whether two configs say the same, their health aside. A key sealed anew never compares
/// equal (each seal has its own nonce), so giving a key always counts as a change.
fn same_settings(a: &ProviderConfig, b: &ProviderConfig) -> bool {
    let b_with_a_health = ProviderConfig {
        health: a.health.clone(),
        ..b.clone()
    };
    *a == b_with_a_health
}

/// Inserts or replaces `config`'s row, marking it healthy again.
async fn upsert(
    client: &impl tokio_postgres::GenericClient,
    config: &ProviderConfig,
) -> Result<(), StoreError> {
    let max_concurrency = config
        .max_concurrency
        .map(|cap| i32::try_from(cap).unwrap_or(i32::MAX));
    client
        .execute(
            "INSERT INTO provider_configs (org_id, profile, base_url, model, api_key_key_id, \
             api_key_sealed, params, enabled_workers, worker_models, context, max_concurrency, \
             enabled) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (org_id) DO UPDATE SET profile = EXCLUDED.profile, \
             base_url = EXCLUDED.base_url, model = EXCLUDED.model, \
             api_key_key_id = EXCLUDED.api_key_key_id, api_key_sealed = EXCLUDED.api_key_sealed, \
             params = EXCLUDED.params, enabled_workers = EXCLUDED.enabled_workers, \
             worker_models = EXCLUDED.worker_models, context = EXCLUDED.context, \
             max_concurrency = EXCLUDED.max_concurrency, enabled = EXCLUDED.enabled, \
             healthy = TRUE, last_error = NULL, last_error_at = NULL, updated_at = now()",
            &[
                &config.org_id,
                &config.profile.as_str(),
                &config.base_url,
                &config.model,
                &config.api_key.as_ref().map(|sealed| sealed.key_id.as_str()),
                &config.api_key.as_ref().map(|sealed| sealed.blob.as_slice()),
                &Json(&config.params),
                &config.enabled_workers,
                &Json(&config.worker_models),
                &Json(&config.context),
                &max_concurrency,
                &config.enabled,
            ],
        )
        .await?;
    Ok(())
}

impl Store {
    /// The config of `org_id`, if it has one.
    pub async fn provider_config(
        &self,
        org_id: &str,
    ) -> Result<Option<ProviderConfig>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM provider_configs WHERE org_id = $1"
            ))
            .await?;
        client
            .query_opt(&statement, &[&org_id])
            .await?
            .map(|row| from_row(&row))
            .transpose()
    }

    /// Every config, ordered by org id.
    pub async fn provider_configs(&self) -> Result<Vec<ProviderConfig>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                &format!("SELECT {COLUMNS} FROM provider_configs ORDER BY org_id"),
                &[],
            )
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Up to `limit` configs whose org id sorts after `after` (all when `None`), ordered by
    /// org id: one page of the admin API's list.
    pub async fn provider_configs_page(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ProviderConfig>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM provider_configs \
                     WHERE $1::text IS NULL OR org_id > $1 ORDER BY org_id LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Creates or replaces an org's config. A replaced config starts healthy again.
    pub async fn put_provider_config(&self, config: &ProviderConfig) -> Result<(), StoreError> {
        let client = self.client().await?;
        upsert(&**client, config).await
    }

    /// Edits an org's config while holding its row: `edit` is given the stored config (none
    /// for a new org) and returns the config to store, or why not (then nothing changes).
    /// Two edits of one org, or an edit and a key rotation, take turns, so neither writes
    /// over what the other just stored. A changed config starts healthy again; an edit that
    /// changes nothing writes nothing (see [`Edited::changed`]).
    pub async fn edit_provider_config<E>(
        &self,
        org_id: &str,
        edit: impl FnOnce(Option<&ProviderConfig>) -> Result<ProviderConfig, E>,
    ) -> Result<Result<Edited, E>, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let stored = transaction
            .query_opt(
                &format!("SELECT {COLUMNS} FROM provider_configs WHERE org_id = $1 FOR UPDATE"),
                &[&org_id],
            )
            .await?
            .map(|row| from_row(&row))
            .transpose()?;
        let config = match edit(stored.as_ref()) {
            Ok(config) => config,
            // Dropping the transaction rolls it back and lets the row go.
            Err(refused) => return Ok(Err(refused)),
        };
        match stored {
            Some(stored) if same_settings(&stored, &config) => {
                return Ok(Ok(Edited {
                    config: stored,
                    created: false,
                    changed: false,
                }));
            }
            _ => {}
        }
        upsert(&*transaction, &config).await?;
        transaction.commit().await?;
        Ok(Ok(Edited {
            created: stored.is_none(),
            changed: true,
            config,
        }))
    }

    /// Removes an org's config; returns whether there was one.
    pub async fn remove_provider_config(&self, org_id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let removed = client
            .execute("DELETE FROM provider_configs WHERE org_id = $1", &[&org_id])
            .await?;
        Ok(removed > 0)
    }

    /// Enables or disables an org's config; returns whether there was one.
    pub async fn set_provider_enabled(
        &self,
        org_id: &str,
        enabled: bool,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE provider_configs SET enabled = $2, updated_at = now() WHERE org_id = $1",
                &[&org_id, &enabled],
            )
            .await?;
        Ok(changed > 0)
    }

    /// Records a successful provider call (from `org test`).
    pub async fn record_provider_success(&self, org_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE provider_configs SET healthy = TRUE, last_success_at = now() \
                 WHERE org_id = $1",
                &[&org_id],
            )
            .await?;
        Ok(())
    }

    /// Records a provider failure; `unhealthy` marks the config as needing the org's attention
    /// (a permanent error such as a revoked key). `message` must hold no secret.
    pub async fn record_provider_failure(
        &self,
        org_id: &str,
        message: &str,
        unhealthy: bool,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE provider_configs SET healthy = healthy AND NOT $3, last_error = $2, \
                 last_error_at = now() WHERE org_id = $1",
                &[&org_id, &message, &unhealthy],
            )
            .await?;
        Ok(())
    }

    /// Replaces one org's sealed key if it is still the one that was read (`previous`), so a
    /// concurrent `org set` is never overwritten by a rotation. Returns whether it changed.
    pub async fn replace_sealed_key(
        &self,
        org_id: &str,
        previous: &Sealed,
        next: &Sealed,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE provider_configs SET api_key_key_id = $4, api_key_sealed = $5 \
                 WHERE org_id = $1 AND api_key_key_id = $2 AND api_key_sealed = $3",
                &[
                    &org_id,
                    &previous.key_id,
                    &previous.blob,
                    &next.key_id,
                    &next.blob,
                ],
            )
            .await?;
        Ok(changed > 0)
    }
}

impl Store {
    /// The distinct master key ids that sealed stored API keys.
    pub async fn sealed_key_ids(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT DISTINCT api_key_key_id FROM provider_configs \
                 WHERE api_key_key_id IS NOT NULL ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

impl Store {
    /// (configs stored, configs unhealthy), for the gauges.
    pub async fn config_health_counts(&self) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE NOT healthy) FROM provider_configs",
                &[],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }
}
