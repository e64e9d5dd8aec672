//! A supervised broker connection: lapin's auto-recovery handles network failures; when a
//! connection ends for good (closed by the broker, a refused re-login), the link opens a new
//! one, with backoff, for whoever asks next.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::{Connection, ConnectionStatus};
use tokio::sync::Mutex;

/// One logical connection to the broker, replaced when it dies.
pub struct Link {
    url: String,
    name: String,
    current: RwLock<Arc<Connection>>,
    /// Serializes reconnections so that many callers wait for one new connection.
    reconnecting: Mutex<()>,
}

fn alive(status: &ConnectionStatus) -> bool {
    !(status.closed() || status.errored())
}

impl Link {
    /// Opens the first connection; fails if the broker cannot be reached now.
    pub async fn open(url: &str, name: &str) -> Result<Arc<Link>, lapin::Error> {
        let connection = super::connect(url, name).await?;
        Ok(Arc::new(Link {
            url: url.to_owned(),
            name: name.to_owned(),
            current: RwLock::new(Arc::new(connection)),
            reconnecting: Mutex::new(()),
        }))
    }

    fn snapshot(&self) -> Arc<Connection> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the current connection is up right now (not recovering, not dead).
    pub fn connected(&self) -> bool {
        self.snapshot().status().connected()
    }

    /// The current connection, replaced first if it has died. Waits (with backoff) until the
    /// broker accepts a new one.
    pub async fn connection(&self) -> Arc<Connection> {
        let current = self.snapshot();
        if alive(current.status()) {
            return current;
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.snapshot();
        if alive(current.status()) {
            return current;
        }
        let mut waits = crate::provider::retry::outage_backoff();
        loop {
            match super::connect(&self.url, &self.name).await {
                Ok(connection) => {
                    tracing::info!(connection = %self.name, "broker connection re-established");
                    let connection = Arc::new(connection);
                    match self.current.write() {
                        Ok(mut slot) => *slot = connection.clone(),
                        Err(poisoned) => *poisoned.into_inner() = connection.clone(),
                    }
                    return connection;
                }
                Err(err) => {
                    let wait = waits.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(connection = %self.name, error = %err, ?wait, "broker connection lost for good; reconnecting");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Closes the current connection (on shutdown); unacked deliveries go back to the broker.
    pub async fn close(&self) {
        let _ = self.snapshot().close(200, "shutdown".into()).await;
    }
}
