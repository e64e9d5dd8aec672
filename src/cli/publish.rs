//! `copilot-workers publish --file ticket.json`: publish a ticket event as a helpdesk would.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::broker::{self, Outgoing, PublishError, Publisher, Topology};
use crate::config::Settings;
use crate::events;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// A CloudEvent JSON file (see schemas/examples/).
    #[arg(long)]
    pub file: PathBuf,
    /// Publish even when the event does not pass our own checks (to test dead-lettering).
    #[arg(long)]
    pub unchecked: bool,
}

pub async fn run(settings: &Settings, args: PublishArgs) -> anyhow::Result<()> {
    let body = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let routing_key = match events::parse_event(&body, None, settings.max_event_bytes) {
        Ok(event) => event.kind.as_str().to_owned(),
        Err(bad) if args.unchecked => {
            eprintln!("warning: publishing an invalid event ({bad})");
            "ticket.created".to_owned()
        }
        Err(bad) => anyhow::bail!(
            "{} is not a valid ticket event: {bad} (use --unchecked to send it anyway)",
            args.file.display()
        ),
    };
    let link =
        broker::Link::open_for_command(&settings.amqp_url, "copilot-workers publish-cli").await?;
    let topology = Topology::new(&settings.topology_prefix, settings.delivery_limit);
    let exchange = topology.events_exchange();
    super::require_exchange(&link, &exchange, "nothing was published").await?;
    let publisher = Publisher::new(link.clone()).await?;
    let mut message = Outgoing::new(&exchange, &routing_key, &body);
    message.content_type = events::CLOUDEVENTS_JSON;
    match publisher.publish(&message).await {
        Ok(()) => {}
        // Returned: no queue took it. The event is not a mistake, but nobody runs it.
        Err(PublishError::Unroutable { .. }) => anyhow::bail!(
            "no worker queue is bound for {routing_key} on {exchange}: no worker running \
             reacts to it; nothing was delivered"
        ),
        Err(err) => {
            return Err(anyhow::Error::new(err).context(format!(
                "publish to {exchange} failed; has `copilot-workers run` declared the topology yet?"
            )));
        }
    }
    println!(
        "published {} to {exchange} with routing key {routing_key}",
        args.file.display()
    );
    link.close().await;
    Ok(())
}
