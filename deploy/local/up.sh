#!/usr/bin/env bash
# Installs what is missing and starts PostgreSQL, Redis and Kafka (KRaft) as plain processes on
# 127.0.0.1, with data, logs and pid files under $TALLY_HOME (default <repo>/.tally).
# Idempotent: a service that is already up is left alone. Settings: see env.sh.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$TALLY_DATA" "$TALLY_LOGS" "$TALLY_RUN"

# ---- PostgreSQL ----------------------------------------------------------------------------------

start_postgres() {
    local log="$TALLY_LOGS/postgres.log"
    ensure_postgres_installed
    pg_layout

    if pg_running; then
        pg_ready || die "postgres: running on $PG_DATA but not answering on port $TALLY_PG_PORT (port changed? run down.sh first)"
        say "postgres: already up (port $TALLY_PG_PORT, pid $(pg_pid))"
        # A package upgrade replaces the binaries and libraries under a running server, whose
        # next library load (plpgsql, an extension) then fails: restart it on the new ones.
        # The binary asked is the one the server was started from (what pg_ctl restarts), so
        # another major version installed beside it changes nothing.
        local running installed server_bin
        running=$(as_pg "$PG_BIN/psql" -X -tA -h "$PG_SOCK" -p "$TALLY_PG_PORT" -d postgres \
            -c "SHOW server_version" 2>/dev/null | awk '{print $1}') || running=""
        server_bin=$(as_pg sed -n '1s/ .*//p' "$PG_DATA/postmaster.opts" 2>/dev/null) || server_bin=""
        installed=$("${server_bin:-/nonexistent}" --version 2>/dev/null | awk '{print $3}') || installed=""
        if [ -n "$running" ] && [ -n "$installed" ] && [ "$running" != "$installed" ]; then
            say "postgres: running $running but $installed is installed; restarting on it"
            as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -t "$TALLY_START_TIMEOUT" -m fast restart \
                >>"$log" 2>&1 </dev/null || { show_log_tail "$log"; die "postgres: restart failed"; }
            wait_until "$TALLY_START_TIMEOUT" pg_ready ||
                { show_log_tail "$log"; die "postgres: not ready after ${TALLY_START_TIMEOUT}s"; }
        fi
        if [ -n "$(timescale_settings)" ] && ! grep -q "^shared_preload_libraries = 'timescaledb'" "$PG_DATA/tally.conf" 2>/dev/null; then
            warn "postgres: TimescaleDB is installed but this server was started without it; 'make down && make up' loads it"
        fi
    else
        port_open "$TALLY_PG_PORT" && die "postgres: port $TALLY_PG_PORT is taken by another process"

        if [ -n "$PG_FALLBACK" ]; then
            say "postgres: user postgres cannot reach $TALLY_HOME; keeping its data in $PG_FALLBACK"
            mkdir -p "$PG_FALLBACK"
            ln -sfn "$PG_DATA" "$TALLY_DATA/postgres"
        fi
        mkdir -p "$PG_DATA" "$PG_SOCK"
        if [ "$(id -u)" -eq 0 ]; then
            chown postgres:postgres "$PG_DATA" "$PG_SOCK"
        fi
        chmod 700 "$PG_DATA"

        if [ ! -f "$PG_DATA/PG_VERSION" ]; then
            say "postgres: initdb $PG_DATA"
            # C locale: exists everywhere (fresh containers have no locales) and sorts fast.
            as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --encoding=UTF8 --no-locale \
                --auth-local=peer --auth-host=scram-sha-256 >>"$log" 2>&1 ||
                { show_log_tail "$log"; die "postgres: initdb failed"; }
            echo "include = 'tally.conf'" >>"$PG_DATA/postgresql.conf"
        fi

        ts_conf=$(timescale_settings) || exit 1
        # Rewritten on each start so port changes apply. Loopback only.
        cat >"$PG_DATA/tally.conf" <<EOF
# Written by deploy/local/up.sh on each start; edits are lost.
port = $TALLY_PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_SOCK'
max_connections = 300
shared_buffers = 1GB
# The projection writes in bursts: with the default 1 GB of WAL between checkpoints, a load
# forced one every few seconds, and after each, every index page touched again is written to
# the WAL whole. Checkpoints on time instead, and full pages compressed.
max_wal_size = 8GB
min_wal_size = 1GB
checkpoint_timeout = 15min
wal_compression = lz4
$ts_conf
EOF
        if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$PG_DATA/tally.conf"; fi

        say "postgres: starting on 127.0.0.1:$TALLY_PG_PORT"
        # The log is opened here (by root), not by pg_ctl -l: postgres need not write to $TALLY_HOME.
        touch "$log"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -t "$TALLY_START_TIMEOUT" start >>"$log" 2>&1 </dev/null ||
            { show_log_tail "$log"; die "postgres: failed to start"; }
        wait_until "$TALLY_START_TIMEOUT" pg_ready ||
            { show_log_tail "$log"; die "postgres: not ready after ${TALLY_START_TIMEOUT}s"; }
        if [ -n "$ts_conf" ]; then
            say "postgres: up (port $TALLY_PG_PORT, pid $(pg_pid)), TimescaleDB preloaded (TALLY_TIMESCALE=off leaves it out)"
        else
            say "postgres: up (port $TALLY_PG_PORT, pid $(pg_pid)), without TimescaleDB (TALLY_TIMESCALE=${TALLY_TIMESCALE:-auto})"
        fi
    fi

    # Role and database for the services; a no-op when they exist.
    as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$TALLY_PG_PORT" -d postgres >/dev/null <<'SQL' ||
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally') THEN
        CREATE ROLE tally LOGIN SUPERUSER PASSWORD 'tally';
    END IF;
END
$$;
SELECT 'CREATE DATABASE tally OWNER tally'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'tally') \gexec
SQL
        die "postgres: creating role/database tally failed"
}

