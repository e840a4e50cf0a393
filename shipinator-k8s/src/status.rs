//! Job conditions and pod state → the generic execution state. Pure.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use serde::Deserialize;
use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::{ExecutionResult, ExecutionState, ProducedArtifact};
use shipinator_core::logs::logs_uri;

use crate::manifest::STEP_CONTAINER;

/// Waiting reasons of a container whose image cannot be pulled.
const PULL_ERRORS: &[&str] = &["ErrImagePull", "ImagePullBackOff", "InvalidImageName"];

/// What a Job and its pods say. The step container runs `shipinator worker`, which reports the
/// step's result (exit code, artifacts) to the server's status callback and exits 0 once that
/// report was delivered: a Job that completes says "reported", and the result the engine
/// records is the callback's (which reaches the server before the pod ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Observed {
    /// A state the executor can report as is.
    State(ExecutionState),
    /// Not terminal yet, but the image has not been pulled: lost once this lasts too long.
    PullFailing(String),
    /// The Job failed; the pods are needed to tell a user failure from a lost pod.
    NeedPods,
    /// The Job completed, but the pods seen carry no worker report (they may lag behind the
    /// Job): read them afresh before taking the completion as a success.
    CompleteUnreported,
}

pub(crate) fn finished(id: ExecutionId, exit_code: i32, failure: Option<String>) -> ExecutionState {
    ExecutionState::Finished(ExecutionResult {
        exit_code,
        logs_uri: Some(logs_uri(id)),
        artifacts: Vec::new(),
        failure,
    })
}

/// The `status` of the worker's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReportedStatus {
    Running,
    Success,
    Failed,
    Lost,
}

/// The terminal report the worker sent to the status callback, which it also writes to the
/// step container's termination message (`SHIPINATOR_RESULT_FILE`).
#[derive(Debug, Deserialize)]
struct WorkerReport {
    status: ReportedStatus,
    exit_code: Option<i32>,
    logs_uri: Option<String>,
    #[serde(default)]
    artifacts: Vec<ProducedArtifact>,
    failure: Option<String>,
}

/// The result the worker reported, read from the step container's termination message: the
/// same the callback delivered. `None` when there is none or it does not parse (the kubelet
/// keeps at most 4096 bytes of it).
fn reported(pods: &[Pod]) -> Option<ExecutionState> {
    let message = pods.iter().find_map(step_terminated)?.message.as_deref()?;
    let report: WorkerReport = serde_json::from_str(message).ok()?;
    match report.status {
        ReportedStatus::Running => None,
        ReportedStatus::Success | ReportedStatus::Failed => {
            let success = report.status == ReportedStatus::Success;
            Some(ExecutionState::Finished(ExecutionResult {
                exit_code: report.exit_code.unwrap_or(if success { 0 } else { -1 }),
                logs_uri: report.logs_uri,
                artifacts: report.artifacts,
                failure: report.failure,
            }))
        }
        ReportedStatus::Lost => Some(ExecutionState::Lost {
            reason: report.failure.unwrap_or_else(|| "lost".to_owned()),
        }),
    }
}

fn condition<'a>(
    job: &'a Job,
    kind: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind && c.status == "True")
}

fn step_terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == STEP_CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

/// Why a pod was lost (evicted, preempted, its node gone, deleted), if it was.
fn pod_lost(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref();
    if let Some(reason) = status.and_then(|s| s.reason.as_deref())
        && matches!(
            reason,
            "Evicted" | "NodeLost" | "Preempting" | "Shutdown" | "Terminated"
        )
    {
        let msg = status.and_then(|s| s.message.as_deref()).unwrap_or("");
        return Some(
            format!("pod {}: {reason} {msg}", name(pod))
                .trim_end()
                .to_owned(),
        );
    }
    if let Some(c) = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    }) {
        return Some(format!(
            "pod {} disrupted: {}",
            name(pod),
            c.reason.as_deref().unwrap_or("unknown reason")
        ));
    }
    if status.and_then(|s| s.phase.as_deref()) == Some("Unknown") {
        return Some(format!("pod {}: node lost contact", name(pod)));
    }
    None
}

fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("?")
}

