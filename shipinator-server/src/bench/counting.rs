//! A `Store` decorator that counts commits and the transitions they carry, so benchmarks can
//! report transitions per commit for any backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shipinator_core::domain::{
    ApiTokenId, Artifact, ArtifactId, Execution, ExecutionId, Job, JobId, JobStep, Pipeline,
    PipelineId, PipelineRun, Project, ProjectId, Repository, RepositoryId, RunId, StepId,
};
use shipinator_core::store::{
    ApiToken, Batch, ExecutionClaim, IdempotencyRecord, NewRun, Page, PageRequest, RunFilter,
    RunLease, RunRecord, Store, StoreError, StoredEvent, Write,
};
use shipinator_core::time::Timestamp;

/// Counts what goes through [`Store::commit`] and [`Store::create_run`].
#[derive(Debug)]
pub(crate) struct CountingStore {
    inner: Arc<dyn Store>,
    /// Successful `commit` and `create_run` calls (database transactions).
    pub(crate) commits: AtomicU64,
    /// State transitions committed: updates of runs, jobs, steps and executions, and inserted
    /// executions.
    pub(crate) transitions: AtomicU64,
}

impl CountingStore {
    pub(crate) fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            commits: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
        }
    }
}

fn transitions(batch: &Batch) -> u64 {
    batch
        .writes
        .iter()
        .filter(|w| match w {
            Write::UpdateRun { .. }
            | Write::UpdateJob { .. }
            | Write::UpdateStep { .. }
            | Write::InsertExecution(_)
            | Write::UpdateExecution { .. } => true,
            Write::InsertArtifact(_) | Write::AppendEvent(_) => false,
        })
        .count() as u64
}

#[async_trait::async_trait]
impl Store for CountingStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn now(&self) -> Result<Timestamp, StoreError> {
        self.inner.now().await
    }
    async fn create_project(&self, project: &Project) -> Result<(), StoreError> {
        self.inner.create_project(project).await
    }
    async fn get_project(&self, id: ProjectId) -> Result<Project, StoreError> {
        self.inner.get_project(id).await
    }
    async fn get_project_by_name(&self, name: &str) -> Result<Project, StoreError> {
        self.inner.get_project_by_name(name).await
    }
    async fn list_projects(&self, page: &PageRequest) -> Result<Page<Project>, StoreError> {
        self.inner.list_projects(page).await
    }
    async fn create_repository(&self, repository: &Repository) -> Result<(), StoreError> {
        self.inner.create_repository(repository).await
    }
    async fn get_repository(&self, id: RepositoryId) -> Result<Repository, StoreError> {
        self.inner.get_repository(id).await
    }
    async fn list_repositories(
        &self,
        project: Option<ProjectId>,
        page: &PageRequest,
    ) -> Result<Page<Repository>, StoreError> {
        self.inner.list_repositories(project, page).await
    }
    async fn create_pipeline(&self, pipeline: &Pipeline) -> Result<(), StoreError> {
        self.inner.create_pipeline(pipeline).await
    }
    async fn get_pipeline(&self, id: PipelineId) -> Result<Pipeline, StoreError> {
        self.inner.get_pipeline(id).await
    }
    async fn list_pipelines(
        &self,
        repository: Option<RepositoryId>,
        page: &PageRequest,
    ) -> Result<Page<Pipeline>, StoreError> {
        self.inner.list_pipelines(repository, page).await
    }
    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError> {
        self.inner.create_run(run).await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn get_run(&self, id: RunId) -> Result<PipelineRun, StoreError> {
        self.inner.get_run(id).await
    }
    async fn load_run(&self, id: RunId) -> Result<RunRecord, StoreError> {
        self.inner.load_run(id).await
    }
    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest,
    ) -> Result<Page<PipelineRun>, StoreError> {
        self.inner.list_runs(filter, page).await
    }
    async fn list_jobs(&self, run: RunId) -> Result<Vec<Job>, StoreError> {
        self.inner.list_jobs(run).await
    }
    async fn list_steps(&self, job: JobId) -> Result<Vec<JobStep>, StoreError> {
        self.inner.list_steps(job).await
    }
    async fn list_executions(&self, step: StepId) -> Result<Vec<Execution>, StoreError> {
        self.inner.list_executions(step).await
    }
    async fn get_execution(&self, id: ExecutionId) -> Result<Execution, StoreError> {
        self.inner.get_execution(id).await
    }
    async fn get_artifact(&self, id: ArtifactId) -> Result<Artifact, StoreError> {
        self.inner.get_artifact(id).await
    }
    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        self.inner.list_artifacts(run).await
    }
    async fn list_all_artifacts(&self, page: &PageRequest) -> Result<Page<Artifact>, StoreError> {
        self.inner.list_all_artifacts(page).await
    }
    async fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.inner.commit(batch).await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.transitions
            .fetch_add(transitions(batch), Ordering::Relaxed);
        Ok(())
    }
    async fn list_events(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.list_events(after_seq, limit).await
    }
    async fn claim_runs(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<RunLease>, StoreError> {
        self.inner.claim_runs(owner, ttl, limit).await
    }
    async fn renew_leases(
        &self,
        leases: &[RunLease],
        ttl: Duration,
    ) -> Result<Vec<RunLease>, StoreError> {
        self.inner.renew_leases(leases, ttl).await
    }
    async fn release_lease(&self, lease: &RunLease) -> Result<(), StoreError> {
        self.inner.release_lease(lease).await
    }
    async fn claim_executions(
        &self,
        executor_type: &str,
        worker: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<ExecutionClaim>, StoreError> {
        self.inner
            .claim_executions(executor_type, worker, ttl, limit)
            .await
    }
    async fn renew_execution_claim(
        &self,
        claim: &ExecutionClaim,
        ttl: Duration,
    ) -> Result<ExecutionClaim, StoreError> {
        self.inner.renew_execution_claim(claim, ttl).await
    }
    async fn take_expired_execution_claims(&self) -> Result<Vec<ExecutionClaim>, StoreError> {
        self.inner.take_expired_execution_claims().await
    }
    async fn create_api_token(&self, token: &ApiToken) -> Result<(), StoreError> {
        self.inner.create_api_token(token).await
    }
    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.inner.list_api_tokens().await
    }
    async fn find_api_token(&self, secret_sha256: &str) -> Result<ApiToken, StoreError> {
        self.inner.find_api_token(secret_sha256).await
    }
    async fn revoke_api_token(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<ApiToken, StoreError> {
        self.inner.revoke_api_token(id, at).await
    }
    async fn touch_api_token(&self, id: ApiTokenId, at: Timestamp) -> Result<(), StoreError> {
        self.inner.touch_api_token(id, at).await
    }
    async fn put_idempotency_record(
        &self,
        record: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        self.inner.put_idempotency_record(record).await
    }
    async fn get_idempotency_record(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.get_idempotency_record(pipeline, key).await
    }

    async fn request_cancel(&self, run: RunId, by: &str, at: Timestamp) -> Result<(), StoreError> {
        self.inner.request_cancel(run, by, at).await
    }

    async fn cancel_requests(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError> {
        self.inner.cancel_requests(runs).await
    }
}
