//! One HTTP client for every org's OpenAI-compatible `/chat/completions`.
//!
//! Each request carries only its own org's key, sent in the header its profile expects. The
//! client never follows redirects and connects only where the endpoint guard allows
//! (`http.rs`). Error bodies are read only for the provider's short error code; they are
//! never logged or stored.

use std::time::{Duration, Instant};

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Profile;
use super::guard;
use super::http::{HttpClient, HttpError};
use super::retry::{ProviderError, parse_retry_after};
use crate::config::EndpointPolicy;
use crate::events::Usage;

/// Largest provider answer we read.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Where and as whom one request goes: one org's provider and key.
pub struct ProviderTarget {
    pub profile: Profile,
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub model: String,
    pub timeout: Duration,
    /// Azure's `api-version`.
    pub api_version: Option<String>,
}

impl std::fmt::Debug for ProviderTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderTarget")
            .field("profile", &self.profile)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("model", &self.model)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// The structured output we ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Nothing asked; the schema is in the prompt.
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: std::sync::Arc<Value>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest<'a> {
    /// Borrowed: a call in flight holds no copy of its prompt.
    pub messages: &'a [ChatMessage],
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub response_format: ResponseFormat,
}

/// The chat completion request as sent, borrowing what it can from the [`ChatRequest`].
#[derive(Serialize)]
struct RequestBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<FormatBody<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum FormatBody<'a> {
    JsonObject,
    JsonSchema { json_schema: SchemaBody<'a> },
}

#[derive(Serialize)]
struct SchemaBody<'a> {
    name: &'a str,
    schema: &'a Value,
    strict: bool,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatReply {
    pub content: String,
    pub usage: Usage,
    /// The model that answered, as the provider names it.
    pub model: String,
    /// Time spent waiting on the provider.
    pub latency: Duration,
}

/// The shared client. Cheap to clone.
#[derive(Clone)]
pub struct ProviderClient {
    http: HttpClient,
    policy: EndpointPolicy,
}

impl ProviderClient {
    /// Calls go over HTTP/1.1 only: with HTTP/2, every call to a host shares one connection
    /// and its stream limit (often 100-256 calls in flight), so all orgs on one provider
    /// (api.openai.com) would queue behind each other. Idle connections are kept for reuse
    /// however many calls were in flight (closing them would mean a new connection, and a
    /// TLS handshake, per call in the next burst); one idle for a minute is closed. Retries
    /// are ours (`retry.rs`).
    pub fn new(policy: EndpointPolicy) -> Result<ProviderClient, ProviderError> {
        crate::install_crypto_provider();
        Ok(ProviderClient {
            http: HttpClient::new(policy),
            policy,
        })
    }

    /// The same client, its connections opened through the operator's egress proxy (the
    /// hosts the proxy lists as direct aside).
    pub fn through(mut self, proxy: Option<super::proxy::Proxy>) -> ProviderClient {
        self.http = self.http.through(proxy);
        self
    }

    /// Closes connections left idle past their time, every 15 s until `stop` (see
    /// [`HttpClient::keep_swept`]).
    pub async fn keep_swept(self, stop: tokio_util::sync::CancellationToken) {
        self.http.keep_swept(stop).await;
    }

    pub fn policy(&self) -> EndpointPolicy {
        self.policy
    }

    /// Sends one chat completion. When the provider refuses a parameter the model does not
    /// take (`temperature`, `response_format`), the request is sent once more without it.
    pub async fn chat(
        &self,
        target: &ProviderTarget,
        request: &ChatRequest<'_>,
    ) -> Result<ChatReply, ProviderError> {
        // What a refusal takes away; the request itself is not copied.
        let mut temperature = request.temperature;
        let mut format = request.response_format.clone();
        let mut downgrades = 0;
        loop {
            match self.send(target, request, temperature, &format).await {
                Err(ProviderError::Status {
                    status: 400,
                    code: Some(ref code),
                    ..
                }) if downgrades < 2 && code.starts_with("param:") => {
                    let param = &code["param:".len()..];
                    if param == "temperature" && temperature.is_some() {
                        temperature = None;
                    } else if param == "response_format" {
                        format = match format {
                            ResponseFormat::JsonSchema { .. } => ResponseFormat::JsonObject,
                            _ => ResponseFormat::Text,
                        };
                    } else {
                        return Err(ProviderError::Status {
                            status: 400,
                            code: Some(code.clone()),
                            retry_after: None,
                        });
                    }
                    downgrades += 1;
                    tracing::info!(param, "provider refused a parameter; resending without it");
                }
                other => return other,
            }
        }
    }

