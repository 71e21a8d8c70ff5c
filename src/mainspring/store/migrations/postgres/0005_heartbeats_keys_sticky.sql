-- Heartbeat timeouts, idempotency keys and sticky workflow runs. Every column is
-- NULL unless its feature is used, and each index holds only the runs that use
-- it, so runs without them pay nothing on the claim and commit path.

ALTER TABLE ms_runs
    -- seconds a running attempt may go without a heartbeat before it is failed
    ADD COLUMN heartbeat_timeout double precision,
    -- the last heartbeat of the run (any attempt: the claim's started_at bounds it)
    ADD COLUMN heartbeat_at      timestamptz,
    -- runs of one task with one key execute one at a time; once one completed,
    -- the others take its output instead of executing
    ADD COLUMN idempotency_key   text,
    -- the node that last parked this workflow run (its cache holds the live
    -- coroutine): wake-ups are routed to it, advisory only
    ADD COLUMN sticky_node       text;

-- the reaper's heartbeat check: running runs that have a heartbeat timeout
CREATE INDEX ms_runs_heartbeat ON ms_runs (started_at)
    WHERE heartbeat_timeout IS NOT NULL AND state = 'running';
-- a key's completed run, whose output later runs with the key reuse
CREATE INDEX ms_runs_idempotency ON ms_runs (name, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state = 'completed';
