//! `impl Store for PgStore`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use shipinator_core::domain::{
    ApiTokenId, Artifact, ArtifactId, Execution, ExecutionId, Job, JobId, JobStep, Pipeline,
    PipelineId, PipelineRun, Project, ProjectId, Repository, RepositoryId, RunId, StepId,
};
use shipinator_core::store::{
    ApiToken, Batch, ExecutionClaim, IdempotencyRecord, NewRun, Page, PageRequest, RunEvent,
    RunFilter, RunLease, RunRecord, Store, StoreError, StoredEvent, Write,
};
use shipinator_core::time::Timestamp;
use sqlx::PgConnection;
use sqlx::error::ErrorKind;
use sqlx::postgres::{PgDatabaseError, PgRow};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::rows::{
    self, ARTIFACT_COLUMNS, EXECUTION_COLUMNS, PROJECT_COLUMNS, RUN_COLUMNS,
    RUN_COLUMNS_WITHOUT_SPEC, i32_of, i64_of, metadata_json, opt_ts, ts,
};
use crate::{Error, PgStore, WAKEUP_CHANNEL};

/// Serialises the numbering of committed events (see `number_events`).
const EVENT_LOCK_KEY: i64 = 0x5348_4950_4556_5401;

/// Job order by stage, as `JobType::ORDER`.
const STAGE_ORDER: &str = "array_position(ARRAY['build','test','deploy']::TEXT[], j.job_type)";

pub(crate) fn db(e: sqlx::Error) -> StoreError {
    Error::from_sqlx(e).into()
}

pub(crate) fn from_rows(e: Error) -> StoreError {
    e.into()
}

/// The id in a unique violation's detail: `Key (id)=(…) already exists.`
fn violated_key(e: &dyn sqlx::error::DatabaseError) -> Option<String> {
    let detail = e.try_downcast_ref::<PgDatabaseError>()?.detail()?;
    let start = detail.find(")=(")? + 3;
    let end = detail[start..].find(')')? + start;
    Some(detail[start..end].to_owned())
}

/// Maps an insert's failure: unique → `AlreadyExists`, foreign key or check → `Invalid`.
pub(crate) fn insert_err(e: sqlx::Error, what: &'static str, id: impl fmt::Display) -> StoreError {
    if let sqlx::Error::Database(d) = &e {
        match d.kind() {
            ErrorKind::UniqueViolation => {
                let (what, key) = match d.constraint() {
                    Some("projects_name_key") => ("project", violated_key(d.as_ref())),
                    Some("jobs_pkey") => ("job", violated_key(d.as_ref())),
                    Some("job_steps_pkey") => ("step", violated_key(d.as_ref())),
                    _ => (what, None),
                };
                return StoreError::AlreadyExists {
                    what,
                    id: key.unwrap_or_else(|| id.to_string()),
                };
            }
            ErrorKind::ForeignKeyViolation => {
                return StoreError::invalid(format!(
                    "{what} {id} references a missing row ({})",
                    d.constraint().unwrap_or("foreign key")
                ));
            }
            ErrorKind::CheckViolation | ErrorKind::NotNullViolation => {
                return StoreError::invalid(format!(
                    "{what} {id} has an invalid value ({})",
                    d.constraint().unwrap_or("constraint")
                ));
            }
            _ => {}
        }
    }
    db(e)
}

fn parse_cursor(page: &PageRequest) -> Result<Option<Uuid>, StoreError> {
    page.cursor
        .as_deref()
        .map(|c| {
            Uuid::parse_str(c).map_err(|_| StoreError::invalid(format!("invalid cursor '{c}'")))
        })
        .transpose()
}

/// LIMIT for a page: one more than asked, to know whether there is a next page.
fn page_limit(page: &PageRequest) -> i64 {
    i64::from(page.clamped_limit()) + 1
}

fn finish_page<T>(mut items: Vec<T>, page: &PageRequest, id: impl Fn(&T) -> Uuid) -> Page<T> {
    let limit = page.clamped_limit() as usize;
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = if more {
        items.last().map(|t| id(t).to_string())
    } else {
        None
    };
    Page { items, next_cursor }
}

fn decode_all<T>(rows: &[PgRow], f: fn(&PgRow) -> rows::Result<T>) -> Result<Vec<T>, StoreError> {
    rows.iter().map(|r| f(r).map_err(from_rows)).collect()
}

fn micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

async fn exists(conn: &mut PgConnection, sql: &'static str, id: Uuid) -> Result<bool, StoreError> {
    sqlx::query_scalar::<_, bool>(sql)
        .bind(id)
        .fetch_one(conn)
        .await
        .map_err(db)
}

/// Whether a batch is announced on the wake-up channel. `NOTIFY` serialises the commits of
/// every notifying transaction (PostgreSQL holds a global lock while queueing the
/// notification at commit), so a driver's own fenced transitions, which wake no one else, are
/// not announced. Announced: batches without a fence (input from outside a driver: a cancel,
/// a worker's report) and batches that queue executions for pull workers.
pub(crate) fn announce(batch: &Batch) -> bool {
    batch.fences.is_empty()
        || batch
            .writes
            .iter()
            .any(|w| matches!(w, Write::InsertExecution(_)))
}

