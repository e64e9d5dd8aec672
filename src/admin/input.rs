//! The provider config as an operator writes it (CLI flags or the admin API's JSON), and its
//! validation into a stored [`ProviderConfig`]. Every problem names its field.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::EndpointPolicy;
use crate::crypto::KeyRing;
use crate::provider::{Profile, guard};
use crate::store::configs::{Health, ModelParams, OrgContext, ProviderConfig};

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    pub fn new(field: &str, message: impl Into<String>) -> FieldProblem {
        FieldProblem {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A config as submitted. The API key is optional on update: without one, the stored key
/// is kept, as long as the base URL keeps its origin (scheme, host and port): a stored key is
/// sent only where it was given for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigInput {
    pub provider: Profile,
    pub base_url: String,
    pub model: String,
    #[serde(default)]
    pub api_key: Option<SecretString>,
    #[serde(default)]
    pub params: ModelParams,
    /// Workers that run for this org; absent means all.
    #[serde(default)]
    pub workers: Option<Vec<String>>,
    #[serde(default)]
    pub worker_models: BTreeMap<String, String>,
    #[serde(default)]
    pub context: OrgContext,
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Absent: an existing config keeps its state (a disabled org is not enabled again by an
    /// edit of its model), a new one is enabled.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A URL's origin, `scheme://host:port` (the port only when not the scheme's default; no
/// user info, path or query), or none when it cannot be read.
fn origin(url: &str) -> Option<String> {
    let origin = url::Url::parse(url).ok()?.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

/// Whether an org id is acceptable: 1–200 characters of `[A-Za-z0-9_.:-]`.
pub fn valid_org_id(org: &str) -> bool {
    !org.is_empty()
        && org.len() <= 200
        && org
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

impl ConfigInput {
    /// Validates and seals into the config to store. `existing` supplies the key when none is
    /// given.
    pub fn into_config(
        self,
        org: &str,
        existing: Option<&ProviderConfig>,
        keys: &KeyRing,
        policy: EndpointPolicy,
    ) -> Result<ProviderConfig, Vec<FieldProblem>> {
        let mut problems = Vec::new();
        if !valid_org_id(org) {
            problems.push(FieldProblem::new(
                "org",
                "must be 1-200 characters of letters, digits, _ - . :",
            ));
        }
        if let Err(err) = guard::check_url(&self.base_url, policy) {
            problems.push(FieldProblem::new("base_url", err.to_string()));
        }
        if self.model.trim().is_empty() || self.model.len() > 200 {
            problems.push(FieldProblem::new("model", "must be 1-200 characters"));
        }
        if self
            .params
            .temperature
            .is_some_and(|t| !(0.0..=2.0).contains(&t))
        {
            problems.push(FieldProblem::new(
                "params.temperature",
                "must be between 0 and 2",
            ));
        }
        if self.params.max_tokens == Some(0) {
            problems.push(FieldProblem::new("params.max_tokens", "must be at least 1"));
        }
        if self.params.timeout_secs.is_some_and(|t| t == 0 || t > 600) {
            problems.push(FieldProblem::new(
                "params.timeout_secs",
                "must be between 1 and 600",
            ));
        }
        if self.provider == Profile::Azure && self.params.api_version.is_none() {
            problems.push(FieldProblem::new(
                "params.api_version",
                "is required for the azure profile",
            ));
        }
        if let Some(language) = &self.context.reply_language
            && !(language.len() == 2 && language.chars().all(|c| c.is_ascii_lowercase()))
        {
            problems.push(FieldProblem::new(
                "context.reply_language",
                "must be an ISO 639-1 code such as \"en\"",
            ));
        }
        if self.context.categories.len() > 100
            || self
                .context
                .categories
                .iter()
                .any(|c| c.trim().is_empty() || c.len() > 100)
        {
            problems.push(FieldProblem::new(
                "context.categories",
                "at most 100 categories of 1-100 characters",
            ));
        }
        if self
            .max_concurrency
            .is_some_and(|cap| cap == 0 || cap > 10_000)
        {
            problems.push(FieldProblem::new(
                "max_concurrency",
                "must be between 1 and 10000",
            ));
        }
        for (worker, model) in &self.worker_models {
            if worker.is_empty() || model.trim().is_empty() {
                problems.push(FieldProblem::new(
                    "worker_models",
                    "entries must be worker = model",
                ));
            }
        }
        // The stored key's origin and the new one, when the stored key is not carried over.
        let mut moved = None;
        let api_key = match self
            .api_key
            .as_ref()
            .filter(|key| !key.expose_secret().trim().is_empty())
        {
            Some(key) => match keys.seal(org, &SecretString::from(key.expose_secret().trim())) {
                Ok(sealed) => Some(sealed),
                Err(err) => {
                    problems.push(FieldProblem::new("api_key", err.to_string()));
                    None
                }
            },
            None => match existing {
                Some(stored) if stored.api_key.is_some() => {
                    let (from, to) = (origin(&stored.base_url), origin(&self.base_url));
                    if from.is_some() && from == to {
                        stored.api_key.clone()
                    } else {
                        moved = Some((from, to));
                        None
                    }
                }
                _ => None,
            },
        };
        if api_key.is_none() && self.provider.requires_key() {
            let message = match moved {
                Some((from, to)) => format!(
                    "the base URL moves the config from {} to {}: give the API key again (a \
                     stored key is sent only to the origin it was given for)",
                    from.as_deref().unwrap_or("an unreadable URL"),
                    to.as_deref().unwrap_or("an unreadable URL"),
                ),
                None => format!("the {} profile needs an API key", self.provider.as_str()),
            };
            problems.push(FieldProblem::new("api_key", message));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ProviderConfig {
            org_id: org.to_owned(),
            profile: self.provider,
            base_url: self.base_url,
            model: self.model,
            api_key,
            params: self.params,
            enabled_workers: self.workers,
            worker_models: self.worker_models,
            context: self.context,
            max_concurrency: self.max_concurrency,
            enabled: self
                .enabled
                .unwrap_or_else(|| existing.is_none_or(|stored| stored.enabled)),
            health: Health {
                healthy: true,
                ..Health::default()
            },
        })
    }
}

/// Reads a config input from JSON (a body, or a patched config), naming the field of the
/// first problem.
pub fn read<'de, D>(json: D) -> Result<ConfigInput, FieldProblem>
where
    D: serde::Deserializer<'de, Error = serde_json::Error>,
{
    serde_path_to_error::deserialize(json).map_err(|err| {
        let path = err.path().to_string();
        let field = if err.inner().is_syntax() || err.inner().is_eof() {
            "body".to_owned()
        } else if path == "." {
            field_from_message(&err.inner().to_string())
        } else {
            path
        };
        FieldProblem::new(&field, redact_serde_message(&err.inner().to_string()))
    })
}

/// serde names a missing or unknown field only in its message (`missing field `model``).
fn field_from_message(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or("body")
        .to_owned()
}

/// serde's messages quote the offending value, which could be a key sent in the wrong field;
/// keep only the part before the quoted value.
pub(super) fn redact_serde_message(message: &str) -> String {
    match message.find(": \"").or_else(|| message.find(" \"")) {
        Some(cut) if message.starts_with("invalid") => format!(
            "{} (value withheld){}",
            &message[..cut],
            tail_position(message)
        ),
        _ => message.to_owned(),
    }
}

fn tail_position(message: &str) -> String {
    message
        .rfind(" at line ")
        .map(|at| message[at..].to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EndpointPolicy = EndpointPolicy {
        allow_loopback: false,
        allow_private: false,
    };

    fn input(provider: Profile, base_url: &str, key: Option<&str>) -> ConfigInput {
        ConfigInput {
            provider,
            base_url: base_url.to_owned(),
            model: "m".to_owned(),
            api_key: key.map(|key| SecretString::from(key.to_owned())),
            params: ModelParams::default(),
            workers: None,
            worker_models: BTreeMap::new(),
            context: OrgContext::default(),
            max_concurrency: None,
            enabled: None,
        }
    }

    #[test]
    fn a_stored_key_is_kept_only_while_the_base_url_keeps_its_origin() {
        let keys = KeyRing::generate().unwrap();
        let update = |provider, url, key, stored: &ProviderConfig| {
            input(provider, url, key).into_config("org_a", Some(stored), &keys, POLICY)
        };
        let stored = input(
            Profile::Openai,
            "https://api.example.com/v1",
            Some("sk-first"),
        )
        .into_config("org_a", None, &keys, POLICY)
        .unwrap();
        assert!(stored.api_key.is_some());

        // Another path, the host in capitals, the default port written out: the same origin.
        for same in [
            "https://api.example.com/v2",
            "https://API.example.com:443/v1",
        ] {
            let config = update(Profile::Generic, same, None, &stored).unwrap_or_else(|p| {
                panic!("{same}: {p:?}");
            });
            assert_eq!(config.api_key, stored.api_key, "{same}");
        }
        // Another host, scheme or port: the key is not carried there.
        for (moved, origin) in [
            ("https://collector.example/v1", "https://collector.example"),
            ("http://api.example.com/v1", "http://api.example.com"),
            (
                "https://api.example.com:8443/v1",
                "https://api.example.com:8443",
            ),
            (
                "https://api.example.com.collector.example/v1",
                "https://api.example.com.collector.example",
            ),
        ] {
            let problems = update(Profile::Openai, moved, None, &stored).unwrap_err();
            assert_eq!(problems.len(), 1, "{moved}: {problems:?}");
            assert_eq!(problems[0].field, "api_key");
            let expected =
                format!("from https://api.example.com to {origin}: give the API key again");
            assert!(problems[0].message.contains(&expected), "{}", problems[0]);
        }
        // Given again, the key goes with the move.
        let moved = update(
            Profile::Openai,
            "https://collector.example/v1",
            Some("sk-second"),
            &stored,
        )
        .unwrap();
        assert!(moved.api_key.is_some());
        assert_ne!(moved.api_key, stored.api_key);
        // A profile that needs no key moves without one: the stored key stays behind.
        let keyless = update(Profile::Ollama, "https://ollama.example/v1", None, &stored).unwrap();
        assert!(keyless.api_key.is_none());
        // A stored config without a key has nothing to carry.
        let unchanged = update(
            Profile::Openai,
            "https://collector.example/v1",
            None,
            &keyless,
        )
        .unwrap_err();
        assert!(
            unchanged[0].message.contains("needs an API key"),
            "{unchanged:?}"
        );
    }

    #[test]
    fn an_edit_keeps_a_disabled_config_disabled_unless_it_says_otherwise() {
        let keys = KeyRing::generate().unwrap();
        let url = "https://api.example.com/v1";
        let new = input(Profile::Openai, url, Some("sk-key"))
            .into_config("org_a", None, &keys, POLICY)
            .unwrap();
        assert!(new.enabled, "a new config is enabled");
        let mut disabled = new.clone();
        disabled.enabled = false;
        let edited = input(Profile::Openai, url, None)
            .into_config("org_a", Some(&disabled), &keys, POLICY)
            .unwrap();
        assert!(
            !edited.enabled,
            "an edit of the model does not enable it again"
        );
        let mut enabling = input(Profile::Openai, url, None);
        enabling.enabled = Some(true);
        assert!(
            enabling
                .into_config("org_a", Some(&disabled), &keys, POLICY)
                .unwrap()
                .enabled
        );
        let mut disabling = input(Profile::Openai, url, None);
        disabling.enabled = Some(false);
        assert!(
            !disabling
                .into_config("org_a", Some(&new), &keys, POLICY)
                .unwrap()
                .enabled
        );
    }
}
