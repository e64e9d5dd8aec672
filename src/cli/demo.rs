//! `copilot-workers demo`: the whole loop on this machine, without anyone's API key.
//!
//! It starts the built-in fake provider on a random loopback port, points a demo org at it
//! (the only process that can reach that port is this one), runs the real service against
//! the local RabbitMQ and a separate `<db>_demo` database under the `demo.` topology prefix,
//! publishes the sample tickets, prints their results and exits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::BasicAckOptions;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Outgoing, Publisher, Topology};
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::events::{self, ResultEvent};
use crate::provider::Profile;
use crate::provider::fake::{FakeBehaviour, FakeProvider};
use crate::store::Store;
use crate::store::configs::{Health, ModelParams, OrgContext, ProviderConfig};
use crate::workers::Catalog;

/// The sample tickets, built in so the demo runs from any directory.
pub const SAMPLES: [(&str, &str); 4] = [
    (
        "ticket-created.json",
        include_str!("../../schemas/examples/ticket-created.json"),
    ),
    (
        "ticket-message-added.json",
        include_str!("../../schemas/examples/ticket-message-added.json"),
    ),
    (
        "ticket-created-de.json",
        include_str!("../../schemas/examples/ticket-created-de.json"),
    ),
    (
        "ticket-created-unconfigured-org.json",
        include_str!("../../schemas/examples/ticket-created-unconfigured-org.json"),
    ),
];

const DEMO_ORG: &str = "org_acme";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Simulated provider latency in milliseconds.
    #[arg(long, default_value_t = 150)]
    pub latency_ms: u64,
}

/// The demo's own database: the configured one with `_demo` appended to its name.
fn demo_database_url(url: &str) -> anyhow::Result<String> {
    let mut parsed =
        url::Url::parse(url).context("the demo needs COPILOT_DATABASE_URL in URL form")?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    let name = if name.is_empty() {
        "copilot".to_owned()
    } else {
        name
    };
    parsed.set_path(&format!("/{name}_demo"));
    Ok(parsed.to_string())
}

