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

-- name: record_exits
-- record_exit for many attempts in one statement (a batch of confirmed terminations): the first
-- report of an exit wins. $1 run ids, $2 attempts, $3 exit codes, $4 reasons.
UPDATE attempts a
SET exited_at = coalesce(a.exited_at, clock_timestamp()),
    exit_code = coalesce(a.exit_code, u.exit_code), exit_reason = coalesce(a.exit_reason, u.reason)
FROM unnest($1::uuid[], $2::integer[], $3::integer[], $4::text[]) AS u(run_id, attempt, exit_code, reason)
WHERE a.run_id = u.run_id AND a.attempt = u.attempt;

-- name: log_kill_failures
-- log_kill_failure for many attempts in one statement, still once per attempt.
-- $1 run ids, $2 attempts, $3 source, $4 messages, $5 data (jsonb each).
INSERT INTO events (run_id, attempt, source, type, message, data)
SELECT u.run_id, u.attempt, $3::text, 'WORKER_TERMINATE_FAILED', u.message, u.data
FROM unnest($1::uuid[], $2::integer[], $4::text[], $5::jsonb[]) AS u(run_id, attempt, message, data)
WHERE NOT EXISTS (
    SELECT 1 FROM events e
    WHERE e.run_id = u.run_id AND e.attempt = u.attempt AND e.type = 'WORKER_TERMINATE_FAILED'
);
