//! Tests of the Kubernetes executor against an in-process fake API server.

mod kubelet;
mod manifest;
mod real_cluster;
mod scenarios;

use std::sync::Arc;
use std::time::Duration;

use shipinator_core::conformance::executor::{self as conformance, ExecutorCaps, ExecutorHarness};
use shipinator_core::executor::{ExecutionSpec, Executor};
use shipinator_k8s::testing::FakeApi;
use shipinator_k8s::{K8sExecutor, K8sExecutorBuilder};

/// A spec with fresh ids whose fake pod behaves as `behaviour` (see `fake_api`).
pub(crate) fn spec(behaviour: &str) -> ExecutionSpec {
    let mut s = conformance::base_spec("build");
    s.image = Some("busybox:1.36".to_owned());
    s.env
        .insert("FAKE_KUBELET".to_owned(), behaviour.to_owned());
    s
}

pub(crate) fn executor_on(api: &FakeApi) -> anyhow::Result<K8sExecutor> {
    executor_with(api, |b| b)
}

pub(crate) fn executor_with(
    api: &FakeApi,
    f: impl FnOnce(K8sExecutorBuilder) -> K8sExecutorBuilder,
) -> anyhow::Result<K8sExecutor> {
    let b = K8sExecutorBuilder::new(api.client()?)
        .namespace("ci")
        .worker_image("registry.example/shipinator-worker:1")
        .callback_url("http://shipinator.ci.svc:8080")
        .workspace_claim("shipinator-workspaces");
    Ok(f(b).build()?)
}

#[derive(Debug)]
struct Harness {
    api: FakeApi,
    executor: Arc<dyn Executor>,
}

#[async_trait::async_trait]
impl ExecutorHarness for Harness {
    fn executor(&self) -> Arc<dyn Executor> {
        Arc::clone(&self.executor)
    }

    fn spec_that_succeeds(&self, lines: &[String]) -> ExecutionSpec {
        let mut s = spec("succeed");
        s.env.insert("FAKE_STDOUT".to_owned(), lines.join("\n"));
        s
    }

    fn spec_that_runs_long(&self) -> ExecutionSpec {
        spec("run")
    }

    async fn restart(&self) -> Arc<dyn Executor> {
        match executor_on(&self.api) {
            Ok(e) => Arc::new(e),
            Err(e) => panic!("cannot build executor: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_fake_api() -> anyhow::Result<()> {
    let api = FakeApi::start().await?;
    let executor: Arc<dyn Executor> = Arc::new(executor_on(&api)?);
    let harness = Harness { api, executor };
    conformance::all(
        &harness,
        &ExecutorCaps {
            wait_limit: Duration::from_secs(60),
        },
    )
    .await;
    Ok(())
}