pub async fn run(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    settings.database_url = demo_database_url(&settings.database_url)?;
    settings.topology_prefix = "demo.".to_owned();
    settings.http_addr = "127.0.0.1:0".parse()?;
    settings.endpoint_policy.allow_loopback = true;
    settings.shutdown_grace = Duration::from_secs(5);
    let keys = Arc::new(match KeyRing::from_env() {
        Ok(keys) => keys,
        Err(_) => KeyRing::generate()?,
    });
    let catalog = Catalog::load(&settings.workers_dir, &settings.schemas_dir)
        .context("cannot load the worker specs")?;

    println!(
        "▸ preparing database {} and topology prefix {:?}",
        redact_url(&settings.database_url),
        settings.topology_prefix
    );
    crate::store::migrations::migrate(&settings.database_url).await?;
    let store = Store::connect(&settings.database_url, 4)?;
    store.clear_demo_state().await?;

    let demo_key = "demo-key-for-the-fake-provider-0042";
    let fake = FakeProvider::start(FakeBehaviour {
        latency: Duration::from_millis(args.latency_ms),
        expected_key: Some(demo_key.to_owned()),
        chaos: false,
    })
    .await?;
    println!(
        "▸ fake OpenAI-compatible provider at {} (requires the demo org's key)",
        fake.base_url()
    );
    store
        .put_provider_config(&ProviderConfig {
            org_id: DEMO_ORG.to_owned(),
            profile: Profile::Openai,
            base_url: fake.base_url(),
            model: "demo-model".to_owned(),
            api_key: Some(keys.seal(DEMO_ORG, &SecretString::from(demo_key))?),
            params: ModelParams::default(),
            enabled_workers: None,
            worker_models: BTreeMap::new(),
            context: OrgContext {
                categories: vec!["billing".into(), "technical".into(), "account".into()],
                reply_tone: Some("warm and concise".into()),
                reply_language: None,
            },
            max_concurrency: None,
            enabled: true,
            health: Health::default(),
        })
        .await?;
    store.remove_provider_config("org_globex").await?;
    println!("▸ org {DEMO_ORG} configured (key stored encrypted); org_globex has no config");

    // Start from a clean slate, in case an earlier demo was interrupted.
    let topology = Topology::new(&settings.topology_prefix, settings.delivery_limit);
    let names: Vec<&str> = catalog.all().iter().map(|worker| worker.name()).collect();
    let admin = broker::Link::open_for_command(&settings.amqp_url, "copilot-workers demo")
        .await
        .context("cannot connect to RabbitMQ (COPILOT_AMQP_URL)")?;
    let publisher = Publisher::new(admin.clone()).await?;
    topology.delete(&publisher.channel().await, &names).await?;

    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let service = {
        let settings = settings.clone();
        let catalog = catalog.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            crate::service::run(&settings, keys, catalog, shutdown, Some(started_tx)).await
        })
    };
    let Ok(started) = started_rx.await else {
        return match service.await {
            Ok(Err(err)) => Err(err),
            _ => Err(anyhow::anyhow!("the service stopped before it was ready")),
        };
    };
    println!(
        "▸ workers running: {} (metrics at http://{}/metrics)",
        names.join(", "),
        started.http_addr
    );

    let (_tap_channel, mut consumer) =
        broker::tap(&*admin.connection().await, &topology.results_exchange()).await?;

    let mut expected = 0;
    let mut subjects = BTreeMap::new();
    for (name, body) in SAMPLES {
        let event = events::parse_event(body.as_bytes(), None, settings.max_event_bytes)
            .map_err(|err| anyhow::anyhow!("sample {name} is invalid: {err}"))?;
        if event.data.org_id == DEMO_ORG {
            expected += catalog
                .all()
                .iter()
                .filter(|worker| worker.handles(event.kind))
                .count();
        }
        subjects.insert(
            event.data.ticket.id.clone(),
            (event.data.ticket.subject.clone(), event.data.org_id.clone()),
        );
        let exchange = topology.events_exchange();
        let mut message = Outgoing::new(&exchange, event.kind.as_str(), body.as_bytes());
        message.content_type = events::CLOUDEVENTS_JSON;
        publisher.publish(&message).await?;
        println!(
            "▸ published {name}: {} for {} ({})",
            event.kind.as_str(),
            event.data.org_id,
            event.data.ticket.id
        );
    }

    let mut received: BTreeMap<String, Vec<ResultEvent>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut count = 0;
    while count < expected {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else { break };
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        if let Ok(result) = serde_json::from_slice::<ResultEvent>(&delivery.data) {
            received
                .entry(result.data.ticket_id.clone())
                .or_default()
                .push(result);
            count += 1;
        }
    }
    // Give a stray request for the unconfigured org a moment to show up, if one were made.
    tokio::time::sleep(Duration::from_millis(300)).await;

    println!();
    for (ticket, (subject, org)) in &subjects {
        println!("━━ {ticket} · {subject} · {org}");
        match received.get_mut(ticket) {
            None => println!(
                "   no AI: {org} has no provider config, so the event was acked and skipped (no request made)\n"
            ),
            Some(results) => {
                results.sort_by(|a, b| a.data.worker.cmp(&b.data.worker));
                for result in results.iter() {
                    super::results::print_result(result);
                }
                println!();
            }
        }
    }
    let requests = fake.requests();
    println!(
        "{count} of {expected} expected results; the fake provider answered {requests} request(s), all with {DEMO_ORG}'s key"
    );

    shutdown.cancel();
    service.await.context("service task failed")??;
    topology.delete(&publisher.channel().await, &names).await?;
    admin.close().await;
    if count < expected {
        anyhow::bail!("only {count} of {expected} results arrived within 60 s");
    }
    Ok(())
}

/// The URL without its password, for printing.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(database)".to_owned(),
    }
}
