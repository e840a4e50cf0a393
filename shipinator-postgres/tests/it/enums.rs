//! Every enum spelling of core's domain round-trips through its column, and the CHECK
//! constraints refuse anything else.

use shipinator_core::conformance::store::{fixture, new_artifact, new_execution, new_run};
use shipinator_core::domain::{ArtifactId, ArtifactType, RunPhase, RunStatus, Status, Trigger};
use shipinator_core::store::{Batch, PageRequest, RunFilter, Store, Write};

fn one(write: Write) -> Batch {
    Batch {
        fences: Vec::new(),
        writes: vec![write],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_spellings_round_trip() -> anyhow::Result<()> {
    let store = crate::fresh_store(4).await?;
    let fx = fixture(&store).await;
    for trigger in Trigger::ALL {
        let new = new_run(fx.pipeline.id, "enums", *trigger, fx.now);
        store.create_run(&new).await?;
        assert_eq!(store.get_run(new.run.id).await?.trigger, *trigger);
        let filter = RunFilter {
            trigger: Some(*trigger),
            git_ref: Some("enums".to_owned()),
            ..RunFilter::default()
        };
        let page = store.list_runs(&filter, &PageRequest::first(10)).await?;
        assert_eq!(page.items.len(), 1);
    }
    let new = new_run(fx.pipeline.id, "main", Trigger::Manual, fx.now);
    store.create_run(&new).await?;
    let mut run = store.get_run(new.run.id).await?;
    for status in RunStatus::ALL {
        for phase in RunPhase::ALL {
            store
                .commit(&one(Write::UpdateRun {
                    id: run.id,
                    expected_version: run.version,
                    status: *status,
                    phase: *phase,
                    started_at: None,
                    finished_at: None,
                }))
                .await?;
            run = store.get_run(run.id).await?;
            assert_eq!((run.status, run.phase), (*status, *phase));
        }
    }
    let job = new.jobs[0].id;
    let step = new.steps.iter().find(|s| s.job_id == job).map(|s| s.id);
    let step = step.ok_or_else(|| anyhow::anyhow!("no step"))?;
    let exec = new_execution(step, 1, "local", fx.now);
    store
        .commit(&one(Write::InsertExecution(exec.clone())))
        .await?;
    for (version, status) in Status::ALL.iter().enumerate() {
        let v = version as u64;
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes: vec![
                    Write::UpdateJob {
                        id: job,
                        expected_version: v,
                        status: *status,
                        started_at: None,
                        finished_at: None,
                    },
                    Write::UpdateStep {
                        id: step,
                        expected_version: v,
                        status: *status,
                        attempt: 1,
                        started_at: None,
                        finished_at: None,
                    },
                    Write::UpdateExecution {
                        id: exec.id,
                        expected_version: v,
                        status: *status,
                        external_id: String::new(),
                        exit_code: None,
                        failure: None,
                        completed_at: None,
                    },
                ],
            })
            .await?;
        let record = store.load_run(run.id).await?;
        assert!(
            record
                .jobs
                .iter()
                .any(|j| j.id == job && j.status == *status)
        );
        assert!(
            record
                .steps
                .iter()
                .any(|s| s.id == step && s.status == *status)
        );
        assert_eq!(store.get_execution(exec.id).await?.status, *status);
    }
    for artifact_type in ArtifactType::ALL {
        let mut a = new_artifact(run.id, job, Some(step), fx.now);
        a.id = ArtifactId::new_v7();
        a.artifact_type = *artifact_type;
        store.commit(&one(Write::InsertArtifact(a.clone()))).await?;
        assert_eq!(store.get_artifact(a.id).await?, a);
    }
    // Spellings other than core's are refused by the schema.
    let wrong = sqlx::query("UPDATE jobs SET status = 'SUCCEEDED' WHERE id = $1")
        .bind(job.0)
        .execute(store.pool())
        .await;
    assert!(wrong.is_err(), "CHECK constraint refuses an unknown status");
    let wrong = sqlx::query("UPDATE pipeline_runs SET phase = 'done' WHERE id = $1")
        .bind(run.id.0)
        .execute(store.pool())
        .await;
    assert!(wrong.is_err(), "CHECK constraint refuses an unknown phase");
    Ok(())
}
