//! Postgres: the connection pool, the schema migrations, provider configs and the ledger.

pub mod batch;
pub mod cache;
pub mod configs;
pub mod ledger;
pub mod migrations;

use std::time::Duration;

use deadpool_postgres::{Hook, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// What can go wrong talking to Postgres. Every variant is worth retrying later except
/// `Invalid`, which means a row holds something this version cannot read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("stored row is invalid: {0}")]
    Invalid(String),
    /// The statement this request was batched into failed (the first request of the batch
    /// carries the cause).
    #[error("database unavailable: a batched statement failed: {0}")]
    Batch(String),
    #[error("the ledger batcher has stopped")]
    Closed,
}

/// The server's message and SQLSTATE when Postgres refused a statement (tokio-postgres's own
/// text is only "db error"); otherwise the error and its cause.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    }
}

impl StoreError {
    /// Whether the database itself refused the statement (as opposed to being unreachable):
    /// then one row of a batch may be the cause.
    pub fn is_from_database(&self) -> bool {
        match self {
            StoreError::Query(err) => err.as_db_error().is_some(),
            StoreError::Invalid(_) => true,
            _ => false,
        }
    }

    /// Whether this is only a wait for a free connection that ran out: load, not an outage.
    pub fn is_pool_busy(&self) -> bool {
        matches!(
            self,
            StoreError::Pool(deadpool_postgres::PoolError::Timeout(
                deadpool_postgres::TimeoutType::Wait
            ))
        )
    }
}

/// The shared pool; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// Run on every new connection. Every statement is planned for its own parameters and the
/// tables as they are now: Postgres otherwise switches a prepared statement to a generic plan
/// kept for the connection's life, and on a new, nearly empty ledger that plan scans
/// `processed_events` once it has grown (seen with auto_explain: 1.5-2.7 s per batched `start`
/// statement at 60,000 rows). Planning costs 0.25-0.5 ms per statement, and the batched
/// statements were planned per execution most of the time anyway (their arrays vary in
/// length). A `SET` rather than a startup option, which PgBouncer refuses.
const SESSION_SETUP: &str = "SET plan_cache_mode = force_custom_plan";

impl Store {
    /// Builds a pool with every timeout set (deadpool's default is to wait forever). Recycling
    /// uses the `Fast` check (is the connection closed?) rather than a test query per
    /// checkout, which would double the round trips of the hot path: a connection the server
    /// terminated is closed, and one that fails mid-query is dropped and the step retried.
    pub fn connect(database_url: &str, max_size: usize) -> Result<Store, StoreError> {
        let mut config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|err: tokio_postgres::Error| StoreError::Url(err.to_string()))?;
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("copilot-workers");
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            // Waiting for a free connection is load, not an outage (an outage shows up as a
            // failed create, bounded below): thousands of in-flight events may queue here.
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .runtime(Runtime::Tokio1)
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move {
                    if let Err(err) = client.batch_execute(SESSION_SETUP).await {
                        tracing::warn!(error = %StoreError::from(err), "cannot set plan_cache_mode; \
                            Postgres may keep plans made while the ledger was small");
                    }
                    Ok(())
                })
            }))
            .build()
            .map_err(|err| StoreError::Url(err.to_string()))?;
        Ok(Store { pool })
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Whether a connection can be had and answers.
    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the local Postgres: every pooled connection plans each statement afresh.
    #[tokio::test]
    async fn pooled_connections_plan_each_statement_afresh() {
        let store = Store::connect("postgres://postgres@127.0.0.1:5432/postgres", 2).unwrap();
        let client = store.client().await.unwrap();
        let row = client.query_one("SHOW plan_cache_mode", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "force_custom_plan");
    }
}
