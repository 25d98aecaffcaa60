# shellcheck shell=bash
# Helpers shared by the scripts in deploy/local (bash only, sourced).
# shellcheck disable=SC2034 # variables here are used by the scripts that source this file

TALLY_LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=env.sh
. "$TALLY_LOCAL_DIR/env.sh"

mkdir -p "$TALLY_HOME"
TALLY_HOME=$(cd "$TALLY_HOME" && pwd) # absolute: postgres and Kafka run with another cwd
export TALLY_HOME

TALLY_DATA="$TALLY_HOME/data"
TALLY_LOGS="$TALLY_HOME/logs"
TALLY_RUN="$TALLY_HOME/run"
TALLY_PG_VERSION="${TALLY_PG_VERSION:-15}"
TALLY_START_TIMEOUT="${TALLY_START_TIMEOUT:-120}" # seconds, per service
KAFKA_VERSION=4.1.1

say() { printf '[tally] %s\n' "$*"; }
warn() { printf '[tally] warning: %s\n' "$*" >&2; }
die() { printf '[tally] error: %s\n' "$*" >&2; exit 1; }

# Prints the end of a log file to stderr (used when a service fails to start).
show_log_tail() {
    local file=$1
    if [ -f "$file" ]; then
        printf -- '--- last lines of %s ---\n' "$file" >&2
        tail -n 40 "$file" >&2
        printf -- '---\n' >&2
    fi
}

# True when something accepts TCP connections on 127.0.0.1:<port>.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null
}

# Reads the first line of a pid file, or nothing.
read_pid() {
    if [ -f "$1" ]; then head -n 1 "$1" | tr -dc '0-9'; fi
}

# wait_until <seconds> <command...>: polls every 0.5 s until the command succeeds.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# ---- packages ------------------------------------------------------------------------------------

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
_apt_updated=""

apt_update() {
    command -v apt-get >/dev/null || die "a package is missing and there is no apt-get to install it"
    [ -n "$_apt_updated" ] && return 0
    say "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    _apt_updated=1
}

apt_install() {
    apt_update
    say "apt-get install $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

apt_has_candidate() {
    apt-cache policy "$1" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null
}

# Sets PG_BIN to the installed PostgreSQL server binaries ($TALLY_PG_VERSION, else the newest);
# fails when there are none. Installs nothing (for down.sh and status.sh).
find_pg_bin() {
    PG_BIN="/usr/lib/postgresql/$TALLY_PG_VERSION/bin"
    [ -x "$PG_BIN/pg_ctl" ] && return 0
    PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [ -n "$PG_BIN" ] && [ -x "$PG_BIN/pg_ctl" ]
}

# Sets PG_BIN to the PostgreSQL server binaries, installing postgresql-$TALLY_PG_VERSION if needed.
ensure_postgres_installed() {
    PG_BIN="/usr/lib/postgresql/$TALLY_PG_VERSION/bin"
    [ -x "$PG_BIN/pg_ctl" ] && return 0
    apt_update
    if apt_has_candidate "postgresql-$TALLY_PG_VERSION"; then
        apt_install "postgresql-$TALLY_PG_VERSION"
    else
        # e.g. Ubuntu 24.04 only ships PostgreSQL 16: take the distribution's version.
        warn "postgresql-$TALLY_PG_VERSION is not available here; installing the distribution's postgresql"
        apt_install postgresql
        PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then
        die "PostgreSQL server binaries not found after install"
    fi
}

# Prints the PostgreSQL setting lines that load TimescaleDB, following $TALLY_TIMESCALE:
# `auto` (default) loads it when the library is installed beside the server in $PG_BIN,
# `on` requires it, `off` never loads it. Prints nothing when it is not to be loaded.
# TimescaleDB must be preloaded: a package install leaves it available but unusable.
timescale_settings() {
    local libdir="$PG_BIN/../lib" mode=${TALLY_TIMESCALE:-auto}
    case "$mode" in
    off) return 0 ;;
    auto | on) ;;
    *) die "TALLY_TIMESCALE must be auto, on or off (is '$mode')" ;;
    esac
    if [ ! -f "$libdir/timescaledb.so" ]; then
        [ "$mode" = on ] && die "TALLY_TIMESCALE=on but TimescaleDB is not installed for $PG_BIN (no $libdir/timescaledb.so)"
        return 0
    fi
    echo "shared_preload_libraries = 'timescaledb'"
    echo "timescaledb.telemetry_level = off"
}

ensure_redis_installed() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        apt_install redis-server
    fi
}

# Sets JAVA to a Java 17+ runtime (Kafka 4 needs 17), installing OpenJDK 17 if needed.
java_major() {
    "$1" -version 2>&1 | sed -n 's/.*version "\([0-9]*\)[."].*/\1/p' | head -n 1
}
find_java() {
    local candidate
    for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" \
        /usr/lib/jvm/java-*-openjdk-*/bin/java; do
        if [ -x "$candidate" ] && [ "$(java_major "$candidate")" -ge 17 ] 2>/dev/null; then
            JAVA=$candidate
            return 0
        fi
    done
    return 1
}
ensure_java() {
    find_java && return 0
    apt_install openjdk-17-jre-headless
    find_java || die "no Java 17 runtime found after install"
}

