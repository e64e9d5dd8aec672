//! The provider part of a run: the call with retries, output validation, one corrective re-ask.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::Pipeline;
use crate::events::Usage;
use crate::provider::retry::{self, Attempted};
use crate::provider::{ChatMessage, ChatRequest, ErrorClass, ProviderError, ProviderTarget};
use crate::store::configs::ProviderConfig;
use crate::telemetry as m;
use crate::workers::{Prepared, Worker};

/// What a run spent at the provider, whatever its outcome.
#[derive(Debug, Clone, Default)]
pub(super) struct Spent {
    /// The model that answered (as the provider names it), else the one asked for.
    pub model: String,
    pub usage: Usage,
    /// HTTP requests made, retries and the re-ask included.
    pub requests: u32,
    /// Attempts of the last call, counting those spent before the event was parked.
    pub attempts: u32,
    /// Corrective re-asks after an invalid output.
    pub reasks: u32,
    /// Time spent waiting on the provider.
    pub provider_time: Duration,
}

impl Spent {
    pub fn new(model: &str, attempts_before: u32) -> Spent {
        Spent {
            model: model.to_owned(),
            attempts: attempts_before,
            ..Spent::default()
        }
    }

    pub fn record_tokens(&self, worker: &str) {
        metrics::counter!(m::TOKENS, "worker" => worker.to_owned(), "kind" => "prompt")
            .increment(self.usage.prompt_tokens);
        metrics::counter!(m::TOKENS, "worker" => worker.to_owned(), "kind" => "completion")
            .increment(self.usage.completion_tokens);
    }
}

/// How the provider part of a run ended.
pub(super) enum Run {
    Completed(serde_json::Value),
    Failed {
        class: ErrorClass,
        message: String,
    },
    /// The provider asked for a wait too long to hold a consumer slot.
    Park {
        delay: Duration,
    },
}

impl Run {
    /// Whether the provider was up (for the circuit breaker): an answer, even an invalid or a
    /// refusing one, counts as up; transient failures and long back-offs do not.
    pub fn provider_answered(&self) -> bool {
        match self {
            Run::Completed(_) => true,
            Run::Failed { class, .. } => !matches!(
                class,
                ErrorClass::RetriesExhausted | ErrorClass::ProviderUnavailable
            ),
            Run::Park { .. } => false,
        }
    }
}

impl Pipeline {
    pub(super) async fn run_provider(
        &self,
        worker: &Worker,
        config: &ProviderConfig,
        target: &ProviderTarget,
        prepared: &Prepared,
        spent: &mut Spent,
    ) -> Run {
        // The prompt is lent to the request; it is copied only for the corrective re-ask.
        let mut reask: Option<Vec<ChatMessage>> = None;
        loop {
            let request = ChatRequest {
                messages: reask.as_deref().unwrap_or(&prepared.messages),
                temperature: config.params.temperature.or(worker.spec.temperature),
                max_tokens: config.params.max_tokens.or(worker.spec.max_tokens),
                response_format: prepared.response_format.clone(),
            };
            let requests = AtomicU32::new(0);
            let waited = Mutex::new(Duration::ZERO);
            let outcome = retry::retry(&self.retry, spent.attempts, || async {
                let started = Instant::now();
                let result = self.provider.chat(target, &request).await;
                let elapsed = started.elapsed();
                requests.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut total) = waited.lock() {
                    *total += elapsed;
                }
                record_request(target, &result, elapsed);
                result
            })
            .await;
            spent.requests += requests.into_inner();
            spent.provider_time += waited.into_inner().unwrap_or_default();
            let reply = match outcome {
                Attempted::Done { value, attempts } => {
                    spent.attempts = attempts;
                    value
                }
                Attempted::Park {
                    delay, attempts, ..
                } => {
                    spent.attempts = attempts;
                    return Run::Park { delay };
                }
                Attempted::Failed { error, attempts } => {
                    spent.attempts = attempts;
                    let class = if error.is_retryable() {
                        ErrorClass::RetriesExhausted
                    } else {
                        error.class()
                    };
                    return Run::Failed {
                        class,
                        message: error.to_string(),
                    };
                }
            };
            spent.model = reply.model.clone();
            spent.usage.prompt_tokens += reply.usage.prompt_tokens;
            spent.usage.completion_tokens += reply.usage.completion_tokens;
            match worker.check(prepared, &reply.content) {
                Ok(output) => return Run::Completed(output),
                Err(problem) if spent.reasks == 0 => {
                    tracing::info!(%problem, "output invalid; asking once more");
                    spent.reasks += 1;
                    spent.attempts = 0;
                    let messages = reask.get_or_insert_with(|| prepared.messages.clone());
                    messages.push(ChatMessage::new("assistant", reply.content));
                    messages.push(ChatMessage::new(
                        "user",
                        format!("That answer was rejected: {problem}. Reply again with only the corrected JSON object."),
                    ));
                }
                Err(problem) => {
                    return Run::Failed {
                        class: ErrorClass::InvalidOutput,
                        message: format!("the model's output was invalid twice: {problem}"),
                    };
                }
            }
        }
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
    metrics::counter!(m::PROVIDER_REQUESTS, "profile" => profile, "outcome" => outcome,
        "status_class" => status_class)
    .increment(1);
    metrics::histogram!(m::PROVIDER_LATENCY, "profile" => profile).record(waited.as_secs_f64());
}
