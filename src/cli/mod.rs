//! The command line: one file per subcommand.

mod bench;
mod dead_letters;
pub mod demo;
mod keys;
mod ledger;
mod migrate;
mod org;
mod publish;
mod results;
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
    /// Maintain the idempotency ledger.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Publish a ticket event from a file, as a helpdesk would.
    Publish(publish::PublishArgs),
    /// Watch results as a downstream consumer receives them (a queue of its own, deleted on
    /// exit).
    Results(results::ResultsArgs),
    /// Inspect dead letters; send them back to their worker once the cause is fixed, or purge
    /// them.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLettersCommand),
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
    let outcome = runtime.block_on(dispatch(cli));
    // Not dropped: dropping the runtime shuts its timers down under lapin's I/O threads, and
    // one that is waiting to reconnect (a broker gone when the command ended) panics there,
    // which printed a panic and a backtrace after a clean stop. The process ends here anyway;
    // everything that had to be finished (drained, closed, written) was, before this point.
    std::mem::forget(runtime);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// Fails, saying `consequence` and what to do, when `exchange` does not exist: the commands
/// that talk to the topology (`publish`, `results`) do not declare it, `run` does.
async fn require_exchange(
    link: &crate::broker::Link,
    exchange: &str,
    consequence: &str,
) -> anyhow::Result<()> {
    if crate::broker::Topology::exchange_exists(&*link.connection().await, exchange).await? {
        return Ok(());
    }
    link.close().await;
    anyhow::bail!(
        "exchange {exchange} does not exist: {consequence}. Start `copilot-workers run` once \
         (with the same COPILOT_TOPOLOGY_PREFIX) to declare the topology."
    )
}

/// An error and its causes in one line, each said once: many errors (deadpool's,
/// tokio-postgres') already print their cause, which the chain then gives again.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.settings.resolve()?;
    // These commands report the broker's refusals (a missing exchange or queue) in their own
    // error; lapin's log line of the same refusal (at ERROR, before it) would only repeat it.
    let levels = match cli.command {
        Command::Publish(_) | Command::Results(_) | Command::DeadLetters(_) => "info,lapin=off",
        _ => "info",
    };
    crate::telemetry::init_tracing_with(settings.log_format, levels);
    match cli.command {
        Command::Run(args) => run::run(settings, args).await,
        Command::Migrate => migrate::run(&settings).await,
        Command::Org(command) => org::run(&settings, command).await,
        Command::Keys(command) => keys::run(&settings, command).await,
        Command::Ledger(command) => ledger::run(&settings, command).await,
        Command::Publish(args) => publish::run(&settings, args).await,
        Command::Results(args) => results::run(&settings, args).await,
        Command::DeadLetters(command) => dead_letters::run(&settings, command).await,
        Command::Demo(args) => demo::run(settings, args).await,
        Command::Bench(args) => bench::run(settings, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = anyhow::Error::new(refused)
            .context("error connecting to server: refused")
            .context("database unavailable: error connecting to server: refused")
            .context("bench setup");
        assert_eq!(
            describe(&err),
            "bench setup: database unavailable: error connecting to server: refused"
        );
    }
}
