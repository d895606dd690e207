-- name: insert_runs
-- Runs as QUEUED in one statement ($1: a JSON array of runs, in the order their commands arrived;
-- created_at follows that order, so the queue stays FIFO within a batch). A launch batch and a
-- single retry or re-execution (with its lineage, a delay and a retry number) both come here.
-- The same run_id twice makes one run: an existing one is left as it is.
WITH given AS (
    SELECT (x->>'run_id')::uuid AS run_id, x->>'job' AS job, (x->>'priority')::integer AS priority,
           x->'tags' AS tags, x->'steps' AS steps, x->'env' AS env, x->>'launcher' AS launcher,
           (x->>'max_runtime_seconds')::double precision AS max_runtime_seconds,
           (x->>'parent_run_id')::uuid AS parent_run_id, (x->>'root_run_id')::uuid AS root_run_id,
           coalesce((x->>'retry_number')::integer, 0) AS retry_number,
           coalesce((x->>'delay_seconds')::double precision, 0) AS delay_seconds, ord
    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(x, ord)
), inserted AS (
    INSERT INTO runs (run_id, job, status, priority, tags, steps, env, launcher, max_runtime_seconds,
                      parent_run_id, root_run_id, retry_number, not_before, created_at)
    SELECT run_id, job, 'QUEUED', priority, tags, steps, env, launcher, max_runtime_seconds,
           parent_run_id, coalesce(root_run_id, run_id), retry_number,
           clock_timestamp() + make_interval(secs => delay_seconds), now() + make_interval(secs => ord / 1000000.0)
    FROM given ORDER BY ord
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id, job, attempt, tags, parent_run_id, created_at
), logged AS (
    INSERT INTO events (run_id, attempt, source, type, message, data)
    SELECT run_id, 0, 'runherd', 'RUN_STATUS', 'queued', jsonb_build_object('from', NULL, 'to', 'QUEUED')
    FROM inserted
), published AS (
    INSERT INTO status_outbox (run_id, routing_key, body)
    SELECT run_id, runherd_status_key('QUEUED', job),
           runherd_status_body(run_id, job, 'QUEUED', NULL, attempt, NULL, created_at, tags, parent_run_id)
    FROM inserted
)
SELECT run_id FROM inserted;
