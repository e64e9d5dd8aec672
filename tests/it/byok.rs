//! BYOK configuration: rotation, start-up refusals, live changes, the endpoint guard,
//! provider profiles, health, and the admin API.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use copilot_workers::crypto::KeyRing;
use copilot_workers::provider::Profile;
use secrecy::SecretString;
use serde_json::{Value, json};
use wiremock::matchers::{header, header_exists, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::proxy::SilentProxy;
use crate::skeleton::provider_for;
use crate::support::{Harness, Options, completion, org_config, summary_output, ticket_event};

const WAIT: Duration = Duration::from_secs(20);
const KEY: &str = "sk-acme-0123456789";

fn ring(keys: &[[u8; 32]]) -> KeyRing {
    let spec: Vec<String> = keys
        .iter()
        .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
        .collect();
    KeyRing::parse(&SecretString::from(spec.join(","))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reseals_every_key_while_events_keep_completing() {
    let old = ring(&[[1; 32]]);
    let both = Arc::new(ring(&[[2; 32], [1; 32]]));
    let mut h = Harness::with(Options {
        keys: Some(both.clone()),
        ..Options::default()
    })
    .await;
    let output = summary_output("rotated");
    let provider = provider_for(KEY, &output).await;
    let url = format!("{}/v1", provider.uri());
    for n in 0..5 {
        h.set_config(org_config(
            &old,
            &format!("org_{n}"),
            Profile::Openai,
            &url,
            Some(KEY),
        ))
        .await;
    }
    assert_eq!(
        h.store.sealed_key_ids().await.unwrap(),
        vec![old.active_key_id().to_owned()]
    );

    let total = 100;
    for n in 0..total / 2 {
        h.publish(&ticket_event(
            &format!("evt_r{n}"),
            &format!("org_{}", n % 5),
            "ticket.created",
        ))
        .await;
    }
    let report = copilot_workers::admin::rotate(&h.store, &both)
        .await
        .unwrap();
    assert_eq!(report.rotated, 5);
    for n in total / 2..total {
        h.publish(&ticket_event(
            &format!("evt_r{n}"),
            &format!("org_{}", n % 5),
            "ticket.created",
        ))
        .await;
    }
    let results = h.results(total, Duration::from_secs(60)).await;
    assert!(
        results.iter().all(|r| r.is_completed()),
        "every event during the rotation completes"
    );
    assert_eq!(
        h.store.sealed_key_ids().await.unwrap(),
        vec![both.active_key_id().to_owned()]
    );
    // A second rotation has nothing to do, and the new ring alone opens every row.
    assert_eq!(
        copilot_workers::admin::rotate(&h.store, &both)
            .await
            .unwrap()
            .rotated,
        0
    );
    let new_only = ring(&[[2; 32]]);
    for config in h.store.provider_configs().await.unwrap() {
        let key = new_only
            .open(&config.org_id, config.api_key.as_ref().unwrap())
            .unwrap();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&key), KEY);
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_stored_keys_it_cannot_open() {
    let h = Harness::start().await;
    let foreign = ring(&[[9; 32]]);
    h.set_config(org_config(
        &foreign,
        "org_x",
        Profile::Openai,
        "https://api.example.com/v1",
        Some(KEY),
    ))
    .await;
    let catalog =
        copilot_workers::workers::Catalog::load(&h.settings.workers_dir, &h.settings.schemas_dir)
            .unwrap();
    let err = copilot_workers::service::run(
        &h.settings,
        h.keys.clone(),
        catalog,
        Default::default(),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains(foreign.active_key_id()), "{err}");
    assert!(
        err.contains("keys rotate"),
        "the message says what to do: {err}"
    );
    h.finish().await;
}

#[test]
fn start_up_refuses_a_missing_or_malformed_master_key() {
    let binary = env!("CARGO_BIN_EXE_copilot-workers");
    let run = |key: Option<&str>| {
        let mut command = std::process::Command::new(binary);
        command
            .args(["run"])
            .env_remove("COPILOT_MASTER_KEY")
            .env_remove("COPILOT_MASTER_KEY_FILE");
        if let Some(key) = key {
            command.env("COPILOT_MASTER_KEY", key);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let missing = run(None);
    assert!(
        missing.contains("no master key") && missing.contains("COPILOT_MASTER_KEY"),
        "{missing}"
    );
    let short = run(Some(
        &base64::engine::general_purpose::STANDARD.encode([1u8; 16]),
    ));
    assert!(
        short.contains("malformed") && short.contains("32 bytes"),
        "{short}"
    );
    let garbage = run(Some("not-base64!"));
    assert!(garbage.contains("not base64"), "{garbage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_or_disabling_a_config_stops_requests_at_once() {
    let mut h = Harness::start().await;
    let provider = provider_for(KEY, &summary_output("live")).await;
    let url = format!("{}/v1", provider.uri());
    h.set_org("org_a", &url, KEY).await;
    h.set_org("org_b", &url, KEY).await;
    for org in ["org_a", "org_b"] {
        h.publish(&ticket_event(
            &format!("evt_{org}_1"),
            org,
            "ticket.created",
        ))
        .await;
    }
    h.results(2, WAIT).await; // both configs are now cached
    assert!(h.store.remove_provider_config("org_a").await.unwrap());
    assert!(h.store.set_provider_enabled("org_b", false).await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    for org in ["org_a", "org_b"] {
        h.publish(&ticket_event(
            &format!("evt_{org}_2"),
            org,
            "ticket.created",
        ))
        .await;
    }
    for reason in ["no_config", "disabled"] {
        let skipped =
            format!("copilot_events_skipped_total{{worker=\"summarize\",reason=\"{reason}\"}}");
        h.counter_reaches(WAIT, reason, &skipped, 1.0).await;
    }
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "no request after the change"
    );
    assert!(h.next_result(Duration::from_millis(300)).await.is_none());
    assert!(h.counter("copilot_config_cache_invalidations_total").await >= 2.0);
    // Re-enabling works the same way.
    assert!(h.store.set_provider_enabled("org_b", true).await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.publish(&ticket_event("evt_org_b_3", "org_b", "ticket.created"))
        .await;
    h.results(1, WAIT).await;
    h.finish().await;
}

/// A NAT or a firewall that forgets an idle flow drops its packets without a reset, and the
/// config listener only ever reads: it would wait for ever for notifications that no longer
/// come, and a disabled org's cached config would stay in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_reaches_a_worker_whose_listener_connection_fell_silent() {
    a_config_change_reaches_a_worker_whose_listener(SilentProxy::silence).await;
}

/// A transaction-mode PgBouncer accepts `LISTEN`, answers every query, and passes no
/// notification on: a listener that only checked its connection would trust a stale cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_reaches_a_worker_whose_listener_hears_no_notifications() {
    a_config_change_reaches_a_worker_whose_listener(SilentProxy::deafen).await;
}

/// The listener sends itself a notification every second: once `TRUSTED_FOR` has passed
/// without one coming back, the cache is not trusted, and a new connection listens once the
/// failing one is given up (`PROBE_TIMEOUT`). `cut` makes the listener's connection (the one
/// that sent `LISTEN`) fail.
async fn a_config_change_reaches_a_worker_whose_listener(cut: fn(&SilentProxy) -> usize) {
    use copilot_workers::store::cache::{PROBE_TIMEOUT, TRUSTED_FOR};
    let listener_up = "copilot_config_listener_up";
    let invalidations = "copilot_config_cache_invalidations_total";
    let proxy = SilentProxy::start(b"LISTEN").await;
    let mut h = Harness::with(Options {
        database_port: Some(proxy.port),
        ..Options::default()
    })
    .await;
    let provider = provider_for(KEY, &summary_output("live")).await;
    let url = format!("{}/v1", provider.uri());
    h.counter_reaches(WAIT, "the listener", listener_up, 1.0)
        .await;
    h.set_org("org_a", &url, KEY).await;
    // Its notification, which a loaded machine may deliver late, is heard before the cut.
    h.counter_reaches(WAIT, "the new config's notification", invalidations, 1.0)
        .await;
    h.publish(&ticket_event("evt_cut_1", "org_a", "ticket.created"))
        .await;
    h.results(1, WAIT).await; // the config is now cached

    assert_eq!(cut(&proxy), 1, "one listener connection");
    let heard = h.counter(invalidations).await;
    assert!(h.store.set_provider_enabled("org_a", false).await.unwrap());
    tokio::time::sleep(TRUSTED_FOR + Duration::from_millis(500)).await;
    assert_eq!(
        h.counter(invalidations).await,
        heard,
        "the notification must not have got through"
    );
    h.publish(&ticket_event("evt_cut_2", "org_a", "ticket.created"))
        .await;
    let disabled = "copilot_events_skipped_total{worker=\"summarize\",reason=\"disabled\"}";
    h.counter_reaches(WAIT, "the disabled skip", disabled, 1.0)
        .await;
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        1,
        "no request with the cached config after it was disabled"
    );

    // The failing connection is given up, and a new one hears the next change.
    tokio::time::sleep(PROBE_TIMEOUT).await;
    h.counter_reaches(WAIT, "the listener again", listener_up, 1.0)
        .await;
    assert!(h.store.set_provider_enabled("org_a", true).await.unwrap());
    h.eventually(WAIT, "the change heard", || async {
        h.counter(invalidations).await > heard
    })
    .await;
    h.publish(&ticket_event("evt_cut_3", "org_a", "ticket.created"))
        .await;
    h.results(1, WAIT).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_guard_refuses_metadata_and_unallowed_loopback() {
    let mut h = Harness::with(Options {
        allow_loopback: false,
        ..Options::default()
    })
    .await;
    let provider = MockServer::start().await;
    let port = provider.address().port();
    let cases = [
        ("org_meta_ip", "http://169.254.169.254/v1".to_owned()),
        (
            "org_meta_name",
            "http://metadata.google.internal/v1".to_owned(),
        ),
        ("org_localhost", format!("http://localhost:{port}/v1")),
        ("org_loopback_ip", format!("http://127.0.0.1:{port}/v1")),
    ];
    for (org, url) in &cases {
        h.set_config(org_config(&h.keys, org, Profile::Openai, url, Some(KEY)))
            .await;
        h.publish(&ticket_event(&format!("evt_{org}"), org, "ticket.created"))
            .await;
    }
    let results = h.results(cases.len(), WAIT).await;
    for result in &results {
        assert_eq!(
            result.data.error.as_ref().map(|e| e.class.as_str()),
            Some("endpoint_refused"),
            "{result:?}"
        );
    }
    assert!(provider.received_requests().await.unwrap().is_empty());
    let health = h
        .store
        .provider_config("org_localhost")
        .await
        .unwrap()
        .unwrap()
        .health;
    assert!(
        !health.healthy,
        "a refused endpoint marks the config unhealthy"
    );
    h.finish().await;

    // With the operator's allowance, loopback (by name too) works; metadata never does.
    let mut h = Harness::with(Options {
        allow_loopback: true,
        ..Options::default()
    })
    .await;
    let provider = provider_for(KEY, &summary_output("local model")).await;
    let port = provider.address().port();
    h.set_org("org_localhost", &format!("http://localhost:{port}/v1"), KEY)
        .await;
    h.set_org("org_meta_ip", "http://169.254.169.254/v1", KEY)
        .await;
    h.publish(&ticket_event(
        "evt_local",
        "org_localhost",
        "ticket.created",
    ))
    .await;
    h.publish(&ticket_event("evt_meta", "org_meta_ip", "ticket.created"))
        .await;
    let results = h.results(2, WAIT).await;
    for result in results {
        match result.data.org_id.as_str() {
            "org_localhost" => assert!(result.is_completed(), "{result:?}"),
            _ => assert_eq!(result.data.error.unwrap().class, "endpoint_refused"),
        }
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_sends_its_deployment_url_api_version_and_api_key_header() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    let output = summary_output("from azure");
    Mock::given(method("POST"))
        .and(path("/openai/deployments/gpt-4o-prod/chat/completions"))
        .and(query_param("api-version", "2024-10-21"))
        .and(header("api-key", KEY))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&output)))
        .expect(1)
        .mount(&server)
        .await;
    let mut config = org_config(
        &h.keys,
        "org_az",
        Profile::Azure,
        &format!("{}/openai/deployments/gpt-4o-prod", server.uri()),
        Some(KEY),
    );
    config.params.api_version = Some("2024-10-21".into());
    h.set_config(config).await;
    h.publish(&ticket_event("evt_az", "org_az", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.output, Some(output));
    let request = &server.received_requests().await.unwrap()[0];
    assert!(
        request.headers.get("authorization").is_none(),
        "Azure takes api-key, not a bearer token"
    );
    let body: Value = request.body_json().unwrap();
    assert!(
        body.get("model").is_none(),
        "the deployment names the model"
    );
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["messages"][0]["role"], "system");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_needs_no_key_and_gets_json_mode() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    let output = summary_output("from ollama");
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&output)))
        .expect(1)
        .mount(&server)
        .await;
    let mut config = org_config(
        &h.keys,
        "org_ol",
        Profile::Ollama,
        &format!("{}/v1", server.uri()),
        None,
    );
    config.model = "llama3.2".into();
    h.set_config(config).await;
    h.publish(&ticket_event("evt_ol", "org_ol", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.output, Some(output));
    let request = &server.received_requests().await.unwrap()[0];
    assert!(request.headers.get("authorization").is_none());
    let body: Value = request.body_json().unwrap();
    assert_eq!(body["model"], "llama3.2");
    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_fails_the_event_and_marks_the_config_unhealthy() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header_exists("authorization"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": {
            "message": format!("Incorrect API key provided: {KEY}"), "type": "invalid_request_error", "code": "invalid_api_key"}})))
        .expect(1)
        .mount(&server)
        .await;
    h.set_org("org_revoked", &format!("{}/v1", server.uri()), KEY)
        .await;
    h.publish(&ticket_event(
        "evt_revoked",
        "org_revoked",
        "ticket.created",
    ))
    .await;
    let results = h.results(1, WAIT).await;
    let error = results[0].data.error.clone().unwrap();
    assert_eq!(error.class, "provider_auth");
    assert!(!error.message.contains(KEY));
    let config = h
        .store
        .provider_config("org_revoked")
        .await
        .unwrap()
        .unwrap();
    assert!(!config.health.healthy);
    let last_error = config.health.last_error.unwrap();
    assert!(
        last_error.contains("401") && !last_error.contains(KEY),
        "{last_error}"
    );
    // By default a failure for good leaves its failed result only, no dead letter (a dead
    // letter would be published right after the result, before the ack).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.dead_letters().await.is_empty());
    h.finish().await;
}

