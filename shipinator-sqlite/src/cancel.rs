//! Cancel requests (migration 0003): what a driver that owns a run reads to learn that
//! another process was asked to cancel it.

use shipinator_core::domain::RunId;
use shipinator_core::store::StoreError;
use shipinator_core::time::Timestamp;

use crate::SqliteStore;
use crate::rows::{micros, parse};
use crate::store::db;

impl SqliteStore {
    pub(crate) async fn request_cancel_impl(
        &self,
        run: RunId,
        by: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO run_cancel_requests (run_id, requested_by, requested_at) \
             SELECT id, ?2, ?3 FROM pipeline_runs WHERE id = ?1 \
             ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(run.to_string())
        .bind(by)
        .bind(micros(at))
        .execute(&self.writer)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            // Either already requested, or no such run.
            let known: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM pipeline_runs WHERE id = ?1")
                    .bind(run.to_string())
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db)?;
            if known.is_none() {
                return Err(StoreError::not_found(RunId::WHAT, run));
            }
        }
        Ok(())
    }

    pub(crate) async fn cancel_requests_impl(
        &self,
        runs: &[RunId],
    ) -> Result<Vec<RunId>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(&runs.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|e| StoreError::invalid(format!("encoding run ids: {e}")))?;
        let rows = sqlx::query(
            "SELECT run_id FROM run_cancel_requests \
             WHERE run_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| parse(row, "run_id").map_err(StoreError::from))
            .collect()
    }
}
