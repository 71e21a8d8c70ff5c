-- Assets: materializations with lineage, stored values, scatter results,
-- signal gates and limiter slots.

-- One row per finished materialization of (asset, partition); '' is the
-- partition of an unpartitioned asset. upstream lists the materializations it
-- was built from: [{"asset", "partition", "id"}].
CREATE TABLE ms_materializations (
    id             text PRIMARY KEY,
    asset          text NOT NULL,
    partition      text NOT NULL DEFAULT '',
    run_id         text,
    status         text NOT NULL,               -- completed, failed
    value_ref      text,                        -- where the IO manager put the value
    upstream       text NOT NULL DEFAULT '[]',
    metadata       text NOT NULL DEFAULT '{}',
    error          text,
    started_at     real NOT NULL,
    finished_at    real NOT NULL,
    duration_ms    real,
    invalidated_at real
);
CREATE INDEX ms_materializations_latest ON ms_materializations (asset, partition, finished_at DESC);

-- Lineage edges, for "what was built from this": materialization -> an upstream one.
CREATE TABLE ms_lineage (
    materialization_id text NOT NULL,
    upstream_id        text NOT NULL,
    PRIMARY KEY (materialization_id, upstream_id)
);
CREATE INDEX ms_lineage_upstream ON ms_lineage (upstream_id);

-- Values DbIO keeps out of line (large ones, zlib-compressed when it pays).
CREATE TABLE ms_asset_values (
    key        text PRIMARY KEY,
    data       blob NOT NULL,
    compressed integer NOT NULL DEFAULT 0
);

-- A scatter's barrier: how many keys it started, skipped (already done) and how they ended.
CREATE TABLE ms_scatter_barriers (
    id          text PRIMARY KEY,
    asset       text NOT NULL,
    partition   text NOT NULL DEFAULT '',
    run_id      text NOT NULL,
    total       integer NOT NULL,
    skipped     integer NOT NULL DEFAULT 0,
    completed   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    status      text NOT NULL,                  -- executing, completed, partial_failure, failed
    created_at  real NOT NULL,
    finished_at real
);
CREATE INDEX ms_scatter_barriers_asset ON ms_scatter_barriers (asset, partition, created_at);

-- The latest result of each scatter key of (asset, partition): a key done from
-- the same upstream materializations (inputs) is skipped when the asset is
-- materialized again. barrier_id is the last barrier that included the key.
CREATE TABLE ms_scatter_results (
    asset      text NOT NULL,
    partition  text NOT NULL DEFAULT '',
    key_hash   text NOT NULL,
    key        text NOT NULL,
    inputs     text NOT NULL,                   -- fingerprint of the upstream materializations
    barrier_id text NOT NULL,
    status     text NOT NULL,                   -- pending, completed, failed
    result     blob,
    compressed integer NOT NULL DEFAULT 0,
    error      text,
    updated_at real NOT NULL,
    PRIMARY KEY (asset, partition, key_hash)
);
CREATE INDEX ms_scatter_results_barrier ON ms_scatter_results (barrier_id, key_hash);

-- A signal gate: an asset run waiting for an external decision.
CREATE TABLE ms_gates (
    id          text PRIMARY KEY,
    run_id      text NOT NULL,
    asset       text NOT NULL,
    partition   text NOT NULL DEFAULT '',
    status      text NOT NULL,                  -- waiting, signaled, timeout, cancelled
    expires_at  real NOT NULL,
    round       integer NOT NULL DEFAULT 0,
    payload     text,
    created_at  real NOT NULL,
    signaled_at real
);
CREATE INDEX ms_gates_waiting ON ms_gates (expires_at) WHERE status = 'waiting';

-- Semaphore slots of the global limiter: a row is a held slot until its lease lapses.
CREATE TABLE ms_slots (
    name       text NOT NULL,
    slot       integer NOT NULL,
    holder     text NOT NULL,
    expires_at real NOT NULL,
    PRIMARY KEY (name, slot)
);
