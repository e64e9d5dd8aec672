//! `copilot-workers results`: watch results as a downstream consumer receives them.
//!
//! It binds a queue of its own (exclusive, deleted when the command ends) to the results
//! exchange, so it takes nothing from anybody else's queue and sees only what is published
//! while it runs.

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Topology};
use crate::config::Settings;
use crate::events::ResultEvent;

#[derive(Debug, clap::Args)]
pub struct ResultsArgs {
    /// Print each result event as it arrived (one JSON document per line, for `jq`).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many results (default: until Ctrl-C or SIGTERM).
    #[arg(long)]
    pub count: Option<u64>,
}

pub async fn run(settings: &Settings, args: ResultsArgs) -> anyhow::Result<()> {
    let link =
        broker::Link::open_for_command(&settings.amqp_url, "copilot-workers results-cli").await?;
    let topology = Topology::new(&settings.topology_prefix, settings.delivery_limit);
    let exchange = topology.results_exchange();
    super::require_exchange(&link, &exchange, "there is nothing to watch yet").await?;
    let (_channel, mut consumer) = broker::tap(&*link.connection().await, &exchange)
        .await
        .with_context(|| format!("cannot listen on {exchange}"))?;
    eprintln!("listening on {exchange}; Ctrl-C stops");
    let stop = CancellationToken::new();
    tokio::spawn(super::run::stop_on_signal(stop.clone()));
    let mut seen = 0;
    while args.count.is_none_or(|count| seen < count) {
        let delivery = tokio::select! {
            () = stop.cancelled() => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => return Err(err).context("the broker connection failed"),
                None => break,
            },
        };
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        seen += 1;
        if args.json {
            println!("{}", String::from_utf8_lossy(&delivery.data));
            continue;
        }
        match serde_json::from_slice::<ResultEvent>(&delivery.data) {
            Ok(result) => {
                let data = &result.data;
                println!(
                    "━━ {} · {} · {} · event {}",
                    data.org_id, data.ticket_id, delivery.routing_key, data.source_event_id
                );
                print_result(&result);
            }
            Err(err) => println!(
                "━━ {} · not a result event this version reads ({err})",
                delivery.routing_key
            ),
        }
    }
    link.close().await;
    Ok(())
}

/// A result in a few lines: outcome, worker, latency, tokens and model, then each output
/// field (or the error).
pub(crate) fn print_result(result: &ResultEvent) {
    let data = &result.data;
    let status = if result.is_completed() { "✓" } else { "✗" };
    println!(
        "   {status} {:<12} {:>5} ms  {} tokens  model {}",
        data.worker,
        data.latency_ms,
        data.usage.prompt_tokens + data.usage.completion_tokens,
        data.model
    );
    if let Some(output) = &data.output
        && let Some(object) = output.as_object()
    {
        for (field, value) in object {
            let text = match value {
                serde_json::Value::String(text) => text.replace('\n', " ⏎ "),
                other => other.to_string(),
            };
            println!("       {field:<15} {text}");
        }
    }
    if let Some(error) = &data.error {
        println!("       error [{}] {}", error.class, error.message);
    }
}
