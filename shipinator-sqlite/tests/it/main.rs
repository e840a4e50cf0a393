//! Integration tests of the SQLite store: the shared conformance suite and SQLite-specific
//! cases, on real database files in temporary directories.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use shipinator_core::conformance::store::{self as conformance, StoreCaps};
use shipinator_core::domain::{
    ArtifactType, JobType, RunPhase, RunStatus, Status, StepId, Trigger,
};
use shipinator_core::memory::ManualClock;
use shipinator_core::store::{
    Batch, PageRequest, RunEvent, RunEventKind, RunFilter, Store, StoreError, Write,
};
use shipinator_core::time::Timestamp;
use shipinator_sqlite::{SqliteStore, SqliteStoreOptions, Synchronous};
use tempfile::TempDir;

async fn temp_store() -> Result<(TempDir, SqliteStore)> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("state/shipinator.db")).await?;
    Ok((dir, store))
}

fn one(write: Write) -> Batch {
    Batch {
        fences: Vec::new(),
        writes: vec![write],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_file() -> Result<()> {
    let (_dir, store) = temp_store().await?;
    conformance::all(&store, &StoreCaps::default()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_arc_dyn_store() -> Result<()> {
    let (_dir, store) = temp_store().await?;
    let store: Arc<dyn Store> = Arc::new(store);
    conformance::all(store.as_ref(), &StoreCaps::default()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_in_memory() -> Result<()> {
    let store = SqliteStore::open_in_memory().await?;
    conformance::all(&store, &StoreCaps::default()).await;
    Ok(())
}

#[tokio::test]
async fn defaults_are_wal_full_with_foreign_keys_and_a_busy_timeout() -> Result<()> {
    let (_dir, store) = temp_store().await?;
    let s = store.settings().await?;
    assert_eq!(s.journal_mode, "wal");
    assert_eq!(s.synchronous, "full");
    assert!(s.foreign_keys);
    assert_eq!(s.busy_timeout, Duration::from_secs(5));

    let dir = tempfile::tempdir()?;
    let normal = SqliteStore::open_with(
        dir.path().join("n.db"),
        SqliteStoreOptions::new()
            .synchronous(Synchronous::Normal)
            .busy_timeout(Duration::from_millis(250)),
    )
    .await?;
    let s = normal.settings().await?;
    assert_eq!((s.journal_mode.as_str(), s.synchronous), ("wal", "normal"));
    assert_eq!(s.busy_timeout, Duration::from_millis(250));
    Ok(())
}

#[tokio::test]
async fn reopening_the_file_keeps_every_committed_row() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a/b/shipinator.db");
    let store = SqliteStore::open(&path).await?;
    let f = conformance::fixture(&store).await;
    let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&new).await?;
    let step = new.steps[0].id;
    let exec = conformance::new_execution(step, 1, "local", f.now);
    let art = conformance::new_artifact(new.run.id, new.steps[0].job_id, Some(step), f.now);
    store
        .commit(&Batch {
            fences: Vec::new(),
            writes: vec![
                Write::UpdateRun {
                    id: new.run.id,
                    expected_version: 0,
                    status: RunStatus::Running,
                    phase: RunPhase::Building,
                    started_at: Some(f.now),
                    finished_at: None,
                },
                Write::InsertExecution(exec),
                Write::InsertArtifact(art),
                Write::AppendEvent(RunEvent {
                    run_id: new.run.id,
                    at: f.now,
                    kind: RunEventKind::RunChanged {
                        status: RunStatus::Running,
                        phase: RunPhase::Building,
                    },
                }),
            ],
        })
        .await?;
    let leases = store
        .claim_runs("driver-1", Duration::from_secs(60), 10)
        .await?;
    assert_eq!(leases.len(), 1);
    let before = store.load_run(new.run.id).await?;
    let events = store.list_events(0, 100).await?;
    store.close().await;
    drop(store);

    let store = SqliteStore::open(&path).await?;
    assert_eq!(store.load_run(new.run.id).await?, before);
    assert_eq!(store.get_project(f.project.id).await?, f.project);
    assert_eq!(store.get_repository(f.repository.id).await?, f.repository);
    assert_eq!(store.get_pipeline(f.pipeline.id).await?, f.pipeline);
    assert_eq!(store.list_events(0, 100).await?, events);
    assert_eq!(events.len(), 1);
    // The lease survived too: nobody else can claim the run while it is held.
    assert!(
        store
            .claim_runs("driver-2", Duration::from_secs(60), 10)
            .await?
            .is_empty()
    );
    // Event seqs keep increasing after a restart.
    store
        .commit(&one(Write::AppendEvent(RunEvent {
            run_id: new.run.id,
            at: f.now,
            kind: RunEventKind::JobChanged {
                job_id: new.steps[0].job_id,
                status: Status::Running,
            },
        })))
        .await?;
    let after = store.list_events(events[0].seq, 100).await?;
    assert_eq!(after.len(), 1);
    assert!(after[0].seq > events[0].seq);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_get_each_queued_execution_exactly_once() -> Result<()> {
    let (dir, store) = temp_store().await?;
    // A second store on the same file stands for a second process.
    let other = SqliteStore::open(dir.path().join("state/shipinator.db")).await?;
    let f = conformance::fixture(&store).await;
    let mut expected = std::collections::BTreeSet::new();
    let mut writes = Vec::new();
    for _ in 0..5 {
        let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
        store.create_run(&new).await?;
        for step in &new.steps {
            for attempt in 1..=3 {
                let e = conformance::new_execution(step.id, attempt, "pull", f.now);
                expected.insert(e.id);
                writes.push(Write::InsertExecution(e));
            }
        }
    }
    store
        .commit(&Batch {
            fences: Vec::new(),
            writes,
        })
        .await?;

    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let worker = format!("worker-{i}");
            let mut got = Vec::new();
            loop {
                let claims = s
                    .claim_executions("pull", &worker, Duration::from_secs(60), 2)
                    .await?;
                if claims.is_empty() {
                    return Ok::<_, StoreError>(got);
                }
                got.extend(claims);
            }
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        for claim in t.await?.context("claim_executions")? {
            assert!(
                seen.insert(claim.execution_id),
                "{} claimed twice",
                claim.execution_id
            );
        }
    }
    assert_eq!(seen, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_64_racing_conflicting_transitions_exactly_one_wins() -> Result<()> {
    let (dir, store) = temp_store().await?;
    let other = SqliteStore::open(dir.path().join("state/shipinator.db")).await?;
    let f = conformance::fixture(&store).await;
    let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&new).await?;
    let step = new.steps[0].clone();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        let id = step.id;
        tasks.push(tokio::spawn(async move {
            // Each contender writes a different attempt: no two are an identical replay.
            let r = s
                .commit(&one(Write::UpdateStep {
                    id,
                    expected_version: 0,
                    status: Status::Running,
                    attempt: i + 1,
                    started_at: None,
                    finished_at: None,
                }))
                .await;
            (i + 1, r)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (attempt, r) = t.await?;
        match r {
            Ok(()) => winners.push(attempt),
            Err(StoreError::Conflict {
                expected: 0,
                found: 1,
                ..
            }) => {}
            Err(e) => anyhow::bail!("unexpected error {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let steps = store.list_steps(step.job_id).await?;
    let stored = steps
        .iter()
        .find(|s| s.id == step.id)
        .context("step is stored")?;
    assert_eq!((stored.attempt, stored.version), (winners[0], 1));
    Ok(())
}

#[tokio::test]
async fn a_failing_create_run_leaves_no_orphan_rows() -> Result<()> {
    let (_dir, store) = temp_store().await?;
    let f = conformance::fixture(&store).await;
    // The last step points at a job that is not part of the run: the foreign key fails after
    // the run and its jobs were inserted.
    let mut new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    let mut bad = new.steps[0].clone();
    bad.id = StepId::new_v7();
    bad.job_id = shipinator_core::domain::JobId::new_v7();
    new.steps.push(bad);
    let r = store.create_run(&new).await;
    assert!(matches!(r, Err(StoreError::Invalid { .. })), "got {r:?}");
    assert!(matches!(
        store.get_run(new.run.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.list_jobs(new.run.id).await?.is_empty());
    for job in &new.jobs {
        assert!(store.list_steps(job.id).await?.is_empty());
    }
    let runs = store
        .list_runs(
            &RunFilter {
                pipeline_id: Some(f.pipeline.id),
                ..RunFilter::default()
            },
            &PageRequest::first(10),
        )
        .await?;
    assert!(runs.items.is_empty());

    // A duplicate job id fails the same way.
    let mut dup = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    let first_job = dup.jobs[0].clone();
    dup.jobs.push(first_job);
    let r = store.create_run(&dup).await;
    assert!(
        matches!(r, Err(StoreError::AlreadyExists { .. })),
        "got {r:?}"
    );
    assert!(store.list_jobs(dup.run.id).await?.is_empty());

    // And the same run without the bad rows goes in whole.
    let good = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&good).await?;
    assert_eq!(store.load_run(good.run.id).await?.steps.len(), 4);
    Ok(())
}

#[tokio::test]
async fn every_enum_spelling_round_trips_through_the_database() -> Result<()> {
    let (_dir, store) = temp_store().await?;
    let f = conformance::fixture(&store).await;
    for (i, trigger) in Trigger::ALL.iter().enumerate() {
        let status = RunStatus::ALL[i % RunStatus::ALL.len()];
        let mut new = conformance::new_run(f.pipeline.id, "main", *trigger, f.now);
        new.run.status = status;
        new.run.phase = RunPhase::ALL[i % RunPhase::ALL.len()];
        new.run.requested_stages = JobType::ORDER.to_vec();
        store.create_run(&new).await?;
        assert_eq!(store.get_run(new.run.id).await?, new.run);
    }
    let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&new).await?;
    let mut run = new.run.clone();
    for (i, (status, phase)) in RunStatus::ALL
        .iter()
        .zip(RunPhase::ALL.iter().cycle())
        .enumerate()
    {
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
        assert_eq!(
            (run.status, run.phase, run.version),
            (*status, *phase, i as u64 + 1)
        );
    }
    for phase in RunPhase::ALL {
        store
            .commit(&one(Write::UpdateRun {
                id: run.id,
                expected_version: run.version,
                status: run.status,
                phase: *phase,
                started_at: None,
                finished_at: None,
            }))
            .await?;
        run = store.get_run(run.id).await?;
        assert_eq!(run.phase, *phase);
    }
    let job = &new.jobs[0];
    let step = new
        .steps
        .iter()
        .find(|s| s.job_id == job.id)
        .context("step")?;
    let exec = conformance::new_execution(step.id, 1, "local", f.now);
    store
        .commit(&one(Write::InsertExecution(exec.clone())))
        .await?;
    for (v, status) in Status::ALL.iter().enumerate() {
        let v = v as u64;
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes: vec![
                    Write::UpdateJob {
                        id: job.id,
                        expected_version: v,
                        status: *status,
                        started_at: None,
                        finished_at: None,
                    },
                    Write::UpdateStep {
                        id: step.id,
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
                        exit_code: Some(-1),
                        failure: None,
                        completed_at: None,
                    },
                ],
            })
            .await?;
        let record = store.load_run(new.run.id).await?;
        let j = record.jobs.iter().find(|j| j.id == job.id).context("job")?;
        let s = record
            .steps
            .iter()
            .find(|s| s.id == step.id)
            .context("step")?;
        let e = &record.executions[0];
        assert_eq!((j.status, s.status, e.status), (*status, *status, *status));
        assert_eq!(e.exit_code, Some(-1));
    }
    let mut writes = Vec::new();
    let mut arts = Vec::new();
    for t in ArtifactType::ALL {
        let mut a = conformance::new_artifact(new.run.id, job.id, None, f.now);
        a.artifact_type = *t;
        arts.push(a.clone());
        writes.push(Write::InsertArtifact(a));
    }
    store
        .commit(&Batch {
            fences: Vec::new(),
            writes,
        })
        .await?;
    for a in &arts {
        assert_eq!(&store.get_artifact(a.id).await?, a);
    }
    Ok(())
}

#[tokio::test]
async fn an_injected_clock_expires_leases_and_claims() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(Timestamp::from_unix_micros(1_800_000_000_000_000));
    let store = SqliteStore::open_with(
        dir.path().join("s.db"),
        SqliteStoreOptions::new().clock(clock.as_clock()),
    )
    .await?;
    assert_eq!(store.now().await?, clock.now());
    let f = conformance::fixture(&store).await;
    let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&new).await?;
    let ttl = Duration::from_secs(30);
    let a = store.claim_runs("a", ttl, 10).await?;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].expires_at, clock.now() + ttl);
    clock.advance(Duration::from_secs(29));
    assert!(store.claim_runs("b", ttl, 10).await?.is_empty());
    clock.advance(Duration::from_secs(1));
    let b = store.claim_runs("b", ttl, 10).await?;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].epoch, a[0].epoch + 1);

    let exec = conformance::new_execution(new.steps[0].id, 1, "pull", f.now);
    store.commit(&one(Write::InsertExecution(exec))).await?;
    let claims = store.claim_executions("pull", "w", ttl, 10).await?;
    assert_eq!(claims.len(), 1);
    assert!(store.take_expired_execution_claims().await?.is_empty());
    clock.advance(ttl);
    let taken = store.take_expired_execution_claims().await?;
    assert_eq!(taken, claims);
    assert!(store.take_expired_execution_claims().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_write_lock_held_past_the_busy_timeout_is_unavailable() -> Result<()> {
    use sqlx::{ConnectOptions, Connection};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("busy.db");
    let store = SqliteStore::open_with(
        &path,
        SqliteStoreOptions::new().busy_timeout(Duration::from_millis(50)),
    )
    .await?;
    let f = conformance::fixture(&store).await;
    let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&new).await?;

    // Another process holds the write lock.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await?;
    let tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let r = store
        .commit(&one(Write::UpdateRun {
            id: new.run.id,
            expected_version: 0,
            status: RunStatus::Running,
            phase: RunPhase::Building,
            started_at: None,
            finished_at: None,
        }))
        .await;
    assert!(
        matches!(&r, Err(e @ StoreError::Unavailable { .. }) if e.is_transient()),
        "got {r:?}"
    );
    // Reads go on while the lock is held.
    assert_eq!(store.get_run(new.run.id).await?.version, 0);
    tx.rollback().await?;
    drop(conn);
    store
        .commit(&one(Write::UpdateRun {
            id: new.run.id,
            expected_version: 0,
            status: RunStatus::Running,
            phase: RunPhase::Building,
            started_at: None,
            finished_at: None,
        }))
        .await?;
    assert_eq!(store.get_run(new.run.id).await?.version, 1);
    Ok(())
}

#[tokio::test]
async fn an_identical_replay_appends_its_events_once() -> Result<()> {
    let (_dir, store) = temp_store().await?;
    let f = conformance::fixture(&store).await;
    let new = conformance::new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    store.create_run(&new).await?;
    let batch = Batch {
        fences: Vec::new(),
        writes: vec![
            Write::UpdateRun {
                id: new.run.id,
                expected_version: 0,
                status: RunStatus::Running,
                phase: RunPhase::Building,
                started_at: Some(f.now),
                finished_at: None,
            },
            Write::AppendEvent(RunEvent {
                run_id: new.run.id,
                at: f.now,
                kind: RunEventKind::RunChanged {
                    status: RunStatus::Running,
                    phase: RunPhase::Building,
                },
            }),
        ],
    };
    store.commit(&batch).await?;
    store.commit(&batch).await?;
    assert_eq!(store.list_events(0, 100).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn bench_helpers_measure_both_loops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let options = SqliteStoreOptions::new();
    let base =
        shipinator_sqlite::bench::baseline_commits(&dir.path().join("base.db"), &options, 20)
            .await?;
    assert_eq!(base.commits, 20);
    let store = SqliteStore::open_with(dir.path().join("store.db"), options).await?;
    let m = shipinator_sqlite::bench::store_transitions(&store, 20).await?;
    assert_eq!(m.commits, 20);
    assert!(m.per_second() > 0.0 && base.per_second() > 0.0);
    Ok(())
}
