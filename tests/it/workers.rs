//! The five declarative workers, structured output, org context, trimming, unchanged content,
//! usage accounting, a worker added from files alone, and the set built into the binary.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::skeleton::{assert_valid, provider_for};
use crate::support::{Harness, Options, completion, org_config, summary_output, ticket_event};
use copilot_workers::provider::Profile;

const WAIT: Duration = Duration::from_secs(20);
const KEY: &str = "sk-acme-0123456789";

/// A realistic reply per worker.
pub fn realistic(worker: &str) -> Value {
    match worker {
        "summarize" => {
            json!({"summary": "Ada cannot log in since this morning; every attempt ends in a 500 error.",
            "key_points": ["Login fails with error 500", "Started this morning"], "open_questions": ["Is a fix planned today?"]})
        }
        "triage" => {
            json!({"category": "technical", "priority": "high", "tags": ["login", "error-500"], "confidence": 0.86})
        }
        "sentiment" => json!({"sentiment": "negative", "score": -0.45, "confidence": 0.8}),
        "language" => json!({"language": "en", "confidence": 0.98}),
        "reply_draft" => {
            json!({"reply": "Hi Ada,\n\nsorry about the login trouble. Our team is investigating the 500 errors and we will update you within the hour.\n\nBest,\nSupport", "language": "en", "tone": "empathetic"})
        }
        other => panic!("no realistic reply for {other}"),
    }
}

/// A provider answering each worker (told apart by its response_format name) realistically.
async fn provider_for_all() -> MockServer {
    let server = MockServer::start().await;
    for worker in [
        "summarize",
        "triage",
        "sentiment",
        "language",
        "reply_draft",
    ] {
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(body_string_contains(
                format!("\"name\":\"{worker}\"").as_str(),
            ))
            .respond_with(ResponseTemplate::new(200).set_body_json(completion(&realistic(worker))))
            .mount(&server)
            .await;
    }
    server
}

