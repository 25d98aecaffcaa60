#!/usr/bin/env bash
# Installs the real clients the protocol tests drive, if missing: Debian's `prometheus` (run in
# agent mode with remote_write pointed at ingest-api), Node.js (runs the Claude Code hook
# script), and the Python OpenTelemetry SDK with its OTLP/HTTP exporters (protobuf and JSON),
# in a virtualenv under ~/.cache/tally. The tests start their own instances on free ports.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v node >/dev/null || missing+=(nodejs)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    apt_install "${missing[@]}"
fi
# The OTel SDK, reinstalled only when tests/clients/requirements.txt changes.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${TALLY_OTEL_VENV:-$HOME/.cache/tally/otel-venv}"
requirements="$root/tests/clients/requirements.txt"
stamp="$venv/.requirements"
if ! cmp -s "$requirements" "$stamp" 2>/dev/null || [ ! -x "$venv/bin/python" ]; then
    say "installing the OpenTelemetry SDK into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi
say "test clients present (prometheus $(prometheus --version 2>&1 | head -n 1 | awk '{print $3}'), node $(node --version), $("$venv/bin/python" -c 'from importlib.metadata import version; print("opentelemetry-sdk", version("opentelemetry-sdk"))'))"
