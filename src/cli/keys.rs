//! `copilot-workers keys rotate`: re-seal every stored API key under the active master key.
//!
//! Safe while workers run: each row is replaced only if it still holds the ciphertext that was
//! read, and workers holding the old key in their ring keep decrypting until they restart.

use crate::admin::rotate;
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Re-encrypt every stored API key under the active (first) master key.
    Rotate,
}

pub async fn run(settings: &Settings, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Rotate => {
            let keys = KeyRing::from_env()?;
            let store = Store::connect(&settings.database_url, 2)?;
            let report = rotate(&store, &keys).await?;
            println!(
                "rotated {} key(s) to master key {}; {} already current; {} changed concurrently (left as written)",
                report.rotated,
                keys.active_key_id(),
                report.current,
                report.raced
            );
            Ok(())
        }
    }
}
