//! Conformance checks for [`Store`] implementations. Not semver-stable.
//!
//! Run [`all`] from an adapter's integration tests:
//!
//! ```ignore
//! shipinator_core::conformance::store::all(&my_store, &StoreCaps::default()).await;
//! ```
//!
//! Every check creates its own fixtures under fresh UUID v7 ids and asserts only on them, so
//! the store need not be empty. The lease checks, however, claim *every* claimable run they
//! find (`claim_runs` cannot be scoped): run them on a store that no live driver uses. Checks
//! cancel the runs they create and release the leases they take when they pass.
//!
//! A failed check panics with a message naming the contract it broke.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::domain::{
    ApiTokenId, Artifact, ArtifactId, ArtifactType, Execution, ExecutionId, Job, JobId, JobStep,
    JobType, Pipeline, PipelineId, PipelineRun, Project, ProjectId, Repository, RepositoryId,
    RunId, RunPhase, RunStatus, Status, StepId, TokenRole, Trigger,
};
use crate::store::{
    ApiToken, Batch, Fence, IdempotencyRecord, NewRun, PageRequest, ProjectScope, RunEvent,
    RunEventKind, RunFilter, RunLease, Store, StoreError, Write,
};
use crate::time::Timestamp;

/// What a store supports and how long the time-based checks may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCaps {
    /// Run leases (`claim_runs`, `renew_leases`, `release_lease`, fencing by epoch).
    pub leases: bool,
    /// Pull-worker execution claims (`claim_executions` and friends).
    pub execution_claims: bool,
    /// The short ttl used by the expiry checks; they wait about this long by the store's clock.
    pub short_ttl: Duration,
    /// The bound on any polling wait; exceeded means the check fails.
    pub wait_limit: Duration,
}

impl Default for StoreCaps {
    /// Everything supported, a 1 s short ttl, waits bounded by 30 s.
    fn default() -> Self {
        Self {
            leases: true,
            execution_claims: true,
            short_ttl: Duration::from_secs(1),
            wait_limit: Duration::from_secs(30),
        }
    }
}

/// A long ttl: never expires while a check runs.
const LONG_TTL: Duration = Duration::from_secs(3600);

/// Bound on claim loops: a store that keeps handing out the same rows fails instead of hanging.
const MAX_ROUNDS: usize = 2_000;

/// Runs every check; those for unsupported capabilities are skipped as declared by `caps`.
pub async fn all(store: &dyn Store, caps: &StoreCaps) {
    create_and_load_every_entity(store).await;
    duplicates_are_already_exists(store).await;
    missing_parents_are_refused(store).await;
    updates_are_compare_and_set(store).await;
    identical_replay_is_a_no_op(store).await;
    batches_are_atomic(store).await;
    list_runs_filters_and_paginates(store).await;
    lists_of_projects_repositories_pipelines_paginate(store).await;
    list_all_artifacts_paginates(store).await;
    events_are_ordered(store).await;
    api_tokens_are_found_by_hash_and_revoked(store).await;
    idempotency_records_keep_the_first(store).await;
    cancel_requests_are_recorded_once(store).await;
    if caps.leases {
        lease_claims_are_exclusive(store).await;
        lease_expires_and_run_is_rescued(store, caps).await;
        stale_holder_is_fenced(store).await;
        leases_renew(store).await;
        leases_release(store).await;
    }
    if caps.execution_claims {
        executions_are_claimed_exactly_once(store).await;
        execution_claims_renew(store).await;
        expired_execution_claims_are_taken_once(store, caps).await;
    }
}

fn ok<T>(r: Result<T, StoreError>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error {e:?}"),
    }
}

/// A project, repository and pipeline under fresh ids.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The project.
    pub project: Project,
    /// Its repository.
    pub repository: Repository,
    /// The repository's pipeline.
    pub pipeline: Pipeline,
    /// The store's time when the fixture was made.
    pub now: Timestamp,
}

/// A timestamp the store can hold exactly (whole microseconds, as every [`Timestamp`] is).
async fn store_now(store: &dyn Store) -> Timestamp {
    ok(store.now().await, "now")
}

/// Creates a fresh project, repository and pipeline.
pub async fn fixture(store: &dyn Store) -> Fixture {
    let now = store_now(store).await;
    let project = Project {
        id: ProjectId::new_v7(),
        name: format!("conformance-{}", uuid::Uuid::now_v7()),
        description: Some("conformance fixture".to_owned()),
        created_at: now,
        updated_at: now,
    };
    ok(store.create_project(&project).await, "create_project");
    let repository = new_repository(project.id, now);
    ok(
        store.create_repository(&repository).await,
        "create_repository",
    );
    let pipeline = new_pipeline(repository.id, now);
    ok(store.create_pipeline(&pipeline).await, "create_pipeline");
    Fixture {
        project,
        repository,
        pipeline,
        now,
    }
}

fn new_repository(project_id: ProjectId, now: Timestamp) -> Repository {
    Repository {
        id: RepositoryId::new_v7(),
        project_id,
        vcs_provider: "git".to_owned(),
        clone_url: "file:///srv/git/example.git".to_owned(),
        default_branch: "main".to_owned(),
        created_at: now,
        updated_at: now,
    }
}

fn new_pipeline(repository_id: RepositoryId, now: Timestamp) -> Pipeline {
    Pipeline {
        id: PipelineId::new_v7(),
        repository_id,
        name: format!("ci-{}", uuid::Uuid::now_v7()),
        trigger_type: Trigger::Push,
        source_spec: "version: 1\n".to_owned(),
        created_at: now,
        updated_at: now,
    }
}

/// A pending run of `pipeline` with a build and a test job of two steps each.
pub fn new_run(pipeline: PipelineId, git_ref: &str, trigger: Trigger, now: Timestamp) -> NewRun {
    let id = RunId::new_v7();
    let run = PipelineRun {
        id,
        pipeline_id: pipeline,
        git_ref: git_ref.to_owned(),
        git_sha: "0123456789abcdef0123456789abcdef01234567".to_owned(),
        status: RunStatus::Pending,
        phase: RunPhase::Submitted,
        trigger,
        requested_stages: vec![JobType::Build, JobType::Test],
        requested_by: "conformance".to_owned(),
        resolved_spec: std::sync::Arc::new(
            serde_json::json!({"stages": ["build", "test"], "n": 1}),
        ),
        retry_of: None,
        version: 0,
        created_at: now,
        started_at: None,
        finished_at: None,
    };
    let mut jobs = Vec::new();
    let mut steps = Vec::new();
    for stage in [JobType::Build, JobType::Test] {
        let job_id = JobId::derive(id, stage);
        jobs.push(Job {
            id: job_id,
            pipeline_run_id: id,
            job_type: stage,
            name: stage.as_str().to_owned(),
            status: Status::Pending,
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        });
        for index in 0..2 {
            steps.push(JobStep {
                id: StepId::derive(job_id, index),
                job_id,
                name: format!("{stage}-{index}"),
                execution_order: index,
                parallel_group: (index == 1).then(|| "g".to_owned()),
                status: Status::Pending,
                attempt: 0,
                version: 0,
                created_at: now,
                started_at: None,
                finished_at: None,
            });
        }
    }
    // Listed out of order on purpose: the store orders them.
    jobs.reverse();
    steps.reverse();
    NewRun { run, jobs, steps }
}

/// A pending execution of `step`.
pub fn new_execution(step: StepId, attempt: u32, executor_type: &str, now: Timestamp) -> Execution {
    Execution {
        id: ExecutionId::derive(step, attempt),
        job_step_id: step,
        attempt,
        executor_type: executor_type.to_owned(),
        external_id: String::new(),
        status: Status::Pending,
        exit_code: None,
        failure: None,
        version: 0,
        submitted_at: now,
        completed_at: None,
    }
}

