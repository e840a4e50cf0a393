//! Test helpers: minimal in-memory stores, temp git repositories, specs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use shipinator_core::artifact::{
    ArtifactError, ArtifactMeta, ArtifactRead, ArtifactStore, ByteRange, ByteStream, GetOptions,
    StoredArtifact,
};
use shipinator_core::domain::{ArtifactId, ExecutionId, JobId, JobType, RunId, StepId};
use shipinator_core::executor::{
    ExecHandle, ExecutionSpec, ExecutionState, Executor, WorkspaceRef,
};
use shipinator_core::logs::{AppendOutcome, LogError, LogFollow, LogLine, LogStore};
use shipinator_core::time::Timestamp;

/// Artifact payloads in memory.
#[derive(Debug, Default)]
pub(crate) struct MemArtifacts {
    items: Mutex<HashMap<ArtifactId, (StoredArtifact, Bytes)>>,
}

impl MemArtifacts {
    pub(crate) fn bytes(&self, id: ArtifactId) -> Option<Bytes> {
        self.items.lock().unwrap().get(&id).map(|(_, b)| b.clone())
    }
}

#[async_trait::async_trait]
impl ArtifactStore for MemArtifacts {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn put(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        mut body: ByteStream,
    ) -> Result<StoredArtifact, ArtifactError> {
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.map_err(|source| ArtifactError::Upload { id, source })?);
        }
        let bytes = buf.freeze();
        let stored = StoredArtifact {
            id,
            backend: "memory".to_owned(),
            storage_path: id.to_string(),
            size: bytes.len() as u64,
            checksum: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            created_at: Timestamp::now(),
            meta,
        };
        let mut items = self.items.lock().unwrap();
        if items.contains_key(&id) {
            return Err(ArtifactError::AlreadyExists { id });
        }
        items.insert(id, (stored.clone(), bytes));
        Ok(stored)
    }

    async fn get(&self, id: ArtifactId, _: GetOptions) -> Result<ArtifactRead, ArtifactError> {
        let (stored, bytes) = self
            .items
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or(ArtifactError::NotFound { id })?;
        Ok(ArtifactRead {
            stored,
            range: ByteRange {
                start: 0,
                end: None,
            },
            body: Box::pin(futures_util::stream::iter([Ok(bytes)])),
        })
    }

    async fn head(&self, id: ArtifactId) -> Result<StoredArtifact, ArtifactError> {
        self.items
            .lock()
            .unwrap()
            .get(&id)
            .map(|(s, _)| s.clone())
            .ok_or(ArtifactError::NotFound { id })
    }

    async fn delete(&self, id: ArtifactId) -> Result<(), ArtifactError> {
        self.items
            .lock()
            .unwrap()
            .remove(&id)
            .map(|_| ())
            .ok_or(ArtifactError::NotFound { id })
    }

    async fn list(&self) -> Result<Vec<ArtifactId>, ArtifactError> {
        Ok(self.items.lock().unwrap().keys().copied().collect())
    }
}

/// Log lines in memory.
#[derive(Debug, Default)]
pub(crate) struct MemLogs {
    logs: Mutex<HashMap<ExecutionId, (Vec<LogLine>, bool)>>,
}

impl MemLogs {
    pub(crate) fn lines(&self, id: ExecutionId) -> Vec<LogLine> {
        self.logs
            .lock()
            .unwrap()
            .get(&id)
            .map(|(l, _)| l.clone())
            .unwrap_or_default()
    }

    pub(crate) fn is_closed(&self, id: ExecutionId) -> bool {
        self.logs.lock().unwrap().get(&id).is_some_and(|(_, c)| *c)
    }
}

#[async_trait::async_trait]
impl LogStore for MemLogs {
    async fn append(&self, id: ExecutionId, lines: &[LogLine]) -> Result<AppendOutcome, LogError> {
        let mut logs = self.logs.lock().unwrap();
        let (log, closed) = logs.entry(id).or_default();
        if *closed {
            return Err(LogError::Closed { id });
        }
        let mut out = AppendOutcome::default();
        for line in lines {
            let next = log.len() as u64;
            if line.seq < next {
                out.duplicates += 1;
            } else if line.seq == next {
                log.push(line.clone());
                out.written += 1;
            } else {
                return Err(LogError::OutOfOrder {
                    id,
                    expected: next,
                    got: line.seq,
                });
            }
        }
        out.next_seq = log.len() as u64;
        Ok(out)
    }

    async fn read(
        &self,
        id: ExecutionId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>, LogError> {
        Ok(self
            .lines(id)
            .into_iter()
            .skip(from as usize)
            .take(limit)
            .collect())
    }

    async fn follow(&self, id: ExecutionId, from: u64) -> Result<LogFollow, LogError> {
        let snapshot = self.lines(id);
        let closed = self.is_closed(id);
        if !closed {
            return Err(LogError::Unavailable {
                source: "test log store follows closed logs only".into(),
            });
        }
        Ok(Box::pin(futures_util::stream::iter(
            snapshot.into_iter().skip(from as usize).map(Ok),
        )))
    }

    async fn close(&self, id: ExecutionId) -> Result<(), LogError> {
        self.logs.lock().unwrap().entry(id).or_default().1 = true;
        Ok(())
    }

    async fn delete(&self, id: ExecutionId) -> Result<(), LogError> {
        self.logs.lock().unwrap().remove(&id);
        Ok(())
    }
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.invalid",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A repository with one file; returns its `file://` URL.
pub(crate) fn repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q"]);
    format!("file://{}", dir.display())
}

/// Writes `file` with `content` and commits; returns the commit id.
pub(crate) fn commit(dir: &Path, file: &str, content: &str) -> String {
    std::fs::write(dir.join(file), content).unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "change"]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A spec for a fresh run's build stage, running `sh -c <script>`.
pub(crate) fn spec(script: &str) -> ExecutionSpec {
    spec_in(RunId::new_v7(), JobType::Build, 0, script)
}

/// A spec for step `index` of `stage` in `run`.
pub(crate) fn spec_in(run: RunId, stage: JobType, index: u32, script: &str) -> ExecutionSpec {
    let job = JobId::derive(run, stage);
    let step = StepId::derive(job, index);
    let mut env = BTreeMap::new();
    env.insert("SHIPINATOR_RUN_ID".to_owned(), run.to_string());
    env.insert("SHIPINATOR_COMMIT".to_owned(), String::new());
    ExecutionSpec {
        execution_id: ExecutionId::derive(step, 1),
        run_id: run,
        job_id: job,
        step_id: step,
        attempt: 1,
        stage,
        step_name: format!("step-{index}"),
        image: None,
        command: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env,
        workdir: None,
        timeout: None,
        workspace: WorkspaceRef::for_stage(run, stage),
        source: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
    }
}

/// Polls until the execution is terminal (bounded).
pub(crate) async fn wait_terminal(exec: &dyn Executor, handle: &ExecHandle) -> ExecutionState {
    for _ in 0..6000 {
        let state = exec.status(handle).await.unwrap();
        if state.is_terminal() {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("execution did not finish within a minute");
}

/// Polls until `cond` holds (bounded).
pub(crate) async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 30 s");
}

/// Pids of live (non-zombie) processes in process group `pgid`.
pub(crate) fn live_group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields[2] == pgid.to_string() && fields[0] != "Z" && fields[0] != "X" {
            out.push(pid);
        }
    }
    out
}
