-- Every statement the PostgreSQL backend runs. Parameters are positional ($n).
-- Runs in scheduled/available state wait; running holds a lease under a fence.

-- insert_runs --
-- Insert a batch of runs (arrays, one element per run); duplicates of a live
-- correlation_key or an existing id are skipped, and the buckets of
-- rate-limited runs are created. Returns the ids inserted and the wake-up to
-- send: queues that got available work, '~timer' for scheduled runs. (The
-- NOTIFY goes out after this commits: NOTIFY inside the insert would hold
-- PostgreSQL's global notify lock across the commit's fsync and serialize
-- every concurrent enqueue.)
WITH ins AS (
    INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                         timeout, correlation_key, concurrency_key, parent_id, input, attributes,
                         step, state_data, rate_limit, weight, version, heartbeat_timeout,
                         idempotency_key)
    SELECT i.id, i.kind, i.name, i.namespace, i.queue, i.state, i.priority,
           coalesce(i.run_at, now()), i.max_attempts, i.timeout, i.correlation_key,
           i.concurrency_key, i.parent_id, i.input, i.attributes, i.step, i.state_data,
           i.rate_limit, i.weight, i.version, i.heartbeat_timeout, i.idempotency_key
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::timestamptz[], $9::int[], $10::float8[], $11::text[],
                $12::text[], $13::text[], $14::json[], $15::jsonb[], $16::text[], $17::json[],
                $18::text[], $19::int[], $20::int[], $21::float8[], $22::text[])
         AS i(id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
              timeout, correlation_key, concurrency_key, parent_id, input, attributes,
              step, state_data, rate_limit, weight, version, heartbeat_timeout, idempotency_key)
    ON CONFLICT DO NOTHING
    RETURNING id, queue, state, rate_limit
), buckets AS (
    INSERT INTO ms_rate_buckets (key, name)
    SELECT DISTINCT rate_limit, split_part(rate_limit, ':', 1) FROM ins
    WHERE rate_limit IS NOT NULL
    ON CONFLICT DO NOTHING
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
-- Insert one run without a rate limit (the single-enqueue path: no arrays to
-- unnest). Returns its id when inserted, nothing when its correlation_key is
-- held or the id exists.
INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                     timeout, correlation_key, concurrency_key, parent_id, input, attributes,
                     step, state_data, version, heartbeat_timeout, idempotency_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), $9, $10, $11, $12, $13, $14, $15, $16,
        $17, $18, $19, $20)
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
        WHERE r.state = 'available' AND r.queue = q.queue AND r.rate_limit IS NULL
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
          r.fence, r.timeout, r.created_at, r.parent_id, r.step, r.state_data::text AS state_data,
          r.signal_seq, r.awaits, r.version, r.rate_limit, r.weight