/// An artifact of `job` in `run`.
pub fn new_artifact(run: RunId, job: JobId, step: Option<StepId>, now: Timestamp) -> Artifact {
    let mut metadata = BTreeMap::new();
    metadata.insert("k".to_owned(), "v".to_owned());
    Artifact {
        id: ArtifactId::new_v7(),
        job_id: job,
        step_id: step,
        run_id: run,
        artifact_type: ArtifactType::Binary,
        name: Some("app".to_owned()),
        path: Some("target/app".to_owned()),
        storage_backend: "memory".to_owned(),
        storage_path: "artifacts/app".to_owned(),
        checksum: Some(format!("sha256:{}", "ab".repeat(32))),
        size: 42,
        metadata,
        created_at: now,
    }
}

async fn create_run(store: &dyn Store, new: &NewRun) {
    ok(store.create_run(new).await, "create_run");
}

fn one(write: Write) -> Batch {
    Batch {
        fences: Vec::new(),
        writes: vec![write],
    }
}

fn run_update(run: &PipelineRun, status: RunStatus, phase: RunPhase) -> Write {
    Write::UpdateRun {
        id: run.id,
        expected_version: run.version,
        status,
        phase,
        started_at: run.started_at,
        finished_at: run.finished_at,
    }
}

/// Cancels runs (so later lease checks do not claim them); already terminal ones are left.
async fn cancel_runs(store: &dyn Store, runs: &[RunId]) {
    for id in runs {
        let run = ok(store.get_run(*id).await, "get_run for cleanup");
        if run.status.is_terminal() {
            continue;
        }
        ok(
            store
                .commit(&one(run_update(&run, RunStatus::Canceled, run.phase)))
                .await,
            "cancel run for cleanup",
        );
    }
}

async fn release_all(store: &dyn Store, leases: &[RunLease]) {
    for lease in leases {
        // The lease may have been taken over; releasing it must then change nothing.
        let _ = store.release_lease(lease).await;
    }
}

fn is_not_found(r: &Result<impl std::fmt::Debug, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotFound { .. }))
}

/// Every entity created can be loaded back unchanged; unknown ids are `NotFound`.
pub async fn create_and_load_every_entity(store: &dyn Store) {
    let f = fixture(store).await;
    assert_eq!(
        ok(store.get_project(f.project.id).await, "get_project"),
        f.project
    );
    assert_eq!(
        ok(
            store.get_project_by_name(&f.project.name).await,
            "get_project_by_name"
        ),
        f.project
    );
    assert_eq!(
        ok(
            store.get_repository(f.repository.id).await,
            "get_repository"
        ),
        f.repository
    );
    assert_eq!(
        ok(store.get_pipeline(f.pipeline.id).await, "get_pipeline"),
        f.pipeline
    );

    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let run_id = new.run.id;
    assert_eq!(ok(store.get_run(run_id).await, "get_run"), new.run);
    assert_eq!(
        ok(
            store.get_run_without_spec(run_id).await,
            "get_run_without_spec"
        ),
        PipelineRun {
            resolved_spec: std::sync::Arc::new(serde_json::Value::Null),
            ..new.run.clone()
        },
        "get_run_without_spec must be get_run with a null resolved_spec"
    );

    let mut jobs = new.jobs.clone();
    jobs.sort_by_key(|j| j.job_type);
    assert_eq!(
        ok(store.list_jobs(run_id).await, "list_jobs"),
        jobs,
        "list_jobs must return the run's jobs in stage order"
    );
    let build = jobs[0].id;
    let mut build_steps: Vec<JobStep> = new
        .steps
        .iter()
        .filter(|s| s.job_id == build)
        .cloned()
        .collect();
    build_steps.sort_by_key(|s| s.execution_order);
    assert_eq!(
        ok(store.list_steps(build).await, "list_steps"),
        build_steps,
        "list_steps must return the job's steps in execution_order"
    );

    let step = build_steps[0].id;
    let e2 = new_execution(step, 2, "mock", f.now);
    let e1 = new_execution(step, 1, "mock", f.now);
    let a1 = new_artifact(run_id, build, Some(step), f.now);
    let mut a2 = new_artifact(
        run_id,
        build,
        None,
        Timestamp::from_unix_micros(f.now.as_unix_micros() + 1),
    );
    a2.artifact_type = ArtifactType::OciImage;
    a2.path = None;
    a2.checksum = None;
    ok(
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes: vec![
                    Write::InsertExecution(e2.clone()),
                    Write::InsertExecution(e1.clone()),
                    Write::InsertArtifact(a1.clone()),
                    Write::InsertArtifact(a2.clone()),
                ],
            })
            .await,
        "commit inserts",
    );
    assert_eq!(ok(store.get_execution(e1.id).await, "get_execution"), e1);
    assert_eq!(
        ok(store.list_executions(step).await, "list_executions"),
        vec![e1.clone(), e2.clone()],
        "list_executions must order by attempt"
    );
    assert_eq!(ok(store.get_artifact(a1.id).await, "get_artifact"), a1);
    assert_eq!(
        ok(store.list_artifacts(run_id).await, "list_artifacts"),
        vec![a1.clone(), a2.clone()],
        "list_artifacts must return the run's artifacts oldest first"
    );

    let record = ok(store.load_run(run_id).await, "load_run");
    assert_eq!(record.run, new.run);
    assert_eq!(record.jobs, jobs);
    let mut steps = new.steps.clone();
    steps.sort_by_key(|s| (s.job_id != build, s.execution_order));
    assert_eq!(
        record.steps, steps,
        "load_run steps must be ordered by job (stage order) then execution_order"
    );
    assert_eq!(record.executions, vec![e1, e2]);
    assert_eq!(record.artifacts, vec![a1, a2]);

    assert!(is_not_found(&store.get_project(ProjectId::new_v7()).await));
    assert!(is_not_found(
        &store
            .get_project_by_name(&format!("missing-{}", uuid::Uuid::now_v7()))
            .await
    ));
    assert!(is_not_found(
        &store.get_repository(RepositoryId::new_v7()).await
    ));
    assert!(is_not_found(
        &store.get_pipeline(PipelineId::new_v7()).await
    ));
    assert!(is_not_found(&store.get_run(RunId::new_v7()).await));
    assert!(is_not_found(
        &store.get_run_without_spec(RunId::new_v7()).await
    ));
    assert!(is_not_found(&store.load_run(RunId::new_v7()).await));
    assert!(is_not_found(
        &store.get_execution(ExecutionId::new_v7()).await
    ));
    assert!(is_not_found(
        &store.get_artifact(ArtifactId::new_v7()).await
    ));
    cancel_runs(store, &[run_id]).await;
}

fn is_already_exists(r: &Result<(), StoreError>) -> bool {
    matches!(r, Err(StoreError::AlreadyExists { .. }))
}

/// A taken id or project name is `AlreadyExists`; identical inserts inside batches are no-ops.
pub async fn duplicates_are_already_exists(store: &dyn Store) {
    let f = fixture(store).await;
    let mut same_name = f.project.clone();
    same_name.id = ProjectId::new_v7();
    assert!(
        is_already_exists(&store.create_project(&same_name).await),
        "a project with a taken name must be AlreadyExists"
    );
    let mut same_id = f.project.clone();
    same_id.name = format!("other-{}", uuid::Uuid::now_v7());
    assert!(
        is_already_exists(&store.create_project(&same_id).await),
        "a project with a taken id must be AlreadyExists"
    );
    assert!(is_already_exists(
        &store.create_repository(&f.repository).await
    ));
    assert!(is_already_exists(&store.create_pipeline(&f.pipeline).await));

    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    assert!(
        is_already_exists(&store.create_run(&new).await),
        "a run with a taken id must be AlreadyExists"
    );
    assert_eq!(
        ok(store.list_jobs(new.run.id).await, "list_jobs").len(),
        2,
        "a refused create_run must not add jobs"
    );

    let step = new.steps[0].id;
    let exec = new_execution(step, 1, "mock", f.now);
    let art = new_artifact(new.run.id, new.steps[0].job_id, Some(step), f.now);
    let insert = Batch {
        fences: Vec::new(),
        writes: vec![
            Write::InsertExecution(exec.clone()),
            Write::InsertArtifact(art.clone()),
        ],
    };
    ok(store.commit(&insert).await, "first insert");
    ok(
        store.commit(&insert).await,
        "an identical re-insert must be a no-op",
    );
    let mut other_exec = exec.clone();
    other_exec.executor_type = "other".to_owned();
    assert!(
        is_already_exists(&store.commit(&one(Write::InsertExecution(other_exec))).await),
        "a different execution under a taken id must be AlreadyExists"
    );
    let mut other_art = art.clone();
    other_art.size += 1;
    assert!(
        is_already_exists(&store.commit(&one(Write::InsertArtifact(other_art))).await),
        "a different artifact under a taken id must be AlreadyExists"
    );
    assert_eq!(
        ok(store.get_execution(exec.id).await, "get_execution"),
        exec
    );
    assert_eq!(ok(store.get_artifact(art.id).await, "get_artifact"), art);
    cancel_runs(store, &[new.run.id]).await;
}

