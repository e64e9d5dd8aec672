//! A supervised broker connection: lapin's auto-recovery handles network failures; when a
//! connection ends for good (closed by the broker, a refused re-login), the link opens a new
//! one, with backoff, for whoever asks next.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionStatus};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How often a wait for the broker at start says that it is still waiting.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(5);

/// Why no first connection was had.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error(
        "RabbitMQ at {address} did not answer within {}s ({reason}): is it running, and is \
         COPILOT_AMQP_URL right?",
        waited.as_secs()
    )]
    NoAnswer {
        address: String,
        waited: Duration,
        reason: String,
    },
    #[error("stopped before RabbitMQ at {address} answered")]
    Stopped { address: String },
}

/// The broker's host and port in an AMQP URL (never its credentials).
fn address_of(url: &str) -> Option<(String, u16)> {
    let uri = url.parse::<lapin::uri::AMQPUri>().ok()?;
    Some((uri.authority.host, uri.authority.port))
}

fn shown(address: Option<&(String, u16)>) -> String {
    match address {
        Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
        Some((host, port)) => format!("{host}:{port}"),
        None => "(an unreadable URL)".to_owned(),
    }
}

/// Whether the broker's port takes a TCP connection now, or why not.
async fn probe(address: Option<&(String, u16)>) -> Result<(), String> {
    let Some((host, port)) = address else {
        return Ok(());
    };
    let attempt = tokio::net::TcpStream::connect((host.as_str(), *port));
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("connecting timed out".to_owned()),
    }
}

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
    /// Opens the first connection. A broker that refuses the session (credentials, vhost)
    /// fails it at once; one that cannot be reached is tried again and again, without end
    /// (lapin's backoff, `retry::broker_reconnect`): see [`Link::open_waiting`].
    pub async fn open(url: &str, name: &str) -> Result<Arc<Link>, lapin::Error> {
        let connection = super::connect(url, name).await?;
        Ok(Arc::new(Link {
            url: url.to_owned(),
            name: name.to_owned(),
            current: RwLock::new(Arc::new(connection)),
            reconnecting: Mutex::new(()),
        }))
    }

    /// Opens the first connection, saying every few seconds that the broker does not answer
    /// yet and why (refused, unresolved, timed out), until `stop` fires or, with
    /// `give_up_after`, that long has passed. The service waits for a broker that starts
    /// after it; a command run by hand gives up.
    ///
    /// lapin is asked only once the broker's port takes a TCP connection: a connection it
    /// could not make would keep retrying on its own thread (our endless backoff), past a
    /// stop or a give-up, until the process ends.
    pub async fn open_waiting(
        url: &str,
        name: &str,
        stop: &CancellationToken,
        give_up_after: Option<Duration>,
    ) -> Result<Arc<Link>, OpenError> {
        let address = address_of(url);
        let started = Instant::now();
        let mut told: Option<Instant> = None;
        let mut still_waiting = |reason: &str| -> Result<(), OpenError> {
            let waited = started.elapsed();
            if give_up_after.is_some_and(|limit| waited >= limit) {
                return Err(OpenError::NoAnswer {
                    address: shown(address.as_ref()),
                    waited,
                    reason: reason.to_owned(),
                });
            }
            if told.is_none_or(|at| at.elapsed() >= STILL_WAITING_EVERY) {
                told = Some(Instant::now());
                tracing::warn!(
                    broker = %shown(address.as_ref()),
                    waited_secs = waited.as_secs(),
                    reason,
                    "RabbitMQ does not answer yet; still trying"
                );
            }
            Ok(())
        };
        let stopped = || OpenError::Stopped {
            address: shown(address.as_ref()),
        };
        while let Err(reason) = probe(address.as_ref()).await {
            still_waiting(&reason)?;
            tokio::select! {
                () = stop.cancelled() => return Err(stopped()),
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        let opening = Link::open(url, name);
        tokio::pin!(opening);
        let mut every = tokio::time::interval_at(
            tokio::time::Instant::now() + STILL_WAITING_EVERY,
            STILL_WAITING_EVERY,
        );
        loop {
            tokio::select! {
                opened = &mut opening => return Ok(opened?),
                () = stop.cancelled() => return Err(stopped()),
                _ = every.tick() => still_waiting("its port takes connections, but no AMQP session came")?,
            }
        }
    }

    /// [`Link::open_waiting`] for a command run by hand: it gives up after 10 s.
    pub async fn open_for_command(url: &str, name: &str) -> Result<Arc<Link>, OpenError> {
        Link::open_waiting(
            url,
            name,
            &CancellationToken::new(),
            Some(Duration::from_secs(10)),
        )
        .await
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