-- claim_rated_runs --
-- The claim when rate limits are configured: the plain claim above, plus runs
-- granted by their token bucket. Buckets with waiting runs in these queues are
-- locked (SKIP LOCKED: another node is granting from them), refilled lazily
-- (tokens + elapsed * allowed / period, at most burst; NULL = full), and grant
-- the highest-priority prefix of their waiting runs whose cumulative weight
-- fits; what is claimed is debited in the same statement. Runs of a limit with
-- no configuration are never granted. Rows with a NULL id report a bucket whose
-- tokens granted fewer than were waiting: (name = key, attempt = granted,
-- max_attempts = wanted).
WITH bk AS (
    SELECT b.key,
           least(l.burst::float8, coalesce(b.tokens, l.burst)
                 + extract(epoch FROM now() - b.refilled_at) * l.allowed / l.period) AS tokens
    FROM ms_rate_buckets b JOIN ms_rate_limits l ON l.name = b.name
    WHERE EXISTS (SELECT 1 FROM ms_runs r
                  WHERE r.state = 'available' AND r.rate_limit = b.key AND r.queue = ANY($1::text[]))
    FOR UPDATE OF b SKIP LOCKED
), rc AS (
    SELECT c.*, bk.tokens AS bucket_tokens
    FROM bk CROSS JOIN LATERAL (
        SELECT r.ctid, r.id, r.queue, r.concurrency_key, r.priority, r.run_at, r.rate_limit, r.weight
        FROM ms_runs r
        WHERE r.state = 'available' AND r.rate_limit = bk.key AND r.queue = ANY($1::text[])
          AND (r.concurrency_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM ms_runs h
                WHERE h.concurrency_key = r.concurrency_key AND h.state = 'running'))
        ORDER BY r.priority DESC, r.run_at, r.id
        LIMIT $5
        FOR UPDATE SKIP LOCKED
    ) c
), granted AS (
    SELECT * FROM (
        SELECT rc.*, sum(rc.weight) OVER (PARTITION BY rc.rate_limit
                                          ORDER BY rc.priority DESC, rc.run_at, rc.id) AS cum
        FROM rc
    ) g
    WHERE g.cum <= g.bucket_tokens
), plain AS (
    SELECT c.ctid, c.id, c.queue, c.concurrency_key, c.priority, c.run_at
    FROM unnest($1::text[], $2::int[]) AS q(queue, n)
    CROSS JOIN LATERAL (
        SELECT r.ctid, r.id, r.queue, r.concurrency_key, r.priority, r.run_at
        FROM ms_runs r
        WHERE r.state = 'available' AND r.queue = q.queue AND r.rate_limit IS NULL
          AND (r.concurrency_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM ms_runs h
                WHERE h.concurrency_key = r.concurrency_key AND h.state = 'running'))
        ORDER BY r.priority DESC, r.run_at, r.id
        LIMIT q.n
        FOR UPDATE SKIP LOCKED
    ) c
), cand AS (
    SELECT ctid, id, queue, concurrency_key, priority, run_at, NULL::text AS rate_limit, 0 AS weight
    FROM plain
    UNION ALL
    SELECT ctid, id, queue, concurrency_key, priority, run_at, rate_limit, weight FROM granted
), pick AS (
    SELECT p.* FROM (
        SELECT d.*, row_number() OVER (PARTITION BY d.queue ORDER BY d.priority DESC, d.run_at, d.id) AS rn
        FROM (
            SELECT DISTINCT ON (coalesce(concurrency_key, id)) *
            FROM cand
            ORDER BY coalesce(concurrency_key, id), priority DESC, run_at, id
        ) d
    ) p
    JOIN unnest($1::text[], $2::int[]) AS q(queue, n) ON q.queue = p.queue
    WHERE p.rn <= q.n
), debit AS (
    UPDATE ms_rate_buckets b
    SET tokens = bk.tokens - s.spent, refilled_at = now()
    FROM bk JOIN (SELECT rate_limit, sum(weight) AS spent FROM pick
                  WHERE rate_limit IS NOT NULL GROUP BY rate_limit) s ON s.rate_limit = bk.key
    WHERE b.key = bk.key
), upd AS (
    UPDATE ms_runs r
    SET state = 'running', attempt = r.attempt + 1, fence = r.fence + 1,
        lease_owner = $3, lease_expires_at = now() + make_interval(secs => $4),
        started_at = now(), updated_at = now()
    WHERE r.ctid = ANY (ARRAY(SELECT ctid FROM pick))
    RETURNING r.id, r.kind, r.name, r.queue, r.input::text AS input, r.attempt, r.max_attempts,
              r.fence, r.timeout, r.created_at, r.parent_id, r.step,
              r.state_data::text AS state_data, r.signal_seq, r.awaits, r.version, r.rate_limit, r.weight
)
SELECT * FROM upd
UNION ALL
SELECT NULL, NULL, w.rate_limit, NULL, NULL, count(*) FILTER (WHERE p.id IS NOT NULL)::int,
       count(*)::int, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM rc w LEFT JOIN granted p ON p.id = w.id
GROUP BY w.rate_limit
HAVING count(*) FILTER (WHERE p.id IS NOT NULL) < count(*)

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

