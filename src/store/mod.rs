//! Postgres: the connection pool, the schema migrations, provider configs and the ledger.

pub mod batch;
pub mod cache;
pub mod configs;
pub mod ledger;
pub mod migrations;
pub mod presence;
pub mod retention;
pub(crate) mod tls;

use std::time::Duration;

use deadpool_postgres::{Hook, ManagerConfig, Pool, RecyclingMethod, Runtime};

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

/// The pools; cheap to clone. `pool` serves everything but the hot path's batched ledger
/// statements, which have `hot`, a few connections of their own (see [`HOT_SESSION`]).
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    hot: Pool,
    /// Where the pools connect, for connections of their own (the config listener's).
    target: std::sync::Arc<tls::Target>,
}

/// Run on every new connection. Every statement is planned for its own parameters and the
/// tables as they are now: Postgres otherwise switches a prepared statement to a generic plan
/// kept for the connection's life, and on a new, nearly empty ledger that plan scans
/// `processed_events` once it has grown (seen with auto_explain: 1.5-2.7 s per batched `start`
/// statement at 60,000 rows). A `SET` rather than a startup option, which PgBouncer refuses.
const SESSION_SETUP: &str = "SET plan_cache_mode = force_custom_plan";

/// The hot path's connections plan each batched ledger statement once (a generic plan) when
/// the ledger is at least this large as the connection opens, and afresh at every execution
/// below it. Planning was a third of Postgres' CPU at saturation (`pg_stat_statements`:
/// 0.34 ms to plan a `start` statement that ran in 0.40). The statements are written so that
/// their plan has no choice but index lookups once the planner sees a ledger a tenth of this
/// size (a test checks the plans at both sizes); on an emptier or just-truncated ledger it
/// could pick scans that would be kept as the ledger grows, which is why small ledgers keep
/// planning afresh.
pub const GENERIC_PLANS_FROM_ROWS: f64 = 10_000.0;
/// How long a hot-path connection lives: a new install starts with a small ledger, and its
/// connections are renewed so that they move to kept plans once it has grown.
const HOT_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// The ledger's size as the planner sees it (`reltuples`; -1 when never analyzed or just
/// truncated, also when the table does not exist yet).
const LEDGER_ROWS: &str = "SELECT coalesce((SELECT reltuples FROM pg_class \
                           WHERE oid = to_regclass('processed_events')), -1)::float8";

/// Session setup of a hot-path connection: plans kept when the ledger is large enough.
const HOT_SESSION: &str = "SET plan_cache_mode = force_generic_plan";

impl Store {
    /// Builds the pools with every timeout set (deadpool's default is to wait forever).
    /// `max_size` bounds the shared pool; the hot path's pool has [`ledger::HOT_CONNECTIONS`]
    /// more. Connections are opened on first use. Recycling uses the `Fast` check (is the
    /// connection closed?) rather than a test query per checkout, which would double the
    /// round trips of the hot path: a connection the server terminated is closed, and one
    /// that fails mid-query is dropped and the step retried.
    pub fn connect(database_url: &str, max_size: usize) -> Result<Store, StoreError> {
        let mut target = tls::Target::parse(database_url)?;
        target.config.connect_timeout(Duration::from_secs(5));
        Ok(Store {
            pool: build_pool(&target, max_size, false)?,
            hot: build_pool(&target, ledger::HOT_CONNECTIONS, true)?,
            target: std::sync::Arc::new(target),
        })
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Where the pools connect.
    pub(crate) fn target(&self) -> &tls::Target {
        &self.target
    }

    /// A connection for the hot path's batched ledger statements.
    pub(crate) async fn hot_client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.hot.get().await?)
    }

    /// Whether a connection can be had and answers.
    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}

