//! Every setting of the service, declared once and documented where it is declared.
//!
//! Values come from command-line flags, then `COPILOT_*` environment variables (both handled
//! by clap), then an optional TOML file (`--config` / `COPILOT_CONFIG`), then the defaults
//! written here. Validation reports every bad value at once, not just the first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// Settings shared by every subcommand that talks to the broker or the database.
///
/// Each field is optional here so that a flag or variable that was not given falls through to
/// the config file and then to the default in [`Settings::resolve`].
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[command(next_help_heading = "Service settings (also COPILOT_* variables or the --config file)")]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct SettingsArgs {
    /// Optional TOML file with any of these settings (lowest precedence after the defaults).
    #[arg(long, env = "COPILOT_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// RabbitMQ URL. Default: `amqp://guest:guest@127.0.0.1:5672/%2f`.
    #[arg(long, env = "COPILOT_AMQP_URL", global = true)]
    pub amqp_url: Option<String>,

    /// Postgres URL. Default: `postgres://postgres@127.0.0.1:5432/copilot`.
    #[arg(long, env = "COPILOT_DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Listener for `/metrics`, `/healthz`, `/readyz` and the admin API. Default: `127.0.0.1:9464`.
    #[arg(long, env = "COPILOT_HTTP_ADDR", global = true)]
    pub http_addr: Option<SocketAddr>,

    /// Prefix put in front of every exchange and queue name, to run several isolated
    /// installations on one broker (tests, demo). Default: empty.
    #[arg(long, env = "COPILOT_TOPOLOGY_PREFIX", global = true)]
    pub topology_prefix: Option<String>,

    /// Postgres connections in the shared pool (config lookups, claim renewal, health, the
    /// admin API). Default: 4. The hot path's batched ledger statements have four more of
    /// their own, so a replica holds at most this + 4 connections, plus one for LISTEN.
    #[arg(long, env = "COPILOT_DB_POOL_SIZE", global = true)]
    pub db_pool_size: Option<usize>,

    /// Deliveries held unacknowledged per worker queue; a quarter of it is the waiting room
    /// that orgs at their cap share (`pipeline::gate`). Default: 200.
    #[arg(long, env = "COPILOT_PREFETCH", global = true)]
    pub prefetch: Option<u16>,

    /// How many times the broker may deliver one message before dead-lettering it
    /// (`x-delivery-limit`; RabbitMQ 3.10 has no default). Default: 10.
    #[arg(long, env = "COPILOT_DELIVERY_LIMIT", global = true)]
    pub delivery_limit: Option<u32>,

    /// Seconds a worker queue's consumer may receive nothing, with nothing of its own in
    /// flight, before it is attached again on a new channel and the old channel closed. The
    /// broker can stop feeding a consumer without telling it (a queue deleted and declared
    /// again at once by another client); closing the channel hands back what it held. 0:
    /// never. Default: 30.
    #[arg(long, env = "COPILOT_IDLE_CONSUMER_RENEW_SECS", global = true)]
    pub idle_consumer_renew_secs: Option<u64>,

    /// Largest accepted input event, in bytes; larger ones are dead-lettered. Default: 1 MiB.
    #[arg(long, env = "COPILOT_MAX_EVENT_BYTES", global = true)]
    pub max_event_bytes: Option<usize>,

    /// Directory of worker specs (`*.toml`). Default: `workers`, or the set built into the
    /// binary when there is no `workers` directory here.
    #[arg(long, env = "COPILOT_WORKERS_DIR", global = true)]
    pub workers_dir: Option<PathBuf>,

    /// Directory of JSON Schemas the worker specs refer to. Default: `schemas`, or the set
    /// built into the binary when there is no `schemas` directory here.
    #[arg(long, env = "COPILOT_SCHEMAS_DIR", global = true)]
    pub schemas_dir: Option<PathBuf>,

    /// Let provider base URLs resolve to loopback addresses (a self-hosted model on this host).
    /// Default: false.
    #[arg(long, env = "COPILOT_ALLOW_LOOPBACK_PROVIDERS", global = true)]
    pub allow_loopback_providers: Option<bool>,

    /// Let provider base URLs resolve to private network ranges (10/8, 172.16/12, 192.168/16,
    /// fc00::/7). Default: false.
    #[arg(long, env = "COPILOT_ALLOW_PRIVATE_PROVIDERS", global = true)]
    pub allow_private_providers: Option<bool>,

    /// The egress proxy that provider calls go through, `http://[user:password@]host:port`:
    /// each connection is a `CONNECT` tunnel carrying the provider's TLS. Read from
    /// `COPILOT_PROVIDER_PROXY` or the config file only, never from a flag (its password
    /// would be visible in `ps`). Default: none, providers are called directly.
    #[arg(skip)]
    pub provider_proxy: Option<String>,

    /// Hosts that provider calls reach directly despite `COPILOT_PROVIDER_PROXY`,
    /// comma-separated: a name also covers its subdomains (`corp.example` or `.corp.example`),
    /// an address only itself, a network (`10.0.0.0/8`, `fd00::/8`) the addresses in it as
    /// written in a provider's URL, `*` every host (list `localhost,127.0.0.1` for a model on
    /// this host).
    #[arg(long, env = "COPILOT_PROVIDER_NO_PROXY", global = true)]
    pub provider_no_proxy: Option<String>,

    /// Provider request timeout in seconds when the org's config sets none. Default: 60.
    #[arg(long, env = "COPILOT_PROVIDER_TIMEOUT_SECS", global = true)]
    pub provider_timeout_secs: Option<u64>,

    /// Provider attempts per event (in-process), including the first. Default: 4.
    #[arg(long, env = "COPILOT_PROVIDER_MAX_ATTEMPTS", global = true)]
    pub provider_max_attempts: Option<u32>,

    /// Seconds SIGTERM waits for in-flight work before handing it back. Default: 25.
    #[arg(long, env = "COPILOT_SHUTDOWN_GRACE_SECS", global = true)]
    pub shutdown_grace_secs: Option<u64>,

    /// Also dead-letter an event whose run failed for good (`provider_auth`,
    /// `provider_quota`, `provider_bad_request`, `invalid_output`, …; the class is the
    /// reason) after its failed result, so that `dead-letters replay` can run it again once
    /// the org has fixed its key, quota or model. Default: false (the failed result only;
    /// events whose retries ran out are always dead-lettered).
    #[arg(long, env = "COPILOT_DEAD_LETTER_FAILURES", global = true)]
    pub dead_letter_failures: Option<bool>,

    /// Days a decided result stays in the ledger; older ones are deleted every hour, their
    /// provider usage kept as daily totals. An event redelivered after that is processed
    /// again. 0 keeps every result forever. Default: 90.
    #[arg(long, env = "COPILOT_LEDGER_RETENTION_DAYS", global = true)]
    pub ledger_retention_days: Option<u32>,

    /// Log format: `human` or `json`. Default: `human`.
    #[arg(long, env = "COPILOT_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,

    /// Bearer token enabling the admin API under `/v1`; the API is off without it. Read from
    /// `COPILOT_ADMIN_TOKEN` only, never from a flag (argv is visible in `ps`).
    #[arg(skip)]
    #[serde(skip)]
    pub admin_token: Option<SecretString>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The resolved settings, every value present.
#[derive(Debug, Clone)]
pub struct Settings {
    pub amqp_url: String,
    pub database_url: String,
    pub http_addr: SocketAddr,
    pub topology_prefix: String,
    pub db_pool_size: usize,
    pub prefetch: u16,
    pub delivery_limit: u32,
    /// None: never renew an idle consumer.
    pub idle_consumer_renew: Option<Duration>,
    pub max_event_bytes: usize,
    pub workers_dir: PathBuf,
    pub schemas_dir: PathBuf,
    pub endpoint_policy: EndpointPolicy,
    /// None: providers are called directly.
    pub provider_proxy: Option<crate::provider::proxy::Proxy>,
    pub provider_timeout: Duration,
    pub provider_max_attempts: u32,
    pub shutdown_grace: Duration,
    pub dead_letter_failures: bool,
    /// 0: never prune.
    pub ledger_retention_days: u32,
    pub log_format: LogFormat,
    pub admin_token: Option<SecretString>,
}

/// Which provider addresses an operator allows beyond the public internet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Loopback (127/8, ::1) may be used.
    pub allow_loopback: bool,
    /// Private ranges may be used.
    pub allow_private: bool,
}

