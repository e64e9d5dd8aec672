//! copilot-workers: ticket events in, enriched results out, each org on its own AI provider.
//!
//! Follow an event through the modules in this order: [`broker`] (consume) → [`events`]
//! (parse) → [`store`] (the org's config, the ledger) → [`crypto`] (the org's key) →
//! [`workers`] (the prompt) → [`provider`] (the call) → [`pipeline`] (publish, record, ack).
//! [`service`] wires them up; [`cli`] is the command line.

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod events;
pub mod pipeline;
pub mod provider;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod workers;

/// Installs ring as rustls' process-wide crypto provider (TLS to providers and brokers).
/// Idempotent; a provider installed earlier by someone else is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The system's root certificates (an empty store when there are none), read and parsed
/// once per process: the provider client and a TLS connection to Postgres both need them.
pub(crate) fn system_roots() -> rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots
        })
        .clone()
}

/// A TLS client configuration (ring, TLS 1.2 and 1.3) that verifies servers against `roots`:
/// the one used for Postgres and for providers.
pub(crate) fn verifying_tls(
    roots: rustls::RootCertStore,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Sleeps for `period`; false, at once, when `stop` fires first. The pause of every background
/// loop (upkeep rounds, reconnection waits) that must end with the service.
pub(crate) async fn sleep_unless_stopped(
    period: std::time::Duration,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(period) => true,
    }
}
