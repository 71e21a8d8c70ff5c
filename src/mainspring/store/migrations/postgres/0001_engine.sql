-- The engine: runs of every kind, nodes, queue limits.

CREATE TABLE ms_runs (
    id               text PRIMARY KEY,
    kind             text NOT NULL DEFAULT 'job',
    name             text NOT NULL,
    namespace        text NOT NULL DEFAULT 'default',
    queue            text NOT NULL,
    state            text NOT NULL CHECK (state IN
                       ('scheduled','available','running','waiting','completed','failed','cancelled')),
    priority         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 20 CHECK (max_attempts >= 1),
    timeout          double precision,
    lease_owner      text,
    lease_expires_at timestamptz,
    fence            bigint NOT NULL DEFAULT 0,
    correlation_key  text,
    concurrency_key  text,
    rate_limit       text,
    weight           integer NOT NULL DEFAULT 1,
    parent_id        text,
    step             text,
    input            json,
    state_data       json,
    output           json,
    error            json,
    attributes       jsonb NOT NULL DEFAULT '{}'::jsonb,
    version          integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- claim: the head of each queue, in claim order, available runs only
CREATE INDEX ms_runs_claim ON ms_runs (queue, priority DESC, run_at, id) WHERE state = 'available';
-- timers: the next scheduled run
CREATE INDEX ms_runs_due ON ms_runs (run_at) WHERE state = 'scheduled';
-- running runs (only they hold a lease): the reaper's expired leases and the
-- running count of globally limited queues. Deliberately not "WHERE state =
-- 'running'": with that predicate the planner may drive the commit statement
-- from this index instead of the primary key.
CREATE INDEX ms_runs_lease ON ms_runs (queue, lease_expires_at) WHERE lease_expires_at IS NOT NULL;
-- at most one running run per concurrency key, enforced by the database itself
CREATE UNIQUE INDEX ms_runs_concurrency ON ms_runs (concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;
-- the business key is the dedup key while the run is not terminal
CREATE UNIQUE INDEX ms_runs_correlation ON ms_runs (correlation_key)
    WHERE state IN ('scheduled','available','running','waiting') AND correlation_key IS NOT NULL;
-- gc of terminal runs
CREATE INDEX ms_runs_finished ON ms_runs (finished_at)
    WHERE state IN ('completed','failed','cancelled');
CREATE INDEX ms_runs_parent ON ms_runs (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE ms_nodes (
    name         text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    queues       jsonb NOT NULL DEFAULT '[]'::jsonb,
    tasks        jsonb NOT NULL DEFAULT '[]'::jsonb,
    concurrency  integer NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'up'
);

CREATE TABLE ms_queues (
    name         text PRIMARY KEY,
    global_limit integer CHECK (global_limit IS NULL OR global_limit >= 1),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
