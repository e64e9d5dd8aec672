//! Turning a ticket into a prompt: trimming it to the worker's token budget, rendering the
//! worker's templates, and choosing how to ask for structured output.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use super::{Worker, WorkerError};
use crate::events::{EventType, Ticket, TicketMessage};
use crate::provider::{ChatMessage, ResponseFormat, StructuredMode};
use crate::store::configs::OrgContext;

/// Longest single message body kept, in estimated tokens.
const MAX_MESSAGE_TOKENS: usize = 1500;

/// What trimming removed, so prompts and logs can say so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrimReport {
    /// Messages left out between the first and the latest ones.
    pub omitted_messages: usize,
    /// Messages whose body was shortened.
    pub shortened_messages: usize,
}

/// A request ready to send, and what is needed to check its answer.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub messages: Vec<ChatMessage>,
    pub response_format: ResponseFormat,
    /// The schema the output must satisfy (the worker's own, or narrowed by the org's context).
    pub schema: Arc<Value>,
    /// SHA-256 of the model and the prompt: equal hashes mean an unchanged input.
    pub input_hash: String,
    pub trim: TrimReport,
}

/// Rough token estimate: four bytes a token, which overestimates for most languages.
pub(crate) fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

fn shorten(body: &str, max_tokens: usize) -> Option<String> {
    let max_bytes = max_tokens * 4;
    if body.len() <= max_bytes {
        return None;
    }
    let mut cut = max_bytes;
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(format!("{} […message shortened…]", &body[..cut]))
}

/// Keeps the first message and as many of the latest as fit in `budget` estimated tokens.
fn trim_messages(messages: &[TicketMessage], budget: usize) -> (Vec<TicketMessage>, TrimReport) {
    let mut report = TrimReport::default();
    let mut kept: Vec<TicketMessage> = messages
        .iter()
        .map(|message| {
            let mut message = message.clone();
            if let Some(short) = shorten(&message.body, MAX_MESSAGE_TOKENS.min(budget / 2).max(50))
            {
                message.body = short;
                report.shortened_messages += 1;
            }
            message
        })
        .collect();
    let cost = |message: &TicketMessage| estimate_tokens(&message.body) + 12;
    let total: usize = kept.iter().map(cost).sum();
    if total <= budget || kept.len() <= 2 {
        return (kept, report);
    }
    let first = kept.remove(0);
    let mut used = cost(&first);
    let mut latest = Vec::new();
    while let Some(message) = kept.pop() {
        if used + cost(&message) > budget && !latest.is_empty() {
            kept.push(message);
            break;
        }
        used += cost(&message);
        latest.push(message);
    }
    report.omitted_messages = kept.len();
    latest.reverse();
    let mut result = vec![first];
    result.extend(latest);
    (result, report)
}

/// The ticket as the standard text block every prompt can include as `{{ ticket_text }}`.
fn transcript(ticket: &Ticket, messages: &[TicketMessage], trim: TrimReport) -> String {
    use std::fmt::Write as _;
    // Sized once: the bodies plus a line of labels each (writing to a String cannot fail).
    let bodies: usize = messages
        .iter()
        .map(|message| message.body.len() + message.author_role.len() + 4)
        .sum();
    let mut text = String::with_capacity(bodies + ticket.subject.len() + 256);
    let _ = write!(text, "Ticket: {}\nSubject: {}\n", ticket.id, ticket.subject);
    for (label, value) in [
        ("Status", &ticket.status),
        ("Priority", &ticket.priority),
        ("Channel", &ticket.channel),
    ] {
        if let Some(value) = value {
            let _ = writeln!(text, "{label}: {value}");
        }
    }
    if !ticket.tags.is_empty() {
        let _ = writeln!(text, "Tags: {}", ticket.tags.join(", "));
    }
    text.push_str("Messages, oldest first:\n");
    for (index, message) in messages.iter().enumerate() {
        if index == 1 && trim.omitted_messages > 0 {
            let _ = writeln!(
                text,
                "[… {} earlier messages omitted to fit the budget …]",
                trim.omitted_messages
            );
        }
        let _ = write!(text, "[{}] ", message.author_role);
        // One line per message: its line breaks become spaces.
        for (i, line) in message.body.split('\n').enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(line);
        }
        text.push('\n');
    }
    text
}

