//! The benchmark's phases and what they share: the bench database, the fake provider, the
//! pre-filled queue, the result listener and the worker child process.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures_util::StreamExt as _;
use lapin::options::BasicAckOptions;
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Row;
use super::measure::{
    BROKER, POSTGRES, context_switches, counter_total, cpu_note, cpu_of, histogram_mean,
    histogram_quantile, process_stats, rates, reset_peak_rss, switches_note,
};
use crate::broker::{self, Consumer, Link, Outgoing, Publisher, Subscription, Topology};
use crate::config::{EndpointPolicy, Settings};
use crate::crypto::KeyRing;
use crate::events::{self, EventType};
use crate::provider::Profile;
use crate::provider::fake::{FakeBehaviour, FakeProvider};
use crate::provider::http::HttpClient;
use crate::store::Store;
use crate::store::configs::{Health, ModelParams, OrgContext, ProviderConfig};

const WORKER: &str = "summarize";
const ORG: &str = "org_bench";
/// The type of the events the bench publishes (the sample ticket's type).
const KIND: EventType = EventType::TicketMessageAdded;

/// The bench worker's queue, bound to the type the bench publishes (the worker process binds
/// its own types when it starts).
fn bench_subscription() -> Subscription {
    Subscription::new(WORKER, &[KIND])
}

pub struct Bench {
    settings: Settings,
    database_url: String,
    store: Store,
    master_key: String,
    keys: KeyRing,
    link: Arc<Link>,
    publisher: Publisher,
    sample: Value,
    prefixes: Mutex<Vec<String>>,
}

/// Results as they arrive: when, and (for the soak) what.
#[derive(Default)]
struct Arrivals {
    times: Vec<Instant>,
    outcomes: BTreeMap<String, usize>,
    sources: HashSet<String>,
    /// When each paced event was published, by event id, until its result arrives.
    sent: HashMap<String, Instant>,
    /// Publish-to-result times of paced events.
    latencies: Vec<Duration>,
    /// Bytes of all results, for their mean size.
    bytes: usize,
}

impl Arrivals {
    fn mean_size(&self) -> usize {
        self.bytes / self.times.len().max(1)
    }
}

/// Publishes the bench's events: the sample ticket with its own event id and ticket id.
#[derive(Clone)]
struct EventSender {
    publisher: Publisher,
    exchange: String,
    sample: Value,
    phase: String,
    /// Where to note the publish time of each event (paced runs).
    sent: Option<Arc<Mutex<Arrivals>>>,
}

impl EventSender {
    async fn send(&self, i: usize) {
        let mut event = self.sample.clone();
        let id = format!("evt_bench_{}_{i}", self.phase);
        event["id"] = Value::from(id.clone());
        event["data"]["org_id"] = Value::from(ORG);
        event["data"]["ticket"]["id"] = Value::from(format!("B-{}-{i}", self.phase));
        let body = event.to_string();
        let mut message = Outgoing::new(&self.exchange, KIND.as_str(), body.as_bytes());
        message.content_type = events::CLOUDEVENTS_JSON;
        message.message_id = Some(&id);
        if let Some(sent) = &self.sent
            && let Ok(mut sent) = sent.lock()
        {
            sent.sent.insert(id.clone(), Instant::now());
        }
        if let Err(err) = self.publisher.publish(&message).await {
            eprintln!("bench publish failed: {err}");
        }
    }

    /// Publishes `n` events at `rate` per second: every millisecond (the timer's resolution),
    /// as many as are due by the clock.
    async fn pace(self, n: usize, rate: u32) {
        let tasks = TaskTracker::new();
        let started = Instant::now();
        let mut next = 0;
        while next < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as usize;
            while next < due.min(n) {
                let sender = self.clone();
                tasks.spawn(async move { sender.send(next).await });
                next += 1;
            }
        }
        tasks.close();
        tasks.wait().await;
    }
}

