//! Exchange and queue names, and declaring them.
//!
//! ```text
//! tickets.events (topic) ──its types──▶ copilot.worker.<name> (quorum, delivery limit, DLX)
//!   │ no queue bound (by policy: alternate exchange)
//!   └──▶ copilot.events.unrouted (fanout) ──▶ queue of that name ──▶ skipped or dead-lettered
//!                                          │ parked: copilot.delay.<name>.<secs>s (TTL) ─┐
//!                                          │ ◀──────────── dead-lettered back ───────────┘
//!                                          ▼ dead letters
//! copilot.dlx (topic) ──#──▶ copilot.dead_letters (quorum)
//! copilot.results (topic, alternate exchange copilot.results.unrouted ──▶ queue of that name)
//! ```
//! Every name carries the configured prefix, so isolated installations can share a broker.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::events::EventType;

/// A worker's queue and the event types bound to it: those the worker reacts to, so that an
/// event reaches only the queues of workers that will run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub worker: String,
    pub events: Vec<EventType>,
}

impl Subscription {
    pub fn new(worker: &str, events: &[EventType]) -> Subscription {
        Subscription {
            worker: worker.to_owned(),
            events: events.to_vec(),
        }
    }
}

/// How long a restore waits before it declares. RabbitMQ 3.10 tells a deleted quorum queue's
/// consumers ≈30 ms after the delete, and a queue declared again before that keeps them
/// attached to nothing: no cancel, and deliveries held for them that they never see until
/// their channel closes (checked with a second client; `Consumer` renews an idle consumer for
/// that reason). Told in time, they re-attach.
const DECLARE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Declares the topology again when the broker has lost part of it (a queue or an exchange
/// deleted by hand, a node rebuilt without its definitions), so that a running worker heals
/// what it declared at start instead of stranding deliveries until it is restarted. One
/// declaration runs at a time; callers within a second of the last one share it.
pub struct TopologyKeeper {
    topology: Topology,
    workers: Vec<Subscription>,
    link: std::sync::Arc<super::Link>,
    last: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl TopologyKeeper {
    pub fn new(
        topology: Topology,
        workers: Vec<Subscription>,
        link: std::sync::Arc<super::Link>,
    ) -> TopologyKeeper {
        TopologyKeeper {
            topology,
            workers,
            link,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Declares everything again (idempotent, safe from many replicas), on a channel of its
    /// own: a declaration the broker refuses closes the channel it was sent on. Not at once
    /// (`DECLARE_AFTER`): whatever found part of the topology missing may have come right
    /// after an operator deleted a queue.
    pub async fn restore(&self) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        tokio::time::sleep(DECLARE_AFTER).await;
        let declare = async {
            let channel = self.link.connection().await.create_channel().await?;
            let declared = self.topology.declare(&channel, &self.workers).await;
            let _ = channel.close(200, "declared".into()).await;
            declared
        };
        // Bounded: should the broker go away meanwhile, the link would wait for it, and a
        // consumer waiting here would not see a shutdown.
        let declared = tokio::time::timeout(std::time::Duration::from_secs(10), declare).await;
        *last = Some(std::time::Instant::now());
        match declared {
            Ok(Ok(())) => {
                metrics::counter!(crate::telemetry::TOPOLOGY_REDECLARED).increment(1);
                tracing::warn!("part of the broker topology was missing; declared it again");
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot declare the broker topology again yet")
            }
            Err(_) => tracing::warn!("declaring the broker topology again timed out after 10 s"),
        }
    }
}

/// Steps, in seconds, of the delay queues that hold parked events.
pub const DELAY_STEPS_SECS: [u64; 8] = [5, 10, 15, 30, 60, 120, 300, 900];

/// The names of every exchange and queue, for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

impl Topology {
    pub fn new(prefix: &str, delivery_limit: u32) -> Topology {
        Topology {
            prefix: prefix.to_owned(),
            delivery_limit,
        }
    }

    fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }

    /// Where helpdesks publish ticket events (topic, routing key = event type).
    pub fn events_exchange(&self) -> String {
        self.name("tickets.events")
    }

    /// Where results are published (topic).
    pub fn results_exchange(&self) -> String {
        self.name("copilot.results")
    }

    /// Receives results no consumer queue is bound for, so none is lost.
    pub fn unrouted_results(&self) -> String {
        self.name("copilot.results.unrouted")
    }

    /// Receives events no worker queue is bound for, once a policy makes it the events
    /// exchange's alternate exchange: an exchange and a queue of this name, which the worker
    /// consumes (`Pipeline::handle_unrouted`: skipped, or dead-lettered as `unroutable`). A
    /// policy, not an exchange argument:
    /// helpdesks that declare the events exchange themselves, without arguments, would
    /// otherwise be refused (`PRECONDITION_FAILED`), and so would every existing install.
    pub fn unrouted_events(&self) -> String {
        self.name("copilot.events.unrouted")
    }

    pub fn dead_letter_exchange(&self) -> String {
        self.name("copilot.dlx")
    }

    pub fn dead_letter_queue(&self) -> String {
        self.name("copilot.dead_letters")
    }

    pub fn worker_queue(&self, worker: &str) -> String {
        self.name(&format!("copilot.worker.{worker}"))
    }

    pub fn delay_queue(&self, worker: &str, secs: u64) -> String {
        self.name(&format!("copilot.delay.{worker}.{secs}s"))
    }

    /// The smallest delay step at least as long as `wanted` (the largest step otherwise).
    pub fn delay_step(wanted: std::time::Duration) -> u64 {
        DELAY_STEPS_SECS
            .into_iter()
            .find(|step| *step >= wanted.as_secs())
            .unwrap_or(DELAY_STEPS_SECS[DELAY_STEPS_SECS.len() - 1])
    }

    /// The largest delay step no longer than `wanted` (the smallest step otherwise): for a
    /// wait that may end early but not late.
    pub fn delay_step_within(wanted: std::time::Duration) -> u64 {
        DELAY_STEPS_SECS
            .into_iter()
            .rev()
            .find(|step| *step <= wanted.as_secs())
            .unwrap_or(DELAY_STEPS_SECS[0])
    }

    fn quorum_args(&self, dead_letter_exchange: &str) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("quorum"));
        args.insert("x-dead-letter-exchange".into(), long(dead_letter_exchange));
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        args
    }

    /// A consumed queue's arguments (a worker's, the unrouted events'): quorum, the configured
    /// delivery limit, dead letters to the dead-letter exchange.
    pub fn worker_queue_args(&self) -> FieldTable {
        let mut args = self.quorum_args(&self.dead_letter_exchange());
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
        );
        args
    }

    /// Whether the exchange `name` exists, asked without creating it (a passive declare, on
    /// a channel of its own: the broker closes a channel that names a missing exchange).
    pub async fn exchange_exists(
        connection: &lapin::Connection,
        name: &str,
    ) -> Result<bool, lapin::Error> {
        let channel = connection.create_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .exchange_declare(
                ShortString::from(name),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let _ = channel.close(200, "checked".into()).await;
                Ok(true)
            }
            Err(err) if super::is_not_found(&err) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// How many messages the queue `name` holds ready, or None when it does not exist (a
    /// passive declare, on a channel of its own, like [`Topology::exchange_exists`]).
    pub async fn queue_depth(
        connection: &lapin::Connection,
        name: &str,
    ) -> Result<Option<u32>, lapin::Error> {
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .queue_declare(ShortString::from(name), passive, FieldTable::default())
            .await
        {
            Ok(queue) => {
                let _ = channel.close(200, "checked".into()).await;
                Ok(Some(queue.message_count()))
            }
            Err(err) if super::is_not_found(&err) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Declares everything the given workers need. Idempotent; safe from many replicas.
    pub async fn declare(
        &self,
        channel: &Channel,
        workers: &[Subscription],
    ) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut results_args = FieldTable::default();
        results_args.insert("alternate-exchange".into(), long(&self.unrouted_results()));
        let none = FieldTable::default;
        // The results' alternate exchange before the results exchange that names it.
        let exchanges = [
            (self.events_exchange(), ExchangeKind::Topic, none()),
            (self.unrouted_results(), ExchangeKind::Fanout, none()),
            (self.unrouted_events(), ExchangeKind::Fanout, none()),
            (self.results_exchange(), ExchangeKind::Topic, results_args),
            (self.dead_letter_exchange(), ExchangeKind::Topic, none()),
        ];
        for (name, kind, args) in exchanges {
            channel
                .exchange_declare(ShortString::from(name), kind, durable, args)
                .await?;
        }
        let mut plain_quorum = FieldTable::default();
        plain_quorum.insert("x-queue-type".into(), long("quorum"));
        // The unrouted events' queue is consumed, like a worker's: should dead-lettering one
        // fail again and again, the broker gives it up to the dead-letter exchange itself.
        let queues = [
            (self.dead_letter_queue(), plain_quorum.clone()),
            (self.unrouted_results(), plain_quorum),
            (self.unrouted_events(), self.worker_queue_args()),
        ];
        for (queue, args) in queues {
            channel
                .queue_declare(queue.into(), durable_queue, args)
                .await?;
        }
        let bindings = [
            (self.dead_letter_queue(), self.dead_letter_exchange(), "#"),
            (self.unrouted_results(), self.unrouted_results(), ""),
            (self.unrouted_events(), self.unrouted_events(), ""),
        ];
        for (queue, exchange, routing_key) in bindings {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    routing_key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for worker in workers {
            self.declare_worker(channel, worker, durable_queue).await?;
        }
        Ok(())
    }

    async fn declare_worker(
        &self,
        channel: &Channel,
        subscription: &Subscription,
        options: QueueDeclareOptions,
    ) -> Result<(), lapin::Error> {
        let worker = subscription.worker.as_str();
        let queue = self.worker_queue(worker);
        channel
            .queue_declare(queue.clone().into(), options, self.worker_queue_args())
            .await?;
        for kind in EventType::ALL {
            let (queue, exchange) = (queue.clone().into(), self.events_exchange().into());
            if subscription.events.contains(&kind) {
                channel
                    .queue_bind(
                        queue,
                        exchange,
                        kind.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            } else {
                // Bound by an earlier version (which bound every type) or before the worker's
                // spec dropped the type: its events would only be skipped. Unbinding what is
                // not bound is no error.
                channel
                    .queue_unbind(queue, exchange, kind.as_str().into(), FieldTable::default())
                    .await?;
            }
        }
        for secs in DELAY_STEPS_SECS {
            // A parked event waits here for the queue's TTL, then the broker dead-letters it
            // through the default exchange straight back into the worker's queue.
            let mut args = self.quorum_args("");
            args.insert("x-dead-letter-routing-key".into(), long(&queue));
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(secs * 1000).unwrap_or(i64::MAX)),
            );
            channel
                .queue_declare(self.delay_queue(worker, secs).into(), options, args)
                .await?;
        }
        Ok(())
    }

    /// Deletes everything `declare` made (tests and the demo clean up with this).
    pub async fn delete(&self, channel: &Channel, workers: &[&str]) -> Result<(), lapin::Error> {
        let mut queues = vec![
            self.dead_letter_queue(),
            self.unrouted_results(),
            self.unrouted_events(),
        ];
        for worker in workers {
            queues.push(self.worker_queue(worker));
            queues.extend(
                DELAY_STEPS_SECS
                    .iter()
                    .map(|secs| self.delay_queue(worker, *secs)),
            );
        }
        for queue in queues {
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [
            self.events_exchange(),
            self.results_exchange(),
            self.unrouted_results(),
            self.unrouted_events(),
            self.dead_letter_exchange(),
        ] {
            channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_minimum_wait_rounds_up_to_a_step_and_a_turn_rounds_down() {
        let steps = |secs: u64| {
            let wanted = Duration::from_secs(secs);
            (
                Topology::delay_step(wanted),
                Topology::delay_step_within(wanted),
            )
        };
        assert_eq!(steps(1), (5, 5));
        assert_eq!(steps(5), (5, 5));
        assert_eq!(steps(12), (15, 10));
        assert_eq!(steps(29), (30, 15));
        assert_eq!(steps(30), (30, 30));
        assert_eq!(steps(299), (300, 120));
        assert_eq!(steps(5_000), (900, 900));
    }
}
