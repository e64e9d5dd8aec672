//! The public messages: the ticket events we consume and the result events we publish.
//!
//! These serde types mirror `schemas/ticket-event.schema.json` and
//! `schemas/result-event.schema.json`; tests validate real messages against those files so the
//! two cannot drift apart silently. Parsing an input never panics: every way it can be wrong
//! has a stable reason that becomes the dead letter's `x-copilot-reason` header.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `content_type` of a structured-mode CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// The longest event id, org id or ticket id accepted, in bytes (as in the event schema).
pub const MAX_ID_BYTES: usize = 200;
/// `source` of every result event.
pub const RESULT_SOURCE: &str = "copilot-workers";
/// Result event type when a worker produced an output.
pub const COMPLETED_TYPE: &str = "ticket.enrichment.completed";
/// Result event type when a worker gave up.
pub const FAILED_TYPE: &str = "ticket.enrichment.failed";

/// The ticket event types a helpdesk publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "ticket.created")]
    TicketCreated,
    #[serde(rename = "ticket.updated")]
    TicketUpdated,
    #[serde(rename = "ticket.message_added")]
    TicketMessageAdded,
}

impl EventType {
    pub const ALL: [EventType; 3] = [
        EventType::TicketCreated,
        EventType::TicketUpdated,
        EventType::TicketMessageAdded,
    ];

    /// The CloudEvent `type`, which is also the routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::TicketCreated => "ticket.created",
            EventType::TicketUpdated => "ticket.updated",
            EventType::TicketMessageAdded => "ticket.message_added",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// An input CloudEvent (structured JSON mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    pub data: TicketEventData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketEventData {
    pub org_id: String,
    pub ticket: Ticket,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<Requester>,
    #[serde(default)]
    pub messages: Vec<TicketMessage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requester {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketMessage {
    pub id: String,
    pub author_role: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// Why an input was refused. `reason()` is stable: it is the dead letter's header and a
/// metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    #[error("event is {size} bytes, over the {limit}-byte limit")]
    Oversized { size: usize, limit: usize },
    #[error("content type {0:?} is not application/cloudevents+json or application/json")]
    WrongContentType(String),
    #[error("body is not valid UTF-8")]
    NotUtf8,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is not a JSON object")]
    NotObject,
    #[error("specversion must be \"1.0\"")]
    WrongSpecVersion,
    #[error("required field `{0}` is missing or empty")]
    MissingField(&'static str),
    #[error("event type {0:?} is not one this service handles")]
    UnknownType(String),
    #[error("field has the wrong shape: {0}")]
    InvalidField(String),
}

impl BadInput {
    pub fn reason(&self) -> &'static str {
        match self {
            BadInput::Oversized { .. } => "oversized",
            BadInput::WrongContentType(_) => "wrong_content_type",
            BadInput::NotUtf8 => "not_utf8",
            BadInput::NotJson(_) => "not_json",
            BadInput::NotObject => "not_object",
            BadInput::WrongSpecVersion => "wrong_specversion",
            BadInput::MissingField("data.org_id") => "missing_org",
            BadInput::MissingField("data.ticket") => "missing_ticket",
            BadInput::MissingField(_) => "missing_field",
            BadInput::UnknownType(_) => "unknown_type",
            BadInput::InvalidField(_) => "invalid_field",
        }
    }
}

/// Parses and checks one delivery body. `content_type` is the AMQP property, if any.
pub fn parse_event(
    body: &[u8],
    content_type: Option<&str>,
    max_bytes: usize,
) -> Result<TicketEvent, BadInput> {
    if body.len() > max_bytes {
        return Err(BadInput::Oversized {
            size: body.len(),
            limit: max_bytes,
        });
    }
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case(CLOUDEVENTS_JSON)
            && !essence.eq_ignore_ascii_case("application/json")
        {
            return Err(BadInput::WrongContentType(content_type.to_owned()));
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| BadInput::NotUtf8)?;
    // The common case: a well-formed event parses straight into its type. Whatever the typed
    // parse or `well_formed` refuses goes the long way below, which names the defect; both
    // ways accept exactly the same events.
    if let Ok(event) = serde_json::from_str::<TicketEvent>(text)
        && well_formed(&event)
    {
        return Ok(event);
    }
    let value: Value =
        serde_json::from_str(text).map_err(|err| BadInput::NotJson(err.to_string()))?;
    let object = value.as_object().ok_or(BadInput::NotObject)?;
    if object.get("specversion").and_then(Value::as_str) != Some("1.0") {
        return Err(BadInput::WrongSpecVersion);
    }
    for field in ["id", "source"] {
        match object.get(field) {
            None | Some(Value::Null) => return Err(BadInput::MissingField(field_name(field))),
            Some(Value::String(text)) if text.is_empty() => {
                return Err(BadInput::MissingField(field_name(field)));
            }
            Some(Value::String(_)) => {}
            Some(_) => {
                return Err(BadInput::InvalidField(format!(
                    "`{field}` must be a string"
                )));
            }
        }
    }
    let kind = object
        .get("type")
        .and_then(Value::as_str)
        .ok_or(BadInput::MissingField("type"))?;
    if EventType::parse(kind).is_none() {
        return Err(BadInput::UnknownType(kind.chars().take(100).collect()));
    }
    let data = object
        .get("data")
        .and_then(Value::as_object)
        .ok_or(BadInput::MissingField("data"))?;
    if data
        .get("org_id")
        .and_then(Value::as_str)
        .is_none_or(|org| org.trim().is_empty())
    {
        return Err(BadInput::MissingField("data.org_id"));
    }
    if !data.get("ticket").is_some_and(Value::is_object) {
        return Err(BadInput::MissingField("data.ticket"));
    }
    let event: TicketEvent =
        serde_json::from_value(value).map_err(|err| BadInput::InvalidField(err.to_string()))?;
    if event.id.len() > MAX_ID_BYTES
        || event.data.org_id.len() > MAX_ID_BYTES
        || event.data.ticket.id.len() > MAX_ID_BYTES
    {
        return Err(BadInput::InvalidField(format!(
            "id, org_id and ticket.id must be at most {MAX_ID_BYTES} bytes"
        )));
    }
    if event.data.ticket.id.trim().is_empty() {
        return Err(BadInput::MissingField("data.ticket.id"));
    }
    Ok(event)
}

/// The checks of `parse_event` that the types do not make.
fn well_formed(event: &TicketEvent) -> bool {
    event.specversion == "1.0"
        && !event.id.is_empty()
        && !event.source.is_empty()
        && !event.data.org_id.trim().is_empty()
        && !event.data.ticket.id.trim().is_empty()
        && event.id.len() <= MAX_ID_BYTES
        && event.data.org_id.len() <= MAX_ID_BYTES
        && event.data.ticket.id.len() <= MAX_ID_BYTES
}

/// The static name of a required top-level field.
fn field_name(field: &str) -> &'static str {
    match field {
        "id" => "id",
        "source" => "source",
        "type" => "type",
        _ => "data",
    }
}

/// Token usage as the provider reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Why a worker gave up, in a form downstream code can branch on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    /// Stable machine-readable class, e.g. `provider_auth`, `invalid_output`.
    pub class: String,
    /// A human sentence; never contains a secret or a provider's raw body.
    pub message: String,
}

