//! Plain settings of the Kubernetes executor: the `[kubernetes]` and `[targets.<name>]` tables.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The name of the deploy target used when a deploy names none.
pub const DEFAULT_TARGET: &str = "local";

/// Where the API server is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", tag = "source", deny_unknown_fields)]
pub enum ClusterSource {
    /// `KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    #[default]
    Infer,
    /// The service account of the pod the server runs in.
    InCluster,
    /// A kubeconfig file, optionally with a context.
    Kubeconfig {
        /// Path of the kubeconfig file.
        path: String,
        /// Context to use instead of the file's current context.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<String>,
    },
}

/// Compute resources of the step container, as Kubernetes quantities (`"500m"`, `"1Gi"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct Resources {
    /// Requests, by resource name (`cpu`, `memory`).
    pub requests: BTreeMap<String, String>,
    /// Limits, by resource name.
    pub limits: BTreeMap<String, String>,
}

/// A toleration of the pods of executions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct Toleration {
    /// Taint key; empty with operator `Exists` matches every taint.
    pub key: Option<String>,
    /// `Equal` (the default) or `Exists`.
    pub operator: Option<String>,
    /// Taint value for `Equal`.
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule`, `NoExecute`, or empty for all.
    pub effect: Option<String>,
}

/// The shared volume holding stage workspaces: a `PersistentVolumeClaim` (NFS-backed, access
/// mode `ReadWriteMany`) whose `<sub_path_prefix>/<run-id>` directory is mounted as `subPath`
/// at `/workspaces/<run-id>`, so the steps of a stage, each in its own pod, see each other's
/// files in `/workspaces/<run-id>/<stage>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceVolume {
    /// The claim's name, in the executions namespace.
    pub claim_name: String,
    /// A directory inside the claim under which workspace keys live (may be empty).
    #[serde(default)]
    pub sub_path_prefix: String,
}

/// A deploy target (`[targets.<name>]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct TargetConfig {
    /// Namespaces a deploy to this target may touch; empty allows none.
    pub namespaces: Vec<String>,
    /// Service account the deploy Job runs as (its RBAC grants the target namespaces).
    pub service_account: Option<String>,
}

/// Settings of [`K8sExecutor`](crate::K8sExecutor) (`[kubernetes]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct K8sConfig {
    /// How to reach the API server (used by the server; a builder given a client ignores it).
    pub cluster: ClusterSource,
    /// Namespace of execution Jobs.
    pub namespace: String,
    /// Image holding the `shipinator` binary, copied into each pod by an init container.
    pub worker_image: String,
    /// Path of the binary inside the worker image.
    pub worker_binary: String,
    /// Image for steps that name none.
    pub default_image: Option<String>,
    /// Image for deploy steps that name none (must hold `helm` and `kubectl`).
    pub deploy_image: Option<String>,
    /// The URL the worker calls back and uploads to (`SHIPINATOR_SERVER`).
    pub callback_url: String,
    /// Resources of the step container.
    pub resources: Resources,
    /// Node selector of execution pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of execution pods.
    pub tolerations: Vec<Toleration>,
    /// Service account of build and test pods.
    pub service_account: Option<String>,
    /// The workspace volume; without one each pod gets an `emptyDir` (single-step stages only).
    pub workspace: Option<WorkspaceVolume>,
    /// `ttlSecondsAfterFinished` of execution Jobs.
    pub ttl_seconds_after_finished: i32,
    /// Added to the step timeout for `activeDeadlineSeconds` (clone, inputs, uploads).
    #[serde(with = "secs")]
    pub deadline_grace: Duration,
    /// How long a pod may fail to pull its image before the execution is reported lost.
    #[serde(with = "secs")]
    pub image_pull_bound: Duration,
    /// Deploy targets by name.
    pub targets: BTreeMap<String, TargetConfig>,
    /// Client-side limit on API requests per second (the long-lived watches excepted).
    pub max_requests_per_second: Option<u32>,
    /// How often the embedding server runs [`K8sExecutor::sweep_orphans`](crate::K8sExecutor::sweep_orphans)
    /// after the sweep at start (the executor does not schedule sweeps itself).
    #[serde(with = "secs")]
    pub orphan_sweep_interval: Duration,
}

impl Default for K8sConfig {
    fn default() -> Self {
        Self {
            cluster: ClusterSource::Infer,
            namespace: "shipinator".to_owned(),
            worker_image: "shipinator-worker:latest".to_owned(),
            worker_binary: "/usr/local/bin/shipinator".to_owned(),
            default_image: None,
            deploy_image: None,
            callback_url: String::new(),
            resources: Resources::default(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            service_account: None,
            workspace: None,
            ttl_seconds_after_finished: 3600,
            deadline_grace: Duration::from_secs(600),
            image_pull_bound: Duration::from_secs(300),
            targets: BTreeMap::new(),
            max_requests_per_second: None,
            orphan_sweep_interval: Duration::from_secs(300),
        }
    }
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}
