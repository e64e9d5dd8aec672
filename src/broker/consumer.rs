//! The consumer loop of one worker queue: `basic_qos` before `basic_consume`, manual acks,
//! one task per delivery in a [`TaskTracker`], and a `select!` over shutdown and the stream.
//!
//! When the connection drops, lapin recovers the channel and consumer and we wait for it;
//! while it is down nothing is consumed and nothing is nacked. On shutdown the consumer is
//! cancelled first, so no new delivery arrives while in-flight ones finish.
//!
//! A consumer that has received nothing for a while, with nothing of its own in flight, is
//! attached again on a new channel and its old channel closed (`renew_idle`). The broker can
//! stop feeding a consumer without telling it: a quorum queue deleted and declared again by
//! another client within ≈30 ms (RabbitMQ 3.10) leaves its consumers attached to nothing, no
//! cancel, and they go on taking deliveries the client never sees, up to the prefetch, held
//! until their channel closes. Closing the channel hands them back; for a consumer that is
//! only idle, renewing costs a channel.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::{Link, TopologyKeeper};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running consumer on one queue.
pub struct Consumer {
    pub queue: String,
    pub prefetch: u16,
    /// Declares the topology again when the queue has gone missing (none: just wait).
    pub keeper: Option<Arc<TopologyKeeper>>,
    /// Attach again on a new channel after this long with no delivery and none of this
    /// consumer's in flight (none: never); see the module's doc.
    pub renew_idle: Option<Duration>,
}

impl Consumer {
    /// Consumes until `shutdown` fires, handing each delivery to `handle` on its own task.
    /// `running` counts consumers that are attached right now (readiness).
    pub async fn run<H, Fut>(
        self,
        link: &Link,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
        running: Arc<AtomicUsize>,
        handle: H,
    ) where
        H: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        while !shutdown.is_cancelled() {
            let connection = tokio::select! {
                () = shutdown.cancelled() => return,
                connection = link.connection() => connection,
            };
            match self.attach(&connection).await {
                Ok((channel, consumer)) => {
                    tracing::info!(queue = %self.queue, prefetch = self.prefetch, "consuming");
                    running.fetch_add(1, Ordering::SeqCst);
                    let attached = Attached {
                        connection: &connection,
                        channel,
                        consumer,
                    };
                    self.pump(attached, tracker, &shutdown, &running, &handle)
                        .await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    if shutdown.is_cancelled() {
                        // Dropping the handle does not close the channel: in-flight
                        // deliveries are still acked on it until the connection closes.
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(queue = %self.queue, error = %err, "cannot attach consumer; retrying");
                    if let Some(keeper) = &self.keeper
                        && super::is_not_found(&err)
                    {
                        keeper.restore().await;
                    }
                }
            }
            if !crate::sleep_unless_stopped(Duration::from_secs(1), &shutdown).await {
                return;
            }
        }
    }

    async fn attach(
        &self,
        connection: &Connection,
    ) -> Result<(Channel, lapin::Consumer), lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.clone().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }

    /// Attaches a new consumer, then closes the old one's channel, which hands back anything
    /// the broker had sent it. Keeps the old one when a new one cannot be attached.
    async fn renew(&self, attached: &mut Attached<'_>, tracker: &TaskTracker) {
        match self.attach(attached.connection).await {
            Ok((channel, consumer)) => {
                let old = std::mem::replace(&mut attached.channel, channel);
                attached.consumer = consumer;
                metrics::counter!(crate::telemetry::CONSUMERS_RENEWED).increment(1);
                tracing::debug!(queue = %self.queue, "idle consumer renewed on a new channel");
                tracker.spawn(async move {
                    if let Err(err) = old.close(200, "renewed".into()).await {
                        tracing::debug!(error = %err, "closing a renewed consumer's channel failed");
                    }
                });
            }
            Err(err) => {
                tracing::debug!(queue = %self.queue, error = %err, "cannot renew an idle consumer; keeping it");
            }
        }
    }

    async fn pump<H, Fut>(
        &self,
        mut attached: Attached<'_>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        running: &AtomicUsize,
        handle: &H,
    ) where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Deliveries not yet handled: a renewal waits for none, since closing their channel
        // would hand them back while they run. (A tracker's wrapper, not an `async` block
        // around the delivery's future: such a block stores that future twice, and the
        // spawn copied ≈13 KB per event.)
        let held = TaskTracker::new();
        let mut quiet_since = Instant::now();
        // Checked twice per idle period, so that a renewal comes 1 to 1.5 periods after the
        // last delivery; one timer for the consumer's life, not one armed per delivery.
        let mut checks = self.renew_idle.map(|idle| {
            let every = idle / 2;
            let mut checks = tokio::time::interval_at(Instant::now() + every, every);
            checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            checks
        });
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let tag = attached.consumer.tag();
                    if let Err(err) = attached.channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                        tracing::debug!(error = %err, "consumer cancel failed");
                    }
                    return;
                }
                next = attached.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        quiet_since = Instant::now();
                        tracker.spawn(held.track_future(handle(delivery)));
                    }
                    Some(Err(err)) => {
                        tracing::warn!(queue = %self.queue, error = %err, "consumer interrupted; waiting for recovery");
                        // Not ready while the connection recovers.
                        running.fetch_sub(1, Ordering::SeqCst);
                        let recovered = attached.channel.wait_for_recovery(err).await;
                        running.fetch_add(1, Ordering::SeqCst);
                        if let Err(err) = recovered {
                            tracing::warn!(queue = %self.queue, error = %err, "recovery failed; re-attaching");
                            return;
                        }
                        tracing::info!(queue = %self.queue, "consumer recovered");
                        quiet_since = Instant::now();
                    }
                    None => {
                        tracing::warn!(queue = %self.queue, "consumer stream ended; re-attaching");
                        return;
                    }
                },
                () = next_check(&mut checks) => {
                    let idle = self.renew_idle.is_some_and(|idle| quiet_since.elapsed() >= idle);
                    // Not while lapin recovers the connection: the recovered consumer would
                    // be a second one, fed with nobody reading it.
                    if idle
                        && held.is_empty()
                        && attached.channel.status().connected()
                    {
                        self.renew(&mut attached, tracker).await;
                        quiet_since = Instant::now();
                    }
                }
            }
        }
    }
}

/// A consumer and the channel and connection it was attached on.
struct Attached<'a> {
    connection: &'a Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

/// The next idle check, or never when renewal is off.
async fn next_check(checks: &mut Option<tokio::time::Interval>) {
    match checks {
        Some(checks) => {
            checks.tick().await;
        }
        None => std::future::pending().await,
    }
}
