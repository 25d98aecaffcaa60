# shellcheck shell=sh
# Settings of the local stack (PostgreSQL, Redis, Kafka on loopback), meant to be sourced:
#   . deploy/local/env.sh
# POSIX sh on purpose (make's /bin/sh may source it too) and no `set -e`: it runs in the caller's
# shell. Every value can be overridden by exporting it before sourcing.

# Repo root = two directories above this file. bash gives the path in BASH_SOURCE, zsh in $0;
# a POSIX sh gives neither, so fall back to the git checkout around the current directory.
# shellcheck disable=SC3028 # BASH_SOURCE is empty outside bash, hence the fallback
_tally_env_file=${BASH_SOURCE:-$0}
case $_tally_env_file in
    */deploy/local/env.sh | deploy/local/env.sh)
        _tally_root=$(cd "$(dirname "$_tally_env_file")/../.." && pwd) ;;
    *)
        _tally_root=$(git rev-parse --show-toplevel 2>/dev/null || pwd) ;;
esac

export TALLY_HOME="${TALLY_HOME:-$_tally_root/.tally}"
export TALLY_PG_PORT="${TALLY_PG_PORT:-55432}"
export TALLY_REDIS_PORT="${TALLY_REDIS_PORT:-56379}"
export TALLY_KAFKA_PORT="${TALLY_KAFKA_PORT:-59092}"
export TALLY_KAFKA_CONTROLLER_PORT="${TALLY_KAFKA_CONTROLLER_PORT:-59093}"
# Kafka jars from Maven Central, shared by every checkout (and by the tests' private brokers).
export TALLY_KAFKA_LIB="${TALLY_KAFKA_LIB:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/tally/kafka-4.1.1/lib}"

# What the services and tests read.
export TALLY_DATABASE_URL="postgres://tally:tally@127.0.0.1:$TALLY_PG_PORT/tally"
export TALLY_REDIS_URL="redis://127.0.0.1:$TALLY_REDIS_PORT"
export TALLY_KAFKA_BROKERS="127.0.0.1:$TALLY_KAFKA_PORT"

unset _tally_env_file _tally_root
