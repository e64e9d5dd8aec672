//! The running service: connections, topology, one consumer per worker queue, the HTTP
//! listener, and a shutdown that drains in-flight work within a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::link::OpenError;
use crate::broker::{Consumer, Link, Publisher, Subscription, Topology, TopologyKeeper};
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::pipeline::Pipeline;
use crate::pipeline::claim::CLAIM_LEASE;
use crate::provider::ProviderClient;
use crate::provider::retry::RetryPolicy;
use crate::store::Store;
use crate::store::cache::ConfigCache;
use crate::store::ledger::Ledger;
use crate::telemetry::{self, Readiness};
use crate::workers::Catalog;

/// What `/readyz` checks.
struct ServiceReadiness {
    consuming: Arc<Link>,
    publishing: Arc<Link>,
    store: Store,
    running: Arc<AtomicUsize>,
    expected: usize,
}

impl Readiness for ServiceReadiness {
    async fn ready(&self) -> Result<(), String> {
        if !self.consuming.connected() || !self.publishing.connected() {
            return Err("broker connection lost".into());
        }
        if !self.store.ping().await {
            return Err("database unavailable".into());
        }
        let running = self.running.load(Ordering::SeqCst);
        if running < self.expected {
            return Err(format!("{running} of {} consumers attached", self.expected));
        }
        Ok(())
    }
}

/// Signals the service sends to whoever started it (tests, demo, bench).
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// Where the HTTP listener is bound.
    pub http_addr: SocketAddr,
}

/// What every consumer shares: the connection, the topology keeper, the tracker its
/// deliveries' tasks join, shutdown, and the count of consumers attached (readiness).
struct Attach {
    link: Arc<Link>,
    keeper: Arc<TopologyKeeper>,
    deliveries: TaskTracker,
    shutdown: CancellationToken,
    running: Arc<AtomicUsize>,
    renew_idle: Option<std::time::Duration>,
}

impl Attach {
    /// Starts a consumer on `queue`, handing each delivery to `handle` on a task of its own.
    fn spawn<H, Fut>(&self, consumers: &TaskTracker, queue: String, prefetch: u16, handle: H)
    where
        H: Fn(lapin::message::Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let consumer = Consumer {
            queue,
            prefetch,
            keeper: Some(self.keeper.clone()),
            renew_idle: self.renew_idle,
        };
        let link = self.link.clone();
        let deliveries = self.deliveries.clone();
        let shutdown = self.shutdown.clone();
        let running = self.running.clone();
        consumers.spawn(async move {
            consumer
                .run(&link, &deliveries, shutdown, running, handle)
                .await;
        });
    }
}

/// The unrouted-events queue's prefetch (at most `COPILOT_PREFETCH`).
const UNROUTED_PREFETCH: u16 = 16;