/// The state of an execution from its Job and the pods seen for it (`pods` is `None` when
/// they are not known).
pub(crate) fn observe(id: ExecutionId, job: &Job, pods: Option<&[Pod]>) -> Observed {
    let exit_of = |pods: &[Pod]| pods.iter().find_map(step_terminated).map(|t| t.exit_code);
    if condition(job, "Complete").is_some()
        || job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0
    {
        // The worker reported; its termination message says what, so this report and the
        // callback agree whichever reaches the engine first. A worker exits 0 after reporting
        // a failed step too, so a completion is never read as a success without its report
        // while the pods may still show it.
        if let Some(state) = pods.and_then(reported) {
            return Observed::State(state);
        }
        return Observed::CompleteUnreported;
    }
    if let Some(failed) = condition(job, "Failed") {
        let reason = failed.reason.as_deref().unwrap_or("");
        if reason == "DeadlineExceeded" {
            // The worker enforces the step timeout itself; the Job deadline is the backstop.
            // Exit code from the step container when it terminated, else -1.
            let Some(pods) = pods else {
                return Observed::NeedPods;
            };
            let code = exit_of(pods).unwrap_or(-1);
            return Observed::State(finished(
                id,
                if code == 0 { -1 } else { code },
                Some("timed out: the job exceeded its active deadline".to_owned()),
            ));
        }
        let Some(pods) = pods else {
            return Observed::NeedPods;
        };
        if let Some(lost) = pods.iter().find_map(pod_lost) {
            return Observed::State(ExecutionState::Lost { reason: lost });
        }
        return match exit_of(pods) {
            Some(0) | None if pods.iter().any(|p| p.metadata.deletion_timestamp.is_some()) => {
                Observed::State(ExecutionState::Lost {
                    reason: "the pod was deleted".to_owned(),
                })
            }
            // The worker exits 0 once it reported the step's result (whatever it was) to the
            // server's status callback; anything else means the result never arrived, an
            // infrastructure failure.
            Some(code) if code != 0 => Observed::State(ExecutionState::Lost {
                reason: format!(
                    "the worker exited with code {code} without reporting the step's result"
                ),
            }),
            Some(_) | None => Observed::State(ExecutionState::Lost {
                reason: format!(
                    "job failed ({reason}) without a terminated step container: the pod was deleted or lost"
                ),
            }),
        };
    }
    let pods = pods.unwrap_or(&[]);
    if let Some(lost) = pods.iter().find_map(pod_lost) {
        return Observed::State(ExecutionState::Lost { reason: lost });
    }
    let waiting_on_pull = pods.iter().find_map(|p| {
        let statuses = p.status.as_ref()?;
        statuses
            .init_container_statuses
            .iter()
            .chain(statuses.container_statuses.iter())
            .flatten()
            .find_map(|c| {
                let w = c.state.as_ref()?.waiting.as_ref()?;
                let r = w.reason.as_deref()?;
                PULL_ERRORS.contains(&r).then(|| {
                    format!(
                        "container {} cannot pull its image: {r} {}",
                        c.name,
                        w.message.as_deref().unwrap_or("")
                    )
                    .trim_end()
                    .to_owned()
                })
            })
    });
    if let Some(reason) = waiting_on_pull {
        return Observed::PullFailing(reason);
    }
    let running = pods
        .iter()
        .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        || job.status.as_ref().and_then(|s| s.ready).unwrap_or(0) > 0;
    Observed::State(if running {
        ExecutionState::Running
    } else {
        ExecutionState::Pending
    })
}

#[cfg(test)]
mod tests {
    use expect_test::expect;
    use serde_json::json;
    use shipinator_core::domain::ExecutionId;

    use super::*;

    fn id() -> ExecutionId {
        "00000000-0000-4000-8000-000000000001".parse().unwrap()
    }