fn is_refused_reference(r: &Result<(), StoreError>) -> bool {
    matches!(
        r,
        Err(StoreError::Invalid { .. } | StoreError::NotFound { .. })
    )
}

/// A reference to a missing parent is `Invalid` or `NotFound`, and nothing is written.
pub async fn missing_parents_are_refused(store: &dyn Store) {
    let now = store_now(store).await;
    let repo = new_repository(ProjectId::new_v7(), now);
    assert!(
        is_refused_reference(&store.create_repository(&repo).await),
        "a repository of a missing project must be refused"
    );
    assert!(is_not_found(&store.get_repository(repo.id).await));
    let pipeline = new_pipeline(RepositoryId::new_v7(), now);
    assert!(is_refused_reference(
        &store.create_pipeline(&pipeline).await
    ));
    let new = new_run(PipelineId::new_v7(), "main", Trigger::Push, now);
    assert!(
        is_refused_reference(&store.create_run(&new).await),
        "a run of a missing pipeline must be refused"
    );
    assert!(is_not_found(&store.get_run(new.run.id).await));
    let exec = new_execution(StepId::new_v7(), 1, "mock", now);
    assert!(
        is_refused_reference(
            &store
                .commit(&one(Write::InsertExecution(exec.clone())))
                .await
        ),
        "an execution of a missing step must be refused"
    );
    assert!(is_not_found(&store.get_execution(exec.id).await));
}

/// Updates apply when `expected_version` matches and fail with `Conflict` otherwise.
pub async fn updates_are_compare_and_set(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let run = new.run.clone();
    let started = Some(f.now);

    ok(
        store
            .commit(&one(Write::UpdateRun {
                id: run.id,
                expected_version: 0,
                status: RunStatus::Running,
                phase: RunPhase::Building,
                started_at: started,
                finished_at: None,
            }))
            .await,
        "UpdateRun at the current version",
    );
    let stored = ok(store.get_run(run.id).await, "get_run");
    assert_eq!(stored.version, 1, "an update must increment the version");
    let brief = ok(
        store.get_run_without_spec(run.id).await,
        "get_run_without_spec",
    );
    assert_eq!(
        (brief.version, brief.status, brief.phase, brief.started_at),
        (1, RunStatus::Running, RunPhase::Building, started),
        "get_run_without_spec must see the update"
    );
    assert_eq!(
        (stored.status, stored.phase, stored.started_at),
        (RunStatus::Running, RunPhase::Building, started)
    );
    let stale = store
        .commit(&one(Write::UpdateRun {
            id: run.id,
            expected_version: 0,
            status: RunStatus::Failed,
            phase: RunPhase::Building,
            started_at: started,
            finished_at: Some(f.now),
        }))
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 0,
                found: 1,
                ..
            })
        ),
        "a stale run update must be Conflict {{ expected: 0, found: 1 }}, got {stale:?}"
    );
    assert_eq!(ok(store.get_run(run.id).await, "get_run"), stored);

    let job = new
        .jobs
        .iter()
        .find(|j| j.job_type == JobType::Build)
        .cloned();
    let Some(job) = job else {
        panic!("fixture has a build job");
    };
    let job_update = |expected_version, status| Write::UpdateJob {
        id: job.id,
        expected_version,
        status,
        started_at: started,
        finished_at: None,
    };
    ok(
        store.commit(&one(job_update(0, Status::Running))).await,
        "UpdateJob",
    );
    assert!(matches!(
        store.commit(&one(job_update(0, Status::Failed))).await,
        Err(StoreError::Conflict { .. })
    ));
    let jobs = ok(store.list_jobs(run.id).await, "list_jobs");
    let stored_job = jobs.iter().find(|j| j.id == job.id);
    assert_eq!(
        stored_job.map(|j| (j.status, j.version)),
        Some((Status::Running, 1))
    );

    let step = new
        .steps
        .iter()
        .find(|s| s.job_id == job.id && s.execution_order == 0);
    let Some(step) = step.cloned() else {
        panic!("fixture has a first build step");
    };
    let step_update = |expected_version, attempt| Write::UpdateStep {
        id: step.id,
        expected_version,
        status: Status::Running,
        attempt,
        started_at: started,
        finished_at: None,
    };
    ok(store.commit(&one(step_update(0, 1))).await, "UpdateStep");
    assert!(matches!(
        store.commit(&one(step_update(0, 2))).await,
        Err(StoreError::Conflict { .. })
    ));
    let steps = ok(store.list_steps(job.id).await, "list_steps");
    assert_eq!(
        steps
            .iter()
            .find(|s| s.id == step.id)
            .map(|s| (s.attempt, s.version)),
        Some((1, 1))
    );

    let exec = new_execution(step.id, 1, "mock", f.now);
    ok(
        store
            .commit(&one(Write::InsertExecution(exec.clone())))
            .await,
        "InsertExecution",
    );
    let exec_update = |expected_version, status, exit_code| Write::UpdateExecution {
        id: exec.id,
        expected_version,
        status,
        external_id: "ext-1".to_owned(),
        exit_code,
        failure: None,
        completed_at: None,
    };
    ok(
        store
            .commit(&one(exec_update(0, Status::Running, None)))
            .await,
        "UpdateExecution",
    );
    assert!(matches!(
        store
            .commit(&one(exec_update(0, Status::Failed, Some(1))))
            .await,
        Err(StoreError::Conflict { .. })
    ));
    let e = ok(store.get_execution(exec.id).await, "get_execution");
    assert_eq!(
        (e.status, e.external_id.as_str(), e.version),
        (Status::Running, "ext-1", 1)
    );
    assert!(
        is_not_found(
            &store
                .commit(&one(Write::UpdateRun {
                    id: RunId::new_v7(),
                    expected_version: 0,
                    status: RunStatus::Running,
                    phase: RunPhase::Building,
                    started_at: None,
                    finished_at: None,
                }))
                .await
        ),
        "updating a missing run must be NotFound"
    );
    cancel_runs(store, &[run.id]).await;
}

/// Committing the same batch twice succeeds and changes nothing the second time.
pub async fn identical_replay_is_a_no_op(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let step = new.steps[0].clone();
    let exec = new_execution(step.id, 1, "mock", f.now);
    let batch = Batch {
        fences: Vec::new(),
        writes: vec![
            run_update(&new.run, RunStatus::Running, RunPhase::Building),
            Write::UpdateStep {
                id: step.id,
                expected_version: 0,
                status: Status::Running,
                attempt: 1,
                started_at: Some(f.now),
                finished_at: None,
            },
            Write::InsertExecution(exec.clone()),
        ],
    };
    ok(store.commit(&batch).await, "first commit");
    let before = ok(store.load_run(new.run.id).await, "load_run");
    ok(
        store.commit(&batch).await,
        "an identical replay must succeed",
    );
    let after = ok(store.load_run(new.run.id).await, "load_run");
    assert_eq!(before, after, "an identical replay must change nothing");
    assert_eq!(after.run.version, 1);
    cancel_runs(store, &[new.run.id]).await;
}

async fn events_after(store: &dyn Store, after: u64) -> Vec<crate::store::StoredEvent> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let page = ok(store.list_events(cursor, 500).await, "list_events");
        let Some(last) = page.last() else {
            return out;
        };
        assert!(
            last.seq > cursor,
            "list_events must return events after the given seq"
        );
        cursor = last.seq;
        out.extend(page);
    }
}

async fn last_seq(store: &dyn Store) -> u64 {
    events_after(store, 0).await.last().map_or(0, |e| e.seq)
}

