//! LISTEN/NOTIFY wake-ups.

use shipinator_core::conformance::store::{fixture, new_run};
use shipinator_core::domain::Trigger;
use shipinator_core::store::Store;
use shipinator_postgres::Wakeup;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_wakes_a_listener() -> anyhow::Result<()> {
    let store = crate::fresh_store(4).await?;
    let fx = fixture(&store).await;
    let mut wakeups = store.wakeups().await?;
    // Nothing announced yet: the listener falls back to polling.
    assert_eq!(wakeups.wait().await, Wakeup::Poll);
    let other = store.clone();
    let new = new_run(fx.pipeline.id, "main", Trigger::Push, fx.now);
    let writer = tokio::spawn(async move { other.create_run(&new).await });
    // Bounded: the announcement arrives within a few poll intervals.
    let mut notified = false;
    for _ in 0..20 {
        if wakeups.wait().await == Wakeup::Notified {
            notified = true;
            break;
        }
    }
    writer.await??;
    assert!(notified, "create_run's NOTIFY woke the listener");
    Ok(())
}