impl Bench {
    pub async fn prepare(settings: &Settings, ledger_rows: u32) -> anyhow::Result<Bench> {
        let mut url = url::Url::parse(&settings.database_url)
            .context("COPILOT_DATABASE_URL must be a URL")?;
        let name = url.path().trim_start_matches('/').to_owned();
        url.set_path(&format!(
            "/{}_bench",
            if name.is_empty() { "copilot" } else { &name }
        ));
        let database_url = url.to_string();
        eprintln!("▸ bench database {}", url.path().trim_start_matches('/'));
        crate::store::migrations::migrate(&database_url).await?;
        let store = Store::connect(&database_url, 4)?;
        store.clear_bench_state().await?;
        if ledger_rows > 0 {
            store.seed_bench_ledger(ledger_rows).await?;
            eprintln!("▸ ledger seeded with {ledger_rows} earlier results");
        }
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let master_key = base64::engine::general_purpose::STANDARD.encode(raw);
        let keys = KeyRing::parse(&SecretString::from(master_key.clone()))?;
        let link = Link::open(&settings.amqp_url, "copilot-workers bench").await?;
        let publisher = Publisher::new(link.clone()).await?;
        let sample: Value = serde_json::from_str(crate::cli::demo::SAMPLES[1].1)?;
        Ok(Bench {
            settings: settings.clone(),
            database_url,
            store,
            master_key,
            keys,
            link,
            publisher,
            sample,
            prefixes: Mutex::new(Vec::new()),
        })
    }

    fn topology(&self, phase: &str) -> Topology {
        let prefix = format!("bench.{}.{phase}.", std::process::id());
        if let Ok(mut prefixes) = self.prefixes.lock() {
            prefixes.push(prefix.clone());
        }
        Topology::new(&prefix, self.settings.delivery_limit)
    }

