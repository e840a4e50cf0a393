//! A run's insert is all or nothing.

use shipinator_core::conformance::store::{fixture, new_run};
use shipinator_core::domain::{StepId, Trigger};
use shipinator_core::store::{Store, StoreError};
use sqlx::Row;
use uuid::Uuid;

async fn rows_of_run(
    store: &shipinator_postgres::PgStore,
    run: Uuid,
) -> anyhow::Result<(i64, i64, i64)> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM pipeline_runs WHERE id = $1) AS runs, \
                (SELECT count(*) FROM jobs WHERE pipeline_run_id = $1) AS jobs, \
                (SELECT count(*) FROM job_steps s JOIN jobs j ON j.id = s.job_id \
                  WHERE j.pipeline_run_id = $1) AS steps",
    )
    .bind(run)
    .fetch_one(store.pool())
    .await?;
    Ok((
        row.try_get("runs")?,
        row.try_get("jobs")?,
        row.try_get("steps")?,
    ))
}

/// The run row is inserted, then a job insert fails inside the same transaction: no run,
/// job or step of it remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_run_insert_leaves_no_orphans() -> anyhow::Result<()> {
    let store = crate::fresh_store(4).await?;
    let fx = fixture(&store).await;
    let first = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&first).await?;

    // A second run whose build job reuses an id the first run holds: the run row goes in,
    // the job insert violates the primary key, and nothing of the run may stay.
    let mut second = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    let taken = first.jobs[0].id;
    let replaced = second.jobs[0].id;
    second.jobs[0].id = taken;
    for s in second.steps.iter_mut().filter(|s| s.job_id == replaced) {
        s.job_id = taken;
        s.id = StepId::derive(replaced, s.execution_order);
    }
    let err = store.create_run(&second).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists { what: "job", id } if *id == taken.to_string()),
        "{err:?}"
    );
    assert!(matches!(
        store.get_run(second.run.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(rows_of_run(&store, second.run.id.0).await?, (0, 0, 0));

    // Same with the failure one statement later (a step id that is taken).
    let mut third = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    third.steps[0].id = first.steps[0].id;
    let err = store.create_run(&third).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists { what: "step", .. }),
        "{err:?}"
    );
    assert_eq!(rows_of_run(&store, third.run.id.0).await?, (0, 0, 0));

    // The first run is untouched, and a correct run still goes in.
    assert_eq!(rows_of_run(&store, first.run.id.0).await?, (1, 2, 4));
    let fourth = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&fourth).await?;
    assert_eq!(rows_of_run(&store, fourth.run.id.0).await?, (1, 2, 4));
    Ok(())
}