pub const ADMIN_TOKEN: &str = "admin-token-for-tests";

/// A running service with the admin API on, under [`ADMIN_TOKEN`].
pub async fn with_admin_api() -> Harness {
    Harness::with(Options {
        admin_token: Some(ADMIN_TOKEN),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_authenticates_and_round_trips_configs() {
    let h = with_admin_api().await;
    let provider = provider_for(KEY, &summary_output("api")).await;
    let base = format!("http://{}/v1/orgs/org_api/provider", h.http_addr);
    let client = reqwest::Client::new();
    let body = json!({"provider": "openai", "base_url": format!("{}/v1", provider.uri()), "model": "gpt-4o-mini",
        "api_key": KEY, "params": {"temperature": 0.3}, "context": {"categories": ["billing"]}});

    let none = client.get(&base).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let wrong = client
        .get(&base)
        .bearer_auth("admin-token-for-test")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let put = client
        .put(&base)
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let got = client
        .get(&base)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let text = got.text().await.unwrap();
    assert!(!text.contains(KEY), "GET never returns the key: {text}");
    let view: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["model"], "gpt-4o-mini");
    assert_eq!(view["api_key"]["last4"], "…6789");
    assert_eq!(view["params"]["temperature"], 0.3);

    let tested = client
        .post(format!("{base}/test"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(tested.status(), 200);
    let report: Value = tested.json().await.unwrap();
    assert_eq!(report["ok"], true);

    for (bad, field) in [
        (
            json!({"provider": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"}),
            "model",
        ),
        (
            json!({"provider": "openai", "base_url": "https://api.openai.com/v1", "model": "m", "params": {"temperature": "hot"}}),
            "params.temperature",
        ),
        (
            json!({"provider": "openia", "base_url": "https://api.openai.com/v1", "model": "m"}),
            "provider",
        ),
        (
            json!({"provider": "openai", "base_url": "http://169.254.169.254/v1", "model": "m", "api_key": "k"}),
            "base_url",
        ),
        (
            json!({"provider": "openai", "base_url": "https://api.openai.com/v1", "model": "m", "api_key": "k", "colour": 1}),
            "colour",
        ),
    ] {
        let response = client
            .put(&base)
            .bearer_auth(ADMIN_TOKEN)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{bad}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    let not_json = client
        .put(&base)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 422);
    let error: Value = not_json.json().await.unwrap();
    assert_eq!(error["error"]["field"], "body", "{error}");

    let deleted = client
        .delete(&base)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = client
        .get(&base)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    h.finish().await;
}

/// A stored key goes only where it was given for. Pointing a config at another origin
/// without giving the key again is refused, by the admin API and the CLI alike; the org's
/// events still reach its own provider, and nothing is sent to the other address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_key_is_never_carried_to_another_origin() {
    let mut h = with_admin_api().await;
    let home = provider_for(KEY, &summary_output("home")).await;
    let elsewhere = MockServer::start().await;
    let home_url = format!("{}/v1", home.uri());
    let elsewhere_url = format!("{}/v1", elsewhere.uri());
    let client = reqwest::Client::new();
    let base = format!("http://{}/v1/orgs/org_acme/provider", h.http_addr);
    let put = |body: Value| {
        client
            .put(&base)
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };

    let created = put(
        json!({"provider": "openai", "base_url": home_url, "model": "gpt-4o-mini",
        "api_key": KEY}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    // The same origin: the stored key is kept.
    let updated = put(json!({"provider": "openai", "base_url": home_url, "model": "gpt-4o"}))
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);
    let view: Value = updated.json().await.unwrap();
    assert_eq!(view["api_key"]["last4"], "…6789");

    let moved = put(json!({"provider": "openai", "base_url": elsewhere_url, "model": "gpt-4o"}))
        .await
        .unwrap();
    assert_eq!(moved.status(), 422);
    let error: Value = moved.json().await.unwrap();
    assert_eq!(error["error"]["field"], "api_key", "{error}");
    let said = error["error"]["message"].as_str().unwrap();
    assert!(said.contains(&format!("to {}", elsewhere.uri())), "{said}");
    let output = h
        .cli(&[
            "org",
            "set",
            "org_acme",
            "--allow-loopback-providers",
            "true",
            "--provider",
            "openai",
            "--base-url",
            &elsewhere_url,
            "--model",
            "gpt-4o",
        ])
        .await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("give the API key again"), "{said}");
    let stored = h.store.provider_config("org_acme").await.unwrap().unwrap();
    assert_eq!(stored.base_url, home_url);

    h.publish(&ticket_event("evt_home", "org_acme", "ticket.created"))
        .await;
    let (result, _) = h.next_result(WAIT).await.expect("a result");
    assert_eq!(result.data.source_event_id, "evt_home");
    assert_eq!(result.kind, "ticket.enrichment.completed");
    assert_eq!(home.received_requests().await.unwrap().len(), 1);
    assert!(elsewhere.received_requests().await.unwrap().is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_configs_by_page_and_answers_unknown_routes_in_json() {
    let h = with_admin_api().await;
    let client = reqwest::Client::new();
    let api = format!("http://{}/v1", h.http_addr);
    let get = |url: String| client.get(url).bearer_auth(ADMIN_TOKEN).send();
    for org in ["org_c", "org_a", "org_b"] {
        let body = json!({"provider": "openai", "base_url": "https://api.openai.com/v1",
            "model": "gpt-4o-mini", "api_key": format!("{KEY}-{org}")});
        let put = client
            .put(format!("{api}/orgs/{org}/provider"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201);
    }
    assert_eq!(
        client
            .get(format!("{api}/orgs"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    let first = get(format!("{api}/orgs?limit=2")).await.unwrap();
    assert_eq!(first.status(), 200);
    let text = first.text().await.unwrap();
    assert!(!text.contains(KEY), "a list never shows a key: {text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    let ids = |page: &Value| -> Vec<String> {
        page["orgs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|org| org["org_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&page), ["org_a", "org_b"], "ordered by org id");
    assert_eq!(page["orgs"][0]["api_key"]["last4"], "…rg_a");
    assert_eq!(page["next_after"], "org_b");
    let last: Value = get(format!("{api}/orgs?limit=2&after=org_b"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&last), ["org_c"]);
    assert_eq!(last["next_after"], Value::Null, "the last page says so");
    let all: Value = get(format!("{api}/orgs"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&all), ["org_a", "org_b", "org_c"]);

    for bad in ["limit=0", "limit=1001", "limit=ten", "colour=red"] {
        let response = get(format!("{api}/orgs?{bad}")).await.unwrap();
        assert_eq!(response.status(), 422, "{bad}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_query", "{bad}: {error}");
    }

    let unknown = get(format!("{api}/organisations")).await.unwrap();
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["code"], "no_such_route");
    let wrong_method = client
        .post(format!("{api}/orgs/org_a/provider"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let allow = wrong_method.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("PUT"), "{allow}");
    let error: Value = wrong_method.json().await.unwrap();
    assert_eq!(error["error"]["code"], "method_not_allowed");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_off_without_a_token() {
    let h = Harness::start().await;
    let response = reqwest::get(format!("http://{}/v1/orgs/org_x/provider", h.http_addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_the_model_rejects_is_dropped_not_fatal() {
    let mut h = Harness::start().await;
    let server = MockServer::start().await;
    let output = summary_output("no temperature for me");
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_string_contains("\"temperature\""))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "Unsupported value: 'temperature' does not support 0.2 with this model.",
            "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&output)))
        .mount(&server)
        .await;
    h.set_org("org_o1", &format!("{}/v1", server.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_o1", "org_o1", "ticket.created"))
        .await;
    let results = h.results(1, WAIT).await;
    assert_eq!(results[0].data.output, Some(output));
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let retried: Value = requests[1].body_json().unwrap();
    assert!(retried.get("temperature").is_none());
    h.finish().await;
}
