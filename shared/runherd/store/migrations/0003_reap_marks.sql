-- Workers that must stop are marked when it becomes so (their run finished, or their attempt was
-- superseded by a resume), so the reap rule reads only those, through a small partial index,
-- instead of checking every live attempt against its run.

ALTER TABLE attempts ADD COLUMN reap_after timestamptz;  -- '-infinity': superseded, reap at once

CREATE INDEX attempts_to_reap ON attempts (reap_after) WHERE exited_at IS NULL AND reap_after IS NOT NULL;

-- Attempts that were already due under the old rule.
UPDATE attempts a SET reap_after = CASE WHEN a.attempt < r.attempt THEN '-infinity'::timestamptz ELSE r.ended_at END
FROM runs r
WHERE r.run_id = a.run_id AND a.exited_at IS NULL
  AND (a.attempt < r.attempt OR r.status IN ('SUCCESS', 'FAILURE', 'CANCELED'));
