//! `LISTEN`/`NOTIFY` wake-ups with a poll fallback.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::{Error, WAKEUP_CHANNEL};

/// Why [`Wakeups::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// A commit or a new run was announced (or the listener reconnected and may have missed
    /// announcements).
    Notified,
    /// The poll interval passed without an announcement: look for work anyway.
    Poll,
}

/// A listener on [`WAKEUP_CHANNEL`], from [`PgStore::wakeups`](crate::PgStore::wakeups).
///
/// A background task holds the listening connection and reconnects it when it is lost;
/// dropping the `Wakeups` stops the task. Announcements that arrive while nobody waits are
/// coalesced into one.
pub struct Wakeups {
    notify: Arc<Notify>,
    poll_interval: Duration,
    task: JoinHandle<()>,
}

impl fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wakeups")
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl Wakeups {
    pub(crate) async fn listen(pool: &PgPool, poll_interval: Duration) -> Result<Self, Error> {
        let mut listener = PgListener::connect_with(pool)
            .await
            .map_err(Error::from_sqlx)?;
        listener
            .listen(WAKEUP_CHANNEL)
            .await
            .map_err(Error::from_sqlx)?;
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn(forward(listener, Arc::clone(&notify), poll_interval));
        Ok(Self {
            notify,
            poll_interval,
            task,
        })
    }

    /// Waits for the next announcement, or for the poll interval (at most one second).
    pub async fn wait(&mut self) -> Wakeup {
        match tokio::time::timeout(self.poll_interval, self.notify.notified()).await {
            Ok(()) => Wakeup::Notified,
            Err(_) => Wakeup::Poll,
        }
    }

    /// The wake-ups as an endless stream of [`wait`](Self::wait)'s answers, for
    /// `Driver::with_wakeups`.
    pub fn into_stream(self) -> impl futures_core::Stream<Item = Wakeup> + Send + 'static {
        futures_util::stream::unfold(self, |mut w| async move {
            let wakeup = w.wait().await;
            Some((wakeup, w))
        })
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut listener: PgListener, notify: Arc<Notify>, retry: Duration) {
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => notify.notify_one(),
            // The connection was lost and is reopened on the next call: anything announced in
            // between is gone, so wake the waiter to look.
            Ok(None) => notify.notify_one(),
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "wake-up listener failed; retrying"
                );
                notify.notify_one();
                tokio::time::sleep(retry).await;
            }
        }
    }
}
