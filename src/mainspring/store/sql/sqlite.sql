-- Every statement the SQLite backend runs. Parameters are named (:name); times
-- are unix seconds passed in as :now, so every process on the machine agrees.
-- Batches arrive as one JSON array parameter, read with json_each.

-- insert_runs --
-- Insert a batch of runs; duplicates of a live correlation_key or an existing
-- id are skipped. Returns the runs actually inserted.
INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                     timeout, correlation_key, concurrency_key, parent_id, input, attributes,
                     step, state_data, rate_limit, weight, version, heartbeat_timeout,
                     idempotency_key, created_at, updated_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]'), coalesce(json_extract(value, '$[7]'), :now),
       json_extract(value, '$[8]'), json_extract(value, '$[9]'), json_extract(value, '$[10]'),
       json_extract(value, '$[11]'), json_extract(value, '$[12]'), json_extract(value, '$[13]'),
       json_extract(value, '$[14]'), json_extract(value, '$[15]'), json_extract(value, '$[16]'),
       json_extract(value, '$[17]'), json_extract(value, '$[18]'), json_extract(value, '$[19]'),
       json_extract(value, '$[20]'), json_extract(value, '$[21]'), :now, :now
FROM json_each(:runs) WHERE true
ON CONFLICT DO NOTHING
RETURNING id, queue, state, rate_limit

-- ensure_buckets --
-- Create the token buckets of these keys (a JSON array of "name" or
-- "name:partition"); a new bucket is full (tokens NULL).
INSERT OR IGNORE INTO ms_rate_buckets (key, name, tokens, refilled_at)
SELECT DISTINCT value, substr(value, 1, instr(value || ':', ':') - 1), NULL, :now
FROM json_each(:keys)

-- live_correlation_ids --
-- The non-terminal runs holding these correlation keys (a JSON array).
SELECT correlation_key, id FROM ms_runs
WHERE correlation_key IN (SELECT value FROM json_each(:keys))
  AND state IN ('scheduled', 'available', 'running', 'waiting')

-- claim_runs --
-- Claim up to :n available runs of :queue without a rate limit in priority
-- then run_at order, skipping runs whose concurrency key is held; OR IGNORE
-- drops a second run of the same key in one batch (the unique index refuses
-- it). Stamps the lease and a new fence. Runs inside the claim transaction,
-- one queue at a time.
UPDATE OR IGNORE ms_runs
SET state = 'running', attempt = attempt + 1, fence = fence + 1, lease_owner = :node,
    lease_expires_at = :now + :ttl, started_at = :now, updated_at = :now
WHERE id IN (
    SELECT r.id FROM ms_runs r
    WHERE r.state = 'available' AND r.queue = :queue AND r.rate_limit IS NULL
      AND (r.concurrency_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM ms_runs h
            WHERE h.concurrency_key = r.concurrency_key AND h.state = 'running'))
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT :n)
RETURNING id, kind, name, queue, input, attempt, max_attempts, fence, timeout, created_at,
          parent_id, step, state_data, signal_seq, awaits, version, rate_limit, weight

-- rated_buckets --
-- The configured buckets that have available runs in the queues (a JSON
-- array), with their tokens refilled lazily to :now: tokens + elapsed *
-- allowed / period, at most burst; NULL tokens is a full bucket.
SELECT b.key,
       min(l.burst, coalesce(b.tokens, l.burst)
                    + max(0.0, :now - b.refilled_at) * l.allowed / l.period) AS tokens
FROM ms_rate_buckets b JOIN ms_rate_limits l ON l.name = b.name
WHERE EXISTS (SELECT 1 FROM ms_runs r
              WHERE r.state = 'available' AND r.rate_limit = b.key
                AND r.queue IN (SELECT value FROM json_each(:queues)))
ORDER BY b.key

-- rated_candidates --
-- Up to :n available runs of bucket :key in the queues (a JSON array), in
-- claim order, skipping runs whose concurrency key is held.
SELECT r.id, r.queue, r.priority, r.run_at, r.concurrency_key, r.rate_limit, r.weight
FROM ms_runs r
WHERE r.state = 'available' AND r.rate_limit = :key
  AND r.queue IN (SELECT value FROM json_each(:queues))
  AND (r.concurrency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM ms_runs h
        WHERE h.concurrency_key = r.concurrency_key AND h.state = 'running'))
ORDER BY r.priority DESC, r.run_at, r.id
LIMIT :n

-- claim_granted --
-- Claim the runs their buckets granted (a JSON array of ids), as claim_runs does.
UPDATE OR IGNORE ms_runs
SET state = 'running', attempt = attempt + 1, fence = fence + 1, lease_owner = :node,
    lease_expires_at = :now + :ttl, started_at = :now, updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'available'
RETURNING id, kind, name, queue, input, attempt, max_attempts, fence, timeout, created_at,
          parent_id, step, state_data, signal_seq, awaits, version, rate_limit, weight

-- debit_bucket --
-- Store a bucket's tokens as of :now (after a grant).
UPDATE ms_rate_buckets SET tokens = :tokens, refilled_at = :now WHERE key = :key

-- queue_free_slots --
-- Free slots of a globally limited queue (NULL when it has no limit).
SELECT q.global_limit - (
    SELECT count(*) FROM ms_runs r WHERE r.queue = q.name AND r.state = 'running')
FROM ms_queues q WHERE q.name = :queue AND q.global_limit IS NOT NULL

-- commit_outcomes --
-- Write attempt outcomes where the fence still matches; returns the rows
-- written. Each outcome is a JSON array [id, fence, state, output, error,
-- run_at, refund, seen_seq] (commit_steps reads more, this statement ignores
-- them). A re-park (waiting, the run's awaits kept) whose run got a signal
-- since the claim (signal_seq moved past seen_seq) becomes available instead.
-- Every change of owner or state bumps the fence (claim, reap, cancel, and this
-- commit), so the fence alone proves the run is still ours and running.
UPDATE ms_runs
SET state = CASE WHEN o.state = 'waiting' AND ms_runs.signal_seq <> o.seen_seq
                      AND ms_runs.awaits IS NOT NULL
                 THEN 'available' ELSE o.state END,
    output = o.output,
    error = coalesce(o.error, ms_runs.error),
    run_at = coalesce(o.run_at, ms_runs.run_at),
    attempt = ms_runs.attempt - o.refund,
    fence = ms_runs.fence + 1,
    finished_at = CASE WHEN o.state IN ('completed', 'failed', 'cancelled') THEN :now END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = :now
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS fence,
             json_extract(value, '$[2]') AS state, json_extract(value, '$[3]') AS output,
             json_extract(value, '$[4]') AS error, json_extract(value, '$[5]') AS run_at,
             json_extract(value, '$[6]') AS refund, json_extract(value, '$[7]') AS seen_seq
      FROM json_each(:outcomes)) AS o
