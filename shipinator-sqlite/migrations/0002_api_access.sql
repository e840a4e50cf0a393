-- API tokens and run idempotency keys (the HTTP API's authentication and `Idempotency-Key`).

CREATE TABLE api_tokens (
    id            TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'developer', 'viewer')),
    -- NULL: every project; otherwise a JSON array of project ids.
    project_ids   TEXT,
    secret_sha256 TEXT    NOT NULL UNIQUE CHECK (length(secret_sha256) = 64),
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    revoked_at    INTEGER
);

CREATE TABLE run_idempotency_keys (
    pipeline_id TEXT    NOT NULL REFERENCES pipelines (id),
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    run_id      TEXT    NOT NULL REFERENCES pipeline_runs (id),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (pipeline_id, key)
);
