//! Failure scenarios: timeouts, foreign objects, restarts, lost pods, dropped watches,
//! malformed objects, and the request budget.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::{
    ExecHandle, ExecutionState, Executor, ExecutorError, ReportStream,
};
use shipinator_k8s::{K8sExecutor, job_name};

use crate::{executor_on, executor_with, spec};
use shipinator_k8s::testing::{FakeApi, Kind};

const BOUND: Duration = Duration::from_secs(60);

/// Polls `status` until `done` holds (bounded).
async fn wait_until(
    ex: &K8sExecutor,
    h: &ExecHandle,
    done: impl Fn(&ExecutionState) -> bool,
) -> anyhow::Result<ExecutionState> {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let s = ex.status(h).await?;
        if done(&s) {
            return Ok(s);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "last state {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn running(s: &ExecutionState) -> bool {
    matches!(s, ExecutionState::Running)
}

fn exit(s: &ExecutionState) -> Option<i32> {
    match s {
        ExecutionState::Finished(r) => Some(r.exit_code),
        _ => None,
    }
}

/// Terminal reports for every id in `want` (bounded).
async fn terminal_reports(
    reports: &mut ReportStream,
    want: &HashSet<ExecutionId>,
) -> anyhow::Result<HashMap<ExecutionId, ExecutionState>> {
    let mut got = HashMap::new();
    let deadline = tokio::time::Instant::now() + BOUND;
    while !want.iter().all(|id| got.contains_key(id)) {
        let next = tokio::time::timeout_at(deadline, reports.next()).await;
        let Ok(Some(r)) = next else {
            anyhow::bail!("missing reports: {} of {}", got.len(), want.len());
        };
        if want.contains(&r.execution_id) && r.state.is_terminal() {
            anyhow::ensure!(
                got.insert(r.execution_id, r.state).is_none(),
                "an execution was reported twice"
            );
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_failed_after_storing_is_adopted_on_retry() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let s = spec("run");
    api.fail_next_create(500);
    let first = ex.submit(&s).await;
    assert!(
        matches!(first, Err(ExecutorError::Unavailable { .. })),
        "{first:?}"
    );
    let h = ex.submit(&s).await?;
    assert_eq!(h.external_id, job_name(s.execution_id));
    assert_eq!(api.names(Kind::Job), vec![job_name(s.execution_id)]);

    // A gateway timeout is retried by the client; its retry meets 409 and adopts.
    let s2 = spec("run");
    api.fail_next_create(504);
    let h2 = ex.submit(&s2).await?;
    assert_eq!(h2.external_id, job_name(s2.execution_id));
    assert_eq!(api.names(Kind::Job).len(), 2, "no duplicate job");
    wait_until(&ex, &h2, running).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_timed_out_is_adopted_on_retry() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let mut config = kube::Config::new(api.url.parse()?);
    config.read_timeout = Some(Duration::from_secs(2));
    shipinator_k8s::install_crypto_provider();
    let client = kube::Client::try_from(config)?;
    let ex = shipinator_k8s::K8sExecutorBuilder::new(client)
        .namespace("ci")
        .default_image("busybox:1.36")
        .build()?;
    let s = spec("run");
    api.hang_next_create();
    let first = ex.submit(&s).await;
    assert!(
        matches!(first, Err(ExecutorError::Unavailable { .. })),
        "{first:?}"
    );
    let h = ex.submit(&s).await?;
    assert_eq!(h.external_id, job_name(s.execution_id));
    assert_eq!(
        api.names(Kind::Job),
        vec![job_name(s.execution_id)],
        "no duplicate"
    );
    wait_until(&ex, &h, running).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_job_with_the_same_name_is_an_ownership_error() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let s = spec("run");
    let name = job_name(s.execution_id);
    let foreign = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "ci", "labels": {"app": "someone-else"}},
        "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "nginx"}]}}}
    });
    api.put(Kind::Job, foreign.clone());
    let err = ex.submit(&s).await;
    assert!(
        matches!(err, Err(ExecutorError::Ownership { .. })),
        "{err:?}"
    );

    // Our label, but another execution's annotation: still not ours.
    let s2 = spec("run");
    let name2 = job_name(s2.execution_id);
    api.put(
        Kind::Job,
        json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name2, "namespace": "ci",
                "labels": {"app.kubernetes.io/managed-by": "shipinator"},
                "annotations": {"shipinator.dev/execution-id": s.execution_id.to_string()}},
            "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "nginx"}]}}}
        }),
    );
    let err = ex.submit(&s2).await;
    assert!(
        matches!(err, Err(ExecutorError::Ownership { .. })),
        "{err:?}"
    );

    assert!(api.deletes().is_empty(), "nothing deleted");
    let kept = api
        .object(Kind::Job, &name)
        .map(|v| v["metadata"]["labels"].clone());
    assert_eq!(
        kept,
        Some(foreign["metadata"]["labels"].clone()),
        "nothing adopted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restart_while_20_jobs_run_adopts_them_all() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let specs: Vec<_> = (0..20).map(|_| spec("run")).collect();
    {
        let ex = executor_on(&api)?;
        for s in &specs {
            ex.submit(s).await?;
        }
    }
    // While no executor runs, 7 report and end, 3 fail to report (their worker exits 2).
    for s in &specs[..7] {
        api.finish(&job_name(s.execution_id), 0);
    }
    for s in &specs[7..10] {
        api.finish(&job_name(s.execution_id), 2);
    }
    let ex = executor_on(&api)?;
    let Some(mut reports) = ex.reports() else {
        anyhow::bail!("no reports");
    };
    let adopted = ex.adopt().await?;
    let ids: HashSet<_> = adopted.iter().map(|(h, _)| h.execution_id).collect();
    assert_eq!(adopted.len(), 20);
    assert_eq!(ids.len(), 20, "no duplicates");
    let finished: Vec<_> = adopted.iter().filter_map(|(_, s)| exit(s)).collect();
    assert_eq!(finished.iter().filter(|c| **c == 0).count(), 7);
    let lost = adopted
        .iter()
        .filter(|(_, s)| matches!(s, ExecutionState::Lost { reason } if reason.contains("code 2")))
        .count();
    assert_eq!(lost, 3);
    for s in &specs {
        ex.submit(s).await?;
    }
    assert_eq!(
        api.requests().get("POST jobs"),
        Some(&20),
        "resubmits adopt"
    );
    assert_eq!(api.names(Kind::Job).len(), 20);

    let done: HashSet<_> = specs[..10].iter().map(|s| s.execution_id).collect();
    let got = terminal_reports(&mut reports, &done).await?;
    assert_eq!(
        got.len(),
        10,
        "the jobs that finished meanwhile are all recorded"
    );
    for s in &specs[10..] {
        api.finish(&job_name(s.execution_id), 0);
    }
    let rest: HashSet<_> = specs[10..].iter().map(|s| s.execution_id).collect();
    let got = terminal_reports(&mut reports, &rest).await?;
    assert!(got.values().all(|s| exit(s) == Some(0)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_or_deleted_pod_is_lost() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    for evict in [true, false] {
        let s = spec("run");
        let h = ex.submit(&s).await?;
        wait_until(&ex, &h, running).await?;
        if evict {
            api.evict(&h.external_id);
        } else {
            api.delete_pod(&h.external_id);
        }
        let state = wait_until(&ex, &h, ExecutionState::is_terminal).await?;
        assert!(
            matches!(state, ExecutionState::Lost { .. }),
            "evict {evict}: {state:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_completion_is_missed_across_a_dropped_watch_or_410() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let Some(mut reports) = ex.reports() else {
        anyhow::bail!("no reports");
    };
    // Dropped stream: the watcher rewatches from its resourceVersion.
    let a = ex.submit(&spec("run")).await?;
    wait_until(&ex, &a, running).await?;
    api.drop_watches();
    api.finish(&a.external_id, 0);
    let got = terminal_reports(&mut reports, &HashSet::from([a.execution_id])).await?;
    assert_eq!(got.get(&a.execution_id).and_then(exit), Some(0));

    // Partition, completion, compaction: the rewatch gets 410 Gone and relists.
    let b = ex.submit(&spec("run")).await?;
    wait_until(&ex, &b, running).await?;
    api.hold_watches();
    api.finish(&b.external_id, 3);
    api.compact();
    api.release_watches();
    let got = terminal_reports(&mut reports, &HashSet::from([b.execution_id])).await?;
    assert!(
        matches!(got.get(&b.execution_id), Some(ExecutionState::Lost { reason }) if reason.contains("code 3")),
        "{got:?}"
    );
    assert!(
        api.requests().get("GONE jobs").copied().unwrap_or(0) >= 1,
        "the 410 path ran: {:?}",
        api.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_job_fails_only_its_execution() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let hs = [
        ex.submit(&spec("run")).await?,
        ex.submit(&spec("run")).await?,
    ];
    for h in &hs {
        wait_until(&ex, h, running).await?;
    }
    // Our label without an execution annotation: ignored.
    api.put(
        Kind::Job,
        json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "stray", "namespace": "ci", "labels": {"app.kubernetes.io/managed-by": "shipinator"}},
            "spec": 17}),
    );
    let Some(mut bad) = api.object(Kind::Job, &hs[0].external_id) else {
        anyhow::bail!("job missing");
    };
    bad["status"]["conditions"] = json!("not a list");
    bad["spec"]["backoffLimit"] = json!({"nested": true});
    api.put(Kind::Job, bad);
    let state = wait_until(&ex, &hs[0], ExecutionState::is_terminal).await?;
    assert!(
        matches!(state, ExecutionState::Lost { ref reason } if reason.contains("malformed")),
        "{state:?}"
    );
    assert!(running(&ex.status(&hs[1]).await?));
    api.finish(&hs[1].external_id, 0);
    let state = wait_until(&ex, &hs[1], ExecutionState::is_terminal).await?;
    assert_eq!(exit(&state), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_could_not_report_is_lost_and_deadlines_time_out() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    // The worker exits non-zero only when its status report did not reach the server.
    let h = ex.submit(&spec("fail:3")).await?;
    let state = wait_until(&ex, &h, ExecutionState::is_terminal).await?;
    assert!(
        matches!(&state, ExecutionState::Lost { reason } if reason.contains("exited with code 3")),
        "{state:?}"
    );

    let h = ex.submit(&spec("deadline")).await?;
    let state = wait_until(&ex, &h, ExecutionState::is_terminal).await?;
    let ExecutionState::Finished(r) = state else {
        anyhow::bail!("{state:?}");
    };
    assert_eq!(r.exit_code, 137);
    assert!(r.failure.is_some_and(|f| f.contains("timed out")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_past_the_bound_is_lost() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_with(&api, |b| b.image_pull_bound(Duration::ZERO))?;
    let h = ex.submit(&spec("pull")).await?;
    let state = wait_until(&ex, &h, ExecutionState::is_terminal).await?;
    assert!(
        matches!(state, ExecutionState::Lost { ref reason } if reason.contains("pull")),
        "{state:?}"
    );
    let deadline = tokio::time::Instant::now() + BOUND;
    while api.object(Kind::Job, &h.external_id).is_some() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "job not deleted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_deletes_with_background_propagation() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let h = ex.submit(&spec("run")).await?;
    ex.cancel(&h).await?;
    assert_eq!(ex.status(&h).await?, ExecutionState::Canceled);
    assert_eq!(
        api.deletes(),
        vec![(h.external_id.clone(), Some("Background".to_owned()))]
    );
    assert!(api.names(Kind::Pod).is_empty(), "pods deleted with the job");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_deletes_jobs_of_terminal_runs() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let a = spec("run");
    let b = spec("run");
    ex.submit(&a).await?;
    ex.submit(&b).await?;
    let done = a.run_id;
    assert_eq!(ex.sweep_orphans(|run| async move { run == done }).await?, 1);
    assert_eq!(api.names(Kind::Job), vec![job_name(b.execution_id)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_costs_at_most_1_25_requests_per_job() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let Some(mut reports) = ex.reports() else {
        anyhow::bail!("no reports");
    };
    let n: u32 = 200;
    let mut handles = Vec::new();
    for _ in 0..n {
        handles.push(ex.submit(&spec("succeed")).await?);
    }
    let ids: HashSet<_> = handles.iter().map(|h| h.execution_id).collect();
    terminal_reports(&mut reports, &ids).await?;
    for h in &handles {
        assert_eq!(exit(&ex.status(h).await?), Some(0));
    }
    assert_eq!(
        ex.api_requests(),
        u64::from(n),
        "one request per submission"
    );
    let total = api.total_requests();
    let per_job = total as f64 / f64::from(n);
    println!(
        "{total} requests for {n} jobs: {per_job:.3} per job ({:?})",
        api.requests()
    );
    assert!(
        per_job <= 1.25,
        "{per_job} requests per job: {:?}",
        api.requests()
    );
    Ok(())
}

/// With the client throttled to q requests/s, each submission takes at most 1.25 permits, so
/// the submission rate is at least q / 1.25 = 0.8 q Jobs/s. The permits are counted (the
/// bound); the measured rate is printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_submission_rate_is_bounded_by_permits_per_job() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let q = 20;
    let ex = executor_with(&api, |b| b.throttle(q))?;
    let Some(mut reports) = ex.reports() else {
        anyhow::bail!("no reports");
    };
    let n: u32 = 100;
    let before = ex.api_requests();
    let started = std::time::Instant::now();
    // The engine submits the ready steps of many runs at once.
    let specs: Vec<_> = (0..n).map(|_| spec("succeed")).collect();
    let handles: Vec<_> = futures_util::stream::iter(specs.iter().map(|s| ex.submit(s)))
        .buffer_unordered(32)
        .collect()
        .await;
    let mut ids = HashSet::new();
    for h in handles {
        ids.insert(h?.execution_id);
    }
    let elapsed = started.elapsed();
    let permits = ex.api_requests() - before;
    terminal_reports(&mut reports, &ids).await?;
    let per_job = permits as f64 / f64::from(n);
    println!(
        "throttle {q} req/s: {n} jobs in {elapsed:?} = {:.1} jobs/s (bound 0.8 q = {:.1}); {per_job:.3} permits per job",
        f64::from(n) / elapsed.as_secs_f64(),
        0.8 * f64::from(q)
    );
    assert!(per_job <= 1.25, "{per_job} permits per job");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_running_execution_follow_until_it_ends() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let ex = executor_on(&api)?;
    let h = ex.submit(&spec("run")).await?;
    wait_until(&ex, &h, running).await?;
    api.append_log(&h.external_id, "first");
    let mut logs = ex.logs(&h, 0).await?;
    let Some(first) = tokio::time::timeout(BOUND, logs.next()).await? else {
        anyhow::bail!("the log ended early");
    };
    assert_eq!((first?.seq, "first"), (0, "first"));
    api.append_log(&h.external_id, "second");
    api.finish(&h.external_id, 0);
    let rest = tokio::time::timeout(BOUND, logs.collect::<Vec<_>>()).await?;
    let rest: Vec<(u64, String)> = rest
        .into_iter()
        .map(|l| l.map(|l| (l.seq, l.text)))
        .collect::<Result<_, _>>()?;
    assert_eq!(rest, vec![(1, "second".to_owned())], "then the stream ends");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_runs_in_its_target_namespace() -> anyhow::Result<()> {
    use shipinator_core::domain::JobType;
    use shipinator_k8s::TargetConfig;

    let api = FakeApi::start().await?;
    let with_target = |b: shipinator_k8s::K8sExecutorBuilder| {
        b.target(
            "local",
            TargetConfig {
                namespaces: vec!["staging".to_owned()],
                service_account: Some("deployer".to_owned()),
            },
        )
    };
    let ex = executor_with(&api, with_target)?;
    let deploy = |ns: &str| {
        let mut s = spec("run");
        s.stage = JobType::Deploy;
        s.env
            .insert("SHIPINATOR_DEPLOY_TARGET".to_owned(), "local".to_owned());
        s.env
            .insert("SHIPINATOR_DEPLOY_NAMESPACE".to_owned(), ns.to_owned());
        s
    };
    let refused = ex.submit(&deploy("kube-system")).await;
    assert!(
        matches!(refused, Err(ExecutorError::Rejected { .. })),
        "{refused:?}"
    );

    let s = deploy("staging");
    let h = ex.submit(&s).await?;
    assert_eq!(
        h.external_id,
        format!("staging/{}", job_name(s.execution_id))
    );
    let stored = api.object(Kind::Job, &job_name(s.execution_id));
    assert_eq!(
        stored.as_ref().map(|v| v["metadata"]["namespace"].clone()),
        Some(json!("staging"))
    );
    assert_eq!(
        stored.map(|v| v["spec"]["template"]["spec"]["serviceAccountName"].clone()),
        Some(json!("deployer"))
    );
    wait_until(&ex, &h, running).await?;
    api.finish(&job_name(s.execution_id), 0);
    wait_until(&ex, &h, |s| exit(s) == Some(0)).await?;

    // A restarted executor finds it by its handle; cancelling another deletes it there.
    drop(ex);
    let ex = executor_with(&api, with_target)?;
    assert_eq!(exit(&ex.status(&h).await?), Some(0));
    assert_eq!(ex.submit(&s).await?, h, "adopted, not duplicated");
    let other = ex.submit(&deploy("staging")).await?;
    ex.cancel(&other).await?;
    assert!(
        api.object(Kind::Job, other.external_id.trim_start_matches("staging/"))
            .is_none()
    );
    assert_eq!(api.requests().get("POST jobs"), Some(&2));
    Ok(())
}