    fn job(status: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j"}, "status": status}))
            .unwrap_or_default()
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status}))
            .unwrap_or_default()
    }

    fn failed(reason: &str) -> Job {
        job(
            json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason}]}),
        )
    }

    fn terminated(code: i32) -> Pod {
        pod(
            json!({"phase": "Failed", "containerStatuses": [{"name": "step", "image": "", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code}}}]}),
        )
    }

    #[test]
    fn a_complete_job_carries_the_workers_report_from_its_termination_message() {
        let complete = job(json!({"conditions": [{"type": "Complete", "status": "True"}]}));
        let with_message = |message: &str| {
            pod(
                json!({"phase": "Succeeded", "containerStatuses": [{"name": "step", "image": "", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "message": message}}}]}),
            )
        };
        let report = json!({"status": "failed", "exit_code": 3, "logs_uri": "logs://x",
            "artifacts": [], "failure": null})
        .to_string();
        let Observed::State(ExecutionState::Finished(r)) =
            observe(id(), &complete, Some(&[with_message(&report)]))
        else {
            panic!("not finished");
        };
        assert_eq!((r.exit_code, r.logs_uri.as_deref()), (3, Some("logs://x")));
        // Truncated, foreign or not there yet: no success is read from these pods; the
        // executor reads them afresh first.
        for message in [&report[..report.len() / 2], "", "done"] {
            assert_eq!(
                observe(id(), &complete, Some(&[with_message(message)])),
                Observed::CompleteUnreported
            );
        }
        assert_eq!(observe(id(), &complete, None), Observed::CompleteUnreported);
        let lost = json!({"status": "lost", "exit_code": null, "logs_uri": null, "artifacts": [],
            "failure": "stopped"})
        .to_string();
        assert_eq!(
            observe(id(), &complete, Some(&[with_message(&lost)])),
            Observed::State(ExecutionState::Lost {
                reason: "stopped".to_owned()
            })
        );
    }

    #[test]
    fn mapping_table() {
        let cases: Vec<(&str, Job, Option<Vec<Pod>>)> = vec![
            ("no status, no pods", job(json!({})), None),
            ("ready", job(json!({"active": 1, "ready": 1})), Some(vec![])),
            (
                "complete",
                job(json!({"conditions": [{"type": "Complete", "status": "True"}]})),
                None,
            ),
            (
                "complete condition false",
                job(json!({"conditions": [{"type": "Complete", "status": "False"}]})),
                None,
            ),
            ("failed, pods unknown", failed("BackoffLimitExceeded"), None),
            (
                "failed, exit 3",
                failed("BackoffLimitExceeded"),
                Some(vec![terminated(3)]),
            ),
            (
                "failed, no pod",
                failed("BackoffLimitExceeded"),
                Some(vec![]),
            ),
            (
                "deadline, killed",
                failed("DeadlineExceeded"),
                Some(vec![terminated(137)]),
            ),
            ("deadline, pods unknown", failed("DeadlineExceeded"), None),
            ("deadline, no pod", failed("DeadlineExceeded"), Some(vec![])),
            (
                "evicted",
                failed("BackoffLimitExceeded"),
                Some(vec![pod(
                    json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}),
                )]),
            ),
            (
                "node lost",
                job(json!({"active": 1})),
                Some(vec![pod(json!({"phase": "Unknown"}))]),
            ),
            (
                "pull",
                job(json!({"active": 1})),
                Some(vec![pod(
                    json!({"phase": "Pending", "initContainerStatuses": [{"name": "install-worker", "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}),
                )]),
            ),
        ];
        let out: String = cases
            .into_iter()
            .map(|(name, job, pods)| {
                let o = match observe(id(), &job, pods.as_deref()) {
                    Observed::State(ExecutionState::Finished(r)) => {
                        format!("Finished(exit {}, failure {:?})", r.exit_code, r.failure)
                    }
                    o => format!("{o:?}"),
                };
                format!("{name}: {o}\n")
            })
            .collect();
        expect![[r#"
            no status, no pods: State(Pending)
            ready: State(Running)
            complete: CompleteUnreported
            complete condition false: State(Pending)
            failed, pods unknown: NeedPods
            failed, exit 3: State(Lost { reason: "the worker exited with code 3 without reporting the step's result" })
            failed, no pod: State(Lost { reason: "job failed (BackoffLimitExceeded) without a terminated step container: the pod was deleted or lost" })
            deadline, killed: Finished(exit 137, failure Some("timed out: the job exceeded its active deadline"))
            deadline, pods unknown: NeedPods
            deadline, no pod: Finished(exit -1, failure Some("timed out: the job exceeded its active deadline"))
            evicted: State(Lost { reason: "pod p: Evicted low on memory" })
            node lost: State(Lost { reason: "pod p: node lost contact" })
            pull: PullFailing("container install-worker cannot pull its image: ErrImagePull")
        "#]].assert_eq(&out);
    }
}
