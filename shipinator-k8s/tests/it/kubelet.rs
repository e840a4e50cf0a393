//! The fake API server's process kubelet: the executor's Jobs really run, as local processes
//! seeing their volumes, init containers and termination message as a pod would.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use shipinator_core::executor::{ExecutionState, Executor};
use shipinator_k8s::testing::{FakeApi, Kind, ProcessKubelet};
use shipinator_k8s::{K8sExecutor, job_name};

use crate::{executor_with, spec};

const BOUND: Duration = Duration::from_secs(60);

/// A worker image whose `shipinator` is the shell script `script`.
fn worker_image(dir: &Path, script: &str) -> anyhow::Result<()> {
    let bin = dir.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    let file = bin.join("shipinator");
    std::fs::write(&file, format!("#!/bin/sh\n{script}"))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

async fn setup(script: &str) -> anyhow::Result<(tempfile::TempDir, FakeApi, K8sExecutor)> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("image");
    worker_image(&image, script)?;
    let kubelet = ProcessKubelet::new(dir.path().join("kubelet"))
        .image("registry.example/shipinator-worker:1", &image)
        .grace_period(Duration::from_secs(5));
    let api = FakeApi::start_with(kubelet).await?;
    let ex = executor_with(&api, |b| b)?;
    Ok((dir, api, ex))
}

async fn wait_terminal(
    ex: &K8sExecutor,
    h: &shipinator_core::executor::ExecHandle,
) -> anyhow::Result<ExecutionState> {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let s = ex.status(h).await?;
        if s.is_terminal() {
            return Ok(s);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "last state {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_its_worker_on_its_volumes_and_reports_through_its_termination_message()
-> anyhow::Result<()> {
    // The "worker" prints where it runs, leaves a file in the stage's workspace and writes
    // a report saying the step failed with code 7; it exits 0 (it reported).
    let (dir, api, ex) = setup(
        "echo \"worker $* in $PWD\"\n\
         mkdir -p \"$SHIPINATOR_WORKSPACE\" && echo hi > \"$SHIPINATOR_WORKSPACE/left\"\n\
         printf '{\"status\":\"failed\",\"exit_code\":7}' > \"$SHIPINATOR_RESULT_FILE\"\n",
    )
    .await?;
    let s = spec("ignored by the process kubelet");
    let h = ex.submit(&s).await?;
    let state = wait_terminal(&ex, &h).await?;
    let ExecutionState::Finished(result) = &state else {
        anyhow::bail!("{state:?}");
    };
    assert_eq!(result.exit_code, 7, "{state:?}");

    // The step container's command ran from the binary the init container copied in, in
    // its working directory on the claim (the run's directory, mounted with a subPath).
    let pod = api
        .pod_name(&job_name(s.execution_id))
        .expect("the job has a pod");
    let log = api.pod_log(&pod);
    let claim = dir.path().join("kubelet/claims/shipinator-workspaces");
    let run_dir = claim.join(s.run_id.to_string());
    assert!(
        log.contains(&format!(
            "worker worker --execution {} in {}",
            s.execution_id,
            run_dir.display()
        )),
        "{log}"
    );
    let left = claim.join(&s.workspace.key).join("left");
    assert_eq!(std::fs::read_to_string(&left)?, "hi\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_init_container_fails_the_job_and_cancel_stops_the_process() -> anyhow::Result<()>
{
    // No binary in the image: the init container's `cp` fails; the execution is lost.
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("empty-image"))?;
    let kubelet = ProcessKubelet::new(dir.path().join("kubelet")).image(
        "registry.example/shipinator-worker:1",
        dir.path().join("empty-image"),
    );
    let api = FakeApi::start_with(kubelet).await?;
    let ex = executor_with(&api, |b| b)?;
    let h = ex.submit(&spec("x")).await?;
    let state = wait_terminal(&ex, &h).await?;
    assert!(matches!(state, ExecutionState::Lost { .. }), "{state:?}");

    // A worker that runs until stopped: cancel deletes the Job, the kubelet sends TERM.
    let (dir, api, ex) = setup("echo $$ > \"$TMPDIR/pid\"\nexec sleep 300\n").await?;
    let s = spec("x");
    let h = ex.submit(&s).await?;
    let pod = loop {
        if let Some(p) = api.pod_name(&job_name(s.execution_id)) {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pidfile = dir.path().join("kubelet/pods").join(&pod).join("tmp/pid");
    let deadline = tokio::time::Instant::now() + BOUND;
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            break p;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the pod never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ex.cancel(&h).await?;
    assert_eq!(ex.status(&h).await?, ExecutionState::Canceled);
    assert!(api.names(Kind::Job).is_empty());
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
