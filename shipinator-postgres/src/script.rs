//! A whole [`Batch`] as one statement: one round trip, and no `BEGIN`/`COMMIT` of its own.
//!
//! The writes of each kind go in as arrays to one data-modifying CTE each (fences, the four
//! compare-and-set updates, the two inserts, the events); the final `SELECT` compares the
//! rows each CTE reports with the number it was given and, if any precondition failed (a
//! fence, a conflict, an idempotent replay, a missing row), raises an error, which undoes the
//! whole statement. The caller then applies the batch in a transaction, statement by
//! statement, which tells those cases apart exactly as before. Only the CTEs of the kinds a
//! batch writes are sent (planning and starting the others cost more than the writes): one
//! fixed text per combination of kinds, of which an engine uses a handful, each prepared once
//! per connection.
//!
//! All CTEs of one statement see the same snapshot and may not write one row twice. Updates
//! of one row that follow each other (each expecting the version the previous one left, as a
//! run's orchestrator writes them) are folded into one: the first's expected version, the
//! last's values, and the version raised by their number, which is what applying them in turn
//! would leave. Any other batch writing a row twice (inserting and then updating one
//! execution, or updates that do not follow each other) is never sent this way.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use shipinator_core::store::{Batch, StoreError, Write};
use sqlx::types::time::OffsetDateTime;
use uuid::Uuid;

use crate::WAKEUP_CHANNEL;
use crate::rows::{i64_of, metadata_json, opt_ts, ts};
use crate::store::{announce, db, from_rows};

/// What the final `SELECT` raises when a precondition failed; never raised otherwise.
const FAILED: &str = "shipinator: a precondition of the batch failed";