-- commit_steps --
-- The general commit, for batches with machine steps or runs that have a
-- parent: outcomes as in commit_outcomes plus each step's columns ($8..$18,
-- written when has_step), the signals it consumed ($19 run ids, $20 signal
-- ids), the children it spawned ($21..$42, as in insert_runs) and its journal
-- entries ($43..$46). In one statement, only for the runs whose fence
-- matched: a park whose run got a signal since the claim (signal_seq moved
-- past seen_seq) becomes available so the await is
-- re-checked; terminal runs have their inbox cleared and count toward their
-- parent's fan-in (the parent's row lock serializes concurrent last children,
-- so exactly one of them wakes it); buckets of rate-limited steps are created.
-- A workflow run remembers the node that committed it (sticky_node: its
-- workflow cache holds the run). Returns what = 'run' (committed), 'parent'
-- (fan-in) and 'child' rows with their state, queue and sticky node, for the
-- wake-ups.
WITH o AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::json[], $5::json[],
                         $6::timestamptz[], $7::int[], $8::bool[], $9::text[], $10::json[],
                         $11::bool[], $12::json[], $13::text[], $14::timestamptz[], $15::bigint[],
                         $16::text[], $17::int[], $18::int[])
        AS o(id, fence, state, output, error, run_at, refund, has_step, step, state_data,
             reset, awaits, wake_step, deadline, seen_seq, rate_limit, weight, n_children)
), upd AS (
    UPDATE ms_runs r
    SET state = CASE WHEN o.state = 'waiting' AND r.signal_seq <> o.seen_seq
                          AND CASE WHEN o.has_step THEN o.awaits IS NOT NULL
                                   ELSE r.awaits IS NOT NULL END
                     THEN 'available' ELSE o.state END,
        output = o.output,
        error = coalesce(o.error, r.error),
        run_at = coalesce(o.run_at, r.run_at),
        attempt = CASE WHEN o.reset THEN 0 ELSE r.attempt - o.refund END,
        fence = r.fence + 1,
        finished_at = CASE WHEN o.state IN ('completed', 'failed', 'cancelled') THEN now() END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
        step = CASE WHEN o.has_step THEN o.step ELSE r.step END,
        state_data = CASE WHEN o.has_step THEN o.state_data ELSE r.state_data END,
        awaits = CASE WHEN NOT o.has_step THEN r.awaits
                      WHEN o.awaits IS NULL THEN NULL
                      ELSE ARRAY(SELECT json_array_elements_text(o.awaits)) END,
        wake_step = CASE WHEN o.has_step THEN o.wake_step ELSE r.wake_step END,
        deadline = CASE WHEN o.has_step THEN o.deadline ELSE r.deadline END,
        rate_limit = CASE WHEN o.has_step THEN o.rate_limit ELSE r.rate_limit END,
        weight = CASE WHEN o.has_step THEN o.weight ELSE r.weight END,
        children_pending = CASE WHEN o.has_step THEN o.n_children ELSE r.children_pending END,
        sticky_node = CASE WHEN r.kind = 'workflow' THEN r.lease_owner END
    FROM o
    WHERE r.id = ANY($1::text[]) AND r.id = o.id AND r.fence = o.fence
    RETURNING r.id, r.state, r.queue, r.parent_id, r.rate_limit, r.sticky_node
), consumed AS (
    UPDATE ms_signals s SET consumed_at = now()
    FROM unnest($19::text[], $20::text[]) AS c(run_id, signal_id)
    JOIN upd ON upd.id = c.run_id AND upd.state NOT IN ('completed', 'failed', 'cancelled')
    WHERE s.id = c.signal_id AND s.target_id = c.run_id AND s.consumed_at IS NULL
), cleared AS (
    UPDATE ms_signals s SET consumed_at = now()
    FROM upd
    WHERE s.target_id = upd.id AND upd.state IN ('completed', 'failed', 'cancelled')
      AND s.consumed_at IS NULL
), kids AS (
    -- the children's arrays are insert_runs' arrays, in its order
    INSERT INTO ms_runs (id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
                         timeout, correlation_key, concurrency_key, parent_id, input, attributes,
                         step, state_data, rate_limit, weight, version, heartbeat_timeout,
                         idempotency_key)
    SELECT k.id, k.kind, k.name, k.namespace, k.queue, k.state, k.priority,
           coalesce(k.run_at, now()), k.max_attempts, k.timeout, k.correlation_key,
           k.concurrency_key, k.parent_id, k.input, k.attributes, k.step, k.state_data,
           k.rate_limit, k.weight, k.version, k.heartbeat_timeout, k.idempotency_key
    FROM unnest($21::text[], $22::text[], $23::text[], $24::text[], $25::text[], $26::text[],
                $27::int[], $28::timestamptz[], $29::int[], $30::float8[], $31::text[],
                $32::text[], $33::text[], $34::json[], $35::jsonb[], $36::text[], $37::json[],
                $38::text[], $39::int[], $40::int[], $41::float8[], $42::text[])
         AS k(id, kind, name, namespace, queue, state, priority, run_at, max_attempts,
              timeout, correlation_key, concurrency_key, parent_id, input, attributes,
              step, state_data, rate_limit, weight, version, heartbeat_timeout, idempotency_key)
    WHERE k.parent_id IN (SELECT id FROM upd)
    RETURNING id, state, queue, rate_limit
), fanin AS (
    UPDATE ms_runs p
    SET children_pending = p.children_pending - d.n, signal_seq = p.signal_seq + 1,
        state = CASE WHEN p.state = 'waiting'
                          AND (p.children_pending - d.n <= 0 OR p.kind = 'workflow')
                     THEN 'available' ELSE p.state END,
        updated_at = now()
    FROM (SELECT parent_id, count(*) AS n FROM upd
          WHERE state IN ('completed', 'failed', 'cancelled') AND parent_id IS NOT NULL
          GROUP BY parent_id) d
    WHERE p.id = d.parent_id
    RETURNING p.id, p.state, p.queue, p.sticky_node
), buckets AS (
    INSERT INTO ms_rate_buckets (key, name)
    SELECT DISTINCT x.rate_limit, split_part(x.rate_limit, ':', 1)
    FROM (SELECT rate_limit FROM upd UNION ALL SELECT rate_limit FROM kids) x
    WHERE x.rate_limit IS NOT NULL
    ON CONFLICT DO NOTHING
), journal AS (
    INSERT INTO ms_events (run_id, seq, kind, data)
    SELECT e.run_id, e.seq, e.kind, e.data
    FROM unnest($43::text[], $44::int[], $45::text[], $46::json[]) AS e(run_id, seq, kind, data)
    WHERE e.run_id IN (SELECT id FROM upd)
)
SELECT 'run' AS what, id, state, queue, sticky_node FROM upd
UNION ALL SELECT 'parent', id, state, queue, sticky_node FROM fanin
UNION ALL SELECT 'child', id, state, queue, NULL FROM kids

