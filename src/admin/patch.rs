//! Partial edits of a stored config: a JSON merge patch (RFC 7396) laid over it, for
//! `PATCH /v1/orgs/{org}/provider` and `org update`. What the patch leaves out stays as
//! stored; `null` takes a setting back to its default. The edited config then goes through
//! the same validation as a replacement ([`ConfigInput::into_config`]).

use secrecy::SecretString;
use serde_json::{Map, Value, json};

use super::input::{ConfigInput, FieldProblem};
use crate::store::configs::ProviderConfig;

/// A stored config written as a [`ConfigInput`] would be, without its key: what a patch is
/// laid over.
pub fn input_json(config: &ProviderConfig) -> Value {
    let mut value = json!({
        "provider": config.profile,
        "base_url": config.base_url,
        "model": config.model,
        "params": config.params,
        "worker_models": config.worker_models,
        "context": config.context,
        "enabled": config.enabled,
    });
    if let Some(workers) = &config.enabled_workers {
        value["workers"] = json!(workers);
    }
    if let Some(cap) = config.max_concurrency {
        value["max_concurrency"] = json!(cap);
    }
    value
}

/// Lays `patch` over `target` as RFC 7396 says: an object is merged member by member, a
/// `null` member removes the target's, anything else (arrays included) replaces it.
pub fn merge(target: &mut Value, patch: Value) {
    let Value::Object(members) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (name, value) in members {
            if value.is_null() {
                target.remove(&name);
            } else {
                merge(target.entry(name).or_insert(Value::Null), value);
            }
        }
    }
}

/// The input an edit makes: `patch` laid over `stored`, read as an input (every problem
/// naming its field). Without a new key, the stored key is kept on
/// [`ConfigInput::into_config`]'s terms (the same origin).
pub fn patched(stored: &ProviderConfig, patch: Value) -> Result<ConfigInput, FieldProblem> {
    let (merged, api_key) = merged(stored, patch)?;
    let mut input = super::input::read(merged)?;
    input.api_key = api_key;
    Ok(input)
}

/// `patch` laid over `stored`, and the new key it carried (`api_key`, a string): taken out
/// before the merge, so that it is held only as a secret from then on.
fn merged(
    stored: &ProviderConfig,
    patch: Value,
) -> Result<(Value, Option<SecretString>), FieldProblem> {
    let Value::Object(mut members) = patch else {
        return Err(FieldProblem::new(
            "body",
            "a merge patch is a JSON object of the settings to change",
        ));
    };
    let api_key = match members.remove("api_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(SecretString::from(key)),
        Some(_) => {
            return Err(FieldProblem::new(
                "api_key",
                "must be a string (or null: keep the stored key)",
            ));
        }
    };
    let mut merged = input_json(stored);
    merge(&mut merged, Value::Object(members));
    Ok((merged, api_key))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use secrecy::ExposeSecret;

    use super::*;
    use crate::provider::Profile;
    use crate::store::configs::{Health, ModelParams, OrgContext};

    fn stored() -> ProviderConfig {
        ProviderConfig {
            org_id: "org_a".to_owned(),
            profile: Profile::Openai,
            base_url: "https://api.example.com/v1".to_owned(),
            model: "gpt-4o-mini".to_owned(),
            api_key: None,
            params: ModelParams {
                temperature: Some(0.2),
                max_tokens: Some(300),
                ..ModelParams::default()
            },
            enabled_workers: Some(vec!["summarize".to_owned(), "triage".to_owned()]),
            worker_models: BTreeMap::from([
                ("triage".to_owned(), "gpt-4o".to_owned()),
                ("summarize".to_owned(), "gpt-4.1".to_owned()),
            ]),
            context: OrgContext {
                categories: vec!["billing".to_owned(), "bug".to_owned()],
                reply_tone: Some("warm".to_owned()),
                reply_language: None,
            },
            max_concurrency: Some(8),
            enabled: false,
            health: Health::default(),
        }
    }

    #[test]
    fn merging_follows_rfc_7396() {
        // The RFC's own example (section 3), and its appendix's edge cases.
        let mut target = json!({"title": "Goodbye!", "author": {"givenName": "John",
            "familyName": "Doe"}, "tags": ["example", "sample"], "content": "This will be unchanged"});
        merge(
            &mut target,
            json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null}, "tags": ["example"]}),
        );
        assert_eq!(
            target,
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
            "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
        for (mut target, patch, merged) in [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
        ] {
            merge(&mut target, patch);
            assert_eq!(target, merged);
        }
    }

    #[test]
    fn a_patch_changes_what_it_names_and_keeps_the_rest() {
        let stored = stored();
        let input = patched(&stored, json!({"model": "gpt-4o"})).unwrap();
        assert_eq!(input.model, "gpt-4o");
        assert_eq!(input.provider, Profile::Openai);
        assert_eq!(input.base_url, stored.base_url);
        assert_eq!(input.params, stored.params);
        assert_eq!(input.workers, stored.enabled_workers);
        assert_eq!(input.worker_models, stored.worker_models);
        assert_eq!(input.context, stored.context);
        assert_eq!(input.max_concurrency, Some(8));
        assert_eq!(input.enabled, Some(false));
        assert!(
            input.api_key.is_none(),
            "no new key: the stored one is kept"
        );
    }

    #[test]
    fn null_takes_a_setting_back_to_its_default() {
        let input = patched(
            &stored(),
            json!({"workers": null, "max_concurrency": null, "params": {"temperature": null},
                "worker_models": {"triage": null, "language": "gpt-4o-mini"},
                "context": {"categories": null}}),
        )
        .unwrap();
        assert_eq!(input.workers, None, "every worker");
        assert_eq!(input.max_concurrency, None);
        assert_eq!(input.params.temperature, None);
        assert_eq!(input.params.max_tokens, Some(300));
        assert_eq!(
            input.worker_models,
            BTreeMap::from([
                ("language".to_owned(), "gpt-4o-mini".to_owned()),
                ("summarize".to_owned(), "gpt-4.1".to_owned()),
            ])
        );
        assert!(input.context.categories.is_empty());
        assert_eq!(input.context.reply_tone.as_deref(), Some("warm"));
    }

    #[test]
    fn a_key_in_the_patch_is_taken_out_before_the_merge() {
        let patch = json!({"api_key": "sk-new-key-1234", "model": "gpt-4o"});
        let (merged, _) = merged(&stored(), patch.clone()).unwrap();
        let input = patched(&stored(), patch).unwrap();
        assert!(merged.get("api_key").is_none(), "{merged}");
        assert!(!merged.to_string().contains("sk-new-key"), "{merged}");
        assert_eq!(
            input.api_key.as_ref().map(ExposeSecret::expose_secret),
            Some("sk-new-key-1234")
        );
        let wrong = patched(&stored(), json!({"api_key": 12})).unwrap_err();
        assert_eq!(wrong.field, "api_key");
        let not_object = patched(&stored(), json!(["model"])).unwrap_err();
        assert_eq!(not_object.field, "body");
    }
}
