-- Every statement the PostgreSQL backend runs. Parameters are positional ($n).
-- Runs in scheduled/available state wait; running holds a lease under a fence.

-- insert_runs --
-- Insert a batch of runs (arrays, one element per run); duplicates of a live
-- correlation_key or an existing id are skipped. Returns the ids inserted and
-- the wake-up to send: queues that got available work, '~timer' for scheduled
-- runs. (The NOTIFY goes out after this commits: NOTIFY inside the insert would
-- hold PostgreSQL's global notify lock across the commit's fsync and serialize
-- every concurrent enqueue.)
WITH ins AS (
    INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                         timeout, correlation_key, concurrency_key, parent_id, input, attributes)
    SELECT i.id, i.kind, i.name, i.namespace, i.queue, i.state, i.priority,
           coalesce(i.run_at, now()), i.max_attempts, i.timeout, i.correlation_key,
           i.concurrency_key, i.parent_id, i.input, i.attributes
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::timestamptz[], $9::int[], $10::float8[], $11::text[],
                $12::text[], $13::text[], $14::json[], $15::jsonb[])
         AS i(id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
              timeout, correlation_key, concurrency_key, parent_id, input, attributes)
    ON CONFLICT DO NOTHING
    RETURNING id, queue, state
)
SELECT coalesce((SELECT array_agg(id) FROM ins), '{}'::text[]) AS ids,
       (SELECT string_agg(DISTINCT CASE WHEN state = 'available' THEN queue ELSE '~timer' END, ',')
        FROM ins) AS wake

-- insert_plain_runs --
-- The same for a batch whose runs all use the defaults of the other columns
-- (job kind, default namespace, no timeout, keys, parent or attributes): the
-- common case, with half the arrays to encode and unnest.
WITH ins AS (
    INSERT INTO ms_runs (id, name, queue, state, priority, run_at, max_attempts, input)
    SELECT i.id, i.name, i.queue, i.state, i.priority, coalesce(i.run_at, now()),
           i.max_attempts, i.input
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
                $7::int[], $8::json[])
         AS i(id, name, queue, state, priority, run_at, max_attempts, input)
    ON CONFLICT DO NOTHING
    RETURNING id, queue, state
)
SELECT coalesce((SELECT array_agg(id) FROM ins), '{}'::text[]) AS ids,
       (SELECT string_agg(DISTINCT CASE WHEN state = 'available' THEN queue ELSE '~timer' END, ',')
        FROM ins) AS wake

-- insert_run --
-- Insert one run (the single-enqueue path: no arrays to unnest). Returns its
-- id when inserted, nothing when its correlation_key is held or the id exists.
INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                     timeout, correlation_key, concurrency_key, parent_id, input, attributes)
VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT DO NOTHING
RETURNING id

-- live_correlation_ids --
-- The non-terminal runs holding these correlation keys.
SELECT correlation_key, id FROM ms_runs
WHERE correlation_key = ANY($1::text[])
  AND state IN ('scheduled', 'available', 'running', 'waiting')

-- claim_runs --
-- Claim up to n available runs per queue ($1 queues, $2 n per queue) in
-- priority then run_at order, skipping rows other nodes are claiming and runs
-- whose concurrency key is held; at most one run per key per batch. Stamps the
-- lease ($3 node, $4 ttl seconds) and a new fence. The update finds its rows
-- by ctid: they are locked by this statement, so their ctid cannot change
-- under it, and a TID scan spares a primary-key lookup per run.
WITH cand AS (
    SELECT c.ctid, c.id, c.concurrency_key, c.priority, c.run_at
    FROM unnest($1::text[], $2::int[]) AS q(queue, n)
    CROSS JOIN LATERAL (
        SELECT r.ctid, r.id, r.concurrency_key, r.priority, r.run_at
        FROM ms_runs r
        WHERE r.state = 'available' AND r.queue = q.queue
          AND (r.concurrency_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM ms_runs h
                WHERE h.concurrency_key = r.concurrency_key AND h.state = 'running'))
        ORDER BY r.priority DESC, r.run_at, r.id
        LIMIT q.n
        FOR UPDATE SKIP LOCKED
    ) c
), pick AS (
    SELECT DISTINCT ON (coalesce(concurrency_key, id)) ctid
    FROM cand
    ORDER BY coalesce(concurrency_key, id), priority DESC, run_at, id
)
UPDATE ms_runs r
SET state = 'running', attempt = r.attempt + 1, fence = r.fence + 1,
    lease_owner = $3, lease_expires_at = now() + make_interval(secs => $4),
    started_at = now(), updated_at = now()
