#!/usr/bin/env bash
# Runs the whole test suite. Every test starts its own private redis-server, so nothing
# needs to be running; redis-server (and faketime, for the clock-skew test) are installed
# first when missing.
#
# The library's integration suite runs twice: on a private server per test, then on a
# private 3-master Redis Cluster per test (FORGEMQ_TEST_TOPOLOGY=cluster; tests that need
# one server of their own to kill, freeze, proxy or reconfigure say so and are skipped
# there). FORGEMQ_SKIP_CLUSTER=1 skips the second run.
#
# REDIS_SERVER=/path/to/redis-server tests against that binary instead of the one on PATH
# (the test support starts it for every server, cluster node and sentinel), e.g. the
# library's suite on Redis 6.2, as .ci/run does:
#   redis62=$(scripts/redis62.sh)
#   REDIS_SERVER=$redis62 FORGEMQ_SKIP_CLUSTER=1 scripts/test.sh --test it
set -euo pipefail
if [ -n "${REDIS_SERVER:-}" ]; then
    # Absolute, since each test binary runs in its own crate's folder.
    REDIS_SERVER=$(realpath "$REDIS_SERVER")
    export REDIS_SERVER
fi
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
scripts/ensure-test-tools.sh
# The daylight-saving test runs a redis-server under libfaketime, which hangs Debian's
# jemalloc build at start-up: it uses the Redis 6.2 of scripts/redis62.sh (libc malloc)
# instead, installed here when PyPI is reachable (else that one test says it skipped).
if [ -z "${FORGEMQ_FAKETIME_REDIS:-}" ]; then
    FORGEMQ_FAKETIME_REDIS=$(scripts/redis62.sh 2>/dev/null || true)
    export FORGEMQ_FAKETIME_REDIS
fi
if [ -n "${REDIS_SERVER:-}" ]; then
    echo "testing against $("$REDIS_SERVER" --version) ($REDIS_SERVER)" >&2
fi
cargo test --workspace "$@"
if [ "${FORGEMQ_SKIP_CLUSTER:-}" != 1 ]; then
    # `--workspace --test it` rather than `-p forgemq`: the same feature set as the run
    # above, so nothing is compiled again.
    FORGEMQ_TEST_TOPOLOGY=cluster cargo test --workspace --test it "$@"
fi