/// A batch that fails (a conflict, a fence) leaves none of its writes applied.
pub async fn batches_are_atomic(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let before = ok(store.load_run(new.run.id).await, "load_run");
    let seq = last_seq(store).await;
    let job = new.jobs[0].clone();
    let step = new.steps[0].clone();
    let exec = new_execution(step.id, 1, "mock", f.now);
    let art = new_artifact(new.run.id, job.id, None, f.now);
    let writes = vec![
        run_update(&new.run, RunStatus::Running, RunPhase::Building),
        Write::UpdateJob {
            id: job.id,
            expected_version: 0,
            status: Status::Running,
            started_at: Some(f.now),
            finished_at: None,
        },
        Write::InsertExecution(exec.clone()),
        Write::UpdateExecution {
            id: exec.id,
            expected_version: 0,
            status: Status::Running,
            external_id: "x".to_owned(),
            exit_code: None,
            failure: None,
            completed_at: None,
        },
        Write::InsertArtifact(art.clone()),
        Write::AppendEvent(RunEvent {
            run_id: new.run.id,
            at: f.now,
            kind: RunEventKind::RunChanged {
                status: RunStatus::Running,
                phase: RunPhase::Building,
            },
        }),
    ];
    let mut failing = writes.clone();
    failing.push(Write::UpdateStep {
        id: step.id,
        expected_version: 7,
        status: Status::Running,
        attempt: 1,
        started_at: None,
        finished_at: None,
    });
    let r = store
        .commit(&Batch {
            fences: Vec::new(),
            writes: failing,
        })
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict { .. })),
        "a batch with a stale update must fail with Conflict, got {r:?}"
    );
    let (before_ref, run_id, exec_id, art_id) = (&before, new.run.id, exec.id, art.id);
    let check_untouched = |what: &'static str| async move {
        assert_eq!(
            &ok(store.load_run(run_id).await, "load_run"),
            before_ref,
            "{what}: a failed batch must leave the run untouched"
        );
        assert!(is_not_found(&store.get_execution(exec_id).await));
        assert!(is_not_found(&store.get_artifact(art_id).await));
        assert!(
            !events_after(store, seq)
                .await
                .iter()
                .any(|e| e.event.run_id == run_id),
            "{what}: a failed batch must append no event"
        );
    };
    check_untouched("conflict").await;

    // The same writes behind a fence that does not hold.
    let r = store
        .commit(&Batch {
            fences: vec![Fence {
                run_id: new.run.id,
                epoch: 9_999,
            }],
            writes: writes.clone(),
        })
        .await;
    assert!(
        matches!(r, Err(StoreError::Fenced { .. })),
        "a batch under a fence that does not hold must fail with Fenced, got {r:?}"
    );
    check_untouched("fence").await;

    // And without the failing write, all of it applies.
    ok(
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes,
            })
            .await,
        "the batch without its failing write",
    );
    let e = ok(store.get_execution(exec.id).await, "get_execution");
    assert_eq!(
        (e.status, e.version),
        (Status::Running, 1),
        "writes of a batch apply in order"
    );
    assert_eq!(ok(store.get_artifact(art.id).await, "get_artifact"), art);
    cancel_runs(store, &[new.run.id]).await;
}

/// Pages through `list` and returns every item, checking cursors make progress.
async fn collect_pages<T, F, Fut>(limit: u32, mut list: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<crate::store::Page<T>, StoreError>>,
{
    let mut out = Vec::new();
    let mut cursor = None;
    for _ in 0..100_000 {
        let page = ok(list(PageRequest { limit, cursor }).await, "list page");
        assert!(
            page.items.len() <= limit as usize,
            "a page must hold at most `limit` items"
        );
        if page.next_cursor.is_some() {
            assert!(
                !page.items.is_empty(),
                "a page with a next cursor must not be empty"
            );
        }
        out.extend(page.items);
        match page.next_cursor {
            None => return out,
            Some(c) => cursor = Some(c),
        }
    }
    panic!("pagination did not end");
}

fn assert_desc_no_repeats<I: Ord + Copy + std::fmt::Debug>(ids: &[I], what: &str) {
    let mut seen = BTreeSet::new();
    for w in ids.windows(2) {
        assert!(w[0] > w[1], "{what}: must be ordered by descending id");
    }
    for id in ids {
        assert!(seen.insert(*id), "{what}: {id:?} repeated across pages");
    }
}

/// `list_runs` applies each filter and pages by cursor without gaps or repeats.
pub async fn list_runs_filters_and_paginates(store: &dyn Store) {
    let f = fixture(store).await;
    let other = new_pipeline(f.repository.id, f.now);
    ok(store.create_pipeline(&other).await, "create_pipeline");
    let branch = format!("feature/{}", uuid::Uuid::now_v7());
    let mut runs = Vec::new();
    for i in 0..7u32 {
        let git_ref = if i % 2 == 0 { "main" } else { branch.as_str() };
        let trigger = if i % 3 == 0 {
            Trigger::Manual
        } else {
            Trigger::Push
        };
        let new = new_run(f.pipeline.id, git_ref, trigger, f.now);
        create_run(store, &new).await;
        if i < 2 {
            ok(
                store
                    .commit(&one(run_update(
                        &new.run,
                        RunStatus::Running,
                        RunPhase::Building,
                    )))
                    .await,
                "start run",
            );
        }
        runs.push(new.run);
    }
    let other_run = new_run(other.id, &branch, Trigger::Manual, f.now);
    create_run(store, &other_run).await;

    let mut expected: Vec<RunId> = runs.iter().map(|r| r.id).collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    let filter = RunFilter {
        pipeline_id: Some(f.pipeline.id),
        ..RunFilter::default()
    };
    for limit in [1, 2, 3, 7, 50] {
        let got: Vec<RunId> = collect_pages(limit, |p| {
            let filter = filter.clone();
            async move { store.list_runs(&filter, &p).await }
        })
        .await
        .iter()
        .map(|r| r.id)
        .collect();
        assert_eq!(
            got, expected,
            "list_runs by pipeline with limit {limit} must return every run once, newest first"
        );
    }
    let expect_ids = |pred: &dyn Fn(&PipelineRun) -> bool| {
        let mut v: Vec<RunId> = runs.iter().filter(|r| pred(r)).map(|r| r.id).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    };
    let list = |filter: RunFilter| async move {
        collect_pages(2, |p| {
            let filter = filter.clone();
            async move { store.list_runs(&filter, &p).await }
        })
        .await
        .iter()
        .map(|r| r.id)
        .collect::<Vec<RunId>>()
    };
    assert_eq!(
        list(RunFilter {
            pipeline_id: Some(f.pipeline.id),
            status: Some(RunStatus::Running),
            ..RunFilter::default()
        })
        .await,
        expect_ids(&|r| r.id == runs[0].id || r.id == runs[1].id),
        "status filter"
    );
    assert_eq!(
        list(RunFilter {
            pipeline_id: Some(f.pipeline.id),
            git_ref: Some(branch.clone()),
            ..RunFilter::default()
        })
        .await,
        expect_ids(&|r| r.git_ref == branch),
        "git_ref filter"
    );
    assert_eq!(
        list(RunFilter {
            pipeline_id: Some(f.pipeline.id),
            trigger: Some(Trigger::Manual),
            ..RunFilter::default()
        })
        .await,
        expect_ids(&|r| r.trigger == Trigger::Manual),
        "trigger filter"
    );
    // Filters without a pipeline see other pipelines' runs too.
    let by_branch = list(RunFilter {
        git_ref: Some(branch.clone()),
        ..RunFilter::default()
    })
    .await;
    let mut want = expect_ids(&|r| r.git_ref == branch);
    want.push(other_run.run.id);
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(by_branch, want, "git_ref filter across pipelines");

    // The unfiltered listing holds ours in order, without repeats.
    let all: Vec<RunId> = collect_pages(3, |p| async move {
        store.list_runs(&RunFilter::default(), &p).await
    })
    .await
    .iter()
    .map(|r| r.id)
    .collect();
    assert_desc_no_repeats(&all, "list_runs");
    let ours: Vec<RunId> = all
        .iter()
        .copied()
        .filter(|id| expected.contains(id))
        .collect();
    assert_eq!(ours, expected, "the unfiltered listing must hold every run");

    let bad = store
        .list_runs(
            &RunFilter::default(),
            &PageRequest {
                limit: 2,
                cursor: Some("not a cursor".to_owned()),
            },
        )
        .await;
    assert!(
        matches!(bad, Err(StoreError::Invalid { .. })),
        "a malformed cursor must be Invalid, got {bad:?}"
    );
    let mut ids: Vec<RunId> = runs.iter().map(|r| r.id).collect();
    ids.push(other_run.run.id);
    cancel_runs(store, &ids).await;
}

/// Projects, repositories (by project) and pipelines (by repository) page without gaps.
pub async fn lists_of_projects_repositories_pipelines_paginate(store: &dyn Store) {
    let f = fixture(store).await;
    let mut repos = vec![f.repository.id];
    let mut pipelines = vec![f.pipeline.id];
    for _ in 0..4 {
        let r = new_repository(f.project.id, f.now);
        ok(store.create_repository(&r).await, "create_repository");
        repos.push(r.id);
        let p = new_pipeline(f.repository.id, f.now);
        ok(store.create_pipeline(&p).await, "create_pipeline");
        pipelines.push(p.id);
    }
    repos.sort_unstable_by(|a, b| b.cmp(a));
    pipelines.sort_unstable_by(|a, b| b.cmp(a));
    let project = f.project.id;
    let got: Vec<RepositoryId> = collect_pages(2, |p| async move {
        store.list_repositories(Some(project), &p).await
    })
    .await
    .iter()
    .map(|r| r.id)
    .collect();
    assert_eq!(got, repos, "list_repositories of a project");
    let repo = f.repository.id;
    let got: Vec<PipelineId> =
        collect_pages(
            2,
            |p| async move { store.list_pipelines(Some(repo), &p).await },
        )
        .await
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(got, pipelines, "list_pipelines of a repository");

    let extra = fixture(store).await;
    let all: Vec<ProjectId> = collect_pages(2, |p| async move { store.list_projects(&p).await })
        .await
        .iter()
        .map(|p| p.id)
        .collect();
    assert_desc_no_repeats(&all, "list_projects");
    assert!(all.contains(&f.project.id) && all.contains(&extra.project.id));
    let all: Vec<RepositoryId> =
        collect_pages(
            3,
            |p| async move { store.list_repositories(None, &p).await },
        )
        .await
        .iter()
        .map(|r| r.id)
        .collect();
    assert_desc_no_repeats(&all, "list_repositories");
    assert!(repos.iter().all(|r| all.contains(r)));
}

/// `list_all_artifacts` pages newest first without gaps or repeats.
pub async fn list_all_artifacts_paginates(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let mut ids = Vec::new();
    let mut writes = Vec::new();
    for i in 0..7 {
        let a = new_artifact(
            new.run.id,
            new.jobs[0].id,
            None,
            Timestamp::from_unix_micros(f.now.as_unix_micros() + i),
        );
        ids.push(a.id);
        writes.push(Write::InsertArtifact(a));
    }
    ok(
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes,
            })
            .await,
        "insert artifacts",
    );
    let min = ids.iter().copied().min();
    // Page until past our oldest artifact (the store may hold many older ones).
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(
            store
                .list_all_artifacts(&PageRequest {
                    limit: 2,
                    cursor: cursor.take(),
                })
                .await,
            "list_all_artifacts",
        );
        seen.extend(page.items.iter().map(|a| a.id));
        let past = page.items.last().map(|a| a.id) < min;
        match page.next_cursor {
            Some(c) if !past => cursor = Some(c),
            _ => break,
        }
    }
    assert_desc_no_repeats(&seen, "list_all_artifacts");
    let mut want = ids.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    let ours: Vec<ArtifactId> = seen.into_iter().filter(|id| ids.contains(id)).collect();
    assert_eq!(
        ours, want,
        "list_all_artifacts must hold every artifact once"
    );
    cancel_runs(store, &[new.run.id]).await;
}