-- load_step_data --
-- Each run's unconsumed inbox and its children (only those whose ids are in
-- the JSON array $4[i], when it is not NULL), and with $2 its journal after
-- seq $3[i], as JSON, in one round trip.
SELECT t.id,
       CASE WHEN $2::bool THEN
           (SELECT coalesce(json_agg(json_build_array(e.seq, e.kind, e.data) ORDER BY e.seq),
                            '[]'::json)
            FROM ms_events e WHERE e.run_id = t.id AND e.seq > t.after)::text
       END AS events,
       (SELECT coalesce(json_agg(json_build_array(s.id, s.name, s.payload,
                                                  extract(epoch FROM s.created_at)) ORDER BY s.id),
                        '[]'::json)
        FROM ms_signals s WHERE s.target_id = t.id AND s.consumed_at IS NULL)::text AS inbox,
       CASE WHEN t.wanted IS NULL THEN
           (SELECT coalesce(json_agg(json_build_array(c.id, c.kind, c.name, c.state, c.output,
                                                      c.error) ORDER BY c.id), '[]'::json)
            FROM ms_runs c WHERE c.parent_id = t.id)::text
       ELSE
           (SELECT coalesce(json_agg(json_build_array(c.id, c.kind, c.name, c.state, c.output,
                                                      c.error) ORDER BY c.id), '[]'::json)
            FROM ms_runs c
            WHERE c.id = ANY(ARRAY(SELECT json_array_elements_text(t.wanted::json)))
              AND c.parent_id = t.id)::text
       END AS children
