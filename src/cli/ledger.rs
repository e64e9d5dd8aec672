//! `copilot-workers ledger prune`: apply the retention period now instead of waiting for the
//! workers' hourly round, say after lowering `COPILOT_LEDGER_RETENTION_DAYS` or with the
//! workers stopped. Safe while workers run: rounds take disjoint rows.

use crate::config::Settings;
use crate::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum LedgerCommand {
    /// Delete decided results older than the retention period (`--ledger-retention-days`),
    /// their provider usage kept as daily totals for `org usage`, and lapsed claims.
    Prune,
}

pub async fn run(settings: &Settings, command: LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Prune => {
            let keep_days = settings.ledger_retention_days;
            let store = Store::connect(&settings.database_url, 2)?;
            let results = if keep_days == 0 {
                "retention is 0 days (keep every result): no result pruned".to_owned()
            } else {
                let rows = store.prune_ledger(keep_days).await?;
                format!("pruned {rows} result(s) older than {keep_days} days (their usage is kept)")
            };
            // Running workers purge these every few seconds; stopped ones leave them.
            let claims = store.purge_lapsed_claims().await?;
            println!("{results}; {claims} lapsed claim(s) removed");
            Ok(())
        }
    }
}
