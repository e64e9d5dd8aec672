//! `copilot-workers org ...`: manage an organization's provider config.
//!
//! The API key is read from stdin, a file or a named environment variable — never from a
//! command-line argument, which would land in shell history and `ps`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use secrecy::{ExposeSecret, SecretString};

use crate::config::Settings;
use crate::crypto::{self, KeyRing};
use crate::provider::{
    ChatMessage, ChatRequest, Profile, ProviderClient, ProviderTarget, ResponseFormat,
};
use crate::store::Store;
use crate::store::configs::{Health, ModelParams, OrgContext, ProviderConfig};

#[derive(Debug, clap::Subcommand)]
pub enum OrgCommand {
    /// Create or replace an org's provider config.
    Set(Box<SetArgs>),
    /// Show an org's config (the key masked to its last four characters).
    Show { org: String },
    /// List every org's config.
    List,
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

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    pub org: String,
    /// Provider profile.
    #[arg(long, value_enum)]
    pub provider: Profile,
    /// Base URL of the OpenAI-compatible API (for Azure, the deployment URL).
    #[arg(long)]
    pub base_url: String,
    /// Default model.
    #[arg(long)]
    pub model: String,
    /// Read the API key from standard input.
    #[arg(long, group = "key")]
    pub api_key_stdin: bool,
    /// Read the API key from a file.
    #[arg(long, group = "key")]
    pub api_key_file: Option<PathBuf>,
    /// Read the API key from this environment variable.
    #[arg(long, group = "key")]
    pub api_key_env: Option<String>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Provider request timeout in seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Azure `api-version`.
    #[arg(long)]
    pub api_version: Option<String>,
    /// Only these workers run for the org (comma-separated); default: all.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Per-worker model override, `worker=model`; repeatable.
    #[arg(long = "worker-model")]
    pub worker_models: Vec<String>,
    /// The org's ticket categories (comma-separated); triage picks only from these.
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// Tone for reply drafts.
    #[arg(long)]
    pub reply_tone: Option<String>,
    /// Language for reply drafts (ISO 639-1).
    #[arg(long)]
    pub reply_language: Option<String>,
    /// Most provider calls in flight at once for this org.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Store the config disabled.
    #[arg(long)]
    pub disabled: bool,
}

pub async fn run(settings: &Settings, command: OrgCommand) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database_url, 2)?;
    match command {
        OrgCommand::Set(args) => set(settings, &store, *args).await,
        OrgCommand::Show { org } => {
            let keys = KeyRing::from_env()?;
            let config = store
                .provider_config(&org)
                .await?
                .with_context(|| format!("org {org} has no provider config"))?;
            print!("{}", describe(&config, &keys));
            Ok(())
        }
        OrgCommand::List => {
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

fn read_key(args: &SetArgs) -> anyhow::Result<Option<SecretString>> {
    let raw = if args.api_key_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the API key from stdin")?;
        Some(text)
    } else if let Some(path) = &args.api_key_file {
        Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the API key file {}", path.display()))?,
        )
    } else if let Some(name) = &args.api_key_env {
        Some(
            std::env::var(name)
                .with_context(|| format!("environment variable {name} is not set"))?,
        )
    } else {
        None
    };
    Ok(raw
        .map(|text| SecretString::from(text.trim().to_owned()))
        .filter(|key| !key.expose_secret().is_empty()))
}