WHERE ms_runs.id = o.id AND ms_runs.fence = o.fence
RETURNING ms_runs.id, ms_runs.state, ms_runs.queue, ms_runs.parent_id, ms_runs.rate_limit,
          ms_runs.signal_seq

-- commit_steps --
-- The same for a batch with machine steps (kept apart: reading and writing the
-- step columns costs the plain batches a fifth of their commit). An outcome
-- with a step is followed by [step, state_data, reset, awaits, wake_step,
-- deadline, rate_limit, weight, children], and those columns are written; a
-- park (waiting with awaits) whose run got a signal since the claim becomes
-- available instead, so the await is re-checked.
UPDATE ms_runs
SET state = CASE WHEN o.state = 'waiting' AND ms_runs.signal_seq <> o.seen_seq
                      AND CASE WHEN o.step IS NOT NULL THEN o.awaits IS NOT NULL
                               ELSE ms_runs.awaits IS NOT NULL END
                 THEN 'available' ELSE o.state END,
    output = o.output,
    error = coalesce(o.error, ms_runs.error),
    run_at = coalesce(o.run_at, ms_runs.run_at),
    attempt = CASE WHEN o.reset THEN 0 ELSE ms_runs.attempt - o.refund END,
    fence = ms_runs.fence + 1,
    finished_at = CASE WHEN o.state IN ('completed', 'failed', 'cancelled') THEN :now END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = :now,
    step = CASE WHEN o.step IS NOT NULL THEN o.step ELSE ms_runs.step END,
    state_data = CASE WHEN o.step IS NOT NULL THEN o.state_data ELSE ms_runs.state_data END,
    awaits = CASE WHEN o.step IS NOT NULL THEN o.awaits ELSE ms_runs.awaits END,
    wake_step = CASE WHEN o.step IS NOT NULL THEN o.wake_step ELSE ms_runs.wake_step END,
    deadline = CASE WHEN o.step IS NOT NULL THEN o.deadline ELSE ms_runs.deadline END,
    rate_limit = CASE WHEN o.step IS NOT NULL THEN o.rate_limit ELSE ms_runs.rate_limit END,
    weight = CASE WHEN o.step IS NOT NULL THEN o.weight ELSE ms_runs.weight END,
    children_pending = CASE WHEN o.step IS NOT NULL THEN o.children
                            ELSE ms_runs.children_pending END
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS fence,
             json_extract(value, '$[2]') AS state, json_extract(value, '$[3]') AS output,
             json_extract(value, '$[4]') AS error, json_extract(value, '$[5]') AS run_at,
             json_extract(value, '$[6]') AS refund, json_extract(value, '$[7]') AS seen_seq,
             json_extract(value, '$[8]') AS step, json_extract(value, '$[9]') AS state_data,
             json_extract(value, '$[10]') AS reset, json_extract(value, '$[11]') AS awaits,
             json_extract(value, '$[12]') AS wake_step, json_extract(value, '$[13]') AS deadline,
             json_extract(value, '$[14]') AS rate_limit, json_extract(value, '$[15]') AS weight,
             json_extract(value, '$[16]') AS children
      FROM json_each(:outcomes)) AS o
WHERE ms_runs.id = o.id AND ms_runs.fence = o.fence
RETURNING ms_runs.id, ms_runs.state, ms_runs.queue, ms_runs.parent_id, ms_runs.rate_limit,
          ms_runs.signal_seq

-- consume_signals --
-- Mark signals consumed (a JSON array of [run id, signal id]).
UPDATE ms_signals SET consumed_at = :now
FROM (SELECT json_extract(value, '$[0]') AS run_id, json_extract(value, '$[1]') AS signal_id
      FROM json_each(:pairs)) AS c
WHERE ms_signals.id = c.signal_id AND ms_signals.target_id = c.run_id
  AND ms_signals.consumed_at IS NULL

-- clear_inboxes --
-- Mark every unconsumed signal of these runs (a JSON array of ids) consumed.
UPDATE ms_signals SET consumed_at = :now
WHERE target_id IN (SELECT value FROM json_each(:ids)) AND consumed_at IS NULL

-- fan_in --
-- Count finished children toward their parents' fan-in (a JSON array of
-- parent ids, one per finished child): a waiting parent whose last child
-- finished becomes available. Returns the parents' new state and queue.
UPDATE ms_runs
SET children_pending = ms_runs.children_pending - d.n, signal_seq = ms_runs.signal_seq + 1,
    state = CASE WHEN ms_runs.state = 'waiting'
                      AND (ms_runs.children_pending - d.n <= 0 OR ms_runs.kind = 'workflow')
                 THEN 'available' ELSE ms_runs.state END,
    updated_at = :now
FROM (SELECT value AS parent_id, count(*) AS n FROM json_each(:parents) GROUP BY value) AS d
WHERE ms_runs.id = d.parent_id
RETURNING ms_runs.state, ms_runs.queue

-- inboxes --
-- The unconsumed signals of these runs (a JSON array of ids), oldest first.
SELECT target_id, id, name, payload, created_at FROM ms_signals
WHERE target_id IN (SELECT value FROM json_each(:ids)) AND consumed_at IS NULL
ORDER BY target_id, id

-- children --
-- The children of these runs (a JSON array of ids).
SELECT parent_id, id, kind, name, state, output, error FROM ms_runs
WHERE parent_id IN (SELECT value FROM json_each(:ids))
ORDER BY parent_id, id

-- children_by_id --
-- These children of these runs (a JSON array of [parent id, child id]).
SELECT c.parent_id, c.id, c.kind, c.name, c.state, c.output, c.error
FROM (SELECT json_extract(value, '$[0]') AS parent_id, json_extract(value, '$[1]') AS id
      FROM json_each(:pairs)) AS w
JOIN ms_runs c ON c.id = w.id AND c.parent_id = w.parent_id
ORDER BY c.parent_id, c.id

-- signal_target --
-- The run a signal sent by id goes to.
SELECT id, state FROM ms_runs WHERE id = :id

-- signal_target_by_key --
-- The run a signal sent by correlation key goes to: the live run holding the key.
SELECT id, state FROM ms_runs
WHERE correlation_key = :key AND state IN ('scheduled', 'available', 'running', 'waiting')

-- terminal_with_key --
-- A terminal run that held correlation key :key, if any (the latest to finish).
SELECT id, state FROM ms_runs
WHERE correlation_key = :key AND state IN ('completed', 'failed', 'cancelled')
ORDER BY finished_at DESC
LIMIT 1

-- insert_signal --
-- Put a signal in a run's inbox; nothing when the run already has one with
-- this dedup_key (or this id). Returns the id when written.
INSERT INTO ms_signals (id, target_id, name, payload, dedup_key, created_at)
VALUES (:id, :target, :name, :payload, :dedup_key, :now)
ON CONFLICT DO NOTHING
RETURNING id

