#!/usr/bin/env bash
# Installs what building Tally needs and the machine lacks: a C toolchain, make, pkg-config and
# zlib headers (rdkafka builds its bundled librdkafka), curl. Rust itself must be installed
# (rustup); a distribution's cargo is usually too old for the workspace.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v make >/dev/null || missing+=(make)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v curl >/dev/null || missing+=(curl ca-certificates)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
command -v cargo >/dev/null ||
    die "cargo is not installed: install Rust with rustup (rust-version in Cargo.toml), then run this again"
say "build prerequisites present ($(cargo --version))"
