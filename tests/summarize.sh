#!/usr/bin/env bash
# Runs a `cargo test` command, shows its output, and closes with one line totalling every
# test binary's "test result:" line, e.g. `tests: 24 passed, 0 failed, 0 skipped`; when a test
# failed, its name and the line it panicked at follow, so the last lines of a CI run name it.
# The whole output is also kept in $TALLY_TEST_LOG (default $HOME/.cache/tally/last-test.log),
# outside the clone, for reading after a CI run's clone is gone.
# Exits with the command's status (non-zero when any test failed or did not build).
set -uo pipefail
keep=${TALLY_TEST_LOG:-$HOME/.cache/tally/last-test.log}
mkdir -p "$(dirname "$keep")"
log=$(mktemp)
trap 'cp -f "$log" "$keep" 2>/dev/null; rm -f "$log"' EXIT
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
# Each failed test, where it panicked and its message's first line (cut at 300 characters).
awk '/^test .* \.\.\. FAILED$/ { print "  " $0; n++ }
     /^thread .* panicked at / { print "  " $0; getline; print "    " substr($0, 1, 300); n++ }
     n >= 20 { exit }' "$log"
if [ "$status" -ne 0 ] && ! grep -q '^test result: FAILED' "$log"; then
    echo "cargo test exited with $status before every test ran (build failure?)"
fi
echo "the whole test output: $keep"
exit "$status"
