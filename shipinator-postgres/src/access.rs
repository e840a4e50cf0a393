//! API tokens and run idempotency records (migration 0003).

use shipinator_core::domain::{ApiTokenId, PipelineId, ProjectId, RunId};
use shipinator_core::store::{ApiToken, IdempotencyRecord, ProjectScope, StoreError};
use shipinator_core::time::Timestamp;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::PgStore;
use crate::rows::{self, col, enum_col, id_of, opt_ts, opt_ts_col, ts, ts_col};
use crate::store::{db, from_rows, insert_err};

const TOKEN_COLUMNS: &str =
    "id, name, role, project_ids, secret_sha256, created_at, last_used_at, revoked_at";

fn token(row: &PgRow) -> rows::Result<ApiToken> {
    let ids: Option<Vec<Uuid>> = col(row, "project_ids")?;
    Ok(ApiToken {
        id: id_of(row, "id")?,
        name: col(row, "name")?,
        role: enum_col(row, "role")?,
        scope: ProjectScope::from_list(
            ids.map(|ids| ids.into_iter().map(ProjectId::from).collect()),
        ),
        secret_sha256: col(row, "secret_sha256")?,
        created_at: ts_col(row, "created_at")?,
        last_used_at: opt_ts_col(row, "last_used_at")?,
        revoked_at: opt_ts_col(row, "revoked_at")?,
    })
}

fn idempotency(row: &PgRow) -> rows::Result<IdempotencyRecord> {
    Ok(IdempotencyRecord {
        pipeline_id: id_of(row, "pipeline_id")?,
        key: col(row, "key")?,
        fingerprint: col(row, "fingerprint")?,
        run_id: id_of(row, "run_id")?,
        created_at: ts_col(row, "created_at")?,
    })
}

impl PgStore {
    pub(crate) async fn create_api_token_impl(&self, t: &ApiToken) -> Result<(), StoreError> {
        let ids: Option<Vec<Uuid>> = t
            .scope
            .as_list()
            .map(|ids| ids.iter().map(|p| p.0).collect());
        let sql = format!(
            "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(t.id.0)
            .bind(t.name.as_str())
            .bind(t.role.as_str())
            .bind(ids)
            .bind(t.secret_sha256.as_str())
            .bind(ts(t.created_at))
            .bind(opt_ts(t.last_used_at))
            .bind(opt_ts(t.revoked_at))
            .execute(&self.pool)
            .await
            .map_err(|e| insert_err(e, ApiTokenId::WHAT, t.id))?;
        Ok(())
    }

    pub(crate) async fn list_api_tokens_impl(&self) -> Result<Vec<ApiToken>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY id DESC");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(|r| token(r).map_err(from_rows)).collect()
    }

    pub(crate) async fn find_api_token_impl(&self, hash: &str) -> Result<ApiToken, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_sha256 = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, "with this secret"))?;
        token(&row).map_err(from_rows)
    }

    pub(crate) async fn revoke_api_token_impl(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<ApiToken, StoreError> {
        let sql = format!(
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 \
             RETURNING {TOKEN_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(ts(at))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, id))?;
        token(&row).map_err(from_rows)
    }

    pub(crate) async fn touch_api_token_impl(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1")
            .bind(id.0)
            .bind(ts(at))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found(ApiTokenId::WHAT, id));
        }
        Ok(())
    }

    pub(crate) async fn put_idempotency_record_impl(
        &self,
        r: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        // Insert-or-read in one statement: the CTE sees the row inserted, or the row that made
        // the insert a no-op (which a concurrent inserter may have committed after our
        // snapshot, hence the retry on an empty answer).
        for _ in 0..3 {
            let row = sqlx::query(
                "WITH ins AS (INSERT INTO run_idempotency_keys \
                 (pipeline_id, key, fingerprint, run_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (pipeline_id, key) DO NOTHING \
                 RETURNING pipeline_id, key, fingerprint, run_id, created_at) \
                 SELECT * FROM ins UNION ALL \
                 SELECT pipeline_id, key, fingerprint, run_id, created_at \
                 FROM run_idempotency_keys WHERE pipeline_id = $1 AND key = $2",
            )
            .bind(r.pipeline_id.0)
            .bind(r.key.as_str())
            .bind(r.fingerprint.as_str())
            .bind(r.run_id.0)
            .bind(ts(r.created_at))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| insert_err(e, RunId::WHAT, r.run_id))?;
            if let Some(row) = row {
                return idempotency(&row).map_err(from_rows);
            }
        }
        Err(StoreError::invalid(format!(
            "idempotency key of pipeline {} could neither be recorded nor read",
            r.pipeline_id
        )))
    }

    pub(crate) async fn get_idempotency_record_impl(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT pipeline_id, key, fingerprint, run_id, created_at \
             FROM run_idempotency_keys WHERE pipeline_id = $1 AND key = $2",
        )
        .bind(pipeline.0)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(idempotency).transpose().map_err(from_rows)
    }
}