async fn reply_with(content: &str) -> ResponseTemplate {
    let body = json!({"id": "x", "object": "chat.completion", "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5}});
    ResponseTemplate::new(200).set_body_json(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_publishes_a_result_valid_against_its_schema() {
    let workers = [
        "summarize",
        "triage",
        "sentiment",
        "language",
        "reply_draft",
    ];
    let mut h = Harness::workers(&workers).await;
    let provider = provider_for_all().await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_all", "org_acme", "ticket.created"))
        .await;
    let mut seen = Vec::new();
    for _ in 0..workers.len() {
        let (result, delivery) = h.next_result(WAIT).await.expect("a result per worker");
        let value: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert!(result.is_completed(), "{result:?}");
        assert_valid("result-event.schema.json", &value);
        let schema = format!("workers/{}.output.schema.json", result.data.worker);
        assert_valid(&schema, &value["data"]["output"]);
        assert_eq!(result.data.output, Some(realistic(&result.data.worker)));
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("ticket.enriched.{}", result.data.worker)
        );
        seen.push(result.data.worker);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "language",
            "reply_draft",
            "sentiment",
            "summarize",
            "triage"
        ]
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_json_is_accepted() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    let output = summary_output("fenced");
    Mock::given(method("POST"))
        .respond_with(reply_with(&format!("```json\n{output}\n```")).await)
        .mount(&server)
        .await;
    h.set_org("org_acme", &format!("{}/v1", server.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_fence", "org_acme", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.output, Some(output));
    assert_eq!(results[0].data.reasks, 0);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_then_valid_output_completes_after_one_reask() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    let output = summary_output("second time lucky");
    Mock::given(method("POST"))
        .respond_with(reply_with(r#"{"summary": "missing the lists"}"#).await)
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(reply_with(&output.to_string()).await)
        .with_priority(2)
        .mount(&server)
        .await;
    h.set_org("org_acme", &format!("{}/v1", server.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_reask", "org_acme", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert!(results[0].is_completed());
    assert_eq!(results[0].data.output, Some(output));
    assert_eq!(results[0].data.reasks, 1);
    assert_eq!(
        results[0].data.usage.prompt_tokens, 20,
        "both calls are counted"
    );
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let second = String::from_utf8_lossy(&requests[1].body).into_owned();
    assert!(
        second.contains("That answer was rejected"),
        "the re-ask shows the validation error"
    );
    assert!(
        second.contains("key_points"),
        "the re-ask names the problem"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_output_twice_fails_with_invalid_output() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply_with("I think the customer is upset.").await)
        .mount(&server)
        .await;
    h.set_org("org_acme", &format!("{}/v1", server.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_bad_out", "org_acme", "ticket.created"))
        .await;
    let (result, delivery) = h.next_result(WAIT).await.expect("a failed result");
    assert!(!result.is_completed());
    assert_eq!(result.data.error.as_ref().unwrap().class, "invalid_output");
    assert_eq!(
        delivery.routing_key.as_str(),
        "ticket.enrichment_failed.summarize"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triage_accepts_only_the_orgs_own_categories() {
    let mut h = Harness::workers(&["triage"]).await;
    let server = MockServer::start().await;
    let outside =
        json!({"category": "shipping", "priority": "normal", "tags": [], "confidence": 0.9});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&outside)))
        .mount(&server)
        .await;
    let mut config = org_config(
        &h.keys,
        "org_acme",
        Profile::Openai,
        &format!("{}/v1", server.uri()),
        Some(KEY),
    );
    config.context.categories = vec!["billing".into(), "technical".into()];
    h.set_config(config).await;
    h.publish(&ticket_event("evt_cat", "org_acme", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(
        results[0].data.error.as_ref().map(|e| e.class.as_str()),
        Some("invalid_output")
    );
    let requests = server.received_requests().await.unwrap();
    let body: Value = requests[0].body_json().unwrap();
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["category"]["enum"],
        json!(["billing", "technical"]),
        "the org's list is sent to the model"
    );
    assert!(
        body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("billing, technical")
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_message_ticket_stays_under_the_budget_and_completes() {
    let mut h = Harness::start().await;
    let output = summary_output("long one");
    let provider = provider_for(KEY, &output).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let mut event = ticket_event("evt_long", "org_acme", "ticket.created");
    let messages: Vec<Value> = (0..500)
        .map(|n| json!({"id": format!("m{n}"), "author_role": if n % 2 == 0 { "customer" } else { "agent" },
            "body": format!("Message number {n}: {}", "the export still fails with a timeout. ".repeat(6))}))
        .collect();
    event["data"]["ticket"]["messages"] = json!(messages);
    h.publish(&event).await;
    let results = h.results(1, WAIT).await;
    assert!(results[0].is_completed());
    let requests = provider.received_requests().await.unwrap();
    let body: Value = requests[0].body_json().unwrap();
    let user = body["messages"][1]["content"].as_str().unwrap();
    // summarize's budget is 3000 estimated tokens (4 bytes each) for the messages.
    assert!(
        user.len() < 3300 * 4,
        "prompt of {} bytes is over budget",
        user.len()
    );
    assert!(
        user.contains("Message number 0:"),
        "the first message is kept"
    );
    assert!(
        user.contains("Message number 499:"),
        "the latest message is kept"
    );
    assert!(
        user.contains("earlier messages omitted"),
        "the prompt says what was cut"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_content_is_skipped_without_a_call() {
    let mut h = Harness::workers(&["triage"]).await;
    let provider = provider_for(KEY, &realistic("triage")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let created = ticket_event("evt_same", "org_acme", "ticket.created");
    h.publish(&created).await;
    h.results(1, WAIT).await;
    let mut updated = created.clone();
    updated["id"] = json!("evt_same_update");
    updated["type"] = json!("ticket.updated");
    h.publish(&updated).await;
    let skipped = "copilot_events_skipped_total{worker=\"triage\",reason=\"unchanged\"}";
    h.counter_reaches(WAIT, "the unchanged skip", skipped, 1.0)
        .await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
    assert!(h.next_result(Duration::from_millis(500)).await.is_none());
    // A real change runs again.
    let mut changed = updated.clone();
    changed["id"] = json!("evt_changed");
    changed["data"]["ticket"]["priority"] = json!("urgent");
    h.publish(&changed).await;
    h.results(1, WAIT).await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 2);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_context_chooses_workers_models_tone_and_language() {
    let mut h = Harness::workers(&["reply_draft", "triage"]).await;
    let provider = provider_for_all().await;
    let mut config = org_config(
        &h.keys,
        "org_acme",
        Profile::Openai,
        &format!("{}/v1", provider.uri()),
        Some(KEY),
    );
    config.enabled_workers = Some(vec!["reply_draft".into()]);
    config
        .worker_models
        .insert("reply_draft".into(), "writer-large".into());
    config.context.reply_tone = Some("formal and brief".into());
    config.context.reply_language = Some("de".into());
    h.set_config(config).await;
    h.publish(&ticket_event("evt_ctx", "org_acme", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.worker, "reply_draft");
    let skipped = "copilot_events_skipped_total{worker=\"triage\",reason=\"worker_disabled\"}";
    h.counter_reaches(WAIT, "triage to be skipped", skipped, 1.0)
        .await;
    let requests = provider.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let body: Value = requests[0].body_json().unwrap();
    assert_eq!(body["model"], "writer-large");
    let system = body["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains("Tone: formal and brief"), "{system}");
    assert!(system.contains("Reply language: de"), "{system}");
    h.finish().await;
}

/// org_acme's two new tickets (events `ids`) through `summarize` and `language`, all four
/// results arrived; the provider must outlive the harness's use.
async fn two_tickets_summarized_and_detected(ids: [&str; 2]) -> (Harness, MockServer) {
    let mut h = Harness::workers(&["summarize", "language"]).await;
    let provider = provider_for_all().await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    for id in ids {
        h.publish(&ticket_event(id, "org_acme", "ticket.created"))
            .await;
    }
    h.results(4, WAIT).await;
    (h, provider)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_accounted_per_org_day_worker_and_model() {
    let (h, _provider) = two_tickets_summarized_and_detected(["evt_u1", "evt_u2"]).await;
    let rows = h.store.usage("org_acme", "2000-01-01").await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in rows {
        assert_eq!(row.requests, 2);
        assert_eq!(row.prompt_tokens, 240);
        assert_eq!(row.completion_tokens, 80);
        assert_eq!(row.model, "test-model");
    }
    assert!(
        h.store
            .usage("org_other", "2000-01-01")
            .await
            .unwrap()
            .is_empty()
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_past_retention_are_pruned_and_their_usage_kept() {
    let (h, _provider) = two_tickets_summarized_and_detected(["evt_r1", "evt_r2"]).await;
    // evt_r1's results were decided 100 days ago.
    let (sql, connection) =
        tokio_postgres::connect(&h.settings.database_url, tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let backdated = sql
        .execute(
            "UPDATE processed_events SET created_at = now() - interval '100 days' \
             WHERE event_id = 'evt_r1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(backdated, 2);
    let before = h.store.usage("org_acme", "2000-01-01").await.unwrap();
    assert_eq!(before.len(), 4, "{before:?}");

    // A claim whose holder is gone, as a stopped worker leaves it.
    sql.execute(
        "INSERT INTO event_claims (event_id, worker, holder, expires_at) \
         VALUES ('evt_gone', 'summarize', 'gone-1', now() - interval '1 minute')",
        &[],
    )
    .await
    .unwrap();

    // The first round is the operator's `ledger prune`, at the default 90 days.
    let pruned = std::process::Command::new(env!("CARGO_BIN_EXE_copilot-workers"))
        .args(["ledger", "prune"])
        .env("COPILOT_DATABASE_URL", &h.settings.database_url)
        .env_remove("COPILOT_LEDGER_RETENTION_DAYS")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&pruned.stdout);
    assert!(
        pruned.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&pruned.stderr)
    );
    assert!(
        said.contains("pruned 2 result(s) older than 90 days") && said.contains("lapsed claim"),
        "{said}"
    );
    let claims = sql
        .query_one(
            "SELECT count(*) FROM event_claims WHERE event_id = 'evt_gone'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(claims, 0, "the lapsed claim is gone");
    assert!(
        h.store
            .ledger_entry("evt_r1", "summarize")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        h.store
            .ledger_entry("evt_r2", "summarize")
            .await
            .unwrap()
            .is_some()
    );
    // Usage is the same, day by day, and a second round neither deletes nor counts again.
    assert_eq!(
        h.store.usage("org_acme", "2000-01-01").await.unwrap(),
        before
    );
    assert_eq!(h.store.prune_ledger(90).await.unwrap(), 0);
    assert_eq!(
        h.store.usage("org_acme", "2000-01-01").await.unwrap(),
        before
    );
    // Retention counts in days: nothing younger than the period goes.
    assert_eq!(h.store.prune_ledger(1).await.unwrap(), 0);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_added_from_files_alone_consumes_and_publishes() {
    let root = std::env::temp_dir().join(crate::support::unique("cw-workers"));
    let workers_dir = root.join("workers");
    let schemas_dir = root.join("schemas");
    std::fs::create_dir_all(&workers_dir).unwrap();
    std::fs::create_dir_all(schemas_dir.join("custom")).unwrap();
    std::fs::write(
        workers_dir.join("keywords.toml"),
        r#"
name = "keywords"
description = "Search keywords for the knowledge base."
events = ["ticket.created"]
output_schema = "custom/keywords.schema.json"
max_tokens = 100
system = "You pick search keywords for helpdesk tickets."
prompt = "Give up to five keywords for this ticket.\n\n{{ ticket_text }}"
"#,
    )
    .unwrap();
    std::fs::write(schemas_dir.join("custom/keywords.schema.json"), json!({
        "type": "object", "required": ["keywords"], "additionalProperties": false,
        "properties": {"keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}
    }).to_string()).unwrap();
    let mut h = Harness::with(Options {
        workers: vec!["keywords"],
        workers_dir,
        schemas_dir,
        ..Options::default()
    })
    .await;
    let output = json!({"keywords": ["login", "error 500"]});
    let provider = provider_for(KEY, &output).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_kw", "org_acme", "ticket.created"))
        .await;
    let (result, delivery) = h.next_result(WAIT).await.expect("the new worker's result");
    assert_eq!(result.data.worker, "keywords");
    assert_eq!(result.data.output, Some(output));
    assert_eq!(delivery.routing_key.as_str(), "ticket.enriched.keywords");
    h.finish().await;
    let _ = std::fs::remove_dir_all(root);
}

/// Run from a directory without `workers/` and `schemas/`, the binary uses the five workers
/// built into it; a directory named explicitly must exist. (`run --workers` with an unknown
/// name lists the loaded workers and exits before connecting to anything.)
#[test]
fn the_binary_run_elsewhere_uses_its_built_in_workers() {
    let elsewhere = std::env::temp_dir().join(crate::support::unique("cw_elsewhere"));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_copilot-workers"))
            .args(args)
            .current_dir(&elsewhere)
            .env(
                "COPILOT_MASTER_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            )
            .env_remove("COPILOT_WORKERS_DIR")
            .env_remove("COPILOT_SCHEMAS_DIR")
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let built_in = run(&["run", "--workers", "no_such_worker"]);
    assert!(
        built_in.contains("known: language, reply_draft, sentiment, summarize, triage"),
        "{built_in}"
    );
    assert!(built_in.contains("built into this binary"), "{built_in}");
    let named = run(&["run", "--workers-dir", "missing", "--workers", "summarize"]);
    assert!(named.contains("cannot read missing"), "{named}");
    std::fs::remove_dir_all(&elsewhere).unwrap();
}
