-- The eight tables of DMD §2, as written, with TIMESTAMPTZ for every timestamp and an index on
-- every foreign key. Engine extensions are added by 0002_engine_extensions.sql.

CREATE TABLE projects (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name            TEXT NOT NULL UNIQUE,
    description     TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE repositories (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id      UUID NOT NULL REFERENCES projects(id),
    vcs_provider    TEXT NOT NULL,
    clone_url       TEXT NOT NULL,
    default_branch  TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX repositories_project_id_idx ON repositories (project_id);

CREATE TABLE pipelines (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    repository_id   UUID NOT NULL REFERENCES repositories(id),
    name            TEXT NOT NULL,
    trigger_type    TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX pipelines_repository_id_idx ON pipelines (repository_id);

CREATE TABLE pipeline_runs (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    pipeline_id     UUID NOT NULL REFERENCES pipelines(id),
    git_ref         TEXT NOT NULL,
    git_sha         TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ
);
CREATE INDEX pipeline_runs_pipeline_id_idx ON pipeline_runs (pipeline_id);

CREATE TABLE jobs (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    pipeline_run_id UUID NOT NULL REFERENCES pipeline_runs(id),
    job_type        TEXT NOT NULL,
    name            TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ
);
CREATE INDEX jobs_pipeline_run_id_idx ON jobs (pipeline_run_id);

CREATE TABLE job_steps (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          UUID NOT NULL REFERENCES jobs(id),
    name            TEXT NOT NULL,
    execution_order INTEGER,
    parallel_group  TEXT,
    status          TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ
);
CREATE INDEX job_steps_job_id_idx ON job_steps (job_id);

CREATE TABLE artifacts (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          UUID NOT NULL REFERENCES jobs(id),
    artifact_type   TEXT NOT NULL,
    storage_backend TEXT NOT NULL,
    storage_path    TEXT NOT NULL,
    checksum        TEXT,
    created_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX artifacts_job_id_idx ON artifacts (job_id);

CREATE TABLE executions (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    job_step_id     UUID NOT NULL REFERENCES job_steps(id),
    executor_type   TEXT NOT NULL,
    external_id     TEXT NOT NULL,
    status          TEXT NOT NULL,
    submitted_at    TIMESTAMPTZ NOT NULL,
    completed_at    TIMESTAMPTZ
);
CREATE INDEX executions_job_step_id_idx ON executions (job_step_id);
