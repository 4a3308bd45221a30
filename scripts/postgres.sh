#!/usr/bin/env bash
# Throwaway PostgreSQL for the store tests and benchmark.
#
#   scripts/postgres.sh [start] [DIR] [PORT]   start (or reuse) a cluster, print its URL last
#   scripts/postgres.sh stop [DIR] [PORT]      stop it
#
# DIR defaults to a temporary directory remembered per port, PORT to 54329.
# The cluster listens on 127.0.0.1 only, trusts every local connection and
# holds a database `helpline_test`. Typical use:
#
#   export HELPLINE_TEST_POSTGRES_URL=$(scripts/postgres.sh | tail -n1)
#
# Installs Debian's `postgresql` package when the server binaries are missing.
# PostgreSQL refuses to run as root, so as root the server runs as the
# `postgres` OS user; as any other user it runs as that user.
set -euo pipefail

cmd=start
if [[ ${1:-} == start || ${1:-} == stop ]]; then
    cmd=$1
    shift
fi
port=${2:-54329}
state_file="${TMPDIR:-/tmp}/helpline-test-postgres-${port}.dir"
url="postgres://postgres@127.0.0.1:${port}/helpline_test"

log() { echo "postgres.sh: $*" >&2; }

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the cluster's owner.
as_owner() {
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The newest installed server's bin directory, or nothing.
find_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x $d/initdb && -x $d/pg_ctl ]]; then
            echo "$d"
            return
        fi
    done
}

bindir=$(find_bindir)
if [[ -z $bindir ]]; then
    log "PostgreSQL server binaries not found; installing the postgresql package"
    as_root apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    bindir=$(find_bindir)
    [[ -n $bindir ]] || { log "installed postgresql but found no /usr/lib/postgresql/*/bin/initdb"; exit 1; }
fi
if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    log "the postgres OS user is missing; reinstall the postgresql package"
    exit 1
fi

dir=${1:-}
if [[ -z $dir && -f $state_file ]]; then
    dir=$(cat "$state_file")
fi

running() {
    [[ -n $dir && -f $dir/PG_VERSION ]] && as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1
}

if [[ $cmd == stop ]]; then
    if running; then
        as_owner "$bindir/pg_ctl" -D "$dir" stop -m fast -w >&2
        log "stopped the cluster in $dir"
        if [[ -f $dir/.helpline-temp ]]; then
            rm -rf "$dir"
            log "removed $dir"
        fi
    else
        log "no cluster running${dir:+ in $dir}"
    fi
    rm -f "$state_file"
    exit 0
fi

if ! running; then
    if [[ -z $dir ]]; then
        dir=$(mktemp -d "${TMPDIR:-/tmp}/helpline-pg.XXXXXX")
        fresh_temp=1
    fi
    mkdir -p "$dir"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"
    if ! as_owner test -w "$dir" -a -x "$dir"; then
        log "the postgres user cannot reach $dir (a parent directory is private);" \
            "choose a directory under /tmp, or leave DIR out"
        exit 1
    fi
    if [[ ! -f $dir/PG_VERSION ]]; then
        log "creating a cluster in $dir"
        as_owner "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --no-sync >&2
        # Marks a directory this script chose, which `stop` may delete.
        if [[ -n ${fresh_temp:-} ]]; then
            touch "$dir/.helpline-temp"
        fi
    fi
    log "starting PostgreSQL on 127.0.0.1:$port"
    as_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1" >&2 || {
        log "start failed; last lines of $dir/server.log:"
        tail -n 20 "$dir/server.log" >&2 || true
        exit 1
    }
fi
echo "$dir" > "$state_file"

for _ in $(seq 1 60); do
    if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres; then
        break
    fi
    sleep 0.5
done
"$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres || {
    log "PostgreSQL on port $port does not accept connections"
    exit 1
}

psql_cmd=("$bindir/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1)
if [[ $("${psql_cmd[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'helpline_test'") != 1 ]]; then
    "${psql_cmd[@]}" -c "CREATE DATABASE helpline_test" >&2
fi
echo "$url"