/// Events come back in commit order with increasing `seq`.
pub async fn events_are_ordered(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let seq = last_seq(store).await;
    let kinds = [
        RunEventKind::RunChanged {
            status: RunStatus::Running,
            phase: RunPhase::Building,
        },
        RunEventKind::JobChanged {
            job_id: new.jobs[0].id,
            status: Status::Running,
        },
        RunEventKind::StepChanged {
            step_id: new.steps[0].id,
            status: Status::Running,
            attempt: 1,
        },
        RunEventKind::ExecutionChanged {
            execution_id: ExecutionId::derive(new.steps[0].id, 1),
            status: Status::Succeeded,
        },
        RunEventKind::ArtifactRegistered {
            artifact_id: ArtifactId::new_v7(),
        },
    ];
    let event = |kind: &RunEventKind| {
        Write::AppendEvent(RunEvent {
            run_id: new.run.id,
            at: f.now,
            kind: kind.clone(),
        })
    };
    ok(
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes: kinds[..2].iter().map(event).collect(),
            })
            .await,
        "append events",
    );
    for kind in &kinds[2..] {
        ok(store.commit(&one(event(kind))).await, "append event");
    }
    let ours: Vec<crate::store::StoredEvent> = events_after(store, seq)
        .await
        .into_iter()
        .filter(|e| e.event.run_id == new.run.id)
        .collect();
    assert_eq!(
        ours.iter()
            .map(|e| e.event.kind.clone())
            .collect::<Vec<_>>(),
        kinds.to_vec(),
        "events must come back in commit order"
    );
    assert!(ours.iter().all(|e| e.event.at == f.now));
    for w in ours.windows(2) {
        assert!(w[0].seq < w[1].seq, "event seqs must increase");
    }
    if let Some(first) = ours.first() {
        let next = ok(store.list_events(first.seq, 1).await, "list_events");
        assert_eq!(next.len(), 1, "list_events must honour its limit");
        assert!(next[0].seq > first.seq);
    }
    cancel_runs(store, &[new.run.id]).await;
}

/// Claims by `owner` until `run` is among them or nothing more is claimable.
async fn claim_until(
    store: &dyn Store,
    owner: &str,
    ttl: Duration,
    run: RunId,
    taken: &mut Vec<RunLease>,
) -> Option<RunLease> {
    for _ in 0..MAX_ROUNDS {
        let got = ok(store.claim_runs(owner, ttl, 1000).await, "claim_runs");
        if got.is_empty() {
            return None;
        }
        let found = got.iter().find(|l| l.run_id == run).cloned();
        for l in &got {
            assert_eq!(l.owner, owner, "a claimed lease must name its owner");
        }
        taken.extend(got);
        if found.is_some() {
            return found;
        }
    }
    panic!("claim_runs kept returning runs: held leases are being handed out again");
}

fn owner(name: &str) -> String {
    format!("conformance-{name}-{}", uuid::Uuid::now_v7())
}

/// Concurrent claims hand each run to exactly one owner; held runs are not claimed again.
pub async fn lease_claims_are_exclusive(store: &dyn Store) {
    let f = fixture(store).await;
    let mut runs = Vec::new();
    for _ in 0..12 {
        let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
        create_run(store, &new).await;
        runs.push(new.run.id);
    }
    let finished = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &finished).await;
    cancel_runs(store, &[finished.run.id]).await;

    let owners: Vec<String> = (0..4).map(|i| owner(&format!("x{i}"))).collect();
    let claims = futures_util::future::join_all(owners.iter().map(|o| async move {
        let mut all = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let got = ok(store.claim_runs(o, LONG_TTL, 3).await, "claim_runs");
            assert!(got.len() <= 3, "claim_runs must honour its limit");
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
        panic!("claim_runs kept returning runs: held leases are being handed out again");
    }))
    .await;
    let all: Vec<RunLease> = claims.into_iter().flatten().collect();
    let mut holders = BTreeMap::new();
    for lease in &all {
        assert!(
            holders.insert(lease.run_id, lease.owner.clone()).is_none(),
            "run {} was claimed twice while its lease was held",
            lease.run_id
        );
    }
    for run in &runs {
        assert!(
            holders.contains_key(run),
            "every claimable run must be claimed by someone"
        );
    }
    assert!(
        !holders.contains_key(&finished.run.id),
        "a terminal run must never be claimed"
    );
    let again = ok(
        store.claim_runs(&owner("late"), LONG_TTL, 1000).await,
        "claim_runs",
    );
    assert!(
        !again.iter().any(|l| runs.contains(&l.run_id)),
        "a held, unexpired lease must not be claimed again"
    );
    release_all(store, &again).await;
    release_all(store, &all).await;
    cancel_runs(store, &runs).await;
}

