//! The adapter's detailed error and its mapping onto [`StoreError`].

use std::path::PathBuf;

use shipinator_core::store::StoreError;

/// An error of the SQLite store: opening the database, applying migrations, or a query.
///
/// Callers of [`Store`](shipinator_core::store::Store) methods see it as a [`StoreError`]; only
/// [`SqliteStore::open`](crate::SqliteStore::open) returns it directly.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(#[from] pub(crate) Kind);

#[derive(Debug, thiserror::Error)]
pub(crate) enum Kind {
    #[error("cannot create the database directory {path}: check its parent's permissions")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the SQLite database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply the database migrations")]
    Migrate {
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("SQLite query failed")]
    Query {
        #[source]
        source: sqlx::Error,
    },
    #[error("stored {column} is invalid: {message}")]
    Decode {
        column: &'static str,
        message: String,
    },
    #[error("cannot encode {what} as JSON")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl From<sqlx::Error> for Error {
    fn from(source: sqlx::Error) -> Self {
        Error(Kind::Query { source })
    }
}

impl Error {
    pub(crate) fn decode(column: &'static str, message: impl ToString) -> Self {
        Error(Kind::Decode {
            column,
            message: message.to_string(),
        })
    }

    pub(crate) fn encode(what: &'static str, source: serde_json::Error) -> Self {
        Error(Kind::Encode { what, source })
    }

    /// The SQLite primary result code of a database error, if this is one.
    fn sqlite_code(&self) -> Option<i64> {
        let source = match &self.0 {
            Kind::Query { source } | Kind::Open { source, .. } => source,
            Kind::CreateDir { .. }
            | Kind::Migrate { .. }
            | Kind::Decode { .. }
            | Kind::Encode { .. } => return None,
        };
        let db = source.as_database_error()?;
        let code: i64 = db.code()?.parse().ok()?;
        // Extended result codes keep the primary code in the low byte.
        Some(code & 0xff)
    }

    fn is_transient(&self) -> bool {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
        const TRANSIENT: [i64; 5] = [5, 6, 10, 13, 14];
        if let Some(code) = self.sqlite_code() {
            return TRANSIENT.contains(&code);
        }
        match &self.0 {
            Kind::Query { source } | Kind::Open { source, .. } => matches!(
                source,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            Kind::CreateDir { .. } => true,
            Kind::Migrate { .. } | Kind::Decode { .. } | Kind::Encode { .. } => false,
        }
    }

    /// Maps this error to a [`StoreError`], naming the row (`what`, `id`) the call was about
    /// for constraint violations.
    pub(crate) fn into_store(self, what: &'static str, id: impl ToString) -> StoreError {
        if let Kind::Query { source } = &self.0
            && let Some(db) = source.as_database_error()
        {
            match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    return StoreError::AlreadyExists {
                        what,
                        id: id.to_string(),
                    };
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    return StoreError::Invalid {
                        message: format!(
                            "{what} {} refers to a row that does not exist",
                            id.to_string()
                        ),
                    };
                }
                sqlx::error::ErrorKind::CheckViolation
                | sqlx::error::ErrorKind::NotNullViolation => {
                    return StoreError::Invalid {
                        message: format!(
                            "{what} {} has a value out of range: {}",
                            id.to_string(),
                            db.message()
                        ),
                    };
                }
                _ => {}
            }
        }
        self.into()
    }
}

impl From<Error> for StoreError {
    fn from(err: Error) -> Self {
        if err.is_transient() {
            StoreError::Unavailable {
                source: Box::new(err),
            }
        } else {
            StoreError::Backend {
                backend: crate::BACKEND,
                source: Box::new(err),
            }
        }
    }
}
