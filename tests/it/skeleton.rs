//! The walking skeleton's promises, end to end.

use std::time::Duration;

use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{self, Harness, completion, summary_output, ticket_event};

const WAIT: Duration = Duration::from_secs(20);

pub async fn provider_for(key: &str, output: &serde_json::Value) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {key}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(output)))
        .mount(&server)
        .await;
    server
}

/// A provider for `org_acme` answering `output`, with the org configured to use it.
async fn acme(h: &Harness, output: &serde_json::Value) -> MockServer {
    let provider = provider_for("sk-acme-0123456789", output).await;
    h.set_org(
        "org_acme",
        &format!("{}/v1", provider.uri()),
        "sk-acme-0123456789",
    )
    .await;
    provider
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_org_gets_exactly_one_completed_result_from_its_own_provider() {
    let mut h = Harness::start().await;
    let output = summary_output("Ada cannot log in: every attempt ends in error 500.");
    let provider = acme(&h, &output).await;

    h.publish(&ticket_event("evt_1", "org_acme", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    let result = &results[0];
    assert_eq!(result.kind, "ticket.enrichment.completed");
    assert_eq!(result.data.org_id, "org_acme");
    assert_eq!(result.data.ticket_id, "T-evt_1");
    assert_eq!(result.data.worker, "summarize");
    assert_eq!(result.data.source_event_id, "evt_1");
    assert_eq!(result.data.output.as_ref(), Some(&output));
    assert_eq!(result.data.usage.prompt_tokens, 120);
    assert_eq!(result.data.attempts, 1);
    assert_eq!(
        result.id,
        copilot_workers::events::result_id("evt_1", "summarize")
    );

    // The provider saw exactly one request, carrying this org's key, for the configured model.
    let requests = provider.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].headers.get("authorization").unwrap(),
        "Bearer sk-acme-0123456789"
    );
    let body: serde_json::Value = requests[0].body_json().unwrap();
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["response_format"]["type"], "json_schema");

    // And nothing else is published.
    assert!(h.next_result(Duration::from_millis(700)).await.is_none());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_org_is_served_by_its_own_provider_with_its_own_key() {
    let mut h = Harness::start().await;
    let out_a = summary_output("from provider A");
    let out_b = summary_output("from provider B");
    let provider_a = provider_for("sk-a-aaaaaaaaaaaa", &out_a).await;
    let provider_b = provider_for("sk-b-bbbbbbbbbbbb", &out_b).await;
    h.set_org(
        "org_a",
        &format!("{}/v1", provider_a.uri()),
        "sk-a-aaaaaaaaaaaa",
    )
    .await;
    h.set_org(
        "org_b",
        &format!("{}/v1", provider_b.uri()),
        "sk-b-bbbbbbbbbbbb",
    )
    .await;

    for n in 0..3 {
        h.publish(&ticket_event(
            &format!("evt_a{n}"),
            "org_a",
            "ticket.created",
        ))
        .await;
        h.publish(&ticket_event(
            &format!("evt_b{n}"),
            "org_b",
            "ticket.created",
        ))
        .await;
    }
    let results = h.results(6, WAIT).await;
    for result in &results {
        let expected = if result.data.org_id == "org_a" {
            &out_a
        } else {
            &out_b
        };
        assert_eq!(result.data.output.as_ref(), Some(expected), "{result:?}");
    }
    for (provider, key) in [
        (&provider_a, "sk-a-aaaaaaaaaaaa"),
        (&provider_b, "sk-b-bbbbbbbbbbbb"),
    ] {
        let requests = provider.received_requests().await.unwrap();
        assert_eq!(requests.len(), 3);
        for request in requests {
            assert_eq!(
                request.headers.get("authorization").unwrap(),
                format!("Bearer {key}").as_str()
            );
            let body = String::from_utf8_lossy(&request.body).into_owned();
            let own = if key.starts_with("sk-a") {
                "evt_a"
            } else {
                "evt_b"
            };
            assert!(body.contains(own), "a request carried another org's ticket");
        }
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_without_config_is_skipped_without_any_request() {
    let mut h = Harness::start().await;
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&summary_output("x"))))
        .expect(0)
        .mount(&provider)
        .await;
    // Another org is configured with this provider: the unconfigured one must not borrow it.
    h.set_org(
        "org_other",
        &format!("{}/v1", provider.uri()),
        "sk-other-123456789",
    )
    .await;

    h.publish(&ticket_event(
        "evt_none",
        "org_unconfigured",
        "ticket.created",
    ))
    .await;
    let skipped = "copilot_events_skipped_total{worker=\"summarize\",reason=\"no_config\"}";
    h.counter_reaches(WAIT, "the skip to be counted", skipped, 1.0)
        .await;
    assert!(
        h.next_result(Duration::from_millis(700)).await.is_none(),
        "no result is published"
    );
    assert!(provider.received_requests().await.unwrap().is_empty());

    // Once the service has stopped, nothing unacked can hide: the queue must be empty.
    h.stop_service().await;
    assert_eq!(
        h.queue_depth(&h.topology.worker_queue("summarize")).await,
        0
    );
    assert!(h.dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_dead_lettered_with_a_reason_and_work_goes_on() {
    let mut h = Harness::start().await;
    let output = summary_output("still working");
    let provider = acme(&h, &output).await;

    h.publish_raw(b"{\"specversion\": \"1.0\", oops", "ticket.created", None)
        .await;
    h.publish(&ticket_event("evt_good", "org_acme", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.source_event_id, "evt_good");
    assert_eq!(results[0].data.output.as_ref(), Some(&output));

    let dead = h.wait_dead_letters(1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        support::header(&dead[0], "x-copilot-reason").as_deref(),
        Some("not_json")
    );
    assert_eq!(dead[0].data, b"{\"specversion\": \"1.0\", oops");
    let counted = "copilot_events_dead_lettered_total{worker=\"summarize\",reason=\"not_json\"}";
    h.counter_reaches(WAIT, "dead letters to be counted", counted, 1.0)
        .await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
    h.finish().await;
}

/// Validates `instance` against a schema file in `schemas/`.
pub fn assert_valid(schema_file: &str, instance: &serde_json::Value) {
    let text = std::fs::read_to_string(format!("schemas/{schema_file}")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{schema_file}: {errors:?}\n{instance:#}");
}

#[test]
fn sample_events_match_the_schema_and_the_rust_types() {
    for entry in std::fs::read_dir("schemas/examples").unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_valid("ticket-event.schema.json", &value);
        copilot_workers::events::parse_event(text.as_bytes(), None, 1 << 20)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_results_match_the_result_schema() {
    let mut h = Harness::start().await;
    let _provider = acme(&h, &summary_output("schema check")).await;
    h.publish(&ticket_event("evt_schema", "org_acme", "ticket.created"))
        .await;
    let (_, delivery) = h.next_result(WAIT).await.expect("a result");
    let value: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_valid("result-event.schema.json", &value);
    assert_valid(
        "workers/summarize.output.schema.json",
        &value["data"]["output"],
    );
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str()),
        value["id"].as_str()
    );
    h.finish().await;
}

/// `copilot-workers publish` run as a helpdesk engineer would, against this harness's broker.
fn publish_cli(h: &Harness, prefix: &str, file: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_copilot-workers"))
        .args(["publish", "--file"])
        .arg(file)
        .env("COPILOT_AMQP_URL", &h.settings.amqp_url)
        .env("COPILOT_TOPOLOGY_PREFIX", prefix)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_command_delivers_an_event_and_refuses_a_missing_exchange_at_once() {
    let mut h = Harness::start().await;
    let output = summary_output("Published from the command line.");
    acme(&h, &output).await;
    let file = std::env::temp_dir().join(format!("{}.json", support::unique("cwpublish")));
    let event = ticket_event("evt_cli", "org_acme", "ticket.created");
    std::fs::write(&file, serde_json::to_vec(&event).unwrap()).unwrap();

    let sent = publish_cli(&h, &h.settings.topology_prefix, &file);
    let said = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(said.contains("with routing key ticket.created"), "{said}");
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.source_event_id, "evt_cli");
    assert_eq!(results[0].data.output.as_ref(), Some(&output));

    // A type no worker running reacts to (this install runs summarize alone; with no
    // alternate-exchange policy the broker returns it): said, not retried.
    let updated = ticket_event("evt_cli_updated", "org_acme", "ticket.updated");
    std::fs::write(&file, serde_json::to_vec(&updated).unwrap()).unwrap();
    let returned = publish_cli(&h, &h.settings.topology_prefix, &file);
    let complaint = String::from_utf8_lossy(&returned.stderr);
    assert!(!returned.status.success());
    assert!(
        complaint.contains("no worker queue is bound for ticket.updated on")
            && complaint.contains("nothing was delivered"),
        "{complaint}"
    );
    std::fs::write(&file, serde_json::to_vec(&event).unwrap()).unwrap();

    // A prefix nobody declared: the command says so and stops, instead of retrying as if
    // the broker were down.
    let missing = format!("{}nobody.", h.settings.topology_prefix);
    let refused = publish_cli(&h, &missing, &file);
    let complaint = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        complaint.contains(&format!(
            "exchange {missing}tickets.events does not exist: nothing was published"
        )),
        "{complaint}"
    );
    assert!(
        !complaint.contains("waiting for the broker"),
        "no retries: {complaint}"
    );
    assert_eq!(
        complaint.lines().count(),
        1,
        "one line says it all: {complaint}"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_command_shows_results_as_downstream_receives_them() {
    use tokio::io::AsyncBufReadExt as _;
    let mut h = Harness::start().await;
    let output = summary_output("Watched from the command line.");
    acme(&h, &output).await;
    let mut watcher = tokio::process::Command::new(env!("CARGO_BIN_EXE_copilot-workers"))
        .args(["results", "--json", "--count", "1"])
        .env("COPILOT_AMQP_URL", &h.settings.amqp_url)
        .env("COPILOT_TOPOLOGY_PREFIX", &h.settings.topology_prefix)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It says when its queue is bound; only results published after that reach it.
    let mut said = tokio::io::BufReader::new(watcher.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, said.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(
        first
            .as_deref()
            .is_some_and(|line| line.starts_with("listening on")),
        "{first:?}"
    );

    h.publish(&ticket_event("evt_watched", "org_acme", "ticket.created"))
        .await;
    let done = tokio::time::timeout(WAIT, watcher.wait_with_output())
        .await
        .expect("it stops after --count results")
        .unwrap();
    assert!(done.status.success());
    let printed = String::from_utf8_lossy(&done.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "{printed}");
    let result: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(result["data"]["source_event_id"], "evt_watched");
    assert_eq!(result["data"]["output"], output);
    // It took nothing from the harness's own results queue.
    let seen = h.results(1, WAIT).await;
    assert_eq!(seen[0].data.source_event_id, "evt_watched");
    h.finish().await;
}
