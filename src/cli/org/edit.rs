//! `org set` and `org update`: a config replaced whole, or some of its settings changed.
//!
//! The API key is read from stdin, a file or a named environment variable — never from a
//! command-line argument, which would land in shell history and `ps`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use secrecy::{ExposeSecret, SecretString};

use super::describe;
use crate::admin::{self, ConfigInput, FieldProblem};
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::provider::Profile;
use crate::store::Store;
use crate::store::configs::{Edited, ModelParams, OrgContext};

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// The org's id, as events carry it in `data.org_id`.
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
    #[command(flatten)]
    pub key: KeyArgs,
    /// Only these workers run for the org (comma-separated); default: all.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// The org's ticket categories (comma-separated); triage picks only from these.
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// Store the config disabled. Without it, an existing config keeps its state (`org
    /// enable`, `org disable`) and a new one is enabled.
    #[arg(long)]
    pub disabled: bool,
}

/// Where a new API key comes from; never a command-line argument.
#[derive(Debug, clap::Args)]
#[group(multiple = false)]
pub struct KeyArgs {
    /// Read the API key from standard input. Without any of the three, the stored key is kept,
    /// but only while the base URL keeps its scheme, host and port: a stored key is never
    /// sent to another origin.
    #[arg(long)]
    pub api_key_stdin: bool,
    /// Read the API key from a file.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Read the API key from this environment variable.
    #[arg(long)]
    pub api_key_env: Option<String>,
}

/// The settings `org set` and `org update` take alike.
#[derive(Debug, clap::Args)]
pub struct TuningArgs {
    /// Sampling temperature (0 to 2) for every worker; default: each worker's own (its spec).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Most completion tokens per request, for every worker; default: each worker's own.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Provider request timeout in seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Azure `api-version`.
    #[arg(long)]
    pub api_version: Option<String>,
    /// Per-worker model override, `worker=model`; repeatable (`org update` keeps the
    /// overrides it does not name).
    #[arg(long = "worker-model")]
    pub worker_models: Vec<String>,
    /// Tone for reply drafts.
    #[arg(long)]
    pub reply_tone: Option<String>,
    /// Language for reply drafts (ISO 639-1).
    #[arg(long)]
    pub reply_language: Option<String>,
    /// Most provider calls in flight at once for this org, across all worker replicas (each
    /// takes a share). Default: none; each replica then holds the org to 32.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The org's id, as events carry it in `data.org_id`.
    pub org: String,
    /// Provider profile.
    #[arg(long, value_enum)]
    pub provider: Option<Profile>,
    /// Base URL of the OpenAI-compatible API (for Azure, the deployment URL).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Default model.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Only these workers run for the org (comma-separated); `--unset workers` runs them all.
    #[arg(long, value_delimiter = ',')]
    pub workers: Option<Vec<String>>,
    /// The org's ticket categories (comma-separated), in place of the stored ones.
    #[arg(long, value_delimiter = ',')]
    pub categories: Option<Vec<String>>,
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// Take a setting back to its default; repeatable: temperature, max-tokens, timeout-secs,
    /// api-version, workers (all run), worker-models (none), worker-model=WORKER (that
    /// worker's override), categories, reply-tone, reply-language, max-concurrency.
    #[arg(long, value_name = "SETTING")]
    pub unset: Vec<String>,
}

/// Where a setting `org update --unset` names sits in the config's JSON.
fn unset_path(name: &str) -> Option<Vec<&str>> {
    let path = match name {
        "temperature" => vec!["params", "temperature"],
        "max-tokens" => vec!["params", "max_tokens"],
        "timeout-secs" => vec!["params", "timeout_secs"],
        "api-version" => vec!["params", "api_version"],
        "workers" => vec!["workers"],
        "worker-models" => vec!["worker_models"],
        "categories" => vec!["context", "categories"],
        "reply-tone" => vec!["context", "reply_tone"],
        "reply-language" => vec!["context", "reply_language"],
        "max-concurrency" => vec!["max_concurrency"],
        _ => match name.strip_prefix("worker-model=") {
            Some(worker) if !worker.is_empty() => vec!["worker_models", worker],
            _ => return None,
        },
    };
    Some(path)
}

