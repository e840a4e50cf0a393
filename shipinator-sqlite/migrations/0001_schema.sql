-- Shipinator schema, SQLite dialect.
--
-- The eight DMD §2 tables with the same table and column names as the PostgreSQL schema,
-- extended where the engine needs it. Dialect differences:
--   * UUIDs are TEXT in the canonical lowercase hyphenated form; they sort like the bytes, so
--     `ORDER BY id` is time order for UUID v7 ids.
--   * Timestamps are INTEGER microseconds since the Unix epoch (UTC).
--   * JSON is TEXT.
--   * Booleans are INTEGER 0/1.
-- Enum columns accept exactly the spellings of shipinator-core's `as_str()`.

CREATE TABLE projects (
    id              TEXT    NOT NULL PRIMARY KEY,
    name            TEXT    NOT NULL UNIQUE,
    description     TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE repositories (
    id              TEXT    NOT NULL PRIMARY KEY,
    project_id      TEXT    NOT NULL REFERENCES projects (id),
    vcs_provider    TEXT    NOT NULL,
    clone_url       TEXT    NOT NULL,
    default_branch  TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX repositories_project_id ON repositories (project_id);

CREATE TABLE pipelines (
    id              TEXT    NOT NULL PRIMARY KEY,
    repository_id   TEXT    NOT NULL REFERENCES repositories (id),
    name            TEXT    NOT NULL,
    trigger_type    TEXT    NOT NULL CHECK (trigger_type IN ('pr', 'push', 'manual')),
    source_spec     TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX pipelines_repository_id ON pipelines (repository_id);

CREATE TABLE pipeline_runs (
    id                  TEXT    NOT NULL PRIMARY KEY,
    pipeline_id         TEXT    NOT NULL REFERENCES pipelines (id),
    git_ref             TEXT    NOT NULL,
    git_sha             TEXT    NOT NULL,
    status              TEXT    NOT NULL
        CHECK (status IN ('pending', 'running', 'success', 'failed', 'canceled')),
    phase               TEXT    NOT NULL
        CHECK (phase IN ('submitted', 'building', 'built', 'testing', 'tested', 'deploying',
                         'deployed')),
    "trigger"           TEXT    NOT NULL CHECK ("trigger" IN ('pr', 'push', 'manual')),
    -- JSON array of job types, in execution order.
    requested_stages    TEXT    NOT NULL,
    requested_by        TEXT    NOT NULL,
    -- JSON: the validated spec this run executes.
    resolved_spec       TEXT    NOT NULL,
    retry_of            TEXT    REFERENCES pipeline_runs (id),
    version             INTEGER NOT NULL DEFAULT 0 CHECK (version >= 0),
    lease_owner         TEXT,
    lease_epoch         INTEGER NOT NULL DEFAULT 0 CHECK (lease_epoch >= 0),
    lease_expires_at    INTEGER,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER
) STRICT;

CREATE INDEX pipeline_runs_pipeline_id ON pipeline_runs (pipeline_id);
CREATE INDEX pipeline_runs_retry_of ON pipeline_runs (retry_of) WHERE retry_of IS NOT NULL;
-- Runs a driver may claim.
CREATE INDEX pipeline_runs_active ON pipeline_runs (id) WHERE status IN ('pending', 'running');

CREATE TABLE jobs (
    id              TEXT    NOT NULL PRIMARY KEY,
    pipeline_run_id TEXT    NOT NULL REFERENCES pipeline_runs (id),
    job_type        TEXT    NOT NULL CHECK (job_type IN ('build', 'test', 'deploy')),
    name            TEXT    NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled', 'skipped')),
    version         INTEGER NOT NULL DEFAULT 0 CHECK (version >= 0),
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER
) STRICT;

CREATE INDEX jobs_pipeline_run_id ON jobs (pipeline_run_id);

CREATE TABLE job_steps (
    id              TEXT    NOT NULL PRIMARY KEY,
    job_id          TEXT    NOT NULL REFERENCES jobs (id),
    name            TEXT    NOT NULL,
    execution_order INTEGER NOT NULL CHECK (execution_order >= 0),
    parallel_group  TEXT,
    status          TEXT    NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled', 'skipped')),
    attempt         INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    version         INTEGER NOT NULL DEFAULT 0 CHECK (version >= 0),
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER
) STRICT;

CREATE INDEX job_steps_job_id ON job_steps (job_id, execution_order);

CREATE TABLE artifacts (
    id              TEXT    NOT NULL PRIMARY KEY,
    job_id          TEXT    NOT NULL REFERENCES jobs (id),
    step_id         TEXT    REFERENCES job_steps (id),
    run_id          TEXT    NOT NULL REFERENCES pipeline_runs (id),
    artifact_type   TEXT    NOT NULL
        CHECK (artifact_type IN ('binary', 'oci_image', 'helm_chart', 'k8s_manifest',
                                 'test_report', 'coverage', 'file')),
    name            TEXT,
    path            TEXT,
    storage_backend TEXT    NOT NULL,
    storage_path    TEXT    NOT NULL,
    checksum        TEXT,
    size            INTEGER NOT NULL DEFAULT 0 CHECK (size >= 0),
    -- JSON object of string values.
    metadata        TEXT    NOT NULL DEFAULT '{}',
    created_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX artifacts_job_id ON artifacts (job_id);
CREATE INDEX artifacts_step_id ON artifacts (step_id) WHERE step_id IS NOT NULL;
CREATE INDEX artifacts_run_id ON artifacts (run_id, created_at);

CREATE TABLE executions (
    id                  TEXT    NOT NULL PRIMARY KEY,
    job_step_id         TEXT    NOT NULL REFERENCES job_steps (id),
    attempt             INTEGER NOT NULL CHECK (attempt >= 0),
    executor_type       TEXT    NOT NULL,
    external_id         TEXT    NOT NULL,
    status              TEXT    NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled', 'skipped')),
    exit_code           INTEGER,
    failure             TEXT,
    version             INTEGER NOT NULL DEFAULT 0 CHECK (version >= 0),
    -- Pull workers: who claimed it, until when, and whether its expiry was already reported.
    claim_worker        TEXT,
    claim_expires_at    INTEGER,
    claim_taken         INTEGER NOT NULL DEFAULT 0 CHECK (claim_taken IN (0, 1)),
    submitted_at        INTEGER NOT NULL,
    completed_at        INTEGER
) STRICT;

CREATE INDEX executions_job_step_id ON executions (job_step_id, attempt);
-- Queued executions a pull worker may claim.
CREATE INDEX executions_queued ON executions (executor_type, submitted_at)
    WHERE status = 'pending' AND claim_worker IS NULL;
-- Claims whose expiry has not been reported yet.
CREATE INDEX executions_claimed ON executions (claim_expires_at)
    WHERE claim_worker IS NOT NULL AND claim_taken = 0;

-- The outbox: events written in the same transaction as the state change.
CREATE TABLE run_events (
    seq             INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    run_id          TEXT    NOT NULL REFERENCES pipeline_runs (id),
    at              INTEGER NOT NULL,
    -- JSON of the event kind, as serialized by shipinator-core.
    kind            TEXT    NOT NULL
) STRICT;

CREATE INDEX run_events_run_id ON run_events (run_id);

-- The log index: where each execution's log lives in the LogStore and how far it got. The
-- lines themselves are kept outside the database.
CREATE TABLE execution_logs (
    execution_id    TEXT    NOT NULL PRIMARY KEY REFERENCES executions (id),
    logs_ref        TEXT    NOT NULL,
    next_seq        INTEGER NOT NULL DEFAULT 0 CHECK (next_seq >= 0),
    truncated       INTEGER NOT NULL DEFAULT 0 CHECK (truncated IN (0, 1)),
    closed_at       INTEGER
) STRICT;
