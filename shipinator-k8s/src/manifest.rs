//! The Job manifest of an execution: pure, so it is snapshot-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, ResourceRequirements, Toleration as K8sToleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use shipinator_core::domain::{ExecutionId, JobType};
use shipinator_core::executor::ExecutionSpec;

use crate::config::{DEFAULT_TARGET, K8sConfig};
use crate::error::Error;

/// Label naming the manager of every Job the executor creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "shipinator";
/// Label with the run id.
pub const RUN_LABEL: &str = "shipinator.dev/run";
/// Label with the job (stage) id.
pub const JOB_LABEL: &str = "shipinator.dev/job";
/// Label with the step id.
pub const STEP_LABEL: &str = "shipinator.dev/step";
/// Label with the attempt number.
pub const ATTEMPT_LABEL: &str = "shipinator.dev/attempt";
/// Label with the execution id.
pub const EXECUTION_LABEL: &str = "shipinator.dev/execution";
/// Annotation with the execution id: ownership is checked against it, never by name alone.
pub const EXECUTION_ANNOTATION: &str = "shipinator.dev/execution-id";

/// Name of the step container.
pub const STEP_CONTAINER: &str = "step";
/// Where the worker binary is installed in every pod.
pub const WORKER_PATH: &str = "/shipinator/bin/shipinator";
/// Where workspaces live in every pod: the stage's workspace is `<this>/<workspace key>`
/// ([`workspace_path`]), and the key's parent directory (`<this>/<run-id>`) is what is mounted,
/// so the workspace's markers and lock beside it are shared by the stage's pods too.
pub const WORKSPACES_PATH: &str = "/workspaces";
/// Env var naming the file the worker also writes its terminal report to.
pub const RESULT_FILE_ENV: &str = "SHIPINATOR_RESULT_FILE";
/// The step container's termination message file (the Kubernetes default).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Env var with the stage's workspace directory ([`workspace_path`]).
pub const WORKSPACE_ENV: &str = "SHIPINATOR_WORKSPACE";
/// Env var holding the JSON `ExecutionSpec` for the worker.
pub const SPEC_ENV: &str = "SHIPINATOR_EXECUTION_SPEC";
/// Env var with the server URL.
pub const SERVER_ENV: &str = "SHIPINATOR_SERVER";
/// Env var with the per-execution token.
pub const TOKEN_ENV: &str = "SHIPINATOR_EXECUTION_TOKEN";
/// The serialized spec must stay well below the API server's request limit (~1.5 MiB).
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// The deterministic Job name of an execution: `shipinator-<execution-id>` (47 characters,
/// a valid DNS label and label value).
pub fn job_name(id: ExecutionId) -> String {
    format!("shipinator-{id}")
}

/// The stage's workspace directory in the pod: `/workspaces/<workspace key>`.
pub fn workspace_path(spec: &ExecutionSpec) -> String {
    format!("{WORKSPACES_PATH}/{}", spec.workspace.key.trim_matches('/'))
}

/// The workspace key's parent (`<run-id>` for `<run-id>/<stage>`): the directory mounted at
/// `/workspaces/<parent>`. Empty for a one-part key.
fn workspace_parent(spec: &ExecutionSpec) -> &str {
    let key = spec.workspace.key.trim_matches('/');
    key.rsplit_once('/').map_or("", |(parent, _)| parent)
}

/// The namespace of an execution's Job: the executions namespace, or for a deploy the deploy
/// namespace (`SHIPINATOR_DEPLOY_NAMESPACE`), which its target (`SHIPINATOR_DEPLOY_TARGET`,
/// default [`DEFAULT_TARGET`]) must allow.
///
/// # Errors
/// [`Error::Rejected`] for an unknown target or a namespace it does not allow.
pub fn job_namespace(cfg: &K8sConfig, spec: &ExecutionSpec) -> Result<String, Error> {
    if spec.stage != JobType::Deploy {
        return Ok(cfg.namespace.clone());
    }
    let rejected = |reason: String| Error::Rejected {
        id: spec.execution_id,
        reason,
    };
    let target_name = spec
        .env
        .get("SHIPINATOR_DEPLOY_TARGET")
        .map_or(DEFAULT_TARGET, String::as_str);
    let target = cfg.targets.get(target_name).ok_or_else(|| {
        rejected(format!(
            "deploy target '{target_name}' is not configured (no [targets.{target_name}])"
        ))
    })?;
    let namespace = spec
        .env
        .get("SHIPINATOR_DEPLOY_NAMESPACE")
        .map_or("", String::as_str);
    if !target.namespaces.iter().any(|n| n == namespace) {
        return Err(rejected(format!(
            "namespace '{namespace}' is not allowed for target '{target_name}' \
             (targets.{target_name}.namespaces: {:?})",
            target.namespaces
        )));
    }
    Ok(namespace.to_owned())
}