WHERE r.ctid = ANY (ARRAY(SELECT ctid FROM pick))
RETURNING r.id, r.kind, r.name, r.queue, r.input::text AS input, r.attempt, r.max_attempts,
          r.fence, r.timeout, r.created_at

-- lock_queue --
-- Serialize claims on a queue with a global limit for the rest of the transaction.
SELECT pg_advisory_xact_lock(hashtext('mainspring.queue'), hashtext($1))

-- queue_free_slots --
-- Free slots of globally limited queues among $1 (global limit minus running runs).
SELECT q.name, q.global_limit - (
    SELECT count(*) FROM ms_runs r WHERE r.queue = q.name AND r.state = 'running') AS free
FROM ms_queues q
WHERE q.name = ANY($1::text[]) AND q.global_limit IS NOT NULL

-- limited_queues --
-- The queues among $1 that have a global limit.
SELECT name FROM ms_queues WHERE name = ANY($1::text[]) AND global_limit IS NOT NULL

-- commit_outcomes --
-- Write attempt outcomes where the fence still matches; returns the ids written.
-- Every change of owner or state bumps the fence (claim, reap, cancel, and this
-- commit itself), so the fence alone proves the run is still ours and still
-- running, and a repeated commit of the same outcome is refused. No filter on
-- state: its statistics would steer the planner away from the primary key.
UPDATE ms_runs r
SET state = o.state,
    output = o.output,
    error = coalesce(o.error, r.error),
    run_at = coalesce(o.run_at, r.run_at),
    attempt = r.attempt - o.refund,
    fence = r.fence + 1,
    finished_at = CASE WHEN o.state IN ('completed', 'failed', 'cancelled') THEN now() END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::json[], $5::json[], $6::timestamptz[],
            $7::int[]) AS o(id, fence, state, output, error, run_at, refund)
WHERE r.id = ANY($1::text[]) AND r.id = o.id AND r.fence = o.fence
RETURNING r.id

-- commit_completed --
-- The same for a batch of completions only (the common case): three arrays
-- to encode and unnest instead of seven.
UPDATE ms_runs r
SET state = 'completed', output = o.output, fence = r.fence + 1, finished_at = now(),
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::json[]) AS o(id, fence, output)
WHERE r.id = ANY($1::text[]) AND r.id = o.id AND r.fence = o.fence
RETURNING r.id

-- extend_leases --
-- Push out the leases this node ($3) still holds under their fence; returns the ids held.
UPDATE ms_runs r
SET lease_expires_at = now() + make_interval(secs => $4)
FROM unnest($1::text[], $2::bigint[]) AS h(id, fence)
WHERE r.id = ANY($1::text[]) AND r.id = h.id AND r.fence = h.fence AND r.lease_owner = $3
RETURNING r.id

