#!/usr/bin/env bash
# One line per local service: up/down, port, pid.
#   status.sh           always exits 0
#   status.sh --check   exits 1 unless all three are up
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

all_up=1
line() { # <name> <up|down> <port> <pid>
    printf '%-9s %-5s port %-6s pid %s\n' "$1" "$2" "$3" "${4:--}"
    [ "$2" = up ] || all_up=""
}

if find_pg_bin && pg_layout && pg_running && pg_ready; then
    line postgres up "$TALLY_PG_PORT" "$(pg_pid)"
else
    line postgres down "$TALLY_PG_PORT" ""
fi

if command -v redis-cli >/dev/null && redis_ready; then
    line redis up "$TALLY_REDIS_PORT" "$(read_pid "$TALLY_RUN/redis.pid")"
else
    line redis down "$TALLY_REDIS_PORT" ""
fi

pid=$(kafka_pid)
if [ -n "$pid" ] && port_open "$TALLY_KAFKA_PORT"; then
    line kafka up "$TALLY_KAFKA_PORT" "$pid"
else
    line kafka down "$TALLY_KAFKA_PORT" "$pid"
fi

if [ "${1:-}" = --check ] && [ -z "$all_up" ]; then
    exit 1
fi