/// The Job of one execution. `token` is the per-execution callback token, if any.
///
/// # Errors
/// [`Error::Rejected`] when the spec cannot run here: no image, a deploy to a namespace its
/// target does not allow, a spec too large for an env var.
pub fn job_manifest(
    cfg: &K8sConfig,
    spec: &ExecutionSpec,
    token: Option<&str>,
) -> Result<Job, Error> {
    let name = job_name(spec.execution_id);
    let rejected = |reason: String| Error::Rejected {
        id: spec.execution_id,
        reason,
    };
    let is_deploy = spec.stage == JobType::Deploy;
    let namespace = job_namespace(cfg, spec)?;
    let mut service_account = cfg.service_account.clone();
    if is_deploy {
        let target_name = spec
            .env
            .get("SHIPINATOR_DEPLOY_TARGET")
            .map_or(DEFAULT_TARGET, String::as_str);
        if let Some(target) = cfg.targets.get(target_name) {
            service_account.clone_from(&target.service_account);
        }
    }
    let image = spec
        .image
        .clone()
        .or_else(|| {
            if is_deploy {
                cfg.deploy_image.clone()
            } else {
                cfg.default_image.clone()
            }
        })
        .ok_or_else(|| {
            rejected("the step names no image and no default is configured".to_owned())
        })?;
    let spec_json = serde_json::to_string(spec).map_err(|e| rejected(format!("spec: {e}")))?;
    if spec_json.len() > MAX_SPEC_BYTES {
        return Err(rejected(format!(
            "the execution spec is {} bytes, more than {MAX_SPEC_BYTES}",
            spec_json.len()
        )));
    }

    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (RUN_LABEL.to_owned(), spec.run_id.to_string()),
        (JOB_LABEL.to_owned(), spec.job_id.to_string()),
        (STEP_LABEL.to_owned(), spec.step_id.to_string()),
        (ATTEMPT_LABEL.to_owned(), spec.attempt.to_string()),
        (EXECUTION_LABEL.to_owned(), spec.execution_id.to_string()),
    ]);
    let annotations = BTreeMap::from([(
        EXECUTION_ANNOTATION.to_owned(),
        spec.execution_id.to_string(),
    )]);

    let mut env: Vec<EnvVar> = spec
        .env
        .iter()
        .filter(|(k, _)| k.as_str() != TOKEN_ENV)
        .map(|(k, v)| env_var(k, v))
        .collect();
    env.push(env_var(SERVER_ENV, &cfg.callback_url));
    if let Some(token) = token.or_else(|| spec.env.get(TOKEN_ENV).map(String::as_str)) {
        env.push(env_var(TOKEN_ENV, token));
    }
    env.push(env_var(WORKSPACE_ENV, &workspace_path(spec)));
    // The worker writes its terminal report there too: the status mapping reads it back.
    env.push(env_var(RESULT_FILE_ENV, TERMINATION_LOG));
    env.push(env_var(SPEC_ENV, &spec_json));

    // A deploy runs in its target namespace, where the workspace claim is not: it needs no
    // workspace (the worker fetches its artifact from the server by id).
    let workspace = cfg.workspace.as_ref().filter(|_| !is_deploy);
    let workspace_volume = match workspace {
        Some(w) => Volume {
            name: "workspace".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: w.claim_name.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        None => Volume {
            name: "workspace".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    // The run's directory of the claim, at the same place in the pod: the worker creates the
    // stage's workspace in it, with its `.ready` marker and `.lock` beside it.
    let parent = workspace_parent(spec);
    let mount_path = if parent.is_empty() {
        WORKSPACES_PATH.to_owned()
    } else {
        format!("{WORKSPACES_PATH}/{parent}")
    };
    let sub_path = workspace.and_then(|w| {
        let sub = [w.sub_path_prefix.trim_matches('/'), parent]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("/");
        (!sub.is_empty()).then_some(sub)
    });
    let bin_mount = VolumeMount {
        name: "shipinator-bin".to_owned(),
        mount_path: "/shipinator/bin".to_owned(),
        ..VolumeMount::default()
    };
    let init = Container {
        name: "install-worker".to_owned(),
        image: Some(cfg.worker_image.clone()),
        command: Some(vec![
            "cp".to_owned(),
            cfg.worker_binary.clone(),
            WORKER_PATH.to_owned(),
        ]),
        volume_mounts: Some(vec![bin_mount.clone()]),
        ..Container::default()
    };
    let quantities = |m: &BTreeMap<String, String>| {
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect::<BTreeMap<_, _>>()
        })
    };
    let resources =
        (!cfg.resources.requests.is_empty() || !cfg.resources.limits.is_empty()).then(|| {
            ResourceRequirements {
                requests: quantities(&cfg.resources.requests),
                limits: quantities(&cfg.resources.limits),
                ..ResourceRequirements::default()
            }
        });
    let step = Container {
        name: STEP_CONTAINER.to_owned(),
        image: Some(image),
        command: Some(vec![
            WORKER_PATH.to_owned(),
            "worker".to_owned(),
            "--execution".to_owned(),
            spec.execution_id.to_string(),
        ]),
        working_dir: Some(mount_path.clone()),
        env: Some(env),
        resources,
        volume_mounts: Some(vec![
            bin_mount,
            VolumeMount {
                name: "workspace".to_owned(),
                mount_path,
                sub_path,
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let tolerations: Vec<K8sToleration> = cfg
        .tolerations
        .iter()
        .map(|t| K8sToleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: None,
        })
        .collect();
    let active_deadline_seconds = spec.timeout.map(|t| {
        let secs = t.saturating_add(cfg.deadline_grace).as_secs().max(1);
        i64::try_from(secs).unwrap_or(i64::MAX)
    });
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds,
            ttl_seconds_after_finished: Some(cfg.ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    service_account_name: service_account,
                    automount_service_account_token: Some(is_deploy),
                    init_containers: Some(vec![init]),
                    containers: vec![step],
                    node_selector: (!cfg.node_selector.is_empty())
                        .then(|| cfg.node_selector.clone()),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    volumes: Some(vec![
                        Volume {
                            name: "shipinator-bin".to_owned(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                        workspace_volume,
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}