/// A pool of `max_size` connections with every timeout set; `hot` for the hot path's (see
/// [`HOT_SESSION`]), whose connections are renewed after [`HOT_CONNECTION_LIFETIME`].
fn build_pool(target: &tls::Target, max_size: usize, hot: bool) -> Result<Pool, StoreError> {
    let manager = target.manager(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    let mut builder = Pool::builder(manager)
        .max_size(max_size)
        // Waiting for a free connection is load, not an outage (an outage shows up as a
        // failed create, bounded below): thousands of in-flight events may queue here.
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .runtime(Runtime::Tokio1)
        .post_create(Hook::async_fn(move |client, _| {
            Box::pin(async move {
                set_up_session(client, hot).await;
                Ok(())
            })
        }));
    if hot {
        builder = builder.pre_recycle(Hook::sync_fn(|_, metrics| {
            if metrics.age() > HOT_CONNECTION_LIFETIME {
                return Err(deadpool_postgres::HookError::message("renewed"));
            }
            Ok(())
        }));
    }
    builder
        .build()
        .map_err(|err| StoreError::Url(err.to_string()))
}

/// Sets a new connection's planning: afresh for every statement, or (`hot`, and the ledger
/// large enough) plans kept. A failure only costs speed, so it is logged, not fatal.
async fn set_up_session(client: &tokio_postgres::Client, hot: bool) {
    let setup = async {
        client.batch_execute(SESSION_SETUP).await?;
        if hot {
            let rows: f64 = client.query_one(LEDGER_ROWS, &[]).await?.try_get(0)?;
            let keep = rows >= GENERIC_PLANS_FROM_ROWS;
            if keep {
                client.batch_execute(HOT_SESSION).await?;
            }
            report_planning(keep, rows);
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    if let Err(err) = setup.await {
        tracing::warn!(error = %StoreError::from(err), "cannot set plan_cache_mode; \
            Postgres may keep plans made while the ledger was small");
    }
}

/// Says once per process, and again whenever it changes, whether the hot path keeps its plans:
/// an operator whose ledger is never analyzed (autovacuum off) sees why it stays on the slower
/// mode.
fn report_planning(keep: bool, rows: f64) {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not said yet, 1: planning afresh, 2: keeping plans.
    static SAID: AtomicU8 = AtomicU8::new(0);
    let now = if keep { 2 } else { 1 };
    if SAID.swap(now, Ordering::Relaxed) == now {
        return;
    }
    let ledger_rows = rows.max(0.0) as u64;
    if keep {
        tracing::info!(ledger_rows, "ledger statements keep their plans");
    } else {
        tracing::info!(
            ledger_rows,
            from_rows = GENERIC_PLANS_FROM_ROWS as u64,
            "ledger statements are planned at each run until the ledger is larger"
        );
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

    /// The plan Postgres keeps for `sql` (parameters of `types`) executed with `args`.
    async fn kept_plan(
        client: &tokio_postgres::Client,
        sql: &str,
        types: &str,
        args: &str,
    ) -> String {
        client
            .batch_execute(&format!(
                "SET plan_cache_mode = force_generic_plan; DEALLOCATE ALL; \
                 PREPARE plan_of({types}) AS {sql}"
            ))
            .await
            .unwrap();
        client
            .query(&format!("EXPLAIN EXECUTE plan_of({args})"), &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The hot path's planning mode on a connection of a new pool over `database_url`, and
    /// the plans Postgres would keep there for its three statements.
    async fn hot_planning(database_url: &str) -> (String, String) {
        let store = Store::connect(database_url, 1).unwrap();
        let client = store.hot_client().await.unwrap();
        let mode: String = client
            .query_one("SHOW plan_cache_mode", &[])
            .await
            .unwrap()
            .get(0);
        let start = kept_plan(
            &client,
            ledger::BEGIN_RUNS,
            "text[], text[], text[], text[], text[], float8",
            "'{e}', '{w}', '{o}', '{t}', '{h}', 15",
        )
        .await;
        // A recorded result that lost a race is read back.
        let entry = kept_plan(&client, ledger::SELECT_ENTRY, "text, text", "'e', 'w'").await;
        let record = kept_plan(
            &client,
            ledger::RECORD_RESULTS,
            "text[], text[], text[], text[], text[], text[], text[], text[], text[], int4[], \
             int8[], int8[]",
            "'{e}', '{w}', '{o}', '{t}', '{r}', '{completed}', '{h}', '{\"{}\"}', '{m}', \
             '{1}', '{1}', '{1}'",
        )
        .await;
        (mode, format!("{start}\n{entry}\n{record}"))
    }

    /// Against the local Postgres, on a database of its own: hot-path connections keep their
    /// plans only once the ledger is large, and the kept plans look the ledger up by index
    /// only (a scan kept in a plan would read the whole ledger for every event).
    #[tokio::test]
    async fn hot_connections_keep_index_only_plans_once_the_ledger_is_large() {
        let name = format!(
            "copilot_plans_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        migrations::migrate(&url).await.unwrap();
        let store = Store::connect(&url, 1).unwrap();
        // A tenth of the threshold: plans are not kept yet, but the statements are written so
        // that they would already be index lookups (the `start` statement before its LATERAL
        // form hashed a scan of the whole ledger here).
        store.seed_bench_ledger(1_000).await.unwrap();
        let small = hot_planning(&url).await;
        let rest = GENERIC_PLANS_FROM_ROWS as i32 - 1_000;
        let client = store.client().await.unwrap();
        client
            .execute(
                "INSERT INTO processed_events (event_id, worker, org_id, ticket_id, result_id, \
                 outcome, result) SELECT 'more-' || g, 'summarize', 'more-org', 'M-' || g, \
                 'more-' || g, 'completed', '{}' FROM generate_series(1, $1::int4) g",
                &[&rest],
            )
            .await
            .unwrap();
        client
            .batch_execute("ANALYZE processed_events")
            .await
            .unwrap();
        // The keys the hot path looks up compare as bytes (V9), and the lookups below still
        // use their indexes: a column's collation wins over the parameters' default one.
        let collations: Vec<(String, String)> = client
            .query(
                "SELECT table_name::text || '.' || column_name::text, \
                 coalesce(collation_name::text, '') FROM information_schema.columns \
                 WHERE table_name IN ('processed_events', 'event_claims') \
                 AND column_name IN ('event_id', 'worker', 'org_id', 'ticket_id')",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(collations.len(), 6, "{collations:?}");
        assert!(collations.iter().all(|(_, c)| c == "C"), "{collations:?}");
        drop(client);
        let large = hot_planning(&url).await;
        let (admin, connection) = tokio_postgres::connect(
            "postgres://postgres@127.0.0.1:5432/postgres",
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
            .await
            .unwrap();

        assert_eq!(small.0, "force_custom_plan");
        assert_eq!(large.0, "force_generic_plan");
        for plan in [small.1, large.1] {
            assert!(!plan.contains("Seq Scan"), "{plan}");
            assert!(!plan.contains("Hash"), "{plan}");
            assert!(
                plan.contains("Index Scan using processed_events_pkey"),
                "{plan}"
            );
            assert!(
                plan.contains("Index Scan using processed_events_last_completed"),
                "{plan}"
            );
        }
    }
}
