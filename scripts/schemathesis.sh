#!/usr/bin/env bash
# Property-based tests of the HTTP API from its own OpenAPI document (Schemathesis): every
# operation is called with generated valid and invalid input, and every answer must match
# what the document says (status codes, content types, response schemas, 4xx for invalid
# input, 2xx for valid input, 401 without the token). Any finding fails the run.
#
# The version and the seed are pinned so that CI is reproducible: the same inputs every run.
# Schemathesis goes into a throwaway venv under target/ (PyPI must be reachable once).
#
# Usage: scripts/schemathesis.sh [extra `st run` options, e.g. --include-path-regex dead]
# Env: FORGEMQ_BIN (default: builds target/debug/forgemq), SCHEMATHESIS_SEED,
# SCHEMATHESIS_MAX_EXAMPLES (examples per operation).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

SCHEMATHESIS_VERSION=4.32.5
SEED=${SCHEMATHESIS_SEED:-20251203}
# Per operation: enough for every operation's edge cases (about 2,000 requests in all,
# some 20 s) while keeping the CI step short.
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-100}

scripts/ensure-redis.sh

venv=$PWD/target/schemathesis-venv
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  command -v python3 >/dev/null || { echo "python3 is needed for Schemathesis (Debian: apt-get install -y python3 python3-venv)" >&2; exit 1; }
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "could not create a venv (Debian: apt-get install -y python3-venv)" >&2; exit 1; }
  # Its dependencies pinned too (scripts/schemathesis-requirements.txt): the same seed
  # then makes the same requests.
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -c scripts/schemathesis-requirements.txt "schemathesis==$SCHEMATHESIS_VERSION"
fi

if [ -z "${FORGEMQ_BIN:-}" ]; then
  cargo build --quiet -p forgemq-cli --bin forgemq
  FORGEMQ_BIN=target/debug/forgemq
fi
FORGEMQ_BIN=$(realpath "$FORGEMQ_BIN")

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
pids+=($!)

api_port=$(free_port)
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
REDIS_URL="redis://127.0.0.1:$redis_port/" FORGEMQ_TOKEN="$token" \
  "$FORGEMQ_BIN" serve --bind "127.0.0.1:$api_port" 2>"$work/serve.log" &
pids+=($!)

for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$api_port/readyz" >/dev/null || { cat "$work/serve.log" >&2; exit 1; }

# --checks all: besides conformance, valid input must be accepted and invalid input
# refused with a 4xx; `ignored_auth` sends requests without the token. All but
# `use_after_free`, which expects a GET after a DELETE to answer 404: DELETE
# /topics/{topic}/dead-letters empties the dead-letter queue, which still exists (empty,
# GET answers []), as a topic exists without messages. Run from the
# throwaway folder: Schemathesis keeps a cache of past crashes in its working directory,
# which would make one run depend on the ones before.
cd "$work"
"$venv/bin/st" --config-file "$repo/scripts/schemathesis.toml" \
  run "http://127.0.0.1:$api_port/api/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --exclude-checks use_after_free \
  --seed "$SEED" \
  --max-examples "$MAX_EXAMPLES" \
  --generation-database none \
  --workers 1 \
  --no-color \
  "$@"
