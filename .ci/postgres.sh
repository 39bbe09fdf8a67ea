#!/usr/bin/env bash
# A throwaway PostgreSQL on loopback for the sweep tests (shared-storage sweeps over RDB).
#
#   eval "$(.ci/postgres.sh)"      # install if missing, start (or reuse), export MUTRANSFER_PG_URL
#   .ci/postgres.sh stop           # stop the server and delete its data directory
#
# Debian's packages (apt-get install postgresql) when no server binaries are found; the server
# runs as a non-root user (postgres when we are root) from a data directory under
# $MUTRANSFER_PG_DIR (default /tmp/mutransfer-pg-<uid>), on 127.0.0.1 and a free port, trust
# authentication, fsync off. Idempotent: a running server is reused. Stdout carries only the
# export line; messages go to stderr.
set -euo pipefail

DIR="${MUTRANSFER_PG_DIR:-/tmp/mutransfer-pg-$(id -u)}"
DB=mutransfer
ROLE=mutransfer

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; fi
}

BIN=$(find_bin)
if [[ -z "$BIN" ]]; then
    if [[ "${1:-}" == "stop" ]]; then exit 0; fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin and cannot apt-get install them"
        exit 1
    fi
    log "installing Debian's postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN=$(find_bin)
    [[ -n "$BIN" ]] || { log "postgresql installed but no server binaries found"; exit 1; }
fi

# Run as a non-root user: initdb and postgres refuse to run as root.
if [[ $(id -u) -eq 0 ]]; then
    RUN_USER=postgres
    id "$RUN_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$RUN_USER"
    as_user() { runuser -u "$RUN_USER" -- "$@"; }
else
    RUN_USER=$(id -un)
    as_user() { "$@"; }
fi

if [[ "${1:-}" == "stop" ]]; then
    if [[ -f "$DIR/data/postmaster.pid" ]]; then
        as_user "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$DIR"
    log "stopped"
    exit 0
fi

url() { echo "export MUTRANSFER_PG_URL=postgresql+psycopg2://$ROLE@127.0.0.1:$1/$DB"; }

if [[ -f "$DIR/port" ]] && as_user "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    port=$(cat "$DIR/port")
    log "reusing the server on 127.0.0.1:$port ($DIR)"
    url "$port"
    exit 0
fi

rm -rf "$DIR"
mkdir -p "$DIR"
chown "$RUN_USER" "$DIR"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_user "$BIN/initdb" -D "$DIR/data" -U "$ROLE" -A trust --no-sync -E UTF8 >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
as_user "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-p $port -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200" \
    start >&2 || { cat "$DIR/server.log" >&2; exit 1; }
as_user "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$ROLE" "$DB"
echo "$port" >"$DIR/port"
log "started PostgreSQL ($BIN) on 127.0.0.1:$port, data in $DIR"
url "$port"
