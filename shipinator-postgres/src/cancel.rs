//! Cancel requests (migration 0004): what the replica that owns a run reads to learn that
//! another replica was asked to cancel it.

use shipinator_core::domain::RunId;
use shipinator_core::store::StoreError;
use shipinator_core::time::Timestamp;
use uuid::Uuid;

use crate::rows::{id_of, ts};
use crate::store::{db, from_rows};
use crate::{PgStore, WAKEUP_CHANNEL};

impl PgStore {
    pub(crate) async fn request_cancel_impl(
        &self,
        run: RunId,
        by: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        // One statement: the insert, the existence check and the wake-up (sent at commit,
        // only when a request was recorded).
        let row: (bool, bool) = sqlx::query_as(
            "WITH known AS (SELECT id FROM pipeline_runs WHERE id = $1), \
                  added AS (INSERT INTO run_cancel_requests (run_id, requested_by, requested_at) \
                            SELECT id, $2, $3 FROM known ON CONFLICT (run_id) DO NOTHING \
                            RETURNING run_id) \
             SELECT EXISTS (SELECT 1 FROM known), \
                    EXISTS (SELECT pg_notify($4, '') FROM added)",
        )
        .bind(run.0)
        .bind(by)
        .bind(ts(at))
        .bind(WAKEUP_CHANNEL)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        if !row.0 {
            return Err(StoreError::not_found(RunId::WHAT, run));
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
        let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
        let rows = sqlx::query("SELECT run_id FROM run_cancel_requests WHERE run_id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| id_of(row, "run_id").map_err(from_rows))
            .collect()
    }
}