-- promote_due --
-- Scheduled runs whose time has come become available.
WITH due AS (
    SELECT id FROM ms_runs
    WHERE state = 'scheduled' AND run_at <= now()
    ORDER BY run_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE ms_runs r SET state = 'available', updated_at = now()
FROM due WHERE r.id = due.id
RETURNING r.queue

-- next_due --
-- When the next scheduled run is due.
SELECT min(run_at) FROM ms_runs WHERE state = 'scheduled'

-- reap_expired --
-- Runs whose lease expired go back to available (or failed on their last
-- attempt) under a new fence, so the silent owner can never commit.
WITH dead AS (
    SELECT id FROM ms_runs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE ms_runs r
SET state = CASE WHEN r.attempt >= r.max_attempts THEN 'failed' ELSE 'available' END,
    error = json_build_object(
        'type', 'LeaseExpired',
        'message', 'lease held by node ' || coalesce(r.lease_owner, '?') || ' expired at '
                   || r.lease_expires_at::text || ' (node presumed dead or stalled)',
        'traceback', NULL),
    finished_at = CASE WHEN r.attempt >= r.max_attempts THEN now() END,
    fence = r.fence + 1, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM dead
WHERE r.id = dead.id
RETURNING r.id, r.state, r.queue

-- delete_terminal --
-- Delete one batch of terminal runs finished before $1.
WITH old AS (
    SELECT id FROM ms_runs
    WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at < $1
    ORDER BY finished_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM ms_runs r USING old WHERE r.id = old.id

-- pending_before --
-- Runs of queues $1 that are available, running, or scheduled before $2.
SELECT count(*) FROM ms_runs
WHERE queue = ANY($1::text[])
  AND (state IN ('available', 'running') OR (state = 'scheduled' AND run_at < $2))

-- get_runs --
-- Full rows of runs by id.
SELECT * FROM ms_runs WHERE id = ANY($1::text[])

-- list_runs --
-- Newest first, optional filters on state, queue and name, paged by id.
SELECT * FROM ms_runs
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR queue = $2)
  AND ($3::text IS NULL OR name = $3)
  AND ($4::text IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5

-- cancel_run --
-- Cancel a non-terminal run; a running one gets a new fence and its node is told.
WITH target AS (
    SELECT id, state AS old_state FROM ms_runs WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE ms_runs r
    SET state = 'cancelled', fence = r.fence + 1, finished_at = now(),
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM target
    WHERE r.id = target.id AND target.old_state NOT IN ('completed', 'failed', 'cancelled')
    RETURNING r.id, target.old_state
)
SELECT id, old_state,
       CASE WHEN old_state = 'running' THEN pg_notify('mainspring', 'cancel:' || id) END
FROM upd

-- retry_run --
-- A failed or cancelled run becomes available again, allowing one more attempt.
UPDATE ms_runs
SET state = 'available', run_at = now(), finished_at = NULL, updated_at = now(),
    max_attempts = greatest(max_attempts, attempt + 1)
WHERE id = $1 AND state IN ('failed', 'cancelled')
RETURNING id, queue

-- running_with_key --
-- The running run that holds a concurrency key.
SELECT * FROM ms_runs WHERE concurrency_key = $1 AND state = 'running'

-- count_ahead --
-- Available runs of queue $1 that claim order puts before (priority $2, run_at $3, id $4).
SELECT count(*) FROM ms_runs
WHERE state = 'available' AND queue = $1
  AND (priority > $2 OR (priority = $2 AND (run_at, id) < ($3, $4)))

-- queue_counts --
-- Runs of a queue by state.
SELECT state, count(*) FROM ms_runs WHERE queue = $1 GROUP BY state

-- queue_limit --
-- A queue's global limit.
SELECT global_limit FROM ms_queues WHERE name = $1

-- set_queue_limit --
-- Record a queue's global limit.
INSERT INTO ms_queues (name, global_limit) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET global_limit = excluded.global_limit, updated_at = now()

-- heartbeat_node --
-- Register this node or refresh its heartbeat.
INSERT INTO ms_nodes (name, queues, tasks, concurrency, status)
VALUES ($1, $2::jsonb, $3::jsonb, $4, $5)
ON CONFLICT (name) DO UPDATE
SET heartbeat_at = now(), queues = excluded.queues, tasks = excluded.tasks,
    concurrency = excluded.concurrency, status = excluded.status

-- remove_node --
-- Forget a node that shut down cleanly.
DELETE FROM ms_nodes WHERE name = $1

-- list_nodes --
-- Every node, alive when its heartbeat is younger than $1 seconds.
SELECT name, started_at, heartbeat_at, queues::text AS queues, tasks::text AS tasks, concurrency,
       status, heartbeat_at > now() - make_interval(secs => $1) AS alive
FROM ms_nodes ORDER BY name

-- prune_nodes --
-- Delete nodes whose heartbeat is older than $1 seconds.
DELETE FROM ms_nodes WHERE heartbeat_at < now() - make_interval(secs => $1) RETURNING name

-- notify --
-- Wake listeners.
SELECT pg_notify('mainspring', $1)
