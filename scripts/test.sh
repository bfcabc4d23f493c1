#!/usr/bin/env bash
# Runs the whole test suite. Every test starts its own private redis-server, so nothing
# needs to be running; redis-server (and faketime, for the clock-skew test) are installed
# first when missing.
#
# The library's integration suite runs twice: on a private server per test, then on a
# private 3-master Redis Cluster per test (FORGEMQ_TEST_TOPOLOGY=cluster; tests that need
# one server of their own to kill, freeze, proxy or reconfigure say so and are skipped
# there). FORGEMQ_SKIP_CLUSTER=1 skips the second run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
scripts/ensure-test-tools.sh
cargo test --workspace "$@"
if [ "${FORGEMQ_SKIP_CLUSTER:-}" != 1 ]; then
    # `--workspace --test it` rather than `-p forgemq`: the same feature set as the run
    # above, so nothing is compiled again.
    FORGEMQ_TEST_TOPOLOGY=cluster cargo test --workspace --test it "$@"
fi
