-- Every statement the SQLite backend runs. Parameters are named (:name); times
-- are unix seconds passed in as :now, so every process on the machine agrees.
-- Batches arrive as one JSON array parameter, read with json_each.

-- insert_runs --
-- Insert a batch of runs; duplicates of a live correlation_key or an existing
-- id are skipped. Returns the ids actually inserted.
INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                     timeout, correlation_key, concurrency_key, parent_id, input, attributes,
                     created_at, updated_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]'), coalesce(json_extract(value, '$[7]'), :now),
       json_extract(value, '$[8]'), json_extract(value, '$[9]'), json_extract(value, '$[10]'),
       json_extract(value, '$[11]'), json_extract(value, '$[12]'), json_extract(value, '$[13]'),
       json_extract(value, '$[14]'), :now, :now
FROM json_each(:runs) WHERE true
ON CONFLICT DO NOTHING
RETURNING id, queue, state

-- live_correlation_ids --
-- The non-terminal runs holding these correlation keys (a JSON array).
SELECT correlation_key, id FROM ms_runs
WHERE correlation_key IN (SELECT value FROM json_each(:keys))
  AND state IN ('scheduled', 'available', 'running', 'waiting')

-- claim_runs --
-- Claim up to :n available runs of :queue in priority then run_at order,
-- skipping runs whose concurrency key is held; OR IGNORE drops a second run of
-- the same key in one batch (the unique index refuses it). Stamps the lease
-- and a new fence. Runs inside the claim transaction, one queue at a time.
UPDATE OR IGNORE ms_runs
SET state = 'running', attempt = attempt + 1, fence = fence + 1, lease_owner = :node,
    lease_expires_at = :now + :ttl, started_at = :now, updated_at = :now
WHERE id IN (
    SELECT r.id FROM ms_runs r
    WHERE r.state = 'available' AND r.queue = :queue
      AND (r.concurrency_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM ms_runs h
            WHERE h.concurrency_key = r.concurrency_key AND h.state = 'running'))
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT :n)
RETURNING id, kind, name, queue, input, attempt, max_attempts, fence, timeout, created_at

-- queue_free_slots --
-- Free slots of a globally limited queue (NULL when it has no limit).
SELECT q.global_limit - (
    SELECT count(*) FROM ms_runs r WHERE r.queue = q.name AND r.state = 'running')
FROM ms_queues q WHERE q.name = :queue AND q.global_limit IS NOT NULL

-- commit_outcomes --
-- Write attempt outcomes (a JSON array of [id, fence, state, output, error,
-- run_at, refund]) where the fence still matches; returns the ids written.
-- Every change of owner or state bumps the fence (claim, reap, cancel, and this
-- commit), so the fence alone proves the run is still ours and running.
UPDATE ms_runs
SET state = o.state,
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
             json_extract(value, '$[6]') AS refund
      FROM json_each(:outcomes)) AS o
WHERE ms_runs.id = o.id AND ms_runs.fence = o.fence
RETURNING ms_runs.id

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

-- next_due --
-- When the next scheduled run is due.
SELECT min(run_at) FROM ms_runs WHERE state = 'scheduled'

-- reap_expired --
-- Runs whose lease expired go back to available (or failed on their last
-- attempt) under a new fence, so the silent owner can never commit.
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
RETURNING id, state, queue

-- delete_terminal --
-- Delete one batch of terminal runs finished before :before.
DELETE FROM ms_runs
WHERE id IN (SELECT id FROM ms_runs
             WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at < :before
             ORDER BY finished_at LIMIT :limit)

-- pending_before --
-- Runs of the queues (a JSON array) available, running, or scheduled before :moment.
SELECT count(*) FROM ms_runs
WHERE queue IN (SELECT value FROM json_each(:queues))
  AND (state IN ('available', 'running') OR (state = 'scheduled' AND run_at < :moment))

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

-- cancel_run --
-- Cancel a non-terminal run; a running one gets a new fence.
UPDATE ms_runs
SET state = 'cancelled', fence = fence + 1, finished_at = :now,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id = :id AND state NOT IN ('completed', 'failed', 'cancelled')
RETURNING id

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
