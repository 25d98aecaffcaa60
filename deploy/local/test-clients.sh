#!/usr/bin/env bash
# Installs the real clients the protocol tests drive, if missing: Debian's `prometheus` (run in
# agent mode with remote_write pointed at ingest-api) and Node.js (runs the Claude Code hook
# script). The tests start their own instances on free ports.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v node >/dev/null || missing+=(nodejs)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    apt_install "${missing[@]}"
fi
say "test clients present (prometheus $(prometheus --version 2>&1 | head -n 1 | awk '{print $3}'), node $(node --version))"
