//! Shipinator's Kubernetes executor: each execution is one `batch/v1` Job.
//!
//! - **Submit** creates a Job named `shipinator-<execution-id>` (a retried submit adopts the
//!   existing Job after checking its labels and execution-id annotation), `backoffLimit: 0`
//!   (retries belong to the engine), `activeDeadlineSeconds` = step timeout + grace.
//! - **The work** runs in the step's own image: an init container copies the `shipinator`
//!   binary from the worker image into an `emptyDir`, and the step container runs
//!   `/shipinator/bin/shipinator worker --execution <id>`, which reads the spec from
//!   `SHIPINATOR_EXECUTION_SPEC` (JSON), works in `SHIPINATOR_WORKSPACE` =
//!   `/workspaces/<run-id>/<stage>` (the run's directory of the shared workspace claim is
//!   mounted at `/workspaces/<run-id>`) and calls `SHIPINATOR_SERVER` back with
//!   `SHIPINATOR_EXECUTION_TOKEN`.
//! - **Status** comes from watches of the executor's Jobs and pods (label
//!   `app.kubernetes.io/managed-by=shipinator`), so steady-state polling costs no requests:
//!   Complete → finished with exit 0 (the worker delivered the step's real result to the
//!   status callback before it exited); Failed with a non-zero exit of the worker (it could not
//!   report) → `Lost`;
//!   DeadlineExceeded → finished with failure "timed out" (exit code of the container if it
//!   terminated, else -1); an evicted, preempted or deleted pod, a lost node, a deleted Job,
//!   a malformed Job object or an image that cannot be pulled within a bound → `Lost`, which
//!   the engine retries.
//! - **Restart**: the watches relist and report executions that finished meanwhile;
//!   [`K8sExecutor::adopt`] lists them explicitly and [`K8sExecutor::sweep_orphans`] deletes
//!   the Jobs of terminal runs.
//! - **Deploys** run in their target namespace with the target's service account, once the
//!   deploy namespace is on the target's allow-list.
//!
//! # Features
//! - `rustls-tls` (default): TLS to the API server with rustls.
//! - `testing`: `testing::FakeApi`, an in-process fake API server whose simulated kubelet
//!   can run pods as local processes.

mod config;
mod error;
mod executor;
mod manifest;
mod status;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{
    ClusterSource, DEFAULT_TARGET, K8sConfig, Resources, TargetConfig, Toleration, WorkspaceVolume,
};
pub use error::Error;
pub use executor::{K8sExecutor, K8sExecutorBuilder, TokenProvider};
pub use manifest::{
    ATTEMPT_LABEL, EXECUTION_ANNOTATION, EXECUTION_LABEL, JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL,
    MAX_SPEC_BYTES, RESULT_FILE_ENV, RUN_LABEL, SERVER_ENV, SPEC_ENV, STEP_CONTAINER, STEP_LABEL,
    TERMINATION_LOG, TOKEN_ENV, WORKER_PATH, WORKSPACE_ENV, WORKSPACES_PATH, job_manifest,
    job_name, job_namespace, workspace_path,
};

/// Makes rustls's `ring` provider the process default when no provider was chosen yet.
///
/// When several crates of one binary enable different rustls providers (the S3 client enables
/// `aws-lc-rs`, this crate `ring`), rustls cannot pick one by itself and building a client
/// panics. Every `kube::Client` this crate builds calls this first; call it before building a
/// `kube::Client` yourself.
pub fn install_crypto_provider() {
    #[cfg(feature = "rustls-tls")]
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have installed one meanwhile: either way a provider is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
