-- Sharded event ingest (config event_shards > 1; README "Sharded event ingest").
-- One row per live monitor replica: it renews seen_at every second; a row older than the lease
-- (a few seconds) is a dead replica, and its shards go to the others (rendezvous hashing).
CREATE TABLE monitor_replicas (
    replica text        PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- With shards, the canaries go out in rounds, one per shard and one for the unsharded events queue,
-- sharing a stamp and a round id (the first nonce): the event watermark moves to a round's stamp once
-- every canary of the round is applied (the least over the shards). NULL: a canary of its own.
ALTER TABLE event_canaries ADD COLUMN round integer;
