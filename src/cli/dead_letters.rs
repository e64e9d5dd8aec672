//! `copilot-workers dead-letters list|replay|purge`: see what was dead-lettered and why, send it
//! back to its worker once the cause is fixed (a provider outage over, a template mended), or
//! delete it for good.
//!
//! `list` reads without taking: it gets messages unacknowledged and then closes its channel,
//! which returns them to the queue (the dead-letter queue has no delivery limit to count
//! towards). `replay` publishes a dead letter straight to the queue of the worker that gave it
//! up, not through `tickets.events` (which would run every worker again), waits for the
//! broker's confirm, and only then acks the dead letter: a replay cut short loses nothing, and
//! one run twice is answered by the worker's ledger. An `unroutable` dead letter (an event no
//! worker queue was bound for) never reached a worker: one whose routing key is an event type
//! goes back through `tickets.events`, and one of a type no worker knows is left for `purge`.
//! `purge` acks what it selects. Both take only what the operator selected; the rest goes back
//! with the channel.
//!
//! An event whose run the ledger holds as failed (`retries_exhausted`) would only get that
//! failed result back under its id, so it is replayed under a new id, `<id>~replay<n>`, which
//! downstream sees as a new source event with a new result id. The CloudEvents extension
//! attribute `copilotreplayof` keeps the original id, and the failed row, with the provider
//! usage it records, stays in the ledger.

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

use crate::broker::{self, Outgoing, PublishError, Publisher, Topology, text_header};
use crate::config::Settings;
use crate::events;
use crate::pipeline::{
    DEAD_LETTERED_AT_HEADER, ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER, TRACEPARENT_HEADER,
    UNROUTABLE, WORKER_HEADER,
};
use crate::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum DeadLettersCommand {
    /// Show dead letters, oldest first, without taking them off the queue.
    List(ListArgs),
    /// Send dead letters back to the worker that dead-lettered them, once the cause is fixed
    /// (say which: --reason, --worker, or --all).
    Replay(Selection),
    /// Delete dead letters for good, say bad input already looked at (say which: --reason,
    /// --worker, or --all).
    Purge(Selection),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: Filter,
    /// Show at most this many.
    #[arg(long, default_value_t = 20)]
    pub count: u32,
    /// One JSON document per dead letter (for `jq`), with the event's body.
    #[arg(long)]
    pub json: bool,
}

/// Which dead letters a command is about.
#[derive(Debug, clap::Args)]
pub struct Filter {
    /// Only dead letters with one of these reasons (comma-separated), e.g.
    /// `retries_exhausted,delivery_limit`.
    #[arg(long, value_delimiter = ',')]
    pub reason: Vec<String>,
    /// Only dead letters of this worker.
    #[arg(long)]
    pub worker: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.reason.is_empty() && self.worker.is_none()
    }

    fn selects(&self, letter: &DeadLetter) -> bool {
        (self.reason.is_empty() || self.reason.contains(&letter.reason))
            && self
                .worker
                .as_ref()
                .is_none_or(|worker| letter.worker.as_ref() == Some(worker))
    }
}

/// Which dead letters `replay` or `purge` takes, oldest first.
#[derive(Debug, clap::Args)]
pub struct Selection {
    #[command(flatten)]
    pub filter: Filter,
    /// Every dead letter, whatever its reason or worker.
    #[arg(long)]
    pub all: bool,
    /// Take at most this many.
    #[arg(long)]
    pub count: Option<u64>,
}

pub async fn run(settings: &Settings, command: DeadLettersCommand) -> anyhow::Result<()> {
    let topology = Topology::new(&settings.topology_prefix, settings.delivery_limit);
    match command {
        DeadLettersCommand::List(args) => list(settings, &topology, args).await,
        DeadLettersCommand::Replay(selection) => {
            selection.check()?;
            let ledger = Store::connect(&settings.database_url, 1)?;
            take(settings, &topology, selection, Some(ledger)).await
        }
        DeadLettersCommand::Purge(selection) => {
            selection.check()?;
            take(settings, &topology, selection, None).await
        }
    }
}

