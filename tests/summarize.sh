#!/usr/bin/env bash
# Runs a `cargo test` command, shows its output, and closes with one line totalling every
# test binary's "test result:" line, e.g. `tests: 24 passed, 0 failed, 0 skipped`; when a test
# failed, its name, the line it panicked at and its message's first lines follow, so the last
# lines of a CI run name it. The whole output is written as it comes to $TALLY_TEST_LOG
# (default ~/.cache/tally/last-test.log), outside the clone, for reading after a CI run's
# clone is gone.
# Exits with the command's status (non-zero when any test failed or did not build).
set -uo pipefail
log=${TALLY_TEST_LOG:-${HOME:-/tmp}/.cache/tally/last-test.log}
if ! { mkdir -p "$(dirname "$log")" && : >"$log"; } 2>/dev/null; then
    log=$(mktemp)
fi
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
# Each failed test, then where each panicked, read from cargo's failures sections only (the
# services the tests start write their own output, panics included, to the same log).
awk '/^test .* \.\.\. FAILED$/ && n < 20 { print "  " $0; n++ }
     /^---- .* stdout ----$/ { want = 1; next }
     want && /panicked at / && m < 20 {
         print "  " $0
         # The message: its first lines (with assert_eq, left and right), up to a blank line.
         for (k = 0; k < 4 && (getline line) > 0; k++) {
             if (line == "" || line ~ /^note: / || line ~ /^stack backtrace:/) break
             print "    " substr(line, 1, 300)
         }
         want = 0; m++
     }' "$log"
if [ "$status" -ne 0 ] && ! grep -q '^test result: FAILED' "$log"; then
    echo "cargo test exited with $status before every test ran (build failure?)"
fi
echo "the whole test output: $log"
exit "$status"
