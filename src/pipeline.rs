//! One delivery's trip: parse → config → run → record → publish → ack.
//!
//! The order is what keeps the promises: no provider call without the org's own enabled
//! config; the result is recorded in the ledger before it is published, and the delivery is
//! acked only after the broker confirmed the result. A redelivery finds the ledger row and
//! republishes the same result without calling the provider again.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{Outgoing, PublishError, Publisher, Topology};
use crate::crypto::KeyRing;
use crate::events::{self, ResultData, ResultError, ResultEvent, TicketEvent, Usage};
use crate::provider::retry::{self, Attempted, RetryPolicy};
use crate::provider::{
    ChatMessage, ChatRequest, ErrorClass, ProviderClient, ProviderError, ProviderTarget,
};
use crate::store::configs::ProviderConfig;
use crate::store::ledger::LedgerEntry;
use crate::store::{Store, StoreError};
use crate::telemetry as m;
use crate::workers::{Prepared, Worker};

/// Header carrying attempts already spent on a parked event.
pub const ATTEMPTS_HEADER: &str = "x-copilot-attempts";
/// Header naming why a delivery was dead-lettered.
pub const REASON_HEADER: &str = "x-copilot-reason";

/// Everything a delivery needs, shared by all tasks.
pub struct Pipeline {
    pub store: Store,
    pub keys: Arc<KeyRing>,
    pub provider: ProviderClient,
    pub publisher: Publisher,
    pub topology: Topology,
    pub max_event_bytes: usize,
    pub retry: RetryPolicy,
    pub provider_timeout: Duration,
    /// Fires when the shutdown grace period is over: waits give up and leave the delivery
    /// unacked, so the broker hands it to another consumer.
    pub abandon: CancellationToken,
}

/// How the provider part of a run ended.
enum Run {
    Completed {
        output: serde_json::Value,
        model: String,
        usage: Usage,
        attempts: u32,
        provider_time: Duration,
    },
    Failed {
        class: ErrorClass,
        message: String,
        model: String,
        usage: Usage,
        attempts: u32,
        provider_time: Duration,
    },
    Park {
        delay: Duration,
        attempts: u32,
    },
}