/// One data-modifying CTE (or the fence's locking read) per kind of write, in this order.
/// Each is `(name, text, parameter types)`: `{N}` in the text is the kind's N-th parameter,
/// bound from the column arrays in the order of the types.
const KINDS: [(&str, &str, &[&str]); 8] = [
    (
        "fence",
        "SELECT r.id FROM pipeline_runs r \
           JOIN UNNEST({0}, {1}) AS f(id, epoch) ON r.id = f.id AND r.lease_epoch = f.epoch \
           ORDER BY r.id FOR NO KEY UPDATE OF r",
        &["UUID[]", "BIGINT[]"],
    ),
    (
        "runs",
        "UPDATE pipeline_runs t SET status = u.status, phase = u.phase, \
           started_at = u.started_at, finished_at = u.finished_at, version = t.version + u.bump \
         FROM UNNEST({0}, {1}, {2}, {3}, {4}, {5}, {6}) \
           AS u(id, expected, status, phase, started_at, finished_at, bump) \
         WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        &[
            "UUID[]",
            "BIGINT[]",
            "TEXT[]",
            "TEXT[]",
            "TIMESTAMPTZ[]",
            "TIMESTAMPTZ[]",
            "BIGINT[]",
        ],
    ),
    (
        "jobs",
        "UPDATE jobs t SET status = u.status, started_at = u.started_at, \
           finished_at = u.finished_at, version = t.version + u.bump \
         FROM UNNEST({0}, {1}, {2}, {3}, {4}, {5}) \
           AS u(id, expected, status, started_at, finished_at, bump) \
         WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        &[
            "UUID[]",
            "BIGINT[]",
            "TEXT[]",
            "TIMESTAMPTZ[]",
            "TIMESTAMPTZ[]",
            "BIGINT[]",
        ],
    ),
    (
        "steps",
        "UPDATE job_steps t SET status = u.status, attempt = u.attempt, \
           started_at = u.started_at, finished_at = u.finished_at, version = t.version + u.bump \
         FROM UNNEST({0}, {1}, {2}, {3}, {4}, {5}, {6}) \
           AS u(id, expected, status, attempt, started_at, finished_at, bump) \
         WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        &[
            "UUID[]",
            "BIGINT[]",
            "TEXT[]",
            "BIGINT[]",
            "TIMESTAMPTZ[]",
            "TIMESTAMPTZ[]",
            "BIGINT[]",
        ],
    ),
    (
        "execs",
        "UPDATE executions t SET status = u.status, external_id = u.external_id, \
           exit_code = u.exit_code, failure = u.failure, completed_at = u.completed_at, \
           version = t.version + u.bump \
         FROM UNNEST({0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}) \
           AS u(id, expected, status, external_id, exit_code, failure, completed_at, bump) \
         WHERE t.id = u.id AND t.version = u.expected RETURNING t.id",
        &[
            "UUID[]",
            "BIGINT[]",
            "TEXT[]",
            "TEXT[]",
            "INTEGER[]",
            "TEXT[]",
            "TIMESTAMPTZ[]",
            "BIGINT[]",
        ],
    ),
    (
        "new_execs",
        "INSERT INTO executions (id, job_step_id, attempt, executor_type, external_id, status, \
           exit_code, failure, version, submitted_at, completed_at) \
         SELECT * FROM UNNEST({0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}) \
         ON CONFLICT (id) DO NOTHING RETURNING id",
        &[
            "UUID[]",
            "UUID[]",
            "BIGINT[]",
            "TEXT[]",
            "TEXT[]",
            "TEXT[]",
            "INTEGER[]",
            "TEXT[]",
            "BIGINT[]",
            "TIMESTAMPTZ[]",
            "TIMESTAMPTZ[]",
        ],
    ),
    (
        "new_artifacts",
        "INSERT INTO artifacts (id, job_id, step_id, run_id, artifact_type, name, path, \
           storage_backend, storage_path, checksum, size, metadata, created_at) \
         SELECT * FROM UNNEST({0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, \
           {12}) \
         ON CONFLICT (id) DO NOTHING RETURNING id",
        &[
            "UUID[]",
            "UUID[]",
            "UUID[]",
            "UUID[]",
            "TEXT[]",
            "TEXT[]",
            "TEXT[]",
            "TEXT[]",
            "TEXT[]",
            "TEXT[]",
            "BIGINT[]",
            "JSONB[]",
            "TIMESTAMPTZ[]",
        ],
    ),
    (
        "events",
        "INSERT INTO run_events (run_id, at, kind) \
         SELECT r, a, k FROM UNNEST({0}, {1}, {2}) WITH ORDINALITY AS e(r, a, k, n) ORDER BY n \
         RETURNING id",
        &["UUID[]", "TIMESTAMPTZ[]", "JSONB[]"],
    ),
];

/// The statement for the kinds of write in `mask` (bit `i`: `KINDS[i]`), built once per mask:
/// a batch plans and initialises only the CTEs it needs. Parameters are numbered in the order
/// of `KINDS`, then come the announcement flag, the wake-up channel and the failure message.
fn sql_for(mask: u8) -> &'static str {
    static TEXTS: [OnceLock<String>; 256] = [const { OnceLock::new() }; 256];
    TEXTS[usize::from(mask)].get_or_init(|| build_sql(mask))
}

fn build_sql(mask: u8) -> String {
    let mut ctes = Vec::new();
    let mut checks = Vec::new();
    let mut n = 0usize;
    for (bit, (name, text, types)) in KINDS.iter().enumerate() {
        if mask & (1 << bit) == 0 {
            continue;
        }
        let mut body = (*text).to_owned();
        for (k, ty) in types.iter().enumerate() {
            body = body.replace(&format!("{{{k}}}"), &format!("${}::{ty}", n + k + 1));
        }
        checks.push(format!(
            "(SELECT count(*) FROM {name}) = cardinality(${}::{})",
            n + 1,
            types[0]
        ));
        n += types.len();
        ctes.push(format!("{name} AS ({body})"));
    }
    let checks = if checks.is_empty() {
        "TRUE".to_owned()
    } else {
        checks.join(" AND ")
    };
    let with = if ctes.is_empty() {
        String::new()
    } else {
        format!("WITH {} ", ctes.join(", "))
    };
    format!(
        "{with}SELECT (CASE WHEN {checks} THEN NULL ELSE ${failed}::TEXT END)::INTEGER AS failed, \
         CASE WHEN ${announce}::BOOLEAN THEN pg_notify(${channel}::TEXT, '') END AS notified",
        announce = n + 1,
        channel = n + 2,
        failed = n + 3,
    )
}