# ---- Redis ---------------------------------------------------------------------------------------

start_redis() {
    local log="$TALLY_LOGS/redis.log" pidfile="$TALLY_RUN/redis.pid"
    ensure_redis_installed

    if redis_ready; then
        say "redis: already up (port $TALLY_REDIS_PORT, pid $(read_pid "$pidfile"))"
        return 0
    fi
    port_open "$TALLY_REDIS_PORT" && die "redis: port $TALLY_REDIS_PORT is taken by another process"

    mkdir -p "$TALLY_DATA/redis"
    say "redis: starting on 127.0.0.1:$TALLY_REDIS_PORT"
    # A cache: no persistence. Bounded: past maxmemory, the least recently used keys with a
    # time to live go (every key Tally writes has one: cached answers, announced watermarks,
    # rate and login counts, each of which the services do without).
    redis-server --port "$TALLY_REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
        --dir "$TALLY_DATA/redis" --logfile "$log" --pidfile "$pidfile" \
        --save "" --appendonly no \
        --maxmemory "${TALLY_REDIS_MAXMEMORY:-512mb}" --maxmemory-policy volatile-lru </dev/null ||
        { show_log_tail "$log"; die "redis: failed to start"; }
    wait_until "$TALLY_START_TIMEOUT" redis_ready ||
        { show_log_tail "$log"; die "redis: not ready after ${TALLY_START_TIMEOUT}s"; }
    say "redis: up (port $TALLY_REDIS_PORT, pid $(read_pid "$pidfile"))"
}

# ---- Kafka ---------------------------------------------------------------------------------------

kafka_started_since() { # <byte offset in the log>
    # Not `grep -q`: it would exit at the first match, tail would die of SIGPIPE on a long log,
    # and under pipefail the pipeline would count as "not started".
    tail -c "+$(($1 + 1))" "$TALLY_LOGS/kafka.log" 2>/dev/null | grep 'Kafka Server started' >/dev/null
}

start_kafka() {
    local log="$TALLY_LOGS/kafka.log" pid offset deadline
    pid=$(kafka_pid)
    if [ -n "$pid" ]; then
        say "kafka: already up (port $TALLY_KAFKA_PORT, pid $pid)"
        return 0
    fi
    for port in "$TALLY_KAFKA_PORT" "$TALLY_KAFKA_CONTROLLER_PORT"; do
        port_open "$port" && die "kafka: port $port is taken by another process"
    done

    # In the foreground, so a first download or install shows its output here.
    ensure_java
    ensure_kafka_jars

    touch "$log"
    offset=$(stat -c %s "$log")
    say "kafka: starting on 127.0.0.1:$TALLY_KAFKA_PORT (controller $TALLY_KAFKA_CONTROLLER_PORT)"
    # setsid + nohup: the broker outlives this script and the caller's terminal or process group.
    # kafka-node.sh execs the JVM, so $! is the broker's pid (it also writes the pid file itself).
    # The JVM's own stdout/stderr (e.g. a failed start) go to the same file as log4j (both append).
    # shellcheck disable=SC2094
    TALLY_KAFKA_LOG_FILE="$log" TALLY_KAFKA_PID_FILE="$KAFKA_PID_FILE" \
        setsid nohup "$TALLY_LOCAL_DIR/kafka-node.sh" "$TALLY_DATA/kafka" \
        "$TALLY_KAFKA_PORT" "$TALLY_KAFKA_CONTROLLER_PORT" >>"$log" 2>&1 </dev/null &
    echo $! >"$KAFKA_PID_FILE"

    deadline=$((SECONDS + TALLY_START_TIMEOUT))
    until kafka_started_since "$offset"; do
        if ! pid_alive "$(read_pid "$KAFKA_PID_FILE")"; then
            show_log_tail "$log"
            die "kafka: exited during start"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log_tail "$log"
            die "kafka: not ready after ${TALLY_START_TIMEOUT}s"
        fi
        sleep 0.5
    done
    port_open "$TALLY_KAFKA_PORT" || { show_log_tail "$log"; die "kafka: started but port $TALLY_KAFKA_PORT does not answer"; }
    say "kafka: up (port $TALLY_KAFKA_PORT, pid $(read_pid "$KAFKA_PID_FILE"))"
}

start_postgres
start_redis
start_kafka
say "ready; to use it: . deploy/local/env.sh   (TALLY_DATABASE_URL=$TALLY_DATABASE_URL TALLY_REDIS_URL=$TALLY_REDIS_URL TALLY_KAFKA_BROKERS=$TALLY_KAFKA_BROKERS)"
