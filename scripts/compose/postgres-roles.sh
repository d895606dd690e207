#!/bin/sh
# The postgres container's first start (/docker-entrypoint-initdb.d): runherd's roles, from
# scripts/postgres-roles.sql, with the passwords compose passes in.
set -eu
psql -X -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v database="${POSTGRES_DB:-runherd}" \
    -v owner=runherd_owner -v owner_password="$RUNHERD_OWNER_PASSWORD" \
    -v service=runherd_service -v service_password="$RUNHERD_SERVICE_PASSWORD" \
    -v reader=runherd_reader -v reader_password="$RUNHERD_READER_PASSWORD" \
    -f /runherd/postgres-roles.sql
