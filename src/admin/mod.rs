//! Managing provider configs: the admin HTTP API (`/v1`, bearer token) and the operations it
//! shares with the CLI (`org set/show/test`).
//!
//! The API is mounted only when `COPILOT_ADMIN_TOKEN` is set. No response ever contains an
//! API key: a config is shown with its key masked to the last four characters.

mod edit;
pub mod input;
pub mod patch;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;

pub use input::{ConfigInput, FieldProblem};

use crate::config::EndpointPolicy;
use crate::crypto::{self, KeyRing};
use crate::provider::{
    ChatMessage, ChatRequest, ErrorClass, ProviderClient, ProviderTarget, ResponseFormat,
};
use crate::store::Store;
use crate::store::configs::{Health, ModelParams, OrgContext, ProviderConfig};

/// How a config is shown to operators (CLI `--json` and the API): never the key.
#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub org_id: String,
    pub provider: &'static str,
    pub base_url: String,
    pub model: String,
    /// `…abcd` and the master key id, or null when there is no key.
    pub api_key: Option<KeyView>,
    pub params: ModelParams,
    pub workers: Option<Vec<String>>,
    pub worker_models: std::collections::BTreeMap<String, String>,
    pub context: OrgContext,
    pub max_concurrency: Option<u32>,
    pub enabled: bool,
    pub health: Health,
}

#[derive(Debug, Serialize)]
pub struct KeyView {
    pub last4: String,
    pub key_id: String,
}

impl ConfigView {
    pub fn new(config: &ProviderConfig, keys: &KeyRing) -> ConfigView {
        ConfigView {
            org_id: config.org_id.clone(),
            provider: config.profile.as_str(),
            base_url: config.base_url.clone(),
            model: config.model.clone(),
            api_key: config.api_key.as_ref().map(|sealed| KeyView {
                last4: match keys.open(&config.org_id, sealed) {
                    Ok(key) => crypto::mask(&key),
                    Err(_) => "(cannot decrypt)".to_owned(),
                },
                key_id: sealed.key_id.clone(),
            }),
            params: config.params.clone(),
            workers: config.enabled_workers.clone(),
            worker_models: config.worker_models.clone(),
            context: config.context.clone(),
            max_concurrency: config.max_concurrency,
            enabled: config.enabled,
            health: config.health.clone(),
        }
    }
}

/// The outcome of a test request.
#[derive(Debug, Serialize)]
pub struct TestReport {
    pub ok: bool,
    pub model: Option<String>,
    pub latency_ms: Option<u64>,
    pub error_class: Option<&'static str>,
    pub error: Option<String>,
}

/// Sends one tiny request with the org's config and records the outcome on the config.
pub async fn test_org(
    store: &Store,
    keys: &KeyRing,
    client: &ProviderClient,
    config: &ProviderConfig,
) -> anyhow::Result<TestReport> {
    let api_key = match config
        .api_key
        .as_ref()
        .map(|sealed| keys.open(&config.org_id, sealed))
        .transpose()
    {
        Ok(key) => key,
        Err(err) => {
            let message = err.to_string();
            store
                .record_provider_failure(&config.org_id, &message, true)
                .await?;
            return Ok(TestReport {
                ok: false,
                model: None,
                latency_ms: None,
                error_class: Some(ErrorClass::ConfigInvalid.as_str()),
                error: Some(message),
            });
        }
    };
    let target = ProviderTarget {
        profile: config.profile,
        base_url: config.base_url.clone(),
        api_key,
        model: config.model.clone(),
        timeout: config
            .params
            .timeout_secs
            .map_or(Duration::from_secs(30), Duration::from_secs),
        api_version: config.params.api_version.clone(),
    };
    let messages = [ChatMessage::new("user", "Reply with the single word: ok")];
    let request = ChatRequest {
        messages: &messages,
        temperature: None,
        max_tokens: Some(5),
        response_format: ResponseFormat::Text,
    };
    Ok(match client.chat(&target, &request).await {
        Ok(reply) => {
            store.record_provider_success(&config.org_id).await?;
            TestReport {
                ok: true,
                model: Some(reply.model),
                latency_ms: Some(u64::try_from(reply.latency.as_millis()).unwrap_or(u64::MAX)),
                error_class: None,
                error: None,
            }
        }
        Err(err) => {
            let message = err.to_string();
            let class = err.class();
            store
                .record_provider_failure(&config.org_id, &message, class.is_config_problem())
                .await?;
            TestReport {
                ok: false,
                model: None,
                latency_ms: None,
                error_class: Some(class.as_str()),
                error: Some(message),
            }
        }
    })
}

/// What the API handlers share.
pub struct AdminState {
    pub store: Store,
    pub keys: Arc<KeyRing>,
    pub client: ProviderClient,
    pub policy: EndpointPolicy,
    token_digest: [u8; 32],
}