/// The `data` of a result event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultData {
    pub org_id: String,
    pub ticket_id: String,
    pub worker: String,
    pub source_event_id: String,
    pub source_event_type: EventType,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    pub usage: Usage,
    pub latency_ms: u64,
    /// Provider attempts of the final call (retries included).
    pub attempts: u32,
    /// Corrective re-asks after an output that did not validate (0 or 1).
    #[serde(default)]
    pub reasks: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResultError>,
}

/// A result CloudEvent as published to `copilot.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    pub data: ResultData,
}

impl ResultEvent {
    /// Builds the result for `data`; its id depends only on the source event id and worker.
    pub fn new(data: ResultData, time: String) -> ResultEvent {
        let kind = if data.error.is_some() {
            FAILED_TYPE
        } else {
            COMPLETED_TYPE
        };
        ResultEvent {
            specversion: "1.0".to_owned(),
            id: result_id(&data.source_event_id, &data.worker),
            source: RESULT_SOURCE.to_owned(),
            kind: kind.to_owned(),
            subject: data.ticket_id.clone(),
            time,
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }

    pub fn is_completed(&self) -> bool {
        self.kind == COMPLETED_TYPE
    }

    /// `ticket.enriched.<worker>` or `ticket.enrichment_failed.<worker>`.
    pub fn routing_key(&self) -> String {
        result_routing_key(self.is_completed(), &self.data.worker)
    }
}

/// The routing key of a result: `ticket.enriched.<worker>` or
/// `ticket.enrichment_failed.<worker>`.
pub fn result_routing_key(completed: bool, worker: &str) -> String {
    if completed {
        format!("ticket.enriched.{worker}")
    } else {
        format!("ticket.enrichment_failed.{worker}")
    }
}

/// The deterministic result id for (source event id, worker), so a redelivered event yields
/// the same id and downstream can deduplicate.
pub fn result_id(source_event_id: &str, worker: &str) -> String {
    let mut input = Vec::with_capacity(source_event_id.len() + worker.len() + 1);
    input.extend_from_slice(source_event_id.as_bytes());
    input.push(0);
    input.extend_from_slice(worker.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut id = String::with_capacity(4 + 32);
    id.push_str("res_");
    push_hex(&mut id, &digest.as_ref()[..16]);
    id
}

/// Appends `bytes` to `out` as lowercase hex (ids and hashes on the hot path: no allocation
/// per byte).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

/// Now, as an RFC 3339 UTC timestamp.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Value {
        serde_json::json!({
            "specversion": "1.0", "id": "evt_1", "source": "helpdesk://acme",
            "type": "ticket.created",
            "data": {"org_id": "org_acme", "ticket": {"id": "T-1", "subject": "Hi",
                "messages": [{"id": "m1", "author_role": "customer", "body": "Help"}]}}
        })
    }