/// An expired lease is claimed again with a higher epoch, by the store's clock.
pub async fn lease_expires_and_run_is_rescued(store: &dyn Store, caps: &StoreCaps) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let run = new.run.id;
    let mut taken = Vec::new();
    let a = owner("a");
    let first = claim_until(store, &a, caps.short_ttl, run, &mut taken).await;
    let Some(first) = first else {
        panic!("a new run must be claimable");
    };
    let claimed_at = store_now(store).await;
    assert!(
        first.expires_at > f.now && first.expires_at <= claimed_at + caps.short_ttl,
        "expires_at must be the claim time plus ttl by the store's clock"
    );
    let b = owner("b");
    let rescued = poll(
        store,
        caps,
        "the expired lease to be claimable again",
        || {
            let b = b.clone();
            async move {
                let mut local = Vec::new();
                let got = claim_until(store, &b, LONG_TTL, run, &mut local).await;
                let others: Vec<RunLease> = local.into_iter().filter(|l| l.run_id != run).collect();
                release_all(store, &others).await;
                got
            }
        },
    )
    .await;
    assert!(
        rescued.epoch > first.epoch,
        "a rescued lease must have a higher epoch ({} <= {})",
        rescued.epoch,
        first.epoch
    );
    assert_eq!(rescued.owner, b);
    let now = store_now(store).await;
    assert!(
        now >= first.expires_at,
        "a lease must not be claimed again before it expires by the store's clock"
    );
    let renewed = ok(
        store
            .renew_leases(std::slice::from_ref(&first), LONG_TTL)
            .await,
        "renew_leases",
    );
    assert!(
        renewed.is_empty(),
        "a lease claimed by another must not be renewed"
    );
    let fenced = store
        .commit(&Batch {
            fences: vec![first.fence()],
            writes: vec![run_update(&new.run, RunStatus::Running, RunPhase::Building)],
        })
        .await;
    assert!(
        matches!(fenced, Err(StoreError::Fenced { .. })),
        "the previous holder's batch must be Fenced, got {fenced:?}"
    );
    release_all(store, &taken).await;
    release_all(store, &[rescued]).await;
    cancel_runs(store, &[run]).await;
}

/// Polls `attempt` until it yields `Some`, sleeping briefly between tries, up to
/// `caps.wait_limit` by the store's clock.
async fn poll<T, F, Fut>(store: &dyn Store, caps: &StoreCaps, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = store_now(store).await;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = attempt().await {
            return v;
        }
        let now = store_now(store).await;
        if now.saturating_duration_since(start) > caps.wait_limit {
            panic!("timed out after {:?} waiting for {what}", caps.wait_limit);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// After a takeover, batches fenced with the previous epoch fail with `Fenced` and write
/// nothing; batches with the current epoch apply.
pub async fn stale_holder_is_fenced(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let run = new.run.id;
    let mut taken = Vec::new();
    let Some(stale) = claim_until(store, &owner("a"), LONG_TTL, run, &mut taken).await else {
        panic!("a new run must be claimable");
    };
    ok(
        store
            .commit(&Batch {
                fences: vec![stale.fence()],
                writes: vec![run_update(&new.run, RunStatus::Running, RunPhase::Building)],
            })
            .await,
        "a batch under a held lease",
    );
    ok(store.release_lease(&stale).await, "release_lease");
    let Some(current) = claim_until(store, &owner("b"), LONG_TTL, run, &mut taken).await else {
        panic!("a released run must be claimable");
    };
    assert!(
        current.epoch > stale.epoch,
        "every claim must raise the epoch"
    );
    let run_now = ok(store.get_run(run).await, "get_run");
    let r = store
        .commit(&Batch {
            fences: vec![stale.fence()],
            writes: vec![run_update(&run_now, RunStatus::Failed, RunPhase::Building)],
        })
        .await;
    match r {
        Err(StoreError::Fenced {
            run_id,
            epoch,
            current: at,
        }) => {
            assert_eq!((run_id, epoch, at), (run, stale.epoch, current.epoch));
        }
        other => panic!("a stale holder's batch must be Fenced, got {other:?}"),
    }
    assert_eq!(
        ok(store.get_run(run).await, "get_run"),
        run_now,
        "a fenced batch must write nothing"
    );
    ok(
        store
            .commit(&Batch {
                fences: vec![current.fence()],
                writes: vec![run_update(
                    &run_now,
                    RunStatus::Canceled,
                    RunPhase::Building,
                )],
            })
            .await,
        "a batch under the current lease",
    );
    release_all(store, &taken).await;
}

/// `renew_leases` extends held leases and leaves out lost ones.
pub async fn leases_renew(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let mut taken = Vec::new();
    let short = Duration::from_secs(600);
    let Some(lease) = claim_until(store, &owner("a"), short, new.run.id, &mut taken).await else {
        panic!("a new run must be claimable");
    };
    let renewed = ok(
        store
            .renew_leases(std::slice::from_ref(&lease), LONG_TTL)
            .await,
        "renew_leases",
    );
    assert_eq!(renewed.len(), 1, "a held lease must be renewed");
    assert_eq!(
        (renewed[0].run_id, &renewed[0].owner, renewed[0].epoch),
        (lease.run_id, &lease.owner, lease.epoch),
        "renewal keeps the run, owner and epoch"
    );
    assert!(
        renewed[0].expires_at > lease.expires_at,
        "renewal must move expires_at forward"
    );
    let mut forged = lease.clone();
    forged.owner = owner("forger");
    let mut wrong_epoch = lease.clone();
    wrong_epoch.epoch += 1;
    let r = ok(
        store.renew_leases(&[forged, wrong_epoch], LONG_TTL).await,
        "renew_leases",
    );
    assert!(r.is_empty(), "leases not held must not be renewed: {r:?}");
    release_all(store, &taken).await;
    cancel_runs(store, &[new.run.id]).await;
}

/// A released run can be claimed at once; releasing a lease that was taken over changes
/// nothing for the new holder.
pub async fn leases_release(store: &dyn Store) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let run = new.run.id;
    let mut taken = Vec::new();
    let Some(a) = claim_until(store, &owner("a"), LONG_TTL, run, &mut taken).await else {
        panic!("a new run must be claimable");
    };
    ok(store.release_lease(&a).await, "release_lease");
    let Some(b) = claim_until(store, &owner("b"), LONG_TTL, run, &mut taken).await else {
        panic!("a released run must be claimable at once");
    };
    let stale = store.release_lease(&a).await;
    assert!(
        matches!(stale, Ok(()) | Err(StoreError::LeaseLost { .. })),
        "releasing a lost lease is Ok or LeaseLost, got {stale:?}"
    );
    let mut late = Vec::new();
    let stolen = claim_until(store, &owner("c"), LONG_TTL, run, &mut late).await;
    assert!(
        stolen.is_none(),
        "releasing a lost lease must not release the new holder's"
    );
    taken.extend(late);
    let renewed = ok(
        store.renew_leases(std::slice::from_ref(&b), LONG_TTL).await,
        "renew_leases",
    );
    assert_eq!(renewed.len(), 1, "the new holder still holds the lease");
    release_all(store, &taken).await;
    cancel_runs(store, &[run]).await;
}

/// A run with `n` steps of which executions are inserted, pending, under `executor_type`.
async fn executions_fixture(
    store: &dyn Store,
    executor_type: &str,
    count: u32,
) -> (RunId, Vec<Execution>) {
    let f = fixture(store).await;
    let new = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    create_run(store, &new).await;
    let mut execs = Vec::new();
    for i in 0..count {
        let step = new.steps[(i as usize) % new.steps.len()].id;
        execs.push(new_execution(step, i + 1, executor_type, f.now));
    }
    ok(
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes: execs.iter().cloned().map(Write::InsertExecution).collect(),
            })
            .await,
        "insert executions",
    );
    (new.run.id, execs)
}

