//! What goes back to the broker: confirmed results, dead letters, parked events, and acks.
//! Each publishes first and acks only once the broker confirmed; while the broker cannot take
//! the message, the delivery is held (not nacked) and the publish tried again.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::Pipeline;
use crate::broker::{Outgoing, PublishError, Topology};
use crate::events;
use crate::provider::retry;
use crate::store::ledger::LedgerEntry;
use crate::telemetry as m;
use crate::workers::Worker;

/// Header carrying attempts already spent on a parked event.
pub const ATTEMPTS_HEADER: &str = "x-copilot-attempts";
/// Header naming why a delivery was dead-lettered.
pub const REASON_HEADER: &str = "x-copilot-reason";
/// Header naming the worker that dead-lettered a delivery (where a replay sends it back).
pub const WORKER_HEADER: &str = "x-copilot-worker";
/// The W3C trace context header, read from events and written to what they cause.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header giving the routing key a dead-lettered event was first published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";
/// Header giving when a delivery was dead-lettered (RFC 3339, UTC).
pub const DEAD_LETTERED_AT_HEADER: &str = "x-copilot-dead-lettered-at";
/// The dead-letter reason of an event no worker queue took.
pub const UNROUTABLE: &str = "unroutable";
/// Header counting the times an event no worker queue took was sent through the events
/// exchange again.
pub const RESENT_HEADER: &str = "x-copilot-resent";
/// The dead-letter routing key's first word for an event no worker queue took.
const UNROUTED: &str = "unrouted";
/// Header giving a parked event's turn at its org's gate (milliseconds since the Unix epoch).
pub const TURN_HEADER: &str = "x-copilot-turn";

/// Where and why a delivery is parked.
pub(super) struct Parking {
    /// How long it should wait.
    pub delay: Duration,
    /// Attempts spent on it so far.
    pub attempts: u32,
    /// A metric label.
    pub reason: &'static str,
    /// Its turn at the org's gate: the delay queue is then the longest that brings it back
    /// by `delay` (early rather than late), and the turn goes with it. Without one, the
    /// shortest that waits at least `delay` (a provider's back-off is a minimum).
    pub turn: Option<SystemTime>,
}

impl Pipeline {
    /// Publishes a recorded result; false when it could not be confirmed (not acked then).
    pub(super) async fn publish_result(&self, delivery: &Delivery, entry: &LedgerEntry) -> bool {
        let routing_key = events::result_routing_key(entry.outcome == "completed", &entry.worker);
        let exchange = self.topology.results_exchange();
        let mut message = Outgoing::new(&exchange, &routing_key, entry.result.as_bytes());
        message.content_type = events::CLOUDEVENTS_JSON;
        message.message_id = Some(&entry.result_id);
        if let Some(traceparent) = traceparent(delivery) {
            message = message.header(TRACEPARENT_HEADER, &traceparent);
        }
        let step = std::time::Instant::now();
        match self.publish_held(&message, "result").await {
            Ok(()) => {
                m::record_step("publish", step);
                metrics::counter!(m::RESULTS_PUBLISHED, "worker" => entry.worker.clone(),
                    "outcome" => entry.outcome.clone())
                .increment(1);
                true
            }
            Err(err) => {
                log_publish_failure(&err, "result");
                false
            }
        }
    }

    pub(super) async fn skip(&self, worker: &Worker, delivery: &Delivery, reason: &'static str) {
        metrics::counter!(m::EVENTS_SKIPPED, "worker" => worker.name().to_owned(), "reason" => reason)
            .increment(1);
        self.ack(worker.name(), delivery).await;
    }

