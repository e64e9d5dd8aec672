//! What operators see: metrics that move by exactly what happened, readiness that follows the
//! broker, trace context passed through, and a metrics page Prometheus' own tool accepts.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::faults::close_broker_connections;
use crate::skeleton::provider_for;
use crate::support::{
    AMQP_URL, Harness, Options, header, spawn, summary_output, ticket_event, unique,
};

const KEY: &str = "sk-ops-0123456789";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_counter_moves_by_exactly_what_happened() {
    let mut h = Harness::start().await;
    let provider = provider_for(KEY, &summary_output("counted")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    for n in 0..3 {
        h.publish(&ticket_event(
            &format!("evt_ok_{n}"),
            "org_acme",
            "ticket.created",
        ))
        .await;
    }
    for n in 0..2 {
        h.publish(&ticket_event(
            &format!("evt_skip_{n}"),
            "org_nobody",
            "ticket.message_added",
        ))
        .await;
    }
    for _ in 0..4 {
        h.publish_raw(b"not json", "ticket.created", None).await;
    }
    h.results(3, WAIT).await;
    h.wait_dead_letters(4, WAIT).await;
    let skipped = "copilot_events_skipped_total{worker=\"summarize\",reason=\"no_config\"}";
    h.counter_reaches(WAIT, "the skips", skipped, 2.0).await;
    let page = h.metrics().await;
    let value = |line: &str| crate::support::metric_value(&page, line);
    let expected = [
        (
            "copilot_events_received_total{worker=\"summarize\",type=\"ticket.created\"}",
            3.0,
        ),
        (
            "copilot_events_received_total{worker=\"summarize\",type=\"ticket.message_added\"}",
            2.0,
        ),
        (
            "copilot_events_skipped_total{worker=\"summarize\",reason=\"no_config\"}",
            2.0,
        ),
        (
            "copilot_events_dead_lettered_total{worker=\"summarize\",reason=\"not_json\"}",
            4.0,
        ),
        (
            "copilot_results_published_total{worker=\"summarize\",outcome=\"completed\"}",
            3.0,
        ),
        (
            "copilot_provider_requests_total{profile=\"openai\",outcome=\"ok\",status_class=\"2xx\"}",
            3.0,
        ),
        (
            "copilot_tokens_total{worker=\"summarize\",kind=\"prompt\"}",
            360.0,
        ),
        (
            "copilot_tokens_total{worker=\"summarize\",kind=\"completion\"}",
            120.0,
        ),
        (
            "copilot_worker_overhead_seconds_count{worker=\"summarize\"}",
            3.0,
        ),
        (
            "copilot_provider_latency_seconds_count{profile=\"openai\"}",
            3.0,
        ),
        ("copilot_events_in_flight", 0.0),
    ];
    for (line, want) in expected {
        assert_eq!(value(line), want, "{line}\n{page}");
    }
    assert_eq!(
        value("copilot_results_published_total{worker=\"summarize\",outcome=\"failed\"}"),
        0.0
    );
    assert!(
        !page.contains("org_acme") && !page.contains("org_nobody"),
        "no org id in labels"
    );
    assert!(
        page.contains("# HELP copilot_worker_overhead_seconds"),
        "metrics are described"
    );
    h.finish().await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .arg("-q")
        .status()
        .unwrap();
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// The container image's HEALTHCHECK, run as Docker would run it (its exec form, as written
/// in `ops/Dockerfile`) against a live service: healthy while it serves `/healthz`, unhealthy
/// once it stopped. (Its first version ran under Debian's sh, which has no `/dev/tcp`, and
/// so failed always.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_health_check_passes_while_the_service_runs() {
    let dockerfile = std::fs::read_to_string("ops/Dockerfile").unwrap();
    let exec = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("HEALTHCHECK "))
        .and_then(|rest| rest.split_once(" CMD "))
        .map(|(_, exec)| exec)
        .expect("a HEALTHCHECK ... CMD [...] line");
    let words: Vec<String> = serde_json::from_str(exec).expect("the exec (JSON) form");
    let h = Harness::start().await;
    let port = h.http_addr.port().to_string();
    let check = |words: &[String]| {
        std::process::Command::new(&words[0])
            .args(words[1..].iter().map(|word| word.replace("9464", &port)))
            .output()
            .unwrap()
    };
    let healthy = check(&words);
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    h.finish().await;
    assert!(
        !check(&words).status.success(),
        "healthy with nothing listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_connection() {
    // A vhost of its own, so blocking reconnections here cannot disturb other tests.
    let vhost = unique("cwvhost");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = AMQP_URL.replace("%2f", &vhost);
    let h = Harness::with(Options {
        amqp_url: url,
        ..Options::default()
    })
    .await;
    let ready = format!("http://{}/readyz", h.http_addr);
    let status = || async {
        reqwest::get(&ready)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(status().await, 200);

    rabbitmqctl(&["set_vhost_limits", "-p", &vhost, "{\"max-connections\": 0}"]);
    assert_eq!(close_broker_connections(&h.settings.topology_prefix), 2);
    h.eventually(WAIT, "/readyz to turn 503", || async {
        status().await == 503
    })
    .await;
    let body = reqwest::get(&ready).await.unwrap().text().await.unwrap();
    assert!(body.contains("broker"), "{body}");
    assert_eq!(
        reqwest::get(format!("http://{}/healthz", h.http_addr))
            .await
            .unwrap()
            .status(),
        200
    );

    rabbitmqctl(&[
        "set_vhost_limits",
        "-p",
        &vhost,
        "{\"max-connections\": -1}",
    ]);
    h.eventually(Duration::from_secs(90), "/readyz to recover", || async {
        status().await == 200
    })
    .await;
    h.finish().await;
    rabbitmqctl(&["delete_vhost", &vhost]);
}

/// An operator deletes the results exchange, then a worker queue, under a running worker:
/// the worker declares its topology again by itself. No result is stranded unacked and new
/// events are consumed again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_deleted_under_a_running_worker_is_declared_again() {
    let h = Harness::start().await;
    let provider = provider_for(KEY, &summary_output("healed")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    // The test's own results queue is bound to the exchange and goes with it: results land
    // in the unrouted-results queue once the exchange is back, as for any unbound result.
    let unrouted = h.topology.unrouted_results();
    let result_of = |event: &'static str| {
        let h = &h;
        let unrouted = unrouted.clone();
        async move {
            h.eventually(WAIT, &format!("the result of {event}"), || async {
                h.queue_depth(&unrouted).await > 0
            })
            .await;
            let taken = h.take_all(&unrouted).await;
            assert_eq!(taken.len(), 1);
            let result: serde_json::Value = serde_json::from_slice(&taken[0].data).unwrap();
            assert_eq!(result["data"]["source_event_id"], event);
        }
    };

    h.delete_exchange(&h.topology.results_exchange()).await;
    h.publish(&ticket_event(
        "evt_no_exchange",
        "org_acme",
        "ticket.created",
    ))
    .await;
    result_of("evt_no_exchange").await;
    let worker_queue = h.topology.worker_queue("summarize");
    h.eventually(WAIT, "the delivery to be acked", || async {
        h.queue_depth(&worker_queue).await == 0
            && h.counter(
                "copilot_results_published_total{worker=\"summarize\",outcome=\"completed\"}",
            )
            .await
                == 1.0
    })
    .await;

    h.delete_queue(&worker_queue).await;
    // Consumed again, not only declared: the queue exists a moment before it is bound to
    // the events exchange, and an event published then would come back unroutable.
    h.eventually(
        WAIT,
        "the worker queue to be declared and consumed again",
        || async {
            h.queue_exists(&worker_queue).await && h.queue_consumers(&worker_queue).await == 1
        },
    )
    .await;
    h.publish(&ticket_event("evt_no_queue", "org_acme", "ticket.created"))
        .await;
    result_of("evt_no_queue").await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 2);
    h.finish().await;
}

