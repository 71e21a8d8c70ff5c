-- Heartbeat timeouts, idempotency keys and sticky workflow runs (see the
-- PostgreSQL migration of the same number). Every column is NULL unless its
-- feature is used; each index holds only the runs that use it.

ALTER TABLE ms_runs ADD COLUMN heartbeat_timeout real;
ALTER TABLE ms_runs ADD COLUMN heartbeat_at real;
ALTER TABLE ms_runs ADD COLUMN idempotency_key text;
-- written by PostgreSQL only (wake-ups routed by NOTIFY); kept for one schema
ALTER TABLE ms_runs ADD COLUMN sticky_node text;

CREATE INDEX ms_runs_heartbeat ON ms_runs (started_at)
    WHERE heartbeat_timeout IS NOT NULL AND state = 'running';
CREATE INDEX ms_runs_idempotency ON ms_runs (name, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state = 'completed';