    /// Sends the delivery, unchanged, to the dead-letter exchange with its reason and the
    /// worker that gave it up (none for an event no worker queue took); acks once the broker
    /// confirmed it.
    pub(super) async fn dead_letter(
        &self,
        worker: Option<&str>,
        delivery: &Delivery,
        reason: &'static str,
        detail: &str,
    ) {
        let exchange = self.topology.dead_letter_exchange();
        let routing_key = format!("{}.{reason}", worker.unwrap_or(UNROUTED));
        let detail: String = detail.chars().take(300).collect();
        let content_type = content_type(delivery);
        // A replayed dead letter came through the worker's queue; it keeps the routing key it
        // was first published with.
        let original_routing_key = text_header(delivery, ORIGINAL_ROUTING_KEY_HEADER)
            .unwrap_or_else(|| delivery.routing_key.to_string());
        let mut message = Outgoing::new(&exchange, &routing_key, &delivery.data)
            .header(REASON_HEADER, reason)
            .header("x-copilot-error", &detail)
            .header(DEAD_LETTERED_AT_HEADER, &events::now_rfc3339())
            .header(ORIGINAL_ROUTING_KEY_HEADER, &original_routing_key);
        if let Some(worker) = worker {
            message = message.header(WORKER_HEADER, worker);
        }
        message.content_type = content_type
            .as_deref()
            .unwrap_or("application/octet-stream");
        // The trace goes on: through the dead letter, and a replay of it.
        if let Some(traceparent) = traceparent(delivery) {
            message = message.header(TRACEPARENT_HEADER, &traceparent);
        }
        match self.publish_held(&message, "dead_letter").await {
            Ok(()) => {
                // No worker: the label is empty, which Prometheus reads as absent.
                metrics::counter!(m::EVENTS_DEAD_LETTERED, "worker" => worker.unwrap_or("").to_owned(),
                    "reason" => reason)
                .increment(1);
                self.ack(worker.unwrap_or(""), delivery).await;
            }
            Err(err) => log_publish_failure(&err, "dead letter"),
        }
    }

    /// Parks the delivery in a delay queue (see [`Parking`]), then acks it.
    pub(super) async fn park(&self, worker: &Worker, delivery: &Delivery, parking: Parking) {
        let Parking {
            delay,
            attempts,
            reason,
            turn,
        } = parking;
        let step = match turn {
            Some(_) => Topology::delay_step_within(delay),
            None => Topology::delay_step(delay),
        };
        let queue = self.topology.delay_queue(worker.name(), step);
        let mut headers = copied_headers(delivery);
        // The parked copy is a new message: it does not carry the broker's record of the
        // delay queues the event went through before. RabbitMQ reads that record to find
        // dead-letter cycles, and drops (or, dead-lettering at least once, holds back) a
        // message it takes for one; ours cannot form one today (a delay queue dead-letters
        // only to the worker queue, which the record never names), and a copy that carries
        // no record cannot be mistaken for one later.
        headers.retain(|name, _| !is_death_header(name.as_str()));
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        match turn.and_then(|turn| turn.duration_since(UNIX_EPOCH).ok()) {
            Some(since_epoch) => {
                let millis = i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX);
                headers.insert(TURN_HEADER.into(), AMQPValue::LongLongInt(millis));
            }
            None => {
                headers.remove(TURN_HEADER);
            }
        }
        let content_type = content_type(delivery);
        let mut message = Outgoing::new("", &queue, &delivery.data);
        message.headers = FieldTable::from(headers);
        message.content_type = content_type.as_deref().unwrap_or(events::CLOUDEVENTS_JSON);
        match self.publish_held(&message, "parked").await {
            Ok(()) => {
                tracing::info!(
                    ?delay,
                    step_secs = step,
                    attempts,
                    reason,
                    "event parked in a delay queue"
                );
                metrics::counter!(m::EVENTS_PARKED, "worker" => worker.name().to_owned(), "reason" => reason)
                    .increment(1);
                self.ack(worker.name(), delivery).await;
            }
            Err(err) => log_publish_failure(&err, "parked event"),
        }
    }

    /// Publishes the delivery again, unchanged but for its count of resends (`RESENT_HEADER`),
    /// through the events exchange under its routing key; acks once the broker confirmed it.
    pub(super) async fn resend(&self, delivery: &Delivery, resent: u32) {
        let exchange = self.topology.events_exchange();
        let mut headers = copied_headers(delivery);
        headers.insert(
            RESENT_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(resent)),
        );
        let content_type = content_type(delivery);
        let mut message = Outgoing::new(&exchange, delivery.routing_key.as_str(), &delivery.data);
        message.headers = FieldTable::from(headers);
        message.content_type = content_type.as_deref().unwrap_or(events::CLOUDEVENTS_JSON);
        match self.publish_held(&message, "resent").await {
            Ok(()) => self.ack("", delivery).await,
            Err(err) => log_publish_failure(&err, "resent event"),
        }
    }

    /// Publishes, holding the delivery through broker trouble. When the publisher's own
    /// attempts fail, the topology is declared again if the broker lost part of it, and the
    /// publish is tried again on the outage schedule until the broker confirms it. Only the
    /// end of the shutdown grace period stops it: the delivery then goes back to the broker
    /// with its channel. A delivery left unacked while its channel lives would come back
    /// only when the broker's consumer timeout (30 min) closes the channel.
    async fn publish_held(
        &self,
        message: &Outgoing<'_>,
        what: &'static str,
    ) -> Result<(), PublishError> {
        let mut waits = None; // built on the first failure only: the hot path never needs it
        loop {
            let err = match self.publisher.publish(message).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if err.topology_missing() {
                self.keeper.restore().await;
            }
            let wait = waits
                .get_or_insert_with(retry::outage_backoff)
                .next()
                .unwrap_or(Duration::from_secs(5));
            metrics::counter!(m::PUBLISH_RETRIES, "message" => what).increment(1);
            tracing::warn!(error = %err, ?wait, message = what, "could not publish; holding the delivery and trying again");
            if !crate::sleep_unless_stopped(wait, &self.abandon).await {
                return Err(err);
            }
        }
    }

    /// Acks; a `false` from lapin (the channel was recovered) is counted, not ignored.
    pub(super) async fn ack(&self, worker: &str, delivery: &Delivery) {
        let step = std::time::Instant::now();
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => m::record_step("ack", step),
            Ok(false) => {
                metrics::counter!(m::ACKS_LOST, "worker" => worker.to_owned()).increment(1);
                tracing::info!(
                    "ack not taken (channel recovered); the delivery will come back and the ledger will answer it"
                );
            }
            Err(err) => {
                metrics::counter!(m::ACKS_LOST, "worker" => worker.to_owned()).increment(1);
                tracing::warn!(error = %err, "ack failed; the delivery will come back");
            }
        }
    }
}