/// What a dead letter says about itself. Ours carry `x-copilot-*` headers; the broker's own
/// (an event past the delivery limit) carry `x-first-death-*` and `x-death`.
#[derive(Debug, serde::Serialize)]
struct DeadLetter {
    reason: String,
    worker: Option<String>,
    error: Option<String>,
    routing_key: String,
    dead_lettered_at: Option<String>,
    event_id: Option<String>,
    org_id: Option<String>,
    ticket_id: Option<String>,
    bytes: usize,
}

impl DeadLetter {
    fn read(delivery: &Delivery, topology: &Topology) -> DeadLetter {
        let headers = delivery.properties.headers().as_ref();
        let text = |name: &str| headers.and_then(|headers| text_header(headers, name));
        let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
        let field = |pointer: &str| {
            let value = body.as_ref()?.pointer(pointer)?;
            value.as_str().map(str::to_owned)
        };
        DeadLetter {
            reason: text(REASON_HEADER)
                .or_else(|| text("x-first-death-reason"))
                .unwrap_or_else(|| "unknown".to_owned()),
            worker: headers.and_then(|headers| worker_of(headers, topology)),
            error: text("x-copilot-error"),
            routing_key: text(ORIGINAL_ROUTING_KEY_HEADER)
                .unwrap_or_else(|| delivery.routing_key.to_string()),
            dead_lettered_at: text(DEAD_LETTERED_AT_HEADER)
                .or_else(|| headers.and_then(first_death_time)),
            event_id: field("/id"),
            org_id: field("/data/org_id"),
            ticket_id: field("/data/ticket/id"),
            bytes: delivery.data.len(),
        }
    }
}

/// Where `replay` sends a dead letter.
enum Target<'a> {
    /// Straight to the queue of the worker that gave it up.
    Worker(&'a str),
    /// Through the events exchange, to every worker bound for its type: an event no worker
    /// queue took (`unroutable`) never ran anywhere.
    Events(events::EventType),
}

impl DeadLetter {
    fn replay_target(&self) -> Option<Target<'_>> {
        match &self.worker {
            Some(worker) => Some(Target::Worker(worker)),
            None if self.reason == UNROUTABLE => {
                events::EventType::parse(&self.routing_key).map(Target::Events)
            }
            None => None,
        }
    }
}

/// The worker that gave the message up: ours name it; the broker's name the worker's queue.
fn worker_of(headers: &FieldTable, topology: &Topology) -> Option<String> {
    text_header(headers, WORKER_HEADER).or_else(|| {
        let queue = text_header(headers, "x-first-death-queue")?;
        let worker = queue.strip_prefix(&topology.worker_queue(""))?;
        Some(worker.to_owned())
    })
}

/// When the broker dead-lettered the message, from the first entry of its `x-death`.
fn first_death_time(headers: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let AMQPValue::Timestamp(secs) = first.inner().get("time")? else {
        return None;
    };
    let at = time::OffsetDateTime::from_unix_timestamp(i64::try_from(*secs).ok()?).ok()?;
    at.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// The dead-letter queue's depth; an error saying what to do when it does not exist.
async fn depth(link: &broker::Link, queue: &str) -> anyhow::Result<u32> {
    match Topology::queue_depth(&*link.connection().await, queue).await? {
        Some(depth) => Ok(depth),
        None => anyhow::bail!(
            "queue {queue} does not exist. Start `copilot-workers run` once (with the same \
             COPILOT_TOPOLOGY_PREFIX) to declare the topology."
        ),
    }
}

/// The next dead letter, unacknowledged: it stays the channel's until acked, and goes back to
/// the queue when the channel closes.
async fn next(channel: &lapin::Channel, queue: &str) -> anyhow::Result<Option<Delivery>> {
    let got = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .with_context(|| format!("cannot read {queue}"))?;
    Ok(got.map(|got| got.delivery))
}

async fn list(settings: &Settings, topology: &Topology, args: ListArgs) -> anyhow::Result<()> {
    let link =
        broker::Link::open_for_command(&settings.amqp_url, "copilot-workers dead-letters").await?;
    let queue = topology.dead_letter_queue();
    let total = depth(&link, &queue).await?;
    let channel = link.connection().await.create_channel().await?;
    let (mut shown, mut read) = (0, 0);
    // Every message read stays unacked on this channel until it closes, so none is read twice.
    while shown < args.count && read < total {
        let Some(delivery) = next(&channel, &queue).await? else {
            break;
        };
        read += 1;
        let letter = DeadLetter::read(&delivery, topology);
        if !args.filter.selects(&letter) {
            continue;
        }
        shown += 1;
        if args.json {
            let mut document = serde_json::to_value(&letter)?;
            document["body"] = serde_json::from_slice(&delivery.data).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&delivery.data).into_owned())
            });
            println!("{document}");
        } else {
            print_letter(&letter);
        }
    }
    // Closing the channel returns every message it got: nothing was taken.
    let _ = channel.close(200, "listed".into()).await;
    link.close().await;
    let matching = if args.filter.is_empty() {
        String::new()
    } else {
        format!(" ({read} read to find them)")
    };
    eprintln!("{queue}: {total} dead letter(s), {shown} shown{matching}, all left on the queue");
    Ok(())
}

