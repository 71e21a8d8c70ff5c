-- Machines: steps with committed state, durable signals, fan-out/fan-in, and
-- token-bucket rate limits enforced in the claim.

ALTER TABLE ms_runs ADD COLUMN awaits text;            -- JSON array of signal names
ALTER TABLE ms_runs ADD COLUMN wake_step text;         -- the step an await's timeout runs
ALTER TABLE ms_runs ADD COLUMN deadline real;          -- when a waiting run's await times out
ALTER TABLE ms_runs ADD COLUMN children_pending integer NOT NULL DEFAULT 0;
ALTER TABLE ms_runs ADD COLUMN signal_seq integer NOT NULL DEFAULT 0;

-- Runs without a rate limit are claimed from this index; rate-limited runs
-- through their bucket, from the next one.
DROP INDEX ms_runs_claim;
CREATE INDEX ms_runs_claim ON ms_runs (queue, priority DESC, run_at, id)
    WHERE state = 'available' AND rate_limit IS NULL;
CREATE INDEX ms_runs_rated ON ms_runs (rate_limit, priority DESC, run_at, id)
    WHERE state = 'available' AND rate_limit IS NOT NULL;
CREATE INDEX ms_runs_deadline ON ms_runs (deadline) WHERE state = 'waiting' AND deadline IS NOT NULL;

CREATE TABLE ms_signals (
    id          text PRIMARY KEY,
    target_id   text NOT NULL REFERENCES ms_runs (id) ON DELETE CASCADE,
    name        text NOT NULL,
    payload     text,
    dedup_key   text,
    created_at  real NOT NULL,
    consumed_at real
);
CREATE INDEX ms_signals_target ON ms_signals (target_id);
CREATE UNIQUE INDEX ms_signals_dedup ON ms_signals (target_id, dedup_key) WHERE dedup_key IS NOT NULL;

CREATE TABLE ms_rate_limits (
    name       text PRIMARY KEY,
    allowed    integer NOT NULL CHECK (allowed >= 1),
    period     real NOT NULL CHECK (period > 0),
    burst      integer NOT NULL CHECK (burst >= 1),
    updated_at real NOT NULL
);

-- One bucket per key ("name" or "name:partition"). tokens NULL = full.
CREATE TABLE ms_rate_buckets (
    key         text PRIMARY KEY,
    name        text NOT NULL,
    tokens      real,
    refilled_at real NOT NULL
);