/// Concurrent workers each get distinct executions; every queued one is handed out once.
pub async fn executions_are_claimed_exactly_once(store: &dyn Store) {
    let executor_type = format!("conformance-{}", uuid::Uuid::now_v7());
    let (run, execs) = executions_fixture(store, &executor_type, 20).await;
    // One is already running: not queued.
    let running = &execs[0];
    ok(
        store
            .commit(&one(Write::UpdateExecution {
                id: running.id,
                expected_version: 0,
                status: Status::Running,
                external_id: "ext".to_owned(),
                exit_code: None,
                failure: None,
                completed_at: None,
            }))
            .await,
        "start an execution",
    );
    let workers: Vec<String> = (0..4).map(|i| owner(&format!("w{i}"))).collect();
    let per_worker = futures_util::future::join_all(workers.iter().map(|w| {
        let executor_type = executor_type.clone();
        async move {
            let mut got = Vec::new();
            for _ in 0..MAX_ROUNDS {
                let claims = ok(
                    store.claim_executions(&executor_type, w, LONG_TTL, 3).await,
                    "claim_executions",
                );
                assert!(claims.len() <= 3, "claim_executions must honour its limit");
                if claims.is_empty() {
                    return got;
                }
                for c in &claims {
                    assert_eq!(&c.worker, w);
                }
                got.extend(claims);
            }
            panic!("claim_executions kept returning executions: claims are handed out again");
        }
    }))
    .await;
    let claims: Vec<_> = per_worker.into_iter().flatten().collect();
    let mut ids = BTreeSet::new();
    for c in &claims {
        assert!(
            ids.insert(c.execution_id),
            "execution {} was claimed twice",
            c.execution_id
        );
        let e = execs.iter().find(|e| e.id == c.execution_id);
        let Some(e) = e else {
            panic!("claimed an execution of another executor type");
        };
        assert_eq!((c.step_id, c.attempt), (e.job_step_id, e.attempt));
    }
    let want: BTreeSet<ExecutionId> = execs[1..].iter().map(|e| e.id).collect();
    assert_eq!(
        ids, want,
        "every pending execution, and only those, must be claimed once"
    );
    let other_type = ok(
        store
            .claim_executions(
                &format!("other-{}", uuid::Uuid::now_v7()),
                "w",
                LONG_TTL,
                10,
            )
            .await,
        "claim_executions",
    );
    assert!(other_type.is_empty());
    cancel_runs(store, &[run]).await;
}

/// A held claim renews; a forged one is `LeaseLost`.
pub async fn execution_claims_renew(store: &dyn Store) {
    let executor_type = format!("conformance-{}", uuid::Uuid::now_v7());
    let (run, _) = executions_fixture(store, &executor_type, 1).await;
    let w = owner("w");
    let claims = ok(
        store
            .claim_executions(&executor_type, &w, Duration::from_secs(600), 10)
            .await,
        "claim_executions",
    );
    assert_eq!(claims.len(), 1);
    let renewed = ok(
        store.renew_execution_claim(&claims[0], LONG_TTL).await,
        "renew_execution_claim",
    );
    assert_eq!(renewed.execution_id, claims[0].execution_id);
    assert_eq!(renewed.worker, w);
    assert!(renewed.expires_at > claims[0].expires_at);
    let mut forged = claims[0].clone();
    forged.worker = owner("forger");
    let r = store.renew_execution_claim(&forged, LONG_TTL).await;
    assert!(
        matches!(r, Err(StoreError::LeaseLost { .. })),
        "renewing another worker's claim must be LeaseLost, got {r:?}"
    );
    cancel_runs(store, &[run]).await;
}

/// Expired claims of unfinished executions are returned once; finished ones never.
pub async fn expired_execution_claims_are_taken_once(store: &dyn Store, caps: &StoreCaps) {
    let executor_type = format!("conformance-{}", uuid::Uuid::now_v7());
    let (run, execs) = executions_fixture(store, &executor_type, 2).await;
    let w = owner("w");
    let claims = ok(
        store
            .claim_executions(&executor_type, &w, caps.short_ttl, 10)
            .await,
        "claim_executions",
    );
    assert_eq!(claims.len(), 2, "both queued executions must be claimed");
    let done = &execs[1];
    ok(
        store
            .commit(&one(Write::UpdateExecution {
                id: done.id,
                expected_version: 0,
                status: Status::Succeeded,
                external_id: "ext".to_owned(),
                exit_code: Some(0),
                failure: None,
                completed_at: Some(store_now(store).await),
            }))
            .await,
        "finish an execution",
    );
    let lost = execs[0].id;
    let done_id = done.id;
    let claim = poll(
        store,
        caps,
        "the execution claim to expire",
        || async move {
            let taken = ok(
                store.take_expired_execution_claims().await,
                "take_expired_execution_claims",
            );
            assert!(
                !taken.iter().any(|c| c.execution_id == done_id),
                "a finished execution's claim must not be returned"
            );
            taken.into_iter().find(|c| c.execution_id == lost)
        },
    )
    .await;
    assert_eq!(claim.worker, w);
    let again = ok(
        store.take_expired_execution_claims().await,
        "take_expired_execution_claims",
    );
    assert!(
        !again
            .iter()
            .any(|c| c.execution_id == lost || c.execution_id == done.id),
        "an expired claim must be returned only once"
    );
    let r = store.renew_execution_claim(&claim, LONG_TTL).await;
    assert!(
        matches!(r, Err(StoreError::LeaseLost { .. })),
        "renewing a claim that was taken as expired must be LeaseLost, got {r:?}"
    );
    cancel_runs(store, &[run]).await;
}

