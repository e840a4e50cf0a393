-- API tokens and run idempotency keys (the HTTP API's authentication and `Idempotency-Key`).

CREATE TABLE api_tokens (
    id            UUID        PRIMARY KEY,
    name          TEXT        NOT NULL,
    role          TEXT        NOT NULL CHECK (role IN ('admin', 'developer', 'viewer')),
    -- NULL: every project; otherwise the projects the token may act on.
    project_ids   UUID[],
    secret_sha256 TEXT        NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    created_at    TIMESTAMPTZ NOT NULL,
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    CONSTRAINT api_tokens_secret_sha256_key UNIQUE (secret_sha256)
);

CREATE TABLE run_idempotency_keys (
    pipeline_id UUID        NOT NULL REFERENCES pipelines (id),
    key         TEXT        NOT NULL,
    fingerprint TEXT        NOT NULL,
    run_id      UUID        NOT NULL REFERENCES pipeline_runs (id),
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pipeline_id, key)
);
