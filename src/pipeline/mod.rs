//! One delivery's trip: parse → config → org gate → prompt → ledger → run → record → publish
//! → ack.
//!
//! The order is what keeps the promises: no provider call without the org's own enabled
//! config; the result is recorded in the ledger before it is published, and the delivery is
//! acked only after the broker confirmed the result. A redelivery finds the ledger row and
//! republishes the same result without calling the provider again.
//!
//! `run.rs` is the provider part (retries, the corrective re-ask); `deliver.rs` is what goes
//! back to the broker (results, dead letters, parked events, acks).

pub mod claim;
mod deliver;
pub mod gate;
mod run;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use claim::Claim;
pub use deliver::{
    ATTEMPTS_HEADER, DEAD_LETTERED_AT_HEADER, ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER,
    RESENT_HEADER, TRACEPARENT_HEADER, TURN_HEADER, UNROUTABLE, WORKER_HEADER,
};
use run::{Run, Spent};

use crate::broker::{Publisher, Topology, TopologyKeeper};
use crate::crypto::KeyRing;
use crate::events::{self, EventType, ResultData, ResultError, ResultEvent, TicketEvent};
use crate::provider::retry::{self, RetryPolicy};
use crate::provider::{ErrorClass, ProviderClient, ProviderTarget};
use crate::store::cache::ConfigCache;
use crate::store::configs::ProviderConfig;
use crate::store::ledger::{Ledger, LedgerEntry, RunRequest, UsageRecord};
use crate::store::{Store, StoreError};
use crate::telemetry as m;
use crate::workers::{Prepared, Worker};

/// How many times an event of a type a worker here reacts to, found with no worker queue
/// bound for it, is sent through the events exchange again before it is dead-lettered.
const RESENDS: u32 = 3;

/// Everything a delivery needs, shared by all tasks.
pub struct Pipeline {
    pub store: Store,
    /// The ledger's batched hot path (starting runs, recording results).
    pub ledger: Ledger,
    /// Provider configs, cached and invalidated by Postgres notifications.
    pub configs: Arc<ConfigCache>,
    pub keys: Arc<KeyRing>,
    pub provider: ProviderClient,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Declares the topology again when a publish finds part of it missing.
    pub keeper: Arc<TopologyKeeper>,
    pub max_event_bytes: usize,
    /// Dead-letter events whose run failed for good too, not only those whose retries ran
    /// out (`COPILOT_DEAD_LETTER_FAILURES`).
    pub dead_letter_failures: bool,
    pub retry: RetryPolicy,
    pub provider_timeout: Duration,
    /// Per-org concurrency caps (shared with the other replicas by `gate::share_caps`) and
    /// circuit breakers.
    pub gates: Arc<gate::OrgGates>,
    /// Identifies this process in event claims.
    pub instance: String,
    /// The claims this process holds, for their renewal.
    pub claims: claim::HeldClaims,
    /// Fires when shutdown begins: from then on no event starts its run. One not yet through
    /// its org's gate (waiting there, or not yet come to it) is parked for the shortest delay
    /// instead, for another replica or this one restarted; runs already started finish.
    pub draining: CancellationToken,
    /// Fires when the shutdown grace period is over: waits give up and leave the delivery
    /// unacked, so the broker hands it to another consumer.
    pub abandon: CancellationToken,
}

