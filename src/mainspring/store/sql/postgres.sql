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
          r.fence, r.timeout, extract(epoch FROM r.created_at)::float8, r.parent_id, r.step, r.state_data::text AS state_data,
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
              r.fence, r.timeout, extract(epoch FROM r.created_at)::float8, r.parent_id, r.step,
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
       r.fence, r.timeout, extract(epoch FROM r.created_at)::float8, r.parent_id, r.step, r.state_data::text AS state_data,
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

-- == assets (mainspring.assets) ==================================================

-- record_materialization --
-- Write a finished materialization and its lineage edges; an upsert by id, so a
-- step executed again after a crash rewrites its own row instead of adding one.
WITH written AS (
    INSERT INTO ms_materializations (id, asset, partition, run_id, status, value_ref, upstream,
                                     metadata, error, started_at, finished_at, duration_ms)
    VALUES ($1, $2, $3, $4, $5, $6::json, $7::json, $8::json, $9::json, $10, $11, $12)
    ON CONFLICT (id) DO UPDATE
    SET status = excluded.status, value_ref = excluded.value_ref, upstream = excluded.upstream,
        metadata = excluded.metadata, error = excluded.error, finished_at = excluded.finished_at,
        duration_ms = excluded.duration_ms, invalidated_at = NULL
    RETURNING id
)
INSERT INTO ms_lineage (materialization_id, upstream_id)
SELECT written.id, u ->> 'id' FROM written, json_array_elements($7::json) AS u
ON CONFLICT DO NOTHING

-- latest_materializations --
-- The latest completed materialization of each (asset, partition) of assets $1
-- (partitions $2, or every partition when $2 is NULL).
SELECT DISTINCT ON (asset, partition) *
FROM ms_materializations
WHERE asset = ANY($1) AND ($2::text[] IS NULL OR partition = ANY($2)) AND status = 'completed'
ORDER BY asset, partition, finished_at DESC, id DESC

-- list_materializations --
-- The materializations of asset $1 (of partition $2 when not NULL), newest first, at most $3.
SELECT * FROM ms_materializations
WHERE asset = $1 AND ($2::text IS NULL OR partition = $2)
ORDER BY finished_at DESC, id DESC
LIMIT $3

-- get_materializations --
-- Materializations by id.
SELECT * FROM ms_materializations WHERE id = ANY($1)

-- downstream_materializations --
-- The materializations built from any of $1.
SELECT m.* FROM ms_lineage l JOIN ms_materializations m ON m.id = l.materialization_id
WHERE l.upstream_id = ANY($1)

-- invalidate_materializations --
-- Mark the latest completed materialization of each (asset $1[i], partition
-- $2[i]; a NULL partition: every partition of the asset) invalidated, so the
-- asset counts as stale there. Returns how many were marked.
WITH latest AS (
    SELECT DISTINCT ON (m.asset, m.partition) m.id, m.invalidated_at
    FROM ms_materializations m
    JOIN unnest($1::text[], $2::text[]) AS w (asset, partition)
      ON m.asset = w.asset AND (w.partition IS NULL OR m.partition = w.partition)
    WHERE m.status = 'completed'
    ORDER BY m.asset, m.partition, m.finished_at DESC, m.id DESC
)
UPDATE ms_materializations m SET invalidated_at = now()
FROM latest WHERE m.id = latest.id AND latest.invalidated_at IS NULL

-- put_asset_value --
-- Store a value DbIO keeps out of line.
INSERT INTO ms_asset_values (key, data, compressed) VALUES ($1, $2, $3)
ON CONFLICT (key) DO UPDATE SET data = excluded.data, compressed = excluded.compressed

-- get_asset_value --
-- A value DbIO stored out of line.
SELECT data, compressed FROM ms_asset_values WHERE key = $1

-- start_barrier --
-- Create scatter barrier $1 for asset $2, partition $3, run $4 (an upsert: a
-- step executed again reuses it); its total is set by mark_scatter_keys.
INSERT INTO ms_scatter_barriers (id, asset, partition, run_id, total, status)
VALUES ($1, $2, $3, $4, 0, 'executing')
ON CONFLICT (id) DO NOTHING