-- signal_run --
-- A signal arrived: bump the run's signal_seq, and wake it when it waits for :name.
UPDATE ms_runs
SET signal_seq = signal_seq + 1,
    state = CASE WHEN state = 'waiting'
                      AND EXISTS (SELECT 1 FROM json_each(ms_runs.awaits) WHERE value = :name)
                 THEN 'available' ELSE state END,
    updated_at = :now
WHERE id = :id
RETURNING state, queue

-- heartbeat_run --
-- A job's heartbeat: keep its details, note the time (for its heartbeat
-- timeout) and extend its lease, under its fence.
UPDATE ms_runs SET state_data = :details, lease_expires_at = :now + :ttl, heartbeat_at = :now
WHERE id = :id AND fence = :fence AND kind = 'job'
RETURNING id

-- silent_runs --
-- Running runs with a heartbeat timeout that have gone longer than it without
-- a heartbeat (counting from their claim: a heartbeat of an earlier attempt
-- is older than started_at). Columns as claim_runs returns them.
SELECT id, kind, name, queue, input, attempt, max_attempts, fence, timeout, created_at,
       parent_id, step, state_data, signal_seq, awaits, version, rate_limit, weight
FROM ms_runs
WHERE heartbeat_timeout IS NOT NULL AND state = 'running'
  AND max(started_at, coalesce(heartbeat_at, started_at)) + heartbeat_timeout < :now
ORDER BY started_at
LIMIT :limit

-- completed_with_key --
-- The output of a completed run of task :name that held idempotency key :key, if any.
SELECT output FROM ms_runs
WHERE name = :name AND idempotency_key = :key AND state = 'completed'
LIMIT 1

-- extend_leases --
-- Push out the leases this node still holds (a JSON array of [id, fence]).
UPDATE ms_runs
SET lease_expires_at = :now + :ttl
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS fence
      FROM json_each(:held)) AS h
WHERE ms_runs.id = h.id AND ms_runs.fence = h.fence AND ms_runs.lease_owner = :node
RETURNING ms_runs.id

-- promote_due --
-- Scheduled runs whose time has come become available.
UPDATE ms_runs SET state = 'available', updated_at = :now
WHERE id IN (SELECT id FROM ms_runs WHERE state = 'scheduled' AND run_at <= :now
             ORDER BY run_at LIMIT :limit)
RETURNING queue

-- expire_awaits --
-- Waiting runs whose await deadline passed become available on their timeout
-- step (the await's step when it named none).
UPDATE ms_runs
SET state = 'available', step = coalesce(wake_step, step), awaits = NULL, deadline = NULL,
    wake_step = NULL, updated_at = :now
WHERE id IN (SELECT id FROM ms_runs WHERE state = 'waiting' AND deadline <= :now
             ORDER BY deadline LIMIT :limit)
RETURNING queue

-- next_due --
-- When the next scheduled run or await deadline is due.
SELECT min(due) FROM (
    SELECT min(run_at) AS due FROM ms_runs WHERE state = 'scheduled'
    UNION ALL
    SELECT min(deadline) FROM ms_runs WHERE state = 'waiting' AND deadline IS NOT NULL)

-- reap_expired --
-- Runs whose lease expired go back to available (or failed on their last
-- attempt) under a new fence, so the silent owner can never commit. Returns
-- parent_id and signal_seq for the fan-in and inbox of the runs that failed.
UPDATE ms_runs
SET state = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'available' END,
    error = json_object(
        'type', 'LeaseExpired',
        'message', 'lease held by node ' || coalesce(lease_owner, '?') || ' expired at '
                   || datetime(lease_expires_at, 'unixepoch') || ' UTC (node presumed dead or stalled)',
        'traceback', NULL),
    finished_at = CASE WHEN attempt >= max_attempts THEN :now END,
    fence = fence + 1, lease_owner = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id IN (SELECT id FROM ms_runs WHERE state = 'running' AND lease_expires_at < :now
             ORDER BY lease_expires_at LIMIT :limit)
RETURNING id, state, queue, parent_id, signal_seq

-- delete_terminal --
-- Delete one batch of terminal runs finished before :before; a child whose
-- parent is not terminal stays (the parent reads it). Returns the ids deleted.
DELETE FROM ms_runs
WHERE id IN (SELECT r.id FROM ms_runs r
             WHERE r.state IN ('completed', 'failed', 'cancelled') AND r.finished_at < :before
               AND (r.parent_id IS NULL OR NOT EXISTS (
                     SELECT 1 FROM ms_runs p
                     WHERE p.id = r.parent_id
                       AND p.state NOT IN ('completed', 'failed', 'cancelled')))
             ORDER BY r.finished_at LIMIT :limit)
RETURNING id

-- load_events --
-- The journals of these runs after a seq each (a JSON array of [id, seq]), in
-- seq order.
SELECT e.run_id, e.seq, e.kind, e.data
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS after
      FROM json_each(:runs)) AS t
JOIN ms_events e ON e.run_id = t.id AND e.seq > t.after
ORDER BY e.run_id, e.seq

-- append_events --
-- Append journal entries (a JSON array of [run_id, seq, kind, data-as-JSON-text]).
INSERT INTO ms_events (run_id, seq, kind, data, created_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), :now
FROM json_each(:events)

-- delete_events --
-- Delete the journals of these runs (a JSON array of ids); foreign keys are off.
DELETE FROM ms_events WHERE run_id IN (SELECT value FROM json_each(:ids))

-- delete_signals --
-- Delete the signals of these runs (a JSON array of ids); foreign keys are off.
DELETE FROM ms_signals WHERE target_id IN (SELECT value FROM json_each(:ids))

-- pending_before --
-- Runs of the queues (a JSON array) available, running, or scheduled (or
-- waiting with an await deadline) before :moment.
SELECT count(*) FROM ms_runs
WHERE queue IN (SELECT value FROM json_each(:queues))
  AND (state IN ('available', 'running') OR (state = 'scheduled' AND run_at < :moment)
       OR (state = 'waiting' AND deadline < :moment))

-- get_runs --
-- Full rows of runs by id (a JSON array).
SELECT * FROM ms_runs WHERE id IN (SELECT value FROM json_each(:ids))

-- list_runs --
-- Newest first, optional filters on state, queue and name, paged by id.
SELECT * FROM ms_runs
WHERE (:state IS NULL OR state = :state)
  AND (:queue IS NULL OR queue = :queue)
  AND (:name IS NULL OR name = :name)
  AND (:before_id IS NULL OR id < :before_id)
ORDER BY id DESC
LIMIT :limit

-- cancel_tree --
-- A run and its descendants that are not terminal, with their state, parent
-- and signal_seq.
WITH RECURSIVE tree (id) AS (
    SELECT :id
    UNION
    SELECT c.id FROM ms_runs c JOIN tree ON c.parent_id = tree.id)