impl Pipeline {
    /// Handles one delivery for `worker`. Never panics; every path acks, dead-letters, parks,
    /// or (on shutdown or an outage) leaves the delivery for the broker to hand back.
    pub async fn handle(self: Arc<Self>, worker: Arc<Worker>, delivery: Delivery) {
        let started = Instant::now();
        metrics::gauge!(m::EVENTS_IN_FLIGHT).increment(1.0);
        let content_type = deliver::content_type(&delivery);
        match events::parse_event(
            &delivery.data,
            content_type.as_deref(),
            self.max_event_bytes,
        ) {
            Err(bad) => {
                tracing::warn!(worker = worker.name(), reason = bad.reason(), error = %bad, "dead-lettering bad input");
                // Boxed: a rare path that would otherwise widen every delivery's future.
                Box::pin(self.dead_letter(
                    Some(worker.name()),
                    &delivery,
                    bad.reason(),
                    &bad.to_string(),
                ))
                .await;
            }
            Ok(event) => {
                let span = tracing::info_span!("event", event_id = %event.id,
                    org_id = %event.data.org_id, ticket_id = %event.data.ticket.id,
                    worker = worker.name());
                metrics::counter!(m::EVENTS_RECEIVED, "worker" => worker.name().to_owned(),
                    "type" => event.kind.as_str())
                .increment(1);
                self.process(&worker, &delivery, &event, started)
                    .instrument(span)
                    .await;
            }
        }
        metrics::gauge!(m::EVENTS_IN_FLIGHT).decrement(1.0);
    }

    /// Handles one delivery from the unrouted-events queue: an event published to the events
    /// exchange that no worker queue was bound for.
    /// - Of a type no worker of this replica (`served`) reacts to, it is acked and counted as
    ///   skipped (`no_worker`): an install that runs only some workers does not want it.
    /// - Of a type a worker here reacts to, that worker's queue was missing when it was
    ///   published (deleted, and not yet declared again): the topology is declared again (a
    ///   second later, `TopologyKeeper::restore`) and the event sent through the events
    ///   exchange again, up to `RESENDS` times.
    /// - Otherwise (a routing key that names no event type, a helpdesk's mistake, or resends
    ///   spent) it is dead-lettered, unchanged, as `unroutable`, with no worker; `dead-letters
    ///   replay` sends one of a known type back through the events exchange.
    pub async fn handle_unrouted(self: Arc<Self>, delivery: Delivery, served: Arc<[EventType]>) {
        #[derive(serde::Deserialize)]
        struct Named {
            id: Option<String>,
        }
        let routing_key = delivery.routing_key.as_str();
        let event_id = serde_json::from_slice::<Named>(&delivery.data)
            .ok()
            .and_then(|named| named.id)
            .map(|id| id.chars().take(events::MAX_ID_BYTES).collect::<String>());
        let event_id = event_id.as_deref().unwrap_or("-");
        let kind = EventType::parse(routing_key);
        if kind.is_some_and(|kind| !served.contains(&kind)) {
            tracing::debug!(
                routing_key,
                event_id,
                "no worker here reacts to this event type; skipped"
            );
            metrics::counter!(m::EVENTS_SKIPPED, "worker" => "", "reason" => "no_worker")
                .increment(1);
            self.ack("", &delivery).await;
            return;
        }
        let resent = deliver::count_header(&delivery, RESENT_HEADER);
        if kind.is_some() && resent < RESENDS {
            tracing::warn!(
                routing_key,
                event_id,
                resent,
                "an event found no worker queue for its type; declaring the topology again and sending it again"
            );
            // The restore waits a second before it declares (the queue may have been deleted
            // just now); by then the consumers told of the delete have re-attached or will.
            self.keeper.restore().await;
            metrics::counter!(m::EVENTS_RESENT).increment(1);
            self.resend(&delivery, resent + 1).await;
            return;
        }
        tracing::warn!(
            routing_key,
            event_id,
            "an event no worker queue is bound for; dead-lettering it as unroutable"
        );
        let detail = format!(
            "no worker queue is bound for routing key {routing_key:?} on {}",
            self.topology.events_exchange()
        );
        self.dead_letter(None, &delivery, UNROUTABLE, &detail).await;
    }

