//! The one data-directory layout shared by `shipinator run` and `shipinator serve`.

use std::io;
use std::path::{Path, PathBuf};

/// The data directory (default `./.shipinator/`):
///
/// ```text
/// state.db      the SQLite store
/// artifacts/    artifact payloads
/// logs/         step logs
/// mirrors/      one bare git mirror per repository, fetched on later runs
/// workspaces/   one workspace per run and stage: <run-id>/<stage>/
/// executions/   pidfiles and recorded results of local executions
/// runs/         which process drives a run, and requests to cancel it
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
    workspaces: Option<PathBuf>,
}

impl DataDir {
    /// The default root, relative to the current directory.
    pub const DEFAULT_ROOT: &'static str = ".shipinator";

    /// A data directory at `root` (nothing is created until [`create_all`](Self::create_all)).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            workspaces: None,
        }
    }

    /// Keeps workspaces under `dir` instead of `<root>/workspaces`: a volume that the
    /// processes of a stage share while the rest of the data directory is their own (the pods
    /// of a stage on Kubernetes). A checkout there is self-contained, since the mirror it
    /// comes from is not shared.
    #[must_use]
    pub fn with_workspaces(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workspaces = Some(dir.into());
        self
    }

    /// Whether workspaces live outside the data directory ([`with_workspaces`](Self::with_workspaces)).
    pub fn has_separate_workspaces(&self) -> bool {
        self.workspaces.is_some()
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `state.db`.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// `artifacts/`.
    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// `logs/`.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// `mirrors/`.
    pub fn mirrors(&self) -> PathBuf {
        self.root.join("mirrors")
    }

    /// `workspaces/`, or the directory given to [`with_workspaces`](Self::with_workspaces).
    pub fn workspaces(&self) -> PathBuf {
        self.workspaces
            .clone()
            .unwrap_or_else(|| self.root.join("workspaces"))
    }

    /// `executions/`.
    pub fn executions(&self) -> PathBuf {
        self.root.join("executions")
    }

    /// `runs/`.
    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Creates the root and every subdirectory (an existing directory is fine).
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn create_all(&self) -> io::Result<()> {
        for dir in [
            self.artifacts(),
            self.logs(),
            self.mirrors(),
            self.workspaces(),
            self.executions(),
            self.runs(),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }
}

impl Default for DataDir {
    fn default() -> Self {
        Self::new(Self::DEFAULT_ROOT)
    }
}
