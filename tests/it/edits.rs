//! Partial edits of a config (`PATCH /v1/orgs/{org}/provider`, `org update`): what an edit
//! does not name stays as stored, and edits of one org running at once all land.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::MockServer;

use crate::byok::{ADMIN_TOKEN, with_admin_api};
use crate::skeleton::provider_for;
use crate::support::{Harness, Options, summary_output, ticket_event};

const WAIT: Duration = Duration::from_secs(20);
const KEY: &str = "sk-edit-0123456789";

/// A PUT of `body`: the config created (or replaced) whole.
async fn put(base: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .put(base)
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A PATCH of `body` with the merge-patch media type.
async fn patch(base: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .patch(base)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/merge-patch+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// An edit changes only what it names, through the API and the CLI alike; `null` and
/// `--unset` take a setting back to its default; the org's events then run with the edited
/// config and only for the workers the org kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_changes_only_what_it_names() {
    let mut h = Harness::with(Options {
        workers: vec!["summarize", "language"],
        admin_token: Some(ADMIN_TOKEN),
        ..Options::default()
    })
    .await;
    let provider = provider_for(KEY, &summary_output("edited")).await;
    let url = format!("{}/v1", provider.uri());
    let base = format!("http://{}/v1/orgs/org_edit/provider", h.http_addr);
    let created = put(
        &base,
        &json!({"provider": "openai", "base_url": url, "model": "gpt-4o-mini",
            "api_key": KEY, "workers": ["summarize"], "params": {"temperature": 0.3,
            "max_tokens": 400}, "worker_models": {"triage": "gpt-4o"},
            "context": {"categories": ["billing", "bug"]}, "max_concurrency": 4}),
    )
    .await;
    assert_eq!(created.status(), 201);

    let edited = patch(&base, &json!({"model": "gpt-4.1"})).await;
    assert_eq!(edited.status(), 200);
    let view: Value = edited.json().await.unwrap();
    assert_eq!(view["model"], "gpt-4.1");
    assert_eq!(view["workers"], json!(["summarize"]), "{view}");
    assert_eq!(
        view["params"],
        json!({"temperature": 0.3, "max_tokens": 400})
    );
    assert_eq!(view["worker_models"], json!({"triage": "gpt-4o"}));
    assert_eq!(view["context"]["categories"], json!(["billing", "bug"]));
    assert_eq!(view["max_concurrency"], 4);
    assert_eq!(view["api_key"]["last4"], "…6789", "the stored key is kept");

    let output = h
        .cli(&[
            "org",
            "update",
            "org_edit",
            "--allow-loopback-providers",
            "true",
            "--model",
            "gpt-4o",
            "--worker-model",
            "language=gpt-4o-mini",
            "--unset",
            "max-concurrency",
            "--unset",
            "temperature",
        ])
        .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stored = h.store.provider_config("org_edit").await.unwrap().unwrap();
    assert_eq!(stored.model, "gpt-4o");
    assert_eq!(stored.max_concurrency, None);
    assert_eq!(stored.params.temperature, None);
    assert_eq!(stored.params.max_tokens, Some(400));
    assert_eq!(stored.enabled_workers, Some(vec!["summarize".to_owned()]));
    assert_eq!(stored.worker_models.len(), 2, "{:?}", stored.worker_models);
    assert_eq!(stored.context.categories, ["billing", "bug"]);
    assert!(stored.api_key.is_some());

    // The org runs what it kept: one summary with the edited model, no language call.
    h.publish(&ticket_event("evt_edit", "org_edit", "ticket.created"))
        .await;
    let (result, _) = h.next_result(WAIT).await.expect("a result");
    assert_eq!(result.data.worker, "summarize");
    let skipped = r#"copilot_events_skipped_total{worker="language",reason="worker_disabled"}"#;
    h.counter_reaches(WAIT, "the language skip", skipped, 1.0)
        .await;
    let requests = provider.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o");

    let all = patch(&base, &json!({"workers": null})).await;
    assert_eq!(all.status(), 200);
    let view: Value = all.json().await.unwrap();
    assert!(view["workers"].is_null(), "every worker runs: {view}");

    h.finish().await;
}

/// An edit that cannot stand is refused with its field, and changes nothing: an unknown org,
/// a base URL at another origin without the key, a wrong type, a body that is not a patch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_edit_names_its_field_and_changes_nothing() {
    let h = with_admin_api().await;
    let home = provider_for(KEY, &summary_output("home")).await;
    let elsewhere = MockServer::start().await;
    let api = format!("http://{}/v1/orgs", h.http_addr);
    let base = format!("{api}/org_edit/provider");
    let created = put(
        &base,
        &json!({"provider": "openai", "base_url": format!("{}/v1", home.uri()),
            "model": "gpt-4o-mini", "api_key": KEY}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let before = h.store.provider_config("org_edit").await.unwrap().unwrap();

    let missing = patch(
        &format!("{api}/org_nobody/provider"),
        &json!({"model": "m"}),
    )
    .await;
    assert_eq!(missing.status(), 404);
    for (body, status, field) in [
        (
            json!({"base_url": format!("{}/v1", elsewhere.uri())}),
            422,
            "api_key",
        ),
        (
            json!({"params": {"temperature": "hot"}}),
            422,
            "params.temperature",
        ),
        (
            json!({"params": {"temperature": 3.0}}),
            422,
            "params.temperature",
        ),
        (json!({"colour": "red"}), 422, "colour"),
        (json!({"model": null}), 422, "model"),
        (json!({"api_key": 42}), 422, "api_key"),
        (json!(["model", "m"]), 422, "body"),
    ] {
        let response = patch(&base, &body).await;
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
    }
    let plain = reqwest::Client::new()
        .patch(&base)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body(r#"{"model": "m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 415);
    let output = h
        .cli(&["org", "update", "org_nobody", "--model", "m"])
        .await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("has no provider config"), "{said}");
    let output = h
        .cli(&["org", "update", "org_edit", "--unset", "colour"])
        .await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("\"colour\" is not a setting"), "{said}");

    let after = h.store.provider_config("org_edit").await.unwrap().unwrap();
    assert_eq!(after, before);
    assert!(elsewhere.received_requests().await.unwrap().is_empty());
    h.finish().await;
}

/// Edits of one org at the same moment take turns on its row: each adds its own per-worker
/// model, and every one of them is there at the end (read, change, write without the row
/// would let one edit write over another's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_one_org_at_once_all_land() {
    let h = with_admin_api().await;
    let base = format!("http://{}/v1/orgs/org_edit/provider", h.http_addr);
    let created = put(
        &base,
        &json!({"provider": "openai", "base_url": "https://api.openai.com/v1",
            "model": "gpt-4o-mini", "api_key": KEY}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let edits = (0..16).map(|n| {
        let base = base.clone();
        tokio::spawn(async move {
            let body = json!({"worker_models": {format!("worker_{n}"): format!("model-{n}")}});
            patch(&base, &body).await.status()
        })
    });
    for edit in statuses_of(edits).await {
        assert_eq!(edit, 200);
    }
    let stored = h.store.provider_config("org_edit").await.unwrap().unwrap();
    assert_eq!(
        stored.worker_models.len(),
        16,
        "every edit landed: {:?}",
        stored.worker_models
    );
    h.finish().await;
}

/// Waits for every spawned edit.
async fn statuses_of(
    edits: impl Iterator<Item = tokio::task::JoinHandle<reqwest::StatusCode>>,
) -> Vec<reqwest::StatusCode> {
    let mut statuses = Vec::new();
    for edit in edits.collect::<Vec<_>>() {
        statuses.push(edit.await.unwrap());
    }
    statuses
}

/// An edit that changes nothing writes nothing: a failing org is not shown healthy by an
/// empty patch, an `org update` without flags, or a PUT of what is stored. A real change
/// starts it healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_changes_nothing_keeps_the_configs_health() {
    let h = with_admin_api().await;
    let base = format!("http://{}/v1/orgs/org_edit/provider", h.http_addr);
    let config = json!({"provider": "openai", "base_url": "https://api.openai.com/v1",
        "model": "gpt-4o-mini", "api_key": KEY});
    assert_eq!(put(&base, &config).await.status(), 201);
    h.store
        .record_provider_failure("org_edit", "provider_auth", true)
        .await
        .unwrap();

    let empty = patch(&base, &json!({})).await;
    assert_eq!(empty.status(), 200);
    let view: Value = empty.json().await.unwrap();
    assert_eq!(view["health"]["healthy"], false, "{view}");
    let mut same = config.clone();
    same["api_key"] = Value::Null;
    assert_eq!(put(&base, &same).await.status(), 200);
    let output = h.cli(&["org", "update", "org_edit"]).await;
    assert!(output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("nothing changed"), "{said}");
    let stored = h.store.provider_config("org_edit").await.unwrap().unwrap();
    assert!(!stored.health.healthy);
    assert_eq!(stored.health.last_error.as_deref(), Some("provider_auth"));

    let changed = patch(&base, &json!({"model": "gpt-4o"})).await;
    let view: Value = changed.json().await.unwrap();
    assert_eq!(view["health"]["healthy"], true, "{view}");
    h.finish().await;
}
