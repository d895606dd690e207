-- runherd's PostgreSQL roles: run by a superuser, before or after `runherd migrate`; safe to run
-- again (it also sets the passwords, so it is how they are rotated).
--
--   psql -v ON_ERROR_STOP=1 -d postgres \
--        -v database=runherd \
--        -v owner=runherd_owner     -v owner_password="$RUNHERD_OWNER_PASSWORD" \
--        -v service=runherd_service -v service_password="$RUNHERD_SERVICE_PASSWORD" \
--        -v reader=runherd_reader   -v reader_password="$RUNHERD_READER_PASSWORD" \
--        -f scripts/postgres-roles.sql
--
-- owner:   owns the database and the schema: `runherd migrate` runs as it. Not a superuser, cannot
--          create roles or databases.
-- service: what the launcher, heartbeat and monitor services (and the CLI's commands) connect as:
--          SELECT, INSERT, UPDATE, DELETE on runherd's tables and the use of their sequences.
--          Cannot create, alter, drop or truncate anything, nor create roles.
-- reader:  SELECT only (a web UI, dashboards, `runherd runs` / `show` / `events`).
-- Workers never connect to PostgreSQL and get none of these.

SELECT format('CREATE ROLE %I', r) FROM unnest(ARRAY[:'owner', :'service', :'reader']) AS r
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec

ALTER ROLE :"owner" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT
    PASSWORD :'owner_password';
ALTER ROLE :"service" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT
    PASSWORD :'service_password';
ALTER ROLE :"reader" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT
    PASSWORD :'reader_password';

SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
ALTER DATABASE :"database" OWNER TO :"owner";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"service", :"reader";

\connect :"database"

-- The schema: only the owner creates in it (before PostgreSQL 15 every role could).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"service", :"reader";

-- A database migrated earlier by another role (say postgres) is handed to the owner.
SELECT format('ALTER TABLE public.%I OWNER TO %I', tablename, :'owner') FROM pg_tables
WHERE schemaname = 'public' AND tableowner <> :'owner' \gexec
SELECT format('ALTER FUNCTION %s OWNER TO %I', p.oid::regprocedure, :'owner')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND p.proname LIKE 'runherd\_%' AND pg_get_userbyid(p.proowner) <> :'owner' \gexec

-- What exists now ...
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"service";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"service";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader";
-- ... and what `runherd migrate` creates later, as the owner.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"service";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"service";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT ON TABLES TO :"reader";
