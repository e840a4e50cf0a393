//! Batches of many writes: consecutive updates of one table go to the database as one
//! statement, with the same compare-and-set, replay and atomicity rules as single writes.

use shipinator_core::conformance::store::{fixture, new_run};
use shipinator_core::domain::{JobStep, Status, Trigger};
use shipinator_core::store::{Batch, RunEvent, RunEventKind, Store, StoreError, Write};

fn start(step: &JobStep, expected_version: u64) -> Write {
    Write::UpdateStep {
        id: step.id,
        expected_version,
        status: Status::Running,
        attempt: 1,
        started_at: Some(step.created_at),
        finished_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_updates_are_compare_and_set_and_atomic() -> anyhow::Result<()> {
    let store = crate::fresh_store(4).await?;
    let fx = fixture(&store).await;
    let new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&new).await?;
    let steps = store.load_run(new.run.id).await?.steps;
    assert_eq!(steps.len(), 4);

    // One stale write among four: Conflict, and none of the four is applied.
    let mut writes: Vec<Write> = steps.iter().map(|s| start(s, 0)).collect();
    writes[2] = start(&steps[2], 7);
    let events = (0..3).map(|i| {
        Write::AppendEvent(RunEvent {
            run_id: new.run.id,
            at: fx.now,
            kind: RunEventKind::StepChanged {
                step_id: steps[i].id,
                status: Status::Running,
                attempt: 1,
            },
        })
    });
    writes.extend(events.clone());
    let err = store
        .commit(&Batch {
            fences: Vec::new(),
            writes,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                what: "step",
                expected: 7,
                found: 0,
                ..
            }
        ),
        "{err:?}"
    );
    let after = store.load_run(new.run.id).await?.steps;
    assert_eq!(after, steps, "a failed batch changes nothing");
    assert!(
        store.list_events(0, 100).await?.is_empty(),
        "nor appends events"
    );

    // All four current: applied together, events numbered in batch order.
    let mut writes: Vec<Write> = steps.iter().map(|s| start(s, 0)).collect();
    writes.extend(events);
    let batch = Batch {
        fences: Vec::new(),
        writes,
    };
    store.commit(&batch).await?;
    let after = store.load_run(new.run.id).await?.steps;
    assert!(
        after
            .iter()
            .all(|s| s.version == 1 && s.status == Status::Running)
    );
    let stored = store.list_events(0, 100).await?;
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for (i, e) in stored.iter().enumerate() {
        assert!(
            matches!(e.event.kind, RunEventKind::StepChanged { step_id, .. } if step_id == steps[i].id)
        );
    }

    // Replaying the updates alone is a no-op; a different write from the old version conflicts.
    let replay: Vec<Write> = steps.iter().map(|s| start(s, 0)).collect();
    store
        .commit(&Batch {
            fences: Vec::new(),
            writes: replay,
        })
        .await?;
    assert!(
        store
            .load_run(new.run.id)
            .await?
            .steps
            .iter()
            .all(|s| s.version == 1)
    );
    let mut other: Vec<Write> = steps.iter().map(|s| start(s, 0)).collect();
    if let Write::UpdateStep { attempt, .. } = &mut other[3] {
        *attempt = 2;
    }
    let err = store
        .commit(&Batch {
            fences: Vec::new(),
            writes: other,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                found: 1,
                ..
            }
        ),
        "{err:?}"
    );

    // Two updates of the same row in one batch apply in order.
    let s = &steps[0];
    store
        .commit(&Batch {
            fences: Vec::new(),
            writes: vec![
                Write::UpdateStep {
                    id: s.id,
                    expected_version: 1,
                    status: Status::Succeeded,
                    attempt: 1,
                    started_at: Some(s.created_at),
                    finished_at: Some(s.created_at),
                },
                Write::UpdateStep {
                    id: s.id,
                    expected_version: 2,
                    status: Status::Failed,
                    attempt: 1,
                    started_at: Some(s.created_at),
                    finished_at: Some(s.created_at),
                },
            ],
        })
        .await?;
    let s = store.load_run(new.run.id).await?.steps.remove(0);
    assert_eq!((s.version, s.status), (3, Status::Failed));
    Ok(())
}

/// An event whose transaction commits after a later-inserted one is numbered after it, so a
/// reader paging by `seq` never skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_committing_events_are_not_skipped() -> anyhow::Result<()> {
    let store = crate::fresh_store(4).await?;
    let fx = fixture(&store).await;
    let new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&new).await?;
    let event = |status| RunEvent {
        run_id: new.run.id,
        at: fx.now,
        kind: RunEventKind::RunChanged {
            status,
            phase: shipinator_core::domain::RunPhase::Submitted,
        },
    };
    // A slow writer inserts its event first and has not committed yet.
    let mut slow = store.pool().begin().await?;
    sqlx::query("INSERT INTO run_events (run_id, at, kind) VALUES ($1, now(), $2)")
        .bind(new.run.id.0)
        .bind(serde_json::to_value(
            event(shipinator_core::domain::RunStatus::Pending).kind,
        )?)
        .execute(&mut *slow)
        .await?;
    // A fast writer commits after it.
    store
        .commit(&Batch {
            fences: Vec::new(),
            writes: vec![Write::AppendEvent(event(
                shipinator_core::domain::RunStatus::Running,
            ))],
        })
        .await?;
    let first = store.list_events(0, 100).await?;
    assert_eq!(first.len(), 1, "only committed events are listed");
    assert_eq!(first[0].seq, 1);
    slow.commit().await?;
    let next = store.list_events(first[0].seq, 100).await?;
    assert_eq!(
        next.len(),
        1,
        "the late commit is listed after the reader's position"
    );
    assert_eq!(next[0].seq, 2);
    assert!(matches!(
        next[0].event.kind,
        RunEventKind::RunChanged {
            status: shipinator_core::domain::RunStatus::Pending,
            ..
        }
    ));
    Ok(())
}