-- mark_scatter_keys --
-- Keys ($5 hashes, $6 JSON) of barrier $1 join it for (asset $2, partition
-- $3): a key completed there from the same inputs ($7) stays completed, every
-- other becomes pending. Returns the pending hashes (they must run) and sets
-- the barrier's total ($4) and skipped counts.
WITH marked AS (
    INSERT INTO ms_scatter_results AS r (asset, partition, key_hash, key, inputs, barrier_id,
                                         status)
    SELECT $2, $3, k.h, k.j::json, $7, $1, 'pending' FROM unnest($5::text[], $6::text[]) AS k (h, j)
    ON CONFLICT (asset, partition, key_hash) DO UPDATE
    SET barrier_id = excluded.barrier_id, inputs = excluded.inputs, updated_at = now(),
        status = CASE WHEN r.status = 'completed' AND r.inputs = excluded.inputs
                      THEN 'completed' ELSE 'pending' END,
        result = CASE WHEN r.status = 'completed' AND r.inputs = excluded.inputs
                      THEN r.result END,
        compressed = r.compressed AND r.status = 'completed' AND r.inputs = excluded.inputs,
        error = NULL
    RETURNING key_hash, status
), counted AS (
    UPDATE ms_scatter_barriers
    SET total = $4, skipped = (SELECT count(*) FROM marked WHERE status = 'completed')
    WHERE id = $1
)
SELECT key_hash FROM marked WHERE status = 'pending'

-- finish_barrier --
-- Record the outcome of barrier $1's instances ($2 hashes, $3 statuses, $4
-- results, $5 compressed flags, $6 errors) and its status $7.
WITH written AS (
    UPDATE ms_scatter_results r
    SET status = o.status, result = o.result, compressed = o.compressed, error = o.error::json,
        updated_at = now()
    FROM unnest($2::text[], $3::text[], $4::bytea[], $5::boolean[], $6::text[])
         AS o (h, status, result, compressed, error)
    WHERE r.barrier_id = $1 AND r.key_hash = o.h
    RETURNING r.status
)
UPDATE ms_scatter_barriers
SET completed = (SELECT count(*) FROM written WHERE status = 'completed'),
    failed = (SELECT count(*) FROM written WHERE status = 'failed'),
    status = $7, finished_at = now()
WHERE id = $1

-- barrier_results --
-- Every key of barrier $1 with its status and result.
SELECT key_hash, key, status, result, compressed, error FROM ms_scatter_results
WHERE barrier_id = $1

-- list_barriers --
-- The scatter barriers of asset $1 (partition $2 when not NULL), newest first.
SELECT * FROM ms_scatter_barriers
WHERE asset = $1 AND ($2::text IS NULL OR partition = $2)
ORDER BY created_at DESC, id DESC
LIMIT $3

-- count_children --
-- The children of runs $1 counted by state (progress of a plan or a scatter).
SELECT parent_id, state, count(*) AS n FROM ms_runs WHERE parent_id = ANY($1)
GROUP BY parent_id, state

-- create_gate --
-- Open gate $1 for run $2, asset $3, partition $4 (an upsert: a step executed
-- again moves a waiting gate's expiry; a gate a signal opened first gets its
-- asset and keeps its status).
INSERT INTO ms_gates AS g (id, run_id, asset, partition, status, expires_at, round)
VALUES ($1, $2, $3, $4, 'waiting', $5, $6)
ON CONFLICT (id) DO UPDATE
SET asset = excluded.asset, partition = excluded.partition,
    expires_at = CASE WHEN g.status = 'waiting' THEN excluded.expires_at ELSE g.expires_at END

-- open_gate --
-- Open gate $1 of run $2 as its token describes it ($3 expiry, $4 round) unless
-- it exists: a signal may come before the asset has parked.
INSERT INTO ms_gates (id, run_id, asset, partition, status, expires_at, round)
VALUES ($1, $2, '', '', 'waiting', $3, $4)
ON CONFLICT (id) DO NOTHING

