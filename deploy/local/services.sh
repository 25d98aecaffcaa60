#!/usr/bin/env bash
# Starts or stops Tally's own services (ingest-api, projector, query-api) as background
# processes on loopback, with logs in $TALLY_HOME/logs and pid files in $TALLY_HOME/run.
#   services.sh start <bin-dir>   idempotent: a service whose pid is alive is left alone
#   services.sh stop              SIGTERM (graceful: drain, flush, commit), then SIGKILL after 30 s
#   services.sh status
# Ports: TALLY_INGEST_PORT (8080), TALLY_QUERY_PORT (8081), TALLY_PROJECTOR_PORT (9102),
# ingest-api's OTLP/gRPC port TALLY_GRPC_PORT (4317), and the operations ports (health and
# metrics apart) TALLY_INGEST_OPS_PORT (9100) and TALLY_QUERY_OPS_PORT (9101).
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TALLY_INGEST_PORT="${TALLY_INGEST_PORT:-8080}"
TALLY_QUERY_PORT="${TALLY_QUERY_PORT:-8081}"
TALLY_PROJECTOR_PORT="${TALLY_PROJECTOR_PORT:-9102}"
TALLY_GRPC_PORT="${TALLY_GRPC_PORT:-4317}"
TALLY_INGEST_OPS_PORT="${TALLY_INGEST_OPS_PORT:-9100}"
TALLY_QUERY_OPS_PORT="${TALLY_QUERY_OPS_PORT:-9101}"
SERVICES=(projector ingest-api query-api)

port_of() {
    case $1 in
        ingest-api) echo "$TALLY_INGEST_PORT" ;;
        query-api) echo "$TALLY_QUERY_PORT" ;;
        projector) echo "$TALLY_PROJECTOR_PORT" ;;
    esac
}

# The operations port of a service that has one apart (the projector's port is its own).
ops_port_of() {
    case $1 in
        ingest-api) echo "$TALLY_INGEST_OPS_PORT" ;;
        query-api) echo "$TALLY_QUERY_OPS_PORT" ;;
    esac
}

ready() {
    curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$1/readyz"
}

start() {
    local bin_dir=$1
    mkdir -p "$TALLY_LOGS" "$TALLY_RUN"
    command -v curl >/dev/null || apt_install curl ca-certificates
    for svc in "${SERVICES[@]}"; do
        [ -x "$bin_dir/$svc" ] || die "$bin_dir/$svc is missing: build first (make build)"
    done
    # The key that seals SSO client secrets and notification channels at rest: made once, kept
    # with the local data.
    local secret="$TALLY_HOME/secret.key"
    if [ ! -s "$secret" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret")
    fi
    export TALLY_SECRET_KEY="${TALLY_SECRET_KEY:-$(cat "$secret")}"
    # A local stack: notification channels may point at receivers on this host (make
    # bench-alerts, a webhook receiver under development). Production leaves this off.
    export TALLY_NOTIFY_ALLOW_LOOPBACK="${TALLY_NOTIFY_ALLOW_LOOPBACK:-true}"
    # Every local sender (the load generators, make overload's 4 096 open requests, the
    # demo) comes from 127.0.0.1: no share per address, and room for them all.
    export TALLY_MAX_CONNECTIONS_PER_PEER="${TALLY_MAX_CONNECTIONS_PER_PEER:-0}"
    export TALLY_MAX_CONNECTIONS="${TALLY_MAX_CONNECTIONS:-8192}"
    # The projector's mimalloc without transparent huge pages, whatever the host's mode (see
    # deploy/Dockerfile).
    export MIMALLOC_ALLOW_THP="${MIMALLOC_ALLOW_THP:-0}"
    # And returning what it freed at once, not a second later (see deploy/Dockerfile).
    export MIMALLOC_PURGE_DELAY="${MIMALLOC_PURGE_DELAY:-0}"
    say "applying migrations"
    "$bin_dir/projector" migrate >>"$TALLY_LOGS/projector.log" 2>&1 ||
        { show_log_tail "$TALLY_LOGS/projector.log"; die "migrations failed"; }
    for svc in "${SERVICES[@]}"; do
        local pidfile="$TALLY_RUN/$svc.pid" port ops log pid
        port=$(port_of "$svc")
        ops=$(ops_port_of "$svc")
        log="$TALLY_LOGS/$svc.log"
        pid=$(read_pid "$pidfile")
        if pid_alive "$pid"; then
            say "$svc: already running (pid $pid, port $port)"
            continue
        fi
        port_open "$port" && die "$svc: port $port is taken by another process"
        if [ "$svc" = ingest-api ] && port_open "$TALLY_GRPC_PORT"; then
            die "ingest-api: OTLP/gRPC port $TALLY_GRPC_PORT is taken (set TALLY_GRPC_PORT)"
        fi
        if [ -n "$ops" ] && port_open "$ops"; then
            die "$svc: operations port $ops is taken (set TALLY_INGEST_OPS_PORT or TALLY_QUERY_OPS_PORT)"
        fi
        TALLY_HTTP_ADDR="127.0.0.1:$port" TALLY_GRPC_ADDR="127.0.0.1:$TALLY_GRPC_PORT" \
            TALLY_OPERATIONS_ADDR="${ops:+127.0.0.1:$ops}" \
            TALLY_LOG_FORMAT="${TALLY_LOG_FORMAT:-json}" \
            nohup "$bin_dir/$svc" >>"$log" 2>&1 </dev/null &
        echo $! >"$pidfile"
        say "$svc: starting (pid $!, port $port, log $log)"
    done
    for svc in "${SERVICES[@]}"; do
        local port ops
        port=$(port_of "$svc")
        ops=$(ops_port_of "$svc")
        # Asked where a probe asks: the operations port, where there is one.
        wait_until 60 ready "${ops:-$port}" ||
            { show_log_tail "$TALLY_LOGS/$svc.log"; die "$svc: not ready after 60 s"; }
        say "$svc: ready on http://127.0.0.1:$port${ops:+ (health and metrics also on :$ops)}"
    done
}

stop() {
    for svc in "${SERVICES[@]}"; do
        local pidfile="$TALLY_RUN/$svc.pid" pid
        pid=$(read_pid "$pidfile")
        if ! pid_alive "$pid"; then
            rm -f "$pidfile"
            continue
        fi
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_until 30 bash -c "! kill -0 $pid 2>/dev/null"; then
            warn "$svc: still running after 30 s; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
        say "$svc: stopped"
    done
}

status() {
    for svc in "${SERVICES[@]}"; do
        local pid port state=down
        pid=$(read_pid "$TALLY_RUN/$svc.pid")
        port=$(port_of "$svc")
        pid_alive "$pid" && state=up
        printf '%-10s %-5s port %-6s ops %-6s pid %s\n' "$svc" "$state" "$port" \
            "$(ops_port_of "$svc" | grep . || echo "$port")" "${pid:--}"
    done
}

case "${1:-}" in
    start) start "${2:?usage: services.sh start <bin-dir>}" ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: services.sh start <bin-dir> | stop | status" ;;
esac