async fn set(settings: &Settings, store: &Store, args: SetArgs) -> anyhow::Result<()> {
    let keys = KeyRing::from_env()?;
    let mut problems = Vec::new();
    if let Err(err) = crate::provider::guard::check_url(&args.base_url, settings.endpoint_policy) {
        problems.push(format!("--base-url: {err}"));
    }
    if args.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        problems.push("--temperature must be between 0 and 2".to_owned());
    }
    let mut worker_models = BTreeMap::new();
    for pair in &args.worker_models {
        match pair.split_once('=') {
            Some((worker, model)) if !worker.is_empty() && !model.is_empty() => {
                worker_models.insert(worker.to_owned(), model.to_owned());
            }
            _ => problems.push(format!(
                "--worker-model {pair:?} must look like worker=model"
            )),
        }
    }
    let existing = store.provider_config(&args.org).await?;
    let api_key = match read_key(&args)? {
        Some(key) => Some(keys.seal(&args.org, &key)?),
        None => existing.as_ref().and_then(|config| config.api_key.clone()),
    };
    if api_key.is_none() && args.provider.requires_key() {
        problems.push(format!(
            "profile {} needs an API key: use --api-key-stdin, --api-key-file or --api-key-env",
            args.provider.as_str()
        ));
    }
    if !problems.is_empty() {
        bail!("invalid org config:\n  - {}", problems.join("\n  - "));
    }
    let config = ProviderConfig {
        org_id: args.org.clone(),
        profile: args.provider,
        base_url: args.base_url,
        model: args.model,
        api_key,
        params: ModelParams {
            temperature: args.temperature,
            max_tokens: args.max_tokens,
            timeout_secs: args.timeout_secs,
            api_version: args.api_version,
        },
        enabled_workers: (!args.workers.is_empty()).then_some(args.workers),
        worker_models,
        context: OrgContext {
            categories: args.categories,
            reply_tone: args.reply_tone,
            reply_language: args.reply_language,
        },
        max_concurrency: args.max_concurrency,
        enabled: !args.disabled,
        health: Health::default(),
    };
    store.put_provider_config(&config).await?;
    print!("{}", describe(&config, &keys));
    Ok(())
}

/// A human description of a config; the key appears only as its last four characters.
fn describe(config: &ProviderConfig, keys: &KeyRing) -> String {
    let key = match &config.api_key {
        None => "(none)".to_owned(),
        Some(sealed) => match keys.open(&config.org_id, sealed) {
            Ok(key) => format!("{} (master key {})", crypto::mask(&key), sealed.key_id),
            Err(err) => format!("(cannot decrypt: {err})"),
        },
    };
    let mut text = String::new();
    let mut line = |name: &str, value: String| text.push_str(&format!("{name:<16} {value}\n"));
    line("org", config.org_id.clone());
    line("provider", config.profile.as_str().to_owned());
    line("base url", config.base_url.clone());
    line("model", config.model.clone());
    line("api key", key);
    line("enabled", config.enabled.to_string());
    line("healthy", config.health.healthy.to_string());
    line(
        "workers",
        config
            .enabled_workers
            .as_ref()
            .map_or("all".to_owned(), |w| w.join(",")),
    );
    if !config.worker_models.is_empty() {
        line(
            "worker models",
            config
                .worker_models
                .iter()
                .map(|(w, m)| format!("{w}={m}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    line(
        "params",
        serde_json::to_string(&config.params).unwrap_or_default(),
    );
    line(
        "context",
        serde_json::to_string(&config.context).unwrap_or_default(),
    );
    if let Some(cap) = config.max_concurrency {
        line("max concurrency", cap.to_string());
    }
    if let Some(at) = &config.health.last_success_at {
        line("last success", at.clone());
    }
    if let Some(at) = &config.health.last_error_at {
        line(
            "last error",
            format!(
                "{at}: {}",
                config.health.last_error.clone().unwrap_or_default()
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
    let api_key = config
        .api_key
        .as_ref()
        .map(|sealed| keys.open(org, sealed))
        .transpose()?;
    let client = ProviderClient::new(settings.endpoint_policy)?;
    let target = ProviderTarget {
        profile: config.profile,
        base_url: config.base_url.clone(),
        api_key,
        model: config.model.clone(),
        timeout: config
            .params
            .timeout_secs
            .map_or(Duration::from_secs(30), Duration::from_secs),
        api_version: config.params.api_version.clone(),
    };
    let request = ChatRequest {
        messages: vec![ChatMessage::new("user", "Reply with the single word: ok")],
        temperature: None,
        max_tokens: Some(5),
        response_format: ResponseFormat::Text,
    };
    match client.chat(&target, &request).await {
        Ok(reply) => {
            store.record_provider_success(org).await?;
            println!(
                "ok: {} answered in {} ms ({} prompt + {} completion tokens)",
                reply.model,
                reply.latency.as_millis(),
                reply.usage.prompt_tokens,
                reply.usage.completion_tokens
            );
            Ok(())
        }
        Err(err) => {
            let message = err.to_string();
            store
                .record_provider_failure(org, &message, err.class().is_config_problem())
                .await?;
            bail!("{org}: {message} [{}]", err.class().as_str())
        }
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
