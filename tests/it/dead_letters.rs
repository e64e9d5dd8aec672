//! `copilot-workers dead-letters`: an operator sees what was dead-lettered and why without
//! taking it, and sends it back to its worker once the cause is fixed.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use copilot_workers::broker::Outgoing;

use crate::support::{Harness, Options, completion, header, summary_output, ticket_event};

const KEY: &str = "sk-replay-0123456789";
const WAIT: Duration = Duration::from_secs(20);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn said(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits until the dead-letter queue holds `n` ready messages. What a command read goes
/// back as its channel closes, through the quorum queue's log: not always by the time the
/// command has exited.
async fn dead_letters_become(h: &Harness, n: u32) {
    let queue = h.topology.dead_letter_queue();
    h.eventually(WAIT, &format!("{n} dead letter(s) ready"), || async {
        h.queue_depth(&queue).await == n
    })
    .await;
}

/// `dead-letters list --json`, one parsed document per dead letter.
async fn listed(h: &Harness) -> Vec<Value> {
    let output = h.cli(&["dead-letters", "list", "--json"]).await;
    assert!(output.status.success(), "{}", said(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// A provider outage exhausts an event's retries; once the provider is back, the operator
/// lists the dead letters (which stay), then replays those of `retries_exhausted`: the event
/// runs again under a new id, so downstream gets a completed result with a result id of its
/// own, while the bad input stays dead-lettered and the failed run stays in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_without_taking_them_replayed_once_the_cause_is_fixed_and_purged() {
    let mut h = Harness::start().await; // max_attempts: 3
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    h.set_org("org_a", &format!("{}/v1", provider.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_outage", "org_a", "ticket.created"))
        .await;
    let (failed, _) = h.next_result(WAIT).await.expect("a failed result");
    assert_eq!(
        failed.data.error.as_ref().unwrap().class,
        "retries_exhausted"
    );
    h.publish_raw(b"{not json", "ticket.created", None).await;
    dead_letters_become(&h, 2).await;

    let letters = listed(&h).await;
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let exhausted = &letters[0];
    assert_eq!(exhausted["reason"], "retries_exhausted");
    assert_eq!(exhausted["worker"], "summarize");
    assert_eq!(exhausted["event_id"], "evt_outage");
    assert_eq!(exhausted["org_id"], "org_a");
    assert_eq!(exhausted["ticket_id"], "T-evt_outage");
    assert_eq!(exhausted["routing_key"], "ticket.created");
    assert!(
        exhausted["dead_lettered_at"]
            .as_str()
            .is_some_and(|at| at.starts_with("20"))
    );
    assert_eq!(exhausted["body"]["id"], "evt_outage");
    assert_eq!(letters[1]["reason"], "not_json");
    assert_eq!(letters[1]["body"], "{not json");
    // Listing takes nothing.
    dead_letters_become(&h, 2).await;
    // The list can be narrowed, to find a few among many.
    let output = h
        .cli(&["dead-letters", "list", "--json", "--reason", "not_json"])
        .await;
    let narrowed: Vec<&str> = std::str::from_utf8(&output.stdout)
        .unwrap()
        .lines()
        .collect();
    assert_eq!(narrowed.len(), 1, "{}", said(&output));
    assert!(
        narrowed[0].contains("\"reason\":\"not_json\""),
        "{}",
        narrowed[0]
    );
    dead_letters_become(&h, 2).await;

    // Nothing is replayed unless the operator says which.
    let refused = h.cli(&["dead-letters", "replay"]).await;
    assert!(!refused.status.success());
    assert!(
        said(&refused).contains("--reason R, --worker W, or --all"),
        "{}",
        said(&refused)
    );

    provider.reset().await;
    let output = summary_output("Back after the outage.");
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&output)))
        .mount(&provider)
        .await;
    let replayed = h
        .cli(&["dead-letters", "replay", "--reason", "retries_exhausted"])
        .await;
    let text = said(&replayed);
    assert!(replayed.status.success(), "{text}");
    assert!(
        text.contains(
            "evt_outage was decided as failed by summarize: replayed as evt_outage~replay1"
        ),
        "{text}"
    );
    assert!(
        text.contains("replayed 1 dead letter(s) (1 under a new id); 1 left"),
        "{text}"
    );

    let (completed, _) = h
        .next_result(WAIT)
        .await
        .expect("the replayed run's result");
    assert!(completed.is_completed());
    assert_eq!(completed.data.source_event_id, "evt_outage~replay1");
    assert_eq!(completed.data.output.as_ref(), Some(&output));
    assert_ne!(
        completed.id, failed.id,
        "downstream would drop a result id it has seen"
    );
    let left = listed(&h).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["reason"], "not_json");
    let original = h
        .store
        .ledger_entry("evt_outage", "summarize")
        .await
        .unwrap();
    assert_eq!(
        original.map(|entry| entry.outcome).as_deref(),
        Some("failed")
    );

    // Input still bad comes back, under the routing key it was first published with.
    let again = h
        .cli(&["dead-letters", "replay", "--reason", "not_json"])
        .await;
    assert!(again.status.success(), "{}", said(&again));
    h.eventually(WAIT, "the bad input dead-lettered again", || async {
        let letters = listed(&h).await;
        letters.len() == 1 && letters[0]["dead_lettered_at"] != left[0]["dead_lettered_at"]
    })
    .await;
    let letters = listed(&h).await;
    assert_eq!(letters[0]["reason"], "not_json");
    assert_eq!(letters[0]["routing_key"], "ticket.created");

    // Looked at, it can go for good; a purge, too, takes only what it is told to.
    dead_letters_become(&h, 1).await;
    let kept = h
        .cli(&["dead-letters", "purge", "--reason", "oversized"])
        .await;
    assert!(
        said(&kept).contains("purged 0 dead letter(s); 1 left"),
        "{}",
        said(&kept)
    );
    dead_letters_become(&h, 1).await;
    let purged = h
        .cli(&["dead-letters", "purge", "--reason", "not_json"])
        .await;
    assert!(purged.status.success(), "{}", said(&purged));
    assert!(
        said(&purged).contains("purged 1 dead letter(s); 0 left"),
        "{}",
        said(&purged)
    );
    dead_letters_become(&h, 0).await;
    assert!(listed(&h).await.is_empty());
    h.finish().await;
}

/// The broker's own dead letter (an event past the delivery limit) carries no header of ours:
/// it is named from the broker's `x-first-death-*` headers and replayed into its worker's
/// queue, as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_past_the_delivery_limit_is_named_and_replayed_to_its_worker() {
    let h = Harness::with(Options {
        in_process: false, // nobody consumes: the test plays a worker that keeps failing
        ..Options::default()
    })
    .await;
    let event = ticket_event("evt_bounced", "org_a", "ticket.created");
    let body = event.to_string();
    let exchange = h.topology.events_exchange();
    let traced = Outgoing::new(&exchange, "ticket.created", body.as_bytes())
        .header("traceparent", TRACEPARENT);
    h.publish_message(&traced).await;
    let queue = h.topology.worker_queue("summarize");
    let connection = copilot_workers::broker::connect(&h.settings.amqp_url, "bouncer")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut deliveries = 0_u32;
    while deliveries < 20 {
        let Some(got) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        else {
            break;
        };
        deliveries += 1;
        got.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(deliveries, h.settings.delivery_limit + 1);
    let dead_letters = h.topology.dead_letter_queue();
    dead_letters_become(&h, 1).await;

    let letters = listed(&h).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "delivery_limit");
    assert_eq!(letters[0]["worker"], "summarize");
    assert_eq!(letters[0]["event_id"], "evt_bounced");
    assert_eq!(letters[0]["routing_key"], "ticket.created");
    assert!(
        letters[0]["dead_lettered_at"].as_str().is_some(),
        "{letters:#?}"
    );
    dead_letters_become(&h, 1).await;

    let replayed = h
        .cli(&["dead-letters", "replay", "--worker", "summarize"])
        .await;
    assert!(replayed.status.success(), "{}", said(&replayed));
    assert!(said(&replayed).contains("replayed 1 dead letter(s) (0 under a new id)"));
    assert_eq!(h.queue_depth(&dead_letters).await, 0);
    let back = h.take_all(&queue).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].data, body.into_bytes(), "replayed as it was");
    assert_eq!(
        header(&back[0], "traceparent").as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(
        header(&back[0], "x-original-routing-key").as_deref(),
        Some("ticket.created")
    );
    connection.close(200, "done".into()).await.unwrap();
    h.finish().await;
}

