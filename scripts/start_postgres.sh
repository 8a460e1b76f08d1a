#!/usr/bin/env bash
# Start a local PostgreSQL for the store tests and print its URL on stdout (everything else goes to stderr):
#
#   export ALIGN_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)
#
# For CI and dev containers on Debian/Ubuntu, run as root (or with passwordless sudo): installs `postgresql` with
# apt-get if missing, creates or starts the cluster `main` (no systemd needed: pg_ctlcluster runs the server as
# the postgres user, which PostgreSQL insists on), on 127.0.0.1:5432 or the next free port if something else
# holds it, and creates role `align` (password `align`) with databases `align` and `align_test`.
# Idempotent: running it again just prints the URL.
set -euo pipefail

CLUSTER=${ALIGN_PG_CLUSTER:-main}

log() { echo "start_postgres: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# Run a command as the postgres OS user (peer authentication over the local socket).
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    else
        # cd /: the postgres user may not be allowed into the caller's directory.
        as_root su postgres -s /bin/bash -c "cd / && $(printf '%q ' "$@")"
    fi
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

install_postgres() {
    if command -v pg_ctlcluster >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        return
    fi
    log "installing postgresql with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

newest_version() {
    ls /usr/lib/postgresql | sort -V | tail -n 1
}

cluster_field() {  # version, field number of pg_lsclusters: 3 = port, 4 = status
    pg_lsclusters -h | awk -v v="$1" -v c="$CLUSTER" -v f="$2" '$1 == v && $2 == c { print $f }'
}

free_port() {
    local port=5432
    while port_in_use "$port"; do port=$((port + 1)); done
    echo "$port"
}

start_cluster() {
    local version=$1 port
    if [ -z "$(cluster_field "$version" 3)" ]; then
        port=$(free_port)
        log "creating cluster $version/$CLUSTER on port $port"
        as_root pg_createcluster "$version" "$CLUSTER" --port="$port" >&2
    fi
    if [ "$(cluster_field "$version" 4)" = online ]; then
        return
    fi
    port=$(cluster_field "$version" 3)
    if port_in_use "$port"; then
        # Another server holds the cluster's port: move our (stopped) cluster to a free one.
        port=$(free_port)
        log "port in use; moving cluster $version/$CLUSTER to port $port"
        as_root pg_conftool "$version" "$CLUSTER" set port "$port"
    fi
    # The socket directory lives on tmpfs in many containers and may be gone after a restart.
    as_root install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    log "starting cluster $version/$CLUSTER on port $port"
    as_root pg_ctlcluster "$version" "$CLUSTER" start >&2
}

create_role_and_databases() {
    local port=$1
    as_postgres psql -q -v ON_ERROR_STOP=1 -p "$port" -d postgres >&2 <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'align') THEN
        CREATE ROLE align LOGIN PASSWORD 'align' CREATEDB;
    END IF;
END
$$;
SQL
    for db in align align_test; do
        if [ -z "$(as_postgres psql -tAq -p "$port" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
            as_postgres createdb -p "$port" -O align "$db"
        fi
    done
}

wait_ready() {
    local port=$1
    for _ in $(seq 1 30); do
        if as_postgres pg_isready -q -p "$port"; then return; fi
        sleep 1
    done
    log "server on port $port did not become ready; see /var/log/postgresql/"
    exit 1
}

main() {
    install_postgres
    local version port
    version=$(newest_version)
    start_cluster "$version"
    port=$(cluster_field "$version" 3)
    wait_ready "$port"
    create_role_and_databases "$port"
    echo "postgresql+psycopg://align:align@127.0.0.1:$port/align_test"
}

main "$@"
