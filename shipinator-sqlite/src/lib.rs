//! The SQLite [`Store`](shipinator_core::store::Store) for Shipinator: the embedded default that
//! lets `shipinator run` and `shipinator serve` work with no set-up.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shipinator_sqlite::Error> {
//! use shipinator_core::store::Store;
//! use shipinator_sqlite::SqliteStore;
//!
//! let store = SqliteStore::open("var/shipinator.db").await?;
//! assert_eq!(store.backend(), "sqlite");
//! # Ok(()) }
//! ```
//!
//! # Schema
//! Plain-SQL migrations in `migrations/`, embedded in the binary and applied by
//! [`SqliteStore::open`]. The tables and columns are those of the PostgreSQL schema, in
//! SQLite's dialect: UUIDs as canonical hyphenated TEXT (which sorts like the bytes, so UUID v7
//! ids sort by time), timestamps as INTEGER microseconds since the Unix epoch, JSON as TEXT.
//!
//! # Durability
//! The database runs in WAL mode with `synchronous=FULL` by default: a `commit` that returned
//! `Ok` survives a crash of the process or a power loss. [`Synchronous::Normal`] is an explicit
//! opt-in: with WAL and `NORMAL`, a power loss or OS crash (not a process crash) can lose the
//! transactions committed since the last WAL sync at a checkpoint; the database is never
//! corrupted.
//!
//! # Concurrency
//! One writer: every write goes through a single connection, one `BEGIN IMMEDIATE` transaction
//! per call. Reads use a small pool of read-only connections and never wait for the writer.
//! Several processes may share one file; they wait for each other up to the busy timeout, after
//! which the call fails with `StoreError::Unavailable`.
//!
//! # Clock
//! SQLite has no server, so the store's clock ([`Store::now`](shipinator_core::store::Store::now))
//! is this process's wall clock. Processes sharing one file run on one machine and so share that
//! clock. Tests can inject a clock with [`SqliteStoreOptions::clock`].

mod access;
pub mod bench;
mod cancel;
mod error;
mod rows;
mod store;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use shipinator_core::memory::{Clock, system_clock};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use error::Error;
use error::Kind;

pub(crate) const BACKEND: &str = "sqlite";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How hard SQLite syncs commits to disk (`PRAGMA synchronous`, with WAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Every commit is synced to disk before it returns: nothing committed is ever lost.
    #[default]
    Full,
    /// Commits are synced only at WAL checkpoints: faster, but a power loss or OS crash can
    /// lose the transactions committed since the last checkpoint. A crash of the process alone
    /// loses nothing, and the database is never corrupted.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> SqliteSynchronous {
        match self {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        }
    }
}

/// How to open a [`SqliteStore`].
#[derive(Clone)]
pub struct SqliteStoreOptions {
    /// Durability of commits. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// How long a call waits for another process's write lock before failing with
    /// `Unavailable`. Default 5 s.
    pub busy_timeout: Duration,
    /// Read connections. Default 4.
    pub read_connections: u32,
    /// The store's clock for leases and claims. Default: the process's wall clock.
    pub clock: Clock,
}

impl SqliteStoreOptions {
    /// The defaults: `synchronous=FULL`, 5 s busy timeout, 4 readers, the wall clock.
    pub fn new() -> Self {
        Self {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
            clock: system_clock(),
        }
    }

    /// Sets [`synchronous`](Self::synchronous).
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets [`busy_timeout`](Self::busy_timeout).
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets [`read_connections`](Self::read_connections) (at least 1).
    #[must_use]
    pub fn read_connections(mut self, n: u32) -> Self {
        self.read_connections = n.max(1);
        self
    }

    /// Sets [`clock`](Self::clock), e.g. a `ManualClock` in tests.
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }
}

impl Default for SqliteStoreOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SqliteStoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStoreOptions")
            .field("synchronous", &self.synchronous)
            .field("busy_timeout", &self.busy_timeout)
            .field("read_connections", &self.read_connections)
            .field("clock", &(self.clock)())
            .finish()
    }
}

/// The settings of a store's write connection (see [`SqliteStore::settings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// `wal` for a file, `memory` for an in-memory database.
    pub journal_mode: String,
    /// `full`, `normal`, `off` or `extra`.
    pub synchronous: &'static str,
    /// Whether foreign keys are enforced.
    pub foreign_keys: bool,
    /// How long a write waits for another connection's lock.
    pub busy_timeout: Duration,
}

/// A [`Store`](shipinator_core::store::Store) in one SQLite file.
///
/// Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct SqliteStore {
    /// The one write connection.
    writer: SqlitePool,
    /// Read connections (the writer itself for an in-memory database).
    reader: SqlitePool,
    clock: Clock,
    path: Option<PathBuf>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed, with its parent directory) the database at `path` with the
    /// default options, and applies the migrations.
    ///
    /// # Errors
    /// When the directory or file cannot be created or opened, or a migration fails.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with(path, SqliteStoreOptions::default()).await
    }

    /// Opens the database at `path` with `options`; see [`open`](Self::open).
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteStoreOptions,
    ) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| Kind::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let base = SqliteConnectOptions::new()
            .filename(&path)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let open_err = |source| {
            Error::from(Kind::Open {
                path: path.clone(),
                source,
            })
        };
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(3600))
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(options.synchronous.pragma()),
            )
            .await
            .map_err(open_err)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|source| Kind::Migrate { source })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .min_connections(0)
            .test_before_acquire(false)
            .connect_with(base.pragma("query_only", "ON"))
            .await
            .map_err(open_err)?;
        Ok(Self {
            writer,
            reader,
            clock: options.clock,
            path: Some(path),
        })
    }

    /// A private in-memory database (one connection), for tests. Nothing is written to disk.
    ///
    /// # Errors
    /// When a migration fails.
    pub async fn open_in_memory() -> Result<Self, Error> {
        Self::open_in_memory_with(SqliteStoreOptions::default()).await
    }

    /// An in-memory database with `options` (only `clock` and `busy_timeout` apply).
    ///
    /// # Errors
    /// When a migration fails.
    pub async fn open_in_memory_with(options: SqliteStoreOptions) -> Result<Self, Error> {
        let connect = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|source| Kind::Open {
                path: PathBuf::from(":memory:"),
                source,
            })?
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(3600))
            .connect_with(connect)
            .await
            .map_err(|source| Kind::Open {
                path: PathBuf::from(":memory:"),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| Kind::Migrate { source })?;
        Ok(Self {
            writer: pool.clone(),
            reader: pool,
            clock: options.clock,
            path: None,
        })
    }

    /// The settings in force on the write connection, as SQLite reports them.
    ///
    /// # Errors
    /// When the database cannot be queried.
    pub async fn settings(&self) -> Result<Settings, Error> {
        let mut conn = self.writer.acquire().await?;
        let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await?;
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await?;
        let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await?;
        let busy_timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Settings {
            journal_mode: journal_mode.to_ascii_lowercase(),
            synchronous: match synchronous {
                0 => "off",
                1 => "normal",
                2 => "full",
                3 => "extra",
                _ => "unknown",
            },
            foreign_keys: foreign_keys == 1,
            busy_timeout: Duration::from_millis(u64::try_from(busy_timeout).unwrap_or(0)),
        })
    }

    /// The database file, `None` for an in-memory database.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Closes every connection, checkpointing the WAL. Calls made afterwards fail with
    /// `Unavailable`.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}
