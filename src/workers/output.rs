//! Checking a model's answer: strip code fences, parse JSON, validate against the schema.

use serde_json::Value;

use super::{Prepared, Worker};

/// Why an answer was not accepted; the message is shown to the model in the re-ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutputError(pub String);

/// Removes a Markdown code fence (```json … ```) around an answer, and any prose around the
/// outermost JSON object.
pub fn strip_fences(text: &str) -> &str {
    let mut text = text.trim();
    if let Some(rest) = text.strip_prefix("```") {
        let rest = rest.split_once('\n').map_or("", |(_, body)| body);
        text = rest.trim_end().strip_suffix("```").unwrap_or(rest).trim();
    }
    if !text.starts_with('{')
        && let (Some(start), Some(end)) = (text.find('{'), text.rfind('}'))
        && start < end
    {
        return &text[start..=end];
    }
    text
}

impl Worker {
    /// Parses and validates an answer against the prepared (org-narrowed) schema.
    pub fn check(&self, prepared: &Prepared, answer: &str) -> Result<Value, OutputError> {
        let value: Value = serde_json::from_str(strip_fences(answer))
            .map_err(|err| OutputError(format!("the answer is not a JSON object ({err})")))?;
        let narrowed;
        let validator = if std::sync::Arc::ptr_eq(&prepared.schema, self.schema()) {
            &self.validator
        } else {
            narrowed = jsonschema::validator_for(&prepared.schema)
                .map_err(|err| OutputError(format!("schema does not compile: {err}")))?;
            &narrowed
        };
        let problems: Vec<String> = validator
            .iter_errors(&value)
            .take(5)
            .map(|err| {
                let path = err.instance_path().to_string();
                let at = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                format!("{at}: {err}")
            })
            .collect();
        if problems.is_empty() {
            Ok(value)
        } else {
            Err(OutputError(format!(
                "the JSON does not match the schema: {}",
                problems.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_and_prose_are_stripped() {
        assert_eq!(strip_fences("```json\n{\"a\":1}\n```"), "{\"a\":1}");
        assert_eq!(strip_fences("```\n{\"a\":1}```"), "{\"a\":1}");
        assert_eq!(strip_fences("Sure! {\"a\":1} Hope it helps"), "{\"a\":1}");
        assert_eq!(strip_fences("  {\"a\":1}  "), "{\"a\":1}");
    }
}
