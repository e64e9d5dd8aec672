//! A per-process cache of provider configs, invalidated by Postgres `LISTEN/NOTIFY`.
//!
//! Every change to `provider_configs` fires a notification (a trigger, see the first
//! migration) that each replica's listener turns into an eviction, so a removed, disabled or
//! re-keyed config stops being used on the next event. The cache is only trusted while its
//! listener is connected: when the listener is down, every lookup goes to Postgres and the
//! cache is emptied once the listener is back. A generation counter keeps a read that raced
//! with a notification from putting a stale value back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::configs::ProviderConfig;
use super::{Store, StoreError};
use crate::telemetry as m;

/// The notification channel the trigger uses.
pub const CHANNEL: &str = "copilot_provider_configs";

type Entries = HashMap<String, Option<Arc<ProviderConfig>>>;

/// Provider configs by org, `None` meaning "no config" (also cached).
pub struct ConfigCache {
    store: Store,
    entries: RwLock<Entries>,
    generation: AtomicU64,
    listening: AtomicBool,
}

impl ConfigCache {
    /// Creates the cache and starts its listener, which runs until `shutdown`.
    pub fn start(store: Store, shutdown: CancellationToken) -> Arc<ConfigCache> {
        let cache = Arc::new(ConfigCache {
            store,
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        });
        tokio::spawn(listen(cache.clone(), shutdown));
        cache
    }

    /// Whether the listener is connected (and the cache in use).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// The config of `org_id`, from the cache when it can be trusted.
    pub async fn get(&self, org_id: &str) -> Result<Option<Arc<ProviderConfig>>, StoreError> {
        if self.is_listening()
            && let Some(hit) = self
                .entries
                .read()
                .ok()
                .and_then(|entries| entries.get(org_id).cloned())
        {
            metrics::counter!(m::CONFIG_CACHE_HITS).increment(1);
            return Ok(hit);
        }
        metrics::counter!(m::CONFIG_CACHE_MISSES).increment(1);
        let generation = self.generation.load(Ordering::SeqCst);
        let fresh = self.store.provider_config(org_id).await?.map(Arc::new);
        if self.is_listening()
            && let Ok(mut entries) = self.entries.write()
            && self.generation.load(Ordering::SeqCst) == generation
        {
            entries.insert(org_id.to_owned(), fresh.clone());
        }
        Ok(fresh)
    }

    fn evict(&self, org_id: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(org_id);
        }
        metrics::counter!(m::CONFIG_CACHE_INVALIDATIONS).increment(1);
    }

    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
    }
}

/// Keeps a dedicated connection listening; reconnects with backoff when it drops.
async fn listen(cache: Arc<ConfigCache>, shutdown: CancellationToken) {
    let mut waits = crate::provider::retry::outage_backoff();
    while !shutdown.is_cancelled() {
        match cache.store.target().connect().await {
            Ok((client, mut notifications, driver)) => {
                if let Err(err) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %err, "cannot LISTEN for config changes");
                } else {
                    // Anything cached before this point may have missed a notification.
                    cache.clear();
                    cache.listening.store(true, Ordering::SeqCst);
                    waits = crate::provider::retry::outage_backoff();
                    tracing::debug!("listening for provider config changes");
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            message = notifications.recv() => match message {
                                Some(Ok(AsyncMessage::Notification(note))) => cache.evict(note.payload()),
                                Some(Ok(_)) => {}
                                Some(Err(err)) => {
                                    tracing::warn!(error = %err, "config listener lost its connection");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
                cache.listening.store(false, Ordering::SeqCst);
                cache.clear();
                drop(client);
                driver.abort();
            }
            Err(err) => tracing::warn!(error = %err, "config listener cannot connect"),
        }
        let wait = waits.next().unwrap_or(Duration::from_secs(5));
        if !crate::sleep_unless_stopped(wait, &shutdown).await {
            return;
        }
    }
}
