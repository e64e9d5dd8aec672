//! The API key must appear nowhere: not in any log line (at trace level), CLI output,
//! `/metrics`, result, dead letter, API response, error message or database column.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use copilot_workers::broker::{self, Outgoing, Publisher, Topology};
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{
    AMQP_URL, PG_SERVER, completion, drop_database, summary_output, ticket_event, unique,
};

const KEY: &str = "sk-leakcheck-7d1f0a9b3c5e2d4f6a8b";

struct Cli {
    env: Vec<(String, String)>,
    captured: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_copilot-workers"));
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs a command to completion, capturing everything it printed.
    async fn run(&mut self, args: &[&str], stdin: Option<&str>) -> bool {
        let mut child = self.command(args).spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let output = child.wait_with_output().await.unwrap();
        self.captured
            .push_str(&String::from_utf8_lossy(&output.stdout));
        self.captured
            .push_str(&String::from_utf8_lossy(&output.stderr));
        output.status.success()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_appears_nowhere() {
    copilot_workers::install_crypto_provider();
    let id = unique("cwleak");
    let port = free_port();
    let prefix = format!("{id}.");
    let master = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    let mut cli = Cli {
        env: vec![
            ("COPILOT_DATABASE_URL".into(), format!("{PG_SERVER}/{id}")),
            ("COPILOT_AMQP_URL".into(), AMQP_URL.into()),
            ("COPILOT_MASTER_KEY".into(), master.clone()),
            ("COPILOT_TOPOLOGY_PREFIX".into(), prefix.clone()),
            ("COPILOT_ALLOW_LOOPBACK_PROVIDERS".into(), "true".into()),
            ("COPILOT_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            ("COPILOT_ADMIN_TOKEN".into(), "leak-test-admin-token".into()),
            ("COPILOT_SHUTDOWN_GRACE_SECS".into(), "5".into()),
            ("RUST_LOG".into(), "trace".into()),
        ],
        captured: String::new(),
    };
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(completion(&summary_output("no leaks"))),
        )
        .mount(&provider)
        .await;
    // A provider that echoes the key back in its error body, as some do.
    let echoing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": {
            "message": format!("Incorrect API key provided: {KEY}"), "code": "invalid_api_key"}})))
        .mount(&echoing)
        .await;

    assert!(cli.run(&["migrate"], None).await);
    let url = format!("{}/v1", provider.uri());
    assert!(
        cli.run(
            &[
                "org",
                "set",
                "org_leak",
                "--provider",
                "openai",
                "--base-url",
                &url,
                "--model",
                "m",
                "--api-key-stdin"
            ],
            Some(KEY)
        )
        .await
    );
    let echo_url = format!("{}/v1", echoing.uri());
    assert!(
        cli.run(
            &[
                "org",
                "set",
                "org_echo",
                "--provider",
                "openai",
                "--base-url",
                &echo_url,
                "--model",
                "m",
                "--api-key-stdin"
            ],
            Some(KEY)
        )
        .await
    );
    assert!(cli.run(&["org", "show", "org_leak"], None).await);
    assert!(cli.captured.contains("…6a8b"), "show prints the last four");
    assert!(cli.run(&["org", "list"], None).await);
    let before = cli.captured.len();
    assert!(cli.run(&["org", "show", "org_leak", "--json"], None).await);
    // Standard output comes first in what was captured; logs (at trace) may follow it.
    let first_json = |text: &str| -> serde_json::Value {
        serde_json::Deserializer::from_str(text)
            .into_iter()
            .next()
            .unwrap()
            .unwrap()
    };
    let shown = first_json(&cli.captured[before..]);
    assert_eq!(shown["api_key"]["last4"], "…6a8b");
    let before = cli.captured.len();
    assert!(cli.run(&["org", "list", "--json"], None).await);
    let listed = first_json(&cli.captured[before..]);
    assert_eq!(listed[0]["org_id"], "org_echo", "ordered by org id");
    assert_eq!(listed[1]["api_key"]["last4"], "…6a8b");
    assert!(cli.run(&["org", "test", "org_leak"], None).await);
    assert!(
        !cli.run(&["org", "test", "org_echo"], None).await,
        "a 401 fails the test"
    );
    assert!(
        !cli.run(
            &[
                "org",
                "set",
                "org_bad",
                "--provider",
                "openai",
                "--base-url",
                "http://169.254.169.254/v1",
                "--model",
                "m",
                "--api-key-stdin"
            ],
            Some(KEY)
        )
        .await
    );

    let mut service = cli
        .command(&["run", "--workers", "summarize"])
        .spawn()
        .unwrap();
    // Drain its output while it runs: at trace level it would fill a pipe and block.
    let drain = |mut pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut text).await;
            text
        })
    };
    let stdout = drain(Box::new(service.stdout.take().unwrap()));
    let stderr = drain(Box::new(service.stderr.take().unwrap()));
    let client = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let mut up = false;
    for _ in 0..200 {
        if client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the service became ready");

    let connection = broker::connect(AMQP_URL, "leak test").await.unwrap();
    let publishing = broker::Link::open(AMQP_URL, "leak test publish")
        .await
        .unwrap();
    let publisher = Publisher::new(publishing).await.unwrap();
    let topology = Topology::new(&prefix, 10);
    let (_tap, mut results) = broker::tap(&connection, &topology.results_exchange())
        .await
        .unwrap();
    let (_dead_tap, mut dead) = broker::tap(&connection, &topology.dead_letter_exchange())
        .await
        .unwrap();
    let exchange = topology.events_exchange();
    for (org, event) in [("org_leak", "evt_leak_ok"), ("org_echo", "evt_leak_echo")] {
        let body = ticket_event(event, org, "ticket.created").to_string();
        publisher
            .publish(&Outgoing::new(&exchange, "ticket.created", body.as_bytes()))
            .await
            .unwrap();
    }
    publisher
        .publish(&Outgoing::new(
            &exchange,
            "ticket.created",
            format!("not json {KEY}").as_bytes(),
        ))
        .await
        .unwrap();

    let mut published = String::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(20), results.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        published.push_str(&String::from_utf8_lossy(&delivery.data));
        published.push_str(&format!("{:?}", delivery.properties));
    }
    let letter = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The dead letter carries the body as sent (the sender's own bytes); its headers must not
    // add anything, and its error text must not repeat the body.
    published.push_str(&format!("{:?}", letter.properties));
    assert!(
        published.contains("provider_auth"),
        "the echoing provider's result is here: {published}"
    );

    let api = format!("http://127.0.0.1:{port}/v1/orgs/org_leak/provider");
    let mut responses = String::new();
    for request in [
        client.get(&api).bearer_auth("leak-test-admin-token"),
        client.get(format!("http://127.0.0.1:{port}/v1/orgs")).bearer_auth("leak-test-admin-token"),
        client.post(format!("{api}/test")).bearer_auth("leak-test-admin-token"),
        client.put(&api).bearer_auth("leak-test-admin-token").json(&json!({"provider": "openai", "base_url": url, "model": "m", "params": {"temperature": KEY}})),
        client.put(&api).bearer_auth("leak-test-admin-token").json(&json!({"provider": "openai", "base_url": url, "model": KEY.len(), "api_key": KEY})),
        client.get(format!("http://127.0.0.1:{port}/metrics")),
    ] {
        let response = request.send().await.unwrap();
        responses.push_str(&format!("{:?}\n", response.headers()));
        responses.push_str(&response.text().await.unwrap());
    }
    assert!(
        responses.contains("params.temperature"),
        "the error names the field: {responses}"
    );

    let pid = service.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(20), service.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "SIGTERM exits 0");
    let out = stdout.await.unwrap() + &stderr.await.unwrap();
    assert!(out.contains("TRACE"), "logging really was at trace level");
    cli.captured.push_str(&out);

    let (db, driver) = tokio_postgres::connect(&format!("{PG_SERVER}/{id}"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(driver);
    let rows = db
        .query("SELECT row_to_json(p)::text FROM provider_configs p", &[])
        .await
        .unwrap();
    let stored: String = rows.iter().map(|row| row.get::<_, String>(0)).collect();
    assert!(stored.contains("org_leak"));

    let master_fragment = &master[..20];
    for (what, text) in [
        ("CLI and logs", &cli.captured),
        ("results and dead letters", &published),
        ("API and metrics", &responses),
        ("database", &stored),
    ] {
        assert!(!text.contains(KEY), "the API key leaked into {what}");
        assert!(
            !text.contains(&KEY[3..15]),
            "part of the API key leaked into {what}"
        );
        assert!(
            !text.contains(master_fragment),
            "the master key leaked into {what}"
        );
    }
    drop(db);
    let names = ["summarize"];
    let channel = connection.create_channel().await.unwrap();
    let _ = topology.delete(&channel, &names).await;
    drop_database(&id).await;
}
