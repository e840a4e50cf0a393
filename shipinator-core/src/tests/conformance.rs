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