/// With `COPILOT_DEAD_LETTER_FAILURES`, an event whose run failed for good (here a revoked
/// key) is dead-lettered under its class after its failed result, and once the org's key
/// works again a replay runs it under a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_for_good_is_dead_lettered_when_asked_and_replayed_once_the_org_fixed_it() {
    let mut h = Harness::with(Options {
        dead_letter_failures: true,
        ..Options::default()
    })
    .await;
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&provider)
        .await;
    h.set_org("org_a", &format!("{}/v1", provider.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_revoked", "org_a", "ticket.created"))
        .await;
    let (failed, _) = h.next_result(WAIT).await.expect("a failed result");
    assert_eq!(failed.data.error.as_ref().unwrap().class, "provider_auth");
    dead_letters_become(&h, 1).await;
    let letters = listed(&h).await;
    assert_eq!(letters[0]["reason"], "provider_auth");
    assert!(
        letters[0]["error"]
            .as_str()
            .is_some_and(|error| error.contains("401")),
        "{letters:#?}"
    );
    dead_letters_become(&h, 1).await;

    provider.reset().await;
    let output = summary_output("The key works again.");
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&output)))
        .mount(&provider)
        .await;
    let replayed = h
        .cli(&["dead-letters", "replay", "--reason", "provider_auth"])
        .await;
    assert!(replayed.status.success(), "{}", said(&replayed));
    let (completed, _) = h
        .next_result(WAIT)
        .await
        .expect("the replayed run's result");
    assert_eq!(completed.data.source_event_id, "evt_revoked~replay1");
    assert_eq!(completed.data.output.as_ref(), Some(&output));
    h.finish().await;
}

