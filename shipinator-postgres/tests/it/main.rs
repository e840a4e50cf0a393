//! PostgreSQL store tests against a real throwaway cluster started from the machine's
//! PostgreSQL binaries (one cluster per test binary, a fresh database per test).

mod atomicity;
mod batches;
mod concurrency;
mod conformance;
mod enums;
mod outage;
mod wakeups;

use shipinator_postgres::testing::TestCluster;
use shipinator_postgres::{PgStore, PgStoreOptions};

/// A store on a fresh database of the shared cluster.
pub(crate) async fn fresh_store(max_connections: u32) -> anyhow::Result<PgStore> {
    let cluster = tokio::task::spawn_blocking(TestCluster::shared)
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = cluster.create_database().await?;
    Ok(PgStore::connect_with(
        &url,
        PgStoreOptions::default().max_connections(max_connections),
    )
    .await?)
}