-- signal_gate --
-- Gate $1 goes from waiting to signaled with payload $2 when it has not
-- expired; returns its run. One caller wins: the row lock serializes them.
UPDATE ms_gates SET status = 'signaled', payload = $2::json, signaled_at = now()
WHERE id = $1 AND status = 'waiting' AND expires_at > now()
RETURNING run_id

-- cancel_gate --
-- Gate $1 is cancelled (its run finished before the signal came).
UPDATE ms_gates SET status = 'cancelled' WHERE id = $1

-- get_gate --
-- A gate by id.
SELECT * FROM ms_gates WHERE id = $1

-- close_gate --
-- A waiting gate $1 becomes $2 (timeout, cancelled); true when it was waiting.
UPDATE ms_gates SET status = $2 WHERE id = $1 AND status = 'waiting' RETURNING id

-- list_gates --
-- Gates in status $1 (any when NULL), oldest first.
SELECT * FROM ms_gates WHERE ($1::text IS NULL OR status = $1) ORDER BY created_at, id LIMIT $2

-- ensure_bucket --
-- Create bucket $1 of limit $2 (full) unless it exists.
INSERT INTO ms_rate_buckets (key, name, tokens) VALUES ($1, $2, NULL) ON CONFLICT (key) DO NOTHING

-- sweep_gates --
-- The gate sweeper: waiting gates whose run has finished (or is gone) become
-- cancelled, and waiting gates more than $1 seconds past their expiry become
-- timeout (their run's await deadline normally closes them first). Returns them.
UPDATE ms_gates g
SET status = CASE WHEN r.id IS NULL OR r.state IN ('completed', 'failed', 'cancelled')
                  THEN 'cancelled' ELSE 'timeout' END
FROM ms_gates w LEFT JOIN ms_runs r ON r.id = w.run_id
WHERE g.id = w.id AND g.status = 'waiting'
  AND (r.id IS NULL OR r.state IN ('completed', 'failed', 'cancelled')
       OR g.expires_at < now() - $1 * interval '1 second')
RETURNING g.*

-- take_tokens --
-- Take $2 tokens from bucket $1 when it holds them, refilled lazily as in the
-- claim (the same buckets: runs and limiter checks share them). Returns
-- granted and the seconds until $2 tokens are there; no row when the bucket's
-- limit is not configured.
WITH now_tokens AS (
    SELECT b.key, least(c.burst::float8, coalesce(b.tokens, c.burst)
                 + extract(epoch FROM now() - b.refilled_at) * c.allowed / c.period) AS tokens,
           c.allowed, c.period
    FROM ms_rate_buckets b JOIN ms_rate_limits c ON c.name = b.name
    WHERE b.key = $1
    FOR UPDATE OF b
), taken AS (
    UPDATE ms_rate_buckets b
    SET tokens = n.tokens - CASE WHEN n.tokens >= $2 THEN $2 ELSE 0 END, refilled_at = now()
    FROM now_tokens n WHERE b.key = n.key
    RETURNING n.tokens AS before, n.allowed, n.period
)
SELECT before >= $2 AS granted, greatest(0.0, ($2 - before) * period / allowed) AS retry_after
FROM taken

-- reset_rate_buckets --
-- Refill every bucket of limit $1 (they start full when next named).
DELETE FROM ms_rate_buckets WHERE name = $1

-- lock_slots --
-- Serialize slot acquisitions of semaphore $1 for the rest of the transaction.
SELECT pg_advisory_xact_lock(hashtext('ms_slots:' || $1))

-- acquire_slot --
-- Take the lowest free slot (never held, or its lease lapsed) of semaphore $1
-- with $2 slots, for holder $3, leased for $4 seconds; returns the slot.
INSERT INTO ms_slots AS s (name, slot, holder, expires_at)
SELECT $1, n, $3, now() + $4 * interval '1 second'
FROM generate_series(0, $2 - 1) AS n
WHERE NOT EXISTS (SELECT 1 FROM ms_slots h WHERE h.name = $1 AND h.slot = n
                  AND h.expires_at > now())
ORDER BY n LIMIT 1
ON CONFLICT (name, slot) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
RETURNING slot

-- renew_slot --
-- Extend holder $3's lease on slot $2 of semaphore $1 by $4 seconds; true when still held.
UPDATE ms_slots SET expires_at = now() + $4 * interval '1 second'
WHERE name = $1 AND slot = $2 AND holder = $3 AND expires_at > now()
RETURNING slot

-- release_slot --
-- Give back slot $2 of semaphore $1 held by $3.
DELETE FROM ms_slots WHERE name = $1 AND slot = $2 AND holder = $3 RETURNING slot

-- list_slots --
-- The live slots of semaphore $1.
SELECT slot, holder, expires_at FROM ms_slots WHERE name = $1 AND expires_at > now() ORDER BY slot

-- reset_slots --
-- Release every slot of semaphore $1.
DELETE FROM ms_slots WHERE name = $1

-- ===========================================================================
-- The cluster layer (mainspring.cluster): KV, registry, process groups, hub.
-- Writes that feed a change log (KV revisions, the group log) take one
-- advisory transaction lock first, so their sequence numbers commit in order
-- and a reader of "seq > last" never skips a row committed late.
-- ===========================================================================

-- kv_get --
-- A live key's value (JSON text) and revision; expired keys are absent.
SELECT value::text AS value, rev FROM ms_kv
WHERE key = $1 AND value IS NOT NULL AND (expires_at IS NULL OR expires_at > now())

-- kv_put --
-- Set a key ($3: ttl seconds or NULL); returns its new revision.
WITH w AS (
INSERT INTO ms_kv (key, value, rev, expires_at)
SELECT $1, $2::json, nextval('ms_kv_rev'), now() + make_interval(secs => $3)
FROM (SELECT pg_advisory_xact_lock(7301)) AS serialized
ON CONFLICT (key) DO UPDATE
SET value = excluded.value, rev = excluded.rev, expires_at = excluded.expires_at,
    updated_at = now()
RETURNING key, value, rev
)
INSERT INTO ms_kv_log (rev, key, value) SELECT rev, key, value FROM w
RETURNING rev

-- kv_delete --
-- Delete a live key (it becomes a tombstone for watchers); returns the revision.
WITH w AS (
UPDATE ms_kv k SET value = NULL, rev = nextval('ms_kv_rev'), expires_at = NULL, updated_at = now()
FROM (SELECT pg_advisory_xact_lock(7301)) AS serialized
WHERE k.key = $1 AND k.value IS NOT NULL AND (k.expires_at IS NULL OR k.expires_at > now())
RETURNING k.key, k.value, k.rev
)
INSERT INTO ms_kv_log (rev, key, value) SELECT rev, key, value FROM w
RETURNING rev

-- kv_cas_absent --
-- Create a key only if it is absent (never set, deleted or expired).
WITH w AS (
INSERT INTO ms_kv AS k (key, value, rev, expires_at)
SELECT $1, $2::json, nextval('ms_kv_rev'), now() + make_interval(secs => $3)
FROM (SELECT pg_advisory_xact_lock(7301)) AS serialized
ON CONFLICT (key) DO UPDATE
SET value = excluded.value, rev = excluded.rev, expires_at = excluded.expires_at,
    updated_at = now()
WHERE k.value IS NULL OR k.expires_at <= now()
RETURNING key, value, rev
)
INSERT INTO ms_kv_log (rev, key, value) SELECT rev, key, value FROM w
RETURNING rev

-- kv_cas --
-- Replace a live key's value only if it equals $2 (compared as JSON values).
WITH w AS (
UPDATE ms_kv k SET value = $3::json, rev = nextval('ms_kv_rev'),
    expires_at = now() + make_interval(secs => $4), updated_at = now()
FROM (SELECT pg_advisory_xact_lock(7301)) AS serialized
WHERE k.key = $1 AND k.value IS NOT NULL AND (k.expires_at IS NULL OR k.expires_at > now())
  AND k.value::jsonb = $2::jsonb
RETURNING k.key, k.value, k.rev
)
INSERT INTO ms_kv_log (rev, key, value) SELECT rev, key, value FROM w
RETURNING rev

-- kv_scan --
-- Live keys starting with $1, in key order.
SELECT key, value::text AS value, rev FROM ms_kv
WHERE starts_with(key, $1) AND value IS NOT NULL AND (expires_at IS NULL OR expires_at > now())
ORDER BY key

-- kv_changes --
-- Changes (values, or NULL for deletes) under prefix $2 after revision $1, in order.
SELECT key, value::text AS value, rev FROM ms_kv_log
WHERE rev > $1 AND starts_with(key, $2) ORDER BY rev LIMIT $3

-- kv_log_start --
-- The oldest revision the change log keeps (a watcher behind it missed changes).
SELECT coalesce(min(rev), 0) FROM ms_kv_log

-- kv_head --
-- The latest revision.
SELECT coalesce(max(rev), 0) FROM ms_kv

-- kv_expire --
-- Turn expired keys into tombstones (watchers see them go); returns how many.
WITH w AS (
UPDATE ms_kv k SET value = NULL, rev = nextval('ms_kv_rev'), expires_at = NULL, updated_at = now()
FROM (SELECT pg_advisory_xact_lock(7301)) AS serialized
WHERE k.expires_at <= now() AND k.value IS NOT NULL
RETURNING k.key, k.value, k.rev
)
INSERT INTO ms_kv_log (rev, key, value) SELECT rev, key, value FROM w
RETURNING rev

-- kv_prune --
-- Forget tombstones and change log entries older than $1 seconds.
WITH log AS (DELETE FROM ms_kv_log WHERE created_at < now() - make_interval(secs => $1))
DELETE FROM ms_kv WHERE value IS NULL AND updated_at < now() - make_interval(secs => $1)

-- name_register --
-- Take a name for a pid: free names, names of dead nodes ($4: the heartbeat TTL)
-- and the pid's own name (idempotent: same token). Returns the token, or no row.
INSERT INTO ms_names AS n (name, pid, node, token) VALUES ($1, $2, $3, 1)
ON CONFLICT (name) DO UPDATE
SET pid = excluded.pid, node = excluded.node, updated_at = now(),
    token = CASE WHEN n.pid = excluded.pid THEN n.token ELSE n.token + 1 END
WHERE n.pid IS NULL OR n.pid = excluded.pid OR NOT EXISTS (
    SELECT 1 FROM ms_nodes m
    WHERE m.name = n.node AND m.heartbeat_at > now() - make_interval(secs => $4))
RETURNING token

-- name_lookup --
-- A name's holder and token, when held by a pid of a live node ($2: the TTL).
SELECT n.pid, n.token FROM ms_names n
JOIN ms_nodes m ON m.name = n.node AND m.heartbeat_at > now() - make_interval(secs => $2)
WHERE n.name = $1 AND n.pid IS NOT NULL

-- name_unregister --
-- Free a name ($2: only if held by this pid, when given).
UPDATE ms_names SET pid = NULL, node = NULL, updated_at = now()
WHERE name = $1 AND pid IS NOT NULL AND ($2::text IS NULL OR pid = $2)
RETURNING name

-- names_release_pids --
-- Free the names held by these pids (their processes exited).
UPDATE ms_names SET pid = NULL, node = NULL, updated_at = now()
WHERE pid = ANY($1::text[]) RETURNING name

-- names_release_dead --
-- Free the names held on nodes whose heartbeat is older than $1 seconds.
UPDATE ms_names n SET pid = NULL, node = NULL, updated_at = now()
WHERE n.pid IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM ms_nodes m
    WHERE m.name = n.node AND m.heartbeat_at > now() - make_interval(secs => $1))