    /// Publishes `n` distinct events (own ids and tickets) with 64 publishers in parallel.
    async fn prefill(&self, topology: &Topology, phase: &str, n: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let tasks = TaskTracker::new();
        let per_task = n.div_ceil(64);
        for task in 0..64 {
            let sender = self.sender(topology, phase);
            tasks.spawn(async move {
                for i in (task * per_task)..((task + 1) * per_task).min(n) {
                    sender.send(i).await;
                }
            });
        }
        tasks.close();
        tasks.wait().await;
        eprintln!(
            "▸ {phase}: {n} events queued in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn sender(&self, topology: &Topology, phase: &str) -> EventSender {
        EventSender {
            publisher: self.publisher.clone(),
            exchange: topology.events_exchange(),
            sample: self.sample.clone(),
            phase: phase.to_owned(),
            sent: None,
        }
    }

    /// Listens to the results exchange, recording each arrival. Results are read only for
    /// their source event and outcome (this process shares the machine with the worker).
    async fn listen(&self, topology: &Topology) -> anyhow::Result<Arc<Mutex<Arrivals>>> {
        let connection = self.link.connection().await;
        let (channel, mut consumer) =
            broker::tap(&connection, &topology.results_exchange()).await?;
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let sink = arrivals.clone();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let now = Instant::now();
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                let parsed: Option<Arrived> = serde_json::from_slice(&delivery.data).ok();
                let Ok(mut arrivals) = sink.lock() else { break };
                arrivals.times.push(now);
                arrivals.bytes += delivery.data.len();
                if let Some(Arrived { data }) = parsed {
                    let class = data.error.map_or(Cow::Borrowed("completed"), |e| e.class);
                    *arrivals.outcomes.entry(class.into_owned()).or_default() += 1;
                    if let Some(source) = data.source_event_id {
                        if let Some(sent) = arrivals.sent.remove(source.as_ref()) {
                            arrivals.latencies.push(now - sent);
                        }
                        arrivals.sources.insert(source.into_owned());
                    }
                }
            }
        });
        Ok(arrivals)
    }

    /// Waits until `n` results arrived, printing progress every second.
    async fn wait_for(
        &self,
        phase: &str,
        arrivals: &Mutex<Arrivals>,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = 0;
        loop {
            let count = arrivals.lock().map(|a| a.times.len()).unwrap_or(0);
            if count >= n {
                eprintln!("\r  {phase}: {count}/{n} results                 ");
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!(
                    "\r  {phase}: only {count} of {n} results within {limit:?}; reporting what arrived"
                );
                return Ok(());
            }
            eprint!("\r  {phase}: {count}/{n} results, {} /s   ", count - last);
            last = count;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// (a) The broker alone: consume, publish a result event shaped like the worker's with a
    /// confirm, ack.
    /// `rate` paces the handling to that many events per second, evenly one at a time (none:
    /// as fast as the broker goes).
    pub async fn baseline(&self, label: &str, n: usize, rate: Option<u32>) -> anyhow::Result<Row> {
        let topology = self.topology(label);
        topology
            .declare(&self.publisher.channel().await, &[bench_subscription()])
            .await?;
        let arrivals = self.listen(&topology).await?;
        self.prefill(&topology, label, n).await?;
        let (before_id, after_id) = result_template(&self.sample);
        let consuming = Link::open(
            &self.settings.amqp_url,
            "copilot-workers bench baseline consume",
        )
        .await?;
        let publishing = Link::open(
            &self.settings.amqp_url,
            "copilot-workers bench baseline publish",
        )
        .await?;
        let publisher = Publisher::new(publishing.clone()).await?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let consumer = Consumer {
            queue: topology.worker_queue(WORKER),
            prefetch: self.settings.prefetch,
            keeper: None,
            renew_idle: None,
        };
        let exchange = Arc::new(topology.results_exchange());
        let started = Instant::now();
        let (cpu_before, _) = process_stats(std::process::id()).unwrap_or_default();
        let broker_before = cpu_of(BROKER);
        let switches_before = context_switches(std::process::id());
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pace = rate.map(|rate| {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            Arc::new(tokio::sync::Mutex::new(ticks))
        });
        let consume = {
            let (tracker, shutdown, consuming) =
                (tracker.clone(), shutdown.clone(), consuming.clone());
            tokio::spawn(async move {
                consumer
                    .run(&consuming, &tracker, shutdown, running, move |delivery| {
                        let (publisher, exchange) = (publisher.clone(), exchange.clone());
                        let pace = pace.clone();
                        // The result names its event, taken from the message id (no parse).
                        let id = delivery.properties.message_id().as_ref();
                        let id = id.map_or("", |id| id.as_str());
                        let body = [before_id.as_str(), id, after_id.as_str()].concat();
                        async move {
                            if let Some(pace) = pace {
                                pace.lock().await.tick().await;
                            }
                            let mut message = Outgoing::new(
                                &exchange,
                                "ticket.enriched.summarize",
                                body.as_bytes(),
                            );
                            message.content_type = events::CLOUDEVENTS_JSON;
                            if publisher.publish(&message).await.is_ok() {
                                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                            }
                        }
                    })
                    .await;
            })
        };
        self.wait_for(label, &arrivals, n, Duration::from_secs(600))
            .await?;
        let (cpu_after, _) = process_stats(std::process::id()).unwrap_or_default();
        let broker_after = cpu_of(BROKER);
        let switches_after = context_switches(std::process::id());
        shutdown.cancel();
        let _ = consume.await;
        tracker.close();
        tracker.wait().await;
        consuming.close().await;
        publishing.close().await;
        let (times, size) = arrivals
            .lock()
            .map(|a| (a.times.clone(), a.mean_size()))
            .unwrap_or_default();
        let (steady, wall) = rates(started, &times);
        Ok(Row {
            phase: label.into(),
            events: n,
            steady,
            wall,
            cpu_per_1000: Some((cpu_after - cpu_before) * 1000.0 / n as f64),
            note: format!(
                "broker only{paced}; CPU is the bench process (consumer, publisher and result \
                 listener); results {size} bytes{broker}{switches}",
                paced = rate.map_or(String::new(), |rate| format!(", paced at {rate}/s")),
                broker = cpu_note("the broker's", broker_before, broker_after, n),
                switches = switches_note("the bench process's", switches_before, switches_after, n),
            ),
            ..Row::default()
        })
    }

    /// (b), (c), (d): the real worker in a child process.
    pub async fn pipeline(
        &self,
        phase: &str,
        n: usize,
        latency: Duration,
        in_flight: u16,
        chaos: bool,
        pace: Option<u32>,
    ) -> anyhow::Result<Row> {
        let topology = self.topology(phase);
        topology
            .declare(&self.publisher.channel().await, &[bench_subscription()])
            .await?;
        let fake = FakeProvider::start(FakeBehaviour {
            latency,
            expected_key: Some("bench-key-0000".into()),
            chaos,
        })
        .await?;
        self.store
            .put_provider_config(&ProviderConfig {
                org_id: ORG.into(),
                profile: Profile::Openai,
                base_url: fake.base_url(),
                model: "bench-model".into(),
                api_key: Some(self.keys.seal(ORG, &SecretString::from("bench-key-0000"))?),
                params: ModelParams {
                    timeout_secs: Some(if chaos { 2 } else { 30 }),
                    ..ModelParams::default()
                },
                enabled_workers: None,
                worker_models: BTreeMap::new(),
                context: OrgContext::default(),
                max_concurrency: Some(u32::from(in_flight)),
                enabled: true,
                health: Health::default(),
            })
            .await?;
        let arrivals = self.listen(&topology).await?;
        if pace.is_none() {
            self.prefill(&topology, phase, n).await?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spawned = Instant::now();
        let mut child = worker_command()?
            .args(["run", "--workers", WORKER])
            .env("COPILOT_DATABASE_URL", &self.database_url)
            .env("COPILOT_AMQP_URL", &self.settings.amqp_url)
            .env("COPILOT_MASTER_KEY", &self.master_key)
            .env("COPILOT_TOPOLOGY_PREFIX", topology_prefix(&topology))
            .env("COPILOT_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("COPILOT_ALLOW_LOOPBACK_PROVIDERS", "true")
            .env(
                "COPILOT_PREFETCH",
                in_flight.max(self.settings.prefetch).to_string(),
            )
            .env(
                "COPILOT_PROVIDER_MAX_ATTEMPTS",
                if chaos { "8" } else { "4" },
            )
            .env("COPILOT_WORKERS_DIR", &self.settings.workers_dir)
            .env("COPILOT_SCHEMAS_DIR", &self.settings.schemas_dir)
            // The worker logs at its own default level (info, unless RUST_LOG says otherwise),
            // as in production: its per-event span context costs CPU (BENCHMARKS.md). Its
            // lines stay off the progress display; warnings and errors are passed on.
            .stderr(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the worker child process")?;
        let pid = child.id().context("child has no pid")?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pass_on_problems(stderr));
        }
        let http = HttpClient::new(EndpointPolicy {
            allow_loopback: true,
            allow_private: false,
        });
        let ready_ms = loop {
            if get(&http, port, "/readyz").await.is_ok() {
                break spawned.elapsed().as_secs_f64() * 1000.0;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{phase}: the worker exited before it was ready ({status}); its error is above"
                );
            }
            if spawned.elapsed() > Duration::from_secs(30) {
                bail!("{phase}: the worker did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        reset_peak_rss(pid);
        let (cpu_before, _) = process_stats(pid).unwrap_or_default();
        let broker_before = cpu_of(BROKER);
        let postgres_before = cpu_of(POSTGRES);
        let (bench_before, _) = process_stats(std::process::id()).unwrap_or_default();
        let switches_before = context_switches(pid);
        let pacer = pace.map(|rate| {
            let mut sender = self.sender(&topology, phase);
            sender.sent = Some(arrivals.clone());
            tokio::spawn(sender.pace(n, rate))
        });
        // Chaos runs wait out retries, parked events and open breakers: give them long.
        let base = Duration::from_secs(if chaos { 900 } else { 120 });
        let waves = u32::try_from(n / usize::from(in_flight.max(1)) + 2).unwrap_or(u32::MAX);
        let mut limit = base + latency * waves;
        if let Some(rate) = pace {
            limit += Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
        }
        self.wait_for(phase, &arrivals, n, limit).await?;
        if let Some(pacer) = pacer {
            pacer.abort();
        }
        let (cpu_after, peak) = process_stats(pid).unwrap_or_default();
        let broker_after = cpu_of(BROKER);
        let postgres_after = cpu_of(POSTGRES);
        let (bench_after, _) = process_stats(std::process::id()).unwrap_or_default();
        let switches_after = context_switches(pid);
        let page = get(&http, port, "/metrics").await?;
        let p50 = histogram_quantile(&page, crate::telemetry::WORKER_OVERHEAD, "", 0.5);
        let p99 = histogram_quantile(&page, crate::telemetry::WORKER_OVERHEAD, "", 0.99);
        let steps: Vec<String> = ["start", "record", "publish", "ack"]
            .into_iter()
            .filter_map(|step| {
                let only = format!("step=\"{step}\"");
                let p99 = histogram_quantile(&page, crate::telemetry::STEP_DURATION, &only, 0.99)?;
                Some(format!("{step} {:.1}", p99 * 1000.0))
            })
            .collect();
        if let Some(id) = child.id() {
            let id = id.to_string();
            // Under a wrapper (heaptrack) the worker is the wrapper's child: stop it first.
            let _ = std::process::Command::new("pkill")
                .args(["-TERM", "-P", &id])
                .status();
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &id])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        // Anything that arrives after the last expected result is a duplicate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (times, outcomes, sources, mut latencies, size) = match arrivals.lock() {
            Ok(a) => (
                a.times.clone(),
                a.outcomes.clone(),
                a.sources.len(),
                a.latencies.clone(),
                a.mean_size(),
            ),
            Err(_) => bail!("result listener failed"),
        };
        let (steady, wall) = rates(spawned, &times);
        let batches: Vec<String> = ["start", "record"]
            .into_iter()
            .filter_map(|statement| {
                let only = format!("statement=\"{statement}\"");
                let mean = histogram_mean(&page, crate::telemetry::LEDGER_BATCH_ROWS, &only)?;
                Some(format!("{statement} {mean:.1}"))
            })
            .collect();
        let mut note = format!(
            "{} calls answered by the fake provider, at most {} at once; results {size} bytes; \
             step p99 ms: {}; events per ledger statement: {}{}{}{}{}",
            fake.requests(),
            fake.peak_in_flight(),
            steps.join(", "),
            batches.join(", "),
            cpu_note("the broker's", broker_before, broker_after, n),
            cpu_note("Postgres'", postgres_before, postgres_after, n),
            cpu_note(
                "the bench process's",
                Some(bench_before),
                Some(bench_after),
                n
            ),
            switches_note("the worker's", switches_before, switches_after, n),
        );
        let parked = counter_total(&page, crate::telemetry::EVENTS_PARKED);
        if parked > 0.0 {
            note.push_str(&format!(
                "; {parked:.0} events parked ({:.2} per event)",
                parked / n as f64
            ));
        }
        if let Some(rate) = pace {
            latencies.sort();
            let at = |q: f64| {
                let index = ((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
                latencies
                    .get(index)
                    .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
            };
            note = format!(
                "published at {rate}/s; publish→result p50 {:.1} ms, p99 {:.1} ms; {note}",
                at(0.5),
                at(0.99)
            );
        }
        if times.len() < n {
            note.push_str(&format!("; only {} of {n} results arrived", times.len()));
        }
        if chaos {
            let outcomes: Vec<String> = outcomes
                .iter()
                .map(|(class, count)| format!("{class} {count}"))
                .collect();
            note = format!(
                "in {n}; {}; lost {}; duplicate results {}",
                outcomes.join(", "),
                n.saturating_sub(sources),
                times.len().saturating_sub(sources)
            );
        }
        Ok(Row {
            phase: phase.into(),
            events: n,
            steady,
            wall,
            overhead_ms: p50.zip(p99).map(|(a, b)| (a * 1000.0, b * 1000.0)),
            peak_rss_mb: Some(peak),
            cpu_per_1000: Some((cpu_after - cpu_before) * 1000.0 / n as f64),
            ready_ms: Some(ready_ms),
            note,
        })
    }

    /// Deletes every queue and exchange the run declared.
    pub async fn cleanup(&self) {
        let prefixes = self.prefixes.lock().map(|p| p.clone()).unwrap_or_default();
        let channel = self.publisher.channel().await;
        for prefix in prefixes {
            let _ = Topology::new(&prefix, self.settings.delivery_limit)
                .delete(&channel, &[WORKER])
                .await;
        }
        self.link.close().await;
    }
}

/// The text of the worker's page at `path`, if it answered 200.
async fn get(http: &HttpClient, port: u16, path: &str) -> anyhow::Result<String> {
    let url = url::Url::parse(&format!("http://127.0.0.1:{port}{path}"))?;
    let reply = http
        .send(
            http::Method::GET,
            &url,
            http::HeaderMap::new(),
            Vec::new(),
            Duration::from_secs(5),
            64 << 20,
        )
        .await?;
    if !reply.status.is_success() {
        bail!("{path} answered {}", reply.status);
    }
    Ok(String::from_utf8_lossy(&reply.body).into_owned())
}

/// Prints the worker's warnings, errors and its last words (`error: …`), which tell why a
/// phase failed; drops its info lines.
async fn pass_on_problems(stderr: tokio::process::ChildStderr) {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("WARN") || line.contains("ERROR") || line.starts_with("error") {
            eprintln!("\n  worker: {line}");
        }
    }
}

/// The worker's command: this executable, or, for profiling, the same under the command
/// given in `COPILOT_BENCH_WORKER_WRAPPER` (say `heaptrack -o /tmp/worker`); the peak RSS and
/// CPU figures are then those of the wrapper's process.
fn worker_command() -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe()?;
    let wrapper = std::env::var("COPILOT_BENCH_WORKER_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    Ok(match words.next() {
        None => tokio::process::Command::new(exe),
        Some(program) => {
            let mut command = tokio::process::Command::new(program);
            command.args(words).arg(exe);
            command
        }
    })
}

/// The baseline's result: a completed result event for the sample ticket, shaped and sized
/// like the worker's (an output of the summarize worker's shape, drawn from the ticket's
/// first message), split around its source event id. The listener then reads the same bytes
/// in both phases, and the broker carries the same sizes.
fn result_template(sample: &Value) -> (String, String) {
    const MARK: &str = "@source-event@";
    let text = sample["data"]["ticket"]["messages"][0]["body"]
        .as_str()
        .unwrap_or_default();
    let excerpt: String = text.chars().take(90).collect();
    let data = events::ResultData {
        org_id: ORG.into(),
        ticket_id: "B-baseline-00000".into(),
        worker: WORKER.into(),
        source_event_id: MARK.into(),
        source_event_type: events::EventType::TicketMessageAdded,
        model: "bench-model".into(),
        output: Some(serde_json::json!({
            "key_points": [excerpt.clone(), "Chrome and Firefox, both broken."],
            "open_questions": ["Which account or order is affected?"],
            "summary": excerpt,
        })),
        usage: events::Usage {
            prompt_tokens: 358,
            completion_tokens: 76,
        },
        latency_ms: 23,
        attempts: 1,
        reasks: 0,
        error: None,
    };
    let text = serde_json::to_string(&events::ResultEvent::new(data, events::now_rfc3339()))
        .unwrap_or_default();
    match text.split_once(MARK) {
        Some((before, after)) => (before.to_owned(), after.to_owned()),
        None => (text, String::new()),
    }
}

fn topology_prefix(topology: &Topology) -> String {
    topology
        .events_exchange()
        .trim_end_matches("tickets.events")
        .to_owned()
}

/// What the listener reads of a result.
#[derive(serde::Deserialize)]
struct Arrived<'a> {
    #[serde(borrow)]
    data: ArrivedData<'a>,
}

#[derive(serde::Deserialize)]
struct ArrivedData<'a> {
    #[serde(borrow, default)]
    source_event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<ArrivedError<'a>>,
}

#[derive(serde::Deserialize)]
struct ArrivedError<'a> {
    #[serde(borrow)]
    class: Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baseline's result reads as a result event of the consumed event, as the worker's
    /// does, and is about its size.
    #[test]
    fn the_baseline_result_is_a_result_event_naming_its_event() {
        let sample: Value = serde_json::from_str(crate::cli::demo::SAMPLES[1].1).unwrap();
        let (before, after) = result_template(&sample);
        let body = [before.as_str(), "evt_bench_baseline_7", after.as_str()].concat();
        let result: events::ResultEvent = serde_json::from_str(&body).unwrap();
        assert_eq!(result.data.source_event_id, "evt_bench_baseline_7");
        assert!(result.is_completed());
        assert!((700..1000).contains(&body.len()), "{} bytes", body.len());
    }
}