    /// The run, in three steps: admit (config, org gate, prompt, ledger, claim), the provider
    /// call, conclude (result, record, publish, ack). The first and the last are boxed
    /// futures of their own: a delivery waiting on its provider (seconds, thousands of them
    /// at once) then holds only what the call needs, not the state of every other step.
    async fn process(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        event: &TicketEvent,
        started: Instant,
    ) {
        let Some(admitted) = Box::pin(self.admit(worker, delivery, event)).await else {
            return;
        };
        let config = &admitted.config;
        let mut spent = Spent::new(&admitted.model, admitted.attempts_before);
        let run = match self.key_for(config) {
            Ok(api_key) => {
                let target = ProviderTarget {
                    profile: config.profile,
                    base_url: config.base_url.clone(),
                    api_key,
                    model: admitted.model,
                    timeout: config
                        .params
                        .timeout_secs
                        .map_or(self.provider_timeout, Duration::from_secs),
                    api_version: config.params.api_version.clone(),
                };
                self.run_provider(worker, config, &target, &admitted.prepared, &mut spent)
                    .await
            }
            Err(class) => Run::Failed {
                class,
                message:
                    "the org's stored API key cannot be decrypted with the configured master keys"
                        .into(),
            },
        };
        if spent.requests > 0 {
            admitted.permit.call_ended();
        } else {
            drop(admitted.permit);
        }
        let ran = Ran {
            run,
            spent,
            claim: admitted.claim,
            input_hash: admitted.prepared.input_hash,
        };
        Box::pin(self.conclude(worker, delivery, event, started, ran)).await;
    }

    /// Everything before the provider call. `None` when the delivery was answered here
    /// (skipped, dead-lettered, parked, republished) or must be left to the broker.
    async fn admit(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        event: &TicketEvent,
    ) -> Option<Admitted> {
        let org_id = event.data.org_id.as_str();
        if !worker.handles(event.kind) {
            self.skip(worker, delivery, "not_subscribed").await;
            return None;
        }
        let config = self.db(|| self.configs.get(org_id)).await?;
        let Some(config) = config else {
            tracing::info!("org has no provider config; skipped, no request made");
            self.skip(worker, delivery, "no_config").await;
            return None;
        };
        if !config.enabled {
            self.skip(worker, delivery, "disabled").await;
            return None;
        }
        if !config.runs(worker.name()) {
            self.skip(worker, delivery, "worker_disabled").await;
            return None;
        }
        // The org's gate comes first: an event deferred here costs no prompt and no ledger
        // statement (a backlog of one org can be deferred many times over).
        let attempts_before = deliver::count_header(delivery, ATTEMPTS_HEADER);
        let cap = config.max_concurrency;
        let mut permit = self
            .through_gate(worker, delivery, org_id, cap, attempts_before)
            .await?;
        let model = config.model_for(worker.name()).to_owned();
        let mode = config.profile.structured_mode();
        let prepared = match worker.prepare(
            &event.data.ticket,
            event.kind,
            &config.context,
            mode,
            &model,
        ) {
            Ok(prepared) => prepared,
            Err(err) => {
                tracing::error!(error = %err, "worker prompt failed to render");
                self.dead_letter(
                    Some(worker.name()),
                    delivery,
                    "render_failed",
                    &err.to_string(),
                )
                .await;
                return None;
            }
        };
        if prepared.trim.omitted_messages > 0 || prepared.trim.shortened_messages > 0 {
            tracing::info!(
                omitted = prepared.trim.omitted_messages,
                shortened = prepared.trim.shortened_messages,
                "ticket trimmed to the token budget"
            );
        }
        let ticket_id = event.data.ticket.id.as_str();
        let holder = self.new_holder();
        let request = RunRequest {
            event_id: event.id.clone(),
            worker: worker.name().to_owned(),
            org_id: org_id.to_owned(),
            ticket_id: ticket_id.to_owned(),
            holder: holder.clone(),
        };
        let step = Instant::now();
        let start = self.db(|| self.ledger.begin_run(request.clone())).await?;
        m::record_step("start", step);
        if let Some(entry) = start.decided {
            drop(permit);
            tracing::info!("already decided; republishing the recorded result");
            if self.publish_result(delivery, &entry).await {
                // A redelivery after a crash between the result and its dead letter still
                // leaves the dead letter.
                match self.dead_letter_for(&entry) {
                    Some((reason, detail)) => {
                        self.dead_letter(Some(worker.name()), delivery, reason, &detail)
                            .await
                    }
                    None => self.skip(worker, delivery, "duplicate").await,
                }
            }
            return None;
        }
        let claim = if start.claimed {
            self.hold(event, worker, holder)
        } else {
            // Another delivery of this event runs: its wait holds no place at the gate (the
            // other one may be waiting for that very place).
            drop(permit);
            let claim = self
                .wait_for_holder(worker, delivery, event, holder)
                .await?;
            // It died and this delivery took the claim over: through the gate again.
            let Some(again) = self
                .through_gate(worker, delivery, org_id, cap, attempts_before)
                .await
            else {
                claim.release().await;
                return None;
            };
            permit = again;
            claim
        };
        if start.last_completed_hash.as_deref() == Some(prepared.input_hash.as_str()) {
            drop(permit);
            tracing::info!("ticket content unchanged since the last run; skipped");
            claim.release().await;
            self.skip(worker, delivery, "unchanged").await;
            return None;
        }
        Some(Admitted {
            config,
            prepared,
            model,
            claim,
            permit,
            attempts_before,
        })
    }

