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
