#!/usr/bin/env bash
# A private, throw-away PostgreSQL server for the tests that need one (the sweep on RDB storage).
#
#   url=$(bash scripts/pg_test_server.sh start /tmp/q2g-pg)   # prints postgresql://postgres@127.0.0.1:PORT/q2g_test
#   Q2G_TEST_POSTGRES_URL=$url python -m pytest tests/test_sweep*.py
#   bash scripts/pg_test_server.sh stop /tmp/q2g-pg           # stops it and deletes DIR
#
# `start` makes a new cluster in DIR (initdb, trust auth: only for tests), runs it on 127.0.0.1 on a free
# port with its unix socket inside DIR (so it never clashes with a system server), creates the database
# q2g_test and prints its URL on stdout (everything else goes to stderr). As root it runs the server as
# the `postgres` user (PostgreSQL refuses to run as root); DIR must then be reachable by that user
# (e.g. under /tmp). Needs Debian's `postgresql` package (apt-get install -y postgresql).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$2

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/pg_ctl" ]; then
    echo "$0: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): apt-get install -y postgresql" >&2
    exit 1
fi

as_owner() {  # run a command as the user that owns the cluster
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$action" in
start)
    if [ -e "$dir/data" ]; then
        echo "$0: $dir/data already exists (a server from an earlier start?): stop it first" >&2
        exit 1
    fi
    mkdir -p "$dir"
    touch "$dir/.q2g-pg-test"  # `stop` deletes only a folder that `start` made
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
    if ! as_owner test -w "$dir"; then
        echo "$0: $dir is not writable by the server's user $(as_owner id -un) (use a folder under /tmp)" >&2
        exit 1
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }
    # fsync off: a test database that dies with the machine is thrown away anyway
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir/data -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
        start >&2 || {
        cat "$dir/server.log" >&2
        exit 1
    }
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres q2g_test
    echo "$port" >"$dir/port"
    echo "postgresql://postgres@127.0.0.1:$port/q2g_test"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    fi
    if [ -e "$dir/.q2g-pg-test" ]; then
        rm -rf "$dir"
    elif [ -e "$dir" ]; then
        echo "$0: $dir was not made by '$0 start': not deleting it" >&2
        exit 1
    fi
    ;;
*)
    usage
    ;;
esac