RETURNING n.name

-- names_of --
-- Every held name (for the dashboard and tests).
SELECT name, pid, node, token FROM ms_names WHERE pid IS NOT NULL ORDER BY name

-- group_lock --
-- Serialize writers of the group log (see the top of this section).
SELECT pg_advisory_xact_lock(7302)

-- group_upsert --
-- Add deltas (arrays: scope, grp, pid, node, delta; one row per member) to counts.
INSERT INTO ms_group_members AS g (scope, grp, pid, node, count)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
ON CONFLICT (scope, grp, pid) DO UPDATE SET count = g.count + excluded.count

-- group_drop_empty --
-- Remove members whose count fell to zero.
DELETE FROM ms_group_members WHERE count <= 0

-- group_log --
-- Append membership changes (arrays: scope, grp, pid, node, delta; $6 origin node).
INSERT INTO ms_group_log (seq, scope, grp, pid, node, delta, origin)
SELECT nextval('ms_group_seq'), s, g, p, n, d, $6
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[]) WITH ORDINALITY
    AS t(s, g, p, n, d, i)
ORDER BY i

-- group_remove_nodes --
-- Remove every membership of pids on these nodes; returns what was removed.
DELETE FROM ms_group_members WHERE node = ANY($1::text[])
RETURNING scope, grp, pid, node, count

