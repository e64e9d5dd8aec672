//! The command line: one file per subcommand.

mod bench;
pub mod demo;
mod keys;
mod migrate;
mod org;
mod publish;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::SettingsArgs;

/// Event-driven BYOK AI workers for Tickets Copilot.
#[derive(Debug, Parser)]
#[command(name = "copilot-workers", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume ticket events and publish enriched results.
    Run(run::RunArgs),
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// Manage organizations' provider configs.
    #[command(subcommand)]
    Org(org::OrgCommand),
    /// Manage master keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Publish a ticket event from a file, as a helpdesk would.
    Publish(publish::PublishArgs),
    /// The whole loop on this machine with a built-in fake provider; no API key needed.
    Demo(demo::DemoArgs),
    /// Measure throughput, overhead, memory and CPU against the broker's own limit.
    Bench(bench::BenchArgs),
}

/// Runs a parsed command line and turns its outcome into an exit code.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.settings.resolve()?;
    crate::telemetry::init_tracing(settings.log_format);
    match cli.command {
        Command::Run(args) => run::run(settings, args).await,
        Command::Migrate => migrate::run(&settings).await,
        Command::Org(command) => org::run(&settings, command).await,
        Command::Keys(command) => keys::run(&settings, command).await,
        Command::Publish(args) => publish::run(&settings, args).await,
        Command::Demo(args) => demo::run(settings, args).await,
        Command::Bench(args) => bench::run(settings, args).await,
    }
}
