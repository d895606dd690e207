-- name: monitor_lease
-- Monitor replica $1 is alive (its lease renewed now); returns every replica alive within the
-- lease $2 (seconds), itself included, and forgets replicas long gone.
WITH alive AS (
    INSERT INTO monitor_replicas AS m (replica) VALUES ($1::text)
    ON CONFLICT (replica) DO UPDATE SET seen_at = clock_timestamp()
), gone AS (
    DELETE FROM monitor_replicas WHERE seen_at < clock_timestamp() - interval '1 day'
)
SELECT replica FROM monitor_replicas
WHERE replica <> $1::text AND seen_at > clock_timestamp() - make_interval(secs => $2::float8)
UNION
SELECT $1::text;

-- name: forget_monitor
-- A replica that stops cleanly gives its shards up at once.
DELETE FROM monitor_replicas WHERE replica = $1::text;

-- name: issue_event_canary_round
-- A round of canaries (nonces $1, one per shard and one unsharded) with one stamp, the database's
-- time now; returns the nonces inserted (a round with a nonce taken is withdrawn by the caller).
WITH lost AS (
    DELETE FROM event_canaries WHERE stamp < clock_timestamp() - interval '1 hour'
), stamp AS (
    SELECT clock_timestamp() AS t
)
INSERT INTO event_canaries (nonce, stamp, round)
SELECT n, (SELECT t FROM stamp), ($1::integer[])[1] FROM unnest($1::integer[]) AS n
ON CONFLICT (nonce) DO NOTHING
RETURNING nonce;

-- name: withdraw_event_canaries
DELETE FROM event_canaries WHERE nonce = ANY($1::integer[]);

-- name: record_event_canary_rounds
-- These canaries are applied; a round none of whose canaries is left is complete, and the event
-- watermark moves to its stamp. Run after locking the watermark row (record_event_canary_rounds
-- in store.py): replicas applying the last canaries of one round one after the other each see
-- what the other deleted. Returns whether the watermark moved.
WITH applied AS (
    DELETE FROM event_canaries WHERE nonce = ANY($1::integer[]) RETURNING stamp, round
), complete AS (
    SELECT a.stamp FROM applied a
    WHERE a.round IS NULL OR NOT EXISTS (
        SELECT 1 FROM event_canaries c WHERE c.round = a.round AND c.nonce <> ALL($1::integer[])
    )
), moved AS (
    UPDATE event_watermark w
    SET applied_through = greatest(w.applied_through, (SELECT max(stamp) FROM complete))
    WHERE EXISTS (SELECT 1 FROM complete)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM moved);

-- name: lock_event_watermark
SELECT 1 FROM event_watermark FOR UPDATE;