-- group_remove_pids --
-- Remove every membership of these pids; returns what was removed.
DELETE FROM ms_group_members WHERE pid = ANY($1::text[])
RETURNING scope, grp, pid, node, count

-- group_members_all --
-- The whole membership (a snapshot, read with group_head in one transaction).
SELECT scope, grp, pid, node, count FROM ms_group_members

-- group_head --
-- The latest group log position.
SELECT coalesce(max(seq), 0) FROM ms_group_log

-- group_tail --
-- Group log entries after $1, in order.
SELECT seq, scope, grp, pid, node, delta, origin FROM ms_group_log
WHERE seq > $1 ORDER BY seq LIMIT $2

-- group_log_start --
-- The oldest group log position kept (a reader behind it reloads the snapshot).
SELECT coalesce(min(seq), 0) FROM ms_group_log

-- group_prune --
-- Forget group log entries older than $1 seconds.
DELETE FROM ms_group_log WHERE created_at < now() - make_interval(secs => $1)

-- hub_join --
-- This node serves the hub (not draining).
INSERT INTO ms_hub_nodes (node) VALUES ($1)
ON CONFLICT (node) DO UPDATE SET draining = false

-- hub_leave --
-- This node no longer serves the hub.
DELETE FROM ms_hub_nodes WHERE node = $1

