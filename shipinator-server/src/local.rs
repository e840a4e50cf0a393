//! The embedded default: SQLite state, artifacts and logs in the data directory, steps as
//! local processes — what `shipinator run` (and later `serve` with no configuration) use.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shipinator_core::artifact::ArtifactStore;
use shipinator_core::domain::{Pipeline, Project};
use shipinator_core::logs::LogStore;
use shipinator_core::store::{PipelineSource, Store};
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
    let source = PipelineSource {
        project_name,
        clone_url,
        default_branch,
        pipeline_name,
        source_spec,
    };
    shipinator_core::store::ensure_pipeline(store, source)
        .await
        .with_context(|| format!("recording project {project_name:?} and its pipeline"))
}
