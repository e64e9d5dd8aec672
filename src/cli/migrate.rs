//! `copilot-workers migrate`.

use crate::config::Settings;

pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let applied = crate::store::migrations::migrate(&settings.database_url).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        for name in applied {
            println!("applied {name}");
        }
    }
    Ok(())
}
