//! API tokens and run idempotency records (migration 0002).

use shipinator_core::domain::{ApiTokenId, PipelineId, ProjectId, RunId};
use shipinator_core::store::{ApiToken, IdempotencyRecord, ProjectScope, StoreError};
use shipinator_core::time::Timestamp;
use sqlx::sqlite::SqliteRow;

use crate::SqliteStore;
use crate::error::Error;
use crate::rows::{get, micros, micros_opt, parse, time, time_opt};
use crate::store::{begin_write, db, db_row};

const TOKEN_COLUMNS: &str =
    "id, name, role, project_ids, secret_sha256, created_at, last_used_at, revoked_at";
const IDEMPOTENCY_COLUMNS: &str = "pipeline_id, key, fingerprint, run_id, created_at";

fn token(row: &SqliteRow) -> Result<ApiToken, Error> {
    let ids: Option<String> = get(row, "project_ids")?;
    let ids = ids
        .map(|text| {
            serde_json::from_str::<Vec<ProjectId>>(&text)
                .map_err(|e| Error::decode("project_ids", e))
        })
        .transpose()?;
    Ok(ApiToken {
        id: parse(row, "id")?,
        name: get(row, "name")?,
        role: parse(row, "role")?,
        scope: ProjectScope::from_list(ids),
        secret_sha256: get(row, "secret_sha256")?,
        created_at: time(row, "created_at")?,
        last_used_at: time_opt(row, "last_used_at")?,
        revoked_at: time_opt(row, "revoked_at")?,
    })
}

fn idempotency(row: &SqliteRow) -> Result<IdempotencyRecord, Error> {
    Ok(IdempotencyRecord {
        pipeline_id: parse(row, "pipeline_id")?,
        key: get(row, "key")?,
        fingerprint: get(row, "fingerprint")?,
        run_id: parse(row, "run_id")?,
        created_at: time(row, "created_at")?,
    })
}

impl SqliteStore {
    pub(crate) async fn create_api_token_impl(&self, t: &ApiToken) -> Result<(), StoreError> {
        let ids = t
            .scope
            .as_list()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::from(Error::encode("project_ids", e)))?;
        let sql = format!(
            "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(t.id.to_string())
            .bind(t.name.as_str())
            .bind(t.role.as_str())
            .bind(ids)
            .bind(t.secret_sha256.as_str())
            .bind(micros(t.created_at))
            .bind(micros_opt(t.last_used_at))
            .bind(micros_opt(t.revoked_at))
            .execute(&self.writer)
            .await
            .map_err(db_row(ApiTokenId::WHAT, t.id))?;
        Ok(())
    }

    pub(crate) async fn list_api_tokens_impl(&self) -> Result<Vec<ApiToken>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY id DESC");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| token(r).map_err(StoreError::from))
            .collect()
    }

    pub(crate) async fn find_api_token_impl(&self, hash: &str) -> Result<ApiToken, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_sha256 = ?1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(hash)
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, "with this secret"))?;
        token(&row).map_err(StoreError::from)
    }

    pub(crate) async fn revoke_api_token_impl(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<ApiToken, StoreError> {
        let mut tx = begin_write(&self.writer).await?;
        sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1")
            .bind(id.to_string())
            .bind(micros(at))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = ?1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, id))?;
        let token = token(&row)?;
        tx.commit().await.map_err(db)?;
        Ok(token)
    }

    pub(crate) async fn touch_api_token_impl(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1")
            .bind(id.to_string())
            .bind(micros(at))
            .execute(&self.writer)
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
        let mut tx = begin_write(&self.writer).await?;
        sqlx::query(
            "INSERT INTO run_idempotency_keys (pipeline_id, key, fingerprint, run_id, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (pipeline_id, key) DO NOTHING",
        )
        .bind(r.pipeline_id.to_string())
        .bind(r.key.as_str())
        .bind(r.fingerprint.as_str())
        .bind(r.run_id.to_string())
        .bind(micros(r.created_at))
        .execute(&mut *tx)
        .await
        .map_err(db_row(RunId::WHAT, r.run_id))?;
        let stored = fetch_idempotency(&mut tx, r.pipeline_id, &r.key)
            .await?
            .ok_or_else(|| StoreError::not_found(PipelineId::WHAT, r.pipeline_id))?;
        tx.commit().await.map_err(db)?;
        Ok(stored)
    }

    pub(crate) async fn get_idempotency_record_impl(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        fetch_idempotency(&mut conn, pipeline, key).await
    }
}

async fn fetch_idempotency(
    conn: &mut sqlx::SqliteConnection,
    pipeline: PipelineId,
    key: &str,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let sql = format!(
        "SELECT {IDEMPOTENCY_COLUMNS} FROM run_idempotency_keys WHERE pipeline_id = ?1 AND key = ?2"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(pipeline.to_string())
        .bind(key)
        .fetch_optional(conn)
        .await
        .map_err(db)?;
    row.as_ref()
        .map(idempotency)
        .transpose()
        .map_err(StoreError::from)
}
