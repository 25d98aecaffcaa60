#!/usr/bin/env bash
# What the browser test needs: Debian's Chromium, and playwright-core from the npm registry
# (it drives that Chromium; no browser is downloaded). Idempotent.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$TALLY_LOCAL_DIR/../.." && pwd)
[ -x /usr/bin/chromium ] || apt_install chromium fonts-liberation
command -v node >/dev/null || apt_install nodejs npm
if [ ! -d "$ROOT/tests/browser/node_modules/playwright-core" ]; then
    say "installing the browser test's npm packages"
    (cd "$ROOT/tests/browser" && npm ci --no-audit --no-fund --loglevel=error)
fi
say "browser test prerequisites present ($(/usr/bin/chromium --version 2>/dev/null | head -n 1))"