fn print_letter(letter: &DeadLetter) {
    let unknown = || "?".to_owned();
    let no_worker = || match letter.reason.as_str() {
        UNROUTABLE => "none".to_owned(),
        _ => unknown(),
    };
    println!(
        "━━ {} · worker {} · {}",
        letter.reason,
        letter.worker.clone().unwrap_or_else(no_worker),
        letter.dead_lettered_at.clone().unwrap_or_else(unknown),
    );
    println!(
        "   event {} · org {} · ticket {} · {} · {} bytes",
        letter.event_id.clone().unwrap_or_else(unknown),
        letter.org_id.clone().unwrap_or_else(unknown),
        letter.ticket_id.clone().unwrap_or_else(unknown),
        letter.routing_key,
        letter.bytes
    );
    if let Some(error) = &letter.error {
        println!("   {error}");
    }
}

impl Selection {
    /// Nothing is taken unless the operator said which.
    fn check(&self) -> anyhow::Result<()> {
        if self.filter.is_empty() && !self.all {
            anyhow::bail!(
                "say which dead letters: --reason R, --worker W, or --all (`copilot-workers \
                 dead-letters list` shows them)"
            );
        }
        Ok(())
    }
}

/// What `replay` needs besides the queue: the ledger (is the run decided as failed?) and a
/// confirmed publisher.
struct Replayer {
    store: Store,
    publisher: Publisher,
}

impl Replayer {
    /// Publishes the dead letter, confirmed, to the queue of its worker, or through the events
    /// exchange (see [`Target`]); true when it went under a new id.
    async fn send(
        &self,
        topology: &Topology,
        delivery: &Delivery,
        letter: &DeadLetter,
        target: Target<'_>,
    ) -> anyhow::Result<bool> {
        let fresh = match target {
            Target::Worker(worker) => fresh_id(&self.store, &delivery.data, worker)
                .await?
                .map(|fresh| (worker, fresh)),
            Target::Events(_) => None, // it never ran
        };
        let body = match &fresh {
            Some((worker, fresh)) => {
                println!(
                    "{} was decided as failed by {worker}: replayed as {}",
                    fresh.original, fresh.id
                );
                fresh.body.as_slice()
            }
            None => delivery.data.as_slice(),
        };
        let (exchange, routing_key, missing) = match target {
            Target::Worker(worker) => {
                let queue = topology.worker_queue(worker);
                let missing =
                    format!("queue {queue} does not exist (is the `{worker}` worker deployed?)");
                (String::new(), queue, missing)
            }
            Target::Events(kind) => {
                let exchange = topology.events_exchange();
                let missing = format!(
                    "no worker queue is bound for {} on {exchange} (is `copilot-workers run` up?)",
                    kind.as_str()
                );
                (exchange, kind.as_str().to_owned(), missing)
            }
        };
        // The routing key it was first published with goes along, should it be dead-lettered
        // again, and so does its trace.
        let mut message = Outgoing::new(&exchange, &routing_key, body)
            .header(ORIGINAL_ROUTING_KEY_HEADER, &letter.routing_key);
        let headers = delivery.properties.headers().as_ref();
        if let Some(traceparent) = headers.and_then(|h| text_header(h, TRACEPARENT_HEADER)) {
            message = message.header(TRACEPARENT_HEADER, &traceparent);
        }
        let content_type = delivery.properties.content_type().as_ref();
        message.content_type = content_type.map_or(events::CLOUDEVENTS_JSON, |ct| ct.as_str());
        match self.publisher.publish(&message).await {
            Ok(()) => Ok(fresh.is_some()),
            Err(PublishError::Unroutable { .. }) => Err(anyhow::anyhow!(missing)),
            Err(err) => Err(err.into()),
        }
    }
}

