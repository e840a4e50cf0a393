//! Test helpers: temp git repositories, specs, bounded polling.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shipinator_core::domain::{ExecutionId, JobId, JobType, RunId, StepId};
use shipinator_core::executor::{
    ExecHandle, ExecutionSpec, ExecutionState, Executor, WorkspaceRef,
};

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
