#!/usr/bin/env bash
# A throwaway PostgreSQL server for fault-injection tests, on 127.0.0.1 only, trusting local
# connections (user `postgres`, no password). Never use it for data you want to keep.
#
#   deploy/local/pg-node.sh start <data_dir> <port>   initdb on first use, start, wait until ready
#   deploy/local/pg-node.sh crash <data_dir>          stop -m immediate: no checkpoint, like a
#                                                     crash; the next start runs recovery
#   deploy/local/pg-node.sh stop  <data_dir>          stop -m fast (no-op when not running)
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

find_pg_bin || die "PostgreSQL is not installed (deploy/local/prereqs.sh installs it)"
[ $# -ge 2 ] || { echo "usage: $0 start|crash|stop <data_dir> [port]" >&2; exit 2; }
cmd=$1
dir=$2

case "$cmd" in
start)
    [ $# -eq 3 ] || { echo "usage: $0 start <data_dir> <port>" >&2; exit 2; }
    port=$3
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir"; fi
    chmod 700 "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
        as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --encoding=UTF8 --no-locale \
            --auth=trust >/dev/null
        # TimescaleDB, where make up's server loads it, so the schemas made here match.
        timescale_settings >>"$dir/postgresql.conf"
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -w -t 60 -l "$dir/server.log" \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" \
        start >/dev/null
    ;;
crash)
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate -w -t 60 stop >/dev/null
    ;;
stop)
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
