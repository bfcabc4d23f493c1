#!/usr/bin/env bash
# Runs the whole test suite. Every test starts its own private redis-server, so nothing
# needs to be running; redis-server is installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
exec cargo test --workspace "$@"