/// `replay` (given the ledger) or `purge` (without): takes the selected dead letters off the
/// queue, each acked only once it was replayed.
async fn take(
    settings: &Settings,
    topology: &Topology,
    selection: Selection,
    ledger: Option<Store>,
) -> anyhow::Result<()> {
    let verb = if ledger.is_some() {
        "replayed"
    } else {
        "purged"
    };
    let link =
        broker::Link::open_for_command(&settings.amqp_url, "copilot-workers dead-letters").await?;
    let queue = topology.dead_letter_queue();
    let total = depth(&link, &queue).await?;
    let replayer = match ledger {
        Some(store) => Some(Replayer {
            store,
            publisher: Publisher::new(link.clone()).await?,
        }),
        None => None,
    };
    let channel = link.connection().await.create_channel().await?;
    let (mut taken, mut renamed, mut passed, mut stranded) = (0_u64, 0_u64, 0_u64, 0_u64);
    // Only the messages there at the start: one replayed and dead-lettered again comes after
    // them, and is not met twice.
    for _ in 0..total {
        if selection.count.is_some_and(|count| taken >= count) {
            break;
        }
        let Some(delivery) = next(&channel, &queue).await? else {
            break;
        };
        let letter = DeadLetter::read(&delivery, topology);
        // Passed over (not selected, or nowhere to replay it to): held unacked until the
        // channel closes, which returns it.
        if !selection.filter.selects(&letter) {
            passed += 1;
            continue;
        }
        if let Some(replayer) = &replayer {
            let Some(target) = letter.replay_target() else {
                stranded += 1;
                continue;
            };
            let sent = replayer.send(topology, &delivery, &letter, target).await;
            if sent
                .with_context(|| format!("{taken} {verb} before it, the rest left on {queue}"))?
            {
                renamed += 1;
            }
        }
        if !matches!(
            delivery.acker.ack(BasicAckOptions::default()).await,
            Ok(true)
        ) {
            anyhow::bail!(
                "the broker connection was lost after {taken} {verb}: the next one is still on \
                 {queue} (a second replay of one is answered by the worker's ledger)"
            );
        }
        taken += 1;
    }
    let _ = channel.close(200, verb.into()).await;
    link.close().await;
    let renamed = if replayer.is_some() {
        format!(" ({renamed} under a new id)")
    } else {
        String::new()
    };
    println!(
        "{verb} {taken} dead letter(s){renamed}; {} left on {queue}",
        u64::from(total).saturating_sub(taken)
    );
    if passed > 0 && !selection.all {
        eprintln!("{passed} did not match (see `copilot-workers dead-letters list`)");
    }
    if stranded > 0 {
        eprintln!(
            "{stranded} left: no worker to send them to (an event type no worker handles, or \
             the broker's own dead letters of a queue that is not a worker's); purge them once \
             looked at"
        );
    }
    Ok(())
}

/// An event to replay under a new id.
struct Fresh {
    original: String,
    id: String,
    body: Vec<u8>,
}

/// The event under a new id when the ledger holds its run by `worker` as failed; None to
/// replay it as it is (not decided yet, completed, or not an event we can read).
async fn fresh_id(store: &Store, body: &[u8], worker: &str) -> anyhow::Result<Option<Fresh>> {
    let Ok(Value::Object(mut event)) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let Some(original) = event.get("id").and_then(Value::as_str).map(str::to_owned) else {
        return Ok(None);
    };
    let decided = store
        .ledger_entry(&original, worker)
        .await
        .context("cannot read the ledger")?;
    if decided.is_none_or(|entry| entry.outcome != "failed") {
        return Ok(None);
    }
    let id = replay_id(&original);
    event
        .entry("copilotreplayof")
        .or_insert_with(|| Value::String(original.clone()));
    event.insert("id".to_owned(), Value::String(id.clone()));
    let body = serde_json::to_vec(&event)?;
    Ok(Some(Fresh { original, id, body }))
}