/// The columns of a batch, one array per column, in the statement's parameter order.
#[derive(Default)]
struct Columns<'a> {
    fence_ids: Vec<Uuid>,
    fence_epochs: Vec<i64>,

    run_ids: Vec<Uuid>,
    run_expected: Vec<i64>,
    run_statuses: Vec<&'static str>,
    run_phases: Vec<&'static str>,
    run_started: Vec<Option<OffsetDateTime>>,
    run_finished: Vec<Option<OffsetDateTime>>,
    run_bumps: Vec<i64>,

    job_ids: Vec<Uuid>,
    job_expected: Vec<i64>,
    job_statuses: Vec<&'static str>,
    job_started: Vec<Option<OffsetDateTime>>,
    job_finished: Vec<Option<OffsetDateTime>>,
    job_bumps: Vec<i64>,

    step_ids: Vec<Uuid>,
    step_expected: Vec<i64>,
    step_statuses: Vec<&'static str>,
    step_attempts: Vec<i64>,
    step_started: Vec<Option<OffsetDateTime>>,
    step_finished: Vec<Option<OffsetDateTime>>,
    step_bumps: Vec<i64>,

    exec_ids: Vec<Uuid>,
    exec_expected: Vec<i64>,
    exec_statuses: Vec<&'static str>,
    exec_external_ids: Vec<&'a str>,
    exec_exit_codes: Vec<Option<i32>>,
    exec_failures: Vec<Option<&'a str>>,
    exec_completed: Vec<Option<OffsetDateTime>>,
    exec_bumps: Vec<i64>,

    new_exec_ids: Vec<Uuid>,
    new_exec_steps: Vec<Uuid>,
    new_exec_attempts: Vec<i64>,
    new_exec_types: Vec<&'a str>,
    new_exec_external_ids: Vec<&'a str>,
    new_exec_statuses: Vec<&'static str>,
    new_exec_exit_codes: Vec<Option<i32>>,
    new_exec_failures: Vec<Option<&'a str>>,
    new_exec_versions: Vec<i64>,
    new_exec_submitted: Vec<OffsetDateTime>,
    new_exec_completed: Vec<Option<OffsetDateTime>>,

    art_ids: Vec<Uuid>,
    art_jobs: Vec<Uuid>,
    art_steps: Vec<Option<Uuid>>,
    art_runs: Vec<Uuid>,
    art_types: Vec<&'static str>,
    art_names: Vec<Option<&'a str>>,
    art_paths: Vec<Option<&'a str>>,
    art_backends: Vec<&'a str>,
    art_storage_paths: Vec<&'a str>,
    art_checksums: Vec<Option<&'a str>>,
    art_sizes: Vec<i64>,
    art_metadata: Vec<serde_json::Value>,
    art_created: Vec<OffsetDateTime>,

    event_runs: Vec<Uuid>,
    event_ats: Vec<OffsetDateTime>,
    event_kinds: Vec<serde_json::Value>,
}

fn expected(v: u64) -> Result<i64, StoreError> {
    i64_of("expected_version", v).map_err(from_rows)
}

