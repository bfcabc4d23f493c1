#!/usr/bin/env bash
# Runs every forgemq-bench case (medians of 3 runs) against a private redis-server it starts
# itself, in a release build. Arguments go to forgemq-bench, e.g.:
#   scripts/bench.sh --case process-c50 --runs 5
#   scripts/bench.sh --smoke            # seconds; what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
exec cargo run --quiet --release -p forgemq-bench -- "$@"
