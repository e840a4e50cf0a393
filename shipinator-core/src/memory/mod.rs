//! In-memory backends and the mock executor: products for embedders' tests.
//!
//! - [`InMemoryStore`]: a [`Store`](crate::store::Store) in one process, with a pluggable clock
//!   ([`ManualClock`]) so tests can expire leases without sleeping.
//! - [`InMemoryArtifactStore`]: an [`ArtifactStore`](crate::artifact::ArtifactStore) that keeps
//!   payloads in memory, checksummed while written.
//! - [`InMemoryLogStore`]: a [`LogStore`](crate::logs::LogStore) with a per-execution cap.
//! - [`MockExecutor`]: an [`Executor`](crate::executor::Executor) scripted per step.
//!
//! Every one of them passes the same conformance suites as the real backends.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::time::Timestamp;

mod artifact;
mod executor;
mod logs;
mod store;

pub use artifact::InMemoryArtifactStore;
pub use executor::{MockExecutor, MockOutcome, MockStep, PayloadFn};
pub use logs::InMemoryLogStore;
pub use store::InMemoryStore;

/// A source of time for the in-memory backends and the mock executor.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The wall clock ([`Timestamp::now`]) as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(Timestamp::now)
}

/// A clock that only moves when told to: lets tests expire leases and finish mock executions
/// without sleeping. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use shipinator_core::memory::ManualClock;
/// use shipinator_core::time::Timestamp;
///
/// let clock = ManualClock::new(Timestamp::from_unix_micros(1_000_000));
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now(), Timestamp::from_unix_micros(3_000_000));
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    micros: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        Self {
            micros: Arc::new(AtomicI64::new(start.as_unix_micros())),
        }
    }

    /// The current reading.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_unix_micros(self.micros.load(Ordering::SeqCst))
    }

    /// Moves the clock forward by `d` (saturating).
    pub fn advance(&self, d: Duration) {
        let delta = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let _ = self
            .micros
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                Some(m.saturating_add(delta))
            });
    }

    /// Sets the clock to `t` (it may move backwards).
    pub fn set(&self, t: Timestamp) {
        self.micros.store(t.as_unix_micros(), Ordering::SeqCst);
    }

    /// This clock as a [`Clock`] for [`InMemoryStore::with_clock`] and
    /// [`MockExecutor::with_clock`].
    pub fn as_clock(&self) -> Clock {
        let this = self.clone();
        Arc::new(move || this.now())
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now()).finish()
    }
}