FROM unnest($1::text[], $3::int[], $4::text[]) AS t(id, after, wanted)

-- append_events --
-- Append journal entries to run $1 ($2 seqs, $3 kinds, $4 data).
INSERT INTO ms_events (run_id, seq, kind, data)
SELECT $1, e.seq, e.kind, e.data FROM unnest($2::int[], $3::text[], $4::json[]) AS e(seq, kind, data)

-- send_signal --
-- Deliver a signal ($2 id, $3 name, $4 payload, $5 dedup key) to run $1, or to
-- the live run holding correlation key $6. The target row is locked first, so
-- delivery and the run's own commits are serialized: a park that commits
-- first is woken here; a park that commits after sees signal_seq moved.
WITH target AS (
    SELECT r.id, r.state FROM ms_runs r
    WHERE r.id = coalesce($1, (SELECT k.id FROM ms_runs k
                               WHERE k.correlation_key = $6
                                 AND k.state IN ('scheduled', 'available', 'running', 'waiting')))
    FOR NO KEY UPDATE
), ins AS (
    INSERT INTO ms_signals (id, target_id, name, payload, dedup_key)
    SELECT $2, target.id, $3, $4::json, $5 FROM target
    WHERE target.state NOT IN ('completed', 'failed', 'cancelled')
    ON CONFLICT DO NOTHING
    RETURNING target_id
), wake AS (
    UPDATE ms_runs r
    SET signal_seq = r.signal_seq + 1,
        state = CASE WHEN r.state = 'waiting' AND $3 = ANY(r.awaits) THEN 'available'
                     ELSE r.state END,
        updated_at = now()
    FROM ins WHERE r.id = ins.target_id
    RETURNING r.state, r.queue, r.sticky_node
)
SELECT (SELECT id FROM target) AS run_id, (SELECT state FROM target) AS old_state,
       (SELECT count(*) FROM ins) AS inserted, (SELECT state FROM wake) AS new_state,
       (SELECT queue FROM wake) AS queue, (SELECT sticky_node FROM wake) AS sticky_node

-- terminal_with_key --
-- A terminal run that held correlation key $1, if any.
SELECT id FROM ms_runs
WHERE correlation_key = $1 AND state IN ('completed', 'failed', 'cancelled')
LIMIT 1

-- heartbeat_run --
-- A job's heartbeat ($1 id, $2 fence): keep its details, note the time (for
-- its heartbeat timeout) and extend its lease.
UPDATE ms_runs SET state_data = $3::json, lease_expires_at = now() + make_interval(secs => $4),
                   heartbeat_at = now()
WHERE id = $1 AND fence = $2 AND kind = 'job'
RETURNING id

-- silent_runs --
-- Running runs with a heartbeat timeout that have gone longer than it without
-- a heartbeat (counting from their claim: a heartbeat of an earlier attempt
-- is older than started_at). Columns as claim_runs returns them.
SELECT r.id, r.kind, r.name, r.queue, r.input::text AS input, r.attempt, r.max_attempts,
       r.fence, r.timeout, r.created_at, r.parent_id, r.step, r.state_data::text AS state_data,
       r.signal_seq, r.awaits, r.version, r.rate_limit, r.weight
FROM ms_runs r
WHERE r.heartbeat_timeout IS NOT NULL AND r.state = 'running'
  AND greatest(r.started_at, coalesce(r.heartbeat_at, r.started_at))
      < now() - make_interval(secs => r.heartbeat_timeout)
ORDER BY r.started_at
LIMIT $1

-- completed_with_key --
-- The output of a completed run of task $1 that held idempotency key $2, if any.
SELECT output::text FROM ms_runs
WHERE name = $1 AND idempotency_key = $2 AND state = 'completed'
LIMIT 1

