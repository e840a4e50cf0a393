//! PostgreSQL implementation of Shipinator's [`Store`](shipinator_core::store::Store): the
//! production store, shared by several server replicas (DMD §1–§2).
//!
//! ```no_run
//! use shipinator_core::store::Store;
//! use shipinator_postgres::PgStore;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // Connects and applies the embedded migrations.
//! let store = PgStore::connect("postgres://shipinator@127.0.0.1/shipinator").await?;
//! let now = store.now().await?;
//! # let _ = now;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//! - **Schema**: plain-SQL migrations in `migrations/`, embedded in the binary and applied by
//!   [`PgStore::connect`] (or [`PgStore::migrate`]). Queries are checked at run time, so
//!   building needs no database and no offline query data.
//! - **Transitions** are compare-and-set updates at READ COMMITTED
//!   (`… WHERE id = $1 AND version = $2`); a loser gets `Conflict`, never a lost update. One
//!   [`Batch`](shipinator_core::store::Batch) is one transaction, its fences checked under a
//!   row lock; usually a single statement (one round trip), and statement by statement when
//!   a precondition fails, so the error names it.
//! - **Several drivers** share one database: runs and queued executions are claimed with
//!   `FOR UPDATE SKIP LOCKED`, leases expire by the database clock (`now()`), and every claim
//!   bumps the run's `lease_epoch`, which fences off a late writer.
//! - **Wake-ups**: run creation, batches without a fence (input from outside a driver: a
//!   cancel, a worker's report) and batches that queue executions send `NOTIFY` on
//!   [`WAKEUP_CHANNEL`] in their transaction; a driver's own fenced transitions do not, since
//!   `NOTIFY` serialises the commits of all notifying transactions. [`PgStore::wakeups`]
//!   listens, and falls back to polling at most every second, because notifications sent
//!   while a listener reconnects are lost.
//! - **Events** (the outbox) are inserted unnumbered in the batch's transaction; `list_events`
//!   numbers committed events under an advisory lock, so `seq` is gapless from 1 and an event
//!   that commits late is never skipped by a reader, without serialising writers.
//! - **Outages**: a lost connection surfaces as `StoreError::Unavailable`; the call had no
//!   effect (or, for a `commit` whose `COMMIT` was cut off, an effect that replaying the same
//!   batch treats as a no-op), so the caller retries with backoff.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shipinator_core::error::BoxError;
use shipinator_core::store::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

mod access;
mod cancel;
mod rows;
mod script;
mod store;
mod wakeups;

#[cfg(feature = "testing")]
pub mod testing;

pub use wakeups::{Wakeup, Wakeups};

/// The `LISTEN`/`NOTIFY` channel on which commits announce new work.
pub const WAKEUP_CHANNEL: &str = "shipinator_wakeup";

