//! `copilot-workers keys rotate`: re-seal every stored API key under the active master key.
//!
//! Safe while workers run: each row is replaced only if it still holds the ciphertext that was
//! read, and workers holding the old key in their ring keep decrypting until they restart.

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

/// What a rotation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RotationReport {
    pub rotated: usize,
    pub current: usize,
    pub raced: usize,
}

/// Re-seals every key not under the active master key.
pub async fn rotate(store: &Store, keys: &KeyRing) -> anyhow::Result<RotationReport> {
    let mut report = RotationReport::default();
    for config in store.provider_configs().await? {
        let Some(sealed) = config.api_key else {
            continue;
        };
        if sealed.key_id == keys.active_key_id() {
            report.current += 1;
            continue;
        }
        let plaintext = keys.open(&config.org_id, &sealed)?;
        let resealed = keys.seal(&config.org_id, &plaintext)?;
        if store
            .replace_sealed_key(&config.org_id, &sealed, &resealed)
            .await?
        {
            report.rotated += 1;
        } else {
            report.raced += 1;
        }
    }
    Ok(report)
}