/// The alternate-exchange policy the README gives operators, for this test's prefix; cleared
/// when dropped, whatever the test's outcome.
struct UnroutedPolicy(String);

impl UnroutedPolicy {
    fn set(h: &Harness) -> UnroutedPolicy {
        let name = format!("{}unrouted-events", h.settings.topology_prefix);
        let pattern = format!("^{}$", h.topology.events_exchange().replace('.', "\\."));
        let definition = format!(
            r#"{{"alternate-exchange":"{}"}}"#,
            h.topology.unrouted_events()
        );
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-q", "set_policy", &name, &pattern, &definition])
            .args(["--apply-to", "exchanges"])
            .status()
            .unwrap();
        assert!(status.success(), "rabbitmqctl set_policy");
        UnroutedPolicy(name)
    }
}

impl Drop for UnroutedPolicy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "clear_policy", &self.0])
            .status();
    }
}

/// An event published under a routing key no worker queue is bound for (a type misspelt by
/// the helpdesk) goes, through the operator's alternate-exchange policy, to the
/// unrouted-events queue; the worker dead-letters it there as `unroutable`, counted, with no
/// provider call. One of a type the worker reacts to came there while its queue was missing:
/// it is sent through the events exchange again and runs; should that keep failing, it is
/// dead-lettered too, and a replay sends it through the events exchange; the misspelt one
/// stays. One of a type no worker of the install reacts to is skipped, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_worker_queue_takes_is_resent_skipped_or_dead_lettered_as_unroutable() {
    let mut h = Harness::start().await;
    let provider = MockServer::start().await;
    let output = summary_output("Routed after all.");
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&output)))
        .mount(&provider)
        .await;
    h.set_org("org_a", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let _policy = UnroutedPolicy::set(&h);

    // Without the policy the broker drops it (the test's publish is mandatory, and would
    // come back unroutable).
    let misspelt = ticket_event("evt_misspelt", "org_a", "ticket.created");
    h.publish_raw(misspelt.to_string().as_bytes(), "ticket.create", None)
        .await;
    // What the alternate exchange receives while a deleted worker queue is not declared
    // again yet: sent again once the topology is declared again, it runs.
    h.delete_queue(&h.topology.worker_queue("summarize")).await;
    let unrouted = h.topology.unrouted_events();
    let windowed = ticket_event("evt_window", "org_a", "ticket.created").to_string();
    let mut message = Outgoing::new(&unrouted, "ticket.created", windowed.as_bytes())
        .header("traceparent", TRACEPARENT);
    message.content_type = "application/cloudevents+json";
    h.publish_message(&message).await;
    let (completed, delivery) = h
        .next_result(WAIT)
        .await
        .expect("the resent event's result");
    assert!(completed.is_completed());
    assert_eq!(completed.data.source_event_id, "evt_window");
    assert_eq!(
        header(&delivery, "traceparent").as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(h.counter("copilot_events_resent_total").await, 1.0);
    // The same, its resends spent (the topology could not be declared again).
    let spent = ticket_event("evt_spent", "org_a", "ticket.created").to_string();
    let mut message = Outgoing::new(&unrouted, "ticket.created", spent.as_bytes());
    message.headers.insert(
        copilot_workers::pipeline::RESENT_HEADER.into(),
        AMQPValue::LongLongInt(3),
    );
    h.publish_message(&message).await;
    // A type no worker of this install reacts to (it runs summarize alone): not wanted here,
    // and not a mistake either.
    h.publish(&ticket_event("evt_updated", "org_a", "ticket.updated"))
        .await;
    h.eventually(WAIT, "the updated event skipped", || async {
        h.counter(r#"copilot_events_skipped_total{worker="",reason="no_worker"}"#)
            .await
            == 1.0
    })
    .await;
    dead_letters_become(&h, 2).await;

    let mut letters = listed(&h).await;
    letters.sort_by_key(|letter| letter["event_id"].as_str().map(str::to_owned));
    assert_eq!(letters.len(), 2, "{letters:#?}");
    for (letter, (id, routing_key)) in letters.iter().zip([
        ("evt_misspelt", "ticket.create"),
        ("evt_spent", "ticket.created"),
    ]) {
        assert_eq!(letter["reason"], "unroutable", "{letter:#?}");
        assert_eq!(letter["worker"], Value::Null);
        assert_eq!(letter["event_id"], id);
        assert_eq!(letter["routing_key"], routing_key);
        assert!(
            letter["error"]
                .as_str()
                .is_some_and(|error| error.contains(routing_key)),
            "{letter:#?}"
        );
    }
    assert_eq!(
        h.counter(r#"copilot_events_dead_lettered_total{worker="",reason="unroutable"}"#)
            .await,
        2.0
    );
    assert_eq!(h.counter("copilot_events_resent_total").await, 1.0);
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
    let shown = h.cli(&["dead-letters", "list"]).await;
    assert!(
        said(&shown).contains("unroutable · worker none"),
        "{}",
        said(&shown)
    );
    dead_letters_become(&h, 2).await;

    let replayed = h
        .cli(&["dead-letters", "replay", "--reason", "unroutable"])
        .await;
    let text = said(&replayed);
    assert!(replayed.status.success(), "{text}");
    assert!(text.contains("replayed 1 dead letter(s)"), "{text}");
    assert!(text.contains("1 left: no worker to send them to"), "{text}");
    let (completed, _) = h
        .next_result(WAIT)
        .await
        .expect("the replayed run's result");
    assert!(completed.is_completed());
    assert_eq!(completed.data.source_event_id, "evt_spent");
    assert_eq!(completed.data.output.as_ref(), Some(&output));
    assert_eq!(provider.received_requests().await.unwrap().len(), 2);
    dead_letters_become(&h, 1).await;
    let left = listed(&h).await;
    assert_eq!(left[0]["event_id"], "evt_misspelt");
    h.finish().await;
}