fn log_publish_failure(err: &PublishError, what: &str) {
    tracing::warn!(error = %err, "could not publish the {what} before the grace period ended; the delivery goes back to the broker");
}

/// The delivery's `content_type` property.
pub(super) fn content_type(delivery: &Delivery) -> Option<String> {
    delivery
        .properties
        .content_type()
        .as_ref()
        .map(|ct| ct.as_str().to_owned())
}

fn header(delivery: &Delivery, name: &str) -> Option<AMQPValue> {
    let headers: &FieldTable = delivery.properties.headers().as_ref()?;
    headers.inner().get(name).cloned()
}

fn text_header(delivery: &Delivery, name: &str) -> Option<String> {
    crate::broker::text_header(delivery.properties.headers().as_ref()?, name)
}

/// A well-formed W3C `traceparent` header, if the input carries one.
pub(super) fn traceparent(delivery: &Delivery) -> Option<String> {
    let text = text_header(delivery, TRACEPARENT_HEADER)?;
    let parts: Vec<&str> = text.split('-').collect();
    let shape = [2, 32, 16, 2];
    let valid = parts.len() == 4
        && parts.iter().zip(shape).all(|(part, len)| {
            part.len() == len
                && part
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        });
    valid.then_some(text)
}

/// The delivery's headers, for a copy of it to carry.
fn copied_headers(delivery: &Delivery) -> BTreeMap<ShortString, AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()
        .map(|headers| headers.inner().clone())
        .unwrap_or_default()
}

/// Whether a header is the broker's dead-lettering record (`x-death`, and the
/// `x-first-death-*` and `x-last-death-*` summaries).
fn is_death_header(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

/// The turn a parked event carries at its org's gate, if any.
pub(super) fn turn_header(delivery: &Delivery) -> Option<SystemTime> {
    let millis = u64::try_from(int_header(delivery, TURN_HEADER)?).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

/// A count we keep in a header (`ATTEMPTS_HEADER`, `RESENT_HEADER`): 0 when absent.
pub(super) fn count_header(delivery: &Delivery, name: &str) -> u32 {
    let value = int_header(delivery, name).unwrap_or(0);
    u32::try_from(value).unwrap_or(0)
}

/// An integer header we wrote (64-bit, or 32-bit from another client), if present.
fn int_header(delivery: &Delivery, name: &str) -> Option<i64> {
    match header(delivery, name)? {
        AMQPValue::LongLongInt(n) => Some(n),
        AMQPValue::LongInt(n) => Some(i64::from(n)),
        _ => None,
    }
}
