-- Named queries of run retries and lineage (loaded with queries.sql; see shared/store/retries.py).

-- name: claim_failed_runs
-- Failed runs with no retry decision yet, oldest first (the runs_retry_pending partial index).
-- Locked with SKIP LOCKED: each monitor replica claims its own; the decision is recorded (retried =
-- true) in the same transaction, so a run is decided, and retried, at most once.
SELECT run_id, job, attempt, tags, failure_kind, retry_number, root_run_id, ended_at
FROM runs
WHERE status = 'FAILURE' AND NOT retried
ORDER BY ended_at
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: record_retries
-- One statement per batch of decisions: marks each origin decided, inserts its retry run (QUEUED,
-- not dequeued before the origin's end + the backoff) with the origin's successful steps as reused
-- under FROM_FAILURE, and writes both event logs and the QUEUED status message.
-- $1 origins, $2 messages for the origins' event logs, $3 new run ids (NULL: not retried),
-- $4 retry numbers, $5 strategies, $6 delays in seconds, $7 the new runs' tags, $8 log the decision.
WITH d AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::integer[], $5::text[], $6::float8[], $7::jsonb[],
                $8::boolean[]) AS u(origin, message, new_run_id, retry_number, strategy, delay, tags, logged)
), marked AS (
    UPDATE runs r SET retried = true
    FROM d
    WHERE r.run_id = d.origin AND r.status = 'FAILURE' AND NOT r.retried
    RETURNING r.run_id, r.attempt, r.job, r.priority, r.steps, r.env, r.launcher, r.max_runtime_seconds,
              coalesce(r.root_run_id, r.run_id) AS root_run_id, coalesce(r.ended_at, clock_timestamp()) AS ended_at
), retry AS (
    SELECT m.*, d.new_run_id, d.retry_number, d.strategy, d.delay, d.tags AS new_tags
    FROM marked m JOIN d ON d.origin = m.run_id
    WHERE d.new_run_id IS NOT NULL
), inserted AS (
    INSERT INTO runs (run_id, job, status, priority, tags, steps, env, launcher, max_runtime_seconds,
                      parent_run_id, root_run_id, retry_number, not_before)
    SELECT new_run_id, job, 'QUEUED', priority, new_tags, steps, env, launcher, max_runtime_seconds,
           run_id, root_run_id, retry_number, ended_at + make_interval(secs => delay)
    FROM retry
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id, job, attempt, tags, parent_run_id, retry_number, not_before, created_at
), reused AS (
    INSERT INTO steps (run_id, step_key, status, attempt, output, reused, ended_at)
    SELECT t.new_run_id, s.step_key, 'SUCCESS', 0, s.output, true, clock_timestamp()
    FROM retry t
    JOIN inserted i ON i.run_id = t.new_run_id
    JOIN steps s ON s.run_id = t.run_id AND s.status = 'SUCCESS'
    WHERE t.strategy = 'FROM_FAILURE'
), logged_origin AS (
    INSERT INTO events (run_id, attempt, source, type, message, data)
    SELECT m.run_id, m.attempt, 'monitor', CASE WHEN d.new_run_id IS NULL THEN 'RETRY_SKIPPED' ELSE 'RUN_RETRIED' END,
           d.message,
           jsonb_build_object('retry_run_id', d.new_run_id, 'retry_number', d.retry_number,
                              'strategy', d.strategy, 'delay_seconds', d.delay)
    FROM marked m JOIN d ON d.origin = m.run_id
    WHERE d.logged
), logged_new AS (
    INSERT INTO events (run_id, attempt, source, type, message, data)
    SELECT run_id, 0, 'monitor', 'RUN_STATUS',
           'queued: retry ' || retry_number || ' of run ' || parent_run_id
               || CASE WHEN not_before > created_at
                       THEN ', not before ' || to_char(not_before AT TIME ZONE 'UTC', 'HH24:MI:SS.MS') || ' UTC'
                       ELSE '' END,
           jsonb_build_object('from', NULL, 'to', 'QUEUED')
    FROM inserted
), published AS (
    INSERT INTO status_outbox (run_id, routing_key, body)
    SELECT run_id, runherd_status_key('QUEUED', job),
           runherd_status_body(run_id, job, 'QUEUED', NULL, attempt,
                               'retry ' || retry_number || ' of run ' || parent_run_id, created_at, tags,
                               parent_run_id)
    FROM inserted
    ORDER BY run_id
)
SELECT m.run_id AS origin, i.run_id AS retry_run_id
FROM marked m
JOIN d ON d.origin = m.run_id
LEFT JOIN inserted i ON i.run_id = d.new_run_id;

-- name: lineage
-- Every run sharing a root (the original run, its retries and re-executions), oldest first.
SELECT r.run_id, r.status, r.retry_number, r.parent_run_id, r.root_run_id, r.created_at, r.reason,
       r.failure_kind,
       (SELECT count(*) FROM steps s WHERE s.run_id = r.run_id AND s.reused) AS reused_steps
FROM runs r
WHERE r.root_run_id = $1
ORDER BY r.created_at, r.run_id
LIMIT $2;

-- name: queued_details
-- What `runherd runs --status QUEUED` needs beyond the listing: priority and the retry backoff.
SELECT run_id, priority, not_before, created_at FROM runs WHERE run_id = ANY($1::uuid[]) AND status = 'QUEUED';