/// Runs until `shutdown` fires, then drains. `on_start` is told once consumers are attached.
pub async fn run(
    settings: &Settings,
    keys: Arc<KeyRing>,
    catalog: Catalog,
    shutdown: CancellationToken,
    on_start: Option<tokio::sync::oneshot::Sender<Started>>,
) -> anyhow::Result<()> {
    // Install the recorder before any delivery can increment a counter; a counter bumped
    // before installation would be lost.
    let metrics = telemetry::metrics_handle();
    let store = Store::connect(&settings.database_url, settings.db_pool_size)?;
    check_database(&store, &keys).await?;
    let instance = instance_id();
    let link = |role: &str| {
        let name = format!(
            "copilot-workers {role} {}{instance}",
            settings.topology_prefix
        );
        let shutdown = shutdown.clone();
        async move { Link::open_waiting(&settings.amqp_url, &name, &shutdown, None).await }
    };
    // Separate connections: a broker blocking publishers (memory alarm) must not stop acks.
    // A broker not up yet is waited for, until it answers or a signal stops the service.
    let opened = async { Ok::<_, OpenError>((link("consume").await?, link("publish").await?)) };
    let (consuming, publishing) = match opened.await {
        Ok(links) => links,
        Err(OpenError::Stopped { address }) => {
            tracing::info!(broker = %address, "stopped before RabbitMQ answered; nothing to drain");
            return Ok(());
        }
        Err(err) => {
            return Err(
                anyhow::Error::new(err).context("cannot connect to RabbitMQ (COPILOT_AMQP_URL)")
            );
        }
    };
    let publisher = Publisher::new(publishing.clone()).await?;
    let topology = Topology::new(&settings.topology_prefix, settings.delivery_limit);
    let names: Vec<&str> = catalog.all().iter().map(|worker| worker.name()).collect();
    let subscriptions: Vec<Subscription> = catalog
        .all()
        .iter()
        .map(|worker| Subscription::new(worker.name(), worker.events()))
        .collect();
    if let Err(err) = topology
        .declare(&publisher.channel().await, &subscriptions)
        .await
    {
        let hint = if crate::broker::is_precondition_failed(&err) {
            " (a queue's arguments are fixed when it is first declared: keep \
             COPILOT_DELIVERY_LIMIT at the value the queues were declared with; to lower the \
             limit, use a RabbitMQ policy (delivery-limit; the broker applies the smaller \
             value); to raise it, the queues must be declared again: see the README)"
        } else {
            ""
        };
        return Err(
            anyhow::Error::new(err).context(format!("cannot declare the RabbitMQ topology{hint}"))
        );
    }

    let keeper = Arc::new(TopologyKeeper::new(
        topology.clone(),
        subscriptions,
        publishing.clone(),
    ));

    let background = CancellationToken::new();
    // Stops the config listener however this function returns.
    let _background_guard = background.clone().drop_guard();
    tokio::spawn(report_config_health(store.clone(), background.clone()));
    tokio::spawn(telemetry::keep_metrics_upkept(
        metrics.clone(),
        background.clone(),
    ));
    tokio::spawn(crate::store::retention::keep_pruning(
        store.clone(),
        settings.ledger_retention_days,
        background.clone(),
    ));
    let claims = crate::pipeline::claim::HeldClaims::default();
    tokio::spawn(crate::pipeline::claim::renew_claims(
        store.clone(),
        claims.clone(),
        background.clone(),
    ));
    // A quarter of the prefetch window may hold events waiting beyond their org's own room.
    let gates = Arc::new(crate::pipeline::gate::OrgGates::with_shared_room(
        usize::from(settings.prefetch) / 4,
    ));
    let sharing_stop = background.child_token();
    let sharing = tokio::spawn(crate::pipeline::gate::share_caps(
        store.clone(),
        gates.clone(),
        instance.clone(),
        sharing_stop.clone(),
    ));
    if let Some(proxy) = &settings.provider_proxy {
        tracing::info!(proxy = %proxy.address(), "provider calls go through the egress proxy");
    }
    let provider =
        ProviderClient::new(settings.endpoint_policy)?.through(settings.provider_proxy.clone());
    tokio::spawn(provider.clone().keep_swept(background.clone()));
    let admin = match &settings.admin_token {
        Some(token) => {
            tracing::info!("admin API enabled under /v1");
            crate::admin::router(store.clone(), keys.clone(), provider.clone(), token)
        }
        None => axum::Router::new(),
    };
    let abandon = CancellationToken::new();
    let configs = ConfigCache::start(store.clone(), background.clone());
    let pipeline = Arc::new(Pipeline {
        store: store.clone(),
        ledger: Ledger::start(&store, CLAIM_LEASE),
        configs,
        keys,
        provider,
        publisher,
        topology: topology.clone(),
        keeper: keeper.clone(),
        max_event_bytes: settings.max_event_bytes,
        dead_letter_failures: settings.dead_letter_failures,
        retry: RetryPolicy {
            max_attempts: settings.provider_max_attempts,
            ..RetryPolicy::default()
        },
        provider_timeout: settings.provider_timeout,
        gates,
        instance: instance.clone(),
        claims,
        draining: shutdown.clone(),
        abandon: abandon.clone(),
    });

    let running = Arc::new(AtomicUsize::new(0));
    // One consumer per worker queue, and one on the unrouted-events queue.
    let consumed = catalog.all().len() + 1;
    let readiness = Arc::new(ServiceReadiness {
        consuming: consuming.clone(),
        publishing: publishing.clone(),
        store: store.clone(),
        running: running.clone(),
        expected: consumed,
    });
    let listener = telemetry::bind(settings.http_addr).await?;
    let http_addr = listener.local_addr()?;
    let http_shutdown = CancellationToken::new();
    let http = tokio::spawn(telemetry::serve(
        listener,
        metrics,
        readiness,
        admin,
        http_shutdown.clone(),
    ));
    tracing::info!(%http_addr, "listening for /metrics, /healthz, /readyz");

    let deliveries = TaskTracker::new();
    let consumers = TaskTracker::new();
    let attach = Attach {
        link: consuming.clone(),
        keeper: keeper.clone(),
        deliveries: deliveries.clone(),
        shutdown: shutdown.clone(),
        running: running.clone(),
        renew_idle: settings.idle_consumer_renew,
    };
    for worker in catalog.all() {
        let pipeline = pipeline.clone();
        let worker = worker.clone();
        attach.spawn(
            &consumers,
            topology.worker_queue(worker.name()),
            settings.prefetch,
            move |delivery| pipeline.clone().handle(worker.clone(), delivery),
        );
    }
    // Events no worker queue took: rare, and each handled alone, so a small window.
    let unrouted = pipeline.clone();
    // The event types some worker of this replica reacts to.
    let served: Arc<[_]> = crate::events::EventType::ALL
        .into_iter()
        .filter(|kind| catalog.all().iter().any(|worker| worker.handles(*kind)))
        .collect();
    attach.spawn(
        &consumers,
        topology.unrouted_events(),
        settings.prefetch.min(UNROUTED_PREFETCH),
        move |delivery| unrouted.clone().handle_unrouted(delivery, served.clone()),
    );
    consumers.close();
    wait_attached(&running, consumed, &shutdown).await;
    if let Some(on_start) = on_start {
        let _ = on_start.send(Started { http_addr });
    }
    tracing::info!(workers = ?names, "copilot-workers running");

    shutdown.cancelled().await;
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: no new deliveries or runs; draining the runs in flight");
    consumers.wait().await;
    deliveries.close();
    if tokio::time::timeout(settings.shutdown_grace, deliveries.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; unfinished deliveries go back to the broker");
        abandon.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), deliveries.wait()).await;
    }
    // The other replicas take this one's shares of org caps now, not when its rows lapse.
    sharing_stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), sharing).await;
    if let Err(err) = store.leave_presence(&instance).await {
        tracing::debug!(error = %err, "cannot remove this replica's org presence; it lapses");
    }
    // Closing the connections hands any unacked delivery back to the broker.
    consuming.close().await;
    publishing.close().await;
    http_shutdown.cancel();
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_attached(running: &AtomicUsize, expected: usize, shutdown: &CancellationToken) {
    while running.load(Ordering::SeqCst) < expected && !shutdown.is_cancelled() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Refuses to start on an unmigrated database or on stored keys this key ring cannot open.
async fn check_database(store: &Store, keys: &KeyRing) -> anyhow::Result<()> {
    let key_ids = store
        .sealed_key_ids()
        .await
        .context("cannot read provider configs; is the database up and migrated (`copilot-workers migrate`)?")?;
    let unknown: Vec<&String> = key_ids.iter().filter(|id| !keys.knows(id)).collect();
    if !unknown.is_empty() {
        anyhow::bail!(
            "stored API keys were sealed with master key id(s) {unknown:?}, which are not in COPILOT_MASTER_KEY (it holds {:?}). Add the old key after the active one and run `copilot-workers keys rotate`.",
            keys.key_ids()
        );
    }
    Ok(())
}

/// A random id for this process, used in event claims.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let mut id = String::new();
    crate::events::push_hex(&mut id, &bytes);
    id
}

/// Refreshes the config-health gauges every 30 s until `stop`.
async fn report_config_health(store: Store, stop: CancellationToken) {
    loop {
        if let Ok((total, unhealthy)) = store.config_health_counts().await {
            metrics::gauge!(telemetry::ORG_CONFIGS).set(total as f64);
            metrics::gauge!(telemetry::ORG_CONFIGS_UNHEALTHY).set(unhealthy as f64);
        }
        if !crate::sleep_unless_stopped(std::time::Duration::from_secs(30), &stop).await {
            return;
        }
    }
}
