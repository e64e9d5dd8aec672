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
//! Notifications can stop coming without a word. A NAT or a firewall that forgets an idle
//! flow drops its packets and sends no reset, and a listener only ever reads, so it would wait
//! for ever; a transaction-mode PgBouncer accepts `LISTEN` and passes nothing on. Either way
//! a revoked key would stay in use. So the listener sends itself a notification every
//! [`PROBE_EVERY`], on a channel of its own, and waits for it to come back. Postgres delivers
//! a session's notifications in commit order, so once a check is back every change committed
//! before it was sent has been evicted: the cache is trusted for [`TRUSTED_FOR`] after the
//! last check that came back was sent. A check not back within [`PROBE_TIMEOUT`] ends the
//! connection, to be opened again. The checks also keep the flow from looking idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::configs::ProviderConfig;
use super::tls::Messages;
use super::{Store, StoreError};
use crate::telemetry as m;

/// The notification channel the trigger uses.
pub const CHANNEL: &str = "copilot_provider_configs";

/// How often the listener sends itself a notification to see that notifications still come.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long after a check that came back was sent the cache is trusted: a notification lost
/// in a connection that died in silence leaves a stale entry in use for at most this long.
pub const TRUSTED_FOR: Duration = Duration::from_secs(2);
/// A check not back after this long ends the listener's connection (a slow server only makes
/// the cache untrusted for a while; a deaf connection is given up).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

type Entries = HashMap<String, Option<Arc<ProviderConfig>>>;

/// Provider configs by org, `None` meaning "no config" (also cached).
pub struct ConfigCache {
    store: Store,
    entries: RwLock<Entries>,
    generation: AtomicU64,
    /// When the cache was made; `trusted_until` counts from it.
    epoch: Instant,
    /// Milliseconds after `epoch` until which the listener is known to hear the server; 0 until
    /// a check comes back on the listener's current connection.
    trusted_until: AtomicU64,
}