-- extend_leases --
-- Push out the leases this node ($3) still holds under their fence; returns the
-- ids it no longer holds. Rows locked right now (a commit of this node is
-- finishing them) are skipped rather than waited for: waiting would let a
-- commit and this update lock rows in opposite orders and deadlock. A skipped
-- row is still held (its fence matched) and is reported as such.
WITH h AS (
    SELECT * FROM unnest($1::text[], $2::bigint[]) AS h(id, fence)
), mine AS (
    SELECT r.id FROM ms_runs r JOIN h ON h.id = r.id
    WHERE r.id = ANY($1::text[]) AND r.fence = h.fence AND r.lease_owner = $3
    FOR NO KEY UPDATE OF r SKIP LOCKED
), upd AS (
    UPDATE ms_runs r SET lease_expires_at = now() + make_interval(secs => $4)
    FROM mine WHERE r.id = mine.id
)
SELECT h.id, h.fence FROM h
WHERE NOT EXISTS (SELECT 1 FROM ms_runs r
                  WHERE r.id = h.id AND r.fence = h.fence AND r.lease_owner = $3)

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
RETURNING r.queue, r.sticky_node

-- next_due --
-- When the next scheduled run or await deadline is due.
SELECT least((SELECT min(run_at) FROM ms_runs WHERE state = 'scheduled'),
             (SELECT min(deadline) FROM ms_runs WHERE state = 'waiting' AND deadline IS NOT NULL))