    /// Through the org's gate: its permit, or `None` once the delivery is parked. Once
    /// shutdown begins nothing goes through: a run started then would lengthen the drain,
    /// and one cut short at the end of the grace period would cost the org a call whose
    /// answer is thrown away. A wait given up frees its place in the waiting room.
    async fn through_gate(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        org_id: &str,
        cap: Option<u32>,
        attempts: u32,
    ) -> Option<gate::OrgPermit> {
        let carried = deliver::turn_header(delivery);
        let admission = tokio::select! {
            biased;
            // It keeps any turn it carries: back in 5 s, it is not put behind the others.
            () = self.draining.cancelled() => gate::Admission::Defer {
                delay: gate::BUSY_DEFERRAL,
                reason: "shutdown",
                turn: carried,
            },
            admission = self.gates.admit(org_id, cap, carried) => admission,
        };
        match admission {
            gate::Admission::Go(permit) => Some(permit),
            gate::Admission::Defer {
                delay,
                reason,
                turn,
            } => {
                let parking = deliver::Parking {
                    delay,
                    attempts,
                    reason,
                    turn,
                };
                self.park(worker, delivery, parking).await;
                None
            }
        }
    }

    /// Everything after the provider call: the result event, the ledger, the publish, the
    /// ack (or the park, or the dead letter after exhausted retries).
    async fn conclude(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        event: &TicketEvent,
        started: Instant,
        ran: Ran,
    ) {
        let Ran {
            run,
            spent,
            claim,
            input_hash,
        } = ran;
        let org_id = event.data.org_id.as_str();
        let ticket_id = event.data.ticket.id.as_str();
        spent.record_tokens(worker.name());
        self.gates.record(org_id, run.provider_answered());
        let (output, error) = match run {
            Run::Park { delay } => {
                claim.release().await;
                let parking = deliver::Parking {
                    delay,
                    attempts: spent.attempts,
                    reason: "provider_backoff",
                    turn: None,
                };
                return self.park(worker, delivery, parking).await;
            }
            Run::Completed(output) => (Some(output), None),
            Run::Failed { class, message } => {
                tracing::warn!(class = class.as_str(), %message, attempts = spent.attempts, "worker failed");
                if class.is_config_problem() {
                    let _ = self
                        .db(|| self.store.record_provider_failure(org_id, &message, true))
                        .await;
                }
                (None, Some((class, message)))
            }
        };
        let data = ResultData {
            org_id: org_id.to_owned(),
            ticket_id: ticket_id.to_owned(),
            worker: worker.name().to_owned(),
            source_event_id: event.id.clone(),
            source_event_type: event.kind,
            model: spent.model.clone(),
            output,
            usage: spent.usage,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            attempts: spent.attempts,
            reasks: spent.reasks,
            error: error.map(|(class, message)| ResultError {
                class: class.as_str().to_owned(),
                message,
            }),
        };
        let result = ResultEvent::new(data, events::now_rfc3339());
        let entry = LedgerEntry {
            event_id: event.id.clone(),
            worker: worker.name().to_owned(),
            org_id: org_id.to_owned(),
            ticket_id: ticket_id.to_owned(),
            result_id: result.id.clone(),
            outcome: if result.is_completed() {
                "completed"
            } else {
                "failed"
            }
            .to_owned(),
            input_hash: Some(input_hash),
            result: serde_json::to_string(&result).unwrap_or_default(),
        };
        let usage = spent.usage_record();
        let step = Instant::now();
        let Some(standing) = self
            .db(|| self.ledger.record_result(entry.clone(), usage.clone()))
            .await
        else {
            return;
        };
        m::record_step("record", step);
        claim.settled();
        if !self.publish_result(delivery, &standing).await {
            return;
        }
        // The result that stands decides (another replica's may have been recorded first).
        match self.dead_letter_for(&standing) {
            Some((reason, detail)) => {
                self.dead_letter(Some(worker.name()), delivery, reason, &detail)
                    .await
            }
            None => self.ack(worker.name(), delivery).await,
        }
        let overhead = started.elapsed().saturating_sub(spent.provider_time);
        m::record_overhead(worker.name(), overhead);
    }

