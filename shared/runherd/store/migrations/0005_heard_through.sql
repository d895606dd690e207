-- Silence is measured, not assumed (issue 8). A worker is hung when it has not been heard for the
-- heartbeat timeout *while the heartbeat pipeline itself was heard*, both in the database's clock:
-- a stalled heartbeat service, broker or queue holds the hang rule instead of resuming every run.
-- How the watermark advances: services/runherd/heartbeat/watermark.py.

-- One row per heartbeat service replica. heard_through: every heartbeat published before this time
-- (database clock) that RabbitMQ handed to this replica is written; it is the stamp of the latest
-- canary the replica wrote. seen_at: the replica's last sign of life; a row silent for longer than
-- RabbitMQ takes to drop a dead consumer (and requeue what it held) no longer counts.
CREATE TABLE heartbeat_replicas (
    replica       text        PRIMARY KEY,
    heard_through timestamptz NOT NULL DEFAULT '-infinity',
    seen_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Canaries on their way through the heartbeats queue. The message carries only the nonce; the stamp
-- stays here, so no message (nor a worker's clock) can move the watermark to a time the database did
-- not issue.
CREATE TABLE heartbeat_canaries (
    nonce integer     PRIMARY KEY,
    stamp timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The same for lifecycle events: a monitor publishes canaries on runherd.events (routing key
-- run.<nil uuid>); the events queue has one active consumer applying in order, so when it has applied
-- a batch holding a canary stamped T, every event published before T is applied (or dead-lettered).
CREATE TABLE event_canaries (
    nonce integer     PRIMARY KEY,
    stamp timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE event_watermark (
    one             boolean     PRIMARY KEY DEFAULT true CHECK (one),
    applied_through timestamptz              -- NULL: no canary applied yet
);
INSERT INTO event_watermark DEFAULT VALUES;

-- How far runherd has heard its workers: the least of the heartbeat pipeline's watermark (the least
-- of the live replicas': any of them may hold unwritten heartbeats) and the event watermark (a
-- worker's RUN_SUCCESS still queued must not let its silence read as a hang). NULL when either is
-- unknown: no heartbeat replica alive, one that has heard nothing yet, or no event canary applied.
-- 180 s: RabbitMQ drops a consumer that stopped answering after its 60 s AMQP heartbeat timeout,
-- so by then whatever a stopped replica held is back on the queue.
CREATE FUNCTION runherd_heard_through() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN hb.through IS NOT NULL AND ev.through IS NOT NULL THEN least(hb.through, ev.through) END
    FROM (SELECT nullif(min(heard_through), '-infinity') AS through
          FROM heartbeat_replicas WHERE seen_at > clock_timestamp() - interval '180 seconds') hb,
         (SELECT applied_through AS through FROM event_watermark) ev
$$;
