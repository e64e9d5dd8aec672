//! A built-in fake OpenAI-compatible provider on 127.0.0.1, for `demo` and `bench`.
//!
//! It answers `/chat/completions` with plausible, schema-valid output derived from the ticket
//! text in the prompt, after an optional delay. It exists only inside the process that starts
//! it, on a random loopback port: no org config points at it unless that process sets one up,
//! and it is never a fallback for an org without a config.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::borrow::Cow;
use tokio_util::sync::CancellationToken;

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeBehaviour {
    /// Time taken per answer.
    pub latency: Duration,
    /// The bearer token it requires; `None` accepts any.
    pub expected_key: Option<String>,
    /// Misbehave on half the requests (500, 429 with Retry-After, a hang past any sane
    /// timeout, a garbage body, 503 with retry-after-ms), for soak runs.
    pub chaos: bool,
}

struct FakeState {
    behaviour: FakeBehaviour,
    requests: AtomicU64,
    /// Calls being answered now, and the most there have been at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

/// Counts a call as in flight while it lives.
struct InFlight<'a>(&'a FakeState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a FakeState) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running fake provider.
pub struct FakeProvider {
    pub addr: SocketAddr,
    state: Arc<FakeState>,
    shutdown: CancellationToken,
}

impl FakeProvider {
    /// Starts on a random loopback port.
    pub async fn start(behaviour: FakeBehaviour) -> std::io::Result<FakeProvider> {
        // A deep accept backlog: the benchmark opens thousands of connections at once.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState {
            behaviour,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(answer))
            .with_state(state.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            // No Nagle delay on answers, as a real provider's front end would.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(FakeProvider {
            addr,
            state,
            shutdown,
        })
    }

    /// The base URL an org config would use.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The most calls it has been answering at once since it started, or since the last
    /// `reset_peak_in_flight`.
    pub fn peak_in_flight(&self) -> u64 {
        self.state.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Starts counting the peak again from the calls in flight now.
    pub fn reset_peak_in_flight(&self) {
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.peak_in_flight.store(now, Ordering::SeqCst);
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The parts of a chat completion request the fake reads, borrowed from the body where
/// the JSON allows (a string with escapes is copied). The schema stays raw text until a
/// worker's answer needs it: parsing every request whole would put the fake's CPU, which
/// shares the machine with the worker under `bench`, on the worker's bill.
#[derive(Deserialize)]
struct FakeRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Vec<FakeMessage<'a>>,
    #[serde(borrow, default)]
    response_format: Option<FakeFormat<'a>>,
}

#[derive(Deserialize)]
struct FakeMessage<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FakeFormat<'a> {
    #[serde(borrow, default)]
    json_schema: Option<FakeSchema<'a>>,
}

#[derive(Deserialize)]
struct FakeSchema<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct FakeReply<'a> {
    id: &'static str,
    object: &'static str,
    model: &'a str,
    choices: [FakeChoice; 1],
    usage: FakeUsage,
}

#[derive(Serialize)]
struct FakeChoice {
    index: u32,
    finish_reason: &'static str,
    message: FakeAnswer,
}

#[derive(Serialize)]
struct FakeAnswer {
    role: &'static str,
    content: String,
}

#[derive(Serialize)]
struct FakeUsage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn answer(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(expected) = &state.behaviour.expected_key {
        let given = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if given != Some(expected.as_str()) {
            let error = json!({"error": {"message": "invalid key", "type": "invalid_request_error", "code": "invalid_api_key"}});
            return (StatusCode::UNAUTHORIZED, Json(error)).into_response();
        }
    }
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&state);
    if !state.behaviour.latency.is_zero() {
        tokio::time::sleep(state.behaviour.latency).await;
    }
    if state.behaviour.chaos
        && let Some(response) = misbehave(n).await
    {
        return response;
    }
    let request: FakeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            let error = json!({"error": {"message": format!("invalid JSON body: {err}"),
                "type": "invalid_request_error", "code": null}});
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
    };
    let format = request
        .response_format
        .as_ref()
        .and_then(|format| format.json_schema.as_ref());
    let worker = format
        .and_then(|format| format.name.as_deref())
        .unwrap_or("");
    let schema = format.and_then(|format| format.schema);
    let contents: Vec<&str> = request
        .messages
        .iter()
        .filter_map(|message| message.content.as_deref())
        .collect();
    let whole = contents.join("\n");
    // The ticket is in the last (user) message; the system prompt carries tone and language.
    let ticket = contents.last().copied().unwrap_or("");
    let content = compose(worker, schema, ticket, &whole).to_string();
    let usage = FakeUsage {
        prompt_tokens: whole.len().div_ceil(4),
        completion_tokens: content.len().div_ceil(4),
    };
    let reply = FakeReply {
        id: "chatcmpl-fake",
        object: "chat.completion",
        model: request.model.as_deref().unwrap_or("fake-model"),
        choices: [FakeChoice {
            index: 0,
            finish_reason: "stop",
            message: FakeAnswer {
                role: "assistant",
                content,
            },
        }],
        usage,
    };
    Json(reply).into_response()
}