/// The `/v1` routes, behind bearer authentication with `token`.
pub fn router(
    store: Store,
    keys: Arc<KeyRing>,
    client: ProviderClient,
    token: &SecretString,
) -> Router {
    let policy = client.policy();
    let state = Arc::new(AdminState {
        store,
        keys,
        client,
        policy,
        token_digest: digest(token.expose_secret().as_bytes()),
    });
    Router::new()
        .route("/v1/orgs", get(list_configs))
        .route(
            "/v1/orgs/{org}/provider",
            get(get_config)
                .put(edit::put_config)
                .patch(edit::patch_config)
                .delete(delete_config),
        )
        .route("/v1/orgs/{org}/provider/test", post(test_config))
        .fallback(no_such_route)
        .method_not_allowed_fallback(no_such_method)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn authenticate(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if same_digest(&digest(token.as_bytes()), &state.token_digest) => {
            next.run(request).await
        }
        _ => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
                None,
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    problems: Option<&[FieldProblem]>,
) -> Response {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let Some(problems) = problems {
        body["error"]["fields"] = json!(problems);
        if let Some(first) = problems.first() {
            body["error"]["field"] = json!(first.field);
        }
    }
    (status, axum::Json(body)).into_response()
}

fn unavailable(err: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %err, "admin API: database unavailable");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the database is unavailable; try again",
        None,
    )
}

fn not_found(org: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("org {org} has no provider config"),
        None,
    )
}

/// Answers a path the API does not have in the API's own error shape, not an empty 404.
async fn no_such_route() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no_such_route",
        "no such endpoint; see schemas/admin-api.openapi.yaml",
        None,
    )
}

/// Answers a method a path does not take; axum adds the `Allow` header.
async fn no_such_method() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
        None,
    )
}

/// Configs listed per page by default, and at most.
const PAGE_DEFAULT: u32 = 100;
const PAGE_MAX: u32 = 1000;

/// The query of `GET /v1/orgs`: a page of `limit` configs after org id `after`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// One page of configs, ordered by org id; `next_after` is the `after` of the next page, or
/// null on the last one.
#[derive(Debug, Serialize)]
struct ConfigPage {
    orgs: Vec<ConfigView>,
    next_after: Option<String>,
}

async fn list_configs(
    State(state): State<Arc<AdminState>>,
    query: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(axum::extract::Query(query)) => query,
        Err(rejection) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_query",
                &format!(
                    "{}; use ?after=ORG&limit=1..{PAGE_MAX}",
                    rejection.body_text()
                ),
                None,
            );
        }
    };
    let limit = query.limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        let problem = FieldProblem::new("limit", format!("must be 1..={PAGE_MAX}"));
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_query",
            &problem.to_string(),
            Some(&[problem]),
        );
    }
    // One more than asked tells whether another page follows.
    let fetched = state
        .store
        .provider_configs_page(query.after.as_deref(), i64::from(limit) + 1)
        .await;
    let mut configs = match fetched {
        Ok(configs) => configs,
        Err(err) => return unavailable(err),
    };
    let more = configs.len() > limit as usize;
    configs.truncate(limit as usize);
    let next_after = more
        .then(|| configs.last().map(|config| config.org_id.clone()))
        .flatten();
    let orgs = configs
        .iter()
        .map(|config| ConfigView::new(config, &state.keys))
        .collect();
    axum::Json(ConfigPage { orgs, next_after }).into_response()
}

async fn get_config(State(state): State<Arc<AdminState>>, Path(org): Path<String>) -> Response {
    match state.store.provider_config(&org).await {
        Ok(Some(config)) => axum::Json(ConfigView::new(&config, &state.keys)).into_response(),
        Ok(None) => not_found(&org),
        Err(err) => unavailable(err),
    }
}

async fn delete_config(State(state): State<Arc<AdminState>>, Path(org): Path<String>) -> Response {
    match state.store.remove_provider_config(&org).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(&org),
        Err(err) => unavailable(err),
    }
}

async fn test_config(State(state): State<Arc<AdminState>>, Path(org): Path<String>) -> Response {
    let config = match state.store.provider_config(&org).await {
        Ok(Some(config)) => config,
        Ok(None) => return not_found(&org),
        Err(err) => return unavailable(err),
    };
    match test_org(&state.store, &state.keys, &state.client, &config).await {
        Ok(report) => {
            let status = if report.ok {
                StatusCode::OK
            } else {
                StatusCode::BAD_GATEWAY
            };
            (status, axum::Json(report)).into_response()
        }
        Err(err) => unavailable(err),
    }
}

/// What a rotation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RotationReport {
    pub rotated: usize,
    pub current: usize,
    pub raced: usize,
}

/// Re-seals every key not under the active master key.
/// Safe while workers run: a row is replaced only if it still holds the ciphertext that was
/// read, so a concurrent `org set` is never overwritten.
pub async fn rotate(store: &Store, keys: &KeyRing) -> anyhow::Result<RotationReport> {
    let mut report = RotationReport::default();
    for config in store.provider_configs().await? {
        let Some(sealed) = config.api_key else {
            continue;
        };
        if sealed.key_id == keys.active_key_id() {
            report.current += 1;
            continue;
        }
        let plaintext = keys.open(&config.org_id, &sealed)?;
        let resealed = keys.seal(&config.org_id, &plaintext)?;
        if store
            .replace_sealed_key(&config.org_id, &sealed, &resealed)
            .await?
        {
            report.rotated += 1;
        } else {
            report.raced += 1;
        }
    }
    Ok(report)
}
