#!/usr/bin/env bash
# Creates a demo tenant with an ingest and a read key (once; kept in .tally/demo.env), sends
# sample events through ingest-api, and prints the URLs, keys and a first overview.
#   demo.sh <bin-dir>
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR=${1:?usage: demo.sh <bin-dir>}
ROOT=$(cd "$TALLY_LOCAL_DIR/../.." && pwd)
DEMO_ENV="$ROOT/.tally/demo.env"
INGEST_URL="http://127.0.0.1:${TALLY_INGEST_PORT:-8080}"
QUERY_URL="http://127.0.0.1:${TALLY_QUERY_PORT:-8081}"

key_works() {
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" "$QUERY_URL/v1/dashboard/overview")" = 200 ]
}

if [ -f "$DEMO_ENV" ] && . "$DEMO_ENV" && key_works "${TALLY_READ_KEY:-}"; then
    say "demo tenant exists ($TALLY_TENANT_ID); keys in $DEMO_ENV"
else
    say "creating the demo tenant and its API keys"
    TALLY_TENANT_ID=$("$BIN_DIR/ingest-api" admin tenant create --name "Demo")
    TALLY_INGEST_KEY=$("$BIN_DIR/ingest-api" admin api-key create --tenant "$TALLY_TENANT_ID" --scope ingest --name demo-ingest)
    TALLY_READ_KEY=$("$BIN_DIR/ingest-api" admin api-key create --tenant "$TALLY_TENANT_ID" --scope read --name demo-read)
    unset TALLY_DEMO_EMAIL TALLY_DEMO_PASSWORD
fi
if [ -z "${TALLY_DEMO_EMAIL:-}" ]; then
    # The demo owner's login (the tenant id keeps the address unique per demo tenant).
    TALLY_DEMO_EMAIL="owner-${TALLY_TENANT_ID: -8}@demo.tally.local"
    TALLY_DEMO_PASSWORD="Demo-$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')!"
    say "creating the demo owner $TALLY_DEMO_EMAIL"
    TALLY_USER_PASSWORD="$TALLY_DEMO_PASSWORD" "$BIN_DIR/ingest-api" admin user create \
        --tenant "$TALLY_TENANT_ID" --email "$TALLY_DEMO_EMAIL" --role owner \
        --external-id load-user-0 >/dev/null
fi
if [ -z "${TALLY_OPERATOR_KEY:-}" ]; then
    say "creating a platform-operator key"
    TALLY_OPERATOR_KEY=$("$BIN_DIR/ingest-api" admin operator-key create --name demo-operator)
fi
mkdir -p "$(dirname "$DEMO_ENV")"
(
    umask 077
    cat >"$DEMO_ENV" <<ENV
# Written by 'make up' (deploy/local/demo.sh). Source it: . .tally/demo.env
export TALLY_INGEST_URL=$INGEST_URL
export TALLY_QUERY_URL=$QUERY_URL
export TALLY_TENANT_ID=$TALLY_TENANT_ID
export TALLY_INGEST_KEY=$TALLY_INGEST_KEY
export TALLY_READ_KEY=$TALLY_READ_KEY
export TALLY_DEMO_EMAIL=$TALLY_DEMO_EMAIL
export TALLY_DEMO_PASSWORD='$TALLY_DEMO_PASSWORD'
export TALLY_OPERATOR_KEY=$TALLY_OPERATOR_KEY
ENV
)

overview_total() {
    curl -s -H "Authorization: Bearer $TALLY_READ_KEY" "$QUERY_URL/v1/dashboard/overview?range=24h" |
        sed -n 's/.*"events_total":\([0-9]*\).*/\1/p'
}
before=$(overview_total)
say "sending 5 000 sample events"
"$BIN_DIR/tally-load" --url "$INGEST_URL" --key "$TALLY_INGEST_KEY" --events 5000 --batch 500 \
    --concurrency 2 | tail -n 2

# The projector needs a moment; wait until the overview counts them all.
for _ in $(seq 1 60); do
    total=$(overview_total)
    [ "${total:-0}" -ge $((${before:-0} + 5000)) ] && break
    sleep 0.5
done

cat <<MSG

Tally is up.
  dashboard    $QUERY_URL/      (sign in with the demo login below)
  ingest-api   $INGEST_URL      (POST /v1/events, /readyz, /metrics)
  query-api    $QUERY_URL      (GET /v1/dashboard/overview, /v1/dashboard/timeseries, /openapi.json)
  tenant       $TALLY_TENANT_ID
  ingest key   $TALLY_INGEST_KEY
  read key     $TALLY_READ_KEY
  demo login   $TALLY_DEMO_EMAIL / $TALLY_DEMO_PASSWORD   (POST /v1/auth/login)
  operator key $TALLY_OPERATOR_KEY   (/v1/admin/tenants)
  (all in .tally/demo.env — '. .tally/demo.env' to use them)

Last 24 h for the demo tenant: ${total:-0} events. Try:
  . .tally/demo.env
  curl -s -H "Authorization: Bearer \$TALLY_READ_KEY" "\$TALLY_QUERY_URL/v1/dashboard/overview?range=24h"
MSG
