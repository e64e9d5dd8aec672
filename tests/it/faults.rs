//! Delivery guarantees under faults. The crash, outage and chaos tests publish N ≥ 500 events
//! and check that each has exactly one distinct result id and that none is missing; the others
//! follow a few events through one fault (a lapsed lease, a delay queue, exhausted retries, an
//! open breaker, bad input).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::skeleton::provider_for;
use crate::support::{
    Harness, Options, SeenResults, assert_exactly_once, completion, summary_output, ticket_event,
    unique,
};

const KEY: &str = "sk-fault-0123456789";
const N: usize = 500;
const ORGS: [&str; 10] = [
    "org_0", "org_1", "org_2", "org_3", "org_4", "org_5", "org_6", "org_7", "org_8", "org_9",
];

async fn configure_orgs(h: &Harness, url: &str) {
    for org in ORGS {
        h.set_org(org, url, KEY).await;
    }
}

/// A provider that answers every call with `answer`.
async fn provider_answering(answer: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(answer)
        .mount(&server)
        .await;
    server
}

/// A provider that answers every call with 503 (transient: retried, counted by the breaker).
async fn unavailable_provider() -> MockServer {
    provider_answering(ResponseTemplate::new(503)).await
}

/// Configures `org` on `provider` with a concurrency cap.
async fn set_capped_org(h: &Harness, org: &str, provider: &MockServer, cap: u32) {
    let mut config = crate::support::org_config(
        &h.keys,
        org,
        copilot_workers::provider::Profile::Openai,
        &format!("{}/v1", provider.uri()),
        Some(KEY),
    );
    config.max_concurrency = Some(cap);
    h.set_config(config).await;
}

/// A harness with `prefetch` (a quarter of it is the waiting room all orgs share) and one
/// org, `org_a`, capped at `cap` on a provider that answers after `latency`.
async fn one_capped_org(prefetch: u16, latency: Duration, cap: u32) -> (Harness, MockServer) {
    let h = Harness::with(Options {
        prefetch,
        ..Options::default()
    })
    .await;
    let server = steady_provider(latency).await;
    set_capped_org(&h, "org_a", &server, cap).await;
    (h, server)
}

/// A provider that answers after `latency`, slowly enough for a fault (or a second delivery)
/// to land mid-call.
async fn steady_provider(latency: Duration) -> MockServer {
    provider_answering(
        ResponseTemplate::new(200)
            .set_body_json(completion(&summary_output("steady")))
            .set_delay(latency),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing() {
    let mut h = Harness::with(Options {
        in_process: false,
        prefetch: 100,
        ..Options::default()
    })
    .await;
    let provider = steady_provider(Duration::from_millis(20)).await;
    configure_orgs(&h, &format!("{}/v1", provider.uri())).await;
    let ids = h.publish_many("kill", N, &ORGS).await;
    let mut first = h.spawn_binary();
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids[..N / 4], Duration::from_secs(60))
        .await;
    assert!(seen.len() >= N / 4, "the first process made progress");
    first.signal("-KILL");
    let _ = first.child.wait().await;
    let second = h.spawn_binary();
    h.collect(&mut seen, &ids, Duration::from_secs(90)).await;
    assert_exactly_once(&ids, &seen);
    second.signal("-TERM");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero_within_the_grace_period() {
    let mut h = Harness::with(Options {
        in_process: false,
        prefetch: 100,
        ..Options::default()
    })
    .await;
    let provider = steady_provider(Duration::from_millis(300)).await;
    configure_orgs(&h, &format!("{}/v1", provider.uri())).await;
    let ids = h.publish_many("term", N, &ORGS).await;
    let mut first = h.spawn_binary();
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids[..50], Duration::from_secs(60))
        .await;
    let stopping = Instant::now();
    first.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), first.child.wait())
        .await
        .expect("exits")
        .unwrap();
    let took = stopping.elapsed();
    let output = first.output.await.unwrap();
    assert!(status.success(), "exit status {status:?}\n{output}");
    assert!(
        took < h.settings.shutdown_grace + Duration::from_secs(3),
        "took {took:?}"
    );
    assert!(output.contains("draining"), "{output}");
    let second = h.spawn_binary();
    h.collect(&mut seen, &ids, Duration::from_secs(120)).await;
    assert_exactly_once(&ids, &seen);
    second.signal("-TERM");
    h.finish().await;
}

