-- What the engine needs beyond DMD §2 (each extension and its reason: migrations/README.md).
-- Enum columns are checked against the exact spellings of shipinator-core's `domain` enums.

-- pipelines -----------------------------------------------------------------------------------
ALTER TABLE pipelines
    ADD COLUMN source_spec TEXT NOT NULL DEFAULT '',
    ADD CONSTRAINT pipelines_trigger_type_check CHECK (trigger_type IN ('pr', 'push', 'manual'));

-- pipeline_runs -------------------------------------------------------------------------------
ALTER TABLE pipeline_runs
    ADD COLUMN phase            TEXT NOT NULL DEFAULT 'submitted',
    ADD COLUMN trigger          TEXT NOT NULL DEFAULT 'manual',
    ADD COLUMN requested_stages TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN requested_by     TEXT NOT NULL DEFAULT '',
    ADD COLUMN resolved_spec    JSONB NOT NULL DEFAULT 'null',
    ADD COLUMN retry_of         UUID REFERENCES pipeline_runs(id),
    ADD COLUMN version          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN lease_owner      TEXT,
    ADD COLUMN lease_epoch      BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN lease_expires_at TIMESTAMPTZ,
    ADD CONSTRAINT pipeline_runs_status_check
        CHECK (status IN ('pending', 'running', 'success', 'failed', 'canceled')),
    ADD CONSTRAINT pipeline_runs_phase_check
        CHECK (phase IN ('submitted', 'building', 'built', 'testing', 'tested', 'deploying', 'deployed')),
    ADD CONSTRAINT pipeline_runs_trigger_check CHECK (trigger IN ('pr', 'push', 'manual')),
    ADD CONSTRAINT pipeline_runs_requested_stages_check
        CHECK (requested_stages <@ ARRAY['build', 'test', 'deploy']::TEXT[]),
    ADD CONSTRAINT pipeline_runs_version_check CHECK (version >= 0);
CREATE INDEX pipeline_runs_retry_of_idx ON pipeline_runs (retry_of) WHERE retry_of IS NOT NULL;
-- What `claim_runs` scans: only runs that are not finished.
CREATE INDEX pipeline_runs_active_idx ON pipeline_runs (id)
    WHERE status IN ('pending', 'running');

-- jobs ----------------------------------------------------------------------------------------
ALTER TABLE jobs
    ADD COLUMN version BIGINT NOT NULL DEFAULT 0,
    ADD CONSTRAINT jobs_job_type_check CHECK (job_type IN ('build', 'test', 'deploy')),
    ADD CONSTRAINT jobs_status_check
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled', 'skipped'));

-- job_steps -----------------------------------------------------------------------------------
ALTER TABLE job_steps
    ALTER COLUMN execution_order SET NOT NULL,
    ADD COLUMN attempt BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN version BIGINT NOT NULL DEFAULT 0,
    ADD CONSTRAINT job_steps_status_check
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled', 'skipped')),
    ADD CONSTRAINT job_steps_attempt_check CHECK (attempt >= 0);

-- artifacts -----------------------------------------------------------------------------------
ALTER TABLE artifacts
    ADD COLUMN step_id  UUID REFERENCES job_steps(id),
    ADD COLUMN run_id   UUID NOT NULL REFERENCES pipeline_runs(id),
    ADD COLUMN name     TEXT,
    ADD COLUMN path     TEXT,
    ADD COLUMN size     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN metadata JSONB NOT NULL DEFAULT '{}',
    ADD CONSTRAINT artifacts_artifact_type_check
        CHECK (artifact_type IN ('binary', 'oci_image', 'helm_chart', 'k8s_manifest',
                                 'test_report', 'coverage', 'file')),
    ADD CONSTRAINT artifacts_size_check CHECK (size >= 0);
CREATE INDEX artifacts_step_id_idx ON artifacts (step_id) WHERE step_id IS NOT NULL;
CREATE INDEX artifacts_run_id_idx ON artifacts (run_id, created_at, id);

-- executions ----------------------------------------------------------------------------------
ALTER TABLE executions
    ADD COLUMN attempt          BIGINT NOT NULL DEFAULT 1,
    ADD COLUMN exit_code        INTEGER,
    ADD COLUMN failure          TEXT,
    ADD COLUMN version          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN claim_worker     TEXT,
    ADD COLUMN claim_expires_at TIMESTAMPTZ,
    ADD COLUMN claim_taken      BOOLEAN NOT NULL DEFAULT FALSE,
    ADD CONSTRAINT executions_status_check
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled', 'skipped'));
-- The pull-worker queue: pending executions never claimed, oldest first.
CREATE INDEX executions_queue_idx ON executions (executor_type, submitted_at, id)
    WHERE status = 'pending' AND claim_worker IS NULL;
-- Claims the sweeper may still hand out as expired.
CREATE INDEX executions_claims_idx ON executions (claim_expires_at)
    WHERE claim_worker IS NOT NULL AND NOT claim_taken;

-- run_events: the outbox, written in the same transaction as the state change -----------------
-- Writers insert with `seq` NULL (no lock: commits stay concurrent). Readers number committed
-- events under an advisory lock, in insertion order, continuing from the highest `seq`: so `seq`
-- is gapless from 1, and an event that commits late is numbered after every event a reader has
-- already seen.
CREATE TABLE run_events (
    id      BIGSERIAL PRIMARY KEY,
    seq     BIGINT UNIQUE CHECK (seq >= 1),
    run_id  UUID NOT NULL REFERENCES pipeline_runs(id),
    at      TIMESTAMPTZ NOT NULL,
    kind    JSONB NOT NULL
);
CREATE INDEX run_events_unnumbered_idx ON run_events (id) WHERE seq IS NULL;
CREATE INDEX run_events_run_id_idx ON run_events (run_id);

-- execution_logs: the log index (TDD §6.2 `logs_ref`) -------------------------------------------
-- Where each execution's log lives in the LogStore and how far it got, so that listings and
-- retention find logs without asking the LogStore.
CREATE TABLE execution_logs (
    execution_id UUID PRIMARY KEY REFERENCES executions(id),
    logs_ref     TEXT NOT NULL,
    next_seq     BIGINT NOT NULL DEFAULT 0 CHECK (next_seq >= 0),
    truncated    BOOLEAN NOT NULL DEFAULT FALSE,
    closed_at    TIMESTAMPTZ
);