/// The next replay's id: `<id>~replay1`, then `~replay2` for a replay of that, and so on.
/// An id that would grow past the 200 bytes events may have is replaced by its hash.
fn replay_id(id: &str) -> String {
    let earlier = id
        .rsplit_once("~replay")
        .and_then(|(base, n)| Some((base, n.parse::<u32>().ok()?)));
    let (base, n) = earlier.map_or((id, 1), |(base, n)| (base, n.saturating_add(1)));
    let next = format!("{base}~replay{n}");
    if next.len() <= events::MAX_ID_BYTES {
        return next;
    }
    let mut hashed = String::with_capacity(64 + 16);
    let digest = ring::digest::digest(&ring::digest::SHA256, base.as_bytes());
    events::push_hex(&mut hashed, digest.as_ref());
    format!("{hashed}~replay{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_ids_count_up_and_stay_within_the_event_id_limit() {
        assert_eq!(replay_id("evt_1"), "evt_1~replay1");
        assert_eq!(replay_id("evt_1~replay1"), "evt_1~replay2");
        assert_eq!(replay_id("evt_1~replay9"), "evt_1~replay10");
        // A suffix that only looks like ours is part of the id.
        assert_eq!(replay_id("evt~replayX"), "evt~replayX~replay1");
        let long = "e".repeat(195);
        let next = replay_id(&long);
        assert!(next.len() <= events::MAX_ID_BYTES, "{}", next.len());
        assert!(next.ends_with("~replay1"));
        assert_eq!(replay_id(&next), next.replace("~replay1", "~replay2"));
    }

    #[test]
    fn a_dead_letter_of_the_broker_names_its_worker_reason_and_time() {
        let topology = Topology::new("t.", 10);
        let mut death = FieldTable::default();
        death.insert("time".into(), AMQPValue::Timestamp(1_796_472_000));
        let mut headers = FieldTable::default();
        let long = |text: &str| AMQPValue::LongString(text.as_bytes().to_vec().into());
        headers.insert("x-first-death-reason".into(), long("delivery_limit"));
        headers.insert(
            "x-first-death-queue".into(),
            long("t.copilot.worker.triage"),
        );
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        assert_eq!(
            text_header(&headers, "x-first-death-reason").as_deref(),
            Some("delivery_limit")
        );
        assert_eq!(
            first_death_time(&headers).as_deref(),
            Some("2026-12-05T12:00:00Z")
        );
        assert_eq!(worker_of(&headers, &topology).as_deref(), Some("triage"));
        // Another installation's queue is not ours to name.
        let other = Topology::new("u.", 10);
        assert_eq!(worker_of(&headers, &other), None);
    }

    #[test]
    fn a_replay_goes_to_the_worker_that_gave_it_up_or_by_type_through_the_events_exchange() {
        let letter = |reason: &str, worker: Option<&str>, routing_key: &str| DeadLetter {
            reason: reason.to_owned(),
            worker: worker.map(str::to_owned),
            error: None,
            routing_key: routing_key.to_owned(),
            dead_lettered_at: None,
            event_id: None,
            org_id: None,
            ticket_id: None,
            bytes: 0,
        };
        let target = |letter: &DeadLetter| match letter.replay_target() {
            Some(Target::Worker(worker)) => format!("worker {worker}"),
            Some(Target::Events(kind)) => format!("events {}", kind.as_str()),
            None => "nowhere".to_owned(),
        };
        let cases = [
            (
                letter("not_json", Some("triage"), "ticket.created"),
                "worker triage",
            ),
            (
                letter(UNROUTABLE, None, "ticket.updated"),
                "events ticket.updated",
            ),
            (letter(UNROUTABLE, None, "ticket.create"), "nowhere"),
            // A dead letter without a worker for another reason is not sent anywhere by type.
            (letter("unknown", None, "ticket.created"), "nowhere"),
        ];
        for (letter, expected) in cases {
            assert_eq!(target(&letter), expected, "{letter:?}");
        }
    }
}
