//! A whole [`Batch`] as one multi-statement query: one hop to the connection's thread instead
//! of one per statement.
//!
//! Every statement the batch needs runs in order, each compare-and-set or insert followed by
//! `SELECT changes()` and each fence by a `SELECT` of the run's epoch, so the rows that come
//! back say whether every precondition held. If one did not (a conflict, an idempotent
//! replay, a fence, a missing row, a constraint), the caller rolls the transaction back and
//! applies the batch statement by statement, which tells those cases apart exactly as before.

use shipinator_core::store::{Batch, Write};
use sqlx::sqlite::{SqliteArguments, SqliteConnection};
use sqlx::{Arguments, Encode, Row, Sqlite, Type};

use crate::error::Error;
use crate::rows::{artifact_columns, execution_columns, int, micros, micros_opt};
use crate::store::db;
use shipinator_core::store::StoreError;

/// Above this many bound values a batch is applied statement by statement (SQLite allows
/// 32,766 per query).
const MAX_VALUES: usize = 30_000;

/// What one result row must say for the batch to stand.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// The previous statement changed exactly one row.
    OneRow,
    /// The run's current lease epoch is this one.
    Epoch(u64),
}

/// The statements of a batch, their bound values and the checks on their result rows.
#[derive(Debug, Default)]
struct Script {
    sql: String,
    args: SqliteArguments,
    values: usize,
    checks: Vec<Check>,
}

impl Script {
    /// Appends `sql` (with `?` placeholders, bound in order across the whole script).
    fn statement(&mut self, sql: &str) {
        self.sql.push_str(sql);
        self.sql.push_str(";\n");
    }

    /// Appends `sql`, then the row telling whether it changed exactly one row.
    fn checked(&mut self, sql: &str) {
        self.statement(sql);
        self.statement("SELECT changes()");
        self.checks.push(Check::OneRow);
    }

    fn bind<'t, T: Encode<'t, Sqlite> + Type<Sqlite>>(
        &mut self,
        value: T,
    ) -> Result<(), StoreError> {
        self.values += 1;
        self.args
            .add(value)
            .map_err(|e| StoreError::from(Error::from(sqlx::Error::Encode(e))))
    }
}

