//! Creating the database when it is missing and applying `migrations/` with refinery.
//!
//! The SQL files are embedded at build time, so the binary carries its schema. A migration is
//! never edited once it has landed: the next change is a new `V<n>__<name>.sql`.

use super::StoreError;
use super::tls::Target;

refinery::embed_migrations!("migrations");

/// The advisory lock key that serializes migrations ("copilot" in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_6f70_696c_6f74;

/// Creates the target database if it does not exist, then applies pending migrations.
/// Returns the names of the migrations applied by this call.
pub async fn migrate(database_url: &str) -> Result<Vec<String>, StoreError> {
    let target = Target::parse(database_url)?;
    ensure_database(&target).await?;
    let (mut client, _messages, driver) = target.connect().await?;
    // Replicas and jobs may migrate at once: the second waits here, then finds nothing to do.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = migrations::runner()
        .set_abort_divergent(true)
        .run_async(&mut client)
        .await
        .map_err(|err| StoreError::Invalid(format!("migration failed: {err}")))?;
    drop(client);
    let _ = driver.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|migration| migration.to_string())
        .collect())
}

/// Connects to the server's `postgres` database and creates the target one when missing.
/// Two replicas racing to create it is fine: the loser sees `duplicate_database`.
async fn ensure_database(target: &Target) -> Result<(), StoreError> {
    let mut admin = target.clone();
    let Some(dbname) = admin.config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    admin.config.dbname("postgres");
    let (client, _messages, driver) = admin.connect().await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&dbname])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", dbname.replace('"', "\"\""));
        if let Err(err) = client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
            && err.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
        {
            return Err(err.into());
        }
        tracing::info!(database = %dbname, "created database");
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}