impl Pipeline {
    /// Handles one delivery for `worker`. Never panics; every path acks, dead-letters, parks,
    /// or (on shutdown or an outage) leaves the delivery for the broker to hand back.
    pub async fn handle(self: Arc<Self>, worker: Arc<Worker>, delivery: Delivery) {
        let started = Instant::now();
        metrics::gauge!(m::EVENTS_IN_FLIGHT).increment(1.0);
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str().to_owned());
        match events::parse_event(
            &delivery.data,
            content_type.as_deref(),
            self.max_event_bytes,
        ) {
            Err(bad) => {
                tracing::warn!(worker = worker.name(), reason = bad.reason(), error = %bad, "dead-lettering bad input");
                self.dead_letter(&worker, &delivery, bad.reason(), &bad.to_string())
                    .await;
            }
            Ok(event) => {
                let span = tracing::info_span!("event", event_id = %event.id, org_id = %event.data.org_id,
                    ticket_id = %event.data.ticket.id, worker = worker.name());
                metrics::counter!(m::EVENTS_RECEIVED, "worker" => worker.name().to_owned(), "type" => event.kind.as_str()).increment(1);
                self.process(&worker, &delivery, &event, started)
                    .instrument(span)
                    .await;
            }
        }
        metrics::gauge!(m::EVENTS_IN_FLIGHT).decrement(1.0);
    }

    async fn process(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        event: &TicketEvent,
        started: Instant,
    ) {
        let org_id = event.data.org_id.as_str();
        if !worker.handles(event.kind) {
            return self.skip(worker, delivery, "not_subscribed").await;
        }
        let Some(recorded) = self
            .db(|| self.store.ledger_entry(&event.id, worker.name()))
            .await
        else {
            return;
        };
        if let Some(entry) = recorded {
            tracing::info!("already decided; republishing the recorded result");
            if self.publish_result(delivery, &entry).await {
                self.skip(worker, delivery, "duplicate").await;
            }
            return;
        }
        let Some(config) = self.db(|| self.store.provider_config(org_id)).await else {
            return;
        };
        let Some(config) = config else {
            tracing::info!("org has no provider config; skipped, no request made");
            return self.skip(worker, delivery, "no_config").await;
        };
        if !config.enabled {
            return self.skip(worker, delivery, "disabled").await;
        }
        if !config.runs(worker.name()) {
            return self.skip(worker, delivery, "worker_disabled").await;
        }
        let model = config.model_for(worker.name()).to_owned();
        let prepared = match worker.prepare(
            &event.data.ticket,
            event.kind,
            &config.context,
            config.profile.structured_mode(),
            &model,
        ) {
            Ok(prepared) => prepared,
            Err(err) => {
                tracing::error!(error = %err, "worker prompt failed to render");
                return self
                    .dead_letter(worker, delivery, "render_failed", &err.to_string())
                    .await;
            }
        };
        let last = self
            .db(|| {
                self.store
                    .last_completed_input_hash(org_id, &event.data.ticket.id, worker.name())
            })
            .await;
        let Some(last) = last else { return };
        if last.as_deref() == Some(prepared.input_hash.as_str()) {
            tracing::info!("ticket content unchanged since the last run; skipped");
            return self.skip(worker, delivery, "unchanged").await;
        }
        let already = attempts_header(delivery);
        let run = match self.key_for(&config) {
            Ok(api_key) => {
                let target = ProviderTarget {
                    profile: config.profile,
                    base_url: config.base_url.clone(),
                    api_key,
                    model: model.clone(),
                    timeout: config
                        .params
                        .timeout_secs
                        .map_or(self.provider_timeout, Duration::from_secs),
                    api_version: config.params.api_version.clone(),
                };
                self.run_provider(worker, &config, &target, &prepared, already)
                    .await
            }
            Err(class) => Run::Failed {
                class,
                message:
                    "the org's stored API key cannot be decrypted with the configured master keys"
                        .into(),
                model: model.clone(),
                usage: Usage::default(),
                attempts: already,
                provider_time: Duration::ZERO,
            },
        };
        let (data, provider_time, exhausted) = match run {
            Run::Park { delay, attempts } => {
                return self.park(worker, delivery, delay, attempts).await;
            }
            Run::Completed {
                output,
                model,
                usage,
                attempts,
                provider_time,
            } => {
                record_tokens(worker, usage);
                (
                    self.result_data(
                        event,
                        worker,
                        model,
                        Some(output),
                        usage,
                        started,
                        attempts,
                        None,
                    ),
                    provider_time,
                    false,
                )
            }
            Run::Failed {
                class,
                message,
                model,
                usage,
                attempts,
                provider_time,
            } => {
                record_tokens(worker, usage);
                tracing::warn!(class = class.as_str(), %message, attempts, "worker failed");
                if class.is_config_problem() {
                    let _ = self
                        .db(|| self.store.record_provider_failure(org_id, &message, true))
                        .await;
                }
                let error = ResultError {
                    class: class.as_str().to_owned(),
                    message,
                };
                let exhausted = class == ErrorClass::RetriesExhausted;
                (
                    self.result_data(
                        event,
                        worker,
                        model,
                        None,
                        usage,
                        started,
                        attempts,
                        Some(error),
                    ),
                    provider_time,
                    exhausted,
                )
            }
        };
        let result = ResultEvent::new(data, events::now_rfc3339());
        let entry = LedgerEntry {
            event_id: event.id.clone(),
            worker: worker.name().to_owned(),
            org_id: org_id.to_owned(),
            ticket_id: event.data.ticket.id.clone(),
            result_id: result.id.clone(),
            outcome: if result.is_completed() {
                "completed"
            } else {
                "failed"
            }
            .to_owned(),
            input_hash: Some(prepared.input_hash.clone()),
            result: serde_json::to_value(&result).unwrap_or_default(),
        };
        let Some(standing) = self.db(|| self.store.record_result(&entry)).await else {
            return;
        };
        if !self.publish_result(delivery, &standing).await {
            return;
        }
        if exhausted {
            self.dead_letter(
                worker,
                delivery,
                "retries_exhausted",
                "transient provider errors outlasted every attempt",
            )
            .await;
        } else {
            self.ack(worker, delivery).await;
        }
        let overhead = started.elapsed().saturating_sub(provider_time);
        metrics::histogram!(m::WORKER_OVERHEAD, "worker" => worker.name().to_owned())
            .record(overhead.as_secs_f64());
    }

    fn key_for(&self, config: &ProviderConfig) -> Result<Option<SecretString>, ErrorClass> {
        match &config.api_key {
            None => Ok(None),
            Some(sealed) => self
                .keys
                .open(&config.org_id, sealed)
                .map(Some)
                .map_err(|err| {
                    tracing::error!(error = %err, "cannot open the org's API key");
                    ErrorClass::ConfigInvalid
                }),
        }
    }

    async fn run_provider(
        &self,
        worker: &Worker,
        config: &ProviderConfig,
        target: &ProviderTarget,
        prepared: &Prepared,
        already: u32,
    ) -> Run {
        let mut messages = prepared.messages.clone();
        let mut usage = Usage::default();
        let mut provider_time = Duration::ZERO;
        let mut attempts = already;
        let mut reasked = false;
        loop {
            let request = ChatRequest {
                messages: messages.clone(),
                temperature: config.params.temperature.or(worker.spec.temperature),
                max_tokens: config.params.max_tokens.or(worker.spec.max_tokens),
                response_format: prepared.response_format.clone(),
            };
            let outcome = retry::retry(&self.retry, attempts, || async {
                let started = Instant::now();
                let result = self.provider.chat(target, &request).await;
                let waited = started.elapsed();
                record_request(target, &result, waited);
                result.map(|reply| (reply, waited))
            })
            .await;
            let (reply, waited, spent) = match outcome {
                Attempted::Done {
                    value: (reply, waited),
                    attempts: spent,
                } => (reply, waited, spent),
                Attempted::Park {
                    delay, attempts, ..
                } => return Run::Park { delay, attempts },
                Attempted::Failed {
                    error,
                    attempts: spent,
                } => {
                    return failed(&error, target, usage, spent, provider_time);
                }
            };
            attempts = spent;
            provider_time += waited;
            usage.prompt_tokens += reply.usage.prompt_tokens;
            usage.completion_tokens += reply.usage.completion_tokens;
            match worker.check(prepared, &reply.content) {
                Ok(output) => {
                    return Run::Completed {
                        output,
                        model: reply.model,
                        usage,
                        attempts,
                        provider_time,
                    };
                }
                Err(problem) if !reasked => {
                    tracing::info!(%problem, "output invalid; asking once more");
                    reasked = true;
                    messages.push(ChatMessage::new("assistant", reply.content));
                    messages.push(ChatMessage::new("user", format!(
                        "That answer was rejected: {problem}. Reply again with only the corrected JSON object.")));
                }
                Err(problem) => {
                    return Run::Failed {
                        class: ErrorClass::InvalidOutput,
                        message: format!("the model's output was invalid twice: {problem}"),
                        model: reply.model,
                        usage,
                        attempts,
                        provider_time,
                    };
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn result_data(
        &self,
        event: &TicketEvent,
        worker: &Worker,
        model: String,
        output: Option<serde_json::Value>,
        usage: Usage,
        started: Instant,
        attempts: u32,
        error: Option<ResultError>,
    ) -> ResultData {
        ResultData {
            org_id: event.data.org_id.clone(),
            ticket_id: event.data.ticket.id.clone(),
            worker: worker.name().to_owned(),
            source_event_id: event.id.clone(),
            source_event_type: event.kind,
            model,
            output,
            usage,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            attempts,
            error,
        }
    }

    /// Retries a database step through an outage, holding the delivery (so consumption
    /// stops once prefetch is used up instead of spinning nacks). `None` means give up and
    /// leave the delivery unacked: shutdown, or a row this version cannot read.
    async fn db<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut waits = retry::outage_backoff();
        loop {
            match op().await {
                Ok(value) => return Some(value),
                Err(StoreError::Invalid(reason)) => {
                    tracing::error!(%reason, "unreadable row; leaving the delivery to the broker");
                    return None;
                }
                Err(err) => {
                    let wait = waits.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %err, ?wait, "database unavailable; holding the delivery");
                    tokio::select! {
                        () = self.abandon.cancelled() => return None,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Publishes a recorded result; false when it could not be confirmed (not acked then).
    async fn publish_result(&self, delivery: &Delivery, entry: &LedgerEntry) -> bool {
        let body = serde_json::to_vec(&entry.result).unwrap_or_default();
        let routing_key = entry
            .result
            .get("type")
            .and_then(|t| t.as_str())
            .map(|kind| {
                if kind == events::COMPLETED_TYPE {
                    format!("ticket.enriched.{}", entry.worker)
                } else {
                    format!("ticket.enrichment_failed.{}", entry.worker)
                }
            })
            .unwrap_or_default();
        let exchange = self.topology.results_exchange();
        let mut message = Outgoing::new(&exchange, &routing_key, &body);
        message.content_type = events::CLOUDEVENTS_JSON;
        message.message_id = Some(&entry.result_id);
        if let Some(traceparent) = header_text(delivery, "traceparent") {
            message = message.header("traceparent", &traceparent);
        }
        match self.publisher.publish(&message).await {
            Ok(()) => {
                metrics::counter!(m::RESULTS_PUBLISHED, "worker" => entry.worker.clone(), "outcome" => entry.outcome.clone()).increment(1);
                true
            }
            Err(err) => {
                log_publish_failure(&err, "result");
                false
            }
        }
    }

    async fn skip(&self, worker: &Worker, delivery: &Delivery, reason: &'static str) {
        metrics::counter!(m::EVENTS_SKIPPED, "worker" => worker.name().to_owned(), "reason" => reason).increment(1);
        self.ack(worker, delivery).await;
    }

    /// Sends the delivery, unchanged, to the dead-letter exchange with its reason; acks once
    /// the broker confirmed it.
    async fn dead_letter(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        reason: &'static str,
        detail: &str,
    ) {
        let exchange = self.topology.dead_letter_exchange();
        let routing_key = format!("{}.{reason}", worker.name());
        let detail: String = detail.chars().take(300).collect();
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str().to_owned());
        let mut message = Outgoing::new(&exchange, &routing_key, &delivery.data)
            .header(REASON_HEADER, reason)
            .header("x-copilot-error", &detail)
            .header("x-copilot-worker", worker.name())
            .header("x-original-routing-key", delivery.routing_key.as_str());
        message.content_type = content_type
            .as_deref()
            .unwrap_or("application/octet-stream");
        match self.publisher.publish(&message).await {
            Ok(()) => {
                metrics::counter!(m::EVENTS_DEAD_LETTERED, "worker" => worker.name().to_owned(), "reason" => reason).increment(1);
                self.ack(worker, delivery).await;
            }
            Err(err) => log_publish_failure(&err, "dead letter"),
        }
    }

    /// Parks the delivery in the delay queue whose TTL covers `delay`, then acks it.
    async fn park(&self, worker: &Worker, delivery: &Delivery, delay: Duration, attempts: u32) {
        let step = Topology::delay_step(delay);
        let queue = self.topology.delay_queue(worker.name(), step);
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str().to_owned());
        let mut message = Outgoing::new("", &queue, &delivery.data);
        message.headers = headers;
        message.content_type = content_type.as_deref().unwrap_or(events::CLOUDEVENTS_JSON);
        match self.publisher.publish(&message).await {
            Ok(()) => {
                tracing::info!(
                    ?delay,
                    step_secs = step,
                    attempts,
                    "provider asked for a long wait; event parked"
                );
                metrics::counter!(m::EVENTS_PARKED, "worker" => worker.name().to_owned())
                    .increment(1);
                self.ack(worker, delivery).await;
            }
            Err(err) => log_publish_failure(&err, "parked event"),
        }
    }

    async fn ack(&self, worker: &Worker, delivery: &Delivery) {
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => {
                metrics::counter!(m::ACKS_LOST, "worker" => worker.name().to_owned()).increment(1);
                tracing::info!(
                    "ack not taken (channel recovered); the delivery will come back and the ledger will answer it"
                );
            }
            Err(err) => {
                metrics::counter!(m::ACKS_LOST, "worker" => worker.name().to_owned()).increment(1);
                tracing::warn!(error = %err, "ack failed; the delivery will come back");
            }
        }
    }
}

fn failed(
    error: &ProviderError,
    target: &ProviderTarget,
    usage: Usage,
    attempts: u32,
    provider_time: Duration,
) -> Run {
    let class = if error.is_retryable() {
        ErrorClass::RetriesExhausted
    } else {
        error.class()
    };
    Run::Failed {
        class,
        message: error.to_string(),
        model: target.model.clone(),
        usage,
        attempts,
        provider_time,
    }
}

fn record_request<T>(target: &ProviderTarget, result: &Result<T, ProviderError>, waited: Duration) {
    let (outcome, status_class) = match result {
        Ok(_) => ("ok", "2xx"),
        Err(ProviderError::Status { status, .. }) if *status >= 500 => ("error", "5xx"),
        Err(ProviderError::Status { .. }) => ("error", "4xx"),
        Err(ProviderError::Malformed(_)) => ("error", "2xx"),
        Err(_) => ("error", "transport"),
    };
    let profile = target.profile.as_str();
    metrics::counter!(m::PROVIDER_REQUESTS, "profile" => profile, "outcome" => outcome, "status_class" => status_class).increment(1);
    metrics::histogram!(m::PROVIDER_LATENCY, "profile" => profile).record(waited.as_secs_f64());
}

fn record_tokens(worker: &Worker, usage: Usage) {
    metrics::counter!(m::TOKENS, "worker" => worker.name().to_owned(), "kind" => "prompt")
        .increment(usage.prompt_tokens);
    metrics::counter!(m::TOKENS, "worker" => worker.name().to_owned(), "kind" => "completion")
        .increment(usage.completion_tokens);
}

fn log_publish_failure(err: &PublishError, what: &str) {
    tracing::warn!(error = %err, "could not publish the {what}; the delivery stays unacked and will come back");
}

fn header(delivery: &Delivery, name: &str) -> Option<AMQPValue> {
    let headers: &FieldTable = delivery.properties.headers().as_ref()?;
    headers.inner().get(name).cloned()
}

fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    match header(delivery, name)? {
        AMQPValue::LongString(text) => String::from_utf8(text.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
    .filter(|text| text.len() <= 128 && text.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
}

fn attempts_header(delivery: &Delivery) -> u32 {
    let value = match header(delivery, ATTEMPTS_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => i64::from(n),
        _ => 0,
    };
    u32::try_from(value).unwrap_or(0)
}