/// Builds the script of `batch`; `None` when it is too large for one query.
fn script(batch: &Batch) -> Result<Option<Script>, StoreError> {
    let mut s = Script::default();
    for fence in &batch.fences {
        s.statement("SELECT (SELECT lease_epoch FROM pipeline_runs WHERE id = ?)");
        s.bind(fence.run_id.to_string())?;
        s.checks.push(Check::Epoch(fence.epoch));
    }
    let mut events = Vec::new();
    for write in &batch.writes {
        match write {
            Write::AppendEvent(event) => events.push(event),
            Write::UpdateRun {
                id,
                expected_version,
                status,
                phase,
                started_at,
                finished_at,
            } => {
                s.checked(
                    "UPDATE pipeline_runs SET status = ?, phase = ?, started_at = ?, \
                     finished_at = ?, version = version + 1 WHERE id = ? AND version = ?",
                );
                s.bind(status.as_str())?;
                s.bind(phase.as_str())?;
                s.bind(micros_opt(*started_at))?;
                s.bind(micros_opt(*finished_at))?;
                s.bind(id.to_string())?;
                s.bind(int(*expected_version))?;
            }
            Write::UpdateJob {
                id,
                expected_version,
                status,
                started_at,
                finished_at,
            } => {
                s.checked(
                    "UPDATE jobs SET status = ?, started_at = ?, finished_at = ?, \
                     version = version + 1 WHERE id = ? AND version = ?",
                );
                s.bind(status.as_str())?;
                s.bind(micros_opt(*started_at))?;
                s.bind(micros_opt(*finished_at))?;
                s.bind(id.to_string())?;
                s.bind(int(*expected_version))?;
            }
            Write::UpdateStep {
                id,
                expected_version,
                status,
                attempt,
                started_at,
                finished_at,
            } => {
                s.checked(
                    "UPDATE job_steps SET status = ?, attempt = ?, started_at = ?, \
                     finished_at = ?, version = version + 1 WHERE id = ? AND version = ?",
                );
                s.bind(status.as_str())?;
                s.bind(i64::from(*attempt))?;
                s.bind(micros_opt(*started_at))?;
                s.bind(micros_opt(*finished_at))?;
                s.bind(id.to_string())?;
                s.bind(int(*expected_version))?;
            }
            Write::UpdateExecution {
                id,
                expected_version,
                status,
                external_id,
                exit_code,
                failure,
                completed_at,
            } => {
                s.checked(
                    "UPDATE executions SET status = ?, external_id = ?, exit_code = ?, \
                     failure = ?, completed_at = ?, version = version + 1 \
                     WHERE id = ? AND version = ?",
                );
                s.bind(status.as_str())?;
                s.bind(external_id.as_str())?;
                s.bind(exit_code.map(i64::from))?;
                s.bind(failure.as_deref())?;
                s.bind(micros_opt(*completed_at))?;
                s.bind(id.to_string())?;
                s.bind(int(*expected_version))?;
            }
            Write::InsertExecution(e) => {
                s.checked(concat!(
                    "INSERT INTO executions (",
                    execution_columns!(),
                    ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
                ));
                s.bind(e.id.to_string())?;
                s.bind(e.job_step_id.to_string())?;
                s.bind(i64::from(e.attempt))?;
                s.bind(e.executor_type.as_str())?;
                s.bind(e.external_id.as_str())?;
                s.bind(e.status.as_str())?;
                s.bind(e.exit_code.map(i64::from))?;
                s.bind(e.failure.as_deref())?;
                s.bind(int(e.version))?;
                s.bind(micros(e.submitted_at))?;
                s.bind(micros_opt(e.completed_at))?;
            }
            Write::InsertArtifact(a) => {
                let metadata = serde_json::to_string(&a.metadata)
                    .map_err(|e| StoreError::from(Error::encode("artifact metadata", e)))?;
                s.checked(concat!(
                    "INSERT INTO artifacts (",
                    artifact_columns!(),
                    ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
                ));
                s.bind(a.id.to_string())?;
                s.bind(a.job_id.to_string())?;
                s.bind(a.step_id.map(|s| s.to_string()))?;
                s.bind(a.run_id.to_string())?;
                s.bind(a.artifact_type.as_str())?;
                s.bind(a.name.as_deref())?;
                s.bind(a.path.as_deref())?;
                s.bind(a.storage_backend.as_str())?;
                s.bind(a.storage_path.as_str())?;
                s.bind(a.checksum.as_deref())?;
                s.bind(int(a.size))?;
                s.bind(metadata)?;
                s.bind(micros(a.created_at))?;
            }
        }
        if s.values > MAX_VALUES {
            return Ok(None);
        }
    }
    // Every row write changes its row when the checks pass, so the events are appended, as
    // the statement-by-statement path does.
    for event in events {
        let payload = serde_json::to_string(&event.kind)
            .map_err(|e| StoreError::from(Error::encode("event", e)))?;
        s.statement("INSERT INTO run_events (run_id, at, kind) VALUES (?, ?, ?)");
        s.bind(event.run_id.to_string())?;
        s.bind(micros(event.at))?;
        s.bind(payload)?;
    }
    if s.values > MAX_VALUES {
        return Ok(None);
    }
    Ok(Some(s))
}

