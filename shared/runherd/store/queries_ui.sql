-- Named queries of `runherd ui` (read only; loaded with queries.sql, see shared/store/ui.py).

-- name: ui_runs_page
-- One page of the run list, newest first, by keyset: /*filters*/ is replaced by the AND-ed clauses
-- of store/ui.py's FILTERS (fixed text, values always parameters), so each combination of filters
-- is its own prepared statement with a plan fitted to it. Indexes: runs_keyset, runs_status_keyset,
-- runs_job, runs_tags (migration 0007).
SELECT run_id, job, status, attempt, resumes, tags, reason, created_at, started_at, ended_at,
       parent_run_id, root_run_id, retry_number
FROM runs
WHERE true /*filters*/
ORDER BY created_at DESC, run_id DESC
LIMIT $1;

-- name: ui_runs_page_newer
-- The page before a cursor (the "newer" link): the same filters, oldest first, reversed by the caller.
SELECT run_id, job, status, attempt, resumes, tags, reason, created_at, started_at, ended_at,
       parent_run_id, root_run_id, retry_number
FROM runs
WHERE true /*filters*/
ORDER BY created_at, run_id
LIMIT $1;

-- name: ui_status_counts
-- Runs per status under the same filters (the status filter left out), each counted up to $1: one
-- index range scan per status that stops at the cap (runs_queued, runs_in_flight, runs_status_keyset:
-- the statuses are written out so each subquery matches its partial index), so the counts cost the
-- same with a million runs as with a hundred thousand.
SELECT 'QUEUED' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'QUEUED' /*filters*/ LIMIT $1) c) AS n
UNION ALL
SELECT 'STARTING' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'STARTING' /*filters*/ LIMIT $1) c) AS n
UNION ALL
SELECT 'STARTED' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'STARTED' /*filters*/ LIMIT $1) c) AS n
UNION ALL
SELECT 'CANCELING' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'CANCELING' /*filters*/ LIMIT $1) c) AS n
UNION ALL
SELECT 'SUCCESS' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'SUCCESS' /*filters*/ LIMIT $1) c) AS n
UNION ALL
SELECT 'FAILURE' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'FAILURE' /*filters*/ LIMIT $1) c) AS n
UNION ALL
SELECT 'CANCELED' AS status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = 'CANCELED' /*filters*/ LIMIT $1) c) AS n;

-- name: ui_status_counts_grouped
-- The same under a job or tag filter: one pass over the matching runs (runs_job, runs_tags), stopping
-- after $1 of them; then each count is a lower bound (the caller marks them so).
SELECT status, count(*) AS n FROM (SELECT status FROM runs WHERE true /*filters*/ LIMIT $1) matching
GROUP BY status;

-- name: ui_attempts
-- Every attempt of a run, oldest first: its worker handle and how it ended.
SELECT attempt, launcher, handle, created_at, launched_at, last_heartbeat_at, exited_at, exit_code, exit_reason
FROM attempts WHERE run_id = $1 ORDER BY attempt;

-- name: ui_jobs
-- Job names for the filter's suggestions (runs_job: a loose index scan would be faster still; this
-- reads the newest 5,000 runs only).
SELECT DISTINCT job FROM (SELECT job FROM runs ORDER BY created_at DESC LIMIT 5000) recent ORDER BY job LIMIT 200;

-- name: ui_heartbeat_replicas
-- The heartbeat service's replicas (migration 0005) and how far each has written heartbeats.
SELECT replica, heard_through, seen_at,
       extract(epoch FROM clock_timestamp() - nullif(heard_through, '-infinity'))::float8 AS lag_seconds,
       seen_at > clock_timestamp() - interval '180 seconds' AS alive
FROM heartbeat_replicas ORDER BY replica;

-- name: ui_watermarks
-- How far events are applied (monitor canaries), how far workers are heard, and the oldest silence
-- of a STARTED run's current attempt.
SELECT w.applied_through,
       extract(epoch FROM clock_timestamp() - w.applied_through)::float8 AS events_lag_seconds,
       extract(epoch FROM clock_timestamp() - runherd_heard_through())::float8 AS heard_lag_seconds,
       (SELECT extract(epoch FROM clock_timestamp() - min(coalesce(a.last_heartbeat_at, a.launched_at)))::float8
        FROM runs r JOIN attempts a ON a.run_id = r.run_id AND a.attempt = r.attempt
        WHERE r.status = 'STARTED') AS oldest_silence_seconds,
       (SELECT count(*) FROM status_outbox) AS outbox_backlog,
       clock_timestamp() AS now
FROM event_watermark w;

-- name: ui_leaders
-- Which database sessions hold runherd's advisory locks: the outbox relay and a dequeue in progress.
SELECT l.objid::bigint AS lock_id, a.pid, a.client_addr::text AS client_addr, a.application_name, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objid = ANY($1::oid[]);

-- name: ui_queued
-- The first queued runs in dequeue order (priority, then FIFO: the runs_queued index), with what
-- `views.waiting_reasons` needs to say why each waits.
SELECT run_id, job, status, priority, tags, created_at, not_before, retry_number, parent_run_id
FROM runs WHERE status = 'QUEUED'
ORDER BY priority DESC, created_at, run_id
LIMIT $1;

-- name: ui_monitor_replicas
-- The monitor replicas that hold a lease for sharded event ingest (migration 0009), and whether
-- each is within the lease $1 (seconds): the live ones share the shards.
SELECT replica, seen_at, seen_at > clock_timestamp() - make_interval(secs => $1::float8) AS alive
FROM monitor_replicas ORDER BY replica;