impl Worker {
    /// Builds the request for one ticket: trimmed, rendered, with the structured-output mode
    /// the profile supports.
    pub fn prepare(
        &self,
        ticket: &Ticket,
        kind: EventType,
        org: &OrgContext,
        mode: StructuredMode,
        model: &str,
    ) -> Result<Prepared, WorkerError> {
        let (messages, trim) = trim_messages(&ticket.messages, self.spec.input_token_budget);
        let mut schema = self.schema.clone();
        let mut schema_text = None;
        if let Some(field) = &self.spec.category_field
            && !org.categories.is_empty()
        {
            let mut narrowed = (*self.schema).clone();
            if let Some(property) = narrowed.pointer_mut(&format!("/properties/{field}")) {
                property["enum"] = json!(org.categories);
            }
            schema_text = Some(serde_json::to_string(&narrowed).unwrap_or_default());
            schema = Arc::new(narrowed);
        }
        let ticket_text = transcript(ticket, &messages, trim);
        let context = minijinja::context! {
            ticket_text => ticket_text,
            ticket => minijinja::context! {
                id => &ticket.id, subject => &ticket.subject, status => &ticket.status,
                priority => &ticket.priority, channel => &ticket.channel, tags => &ticket.tags,
                requester => minijinja::value::Serde(&ticket.requester),
                messages => minijinja::value::Serde(&messages),
            },
            omitted_messages => trim.omitted_messages,
            event_type => kind.as_str(),
            org => minijinja::context! {
                categories => &org.categories, reply_tone => &org.reply_tone,
                reply_language => &org.reply_language,
            },
        };
        let schema_text = schema_text.as_deref().unwrap_or(&self.schema_text);
        let render = |name: &str| {
            self.templates
                .get_template(name)
                .and_then(|template| template.render(&context))
                .map_err(|err| WorkerError::Render {
                    worker: self.name().to_owned(),
                    reason: err.to_string(),
                })
        };
        const SCHEMA_INTRO: &str = "\n\nAnswer with one JSON object and nothing else: no prose, \
             no code fences. It must validate against this JSON Schema:\n";
        let mut system = render("system")?;
        system.reserve_exact(SCHEMA_INTRO.len() + schema_text.len());
        system.push_str(SCHEMA_INTRO);
        system.push_str(schema_text);
        let user = render("prompt")?;
        let response_format = match mode {
            StructuredMode::JsonSchema => ResponseFormat::JsonSchema {
                name: self.name().to_owned(),
                schema: schema.clone(),
            },
            StructuredMode::JsonObject => ResponseFormat::JsonObject,
            StructuredMode::Prompt => ResponseFormat::Text,
        };
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [model, system.as_str(), user.as_str()] {
            hasher.update(part.as_bytes());
            hasher.update(&[0]);
        }
        let mut input_hash = String::with_capacity(64);
        crate::events::push_hex(&mut input_hash, hasher.finish().as_ref());
        Ok(Prepared {
            messages: vec![
                ChatMessage::new("system", system),
                ChatMessage::new("user", user),
            ],
            response_format,
            schema,
            input_hash,
            trim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize, body: &str) -> TicketMessage {
        TicketMessage {
            id: format!("m{n}"),
            author_role: "customer".into(),
            body: body.into(),
            created_at: None,
        }
    }

    #[test]
    fn short_tickets_are_untouched() {
        let messages = vec![message(1, "hello"), message(2, "again")];
        let (kept, report) = trim_messages(&messages, 3000);
        assert_eq!(kept, messages);
        assert_eq!(report, TrimReport::default());
    }

    #[test]
    fn long_tickets_keep_the_first_and_latest_messages_within_budget() {
        let messages: Vec<_> = (0..500).map(|n| message(n, &"word ".repeat(40))).collect();
        let (kept, report) = trim_messages(&messages, 3000);
        assert_eq!(kept[0].id, "m0");
        assert_eq!(kept.last().unwrap().id, "m499");
        assert_eq!(report.omitted_messages + kept.len(), 500);
        let used: usize = kept.iter().map(|m| estimate_tokens(&m.body) + 12).sum();
        assert!(used <= 3000, "{used}");
        // The kept latest messages are contiguous and in order.
        let ids: Vec<usize> = kept[1..]
            .iter()
            .map(|m| m.id[1..].parse().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn huge_bodies_are_shortened_on_a_char_boundary() {
        let messages = vec![message(1, &"é".repeat(20_000))];
        let (kept, report) = trim_messages(&messages, 3000);
        assert_eq!(report.shortened_messages, 1);
        assert!(kept[0].body.len() < 7000);
    }
}
