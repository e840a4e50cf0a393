//! Retention: removes artifact payloads by age and by count per pipeline, never those a
//! non-terminal run may still need.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use shipinator_core::artifact::{ArtifactError, ArtifactStore};
use shipinator_core::domain::{Artifact, ArtifactId, PipelineId, PipelineRun, RunId, RunStatus};
use shipinator_core::store::{PageRequest, RunFilter, Store, StoreError};
use shipinator_core::time::Timestamp;

use crate::error::Error;

/// Which artifacts to remove. With both fields set, an artifact is removed when it is older
/// than `older_than` **and** not among the newest `keep_last_per_pipeline` runs of its
/// pipeline; with one field, that one decides; with neither, nothing is removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunePolicy {
    /// Remove artifacts created more than this long before `now`.
    pub older_than: Option<Duration>,
    /// Keep every artifact of the newest N runs (by creation) of each pipeline that produced
    /// artifacts. Artifacts whose run is unknown to the store are judged by age only.
    pub keep_last_per_pipeline: Option<u32>,
}

/// One artifact a prune removed (or would remove, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunedArtifact {
    /// The artifact.
    pub id: ArtifactId,
    /// Its run.
    pub run_id: RunId,
    /// Its pipeline, when the run is known.
    pub pipeline_id: Option<PipelineId>,
    /// Its payload size from the metadata row.
    pub size: u64,
    /// When it was created.
    pub created_at: Timestamp,
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Whether nothing was deleted (`removed` lists what would have been).
    pub dry_run: bool,
    /// Payloads deleted (or to delete, in a dry run), newest first.
    pub removed: Vec<PrunedArtifact>,
    /// Selected by the policy but kept: a non-terminal run of the same pipeline may use them.
    pub kept_in_use: Vec<ArtifactId>,
    /// Selected, but the payload was already gone from the artifact store.
    pub already_gone: Vec<ArtifactId>,
    /// Selected, but deleting failed (the message says why); the prune went on with the rest.
    pub failed: Vec<(ArtifactId, String)>,
    /// Sum of the sizes of `removed`.
    pub bytes_freed: u64,
}

/// Removes the payloads of artifacts that `policy` selects from `artifacts`, judging them by
/// the metadata rows of `store` (only rows whose `storage_backend` is this artifact store's
/// backend).
///
/// **Liveness:** an artifact is never removed while any run of its pipeline is not terminal
/// (pending or running). That is coarser than the exact inputs of those runs (their own
/// artifacts, those of the run they retry, and any a deploy-only run consumes from earlier
/// runs of the pipeline), and covers all of them; it is judged at the start of the prune.
///
/// **Metadata rows stay:** the [`Store`] trait has no way to delete artifact rows yet, so a
/// pruned artifact's row remains and a later `get` of it is `NotFound`. A second prune reports
/// such artifacts under `already_gone` if the policy still selects them.
///
/// # Errors
/// [`Error::Store`] when the metadata cannot be read; failures to delete single payloads are
/// reported in [`PruneReport::failed`] instead.
pub async fn prune(
    store: &dyn Store,
    artifacts: &dyn ArtifactStore,
    policy: &PrunePolicy,
    now: Timestamp,
    dry_run: bool,
) -> Result<PruneReport, Error> {
    let store_err = |source: StoreError| Error::Store { source };
    let mut report = PruneReport {
        dry_run,
        ..PruneReport::default()
    };
    if policy.older_than.is_none() && policy.keep_last_per_pipeline.is_none() {
        return Ok(report);
    }

    // Pipelines with a run that is not over: their artifacts are all kept.
    let mut busy: BTreeSet<PipelineId> = BTreeSet::new();
    for status in [RunStatus::Pending, RunStatus::Running] {
        let filter = RunFilter {
            status: Some(status),
            ..RunFilter::default()
        };
        let mut page = PageRequest::first(PageRequest::MAX_LIMIT);
        loop {
            let runs = store.list_runs(&filter, &page).await.map_err(store_err)?;
            busy.extend(runs.items.iter().map(|r| r.pipeline_id));
            match runs.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => break,
            }
        }
    }

    let mut rows: Vec<Artifact> = Vec::new();
    let mut page = PageRequest::first(PageRequest::MAX_LIMIT);
    loop {
        let listed = store.list_all_artifacts(&page).await.map_err(store_err)?;
        rows.extend(
            listed
                .items
                .into_iter()
                .filter(|a| a.storage_backend == artifacts.backend()),
        );
        match listed.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }

    let mut runs: HashMap<RunId, Option<PipelineRun>> = HashMap::new();
    for row in &rows {
        if runs.contains_key(&row.run_id) {
            continue;
        }
        let run = match store.get_run(row.run_id).await {
            Ok(run) => Some(run),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(store_err(e)),
        };
        if let Some(r) = &run
            && !r.status.is_terminal()
        {
            busy.insert(r.pipeline_id); // became non-terminal since the listing
        }
        runs.insert(row.run_id, run);
    }

    // Rank each pipeline's runs that have artifacts, newest first.
    let mut by_pipeline: BTreeMap<PipelineId, Vec<&PipelineRun>> = BTreeMap::new();
    for run in runs.values().flatten() {
        by_pipeline.entry(run.pipeline_id).or_default().push(run);
    }
    let mut rank: HashMap<RunId, usize> = HashMap::new();
    for list in by_pipeline.values_mut() {
        list.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
        rank.extend(list.iter().enumerate().map(|(i, r)| (r.id, i)));
    }

    for row in rows {
        let run = runs.get(&row.run_id).and_then(Option::as_ref);
        let old = policy
            .older_than
            .map(|age| now.saturating_duration_since(row.created_at) > age);
        let beyond = policy.keep_last_per_pipeline.and_then(|n| {
            rank.get(&row.run_id)
                .map(|r| *r >= usize::try_from(n).unwrap_or(usize::MAX))
        });
        let selected = match (old, beyond) {
            (Some(o), Some(b)) => o && b,
            (Some(o), None) => o,
            (None, Some(b)) => b,
            (None, None) => false,
        };
        if !selected {
            continue;
        }
        let pipeline_id = run.map(|r| r.pipeline_id);
        if pipeline_id.is_some_and(|p| busy.contains(&p)) {
            report.kept_in_use.push(row.id);
            continue;
        }
        let pruned = PrunedArtifact {
            id: row.id,
            run_id: row.run_id,
            pipeline_id,
            size: row.size,
            created_at: row.created_at,
        };
        if dry_run {
            report.bytes_freed += pruned.size;
            report.removed.push(pruned);
            continue;
        }
        match artifacts.delete(row.id).await {
            Ok(()) => {
                report.bytes_freed += pruned.size;
                report.removed.push(pruned);
            }
            Err(ArtifactError::NotFound { .. }) => report.already_gone.push(row.id),
            Err(e) => report.failed.push((row.id, error_chain(&e))),
        }
    }
    Ok(report)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
