-- name: ops_gauges
-- The operator's gauges (Dashboards and alerts), one statement: how long the oldest run that may
-- start (QUEUED, past any retry backoff) has waited; the status messages waiting in the outbox;
-- how far behind now the monitor hears the workers (NULL: no heartbeat replica is alive).
SELECT
    (SELECT extract(epoch FROM now() - min(greatest(created_at, not_before)))
       FROM runs
      WHERE status = 'QUEUED' AND (not_before IS NULL OR not_before <= now()))::float8 AS oldest_queued_seconds,
    (SELECT count(*) FROM status_outbox)::bigint AS outbox_backlog,
    extract(epoch FROM now() - runherd_heard_through())::float8 AS heard_through_lag_seconds;
