//! Several drivers and workers racing on one database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shipinator_core::conformance::store::{fixture, new_execution, new_run};
use shipinator_core::domain::{ExecutionId, JobStep, Status, StepId, Trigger};
use shipinator_core::store::{Batch, Store, StoreError, Write};
use tokio::sync::Barrier;

/// 32 workers claiming from 10,000 queued executions: each (step, attempt) is claimed by
/// exactly one of them, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_claimers_claim_each_execution_exactly_once() -> anyhow::Result<()> {
    const EXECUTIONS: usize = 10_000;
    const CLAIMERS: usize = 32;
    let store = Arc::new(crate::fresh_store(CLAIMERS as u32 + 4).await?);
    let fx = fixture(store.as_ref()).await;
    let mut new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    let job = new.jobs[0].id;
    let template = new.steps[0].clone();
    new.steps = (0..EXECUTIONS as u32 / 2)
        .map(|i| JobStep {
            id: StepId::derive(job, i),
            job_id: job,
            name: format!("step-{i}"),
            execution_order: i,
            ..template.clone()
        })
        .collect();
    store.create_run(&new).await?;
    // Two attempts per step.
    let execs: Vec<_> = new
        .steps
        .iter()
        .flat_map(|s| (1..=2).map(move |a| (s.id, a)))
        .map(|(s, a)| new_execution(s, a, "pull", fx.now))
        .collect();
    for chunk in execs.chunks(1000) {
        let batch = Batch {
            fences: Vec::new(),
            writes: chunk.iter().cloned().map(Write::InsertExecution).collect(),
        };
        store.commit(&batch).await?;
    }
    let start = Arc::new(Barrier::new(CLAIMERS));
    let mut tasks = Vec::new();
    for w in 0..CLAIMERS {
        let store = Arc::clone(&store);
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let worker = format!("worker-{w}");
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim_executions("pull", &worker, Duration::from_secs(600), 7)
                    .await?;
                if got.is_empty() {
                    return Ok::<_, StoreError>(mine);
                }
                mine.extend(got);
            }
        }));
    }
    let mut seen: HashMap<ExecutionId, String> = HashMap::with_capacity(EXECUTIONS);
    let mut workers_with_claims = 0;
    for t in tasks {
        let claims = t.await??;
        if !claims.is_empty() {
            workers_with_claims += 1;
        }
        for c in claims {
            assert_eq!(c.execution_id, ExecutionId::derive(c.step_id, c.attempt));
            if let Some(prev) = seen.insert(c.execution_id, c.worker.clone()) {
                panic!(
                    "{:?} claimed twice: by {prev} and {}",
                    c.execution_id, c.worker
                );
            }
        }
    }
    assert_eq!(seen.len(), EXECUTIONS, "every queued execution is claimed");
    assert!(
        workers_with_claims > 1,
        "claims were spread over several workers"
    );
    // Nothing is left to claim, by anyone.
    assert!(
        store
            .claim_executions("pull", "late", Duration::from_secs(60), 100)
            .await?
            .is_empty()
    );
    Ok(())
}

/// 64 writers commit conflicting transitions of one step from the same version: exactly one
/// wins, the 63 others get `Conflict`, and the stored step is the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_racers_one_winner() -> anyhow::Result<()> {
    const RACERS: usize = 64;
    let store = Arc::new(crate::fresh_store(RACERS as u32).await?);
    let fx = fixture(store.as_ref()).await;
    let new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&new).await?;
    let step = store.list_steps(new.jobs[0].id).await?[0].clone();
    assert_eq!(step.version, 0);
    let start = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&store);
        let start = Arc::clone(&start);
        let step = step.clone();
        tasks.push(tokio::spawn(async move {
            let write = Write::UpdateStep {
                id: step.id,
                expected_version: step.version,
                status: Status::Running,
                // Distinct per racer, so no two writes are an identical replay.
                attempt: i as u32 + 1,
                started_at: Some(fx.now),
                finished_at: None,
            };
            start.wait().await;
            let r = store
                .commit(&Batch {
                    fences: Vec::new(),
                    writes: vec![write],
                })
                .await;
            (i, r)
        }));
    }
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await? {
            (i, Ok(())) => winners.push(i),
            (
                _,
                Err(StoreError::Conflict {
                    expected, found, ..
                }),
            ) => {
                assert_eq!((expected, found), (0, 1));
                conflicts += 1;
            }
            (_, Err(e)) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one racer wins");
    assert_eq!(conflicts, RACERS - 1);
    let stored = store
        .list_steps(new.jobs[0].id)
        .await?
        .into_iter()
        .find(|s| s.id == step.id)
        .ok_or_else(|| anyhow::anyhow!("step vanished"))?;
    assert_eq!(stored.version, 1);
    assert_eq!(
        stored.attempt,
        winners[0] as u32 + 1,
        "the stored step is the winner's"
    );
    Ok(())
}

/// 8 drivers claiming runs at once: every active run is leased to exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drivers_lease_each_run_to_one_owner() -> anyhow::Result<()> {
    const RUNS: usize = 200;
    const DRIVERS: usize = 8;
    let store = Arc::new(crate::fresh_store(DRIVERS as u32 + 2).await?);
    let fx = fixture(store.as_ref()).await;
    for _ in 0..RUNS {
        store
            .create_run(&new_run(fx.pipeline.id, "main", Trigger::Push, fx.now))
            .await?;
    }
    let start = Arc::new(Barrier::new(DRIVERS));
    let mut tasks = Vec::new();
    for d in 0..DRIVERS {
        let store = Arc::clone(&store);
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let owner = format!("driver-{d}");
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim_runs(&owner, Duration::from_secs(600), 5)
                    .await?;
                if got.is_empty() {
                    return Ok::<_, StoreError>(mine);
                }
                mine.extend(got);
            }
        }));
    }
    let mut owners = HashMap::new();
    for t in tasks {
        for lease in t.await?? {
            assert_eq!(lease.epoch, 1, "first claim of a run");
            if let Some(prev) = owners.insert(lease.run_id, lease.owner.clone()) {
                panic!("{:?} leased to {prev} and {}", lease.run_id, lease.owner);
            }
        }
    }
    assert_eq!(owners.len(), RUNS);
    Ok(())
}