impl<'a> Columns<'a> {
    /// The columns of `batch`, or `None` when it writes some row twice in a way that cannot
    /// be folded into one write.
    fn of(batch: &'a Batch) -> Result<Option<Self>, StoreError> {
        let mut c = Self::default();
        let mut inserted: HashSet<(&'static str, Uuid)> = HashSet::new();
        // Each updated row and its position in its kind's columns.
        let mut updated: HashMap<(&'static str, Uuid), usize> = HashMap::new();
        for fence in &batch.fences {
            c.fence_ids.push(fence.run_id.0);
            c.fence_epochs
                .push(i64_of("epoch", fence.epoch).map_err(from_rows)?);
        }
        for write in &batch.writes {
            match write {
                Write::UpdateRun { id, .. } => {
                    if !c.update(
                        write,
                        ("run", id.0),
                        c.run_ids.len(),
                        &inserted,
                        &mut updated,
                    )? {
                        return Ok(None);
                    }
                }
                Write::UpdateJob { id, .. } => {
                    if !c.update(
                        write,
                        ("job", id.0),
                        c.job_ids.len(),
                        &inserted,
                        &mut updated,
                    )? {
                        return Ok(None);
                    }
                }
                Write::UpdateStep { id, .. } => {
                    let at = c.step_ids.len();
                    if !c.update(write, ("step", id.0), at, &inserted, &mut updated)? {
                        return Ok(None);
                    }
                }
                Write::UpdateExecution { id, .. } => {
                    let at = c.exec_ids.len();
                    if !c.update(write, ("execution", id.0), at, &inserted, &mut updated)? {
                        return Ok(None);
                    }
                }
                Write::InsertExecution(e) => {
                    let key = ("execution", e.id.0);
                    if updated.contains_key(&key) || !inserted.insert(key) {
                        return Ok(None);
                    }
                    c.push(write)?;
                }
                Write::InsertArtifact(a) => {
                    if !inserted.insert(("artifact", a.id.0)) {
                        return Ok(None);
                    }
                    c.push(write)?;
                }
                Write::AppendEvent(_) => c.push(write)?,
            }
        }
        Ok(Some(c))
    }

    /// Adds the update `write` of the row `key`, which would go at position `at` of its
    /// kind's columns, or folds it into the earlier update of that row. `false` when it
    /// cannot be sent in one statement: the row was inserted by this batch, or the update
    /// does not expect the version the earlier one leaves.
    fn update(
        &mut self,
        write: &'a Write,
        key: (&'static str, Uuid),
        at: usize,
        inserted: &HashSet<(&'static str, Uuid)>,
        updated: &mut HashMap<(&'static str, Uuid), usize>,
    ) -> Result<bool, StoreError> {
        if inserted.contains(&key) {
            return Ok(false);
        }
        let Some(&i) = updated.get(&key) else {
            updated.insert(key, at);
            self.push(write)?;
            return Ok(true);
        };
        self.fold(i, write)
    }

    /// Folds a later update of the row at position `i` of its kind's columns into it: its
    /// values replace the earlier ones and the version goes up once more. `false` (nothing
    /// changed) unless it expects the version the earlier updates leave.
    fn fold(&mut self, i: usize, write: &'a Write) -> Result<bool, StoreError> {
        fn follows(expected_now: i64, bump: i64, v: u64) -> Result<bool, StoreError> {
            Ok(expected(v)? == expected_now + bump)
        }
        match write {
            Write::UpdateRun {
                expected_version,
                status,
                phase,
                started_at,
                finished_at,
                ..
            } => {
                if !follows(self.run_expected[i], self.run_bumps[i], *expected_version)? {
                    return Ok(false);
                }
                self.run_statuses[i] = status.as_str();
                self.run_phases[i] = phase.as_str();
                self.run_started[i] = opt_ts(*started_at);
                self.run_finished[i] = opt_ts(*finished_at);
                self.run_bumps[i] += 1;
            }
            Write::UpdateJob {
                expected_version,
                status,
                started_at,
                finished_at,
                ..
            } => {
                if !follows(self.job_expected[i], self.job_bumps[i], *expected_version)? {
                    return Ok(false);
                }
                self.job_statuses[i] = status.as_str();
                self.job_started[i] = opt_ts(*started_at);
                self.job_finished[i] = opt_ts(*finished_at);
                self.job_bumps[i] += 1;
            }
            Write::UpdateStep {
                expected_version,
                status,
                attempt,
                started_at,
                finished_at,
                ..
            } => {
                if !follows(self.step_expected[i], self.step_bumps[i], *expected_version)? {
                    return Ok(false);
                }
                self.step_statuses[i] = status.as_str();
                self.step_attempts[i] = i64::from(*attempt);
                self.step_started[i] = opt_ts(*started_at);
                self.step_finished[i] = opt_ts(*finished_at);
                self.step_bumps[i] += 1;
            }
            Write::UpdateExecution {
                expected_version,
                status,
                external_id,
                exit_code,
                failure,
                completed_at,
                ..
            } => {
                if !follows(self.exec_expected[i], self.exec_bumps[i], *expected_version)? {
                    return Ok(false);
                }
                self.exec_statuses[i] = status.as_str();
                self.exec_external_ids[i] = external_id.as_str();
                self.exec_exit_codes[i] = *exit_code;
                self.exec_failures[i] = failure.as_deref();
                self.exec_completed[i] = opt_ts(*completed_at);
                self.exec_bumps[i] += 1;
            }
            Write::InsertExecution(_) | Write::InsertArtifact(_) | Write::AppendEvent(_) => {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn push(&mut self, write: &'a Write) -> Result<(), StoreError> {
        match write {
            Write::UpdateRun {
                id,
                expected_version,
                status,
                phase,
                started_at,
                finished_at,
            } => {
                self.run_ids.push(id.0);
                self.run_expected.push(expected(*expected_version)?);
                self.run_statuses.push(status.as_str());
                self.run_phases.push(phase.as_str());
                self.run_started.push(opt_ts(*started_at));
                self.run_finished.push(opt_ts(*finished_at));
                self.run_bumps.push(1);
            }
            Write::UpdateJob {
                id,
                expected_version,
                status,
                started_at,
                finished_at,
            } => {
                self.job_ids.push(id.0);
                self.job_expected.push(expected(*expected_version)?);
                self.job_statuses.push(status.as_str());
                self.job_started.push(opt_ts(*started_at));
                self.job_finished.push(opt_ts(*finished_at));
                self.job_bumps.push(1);
            }
            Write::UpdateStep {
                id,
                expected_version,
                status,
                attempt,
                started_at,
                finished_at,
            } => {
                self.step_ids.push(id.0);
                self.step_expected.push(expected(*expected_version)?);
                self.step_statuses.push(status.as_str());
                self.step_attempts.push(i64::from(*attempt));
                self.step_started.push(opt_ts(*started_at));
                self.step_finished.push(opt_ts(*finished_at));
                self.step_bumps.push(1);
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
                self.exec_ids.push(id.0);
                self.exec_expected.push(expected(*expected_version)?);
                self.exec_statuses.push(status.as_str());
                self.exec_external_ids.push(external_id.as_str());
                self.exec_exit_codes.push(*exit_code);
                self.exec_failures.push(failure.as_deref());
                self.exec_completed.push(opt_ts(*completed_at));
                self.exec_bumps.push(1);
            }
            Write::InsertExecution(e) => {
                self.new_exec_ids.push(e.id.0);
                self.new_exec_steps.push(e.job_step_id.0);
                self.new_exec_attempts.push(i64::from(e.attempt));
                self.new_exec_types.push(e.executor_type.as_str());
                self.new_exec_external_ids.push(e.external_id.as_str());
                self.new_exec_statuses.push(e.status.as_str());
                self.new_exec_exit_codes.push(e.exit_code);
                self.new_exec_failures.push(e.failure.as_deref());
                self.new_exec_versions
                    .push(i64_of("version", e.version).map_err(from_rows)?);
                self.new_exec_submitted.push(ts(e.submitted_at));
                self.new_exec_completed.push(opt_ts(e.completed_at));
            }
            Write::InsertArtifact(a) => {
                self.art_ids.push(a.id.0);
                self.art_jobs.push(a.job_id.0);
                self.art_steps.push(a.step_id.map(|s| s.0));
                self.art_runs.push(a.run_id.0);
                self.art_types.push(a.artifact_type.as_str());
                self.art_names.push(a.name.as_deref());
                self.art_paths.push(a.path.as_deref());
                self.art_backends.push(a.storage_backend.as_str());
                self.art_storage_paths.push(a.storage_path.as_str());
                self.art_checksums.push(a.checksum.as_deref());
                self.art_sizes
                    .push(i64_of("size", a.size).map_err(from_rows)?);
                self.art_metadata.push(metadata_json(&a.metadata));
                self.art_created.push(ts(a.created_at));
            }
            Write::AppendEvent(e) => {
                self.event_runs.push(e.run_id.0);
                self.event_ats.push(ts(e.at));
                self.event_kinds
                    .push(
                        serde_json::to_value(&e.kind).map_err(|err| StoreError::Backend {
                            backend: "postgres",
                            source: Box::new(err),
                        })?,
                    );
            }
        }
        Ok(())
    }
}

/// Applies `batch` in one statement. `Ok(true)`: committed. `Ok(false)`: nothing was written
/// (a precondition failed, the batch writes a row twice in a way that cannot be folded, or
/// the database refused a
/// statement); the caller applies it statement by statement.
///
/// # Errors
/// The database could not be reached.
pub(crate) async fn apply(
    conn: &mut sqlx::PgConnection,
    batch: &Batch,
) -> Result<bool, StoreError> {
    let Some(c) = Columns::of(batch)? else {
        return Ok(false);
    };
    let kinds = [
        !c.fence_ids.is_empty(),
        !c.run_ids.is_empty(),
        !c.job_ids.is_empty(),
        !c.step_ids.is_empty(),
        !c.exec_ids.is_empty(),
        !c.new_exec_ids.is_empty(),
        !c.art_ids.is_empty(),
        !c.event_runs.is_empty(),
    ];
    let mask = kinds
        .iter()
        .enumerate()
        .fold(0u8, |m, (bit, present)| m | (u8::from(*present) << bit));
    let mut q = sqlx::query(sql_for(mask));
    if kinds[0] {
        q = q.bind(&c.fence_ids).bind(&c.fence_epochs);
    }
    if kinds[1] {
        q = q
            .bind(&c.run_ids)
            .bind(&c.run_expected)
            .bind(&c.run_statuses)
            .bind(&c.run_phases)
            .bind(&c.run_started)
            .bind(&c.run_finished)
            .bind(&c.run_bumps);
    }
    if kinds[2] {
        q = q
            .bind(&c.job_ids)
            .bind(&c.job_expected)
            .bind(&c.job_statuses)
            .bind(&c.job_started)
            .bind(&c.job_finished)
            .bind(&c.job_bumps);
    }
    if kinds[3] {
        q = q
            .bind(&c.step_ids)
            .bind(&c.step_expected)
            .bind(&c.step_statuses)
            .bind(&c.step_attempts)
            .bind(&c.step_started)
            .bind(&c.step_finished)
            .bind(&c.step_bumps);
    }
    if kinds[4] {
        q = q
            .bind(&c.exec_ids)
            .bind(&c.exec_expected)
            .bind(&c.exec_statuses)
            .bind(&c.exec_external_ids)
            .bind(&c.exec_exit_codes)
            .bind(&c.exec_failures)
            .bind(&c.exec_completed)
            .bind(&c.exec_bumps);
    }
    if kinds[5] {
        q = q
            .bind(&c.new_exec_ids)
            .bind(&c.new_exec_steps)
            .bind(&c.new_exec_attempts)
            .bind(&c.new_exec_types)
            .bind(&c.new_exec_external_ids)
            .bind(&c.new_exec_statuses)
            .bind(&c.new_exec_exit_codes)
            .bind(&c.new_exec_failures)
            .bind(&c.new_exec_versions)
            .bind(&c.new_exec_submitted)
            .bind(&c.new_exec_completed);
    }
    if kinds[6] {
        q = q
            .bind(&c.art_ids)
            .bind(&c.art_jobs)
            .bind(&c.art_steps)
            .bind(&c.art_runs)
            .bind(&c.art_types)
            .bind(&c.art_names)
            .bind(&c.art_paths)
            .bind(&c.art_backends)
            .bind(&c.art_storage_paths)
            .bind(&c.art_checksums)
            .bind(&c.art_sizes)
            .bind(&c.art_metadata)
            .bind(&c.art_created);
    }
    if kinds[7] {
        q = q
            .bind(&c.event_runs)
            .bind(&c.event_ats)
            .bind(&c.event_kinds);
    }
    let result = q
        .bind(announce(batch))
        .bind(WAKEUP_CHANNEL)
        .bind(FAILED)
        .execute(conn)
        .await;
    match result {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) => {
            if !e.message().contains(FAILED) {
                tracing::debug!(error = %e, "a batch was refused; applying it statement by statement");
            }
            Ok(false)
        }
        Err(e) => Err(db(e)),
    }
}

#[cfg(test)]
mod tests {
    use shipinator_core::conformance::store::step_start_batch;
    use shipinator_core::domain::{RunPhase, RunStatus, Status};
    use shipinator_core::store::Store;

    use super::*;
    use crate::PgStore;
    use crate::testing::TestCluster;

    async fn store() -> PgStore {
        let cluster = tokio::task::spawn_blocking(TestCluster::shared)
            .await
            .unwrap()
            .unwrap();
        let url = cluster.create_database().await.unwrap();
        PgStore::connect(&url).await.unwrap()
    }

    fn run_of(batch: &Batch) -> shipinator_core::domain::RunId {
        match batch.writes[0] {
            Write::UpdateRun { id, .. } => id,
            _ => panic!("the first write updates the run"),
        }
    }

    #[test]
    fn every_statement_numbers_its_parameters_in_order() {
        for mask in 0..=u8::MAX {
            let sql = build_sql(mask);
            let types: usize = KINDS
                .iter()
                .enumerate()
                .filter(|(bit, _)| mask & (1 << bit) != 0)
                .map(|(_, (_, _, types))| types.len())
                .sum();
            let count = types + 3;
            for n in 1..=count {
                assert!(
                    sql.contains(&format!("${n}::")),
                    "mask {mask:#x}: ${n} missing"
                );
            }
            assert!(!sql.contains(&format!("${}:", count + 1)), "mask {mask:#x}");
            assert!(
                !sql.contains('{'),
                "mask {mask:#x}: a placeholder is left: {sql}"
            );
            assert_eq!(sql_for(mask), sql);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_whose_preconditions_hold_is_one_statement() {
        let store = store().await;
        let batch = step_start_batch(&store).await;
        let run = run_of(&batch);
        assert!(
            store.apply_script(&batch).await.unwrap(),
            "a fresh batch applies"
        );
        let record = store.load_run(run).await.unwrap();
        assert_eq!(record.run.status, RunStatus::Running);
        assert_eq!(record.run.phase, RunPhase::Building);
        assert_eq!(record.run.version, 1);
        assert_eq!(record.jobs.iter().filter(|j| j.version == 1).count(), 1);
        assert_eq!(record.steps.iter().filter(|s| s.version == 1).count(), 1);
        assert_eq!(record.executions.len(), 1);
        assert_eq!(record.artifacts.len(), 1);
        let events = store.list_events(0, 1000).await.unwrap();
        assert_eq!(events.iter().filter(|e| e.event.run_id == run).count(), 1);

        // The same batch again: the compare-and-sets fail, nothing is written, and the
        // transaction path decides (an identical replay).
        assert!(!store.apply_script(&batch).await.unwrap());
        assert_eq!(
            store.list_events(0, 1000).await.unwrap().len(),
            events.len()
        );
        store.commit(&batch).await.unwrap();
        assert_eq!(store.load_run(run).await.unwrap().run.version, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_precondition_writes_nothing() {
        let store = store().await;
        let batch = step_start_batch(&store).await;
        let run = run_of(&batch);

        let mut fenced = batch.clone();
        fenced.fences[0].epoch += 1;
        assert!(
            !store.apply_script(&fenced).await.unwrap(),
            "a stale epoch fails"
        );
        let err = store.commit(&fenced).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");

        let mut stale = batch.clone();
        if let Write::UpdateStep {
            expected_version, ..
        } = &mut stale.writes[2]
        {
            *expected_version = 5;
        }
        assert!(
            !store.apply_script(&stale).await.unwrap(),
            "a stale version fails"
        );
        let err = store.commit(&stale).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { what: "step", .. }),
            "{err:?}"
        );

        let record = store.load_run(run).await.unwrap();
        assert_eq!(record.run.version, 0, "no write of a failed batch is kept");
        assert!(record.executions.is_empty());
        assert!(record.artifacts.is_empty());
        assert!(store.list_events(0, 1000).await.unwrap().is_empty());

        // A batch updating one row twice, the second expecting another version than the
        // first leaves, is never sent as one statement.
        let step_id = match batch.writes[2] {
            Write::UpdateStep { id, .. } => id,
            _ => panic!("the third write updates the step"),
        };
        let mut twice = batch.clone();
        twice.writes.push(Write::UpdateStep {
            id: step_id,
            expected_version: 5,
            status: Status::Succeeded,
            attempt: 1,
            started_at: None,
            finished_at: None,
        });
        assert!(!store.apply_script(&twice).await.unwrap());
        assert_eq!(store.load_run(run).await.unwrap().run.version, 0);
        let err = store.commit(&twice).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { what: "step", .. }),
            "{err:?}"
        );
        assert_eq!(store.load_run(run).await.unwrap().run.version, 0);

        // One inserting and then updating an execution is not either.
        let exec = batch
            .writes
            .iter()
            .find_map(|w| match w {
                Write::InsertExecution(e) => Some(e.clone()),
                _ => None,
            })
            .expect("the batch inserts an execution");
        let mut inserted_then_updated = batch.clone();
        inserted_then_updated.writes.push(Write::UpdateExecution {
            id: exec.id,
            expected_version: exec.version,
            status: Status::Running,
            external_id: "x".to_owned(),
            exit_code: None,
            failure: None,
            completed_at: None,
        });
        assert!(!store.apply_script(&inserted_then_updated).await.unwrap());
        assert_eq!(store.load_run(run).await.unwrap().run.version, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_of_one_row_that_follow_each_other_are_folded() {
        let store = store().await;
        let batch = step_start_batch(&store).await;
        let run = run_of(&batch);
        let step_id = match batch.writes[2] {
            Write::UpdateStep { id, .. } => id,
            _ => panic!("the third write updates the step"),
        };
        let started = match &batch.writes[2] {
            Write::UpdateStep { started_at, .. } => *started_at,
            _ => panic!("the third write updates the step"),
        };
        let mut twice = batch.clone();
        twice.writes.push(Write::UpdateStep {
            id: step_id,
            expected_version: 1,
            status: Status::Succeeded,
            attempt: 1,
            started_at: started,
            finished_at: None,
        });
        assert!(
            store.apply_script(&twice).await.unwrap(),
            "the second update expects what the first leaves: one statement"
        );
        let record = store.load_run(run).await.unwrap();
        let step = record
            .steps
            .iter()
            .find(|s| s.id == step_id)
            .expect("the step is stored");
        assert_eq!(step.status, Status::Succeeded, "the last update's values");
        assert_eq!(step.version, 2, "raised once per update, as in turn");
        assert_eq!(record.run.version, 1);

        // The same batch again: its compare-and-sets fail, and nothing is written twice
        // whatever the transaction path then decides.
        assert!(!store.apply_script(&twice).await.unwrap());
        let _ = store.commit(&twice).await;
        assert_eq!(
            store
                .load_run(run)
                .await
                .unwrap()
                .steps
                .iter()
                .find(|s| s.id == step_id)
                .map(|s| s.version),
            Some(2)
        );
    }
}
