#!/usr/bin/env bash
# Runs ForgeMQ for real: publishes, consumes, retries and dead-letters a few messages.
# Uses $REDIS_URL when set; otherwise starts a private redis-server (AOF on, data under
# ./.forgemq/) on a free port and stops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh

if [ -z "${REDIS_URL:-}" ]; then
  mkdir -p .forgemq
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 16379)
  redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/.forgemq" --appendonly yes \
    --save "" --daemonize yes --pidfile "$PWD/.forgemq/redis.pid" --logfile "$PWD/.forgemq/redis.log"
  trap 'kill "$(cat .forgemq/redis.pid)" 2>/dev/null || true' EXIT
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export REDIS_URL="redis://127.0.0.1:$port/"
  echo "started a private redis-server at $REDIS_URL (data in ./.forgemq/)"
fi
cargo run --quiet -p forgemq --example quickstart
