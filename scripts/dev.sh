#!/usr/bin/env bash
# Runs ForgeMQ for real on this machine: `forgemq dev` starts a private redis-server (AOF
# on, data under ./.forgemq/) and serves the dashboard and the HTTP API on
# http://127.0.0.1:8080 until Ctrl-C. redis-server is installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
exec cargo run --release --quiet -p forgemq-cli -- dev "$@"
