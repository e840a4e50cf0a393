//! Finding or creating the rows a run belongs to.

use super::{PageRequest, Store, StoreError};
use crate::domain::{Pipeline, PipelineId, Project, ProjectId, Repository, RepositoryId, Trigger};
use crate::time::Timestamp;

/// Where runs of a pipeline come from, for [`ensure_pipeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineSource<'a> {
    /// The project's unique name.
    pub project_name: &'a str,
    /// The repository's clone URL (a repository is found by it within the project).
    pub clone_url: &'a str,
    /// The repository's default branch, when it is created.
    pub default_branch: &'a str,
    /// The pipeline's name within the repository.
    pub pipeline_name: &'a str,
    /// The pipeline's `.shipinator.yaml` text, stored when the pipeline is created (may be
    /// empty for a spec built in code).
    pub source_spec: &'a str,
}

/// Finds the project (by name), its repository (by clone URL) and the repository's pipeline
/// (by name), creating whichever does not exist yet, and returns the project and the pipeline;
/// a run request's `pipeline_id` is the pipeline's id. Rows that exist are returned as they
/// are (an existing pipeline keeps its stored source spec). Creating the project again when a
/// concurrent caller created it first finds that one.
///
/// ```no_run
/// # async fn demo(store: &dyn shipinator_core::store::Store) -> Result<(), shipinator_core::store::StoreError> {
/// use shipinator_core::store::{PipelineSource, ensure_pipeline};
///
/// let (_project, pipeline) = ensure_pipeline(store, PipelineSource {
///     project_name: "demo",
///     clone_url: "https://git.example.com/demo/app.git",
///     default_branch: "main",
///     pipeline_name: "app",
///     source_spec: "build:\n  steps:\n    - name: compile\n      run: make\n",
/// })
/// .await?;
/// println!("runs of this pipeline use pipeline_id {}", pipeline.id);
/// # Ok(()) }
/// ```
///
/// # Errors
/// The store's errors, as they come.
pub async fn ensure_pipeline(
    store: &dyn Store,
    source: PipelineSource<'_>,
) -> Result<(Project, Pipeline), StoreError> {
    let now = Timestamp::now();
    let project = match store.get_project_by_name(source.project_name).await {
        Ok(p) => p,
        Err(StoreError::NotFound { .. }) => {
            let p = Project {
                id: ProjectId::new_v7(),
                name: source.project_name.to_owned(),
                description: None,
                created_at: now,
                updated_at: now,
            };
            match store.create_project(&p).await {
                Ok(()) => p,
                Err(StoreError::AlreadyExists { .. }) => {
                    store.get_project_by_name(source.project_name).await?
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let repository = match find_repository(store, project.id, source.clone_url).await? {
        Some(r) => r,
        None => {
            let r = Repository {
                id: RepositoryId::new_v7(),
                project_id: project.id,
                vcs_provider: "git".to_owned(),
                clone_url: source.clone_url.to_owned(),
                default_branch: source.default_branch.to_owned(),
                created_at: now,
                updated_at: now,
            };
            store.create_repository(&r).await?;
            r
        }
    };
    let pipeline = match find_pipeline(store, repository.id, source.pipeline_name).await? {
        Some(p) => p,
        None => {
            let p = Pipeline {
                id: PipelineId::new_v7(),
                repository_id: repository.id,
                name: source.pipeline_name.to_owned(),
                trigger_type: Trigger::Manual,
                source_spec: source.source_spec.to_owned(),
                created_at: now,
                updated_at: now,
            };
            store.create_pipeline(&p).await?;
            p
        }
    };
    Ok((project, pipeline))
}

async fn find_repository(
    store: &dyn Store,
    project: ProjectId,
    clone_url: &str,
) -> Result<Option<Repository>, StoreError> {
    let mut page = PageRequest::first(PageRequest::MAX_LIMIT);
    loop {
        let found = store.list_repositories(Some(project), &page).await?;
        if let Some(r) = found.items.into_iter().find(|r| r.clone_url == clone_url) {
            return Ok(Some(r));
        }
        match found.next_cursor {
            Some(cursor) => page.cursor = Some(cursor),
            None => return Ok(None),
        }
    }
}

async fn find_pipeline(
    store: &dyn Store,
    repository: RepositoryId,
    name: &str,
) -> Result<Option<Pipeline>, StoreError> {
    let mut page = PageRequest::first(PageRequest::MAX_LIMIT);
    loop {
        let found = store.list_pipelines(Some(repository), &page).await?;
        if let Some(p) = found.items.into_iter().find(|p| p.name == name) {
            return Ok(Some(p));
        }
        match found.next_cursor {
            Some(cursor) => page.cursor = Some(cursor),
            None => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::InMemoryStore;

    fn source<'a>(pipeline_name: &'a str, clone_url: &'a str) -> PipelineSource<'a> {
        PipelineSource {
            project_name: "demo",
            clone_url,
            default_branch: "main",
            pipeline_name,
            source_spec: "build: {}",
        }
    }

    #[tokio::test]
    async fn finds_what_exists_and_creates_what_does_not() {
        let store = InMemoryStore::new();
        let url = "https://git.example.com/demo/app.git";
        let (project, app) = ensure_pipeline(&store, source("app", url)).await.unwrap();
        assert_eq!(app.source_spec, "build: {}");
        let (again_project, again) = ensure_pipeline(&store, source("app", url)).await.unwrap();
        assert_eq!((again_project.id, again.id), (project.id, app.id));
        // Another pipeline of the same repository, then another repository of the project.
        let (_, docs) = ensure_pipeline(&store, source("docs", url)).await.unwrap();
        assert_ne!(docs.id, app.id);
        assert_eq!(docs.repository_id, app.repository_id);
        let (p, other) = ensure_pipeline(&store, source("app", "https://git.example.com/o.git"))
            .await
            .unwrap();
        assert_eq!(p.id, project.id);
        assert_ne!(other.repository_id, app.repository_id);
        let repos = store
            .list_repositories(Some(project.id), &PageRequest::first(10))
            .await
            .unwrap();
        assert_eq!(repos.items.len(), 2);
    }
}
