#!/usr/bin/env bash
# Every test: the workspace's (unit, end-to-end, the fault matrix, schemathesis), then the tests
# that need TimescaleDB, where PostgreSQL can use the extension (where it cannot, says they were
# skipped and why), docker-compose.yml where a Compose tool is installed (one test, counted as skipped where
# none is), then every fuzz target for TALLY_FUZZ_SECONDS (10) each.
# Exits non-zero when any test failed.
set -uo pipefail
cargo test --workspace --no-fail-fast
status=$?
# TimescaleDB is usable where it is installed and preloaded (deploy/local/up.sh preloads it).
timescale=$(psql -X -tA "$TALLY_DATABASE_URL" -c "SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN 'absent'
        WHEN current_setting('shared_preload_libraries') !~ 'timescaledb' THEN 'not preloaded'
        ELSE 'usable' END" 2>/dev/null || echo unknown)
if [ "$timescale" = "usable" ]; then
    cargo test -p tally-tests --test e2e -- --ignored timescale || status=1
else
    echo "TimescaleDB tests skipped: timescaledb is $timescale in this PostgreSQL" \
        "(make up preloads it where it is installed; TALLY_TIMESCALE=off keeps it out)"
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