/// Another client deletes a worker queue and declares it again at once, as a script
/// "resetting" it would. RabbitMQ 3.10 then leaves the worker's consumer attached to nothing:
/// no cancel, and the broker goes on sending it deliveries the worker never sees, held until
/// its channel closes. The idle consumer is attached again on a new channel and the old one
/// closed, so the event it held is processed, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_to_a_consumer_attached_to_nothing_come_back_when_it_is_renewed() {
    let mut h = Harness::with(Options {
        idle_consumer_renew_secs: 2,
        ..Default::default()
    })
    .await;
    let provider = provider_for(KEY, &summary_output("fed again")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_before", "org_acme", "ticket.created"))
        .await;
    let (result, _) = h
        .next_result(WAIT)
        .await
        .expect("a result before the reset");
    assert_eq!(result.data.source_event_id, "evt_before");

    h.delete_and_declare_at_once("summarize").await;
    let renewed_before = h.counter("copilot_consumers_renewed_total").await;
    h.publish(&ticket_event("evt_held", "org_acme", "ticket.created"))
        .await;
    let (result, _) = h
        .next_result(WAIT)
        .await
        .expect("the event the broker sent the stranded consumer is processed");
    assert_eq!(result.data.source_event_id, "evt_held");
    assert!(
        h.counter("copilot_consumers_renewed_total").await > renewed_before,
        "the result came after a renewal"
    );
    assert!(h.next_result(Duration::from_secs(1)).await.is_none());
    assert_eq!(provider.received_requests().await.unwrap().len(), 2);
    h.finish().await;
}

