-- Cancel requests: a run cancelled through a process that does not drive it is cancelled by
-- the driver that owns it, which looks here.

CREATE TABLE run_cancel_requests (
    run_id       TEXT    NOT NULL PRIMARY KEY REFERENCES pipeline_runs (id),
    requested_by TEXT    NOT NULL,
    requested_at INTEGER NOT NULL
) STRICT;
