//! Logs, metrics and the HTTP listener (`/metrics`, `/healthz`, `/readyz`, admin API).
//!
//! Every metric name is declared and described here; the code that knows an event emits it.
//! Labels are bounded: worker, event type, outcome, reason, error class, provider profile —
//! never an org id or a ticket id.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub const EVENTS_RECEIVED: &str = "copilot_events_received_total";
pub const EVENTS_SKIPPED: &str = "copilot_events_skipped_total";
pub const EVENTS_DEAD_LETTERED: &str = "copilot_events_dead_lettered_total";
pub const EVENTS_PARKED: &str = "copilot_events_parked_total";
pub const EVENTS_RESENT: &str = "copilot_events_resent_total";
pub const RESULTS_PUBLISHED: &str = "copilot_results_published_total";
pub const PROVIDER_REQUESTS: &str = "copilot_provider_requests_total";
pub const PROVIDER_RETRIES: &str = "copilot_provider_retries_total";
pub const PROVIDER_LATENCY: &str = "copilot_provider_latency_seconds";
pub const WORKER_OVERHEAD: &str = "copilot_worker_overhead_seconds";
pub const STEP_DURATION: &str = "copilot_step_duration_seconds";
pub const LEDGER_BATCH_ROWS: &str = "copilot_ledger_batch_rows";
pub const EVENTS_IN_FLIGHT: &str = "copilot_events_in_flight";
pub const ACKS_LOST: &str = "copilot_acks_lost_total";
pub const PUBLISH_RETRIES: &str = "copilot_publish_retries_total";
pub const TOPOLOGY_REDECLARED: &str = "copilot_topology_redeclared_total";
pub const CONSUMERS_RENEWED: &str = "copilot_consumers_renewed_total";
pub const TOKENS: &str = "copilot_tokens_total";
pub const CONFIG_CACHE_HITS: &str = "copilot_config_cache_hits_total";
pub const CONFIG_CACHE_MISSES: &str = "copilot_config_cache_misses_total";
pub const CONFIG_CACHE_INVALIDATIONS: &str = "copilot_config_cache_invalidations_total";
pub const CONFIG_LISTENER_UP: &str = "copilot_config_listener_up";
pub const ORG_CONFIGS: &str = "copilot_org_configs";
pub const ORG_CONFIGS_UNHEALTHY: &str = "copilot_org_configs_unhealthy";

