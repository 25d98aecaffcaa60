#!/usr/bin/env bash
# Runs a `cargo test` command, shows its output, and closes with one line totalling every
# test binary's "test result:" line, e.g. `tests: 24 passed, 0 failed, 0 skipped`.
# Exits with the command's status (non-zero when any test failed or did not build).
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) f += $i
            if ($(i+1) ~ /^ignored/) s += $i
        }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
if [ "$status" -ne 0 ] && ! grep -q '^test result: FAILED' "$log"; then
    echo "cargo test exited with $status before every test ran (build failure?)"
fi
exit "$status"
