//! Caches of facts that never change once true, so that they can never be stale:
//!
//! - [`PipelineProjects`]: the project a pipeline belongs to (a pipeline never moves to
//!   another repository, nor a repository to another project), for the authorisation of
//!   project-scoped tokens.
//! - [`FinishedRuns`]: the JSON of runs that have ended. A run's status is absorbing once
//!   terminal, and the engine ends a run only after every one of its stages has ended, so
//!   neither its status nor its phase nor its times change again. Runs that have not ended are
//!   never cached: their status is read from the store on every request.
//!
//! Both are bounded: a full cache starts over.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use shipinator_core::domain::{PipelineId, ProjectId, RunId};

/// A map that holds at most `capacity` entries; inserting into a full one clears it first.
#[derive(Debug)]
struct Bounded<K, V> {
    capacity: usize,
    entries: Mutex<HashMap<K, V>>,
}

impl<K: Eq + Hash, V: Clone> Bounded<K, V> {
    /// A map of at most `capacity` entries; 0 holds none.
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, V>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, key: &K) -> Option<V> {
        self.lock().get(key).cloned()
    }

    fn put(&self, key: K, value: V) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(key, value);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Most pipelines remembered at once.
const PIPELINE_CAPACITY: usize = 4096;

/// The project of each pipeline looked up so far.
#[derive(Debug)]
pub(crate) struct PipelineProjects(Bounded<PipelineId, ProjectId>);

impl Default for PipelineProjects {
    fn default() -> Self {
        Self(Bounded::new(PIPELINE_CAPACITY))
    }
}

impl PipelineProjects {
    pub(crate) fn get(&self, pipeline: PipelineId) -> Option<ProjectId> {
        self.0.get(&pipeline)
    }

    pub(crate) fn put(&self, pipeline: PipelineId, project: ProjectId) {
        self.0.put(pipeline, project);
    }
}

/// A finished run as the status read answers it: its pipeline (to authorise the caller on
/// every request) and its JSON.
#[derive(Debug, Clone)]
pub(crate) struct FinishedRun {
    pub(crate) pipeline_id: PipelineId,
    pub(crate) json: Bytes,
}

/// Runs that have ended, by id. Only terminal runs may be put here.
#[derive(Debug)]
pub(crate) struct FinishedRuns(Bounded<RunId, FinishedRun>);

impl FinishedRuns {
    /// At most `capacity` runs (`limits.finished_run_cache`); 0 remembers none.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Bounded::new(capacity))
    }

    pub(crate) fn get(&self, run: RunId) -> Option<FinishedRun> {
        self.0.get(&run)
    }

    /// Remembers a run that has ended (the caller checked `status.is_terminal()`).
    pub(crate) fn put(&self, run: RunId, finished: FinishedRun) {
        self.0.put(run, finished);
    }

    /// How many runs are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_starts_over_and_a_present_key_is_replaced_in_place() {
        let runs = FinishedRuns::with_capacity(2);
        let pipeline = PipelineId::new_v7();
        let entry = |s: &'static str| FinishedRun {
            pipeline_id: pipeline,
            json: Bytes::from_static(s.as_bytes()),
        };
        let (a, b, c) = (RunId::new_v7(), RunId::new_v7(), RunId::new_v7());
        runs.put(a, entry("a"));
        runs.put(b, entry("b"));
        runs.put(b, entry("b2"));
        assert_eq!(runs.len(), 2, "replacing a present key keeps the others");
        assert_eq!(runs.get(b).map(|r| r.json), Some(Bytes::from_static(b"b2")));
        runs.put(c, entry("c"));
        assert_eq!(runs.len(), 1, "a full cache starts over");
        assert!(runs.get(a).is_none());
        assert_eq!(runs.get(c).map(|r| r.pipeline_id), Some(pipeline));

        let none = FinishedRuns::with_capacity(0);
        none.put(a, entry("a"));
        assert!(none.get(a).is_none(), "capacity 0 remembers nothing");
    }
}