/// The longest a [`Wakeups`] listener waits before telling its driver to poll anyway.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Pooled connections idle at least this long are pinged before use.
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection settings for [`PgStore::connect_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStoreOptions {
    /// Most connections the pool opens (default 10). Size it to the number of concurrent
    /// store calls the process makes: drivers, API handlers, benchmarks. From 3 up, the store
    /// keeps one more, outside the pool, for batch commits.
    pub max_connections: u32,
    /// Connections kept open while idle (default 0).
    pub min_connections: u32,
    /// How long a call waits for a connection before failing with `Unavailable` (default 5 s).
    /// While the database is down, every call takes this long to fail.
    pub acquire_timeout: Duration,
    /// Whether [`PgStore::connect_with`] applies the embedded migrations (default true).
    pub migrate: bool,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            migrate: true,
        }
    }
}

impl PgStoreOptions {
    /// Sets [`max_connections`](Self::max_connections).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets [`acquire_timeout`](Self::acquire_timeout).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets [`migrate`](Self::migrate).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }
}

/// Errors of this crate; mapped into [`StoreError`] by the `Store` methods.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database cannot be reached (refused, closed, timed out, shutting down).
    #[error("cannot reach the PostgreSQL database")]
    Unavailable {
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// A statement failed.
    #[error("PostgreSQL statement failed")]
    Query {
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// The connection URL or options are invalid.
    #[error("invalid PostgreSQL connection settings")]
    Config {
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("applying the Shipinator schema migrations failed")]
    Migrate {
        /// Cause.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A stored value this version cannot read (for example an unknown enum spelling).
    #[error("column {column} holds a value this version of Shipinator cannot read")]
    Decode {
        /// The column.
        column: &'static str,
        /// Cause.
        #[source]
        source: BoxError,
    },
    /// A value that does not fit its column (for example a version above `i64::MAX`).
    #[error("{field} {value} does not fit in a PostgreSQL column")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
}

impl Error {
    /// Classifies a sqlx error: connection-level failures become [`Error::Unavailable`].
    pub(crate) fn from_sqlx(source: sqlx::Error) -> Self {
        if is_unavailable(&source) {
            Error::Unavailable { source }
        } else {
            Error::Query { source }
        }
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

/// SQLSTATEs that mean "the server cannot serve this now; retry": connection exceptions
/// (class 08), shutdown and start-up (57P01–57P03), too many connections, and the rollbacks
/// READ COMMITTED can still produce (serialization failure, deadlock).
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                )
        }),
        _ => false,
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable { .. } => StoreError::Unavailable {
                source: Box::new(e),
            },
            Error::Migrate {
                source: sqlx::migrate::MigrateError::Execute(ref inner),
            } if is_unavailable(inner) => StoreError::Unavailable {
                source: Box::new(e),
            },
            Error::OutOfRange { .. } => StoreError::Invalid {
                message: e.to_string(),
            },
            Error::Query { .. }
            | Error::Config { .. }
            | Error::Migrate { .. }
            | Error::Decode { .. } => StoreError::Backend {
                backend: "postgres",
                source: Box::new(e),
            },
        }
    }
}

/// The PostgreSQL [`Store`](shipinator_core::store::Store). Cheap to clone: clones share one
/// connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The connection batch commits go through while it is free, detached from the pool (one
    /// connection beyond `max_connections`): a driver commits one batch at a time, and on one
    /// connection each statement is parsed and planned once ([`COMMIT_SESSION`]), where
    /// commits spread over the pool's connections are parsed and planned again on each. A
    /// commit that finds it busy (another driver of the process) takes a pool connection.
    commit_conn: Arc<tokio::sync::Mutex<Option<CommitConn>>>,
}

/// The commit connection and when it was last used.
struct CommitConn {
    conn: sqlx::PgConnection,
    used: std::time::Instant,
}

/// Set once on the commit connection, which runs only the batch statements
/// ([`script::apply`]): fixed texts that address every row by primary key.
///
/// - `plan_cache_mode = force_generic_plan`: a statement is planned once per connection
///   instead of five custom plans before the server settles on the generic one.
/// - No sequential scans, hash or merge joins: while the tables are small (a new
///   installation) the planner otherwise joins the batch's arrays to a whole-table scan, which
///   costs more than the primary-key lookups it picks anyway once the tables have grown.
///   pgbench, one step's batch on tables of about 500 rows: 0.66 ms per commit with the
///   scans, 0.59 ms without (docs/BENCHMARKS.md).
const COMMIT_SESSION: &str = "SET plan_cache_mode = force_generic_plan; \
                              SET enable_seqscan = off; \
                              SET enable_hashjoin = off; \
                              SET enable_mergejoin = off";

/// Pools smaller than this are kept to their size: commits take pool connections.
const MIN_POOL_TO_PIN: u32 = 3;

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects with default [`PgStoreOptions`] and applies the migrations.
    ///
    /// # Errors
    /// [`Error::Config`] for a malformed URL, [`Error::Unavailable`] when the database cannot be
    /// reached, [`Error::Migrate`] when the schema cannot be brought up to date.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, PgStoreOptions::default()).await
    }

    /// Connects with `options` (and applies the migrations unless `options.migrate` is false).
    ///
    /// # Errors
    /// As [`PgStore::connect`].
    pub async fn connect_with(url: &str, options: PgStoreOptions) -> Result<Self, Error> {
        let connect: PgConnectOptions = url.parse().map_err(|source| Error::Config { source })?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(options.min_connections.min(options.max_connections))
            .acquire_timeout(options.acquire_timeout)
            // Ping only connections that sat idle (a server restart may have closed them);
            // one that breaks in use is discarded when it is released.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect)
            .await
            .map_err(Error::from_sqlx)?;
        let store = Self::new(pool);
        if options.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// A store over an existing pool. Does not apply migrations: call [`PgStore::migrate`].
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            commit_conn: Arc::default(),
        }
    }

    /// Applies `batch` as one statement ([`script::apply`]): on the pinned commit connection
    /// when it is free (pinged first if it sat idle, replaced if it broke; set up with
    /// [`COMMIT_SESSION`] when opened), else on a pool connection.
    pub(crate) async fn apply_script(
        &self,
        batch: &shipinator_core::store::Batch,
    ) -> Result<bool, shipinator_core::store::StoreError> {
        let pin = self.pool.options().get_max_connections() >= MIN_POOL_TO_PIN;
        let Some(mut slot) = pin.then(|| self.commit_conn.try_lock().ok()).flatten() else {
            let mut conn = self.pool.acquire().await.map_err(store::db)?;
            return script::apply(&mut conn, batch).await;
        };
        let mut held = slot.take();
        if let Some(p) = held.as_mut()
            && p.used.elapsed() >= IDLE_PING_AFTER
            && sqlx::Connection::ping(&mut p.conn).await.is_err()
        {
            // Broken while idle (a server restart): dropped, another is opened.
            held = None;
        }
        let mut pinned = match held {
            Some(p) => p,
            None => {
                let mut conn = self.pool.acquire().await.map_err(store::db)?.detach();
                sqlx::raw_sql(COMMIT_SESSION)
                    .execute(&mut conn)
                    .await
                    .map_err(store::db)?;
                CommitConn {
                    conn,
                    used: std::time::Instant::now(),
                }
            }
        };
        let result = script::apply(&mut pinned.conn, batch).await;
        if result.is_ok() {
            // Applied, or refused by the server with the connection intact.
            pinned.used = std::time::Instant::now();
            *slot = Some(pinned);
        }
        // Otherwise the connection failed: dropped, the next commit opens another.
        result
    }

    /// Applies the embedded migrations that are not applied yet. Safe to call from several
    /// replicas at once (sqlx takes an advisory lock).
    ///
    /// # Errors
    /// [`Error::Migrate`].
    pub async fn migrate(&self) -> Result<(), Error> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| Error::Migrate { source })
    }

    /// The embedded migrations, for tools that inspect or apply them.
    pub fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the commit connection and the pool: waits for connections in use to be returned.
    pub async fn close(&self) {
        if let Some(pinned) = self.commit_conn.lock().await.take() {
            let _ = sqlx::Connection::close(pinned.conn).await;
        }
        self.pool.close().await;
    }

    /// Starts listening for wake-ups: a [`Wakeups`] that returns when a new run or an
    /// announced batch (see the crate docs) was committed, and at least every
    /// [`MAX_POLL_INTERVAL`] in any case, so that a driver never sleeps through work whose
    /// notification was lost or was never sent.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the listening connection cannot be opened.
    pub async fn wakeups(&self) -> Result<Wakeups, Error> {
        Wakeups::listen(&self.pool, MAX_POLL_INTERVAL).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_unavailable_and_transient() {
        let lost = || {
            [
                sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                sqlx::Error::PoolTimedOut,
                sqlx::Error::PoolClosed,
            ]
        };
        for e in lost() {
            let e = Error::from_sqlx(e);
            assert!(e.is_transient(), "{e:?}");
            let e = StoreError::from(e);
            assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
            assert!(e.is_transient());
        }
    }

    #[test]
    fn other_failures_are_backend_errors_with_their_source() {
        let e = StoreError::from(Error::from_sqlx(sqlx::Error::RowNotFound));
        assert!(
            matches!(
                e,
                StoreError::Backend {
                    backend: "postgres",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_transient());
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("PostgreSQL statement failed"));
        let e = StoreError::from(Error::OutOfRange {
            field: "version",
            value: u64::MAX.to_string(),
        });
        assert!(matches!(e, StoreError::Invalid { .. }), "{e:?}");
    }
}
