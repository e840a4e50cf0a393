//! Conformance checks for [`Executor`] implementations. Not semver-stable.
//!
//! The suite cannot know how to make a real substrate succeed or run long, so the adapter
//! provides an [`ExecutorHarness`]. Every spec it returns must carry a fresh execution id.
//! A failed check panics with a message naming the contract it broke.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::domain::{ExecutionId, JobId, JobType, RunId, StepId};
use crate::executor::{
    ExecHandle, ExecutionSpec, ExecutionState, Executor, ExecutorError, WorkspaceRef,
};
use crate::logs::LogStream;

/// What the suite needs from an adapter to drive its executor.
#[async_trait::async_trait]
pub trait ExecutorHarness: Send + Sync + fmt::Debug {
    /// The executor under test.
    fn executor(&self) -> Arc<dyn Executor>;
    /// A spec (fresh execution id) whose command succeeds quickly after printing exactly
    /// `lines` on stdout, in order.
    fn spec_that_succeeds(&self, lines: &[String]) -> ExecutionSpec;
    /// A spec (fresh execution id) whose command runs far longer than the suite.
    fn spec_that_runs_long(&self) -> ExecutionSpec;
    /// A new executor object over the same substrate, as after an engine restart.
    async fn restart(&self) -> Arc<dyn Executor>;
}

/// Bounds of the suite's waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorCaps {
    /// Bound on waiting for an execution to reach a state.
    pub wait_limit: Duration,
}

impl Default for ExecutorCaps {
    /// Waits bounded by 60 s.
    fn default() -> Self {
        Self {
            wait_limit: Duration::from_secs(60),
        }
    }
}

/// A spec with fresh ids and the given step name, running `sh -c true`; adapters adjust it.
pub fn base_spec(step_name: &str) -> ExecutionSpec {
    let run_id = RunId::new_v7();
    let job_id = JobId::derive(run_id, JobType::Build);
    let step_id = StepId::derive(job_id, 0);
    ExecutionSpec {
        execution_id: ExecutionId::derive(step_id, 1),
        run_id,
        job_id,
        step_id,
        attempt: 1,
        stage: JobType::Build,
        step_name: step_name.to_owned(),
        image: None,
        command: vec!["sh".to_owned(), "-c".to_owned(), "true".to_owned()],
        env: BTreeMap::new(),
        workdir: None,
        timeout: None,
        workspace: WorkspaceRef::for_stage(run_id, JobType::Build),
        source: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
    }
}

/// Runs every check.
pub async fn all(harness: &dyn ExecutorHarness, caps: &ExecutorCaps) {
    repeated_submit_is_harmless(harness, caps).await;
    cancel_of_finished_execution_is_a_no_op(harness, caps).await;
    cancel_stops_a_running_execution(harness, caps).await;
    status_survives_restart(harness, caps).await;
    logs_come_in_order(harness, caps).await;
    reports_announce_terminal_states(harness, caps).await;
}

fn ok<T>(r: Result<T, ExecutorError>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error {e:?}"),
    }
}

