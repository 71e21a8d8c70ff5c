-- Machines: steps with committed state, durable signals, fan-out/fan-in, and
-- token-bucket rate limits enforced in the claim.

ALTER TABLE ms_runs
    ADD COLUMN awaits           text[],       -- signal names a waiting run waits for
    ADD COLUMN wake_step        text,         -- the step an await's timeout runs
    ADD COLUMN deadline         timestamptz,  -- when a waiting run's await times out
    ADD COLUMN children_pending integer NOT NULL DEFAULT 0,
    ADD COLUMN signal_seq       bigint NOT NULL DEFAULT 0;  -- bumped by every signal

-- The claim index now holds only runs without a rate limit, so runs that carry
-- none never pay for rate limiting; rate-limited runs are claimed through
-- their bucket, by this second index.
DROP INDEX ms_runs_claim;
CREATE INDEX ms_runs_claim ON ms_runs (queue, priority DESC, run_at, id)
    WHERE state = 'available' AND rate_limit IS NULL;
CREATE INDEX ms_runs_rated ON ms_runs (rate_limit, priority DESC, run_at, id)
    WHERE state = 'available' AND rate_limit IS NOT NULL;
-- await timeouts
CREATE INDEX ms_runs_deadline ON ms_runs (deadline) WHERE state = 'waiting' AND deadline IS NOT NULL;

-- A run's durable inbox. Consumed signals stay (marked) until the run is
-- deleted, so a dedup_key is honoured for the run's whole life.
CREATE TABLE ms_signals (
    id          text PRIMARY KEY,
    target_id   text NOT NULL REFERENCES ms_runs (id) ON DELETE CASCADE,
    name        text NOT NULL,
    payload     json,
    dedup_key   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    consumed_at timestamptz
);
CREATE INDEX ms_signals_target ON ms_signals (target_id);
CREATE UNIQUE INDEX ms_signals_dedup ON ms_signals (target_id, dedup_key) WHERE dedup_key IS NOT NULL;

CREATE TABLE ms_rate_limits (
    name       text PRIMARY KEY,
    allowed    integer NOT NULL CHECK (allowed >= 1),
    period     double precision NOT NULL CHECK (period > 0),
    burst      integer NOT NULL CHECK (burst >= 1),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One bucket per key ("name" or "name:partition"). tokens NULL = full.
CREATE TABLE ms_rate_buckets (
    key         text PRIMARY KEY,
    name        text NOT NULL,
    tokens      double precision,
    refilled_at timestamptz NOT NULL DEFAULT now()
);
