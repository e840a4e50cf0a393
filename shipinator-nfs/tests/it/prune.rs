//! Retention over `InMemoryStore` metadata and a real `NfsArtifactStore`.

use std::time::Duration;

use shipinator_core::artifact::{ArtifactMeta, ArtifactStore};
use shipinator_core::conformance::store::{fixture, new_artifact, new_run};
use shipinator_core::domain::{
    ArtifactId, JobId, JobType, PipelineId, RunId, RunPhase, RunStatus, Trigger,
};
use shipinator_core::memory::InMemoryStore;
use shipinator_core::store::{Batch, Store, Write};
use shipinator_core::time::Timestamp;
use shipinator_nfs::{NfsArtifactStore, PrunePolicy, prune};

use crate::util::stream_of;

const DAY: Duration = Duration::from_secs(86_400);

struct World {
    _dir: tempfile::TempDir,
    store: InMemoryStore,
    artifacts: NfsArtifactStore,
    now: Timestamp,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = NfsArtifactStore::new(dir.path().join("a")).unwrap();
        World {
            _dir: dir,
            store: InMemoryStore::new(),
            artifacts,
            now: Timestamp::now(),
        }
    }

    async fn pipeline(&self) -> PipelineId {
        fixture(&self.store).await.pipeline.id
    }

    /// A run of `pipeline` created `age` ago with `count` stored artifacts, left in `status`.
    async fn run(
        &self,
        pipeline: PipelineId,
        age: Duration,
        status: RunStatus,
        count: usize,
    ) -> (RunId, Vec<ArtifactId>) {
        let created =
            Timestamp::from_unix_micros(self.now.as_unix_micros() - age.as_micros() as i64);
        let mut new = new_run(pipeline, "main", Trigger::Push, created);
        new.run.created_at = created;
        let run = new.run.id;
        self.store.create_run(&new).await.unwrap();
        if status != RunStatus::Pending {
            let finished = status.is_terminal().then_some(created);
            self.store
                .commit(&Batch {
                    fences: vec![],
                    writes: vec![Write::UpdateRun {
                        id: run,
                        expected_version: 0,
                        status,
                        phase: RunPhase::Built,
                        started_at: Some(created),
                        finished_at: finished,
                    }],
                })
                .await
                .unwrap();
        }
        let mut ids = Vec::new();
        for _ in 0..count {
            let mut row = new_artifact(run, JobId::derive(run, JobType::Build), None, created);
            row.storage_backend = "nfs".to_owned();
            row.storage_path = row.id.to_string();
            row.size = 3;
            self.artifacts
                .put(row.id, ArtifactMeta::default(), stream_of(b"abc", 3))
                .await
                .unwrap();
            self.store
                .commit(&Batch {
                    fences: vec![],
                    writes: vec![Write::InsertArtifact(row.clone())],
                })
                .await
                .unwrap();
            ids.push(row.id);
        }
        (run, ids)
    }
}

fn sorted(mut v: Vec<ArtifactId>) -> Vec<ArtifactId> {
    v.sort();
    v
}

#[tokio::test]
async fn prune_by_age_and_count_keeps_what_live_runs_need() {
    let w = World::new().await;
    let p1 = w.pipeline().await;
    let (_, r1) = w.run(p1, 10 * DAY, RunStatus::Success, 2).await;
    let (_, r2) = w.run(p1, 5 * DAY, RunStatus::Failed, 2).await;
    let (_, r3) = w.run(p1, DAY, RunStatus::Success, 2).await;
    let p2 = w.pipeline().await;
    let (_, q1) = w.run(p2, 10 * DAY, RunStatus::Success, 1).await;
    let (_, q2) = w.run(p2, DAY, RunStatus::Running, 1).await;
    // A row of another backend is never touched.
    let p3 = w.pipeline().await;
    let foreign_run = new_run(p3, "main", Trigger::Push, w.now);
    w.store.create_run(&foreign_run).await.unwrap();
    let foreign = new_artifact(
        foreign_run.run.id,
        JobId::derive(foreign_run.run.id, JobType::Build),
        None,
        Timestamp::EPOCH,
    );
    w.store
        .commit(&Batch {
            fences: vec![],
            writes: vec![Write::InsertArtifact(foreign)],
        })
        .await
        .unwrap();

    let policy = PrunePolicy {
        older_than: Some(3 * DAY),
        keep_last_per_pipeline: Some(1),
    };
    let all: Vec<_> = [&r1, &r2, &r3, &q1, &q2]
        .into_iter()
        .flatten()
        .copied()
        .collect();

    let dry = prune(&w.store, &w.artifacts, &policy, w.now, true)
        .await
        .unwrap();
    assert!(dry.dry_run);
    let mut want: Vec<_> = r1.iter().chain(&r2).copied().collect();
    assert_eq!(
        sorted(dry.removed.iter().map(|a| a.id).collect()),
        sorted(want.clone())
    );
    assert_eq!(dry.kept_in_use, q1, "pipeline 2 has a running run");
    assert_eq!(dry.bytes_freed, 12);
    assert_eq!(
        sorted(w.artifacts.list().await.unwrap()),
        sorted(all.clone()),
        "a dry run deletes nothing"
    );

    // One payload already vanished.
    w.artifacts.delete(r1[0]).await.unwrap();
    let done = prune(&w.store, &w.artifacts, &policy, w.now, false)
        .await
        .unwrap();
    assert!(!done.dry_run);
    assert_eq!(done.already_gone, [r1[0]]);
    want.retain(|id| *id != r1[0]);
    assert_eq!(
        sorted(done.removed.iter().map(|a| a.id).collect()),
        sorted(want)
    );
    assert!(done.failed.is_empty());
    let left: Vec<_> = r3.iter().chain(&q1).chain(&q2).copied().collect();
    assert_eq!(sorted(w.artifacts.list().await.unwrap()), sorted(left));

    // Count alone: keep the newest run of each pipeline; pipeline 2 is still busy.
    let only_count = PrunePolicy {
        older_than: None,
        keep_last_per_pipeline: Some(1),
    };
    let r = prune(&w.store, &w.artifacts, &only_count, w.now, false)
        .await
        .unwrap();
    assert!(r.removed.is_empty());
    assert_eq!(r.kept_in_use, q1);

    // No policy: nothing.
    let r = prune(
        &w.store,
        &w.artifacts,
        &PrunePolicy::default(),
        w.now,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        r,
        shipinator_nfs::PruneReport {
            dry_run: false,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn prune_by_age_alone() {
    let w = World::new().await;
    let p = w.pipeline().await;
    let (_, old) = w.run(p, 40 * DAY, RunStatus::Canceled, 3).await;
    let (_, new) = w.run(p, 2 * DAY, RunStatus::Success, 1).await;
    let policy = PrunePolicy {
        older_than: Some(30 * DAY),
        keep_last_per_pipeline: None,
    };
    let r = prune(&w.store, &w.artifacts, &policy, w.now, false)
        .await
        .unwrap();
    assert_eq!(
        sorted(r.removed.iter().map(|a| a.id).collect()),
        sorted(old)
    );
    assert_eq!(w.artifacts.list().await.unwrap(), new);
}
