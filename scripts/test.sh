#!/usr/bin/env bash
# Runs the whole test suite. Every test starts its own private redis-server, so nothing
# needs to be running; redis-server (and faketime, for the clock-skew test) are installed
# first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
scripts/ensure-test-tools.sh
exec cargo test --workspace "$@"