/// Closes this installation's broker connections (and only them) with rabbitmqctl.
pub fn close_broker_connections(prefix: &str) -> usize {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listing.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|line| {
        line.contains(&format!("copilot-workers consume {prefix}"))
            || line.contains(&format!("copilot-workers publish {prefix}"))
    }) {
        let pid = line.split('\t').next().unwrap_or_default();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "fault test"])
            .status()
            .unwrap();
        closed += usize::from(status.success());
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_closed_mid_run_lose_nothing() {
    let mut h = Harness::with(Options {
        prefetch: 100,
        ..Options::default()
    })
    .await;
    let provider = steady_provider(Duration::from_millis(10)).await;
    configure_orgs(&h, &format!("{}/v1", provider.uri())).await;
    let ids = h.publish_many("conn", N, &ORGS).await;
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids[..N / 5], Duration::from_secs(60))
        .await;
    let closed = close_broker_connections(&h.settings.topology_prefix);
    assert_eq!(closed, 2, "both of the service's connections were closed");
    h.collect(&mut seen, &ids, Duration::from_secs(120)).await;
    assert_exactly_once(&ids, &seen);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_terminated_mid_run_lose_nothing() {
    let mut h = Harness::with(Options {
        prefetch: 100,
        ..Options::default()
    })
    .await;
    let provider = steady_provider(Duration::from_millis(10)).await;
    configure_orgs(&h, &format!("{}/v1", provider.uri())).await;
    let ids = h.publish_many("pg", N, &ORGS).await;
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids[..N / 5], Duration::from_secs(60))
        .await;
    let (admin, driver) = tokio_postgres::connect(
        &format!("{}/postgres", crate::support::PG_SERVER),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(driver);
    let mut terminated = 0;
    for _ in 0..3 {
        let rows = admin
            .query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&h.database])
            .await
            .unwrap();
        terminated += rows.len();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        terminated > 0,
        "some of the worker's connections were terminated"
    );
    h.collect(&mut seen, &ids, Duration::from_secs(120)).await;
    assert_exactly_once(&ids, &seen);
    h.finish().await;
}

/// Cycles through the ways a provider misbehaves, then answers.
struct Chaos {
    calls: AtomicUsize,
}