/// The chaos schedule: every other request fails, in five different ways.
async fn misbehave(n: u64) -> Option<Response> {
    let error = |status: StatusCode| {
        (
            status,
            Json(json!({"error": {"message": "chaos", "type": "server_error"}})),
        )
    };
    Some(match n % 10 {
        0 => error(StatusCode::INTERNAL_SERVER_ERROR).into_response(),
        2 => {
            // As OpenAI answers a rate limit.
            let body = json!({"error": {"message": "chaos: rate limit reached",
                "type": "requests", "code": "rate_limit_exceeded"}});
            let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            response
        }
        4 => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            error(StatusCode::GATEWAY_TIMEOUT).into_response()
        }
        6 => (StatusCode::OK, "<html>upstream error</html>").into_response(),
        8 => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE).into_response();
            response.headers_mut().insert(
                "retry-after-ms",
                axum::http::HeaderValue::from_static("250"),
            );
            response
        }
        _ => return None,
    })
}

fn line_after<'a>(prompt: &'a str, label: &str) -> Option<&'a str> {
    prompt
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .map(str::trim)
}

fn first_sentence(text: &str) -> String {
    let end = text.find(['.', '!', '?']).map_or(text.len(), |i| i + 1);
    text[..end].trim().chars().take(160).collect()
}

fn guess_language(text: &str) -> &'static str {
    let lower = format!(" {} ", text.to_lowercase());
    let score = |words: &[&str]| {
        words
            .iter()
            .filter(|w| lower.contains(&format!(" {w} ")))
            .count()
    };
    let candidates = [
        ("de", score(&["der", "die", "und", "nicht", "ich", "ist"])),
        ("fr", score(&["le", "la", "et", "je", "pas", "est"])),
        ("es", score(&["el", "los", "y", "no", "está", "mi"])),
        ("en", score(&["the", "and", "is", "my", "not", "i"])),
    ];
    candidates
        .iter()
        .max_by_key(|(_, s)| *s)
        .map_or("en", |(lang, _)| lang)
}