/// Runs the whole of `batch` inside the caller's transaction in one query. `Ok(true)`: applied,
/// every precondition held; the caller commits. `Ok(false)`: some precondition failed or a
/// statement was refused; the caller must roll back (writes may have been made) and apply the
/// batch statement by statement.
///
/// # Errors
/// The connection failed for a reason other than the database refusing a statement.
pub(crate) async fn apply(conn: &mut SqliteConnection, batch: &Batch) -> Result<bool, StoreError> {
    let Some(script) = script(batch)? else {
        return Ok(false);
    };
    let rows = match sqlx::query_with(sqlx::AssertSqlSafe(script.sql), script.args)
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) => {
            tracing::debug!(error = %e, "a batch statement was refused; applying it statement by statement");
            return Ok(false);
        }
        Err(e) => return Err(db(e)),
    };
    if rows.len() != script.checks.len() {
        return Ok(false);
    }
    for (row, check) in rows.iter().zip(&script.checks) {
        let value: Option<i64> = row.try_get(0).map_err(db)?;
        let holds = match check {
            Check::OneRow => value == Some(1),
            Check::Epoch(epoch) => value.and_then(|v| u64::try_from(v).ok()) == Some(*epoch),
        };
        if !holds {
            tracing::debug!(
                ?check,
                found = ?value,
                "a precondition of the batch failed; applying it statement by statement"
            );
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use shipinator_core::conformance::store::step_start_batch;
    use shipinator_core::domain::{RunStatus, Status};
    use shipinator_core::store::Store;

    use super::*;
    use crate::SqliteStore;
    use crate::store::begin_write;

    async fn try_script(store: &SqliteStore, batch: &Batch) -> bool {
        let mut tx = begin_write(&store.writer).await.unwrap();
        let applied = apply(&mut tx, batch).await.unwrap();
        if applied {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        applied
    }

    #[tokio::test]
    async fn a_batch_whose_preconditions_hold_is_applied_by_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db"))
            .await
            .unwrap();
        let batch = step_start_batch(&store).await;
        assert!(try_script(&store, &batch).await, "a fresh batch applies");
        let Write::UpdateRun { id: run, .. } = batch.writes[0] else {
            panic!("the first write updates the run");
        };
        let record = store.load_run(run).await.unwrap();
        assert_eq!(record.run.status, RunStatus::Running);
        assert_eq!(record.run.version, 1);
        assert_eq!(record.executions.len(), 1);
        assert_eq!(record.artifacts.len(), 1);
        assert_eq!(
            record
                .steps
                .iter()
                .filter(|s| s.status == Status::Running)
                .count(),
            1
        );
        let events = store.list_events(0, 1000).await.unwrap();
        assert_eq!(events.iter().filter(|e| e.event.run_id == run).count(), 1);

        // The same batch again: every compare-and-set fails, so the script reports it and
        // the statement-by-statement path decides (an identical replay, a no-op).
        assert!(!try_script(&store, &batch).await);
        store.commit(&batch).await.unwrap();
        let again = store.list_events(0, 1000).await.unwrap();
        assert_eq!(again.len(), events.len(), "a replay appends no event");
        assert_eq!(store.load_run(run).await.unwrap().run.version, 1);
    }

    #[tokio::test]
    async fn a_stale_fence_or_version_is_reported_by_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db"))
            .await
            .unwrap();
        let batch = step_start_batch(&store).await;

        let mut fenced = batch.clone();
        fenced.fences[0].epoch += 1;
        assert!(!try_script(&store, &fenced).await, "a stale epoch fails");
        let err = store.commit(&fenced).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");

        let mut stale = batch.clone();
        if let Write::UpdateStep {
            expected_version, ..
        } = &mut stale.writes[2]
        {
            *expected_version = 5;
        }
        assert!(!try_script(&store, &stale).await, "a stale version fails");
        let err = store.commit(&stale).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { what: "step", .. }),
            "{err:?}"
        );
        // Nothing of either attempt was kept.
        let Write::UpdateRun { id: run, .. } = batch.writes[0] else {
            panic!("the first write updates the run");
        };
        let record = store.load_run(run).await.unwrap();
        assert_eq!(record.run.version, 0);
        assert!(record.executions.is_empty());
        assert!(store.list_events(0, 1000).await.unwrap().is_empty());
        store.commit(&batch).await.unwrap();
        assert_eq!(store.load_run(run).await.unwrap().run.version, 1);
    }
}