/// A setting that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl SettingsArgs {
    /// Fills every unset field from the config file, if one was named.
    fn merged_with_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = read_file(&path)?;
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = file.$field; } )* };
        }
        fill!(
            amqp_url,
            database_url,
            http_addr,
            topology_prefix,
            db_pool_size,
            prefetch,
            delivery_limit,
            idle_consumer_renew_secs,
            max_event_bytes,
            workers_dir,
            schemas_dir,
            allow_loopback_providers,
            allow_private_providers,
            provider_proxy,
            provider_no_proxy,
            provider_timeout_secs,
            provider_max_attempts,
            shutdown_grace_secs,
            dead_letter_failures,
            ledger_retention_days,
            log_format
        );
        Ok(self)
    }

    /// Resolves flags, environment, file and defaults into [`Settings`], reporting every
    /// invalid value together.
    pub fn resolve(mut self) -> Result<Settings, ConfigError> {
        if self.provider_proxy.is_none() {
            self.provider_proxy = std::env::var("COPILOT_PROVIDER_PROXY")
                .ok()
                .filter(|url| !url.trim().is_empty());
        }
        let args = self.merged_with_file()?;
        let mut problems = Vec::new();
        let provider_proxy = match &args.provider_proxy {
            Some(url) => {
                let no_proxy = args.provider_no_proxy.as_deref().unwrap_or_default();
                crate::provider::proxy::Proxy::parse(url.trim(), no_proxy)
                    .map_err(|problem| problems.push(problem))
                    .ok()
            }
            None => None,
        };
        let prefetch = args.prefetch.unwrap_or(200);
        if prefetch == 0 {
            problems.push("prefetch must be at least 1".to_owned());
        }
        let delivery_limit = args.delivery_limit.unwrap_or(10);
        if delivery_limit == 0 {
            problems.push("delivery_limit must be at least 1".to_owned());
        }
        let provider_max_attempts = args.provider_max_attempts.unwrap_or(4);
        if provider_max_attempts == 0 {
            problems.push("provider_max_attempts must be at least 1".to_owned());
        }
        let max_event_bytes = args.max_event_bytes.unwrap_or(1024 * 1024);
        if max_event_bytes == 0 {
            problems.push("max_event_bytes must be at least 1".to_owned());
        }
        let topology_prefix = args.topology_prefix.unwrap_or_default();
        let db_pool_size = args.db_pool_size.unwrap_or(4);
        if db_pool_size == 0 {
            problems.push("db_pool_size must be at least 1".to_owned());
        }
        if topology_prefix.len() > 100 {
            problems.push("topology_prefix must be at most 100 bytes".to_owned());
        }
        let database_url = args
            .database_url
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/copilot".to_owned());
        if let Err(err) = crate::store::tls::Target::parse(&database_url) {
            problems.push(format!("database_url is not a usable Postgres URL: {err}"));
        }
        let amqp_url = args
            .amqp_url
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            problems.push("amqp_url must start with amqp:// or amqps://".to_owned());
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Settings {
            amqp_url,
            database_url,
            http_addr: args
                .http_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9464))),
            topology_prefix,
            db_pool_size,
            prefetch,
            delivery_limit,
            idle_consumer_renew: match args.idle_consumer_renew_secs.unwrap_or(30) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            max_event_bytes,
            workers_dir: args
                .workers_dir
                .unwrap_or_else(|| crate::workers::DEFAULT_WORKERS_DIR.into()),
            schemas_dir: args
                .schemas_dir
                .unwrap_or_else(|| crate::workers::DEFAULT_SCHEMAS_DIR.into()),
            endpoint_policy: EndpointPolicy {
                allow_loopback: args.allow_loopback_providers.unwrap_or(false),
                allow_private: args.allow_private_providers.unwrap_or(false),
            },
            provider_proxy,
            provider_timeout: Duration::from_secs(args.provider_timeout_secs.unwrap_or(60)),
            provider_max_attempts,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs.unwrap_or(25)),
            dead_letter_failures: args.dead_letter_failures.unwrap_or(false),
            ledger_retention_days: args.ledger_retention_days.unwrap_or(90),
            log_format: args.log_format.unwrap_or_default(),
            admin_token: args.admin_token.or_else(|| {
                std::env::var("COPILOT_ADMIN_TOKEN")
                    .ok()
                    .filter(|token| !token.is_empty())
                    .map(SecretString::from)
            }),
        })
    }
}