-- hub_drain --
-- Mark a node draining: placement leaves it out.
UPDATE ms_hub_nodes SET draining = true WHERE node = $1

-- hub_topology --
-- Hub nodes with their liveness ($1: the TTL) and heartbeat age in seconds.
SELECT h.node, h.draining, coalesce(m.heartbeat_at > now() - make_interval(secs => $1), false)
       AS alive, extract(epoch FROM now() - m.heartbeat_at)::float8 AS age
FROM ms_hub_nodes h LEFT JOIN ms_nodes m ON m.name = h.node ORDER BY h.node

-- hub_prune --
-- Forget hub nodes silent for more than $1 seconds.
DELETE FROM ms_hub_nodes h WHERE NOT EXISTS (
    SELECT 1 FROM ms_nodes m
    WHERE m.name = h.node AND m.heartbeat_at > now() - make_interval(secs => $1))
RETURNING h.node

-- proc_insert --
-- New children (arrays: child_id, name, args, metadata, nodes); existing ids are skipped.
INSERT INTO ms_processes (child_id, name, args, metadata, nodes)
SELECT c, n, a::json, m::jsonb, g::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS t(c, n, a, m, g)
ON CONFLICT (child_id) DO NOTHING
RETURNING child_id

-- proc_list --
-- Every child (the placement input).
SELECT child_id, name, state, nodes::text AS nodes, metadata::text AS metadata, incarnation,
       error::text AS error
FROM ms_processes

-- proc_instances --
-- Every running instance.
SELECT child_id, node, role, incarnation FROM ms_process_instances