    /// Whether a decided result's event also goes to the dead letters, with which reason and
    /// detail: when its retries ran out, and after any other failure when the operator asked
    /// (`dead_letter_failures`), so that `dead-letters replay` can run it again. Reads the
    /// recorded result, and only of failed runs (rare).
    fn dead_letter_for(&self, entry: &LedgerEntry) -> Option<(&'static str, String)> {
        if entry.outcome != "failed" {
            return None;
        }
        let result: serde_json::Value = serde_json::from_str(&entry.result).ok()?;
        let error = result.pointer("/data/error")?;
        let class = ErrorClass::parse(error.get("class")?.as_str()?)?;
        if class != ErrorClass::RetriesExhausted && !self.dead_letter_failures {
            return None;
        }
        let detail = error.get("message").and_then(serde_json::Value::as_str);
        Some((class.as_str(), detail.unwrap_or_default().to_owned()))
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
                Err(err) if err.is_pool_busy() => {
                    // Every connection is busy: that is load, not an outage; queue again.
                    tracing::debug!("database pool busy; waiting again");
                    if self.abandon.is_cancelled() {
                        return None;
                    }
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
}

/// What [`Pipeline::admit`] hands to the provider call.
struct Admitted {
    config: Arc<ProviderConfig>,
    prepared: Prepared,
    /// The model asked for (the org's, or its override for this worker).
    model: String,
    claim: Claim,
    /// The org gate's permit, held for the duration of the call.
    permit: gate::OrgPermit,
    /// Attempts spent before the event was parked.
    attempts_before: u32,
}

/// What the provider call hands to [`Pipeline::conclude`].
struct Ran {
    run: Run,
    spent: Spent,
    claim: Claim,
    input_hash: String,
}

impl Spent {
    fn usage_record(&self) -> UsageRecord {
        UsageRecord {
            model: self.model.clone(),
            requests: i64::from(self.requests),
            prompt_tokens: i64::try_from(self.usage.prompt_tokens).unwrap_or(i64::MAX),
            completion_tokens: i64::try_from(self.usage.completion_tokens).unwrap_or(i64::MAX),
        }
    }
}
