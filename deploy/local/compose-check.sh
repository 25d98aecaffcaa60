#!/usr/bin/env bash
# Validates docker-compose.yml with the Compose tool that is installed — `docker compose` (v2) or
# Debian's `docker-compose` (1.29) — then checks what a valid file can still get wrong
# (compose-check.py): healthchecks and the ports they ask, start order, query-api's JWKS URL,
# image tags. Nothing here installs a Compose tool: without one, those checks run on the file as
# PyYAML reads it (anchors and merge keys resolved; the file uses no `${…}` interpolation), and
# without PyYAML either it says so and exits 0. Exits 1 on any problem.
#   usage: deploy/local/compose-check.sh [FILE]   (default: the repository's docker-compose.yml)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
file="${1:-$here/../../docker-compose.yml}"
name="$(basename "$file")"

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -f "$file")
    tool="docker compose $(docker compose version --short 2>/dev/null)"
    format=(--format json)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose -f "$file")
    tool="docker-compose $(docker-compose version --short 2>/dev/null)"
    format=() # 1.x writes YAML only
elif python3 -c "import yaml" 2>/dev/null; then
    echo "$name: checked as YAML (PyYAML; no docker compose tool to validate it)"
    python3 "$here/compose-check.py" "$file" <"$file"
    exit $?
else
    echo "$name not validated: no docker compose tool, no PyYAML"
    exit 0
fi

if ! "${compose[@]}" config -q; then
    echo "$name: INVALID ($tool config -q)"
    exit 1
fi
echo "$name: valid ($tool config -q)"

# A python3 that can read the config: for YAML, one with PyYAML — docker-compose 1.x's own
# interpreter (its #! line) has it.
candidates=()
if [ ${#format[@]} -eq 0 ]; then
    read -r shebang <"$(command -v docker-compose)" || true
    case $shebang in '#!'*python*) candidates+=("${shebang#\#!}") ;; esac
fi
candidates+=(python3 /usr/bin/python3)
need=json
[ ${#format[@]} -eq 0 ] && need="json, yaml"
python=""
for c in "${candidates[@]}"; do
    # shellcheck disable=SC2086 # "/usr/bin/env python3" is two words
    if $c -c "import $need" 2>/dev/null; then
        python=$c
        break
    fi
done
if [ -z "$python" ]; then
    echo "$name: cannot check it further: no python3 that can import $need"
    exit 1
fi
# shellcheck disable=SC2086
"${compose[@]}" config "${format[@]}" | $python "$here/compose-check.py" "$file"
