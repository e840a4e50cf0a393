//! The database goes away mid-run (`pg_ctl stop -m immediate`) and comes back.

use std::time::Duration;

use shipinator_core::conformance::store::{fixture, new_run};
use shipinator_core::domain::{RunPhase, RunStatus, Trigger};
use shipinator_core::store::{Batch, Store, StoreError, Write};
use shipinator_postgres::testing::TestCluster;
use shipinator_postgres::{PgStore, PgStoreOptions};

fn start_run(run: &shipinator_core::domain::PipelineRun, phase: RunPhase) -> Batch {
    Batch {
        fences: Vec::new(),
        writes: vec![Write::UpdateRun {
            id: run.id,
            expected_version: run.version,
            status: RunStatus::Running,
            phase,
            started_at: Some(run.created_at),
            finished_at: None,
        }],
    }
}

/// Retries `op` with capped exponential backoff while it returns `Unavailable`, as a driver
/// does; bounded by `attempts`.
async fn with_backoff<T, F, Fut>(attempts: u32, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(50);
    let mut last = None;
    for _ in 0..attempts {
        match op().await {
            Err(e) if e.is_transient() => {
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
    Err(last.unwrap_or(StoreError::Invalid {
        message: "no attempt made".to_owned(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_and_nothing_committed_is_lost() -> anyhow::Result<()> {
    // Its own cluster: stopping the shared one would break the other tests.
    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = cluster.create_database().await?;
    let store = PgStore::connect_with(
        &url,
        PgStoreOptions::default()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(1)),
    )
    .await?;
    let fx = fixture(&store).await;
    let new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&new).await?;
    let run = store.get_run(new.run.id).await?;
    store.commit(&start_run(&run, RunPhase::Building)).await?;
    let committed = store.get_run(run.id).await?;
    assert_eq!(committed.version, 1);

    let stopper = &cluster;
    tokio::task::block_in_place(|| stopper.stop_immediate()).map_err(|e| anyhow::anyhow!("{e}"))?;

    // While it is down, every operation fails with Unavailable, and has no effect.
    let next = start_run(&committed, RunPhase::Built);
    for _ in 0..3 {
        let r = store.get_run(run.id).await;
        assert!(matches!(r, Err(StoreError::Unavailable { .. })), "{r:?}");
        let r = store.commit(&next).await;
        assert!(matches!(r, Err(StoreError::Unavailable { .. })), "{r:?}");
        let r = store
            .claim_runs("driver", Duration::from_secs(30), 10)
            .await;
        assert!(matches!(r, Err(StoreError::Unavailable { .. })), "{r:?}");
    }

    tokio::task::block_in_place(|| stopper.start_again()).map_err(|e| anyhow::anyhow!("{e}"))?;

    // After it is back, the driver's retry succeeds and what was committed before is there.
    let back = with_backoff(40, || store.get_run(run.id)).await?;
    assert_eq!(
        back, committed,
        "the committed transition survived the crash"
    );
    with_backoff(40, || store.commit(&next)).await?;
    let after = store.get_run(run.id).await?;
    assert_eq!((after.version, after.phase), (2, RunPhase::Built));
    // Replaying the same batch (a retry whose first COMMIT did land) is a no-op.
    store.commit(&next).await?;
    assert_eq!(store.get_run(run.id).await?.version, 2);
    store.close().await;
    drop(cluster);
    Ok(())
}