impl ConfigCache {
    /// Creates the cache and starts its listener, which runs until `shutdown`.
    pub fn start(store: Store, shutdown: CancellationToken) -> Arc<ConfigCache> {
        let cache = Arc::new(ConfigCache {
            store,
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            // Made a minute ago, so that checks sent before now are still after it.
            epoch: Instant::now() - Duration::from_secs(60),
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

    /// Trusts the cache until [`TRUSTED_FOR`] after `heard`, when a check that came back was
    /// sent (never moving the limit back).
    fn heard(&self, heard: Instant) {
        // At least 1: 0 stands for "no check back on this connection".
        let until = self.millis(heard + TRUSTED_FOR).max(1);
        if self.trusted_until.fetch_max(until, Ordering::SeqCst) == 0 {
            metrics::gauge!(m::CONFIG_LISTENER_UP).set(1.0);
            tracing::info!("config listener hears Postgres; the config cache is in use");
        }
    }

    /// Stops trusting the cache and empties it: the listener's connection is gone. Returns
    /// whether a check had come back on it.
    fn deaf(&self) -> bool {
        let was_heard = self.trusted_until.swap(0, Ordering::SeqCst) != 0;
        self.clear();
        metrics::gauge!(m::CONFIG_LISTENER_UP).set(0.0);
        was_heard
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
    /// The connection failed, or could not be had.
    Failed(String),
    /// A check's own notification did not come back in time.
    Deaf,
}

/// Keeps a dedicated connection listening; reconnects with backoff when it drops or no longer
/// hears its own checks.
async fn listen(cache: Arc<ConfigCache>, shutdown: CancellationToken) {
    let mut waits = crate::provider::retry::outage_backoff();
    // Set after a failure was logged at warn, so that a listener that keeps failing (behind a
    // transaction-mode PgBouncer, say) warns once, and says so when it hears again.
    let mut warned = false;
    loop {
        let (ended, was_heard) = match cache.store.target().connect().await {
            Ok((client, notifications, driver)) => {
                let ended = tokio::select! {
                    () = shutdown.cancelled() => Ended::Shutdown,
                    ended = hear(&cache, &client, notifications) => ended,
                };
                let was_heard = cache.deaf();
                drop(client);
                driver.abort();
                (ended, was_heard)
            }
            Err(err) => (Ended::Failed(err.to_string()), false),
        };
        let why = match ended {
            Ended::Shutdown => return,
            Ended::Failed(why) => why,
            Ended::Deaf => format!(
                "its own notification did not come back within {} s (a silent connection, or \
                 a transaction-mode PgBouncer, which does not pass notifications on)",
                PROBE_TIMEOUT.as_secs()
            ),
        };
        if was_heard {
            waits = crate::provider::retry::outage_backoff();
            warned = false;
        }
        if warned {
            tracing::debug!(error = %why, "config listener still cannot hear Postgres");
        } else {
            tracing::warn!(
                error = %why,
                "config listener cannot hear Postgres; configs are read from Postgres for \
                 every event until it can"
            );
            warned = true;
        }
        let wait = waits.next().unwrap_or(Duration::from_secs(5));
        if !crate::sleep_unless_stopped(wait, &shutdown).await {
            return;
        }
    }
}

/// Listens on one connection: evicts what the notifications name, and sends itself a check
/// every [`PROBE_EVERY`], trusting the cache as the checks come back. Returns when the
/// connection fails or a check does not come back.
async fn hear(cache: &ConfigCache, client: &Client, mut notifications: Messages) -> Ended {
    let echo_channel = match subscribe(client).await {
        Ok(channel) => channel,
        Err(err) => return Ended::Failed(err.to_string()),
    };
    // Anything cached before this point may have missed a notification.
    cache.clear();
    let (echoed, mut echoes) = tokio::sync::watch::channel(0_u64);
    let evict = async {
        loop {
            match notifications.recv().await {
                Some(Ok(AsyncMessage::Notification(note))) if note.channel() == echo_channel => {
                    echoed.send_replace(note.payload().parse().unwrap_or(0));
                }
                Some(Ok(AsyncMessage::Notification(note))) => cache.evict(note.payload()),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Ended::Failed(err.to_string()),
                None => return Ended::Failed("the connection ended".to_owned()),
            }
        }
    };
    let check = async {
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0_u64;
        loop {
            ticks.tick().await;
            seq += 1;
            let asked = Instant::now();
            // One transaction (a simple query's statements share one); the notification is
            // sent at its commit, which need not wait for the disk. `SET LOCAL`, so that
            // nothing outlives the check on a pooled server connection.
            let notify = format!(
                "SET LOCAL synchronous_commit = off; SELECT pg_notify('{echo_channel}', '{seq}')"
            );
            let back = async {
                client.simple_query(&notify).await?;
                // The watch holds the latest sequence number back (or fails with `evict`).
                let _ = echoes.wait_for(|echo| *echo >= seq).await;
                Ok::<_, tokio_postgres::Error>(())
            };
            match tokio::time::timeout(PROBE_TIMEOUT, back).await {
                Ok(Ok(())) => cache.heard(asked),
                Ok(Err(err)) => return Ended::Failed(err.to_string()),
                Err(_) => return Ended::Deaf,
            }
        }
    };
    tokio::select! {
        ended = evict => ended,
        ended = check => ended,
    }
}

/// Listens for config changes and for the connection's own checks, on a channel named after
/// the server process (unique on the server while the session lasts); returns that channel.
async fn subscribe(client: &Client) -> Result<String, tokio_postgres::Error> {
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let echo_channel = format!("copilot_config_check_{pid}");
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {echo_channel}"))
        .await?;
    Ok(echo_channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ConfigCache {
        ConfigCache {
            store: Store::connect("postgres://127.0.0.1/unused", 1).unwrap(),
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            // Made a minute ago, so that checks sent before now are still after it.
            epoch: Instant::now() - Duration::from_secs(60),
            trusted_until: AtomicU64::new(0),
        }
    }

    /// Trust lasts `TRUSTED_FOR` from when the last check that came back was sent, a check
    /// that comes back late never shortens it, and it ends with the listener.
    #[tokio::test]
    async fn the_cache_is_trusted_for_a_while_after_each_check_that_came_back() {
        let cache = cache();
        assert!(!cache.is_listening(), "not before a first check");
        let now = Instant::now();
        cache.heard(now - TRUSTED_FOR - Duration::from_millis(10));
        assert!(!cache.is_listening(), "a check sent too long ago");
        cache.heard(now);
        assert!(cache.is_listening());
        cache.heard(now - Duration::from_secs(1));
        assert_eq!(
            cache.trusted_until.load(Ordering::SeqCst),
            cache.millis(now + TRUSTED_FOR),
            "an older check does not move the limit back"
        );
        cache.deaf();
        assert!(!cache.is_listening());
    }
}
