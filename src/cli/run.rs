//! `copilot-workers run`: the service, until SIGTERM or Ctrl-C.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::workers::Catalog;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Run only these workers (comma-separated); default: every worker in the workers directory.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
}

pub async fn run(settings: Settings, args: RunArgs) -> anyhow::Result<()> {
    let keys = Arc::new(KeyRing::from_env()?);
    let catalog =
        Catalog::load(&settings.workers_dir, &settings.schemas_dir)?.select(&args.workers)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    crate::service::run(&settings, keys, catalog, shutdown, None).await
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub(crate) async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}
