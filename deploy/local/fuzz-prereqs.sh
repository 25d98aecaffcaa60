#!/usr/bin/env bash
# Installs the attack tools of `make test` and `make fuzz`, if missing: a C++ compiler (the
# fuzz targets link libFuzzer, which is C++), cargo-fuzz (into cargo's own bin folder) and
# schemathesis (into a virtualenv under ~/.cache/tally, reinstalled only when
# tests/clients/schemathesis-requirements.txt changes).
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CARGO_FUZZ_VERSION=0.13.2

missing=()
command -v c++ >/dev/null || missing+=(g++)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    apt_install "${missing[@]}"
fi

if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    # Built in a temporary folder: the workspace's CARGO_TARGET_DIR is for the workspace.
    env -u CARGO_TARGET_DIR cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${TALLY_SCHEMATHESIS_VENV:-$HOME/.cache/tally/schemathesis-venv}"
requirements="$root/tests/clients/schemathesis-requirements.txt"
stamp="$venv/.requirements"
if ! cmp -s "$requirements" "$stamp" 2>/dev/null || [ ! -x "$venv/bin/st" ]; then
    say "installing schemathesis into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi
say "attack tools present ($(cargo fuzz --version), $("$venv/bin/st" --version))"
