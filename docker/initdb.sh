#!/bin/bash
# Runs once, when the container initialises its data directory.
set -e
cat >>"$PGDATA/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_ihub'
ihub.databases = '${POSTGRES_DB:-postgres}'
ihub.listen_address = '0.0.0.0:8470'
max_worker_processes = 16
CONF
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    -c "CREATE EXTENSION IF NOT EXISTS pg_ihub"