impl Respond for Chaos {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        // Half the answers are failures of one kind or another.
        match self.calls.fetch_add(1, Ordering::SeqCst) % 10 {
            0 => ResponseTemplate::new(500),
            2 => ResponseTemplate::new(429).insert_header("retry-after", "1"),
            4 => ResponseTemplate::new(200)
                .set_body_json(completion(&summary_output("slow")))
                .set_delay(Duration::from_millis(1500)),
            6 => ResponseTemplate::new(200).set_body_string("<html>502 Bad Gateway</html>"),
            8 => ResponseTemplate::new(503).insert_header("retry-after-ms", "200"),
            _ => ResponseTemplate::new(200).set_body_json(completion(&summary_output("finally"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_provider_yields_exactly_one_result_per_event() {
    let mut h = Harness::with(Options {
        prefetch: 200,
        max_attempts: 8,
        provider_timeout_secs: 1,
        ..Options::default()
    })
    .await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(Chaos {
            calls: AtomicUsize::new(0),
        })
        .mount(&server)
        .await;
    configure_orgs(&h, &format!("{}/v1", server.uri())).await;
    let ids = h.publish_many("chaos", N, &ORGS).await;
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids, Duration::from_secs(240)).await;
    assert_exactly_once(&ids, &seen);
    let retries = h
        .counter("copilot_provider_retries_total{class=\"provider_unavailable\"}")
        .await
        + h.counter("copilot_provider_retries_total{class=\"provider_rate_limited\"}")
            .await;
    assert!(retries > 0.0, "the chaos was retried");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_is_called_once_for_an_event_delivered_three_times() {
    let mut h = Harness::start().await;
    let server = steady_provider(Duration::from_millis(300)).await;
    h.set_org("org_a", &format!("{}/v1", server.uri()), KEY)
        .await;
    let event = ticket_event("evt_thrice", "org_a", "ticket.created");
    for _ in 0..3 {
        h.publish(&event).await;
    }
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let (_, delivery) = h
            .next_result(Duration::from_secs(20))
            .await
            .expect("a result for each delivery");
        bodies.push(delivery.data);
    }
    assert!(
        bodies.iter().all(|body| body == &bodies[0]),
        "the same result, byte for byte, each time"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    // And once more, later, from the ledger: still the same bytes.
    h.publish(&event).await;
    let (_, again) = h.next_result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(again.data, bodies[0]);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    h.finish().await;
}

/// A provider call that outlives the claim's lease: the claim is renewed while the call runs,
/// so a second delivery of the event waits for the first one's result instead of taking the
/// lapsed claim over and calling the provider again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_outliving_the_claim_lease_is_made_once() {
    let lease = copilot_workers::pipeline::claim::CLAIM_LEASE;
    let mut h = Harness::with(Options {
        provider_timeout_secs: 60,
        ..Options::default()
    })
    .await;
    let server = steady_provider(lease + Duration::from_secs(6)).await;
    h.set_org("org_a", &format!("{}/v1", server.uri()), KEY)
        .await;
    let event = ticket_event("evt_long_call", "org_a", "ticket.created");
    h.publish(&event).await;
    h.publish(&event).await;
    let wait = lease + Duration::from_secs(30);
    let (_, first) = h.next_result(wait).await.expect("the first result");
    let (_, second) = h
        .next_result(wait)
        .await
        .expect("the second delivery's result");
    assert_eq!(first.data, second.data, "the recorded result, republished");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_provider_does_not_delay_other_orgs() {
    let mut h = Harness::with(Options {
        prefetch: 100,
        provider_timeout_secs: 3,
        ..Options::default()
    })
    .await;
    let hanging = provider_answering(
        ResponseTemplate::new(200)
            .set_body_json(completion(&summary_output("late")))
            .set_delay(Duration::from_secs(60)),
    )
    .await;
    let healthy = provider_for(KEY, &summary_output("on time")).await;
    set_capped_org(&h, "org_slow", &hanging, 4).await;
    h.set_org("org_fast", &format!("{}/v1", healthy.uri()), KEY)
        .await;
    for n in 0..150 {
        h.publish(&ticket_event(
            &format!("evt_slow_{n}"),
            "org_slow",
            "ticket.created",
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for n in 0..30 {
        h.publish(&ticket_event(
            &format!("evt_fast_{n}"),
            "org_fast",
            "ticket.created",
        ))
        .await;
    }
    let mut fast = 0;
    while fast < 30 {
        let (result, _) = h
            .next_result(Duration::from_secs(10))
            .await
            .expect("org_fast's results keep coming");
        if result.data.org_id == "org_fast" {
            assert!(result.is_completed());
            fast += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "org_fast took {:?}",
        started.elapsed()
    );
    let deferred = h
        .counter("copilot_events_parked_total{worker=\"summarize\",reason=\"org_busy\"}")
        .await;
    assert!(deferred > 0.0, "org_slow's excess was deferred, not held");
    h.finish().await;
}

/// An event deferred to a delay queue (its org at its cap, with its waiting room full) is
/// acked, waits out the queue's TTL in the broker, is dead-lettered back to its worker queue,
/// and completes: the durable round trip that parked provider back-offs take too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_event_comes_back_from_its_delay_queue_and_completes() {
    // A prefetch of 3 leaves no shared waiting room (a quarter of it): with one call in
    // flight and one event waiting, a third is deferred.
    let (mut h, server) = one_capped_org(3, Duration::from_secs(2), 1).await;
    let published = Instant::now();
    h.publish_many("deferred", 3, &["org_a"]).await;
    let mut last = Duration::ZERO;
    for _ in 0..3 {
        let (result, _) = h
            .next_result(Duration::from_secs(20))
            .await
            .expect("every event completes");
        assert!(result.is_completed(), "{result:?}");
        last = published.elapsed();
    }
    let step = Duration::from_secs(copilot_workers::broker::topology::DELAY_STEPS_SECS[0]);
    assert!(
        last >= step,
        "the last result came after {last:?}, before the delay queue's TTL"
    );
    let deferred = h
        .counter("copilot_events_parked_total{worker=\"summarize\",reason=\"org_busy\"}")
        .await;
    assert_eq!(deferred, 1.0);
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    h.finish().await;
}

/// Shutdown starts no provider call: the run in flight finishes, and the events waiting at
/// their org's gate are parked (not each given a call during the drain), keeping any turn
/// they carry, for the next process, which completes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_parks_the_events_waiting_at_the_gate_and_starts_no_call() {
    // One call at a time: the others wait at the gate. The shutdown grace is 5 s.
    let (mut h, server) = one_capped_org(48, Duration::from_millis(1500), 1).await;
    let mut ids = h.publish_many("drain", 5, &["org_a"]).await;
    let in_flight = |n: usize| {
        let (h, server) = (&h, &server);
        async move {
            h.eventually(
                Duration::from_secs(10),
                "a call and the rest waiting",
                || async {
                    let page = h.metrics().await;
                    let requests = server.received_requests().await.unwrap_or_default().len();
                    let events = copilot_workers::telemetry::EVENTS_IN_FLIGHT;
                    requests == 1 && crate::support::metric_value(&page, events) == n as f64
                },
            )
            .await;
        }
    };
    in_flight(5).await;
    // A sixth, back from an earlier deferral with its turn.
    let turn_ms = i64::try_from(
        (std::time::SystemTime::now() + Duration::from_secs(60))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let body = ticket_event("evt_drain_turn", "org_a", "ticket.created").to_string();
    let exchange = h.topology.events_exchange();
    let mut message =
        copilot_workers::broker::Outgoing::new(&exchange, "ticket.created", body.as_bytes());
    message.content_type = "application/cloudevents+json";
    message.headers.insert(
        copilot_workers::pipeline::TURN_HEADER.into(),
        lapin::types::AMQPValue::LongLongInt(turn_ms),
    );
    h.publish_message(&message).await;
    ids.push("evt_drain_turn".to_owned());
    let n = ids.len();
    in_flight(n).await;
    h.stop_service().await;
    // Without the rule, the drain gave each waiting event its call until the grace period
    // ended: four or five calls.
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    let delay_queue = h.topology.delay_queue(
        "summarize",
        copilot_workers::broker::topology::DELAY_STEPS_SECS[0],
    );
    let parked = h.peek_all(&delay_queue).await;
    assert_eq!(parked.len(), n - 1);
    // The one that carried a turn keeps it; the others carry none.
    for delivery in &parked {
        let turn = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(copilot_workers::pipeline::TURN_HEADER));
        let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        match event["id"].as_str() {
            Some("evt_drain_turn") => {
                assert_eq!(turn, Some(&lapin::types::AMQPValue::LongLongInt(turn_ms)))
            }
            _ => assert_eq!(turn, None, "{event}"),
        }
    }
    let (drained, _) = h
        .next_result(Duration::from_secs(5))
        .await
        .expect("the run in flight was drained");
    let mut seen = SeenResults::new();
    seen.entry(drained.data.source_event_id.clone())
        .or_default()
        .insert(drained.id.clone());
    let next = h.spawn_binary();
    h.collect(&mut seen, &ids, Duration::from_secs(30)).await;
    assert_exactly_once(&ids, &seen);
    assert_eq!(server.received_requests().await.unwrap().len(), n);
    next.signal("-TERM");
    h.finish().await;
}

/// An org's backlog beyond its own waiting room waits in the room all orgs share (a quarter
/// of the prefetch) instead of cycling through the delay queue every 5 s, and an event
/// deferred at the gate costs no ledger statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orgs_backlog_waits_in_the_shared_room_instead_of_cycling_through_delay_queues() {
    let (mut h, _server) = one_capped_org(48, Duration::from_millis(300), 2).await;
    let n = 30;
    let ids = h.publish_many("backlog", n, &["org_a"]).await;
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids, Duration::from_secs(60)).await;
    assert_exactly_once(&ids, &seen);
    // 2 calls, 2 in the org's own room and 12 in the shared one: 14 deferred once, and back
    // after 5 s to a gate that has room for all. Without the shared room every wave of
    // returning events found 4 places: ≈100 deferrals.
    let deferred = h
        .counter("copilot_events_parked_total{worker=\"summarize\",reason=\"org_busy\"}")
        .await;
    assert!(deferred > 0.0, "the backlog exceeded the rooms");
    assert!(deferred < n as f64, "{deferred} deferrals for {n} events");
    let starts = h
        .counter("copilot_step_duration_seconds_count{step=\"start\"}")
        .await;
    assert_eq!(
        starts, n as f64,
        "one ledger start per event, none for a deferral"
    );
    h.finish().await;
}

/// A backlog longer than the shortest delay queue is paced: each deferred event is given a
/// turn by its org's recent call time and parked in the longest delay queue that brings it
/// back by then (carrying its turn), instead of all of it coming back every 5 s. Every event
/// still completes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orgs_long_backlog_is_paced_through_the_longer_delay_queues() {
    // A prefetch of 48 leaves a shared room of 12: with a call and one waiting, room for
    // the 12 turns that come back with each 5 s wave.
    let (mut h, server) = one_capped_org(48, Duration::from_millis(400), 1).await;
    // A first call sets the org's pace: one call per ≈0.4 s.
    let mut ids = h.publish_many("paced_first", 1, &["org_a"]).await;
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids, Duration::from_secs(10)).await;
    let n = 100;
    ids.extend(h.publish_many("paced", n, &["org_a"]).await);
    // Fourteen are held; the turns of the others start about 6 s away, one per call: from
    // about the 60th on they are 30 s away or more.
    let longer = h.topology.delay_queue("summarize", 30);
    h.eventually(
        Duration::from_secs(15),
        "events waiting for their turn in the 30 s queue",
        || async { h.queue_depth(&longer).await > 0 },
    )
    .await;
    let parked_longer = h.queue_depth(&longer).await;
    assert!(
        (20..=50).contains(&parked_longer),
        "{parked_longer} in the 30 s queue"
    );
    h.collect(&mut seen, &ids, Duration::from_secs(90)).await;
    assert_exactly_once(&ids, &seen);
    assert_eq!(server.received_requests().await.unwrap().len(), n + 1);
    h.finish().await;
}

/// A provider that keeps failing with transient errors: the event is tried exactly
/// `max_attempts` times in process, then gets a failed result (`retries_exhausted`) and is
/// dead-lettered with that reason, its original body intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_publish_a_failed_result_and_a_dead_letter() {
    let mut h = Harness::start().await; // max_attempts: 3
    let server = unavailable_provider().await;
    h.set_org("org_a", &format!("{}/v1", server.uri()), KEY)
        .await;
    let event = ticket_event("evt_exhausted", "org_a", "ticket.created");
    h.publish(&event).await;
    let (result, _) = h
        .next_result(Duration::from_secs(20))
        .await
        .expect("a failed result");
    assert!(!result.is_completed());
    let error = result.data.error.as_ref().expect("an error");
    assert_eq!(error.class, "retries_exhausted");
    assert_eq!(result.data.attempts, 3);
    let dead = h.wait_dead_letters(1, Duration::from_secs(20)).await;
    assert_eq!(
        crate::support::header(&dead[0], "x-copilot-reason").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(dead[0].data, event.to_string().into_bytes());
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    let counted =
        "copilot_events_dead_lettered_total{worker=\"summarize\",reason=\"retries_exhausted\"}";
    h.counter_reaches(
        Duration::from_secs(20),
        "the dead letter to be counted",
        counted,
        1.0,
    )
    .await;

    // The same event again, as a redelivery after a crash between the result and its dead
    // letter would bring it: the ledger answers with the recorded failed result, no call,
    // and the dead letter is made again, so that it cannot be lost in that window.
    h.publish(&event).await;
    let (again, _) = h
        .next_result(Duration::from_secs(20))
        .await
        .expect("the recorded result again");
    assert_eq!(again.id, result.id);
    let dead = h.wait_dead_letters(1, Duration::from_secs(20)).await;
    assert_eq!(
        crate::support::header(&dead[0], "x-copilot-reason").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    h.finish().await;
}

/// A provider asking for a wait longer than the in-process cap (20 s): the event is not held
/// in a consumer slot but parked, acked, in the delay queue that covers the wait, carrying the
/// attempts it already spent (so that attempts stay bounded across parks); no result yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_parks_the_event_in_a_delay_queue() {
    let mut h = Harness::start().await;
    let server =
        provider_answering(ResponseTemplate::new(429).insert_header("retry-after", "25")).await;
    h.set_org("org_a", &format!("{}/v1", server.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_backoff", "org_a", "ticket.created"))
        .await;
    let delay_queue = h.topology.delay_queue("summarize", 30);
    h.eventually(
        Duration::from_secs(20),
        "the event in the 30 s delay queue",
        || async { h.queue_depth(&delay_queue).await == 1 },
    )
    .await;
    let parked = "copilot_events_parked_total{worker=\"summarize\",reason=\"provider_backoff\"}";
    assert_eq!(h.counter(parked).await, 1.0);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert_eq!(
        h.queue_depth(&h.topology.worker_queue("summarize")).await,
        0
    );
    assert!(h.next_result(Duration::from_millis(500)).await.is_none());
    // The parked copy is the event itself, with the attempts it already spent.
    let copies = h.take_all(&delay_queue).await;
    assert_eq!(copies.len(), 1);
    let event: serde_json::Value = serde_json::from_slice(&copies[0].data).unwrap();
    assert_eq!(event["id"], "evt_backoff");
    let headers = copies[0].properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers
            .inner()
            .get(copilot_workers::pipeline::ATTEMPTS_HEADER),
        Some(&lapin::types::AMQPValue::LongLongInt(1))
    );
    h.finish().await;
}

/// After five consecutive transient failures an org's breaker opens: its next events are
/// deferred to a delay queue without a request, and another org is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_defers_an_orgs_events_without_calling_its_provider() {
    let mut h = Harness::with(Options {
        max_attempts: 1,
        ..Options::default()
    })
    .await;
    let down = unavailable_provider().await;
    let up = provider_for(KEY, &summary_output("up")).await;
    h.set_org("org_down", &format!("{}/v1", down.uri()), KEY)
        .await;
    h.set_org("org_up", &format!("{}/v1", up.uri()), KEY).await;
    // One at a time, so that exactly five failures precede the rest.
    for n in 0..5 {
        h.publish(&ticket_event(
            &format!("evt_down_{n}"),
            "org_down",
            "ticket.created",
        ))
        .await;
        let (result, _) = h.next_result(Duration::from_secs(20)).await.unwrap();
        assert_eq!(result.data.error.unwrap().class, "retries_exhausted");
    }
    h.publish_many("down_later", 3, &["org_down"]).await;
    h.publish(&ticket_event("evt_up", "org_up", "ticket.created"))
        .await;
    let (result, _) = h.next_result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(result.data.org_id, "org_up");
    assert!(result.is_completed());
    let parked = "copilot_events_parked_total{worker=\"summarize\",reason=\"circuit_open\"}";
    h.counter_reaches(
        Duration::from_secs(20),
        "three deferred events",
        parked,
        3.0,
    )
    .await;
    assert_eq!(down.received_requests().await.unwrap().len(), 5);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason() {
    let mut h = Harness::start().await;
    let provider = provider_for(KEY, &summary_output("good")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let good = ticket_event("evt_ok", "org_acme", "ticket.created");
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut value = good.clone();
        f(&mut value);
        value.to_string().into_bytes()
    };
    let huge = with(&|v| v["data"]["ticket"]["messages"][0]["body"] = json!("x".repeat(1_100_000)));
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("not_json", b"{this is not json".to_vec(), None),
        ("not_utf8", vec![0x7b, 0xff, 0xfe, 0x7d], None),
        ("not_object", b"[1, 2, 3]".to_vec(), None),
        (
            "wrong_specversion",
            with(&|v| v["specversion"] = json!("0.3")),
            None,
        ),
        (
            "missing_field",
            with(&|v| {
                v.as_object_mut().unwrap().remove("id");
            }),
            None,
        ),
        (
            "missing_field",
            with(&|v| {
                v.as_object_mut().unwrap().remove("source");
            }),
            None,
        ),
        (
            "missing_field",
            with(&|v| {
                v.as_object_mut().unwrap().remove("type");
            }),
            None,
        ),
        (
            "missing_field",
            with(&|v| {
                v.as_object_mut().unwrap().remove("data");
            }),
            None,
        ),
        (
            "unknown_type",
            with(&|v| v["type"] = json!("ticket.deleted")),
            None,
        ),
        (
            "missing_org",
            with(&|v| {
                v["data"].as_object_mut().unwrap().remove("org_id");
            }),
            None,
        ),
        (
            "missing_org",
            with(&|v| v["data"]["org_id"] = json!("  ")),
            None,
        ),
        (
            "missing_ticket",
            with(&|v| {
                v["data"].as_object_mut().unwrap().remove("ticket");
            }),
            None,
        ),
        (
            "missing_ticket",
            with(&|v| v["data"]["ticket"] = json!("T-1")),
            None,
        ),
        (
            "invalid_field",
            with(&|v| v["data"]["ticket"]["tags"] = json!("billing")),
            None,
        ),
        (
            "invalid_field",
            with(&|v| v["data"]["ticket"]["messages"] = json!({"m1": "hi"})),
            None,
        ),
        ("invalid_field", with(&|v| v["id"] = json!(42)), None),
        (
            "missing_field",
            with(&|v| v["data"]["ticket"]["id"] = json!("")),
            None,
        ),
        ("oversized", huge, None),
        (
            "wrong_content_type",
            good.to_string().into_bytes(),
            Some("text/plain"),
        ),
        ("not_json", Vec::new(), None),
    ];
    for (_, body, content_type) in &cases {
        h.publish_raw(
            body,
            "ticket.created",
            Some(content_type.unwrap_or("application/cloudevents+json")),
        )
        .await;
    }
    h.publish(&good).await;
    let results = h.results(1, Duration::from_secs(20)).await;
    assert_eq!(
        results[0].data.source_event_id, "evt_ok",
        "the worker keeps running"
    );
    let dead = h
        .wait_dead_letters(cases.len(), Duration::from_secs(20))
        .await;
    let mut got: Vec<String> = dead
        .iter()
        .map(|d| crate::support::header(d, "x-copilot-reason").unwrap_or_default())
        .collect();
    let mut expected: Vec<String> = cases
        .iter()
        .map(|(reason, _, _)| reason.to_string())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert!(
        dead.iter()
            .all(|d| crate::support::header(d, "x-copilot-error").is_some_and(|e| !e.is_empty()))
    );
    for (reason, _, _) in &cases {
        let line = format!(
            "copilot_events_dead_lettered_total{{worker=\"summarize\",reason=\"{reason}\"}}"
        );
        assert!(h.counter(&line).await >= 1.0, "{line}");
    }
    // Nothing loops: the input queue is empty once the service has stopped.
    h.stop_service().await;
    assert_eq!(
        h.queue_depth(&h.topology.worker_queue("summarize")).await,
        0
    );
    h.finish().await;
}

/// The batched ledger against a real Postgres: many concurrent runs share statements, a
/// duplicate start is refused the claim, a second record of a decided event gets the first
/// result back (not its own), and each run's usage is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batched_ledger_keeps_first_results_and_single_claims() {
    use copilot_workers::store::ledger::{Ledger, LedgerEntry, RunRequest, UsageRecord};

    let h = Harness::start().await;
    let ledger = Ledger::start(&h.store, Duration::from_secs(15));
    let org = unique("org_batch");
    let request = |i: usize, holder: &str| RunRequest {
        event_id: format!("evt_{org}_{i}"),
        worker: "summarize".into(),
        org_id: org.clone(),
        ticket_id: format!("T-{i}"),
        holder: holder.into(),
    };
    let entry = |i: usize, text: &str| LedgerEntry {
        event_id: format!("evt_{org}_{i}"),
        worker: "summarize".into(),
        org_id: org.clone(),
        ticket_id: format!("T-{i}"),
        result_id: format!("res_{i}"),
        outcome: "completed".into(),
        input_hash: Some(format!("hash_{i}")),
        result: serde_json::json!({ "text": text }).to_string(),
    };
    let usage = UsageRecord {
        model: "m".into(),
        requests: 1,
        prompt_tokens: 10,
        completion_tokens: 5,
    };

    let text_of = |entry: &LedgerEntry| -> String {
        let value: serde_json::Value = serde_json::from_str(&entry.result).unwrap();
        value["text"].as_str().unwrap().to_owned()
    };

    // 300 runs at once, and a second holder for each of the first 50.
    let mut starts = Vec::new();
    for i in 0..300 {
        let ledger = ledger.clone();
        let first = request(i, "first-1");
        starts.push(tokio::spawn(async move { ledger.begin_run(first).await }));
    }
    let mut rivals = Vec::new();
    for i in 0..50 {
        let ledger = ledger.clone();
        let rival = request(i, "rival-1");
        rivals.push(tokio::spawn(async move { ledger.begin_run(rival).await }));
    }
    let mut claimed = 0;
    for start in starts.into_iter().chain(rivals) {
        let start = start.await.unwrap().expect("begin_run");
        assert!(start.decided.is_none());
        claimed += usize::from(start.claimed);
    }
    assert_eq!(claimed, 300, "exactly one holder per event gets the claim");

    // Record all 300 concurrently, then record the first 50 again with another text.
    let mut records = Vec::new();
    for i in 0..300 {
        let ledger = ledger.clone();
        let (e, u) = (entry(i, "first"), usage.clone());
        records.push(tokio::spawn(
            async move { ledger.record_result(e, u).await },
        ));
    }
    for record in records {
        assert_eq!(text_of(&record.await.unwrap().unwrap()), "first");
    }
    for i in 0..50 {
        let standing = ledger
            .record_result(entry(i, "second"), usage.clone())
            .await
            .unwrap();
        assert_eq!(
            text_of(&standing),
            "first",
            "the first recorded result stands"
        );
    }
    // A redelivery now finds the decided result and the ticket's last input hash.
    let again = ledger.begin_run(request(7, "late-1")).await.unwrap();
    assert_eq!(text_of(&again.decided.unwrap()), "first");
    // A new event of ticket 7, taken by `holder`.
    let new_event = |holder: &str| RunRequest {
        event_id: format!("evt_{org}_new"),
        ..request(7, holder)
    };
    let next = ledger.begin_run(new_event("late-1")).await.unwrap();
    assert!(next.decided.is_none() && next.claimed);
    assert_eq!(next.last_completed_hash.as_deref(), Some("hash_7"));
    // A claim is renewed only while its holder holds it.
    let lease = Duration::from_secs(15);
    let held = |holder: &str| {
        vec![(
            format!("evt_{org}_new"),
            "summarize".to_owned(),
            holder.to_owned(),
        )]
    };
    assert_eq!(
        h.store.renew_claims(&held("late-1"), lease).await.unwrap(),
        vec!["late-1".to_owned()]
    );
    assert!(
        h.store
            .renew_claims(&held("other-1"), lease)
            .await
            .unwrap()
            .is_empty(),
        "another holder's claim is not touched"
    );
    // A lapsed claim is purged, and then another holder may take the event.
    h.store
        .renew_claims(&held("late-1"), Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(h.store.purge_lapsed_claims().await.unwrap() >= 1);
    let taken = ledger.begin_run(new_event("other-1")).await.unwrap();
    assert!(taken.claimed, "the lapsed claim no longer holds the event");
    // Usage counted once per recorded run, not per attempt to record.
    let rows = h.store.usage(&org, "2000-01-01").await.unwrap();
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 300);
    h.finish().await;
}
