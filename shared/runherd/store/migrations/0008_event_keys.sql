-- The key that authenticates lifecycle events and heartbeats (issue 9, runherd.auth). Each worker
-- gets an HMAC of its run and attempt under it, in its plan; the launcher signs its WORKER_EXITED
-- with another. Only the services read this table: workers never connect to PostgreSQL.
-- Rotation (README, Security): previous := key, key := new, then restart the services.
CREATE TABLE runherd_keys (
    name       text        PRIMARY KEY,
    key        bytea       NOT NULL CHECK (length(key) >= 16),
    previous   bytea,
    rotated_at timestamptz NOT NULL DEFAULT now()
);

-- 32 bytes from gen_random_uuid() (PostgreSQL's strong random source, 244 random bits).
INSERT INTO runherd_keys (name, key)
VALUES ('events', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

-- The key is the services' alone: whoever reads it can forge any event. A read-only role (the reader
-- of scripts/postgres-roles.sql, which default privileges give SELECT on every new table) loses it;
-- a role that may write runs (the services') keeps it.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'runherd_keys'::regclass AND a.grantee NOT IN (0, c.relowner)
    LOOP
        IF NOT has_table_privilege(r.grantee, 'runs', 'INSERT') THEN
            EXECUTE format('REVOKE ALL ON runherd_keys FROM %s', r.grantee::regrole);
        END IF;
    END LOOP;
END $$;
