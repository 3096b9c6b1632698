#!/usr/bin/env bash
# Idempotent: a local PostgreSQL (Debian's package) on 127.0.0.1:5432 with a role and database for
# the store tests. Prints the URL to export as AGENTCG_TEST_POSTGRES_URL.
#   export AGENTCG_TEST_POSTGRES_URL=$(scripts/start-postgres.sh | tail -n 1)
set -euo pipefail

PORT=5432
ROLE=agentcg
PASSWORD=agentcg
DB=agentcg_test

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres -- "$@"; fi
}

if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "ok installed"; then
  if [ "$(id -u)" != 0 ]; then echo "start-postgres: need root to install postgresql" >&2; exit 1; fi
  echo "start-postgres: installing postgresql" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# The newest installed server version; its "main" cluster (created unless present).
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {found=1} END {exit !found}'; then
  echo "start-postgres: creating cluster $version/main on port $PORT" >&2
  pg_createcluster --port "$PORT" "$version" main >/dev/null
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
if [ "$port" != "$PORT" ]; then
  echo "start-postgres: cluster $version/main uses port $port, not $PORT" >&2
  exit 1
fi

status=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}')
if [ "$status" != online ]; then
  echo "start-postgres: starting cluster $version/main" >&2
  pg_ctlcluster "$version" main start
fi
for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.2
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || { echo "start-postgres: not ready on 127.0.0.1:$PORT" >&2; exit 1; }

# Debian's pg_hba.conf allows scram-sha-256 password logins over 127.0.0.1 by default.
if [ "$(as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
  as_postgres psql -p "$PORT" -q -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
fi
if [ "$(as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  as_postgres psql -p "$PORT" -q -c "CREATE DATABASE $DB OWNER $ROLE"
fi

echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
