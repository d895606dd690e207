-- `runherd prune`: finished runs older than a cut-off, with their events, steps and attempts.
-- A run is pruned only when it is terminal, finished before the cut-off, has no worker the reaper may
-- still have to find (an attempt with a handle and no exit), and no status message still in the outbox.

-- name: prune_preview
-- What `prune --yes` would delete, counted (a dry run). $1 age in seconds.
SELECT count(*) AS runs,
       coalesce(sum((SELECT count(*) FROM events e WHERE e.run_id = r.run_id)), 0)::bigint AS events,
       coalesce(sum((SELECT count(*) FROM steps s WHERE s.run_id = r.run_id)), 0)::bigint AS steps,
       coalesce(sum((SELECT count(*) FROM attempts a WHERE a.run_id = r.run_id)), 0)::bigint AS attempts,
       min(r.ended_at) AS oldest,
       max(r.ended_at) AS newest
FROM runs r
WHERE r.status IN ('SUCCESS', 'FAILURE', 'CANCELED')
  AND coalesce(r.ended_at, r.status_changed_at) < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = r.run_id AND a.handle IS NOT NULL AND a.exited_at IS NULL)
  AND NOT EXISTS (SELECT 1 FROM status_outbox o WHERE o.run_id = r.run_id);

-- name: prune_batch
-- One batch, one short transaction: at most $2 runs, skipping rows another transaction holds, so a
-- prune never waits on (nor blocks) the services. Steps and attempts go by ON DELETE CASCADE.
-- $1 age in seconds, $2 batch size.
WITH doomed AS (
    SELECT r.run_id FROM runs r
    WHERE r.status IN ('SUCCESS', 'FAILURE', 'CANCELED')
      AND coalesce(r.ended_at, r.status_changed_at) < now() - make_interval(secs => $1)
      AND NOT EXISTS (
          SELECT 1 FROM attempts a WHERE a.run_id = r.run_id AND a.handle IS NOT NULL AND a.exited_at IS NULL)
      AND NOT EXISTS (SELECT 1 FROM status_outbox o WHERE o.run_id = r.run_id)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone_events AS (
    DELETE FROM events e USING doomed d WHERE e.run_id = d.run_id RETURNING 1
), gone_runs AS (
    DELETE FROM runs r USING doomed d WHERE r.run_id = d.run_id RETURNING 1
)
SELECT (SELECT count(*) FROM gone_runs) AS runs, (SELECT count(*) FROM gone_events) AS events;
