#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer): each for SECONDS, one after the
# other, all of them unless targets are named. `make test` runs it for a few seconds per
# target; `make fuzz FUZZ_SECONDS=600` for longer. New inputs that reach new code are kept in
# ~/.cache/tally/fuzz-corpus/<target> (the committed seeds in fuzz/corpus/ are only read), so a
# later run starts where the last one stopped. A crash, a hang (an input over 10 s) or an input
# that takes over 2 GiB fails the run; libFuzzer writes it to fuzz/artifacts/<target>/ and
# `cargo fuzz run --sanitizer none <target> <file>` replays it.
#   usage: deploy/local/fuzz.sh [SECONDS] [TARGET...]
set -uo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 1
seconds=${1:-10}
shift || true
cache="$HOME/.cache/tally"
mkdir -p "$cache"
# Its own target dir: the instrumented build shares nothing with the workspace's.
target_dir="${TALLY_FUZZ_TARGET_DIR:-$cache/fuzz-target}"
# The stable toolchain: no sanitizer (those need nightly's -Z flags; a panic, an overflow or an
# out-of-bounds index is caught without one), coverage instrumentation through stable -C flags.
# Sixteen codegen units: a build twice as fast, fuzzing a little slower.
flags=(--sanitizer none --codegen-units 16 --target-dir "$target_dir")
fuzz=(cargo fuzz run "${flags[@]}")

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
say "building ${#targets[@]} fuzz targets into $target_dir"
if ! cargo fuzz build "${flags[@]}" >"$cache/fuzz-build.log" 2>&1; then
    tail -n 40 "$cache/fuzz-build.log" >&2
    die "the fuzz targets did not build (all of $cache/fuzz-build.log)"
fi

# One of libFuzzer's closing statistics of the current target's log.
stat() { awk -v k="stat::$1:" '$1 == k {print $2}' "$log"; }

status=0
passed=0
failed=0
for t in "${targets[@]}"; do
    work="$cache/fuzz-corpus/$t"
    log="$cache/fuzz-$t.log"
    mkdir -p "$work" "fuzz/artifacts/$t"
    if "${fuzz[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        passed=$((passed + 1))
        cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n 1)
        say "fuzz $t: ${seconds}s, $(stat number_of_executed_units) inputs, ${cov#cov: } edges," \
            "$(find "$work" -type f | wc -l) in its corpus, peak RSS $(stat peak_rss_mb) MB, no crash"
    else
        failed=$((failed + 1))
        status=1
        warn "fuzz $t FAILED (all of it in $log):"
        grep -E -A 3 "panicked at|== ERROR|SUMMARY: |Test unit written|^Base64:" "$log" | head -n 40 >&2 ||
            tail -n 40 "$log" >&2
        for input in "fuzz/artifacts/$t"/*; do
            [ -f "$input" ] && warn "replay: cargo fuzz run ${flags[*]} $t $input"
        done
    fi
done
echo "fuzz: $passed passed, $failed failed"
exit "$status"
