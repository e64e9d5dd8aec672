//! `copilot-workers org ...`: manage an organization's provider config.
//!
//! The API key is read from stdin, a file or a named environment variable — never from a
//! command-line argument, which would land in shell history and `ps`.

mod edit;

use anyhow::{Context as _, bail};

use crate::admin::{self, ConfigView};
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::provider::ProviderClient;
use crate::store::Store;
use crate::store::configs::ProviderConfig;

use edit::{SetArgs, UpdateArgs};

#[derive(Debug, clap::Subcommand)]
pub enum OrgCommand {
    /// Create or replace an org's provider config: what is not given takes its default (every
    /// worker, no categories, no cap...). To change only some settings, use `org update`.
    Set(Box<SetArgs>),
    /// Change some settings of an org's config and keep the rest as stored.
    Update(Box<UpdateArgs>),
    /// Show an org's config (the key masked to its last four characters).
    Show {
        org: String,
        /// Print the config as JSON (the admin API's shape) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// List every org's config.
    List {
        /// Print a JSON array of configs (the admin API's shape, keys masked) instead of a
        /// table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an org's config: its events are skipped from then on.
    Remove { org: String },
    /// Enable an org's config.
    Enable { org: String },
    /// Disable an org's config without removing it.
    Disable { org: String },
    /// Send one tiny request with the org's config and record the outcome.
    Test { org: String },
    /// Provider usage per day, worker and model.
    Usage {
        org: String,
        /// First day to include (YYYY-MM-DD); default: 30 days ago.
        #[arg(long)]
        since: Option<String>,
    },
}

pub async fn run(settings: &Settings, command: OrgCommand) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database_url, 2)?;
    match command {
        OrgCommand::Set(args) => edit::set(settings, &store, *args).await,
        OrgCommand::Update(args) => edit::update(settings, &store, *args).await,
        OrgCommand::Show { org, json } => {
            let keys = KeyRing::from_env()?;
            let config = store
                .provider_config(&org)
                .await?
                .with_context(|| format!("org {org} has no provider config"))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&ConfigView::new(&config, &keys))?
                );
            } else {
                print!("{}", describe(&config, &keys));
            }
            Ok(())
        }
        OrgCommand::List { json: true } => {
            let keys = KeyRing::from_env()?;
            let views: Vec<ConfigView> = store
                .provider_configs()
                .await?
                .iter()
                .map(|config| ConfigView::new(config, &keys))
                .collect();
            println!("{}", serde_json::to_string_pretty(&views)?);
            Ok(())
        }
        OrgCommand::List { json: false } => {
            let configs = store.provider_configs().await?;
            println!(
                "{:<24} {:<9} {:<8} {:<8} {:<24} BASE URL",
                "ORG", "PROFILE", "ENABLED", "HEALTHY", "MODEL"
            );
            for config in configs {
                println!(
                    "{:<24} {:<9} {:<8} {:<8} {:<24} {}",
                    config.org_id,
                    config.profile.as_str(),
                    config.enabled,
                    config.health.healthy,
                    config.model,
                    config.base_url
                );
            }
            Ok(())
        }
        OrgCommand::Remove { org } => {
            if !store.remove_provider_config(&org).await? {
                bail!("org {org} has no provider config");
            }
            println!("removed the provider config of {org}; its events are skipped from now on");
            Ok(())
        }
        OrgCommand::Enable { org } => toggle(&store, &org, true).await,
        OrgCommand::Disable { org } => toggle(&store, &org, false).await,
        OrgCommand::Test { org } => test(settings, &store, &org).await,
        OrgCommand::Usage { org, since } => usage(&store, &org, since).await,
    }
}

async fn toggle(store: &Store, org: &str, enabled: bool) -> anyhow::Result<()> {
    if !store.set_provider_enabled(org, enabled).await? {
        bail!("org {org} has no provider config");
    }
    println!(
        "{org}: {}",
        if enabled {
            "enabled"
        } else {
            "disabled; its events are skipped"
        }
    );
    Ok(())
}

/// A human description of a config; the key appears only as its last four characters.
fn describe(config: &ProviderConfig, keys: &KeyRing) -> String {
    let view = ConfigView::new(config, keys);
    let key = view.api_key.as_ref().map_or("(none)".to_owned(), |key| {
        format!("{} (master key {})", key.last4, key.key_id)
    });
    let mut text = String::new();
    let mut line = |name: &str, value: String| text.push_str(&format!("{name:<16} {value}\n"));
    line("org", view.org_id.clone());
    line("provider", view.provider.to_owned());
    line("base url", view.base_url.clone());
    line("model", view.model.clone());
    line("api key", key);
    line("enabled", view.enabled.to_string());
    line("healthy", view.health.healthy.to_string());
    line(
        "workers",
        view.workers
            .as_ref()
            .map_or("all".to_owned(), |w| w.join(",")),
    );
    if !view.worker_models.is_empty() {
        line(
            "worker models",
            view.worker_models
                .iter()
                .map(|(w, m)| format!("{w}={m}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    line(
        "params",
        serde_json::to_string(&view.params).unwrap_or_default(),
    );
    line(
        "context",
        serde_json::to_string(&view.context).unwrap_or_default(),
    );
    if let Some(cap) = view.max_concurrency {
        line("max concurrency", cap.to_string());
    }
    if let Some(at) = &view.health.last_success_at {
        line("last success", at.clone());
    }
    if let Some(at) = &view.health.last_error_at {
        line(
            "last error",
            format!(
                "{at}: {}",
                view.health.last_error.clone().unwrap_or_default()
            ),
        );
    }
    text
}

async fn test(settings: &Settings, store: &Store, org: &str) -> anyhow::Result<()> {
    let keys = KeyRing::from_env()?;
    let config = store
        .provider_config(org)
        .await?
        .with_context(|| format!("org {org} has no provider config"))?;
    let client =
        ProviderClient::new(settings.endpoint_policy)?.through(settings.provider_proxy.clone());
    let report = admin::test_org(store, &keys, &client, &config).await?;
    if report.ok {
        println!(
            "ok: {} answered in {} ms",
            report.model.unwrap_or_default(),
            report.latency_ms.unwrap_or_default()
        );
        Ok(())
    } else {
        bail!(
            "{org}: {} [{}]",
            report.error.unwrap_or_default(),
            report.error_class.unwrap_or("unknown")
        )
    }
}

async fn usage(store: &Store, org: &str, since: Option<String>) -> anyhow::Result<()> {
    let since = match since {
        Some(day) => {
            let format = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(&day, &format)
                .with_context(|| format!("--since {day:?} is not a YYYY-MM-DD date"))?;
            day
        }
        None => {
            let day = time::OffsetDateTime::now_utc().date() - time::Duration::days(30);
            day.to_string()
        }
    };
    let rows = store.usage(org, &since).await?;
    println!(
        "{:<10}  {:<14} {:<28} {:>9} {:>14} {:>17}",
        "DAY", "WORKER", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS"
    );
    let (mut requests, mut prompt, mut completion) = (0, 0, 0);
    for row in &rows {
        println!(
            "{:<10}  {:<14} {:<28} {:>9} {:>14} {:>17}",
            row.day, row.worker, row.model, row.requests, row.prompt_tokens, row.completion_tokens
        );
        requests += row.requests;
        prompt += row.prompt_tokens;
        completion += row.completion_tokens;
    }
    println!(
        "{:<10}  {:<14} {:<28} {:>9} {:>14} {:>17}",
        "total", "", "", requests, prompt, completion
    );
    Ok(())
}
