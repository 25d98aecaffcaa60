#!/usr/bin/env bash
# Every test: the workspace's (unit, end-to-end, the fault matrix, schemathesis), then the tests
# that need TimescaleDB, where the database has the extension (where it has not, says they were
# skipped), then every fuzz target for TALLY_FUZZ_SECONDS (10) each.
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
"$(dirname "$0")/../deploy/local/fuzz.sh" "${TALLY_FUZZ_SECONDS:-10}" || status=1
exit "$status"