    async fn send(
        &self,
        target: &ProviderTarget,
        request: &ChatRequest<'_>,
        temperature: Option<f64>,
        format: &ResponseFormat,
    ) -> Result<ChatReply, ProviderError> {
        let mut url = guard::check_url(&target.base_url, self.policy)?;
        {
            let path = format!("{}/chat/completions", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        if target.profile == Profile::Azure {
            let version = target.api_version.as_deref().unwrap_or("2024-10-21");
            url.query_pairs_mut().append_pair("api-version", version);
        }
        let body = RequestBody {
            model: (target.profile != Profile::Azure).then_some(target.model.as_str()),
            messages: request.messages,
            temperature,
            max_tokens: request.max_tokens,
            response_format: match format {
                ResponseFormat::Text => None,
                ResponseFormat::JsonObject => Some(FormatBody::JsonObject),
                ResponseFormat::JsonSchema { name, schema } => Some(FormatBody::JsonSchema {
                    json_schema: SchemaBody {
                        name,
                        schema,
                        strict: false,
                    },
                }),
            },
        };
        // The body lives until the answer comes: keep it at its size, not at the capacity the
        // serializer grew to (up to twice as much, times every call in flight). The grown
        // buffer is dropped inside the block; a shadowed binding would live on in the future.
        let body = {
            let grown = serde_json::to_vec(&body).map_err(|err| {
                ProviderError::Malformed(format!("cannot encode the request: {err}"))
            })?;
            grown.as_slice().to_vec()
        };
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("copilot-workers/", env!("CARGO_PKG_VERSION"))),
        );
        match (&target.api_key, target.profile) {
            (Some(key), Profile::Azure) => {
                headers.insert("api-key", sensitive(key.expose_secret())?);
            }
            (Some(key), _) => {
                let value = format!("Bearer {}", key.expose_secret());
                headers.insert(AUTHORIZATION, sensitive(&value)?);
            }
            (None, profile) if profile.requires_key() => return Err(ProviderError::MissingKey),
            (None, _) => {}
        }
        let started = Instant::now();
        let reply = self
            .http
            .send(
                Method::POST,
                &url,
                headers,
                body,
                target.timeout,
                MAX_RESPONSE_BYTES,
            )
            .await
            .map_err(|err| transport_error(err, target.timeout))?;
        let latency = started.elapsed();
        let retry_after = parse_retry_after(&reply.headers, time::OffsetDateTime::now_utc());
        let bytes = reply.body;
        if !reply.status.is_success() {
            return Err(ProviderError::Status {
                status: reply.status.as_u16(),
                code: error_code(&bytes),
                retry_after,
            });
        }
        parse_reply(&bytes, latency, &target.model)
    }
}

/// A header value marked sensitive, so that hyper never prints it.
fn sensitive(text: &str) -> Result<HeaderValue, ProviderError> {
    let mut value = HeaderValue::from_str(text).map_err(|_| ProviderError::MissingKey)?;
    value.set_sensitive(true);
    Ok(value)
}

fn transport_error(err: HttpError, timeout: Duration) -> ProviderError {
    match err {
        HttpError::Refused(refused) => ProviderError::Refused(refused),
        HttpError::Timeout => ProviderError::Timeout(timeout),
        HttpError::TooLarge(_) => ProviderError::Malformed("answer too large".into()),
        HttpError::Unresolved | HttpError::Connect | HttpError::Tls(_) | HttpError::Proxy(_) => {
            ProviderError::Connect(err.to_string())
        }
        HttpError::Request => ProviderError::Connect("request failed".into()),
    }
}

