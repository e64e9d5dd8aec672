//! The AI workers, defined as data: one `workers/<name>.toml` per worker naming the event
//! types it reacts to, its prompt templates, its output JSON Schema (in `schemas/`) and its
//! default model parameters. Adding a worker means adding files; the pipeline is generic.

mod builtin;
mod output;
mod prompt;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

pub use output::{OutputError, strip_fences};
pub use prompt::{Prepared, TrimReport};

use crate::events::EventType;

/// One worker spec file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// Worker name: lowercase letters, digits and `_`; names its queue and routing keys.
    pub name: String,
    /// One line for operators.
    #[serde(default)]
    pub description: String,
    /// Event types this worker reacts to.
    pub events: Vec<EventType>,
    /// Path of the output JSON Schema, relative to the schemas directory.
    pub output_schema: PathBuf,
    /// Default sampling temperature (an org's own setting wins).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Default completion token cap (an org's own setting wins).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Estimated prompt tokens the ticket may use before older messages are cut.
    #[serde(default = "default_budget")]
    pub input_token_budget: usize,
    /// Output field that must be one of the org's own categories when it has a list.
    #[serde(default)]
    pub category_field: Option<String>,
    /// System prompt template (minijinja).
    pub system: String,
    /// User prompt template (minijinja).
    pub prompt: String,
}

fn default_budget() -> usize {
    3000
}

/// Why the workers could not be loaded. Start-up refuses to run with any of these.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("no worker named {0:?} (known: {1})")]
    Unknown(String, String),
    #[error("rendering the prompt of {worker} failed: {reason}")]
    Render { worker: String, reason: String },
}

/// A loaded, checked worker: its spec, compiled schema and templates.
pub struct Worker {
    pub spec: WorkerSpec,
    schema: Arc<Value>,
    /// The schema serialized once, for prompts.
    schema_text: String,
    validator: jsonschema::Validator,
    templates: minijinja::Environment<'static>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.spec.name)
            .finish()
    }
}

impl Worker {
    /// Builds a worker from its spec and its output schema.
    pub fn new(spec: WorkerSpec, schema: Value, origin: &str) -> Result<Worker, WorkerError> {
        let invalid = |reason: String| WorkerError::Invalid {
            path: origin.to_owned(),
            reason,
        };
        let valid_name = !spec.name.is_empty()
            && spec.name.len() <= 64
            && spec
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            return Err(invalid(format!(
                "worker name {:?} must be 1-64 lowercase letters, digits or _",
                spec.name
            )));
        }
        if spec.events.is_empty() {
            return Err(invalid("`events` is empty".into()));
        }
        let validator = jsonschema::validator_for(&schema)
            .map_err(|err| invalid(format!("output schema does not compile: {err}")))?;
        let mut templates = minijinja::Environment::new();
        templates.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        templates
            .add_template_owned("system", spec.system.clone())
            .map_err(|err| invalid(format!("system template: {err}")))?;
        templates
            .add_template_owned("prompt", spec.prompt.clone())
            .map_err(|err| invalid(format!("prompt template: {err}")))?;
        let schema_text = serde_json::to_string(&schema).unwrap_or_default();
        Ok(Worker {
            spec,
            schema: Arc::new(schema),
            schema_text,
            validator,
            templates,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The event types it reacts to (its queue is bound to these only).
    pub fn events(&self) -> &[EventType] {
        &self.spec.events
    }

    pub fn handles(&self, kind: EventType) -> bool {
        self.spec.events.contains(&kind)
    }

    /// The output schema as written.
    pub fn schema(&self) -> &Arc<Value> {
        &self.schema
    }
}

/// The set of workers this process knows.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    workers: Vec<Arc<Worker>>,
}

/// Where worker specs are read when no directory is configured.
pub const DEFAULT_WORKERS_DIR: &str = "workers";
/// Where output schemas are read when no directory is configured.
pub const DEFAULT_SCHEMAS_DIR: &str = "schemas";

/// Whether `dir` is the default one and absent: its files then come from the binary.
fn built_in_instead(dir: &Path, default: &str) -> bool {
    let absent = dir == Path::new(default) && !dir.exists();
    if absent {
        tracing::info!("no {default}/ directory here: using the {default} built into this binary");
    }
    absent
}

fn read_error(path: &Path, err: std::io::Error) -> WorkerError {
    WorkerError::Read {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

/// Every `*.toml` of `dir`, as (path, text), in name order.
fn read_specs(dir: &Path) -> Result<Vec<(String, String)>, WorkerError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|err| read_error(dir, err))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|err| read_error(&path, err))?;
            Ok((path.display().to_string(), text))
        })
        .collect()
}

impl Catalog {
    /// Loads every `*.toml` in `workers_dir`, resolving schemas against `schemas_dir`. Either
    /// directory, when it is the default one and absent, is replaced by the set built into the
    /// binary (`builtin.rs`); a directory named otherwise must exist.
    pub fn load(workers_dir: &Path, schemas_dir: &Path) -> Result<Catalog, WorkerError> {
        let specs = if built_in_instead(workers_dir, DEFAULT_WORKERS_DIR) {
            builtin::SPECS
                .iter()
                .map(|(path, text)| (format!("(built in) {path}"), (*text).to_owned()))
                .collect()
        } else {
            read_specs(workers_dir)?
        };
        let schemas_built_in = built_in_instead(schemas_dir, DEFAULT_SCHEMAS_DIR);
        let mut workers = Vec::new();
        let mut names = BTreeSet::new();
        for (origin, text) in specs {
            let spec: WorkerSpec = toml::from_str(&text).map_err(|err| WorkerError::Invalid {
                path: origin.clone(),
                reason: err.to_string(),
            })?;
            let schema_path = schemas_dir.join(&spec.output_schema);
            let schema_text = if schemas_built_in {
                builtin::schema(&spec.output_schema)
                    .map(str::to_owned)
                    .ok_or_else(|| WorkerError::Invalid {
                        path: origin.clone(),
                        reason: format!(
                            "no built-in schema {} (set COPILOT_SCHEMAS_DIR)",
                            spec.output_schema.display()
                        ),
                    })?
            } else {
                std::fs::read_to_string(&schema_path)
                    .map_err(|err| read_error(&schema_path, err))?
            };
            let schema: Value =
                serde_json::from_str(&schema_text).map_err(|err| WorkerError::Invalid {
                    path: schema_path.display().to_string(),
                    reason: err.to_string(),
                })?;
            if !names.insert(spec.name.clone()) {
                return Err(WorkerError::Invalid {
                    path: origin,
                    reason: format!("a second worker is named {:?}", spec.name),
                });
            }
            workers.push(Arc::new(Worker::new(spec, schema, &origin)?));
        }
        if workers.is_empty() {
            return Err(WorkerError::Invalid {
                path: workers_dir.display().to_string(),
                reason: "no worker specs (*.toml) found".into(),
            });
        }
        Ok(Catalog { workers })
    }

    pub fn all(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Worker>> {
        self.workers.iter().find(|worker| worker.name() == name)
    }

    /// Keeps only the named workers (`run --workers a,b`); an unknown name is an error.
    pub fn select(&self, names: &[String]) -> Result<Catalog, WorkerError> {
        if names.is_empty() {
            return Ok(self.clone());
        }
        let mut workers = Vec::new();
        for name in names {
            let worker = self.get(name).ok_or_else(|| {
                let known: Vec<&str> = self.workers.iter().map(|w| w.name()).collect();
                WorkerError::Unknown(name.clone(), known.join(", "))
            })?;
            workers.push(worker.clone());
        }
        Ok(Catalog { workers })
    }
}
