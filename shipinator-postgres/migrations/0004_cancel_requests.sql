-- Cancel requests: a run cancelled through a replica that does not drive it is cancelled by
-- the replica that owns it, which looks here when woken (the request sends NOTIFY).

CREATE TABLE run_cancel_requests (
    run_id       UUID        NOT NULL PRIMARY KEY REFERENCES pipeline_runs (id),
    requested_by TEXT        NOT NULL,
    requested_at TIMESTAMPTZ NOT NULL
);