-- expire_awaits --
-- Waiting runs whose await deadline passed become available on their timeout
-- step (the await's step when it named none). "state = 'waiting'" is checked
-- again on the row, so a signal that woke the run first wins.
UPDATE ms_runs r
SET state = 'available', step = coalesce(r.wake_step, r.step), awaits = NULL, deadline = NULL,
    wake_step = NULL, updated_at = now()
WHERE r.id IN (SELECT id FROM ms_runs
               WHERE state = 'waiting' AND deadline <= now()
               ORDER BY deadline
               LIMIT $1
               FOR UPDATE SKIP LOCKED)
  AND r.state = 'waiting'
RETURNING r.queue, r.sticky_node

-- reap_expired --
-- Runs whose lease expired go back to available (or failed on their last
-- attempt) under a new fence, so the silent owner can never commit. A run
-- that fails here has its inbox cleared and counts toward its parent's fan-in.
WITH dead AS (
    SELECT id FROM ms_runs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), upd AS (
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
    RETURNING r.id, r.state, r.queue, r.parent_id
), cleared AS (
    UPDATE ms_signals s SET consumed_at = now()
    FROM upd WHERE s.target_id = upd.id AND upd.state = 'failed' AND s.consumed_at IS NULL
), fanin AS (
    UPDATE ms_runs p
    SET children_pending = p.children_pending - d.n, signal_seq = p.signal_seq + 1,
        state = CASE WHEN p.state = 'waiting'
                          AND (p.children_pending - d.n <= 0 OR p.kind = 'workflow')
                     THEN 'available' ELSE p.state END,
        updated_at = now()
    FROM (SELECT parent_id, count(*) AS n FROM upd
          WHERE state = 'failed' AND parent_id IS NOT NULL GROUP BY parent_id) d
    WHERE p.id = d.parent_id
    RETURNING p.id, p.state, p.queue, p.sticky_node
)
SELECT id, state, queue, NULL AS sticky_node FROM upd
UNION ALL SELECT NULL, state, queue, sticky_node FROM fanin

-- delete_terminal --
-- Delete one batch of terminal runs finished before $1 (their signals go by
-- cascade); a child whose parent is not terminal stays, the parent reads it.
WITH old AS (
    SELECT r.id FROM ms_runs r
    WHERE r.state IN ('completed', 'failed', 'cancelled') AND r.finished_at < $1
      AND (r.parent_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM ms_runs p
            WHERE p.id = r.parent_id AND p.state NOT IN ('completed', 'failed', 'cancelled')))
    ORDER BY r.finished_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM ms_runs r USING old WHERE r.id = old.id

-- pending_before --
-- Runs of queues $1 that are available, running, or scheduled before $2.
SELECT count(*) FROM ms_runs
WHERE queue = ANY($1::text[])
  AND (state IN ('available', 'running') OR (state = 'scheduled' AND run_at < $2)
       OR (state = 'waiting' AND deadline < $2))

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
-- Cancel a non-terminal run and its non-terminal descendants; running ones get
-- a new fence and their nodes are told. Inboxes are cleared, and the run
-- counts toward its own parent's fan-in. Returns the cancelled runs.
WITH RECURSIVE tree AS (
    SELECT id FROM ms_runs WHERE id = $1
    UNION
    SELECT c.id FROM ms_runs c JOIN tree ON c.parent_id = tree.id
), target AS (
    SELECT r.id, r.state AS old_state, r.parent_id FROM ms_runs r JOIN tree USING (id)
    ORDER BY r.id
    FOR UPDATE OF r
), upd AS (
    UPDATE ms_runs r
    SET state = 'cancelled', fence = r.fence + 1, finished_at = now(),
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM target
    WHERE r.id = target.id AND target.old_state NOT IN ('completed', 'failed', 'cancelled')
    RETURNING r.id, target.old_state, target.parent_id
), cleared AS (
    UPDATE ms_signals s SET consumed_at = now()
    FROM upd WHERE s.target_id = upd.id AND s.consumed_at IS NULL
), fanin AS (
    UPDATE ms_runs p
    SET children_pending = p.children_pending - 1, signal_seq = p.signal_seq + 1,
        state = CASE WHEN p.state = 'waiting'
                          AND (p.children_pending - 1 <= 0 OR p.kind = 'workflow')
                     THEN 'available' ELSE p.state END,
        updated_at = now()
    FROM upd
    WHERE upd.id = $1 AND p.id = upd.parent_id
    RETURNING p.queue, p.state
)
SELECT id, old_state,
       CASE WHEN old_state = 'running' THEN pg_notify('mainspring', 'cancel:' || id) END,
       (SELECT queue FROM fanin WHERE state = 'available') AS woke
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

-- notify_routed --
-- Wake the listeners of queues ($1, comma-separated wake-up tokens, or NULL)
-- and the nodes whose channels are $2 (a sticky workflow's owner: its claim
-- loop wakes first; the other nodes got '~later:<queue>' in $1).
SELECT pg_notify('mainspring', $1) WHERE $1 IS NOT NULL
UNION ALL
SELECT pg_notify(c, '~claim') FROM unnest($2::text[]) AS c

-- set_rate_limit --
-- Create or replace a rate limit's configuration.
INSERT INTO ms_rate_limits (name, allowed, period, burst) VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE
SET allowed = excluded.allowed, period = excluded.period, burst = excluded.burst,
    updated_at = now()

-- rate_limit_configs --
-- Every configured rate limit.
SELECT name, allowed, period, burst FROM ms_rate_limits

-- rate_limit_status --
-- The buckets of rate limit $1: tokens refilled to now and runs waiting on each.
SELECT b.key,
       least(l.burst::float8, coalesce(b.tokens, l.burst)
             + extract(epoch FROM now() - b.refilled_at) * l.allowed / l.period) AS tokens,
       (SELECT count(*) FROM ms_runs r
        WHERE r.state = 'available' AND r.rate_limit = b.key) AS waiting
FROM ms_rate_buckets b JOIN ms_rate_limits l ON l.name = b.name
WHERE b.name = $1
ORDER BY b.key

-- has_rate_limits --
-- Whether any rate limit is configured (the claim then grants from buckets).
SELECT EXISTS (SELECT 1 FROM ms_rate_limits)

-- prune_rate_buckets --
-- Delete buckets that have refilled to their burst and that no available run
-- names: a bucket that comes back starts full, so nothing is lost (per-tenant
-- buckets would otherwise pile up).
DELETE FROM ms_rate_buckets b
USING ms_rate_limits l
WHERE l.name = b.name
  AND coalesce(b.tokens, l.burst)
      + extract(epoch FROM now() - b.refilled_at) * l.allowed / l.period >= l.burst
  AND NOT EXISTS (SELECT 1 FROM ms_runs r WHERE r.state = 'available' AND r.rate_limit = b.key)