fn new_token(name: &str, role: TokenRole, scope: ProjectScope, now: Timestamp) -> ApiToken {
    use sha2::Digest;
    let id = ApiTokenId::new_v7();
    ApiToken {
        id,
        name: name.to_owned(),
        role,
        scope,
        secret_sha256: hex_lower(&sha2::Sha256::digest(id.0.as_bytes())),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// API tokens round-trip with their scope, are found by hash, listed newest first, touched,
/// and revoked once (a second revocation keeps the first time); duplicates are refused.
pub async fn api_tokens_are_found_by_hash_and_revoked(store: &dyn Store) {
    let f = fixture(store).await;
    let all = new_token(
        "conformance-admin",
        TokenRole::Admin,
        ProjectScope::All,
        f.now,
    );
    let scoped = new_token(
        "conformance-viewer",
        TokenRole::Viewer,
        ProjectScope::Projects(vec![f.project.id]),
        f.now,
    );
    ok(store.create_api_token(&all).await, "create_api_token");
    ok(store.create_api_token(&scoped).await, "create_api_token");
    assert_eq!(
        ok(
            store.find_api_token(&all.secret_sha256).await,
            "find_api_token"
        ),
        all,
        "a token is found by its hash unchanged"
    );
    assert_eq!(
        ok(
            store.find_api_token(&scoped.secret_sha256).await,
            "find_api_token"
        ),
        scoped,
        "a scoped token keeps its project list"
    );
    match store.find_api_token(&"0".repeat(64)).await {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("find_api_token of an unknown hash must be NotFound, got {other:?}"),
    }
    let mut dup = new_token("dup", TokenRole::Viewer, ProjectScope::All, f.now);
    dup.id = all.id;
    match store.create_api_token(&dup).await {
        Err(StoreError::AlreadyExists { .. }) => {}
        other => panic!("a token with a taken id must be AlreadyExists, got {other:?}"),
    }
    let mut dup = new_token("dup", TokenRole::Viewer, ProjectScope::All, f.now);
    dup.secret_sha256.clone_from(&all.secret_sha256);
    match store.create_api_token(&dup).await {
        Err(StoreError::AlreadyExists { .. }) => {}
        other => panic!("a token with a taken secret hash must be AlreadyExists, got {other:?}"),
    }
    let listed: Vec<ApiTokenId> = ok(store.list_api_tokens().await, "list_api_tokens")
        .into_iter()
        .map(|t| t.id)
        .filter(|id| *id == all.id || *id == scoped.id)
        .collect();
    assert_eq!(
        listed,
        vec![scoped.id, all.id],
        "list_api_tokens lists newest first"
    );

    let used = f.now + Duration::from_secs(5);
    ok(
        store.touch_api_token(scoped.id, used).await,
        "touch_api_token",
    );
    let found = ok(
        store.find_api_token(&scoped.secret_sha256).await,
        "find_api_token",
    );
    assert_eq!(found.last_used_at, Some(used), "touch records last_used_at");

    let revoked_at = f.now + Duration::from_secs(10);
    let revoked = ok(
        store.revoke_api_token(all.id, revoked_at).await,
        "revoke_api_token",
    );
    assert_eq!(
        revoked.revoked_at,
        Some(revoked_at),
        "revoke sets revoked_at"
    );
    let again = ok(
        store
            .revoke_api_token(all.id, revoked_at + Duration::from_secs(1))
            .await,
        "revoke_api_token again",
    );
    assert_eq!(
        again.revoked_at,
        Some(revoked_at),
        "revoking twice keeps the first revocation time"
    );
    assert_eq!(
        ok(
            store.find_api_token(&all.secret_sha256).await,
            "find_api_token"
        )
        .revoked_at,
        Some(revoked_at),
        "a revoked token is still found, marked revoked"
    );
    match store
        .revoke_api_token(ApiTokenId::new_v7(), revoked_at)
        .await
    {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("revoking an unknown token must be NotFound, got {other:?}"),
    }
    match store
        .touch_api_token(ApiTokenId::new_v7(), revoked_at)
        .await
    {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("touching an unknown token must be NotFound, got {other:?}"),
    }
}

/// The first record of a (pipeline, key) wins; the same key of another pipeline is separate;
/// a record for a missing pipeline or run is refused.
pub async fn idempotency_records_keep_the_first(store: &dyn Store) {
    let f = fixture(store).await;
    let other = fixture(store).await;
    let first = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    let second = new_run(f.pipeline.id, "main", Trigger::Push, f.now);
    let third = new_run(other.pipeline.id, "main", Trigger::Push, f.now);
    for new in [&first, &second, &third] {
        create_run(store, new).await;
    }
    let key = format!("key-{}", uuid::Uuid::now_v7());
    assert_eq!(
        ok(
            store.get_idempotency_record(f.pipeline.id, &key).await,
            "get_idempotency_record"
        ),
        None,
        "an unknown key has no record"
    );
    let record = IdempotencyRecord {
        pipeline_id: f.pipeline.id,
        key: key.clone(),
        fingerprint: "sha256:one".to_owned(),
        run_id: first.run.id,
        created_at: f.now,
    };
    assert_eq!(
        ok(
            store.put_idempotency_record(&record).await,
            "put_idempotency_record"
        ),
        record,
        "the first record is stored and returned"
    );
    let later = IdempotencyRecord {
        fingerprint: "sha256:two".to_owned(),
        run_id: second.run.id,
        ..record.clone()
    };
    assert_eq!(
        ok(
            store.put_idempotency_record(&later).await,
            "put_idempotency_record again"
        ),
        record,
        "a second record under the same key returns the first, unchanged"
    );
    assert_eq!(
        ok(
            store.get_idempotency_record(f.pipeline.id, &key).await,
            "get_idempotency_record"
        ),
        Some(record.clone()),
        "get returns the first record"
    );
    let elsewhere = IdempotencyRecord {
        pipeline_id: other.pipeline.id,
        run_id: third.run.id,
        ..later.clone()
    };
    assert_eq!(
        ok(
            store.put_idempotency_record(&elsewhere).await,
            "put_idempotency_record in another pipeline"
        ),
        elsewhere,
        "keys are per pipeline"
    );
    let orphan = IdempotencyRecord {
        key: format!("key-{}", uuid::Uuid::now_v7()),
        run_id: RunId::new_v7(),
        ..record.clone()
    };
    match store.put_idempotency_record(&orphan).await {
        Err(StoreError::NotFound { .. } | StoreError::Invalid { .. }) => {}
        other => panic!("a record of a missing run must be refused, got {other:?}"),
    }
    cancel_runs(store, &[first.run.id, second.run.id, third.run.id]).await;
}

/// A cancel request is kept for whichever driver owns the run: `cancel_requests` reports it
/// among the runs asked about, a repeated request changes nothing, an unknown run is
/// `NotFound`.
pub async fn cancel_requests_are_recorded_once(store: &dyn Store) {
    let f = fixture(store).await;
    let asked = new_run(f.pipeline.id, "main", Trigger::Manual, f.now);
    let quiet = new_run(f.pipeline.id, "main", Trigger::Manual, f.now);
    for new in [&asked, &quiet] {
        create_run(store, new).await;
    }
    let both = [asked.run.id, quiet.run.id];
    assert_eq!(
        ok(store.cancel_requests(&both).await, "cancel_requests"),
        Vec::<RunId>::new(),
        "no run has a cancel request yet"
    );
    for by in ["alice", "bob"] {
        ok(
            store.request_cancel(asked.run.id, by, f.now).await,
            "request_cancel",
        );
    }
    assert_eq!(
        ok(store.cancel_requests(&both).await, "cancel_requests"),
        vec![asked.run.id],
        "the requested run, once, and only it"
    );
    assert_eq!(
        ok(
            store.cancel_requests(&[]).await,
            "cancel_requests of no runs"
        ),
        Vec::<RunId>::new(),
    );
    assert_eq!(
        ok(
            store.cancel_requests(&[RunId::new_v7()]).await,
            "cancel_requests of an unknown run"
        ),
        Vec::<RunId>::new(),
    );
    match store.request_cancel(RunId::new_v7(), "alice", f.now).await {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("a cancel request for a missing run must be NotFound, got {other:?}"),
    }
    cancel_runs(store, &both).await;
}

/// A step starting, as the engine commits it: a fenced batch (the run claimed for it) updating
/// the run, its job and its step, inserting the execution and an artifact, and appending an
/// event. For adapters' tests of their commit path.
///
/// # Panics
/// When the store cannot create or claim the run.
pub async fn step_start_batch(store: &dyn Store) -> Batch {
    let fx = fixture(store).await;
    let new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    store.create_run(&new).await.expect("step_start_batch");
    let lease = store
        .claim_runs("script-test", Duration::from_secs(60), 10)
        .await
        .expect("step_start_batch")
        .into_iter()
        .find(|l| l.run_id == new.run.id)
        .expect("step_start_batch");
    let job = new
        .jobs
        .iter()
        .find(|j| j.job_type == JobType::Build)
        .expect("step_start_batch");
    let step = new
        .steps
        .iter()
        .find(|s| s.job_id == job.id)
        .expect("step_start_batch");
    let execution = new_execution(step.id, 1, "local", fx.now);
    Batch {
        fences: vec![Fence {
            run_id: new.run.id,
            epoch: lease.epoch,
        }],
        writes: vec![
            Write::UpdateRun {
                id: new.run.id,
                expected_version: 0,
                status: RunStatus::Running,
                phase: RunPhase::Building,
                started_at: Some(fx.now),
                finished_at: None,
            },
            Write::UpdateJob {
                id: job.id,
                expected_version: 0,
                status: Status::Running,
                started_at: Some(fx.now),
                finished_at: None,
            },
            Write::UpdateStep {
                id: step.id,
                expected_version: 0,
                status: Status::Running,
                attempt: 1,
                started_at: Some(fx.now),
                finished_at: None,
            },
            Write::InsertExecution(execution),
            Write::InsertArtifact(new_artifact(new.run.id, job.id, Some(step.id), fx.now)),
            Write::AppendEvent(RunEvent {
                run_id: new.run.id,
                at: fx.now,
                kind: RunEventKind::StepChanged {
                    step_id: step.id,
                    status: Status::Running,
                    attempt: 1,
                },
            }),
        ],
    }
}