impl UpdateArgs {
    /// The merge patch these flags make (without the key, which never goes into JSON).
    fn patch(&self) -> Result<serde_json::Value, Vec<FieldProblem>> {
        use serde_json::{Value, json};
        let mut problems = Vec::new();
        let mut patch = json!({});
        // Indexing makes a missing or null member an object; every member written here is
        // an object, null, or a leaf no later path goes through, so it cannot panic.
        let mut set = |path: &[&str], value: Value| {
            let mut at = &mut patch;
            for name in path {
                at = &mut at[*name];
            }
            *at = value;
        };
        if self.unset.iter().any(|name| name == "worker-models")
            && !self.tuning.worker_models.is_empty()
        {
            problems.push(FieldProblem::new(
                "--unset",
                "worker-models and --worker-model together: unset the overrides in one update, \
                 then add the new ones",
            ));
        }
        for name in &self.unset {
            match unset_path(name) {
                Some(path) => set(&path, Value::Null),
                None => problems.push(FieldProblem::new(
                    "--unset",
                    format!("{name:?} is not a setting that can be unset (see --help)"),
                )),
            }
        }
        if let Some(provider) = self.provider {
            set(&["provider"], json!(provider));
        }
        if let Some(url) = &self.base_url {
            set(&["base_url"], json!(url));
        }
        if let Some(model) = &self.model {
            set(&["model"], json!(model));
        }
        if let Some(temperature) = self.tuning.temperature {
            set(&["params", "temperature"], json!(temperature));
        }
        if let Some(tokens) = self.tuning.max_tokens {
            set(&["params", "max_tokens"], json!(tokens));
        }
        if let Some(secs) = self.tuning.timeout_secs {
            set(&["params", "timeout_secs"], json!(secs));
        }
        if let Some(version) = &self.tuning.api_version {
            set(&["params", "api_version"], json!(version));
        }
        if let Some(workers) = &self.workers {
            set(&["workers"], json!(workers));
        }
        for (worker, model) in worker_models(&self.tuning.worker_models, &mut problems) {
            set(&["worker_models", &worker], json!(model));
        }
        if let Some(categories) = &self.categories {
            set(&["context", "categories"], json!(categories));
        }
        if let Some(tone) = &self.tuning.reply_tone {
            set(&["context", "reply_tone"], json!(tone));
        }
        if let Some(language) = &self.tuning.reply_language {
            set(&["context", "reply_language"], json!(language));
        }
        if let Some(cap) = self.tuning.max_concurrency {
            set(&["max_concurrency"], json!(cap));
        }
        if problems.is_empty() {
            Ok(patch)
        } else {
            Err(problems)
        }
    }
}

/// `worker=model` pairs; a pair without `=` is a problem.
fn worker_models(pairs: &[String], problems: &mut Vec<FieldProblem>) -> BTreeMap<String, String> {
    let mut models = BTreeMap::new();
    for pair in pairs {
        match pair.split_once('=') {
            Some((worker, model)) => {
                models.insert(worker.to_owned(), model.to_owned());
            }
            None => problems.push(FieldProblem::new(
                "--worker-model",
                format!("{pair:?} must look like worker=model"),
            )),
        }
    }
    models
}

fn read_key(args: &KeyArgs) -> anyhow::Result<Option<SecretString>> {
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

pub async fn set(settings: &Settings, store: &Store, args: SetArgs) -> anyhow::Result<()> {
    let keys = KeyRing::from_env()?;
    let mut problems = Vec::new();
    let worker_models = worker_models(&args.tuning.worker_models, &mut problems);
    let input = ConfigInput {
        provider: args.provider,
        base_url: args.base_url.clone(),
        model: args.model.clone(),
        api_key: read_key(&args.key)?,
        params: ModelParams {
            temperature: args.tuning.temperature,
            max_tokens: args.tuning.max_tokens,
            timeout_secs: args.tuning.timeout_secs,
            api_version: args.tuning.api_version.clone(),
        },
        workers: (!args.workers.is_empty()).then(|| args.workers.clone()),
        worker_models,
        context: OrgContext {
            categories: args.categories.clone(),
            reply_tone: args.tuning.reply_tone.clone(),
            reply_language: args.tuning.reply_language.clone(),
        },
        max_concurrency: args.tuning.max_concurrency,
        enabled: args.disabled.then_some(false),
    };
    if !problems.is_empty() {
        bail!("invalid org config:\n  - {}", join(&problems));
    }
    let edited = store
        .edit_provider_config(&args.org, |stored| {
            input.into_config(&args.org, stored, &keys, settings.endpoint_policy)
        })
        .await?;
    show_edit(edited, &keys)
}

pub async fn update(settings: &Settings, store: &Store, args: UpdateArgs) -> anyhow::Result<()> {
    let keys = KeyRing::from_env()?;
    let patch = match args.patch() {
        Ok(patch) => patch,
        Err(problems) => bail!("invalid org config:\n  - {}", join(&problems)),
    };
    let api_key = read_key(&args.key)?;
    let edited = store
        .edit_provider_config(&args.org, |stored| {
            let Some(stored) = stored else {
                return Err(vec![FieldProblem::new(
                    "org",
                    format!(
                        "{} has no provider config (create one with `org set`)",
                        args.org
                    ),
                )]);
            };
            let mut input =
                admin::patch::patched(stored, patch).map_err(|problem| vec![problem])?;
            input.api_key = api_key;
            input.into_config(&args.org, Some(stored), &keys, settings.endpoint_policy)
        })
        .await?;
    show_edit(edited, &keys)
}

/// Prints the stored config, or fails with every problem that kept it from being stored.
fn show_edit(edited: Result<Edited, Vec<FieldProblem>>, keys: &KeyRing) -> anyhow::Result<()> {
    match edited {
        Ok(edited) => {
            if !edited.changed {
                eprintln!("nothing changed: the stored config already says this");
            }
            print!("{}", describe(&edited.config, keys));
            Ok(())
        }
        Err(problems) => bail!("invalid org config:\n  - {}", join(&problems)),
    }
}

fn join(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n  - ")
}