# ---- Kafka jars ----------------------------------------------------------------------------------

kafka_jars_complete() {
    local jar
    for jar in "kafka_2.13-$KAFKA_VERSION.jar" "kafka-server-$KAFKA_VERSION.jar" \
        "kafka-clients-$KAFKA_VERSION.jar" "kafka-metadata-$KAFKA_VERSION.jar"; do
        [ -f "$TALLY_KAFKA_LIB/$jar" ] || return 1
    done
    # The Kafka POM brings no logging backend; without log4j2 the broker dies at start.
    compgen -G "$TALLY_KAFKA_LIB/log4j-core-*.jar" >/dev/null &&
        compgen -G "$TALLY_KAFKA_LIB/log4j-slf4j-impl-*.jar" >/dev/null
}

# Downloads the Kafka jars from Maven Central into $TALLY_KAFKA_LIB unless they are there.
# Several tests may start brokers at once, hence the lock; the jars land in a temporary folder
# first so an interrupted download never looks complete.
ensure_kafka_jars() {
    # Caches made by an older pom.xml hold log4j-slf4j2-impl, which clashes with log4j-slf4j-impl
    # (same class names, built for slf4j 2); with it first on the classpath Kafka dies at start.
    rm -f "$TALLY_KAFKA_LIB"/log4j-slf4j2-impl-*.jar
    kafka_jars_complete && return 0
    local parent lock tmp
    parent=$(dirname "$TALLY_KAFKA_LIB")
    mkdir -p "$parent"
    lock="$parent/.download.lock"
    exec 9>"$lock"
    flock 9
    if ! kafka_jars_complete; then
        command -v mvn >/dev/null || apt_install maven
        tmp="$TALLY_KAFKA_LIB.tmp.$$"
        rm -rf "$tmp"
        say "downloading Apache Kafka $KAFKA_VERSION jars from Maven Central into $TALLY_KAFKA_LIB"
        mvn -q -B -Dstyle.color=never -f "$TALLY_LOCAL_DIR/kafka/pom.xml" dependency:copy-dependencies \
            -DoutputDirectory="$tmp" -DincludeScope=runtime </dev/null ||
            { rm -rf "$tmp"; die "downloading the Kafka jars failed"; }
        rm -rf "$TALLY_KAFKA_LIB"
        mv "$tmp" "$TALLY_KAFKA_LIB"
        kafka_jars_complete || die "Kafka jars incomplete in $TALLY_KAFKA_LIB after download"
    fi
    flock -u 9
    exec 9>&-
}

# ---- PostgreSQL layout ---------------------------------------------------------------------------

# PostgreSQL refuses to run as root, so as root it runs as the `postgres` user (cwd / avoids
# "could not change directory" warnings when the caller's cwd is private).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# Sets PG_DATA (data directory) and PG_SOCK (Unix socket directory).
# Normally both live under $TALLY_HOME. When postgres cannot traverse $TALLY_HOME (a checkout under
# /root, mode 700), they live under /var/lib/postgresql/tally-<hash> instead, with a symlink at
# $TALLY_HOME/data/postgres; that leaves the permissions of the user's directories alone.
pg_layout() {
    local link="$TALLY_DATA/postgres" base
    if [ -L "$link" ] || { [ "$(id -u)" -eq 0 ] && [ ! -e "$link" ] && ! pg_can_traverse; }; then
        base="/var/lib/postgresql/tally-$(printf '%s' "$TALLY_HOME" | cksum | cut -d ' ' -f 1)"
        PG_DATA="$base/data"
        PG_SOCK="$base/run"
        PG_FALLBACK="$base"
    else
        PG_DATA="$link"
        PG_SOCK="$TALLY_RUN/postgres"
        PG_FALLBACK=""
    fi
}

pg_can_traverse() {
    mkdir -p "$TALLY_DATA" "$TALLY_RUN"
    runuser -u postgres -- test -x "$TALLY_DATA" -a -x "$TALLY_RUN" 2>/dev/null
}

pg_running() {
    [ -f "$PG_DATA/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

pg_pid() {
    if [ -f "$PG_DATA/postmaster.pid" ]; then head -n 1 "$PG_DATA/postmaster.pid"; fi
}

pg_ready() {
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$TALLY_PG_PORT" -t 2
}

# ---- Redis and Kafka -----------------------------------------------------------------------------

# timeout: redis-cli waits forever for a reply when something else holds the port.
redis_ready() {
    [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$TALLY_REDIS_PORT" ping 2>/dev/null </dev/null)" = "PONG" ]
}

KAFKA_PID_FILE="$TALLY_RUN/kafka.pid"

# The pid in the pid file is alive and is a Kafka node (not a recycled pid).
kafka_pid() {
    local pid
    pid=$(read_pid "$KAFKA_PID_FILE")
    if pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep kafka >/dev/null; then
        printf '%s\n' "$pid"
    fi
}
