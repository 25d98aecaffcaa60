#!/usr/bin/env bash
# Every test: the workspace's (unit, end-to-end, the fault matrix, schemathesis), then the tests
# that need TimescaleDB, where the database has the extension (where it has not, says they were
# skipped), docker-compose.yml where a Compose tool is installed (one test, counted as skipped where
# none is), then every fuzz target for TALLY_FUZZ_SECONDS (10) each.
# Exits non-zero when any test failed.
set -uo pipefail
cargo test --workspace --no-fail-fast
status=$?
has_timescale=$(psql -X -tA "$TALLY_DATABASE_URL" \
    -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'" 2>/dev/null || echo 0)
if [ "$has_timescale" = "1" ]; then
    cargo test -p tally-tests --test e2e -- --ignored timescale || status=1
else
    echo "TimescaleDB tests skipped: this PostgreSQL has no timescaledb extension" \
        "(the hypertable path runs with docker-compose.yml's timescale/timescaledb image)"
fi
# One line in cargo's format, which summarize.sh counts.
compose=$("$(dirname "$0")/../deploy/local/compose-check.sh" 2>&1)
compose_status=$?
echo "$compose"
if [ "$compose_status" -ne 0 ]; then
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (docker-compose.yml)"
    status=1
elif grep -q "not validated" <<<"$compose"; then
    echo "test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out (docker-compose.yml)"
else
    echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out (docker-compose.yml)"
fi
"$(dirname "$0")/../deploy/local/fuzz.sh" "${TALLY_FUZZ_SECONDS:-10}" || status=1
exit "$status"