/// Polls `status` until `done` holds, up to `caps.wait_limit`.
async fn wait_for(
    executor: &dyn Executor,
    handle: &ExecHandle,
    caps: &ExecutorCaps,
    what: &str,
    done: impl Fn(&ExecutionState) -> bool,
) -> ExecutionState {
    let deadline = tokio::time::Instant::now() + caps.wait_limit;
    let mut pause = Duration::from_millis(5);
    loop {
        let state = ok(executor.status(handle).await, "status");
        if done(&state) {
            return state;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {:?} waiting for {what}; last state {state:?}",
                caps.wait_limit
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

fn succeeded(state: &ExecutionState) -> bool {
    matches!(state, ExecutionState::Finished(r) if r.exit_code == 0)
}

fn texts(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag} line {i}")).collect()
}

/// Submitting an execution id again returns the same handle and starts nothing new.
pub async fn repeated_submit_is_harmless(harness: &dyn ExecutorHarness, caps: &ExecutorCaps) {
    let ex = harness.executor();
    let long = harness.spec_that_runs_long();
    let h1 = ok(ex.submit(&long).await, "submit");
    assert_eq!(
        h1.execution_id, long.execution_id,
        "the handle names the execution"
    );
    let h2 = ok(ex.submit(&long).await, "repeated submit");
    assert_eq!(h1, h2, "a repeated submit must return the same handle");
    let state = ok(ex.status(&h1).await, "status");
    assert!(
        !state.is_terminal(),
        "a long execution is not over yet: {state:?}"
    );
    ok(ex.cancel(&h1).await, "cancel");

    let quick = harness.spec_that_succeeds(&texts(2, "repeat"));
    let h = ok(ex.submit(&quick).await, "submit");
    wait_for(&*ex, &h, caps, "a quick execution to succeed", succeeded).await;
    let again = ok(ex.submit(&quick).await, "submit after the end");
    assert_eq!(
        again, h,
        "submitting a finished execution again returns its handle"
    );
    let state = ok(ex.status(&h).await, "status");
    assert!(
        succeeded(&state),
        "submitting a finished execution again must not start it anew: {state:?}"
    );
}

/// `cancel` of an execution that already ended is `Ok` and changes nothing.
pub async fn cancel_of_finished_execution_is_a_no_op(
    harness: &dyn ExecutorHarness,
    caps: &ExecutorCaps,
) {
    let ex = harness.executor();
    let spec = harness.spec_that_succeeds(&texts(1, "cancel"));
    let h = ok(ex.submit(&spec).await, "submit");
    let before = wait_for(&*ex, &h, caps, "a quick execution to succeed", succeeded).await;
    ok(ex.cancel(&h).await, "cancel of a finished execution");
    ok(ex.cancel(&h).await, "second cancel of a finished execution");
    assert_eq!(
        ok(ex.status(&h).await, "status"),
        before,
        "cancelling a finished execution must not change its state"
    );
}

/// `cancel` of a running execution ends it as `Canceled`.
pub async fn cancel_stops_a_running_execution(harness: &dyn ExecutorHarness, caps: &ExecutorCaps) {
    let ex = harness.executor();
    let h = ok(ex.submit(&harness.spec_that_runs_long()).await, "submit");
    ok(ex.cancel(&h).await, "cancel");
    let state = wait_for(
        &*ex,
        &h,
        caps,
        "a cancelled execution to end",
        ExecutionState::is_terminal,
    )
    .await;
    assert_eq!(
        state,
        ExecutionState::Canceled,
        "a cancelled execution ends as Canceled"
    );
    ok(ex.cancel(&h).await, "cancel again");
}

/// A new executor object over the same substrate knows the executions of the old one.
pub async fn status_survives_restart(harness: &dyn ExecutorHarness, caps: &ExecutorCaps) {
    let ex = harness.executor();
    let long = ok(ex.submit(&harness.spec_that_runs_long()).await, "submit");
    let quick_spec = harness.spec_that_succeeds(&texts(1, "restart"));
    let quick = ok(ex.submit(&quick_spec).await, "submit");
    wait_for(
        &*ex,
        &quick,
        caps,
        "a quick execution to succeed",
        succeeded,
    )
    .await;
    let restarted = harness.restart().await;
    let state = ok(restarted.status(&long).await, "status after restart");
    assert!(
        !state.is_terminal() || matches!(state, ExecutionState::Lost { .. }),
        "after a restart a running execution is still running (or Lost), got {state:?}"
    );
    let state = ok(restarted.status(&quick).await, "status after restart");
    assert!(
        succeeded(&state),
        "after a restart a finished execution still reads as finished, got {state:?}"
    );
    let again = ok(restarted.submit(&quick_spec).await, "submit after restart");
    assert_eq!(
        again, quick,
        "a restarted executor adopts the existing execution"
    );
    ok(restarted.cancel(&long).await, "cancel after restart");
    let state = wait_for(
        &*restarted,
        &long,
        caps,
        "the cancel to take effect",
        ExecutionState::is_terminal,
    )
    .await;
    assert!(
        matches!(
            state,
            ExecutionState::Canceled | ExecutionState::Lost { .. }
        ),
        "cancelled after restart: {state:?}"
    );
}

/// `logs` yields the lines in order, from any sequence number, and ends.
pub async fn logs_come_in_order(harness: &dyn ExecutorHarness, caps: &ExecutorCaps) {
    let ex = harness.executor();
    let want = texts(25, "ordered");
    let spec = harness.spec_that_succeeds(&want);
    let h = ok(ex.submit(&spec).await, "submit");
    wait_for(
        &*ex,
        &h,
        caps,
        "the logging execution to succeed",
        succeeded,
    )
    .await;
    let collect = |from: u64| {
        let ex = Arc::clone(&ex);
        let h = h.clone();
        async move {
            let stream = ok(ex.logs(&h, from).await, "logs");
            let all = tokio::time::timeout(caps.wait_limit, stream.collect::<Vec<_>>()).await;
            let Ok(all) = all else {
                panic!("logs of a finished execution must end");
            };
            all.into_iter()
                .map(|l| ok(l, "log line"))
                .collect::<Vec<_>>()
        }
    };
    let lines = collect(0).await;
    for w in lines.windows(2) {
        assert!(w[0].seq < w[1].seq, "log lines must come in sequence order");
    }
    let stdout: Vec<String> = lines
        .iter()
        .filter(|l| l.stream == LogStream::Stdout)
        .map(|l| l.text.clone())
        .collect();
    assert_eq!(stdout, want, "stdout lines must come back in order");
    let Some(tenth) = lines.iter().find(|l| l.text == want[10]) else {
        panic!("line 10 is missing");
    };
    let from = collect(tenth.seq).await;
    assert_eq!(
        from.first().map(|l| l.seq),
        Some(tenth.seq),
        "logs from a sequence number start there"
    );
    let tail: Vec<String> = from
        .iter()
        .filter(|l| l.stream == LogStream::Stdout)
        .map(|l| l.text.clone())
        .collect();
    assert_eq!(tail, want[10..].to_vec());
}

/// When `reports` is provided, every execution that ends is reported.
pub async fn reports_announce_terminal_states(harness: &dyn ExecutorHarness, caps: &ExecutorCaps) {
    let ex = harness.restart().await;
    let Some(mut reports) = ex.reports() else {
        return;
    };
    let quick = ok(
        ex.submit(&harness.spec_that_succeeds(&texts(1, "report")))
            .await,
        "submit",
    );
    let long = ok(ex.submit(&harness.spec_that_runs_long()).await, "submit");
    ok(ex.cancel(&long).await, "cancel");
    let mut seen_quick = false;
    let mut seen_long = false;
    let deadline = tokio::time::Instant::now() + caps.wait_limit;
    while !(seen_quick && seen_long) {
        let next = tokio::time::timeout_at(deadline, reports.next()).await;
        let report = match next {
            Ok(Some(r)) => r,
            Ok(None) => panic!("the report stream ended early"),
            Err(_) => panic!(
                "no report within {:?} (quick: {seen_quick}, cancelled: {seen_long})",
                caps.wait_limit
            ),
        };
        if report.execution_id == quick.execution_id && report.state.is_terminal() {
            assert!(
                succeeded(&report.state),
                "reported state {:?}",
                report.state
            );
            seen_quick = true;
        }
        if report.execution_id == long.execution_id && report.state.is_terminal() {
            assert!(matches!(
                report.state,
                ExecutionState::Canceled | ExecutionState::Lost { .. }
            ));
            seen_long = true;
        }
    }
}
