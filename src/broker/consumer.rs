//! The consumer loop of one worker queue: `basic_qos` before `basic_consume`, manual acks,
//! one task per delivery in a [`TaskTracker`], and a `select!` over shutdown and the stream.
//!
//! When the connection drops, lapin recovers the channel and consumer and we wait for it;
//! while it is down nothing is consumed and nothing is nacked. On shutdown the consumer is
//! cancelled first, so no new delivery arrives while in-flight ones finish.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
                    running.fetch_add(1, Ordering::SeqCst);
                    self.pump(&channel, consumer, tracker, &shutdown, &running, &handle)
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
        tracing::info!(queue = %self.queue, prefetch = self.prefetch, "consuming");
        Ok((channel, consumer))
    }

    async fn pump<H, Fut>(
        &self,
        channel: &Channel,
        mut consumer: lapin::Consumer,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        running: &AtomicUsize,
        handle: &H,
    ) where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let tag = consumer.tag();
                    if let Err(err) = channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                        tracing::debug!(error = %err, "consumer cancel failed");
                    }
                    return;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tracker.spawn(handle(delivery));
                    }
                    Some(Err(err)) => {
                        tracing::warn!(queue = %self.queue, error = %err, "consumer interrupted; waiting for recovery");
                        // Not ready while the connection recovers.
                        running.fetch_sub(1, Ordering::SeqCst);
                        let recovered = channel.wait_for_recovery(err).await;
                        running.fetch_add(1, Ordering::SeqCst);
                        if let Err(err) = recovered {
                            tracing::warn!(queue = %self.queue, error = %err, "recovery failed; re-attaching");
                            return;
                        }
                        tracing::info!(queue = %self.queue, "consumer recovered");
                    }
                    None => {
                        tracing::warn!(queue = %self.queue, "consumer stream ended; re-attaching");
                        return;
                    }
                }
            }
        }
    }
}
