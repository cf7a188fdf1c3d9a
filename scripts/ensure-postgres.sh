#!/usr/bin/env bash
# Makes sure PostgreSQL answers at BRIDGE_DATABASE_URL, with its role and database, before tests
# or the demo run. Order: already up; the local cluster (pg_ctlcluster); `docker compose up -d
# postgres`; else explain. The role and database named in the URL are created when missing.
set -euo pipefail

url="${BRIDGE_DATABASE_URL:-postgresql://bridge:bridge@127.0.0.1:5432/bridge}"
wait_s="${BRIDGE_DATABASE_WAIT_S:-60}"

read -r host port user password database < <(python3 - "$url" <<'PY'
import sys
from urllib.parse import unquote, urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 5432, unquote(u.username or "bridge"),
      unquote(u.password or "") or "-", (u.path or "/bridge").lstrip("/") or "bridge")
PY
)

answers() {
    pg_isready -q -h "$host" -p "$port" -t 2 >/dev/null 2>&1
}

wait_until_up() {
    local deadline=$((SECONDS + wait_s))
    until answers; do
        if ((SECONDS >= deadline)); then
            echo "PostgreSQL did not answer at $host:$port within ${wait_s}s." >&2
            exit 1
        fi
        sleep 1
    done
}

# As the cluster's superuser: over the local socket as the postgres user when we can be it,
# else over TCP as postgres (trust or PGPASSWORD).
as_superuser() {
    if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && [ -d /var/run/postgresql ]; then
        runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtA "$@"
    else
        psql -h "$host" -p "$port" -U "${PGSUPERUSER:-postgres}" -v ON_ERROR_STOP=1 -qtA "$@"
    fi
}

if ! answers; then
    echo "PostgreSQL does not answer at $host:$port; trying to start one." >&2
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
        wait_until_up
        echo "Started the local PostgreSQL $version cluster." >&2
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        BRIDGE_KEY_SECRETS="${BRIDGE_KEY_SECRETS:-unused-postgres-only-secret}" docker compose up -d postgres
        wait_until_up
        echo "Started PostgreSQL with docker compose (its role and database come from compose)." >&2
        exit 0
    else
        cat >&2 <<MSG
No PostgreSQL answers at $host:$port, and none can be started here.
Get one of:
  - a local server:   apt-get install postgresql && pg_ctlcluster 15 main start
  - Docker:           docker compose up -d postgres
  - another server:   export BRIDGE_DATABASE_URL=postgresql://user:pass@host:5432/db
MSG
        exit 1
    fi
fi

# The role and database, if this machine's superuser can make them (a managed server's
# owner makes them once; then this finds them there).
if as_superuser -c "select 1" >/dev/null 2>&1; then
    if [ -z "$(as_superuser -c "select 1 from pg_roles where rolname = '$user'")" ]; then
        pw=$([ "$password" = "-" ] && echo "" || echo " PASSWORD '$password'")
        as_superuser -c "CREATE ROLE \"$user\" LOGIN$pw"
        echo "Created the PostgreSQL role $user." >&2
    fi
    if [ -z "$(as_superuser -c "select 1 from pg_database where datname = '$database'")" ]; then
        as_superuser -c "CREATE DATABASE \"$database\" OWNER \"$user\""
        echo "Created the PostgreSQL database $database." >&2
    fi
fi
