-- Named queries of worker kills (loaded with queries.sql; see shared/store/kills.py).

-- name: claim_kills
-- The workers a sweep decided to stop, claimed in the transaction that decided it, so the reap rule
-- leaves them to this sweep for its lease and takes them over only if no exit is recorded by then.
-- The transition or resume of the same transaction has marked them (reap_after); an attempt not
-- marked yet is due at once. $1 run ids, $2 their attempts.
UPDATE attempts a SET reap_after = coalesce(a.reap_after, '-infinity'), reap_claimed_at = clock_timestamp()
FROM unnest($1::uuid[], $2::integer[]) AS u(run_id, attempt)
WHERE a.run_id = u.run_id AND a.attempt = u.attempt AND a.exited_at IS NULL AND a.handle IS NOT NULL
RETURNING a.run_id, a.attempt, a.handle;

-- name: log_kill_failure
-- A terminate that could not be confirmed, written once per attempt: the reap rule retries it
-- every lease, and the event log must not fill with the same line. $5: the data (jsonb).
INSERT INTO events (run_id, attempt, source, type, message, data)
SELECT $1::uuid, $2::integer, $3::text, 'WORKER_TERMINATE_FAILED', $4::text, $5::jsonb
WHERE NOT EXISTS (
    SELECT 1 FROM events WHERE run_id = $1::uuid AND attempt = $2::integer AND type = 'WORKER_TERMINATE_FAILED'
);
