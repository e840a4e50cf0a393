//! The executor against a real cluster, run when `SHIPINATOR_TEST_KUBECONFIG` names a
//! kubeconfig file (CI here has no cluster, so there the suite only says it did not run).
//!
//! - `SHIPINATOR_TEST_KUBECONFIG`: kubeconfig path (its current context is used).
//! - `SHIPINATOR_TEST_NAMESPACE`: namespace for the test Jobs (default `default`); the
//!   kubeconfig's user needs create/get/list/watch/delete on Jobs and get/list/watch on pods
//!   and pods/log there.
//! - `SHIPINATOR_TEST_IMAGE`: an image with GNU coreutils' `/bin/true` and `/bin/false`
//!   (default `debian:stable-slim`). It serves as the worker image too: the init container
//!   copies `/bin/true` or `/bin/false` in place of the `shipinator` binary, so the step's exit
//!   code is known without a server to call back.
//!
//! Run with `SHIPINATOR_TEST_KUBECONFIG=~/.kube/config cargo test -p shipinator-k8s real_cluster`.

use std::time::Duration;

use shipinator_core::executor::{ExecutionState, Executor, ExecutorError};
use shipinator_k8s::{ClusterSource, K8sConfig, K8sExecutor, K8sExecutorBuilder, job_name};

use crate::spec;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn executor(
    path: &str,
    worker_binary: &str,
    pull_bound: Duration,
) -> anyhow::Result<K8sExecutor> {
    let image = env("SHIPINATOR_TEST_IMAGE", "debian:stable-slim");
    let config = K8sConfig {
        cluster: ClusterSource::Kubeconfig {
            path: path.to_owned(),
            context: None,
        },
        namespace: env("SHIPINATOR_TEST_NAMESPACE", "default"),
        worker_image: image.clone(),
        worker_binary: worker_binary.to_owned(),
        default_image: Some(image),
        callback_url: "http://shipinator.invalid".to_owned(),
        ttl_seconds_after_finished: 600,
        image_pull_bound: pull_bound,
        ..K8sConfig::default()
    };
    Ok(K8sExecutorBuilder::from_config(config).await?.build()?)
}

async fn wait_terminal(
    ex: &K8sExecutor,
    h: &shipinator_core::executor::ExecHandle,
) -> anyhow::Result<ExecutionState> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let s = ex.status(h).await?;
        if s.is_terminal() {
            return Ok(s);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "still {s:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn base() -> shipinator_core::executor::ExecutionSpec {
    let mut s = spec("real");
    s.image = None;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster() -> anyhow::Result<()> {
    let Ok(path) = std::env::var("SHIPINATOR_TEST_KUBECONFIG") else {
        eprintln!("SHIPINATOR_TEST_KUBECONFIG is not set: the real-cluster suite did not run");
        return Ok(());
    };
    let mut runs = Vec::new();

    // Exit codes of the step container (the worker binary replaced by true or false).
    for (binary, code) in [("/bin/true", 0), ("/bin/false", 1)] {
        let ex = executor(&path, binary, Duration::from_secs(600)).await?;
        let s = base();
        runs.push(s.run_id);
        let h = ex.submit(&s).await?;
        assert_eq!(ex.submit(&s).await?, h, "a repeated submit adopts");
        let state = wait_terminal(&ex, &h).await?;
        // A worker that exits non-zero did not report: lost.
        let expected = if code == 0 {
            matches!(state, ExecutionState::Finished(ref r) if r.exit_code == 0)
        } else {
            matches!(state, ExecutionState::Lost { ref reason } if reason.contains(&format!("code {code}")))
        };
        assert!(expected, "{binary}: {state:?}");
    }

    // An image that cannot be pulled: pending, adopted after a restart, then cancelled.
    let ex = executor(&path, "/bin/true", Duration::from_secs(600)).await?;
    let mut s = base();
    s.image = Some("registry.invalid/shipinator/none:1".to_owned());
    runs.push(s.run_id);
    let h = ex.submit(&s).await?;
    drop(ex);
    let ex = executor(&path, "/bin/true", Duration::from_secs(600)).await?;
    assert!(!ex.status(&h).await?.is_terminal());
    assert_eq!(ex.submit(&s).await?, h);
    ex.cancel(&h).await?;
    assert!(matches!(ex.status(&h).await?, ExecutionState::Canceled));

    // The same with a zero bound: lost, and its Job deleted.
    let ex = executor(&path, "/bin/true", Duration::ZERO).await?;
    let mut s = base();
    s.image = Some("registry.invalid/shipinator/none:1".to_owned());
    runs.push(s.run_id);
    let h = ex.submit(&s).await?;
    let state = wait_terminal(&ex, &h).await?;
    assert!(matches!(state, ExecutionState::Lost { .. }), "{state:?}");

    // A Job of this name that is not ours.
    let ex = executor(&path, "/bin/true", Duration::from_secs(600)).await?;
    let s = base();
    let mut foreign = ex.job_for(&s)?;
    foreign.metadata.labels = None;
    foreign.metadata.annotations = None;
    if let Some(t) = foreign
        .spec
        .as_mut()
        .and_then(|j| j.template.metadata.as_mut())
    {
        t.labels = None;
    }
    shipinator_k8s::install_crypto_provider();
    let api: kube::Api<k8s_openapi::api::batch::v1::Job> = kube::Api::namespaced(
        kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&path)?,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?,
        )?,
        &ex.config().namespace,
    );
    api.create(&kube::api::PostParams::default(), &foreign)
        .await?;
    let err = ex.submit(&s).await;
    api.delete(
        &job_name(s.execution_id),
        &kube::api::DeleteParams::background(),
    )
    .await?;
    assert!(
        matches!(err, Err(ExecutorError::Ownership { .. })),
        "{err:?}"
    );

    let swept = ex
        .sweep_orphans(|r| std::future::ready(runs.contains(&r)))
        .await?;
    eprintln!("swept {swept} jobs");
    Ok(())
}