-- proc_get --
-- Children by id with their started instances (arrays of node and incarnation).
SELECT p.child_id, p.name, p.state, p.error::text AS error, p.metadata::text AS metadata,
       coalesce(array_agg(i.node ORDER BY i.role) FILTER (WHERE i.node IS NOT NULL), '{}') AS nodes,
       coalesce(array_agg(i.incarnation ORDER BY i.role) FILTER (WHERE i.node IS NOT NULL), '{}')
           AS incarnations
FROM ms_processes p LEFT JOIN ms_process_instances i ON i.child_id = p.child_id AND i.ready
WHERE p.child_id = ANY($1::text[])
GROUP BY p.child_id

-- proc_drop_instances --
-- Remove the instances on these nodes (dead ones); returns them.
DELETE FROM ms_process_instances WHERE node = ANY($1::text[])
RETURNING child_id, node, incarnation

-- proc_claim --
-- Start instances of these children on node $2 with role $3 (skipped when the
-- child already has an active instance, or one on this node). Returns the
-- claimed children with their new incarnation and their last state.
WITH ins AS (
    INSERT INTO ms_process_instances (child_id, node, role, incarnation)
    SELECT p.child_id, $2, $3, p.incarnation + 1 FROM ms_processes p
    WHERE p.child_id = ANY($1::text[]) AND p.state = 'running'
    ORDER BY p.child_id
    ON CONFLICT DO NOTHING
    RETURNING child_id, incarnation
)
UPDATE ms_processes p SET incarnation = ins.incarnation, updated_at = now()
FROM ins WHERE p.child_id = ins.child_id
RETURNING p.child_id, p.name, p.args::text AS args, p.metadata::text AS metadata,
          p.state_data::text AS state_data, p.incarnation

-- proc_release --
-- Give up instances (arrays: child_id, incarnation) on node $3, keeping each
-- child's handover state ($2, JSON text or NULL to keep the old one).
WITH gone AS (
    DELETE FROM ms_process_instances i
    USING unnest($1::text[], $4::bigint[]) AS t(c, inc)
    WHERE i.child_id = t.c AND i.node = $3 AND i.incarnation = t.inc
    RETURNING i.child_id
)
UPDATE ms_processes p SET state_data = coalesce(t.s::json, p.state_data), updated_at = now()
FROM unnest($1::text[], $2::text[]) AS t(c, s)
WHERE p.child_id = t.c AND p.child_id IN (SELECT child_id FROM gone)
RETURNING p.child_id

-- proc_transfer --
-- Hand instances (arrays: child_id, incarnation, state, target node) from node
-- $5 to their targets in one statement: the old instance goes, the new one
-- (incarnation + 1) comes, with the handover state. Returns the moved children.
WITH gone AS (
    DELETE FROM ms_process_instances i
    USING unnest($1::text[], $2::bigint[]) AS t(c, inc)
    WHERE i.child_id = t.c AND i.node = $5 AND i.incarnation = t.inc AND i.role = 'active'
    RETURNING i.child_id
), moved AS (
    UPDATE ms_processes p
    SET state_data = coalesce(t.s::json, p.state_data), incarnation = p.incarnation + 1,
        updated_at = now()
    FROM unnest($1::text[], $3::text[], $4::text[]) AS t(c, s, target)
    WHERE p.child_id = t.c AND p.child_id IN (SELECT child_id FROM gone)
    RETURNING p.child_id, p.incarnation, t.target
)
INSERT INTO ms_process_instances (child_id, node, role, incarnation)
SELECT child_id, target, 'active', incarnation FROM moved
RETURNING child_id, node, incarnation

-- proc_checkpoint --
-- Persist a child's state, if instance ($2 node, $3 incarnation) still runs it.
UPDATE ms_processes p SET state_data = $4::json, updated_at = now()
WHERE p.child_id = $1 AND EXISTS (
    SELECT 1 FROM ms_process_instances i
    WHERE i.child_id = $1 AND i.node = $2 AND i.incarnation = $3)
RETURNING p.child_id

-- proc_fail --
-- Mark a child failed with its error and remove its instance on node $2.
WITH gone AS (
    DELETE FROM ms_process_instances WHERE child_id = $1 AND node = $2 RETURNING child_id
)
UPDATE ms_processes SET state = 'failed', error = $3::json, updated_at = now()
WHERE child_id = $1 RETURNING child_id

