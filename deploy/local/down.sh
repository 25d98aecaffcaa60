#!/usr/bin/env bash
# Stops the local Kafka, Redis and PostgreSQL started by up.sh. Idempotent.
#   down.sh           stop, keep the data
#   down.sh --purge   stop and delete $TALLY_HOME/data
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=""
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

stop_kafka() {
    local pid
    pid=$(kafka_pid)
    if [ -z "$pid" ]; then
        say "kafka: not running"
    else
        say "kafka: stopping pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
        # A controlled shutdown of the single node takes a few seconds.
        if ! wait_until 30 bash -c "! kill -0 $pid 2>/dev/null"; then
            warn "kafka: still running after 30 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_until 10 bash -c "! kill -0 $pid 2>/dev/null" || die "kafka: pid $pid survived SIGKILL"
        fi
        say "kafka: stopped"
    fi
    rm -f "$KAFKA_PID_FILE"
}

stop_redis() {
    local pidfile="$TALLY_RUN/redis.pid" pid
    pid=$(read_pid "$pidfile")
    if redis_ready; then
        say "redis: stopping"
        timeout 10 redis-cli -h 127.0.0.1 -p "$TALLY_REDIS_PORT" shutdown nosave </dev/null >/dev/null 2>&1 || true
        wait_until 30 bash -c "! { exec 3<>/dev/tcp/127.0.0.1/$TALLY_REDIS_PORT; } 2>/dev/null" ||
            die "redis: still answering on port $TALLY_REDIS_PORT"
        if pid_alive "$pid"; then wait_until 10 bash -c "! kill -0 $pid 2>/dev/null" || true; fi
        say "redis: stopped"
    else
        say "redis: not running"
    fi
    rm -f "$pidfile"
}

stop_postgres() {
    if ! find_pg_bin; then
        say "postgres: not installed"
        return 0
    fi
    pg_layout
    if pg_running; then
        say "postgres: stopping"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
        say "postgres: stopped"
    else
        say "postgres: not running"
    fi
}

stop_kafka
stop_redis
stop_postgres

if [ -n "$purge" ]; then
    pg_layout
    if [ -n "$PG_FALLBACK" ] && [ -d "$PG_FALLBACK" ]; then
        rm -rf "$PG_FALLBACK"
    fi
    rm -rf "$TALLY_DATA"
    say "purged $TALLY_DATA"
fi