fn describe() {
    describe_counter!(
        EVENTS_RECEIVED,
        "Deliveries taken from a worker queue, by worker and event type."
    );
    describe_counter!(
        EVENTS_SKIPPED,
        "Events acknowledged without a provider call, by worker and reason (no_config, disabled, worker_disabled, unchanged, duplicate, not_subscribed; no_worker, with no worker, for an event no worker of this replica reacts to)."
    );
    describe_counter!(
        EVENTS_DEAD_LETTERED,
        "Deliveries sent to the dead-letter exchange, by worker and reason (unroutable, with no worker, for an event no worker queue was bound for)."
    );
    describe_counter!(
        EVENTS_PARKED,
        "Events parked in a delay queue instead of holding a consumer slot, by worker and reason (provider_backoff, org_busy, circuit_open, shutdown)."
    );
    describe_counter!(
        EVENTS_RESENT,
        "Events that found no worker queue for their type (deleted, not yet declared again), sent through the events exchange again after the topology was declared again."
    );
    describe_counter!(
        RESULTS_PUBLISHED,
        "Result events confirmed by the broker, by worker and outcome (completed, failed)."
    );
    describe_counter!(
        PROVIDER_REQUESTS,
        "Provider HTTP requests, by profile, outcome (ok, error) and status class (2xx, 4xx, 5xx, transport)."
    );
    describe_counter!(
        PROVIDER_RETRIES,
        "Provider retries after a transient error, by error class."
    );
    describe_histogram!(
        PROVIDER_LATENCY,
        metrics::Unit::Seconds,
        "Time waiting on the provider per request, by profile."
    );
    describe_histogram!(
        WORKER_OVERHEAD,
        metrics::Unit::Seconds,
        "Time an event spent in the worker minus time waiting on the provider, by worker."
    );
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "Time of the worker's own steps, by step: start (ledger lookup and claim), record (ledger write), publish (result confirmed by the broker), ack."
    );
    describe_histogram!(
        LEDGER_BATCH_ROWS,
        "Events served by one batched ledger statement, by statement (start, record)."
    );
    describe_gauge!(EVENTS_IN_FLIGHT, "Deliveries being processed right now.");
    describe_counter!(
        ACKS_LOST,
        "Acks the broker did not take because the channel was recovered; the delivery comes back and the ledger answers it."
    );
    describe_counter!(
        PUBLISH_RETRIES,
        "Publishes the broker did not confirm, after which the delivery was held and the publish tried again, by message (result, dead_letter, parked, resent)."
    );
    describe_counter!(
        TOPOLOGY_REDECLARED,
        "Times the broker topology was declared again because part of it was missing."
    );
    describe_counter!(
        CONSUMERS_RENEWED,
        "Idle consumers attached again on a new channel, their old channel closed (handing back what the broker may have sent it unseen)."
    );
    describe_counter!(
        TOKENS,
        "Provider tokens used, by worker and kind (prompt, completion)."
    );
    describe_counter!(
        CONFIG_CACHE_HITS,
        "Provider config lookups answered from the cache."
    );
    describe_counter!(
        CONFIG_CACHE_MISSES,
        "Provider config lookups that went to Postgres."
    );
    describe_counter!(
        CONFIG_CACHE_INVALIDATIONS,
        "Cache entries dropped because Postgres announced a config change."
    );
    describe_gauge!(
        CONFIG_LISTENER_UP,
        "1 while the config cache's listener hears Postgres' change notifications (the cache is in use); 0 while every lookup goes to Postgres."
    );
    describe_gauge!(
        ORG_CONFIGS,
        "Org provider configs stored (read every 30 s)."
    );
    describe_gauge!(
        ORG_CONFIGS_UNHEALTHY,
        "Org provider configs marked unhealthy by a permanent provider error (read every 30 s)."
    );
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ];
            // The worker's own overhead is small; finer buckets let p50/p99 be read from them.
            let overhead_buckets = [
                0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005,
                0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(WORKER_OVERHEAD.to_owned()),
                        &overhead_buckets,
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(STEP_DURATION.to_owned()),
                        &overhead_buckets,
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(LEDGER_BATCH_ROWS.to_owned()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_ok() {
                        describe();
                    }
                    handle
                }
                // The bucket list above is a non-empty constant; this arm is unreachable.
                Err(err) => unreachable!("metric buckets rejected: {err}"),
            }
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the histograms' recorded samples into their buckets every few seconds, until
/// `stop`. The recorder keeps every sample until then, or until a scrape renders them: a
/// worker nobody scrapes would otherwise hold about 50 bytes more per event, forever.
pub async fn keep_metrics_upkept(handle: PrometheusHandle, stop: CancellationToken) {
    while crate::sleep_unless_stopped(UPKEEP_EVERY, &stop).await {
        handle.run_upkeep();
    }
}

/// Records the worker's own time for one event (time in the worker minus provider wait).
pub fn record_overhead(worker: &str, overhead: std::time::Duration) {
    metrics::histogram!(WORKER_OVERHEAD, "worker" => worker.to_owned())
        .record(overhead.as_secs_f64());
}

/// Records how long one of the worker's own steps took (see [`STEP_DURATION`]).
pub fn record_step(step: &'static str, started: std::time::Instant) {
    metrics::histogram!(STEP_DURATION, "step" => step).record(started.elapsed().as_secs_f64());
}

/// Sets up logging; `RUST_LOG` chooses levels (default `info`).
pub fn init_tracing(format: LogFormat) {
    init_tracing_with(format, "info");
}

/// Sets up logging with `default` as the levels when `RUST_LOG` is unset.
pub fn init_tracing_with(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Answers `/readyz`: broker connected, database answering, consumers attached.
pub trait Readiness: Send + Sync + 'static {
    fn ready(&self) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

struct HttpState<R> {
    metrics: PrometheusHandle,
    readiness: Arc<R>,
}

/// Serves the listener until `shutdown` fires. `extra` adds routes (the admin API).
pub async fn serve<R: Readiness>(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    readiness: Arc<R>,
    extra: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(HttpState { metrics, readiness });
    let app = Router::new()
        .route("/metrics", get(metrics_endpoint::<R>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_endpoint::<R>))
        .with_state(state)
        .merge(extra);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the listener, with a clear error when the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

async fn metrics_endpoint<R: Readiness>(
    State(state): State<Arc<HttpState<R>>>,
) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn ready_endpoint<R: Readiness>(State(state): State<Arc<HttpState<R>>>) -> impl IntoResponse {
    match state.readiness.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