    fn reason(body: &[u8]) -> &'static str {
        parse_event(body, None, 1 << 20).unwrap_err().reason()
    }

    #[test]
    fn parses_a_good_event() {
        let event = parse_event(
            good().to_string().as_bytes(),
            Some(CLOUDEVENTS_JSON),
            1 << 20,
        )
        .unwrap();
        assert_eq!(event.kind, EventType::TicketCreated);
        assert_eq!(event.data.ticket.messages[0].body, "Help");
    }

    #[test]
    fn each_defect_has_its_reason() {
        let with = |f: &dyn Fn(&mut Value)| {
            let mut value = good();
            f(&mut value);
            value.to_string().into_bytes()
        };
        assert_eq!(reason(b"{not json"), "not_json");
        assert_eq!(reason(&[0xff, 0xfe]), "not_utf8");
        assert_eq!(reason(b"[1]"), "not_object");
        assert_eq!(
            reason(&with(&|v| v["specversion"] = "0.3".into())),
            "wrong_specversion"
        );
        assert_eq!(reason(&with(&|v| v["id"] = "".into())), "missing_field");
        assert_eq!(
            reason(&with(&|v| v["type"] = "ticket.deleted".into())),
            "unknown_type"
        );
        assert_eq!(
            reason(&with(&|v| v["data"]["org_id"] = Value::Null)),
            "missing_org"
        );
        assert_eq!(
            reason(&with(&|v| v["data"]["ticket"] = 3.into())),
            "missing_ticket"
        );
        assert_eq!(
            reason(&with(&|v| v["data"]["ticket"]["tags"] = "x".into())),
            "invalid_field"
        );
        let body = good().to_string();
        assert_eq!(
            parse_event(body.as_bytes(), None, 10).unwrap_err().reason(),
            "oversized"
        );
        assert_eq!(
            parse_event(body.as_bytes(), Some("text/plain"), 1 << 20)
                .unwrap_err()
                .reason(),
            "wrong_content_type"
        );
    }

    #[test]
    fn result_ids_are_deterministic_and_distinct() {
        assert_eq!(
            result_id("evt_1", "summarize"),
            result_id("evt_1", "summarize")
        );
        assert_ne!(
            result_id("evt_1", "summarize"),
            result_id("evt_1", "triage")
        );
        assert_ne!(
            result_id("evt_1", "summarize"),
            result_id("evt_2", "summarize")
        );
        // The id of a result already published must not change from one version to the
        // next: downstream deduplicates on it. (SHA-256 of "evt_1\0summarize", first 16 bytes.)
        assert_eq!(
            result_id("evt_1", "summarize"),
            "res_f2e2c53ae180aed6d397f71ce319e44d"
        );
        let mut hex = String::new();
        push_hex(&mut hex, &[0x00, 0x0f, 0xa5, 0xff]);
        assert_eq!(hex, "000fa5ff");
    }
}
