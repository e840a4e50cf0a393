//! The embedded default: SQLite state, artifacts and logs in the data directory, steps as
//! local processes — what `shipinator run` (and later `serve` with no configuration) use.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shipinator_core::artifact::ArtifactStore;
use shipinator_core::domain::{
    Pipeline, PipelineId, Project, ProjectId, Repository, RepositoryId, Trigger,
};
use shipinator_core::logs::LogStore;
use shipinator_core::store::{PageRequest, Store, StoreError};
use shipinator_core::time::Timestamp;
use shipinator_local::worker::BaseEnv;
use shipinator_local::{DataDir, LocalExecutor};
use shipinator_nfs::{FsLogStore, NfsArtifactStore};
use shipinator_sqlite::SqliteStore;

/// The backends of one data directory.
#[derive(Debug, Clone)]
pub(crate) struct LocalStack {
    pub(crate) data: DataDir,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) logs: Arc<dyn LogStore>,
}

impl LocalStack {
    /// Opens (creating if needed) the data directory's state, artifacts and logs.
    pub(crate) async fn open(data: DataDir) -> anyhow::Result<Self> {
        data.create_all()
            .with_context(|| format!("creating the data directory {}", data.root().display()))?;
        let store = SqliteStore::open(data.state_db())
            .await
            .with_context(|| format!("opening {}", data.state_db().display()))?;
        let artifacts = NfsArtifactStore::new(data.artifacts()).with_context(|| {
            format!("opening the artifact store {}", data.artifacts().display())
        })?;
        let logs = FsLogStore::new(data.root())
            .with_context(|| format!("opening the log store {}", data.logs().display()))?;
        Ok(Self {
            data,
            store: Arc::new(store),
            artifacts: Arc::new(artifacts),
            logs: Arc::new(logs),
        })
    }

    /// The local-process executor over this data directory; steps also get this process's
    /// value of each variable named in `pass_env`.
    pub(crate) fn executor(&self, pass_env: &[String]) -> anyhow::Result<LocalExecutor> {
        LocalExecutor::builder(self.data.root())
            .artifact_store(Arc::clone(&self.artifacts))
            .log_store(Arc::clone(&self.logs))
            .base_env(BaseEnv::from_process().pass(pass_env.iter().cloned()))
            .grace_period(Duration::from_secs(5))
            .build()
            .context("starting the local executor")
    }
}

/// Finds or creates the project, repository and pipeline rows a local run belongs to.
pub(crate) async fn ensure_pipeline(
    store: &dyn Store,
    project_name: &str,
    clone_url: &str,
    default_branch: &str,
    pipeline_name: &str,
    source_spec: &str,
) -> anyhow::Result<(Project, Pipeline)> {
    let now = Timestamp::now();
    let project = match store.get_project_by_name(project_name).await {
        Ok(p) => p,
        Err(StoreError::NotFound { .. }) => {
            let p = Project {
                id: ProjectId::new_v7(),
                name: project_name.to_owned(),
                description: None,
                created_at: now,
                updated_at: now,
            };
            store
                .create_project(&p)
                .await
                .context("recording the project")?;
            p
        }
        Err(e) => return Err(e).context("looking up the project"),
    };
    let repos = store
        .list_repositories(Some(project.id), &PageRequest::first(1000))
        .await?;
    let repo = match repos.items.into_iter().find(|r| r.clone_url == clone_url) {
        Some(r) => r,
        None => {
            let r = Repository {
                id: RepositoryId::new_v7(),
                project_id: project.id,
                vcs_provider: "git".to_owned(),
                clone_url: clone_url.to_owned(),
                default_branch: default_branch.to_owned(),
                created_at: now,
                updated_at: now,
            };
            store
                .create_repository(&r)
                .await
                .context("recording the repository")?;
            r
        }
    };
    let pipelines = store
        .list_pipelines(Some(repo.id), &PageRequest::first(1000))
        .await?;
    let pipeline = match pipelines
        .items
        .into_iter()
        .find(|p| p.name == pipeline_name)
    {
        Some(p) => p,
        None => {
            let p = Pipeline {
                id: PipelineId::new_v7(),
                repository_id: repo.id,
                name: pipeline_name.to_owned(),
                trigger_type: Trigger::Manual,
                source_spec: source_spec.to_owned(),
                created_at: now,
                updated_at: now,
            };
            store
                .create_pipeline(&p)
                .await
                .context("recording the pipeline")?;
            p
        }
    };
    Ok((project, pipeline))
}