SELECT r.id, r.state, r.parent_id, r.signal_seq FROM ms_runs r JOIN tree ON r.id = tree.id
WHERE r.state NOT IN ('completed', 'failed', 'cancelled')

-- cancel_runs --
-- Cancel non-terminal runs (a JSON array of ids); running ones get a new fence.
UPDATE ms_runs
SET state = 'cancelled', fence = fence + 1, finished_at = :now,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids))
  AND state NOT IN ('completed', 'failed', 'cancelled')

-- retry_run --
-- A failed or cancelled run becomes available again, allowing one more attempt.
UPDATE ms_runs
SET state = 'available', run_at = :now, finished_at = NULL, updated_at = :now,
    max_attempts = max(max_attempts, attempt + 1)
WHERE id = :id AND state IN ('failed', 'cancelled')
RETURNING id, queue

-- running_with_key --
-- The running run that holds a concurrency key.
SELECT * FROM ms_runs WHERE concurrency_key = :key AND state = 'running'

-- count_ahead --
-- Available runs of :queue that claim order puts before (:priority, :run_at, :id).
SELECT count(*) FROM ms_runs
WHERE state = 'available' AND queue = :queue
  AND (priority > :priority OR (priority = :priority AND (run_at < :run_at
       OR (run_at = :run_at AND id < :id))))

-- queue_counts --
-- Runs of a queue by state.
SELECT state, count(*) FROM ms_runs WHERE queue = :queue GROUP BY state

-- queue_limit --
-- A queue's global limit.
SELECT global_limit FROM ms_queues WHERE name = :queue

-- set_queue_limit --
-- Record a queue's global limit.
INSERT INTO ms_queues (name, global_limit, updated_at) VALUES (:queue, :limit, :now)
ON CONFLICT (name) DO UPDATE SET global_limit = excluded.global_limit, updated_at = :now

-- heartbeat_node --
-- Register this node or refresh its heartbeat.
INSERT INTO ms_nodes (name, started_at, heartbeat_at, queues, tasks, concurrency, status)
VALUES (:name, :now, :now, :queues, :tasks, :concurrency, :status)
ON CONFLICT (name) DO UPDATE
SET heartbeat_at = :now, queues = excluded.queues, tasks = excluded.tasks,
    concurrency = excluded.concurrency, status = excluded.status

-- remove_node --
-- Forget a node that shut down cleanly.
DELETE FROM ms_nodes WHERE name = :name

-- list_nodes --
-- Every node, alive when its heartbeat is younger than :within seconds.
SELECT name, started_at, heartbeat_at, queues, tasks, concurrency, status,
       heartbeat_at > :now - :within AS alive
FROM ms_nodes ORDER BY name

-- prune_nodes --
-- Delete nodes whose heartbeat is older than :after seconds.
DELETE FROM ms_nodes WHERE heartbeat_at < :now - :after RETURNING name

-- set_rate_limit --
-- Create or replace a rate limit's configuration.
INSERT INTO ms_rate_limits (name, allowed, period, burst, updated_at)
VALUES (:name, :allowed, :period, :burst, :now)
ON CONFLICT (name) DO UPDATE
SET allowed = excluded.allowed, period = excluded.period, burst = excluded.burst,
    updated_at = :now

-- rate_limit_configs --
-- Every configured rate limit.
SELECT name, allowed, period, burst FROM ms_rate_limits ORDER BY name

-- rate_limit_status --
-- The buckets of rate limit :name: tokens refilled to :now (as in
-- rated_buckets) and the runs waiting on each.
SELECT b.key,
       min(l.burst, coalesce(b.tokens, l.burst)
                    + max(0.0, :now - b.refilled_at) * l.allowed / l.period) AS tokens,
       (SELECT count(*) FROM ms_runs r
        WHERE r.state = 'available' AND r.rate_limit = b.key) AS waiting
FROM ms_rate_buckets b JOIN ms_rate_limits l ON l.name = b.name
WHERE b.name = :name
ORDER BY b.key

-- prune_rate_buckets --
-- Delete buckets that have refilled to their burst and that no available run
-- names: a bucket that comes back starts full, so nothing is lost.
DELETE FROM ms_rate_buckets
WHERE key IN (
    SELECT b.key FROM ms_rate_buckets b JOIN ms_rate_limits l ON l.name = b.name
    WHERE coalesce(b.tokens, l.burst) + (:now - b.refilled_at) * l.allowed / l.period >= l.burst
      AND NOT EXISTS (SELECT 1 FROM ms_runs r
                      WHERE r.state = 'available' AND r.rate_limit = b.key))

-- has_rate_limits --
-- Whether any rate limit is configured (the claim then grants from buckets).
SELECT EXISTS (SELECT 1 FROM ms_rate_limits)

-- == assets (mainspring.assets) ==================================================

-- record_materialization --
-- Write a finished materialization; an upsert by id, so a step executed again
-- after a crash rewrites its own row instead of adding one.
INSERT INTO ms_materializations (id, asset, partition, run_id, status, value_ref, upstream,
                                 metadata, error, started_at, finished_at, duration_ms)
VALUES (:id, :asset, :partition, :run_id, :status, :value_ref, :upstream, :metadata, :error,
        :started_at, :finished_at, :duration_ms)
ON CONFLICT (id) DO UPDATE
SET status = excluded.status, value_ref = excluded.value_ref, upstream = excluded.upstream,
    metadata = excluded.metadata, error = excluded.error, finished_at = excluded.finished_at,
    duration_ms = excluded.duration_ms, invalidated_at = NULL

-- record_lineage --
-- The lineage edges of a materialization (:upstream, a JSON array of {"id": ...}).
INSERT OR IGNORE INTO ms_lineage (materialization_id, upstream_id)
SELECT :id, json_extract(value, '$.id') FROM json_each(:upstream)

-- latest_materializations --
-- The latest completed materialization of each (asset, partition) of assets
-- :assets (a JSON array; partitions :partitions, or every one when NULL).
SELECT * FROM (
    SELECT m.*, row_number() OVER (PARTITION BY asset, partition
                                   ORDER BY finished_at DESC, id DESC) AS rank
    FROM ms_materializations m
    WHERE asset IN (SELECT value FROM json_each(:assets)) AND status = 'completed'
      AND (:partitions IS NULL OR partition IN (SELECT value FROM json_each(:partitions)))
) WHERE rank = 1

-- list_materializations --
-- The materializations of :asset (of :partition when not NULL), newest first.
SELECT * FROM ms_materializations
WHERE asset = :asset AND (:partition IS NULL OR partition = :partition)
ORDER BY finished_at DESC, id DESC
LIMIT :limit

-- get_materializations --
-- Materializations by id (a JSON array).
SELECT * FROM ms_materializations WHERE id IN (SELECT value FROM json_each(:ids))