/// Builds an output for `worker` from the prompt text; unknown workers get a minimal
/// instance of their schema.
fn compose(worker: &str, schema: Option<&RawValue>, prompt: &str, whole: &str) -> Value {
    let schema = || -> Value {
        schema
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(Value::Null)
    };
    let subject = line_after(prompt, "Subject:").unwrap_or("the ticket");
    let customer: Vec<&str> = prompt
        .lines()
        .filter_map(|line| line.trim().strip_prefix("[customer]"))
        .map(str::trim)
        .collect();
    let latest = customer.last().copied().unwrap_or(subject);
    let lower = prompt.to_lowercase();
    let negative = [
        "angry",
        "unacceptable",
        "refund",
        "broken",
        "down",
        "frustrat",
        "again",
        "worst",
        "cancel",
    ]
    .iter()
    .filter(|w| lower.contains(*w))
    .count();
    let urgent = ["urgent", "asap", "outage", "down", "immediately"]
        .iter()
        .any(|w| lower.contains(w));
    match worker {
        "summarize" => json!({
            "summary": format!("{}. The customer writes: {}", first_sentence(subject).trim_end_matches('.'), first_sentence(latest)),
            "key_points": customer.iter().take(3).map(|m| first_sentence(m)).collect::<Vec<_>>(),
            "open_questions": if lower.contains('?') { vec!["Which account or order is affected?".to_owned()] } else { vec![] },
        }),
        "triage" => {
            let categories: Vec<String> = schema()
                .pointer("/properties/category/enum")
                .and_then(Value::as_array)
                .map(|values| {
                    values
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let category = categories
                .iter()
                .find(|c| lower.contains(&c.to_lowercase()))
                .or(categories.first())
                .cloned()
                .unwrap_or_else(|| {
                    if lower.contains("invoice") || lower.contains("refund") {
                        "billing".into()
                    } else {
                        "technical".into()
                    }
                });
            json!({
                "category": category,
                "priority": if urgent { "urgent" } else if negative > 1 { "high" } else { "normal" },
                "tags": if lower.contains("refund") { vec!["refund"] } else { vec![] },
                "confidence": 0.82,
            })
        }
        "sentiment" => {
            let (label, score) = match negative {
                0 => ("neutral", 0.1),
                1 => ("negative", -0.4),
                _ => ("very_negative", -0.8),
            };
            json!({"sentiment": label, "score": score, "confidence": 0.77})
        }
        "language" => json!({"language": guess_language(latest), "confidence": 0.9}),
        "reply_draft" => {
            let language = line_after(whole, "Reply language:")
                .filter(|l| l.len() == 2)
                .unwrap_or_else(|| guess_language(latest));
            let reply = match language {
                "de" => format!(
                    "Hallo,\n\nvielen Dank für Ihre Nachricht zu „{subject}“. Wir sehen uns das an und melden uns in Kürze.\n\nViele Grüße\nSupport"
                ),
                "fr" => format!(
                    "Bonjour,\n\nmerci pour votre message au sujet de « {subject} ». Nous regardons cela et revenons vers vous rapidement.\n\nCordialement,\nLe support"
                ),
                _ => format!(
                    "Hello,\n\nthank you for reaching out about \"{subject}\". We are looking into it and will get back to you shortly.\n\nBest regards,\nSupport"
                ),
            };
            json!({
                "reply": reply,
                "language": language,
                "tone": line_after(whole, "Tone:").unwrap_or("friendly"),
            })
        }
        _ => instance_of(&schema()),
    }
}

/// A minimal instance of a JSON Schema: required properties with placeholder values.
fn instance_of(schema: &Value) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|v| v.first())
    {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut object = serde_json::Map::new();
            let required = schema
                .get("required")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for name in required.iter().filter_map(Value::as_str) {
                let property = schema
                    .pointer(&format!("/properties/{name}"))
                    .unwrap_or(&Value::Null);
                object.insert(name.to_owned(), instance_of(property));
            }
            Value::Object(object)
        }
        Some("array") => json!([]),
        Some("number") | Some("integer") => schema.get("minimum").cloned().unwrap_or(json!(0)),
        Some("boolean") => json!(true),
        _ => json!("example"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ask(body: &str) -> (StatusCode, Value) {
        let state = Arc::new(FakeState {
            behaviour: FakeBehaviour {
                latency: Duration::ZERO,
                expected_key: None,
                chaos: false,
            },
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
        });
        let response = answer(State(state), HeaderMap::new(), Bytes::from(body.to_owned())).await;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn answers_from_the_parts_of_the_request_it_reads() {
        let request = json!({"model": "m1", "temperature": 0.2, "messages": [
            {"role": "system", "content": "Tone: formal"},
            {"role": "user", "content": "Subject: \"Refund\" please\n[customer] I want a refund."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "triage",
                "strict": false, "schema": {"type": "object", "properties": {
                    "category": {"enum": ["shipping", "refund"]}}}}}});
        let (status, reply) = ask(&request.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply["model"], "m1");
        let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
        let output: Value = serde_json::from_str(content).unwrap();
        assert_eq!(
            output["category"], "refund",
            "picked from the schema's enum"
        );
        assert_eq!(output["tags"], json!(["refund"]));
        assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_refused_as_a_bad_request() {
        let (status, reply) = ask("not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(reply["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn unknown_workers_get_a_schema_instance() {
        let schema = json!({"type": "object", "required": ["a", "b", "c"], "properties": {
            "a": {"type": "string"}, "b": {"enum": ["x", "y"]}, "c": {"type": "number", "minimum": 1}}});
        assert_eq!(
            instance_of(&schema),
            json!({"a": "example", "b": "x", "c": 1})
        );
    }
}
