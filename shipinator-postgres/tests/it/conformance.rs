use shipinator_core::conformance::store::{StoreCaps, all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_conformance() -> anyhow::Result<()> {
    let store = crate::fresh_store(10).await?;
    all(&store, &StoreCaps::default()).await;
    Ok(())
}