-- downstream_materializations --
-- The materializations built from any of :ids (a JSON array).
SELECT m.* FROM ms_lineage l JOIN ms_materializations m ON m.id = l.materialization_id
WHERE l.upstream_id IN (SELECT value FROM json_each(:ids))

-- invalidate_materializations --
-- Mark the latest completed materialization of each pair of :pairs (a JSON
-- array of [asset, partition]; a null partition: every partition) invalidated.
UPDATE ms_materializations SET invalidated_at = :now
WHERE invalidated_at IS NULL AND id IN (
    SELECT id FROM (
        SELECT m.id, row_number() OVER (PARTITION BY m.asset, m.partition
                                        ORDER BY m.finished_at DESC, m.id DESC) AS rank
        FROM ms_materializations m
        JOIN json_each(:pairs) w
          ON m.asset = json_extract(w.value, '$[0]')
         AND (json_extract(w.value, '$[1]') IS NULL OR m.partition = json_extract(w.value, '$[1]'))
        WHERE m.status = 'completed'
    ) WHERE rank = 1
)

-- put_asset_value --
-- Store a value DbIO keeps out of line.
INSERT INTO ms_asset_values (key, data, compressed) VALUES (:key, :data, :compressed)
ON CONFLICT (key) DO UPDATE SET data = excluded.data, compressed = excluded.compressed

-- get_asset_value --
-- A value DbIO stored out of line.
SELECT data, compressed FROM ms_asset_values WHERE key = :key

-- start_barrier --
-- Create a scatter barrier (an upsert: a step executed again reuses it).
INSERT INTO ms_scatter_barriers (id, asset, partition, run_id, total, status, created_at)
VALUES (:id, :asset, :partition, :run_id, 0, 'executing', :now)
ON CONFLICT (id) DO NOTHING

-- mark_scatter_key --
-- Key :hash (:key JSON) joins barrier :barrier for (asset, partition): when
-- completed there from the same :inputs it stays completed, else it becomes
-- pending. Returns its status.
INSERT INTO ms_scatter_results (asset, partition, key_hash, key, inputs, barrier_id, status,
                                updated_at)
VALUES (:asset, :partition, :hash, :key, :inputs, :barrier, 'pending', :now)
ON CONFLICT (asset, partition, key_hash) DO UPDATE
SET barrier_id = excluded.barrier_id, updated_at = excluded.updated_at,
    status = CASE WHEN status = 'completed' AND inputs = excluded.inputs
                  THEN 'completed' ELSE 'pending' END,
    result = CASE WHEN status = 'completed' AND inputs = excluded.inputs THEN result END,
    compressed = CASE WHEN status = 'completed' AND inputs = excluded.inputs
                      THEN compressed ELSE 0 END,
    error = NULL, inputs = excluded.inputs
RETURNING status

-- count_barrier --
-- Set a barrier's total and skipped counts.
UPDATE ms_scatter_barriers SET total = :total, skipped = :skipped WHERE id = :id

-- write_scatter_result --
-- Record one instance's outcome in barrier :barrier.
UPDATE ms_scatter_results
SET status = :status, result = :result, compressed = :compressed, error = :error,
    updated_at = :now
WHERE barrier_id = :barrier AND key_hash = :hash

-- close_barrier --
-- A barrier's final counts and status.
UPDATE ms_scatter_barriers
SET completed = (SELECT count(*) FROM ms_scatter_results
                 WHERE barrier_id = :id AND status = 'completed'),
    failed = (SELECT count(*) FROM ms_scatter_results WHERE barrier_id = :id AND status = 'failed'),
    status = :status, finished_at = :now
WHERE id = :id

-- barrier_results --
-- Every key of barrier :barrier with its status and result.
SELECT key_hash, key, status, result, compressed, error FROM ms_scatter_results
WHERE barrier_id = :barrier

-- list_barriers --
-- The scatter barriers of :asset (:partition when not NULL), newest first.
SELECT * FROM ms_scatter_barriers
WHERE asset = :asset AND (:partition IS NULL OR partition = :partition)
ORDER BY created_at DESC, id DESC
LIMIT :limit

-- count_children --
-- The children of runs :ids (a JSON array) counted by state.
SELECT parent_id, state, count(*) AS n FROM ms_runs
WHERE parent_id IN (SELECT value FROM json_each(:ids))
GROUP BY parent_id, state

-- create_gate --
-- Open a gate (an upsert: a step executed again moves a waiting gate's expiry;
-- a gate a signal opened first gets its asset and keeps its status).
INSERT INTO ms_gates (id, run_id, asset, partition, status, expires_at, round, created_at)
VALUES (:id, :run_id, :asset, :partition, 'waiting', :expires_at, :round, :now)
ON CONFLICT (id) DO UPDATE
SET asset = excluded.asset, partition = excluded.partition,
    expires_at = CASE WHEN status = 'waiting' THEN excluded.expires_at ELSE expires_at END

-- open_gate --
-- Open a gate as its token describes it unless it exists: a signal may come
-- before the asset has parked.
INSERT INTO ms_gates (id, run_id, asset, partition, status, expires_at, round, created_at)
VALUES (:id, :run_id, '', '', 'waiting', :expires_at, :round, :now)
ON CONFLICT (id) DO NOTHING

-- signal_gate --
-- A waiting, unexpired gate becomes signaled with :payload; returns its run.
UPDATE ms_gates SET status = 'signaled', payload = :payload, signaled_at = :now
WHERE id = :id AND status = 'waiting' AND expires_at > :now
RETURNING run_id

-- cancel_gate --
-- A gate is cancelled (its run finished before the signal came).
UPDATE ms_gates SET status = 'cancelled' WHERE id = :id

-- get_gate --
-- A gate by id.
SELECT * FROM ms_gates WHERE id = :id

-- close_gate --
-- A waiting gate becomes :status (timeout, cancelled).
UPDATE ms_gates SET status = :status WHERE id = :id AND status = 'waiting' RETURNING id

-- list_gates --
-- Gates in :status (any when NULL), oldest first.
SELECT * FROM ms_gates WHERE (:status IS NULL OR status = :status)
ORDER BY created_at, id LIMIT :limit