-- proc_stop --
-- Ask for these children to stop (their nodes terminate them).
UPDATE ms_processes SET state = 'stopping', updated_at = now()
WHERE child_id = ANY($1::text[]) RETURNING child_id

-- proc_drop_local --
-- Remove instances of these children on node $2 (they were terminated).
DELETE FROM ms_process_instances WHERE child_id = ANY($1::text[]) AND node = $2
RETURNING child_id

-- proc_delete_stopped --
-- Delete stopping or failed children ($1) that no instance runs any more, with their mailboxes.
WITH gone AS (
    DELETE FROM ms_processes p
    WHERE p.child_id = ANY($1::text[]) AND p.state IN ('stopping', 'failed') AND NOT EXISTS (
        SELECT 1 FROM ms_process_instances i WHERE i.child_id = p.child_id)
    RETURNING child_id
), mail AS (
    DELETE FROM ms_mailbox m USING gone WHERE m.child_id = gone.child_id
)
SELECT child_id FROM gone

-- mailbox_put --
-- Durable messages (arrays: child_id, body JSON, reply_to, name, token), in order.
INSERT INTO ms_mailbox (child_id, body, reply_to, name, token)
SELECT c, b::json, r, n, t
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) WITH ORDINALITY
    AS u(c, b, r, n, t, i)
ORDER BY i

-- mailbox_take --
-- Messages for children whose active instance runs on node $2 ($1: their ids) not yet delivered
-- ($3: seqs in flight), oldest first; with the current token of the name each
-- was sent to (a mismatch means a stale holder: the message is dropped).
SELECT m.seq, m.child_id, m.body::text AS body, m.reply_to, m.token, n.token AS current_token,
       n.pid AS holder
FROM ms_mailbox m
JOIN ms_process_instances i ON i.child_id = m.child_id AND i.node = $2 AND i.role = 'active'
LEFT JOIN ms_names n ON n.name = m.name
WHERE m.child_id = ANY($1::text[]) AND NOT (m.seq = ANY($3::bigint[]))
ORDER BY m.seq LIMIT $4

-- mailbox_ack --
-- Delete handled messages.
DELETE FROM ms_mailbox WHERE seq = ANY($1::bigint[])

-- reply_put --
-- Answers to remote calls (arrays: id, body JSON, error JSON).
INSERT INTO ms_replies (id, body, error)
SELECT i, b::json, e::json FROM unnest($1::text[], $2::text[], $3::text[]) AS t(i, b, e)
ON CONFLICT (id) DO NOTHING

-- reply_take --
-- Take the answers that arrived for these calls.
DELETE FROM ms_replies WHERE id = ANY($1::text[])
RETURNING id, body::text AS body, error::text AS error

-- reply_prune --
-- Forget answers nobody took within $1 seconds, and messages to children that no longer exist.
WITH r AS (DELETE FROM ms_replies WHERE created_at < now() - make_interval(secs => $1))
DELETE FROM ms_mailbox m
WHERE m.created_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM ms_processes p WHERE p.child_id = m.child_id)

-- cluster_notify --
-- Tell every hub something changed (channel mainspring_cluster).
SELECT pg_notify('mainspring_cluster', $1)

-- proc_state --
-- A child's args and last handover or checkpoint state.
SELECT args::text AS args, state_data::text AS state_data FROM ms_processes WHERE child_id = $1

-- proc_promote --
-- Make this node's passive replica ($2) the child's active instance (fails if one is active).
UPDATE ms_process_instances SET role = 'active'
WHERE child_id = $1 AND node = $2 AND role = 'passive'

-- proc_ready --
-- Instances (arrays: child_id, incarnation) on node $3 whose init succeeded.
UPDATE ms_process_instances i SET ready = true
FROM unnest($1::text[], $2::bigint[]) AS t(c, inc)
WHERE i.child_id = t.c AND i.node = $3 AND i.incarnation = t.inc