impl PgStore {
    /// Numbers committed, unnumbered events in insertion order, after the highest `seq`.
    /// Under a transaction-scoped advisory lock, so numberers take turns and an event that
    /// commits after a numbering gets a higher number than any event numbered before it.
    async fn number_events(&self) -> Result<(), StoreError> {
        let pending: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM run_events WHERE seq IS NULL)")
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
        if !pending {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(EVENT_LOCK_KEY)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        // A new statement, so its snapshot includes everything committed before the lock.
        sqlx::query(
            "UPDATE run_events r SET seq = n.seq \
             FROM (SELECT id, (SELECT COALESCE(MAX(seq), 0) FROM run_events) \
                          + row_number() OVER (ORDER BY id) AS seq \
                   FROM run_events WHERE seq IS NULL) n \
             WHERE r.id = n.id",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, StoreError> {
        self.pool.acquire().await.map_err(db)
    }
}

/// Applies one update-shaped write: the CAS statement, and on no match, the read that tells
/// an idempotent replay from a conflict.
struct Cas {
    what: &'static str,
    id: Uuid,
    expected: u64,
    /// `SELECT version, <fields> FROM t WHERE id = $1`.
    check_sql: &'static str,
}

impl Cas {
    async fn resolve(
        &self,
        conn: &mut PgConnection,
        same: impl FnOnce(&PgRow) -> rows::Result<bool>,
    ) -> Result<(), StoreError> {
        let row = sqlx::query(self.check_sql)
            .bind(self.id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found(self.what, self.id))?;
        if same(&row).map_err(from_rows)? {
            return Ok(());
        }
        Err(StoreError::Conflict {
            what: self.what,
            id: self.id.to_string(),
            expected: self.expected,
            found: rows::u64_of(&row, "version").map_err(from_rows)?,
        })
    }
}

async fn apply_write(conn: &mut PgConnection, write: &Write) -> Result<(), StoreError> {
    match write {
        Write::UpdateRun {
            id,
            expected_version,
            status,
            phase,
            started_at,
            finished_at,
        } => {
            let done = sqlx::query(
                "UPDATE pipeline_runs SET status = $3, phase = $4, started_at = $5, \
                 finished_at = $6, version = version + 1 WHERE id = $1 AND version = $2",
            )
            .bind(id.0)
            .bind(i64_of("expected_version", *expected_version).map_err(from_rows)?)
            .bind(status.as_str())
            .bind(phase.as_str())
            .bind(opt_ts(*started_at))
            .bind(opt_ts(*finished_at))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            if done.rows_affected() == 1 {
                return Ok(());
            }
            Cas {
                what: "run",
                id: id.0,
                expected: *expected_version,
                check_sql: "SELECT version, status, phase, started_at, finished_at \
                            FROM pipeline_runs WHERE id = $1",
            }
            .resolve(conn, |row| {
                Ok(
                    rows::enum_col::<shipinator_core::domain::RunStatus>(row, "status")? == *status
                        && rows::enum_col::<shipinator_core::domain::RunPhase>(row, "phase")?
                            == *phase
                        && rows::opt_ts_col(row, "started_at")? == *started_at
                        && rows::opt_ts_col(row, "finished_at")? == *finished_at,
                )
            })
            .await
        }
        Write::UpdateJob {
            id,
            expected_version,
            status,
            started_at,
            finished_at,
        } => {
            let done = sqlx::query(
                "UPDATE jobs SET status = $3, started_at = $4, finished_at = $5, \
                 version = version + 1 WHERE id = $1 AND version = $2",
            )
            .bind(id.0)
            .bind(i64_of("expected_version", *expected_version).map_err(from_rows)?)
            .bind(status.as_str())
            .bind(opt_ts(*started_at))
            .bind(opt_ts(*finished_at))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            if done.rows_affected() == 1 {
                return Ok(());
            }
            Cas {
                what: "job",
                id: id.0,
                expected: *expected_version,
                check_sql: "SELECT version, status, started_at, finished_at FROM jobs WHERE id = $1",
            }
            .resolve(conn, |row| {
                Ok(rows::enum_col::<shipinator_core::domain::Status>(row, "status")? == *status
                    && rows::opt_ts_col(row, "started_at")? == *started_at
                    && rows::opt_ts_col(row, "finished_at")? == *finished_at)
            })
            .await
        }
        Write::UpdateStep {
            id,
            expected_version,
            status,
            attempt,
            started_at,
            finished_at,
        } => {
            let done = sqlx::query(
                "UPDATE job_steps SET status = $3, attempt = $4, started_at = $5, \
                 finished_at = $6, version = version + 1 WHERE id = $1 AND version = $2",
            )
            .bind(id.0)
            .bind(i64_of("expected_version", *expected_version).map_err(from_rows)?)
            .bind(status.as_str())
            .bind(i64::from(*attempt))
            .bind(opt_ts(*started_at))
            .bind(opt_ts(*finished_at))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            if done.rows_affected() == 1 {
                return Ok(());
            }
            Cas {
                what: "step",
                id: id.0,
                expected: *expected_version,
                check_sql: "SELECT version, status, attempt, started_at, finished_at \
                            FROM job_steps WHERE id = $1",
            }
            .resolve(conn, |row| {
                Ok(
                    rows::enum_col::<shipinator_core::domain::Status>(row, "status")? == *status
                        && rows::u32_of(row, "attempt")? == *attempt
                        && rows::opt_ts_col(row, "started_at")? == *started_at
                        && rows::opt_ts_col(row, "finished_at")? == *finished_at,
                )
            })
            .await
        }
        Write::InsertExecution(exec) => insert_execution(conn, exec).await,
        Write::UpdateExecution {
            id,
            expected_version,
            status,
            external_id,
            exit_code,
            failure,
            completed_at,
        } => {
            let done = sqlx::query(
                "UPDATE executions SET status = $3, external_id = $4, exit_code = $5, \
                 failure = $6, completed_at = $7, version = version + 1 \
                 WHERE id = $1 AND version = $2",
            )
            .bind(id.0)
            .bind(i64_of("expected_version", *expected_version).map_err(from_rows)?)
            .bind(status.as_str())
            .bind(external_id.as_str())
            .bind(*exit_code)
            .bind(failure.as_deref())
            .bind(opt_ts(*completed_at))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            if done.rows_affected() == 1 {
                return Ok(());
            }
            Cas {
                what: "execution",
                id: id.0,
                expected: *expected_version,
                check_sql: "SELECT version, status, external_id, exit_code, failure, completed_at \
                            FROM executions WHERE id = $1",
            }
            .resolve(conn, |row| {
                Ok(
                    rows::enum_col::<shipinator_core::domain::Status>(row, "status")? == *status
                        && rows::col::<String>(row, "external_id")? == *external_id
                        && rows::col::<Option<i32>>(row, "exit_code")? == *exit_code
                        && rows::col::<Option<String>>(row, "failure")? == *failure
                        && rows::opt_ts_col(row, "completed_at")? == *completed_at,
                )
            })
            .await
        }
        Write::InsertArtifact(artifact) => insert_artifact(conn, artifact).await,
        // Appended together at the end of the batch (see `commit`).
        Write::AppendEvent(_) => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdateKind {
    Run,
    Job,
    Step,
    Execution,
}

fn update_key(write: &Write) -> Option<(UpdateKind, Uuid)> {
    match write {
        Write::UpdateRun { id, .. } => Some((UpdateKind::Run, id.0)),
        Write::UpdateJob { id, .. } => Some((UpdateKind::Job, id.0)),
        Write::UpdateStep { id, .. } => Some((UpdateKind::Step, id.0)),
        Write::UpdateExecution { id, .. } => Some((UpdateKind::Execution, id.0)),
        Write::InsertExecution(_) | Write::InsertArtifact(_) | Write::AppendEvent(_) => None,
    }
}

/// Column arrays of a group of updates, bound to one `UPDATE … FROM UNNEST(…)`.
#[derive(Default)]
struct UpdateColumns<'a> {
    ids: Vec<Uuid>,
    expected: Vec<i64>,
    statuses: Vec<&'static str>,
    phases: Vec<&'static str>,
    attempts: Vec<i64>,
    external_ids: Vec<&'a str>,
    exit_codes: Vec<Option<i32>>,
    failures: Vec<Option<&'a str>>,
    t1: Vec<Option<OffsetDateTime>>,
    t2: Vec<Option<OffsetDateTime>>,
}

impl<'a> UpdateColumns<'a> {
    fn push(&mut self, write: &'a Write) -> Result<(), StoreError> {
        let expected = |v: u64| i64_of("expected_version", v).map_err(from_rows);
        match write {
            Write::UpdateRun {
                id,
                expected_version,
                status,
                phase,
                started_at,
                finished_at,
            } => {
                self.ids.push(id.0);
                self.expected.push(expected(*expected_version)?);
                self.statuses.push(status.as_str());
                self.phases.push(phase.as_str());
                self.t1.push(opt_ts(*started_at));
                self.t2.push(opt_ts(*finished_at));
            }
            Write::UpdateJob {
                id,
                expected_version,
                status,
                started_at,
                finished_at,
            } => {
                self.ids.push(id.0);
                self.expected.push(expected(*expected_version)?);
                self.statuses.push(status.as_str());
                self.t1.push(opt_ts(*started_at));
                self.t2.push(opt_ts(*finished_at));
            }
            Write::UpdateStep {
                id,
                expected_version,
                status,
                attempt,
                started_at,
                finished_at,
            } => {
                self.ids.push(id.0);
                self.expected.push(expected(*expected_version)?);
                self.statuses.push(status.as_str());
                self.attempts.push(i64::from(*attempt));
                self.t1.push(opt_ts(*started_at));
                self.t2.push(opt_ts(*finished_at));
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
                self.ids.push(id.0);
                self.expected.push(expected(*expected_version)?);
                self.statuses.push(status.as_str());
                self.external_ids.push(external_id.as_str());
                self.exit_codes.push(*exit_code);
                self.failures.push(failure.as_deref());
                self.t1.push(opt_ts(*completed_at));
            }
            Write::InsertExecution(_) | Write::InsertArtifact(_) | Write::AppendEvent(_) => {}
        }
        Ok(())
    }
}

/// Applies consecutive updates of one kind (distinct ids) with one statement; the writes it
/// did not apply are then resolved one by one (idempotent replay, conflict or missing row).
async fn apply_updates(
    conn: &mut PgConnection,
    kind: UpdateKind,
    writes: &[Write],
) -> Result<(), StoreError> {
    if let [write] = writes {
        return apply_write(conn, write).await;
    }
    let mut c = UpdateColumns::default();
    for w in writes {
        c.push(w)?;
    }
    let query = match kind {
        UpdateKind::Run => sqlx::query(
            "UPDATE pipeline_runs t SET status = u.status, phase = u.phase, \
               started_at = u.started_at, finished_at = u.finished_at, version = t.version + 1 \
             FROM UNNEST($1::UUID[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TIMESTAMPTZ[], \
               $6::TIMESTAMPTZ[]) AS u(id, expected, status, phase, started_at, finished_at) \
             WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        )
        .bind(&c.ids)
        .bind(&c.expected)
        .bind(&c.statuses)
        .bind(&c.phases)
        .bind(&c.t1)
        .bind(&c.t2),
        UpdateKind::Job => sqlx::query(
            "UPDATE jobs t SET status = u.status, started_at = u.started_at, \
               finished_at = u.finished_at, version = t.version + 1 \
             FROM UNNEST($1::UUID[], $2::BIGINT[], $3::TEXT[], $4::TIMESTAMPTZ[], \
               $5::TIMESTAMPTZ[]) AS u(id, expected, status, started_at, finished_at) \
             WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        )
        .bind(&c.ids)
        .bind(&c.expected)
        .bind(&c.statuses)
        .bind(&c.t1)
        .bind(&c.t2),
        UpdateKind::Step => sqlx::query(
            "UPDATE job_steps t SET status = u.status, attempt = u.attempt, \
               started_at = u.started_at, finished_at = u.finished_at, version = t.version + 1 \
             FROM UNNEST($1::UUID[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], \
               $5::TIMESTAMPTZ[], $6::TIMESTAMPTZ[]) \
               AS u(id, expected, status, attempt, started_at, finished_at) \
             WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        )
        .bind(&c.ids)
        .bind(&c.expected)
        .bind(&c.statuses)
        .bind(&c.attempts)
        .bind(&c.t1)
        .bind(&c.t2),
        UpdateKind::Execution => sqlx::query(
            "UPDATE executions t SET status = u.status, external_id = u.external_id, \
               exit_code = u.exit_code, failure = u.failure, completed_at = u.completed_at, \
               version = t.version + 1 \
             FROM UNNEST($1::UUID[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::INTEGER[], \
               $6::TEXT[], $7::TIMESTAMPTZ[]) \
               AS u(id, expected, status, external_id, exit_code, failure, completed_at) \
             WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        )
        .bind(&c.ids)
        .bind(&c.expected)
        .bind(&c.statuses)
        .bind(&c.external_ids)
        .bind(&c.exit_codes)
        .bind(&c.failures)
        .bind(&c.t1),
    };
    let updated: HashSet<Uuid> = query
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?
        .iter()
        .map(|row| rows::col::<Uuid>(row, "id"))
        .collect::<Result<_, _>>()
        .map_err(from_rows)?;
    if updated.len() == writes.len() {
        return Ok(());
    }
    for w in writes {
        if update_key(w).is_some_and(|(_, id)| !updated.contains(&id)) {
            // Versions only grow, so this write's CAS fails again and is resolved.
            apply_write(conn, w).await?;
        }
    }
    Ok(())
}

async fn insert_execution(conn: &mut PgConnection, exec: &Execution) -> Result<(), StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO executions (id, job_step_id, attempt, executor_type, external_id, status, \
         exit_code, failure, version, submitted_at, completed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
    )
    .bind(exec.id.0)
    .bind(exec.job_step_id.0)
    .bind(i64::from(exec.attempt))
    .bind(exec.executor_type.as_str())
    .bind(exec.external_id.as_str())
    .bind(exec.status.as_str())
    .bind(exec.exit_code)
    .bind(exec.failure.as_deref())
    .bind(i64_of("version", exec.version).map_err(from_rows)?)
    .bind(ts(exec.submitted_at))
    .bind(opt_ts(exec.completed_at))
    .execute(&mut *conn)
    .await
    .map_err(|e| insert_err(e, "execution", exec.id))?;
    if inserted.rows_affected() == 1 {
        return Ok(());
    }
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions WHERE id = $1"
    ));
    let row = sqlx::query(sql)
        .bind(exec.id.0)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if rows::execution(&row).map_err(from_rows)? == *exec {
        Ok(())
    } else {
        Err(StoreError::AlreadyExists {
            what: "execution",
            id: exec.id.to_string(),
        })
    }
}

async fn insert_artifact(conn: &mut PgConnection, a: &Artifact) -> Result<(), StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO artifacts (id, job_id, step_id, run_id, artifact_type, name, path, \
         storage_backend, storage_path, checksum, size, metadata, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(a.id.0)
    .bind(a.job_id.0)
    .bind(a.step_id.map(|s| s.0))
    .bind(a.run_id.0)
    .bind(a.artifact_type.as_str())
    .bind(a.name.as_deref())
    .bind(a.path.as_deref())
    .bind(a.storage_backend.as_str())
    .bind(a.storage_path.as_str())
    .bind(a.checksum.as_deref())
    .bind(i64_of("size", a.size).map_err(from_rows)?)
    .bind(metadata_json(&a.metadata))
    .bind(ts(a.created_at))
    .execute(&mut *conn)
    .await
    .map_err(|e| insert_err(e, "artifact", a.id))?;
    if inserted.rows_affected() == 1 {
        return Ok(());
    }
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE id = $1"
    ));
    let row = sqlx::query(sql)
        .bind(a.id.0)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if rows::artifact(&row).map_err(from_rows)? == *a {
        Ok(())
    } else {
        Err(StoreError::AlreadyExists {
            what: "artifact",
            id: a.id.to_string(),
        })
    }
}

async fn append_events(conn: &mut PgConnection, events: &[&RunEvent]) -> Result<(), StoreError> {
    let mut run_ids = Vec::with_capacity(events.len());
    let mut ats = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    for e in events {
        run_ids.push(e.run_id.0);
        ats.push(ts(e.at));
        kinds.push(
            serde_json::to_value(&e.kind).map_err(|err| StoreError::Backend {
                backend: "postgres",
                source: Box::new(err),
            })?,
        );
    }
    sqlx::query(
        "INSERT INTO run_events (run_id, at, kind) \
         SELECT r, a, k FROM UNNEST($1::UUID[], $2::TIMESTAMPTZ[], $3::JSONB[]) \
         WITH ORDINALITY AS t(r, a, k, n) ORDER BY n",
    )
    .bind(run_ids)
    .bind(ats)
    .bind(kinds)
    .execute(&mut *conn)
    .await
    .map_err(|e| insert_err(e, "event", "of batch"))?;
    Ok(())
}

async fn notify(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WAKEUP_CHANNEL)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

fn lease_of(row: &PgRow) -> Result<RunLease, StoreError> {
    Ok(RunLease {
        run_id: rows::id_of(row, "id").map_err(from_rows)?,
        owner: rows::col(row, "lease_owner").map_err(from_rows)?,
        epoch: rows::u64_of(row, "lease_epoch").map_err(from_rows)?,
        expires_at: rows::ts_col(row, "lease_expires_at").map_err(from_rows)?,
    })
}

fn claim_of(row: &PgRow) -> Result<ExecutionClaim, StoreError> {
    Ok(ExecutionClaim {
        execution_id: rows::id_of(row, "id").map_err(from_rows)?,
        step_id: rows::id_of(row, "job_step_id").map_err(from_rows)?,
        attempt: rows::u32_of(row, "attempt").map_err(from_rows)?,
        worker: rows::col(row, "claim_worker").map_err(from_rows)?,
        expires_at: rows::ts_col(row, "claim_expires_at").map_err(from_rows)?,
    })
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn now(&self) -> Result<Timestamp, StoreError> {
        let t: OffsetDateTime = sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(Timestamp::from_offset_date_time(t))
    }

    async fn create_project(&self, p: &Project) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO projects (id, name, description, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(p.id.0)
        .bind(p.name.as_str())
        .bind(p.description.as_deref())
        .bind(ts(p.created_at))
        .bind(ts(p.updated_at))
        .execute(&self.pool)
        .await
        .map_err(|e| insert_err(e, "project", p.id))?;
        Ok(())
    }

    async fn get_project(&self, id: ProjectId) -> Result<Project, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"
        ));
        let row = sqlx::query(sql)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found("project", id))?;
        rows::project(&row).map_err(from_rows)
    }

    async fn get_project_by_name(&self, name: &str) -> Result<Project, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, description, created_at, updated_at FROM projects WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::not_found("project", name))?;
        rows::project(&row).map_err(from_rows)
    }

    async fn list_projects(&self, page: &PageRequest) -> Result<Page<Project>, StoreError> {
        let cursor = parse_cursor(page)?;
        let rows = sqlx::query(
            "SELECT id, name, description, created_at, updated_at FROM projects \
             WHERE ($1::UUID IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(cursor)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(finish_page(decode_all(&rows, rows::project)?, page, |p| {
            p.id.0
        }))
    }

    async fn create_repository(&self, r: &Repository) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO repositories (id, project_id, vcs_provider, clone_url, default_branch, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(r.id.0)
        .bind(r.project_id.0)
        .bind(r.vcs_provider.as_str())
        .bind(r.clone_url.as_str())
        .bind(r.default_branch.as_str())
        .bind(ts(r.created_at))
        .bind(ts(r.updated_at))
        .execute(&self.pool)
        .await
        .map_err(|e| insert_err(e, "repository", r.id))?;
        Ok(())
    }

    async fn get_repository(&self, id: RepositoryId) -> Result<Repository, StoreError> {
        let row = sqlx::query(
            "SELECT id, project_id, vcs_provider, clone_url, default_branch, created_at, \
             updated_at FROM repositories WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::not_found("repository", id))?;
        rows::repository(&row).map_err(from_rows)
    }

    async fn list_repositories(
        &self,
        project: Option<ProjectId>,
        page: &PageRequest,
    ) -> Result<Page<Repository>, StoreError> {
        let cursor = parse_cursor(page)?;
        let rows = sqlx::query(
            "SELECT id, project_id, vcs_provider, clone_url, default_branch, created_at, \
             updated_at FROM repositories \
             WHERE ($1::UUID IS NULL OR id < $1) AND ($2::UUID IS NULL OR project_id = $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(cursor)
        .bind(project.map(|p| p.0))
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(finish_page(
            decode_all(&rows, rows::repository)?,
            page,
            |r| r.id.0,
        ))
    }

    async fn create_pipeline(&self, p: &Pipeline) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO pipelines (id, repository_id, name, trigger_type, source_spec, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(p.id.0)
        .bind(p.repository_id.0)
        .bind(p.name.as_str())
        .bind(p.trigger_type.as_str())
        .bind(p.source_spec.as_str())
        .bind(ts(p.created_at))
        .bind(ts(p.updated_at))
        .execute(&self.pool)
        .await
        .map_err(|e| insert_err(e, "pipeline", p.id))?;
        Ok(())
    }

    async fn get_pipeline(&self, id: PipelineId) -> Result<Pipeline, StoreError> {
        let row = sqlx::query(
            "SELECT id, repository_id, name, trigger_type, source_spec, created_at, updated_at \
             FROM pipelines WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::not_found("pipeline", id))?;
        rows::pipeline(&row).map_err(from_rows)
    }

    async fn list_pipelines(
        &self,
        repository: Option<RepositoryId>,
        page: &PageRequest,
    ) -> Result<Page<Pipeline>, StoreError> {
        let cursor = parse_cursor(page)?;
        let rows = sqlx::query(
            "SELECT id, repository_id, name, trigger_type, source_spec, created_at, updated_at \
             FROM pipelines \
             WHERE ($1::UUID IS NULL OR id < $1) AND ($2::UUID IS NULL OR repository_id = $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(cursor)
        .bind(repository.map(|r| r.0))
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(finish_page(decode_all(&rows, rows::pipeline)?, page, |p| {
            p.id.0
        }))
    }

    async fn create_run(&self, new: &NewRun) -> Result<(), StoreError> {
        let run = &new.run;
        // Validate what the schema cannot see before touching the database.
        let mut job_ids = HashSet::with_capacity(new.jobs.len());
        for job in &new.jobs {
            if job.pipeline_run_id != run.id {
                return Err(StoreError::invalid(format!(
                    "job {} belongs to run {}, not {}",
                    job.id, job.pipeline_run_id, run.id
                )));
            }
            if !job_ids.insert(job.id) {
                return Err(StoreError::AlreadyExists {
                    what: "job",
                    id: job.id.to_string(),
                });
            }
        }
        let mut step_ids = HashSet::with_capacity(new.steps.len());
        for step in &new.steps {
            if !job_ids.contains(&step.job_id) {
                return Err(StoreError::invalid(format!(
                    "step {} references job {} which is not part of run {}",
                    step.id, step.job_id, run.id
                )));
            }
            if !step_ids.insert(step.id) {
                return Err(StoreError::AlreadyExists {
                    what: "step",
                    id: step.id.to_string(),
                });
            }
        }
        insert_new_run(&self.pool, new).await
    }

    async fn get_run(&self, id: RunId) -> Result<PipelineRun, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs WHERE id = $1"
        ));
        let row = sqlx::query(sql)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found("run", id))?;
        rows::run(&row).map_err(from_rows)
    }

    async fn get_run_without_spec(&self, id: RunId) -> Result<PipelineRun, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS_WITHOUT_SPEC} FROM pipeline_runs WHERE id = $1"
        ));
        let row = sqlx::query(sql)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found("run", id))?;
        rows::run(&row).map_err(from_rows)
    }

    async fn load_run(&self, id: RunId) -> Result<RunRecord, StoreError> {
        // One snapshot for the five reads.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(db)?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs WHERE id = $1"
        ));
        let row = sqlx::query(sql)
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found("run", id))?;
        let run = rows::run(&row).map_err(from_rows)?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT j.* FROM jobs j WHERE j.pipeline_run_id = $1 ORDER BY {STAGE_ORDER}, j.id"
        ));
        let jobs = sqlx::query(sql)
            .bind(id.0)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT s.* FROM job_steps s JOIN jobs j ON j.id = s.job_id \
             WHERE j.pipeline_run_id = $1 \
             ORDER BY {STAGE_ORDER}, j.id, s.execution_order, s.id"
        ));
        let steps = sqlx::query(sql)
            .bind(id.0)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT e.* FROM executions e JOIN job_steps s ON s.id = e.job_step_id \
             JOIN jobs j ON j.id = s.job_id WHERE j.pipeline_run_id = $1 \
             ORDER BY {STAGE_ORDER}, j.id, s.execution_order, s.id, e.attempt, e.id"
        ));
        let executions = sqlx::query(sql)
            .bind(id.0)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let artifacts =
            sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 ORDER BY created_at, id")
                .bind(id.0)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(RunRecord {
            run,
            jobs: decode_all(&jobs, rows::job)?,
            steps: decode_all(&steps, rows::step)?,
            executions: decode_all(&executions, rows::execution)?,
            artifacts: decode_all(&artifacts, rows::artifact)?,
        })
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest,
    ) -> Result<Page<PipelineRun>, StoreError> {
        let cursor = parse_cursor(page)?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM pipeline_runs \
             WHERE ($1::UUID IS NULL OR id < $1) \
               AND ($2::UUID IS NULL OR pipeline_id = $2) \
               AND ($3::TEXT IS NULL OR status = $3) \
               AND ($4::TEXT IS NULL OR git_ref = $4) \
               AND ($5::TEXT IS NULL OR trigger = $5) \
             ORDER BY id DESC LIMIT $6"
        ));
        let rows = sqlx::query(sql)
            .bind(cursor)
            .bind(filter.pipeline_id.map(|p| p.0))
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.git_ref.as_deref())
            .bind(filter.trigger.map(|t| t.as_str()))
            .bind(page_limit(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        Ok(finish_page(decode_all(&rows, rows::run)?, page, |r| r.id.0))
    }

    async fn list_jobs(&self, run: RunId) -> Result<Vec<Job>, StoreError> {
        let mut conn = self.conn().await?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT j.* FROM jobs j WHERE j.pipeline_run_id = $1 ORDER BY {STAGE_ORDER}, j.id"
        ));
        let rows = sqlx::query(sql)
            .bind(run.0)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        if rows.is_empty()
            && !exists(
                &mut conn,
                "SELECT EXISTS (SELECT 1 FROM pipeline_runs WHERE id = $1)",
                run.0,
            )
            .await?
        {
            return Err(StoreError::not_found("run", run));
        }
        decode_all(&rows, rows::job)
    }

    async fn list_steps(&self, job: JobId) -> Result<Vec<JobStep>, StoreError> {
        let mut conn = self.conn().await?;
        let rows =
            sqlx::query("SELECT * FROM job_steps WHERE job_id = $1 ORDER BY execution_order, id")
                .bind(job.0)
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
        if rows.is_empty()
            && !exists(
                &mut conn,
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)",
                job.0,
            )
            .await?
        {
            return Err(StoreError::not_found("job", job));
        }
        decode_all(&rows, rows::step)
    }

    async fn list_executions(&self, step: StepId) -> Result<Vec<Execution>, StoreError> {
        let mut conn = self.conn().await?;
        let rows =
            sqlx::query("SELECT * FROM executions WHERE job_step_id = $1 ORDER BY attempt, id")
                .bind(step.0)
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
        if rows.is_empty()
            && !exists(
                &mut conn,
                "SELECT EXISTS (SELECT 1 FROM job_steps WHERE id = $1)",
                step.0,
            )
            .await?
        {
            return Err(StoreError::not_found("step", step));
        }
        decode_all(&rows, rows::execution)
    }

    async fn get_execution(&self, id: ExecutionId) -> Result<Execution, StoreError> {
        let row = sqlx::query("SELECT * FROM executions WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found("execution", id))?;
        rows::execution(&row).map_err(from_rows)
    }

    async fn get_artifact(&self, id: ArtifactId) -> Result<Artifact, StoreError> {
        let row = sqlx::query("SELECT * FROM artifacts WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::not_found("artifact", id))?;
        rows::artifact(&row).map_err(from_rows)
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        let mut conn = self.conn().await?;
        let rows = sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 ORDER BY created_at, id")
            .bind(run.0)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        if rows.is_empty()
            && !exists(
                &mut conn,
                "SELECT EXISTS (SELECT 1 FROM pipeline_runs WHERE id = $1)",
                run.0,
            )
            .await?
        {
            return Err(StoreError::not_found("run", run));
        }
        decode_all(&rows, rows::artifact)
    }

    async fn list_all_artifacts(&self, page: &PageRequest) -> Result<Page<Artifact>, StoreError> {
        let cursor = parse_cursor(page)?;
        let rows = sqlx::query(
            "SELECT * FROM artifacts WHERE ($1::UUID IS NULL OR id < $1) \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(cursor)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(finish_page(decode_all(&rows, rows::artifact)?, page, |a| {
            a.id.0
        }))
    }

    async fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.fences.is_empty() && batch.writes.is_empty() {
            return Ok(());
        }
        if self.apply_script(batch).await? {
            return Ok(());
        }
        // Nothing was written: find out which precondition failed, one statement at a time.
        let mut tx = self.pool.begin().await.map_err(db)?;
        if !batch.fences.is_empty() {
            let ids: Vec<Uuid> = batch.fences.iter().map(|f| f.run_id.0).collect();
            // Row locks keep a claim from bumping the epoch until this batch commits.
            let rows = sqlx::query(
                "SELECT id, lease_epoch FROM pipeline_runs WHERE id = ANY($1) \
                 ORDER BY id FOR NO KEY UPDATE",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let mut epochs = HashMap::with_capacity(rows.len());
            for row in &rows {
                let id: Uuid = rows::col(row, "id").map_err(from_rows)?;
                epochs.insert(id, rows::u64_of(row, "lease_epoch").map_err(from_rows)?);
            }
            for fence in &batch.fences {
                let current = *epochs
                    .get(&fence.run_id.0)
                    .ok_or_else(|| StoreError::not_found("run", fence.run_id))?;
                if current != fence.epoch {
                    return Err(StoreError::Fenced {
                        run_id: fence.run_id,
                        epoch: fence.epoch,
                        current,
                    });
                }
            }
        }
        let mut events = Vec::new();
        let writes = &batch.writes;
        let mut i = 0;
        while i < writes.len() {
            let write = &writes[i];
            if let Write::AppendEvent(e) = write {
                events.push(e);
                i += 1;
                continue;
            }
            let Some((kind, id)) = update_key(write) else {
                apply_write(&mut tx, write).await?;
                i += 1;
                continue;
            };
            // Consecutive updates of one table with distinct ids go in one statement.
            let mut ids = HashSet::from([id]);
            let mut end = i + 1;
            while end < writes.len()
                && update_key(&writes[end]).is_some_and(|(k, id)| k == kind && ids.insert(id))
            {
                end += 1;
            }
            apply_updates(&mut tx, kind, &writes[i..end]).await?;
            i = end;
        }
        if !events.is_empty() {
            append_events(&mut tx, &events).await?;
        }
        if announce(batch) {
            notify(&mut tx).await?;
        }
        tx.commit().await.map_err(db)
    }

    async fn list_events(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        self.number_events().await?;
        let rows = sqlx::query(
            "SELECT seq, run_id, at, kind FROM run_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        decode_all(&rows, rows::event)
    }

    async fn claim_runs(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<RunLease>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "UPDATE pipeline_runs r SET lease_owner = $1, lease_epoch = r.lease_epoch + 1, \
               lease_expires_at = now() + $2 * INTERVAL '1 microsecond' \
             FROM (SELECT id FROM pipeline_runs \
                   WHERE status IN ('pending', 'running') \
                     AND (lease_expires_at IS NULL OR lease_expires_at <= now()) \
                   ORDER BY id LIMIT $3 FOR NO KEY UPDATE SKIP LOCKED) c \
             WHERE r.id = c.id \
             RETURNING r.id, r.lease_owner, r.lease_epoch, r.lease_expires_at",
        )
        .bind(owner)
        .bind(micros(ttl))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut leases = rows.iter().map(lease_of).collect::<Result<Vec<_>, _>>()?;
        leases.sort_by_key(|l| l.run_id);
        Ok(leases)
    }

    async fn renew_leases(
        &self,
        leases: &[RunLease],
        ttl: Duration,
    ) -> Result<Vec<RunLease>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = leases.iter().map(|l| l.run_id.0).collect();
        let owners: Vec<&str> = leases.iter().map(|l| l.owner.as_str()).collect();
        let epochs = leases
            .iter()
            .map(|l| i64_of("epoch", l.epoch))
            .collect::<Result<Vec<_>, _>>()
            .map_err(from_rows)?;
        let rows = sqlx::query(
            "UPDATE pipeline_runs r SET lease_expires_at = now() + $4 * INTERVAL '1 microsecond' \
             FROM UNNEST($1::UUID[], $2::TEXT[], $3::BIGINT[]) AS l(id, owner, epoch) \
             WHERE r.id = l.id AND r.lease_owner = l.owner AND r.lease_epoch = l.epoch \
             RETURNING r.id, r.lease_owner, r.lease_epoch, r.lease_expires_at",
        )
        .bind(&ids)
        .bind(&owners)
        .bind(&epochs)
        .bind(micros(ttl))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut renewed: HashMap<RunId, RunLease> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let lease = lease_of(row)?;
            renewed.insert(lease.run_id, lease);
        }
        Ok(leases
            .iter()
            .filter_map(|l| renewed.remove(&l.run_id))
            .collect())
    }

    async fn release_lease(&self, lease: &RunLease) -> Result<(), StoreError> {
        let row = sqlx::query(
            "WITH released AS ( \
               UPDATE pipeline_runs SET lease_owner = NULL, lease_expires_at = NULL \
               WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $3 RETURNING id) \
             SELECT EXISTS (SELECT 1 FROM pipeline_runs WHERE id = $1) AS found",
        )
        .bind(lease.run_id.0)
        .bind(i64_of("epoch", lease.epoch).map_err(from_rows)?)
        .bind(lease.owner.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let found: bool = rows::col(&row, "found").map_err(from_rows)?;
        if found {
            Ok(())
        } else {
            Err(StoreError::not_found("run", lease.run_id))
        }
    }

    async fn claim_executions(
        &self,
        executor_type: &str,
        worker: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<ExecutionClaim>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "UPDATE executions e SET claim_worker = $2, \
               claim_expires_at = now() + $3 * INTERVAL '1 microsecond' \
             FROM (SELECT id FROM executions \
                   WHERE executor_type = $1 AND status = 'pending' AND claim_worker IS NULL \
                   ORDER BY submitted_at, id LIMIT $4 FOR NO KEY UPDATE SKIP LOCKED) c \
             WHERE e.id = c.id \
             RETURNING e.id, e.job_step_id, e.attempt, e.claim_worker, e.claim_expires_at, \
               e.submitted_at",
        )
        .bind(executor_type)
        .bind(worker)
        .bind(micros(ttl))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let submitted = rows::ts_col(row, "submitted_at").map_err(from_rows)?;
            claims.push((submitted, claim_of(row)?));
        }
        claims.sort_by_key(|(t, c)| (*t, c.execution_id));
        Ok(claims.into_iter().map(|(_, c)| c).collect())
    }

    async fn renew_execution_claim(
        &self,
        claim: &ExecutionClaim,
        ttl: Duration,
    ) -> Result<ExecutionClaim, StoreError> {
        let row = sqlx::query(
            "UPDATE executions SET claim_expires_at = now() + $3 * INTERVAL '1 microsecond' \
             WHERE id = $1 AND claim_worker = $2 AND NOT claim_taken \
               AND claim_expires_at > now() \
             RETURNING id, job_step_id, attempt, claim_worker, claim_expires_at",
        )
        .bind(claim.execution_id.0)
        .bind(claim.worker.as_str())
        .bind(micros(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::LeaseLost {
            what: "execution",
            id: claim.execution_id.to_string(),
            owner: claim.worker.clone(),
        })?;
        claim_of(&row)
    }

    async fn take_expired_execution_claims(&self) -> Result<Vec<ExecutionClaim>, StoreError> {
        let rows = sqlx::query(
            "UPDATE executions e SET claim_taken = TRUE \
             FROM (SELECT id FROM executions \
                   WHERE claim_worker IS NOT NULL AND NOT claim_taken \
                     AND claim_expires_at <= now() \
                   FOR NO KEY UPDATE SKIP LOCKED) c \
             WHERE e.id = c.id \
             RETURNING e.id, e.job_step_id, e.attempt, e.claim_worker, e.claim_expires_at, \
               e.status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let status: shipinator_core::domain::Status =
                rows::enum_col(row, "status").map_err(from_rows)?;
            if !status.is_terminal() {
                claims.push(claim_of(row)?);
            }
        }
        claims.sort_by_key(|c| (c.expires_at, c.execution_id));
        Ok(claims)
    }

    async fn create_api_token(&self, token: &ApiToken) -> Result<(), StoreError> {
        self.create_api_token_impl(token).await
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.list_api_tokens_impl().await
    }

    async fn find_api_token(&self, secret_sha256: &str) -> Result<ApiToken, StoreError> {
        self.find_api_token_impl(secret_sha256).await
    }

    async fn revoke_api_token(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<ApiToken, StoreError> {
        self.revoke_api_token_impl(id, at).await
    }

    async fn touch_api_token(&self, id: ApiTokenId, at: Timestamp) -> Result<(), StoreError> {
        self.touch_api_token_impl(id, at).await
    }

    async fn put_idempotency_record(
        &self,
        record: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        self.put_idempotency_record_impl(record).await
    }

    async fn get_idempotency_record(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.get_idempotency_record_impl(pipeline, key).await
    }

    async fn request_cancel(&self, run: RunId, by: &str, at: Timestamp) -> Result<(), StoreError> {
        self.request_cancel_impl(run, by, at).await
    }

    async fn cancel_requests(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError> {
        self.cancel_requests_impl(runs).await
    }
}

/// Inserts a new run, its jobs and its steps and announces it, in one statement (one round
/// trip instead of a transaction of five): the foreign keys between the three are checked at
/// the statement's end, when all of its rows are there.
async fn insert_new_run(pool: &sqlx::PgPool, new: &NewRun) -> Result<(), StoreError> {
    let run = &new.run;
    let n = new.jobs.len();
    let (mut job_ids, mut job_types, mut job_names, mut job_statuses, mut job_versions) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut job_created, mut job_started, mut job_finished) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for j in &new.jobs {
        job_ids.push(j.id.0);
        job_types.push(j.job_type.as_str());
        job_names.push(j.name.as_str());
        job_statuses.push(j.status.as_str());
        job_versions.push(i64_of("version", j.version).map_err(from_rows)?);
        job_created.push(ts(j.created_at));
        job_started.push(opt_ts(j.started_at));
        job_finished.push(opt_ts(j.finished_at));
    }
    let n = new.steps.len();
    let (mut ids, mut jobs, mut names, mut orders, mut groups) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut statuses, mut attempts, mut versions) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut created, mut started, mut finished) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for s in &new.steps {
        ids.push(s.id.0);
        jobs.push(s.job_id.0);
        names.push(s.name.as_str());
        orders.push(i32_of("execution_order", s.execution_order).map_err(from_rows)?);
        groups.push(s.parallel_group.as_deref());
        statuses.push(s.status.as_str());
        attempts.push(i64::from(s.attempt));
        versions.push(i64_of("version", s.version).map_err(from_rows)?);
        created.push(ts(s.created_at));
        started.push(opt_ts(s.started_at));
        finished.push(opt_ts(s.finished_at));
    }
    sqlx::query(
        "WITH run AS (\
           INSERT INTO pipeline_runs (id, pipeline_id, git_ref, git_sha, status, phase, \
             trigger, requested_stages, requested_by, resolved_spec, retry_of, version, \
             created_at, started_at, finished_at) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)), \
         jobs AS (\
           INSERT INTO jobs (id, pipeline_run_id, job_type, name, status, version, created_at, \
             started_at, finished_at) \
           SELECT id, $1, t, n, s, v, c, st, f FROM UNNEST($16::UUID[], $17::TEXT[], \
             $18::TEXT[], $19::TEXT[], $20::BIGINT[], $21::TIMESTAMPTZ[], $22::TIMESTAMPTZ[], \
             $23::TIMESTAMPTZ[]) AS x(id, t, n, s, v, c, st, f)), \
         steps AS (\
           INSERT INTO job_steps (id, job_id, name, execution_order, parallel_group, status, \
             attempt, version, created_at, started_at, finished_at) \
           SELECT * FROM UNNEST($24::UUID[], $25::UUID[], $26::TEXT[], $27::INTEGER[], \
             $28::TEXT[], $29::TEXT[], $30::BIGINT[], $31::BIGINT[], $32::TIMESTAMPTZ[], \
             $33::TIMESTAMPTZ[], $34::TIMESTAMPTZ[])) \
         SELECT pg_notify($35, '')",
    )
    .bind(run.id.0)
    .bind(run.pipeline_id.0)
    .bind(run.git_ref.as_str())
    .bind(run.git_sha.as_str())
    .bind(run.status.as_str())
    .bind(run.phase.as_str())
    .bind(run.trigger.as_str())
    .bind(rows::stages_text(&run.requested_stages))
    .bind(run.requested_by.as_str())
    .bind(&*run.resolved_spec)
    .bind(run.retry_of.map(|r| r.0))
    .bind(i64_of("version", run.version).map_err(from_rows)?)
    .bind(ts(run.created_at))
    .bind(opt_ts(run.started_at))
    .bind(opt_ts(run.finished_at))
    .bind(&job_ids)
    .bind(&job_types)
    .bind(&job_names)
    .bind(&job_statuses)
    .bind(&job_versions)
    .bind(&job_created)
    .bind(&job_started)
    .bind(&job_finished)
    .bind(&ids)
    .bind(&jobs)
    .bind(&names)
    .bind(&orders)
    .bind(&groups)
    .bind(&statuses)
    .bind(&attempts)
    .bind(&versions)
    .bind(&created)
    .bind(&started)
    .bind(&finished)
    .bind(WAKEUP_CHANNEL)
    .execute(pool)
    .await
    .map_err(|e| insert_err(e, "run", run.id))?;
    Ok(())
}
