//! A per-process cache of provider configs, invalidated by Postgres `LISTEN/NOTIFY`.
//!
//! Every change to `provider_configs` fires a notification (a trigger, see the first
//! migration) that each replica's listener turns into an eviction, so a removed, disabled or
//! re-keyed config stops being used on the next event. The cache is only trusted while its
//! listener is connected and has shown it still hears the server: when the listener is down,
//! every lookup goes to Postgres and the cache is emptied once the listener is back. A
//! generation counter keeps a read that raced with a notification from putting a stale value
//! back.
//!
//! A connection can die without a word: a NAT or a firewall that forgets an idle flow drops
//! its packets and sends no reset, and a listener only ever reads, so it would wait for the
//! next notification for ever while a revoked key stayed in use. The listener therefore asks
//! the server a trivial question every [`PROBE_EVERY`]; the cache is trusted for
//! [`TRUSTED_FOR`] after the last question that was answered was sent, and a question left
//! unanswered for [`PROBE_TIMEOUT`] ends the connection, to be opened again. The questions
//! also keep the flow from looking idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::configs::ProviderConfig;
use super::{Store, StoreError};
use crate::telemetry as m;

/// The notification channel the trigger uses.
pub const CHANNEL: &str = "copilot_provider_configs";

/// How often the listener checks that its connection still carries what the server sends.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long after an answered check was sent the cache is trusted: a notification lost in a
/// connection that died in silence leaves a stale entry in use for at most this long.
pub const TRUSTED_FOR: Duration = Duration::from_secs(2);
/// A check unanswered this long ends the listener's connection (a slow server only makes the
/// cache untrusted for a while; a dead connection is given up).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

type Entries = HashMap<String, Option<Arc<ProviderConfig>>>;

/// Provider configs by org, `None` meaning "no config" (also cached).
pub struct ConfigCache {
    store: Store,
    entries: RwLock<Entries>,
    generation: AtomicU64,
    /// When the cache was made; `trusted_until` counts from it.
    epoch: Instant,
    /// Milliseconds after `epoch` until which the listener is known to hear the server; 0 while
    /// it is not listening.
    trusted_until: AtomicU64,
}

impl ConfigCache {
    /// Creates the cache and starts its listener, which runs until `shutdown`.
    pub fn start(store: Store, shutdown: CancellationToken) -> Arc<ConfigCache> {
        let cache = Arc::new(ConfigCache {
            store,
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            epoch: Instant::now(),
            trusted_until: AtomicU64::new(0),
        });
        metrics::gauge!(m::CONFIG_LISTENER_UP).set(0.0);
        tokio::spawn(listen(cache.clone(), shutdown));
        cache
    }

    /// Whether the listener is connected and was heard from lately (and the cache in use).
    pub fn is_listening(&self) -> bool {
        self.millis(Instant::now()) < self.trusted_until.load(Ordering::SeqCst)
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Trusts the cache until [`TRUSTED_FOR`] after `heard`, when the server was last known
    /// to hear the listener and answer it (never moving the limit back).
    fn heard(&self, heard: Instant) {
        self.trusted_until
            .fetch_max(self.millis(heard + TRUSTED_FOR), Ordering::SeqCst);
    }

    /// Stops trusting the cache and empties it: the listener is gone.
    fn deaf(&self) {
        self.trusted_until.store(0, Ordering::SeqCst);
        self.clear();
        metrics::gauge!(m::CONFIG_LISTENER_UP).set(0.0);
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

/// Why a listening connection ended.
enum Ended {
    Shutdown,
    Lost(Option<tokio_postgres::Error>),
    Silent,
    ProbeFailed(tokio_postgres::Error),
}

/// Keeps a dedicated connection listening; reconnects with backoff when it drops or stops
/// answering.
async fn listen(cache: Arc<ConfigCache>, shutdown: CancellationToken) {
    let mut waits = crate::provider::retry::outage_backoff();
    while !shutdown.is_cancelled() {
        match cache.store.target().connect().await {
            Ok((client, mut notifications, driver)) => {
                let asked = Instant::now();
                if let Err(err) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %err, "cannot LISTEN for config changes");
                } else {
                    // Anything cached before this point may have missed a notification.
                    cache.clear();
                    cache.heard(asked);
                    metrics::gauge!(m::CONFIG_LISTENER_UP).set(1.0);
                    waits = crate::provider::retry::outage_backoff();
                    tracing::debug!("listening for provider config changes");
                    let hear = async {
                        loop {
                            match notifications.recv().await {
                                Some(Ok(AsyncMessage::Notification(note))) => {
                                    cache.evict(note.payload());
                                }
                                Some(Ok(_)) => {}
                                Some(Err(err)) => return Ended::Lost(Some(err)),
                                None => return Ended::Lost(None),
                            }
                        }
                    };
                    let probe = async {
                        let mut ticks = tokio::time::interval(PROBE_EVERY);
                        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            ticks.tick().await;
                            let asked = Instant::now();
                            match tokio::time::timeout(
                                PROBE_TIMEOUT,
                                client.simple_query("SELECT 1"),
                            )
                            .await
                            {
                                Ok(Ok(_)) => cache.heard(asked),
                                Ok(Err(err)) => return Ended::ProbeFailed(err),
                                Err(_) => return Ended::Silent,
                            }
                        }
                    };
                    let ended = tokio::select! {
                        () = shutdown.cancelled() => Ended::Shutdown,
                        ended = hear => ended,
                        ended = probe => ended,
                    };
                    match ended {
                        Ended::Shutdown => {}
                        Ended::Lost(err) => tracing::warn!(
                            error = err.map(|err| err.to_string()),
                            "config listener lost its connection; configs are read from \
                             Postgres until it is back"
                        ),
                        Ended::ProbeFailed(err) => tracing::warn!(
                            error = %err,
                            "config listener's connection failed a check; configs are read \
                             from Postgres until it is back"
                        ),
                        Ended::Silent => tracing::warn!(
                            timeout_secs = PROBE_TIMEOUT.as_secs(),
                            "config listener's connection stopped answering; configs are \
                             read from Postgres until a new one listens"
                        ),
                    }
                }
                cache.deaf();
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