/// Extracts a short, safe identifier from an error body: `param:<name>` for a refused
/// parameter, else the provider's `code` or `type`. Never the message text.
fn error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let clean = |text: &str| -> Option<String> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        ok.then(|| text.to_owned())
    };
    let code = error.get("code").and_then(Value::as_str).and_then(clean);
    let param = error.get("param").and_then(Value::as_str).and_then(clean);
    if code.as_deref() == Some("insufficient_quota") {
        return code;
    }
    if let Some(param) = param
        && matches!(param.as_str(), "temperature" | "response_format")
    {
        return Some(format!("param:{param}"));
    }
    code.or_else(|| error.get("type").and_then(Value::as_str).and_then(clean))
}

/// The parts of a chat completion the worker reads, borrowed from the body where the JSON
/// allows. The token counts and the model name are read leniently (a provider that sends
/// them oddly typed still answered).
#[derive(Deserialize)]
struct ReplyBody<'a> {
    #[serde(borrow, default)]
    choices: Vec<ReplyChoice<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    model: Option<Value>,
}

#[derive(Deserialize)]
struct ReplyChoice<'a> {
    #[serde(borrow, default)]
    message: Option<ReplyMessage<'a>>,
}

#[derive(Deserialize)]
struct ReplyMessage<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

fn parse_reply(
    bytes: &[u8],
    latency: Duration,
    requested_model: &str,
) -> Result<ChatReply, ProviderError> {
    let reply: ReplyBody = serde_json::from_slice(bytes)
        .map_err(|_| ProviderError::Malformed("not a chat completion".into()))?;
    let content = reply
        .choices
        .into_iter()
        .next()
        .and_then(|choice| choice.message)
        .and_then(|message| message.content)
        .ok_or_else(|| ProviderError::Malformed("no choices[0].message.content".into()))?;
    let tokens = |name: &str| {
        reply
            .usage
            .as_ref()
            .and_then(|usage| usage.get(name))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(ChatReply {
        content: content.into_owned(),
        usage: Usage {
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
        },
        model: reply
            .model
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or(requested_model)
            .to_owned(),
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_short_identifiers_only() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-abc...wxyz","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        assert_eq!(error_code(body).as_deref(), Some("invalid_api_key"));
        let body = br#"{"error":{"message":"x","code":"has spaces sk-123"}}"#;
        assert_eq!(error_code(body), None);
        let body = br#"{"error":{"message":"unsupported","param":"temperature","code":"unsupported_value"}}"#;
        assert_eq!(error_code(body).as_deref(), Some("param:temperature"));
        assert_eq!(error_code(b"<html>"), None);
    }

    #[test]
    fn replies_are_parsed() {
        let body = br#"{"model":"m-1","choices":[{"message":{"role":"assistant","content":"{}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let reply = parse_reply(body, Duration::ZERO, "asked").unwrap();
        assert_eq!(reply.content, "{}");
        assert_eq!(reply.usage.completion_tokens, 4);
        assert_eq!(reply.model, "m-1");
        assert!(parse_reply(b"{}", Duration::ZERO, "m").is_err());
        assert!(parse_reply(b"<html>", Duration::ZERO, "m").is_err());
        // Escapes in the content are decoded; oddly typed counts and model read as absent.
        let body = br#"{"model":7,"choices":[{"message":{"content":"{\"a\":\"x\\ny\"}"}}],"usage":{"prompt_tokens":"3"}}"#;
        let reply = parse_reply(body, Duration::ZERO, "asked").unwrap();
        assert_eq!(reply.content, "{\"a\":\"x\\ny\"}");
        assert_eq!(reply.usage.prompt_tokens, 0);
        assert_eq!(reply.model, "asked");
    }
}