/// Queue arguments are fixed once declared: a changed delivery limit stops the start with
/// what to do, not only the broker's complaint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_delivery_limit_is_refused_at_start_with_what_to_do() {
    let h = Harness::start().await;
    let changed = (h.settings.delivery_limit + 1).to_string();
    let output = tokio::time::timeout(
        WAIT,
        h.binary_command()
            .env("COPILOT_DELIVERY_LIMIT", &changed)
            .output(),
    )
    .await
    .expect("the service stops at once")
    .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("inequivalent arg 'x-delivery-limit'"),
        "{said}"
    );
    assert!(said.contains("use a RabbitMQ policy"), "{said}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_travels_from_the_event_to_its_result_and_dead_letter() {
    let mut h = Harness::start().await;
    let provider = provider_for(KEY, &summary_output("traced")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = ticket_event("evt_traced", "org_acme", "ticket.created").to_string();
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(traceparent.as_bytes().to_vec())),
    );
    let exchange = h.topology.events_exchange();
    let mut message =
        copilot_workers::broker::Outgoing::new(&exchange, "ticket.created", body.as_bytes());
    message.headers = headers;
    h.publish_message(&message).await;
    let (_, delivery) = h.next_result(WAIT).await.expect("a result");
    let carried = header(&delivery, "traceparent").expect("traceparent on the result");
    assert_eq!(
        &carried[3..35],
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "same trace id"
    );

    // Bad input keeps its trace in its dead letter.
    let mut bad = copilot_workers::broker::Outgoing::new(&exchange, "ticket.created", b"{oops");
    bad.headers = message.headers.clone();
    h.publish_message(&bad).await;
    let dead = h.wait_dead_letters(1, WAIT).await;
    assert_eq!(
        header(&dead[0], "traceparent").as_deref(),
        Some(traceparent)
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_page_passes_promtool() {
    let available = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok();
    if !available {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have promtool (Debian's prometheus package)"
        );
        eprintln!("promtool is not installed here; `apt-get install prometheus` to run this check");
        return;
    }
    let mut h = Harness::start().await;
    let provider = provider_for(KEY, &summary_output("scraped")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    h.publish(&ticket_event("evt_scrape", "org_acme", "ticket.created"))
        .await;
    h.publish_raw(b"nope", "ticket.created", None).await;
    h.results(1, WAIT).await;
    h.wait_dead_letters(1, WAIT).await;
    let page = h.metrics().await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), page.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
    let rules = std::process::Command::new("promtool")
        .args(["check", "rules", "ops/prometheus/alerts.yml"])
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rabbitmq_definitions_match_what_the_service_declares() {
    // Load ops/rabbitmq/definitions.json into a vhost of its own, then start the service there
    // without a prefix: any argument that differs makes its declarations fail.
    let vhost = unique("cwdefs");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let text = std::fs::read_to_string("ops/rabbitmq/definitions.json").unwrap();
    let mut defs: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["users", "permissions", "vhosts"] {
        defs.as_object_mut().unwrap().remove(key);
    }
    for key in ["policies", "exchanges", "queues", "bindings"] {
        for item in defs[key].as_array_mut().unwrap() {
            item["vhost"] = serde_json::json!(vhost);
        }
    }
    let path = std::env::temp_dir().join(format!("{vhost}.json"));
    std::fs::write(&path, defs.to_string()).unwrap();
    rabbitmqctl(&["import_definitions", path.to_str().unwrap()]);
    let url = AMQP_URL.replace("%2f", &vhost);
    let workers = vec![
        "summarize",
        "triage",
        "sentiment",
        "language",
        "reply_draft",
    ];
    let mut h = Harness::with(Options {
        amqp_url: url,
        topology_prefix: Some(String::new()),
        workers,
        ..Options::default()
    })
    .await;
    let provider = provider_for(KEY, &summary_output("preloaded")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let mut config = h.store.provider_config("org_acme").await.unwrap().unwrap();
    config.enabled_workers = Some(vec!["summarize".into()]);
    h.set_config(config).await;
    h.publish(&ticket_event("evt_defs", "org_acme", "ticket.created"))
        .await;
    assert!(h.results(1, WAIT).await[0].is_completed());
    // The policy they carry gives the events exchange its alternate exchange: an event of a
    // type no worker queue is bound for is dead-lettered, not dropped (the test's publish is
    // mandatory, and without it would come back unroutable).
    let mut misspelt = ticket_event("evt_misspelt", "org_acme", "ticket.created");
    misspelt["type"] = serde_json::json!("ticket.create");
    h.publish(&misspelt).await;
    let letters = h.wait_dead_letters(1, WAIT).await;
    assert_eq!(
        header(&letters[0], "x-copilot-reason").as_deref(),
        Some("unroutable")
    );
    assert_eq!(
        header(&letters[0], "x-original-routing-key").as_deref(),
        Some("ticket.create")
    );
    h.finish().await;
    rabbitmqctl(&["delete_vhost", &vhost]);
    let _ = std::fs::remove_file(path);
}

/// lapin sizes each connection's buffers by `frame_max` (32 frames each way, zero-filled):
/// ours proposes 32 KiB instead of RabbitMQ's 128 KiB, and a `frame_max` in the URL wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_frames_default_to_32_kib_and_the_url_can_change_that() {
    let connection = copilot_workers::broker::connect(AMQP_URL, "copilot-workers tests frames")
        .await
        .unwrap();
    assert_eq!(connection.configuration().frame_max(), 32 * 1024);
    connection.close(200, "done".into()).await.unwrap();
    let url = format!("{AMQP_URL}?frame_max=65536");
    let connection = copilot_workers::broker::connect(&url, "copilot-workers tests frames")
        .await
        .unwrap();
    assert_eq!(connection.configuration().frame_max(), 65536);
    connection.close(200, "done".into()).await.unwrap();
    let refused = copilot_workers::broker::connect("amqp://[::1", "bad").await;
    assert!(refused.is_err(), "a malformed URL is an error, not a panic");
}

/// The routing keys bound from this installation's events exchange to `queue`, sorted.
fn bound_types(h: &Harness, queue: &str) -> Vec<String> {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_bindings", "source_name", "destination_name"])
        .arg("routing_key")
        .output()
        .unwrap();
    assert!(listing.status.success(), "rabbitmqctl list_bindings");
    let exchange = h.topology.events_exchange();
    let mut types: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| match line.split('\t').collect::<Vec<_>>()[..] {
            [source, destination, key] if source == exchange && destination == queue => {
                Some(key.to_owned())
            }
            _ => None,
        })
        .collect();
    types.sort();
    types
}

/// A worker queue is bound only to the event types its worker reacts to, so that an event
/// reaches only the workers that will run it (before, every queue took every type and most
/// workers acked `ticket.updated` unread). A binding an earlier version made for a type the
/// worker does not react to is removed when the worker starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_queue_takes_only_the_event_types_its_worker_reacts_to() {
    let mut h = Harness::with(Options {
        in_process: false,
        workers: vec!["summarize", "triage"],
        ..Options::default()
    })
    .await;
    let (summarize, triage) = (
        h.topology.worker_queue("summarize"),
        h.topology.worker_queue("triage"),
    );
    // What every install had before: summarize's queue bound to ticket.updated too.
    let connection = copilot_workers::broker::connect(&h.settings.amqp_url, "binder")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_bind(
            summarize.as_str().into(),
            h.topology.events_exchange().into(),
            "ticket.updated".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        bound_types(&h, &summarize),
        ["ticket.created", "ticket.message_added", "ticket.updated"]
    );

    let provider = provider_for(KEY, &crate::workers::realistic("triage")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    let mut worker = h.spawn_binary();
    h.eventually(WAIT, "both workers consuming", || async {
        h.queue_consumers(&summarize).await == 1 && h.queue_consumers(&triage).await == 1
    })
    .await;
    assert_eq!(
        bound_types(&h, &summarize),
        ["ticket.created", "ticket.message_added"]
    );
    assert_eq!(
        bound_types(&h, &triage),
        ["ticket.created", "ticket.updated"]
    );

    h.publish(&ticket_event("evt_updated", "org_acme", "ticket.updated"))
        .await;
    let result = h.results(1, WAIT).await.remove(0);
    assert!(result.is_completed());
    assert_eq!(result.data.worker, "triage");
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
    worker.signal("-TERM");
    let status = tokio::time::timeout(WAIT, worker.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", worker.output.await.unwrap());
    connection.close(200, "done".into()).await.unwrap();
    h.finish().await;
}

/// Forwards every connection made to `listener` to the local RabbitMQ, as if the broker had
/// come up on that port, until `gone` fires: then the port and every connection through it
/// close, as if the broker had died.
async fn forward_to_rabbitmq(
    listener: tokio::net::TcpListener,
    gone: tokio_util::sync::CancellationToken,
) {
    while let Some(Ok((mut client, _))) = gone.run_until_cancelled(listener.accept()).await {
        let gone = gone.clone();
        tokio::spawn(async move {
            if let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                let tunnel = tokio::io::copy_bidirectional(&mut client, &mut broker);
                let _ = gone.run_until_cancelled(tunnel).await;
            }
        });
    }
}

/// This installation's service as its own process, reaching the broker at `amqp_url`.
fn service_on_broker(h: &Harness, amqp_url: &str) -> crate::support::Binary {
    let mut service = h.binary_command();
    service.env("COPILOT_AMQP_URL", amqp_url);
    spawn(service)
}

/// Sends SIGTERM to `service` and waits (at most 15 s) for it to exit: its exit status, its
/// output, and how long it took to stop.
async fn stop_with_sigterm(
    mut service: crate::support::Binary,
) -> (std::process::ExitStatus, String, Duration) {
    let stopping = std::time::Instant::now();
    service.signal("-TERM");
    let exited = tokio::time::timeout(Duration::from_secs(15), service.child.wait())
        .await
        .expect("exits")
        .unwrap();
    let took = stopping.elapsed();
    (exited, service.output.await.unwrap(), took)
}

/// A broker that is not up yet is waited for, saying so and why; the service then starts
/// when it comes, and a SIGTERM stops it at any point. A command run by hand gives up after
/// 10 s naming the broker's address and the reason, never its credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_not_up_yet_is_waited_for_and_a_command_gives_up() {
    let mut h = Harness::with(Options {
        in_process: false,
        ..Options::default()
    })
    .await;
    let provider = provider_for(KEY, &summary_output("waited")).await;
    h.set_org("org_acme", &format!("{}/v1", provider.uri()), KEY)
        .await;
    // A port nothing listens on, until the "broker" comes up there.
    let port = {
        let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        reserved.local_addr().unwrap().port()
    };
    let late_url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let service = service_on_broker(&h, &late_url);
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_copilot-workers"))
        .args(["results", "--count", "1"])
        .env(
            "COPILOT_AMQP_URL",
            "amqp://guest:cmd-secret@127.0.0.1:1/%2f",
        )
        .env("COPILOT_TOPOLOGY_PREFIX", &h.settings.topology_prefix)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output();
    let given_up = tokio::spawn(command);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let gone = tokio_util::sync::CancellationToken::new();
    tokio::spawn(forward_to_rabbitmq(late, gone.clone()));
    h.publish(&ticket_event("evt_late", "org_acme", "ticket.created"))
        .await;
    let (result, _) = h
        .next_result(WAIT)
        .await
        .expect("a result once the broker came");
    assert_eq!(result.data.source_event_id, "evt_late");

    let (exited, said, _) = stop_with_sigterm(service).await;
    assert!(exited.success(), "{exited:?}\n{said}");
    assert!(
        said.contains("RabbitMQ does not answer yet") && said.contains("Connection refused"),
        "{said}"
    );
    gone.cancel();

    let gave_up = given_up.await.unwrap().unwrap();
    let told = String::from_utf8_lossy(&gave_up.stderr);
    assert!(!gave_up.status.success(), "{told}");
    assert!(
        told.contains("RabbitMQ at 127.0.0.1:1 did not answer within 10s"),
        "{told}"
    );
    assert!(!told.contains("cmd-secret"), "{told}");
    h.finish().await;
}

/// SIGTERM while the service still waits for a broker that never comes: it stops at once,
/// with nothing to drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_service_still_waiting_for_the_broker() {
    let h = Harness::with(Options {
        in_process: false,
        ..Options::default()
    })
    .await;
    let service = service_on_broker(&h, "amqp://guest:guest@127.0.0.1:1/%2f");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (exited, said, took) = stop_with_sigterm(service).await;
    assert!(exited.success(), "{exited:?}\n{said}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(said.contains("stopped before RabbitMQ"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    h.finish().await;
}

/// SIGTERM while the broker is gone mid-run: the service stops at once and cleanly (lapin's
/// I/O thread, waiting to reconnect, had panicked when the runtime was dropped at exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_broker_outage_stops_cleanly() {
    let h = Harness::with(Options {
        in_process: false,
        ..Options::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let gone = tokio_util::sync::CancellationToken::new();
    tokio::spawn(forward_to_rabbitmq(listener, gone.clone()));
    let service = service_on_broker(&h, &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    gone.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (exited, said, _) = stop_with_sigterm(service).await;
    assert!(exited.success(), "{exited:?}\n{said}");
    assert!(said.contains("copilot-workers running"), "{said}");
    assert!(said.contains("stopped"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    h.finish().await;
}
