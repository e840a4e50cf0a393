//! The conformance suites on the in-memory backends, directly and through trait objects.

use std::sync::Arc;
use std::time::Duration;

use crate::conformance::store::StoreCaps;
use crate::memory::InMemoryStore;
use crate::store::Store;

fn store_caps() -> StoreCaps {
    StoreCaps {
        short_ttl: Duration::from_millis(200),
        ..StoreCaps::default()
    }
}

#[tokio::test]
async fn in_memory_store_conformance() {
    let store = InMemoryStore::new();
    crate::conformance::store::all(&store, &store_caps()).await;
}

#[tokio::test]
async fn in_memory_store_conformance_through_arc_dyn() {
    let store: Arc<dyn Store> = Arc::new(InMemoryStore::new());
    crate::conformance::store::all(&*store, &store_caps()).await;
    // A second pass over the same, non-empty store.
    crate::conformance::store::all(&*store, &store_caps()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store_conformance_multi_thread() {
    let store = Arc::new(InMemoryStore::new());
    crate::conformance::store::all(&*store, &store_caps()).await;
}

mod artifact {
    use std::sync::Arc;

    use crate::artifact::ArtifactStore;
    use crate::conformance::artifact::{ArtifactCaps, all};
    use crate::memory::InMemoryArtifactStore;

    #[tokio::test]
    async fn in_memory_artifact_store_conformance() {
        all(&InMemoryArtifactStore::new(), &ArtifactCaps::default()).await;
    }

    #[tokio::test]
    async fn in_memory_artifact_store_conformance_through_arc_dyn() {
        let store: Arc<dyn ArtifactStore> =
            Arc::new(InMemoryArtifactStore::new().with_size_limit(64 << 20));
        let caps = ArtifactCaps {
            large_payload: 5 << 20,
        };
        all(&*store, &caps).await;
        all(&*store, &caps).await;
    }
}

mod logs {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::conformance::logs::{LogCaps, all};
    use crate::logs::LogStore;
    use crate::memory::InMemoryLogStore;

    fn caps() -> LogCaps {
        LogCaps {
            cap_bytes: 4096,
            wait_limit: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn in_memory_log_store_conformance() {
        all(&InMemoryLogStore::new(4096), &caps()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_memory_log_store_conformance_through_arc_dyn() {
        let store: Arc<dyn LogStore> = Arc::new(InMemoryLogStore::new(4096));
        all(&*store, &caps()).await;
    }
}

mod executor {
    use std::sync::Arc;

    use crate::conformance::executor::{ExecutorCaps, ExecutorHarness, all, base_spec};
    use crate::executor::{ExecutionSpec, Executor};
    use crate::memory::{MockExecutor, MockStep};

    /// Scripts one fresh step name per spec.
    #[derive(Debug)]
    struct MockHarness {
        executor: MockExecutor,
    }

    #[async_trait::async_trait]
    impl ExecutorHarness for MockHarness {
        fn executor(&self) -> Arc<dyn Executor> {
            Arc::new(self.executor.clone())
        }

        fn spec_that_succeeds(&self, lines: &[String]) -> ExecutionSpec {
            let name = format!("ok-{}", uuid::Uuid::now_v7());
            self.executor
                .script(&name, MockStep::succeed().with_log_lines(lines.to_vec()));
            base_spec(&name)
        }

        fn spec_that_runs_long(&self) -> ExecutionSpec {
            let name = format!("long-{}", uuid::Uuid::now_v7());
            self.executor.script(&name, MockStep::hang());
            base_spec(&name)
        }

        async fn restart(&self) -> Arc<dyn Executor> {
            Arc::new(self.executor.restart())
        }
    }

    #[tokio::test]
    async fn mock_executor_conformance() {
        let harness = MockHarness {
            executor: MockExecutor::new(),
        };
        all(&harness, &ExecutorCaps::default()).await;
        // Every submit was recorded, repeated ones included.
        assert!(harness.executor.specs().len() as u64 == harness.executor.submit_count());
        assert!(harness.executor.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn mock_executor_conformance_on_paused_time() {
        let harness = MockHarness {
            executor: MockExecutor::new(),
        };
        all(&harness, &ExecutorCaps::default()).await;
    }
}