-- sweep_gates --
-- The gate sweeper: waiting gates whose run has finished (or is gone) become
-- cancelled, and waiting gates more than :grace seconds past their expiry
-- become timeout (their run's await deadline normally closes them first).
UPDATE ms_gates
SET status = CASE WHEN coalesce((SELECT r.state FROM ms_runs r WHERE r.id = ms_gates.run_id),
                                'gone') IN ('gone', 'completed', 'failed', 'cancelled')
                  THEN 'cancelled' ELSE 'timeout' END
WHERE status = 'waiting'
  AND (coalesce((SELECT r.state FROM ms_runs r WHERE r.id = ms_gates.run_id), 'gone')
           IN ('gone', 'completed', 'failed', 'cancelled')
       OR expires_at < :now - :grace)
RETURNING *

-- ensure_bucket --
-- Create bucket :key of limit :name (full) unless it exists.
INSERT OR IGNORE INTO ms_rate_buckets (key, name, tokens, refilled_at)
VALUES (:key, :name, NULL, :now)

-- bucket_tokens --
-- Bucket :key's tokens refilled to :now, with its limit's rate.
SELECT min(c.burst, coalesce(b.tokens, c.burst)
                    + max(0.0, :now - b.refilled_at) * c.allowed / c.period) AS tokens,
       c.allowed, c.period
FROM ms_rate_buckets b JOIN ms_rate_limits c ON c.name = b.name
WHERE b.key = :key

-- set_bucket_tokens --
-- Store a bucket's tokens as of :now.
UPDATE ms_rate_buckets SET tokens = :tokens, refilled_at = :now WHERE key = :key

-- reset_rate_buckets --
-- Refill every bucket of limit :name (they start full when next named).
DELETE FROM ms_rate_buckets WHERE name = :name

-- acquire_slot --
-- Take the lowest free slot (never held, or its lease lapsed) of :name among
-- :slots for :holder until :expires; returns the slot. (Writes are serialized
-- by SQLite's one writer, so no lock is needed.)
WITH RECURSIVE n(slot) AS (SELECT 0 UNION ALL SELECT slot + 1 FROM n WHERE slot + 1 < :slots)
INSERT INTO ms_slots (name, slot, holder, expires_at)
SELECT :name, slot, :holder, :expires FROM n
WHERE NOT EXISTS (SELECT 1 FROM ms_slots h WHERE h.name = :name AND h.slot = n.slot
                  AND h.expires_at > :now)
ORDER BY slot LIMIT 1
ON CONFLICT (name, slot) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
RETURNING slot

-- renew_slot --
-- Extend :holder's lease on :slot of :name; returns the slot when still held.
UPDATE ms_slots SET expires_at = :expires
WHERE name = :name AND slot = :slot AND holder = :holder AND expires_at > :now
RETURNING slot

-- release_slot --
-- Give back :slot of :name held by :holder.
DELETE FROM ms_slots WHERE name = :name AND slot = :slot AND holder = :holder RETURNING slot

-- list_slots --
-- The live slots of :name.
SELECT slot, holder, expires_at FROM ms_slots WHERE name = :name AND expires_at > :now
ORDER BY slot

-- reset_slots --
-- Release every slot of :name.
DELETE FROM ms_slots WHERE name = :name

-- ===========================================================================
-- The cluster layer (mainspring.cluster): KV, registry, process groups, hub.
-- SQLite has one writer, so revisions and log positions taken inside a write
-- commit in order. Times are epoch seconds (:now), liveness is a heartbeat
-- younger than :ttl seconds.
-- ===========================================================================

-- kv_get --
-- A live key's value (JSON text) and revision; expired keys are absent.
SELECT value, rev FROM ms_kv
WHERE key = :key AND value IS NOT NULL AND (expires_at IS NULL OR expires_at > :now)

-- kv_put --
-- Set a key (:expires_at or NULL); returns its new revision.
INSERT INTO ms_kv (key, value, rev, expires_at, updated_at)
VALUES (:key, :value, (SELECT coalesce(max(rev), 0) + 1 FROM ms_kv), :expires_at, :now)
ON CONFLICT (key) DO UPDATE
SET value = excluded.value, rev = excluded.rev, expires_at = excluded.expires_at,
    updated_at = :now
RETURNING rev

-- kv_delete --
-- Delete a live key (it becomes a tombstone for watchers); returns the revision.
UPDATE ms_kv SET value = NULL, rev = (SELECT coalesce(max(rev), 0) + 1 FROM ms_kv),
    expires_at = NULL, updated_at = :now
WHERE key = :key AND value IS NOT NULL AND (expires_at IS NULL OR expires_at > :now)
RETURNING rev

-- kv_cas_absent --
-- Create a key only if it is absent (never set, deleted or expired).
INSERT INTO ms_kv (key, value, rev, expires_at, updated_at)
VALUES (:key, :value, (SELECT coalesce(max(rev), 0) + 1 FROM ms_kv), :expires_at, :now)
ON CONFLICT (key) DO UPDATE
SET value = excluded.value, rev = excluded.rev, expires_at = excluded.expires_at,
    updated_at = :now
WHERE ms_kv.value IS NULL OR ms_kv.expires_at <= :now
RETURNING rev

-- kv_cas --
-- Replace a live key's value only if it equals :expected (compared as JSON values).
UPDATE ms_kv SET value = :value, rev = (SELECT coalesce(max(rev), 0) + 1 FROM ms_kv),
    expires_at = :expires_at, updated_at = :now
WHERE key = :key AND value IS NOT NULL AND (expires_at IS NULL OR expires_at > :now)
  AND json(value) = json(:expected)
RETURNING rev

-- kv_scan --
-- Live keys starting with :prefix, in key order.
SELECT key, value, rev FROM ms_kv
WHERE substr(key, 1, length(:prefix)) = :prefix AND value IS NOT NULL
  AND (expires_at IS NULL OR expires_at > :now)
ORDER BY key

-- kv_log --
-- Log a change (value NULL: a delete) for watchers, in the write's transaction.
INSERT INTO ms_kv_log (rev, key, value, created_at) VALUES (:rev, :key, :value, :now)

-- kv_log_start --
-- The oldest revision the change log keeps (a watcher behind it missed changes).
SELECT coalesce(min(rev), 0) FROM ms_kv_log

-- kv_changes --
-- Changes (values, or NULL for deletes) under :prefix after revision :after, in order.
SELECT key, value, rev FROM ms_kv_log
WHERE rev > :after AND substr(key, 1, length(:prefix)) = :prefix ORDER BY rev LIMIT :n

-- kv_head --
-- The latest revision.
SELECT coalesce(max(rev), 0) FROM ms_kv

-- kv_expired --
-- Live keys whose TTL has passed (each then becomes a tombstone with kv_tombstone).
SELECT key FROM ms_kv WHERE expires_at <= :now AND value IS NOT NULL ORDER BY key

-- kv_tombstone --
-- Turn a key into a tombstone with the next revision.
UPDATE ms_kv SET value = NULL, rev = (SELECT coalesce(max(rev), 0) + 1 FROM ms_kv),
    expires_at = NULL, updated_at = :now
WHERE key = :key
RETURNING rev

-- kv_prune --
-- Forget tombstones older than :age seconds (never the latest revision).
DELETE FROM ms_kv WHERE value IS NULL AND updated_at < :now - :age
  AND rev < (SELECT max(rev) FROM ms_kv)

-- kv_log_prune --
-- Forget change log entries older than :age seconds.
DELETE FROM ms_kv_log WHERE created_at < :now - :age

-- name_register --
-- Take a name for a pid: free names, names of dead nodes and the pid's own
-- name (idempotent: same token). Returns the token, or no row.
INSERT INTO ms_names (name, pid, node, token, updated_at) VALUES (:name, :pid, :node, 1, :now)
ON CONFLICT (name) DO UPDATE
SET pid = excluded.pid, node = excluded.node, updated_at = :now,
    token = CASE WHEN ms_names.pid = excluded.pid THEN ms_names.token ELSE ms_names.token + 1 END
WHERE ms_names.pid IS NULL OR ms_names.pid = excluded.pid OR NOT EXISTS (
    SELECT 1 FROM ms_nodes m WHERE m.name = ms_names.node AND m.heartbeat_at > :now - :ttl)
RETURNING token

-- name_lookup --
-- A name's holder and token, when held by a pid of a live node.
SELECT n.pid, n.token FROM ms_names n
JOIN ms_nodes m ON m.name = n.node AND m.heartbeat_at > :now - :ttl
WHERE n.name = :name AND n.pid IS NOT NULL

-- name_unregister --
-- Free a name (only if held by :pid, when given).
UPDATE ms_names SET pid = NULL, node = NULL, updated_at = :now
WHERE name = :name AND pid IS NOT NULL AND (:pid IS NULL OR pid = :pid)
RETURNING name

-- names_release_pids --
-- Free the names held by these pids (their processes exited).
UPDATE ms_names SET pid = NULL, node = NULL, updated_at = :now
WHERE pid IN (SELECT value FROM json_each(:pids)) RETURNING name

-- names_release_dead --
-- Free the names held on nodes whose heartbeat is older than :ttl seconds.
UPDATE ms_names SET pid = NULL, node = NULL, updated_at = :now
WHERE pid IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM ms_nodes m WHERE m.name = ms_names.node AND m.heartbeat_at > :now - :ttl)
RETURNING name

-- names_of --
-- Every held name (for the dashboard and tests).
SELECT name, pid, node, token FROM ms_names WHERE pid IS NOT NULL ORDER BY name

-- group_upsert --
-- Add deltas (:rows, JSON [scope, grp, pid, node, delta]; one per member) to counts.
INSERT INTO ms_group_members (scope, grp, pid, node, count)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each(:rows)
WHERE true
ON CONFLICT (scope, grp, pid) DO UPDATE SET count = ms_group_members.count + excluded.count

-- group_drop_empty --
-- Remove members whose count fell to zero.
DELETE FROM ms_group_members WHERE count <= 0

-- group_log --
-- Append membership changes (:rows as in group_upsert; :origin the writing node).
INSERT INTO ms_group_log (scope, grp, pid, node, delta, origin, created_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, :origin, :now
FROM json_each(:rows) ORDER BY key

-- group_remove_nodes --
-- Remove every membership of pids on these nodes; returns what was removed.
DELETE FROM ms_group_members WHERE node IN (SELECT value FROM json_each(:nodes))
RETURNING scope, grp, pid, node, count

-- group_remove_pids --
-- Remove every membership of these pids; returns what was removed.
DELETE FROM ms_group_members WHERE pid IN (SELECT value FROM json_each(:pids))
RETURNING scope, grp, pid, node, count

-- group_members_all --
-- The whole membership (a snapshot, read with group_head in one transaction).
SELECT scope, grp, pid, node, count FROM ms_group_members

-- group_head --
-- The latest group log position.
SELECT coalesce(max(seq), 0) FROM ms_group_log

-- group_tail --
-- Group log entries after :after, in order.
SELECT seq, scope, grp, pid, node, delta, origin FROM ms_group_log
WHERE seq > :after ORDER BY seq LIMIT :n

-- group_log_start --
-- The oldest group log position kept (a reader behind it reloads the snapshot).
SELECT coalesce(min(seq), 0) FROM ms_group_log

-- group_prune --
-- Forget group log entries older than :age seconds.
DELETE FROM ms_group_log WHERE created_at < :now - :age

-- hub_join --
-- This node serves the hub (not draining).
INSERT INTO ms_hub_nodes (node, joined_at) VALUES (:node, :now)
ON CONFLICT (node) DO UPDATE SET draining = 0

-- hub_leave --
-- This node no longer serves the hub.
DELETE FROM ms_hub_nodes WHERE node = :node

-- hub_drain --
-- Mark a node draining: placement leaves it out.
UPDATE ms_hub_nodes SET draining = 1 WHERE node = :node

-- hub_topology --
-- Hub nodes with their liveness and heartbeat age in seconds.
SELECT h.node, h.draining, coalesce(m.heartbeat_at > :now - :ttl, 0) AS alive,
       :now - m.heartbeat_at AS age
FROM ms_hub_nodes h LEFT JOIN ms_nodes m ON m.name = h.node ORDER BY h.node

-- hub_prune --
-- Forget hub nodes silent for more than :ttl seconds.
DELETE FROM ms_hub_nodes WHERE NOT EXISTS (
    SELECT 1 FROM ms_nodes m WHERE m.name = ms_hub_nodes.node AND m.heartbeat_at > :now - :ttl)
RETURNING node

-- proc_insert --
-- New children (:rows, JSON [child_id, name, args, metadata, nodes]); existing ids are skipped.
INSERT INTO ms_processes (child_id, name, args, metadata, nodes, created_at, updated_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, :now, :now
FROM json_each(:rows) WHERE true
ON CONFLICT (child_id) DO NOTHING
RETURNING child_id

-- proc_list --
-- Every child (the placement input).
SELECT child_id, name, state, nodes, metadata, incarnation, error FROM ms_processes

-- proc_instances --
-- Every running instance.
SELECT child_id, node, role, incarnation FROM ms_process_instances

-- proc_get --
-- Children by id with their started instances (JSON arrays of node and incarnation).
SELECT p.child_id, p.name, p.state, p.error, p.metadata,
       (SELECT json_group_array(node) FROM (SELECT node FROM ms_process_instances i
            WHERE i.child_id = p.child_id AND i.ready ORDER BY role)) AS nodes,
       (SELECT json_group_array(incarnation) FROM (SELECT incarnation FROM ms_process_instances i
            WHERE i.child_id = p.child_id AND i.ready ORDER BY role)) AS incarnations
FROM ms_processes p WHERE p.child_id IN (SELECT value FROM json_each(:ids))

-- proc_drop_instances --
-- Remove the instances on these nodes (dead ones); returns them.
DELETE FROM ms_process_instances WHERE node IN (SELECT value FROM json_each(:nodes))
RETURNING child_id, node, incarnation

-- proc_claim_insert --
-- Start instances of these children on :node with :role (skipped when the child
-- already has an active instance, or one on this node).
INSERT INTO ms_process_instances (child_id, node, role, incarnation)
SELECT p.child_id, :node, :role, p.incarnation + 1 FROM ms_processes p
WHERE p.child_id IN (SELECT value FROM json_each(:ids)) AND p.state = 'running'
ORDER BY p.child_id
ON CONFLICT DO NOTHING
RETURNING child_id, incarnation

-- proc_claim_update --
-- The claimed children (:rows, JSON [child_id, incarnation]) take their new
-- incarnation; returns them with their last state.
-- (The batch is a subquery so the plan drives from it through the primary key.)
UPDATE ms_processes SET incarnation = t.inc, updated_at = :now
FROM (SELECT value ->> 0 AS c, value ->> 1 AS inc FROM json_each(:rows)) AS t
WHERE ms_processes.child_id = t.c
RETURNING child_id, name, args, metadata, state_data, incarnation

-- proc_release_instance --
-- Give up the instances (:rows, JSON [child_id, incarnation, state]) of :node.
DELETE FROM ms_process_instances
WHERE node = :node AND (child_id, incarnation) IN (
    SELECT value ->> 0, value ->> 1 FROM json_each(:rows))
RETURNING child_id

-- proc_keep_state --
-- Keep children's handover state (:rows, JSON [child_id, incarnation, state]; NULL keeps the old).
UPDATE ms_processes SET state_data = coalesce(t.s, state_data), updated_at = :now
FROM (SELECT r.value ->> 0 AS c, r.value ->> 2 AS s FROM json_each(:rows) AS r
      WHERE r.value ->> 0 IN (SELECT value FROM json_each(:ids))) AS t
WHERE ms_processes.child_id = t.c

-- proc_transfer_insert --
-- Hand instances to their targets (:rows, JSON [child_id, incarnation, state,
-- target]): the new instance takes incarnation + 1 (after proc_release_instance).
INSERT INTO ms_process_instances (child_id, node, role, incarnation)
SELECT p.child_id, t.target, 'active', p.incarnation + 1
FROM (SELECT r.value ->> 0 AS c, r.value ->> 3 AS target FROM json_each(:rows) AS r
      WHERE r.value ->> 0 IN (SELECT value FROM json_each(:ids))) AS t
JOIN ms_processes p ON p.child_id = t.c
RETURNING child_id, node, incarnation

-- proc_bump --
-- Record the new incarnations of transferred children.
UPDATE ms_processes SET incarnation = incarnation + 1, updated_at = :now
WHERE child_id IN (SELECT value FROM json_each(:ids))

-- proc_checkpoint --
-- Persist a child's state, if instance (:node, :incarnation) still runs it.
UPDATE ms_processes SET state_data = :state, updated_at = :now
WHERE child_id = :id AND EXISTS (
    SELECT 1 FROM ms_process_instances i
    WHERE i.child_id = :id AND i.node = :node AND i.incarnation = :incarnation)
RETURNING child_id

-- proc_fail_instance --
-- Remove a failed child's instance on :node.
DELETE FROM ms_process_instances WHERE child_id = :id AND node = :node

-- proc_fail --
-- Mark a child failed with its error.
UPDATE ms_processes SET state = 'failed', error = :error, updated_at = :now
WHERE child_id = :id RETURNING child_id

-- proc_stop --
-- Ask for these children to stop (their nodes terminate them).
UPDATE ms_processes SET state = 'stopping', updated_at = :now
WHERE child_id IN (SELECT value FROM json_each(:ids)) RETURNING child_id

-- proc_drop_local --
-- Remove instances of these children on :node (they were terminated).
DELETE FROM ms_process_instances
WHERE child_id IN (SELECT value FROM json_each(:ids)) AND node = :node
RETURNING child_id

-- proc_delete_stopped --
-- Delete stopping or failed children (:ids) that no instance runs any more.
DELETE FROM ms_processes
WHERE child_id IN (SELECT value FROM json_each(:ids)) AND state IN ('stopping', 'failed')
  AND NOT EXISTS (SELECT 1 FROM ms_process_instances i WHERE i.child_id = ms_processes.child_id)
RETURNING child_id

-- mailbox_drop --
-- Delete the mailboxes of these (deleted) children.
DELETE FROM ms_mailbox WHERE child_id IN (SELECT value FROM json_each(:ids))

-- mailbox_put --
-- Durable messages (:rows, JSON [child_id, body, reply_to, name, token]), in order.
INSERT INTO ms_mailbox (child_id, body, reply_to, name, token, created_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, :now
FROM json_each(:rows) ORDER BY key

-- mailbox_take --
-- Messages for children whose active instance runs on :node (:ids) not yet delivered (:inflight
-- seqs), oldest first, with the current token of the name each was sent to.
SELECT m.seq, m.child_id, m.body, m.reply_to, m.token, n.token AS current_token,
       n.pid AS holder
FROM ms_mailbox m
JOIN ms_process_instances i ON i.child_id = m.child_id AND i.node = :node AND i.role = 'active'
LEFT JOIN ms_names n ON n.name = m.name
WHERE m.child_id IN (SELECT value FROM json_each(:ids))
  AND m.seq NOT IN (SELECT value FROM json_each(:inflight))
ORDER BY m.seq LIMIT :n

-- mailbox_ack --
-- Delete handled messages.
DELETE FROM ms_mailbox WHERE seq IN (SELECT value FROM json_each(:seqs))

-- reply_put --
-- Answers to remote calls (:rows, JSON [id, body, error]).
INSERT INTO ms_replies (id, body, error, created_at)
SELECT value ->> 0, value ->> 1, value ->> 2, :now FROM json_each(:rows) WHERE true
ON CONFLICT (id) DO NOTHING

-- reply_take --
-- Take the answers that arrived for these calls.
DELETE FROM ms_replies WHERE id IN (SELECT value FROM json_each(:ids))
RETURNING id, body, error

-- reply_prune --
-- Forget answers nobody took within :age seconds.
DELETE FROM ms_replies WHERE created_at < :now - :age

-- mailbox_prune --
-- Forget messages older than :age seconds to children that no longer exist.
DELETE FROM ms_mailbox WHERE created_at < :now - :age
  AND NOT EXISTS (SELECT 1 FROM ms_processes p WHERE p.child_id = ms_mailbox.child_id)

-- proc_state --
-- A child's args and last handover or checkpoint state.
SELECT args, state_data FROM ms_processes WHERE child_id = :id

-- proc_promote --
-- Make this node's passive replica the child's active instance (fails if one is active).
UPDATE ms_process_instances SET role = 'active'
WHERE child_id = :id AND node = :node AND role = 'passive'

-- proc_ready --
-- Instances (:rows, JSON [child_id, incarnation]) on :node whose init succeeded.
UPDATE ms_process_instances SET ready = 1
WHERE node = :node AND (child_id, incarnation) IN (
    SELECT value ->> 0, value ->> 1 FROM json_each(:rows))