fn read_file(path: &Path) -> Result<SettingsArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        problems: vec![format!("cannot read config file {}: {err}", path.display())],
    })?;
    toml::from_str(&text).map_err(|err| ConfigError {
        problems: vec![format!("config file {}: {err}", path.display())],
    })
}

impl Settings {
    /// Settings with every default, for tests and embedding.
    pub fn defaults() -> Settings {
        match SettingsArgs::default().resolve() {
            Ok(settings) => settings,
            // The defaults above are constants that validate; a failure is a bug in this file.
            Err(err) => unreachable!("default settings are invalid: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported() {
        let args = SettingsArgs {
            prefetch: Some(0),
            delivery_limit: Some(0),
            max_event_bytes: Some(0),
            amqp_url: Some("http://nope".into()),
            ..Default::default()
        };
        let err = args.resolve().unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        assert!(err.to_string().contains("max_event_bytes"), "{err}");
    }

    #[test]
    fn file_fills_only_what_flags_left_unset() {
        let dir = std::env::temp_dir().join(format!("cw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "prefetch = 7\ndelivery_limit = 3\n").unwrap();
        let args = SettingsArgs {
            config: Some(path),
            prefetch: Some(50),
            ..Default::default()
        };
        let settings = args.resolve().unwrap();
        assert_eq!(settings.prefetch, 50);
        assert_eq!(settings.delivery_limit, 3);
    }
}
